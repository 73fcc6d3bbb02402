"""Prediction: the runtime (model directory → module → logits) and ``Classifier``. Imports no training code."""
from imgrec.infer.predictor import Classifier

__all__ = ["Classifier"]
