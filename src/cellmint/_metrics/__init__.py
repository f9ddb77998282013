"""Metrics, apart from the models that they score.

``_classification``: the annotator's classification and calibration measures; ``_perturbation``: cell-eval's
formulas for perturbation responses.
"""
