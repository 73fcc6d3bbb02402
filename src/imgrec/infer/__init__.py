"""Prediction: the runtime (model directory → module → logits) and ``Classifier``. Imports no training code.

``Classifier`` is imported on first use, so that a submodule that needs no PyTorch can be imported alone.
"""
from __future__ import annotations

import importlib

__all__ = ["Classifier"]


def __getattr__(name: str):
    if name == "Classifier":
        return importlib.import_module("imgrec.infer.predictor").Classifier
    raise AttributeError(f"module 'imgrec.infer' has no attribute {name!r}")
