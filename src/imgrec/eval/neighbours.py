"""The nearest training images of an input, with their pictures: ``imgrec explain --neighbours K``, the
report's misclassified gallery and ``imgrec serve`` (imgrec.serve.neighbours). The bank (imgrec.infer.neighbours)
says which training images; their pixels come from the run's own training split, reloaded with the run's
settings (as ``imgrec eval`` reloads its split), so the model directory stays small."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgrec.errors import ConfigError, DatasetError, ModelFileError
from imgrec.infer.neighbours import load_bank
from imgrec.modeldir import ModelMeta

__all__ = ["Neighbours", "training_data", "place_recorded_source", "missing_training_data", "training_data_place",
           "load_training_images"]


class Neighbours:
    """The bank of a model directory and the training images it points at, loaded once."""

    def __init__(self, clf, model_dir, train_images: torch.Tensor | None = None):
        self.clf = clf
        self.bank = load_bank(model_dir, clf.meta.inference.get("neighbours"), len(clf.classes))
        if train_images is None:
            train_images = load_training_images(clf.meta, model_dir=model_dir)
        if int(self.bank.index.max()) >= len(train_images):
            raise ModelFileError(f"{model_dir}: the bank points past the training split ({len(train_images)} images): "
                                 "the data changed since training")
        self.train_images = train_images

    def lookup(self, images: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """For each N×C×H×W uint8 image at the model's size: its ``k`` nearest training images,
        ``{"index", "label", "similarity", "image"}`` (``image``: H×W×C uint8), most similar first."""
        _, feats, _ = self.clf.logits_and_features(images)
        sims, rows = self.bank.nearest(feats.numpy(), k)
        out = []
        for srow, rrow in zip(sims, rows):
            out.append([{"index": int(self.bank.index[r]), "label": self.clf.classes[int(self.bank.labels[r])],
                         "similarity": float(s), "image": _hwc(self.train_images[int(self.bank.index[r])])}
                        for s, r in zip(srow, rrow)])
        return out


def training_data(meta: ModelMeta, data: str | None = None, model_dir=None) -> dict:
    """The run's data settings (imgrec.data.dataset.run_data_settings), with ``data`` for training data that has
    moved: the folder holding a named dataset's files, or else the folder, CSV list or pack in place of the
    recorded one. The validation split and its seed stay the run's, so the bank's indices mean the same images.

    ``model_dir``: the directory ``meta`` was read from. The source it records is then a field of a file someone
    may have handed over, so it is placed by :func:`place_recorded_source` (``refused`` says why it is not read);
    ``data``, named by the user, is taken as given."""
    from imgrec.data.dataset import run_data_settings
    from imgrec.data.named import canonical_name
    run = run_data_settings(meta)
    run["refused"] = None
    if data:
        if run["source"] and canonical_name(run["source"]):
            run["data_dir"] = str(data)
        else:
            run["source"] = str(data)
    elif model_dir is not None and run["source"]:
        run.update(place_recorded_source(run["source"], run["data_dir"], model_dir))
    return run


def place_recorded_source(spec, data_dir, model_dir) -> dict:
    """Where the training data a model directory records may be read from: ``{"source", "data_dir", "refused"}``.

    A relative path is looked for beside the model directory and its two parents (``runs/x`` trained on
    ``photos/`` finds ``photos/`` next to ``runs/``), never in the reader's working directory. The path found,
    symlinks resolved, must lie in the tree of the model directory's grandparent (its parent when that is the
    file-system root) and belong to the user or the model directory's owner: a handed ``model.json`` pointing
    at ``/etc`` or another user's folder is not read (``refused``). A URL is never fetched on a model
    directory's word. A named dataset is read from its usual places; a recorded ``data_dir`` outside is dropped."""
    from imgrec.data import named, stream
    if not isinstance(spec, str):
        return {"source": None, "refused": "model.json's data.source is not a path or a dataset name"}
    if named.canonical_name(spec) is not None:
        kept = _kept_path(data_dir, model_dir) if isinstance(data_dir, str) else None
        return {"data_dir": None if kept is None else str(kept)}
    if stream.is_url(spec):
        return {"refused": f"{spec}: a URL named by model.json is not fetched"}
    found = _kept_path(spec, model_dir)
    if found is None:
        return {"refused": f"{spec}: no folder or CSV file of that name inside {_tree(model_dir)} (the model "
                           "directory's tree; training data elsewhere is read only when named explicitly)"}
    return {"source": str(found)}


def _tree(model_dir) -> Path:
    """The folder a model directory's recorded paths must stay inside (see place_recorded_source)."""
    here = Path(model_dir).resolve()
    here = here if here.is_dir() else here.parent
    top = here.parent.parent
    return here.parent if top == Path(top.anchor) else top


def _kept_path(spec: str, model_dir) -> Path | None:
    """The existing path ``spec`` names, resolved as place_recorded_source says, or None."""
    base = Path(model_dir).resolve()
    base = base if base.is_dir() else base.parent
    p = Path(spec).expanduser()
    tree = _tree(model_dir)
    candidates = [p] if p.is_absolute() else [b / p for b in (base, base.parent, base.parent.parent)]
    for c in candidates:
        try:
            real = c.resolve()
            exists, owner = real.exists(), real.stat().st_uid if real.exists() else None
        except (OSError, RuntimeError):  # a symlink loop, a path too long: not a place to read
            continue
        if exists and real.is_relative_to(tree) and owner in _owners(base):
            return real
    return None


def _owners(model_dir: Path) -> set:
    """Whose files a model directory's recorded source may be: the reader's and the model directory's owner's."""
    owners = {model_dir.stat().st_uid}
    if hasattr(os, "getuid"):
        owners.add(os.getuid())
    return owners


def missing_training_data(meta: ModelMeta, data: str | None = None, model_dir=None) -> str | None:
    """Why the training images cannot be found, in words, or None when they can: looks for the files without
    reading an image (and never downloads a named dataset)."""
    run = training_data(meta, data, model_dir)
    return _missing(run)


def _missing(run: dict) -> str | None:
    from imgrec.data import named
    from imgrec.data.sources import resolve_source
    spec = run["source"]
    if run["refused"]:
        return run["refused"]
    if not spec:
        return "model.json does not say what the model was trained on"
    name = named.canonical_name(spec)
    if name is not None:
        return None if named.locate(name, run["data_dir"]) else f"the {name} files are not on this machine"
    try:
        resolve_source(spec)
    except DatasetError as e:
        return str(e)
    return None


def training_data_place(meta: ModelMeta, data: str | None = None, model_dir=None) -> str | None:
    """The absolute path the training images are read from (a named dataset: the folder holding its files),
    for the one line a server logs at start-up; None when they cannot be read."""
    from imgrec.data import named
    run = training_data(meta, data, model_dir)
    if _missing(run) is not None:
        return None
    from imgrec.data import stream
    spec = run["source"]
    name = named.canonical_name(spec)
    if name is not None:
        return str(Path(named.locate(name, run["data_dir"])).resolve())
    return spec if stream.is_url(spec) else str(Path(spec).expanduser().resolve())


def load_training_images(meta: ModelMeta, data: str | None = None, model_dir=None) -> torch.Tensor:
    """The run's training split, N×C×H×W uint8, in the order the bank's indices count: a named dataset's at the
    source's size (the split is carved before resizing), files decoded at the model's size, a pack's as packed.
    DatasetError/ConfigError in one line when the data cannot be read or is not the model's; with ``model_dir``
    the recorded source is read only where :func:`place_recorded_source` allows."""
    from imgrec.data import stream
    from imgrec.data.dataset import load_data, load_run_split
    run = training_data(meta, data, model_dir)
    spec = run["source"]
    if run["refused"]:
        raise DatasetError(run["refused"])
    if not spec:
        raise ConfigError("model.json does not say what the model was trained on")
    if stream.is_pack(spec):  # a pack keeps its own splits: read its training split
        return load_run_split(meta, data=spec, split="train").bundle.train.images
    bundle = load_data(spec, image_size=meta.image_size, channels=meta.channels, val_split=run["val_split"],
                       split_seed=run["split_seed"], data_dir=run["data_dir"], on_bad_image=run["on_bad_image"],
                       splits=("train", "val"), progress=False, task=meta.task, sized=(),
                       val_files=run.get("val_files"), classes=list(meta.classes) if meta.task == "multilabel" else None)
    if list(bundle.classes) != list(meta.classes):
        raise DatasetError(f"{spec}: its classes ({', '.join(bundle.classes[:5])}…) differ from the model's")
    return bundle.train.images


def _hwc(t: torch.Tensor) -> np.ndarray:
    a = t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a.transpose(1, 2, 0))
