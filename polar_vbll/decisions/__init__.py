"""Calibrated decisions from a trained run's predictive: abstention at a target selective risk
(:mod:`~polar_vbll.decisions.selective`), conformal answer sets (:mod:`~polar_vbll.decisions.conformal`),
and the rule that combines them with an OOD flag (:mod:`~polar_vbll.decisions.rule`). docs/predict.md
explains every output field."""
