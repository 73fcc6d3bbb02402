"""Choose a prediction backend: ``load_classifier("runs/x")`` (PyTorch) or ``load_classifier("model.onnx")`` /
``load_classifier("runs/x", backend="onnxruntime")`` (ONNX Runtime, without importing PyTorch).

Both return a :class:`imgrec.infer.base.Predictor` (``predict``, ``predict_files``, ``probabilities``,
``logits``, ``classes``, ``multilabel``, ``thresholds``, ``temperature``, ``meta`` …):
:class:`imgrec.infer.predictor.Classifier` or :class:`imgrec.infer.ort.OnnxClassifier`, both derived from
:class:`imgrec.infer.base.BasePredictor`. This module imports neither backend until it is asked for one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from imgrec.errors import ConfigError, ModelFileError
from imgrec.modeldir import RunDir

if TYPE_CHECKING:
    from imgrec.infer.base import Predictor

__all__ = ["BACKENDS", "load_classifier", "onnx_path", "resolve_backend"]

BACKENDS = ("auto", "torch", "onnxruntime")
EXPORTED_NAME = RunDir.ONNX  # what `imgrec export` writes into the model directory by default


def onnx_path(model: str | os.PathLike) -> Path:
    """The ONNX file for ``model``: the file itself, or ``model.onnx`` inside a model directory."""
    p = Path(model)
    if p.is_dir():
        f = p / EXPORTED_NAME
        if not f.is_file():
            raise ModelFileError(f"{p}: no {EXPORTED_NAME} in this model directory; "
                                 f"run `imgrec export --model {p}` first (or pass the .onnx file)")
        return f
    if not p.exists():
        raise ModelFileError(f"{p}: no such ONNX file or model directory")
    return p


def resolve_backend(model: str | os.PathLike, backend: str = "auto") -> str:
    """The backend ``load_classifier(model, backend)`` will use, "torch" or "onnxruntime", importing neither, so
    a caller can prepare for it first (the server sets PyTorch's threads only when PyTorch will run)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    p = Path(model)
    return "onnxruntime" if p.suffix.lower() == ".onnx" and not p.is_dir() else "torch"


def load_classifier(model: str | os.PathLike, backend: str = "auto", which: str = "best", device: str = "auto",
                    amp: str = "auto", threads: int | None = None) -> "Predictor":
    """A classifier for a model directory or an exported ``.onnx`` file.

    Args:
        backend: "auto" (ONNX Runtime for a ``.onnx`` file, PyTorch for a model directory), "torch" or
            "onnxruntime" (a model directory then means its ``model.onnx``).
        which: ``best``/``last`` weights (PyTorch only; an exported file holds one set).
        amp: PyTorch autocast (see ``Classifier``); threads: ONNX Runtime intra-op threads.
    """
    p = Path(model)
    if resolve_backend(p, backend) == "onnxruntime":
        from imgrec.infer.ort import OnnxClassifier
        return OnnxClassifier(onnx_path(p), device=device, threads=threads)
    if resolve_backend(p) == "onnxruntime":  # a .onnx file with backend torch
        raise ConfigError(f"{p}: an ONNX file runs with --backend onnxruntime (or auto), not torch")
    from imgrec.infer.predictor import Classifier
    return Classifier.load(p, which=which, device=device, amp=amp)
