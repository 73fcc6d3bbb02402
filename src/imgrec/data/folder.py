"""Image folders in the ImageFolder layout: ``root/<class>/<image>``, optionally under train/ val/ test/."""
from __future__ import annotations

import os
from pathlib import Path

from imgrec.data.decode import IMAGE_EXTENSIONS
from imgrec.errors import DatasetError


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# What every command that walks a folder leaves out (train, data check, data pack, audit, predict over a folder,
# report): names starting with "." (.ipynb_checkpoints/, .DS_Store, .git/, and macOS's AppleDouble "._photo.jpg"
# files, which carry an image extension but hold resource-fork bytes) and __MACOSX/ folders from zip files.
# They are never data, and as data they either fail to decode (._ files stop a training run) or silently add
# copies (a notebook's checkpoint folder inside a class folder). Files named on the command line are not
# filtered: asking for one by name means it.
JUNK_FOLDERS = frozenset({"__MACOSX"})


def is_junk_name(name: str) -> bool:
    """Hidden (``.x``, AppleDouble ``._x``) or ``__MACOSX``: skipped whenever a folder is walked."""
    return name.startswith(".") or name in JUNK_FOLDERS


class FileList(list):
    """The paths a scan found (a plain list of Paths) and what it left out: ``skipped`` counts per reason
    ("hidden": hidden/system entries, "outside": symbolic links that lead out of the dataset's folder) and
    ``examples`` names a few of them, for ``imgrec data check`` to report."""

    def __init__(self, items=()):
        super().__init__(items)
        self.skipped: dict[str, int] = {"hidden": 0, "outside": 0}
        self.examples: list[str] = []

    def skip(self, reason: str, path: Path) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(str(path))

    def admits(self, path: Path, root_real: str, follow_links_out: bool) -> bool:
        """Whether a walk keeps ``path``: not when its name is hidden or system, nor when it is a symbolic
        link out of ``root_real`` (unless ``follow_links_out``); what it leaves out is counted here."""
        if is_junk_name(path.name):
            self.skip("hidden", path)
        elif not follow_links_out and path.is_symlink() and not _inside(path, root_real):
            self.skip("outside", path)
        else:
            return True
        return False

    def absorb(self, other: "FileList") -> None:
        for k, v in getattr(other, "skipped", {}).items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        self.examples += getattr(other, "examples", [])[: max(0, 5 - len(self.examples))]


def _inside(path: Path, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def scan_images(root: str | os.PathLike, *, within: str | os.PathLike | None = None,
                follow_links_out: bool = False) -> FileList:
    """All entries under ``root`` (recursively, sorted) whose names carry an image extension.

    Hidden and system entries (:func:`is_junk_name`) are skipped, folders with all they hold. A symbolic link
    (file or folder) whose target lies outside ``within`` (default ``root``; the dataset's folder) is skipped
    unless ``follow_links_out``: a folder someone hands you must not make imgrec read, train on or pack files
    elsewhere on your disk. Links inside it are kept; linked folders are not descended into (as before).
    Both kinds are counted in the result's ``skipped``.

    Entries that are not regular files (a folder named ``x.jpg``, a broken symlink) are kept so that
    decoding reports them by path instead of silently dropping them.
    """
    root = Path(root)
    root_real = os.path.realpath(within if within is not None else root)
    out = FileList()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in [d for d in dirnames if is_junk_name(d)]:
            out.skip("hidden", Path(dirpath) / d)
        dirnames[:] = sorted(d for d in dirnames if not is_junk_name(d))
        for name in sorted(filenames + [d for d in dirnames if is_image_name(d)]):
            if not is_image_name(name):
                if is_junk_name(name):
                    out.skip("hidden", Path(dirpath) / name)  # .DS_Store: counted, never read
                continue
            path = Path(dirpath) / name
            if out.admits(path, root_real, follow_links_out):
                out.append(path)
        dirnames[:] = [d for d in dirnames if not is_image_name(d)]
    return out


def _dataset_root(root: Path) -> Path:
    """The folder symbolic links must stay in: the dataset's, also when ``root`` is its train/val/test split."""
    if root.name in ("train", "val", "test") and has_split_folders(root.parent):
        return root.parent
    return root


def has_split_folders(root: Path) -> bool:
    """True when ``root/train`` exists and holds class folders (then val/ and test/ are splits too)."""
    train = root / "train"
    return train.is_dir() and any(p.is_dir() for p in train.iterdir())


def scan_class_folders(root: Path, classes: list[str] | None = None, *, follow_links_out: bool = False
                       ) -> tuple[FileList, list[int], list[str]]:
    """Files and label indices of one ImageFolder tree. ``classes`` fixes the class list (for val/test).

    Hidden and system folders are not classes; class folders and files that are symbolic links out of the
    dataset's folder are skipped unless ``follow_links_out`` (see :func:`scan_images`). The paths come as a
    :class:`FileList` whose ``skipped`` says what was left out."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    within = _dataset_root(root)
    within_real = os.path.realpath(within)
    paths = FileList()
    found = []
    for p in sorted(root.iterdir(), key=lambda p: p.name):
        if not p.is_dir():
            continue
        if paths.admits(p, within_real, follow_links_out):
            found.append(p.name)
    if not found:
        hint = (f"; {paths.skipped['outside']} linked folder(s) lead outside it and were skipped"
                if paths.skipped["outside"] else "")
        raise DatasetError(f"{root}: no class subfolders (expected {root}/<class>/<image>){hint}")
    if classes is None:
        classes = found
    else:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise DatasetError(f"{root}: class folder(s) {', '.join(unknown)} not among the training classes")
    labels: list[int] = []
    for c in found:
        files = scan_images(root / c, within=within, follow_links_out=follow_links_out)
        if not files and root.name != "test" and root.name != "val":
            hint = (f"; {files.skipped['outside']} symbolic link(s) in it lead outside {within} and were skipped "
                    f"(imgrec does not follow links out of a dataset folder)" if files.skipped["outside"] else "")
            raise DatasetError(f"{root / c}: empty class folder (no .jpg/.jpeg/.png/.webp/.bmp/.gif files){hint}")
        paths += files
        paths.absorb(files)
        labels += [classes.index(c)] * len(files)
    if not paths:
        raise DatasetError(f"{root}: no images found")
    return paths, labels, list(classes)
