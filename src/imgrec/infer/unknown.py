"""The "unknown" answer in PyTorch: the out-of-distribution score of imgrec.infer.ood as a module that runs
beside the network, on the same forward pass, in ``Classifier`` and inside the exported ONNX graph.

A model directory whose ``model.json`` has ``inference.unknown`` (written by ``imgrec train``, see
``fit_unknown``) answers "unknown" for an image whose score lies below the stored threshold: the threshold
accepts a stated share of the validation images (``accept_rate``, 95% by default), and the quantile table
beside it gives the threshold for any other rate without the validation images.

The scores are those of imgrec.infer.ood (NumPy, used by the benchmark); here they are written with torch
operators only so that ``torch.onnx.export`` puts them into the graph. Mahalanobis' quadratic form is
computed through the Cholesky factor of the precision matrix (``|(z - μ)ᵀL|²``), a matrix product and a
sum of squares, which ONNX has.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgrec.errors import ConfigError
from imgrec.infer.ood import (DEFAULT_ACCEPT_RATE, DEFAULT_SCORE, KNN_K, STATS_FILE, OodStats, fit_stats,
                              gaussian_problem, load_arrays, load_stats, save_arrays, save_stats, unknown_entry)
from imgrec.infer.runtime import autocast
from imgrec.modeldir import FEATURE_SCORES, RunDir

__all__ = ["UnknownScore", "check_unknown_fits", "forward_with_features", "fit_unknown", "load_unknown_score",
           "layer_names", "unknown_layers", "LayerTaps"]

LAYERS_SCORE = "mahalanobis_layers"
MAX_LAYERS = 4  # tapped layers at most
MAX_LAYER_DIM = 1024  # 2 × channels of a tapped layer at most: its precision matrix is (2C)² float32 (4 MB)


# -- the multi-layer score: where the network is tapped ------------------------------------------------
def layer_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The modules whose outputs the multi-layer Mahalanobis score reads, besides the penultimate features:
    the output of the stem and of every stage but the last (FastNet: ``stem``, ``stages.i``), the last
    module at each resolution of a ``features`` sequence (the textbook CNNs and torchvision's), or timm's
    ``feature_info`` stages (blocks of a timm ViT), at most four, evenly spaced. Empty for other models
    (imgrec's own ViTs): their score is the penultimate one alone.

    Early layers see what the penultimate features have learnt to ignore (the noise, texture and contrast of
    an input), which is what tells photos, noise and text apart from the training images best
    (benchmarks/confidence.py: mean AUROC over five far-OOD sets 0.96 → 0.99 on the default model)."""
    mods = dict(model.named_modules())
    if isinstance(mods.get("stages"), nn.Sequential) and "stem" in mods:
        names = ["stem"] + [f"stages.{i}" for i in range(len(model.stages) - 1)]
    elif isinstance(getattr(model, "feature_info", None), list) and model.feature_info:
        names = [fi.get("module") for fi in model.feature_info[:-1] if isinstance(fi, dict)]  # timm's stages
        names = [n for n in names if n in mods]
    elif isinstance(mods.get("features"), nn.Sequential):
        names = _resolution_ends(model.features, example)
    else:
        names = []
    if len(names) > MAX_LAYERS:  # evenly spaced, the last kept: a deep ViT has a dozen blocks
        names = [names[round(i * (len(names) - 1) / (MAX_LAYERS - 1))] for i in range(MAX_LAYERS)]
    shapes = _tap_shapes(model, names, example)
    return [n for n in names if n in shapes and 2 * shapes[n][-1 if len(shapes[n]) == 3 else 1] <= MAX_LAYER_DIM]


@torch.inference_mode()
def _resolution_ends(features: nn.Sequential, example: torch.Tensor) -> list[str]:
    """``features.i`` for the last child at each spatial resolution but the last one."""
    x, ends, last = example, [], None
    for name, child in features.named_children():
        x = child(x)
        if x.ndim != 4:
            break
        if last is not None and x.shape[2:] != last[1]:
            ends.append(last[0])
        last = (f"features.{name}", x.shape[2:])
    return ends


@torch.inference_mode()
def _tap_shapes(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, tuple]:
    with LayerTaps(model, names) as taps:
        model.forward_features(example)
        return {n: tuple(o.shape) for n, o in zip(names, taps.outputs) if o is not None and o.ndim in (3, 4)}


def channel_stats(o: torch.Tensor) -> torch.Tensor:
    """N×C×H×W (or N×T×D tokens) → N×2C: each channel's mean and standard deviation over the positions,
    written with means of squares so that ONNX has every operator."""
    o = o.float().flatten(2) if o.ndim == 4 else o.float().transpose(1, 2)
    mean = o.mean(dim=2)
    var = ((o * o).mean(dim=2) - mean * mean).clamp_min(0.0)
    return torch.cat([mean, var.sqrt()], dim=1)


class LayerTaps:
    """Forward hooks that keep the channel statistics of the named modules' outputs during one pass.

    A hook belongs to the module, not to the call: while one thread's taps are open, a pass of the same
    network on another thread (``predict_files`` runs batches side by side on a CPU, imgrec.infer.files)
    calls them too. So a hook keeps only the outputs of passes run on the thread that opened the taps;
    without that check, one batch's layer statistics were another batch's (wrong scores for batches of
    equal size, a size mismatch under flip-TTA for unequal ones)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model, self.names = model, list(names)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.names)
        self.handles: list = []
        self.thread: int | None = None

    def __enter__(self) -> "LayerTaps":
        self.thread = threading.get_ident()
        for i, name in enumerate(self.names):
            def keep(module, args, out, i=i):
                if threading.get_ident() == self.thread:
                    self.outputs[i] = out
            self.handles.append(self.model.get_submodule(name).register_forward_hook(keep))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def stats(self) -> list[torch.Tensor]:
        return [channel_stats(o) for o in self.outputs]


class UnknownScore(nn.Module):
    """(logits, penultimate features) → one score per image, higher = more like the training images."""

    def __init__(self, kind: str, stats: OodStats | None = None, temperature: float = 1.0, k: int = KNN_K,
                 layers: list[OodStats] | None = None):
        super().__init__()
        self.kind, self.temperature, self.k = kind, float(temperature), int(k)
        if kind in ("mahalanobis", LAYERS_SCORE):
            self.head = _Mahalanobis(stats)
        elif kind == "knn":
            self.register_buffer("bank", torch.from_numpy(stats.bank.astype(np.float32)))
        # the multi-layer score: one Mahalanobis per tapped layer; each score is standardised by the
        # validation split's median and spread (loc, scale) and the standardised scores are summed
        self.layers = nn.ModuleList([_Mahalanobis(st) for st in (layers or [])]) if kind == LAYERS_SCORE else None

    def forward(self, logits: torch.Tensor, feats: torch.Tensor,
                layer_stats: list[torch.Tensor] | None = None) -> torch.Tensor:
        if self.kind == "msp":
            return torch.softmax(logits / self.temperature, dim=1).amax(dim=1)
        if self.kind == "energy":
            return self.temperature * torch.logsumexp(logits / self.temperature, dim=1)
        if self.kind == "knn":
            z = _unit(feats)
            kth = (z @ self.bank.T).topk(min(self.k, self.bank.shape[0]), dim=1).values[:, -1]
            return -(2.0 - 2.0 * kth).clamp_min(0.0).sqrt()
        if self.kind == "mahalanobis":
            return self.head(feats)
        total = self.head.standardised(feats)
        for m, f in zip(self.layers, layer_stats or []):
            total = total + m.standardised(f)
        return total


def _unit(f: torch.Tensor) -> torch.Tensor:
    f = f.float()
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


class _Mahalanobis(nn.Module):
    """−min over classes of (z − μ_c)ᵀ P (z − μ_c) on L2-normalised features z (of the kept columns)."""

    def __init__(self, stats: OodStats):
        super().__init__()
        chol = np.linalg.cholesky(stats.precision.astype(np.float64))  # precision = L Lᵀ
        self.register_buffer("proj", torch.from_numpy(chol.astype(np.float32)))
        self.register_buffer("centres", torch.from_numpy((stats.means.astype(np.float64) @ chol).astype(np.float32)))
        keep = getattr(stats, "keep", None)
        self.register_buffer("keep", None if keep is None else torch.from_numpy(np.asarray(keep, np.int64)))
        self.loc, self.scale = float(getattr(stats, "loc", 0.0)), float(getattr(stats, "scale", 1.0))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.keep is not None:
            f = f.index_select(1, self.keep)
        z = _unit(f) @ self.proj
        if torch.onnx.is_in_onnx_export():  # the graph keeps the plain form every ONNX runtime has operators for
            d = z.unsqueeze(1) - self.centres.unsqueeze(0)  # N × C × D
            return -(d * d).sum(dim=2).amin(dim=1)
        # the same distances without the N × C × D difference tensor: 12x faster on 5,000 validation images
        # (29 -> 2.4 ms per layer on 2 Zen 5 cores), equal to float32 rounding; the mm form would cancel digits
        d = torch.cdist(z.unsqueeze(0), self.centres.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist")[0]
        return -d.square().amin(dim=1)

    def standardised(self, f: torch.Tensor) -> torch.Tensor:
        return (self(f) - self.loc) / self.scale


@torch.inference_mode()
def forward_with_features(model: nn.Module, x: torch.Tensor, *, tta_flip: bool = False,
                          amp: torch.dtype | None = None, logit_bias: torch.Tensor | None = None,
                          layers: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """fp32 logits, penultimate features (``forward_head(..., pre_logits=True)``) and the channel statistics
    of the ``layers`` named (:func:`layer_names`) of a normalised batch, each averaged over the mirror with
    ``tta_flip``; the logits are those of imgrec.infer.runtime.forward_logits."""
    def one(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        with LayerTaps(model, layers or []) as taps:
            fmap = model.forward_features(v)
        return (model.forward_head(fmap).float(), model.forward_head(fmap, pre_logits=True).float().flatten(1),
                taps.stats())

    with autocast(x.device, amp):
        logits, feats, stats = one(x)
        if tta_flip:
            logits2, feats2, stats2 = one(x.flip(3))
            logits, feats = (logits + logits2) / 2, (feats + feats2) / 2
            stats = [(a + b) / 2 for a, b in zip(stats, stats2)]
    if logit_bias is not None:
        logits = logits + logit_bias.to(device=logits.device, dtype=torch.float32)
    return logits, feats, stats


def load_unknown_score(model_dir: str | Path | None, entry: dict, temperature: float = 1.0) -> UnknownScore:
    """The score module that ``inference.unknown`` describes, its statistics read from the model directory."""
    kind = entry["score"]
    if kind not in FEATURE_SCORES:
        return UnknownScore(kind, None, temperature)
    if model_dir is None:
        raise ConfigError(f"the {kind} score needs the model directory's {entry['file']}")
    path = Path(model_dir) / entry["file"]
    if kind != LAYERS_SCORE:
        return UnknownScore(kind, load_stats(path, kind), temperature)
    arrays = load_arrays(path)
    parts = [_layer_stats(arrays, f"layer{i}.", path) for i in range(len(entry.get("layers") or []))]
    return UnknownScore(kind, _layer_stats(arrays, "", path), temperature, layers=parts)


def check_unknown_fits(clf: Any, model_dir: str | Path | None) -> None:
    """One pass of a blank image through ``clf``'s network and its "unknown" score: statistics of another
    width than the features or tapped layers, kept columns past a layer's width, a layer name the network
    does not have, or a score that is not finite are refused here, in one line, when the model is loaded,
    rather than as an error on every prediction (a server that answers 500 while /readyz says 200)."""
    from imgrec.errors import ModelFileError, first_line
    where = Path(model_dir or ".") / str(clf.unknown.get("file") or RunDir.META)
    x = torch.zeros((1, clf.channels, clf.image_size, clf.image_size), dtype=torch.uint8)
    try:
        logits, feats, layers = clf.logits_and_features(x, 1, clf.unknown.get("layers"))
        with torch.inference_mode():
            score = clf.unknown_score(logits.to(clf.device), feats.to(clf.device), [f.to(clf.device) for f in layers])
    except (RuntimeError, IndexError, AttributeError, ValueError) as e:
        raise ModelFileError(f"{where}: the out-of-distribution statistics do not fit the network "
                             f"({first_line(e, 200)})") from None
    if score.shape != (1,) or not bool(torch.isfinite(score).all()):
        raise ModelFileError(f"{where}: the out-of-distribution score of a blank image is not a finite number")


def _layer_stats(arrays: dict[str, np.ndarray], prefix: str, path: Path) -> OodStats:
    from imgrec.errors import ModelFileError
    try:
        st = OodStats(means=arrays[prefix + "means"], precision=arrays[prefix + "precision"])
        loc, scale = (float(v) for v in arrays[prefix + "loc_scale"])
        keep = arrays.get(prefix + "keep")
    except (KeyError, ValueError, TypeError):
        raise ModelFileError(f"{path}: lacks the {prefix or 'penultimate '}statistics of the multi-layer score") from None
    what = f"the {prefix or 'penultimate '}statistics"
    reason = gaussian_problem(st.means, st.precision)
    if reason:
        raise ModelFileError(f"{path}: {what}: {reason}")
    d = st.means.shape[-1]
    if not (np.isfinite(loc) and np.isfinite(scale) and scale > 0):
        raise ModelFileError(f"{path}: {what}: the standardisation needs a finite centre and a positive spread")
    if keep is not None and (keep.ndim != 1 or len(keep) != d or not np.issubdtype(keep.dtype, np.integer)
                             or (d and keep.min() < 0) or len(np.unique(keep)) != d):
        raise ModelFileError(f"{path}: {what}: the kept columns must be {d} distinct column numbers ≥ 0")
    st.keep, st.loc, st.scale = keep, loc, scale
    return st


def unknown_layers(clf: Any, images: torch.Tensor, kind: str | None = None) -> list[str]:
    """The layers whose statistics the score of ``kind`` (None: the default one) reads from ``clf``'s network."""
    if kind not in (None, LAYERS_SCORE):
        return []
    return layer_names(clf.model, clf.normalize(images[:2].to(clf.device)))


def fit_unknown(clf: Any, model_dir: str | Path, train_images: torch.Tensor, train_labels: torch.Tensor,
                val_images: torch.Tensor, *, kind: str | None = None, accept_rate: float = DEFAULT_ACCEPT_RATE,
                fit_max: int = 10_000, batch_size: int = 512, neighbours: dict | None = None,
                val: tuple | None = None) -> dict:
    """Fit the score's statistics on (at most ``fit_max``, evenly strided) training images, write them to
    the model directory, and choose the threshold on the validation images for ``accept_rate``. The default
    score is the multi-layer Mahalanobis one where the architecture has stages to tap, else the penultimate
    Mahalanobis. Returns the ``inference.unknown`` entry for ``model.json`` (the caller saves it); with a
    ``neighbours`` dict, the bank of training features is written too and its entry put there. ``val``: the
    validation images' ``clf.logits_and_features`` for :func:`unknown_layers`, when the caller has them."""
    idx = torch.arange(0, len(train_images), max(1, -(-len(train_images) // fit_max)))
    labels = train_labels[idx].numpy()
    layers = unknown_layers(clf, train_images, kind)
    kind = kind or (LAYERS_SCORE if layers else DEFAULT_SCORE)
    logits, feats, tr_layers = clf.logits_and_features(train_images[idx], batch_size, layers)
    val_logits, val_feats, va_layers = val if val is not None else \
        clf.logits_and_features(val_images, batch_size, layers)
    if neighbours is not None:  # the same features: the bank of the nearest-training-images lookup
        from imgrec.infer.neighbours import write_bank
        neighbours.update(write_bank(model_dir, feats.numpy(), idx.numpy(), labels))
    k = len(clf.classes)
    if kind == LAYERS_SCORE:
        arrays, parts = {}, []
        pen = _fit_part(feats.numpy(), labels, k, val_feats, arrays, "")
        for i, (tr, va) in enumerate(zip(tr_layers, va_layers)):
            parts.append(_fit_part(tr.numpy(), labels, k, va, arrays, f"layer{i}."))
        save_arrays(Path(model_dir) / STATS_FILE, arrays)
        scorer = UnknownScore(kind, pen, clf.temperature, layers=parts)
    else:
        stats = fit_stats(feats.numpy(), labels, k)
        stats = {"mahalanobis": OodStats(means=stats.means, precision=stats.precision),
                 "knn": OodStats(bank=stats.bank)}.get(kind, stats)  # only what the score reads
        if kind in FEATURE_SCORES:
            save_stats(Path(model_dir) / STATS_FILE, stats)
        scorer = UnknownScore(kind, stats, clf.temperature)
    with torch.inference_mode():
        val_scores = scorer(val_logits, val_feats, va_layers).double().numpy()
    entry = unknown_entry(kind, val_scores, accept_rate, len(idx))
    if kind == LAYERS_SCORE:
        entry["layers"] = layers
    return entry


def _fit_part(train: np.ndarray, labels: np.ndarray, k: int, val: torch.Tensor, arrays: dict, prefix: str) -> OodStats:
    """One layer's Mahalanobis statistics (columns constant on the training images dropped), and its
    validation scores' median and spread for the standardisation; added to ``arrays``."""
    keep = np.nonzero(train.std(axis=0) > 1e-6)[0]
    full = keep.size == train.shape[1]
    st = fit_stats(train if full else train[:, keep], labels, k)
    st = OodStats(means=st.means, precision=st.precision)
    st.keep, st.loc, st.scale = (None if full else keep), 0.0, 1.0
    with torch.inference_mode():
        v = _Mahalanobis(st)(val).double().numpy()
    st.loc, st.scale = float(np.median(v)), float(max(np.std(v), 1e-6))
    arrays.update({prefix + "means": st.means, prefix + "precision": st.precision,
                   prefix + "loc_scale": np.array([st.loc, st.scale], np.float64)})
    if st.keep is not None:
        arrays[prefix + "keep"] = st.keep.astype(np.int64)
    return st
