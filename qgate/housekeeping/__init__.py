"""Housekeeping: the scheduled jobs of the worker process (:mod:`qgate.housekeeping.schedule`:
the nightly retraining and the retention purge, each under a cluster-wide lock) and the
retention purge itself (:mod:`qgate.housekeeping.retention`, also ``qgate purge``)."""
