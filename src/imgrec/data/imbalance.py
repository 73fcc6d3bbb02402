"""Class imbalance: how imbalanced a split is, class weights for the loss, a long-tailed subset for experiments.

Training-side options (``imgrec train``), each off by default:

* ``--class-weights auto|inverse|effective|none|FILE``: per-class weights of the cross-entropy loss.
  ``inverse``: w_c ∝ 1/n_c (scikit-learn's "balanced"). ``effective``: w_c ∝ (1-β)/(1-β^n_c), the inverse
  *effective number of samples* (Cui et al., CVPR 2019), β = ``class_weight_beta`` (0.999). ``auto`` is
  ``effective``: it equals inverse frequency for small classes (n_c ≪ 1/(1-β) = 1000 images) but saturates for
  large ones, so a 100:1 imbalance does not hand the rarest class 100× the weight of the largest — weights that
  extreme let a few dozen rare images dominate the gradient and are memorised rather than learnt from (Cui et
  al. §3, and Cao et al. 2019 on re-weighting from the start). FILE: a JSON or YAML mapping class → weight, a
  JSON/YAML list of K weights in class order, or a CSV of ``class,weight`` rows. Every weight set is scaled
  to average 1 over the classes (as Cui et al.); the loss is a weighted mean, so its scale does not change.
* ``--sampler balanced``: see ``imgrec.data.memory.BatchLoader`` (each batch draws classes uniformly).
* ``--logit-adjust TAU|auto``: post-hoc logit adjustment (Menon et al., ICLR 2021): ``-τ·log(prior)`` added
  to the logits at prediction (``imgrec.infer.runtime.forward_logits``, and inside exported graphs), the prior
  being the training split's class frequencies, recorded in model.json. ``auto`` picks τ in TAU_GRID on the
  validation split (balanced accuracy): on long-tailed Fashion-MNIST τ = 1 lost 3 points of macro-F1 and the
  chosen τ (0.3–0.6) gained 2.2 (benchmarks/results/imbalance.md).
* ``--reweight-from FRACTION`` (with ``--class-weights``): deferred re-weighting, DRW (Cao et al., NeurIPS
  2019): plain cross-entropy until that fraction of the epochs, the class weights after it (the paper: the
  effective number with β = 0.9999 for the last 20% of epochs). The features are learnt from the natural
  frequencies, and only the late, low-learning-rate epochs move the decision boundaries towards rare classes;
  weighting from the start over-fits the few rare images (``inverse`` lost 3.8 points below). The switch
  follows the epoch index (imgrec.engine.trainer.Trainer), so a resumed run re-weights the same epochs.
* ``--logit-adjust-loss TAU``: the logit-adjusted training loss (Menon et al. 2021, eq. 10): cross-entropy of
  ``logits + τ·log(prior)`` (imgrec.engine.losses.LogitAdjustedLoss); prediction takes the raw logits.
* Measured there (ratio 100, 3 seeds): auto weights +2.3 points macro-F1, inverse weights −3.8, balanced
  sampler +1.6 — short of a 5-point gain; see the file for DRW, the adjusted loss and label
  smoothing 0 (the recipes' 0.1 bounds the logit margins and works against the adjustment).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from imgrec.errors import ConfigError
from imgrec.safeio import load_yaml_text, loads_json, read_csv_rows, read_text_file

__all__ = ["HINT_RATIO", "WEIGHT_MODES", "class_weights", "imbalance_hint", "imbalance_ratio",
           "TAU_GRID", "logit_adjust_entry", "long_tail_indices", "read_weights_file"]

WEIGHT_MODES = ("none", "auto", "inverse", "effective")
MAX_WEIGHTS_BYTES = 16 << 20  # a class-weights file: one short line per class
HINT_RATIO = 10.0   # `imgrec train` suggests the options above this largest/smallest class ratio
# --logit-adjust auto tries these τ on the validation split. τ = 1 is Bayes-optimal for the balanced error only
# when the logits are calibrated log-probabilities; label smoothing (the recipes use 0.1) and short schedules
# bound the logit margins, and on long-tailed Fashion-MNIST τ = 1 over-corrected (benchmarks/imbalance.py)
TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))


def imbalance_ratio(counts) -> float | None:
    """Largest / smallest class count; None when a class is empty (the ratio is then infinite)."""
    counts = [int(c) for c in counts]
    if not counts or min(counts) <= 0:
        return None
    return max(counts) / min(counts)


def imbalance_hint(counts, classes) -> str | None:
    """The one line ``imgrec train`` prints when the training split is imbalanced, else None."""
    counts = [int(c) for c in counts]
    if len(counts) < 2:
        return None
    ratio = imbalance_ratio(counts)
    if ratio is not None and ratio < HINT_RATIO:
        return None
    big, small = max(range(len(counts)), key=counts.__getitem__), min(range(len(counts)), key=counts.__getitem__)
    what = "a class has no training images" if ratio is None else f"largest/smallest class {ratio:.0f}:1"
    return (f"hint: the training classes are imbalanced ({what}: {classes[big]} {counts[big]}, {classes[small]} "
            f"{counts[small]}); consider --class-weights auto, --sampler balanced or --logit-adjust 1")


def _normalise(w: torch.Tensor) -> torch.Tensor:
    return w * (len(w) / w.sum())


def class_weights(spec: str | None, counts, classes, beta: float = 0.999) -> torch.Tensor | None:
    """Per-class loss weights (float32, K, mean 1) for ``spec`` (see the module docstring), or None for none.

    ``counts`` are the training images per class. A class without training images gets the largest weight
    of the others (a finite number: its weight never multiplies a training sample anyway).
    """
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return None
    mode = str(spec).strip().lower()
    n = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    if mode in ("auto", "effective", "inverse"):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"class_weight_beta must be in [0, 1), got {beta}")
        present = n > 0
        if not present.any():
            raise ConfigError("class weights: the training split has no images")
        if mode == "inverse":
            w = 1.0 / n.clamp_min(1)
        else:
            # (1-β)/(1-β^n): computed as -expm1(n·log β) so that it stays exact for β close to 1
            w = (1.0 - beta) / -torch.expm1(n.clamp_min(1) * math.log(beta)) if beta > 0 else torch.ones_like(n)
        w = torch.where(present, w, w[present].max())
        return _normalise(w).float()
    path = Path(str(spec))
    if not path.is_file():
        raise ConfigError(f"--class-weights: {spec!r} is neither {', '.join(WEIGHT_MODES)} nor a file")
    return _normalise(read_weights_file(path, classes)).float()


def read_weights_file(path: str | Path, classes) -> torch.Tensor:
    """K raw weights (float64, class order) from a JSON/YAML mapping or list, or a CSV of ``class,weight``.

    Every problem is a ConfigError naming the file: unreadable, unknown or missing classes, a wrong count,
    a weight that is not a finite number ≥ 0, all weights zero.
    """
    path = Path(path)
    classes = [str(c) for c in classes]
    what = "cannot read the class weights"
    if path.suffix.lower() == ".csv":  # the reader imgrec's CSV image lists use (a byte-order mark dropped)
        data = _read_csv(path, read_csv_rows(path, what, limit=MAX_WEIGHTS_BYTES))
    else:
        text = read_text_file(path, what, limit=MAX_WEIGHTS_BYTES)
        data = loads_json(text, str(path), what) if path.suffix.lower() == ".json" else \
            load_yaml_text(text, str(path), what)
    if isinstance(data, list):
        if len(data) != len(classes):
            raise ConfigError(f"{path}: {len(data)} class weights for {len(classes)} classes")
        data = dict(zip(classes, data))
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: class weights must map class name → weight (or list one weight per class)")
    data = {str(k): v for k, v in data.items()}
    unknown = next((k for k in data if k not in classes), None)
    missing = [c for c in classes if c not in data]
    if unknown is not None:
        raise ConfigError(f"{path}: unknown class {unknown!r} in the class weights (classes: "
                          f"{', '.join(classes[:10])}{' …' if len(classes) > 10 else ''})")
    if missing:
        raise ConfigError(f"{path}: no weight for class {missing[0]!r}"
                          f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
    out = []
    for c in classes:
        v = data[c]
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: the weight of class {c!r} is not a number ({v!r})") from None
        if isinstance(v, bool) or not math.isfinite(f) or f < 0:
            raise ConfigError(f"{path}: the weight of class {c!r} must be a finite number ≥ 0, got {v!r}")
        out.append(f)
    if not any(out):
        raise ConfigError(f"{path}: every class weight is zero")
    return torch.tensor(out, dtype=torch.float64)


def _read_csv(path: Path, rows: list[list[str]]) -> dict:
    rows = [r for r in rows if r and any(x.strip() for x in r)]
    if rows and len(rows[0]) >= 2 and rows[0][0].strip().lower() in ("class", "label", "name"):
        rows = rows[1:]  # a header row
    out: dict[str, str] = {}
    for i, r in enumerate(rows, 1):
        if len(r) != 2:
            raise ConfigError(f"{path}: row {i}: expected 'class,weight', got {len(r)} field(s)")
        name = r[0].strip()
        if name in out:
            raise ConfigError(f"{path}: row {i}: class {name!r} is listed twice")
        out[name] = r[1].strip()
    return out


def long_tail_indices(labels: torch.Tensor, num_classes: int, ratio: float) -> torch.Tensor:
    """Indices of a long-tailed subset: class c keeps the first ⌈n_c · ratio^(-c/(K-1))⌉ of its images,
    from all of them (class 0) down to 1/ratio (the last class), geometrically — the construction of
    CIFAR-LT (Cui et al. 2019; Cao et al. 2019). Deterministic: the same data gives the same subset."""
    if not ratio >= 1:
        raise ConfigError(f"long_tail must be an imbalance ratio ≥ 1, got {ratio}")
    labels = labels.long().cpu()
    keep = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        frac = ratio ** (-c / max(num_classes - 1, 1))
        keep.append(idx[:max(1, math.ceil(len(idx) * frac - 1e-9))] if len(idx) else idx)
    return torch.cat(keep).sort().values


def logit_adjust_entry(train_counts, tau: float) -> dict:
    """``{"logit_adjust": {"tau", "prior"}}`` for model.json's ``inference`` (empty when ``tau`` is 0).

    The prior is the training split's class frequencies (Menon et al. 2021 estimate it so). A class without
    training images counts as one image, so its adjustment stays finite."""
    if not tau or tau == "auto":  # "auto": set after training, once τ is chosen on the validation split
        return {}
    n = [max(int(c), 1) for c in train_counts]
    total = float(sum(n))
    return {"logit_adjust": {"tau": float(tau), "prior": [c / total for c in n]}}
