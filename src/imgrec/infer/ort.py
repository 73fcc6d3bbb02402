"""The ONNX Runtime backend: ``OnnxClassifier.load("model.onnx").predict("shoe.jpg")`` with no PyTorch.

A file written by ``imgrec export`` (imgrec.infer.export) is self-contained: its graph takes uint8 pixels and
does the resize, normalisation, network, flip-TTA and softmax, and its ``metadata_props`` carry what
prediction needs (class names, input size, channels, format version). So this module reads everything from
the ONNX file and never imports torch, imgrec.modeldir or imgrec.safeio (which do): a deployment needs
``onnxruntime``, ``onnx``, numpy and Pillow, not the 2 GB of PyTorch.

The graph's interface (also written into the file's metadata as ``input_spec``):

    input   "pixels"         uint8  N×H×W×C   any N, H, W; C = the model's channels (1: gray, 3: R,G,B order)
    output  "probabilities"  float32 N×K      softmax over the K classes (``classes`` metadata, JSON list)
            "logits"         float32 N×K      the network's logits (flip-averaged when the model uses flip-TTA)
                                              (the probabilities are softmax(logits / T), T the ``temperature``
                                              metadata, 1 when absent)

``OnnxClassifier`` decodes files through imgrec's safe decoder at the model's size (exactly the pixels
``Classifier`` gets), so both backends see the same input; the in-graph resize serves other runtimes.
Its ``probabilities``/``logits`` accept what ``Classifier``'s do (N×C×H×W uint8, numpy or torch) and return
the same kind, so ``imgrec eval`` and the server use either backend unchanged.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from imgrec.errors import ConfigError, ImageDecodeError, ModelFileError, first_line
from imgrec.infer.base import BasePredictor, FileRun, as_chw
from imgrec.infer.files import cpu_pass_size, cpu_streams, usable_cores
from imgrec.modeldir import check_format_version

__all__ = ["ONNX_FORMAT", "ONNX_FORMAT_VERSION", "OnnxClassifier", "OnnxModelInfo", "check_external_data",
           "read_onnx_info"]

ONNX_FORMAT = "imgrec-onnx"
ONNX_FORMAT_VERSION = 1
INPUT_NAME, PROBS_NAME, LOGITS_NAME = "pixels", "probabilities", "logits"
OOD_NAME = "ood_score"  # the out-of-distribution score ("unknown" below the metadata's threshold), when exported
INPUT_SPEC = ("pixels: uint8 N×H×W×C (batch, height, width, channels), any N/H/W; C = the model's channels, "
              "RGB order for 3, gray for 1. Outputs: probabilities float32 N×K (softmax), logits float32 N×K. "
              "The graph resizes to image_size × image_size (squash, antialiased bilinear, as imgrec), "
              "normalises with mean/std and applies flip-TTA when tta_flip is true.")
REQUIRED_KEYS = ("imgrec_format", "imgrec_format_version", "classes", "image_size", "channels")


@dataclass
class OnnxModelInfo:
    """What an exported file's metadata says: the ``meta`` of an :class:`OnnxClassifier` (the same attribute
    names as ``ModelMeta`` where they exist, so eval and serve read either)."""
    name: str
    classes: list[str]
    image_size: int
    channels: int
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    tta_flip: bool = False
    temperature: float = 1.0  # the graph's probabilities are softmax(logits / temperature)
    precision: str = "fp32"
    resize: str = ""
    format_version: int = ONNX_FORMAT_VERSION
    imgrec_version: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"   # "multilabel": the graph's probabilities are per-label sigmoids
    thresholds: list[float] | None = None  # multilabel: per-label decision thresholds (None: 0.5)
    unknown: dict[str, Any] | None = None  # {"score", "threshold", "accept_rate", "val_quantiles"}: ood_score


def _declares_external_data(path: Path) -> bool:
    """Whether the file could declare external data, without importing onnx (1.3 s at start-up).

    Protobuf stores strings as their raw bytes, and a tensor's external data is a list of key/value strings in
    which ONNX Runtime needs the key "location"; a file without those eight bytes anywhere points nowhere
    outside itself. A find over a memory map runs at memory speed; ORT reads the whole file next anyway."""
    import mmap
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return False
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return m.find(b"location") >= 0
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror or e})") from None


def _tensors(message) -> Iterable:
    """Every TensorProto anywhere in an ONNX message: initializers, sparse initializers' values and indices,
    node attributes (t, tensors, sparse_tensor(s)), subgraphs and functions — found by walking every message
    field, so a place a future ONNX version adds is walked too."""
    import onnx
    from google.protobuf.message import Message
    stack = [message]
    while stack:
        msg = stack.pop()
        if isinstance(msg, onnx.TensorProto):
            yield msg
        for fd, value in msg.ListFields():
            if fd.type != fd.TYPE_MESSAGE:
                continue
            if isinstance(value, Message):
                stack.append(value)
            else:  # a repeated field of messages
                stack.extend(value)


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse an ONNX file whose tensors live in external files outside its folder (``../x``, ``/etc/x``,
    a symbolic link out of it) before any of them is read; ModelFileError naming the location.

    ONNX Runtime reads external data from the folder of the model path as given (a model reached through a
    symbolic link reads beside the link), so that folder is the boundary, and each location must resolve,
    links followed, to a file inside it."""
    path = Path(path)
    if not _declares_external_data(path):
        return
    try:
        import onnx
    except ModuleNotFoundError as e:
        raise ConfigError(f"the ONNX backend needs {e.name}: pip install 'imgrec[export]'") from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeError, ... for a corrupt file
        raise ModelFileError(f"{path}: not a readable ONNX file ({first_line(e)})") from None
    base = Path(os.path.abspath(path)).parent
    root = os.path.realpath(base)
    for tensor in _tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = os.path.realpath(base / location) if location and "\0" not in location else ""
        if (not location or os.path.isabs(location) or "\\" in location or ".." in Path(location).parts
                or Path(location).drive or not target.startswith(root + os.sep)):
            raise ModelFileError(f"{path}: refused: tensor {tensor.name!r} points to external data outside the "
                                 f"model's folder ({location[:200]!r})")


def read_onnx_info(path: str | os.PathLike, metadata: dict[str, str]) -> OnnxModelInfo:
    """Check and convert an exported file's ``metadata_props``; ModelFileError for anything missing or newer."""
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise ModelFileError(f"{path}: not an imgrec export: its metadata lacks {', '.join(missing)} "
                             f"(export it with `imgrec export`)")
    if metadata["imgrec_format"] != ONNX_FORMAT:
        raise ModelFileError(f"{path}: not an imgrec export (format {metadata['imgrec_format']!r})")
    version = check_format_version(path, metadata["imgrec_format_version"], key="imgrec_format_version",
                                   newest=ONNX_FORMAT_VERSION, readable=range(1, ONNX_FORMAT_VERSION + 1),
                                   what="export format", unknown="export format")
    try:
        classes = json.loads(metadata["classes"])
        info = OnnxModelInfo(
            name=str(metadata.get("model_name", "onnx")),
            classes=[str(c) for c in classes],
            image_size=int(metadata["image_size"]), channels=int(metadata["channels"]),
            mean=[float(v) for v in json.loads(metadata.get("mean", "[]"))],
            std=[float(v) for v in json.loads(metadata.get("std", "[]"))],
            tta_flip=metadata.get("tta_flip", "false") == "true",
            temperature=float(metadata.get("temperature", "1")),
            precision=str(metadata.get("precision", "fp32")), resize=str(metadata.get("resize", "")),
            format_version=version, imgrec_version=str(metadata.get("imgrec_version", "")),
            metrics=dict(json.loads(metadata.get("metrics", "{}"))),
            data=dict(json.loads(metadata.get("data", "{}"))),
            export=dict(json.loads(metadata.get("export", "{}"))),
            task=str(metadata.get("task", "classification")),
            thresholds=None if metadata.get("thresholds") in (None, "null") else
            [float(v) for v in json.loads(metadata["thresholds"])],
            unknown=json.loads(metadata["unknown"]) if metadata.get("unknown") not in (None, "null") else None)
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"{path}: malformed imgrec metadata ({first_line(e)})") from None
    if not isinstance(classes, list) or not info.classes:
        raise ModelFileError(f"{path}: the metadata lists no class names")
    if info.task not in ("classification", "multilabel"):
        raise ModelFileError(f"{path}: task {info.task!r} is not supported by this imgrec")
    if info.thresholds is not None and (len(info.thresholds) != len(info.classes)
                                        or not all(0.0 <= t <= 1.0 for t in info.thresholds)):
        raise ModelFileError(f"{path}: the metadata needs one threshold in 0..1 per class")
    if info.unknown is not None:
        from imgrec.modeldir import check_unknown_entry
        reason = check_unknown_entry({**info.unknown, "file": "graph"})
        if reason:
            raise ModelFileError(f"{path}: the metadata's {reason}")
    if not 0 < info.temperature < float("inf"):
        raise ModelFileError(f"{path}: the metadata's temperature must be a positive number")
    if info.channels not in (1, 3) or not 1 <= info.image_size <= 4096:
        raise ModelFileError(f"{path}: bad channels/image_size in the metadata ({info.channels}, {info.image_size})")
    return info


def _providers(device: str) -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    if device in ("auto", "cuda") or device.startswith("cuda:"):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device != "auto":
            raise ConfigError(f"device {device!r}: this onnxruntime has no CUDA provider (have: {', '.join(available)})")
    elif device != "cpu":
        raise ConfigError(f"device {device!r} is not available with ONNX Runtime (use auto, cpu or cuda)")
    return ["CPUExecutionProvider"]


def _new_session(ort, path: Path, threads: int | None, providers: list):
    """An ONNX Runtime session of ``path`` with ``threads`` intra-op threads (None: ORT's default pool)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    return ort.InferenceSession(str(path), opts, providers=providers)


class OnnxClassifier(BasePredictor):
    """An exported model run by ONNX Runtime, with the prediction API of ``Classifier``
    (imgrec.infer.base.BasePredictor).

    Args:
        path: an ``.onnx`` file written by ``imgrec export``.
        device: "auto" (CUDA when this onnxruntime has it, else CPU), "cpu" or "cuda".
        threads: ONNX Runtime intra-op threads (None: its default, one per physical core).
    """
    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ModuleNotFoundError as e:
            raise ConfigError(f"the ONNX backend needs {e.name}: pip install 'imgrec[export]'") from None
        path = Path(path)
        if not path.exists():
            raise ModelFileError(f"{path}: no such ONNX file")
        if not path.is_file():
            raise ModelFileError(f"{path}: not a file (an exported model is one .onnx file)")
        check_external_data(path)
        try:
            self.session = _new_session(ort, path, threads, _providers(device))
        except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/... types
            raise ModelFileError(f"{path}: ONNX Runtime cannot load it ({first_line(e)})") from None
        self.path = path
        # the temperature is already applied inside the graph; eval reads it
        self._read_meta(read_onnx_info(path, dict(self.session.get_modelmeta().custom_metadata_map)))
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if INPUT_NAME not in inputs or PROBS_NAME not in outputs:
            raise ModelFileError(f"{path}: the graph lacks the '{INPUT_NAME}' input or '{PROBS_NAME}' output")
        self._has_logits = LOGITS_NAME in outputs
        if self.unknown and OOD_NAME not in outputs:  # metadata without the graph output: no "unknown"
            self.unknown, self.unknown_threshold = None, None
        self.device = device
        self.threads = int(threads) if threads else usable_cores()  # ORT's default pool: one thread per core
        self._stream_sessions: dict[int, Any] = {}  # intra-op threads -> a session for predict_files' streams

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", threads: int | None = None) -> "OnnxClassifier":
        return cls(path, device=device, threads=threads)

    # -- inputs: C×H×W uint8 numpy arrays ----------------------------------------------------------
    # Files, bytes and PIL images are decoded at the model's size (the pixels ``Classifier`` gets); arrays
    # keep their size (the graph resizes them as ``Classifier`` resizes arrays).
    def _is_array(self, image: Any) -> bool:
        # numpy, or a CPU torch tensor (which converts without importing torch here)
        return not (isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(image, "read")
                    or hasattr(image, "save") and hasattr(image, "mode"))

    def _from_array(self, image: Any) -> np.ndarray:
        arr = np.asarray(image)
        arr = as_chw(arr, arr.dtype == np.uint8, lambda a: a.transpose(2, 0, 1))
        return np.ascontiguousarray(_convert_channels(arr, self.channels))

    def _from_decoded(self, hwc: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(hwc.transpose(2, 0, 1))

    def _stack(self, images: list) -> np.ndarray:
        return np.stack(images)

    # -- outputs -------------------------------------------------------------------------------
    def _session_for_streams(self, threads: int):
        """A second session of the same file with ``threads`` intra-op threads (made once), for the batches
        ``predict_files`` runs side by side: with one thread each run stays on the thread that calls it, while
        several runs sharing the main session's pool wait for each other's threads."""
        session = self._stream_sessions.get(threads)
        if session is None:
            import onnxruntime as ort
            session = _new_session(ort, self.path, threads, self.session.get_providers())
            self._stream_sessions[threads] = session
        return session

    def _run(self, batch: Any, batch_size: int, output: str, session=None):
        session = session or self.session
        torch_in = type(batch).__module__.startswith("torch")
        arr = batch.numpy() if torch_in else np.asarray(batch)
        self._check_batch(arr)
        k = len(self.classes)
        name = LOGITS_NAME if output == LOGITS_NAME and self._has_logits else PROBS_NAME
        outs = []
        for start in range(0, arr.shape[0], max(1, int(batch_size))):
            pixels = np.ascontiguousarray(arr[start:start + batch_size].transpose(0, 2, 3, 1))
            out = session.run([name], {INPUT_NAME: pixels})[0]
            if output == LOGITS_NAME and not self._has_logits:
                # logits up to a per-row constant (times T: the probabilities are those of logits / T)
                out = np.log(np.maximum(out, np.finfo(np.float32).tiny)) * self.meta.temperature
            outs.append(out.astype(np.float32, copy=False))
        result = np.concatenate(outs) if outs else np.empty((0, k), np.float32)
        if torch_in:
            return sys.modules["torch"].from_numpy(result)
        return result

    def scored(self, batch_uint8: Any, batch_size: int = 256, session=None):
        """Probabilities and the graph's ood_score output, from one run per chunk (numpy, or torch in → torch
        probabilities); ``(probabilities, None)`` when the file has no score or "unknown" is off."""
        if self.unknown_threshold is None:
            return self._run(batch_uint8, batch_size, PROBS_NAME, session), None
        torch_in = type(batch_uint8).__module__.startswith("torch")
        arr = batch_uint8.numpy() if torch_in else np.asarray(batch_uint8)
        self._check_batch(arr)
        session = session or self.session
        probs, ood = [], []
        for start in range(0, arr.shape[0], max(1, int(batch_size))):
            pixels = np.ascontiguousarray(arr[start:start + batch_size].transpose(0, 2, 3, 1))
            p, s = session.run([PROBS_NAME, OOD_NAME], {INPUT_NAME: pixels})
            probs.append(p.astype(np.float32, copy=False))
            ood.append(s.astype(np.float64, copy=False))
        k = len(self.classes)
        p = np.concatenate(probs) if probs else np.empty((0, k), np.float32)
        return (sys.modules["torch"].from_numpy(p) if torch_in else p), \
            (np.concatenate(ood) if ood else np.empty(0))

    def _check_batch(self, arr: np.ndarray) -> None:
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] != self.channels:
            raise ImageDecodeError(f"expected an N×{self.channels}×H×W uint8 batch, got {arr.dtype} "
                                   f"{tuple(arr.shape)}")

    def probabilities(self, batch_uint8: Any, batch_size: int = 256):
        """Softmax probabilities for an N×C×H×W uint8 batch (numpy in → numpy out, torch in → torch out)."""
        return self._run(batch_uint8, batch_size, PROBS_NAME)

    def logits(self, batch_uint8: Any, batch_size: int = 256):
        """Logits for an N×C×H×W uint8 batch (what ``imgrec eval`` uses), the type of the input."""
        return self._run(batch_uint8, batch_size, LOGITS_NAME)

    def _top(self, probs: Any, k: int) -> tuple[list[list[float]], list[list[int]]]:
        probs = np.asarray(probs)
        idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(probs, idx, axis=1).tolist(), idx.tolist()

    def _file_run(self, batch_size: int):
        return _ort_streams(self, batch_size)


@contextlib.contextmanager
def _ort_streams(clf: OnnxClassifier, batch_size: int) -> Iterator[FileRun]:
    """On a CPU, several batches at once (one per thread of the session, up to 4:
    ``imgrec.infer.files.cpu_streams``) on a second session whose runs use one thread each (made on the first
    call), large images in passes of fewer than ``batch_size`` (``cpu_pass_size``)."""
    streams, session = 1, clf.session
    if clf.session.get_providers()[0] == "CPUExecutionProvider":
        streams, each = cpu_streams(clf.threads)
        batch_size = cpu_pass_size(clf.image_size, batch_size)
        if streams > 1:
            session = clf._session_for_streams(each)

    def scored(arrays: np.ndarray):  # ORT sessions may run in several threads
        return clf.scored(arrays, batch_size, session)
    yield scored, streams, batch_size


def _convert_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """C×H×W uint8: 1 → 3 by replication, 3 → 1 by ITU-R 601 luminance (as imgrec.data.transforms does)."""
    c = arr.shape[0]
    if c == channels:
        return arr
    if c == 1 and channels == 3:
        return np.repeat(arr, 3, axis=0)
    w = np.array([0.299, 0.587, 0.114], np.float32).reshape(3, 1, 1)
    return np.clip(np.round((arr.astype(np.float32) * w).sum(0, keepdims=True)), 0, 255).astype(np.uint8)
