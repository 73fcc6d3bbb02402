"""The one evaluation path: a model over a labelled uint8 split → logits → metrics.

``imgrec eval``, ``imgrec report`` and the final test of ``imgrec train`` all call :func:`evaluate`, with the
same batch size, so their numbers are bit-for-bit equal for the same model and data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from imgrec.errors import DatasetError
from imgrec.eval.metrics import summarize
from imgrec.eval.multilabel import summarize_multilabel

__all__ = ["EVAL_BATCH_SIZE", "Evaluation", "evaluate"]

EVAL_BATCH_SIZE = 1024  # one batch size for every evaluation: the logits (and so every number) match exactly


@dataclass
class Evaluation:
    """``metrics``: what ``imgrec eval --json`` prints (top-1, top-k, loss, per-class P/R/F1, confusion matrix);
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
    return Evaluation(summarize(logits, labels.long(), list(clf.classes), top_k), logits)
