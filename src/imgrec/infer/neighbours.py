"""The training images closest to an input in feature space: "which training images does this look like?".

``imgrec train`` keeps a bank of the penultimate features (L2-normalised, float16) of up to 10,000 evenly
strided training images in ``neighbours.safetensors`` — 10,000 × 256 × 2 bytes = 5.1 MB for the default
Fashion-MNIST model — with each row's index in the training split and its label, and records it in
``model.json`` (``inference.neighbours``). ``imgrec explain --neighbours K``, the report's misclassified
gallery and the server's ``?neighbours=K`` look the nearest rows up (cosine similarity) and show those training
images (imgrec.eval.neighbours, which reloads the split; imgrec.serve.neighbours). Loading runs no code (safetensors); nothing here needs PyTorch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from imgrec.errors import ModelFileError
from imgrec.modeldir import RunDir

__all__ = ["NEIGHBOURS_FILE", "Bank", "unit_rows", "write_bank", "load_bank"]

NEIGHBOURS_FILE = RunDir.NEIGHBOURS


class Bank:
    """Unit feature rows, their indices in the training split and their class indices."""

    def __init__(self, features: np.ndarray, index: np.ndarray, labels: np.ndarray):
        self.features = np.asarray(features, np.float16)
        self.index = np.asarray(index, np.int64)
        self.labels = np.asarray(labels, np.int64)
        self._features32: np.ndarray | None = None  # float32 copy, made on the first lookup and kept

    def __len__(self) -> int:
        return len(self.index)

    def features32(self) -> np.ndarray:
        """The rows in float32, converted once and kept (looked up many times by a server; 10,000 × 256: 10 MB);
        every lookup path shares this one copy."""
        if self._features32 is None:
            self._features32 = self.features.astype(np.float32)
        return self._features32

    def nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, bank rows) of the ``k`` nearest rows to each query (M × D), most similar first."""
        return self.top(unit_rows(queries) @ self.features32().T, k)

    @staticmethod
    def top(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows) of the ``k`` largest of each row of ``sims`` (M × N), largest first, equal ones
        by row (what a stable sort gives). The k-th largest value by a partition, then a sort of what reaches
        it: sorting all 10,000 for each of 32 queries took 71 ms here, a partition 0.4 ms."""
        n = sims.shape[1]
        k = max(1, min(int(k), n))
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        rows = np.empty((len(sims), k), np.int64)
        for i, (row, t) in enumerate(zip(sims, kth)):  # a few queries; ties at the k-th value make more than k
            cand = np.flatnonzero(row >= t)
            rows[i] = cand[np.lexsort((cand, -row[cand]))[:k]]
        return np.take_along_axis(sims, rows, axis=1), rows


def unit_rows(a: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, as float32 (a zero row stays zero)."""
    a = np.asarray(a, np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def write_bank(model_dir: str | Path, features: np.ndarray, index: np.ndarray, labels: np.ndarray) -> dict:
    """Write the bank atomically; returns the ``inference.neighbours`` entry for ``model.json``."""
    from safetensors.numpy import save
    from imgrec.safeio import atomic_write_bytes
    f = unit_rows(features)
    arrays = {"features": f.astype(np.float16), "index": np.asarray(index, np.int64),
              "labels": np.asarray(labels, np.int64)}
    atomic_write_bytes(Path(model_dir) / NEIGHBOURS_FILE, save(arrays))
    return {"file": NEIGHBOURS_FILE, "split": "train", "rows": int(len(f))}


def _check_bank_arrays(path: Path, a: dict, num_classes: int | None, width: int | None) -> None:
    f, index, labels = a["features"], a["index"], a["labels"]
    if f.ndim != 2 or index.ndim != 1 or labels.ndim != 1 or not (len(f) == len(index) == len(labels)) or not len(f):
        raise ModelFileError(f"{path}: the bank's arrays do not fit together")
    if not np.issubdtype(f.dtype, np.floating) or not np.isfinite(f).all():
        raise ModelFileError(f"{path}: the bank's features must be finite numbers")
    if width is not None and f.shape[1] != width:
        raise ModelFileError(f"{path}: the bank's rows are {f.shape[1]} wide, the network's features {width}")
    for name, v in (("index", index), ("labels", labels)):
        if not np.issubdtype(v.dtype, np.integer) or v.min() < 0:
            raise ModelFileError(f"{path}: the bank's {name} must be whole numbers ≥ 0")
    if num_classes is not None and labels.max() >= num_classes:
        raise ModelFileError(f"{path}: the bank names class {int(labels.max())}; the model has {num_classes}")


def load_bank(model_dir: str | Path, entry: dict | None, num_classes: int | None = None,
              width: int | None = None) -> Bank:
    """The bank ``inference.neighbours`` names; ModelFileError in one line when there is none or it is broken:
    arrays that do not fit together, features that are not finite (or not ``width`` wide, when given),
    indices or labels that are not whole numbers ≥ 0, labels ≥ ``num_classes`` when given."""
    if not entry:
        raise ModelFileError(f"{model_dir}: no bank of training features (train it with this imgrec to show the "
                             "nearest training images)")
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ModelFileError(f"{model_dir}: inference.neighbours.file must be a plain file name")
    path = Path(model_dir) / name
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        a = load_file(str(path))
        _check_bank_arrays(path, a, num_classes, width)
        bank = Bank(a["features"], a["index"], a["labels"])
    except FileNotFoundError:
        raise ModelFileError(f"{path}: the bank of training features is missing") from None
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise ModelFileError(f"{path}: corrupt bank of training features ({str(e).splitlines()[0]})") from None
    if bank.features.ndim != 2 or not (len(bank.features) == len(bank.index) == len(bank.labels)) or len(bank) == 0:
        raise ModelFileError(f"{path}: the bank's arrays do not fit together")
    return bank
