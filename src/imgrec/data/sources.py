"""Where images come from: one registry of data sources, used alike by ``load_data`` (training, eval),
``imgrec data pack``, ``imgrec data check`` and ``imgrec data audit``.

A source is a name, a ``claims(spec)`` test and a ``listing(spec, ...)`` function that says what the source
holds before any pixel is decoded: the class names and, per split, the labels and either the image files or
an in-memory array (a named dataset's IDX files). It may also ``describe`` itself to the recipe (counts, sizes,
channels: imgrec.data.probe); by default it is described from its listing. Sources are asked in registration order; the first that
claims a spec serves it, and a spec no source claims is one error, worded once here. The built-in ones are
the named datasets (``fashion-mnist``, ``mnist``), CSV lists and image folders; a pack from
``imgrec data pack`` is opened before this registry is asked (imgrec.data.stream), as it is already split and
sized. A new source is one ``register_source(Source(...))`` call with its two functions; every command then
reads it, and ``imgrec train`` chooses its recipe from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from imgrec.data import csvlist, named
from imgrec.data import folder as folder_source
from imgrec.errors import ConfigError, DatasetError

__all__ = ["SPLITS", "Listing", "Source", "list_source", "register_source", "resolve_source", "sources"]

SPLITS = ("train", "val", "test")


@dataclass
class Listing:
    """A source's content before decoding. ``splits[s]`` is ``{"labels": [...], "paths": [Path, ...]}`` for
    files or ``{"labels": ndarray, "images": ndarray}`` (N×H×W uint8) for an in-memory dataset; multi-label
    labels are label-name lists (``task == "multilabel"``)."""
    name: str
    kind: str
    classes: list[str]
    splits: dict[str, dict]
    flip: bool = True
    task: str = "classification"

    @property
    def in_memory(self) -> bool:
        return any("images" in part for part in self.splits.values())


@dataclass(frozen=True)
class Source:
    name: str
    claims: Callable[[str], bool]
    listing: Callable[..., Listing]  # (spec, *, data_dir, splits, task, classes) -> Listing
    # (spec, *, data_dir, val_split, sample) -> imgrec.data.probe.DataProbe | None: the facts the recipe is
    # chosen from (counts, sizes, channels: a DataProbe or a dict of its fields); None: described from the
    # listing (imgrec.data.probe.probe_listing)
    describe: Callable[..., object] | None = None


_SOURCES: list[Source] = []


def register_source(source: Source) -> Source:
    """Add a source; asked after the ones registered before it. A second source of the same name is refused."""
    if any(s.name == source.name for s in _SOURCES):
        raise ValueError(f"a data source named {source.name!r} is registered already")
    _SOURCES.append(source)
    return source


def sources() -> list[Source]:
    return list(_SOURCES)


def resolve_source(spec: str) -> Source:
    """The first registered source that claims ``spec``; DatasetError naming what exists otherwise."""
    for s in _SOURCES:
        if s.claims(spec):
            return s
    path = Path(spec).expanduser()
    if path.is_file():
        raise DatasetError(f"{spec}: a dataset is a folder, a .csv list or one of: {', '.join(named.NAMED)}")
    raise DatasetError(f"{spec}: no such dataset, folder or CSV file (named datasets: {', '.join(named.NAMED)})")


def list_source(spec: str, *, data_dir: str | None = None, splits: tuple[str, ...] = SPLITS,
                task: str | None = None, classes: list[str] | None = None) -> Listing:
    """What ``spec`` holds, with the checks every command needs (at least 2 classes, labels in range). File
    sources list every split they have; a named dataset reads only the files of the splits asked for (its
    training file for "train" or "val": its validation split is carved from it)."""
    if task not in (None, "classification", "multilabel"):
        raise ConfigError(f"task must be classification or multilabel, got {task!r}")
    listing = resolve_source(spec).listing(spec, data_dir=data_dir, splits=tuple(splits), task=task, classes=classes)
    if len(listing.classes) < 2:
        raise DatasetError(f"{spec}: needs at least 2 classes, found {len(listing.classes)} "
                           f"({', '.join(listing.classes)})")
    return listing


# -- the built-in sources -----------------------------------------------------------------------------
def _named_listing(spec: str, *, data_dir=None, splits=SPLITS, task=None, classes=None) -> Listing:
    name = named.canonical_name(spec)
    if task == "multilabel":
        raise ConfigError(f"{name} has one label per image; multi-label data comes from a CSV list "
                          f"(path,label1;label2)")
    ds = named.NAMED[name]
    parts = {}
    for s in ("train", "test"):  # a named dataset's validation split is carved from its training split
        if s not in splits and not (s == "train" and "val" in splits):
            continue
        x, y = named.load_named(name, s, data_dir)
        bad = int(((y < 0) | (y >= len(ds.classes))).sum())
        if bad:
            raise DatasetError(f"{name}: {bad} {'training' if s == 'train' else s} labels outside "
                               f"0..{len(ds.classes) - 1}")
        parts[s] = {"images": x, "labels": y}
    return Listing(name, "named", list(ds.classes), parts, ds.flip)


def _named_describe(spec: str, *, data_dir=None, val_split=None, sample=0) -> dict:
    """A named dataset's facts as it records them (imgrec.data.named.NamedDataset): no file is read. The fields
    of imgrec.data.probe.DataProbe as a dict (the probe imports this module, not the other way round)."""
    ds = named.NAMED[named.canonical_name(spec)]
    n, k = ds.train_images, len(ds.classes)
    n_val = ds.val_images if val_split is None else int(round(val_split * n)) if val_split < 1 else int(val_split)
    return {"kind": "named", "n_train": n - n_val, "num_classes": k, "counts": [n // k] * k,
            "channels": ds.channels, "min_side": ds.side, "median_side": ds.side, "max_side": ds.side,
            "aspect_min": 1.0, "aspect_max": 1.0, "sampled": 0}


def _is_csv(spec: str) -> bool:
    path = Path(spec).expanduser()
    return path.is_file() and path.suffix.lower() == ".csv"


def _csv_listing(spec: str, *, data_dir=None, splits=SPLITS, task=None, classes=None) -> Listing:
    path = Path(spec).expanduser()
    if task is None:
        task = "multilabel" if csvlist.csv_has_multiple_labels(path) else "classification"
    multilabel = task == "multilabel"
    rows = csvlist.read_csv_list(path, classes, multilabel=multilabel)
    if classes is None:
        classes = sorted({n for _, labs in rows.values() for lab in labs for n in (lab if multilabel else [lab])})
    index = {c: i for i, c in enumerate(classes)}
    parts = {s: {"paths": list(p), "labels": list(labs) if multilabel else [index[lab] for lab in labs]}
             for s, (p, labs) in rows.items()}
    return Listing(path.stem, "csv", list(classes), parts, True, task)


def _folder_listing(spec: str, *, data_dir=None, splits=SPLITS, task=None, classes=None) -> Listing:
    path = Path(spec).expanduser()
    if task == "multilabel":
        raise ConfigError(f"{spec}: an image folder has one label per image; multi-label data comes from a CSV "
                          f"list (path,label1;label2)")
    if folder_source.has_split_folders(path):
        p, lab, classes = folder_source.scan_class_folders(path / "train", classes)
        groups = {"train": (p, lab)}
        for s in ("val", "test"):
            if (path / s).is_dir():
                groups[s] = tuple(folder_source.scan_class_folders(path / s, classes)[:2])
    else:
        p, lab, classes = folder_source.scan_class_folders(path, classes)
        groups = {"train": (p, lab)}
    # the paths stay the scans' FileLists: they carry what was left out (junk files, links out) and why
    parts = {s: {"paths": p, "labels": list(lab)} for s, (p, lab) in groups.items()}
    return Listing(path.name, "folder", list(classes), parts, True, "classification")


register_source(Source("named", lambda spec: named.canonical_name(spec) is not None, _named_listing,
                       _named_describe))
register_source(Source("csv", _is_csv, _csv_listing))
register_source(Source("folder", lambda spec: Path(spec).expanduser().is_dir(), _folder_listing))
