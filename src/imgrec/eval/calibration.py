"""Temperature scaling (Guo et al. 2017): one scalar T > 0 so that ``softmax(logits / T)`` says how sure.

A network trained with label smoothing is under-confident (its top score is capped), one trained long without
it is over-confident; dividing every logit by the same T fixes most of either without changing a single
prediction (the order of the scores stays the same). T is fitted by minimising the negative log-likelihood on
a labelled split the model was not trained on (the validation split), stored in ``model.json`` as
``inference.temperature`` and applied by every path that turns logits into probabilities (Classifier,
the exported ONNX graph and so OnnxClassifier, the server, eval, report, explain).

The fit is a golden-section search on log T, in float64: NLL(1/T) is convex in 1/T, so it is unimodal in
log T and the search finds the minimum inside the bounds; it is deterministic (no random start, no learning
rate) and costs about 60 evaluations of the NLL on logits already computed.
"""
from __future__ import annotations

import math

import torch

from imgrec.errors import DatasetError
from imgrec.eval.metrics import expected_calibration_error

__all__ = ["T_BOUNDS", "brier", "calibration_metrics", "calibration_summary", "fit_temperature", "nll", "temperature_entry"]

# T outside this range means the logits are broken rather than mis-scaled (0.05: twenty times sharper; 20: the
# scores almost uniform); a fit at a bound is stored as the bound
T_BOUNDS = (0.05, 20.0)
_GOLDEN = (math.sqrt(5) - 1) / 2
_STEPS = 80  # the bracket shrinks by 0.618 per step: 80 steps leave ~1e-16 of log T, float64's resolution


def _check(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise DatasetError(f"temperature scaling needs N×K logits and N integer labels, got "
                           f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise DatasetError("temperature scaling needs a labelled split with at least one image")
    z = logits.detach().double().cpu()
    if not torch.isfinite(z).all():
        raise DatasetError("the model gives non-finite logits; no temperature can be fitted")
    return z, labels.detach().long().cpu()


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``, in float64."""
    z, y = _check(logits, labels)
    return float(torch.nn.functional.cross_entropy(z / float(temperature), y))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The T in ``bounds`` minimising the NLL of ``softmax(logits / T)`` (golden-section search on log T)."""
    z, y = _check(logits, labels)

    def f(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / math.exp(log_t), y))

    a, b = math.log(bounds[0]), math.log(bounds[1])
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(_STEPS):
        if fc <= fd:  # the minimum lies in [a, d]
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    best = min((fc, c), (fd, d), (f(a), a), (f(b), b))  # the bounds too: the minimum may sit at one
    return math.exp(best[1])


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: the mean over images of Σ_k (p_k − [k is the true class])², 0 (best) to 2."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return float(((probs.double() - onehot) ** 2).sum(dim=1).mean())


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                        n_bins: int = 15) -> dict:
    """``{"ece", "nll", "brier", "bins"}`` of ``softmax(logits / temperature)`` (ECE and its bins as in
    imgrec.eval.metrics.expected_calibration_error, the report's reliability diagram)."""
    z, y = _check(logits, labels)
    z = z / float(temperature)
    probs = torch.softmax(z, dim=1)
    ece = expected_calibration_error(probs, y, n_bins)
    return {"ece": ece["ece"], "nll": float(torch.nn.functional.cross_entropy(z, y)), "brier": brier(probs, y),
            "bins": ece["bins"]}


def calibration_summary(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                        n_bins: int = 15, bins: bool = False) -> dict:
    """What eval and the report show: ``{"temperature", "before": {ece, nll, brier}, "after": {...}}``, before
    being the raw scores (T = 1) and after the model's own ``temperature`` (equal to before when it has none).
    ``bins``: keep each side's per-bin table (for the reliability diagrams)."""
    out: dict = {"temperature": float(temperature)}
    for side, t in (("before", 1.0), ("after", float(temperature))):
        m = calibration_metrics(logits, labels, t, n_bins)
        if not bins:
            m.pop("bins")
        out[side] = m
    return out


def temperature_entry(logits: torch.Tensor, labels: torch.Tensor, split: str) -> dict:
    """Fit T on (``logits``, ``labels``) of ``split`` and return what ``model.json`` stores as
    ``inference.temperature``: T and the split's NLL, ECE and Brier score before and after."""
    t = round(fit_temperature(logits, labels), 6)  # the numbers below are those of the T stored
    s = calibration_summary(logits, labels, t)
    entry: dict = {"T": t}
    for key in ("nll", "ece", "brier"):
        entry[f"{key}_before"] = round(s["before"][key], 6)
        entry[f"{key}_after"] = round(s["after"][key], 6)
    entry.update(split=split, n=int(len(labels)), fit="golden-section search of the NLL on log T, float64")
    return entry

