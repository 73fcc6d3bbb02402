"""The nearest training images of an input, with their pictures: ``imgrec explain --neighbours K`` and the
report's misclassified gallery. The bank (imgrec.infer.neighbours) says which training images; their pixels
come from the run's own training split, reloaded with the run's settings (as ``imgrec eval`` reloads its
split), so the model directory stays small."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imgrec.errors import ModelFileError
from imgrec.infer.neighbours import load_bank

__all__ = ["Neighbours"]


class Neighbours:
    """The bank of a model directory and the training images it points at, loaded once."""

    def __init__(self, clf, model_dir, train_images: torch.Tensor | None = None):
        self.clf = clf
        self.bank = load_bank(model_dir, clf.meta.inference.get("neighbours"))
        if train_images is None:
            from imgrec.data.dataset import load_run_split
            train_images = load_run_split(clf.meta, split="val").bundle.train.images
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


def _hwc(t: torch.Tensor) -> np.ndarray:
    a = t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a.transpose(1, 2, 0))
