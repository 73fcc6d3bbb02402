"""Image folders in the ImageFolder layout: ``root/<class>/<image>``, optionally under train/ val/ test/."""
from __future__ import annotations

import os
from pathlib import Path

from imgrec.data.decode import IMAGE_EXTENSIONS
from imgrec.errors import DatasetError


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def scan_images(root: str | os.PathLike) -> list[Path]:
    """All entries under ``root`` (recursively, sorted) whose names carry an image extension.

    Entries that are not regular files (a folder named ``x.jpg``, a broken symlink) are kept so that
    decoding reports them by path instead of silently dropping them.
    """
    root = Path(root)
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if is_image_name(d)]):
            if is_image_name(name):
                out.append(Path(dirpath) / name)
        dirnames[:] = [d for d in dirnames if not is_image_name(d)]
    return out




def has_split_folders(root: Path) -> bool:
    """True when ``root/train`` exists and holds class folders (then val/ and test/ are splits too)."""
    train = root / "train"
    return train.is_dir() and any(p.is_dir() for p in train.iterdir())


def scan_class_folders(root: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Files and label indices of one ImageFolder tree. ``classes`` fixes the class list (for val/test)."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DatasetError(f"{root}: no class subfolders (expected {root}/<class>/<image>)")
    if classes is None:
        classes = found
    else:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise DatasetError(f"{root}: class folder(s) {', '.join(unknown)} not among the training classes")
    paths: list[Path] = []
    labels: list[int] = []
    for c in found:
        files = scan_images(root / c)
        if not files and root.name != "test" and root.name != "val":
            raise DatasetError(f"{root / c}: empty class folder (no .jpg/.jpeg/.png/.webp/.bmp/.gif files)")
        paths += files
        labels += [classes.index(c)] * len(files)
    if not paths:
        raise DatasetError(f"{root}: no images found")
    return paths, labels, list(classes)
