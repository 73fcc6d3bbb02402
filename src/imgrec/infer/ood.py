"""Out-of-distribution scores: how much an input looks like the training images, so a model can answer
"unknown" instead of naming one of its classes for a photo of something else, or for noise.

Every score is "higher = more like the training data". Four well-known ones are implemented, all from the
model's logits or its penultimate features (the vector that enters the classifier):

- ``msp``: the maximum softmax probability (Hendrycks & Gimpel 2017), the baseline;
- ``energy``: ``T · logsumexp(logits / T)`` (Liu et al. 2020), the negative free energy;
- ``knn``: minus the distance to the k-th nearest training feature, features L2-normalised
  (Sun et al. 2022); it needs a bank of training features (stored in float16);
- ``mahalanobis``: minus the smallest Mahalanobis distance to a class mean under one shared covariance
  (Lee et al. 2018, on the penultimate features only); it needs the class means and the precision matrix.

NumPy only: the ONNX Runtime path (no PyTorch) computes the same scores from the same arrays. The threshold
is chosen on the validation split so that a stated share of in-distribution images is accepted.
"""
from __future__ import annotations

import numpy as np

from imgrec.modeldir import RunDir

__all__ = ["SCORES", "FEATURE_SCORES", "DEFAULT_SCORE", "DEFAULT_ACCEPT_RATE", "STATS_FILE", "OodStats",
           "fit_stats", "gaussian_problem", "score", "threshold_for_accept_rate", "quantile_table", "threshold_from_table",
           "unknown_entry", "save_arrays", "load_arrays", "save_stats", "load_stats", "auroc", "fpr_at_tpr"]

SCORES = ("msp", "energy", "knn", "mahalanobis")  # computed here; model.json may also name imgrec.infer.unknown's
FEATURE_SCORES = ("knn", "mahalanobis")           # multi-layer "mahalanobis_layers" (modeldir.OOD_SCORES)
KNN_K = 10  # neighbours; with a bank of a few thousand images k=10 ranks like Sun et al.'s k=50 on 50,000
DEFAULT_SCORE = "mahalanobis"  # the best mean AUROC of the four on the far-OOD sets (benchmarks/confidence.py)
DEFAULT_ACCEPT_RATE = 0.95  # share of validation images answered (not "unknown") at the stored threshold
STATS_FILE = RunDir.OOD  # in the model directory: what the feature scores need, no pickle
TABLE_POINTS = 201  # validation-score quantiles kept in model.json: any accept rate maps to a threshold
BANK_MAX = 10_000  # training images kept in the feature bank (stride-subsampled; float16: 10,000 × D × 2 bytes)


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def _normalise(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


class OodStats:
    """What the feature scores need from the training images: a float16 bank of normalised features
    (``knn``) and the class means plus a shared precision matrix of the normalised features (``mahalanobis``).
    Plain arrays, stored with safetensors, so loading runs no code."""

    def __init__(self, bank: np.ndarray | None = None, means: np.ndarray | None = None,
                 precision: np.ndarray | None = None):
        self.bank = None if bank is None else np.asarray(bank, dtype=np.float16)
        self.means = None if means is None else np.asarray(means, dtype=np.float32)
        self.precision = None if precision is None else np.asarray(precision, dtype=np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in (("bank", self.bank), ("means", self.means), ("precision", self.precision))
                if v is not None}


def fit_stats(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
              bank_max: int = BANK_MAX) -> OodStats:
    """Class statistics and the feature bank from the training images' penultimate features."""
    z = _normalise(features)
    labels = np.asarray(labels, dtype=np.int64)
    stride = max(1, -(-len(z) // bank_max))
    bank = z[::stride]
    means = np.zeros((num_classes, z.shape[1]), np.float32)
    centred = np.empty_like(z)
    for c in range(num_classes):
        rows = labels == c
        if rows.any():
            means[c] = z[rows].mean(axis=0)
            centred[rows] = z[rows] - means[c]
    cov = centred.T.astype(np.float64) @ centred.astype(np.float64) / max(1, len(z))
    # a small ridge: the features of a ReLU network are often rank-deficient, and pinv of a near-singular
    # covariance turns round-off into huge distances
    cov += np.eye(cov.shape[0]) * (1e-6 + 1e-3 * np.trace(cov) / cov.shape[0])
    return OodStats(bank=bank, means=means, precision=np.linalg.inv(cov).astype(np.float32))


def score(kind: str, logits: np.ndarray, features: np.ndarray | None = None, stats: OodStats | None = None,
          *, temperature: float = 1.0, k: int = KNN_K, chunk: int = 1024) -> np.ndarray:
    """The ``kind`` score of each row (higher = more in-distribution)."""
    logits = np.asarray(logits, dtype=np.float64) / float(temperature)
    if kind == "msp":
        return np.exp(logits.max(axis=1) - _logsumexp(logits))
    if kind == "energy":
        return float(temperature) * _logsumexp(logits)
    if kind not in FEATURE_SCORES:
        raise ValueError(f"unknown out-of-distribution score {kind!r}; choose from {', '.join(SCORES)}")
    if features is None or stats is None:
        raise ValueError(f"the {kind} score needs the penultimate features and the training statistics")
    z = _normalise(features)
    out = np.empty(len(z), np.float64)
    for i in range(0, len(z), chunk):
        part = z[i:i + chunk]
        if kind == "knn":
            bank = stats.bank.astype(np.float32)
            # unit vectors: |a - b|² = 2 - 2 a·b, so the k-th largest similarity gives the k-th distance
            sim = part @ bank.T
            kk = min(k, bank.shape[0])
            kth = -np.partition(-sim, kk - 1, axis=1)[:, kk - 1]
            out[i:i + chunk] = -np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
        else:
            d = part[:, None, :] - stats.means[None, :, :]  # n × C × D
            m = np.einsum("ncd,de,nce->nc", d, stats.precision, d)
            out[i:i + chunk] = -m.min(axis=1)
    return out


def threshold_for_accept_rate(in_scores: np.ndarray, accept_rate: float) -> float:
    """The score at or above which ``accept_rate`` of the in-distribution images fall."""
    if not 0.0 < accept_rate <= 1.0:
        raise ValueError(f"accept rate must be in (0, 1], got {accept_rate}")
    return float(np.quantile(np.asarray(in_scores, np.float64), 1.0 - accept_rate, method="lower"))


def quantile_table(in_scores: np.ndarray, points: int = TABLE_POINTS) -> list[float]:
    """The validation scores' quantiles at ``points`` evenly spaced levels 0..1 (level q: the score below
    which a share q of them lie), so that a threshold for any accept rate is read off later without the
    validation images."""
    q = np.quantile(np.asarray(in_scores, np.float64), np.linspace(0.0, 1.0, points))
    return [float(v) for v in q]


def threshold_from_table(table: list[float], accept_rate: float) -> float:
    """The threshold that accepts ``accept_rate`` of the validation images, interpolated in the table."""
    if not 0.0 < accept_rate <= 1.0:
        raise ValueError(f"accept rate must be in (0, 1], got {accept_rate}")
    levels = np.linspace(0.0, 1.0, len(table))
    return float(np.interp(1.0 - accept_rate, levels, np.asarray(table, np.float64)))


def unknown_entry(kind: str, val_scores: np.ndarray, accept_rate: float, n_fit: int) -> dict:
    """``model.json``'s ``inference.unknown``: the score, its threshold for ``accept_rate`` on the
    validation split, the quantile table that gives any other rate, and where the statistics are."""
    table = quantile_table(val_scores)
    entry = {"score": kind, "accept_rate": float(accept_rate), "threshold": threshold_from_table(table, accept_rate),
             "val_quantiles": table, "fitted_on": f"train ({n_fit} images)", "chosen_on": f"val ({len(val_scores)} images)"}
    if kind in FEATURE_SCORES or kind == "mahalanobis_layers":
        entry["file"] = STATS_FILE
    return entry


def save_arrays(path, arrays: dict[str, np.ndarray]) -> None:
    """Named arrays as a safetensors file, written atomically."""
    from safetensors.numpy import save
    from imgrec.safeio import atomic_write_bytes
    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def load_arrays(path) -> dict[str, np.ndarray]:
    """A safetensors file's arrays (nothing is unpickled); ModelFileError in one line when it is missing or
    corrupt."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    from imgrec.errors import ModelFileError
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: the out-of-distribution statistics are missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path}: corrupt out-of-distribution statistics ({str(e).splitlines()[0]})") from None


def save_stats(path, stats: OodStats) -> None:
    """The statistics as a safetensors file, written atomically."""
    save_arrays(path, stats.arrays())


def load_stats(path, kind: str) -> OodStats:
    """The statistics ``kind`` needs from a safetensors file; ModelFileError in one line for a missing, corrupt
    or inconsistent file."""
    from imgrec.errors import ModelFileError
    arrays = load_arrays(path)
    stats = OodStats(arrays.get("bank"), arrays.get("means"), arrays.get("precision"))
    need = {"knn": ("bank",), "mahalanobis": ("means", "precision")}.get(kind, ())
    missing = [k for k in need if getattr(stats, k) is None]
    if missing:
        raise ModelFileError(f"{path}: lacks {', '.join(missing)} (the {kind} score needs it)")
    if kind == "mahalanobis":
        reason = gaussian_problem(stats.means, stats.precision)
        if reason:
            raise ModelFileError(f"{path}: {reason}")
    if kind == "knn" and (stats.bank.ndim != 2 or not len(stats.bank) or not np.isfinite(stats.bank).all()):
        raise ModelFileError(f"{path}: the bank of the knn score must be a non-empty matrix of finite numbers")
    return stats


def gaussian_problem(means: np.ndarray, precision: np.ndarray) -> str | None:
    """Why per-class means (K × D) and a shared precision matrix (D × D) cannot be a Mahalanobis score's, or
    None: shapes that do not fit, numbers that are not finite, a precision that is not symmetric positive
    definite (its Cholesky factor is what the score multiplies by)."""
    if means.ndim != 2 or not means.shape[0] or precision.shape != (means.shape[1],) * 2:
        return "means and precision do not fit together"
    if not np.issubdtype(means.dtype, np.floating) or not np.issubdtype(precision.dtype, np.floating) or \
            not np.isfinite(means).all() or not np.isfinite(precision).all():
        return "means and precision must be finite numbers"
    p = precision.astype(np.float64)
    if not p.size:  # a tapped layer whose every channel was constant on the training images: nothing to score
        return None
    if not np.allclose(p, p.T, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(p).max()))):
        return "the precision matrix is not symmetric"
    try:
        np.linalg.cholesky(p)
    except np.linalg.LinAlgError:
        return "the precision matrix is not positive definite"
    return None


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Probability that an in-distribution image scores above an out-of-distribution one (ties count half)."""
    a = np.asarray(in_scores, np.float64)
    b = np.asarray(out_scores, np.float64)
    both = np.concatenate([a, b])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both), np.float64)
    sorted_vals = both[order]
    # average ranks for ties
    i = 0
    while i < len(both):
        j = i
        while j + 1 < len(both) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Share of out-of-distribution images accepted at the threshold that accepts ``tpr`` of the in-distribution ones."""
    t = threshold_for_accept_rate(in_scores, tpr)
    return float((np.asarray(out_scores) >= t).mean())
