"""Confident learning: find likely label errors from out-of-sample predicted probabilities.

Implements the method of Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset
Labels", Journal of Artificial Intelligence Research 70 (2021), 1373–1411 (arXiv:1911.00068), from the paper
(cleanlab, the authors' library, is AGPL-3.0; this is a small independent implementation of the published
equations, with numpy only):

* per-class thresholds (eq. 2): t_j = the mean predicted probability of class j over the examples labelled j
  (the class's average self-confidence);
* the confident joint (eq. 1): example x with given label i is counted in C[i][j*] where j* is the class
  with the largest p̂(j | x) among those with p̂(j | x) ≥ t_j (an example above no threshold is not counted);
* calibration (eq. 3): each row of C rescaled to the number of examples given that label, then the whole
  matrix to sum 1: the estimated joint Q[i][j] of (given label i, true label j);
* pruning (section 3.2): ``"prune_by_noise_rate"`` (PBNR, the paper's and cleanlab's default): for each
  off-diagonal cell (i, j), the n·Q[i][j] examples labelled i with the largest margin p̂(j|x) − p̂(i|x);
  ``"prune_by_class"`` (PBC): for each class i, the n·Σ_{j≠i} Q[i][j] examples labelled i with the lowest
  self-confidence; ``"both"``: the intersection; ``"confident_joint"`` (C_confusion-style
  C̃_{ỹ,y*}): every example counted off the diagonal of C; ``"argmax"`` (the baseline C_confusion): every
  example whose argmax differs from its label;
* ranking (section 3.2 / cleanlab's ``rank_by``): ``"self_confidence"`` p̂(ỹ | x), or
  ``"normalized_margin"`` p̂(ỹ | x) − max_{j≠ỹ} p̂(j | x) — lower means more likely mislabelled.

Everything takes ``labels`` (n,) ints and ``probs`` (n, m) rows summing to 1, computed out of sample (each
example scored by a model that never trained on it: see ``imgrec.engine.audit``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["per_class_thresholds", "confident_joint", "calibrate_joint", "estimate_joint", "find_label_issues",
           "label_quality", "suggest_labels", "LabelIssues", "METHODS", "RANKINGS"]

METHODS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_joint", "argmax")
RANKINGS = ("self_confidence", "normalized_margin")


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or labels.ndim != 1 or len(labels) != len(probs):
        raise ValueError(f"labels (n,) and probs (n, m) expected, got {labels.shape} and {probs.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError("labels must be in 0..m-1")
    return labels, probs


def per_class_thresholds(labels, probs) -> np.ndarray:
    """t_j: mean p̂(j | x) over the examples labelled j (eq. 2). A class with no examples gets an infinite
    threshold: nothing is confidently assigned to it (the paper leaves that case undefined)."""
    labels, probs = _check(labels, probs)
    m = probs.shape[1]
    t = np.full(m, np.inf)
    for j in range(m):
        sel = labels == j
        if sel.any():
            t[j] = probs[sel, j].mean()
    return t


def _confident_assignment(labels, probs, thresholds) -> np.ndarray:
    """j* per example (eq. 1), -1 where no class reaches its threshold."""
    above = probs >= thresholds[None, :] - 1e-12  # ≥, with a hair of slack for float rounding of the mean
    masked = np.where(above, probs, -np.inf)
    j = masked.argmax(1)
    return np.where(above.any(1), j, -1)


def confident_joint(labels, probs, thresholds=None) -> np.ndarray:
    """C[i][j]: how many examples labelled i are confidently of class j (eq. 1), int (m, m)."""
    labels, probs = _check(labels, probs)
    m = probs.shape[1]
    t = per_class_thresholds(labels, probs) if thresholds is None else np.asarray(thresholds, float)
    j = _confident_assignment(labels, probs, t)
    keep = j >= 0
    c = np.zeros((m, m), dtype=np.int64)
    np.add.at(c, (labels[keep], j[keep]), 1)
    return c


def calibrate_joint(cj: np.ndarray, label_counts: np.ndarray) -> np.ndarray:
    """Q̂ (eq. 3): rows of the confident joint rescaled to the given-label counts, then normalised to sum 1."""
    cj = np.asarray(cj, dtype=np.float64)
    rows = cj.sum(1, keepdims=True)
    counts = np.asarray(label_counts, dtype=np.float64)[:, None]
    # a row with no confident example: assume that class's labels are right (its count on the diagonal)
    scaled = np.where(rows > 0, cj / np.maximum(rows, 1) * counts, np.diag(counts[:, 0]))
    total = scaled.sum()
    return scaled / total if total > 0 else scaled


def estimate_joint(labels, probs) -> np.ndarray:
    """The calibrated joint Q̂[i][j] of (given label i, true label j)."""
    labels, probs = _check(labels, probs)
    counts = np.bincount(labels, minlength=probs.shape[1])
    return calibrate_joint(confident_joint(labels, probs), counts)


def label_quality(labels, probs, rank_by: str = "self_confidence") -> np.ndarray:
    """Per-example label quality in [0, 1]; lower = more likely mislabelled."""
    labels, probs = _check(labels, probs)
    given = probs[np.arange(len(labels)), labels]
    if rank_by == "self_confidence":
        return given
    if rank_by == "normalized_margin":
        others = probs.copy()
        others[np.arange(len(labels)), labels] = -np.inf
        return (given - others.max(1) + 1.0) / 2.0  # margin in [-1, 1] → [0, 1]
    raise ValueError(f"rank_by must be one of {', '.join(RANKINGS)}, not {rank_by!r}")


def suggest_labels(labels, probs, thresholds=None) -> np.ndarray:
    """The suggested label: the confident class j* (eq. 1) when it differs from the given one, else the most
    probable other class."""
    labels, probs = _check(labels, probs)
    t = per_class_thresholds(labels, probs) if thresholds is None else np.asarray(thresholds, float)
    j = _confident_assignment(labels, probs, t)
    others = probs.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    return np.where((j >= 0) & (j != labels), j, others.argmax(1))


@dataclass
class LabelIssues:
    """The result of :func:`find_label_issues`: ``issues`` are indices ranked most-likely-wrong first."""
    issues: np.ndarray            # indices, ranked
    is_issue: np.ndarray          # bool mask (n,)
    quality: np.ndarray           # (n,) label quality, lower = worse
    suggested: np.ndarray         # (n,) suggested label per example
    thresholds: np.ndarray        # (m,) t_j
    confident_joint: np.ndarray   # (m, m) C
    joint: np.ndarray             # (m, m) calibrated Q̂
    estimated_noise_rate: float   # 1 − trace(Q̂)


def find_label_issues(labels, probs, method: str = "prune_by_noise_rate",
                      rank_by: str = "self_confidence") -> LabelIssues:
    """Flag and rank likely label errors by confident learning (see the module docstring)."""
    labels, probs = _check(labels, probs)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    n, m = probs.shape
    t = per_class_thresholds(labels, probs)
    j_star = _confident_assignment(labels, probs, t)
    cj = np.zeros((m, m), dtype=np.int64)
    keep = j_star >= 0
    np.add.at(cj, (labels[keep], j_star[keep]), 1)
    counts = np.bincount(labels, minlength=m)
    q = calibrate_joint(cj, counts)
    idx = np.arange(n)
    given = probs[idx, labels]

    members_of = [idx[labels == i] for i in range(m)]

    def prune(mask: np.ndarray, members: np.ndarray, k: int, key: np.ndarray) -> None:
        """Flag the ``k`` members lowest by ``key`` (ties in index order)."""
        if k > 0 and len(members):
            mask[members[np.argsort(key, kind="stable")[:k]]] = True

    def by_noise_rate() -> np.ndarray:
        # from class i, the n·Q[i, j] members most likely of class j: the largest margins p_j − p_i
        mask = np.zeros(n, dtype=bool)
        for i, members in enumerate(members_of):
            for j in range(m):
                if j != i:
                    prune(mask, members, int(round(n * q[i, j])), probs[members, i] - probs[members, j])
        return mask

    def by_class() -> np.ndarray:
        # from class i, its n·(off-diagonal mass of Q's row i) members least sure of their given label
        mask = np.zeros(n, dtype=bool)
        for i, members in enumerate(members_of):
            prune(mask, members, int(round(n * (q[i].sum() - q[i, i]))), given[members])
        return mask

    if method == "prune_by_noise_rate":
        mask = by_noise_rate()
    elif method == "prune_by_class":
        mask = by_class()
    elif method == "both":
        mask = by_noise_rate() & by_class()
    elif method == "confident_joint":
        mask = keep & (j_star != labels)
    else:
        mask = probs.argmax(1) != labels
    quality = label_quality(labels, probs, rank_by)
    flagged = idx[mask]
    ranked = flagged[np.argsort(quality[flagged], kind="stable")]
    return LabelIssues(ranked, mask, quality, suggest_labels(labels, probs, t), t, cj, q,
                       float(1.0 - np.trace(q)))
