"""Score stage: workers claim scoring jobs, score the series, decide and write the reports
(:mod:`qgate.score.worker`); ``qgate worker`` runs them (:mod:`qgate.score.stage`)."""
