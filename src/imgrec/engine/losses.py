"""The training loss and the "correct" count for each task, so the one train_step serves both.

classification: cross-entropy over a softmax, integer targets (N).
multilabel:     binary cross-entropy with logits, one independent sigmoid per label, multi-hot targets (N×K).

Class imbalance (imgrec.data.imbalance): ``class_weights`` weigh the cross-entropy per class, and can be switched
on and off during training (``set_class_weights``: deferred re-weighting); ``logit_prior``/``logit_tau`` make it
the logit-adjusted cross-entropy of Menon et al. 2021 (``LogitAdjustedLoss``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["LogitAdjustedLoss", "MultiLabelLoss", "build_loss", "count_correct", "eval_loss", "set_class_weights"]


class MultiLabelLoss(nn.Module):
    """BCE-with-logits over N×K multi-hot targets.

    Label smoothing, adapted to independent binary labels: each target moves ``eps/2`` towards the other
    side (1 → 1−eps/2, 0 → eps/2), the two-class case of cross-entropy's ``eps/K`` spread.
    ``pos_weight`` (K) weighs each label's positives (class weighting for multi-label, e.g. negatives/positives).
    """

    def __init__(self, label_smoothing: float = 0.0, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight).float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + self.label_smoothing / 2
        pw = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        return nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)


class LogitAdjustedLoss(nn.CrossEntropyLoss):
    """Logit-adjusted softmax cross-entropy (Menon et al., ICLR 2021, eq. 10): cross-entropy of
    ``logits + τ·log(prior)``, the prior being the training class frequencies.

    Adding the log-prior inside the loss lets the network's raw logits model the *balanced* class posterior:
    a frequent class gets its margin from the prior term, not from the weights, so prediction takes the raw
    argmax (nothing is stored for inference). τ = 1 is the paper's Fisher-consistent choice for the balanced
    error. Label smoothing and class weights, if given, apply to the adjusted logits as in CrossEntropyLoss.
    """

    def __init__(self, prior, tau: float = 1.0, label_smoothing: float = 0.0, weight: torch.Tensor | None = None):
        super().__init__(weight=weight, label_smoothing=label_smoothing)
        prior = torch.as_tensor(prior, dtype=torch.float64)
        if prior.ndim != 1 or not bool((prior > 0).all()):
            raise ValueError("logit-adjusted loss: the prior must be K positive frequencies")
        self.tau = float(tau)
        self.register_buffer("log_prior", (prior / prior.sum()).log().float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits + self.tau * self.log_prior.to(logits.dtype), target)


def build_loss(task: str = "classification", label_smoothing: float = 0.0,
               class_weights: torch.Tensor | None = None, logit_prior=None, logit_tau: float = 0.0) -> nn.Module:
    """The training loss for ``task``; ``class_weights`` (K) become CrossEntropyLoss's ``weight`` for
    classification and BCE's ``pos_weight`` for multilabel. ``logit_prior`` (K class frequencies) with
    ``logit_tau`` > 0: the logit-adjusted cross-entropy (classification only)."""
    if task == "multilabel":
        return MultiLabelLoss(label_smoothing, class_weights)
    weight = None if class_weights is None else torch.as_tensor(class_weights).float()
    if logit_tau and logit_prior is not None:
        return LogitAdjustedLoss(logit_prior, logit_tau, label_smoothing, weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def set_class_weights(loss_fn: nn.Module, class_weights: torch.Tensor | None) -> None:
    """Switch a loss's class weights on (a K tensor) or off (None) in place — deferred re-weighting (Cao et al.
    2019) trains on the natural frequencies first and re-weights only late in training."""
    name = "pos_weight" if isinstance(loss_fn, MultiLabelLoss) else "weight"
    old = getattr(loss_fn, name)
    device = old.device if old is not None else next((b.device for b in loss_fn.buffers()), None)
    new = None if class_weights is None else torch.as_tensor(class_weights).float()
    if new is not None and device is not None:
        new = new.to(device)
    setattr(loss_fn, name, new)


def count_correct(task: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Images predicted right, as a 0-dim tensor on the device: argmax = label, or (multilabel) every label
    decided right at probability 0.5 (logit 0) — the exact-match count, sklearn's subset accuracy."""
    if task == "multilabel":
        return ((logits > 0) == (y > 0.5)).all(1).sum()
    return (logits.argmax(1) == y).sum()


def eval_loss(task: str, logits: torch.Tensor, y: torch.Tensor) -> float:
    """The validation loss (unsmoothed, unweighted): cross-entropy, or mean binary cross-entropy per label."""
    if task == "multilabel":
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), y.float()).item()
    return nn.functional.cross_entropy(logits, y).item()
