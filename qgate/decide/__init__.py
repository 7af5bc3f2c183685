"""Decide stage: the gate decision on a scored series (:mod:`qgate.decide.thresholds`:
scorer outputs against the configured thresholds) and the gate policy that follows it
(:mod:`qgate.decide.gate`: which originals go to the archive, which wait for a person).
Both run in the worker, ``qgate worker``; releases also come from the review app and the
command line."""
