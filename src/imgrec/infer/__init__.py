"""Prediction: the runtime (model directory → module → logits), ``Predictor`` (the API both backends give,
imgrec.infer.base), ``Classifier`` (PyTorch), ``OnnxClassifier`` (ONNX Runtime, imgrec.infer.ort),
``load_classifier`` (either, by backend) and ``export``. Imports no training code.

The names are imported on first use, so that a submodule that needs no PyTorch (the ONNX Runtime path:
imgrec.infer.base, imgrec.infer.ort, imgrec.infer.backends, imgrec.infer.files) can be imported alone.
"""
from __future__ import annotations

import importlib

__all__ = ["BasePredictor", "Classifier", "OnnxClassifier", "Predictor", "load_classifier"]

_EXPORTS = {"Classifier": "imgrec.infer.predictor", "OnnxClassifier": "imgrec.infer.ort",
            "load_classifier": "imgrec.infer.backends", "Predictor": "imgrec.infer.base",
            "BasePredictor": "imgrec.infer.base"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'imgrec.infer' has no attribute {name!r}")
