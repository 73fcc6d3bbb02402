"""Temperature scaling (Guo et al. 2017): one scalar T > 0 so that ``softmax(logits / T)`` says how sure.

A network trained with label smoothing is under-confident (its top score is capped), one trained long without
it is over-confident; dividing every logit by the same T fixes most of either without changing a single
prediction (the order of the scores stays the same). T is fitted by minimising the negative log-likelihood on
a labelled split the model was not trained on (the validation split), stored in ``model.json`` as
``inference.temperature`` and applied by every path that turns logits into probabilities (Classifier,
the exported ONNX graph and so OnnxClassifier, the server, eval, report, explain).

The fit is in float64 on log T: NLL(1/T) is convex in 1/T, so unimodal in log T. The validation split of a
small folder is tiny (40 images for 400), and T fitted by the NLL alone on it is noise: measured on
Fashion-MNIST folders of 400 images it missed the test split's best T by a factor of 1.6 on one folder and
ran to the lower bound on another, where every one of its 20 validation images was right (the NLL keeps
falling as T shrinks). So the fit is a MAP estimate: a Gaussian prior on log T centred on
``TEMPERATURE_PRIOR`` (the T imgrec's recipes need, label smoothing 0.1 leaving them under-confident) with
standard deviation ``TEMPERATURE_PRIOR_SIGMA``, worth a fixed amount of evidence, so that it steers a fit on
tens of images and moves one on thousands by about 1%. The objective plus a convex prior need not stay
unimodal, so the search is a grid over the bounds refined by a golden-section search around the grid's best
point: deterministic (no random start, no learning rate), about 200 evaluations of the NLL on logits already
computed.
"""
from __future__ import annotations

import math

import torch

from imgrec.errors import DatasetError
from imgrec.eval.metrics import expected_calibration_error

__all__ = ["TEMPERATURE_PRIOR", "TEMPERATURE_PRIOR_SIGMA", "T_BOUNDS", "brier", "calibration_metrics",
           "calibration_summary", "ece_bootstrap", "ece_noise_floor", "fit_temperature", "nll", "temperature_entry"]

# T outside this range means the logits are broken rather than mis-scaled (0.05: twenty times sharper; 20: the
# scores almost uniform); a fit at a bound is stored as the bound
T_BOUNDS = (0.05, 20.0)
_GOLDEN = (math.sqrt(5) - 1) / 2
_STEPS = 80  # the bracket shrinks by 0.618 per step: 80 steps leave ~1e-16 of log T, float64's resolution
_GRID = 121  # grid points over log T in the bounds: steps of 0.05 in log T (5% in T)
# The prior on log T. Its centre is the geometric mean of the test-NLL-optimal T of default models trained on
# seven small Fashion-MNIST folders (5-10 classes, 20-40 validation images; T 0.68-0.95): the test splits of
# folders built for choosing it, never the benchmark's own (benchmarks/confidence.py). Its width 0.1 (T within
# ±10% at one sigma) was chosen on the same folders: it outweighs the NLL of 20-40 images unless they disagree
# strongly, and moves the T fitted on 5,000 by about 1% (1.4% for a T of twice the centre).
TEMPERATURE_PRIOR = 0.85
TEMPERATURE_PRIOR_SIGMA = 0.1


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


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = T_BOUNDS,
                    prior: tuple[float, float] | None = (TEMPERATURE_PRIOR, TEMPERATURE_PRIOR_SIGMA)) -> float:
    """The T in ``bounds`` minimising the NLL of ``softmax(logits / T)`` plus, with ``prior`` = (T0, sigma), the
    Gaussian prior's ``(log T - log T0)² / (2 sigma² N)`` (N images: a MAP estimate of T); ``prior=None``: the
    NLL alone (maximum likelihood). A grid over log T, then a golden-section search between the grid points
    beside the best one."""
    z, y = _check(logits, labels)
    n = len(y)
    if prior is not None and not (prior[0] > 0 and prior[1] > 0):
        raise ValueError(f"the temperature prior needs T0 > 0 and sigma > 0, got {prior}")

    def f(log_t: float) -> float:
        value = float(torch.nn.functional.cross_entropy(z / math.exp(log_t), y))
        if prior is not None:
            value += (log_t - math.log(prior[0])) ** 2 / (2 * prior[1] ** 2 * n)
        return value

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    grid = [lo + (hi - lo) * i / (_GRID - 1) for i in range(_GRID)]
    values = [f(u) for u in grid]
    i = min(range(_GRID), key=values.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, _GRID - 1)]
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
    best = min((fc, c), (fd, d), (values[i], grid[i]))  # the grid point too: it may be a bound
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


def ece_noise_floor(probs: torch.Tensor, n_bins: int = 15, draws: int = 1000, seed: int = 0) -> dict:
    """The ECE a perfectly calibrated model with these scores gets by chance on this many images.

    ECE of a finite sample is never 0: each bin's accuracy is a mean of a few 0/1 outcomes. Here each image's
    top class is taken to be right with exactly its top probability (labels drawn from the model's own scores,
    so the model is calibrated by construction) and the ECE is measured as
    :func:`imgrec.eval.metrics.expected_calibration_error` does, ``draws`` times. Returns the mean and the
    5th and 95th percentiles: a measured ECE inside that range cannot be told from perfect calibration."""
    conf, pred = probs.double().max(dim=1)
    g = torch.Generator().manual_seed(seed)
    k = probs.shape[1]
    values = []
    for _ in range(draws):
        right = torch.rand(len(conf), generator=g, dtype=torch.float64) < conf
        labels = torch.where(right, pred, (pred + 1) % k)  # only right or wrong matters to the ECE
        values.append(expected_calibration_error(probs, labels, n_bins)["ece"])
    v = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(v.mean()), "p05": float(v.quantile(0.05)), "p95": float(v.quantile(0.95)),
            "draws": int(draws), "n": int(len(conf))}


def ece_bootstrap(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, draws: int = 1000,
                  seed: int = 0) -> tuple[float, float]:
    """A 95% bootstrap interval (percentile method) of the ECE of ``probs`` on ``labels``: the images resampled
    with replacement ``draws`` times."""
    g = torch.Generator().manual_seed(seed)
    probs, labels = probs.double(), labels.long()
    n = len(labels)
    v = torch.tensor([expected_calibration_error(probs[i], labels[i], n_bins)["ece"]
                      for i in (torch.randint(0, n, (n,), generator=g) for _ in range(draws))], dtype=torch.float64)
    return float(v.quantile(0.025)), float(v.quantile(0.975))


def temperature_entry(logits: torch.Tensor, labels: torch.Tensor, split: str,
                      prior: tuple[float, float] | None = (TEMPERATURE_PRIOR, TEMPERATURE_PRIOR_SIGMA)) -> dict:
    """Fit T on (``logits``, ``labels``) of ``split`` (with ``prior``, as :func:`fit_temperature`) and return
    what ``model.json`` stores as ``inference.temperature``: T, the split's NLL, ECE and Brier score before and
    after, and with a prior also the prior and the T the NLL alone gives (``T_nll``)."""
    t = round(fit_temperature(logits, labels, prior=prior), 6)  # the numbers below are those of the T stored
    s = calibration_summary(logits, labels, t)
    entry: dict = {"T": t}
    for key in ("nll", "ece", "brier"):
        entry[f"{key}_before"] = round(s["before"][key], 6)
        entry[f"{key}_after"] = round(s["after"][key], 6)
    entry.update(split=split, n=int(len(labels)))
    if prior is None:
        entry["fit"] = "NLL minimised over log T (grid, then golden-section search), float64"
    else:
        entry.update(fit="NLL plus a Gaussian prior on log T minimised over log T (grid, then golden-section "
                         "search), float64", prior={"T": float(prior[0]), "sigma_log": float(prior[1])},
                     T_nll=round(fit_temperature(logits, labels, prior=None), 6))
    return entry
