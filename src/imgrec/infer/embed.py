"""Feature vectors for users' own search, deduplication and clustering: ``imgrec embed photos/ --model runs/x
--out photos.npy`` writes one row per image (the penultimate features, the vector the classifier reads) and an
index of the files beside it.

The rows are those ``Classifier.logits_and_features`` gives (the model's own forward pass, flip-TTA
included), L2-normalised unless asked not to, so that a dot product is a cosine similarity. Output:

- ``.npy``: a float32 N×D array (``numpy.load(path)``, no pickle: ``allow_pickle`` is never needed);
- ``.safetensors``: ``features`` (N×D float32) and, for a labelled split, ``labels``; the file list in its
  metadata (``files``, JSON) as well;
- beside either, ``<name>.index.csv``: ``row,file`` (and ``label``), one line per row, in row order.

Every file is written atomically; unreadable images are skipped and reported, never given a row.

No model directory is needed: ``imgrec embed --backbone efficientnet_lite0 photos/ --out photos.npy`` embeds with
a pretrained ImageNet backbone as it is (:func:`backbone_classifier`): no training, the weights from the
Hugging Face cache or downloaded (imgrec.models.weights), the images normalised as the weights were trained.
ImageNet features already put near-duplicates and photos of one scene close together, which is what search and
deduplication need before anyone has labelled anything.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from imgrec.errors import ConfigError, ImageDecodeError
from imgrec.infer.files import FilePredictions, decoded_batches, expand_inputs

__all__ = ["EMBED_FORMATS", "Embeddings", "backbone_classifier", "embed_files", "embed_images", "write_embeddings"]

EMBED_FORMATS = {".npy": "npy", ".safetensors": "safetensors"}
IMAGENET_CLASSES = 1000


@dataclass
class Embeddings:
    features: np.ndarray                     # N × D float32
    files: list[str]                         # one name per row (a file, or "<split>[i]" for dataset images)
    labels: list[str] | None = None          # a labelled split's class names, one per row
    classes: list[str] | None = None         # the model's classes (the order of the labels' indices)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) of unreadable files


def backbone_classifier(name: str, *, image_size: int | None = None, device: str = "auto", amp: str = "auto"):
    """A :class:`~imgrec.infer.predictor.Classifier` of the pretrained backbone ``name`` (a name of
    ``imgrec.models.weights.BACKBONES``: short or timm's) with its ImageNet weights and head, untrained by imgrec:
    its penultimate features are what :func:`embed_images` returns. Inputs are squashed to ``image_size``
    (default: the size of the backbone's pretrained cfg) and normalised with the backbone's own mean/std.

    Raises ConfigError for an unknown name or a bad size, ModelFileError when no weights can be had (offline,
    nothing cached: the message says how to add a file)."""
    from imgrec.infer.predictor import Classifier
    from imgrec.modeldir import ModelMeta
    from imgrec.models.pretrained import load_pretrained
    from imgrec.models.registry import create_model
    from imgrec.models.weights import backbone, fetch_weights

    b = backbone(name)
    size = int(image_size or b.image_size)
    if not 16 <= size <= 512:  # create_model's range, checked before any download
        raise ConfigError(f"--image-size must be between 16 and 512, got {size}")
    path = fetch_weights(b.name)
    # the ImageNet head is kept (1000 classes): every tensor of the file then fits, nothing is re-initialised
    model = create_model(b.model, num_classes=IMAGENET_CLASSES, in_chans=3, image_size=size)
    load_pretrained(model, b.model, weights_file=path)
    meta = ModelMeta(model={"name": b.model, "kwargs": {"num_classes": IMAGENET_CLASSES, "in_chans": 3,
                                                        "image_size": size}},
                     classes=[f"imagenet:{i}" for i in range(IMAGENET_CLASSES)], image_size=size, channels=3,
                     mean=list(b.mean), std=list(b.std),
                     training={"backbone": b.name, "weights": str(path), "licence": b.licence})
    return Classifier(model, meta, device=device, amp=amp)


def embed_images(clf, images: torch.Tensor, *, normalize: bool = True, batch_size: int = 256) -> np.ndarray:
    """Penultimate features of an N×C×H×W uint8 batch at the model's size."""
    _, feats, _ = clf.logits_and_features(images, batch_size)
    f = feats.float().numpy()
    if normalize and len(f):
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return f.astype(np.float32, copy=False)


def embed_files(clf, paths: Iterable[str | os.PathLike], *, normalize: bool = True, batch_size: int = 64,
                on_bad_image: str = "skip", warn: bool = True) -> Embeddings:
    """Features of image files and folders (searched recursively), in input order; an unreadable file is
    skipped (listed in ``skipped``) or, with ``on_bad_image="fail"``, raises ImageDecodeError."""
    if batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    files = expand_inputs(paths)
    record = FilePredictions()
    rows, names = [], []
    for kept, arrays in decoded_batches(files, clf.load_image, batch_size, on_bad_image, record, warn):
        rows.append(embed_images(clf, torch.stack(arrays), normalize=normalize, batch_size=batch_size))
        names += [str(f) for f in kept]
    if not rows:
        raise ImageDecodeError("none of the inputs could be read as an image", str(files[0]) if files else "")
    return Embeddings(np.concatenate(rows), names, None, record.skipped)


def index_path(out: str | os.PathLike) -> Path:
    """``<name>.index.csv`` beside the features file ``out``."""
    out = Path(out)
    return out.with_name(out.name[: -len(out.suffix)] + ".index.csv") if out.suffix else out.with_name(out.name + ".index.csv")


def write_embeddings(emb: Embeddings, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the features (format from the suffix) and ``<name>.index.csv``; returns both paths."""
    from imgrec.safeio import atomic_write_bytes, atomic_write_text, csv_text
    out = Path(out)
    fmt = EMBED_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{out}: the output must end in {' or '.join(EMBED_FORMATS)}")
    if out.is_dir():
        raise ConfigError(f"{out}: is a directory; give a file name")
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(emb.features, np.float32), allow_pickle=False)
        data = buf.getvalue()
    else:
        from safetensors.numpy import save
        arrays = {"features": np.ascontiguousarray(emb.features, np.float32)}
        if emb.labels is not None:
            classes = list(emb.classes or sorted(set(emb.labels)))
            arrays["labels"] = np.array([classes.index(c) for c in emb.labels], np.int64)
        meta = {"files": json.dumps(emb.files)}
        if emb.labels is not None:
            meta["classes"] = json.dumps(classes)
        data = save(arrays, metadata=meta)
    index = index_path(out)
    # made before either file is written (a failure leaves neither); cells escaped (csv_cell: no formulas,
    # non-UTF-8 file names as \xNN)
    text = csv_text([["row", "file"] + (["label"] if emb.labels is not None else [])] +
                    [[i, f] + ([emb.labels[i]] if emb.labels is not None else []) for i, f in enumerate(emb.files)])
    atomic_write_bytes(out, data)
    atomic_write_text(index, text)
    return out, index
