"""``/v1/predict?neighbours=K``: the K training images nearest to each uploaded image, from the model directory's
bank of training features (imgrec.infer.neighbours), with a small thumbnail of each when the training images
can be read.

The features come from the prediction's own forward pass (``Classifier.scored_with_features``); the lookup and
the thumbnails run in a worker thread, off the event loop. Which training images are shown is decided here,
from the bank's rows: no request names a file or an index.

The pictures: the run's training split, found as ``model.json`` recorded it (or at ``--neighbours-data``), is
read (a recorded source only beside the model directory: imgrec.eval.neighbours.place_recorded_source; the
absolute path read is said at start-up) in a background thread once the server is ready, and only the bank's rows are kept (the 10,000 of the
default Fashion-MNIST model: 7.8 MB); when it cannot be found the server says so once at start-up and answers
labels and similarities without pictures. Thumbnails are made on first use and cached (a bounded LRU).
"""
from __future__ import annotations

import functools
import io
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from imgrec.infer.neighbours import Bank, load_bank, unit_rows

__all__ = ["MAX_NEIGHBOURS", "THUMB_SIDE", "ServeNeighbours", "open_neighbours"]

log = logging.getLogger("imgrec.serve")

MAX_NEIGHBOURS = 16  # per image; 32 images × 16 thumbnails of ≤ 64 px stay well under a megabyte of JSON
THUMB_SIDE = 64  # px: larger training images are shrunk to this side
THUMB_CACHE = 512  # thumbnails kept (a 64×64 colour PNG is at most ~12 KB: ≤ 6 MB in all)


class ServeNeighbours:
    """The bank, its classes, and the pictures of its rows once they are read (None until then, or for good
    when they cannot be read)."""

    def __init__(self, bank: Bank, classes: list[str], meta=None, data: str | None = None,
                 missing: str | None = None, model_dir=None, place: str | None = None):
        self.bank = bank
        self.classes = list(classes)
        self._meta, self._data, self._model_dir = meta, data, model_dir
        self.place = place  # the absolute path the pictures are read from (logged at start-up), when they can be
        self.missing = missing  # why there are no pictures, in words; None while they can be (or are) read
        self._images: Any = None  # the bank's rows' training images, N×C×H×W uint8, once read
        self.pictures_read = threading.Event()  # set when the pictures are read, or known to be unavailable
        if missing is not None:
            self.pictures_read.set()
        self._thumbnail = functools.lru_cache(maxsize=THUMB_CACHE)(self._make_thumbnail)
        self._bank32: Any = None  # the bank's float32 rows as a torch tensor (shared memory), on the first lookup
        self._reader: threading.Thread | None = None

    @property
    def pictures(self) -> bool:
        """Whether answers carry thumbnails (or will, once the training images are read)."""
        return self.missing is None

    def info(self) -> dict[str, Any]:
        """What /v1/model says: rows in the bank, the largest K, and whether there are pictures."""
        return {"rows": len(self.bank), "max_k": MAX_NEIGHBOURS, "pictures": self.pictures,
                "pictures_ready": self._images is not None}

    def start_reading(self) -> None:
        """Read the pictures in a background thread (once; nothing to do when they are read or unavailable)."""
        if self.pictures_read.is_set() or self._reader is not None:
            return
        self._reader = threading.Thread(target=self.read_pictures, name="imgrec-neighbours", daemon=True)
        self._reader.start()

    def finish_reading(self) -> None:
        """Wait for the background read to end (at shutdown: the process must not exit in the middle of it)."""
        if self._reader is None:
            return
        if self._reader.is_alive():
            log.info("waiting for the training images being read to finish")
        self._reader.join()

    def read_pictures(self) -> None:
        """Read the training images and keep the bank's rows (runs once, in a background thread). A failure is
        logged in one line and the answers go on without pictures."""
        if self.pictures_read.is_set():
            return
        from imgrec.errors import ImgrecError, first_line
        from imgrec.eval.neighbours import load_training_images
        try:
            train = load_training_images(self._meta, self._data, self._model_dir)
            if int(self.bank.index.max()) >= len(train):
                raise ImgrecError(f"the bank points past the training split ({len(train)} images): the data "
                                  "changed since training")
            import torch
            self._images = train[torch.from_numpy(self.bank.index)].clone()  # the rest is let go
        except (ImgrecError, OSError, ValueError) as e:
            self.missing = first_line(e)
            log.warning("nearest training images without pictures: %s", self.missing)
        finally:
            self.pictures_read.set()

    def lookup(self, features: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """For each feature row (M × D): its ``k`` nearest bank rows, most similar first, as
        ``{"index", "label", "similarity", "thumbnail"}`` (``thumbnail``: a PNG data URI, or None)."""
        import torch  # loaded already: only the PyTorch backend gives features
        if self._bank32 is None:  # a view of the bank's own float32 rows, not a second copy
            self._bank32 = torch.from_numpy(self.bank.features32())
        # torch's product, not numpy's: numpy's OpenBLAS keeps a thread pool of its own beside the one the
        # server sizes for the model, and under load it took 18 ms for this 0.1 ms product (measured here)
        sims = (torch.from_numpy(unit_rows(features)) @ self._bank32.T).numpy()
        sims, rows = self.bank.top(sims, k)
        pictures = self._images is not None
        return [[{"index": int(self.bank.index[r]), "label": self.classes[int(self.bank.labels[r])],
                  "similarity": round(float(s), 4), "thumbnail": self._thumbnail(int(r)) if pictures else None}
                 for s, r in zip(srow, rrow)]
                for srow, rrow in zip(sims, rows)]

    def _make_thumbnail(self, row: int) -> str:
        import base64

        from PIL import Image
        a = self._images[row].numpy().transpose(1, 2, 0)
        im = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
        if max(im.size) > THUMB_SIDE:
            im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _feature_width(classifier) -> int:
    """The width of the network's penultimate features (one pass of a blank image)."""
    import torch
    x = torch.zeros((1, classifier.channels, classifier.image_size, classifier.image_size), dtype=torch.uint8)
    return int(classifier.logits_and_features(x, 1)[1].shape[1])


def open_neighbours(classifier, model_dir: str | Path | None, data: str | None = None) -> ServeNeighbours | None:
    """The neighbours a server over ``classifier`` (loaded from ``model_dir``) can answer, or None: a model
    directory without a bank, or a backend without the features (an exported ONNX file). ModelFileError when
    ``model.json`` names a bank that is missing or broken. Reads no training image (see ``read_pictures``)."""
    meta = getattr(classifier, "meta", None)
    entry = (getattr(meta, "inference", None) or {}).get("neighbours")
    if model_dir is None or not entry or not hasattr(classifier, "scored_with_features"):
        return None
    bank = load_bank(model_dir, entry, len(classifier.classes), _feature_width(classifier))
    from imgrec.eval.neighbours import missing_training_data, training_data_place
    missing = missing_training_data(meta, data, model_dir)
    place = None if missing else training_data_place(meta, data, model_dir)
    return ServeNeighbours(bank, classifier.classes, meta, data, missing, model_dir, place)
