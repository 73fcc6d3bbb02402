"""Named datasets (Fashion-MNIST, MNIST): where to find their IDX files, and how to get them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgrec.data.idx import read_idx_pair
from imgrec.errors import DatasetError


@dataclass(frozen=True)
class NamedDataset:
    name: str
    classes: tuple[str, ...]
    torchvision_class: str   # torchvision.datasets class used for downloading
    debian_package: str | None
    flip: bool               # horizontal flips are a valid augmentation (not for digits)
    # what the source says of itself to the recipe (imgrec.data.sources: its describe), without reading a file
    train_images: int = 60000  # in the training file, the validation split included
    val_images: int = 5000     # carved from the training file when no --val-split is given
    side: int = 28             # px, square
    channels: int = 1


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

NAMED = {
    "fashion-mnist": NamedDataset("fashion-mnist", FASHION_MNIST_CLASSES, "FashionMNIST",
                                  "dataset-fashion-mnist", flip=True),
    "mnist": NamedDataset("mnist", tuple(str(i) for i in range(10)), "MNIST", None, flip=False),
}
ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}

_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def canonical_name(spec: str) -> str | None:
    """The named dataset ``spec`` refers to, or None when it is a path."""
    key = spec.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in NAMED else None


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgrec"


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched in order: --data-dir, $IMGREC_DATA, the user cache, /usr/share/datasets/<name>."""
    ds = NAMED[name]
    roots: list[Path] = []
    if data_dir:
        if not os.path.isdir(data_dir):  # given but missing: not silently replaced by the data found elsewhere
            raise DatasetError(f"{str(data_dir)[:200]}: no such folder (data_dir holds the named dataset's IDX files)")
        roots.append(Path(data_dir))
    if os.environ.get("IMGREC_DATA"):
        roots.append(Path(os.environ["IMGREC_DATA"]))
    roots.append(user_cache_dir() / "datasets")
    out: list[Path] = []
    for r in roots:
        # accept the files directly in the folder, in <name>/, or where torchvision puts them (<Class>/raw)
        out += [r, r / name, r / ds.torchvision_class / "raw"]
    out.append(Path("/usr/share/datasets") / name)
    return out


def _find_file(folder: Path, stem: str) -> Path | None:
    for cand in (folder / f"{stem}.gz", folder / stem):
        if cand.is_file():
            return cand
    return None


def locate(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    for folder in search_dirs(name, data_dir):
        if all(_find_file(folder, s) for pair in _FILES.values() for s in pair):
            return folder
    return None


def download(name: str) -> Path:
    """Download with torchvision's downloader into the user cache (mirrors, checksums and retries are its job)."""
    ds = NAMED[name]
    root = user_cache_dir() / "datasets"
    if os.environ.get("IMGREC_OFFLINE"):
        raise OSError("IMGREC_OFFLINE is set")
    import torchvision.datasets as tvd

    cls = getattr(tvd, ds.torchvision_class)
    cls(str(root), train=True, download=True)
    cls(str(root), train=False, download=True)
    return root / ds.torchvision_class / "raw"


def how_to_get(name: str, data_dir=None) -> str:
    ds = NAMED[name]
    where = ", ".join(str(p) for p in dict.fromkeys(search_dirs(name, data_dir)))
    hint = f"install Debian's package ({'apt-get install ' + ds.debian_package}), " if ds.debian_package else ""
    return (f"dataset {name!r} not found (looked in {where}) and could not be downloaded; "
            f"{hint}connect to the internet so imgrec can download it, or pass --data-dir with its IDX files")


def load_named(name: str, split: str, data_dir=None, download_ok: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images N×H×W uint8 and labels N for ``split`` in {"train", "test"}."""
    folder = locate(name, data_dir)
    if folder is None:
        if not download_ok:
            raise DatasetError(how_to_get(name, data_dir))
        try:
            folder = download(name)
        except Exception:  # no network, a mirror down, a checksum failure: one clear line instead
            raise DatasetError(how_to_get(name, data_dir)) from None
    img_stem, lab_stem = _FILES[split]
    return read_idx_pair(_find_file(folder, img_stem), _find_file(folder, lab_stem))
