"""Multi-label metrics and decision thresholds as pure tensor functions (checked against scikit-learn in
tests/test_multilabel.py).

A multi-label model gives one independent probability per label (a sigmoid per logit); an image carries
label k when its probability reaches label k's threshold. Inputs: ``probs`` N×K in 0..1, ``target`` N×K
multi-hot (0/1), ``thresholds`` K values in 0..1.

Conventions follow scikit-learn: average precision is the step-wise area ``Σ (R_n − R_{n−1}) P_n`` over
distinct score thresholds (no interpolation), precision/recall/F1 are 0 where undefined
(``zero_division=0``), exact-match ratio is sklearn's ``accuracy_score`` on indicator matrices (subset
accuracy), and Hamming loss the fraction of wrong label decisions. Macro mAP averages over labels with at
least one positive image (AP is undefined without positives; sklearn warns and scores such a label 0).
"""
from __future__ import annotations

import math

import torch

from imgrec.eval.metrics import prf_from_counts

__all__ = ["average_precision", "choose_thresholds", "multilabel_prf", "summarize_multilabel"]

DEFAULT_THRESHOLD = 0.5


def _ranked(scores: torch.Tensor, target: torch.Tensor):
    """Cumulative true/false positives at each distinct score, highest score first (the PR-curve points),
    and the distinct scores themselves."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order].double(), target[order].double()
    tp, fp = t.cumsum(0), (1 - t).cumsum(0)
    # a point per distinct score: the last position of each run of equal scores (all of them are predicted
    # positive together at that threshold)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    return tp[last], fp[last], s[last]


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    """AP of one label (1-D scores and 0/1 targets), as ``sklearn.metrics.average_precision_score``;
    NaN when the label has no positive."""
    pos = float(target.sum())
    if pos == 0:
        return math.nan
    tp, fp, _ = _ranked(scores, target)
    precision, recall = tp / (tp + fp), tp / pos
    prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - prev) * precision).sum())


def multilabel_prf(pred: torch.Tensor, target: torch.Tensor) -> dict[str, list[float]]:
    """Per-label precision, recall, F1 and support of N×K 0/1 decisions (0 where undefined, as sklearn)."""
    pred, target = pred.double(), target.double()
    return prf_from_counts((pred * target).sum(0), pred.sum(0), target.sum(0))


def choose_thresholds(probs: torch.Tensor, target: torch.Tensor, default: float = DEFAULT_THRESHOLD) -> list[float]:
    """Per label, the threshold that maximises its F1 on (``probs``, ``target``) — the validation split.

    The cut is placed halfway between the lowest score kept and the next lower distinct score (0 below the
    lowest), so the decisions on these images are exactly the best ones and a new image is judged by the
    nearest gap rather than by one validation score. A label without positives (F1 is 0 at every cut) keeps
    ``default``. Ties in F1 go to the higher threshold (fewer false positives).
    """
    out = []
    for k in range(probs.shape[1]):
        pos = float(target[:, k].sum())
        if pos == 0:
            out.append(float(default))
            continue
        tp, fp, s = _ranked(probs[:, k], target[:, k])
        f1 = 2 * tp / (tp + fp + pos)
        i = int(torch.argmax(f1))  # the first maximum: the highest threshold among equals
        lower = float(s[i + 1]) if i + 1 < len(s) else 0.0
        out.append(min(max((float(s[i]) + lower) / 2, 0.0), 1.0))
    return out


def summarize_multilabel(logits: torch.Tensor, target: torch.Tensor, classes: list[str],
                         thresholds: list[float] | None = None) -> dict:
    """Everything ``imgrec eval`` reports for a multi-label model: mAP (macro, micro), exact-match ratio,
    Hamming loss, F1 (macro, micro), BCE loss, and per label precision/recall/F1/AP/support/threshold."""
    k = len(classes)
    logits, target = logits.float(), target.float()
    thr = torch.tensor(thresholds if thresholds is not None else [DEFAULT_THRESHOLD] * k, dtype=torch.float32)
    probs = torch.sigmoid(logits)
    pred = (probs >= thr).float()
    n = int(target.shape[0])
    prf = multilabel_prf(pred, target)
    aps = [average_precision(probs[:, j], target[:, j]) for j in range(k)]
    defined = [a for a in aps if not math.isnan(a)]
    tp = float((pred * target).sum())
    micro_p = tp / max(float(pred.sum()), 1e-12) if pred.sum() > 0 else 0.0
    micro_r = tp / max(float(target.sum()), 1e-12) if target.sum() > 0 else 0.0
    return {
        "task": "multilabel",
        "n": n,
        "map_macro": float(sum(defined) / len(defined)) if defined else math.nan,
        "map_micro": average_precision(probs.flatten(), target.flatten()),
        "exact_match": float((pred == target).all(1).float().mean()) if n else math.nan,
        "hamming_loss": float((pred != target).float().mean()) if n else math.nan,
        "f1_macro": float(sum(prf["f1"]) / k),
        "f1_micro": 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r > 0 else 0.0,
        "loss": torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item() if n else math.nan,
        "classes": list(classes),
        "thresholds": thr.tolist(),
        "per_class": [{"class": c, "precision": prf["precision"][j], "recall": prf["recall"][j], "f1": prf["f1"][j],
                       "ap": None if math.isnan(aps[j]) else aps[j], "support": prf["support"][j],
                       "threshold": float(thr[j])} for j, c in enumerate(classes)],
    }
