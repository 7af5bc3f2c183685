"""Score stage: workers claim scoring jobs, score the series, decide and write the reports
(:mod:`qgate.score.worker`); ``qgate worker`` runs them (:mod:`qgate.score.stage`).

The stage's own parts: the durable job queue it claims from (:mod:`qgate.score.queue`),
series loading (:mod:`qgate.score.volume`), scoring one series from its files
(:mod:`qgate.score.pipeline`) and the result object the command line prints
(:mod:`qgate.score.results`)."""
