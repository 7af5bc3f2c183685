"""Assemble stage: decide when a received series is complete and queue it for scoring
(:mod:`qgate.assemble.completion`). It runs beside the receiver, in ``qgate receive``."""
