"""The nearest training images of an input, with their pictures: ``imgrec explain --neighbours K``, the
report's misclassified gallery and ``imgrec serve`` (imgrec.serve.neighbours). The bank (imgrec.infer.neighbours)
says which training images; their pixels come from the run's own training split, reloaded with the run's
settings (as ``imgrec eval`` reloads its split), so the model directory stays small."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imgrec.errors import ConfigError, DatasetError, ModelFileError
from imgrec.infer.neighbours import load_bank
from imgrec.modeldir import ModelMeta

__all__ = ["Neighbours", "training_data", "missing_training_data", "load_training_images"]


class Neighbours:
    """The bank of a model directory and the training images it points at, loaded once."""

    def __init__(self, clf, model_dir, train_images: torch.Tensor | None = None):
        self.clf = clf
        self.bank = load_bank(model_dir, clf.meta.inference.get("neighbours"), len(clf.classes))
        if train_images is None:
            train_images = load_training_images(clf.meta)
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


def training_data(meta: ModelMeta, data: str | None = None) -> dict:
    """The run's data settings (imgrec.data.dataset.run_data_settings), with ``data`` for training data that has
    moved: the folder holding a named dataset's files, or else the folder, CSV list or pack in place of the
    recorded one. The validation split and its seed stay the run's, so the bank's indices mean the same images."""
    from imgrec.data.dataset import run_data_settings
    from imgrec.data.named import canonical_name
    run = run_data_settings(meta)
    if data:
        if run["source"] and canonical_name(run["source"]):
            run["data_dir"] = str(data)
        else:
            run["source"] = str(data)
    return run


def missing_training_data(meta: ModelMeta, data: str | None = None) -> str | None:
    """Why the training images cannot be found, in words, or None when they can: looks for the files without
    reading an image (and never downloads a named dataset)."""
    from imgrec.data import named
    from imgrec.data.sources import resolve_source
    run = training_data(meta, data)
    spec = run["source"]
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


def load_training_images(meta: ModelMeta, data: str | None = None) -> torch.Tensor:
    """The run's training split, N×C×H×W uint8, in the order the bank's indices count: a named dataset's at the
    source's size (the split is carved before resizing), files decoded at the model's size, a pack's as packed.
    DatasetError/ConfigError in one line when the data cannot be read or is not the model's."""
    from imgrec.data import stream
    from imgrec.data.dataset import load_data, load_run_split
    run = training_data(meta, data)
    spec = run["source"]
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
