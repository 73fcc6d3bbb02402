"""The one evaluation path: a model over a labelled uint8 split → logits → metrics.

``imgrec eval``, ``imgrec report`` and the final test of ``imgrec train`` all call :func:`evaluate`, with the
same batch size, so their numbers are bit-for-bit equal for the same model and data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from imgrec.errors import DatasetError
from imgrec.eval.calibration import calibration_summary
from imgrec.eval.metrics import summarize
from imgrec.eval.multilabel import summarize_multilabel

__all__ = ["EVAL_BATCH_SIZE", "Evaluation", "calibrate_model_dir", "evaluate"]

EVAL_BATCH_SIZE = 1024  # one batch size for every evaluation: the logits (and so every number) match exactly


@dataclass
class Evaluation:
    """``metrics``: what ``imgrec eval --json`` prints (top-1, top-k, loss, per-class P/R/F1, confusion matrix,
    and for single-label models ``calibration``: ECE/NLL/Brier before and after the model's temperature);
    ``logits``: N×K fp32 on the CPU, for the report's calibration and galleries."""
    metrics: dict
    logits: torch.Tensor


def evaluate(clf, images: torch.Tensor, labels: torch.Tensor, top_k: int = 5) -> Evaluation:
    """Evaluate a :class:`~imgrec.infer.predictor.Classifier` on N×C×H×W uint8 ``images`` (at its input size)
    and their integer ``labels``, through the same forward pass as ``predict``. A multi-label model takes N×K
    multi-hot ``labels`` and is measured at its thresholds (imgrec.eval.multilabel; ``top_k`` does not apply)."""
    logits = clf.logits(images, EVAL_BATCH_SIZE)
    if getattr(clf.meta, "task", "classification") == "multilabel":
        if labels.ndim != 2:
            raise DatasetError("a multi-label model is evaluated on multi-label data (N×K labels)")
        return Evaluation(summarize_multilabel(logits, labels, list(clf.classes), clf.thresholds), logits)
    metrics = summarize(logits, labels.long(), list(clf.classes), top_k)
    if len(labels) and bool(torch.isfinite(logits).all()):
        # ECE, NLL and Brier of the raw scores (T = 1) and of the probabilities the model gives (its temperature)
        metrics["calibration"] = calibration_summary(logits, labels.long(), getattr(clf, "temperature", 1.0))
    return Evaluation(metrics, logits)


def calibrate_model_dir(model_dir, *, data: str | None = None, data_dir: str | None = None, split: str = "val",
                        on_bad_image: str | None = None, device: str = "auto") -> dict:
    """``imgrec calibrate``: fit T for the model directory's best weights on ``split`` of its own data (or
    ``data``), through the forward pass predict uses, and rewrite its ``model.json`` atomically with
    ``inference.temperature``. Returns the stored entry. Single-label models only."""
    from imgrec.data.dataset import load_run_split
    from imgrec.errors import ConfigError
    from imgrec.eval.calibration import temperature_entry
    from imgrec.infer.predictor import Classifier
    from imgrec.modeldir import read_meta, write_meta

    meta = read_meta(model_dir)
    if meta.multilabel:
        raise ConfigError(f"{model_dir}: temperature scaling applies to single-label models; a multi-label "
                          f"model's per-label thresholds already set its decisions")
    clf = Classifier.load(model_dir, device=device)
    r = load_run_split(meta, data, data_dir, split, on_bad_image)
    entry = temperature_entry(clf.logits(r.data.images, EVAL_BATCH_SIZE), r.data.labels, r.split)
    if data is not None:
        entry["data"] = str(data)
    # read again just before writing, so that only the temperature changes in the file
    meta = read_meta(model_dir)
    meta.inference["temperature"] = entry
    write_meta(model_dir, meta)
    return entry
