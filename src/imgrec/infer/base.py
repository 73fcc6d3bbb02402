"""What every prediction backend shares: the ``Predictor`` protocol callers program against, and
``BasePredictor``, the one implementation of everything that does not depend on how logits are computed.

``Classifier`` (PyTorch, imgrec.infer.predictor) and ``OnnxClassifier`` (ONNX Runtime, imgrec.infer.ort)
both derive from ``BasePredictor``: the input checks, the top-k and multi-label answers, thresholds,
``predict`` and ``predict_files`` are written once here, and a backend supplies only its forward pass
(``probabilities``, ``logits``) and a few small hooks for its own array type. Callers (eval, the server,
the CLI) read ``multilabel``, ``thresholds``, ``temperature`` … from any predictor directly.

Nothing here imports PyTorch: the ONNX Runtime path uses it too.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Any, Callable, ContextManager, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np

from imgrec.errors import ConfigError, ImageDecodeError
from imgrec.infer.files import (FilePredictions, add_results, check_file_options, decode_with_notes,
                                decoded_batches, run_batches)
from imgrec.infer.multilabel import parse_thresholds, select_labels

__all__ = ["BasePredictor", "ImageLike", "Predictor", "as_chw"]

ImageLike = Any  # path, bytes, a binary file, PIL.Image, numpy H×W(×C) uint8, or torch uint8 C×H×W

# (scored: probabilities and OOD scores of a stacked batch, streams side by side, images per pass): what
# predict_files runs with
FileRun = tuple[Callable[[Any], Any], int, int]


@runtime_checkable
class Predictor(Protocol):
    """The prediction API both backends give (imgrec.infer.backends.load_classifier returns one)."""
    backend: str                    # "torch" or "onnxruntime"
    meta: Any                       # ModelMeta, or the exported file's OnnxModelInfo (the same field names)
    classes: list[str]
    image_size: int
    channels: int
    tta_flip: bool
    temperature: float              # probabilities are softmax(logits / temperature)
    multilabel: bool                # one sigmoid per label, answered at per-label thresholds
    thresholds: list[float] | None  # multilabel only
    unknown_threshold: float | None  # an out-of-distribution score below it is answered "unknown"; None: off

    @property
    def name(self) -> str: ...
    def load_image(self, image: ImageLike) -> Any: ...
    def logits(self, batch_uint8: Any, batch_size: int = 256) -> Any: ...
    def probabilities(self, batch_uint8: Any, batch_size: int = 256) -> Any: ...
    def scored(self, batch_uint8: Any, batch_size: int = 256) -> tuple[Any, np.ndarray | None]: ...
    def set_accept_rate(self, rate: float | None) -> float | None: ...
    def mark_unknown(self, answers: list[list[dict]], ood: np.ndarray | None) -> list[dict]: ...
    def set_thresholds(self, spec) -> list[float]: ...
    def topk(self, probs: Any, top_k: int = 5) -> list[list[dict]]: ...
    def predict(self, images: ImageLike | Iterable[ImageLike], top_k: int = 5, batch_size: int = 64): ...
    def predict_files(self, paths: Iterable[str | os.PathLike], top_k: int = 5, batch_size: int = 64,
                      on_bad_image: str = "fail", warn: bool = True,
                      decode_threads: int | None = None) -> FilePredictions: ...


def as_chw(arr: Any, is_uint8: bool, channels_first: Callable[[Any], Any]) -> Any:
    """An array image (numpy or torch) as C×H×W with at most 3 channels: H×W gets a channel axis, H×W×C is
    turned with ``channels_first``; ImageDecodeError for another dtype than uint8 or another shape."""
    if not is_uint8:
        raise ImageDecodeError("array images must be uint8")
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3):
        arr = channels_first(arr)  # H×W×C
    if arr.ndim != 3 or arr.shape[0] not in (1, 3, 4):
        raise ImageDecodeError(f"expected an H×W, H×W×C or C×H×W image, got shape {tuple(arr.shape)}")
    return arr[:3]


def _is_pil(image: Any) -> bool:
    return hasattr(image, "save") and hasattr(image, "mode")


def _png_bytes(image: Any) -> bytes:
    """A PIL image re-encoded losslessly, so that it goes through the safe decoder like a file."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class BasePredictor:
    """The shared half of a predictor. A backend sets ``meta`` and calls :meth:`_read_meta`, and implements
    ``probabilities``, ``logits`` and the hooks below (``_is_array``, ``_from_array``, ``_from_decoded``,
    ``_stack``, ``_top``, ``_file_run``)."""
    backend = "none"
    meta: Any

    def _read_meta(self, meta: Any) -> None:
        """What prediction reads of a model's metadata (``ModelMeta`` or ``OnnxModelInfo``)."""
        self.meta = meta
        self.classes: list[str] = list(meta.classes)
        self.image_size = int(meta.image_size)
        self.channels = int(meta.channels)
        self.tta_flip = meta.tta_flip
        # temperature scaling recorded with the model (1.0: none): probabilities are softmax(logits / T), so
        # predict, serve, explain and eval's calibrated numbers all get the same scores; logits() stays raw
        self.temperature = meta.temperature
        # multilabel: one sigmoid per label and a decision threshold per label (the metadata, or set_thresholds)
        self.multilabel = meta.task == "multilabel"
        self.thresholds: list[float] | None = parse_thresholds(None, self.classes, meta.thresholds) \
            if self.multilabel else None
        # "unknown": the out-of-distribution score (inference.unknown, imgrec.infer.ood) and the threshold below
        # which an image is answered "unknown" (set_accept_rate changes it, or turns it off)
        self.unknown: dict | None = meta.unknown
        self.unknown_threshold: float | None = float(self.unknown["threshold"]) if self.unknown else None

    @property
    def name(self) -> str:
        return self.meta.name

    # -- inputs --------------------------------------------------------------------------------
    def load_image(self, image: ImageLike) -> Any:
        """One image → C×H×W uint8 in the model's channels. Files, bytes and PIL images go through imgrec's
        safe decoder at the model's size; arrays are checked and converted by the backend."""
        if self._is_array(image):
            return self._from_array(image)
        if _is_pil(image):
            image = _png_bytes(image)
        from imgrec.data.decode import decode_image
        return self._from_decoded(decode_image(image, channels=self.channels, size=self.image_size))

    def _is_array(self, image: Any) -> bool:
        return isinstance(image, np.ndarray)

    def _from_array(self, image: Any) -> Any:
        raise NotImplementedError

    def _from_decoded(self, hwc: np.ndarray) -> Any:
        """The safe decoder's H×W×C uint8 array at the model's size → this backend's C×H×W."""
        raise NotImplementedError

    # -- outputs -------------------------------------------------------------------------------
    def logits(self, batch_uint8: Any, batch_size: int = 256) -> Any:
        raise NotImplementedError

    def probabilities(self, batch_uint8: Any, batch_size: int = 256) -> Any:
        raise NotImplementedError

    def scored(self, batch_uint8: Any, batch_size: int = 256) -> tuple[Any, np.ndarray | None]:
        """Probabilities and, when the model answers "unknown", each image's out-of-distribution score
        (higher: more like the training images), from one forward pass; ``(probabilities, None)`` otherwise."""
        return self.probabilities(batch_uint8, batch_size), None

    def set_accept_rate(self, rate: float | None) -> float | None:
        """The share of in-distribution images to answer (the rest: "unknown"), as measured on the validation
        split: the threshold is read off the stored quantiles. ``None`` turns "unknown" off. Returns the
        threshold now in force."""
        if rate is None:
            self.unknown_threshold = None
            return None
        if not self.unknown:
            raise ConfigError(f"{self.name} has no out-of-distribution score to answer \"unknown\" with "
                              "(retrain it with imgrec ≥ this version, or without --no-unknown)")
        if not 0.0 < rate <= 1.0:
            raise ConfigError(f"--accept-rate must be in (0, 1], got {rate}")
        from imgrec.infer.ood import threshold_from_table
        table = self.unknown.get("val_quantiles")
        self.unknown_threshold = threshold_from_table(table, rate) if table else float(self.unknown["threshold"])
        return self.unknown_threshold

    def mark_unknown(self, answers: list[list[dict]], ood: np.ndarray | None) -> list[dict]:
        """Per image: ``{"unknown": bool, "ood_score": float}`` (empty dicts when "unknown" is off); the
        top-k answers are kept either way, so a caller can still show what the model would have said."""
        if ood is None or self.unknown_threshold is None:
            return [{} for _ in answers]
        return [{"unknown": bool(s < self.unknown_threshold), "ood_score": float(s)} for s in np.asarray(ood)]

    def set_thresholds(self, spec) -> list[float]:
        """Override a multi-label model's decision thresholds: a number for every label, ``{label: number}``,
        or ``"label=number"`` strings (imgrec.infer.multilabel.parse_thresholds); returns the new ones."""
        if not self.multilabel:
            raise ConfigError(f"{self.name} is a single-label model: thresholds apply to multi-label models")
        self.thresholds = parse_thresholds(spec, self.classes, self.thresholds)
        return self.thresholds

    def topk(self, probs: Any, top_k: int = 5) -> list[list[dict]]:
        """``[{"label", "score"}]`` per row, highest score first. A multi-label model gives every label at or
        above its threshold instead (``top_k`` does not apply)."""
        if self.multilabel:
            return select_labels(probs, self.classes, self.thresholds)
        k = max(1, min(int(top_k), len(self.classes)))
        scores, idx = self._top(probs, k)
        return [[{"label": self.classes[j], "score": float(s)} for s, j in zip(srow, irow)]
                for srow, irow in zip(scores, idx)]

    def _top(self, probs: Any, k: int) -> tuple[list[list[float]], list[list[int]]]:
        """The ``k`` highest scores of each row and their class indices, highest first."""
        raise NotImplementedError

    def _stack(self, images: list) -> Any:
        """Images of one shape from :meth:`load_image` → an N×C×H×W batch of this backend's type."""
        raise NotImplementedError

    def predict(self, images: ImageLike | Iterable[ImageLike], top_k: int = 5, batch_size: int = 64):
        """Top-k ``[{"label", "score"}]`` sorted by score; a list of such lists when given a list of images."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if top_k < 1:
            raise ConfigError("top_k must be at least 1")
        arrays = [self.load_image(im) for im in items]
        probs = np.empty((len(arrays), len(self.classes)), np.float32)
        by_shape: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):  # arrays of other sizes are resized in the graph, one size at a time
            by_shape.setdefault(tuple(a.shape), []).append(i)
        for idx in by_shape.values():
            probs[idx] = np.asarray(self.probabilities(self._stack([arrays[i] for i in idx]), batch_size))
        out = self.topk(probs, top_k)
        return out[0] if single else out

    def predict_files(self, paths: Iterable[str | os.PathLike], top_k: int = 5, batch_size: int = 64,
                      on_bad_image: str = "fail", warn: bool = True,
                      decode_threads: int | None = None) -> FilePredictions:
        """Predict image files and folders (searched recursively), ``batch_size`` images per forward pass.

        Files are decoded by ``decode_threads`` threads (None: one per core; 0: one after the other in this
        thread) while the model runs on the batches before (imgrec.infer.files). On a CPU several batches run
        at once, each single-threaded (``imgrec.infer.files.cpu_streams``: one per thread of the model, up to
        4; the backend's ``_file_run`` says how), and large images go through in passes of fewer than
        ``batch_size`` (``cpu_pass_size``: 8 at 224 px). ``on_bad_image="fail"`` raises ImageDecodeError
        naming the first unreadable file; ``"skip"`` leaves it out (listed in ``.skipped``, and warned about
        on stderr when ``warn``) and goes on with the rest. Each result has ``input_notes``: how that image
        differs much from the training images (imgrec.infer.inputs).
        """
        files = check_file_options(paths, top_k, batch_size, on_bad_image)
        out = FilePredictions()
        with self._file_run(batch_size) as (scored, streams, pass_size):
            def run(items: list) -> tuple[list[list[dict]], list[list[str]], list[dict]]:
                probs, ood = scored(self._stack([a for a, _ in items]))
                answers = self.topk(probs, top_k)
                return answers, [n for _, n in items], self.mark_unknown(answers, ood)

            batches = decoded_batches(files, decode_with_notes(self.load_image, self.meta), pass_size,
                                      on_bad_image, out, warn, decode_threads, ahead=streams + 1)
            for kept, (preds, notes, flags) in run_batches(batches, run, streams):
                add_results(out, kept, preds, notes, flags)
        return out

    def _file_run(self, batch_size: int) -> ContextManager[FileRun]:
        """How ``predict_files`` runs batches (``scored`` of a stacked batch, streams, images per pass): one at
        a time, ``batch_size`` images each (a backend on a CPU runs several side by side)."""
        return _one_stream(self, batch_size)


@contextlib.contextmanager
def _one_stream(predictor: BasePredictor, batch_size: int) -> Iterator[FileRun]:
    yield predictor.scored, 1, batch_size
