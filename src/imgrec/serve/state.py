"""What one app holds across requests: the classifier, its batcher, the admission counts, the metrics, and the
bank of training features for ``?neighbours=K`` (imgrec.serve.neighbours).

The batcher's worker thread calls :meth:`ServerState.run_batch`; everything else here runs on the event loop.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
import numpy as np

from imgrec.serve.batcher import Batcher
from imgrec.serve.settings import MAX_TOP_K, ServeSettings

if TYPE_CHECKING:
    import torch

    from imgrec.serve.metrics import ServeMetrics
    from imgrec.serve.neighbours import ServeNeighbours

__all__ = ["Row", "ServerState", "blank_batch", "stack_images"]


class Row(NamedTuple):
    """One image's model output, as plain Python values.

    Single-label: ``scores`` and ``classes`` (indices) best first, at most MAX_TOP_K of each; the request cuts
    them to its own top_k. Multi-label: ``labels``, every label at or above its threshold, best first, as
    the classifier's ``topk`` gives them. ``ood``: the out-of-distribution score, or None. ``features``: the
    penultimate features (float32 numpy, D), only from a pass asked for them (a request with ``neighbours``).
    """
    scores: list[float]
    classes: list[int]
    ood: float | None
    labels: list[dict[str, Any]] | None = None
    features: np.ndarray | None = None


class ServerState:
    def __init__(self, classifier, settings: ServeSettings, metrics: ServeMetrics | None = None,
                 neighbours: ServeNeighbours | None = None):
        self.classifier = classifier
        self.settings = settings
        self.metrics = metrics
        self.neighbours = neighbours
        self.max_concurrent = settings.max_concurrent or settings.queue_size
        self.active = 0  # predict requests in progress (touched only on the event loop: no lock)
        self.buffered = 0  # bytes of request bodies held in memory, all requests together
        # decoding competes with the model for the cores: by default at most half of them decode at once
        self.decode_limiter = anyio.CapacityLimiter(settings.decode_threads
                                                    or max(1, min(4, (os.cpu_count() or 1) // 2)))
        self.ready = False
        self.batcher = Batcher(self.run_batch, settings.max_batch, settings.max_wait_ms / 1000, settings.queue_size)

    def run_batch(self, batch: torch.Tensor | np.ndarray, features: bool = False) -> list[Row]:
        """The batcher's forward pass: counted in the metrics, which the warm-up passes are not."""
        if self.metrics is not None:
            self.metrics.batch_size.observe(int(batch.shape[0]))
        return self._forward(batch, features)

    def _forward(self, batch: torch.Tensor | np.ndarray, features: bool = False) -> list[Row]:
        """One :class:`Row` per image (runs in the batcher's thread); with ``features``, each row's features
        from the same pass (only when the app has neighbours: the routes refuse the request otherwise).

        Sorting and ``tolist`` once per batch here, instead of a ``topk`` per request on the event loop,
        keeps tensor calls (and their GIL hand-offs) off the thread that answers every connection.
        """
        # chunks of max_batch bound memory when one request brings more images than a batch holds
        feats: Any = [None] * int(batch.shape[0])
        if features and self.neighbours is not None:
            probs, ood, f = self.classifier.scored_with_features(batch, batch_size=self.settings.max_batch)
            feats = f.float().numpy()
        else:
            probs, ood = self.classifier.scored(batch, batch_size=self.settings.max_batch)
        ood = [None] * len(probs) if ood is None else [float(v) for v in ood]
        if self.classifier.multilabel:  # every label at or above its threshold, compared as the predictors do
            return [Row([], [], o, labels, f) for labels, o, f in zip(self.classifier.topk(probs), ood, feats)]
        k = min(MAX_TOP_K, probs.shape[1])
        if isinstance(probs, np.ndarray):  # ONNX Runtime; a stable sort of -p keeps ties in class order, as torch
            idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(probs, idx, axis=1)
        else:
            scores, idx = probs.sort(dim=1, descending=True, stable=True)
            scores, idx = scores[:, :k], idx[:, :k]
        return [Row(s, i, o, None, f) for s, i, o, f in zip(scores.tolist(), idx.tolist(), ood, feats)]

    def queued_images(self) -> int:
        """Images waiting for the model. The batcher keeps this count under its lock; reading one int
        without the lock is safe and at worst a moment old, which is all a gauge needs."""
        return int(self.batcher._queued_images)

    def warm_up(self) -> None:
        """Run the shapes the server will see first, so the first real request is not the slow one."""
        for n in sorted({1, self.settings.max_batch}):
            self._forward(blank_batch(self.classifier, n))


def blank_batch(classifier, n: int):
    """``n`` black images at the model's size, of the type its ``load_image`` gives (torch or numpy)."""
    one = classifier.load_image(np.zeros((classifier.channels, classifier.image_size, classifier.image_size),
                                         np.uint8))
    return stack_images([one] * n)


def stack_images(images: list):
    """Decoded C×H×W images → one N×C×H×W batch, with the library that made them."""
    if isinstance(images[0], np.ndarray):
        return np.stack(images)
    import torch  # the images are torch tensors: PyTorch is loaded already
    return torch.stack(images)
