"""The model directory: ``ModelMeta`` (the typed, versioned ``model.json``) and ``RunDir`` (every file name).

This is the one module that reads and writes ``model.json``. A run directory ``runs/<name>/`` is also a
model directory, so ``--model runs/x`` works for eval, predict, serve, report and export:

    model.json              ModelMeta: architecture, task, classes, input size, channels, mean/std, resize
                            policy, inference settings, training summary, imgrec version
    best.safetensors        weights with the best validation accuracy (what predict/eval/serve load)
    last.safetensors        weights after the last epoch
    checkpoint.safetensors  resumable training state (optimizer, scheduler, EMA, RNG …), no pickle
    config.yaml             the resolved training config
    metrics.csv             per-epoch train/val loss and accuracy, learning rate, speed
    ood.safetensors         the "unknown" score's statistics (imgrec.infer.ood), when it needs them
    neighbours.safetensors  training features for the nearest-training-images lookup (imgrec.infer.neighbours)
    tensorboard/            TensorBoard event files (--tensorboard on)
    model.onnx, model.int8.onnx, model.torchscript.pt   what `imgrec export` writes there by default

Every file is written atomically (see imgrec.safeio), so a crash never leaves a half-written file in place.

Format versions: 1 (imgrec 0.1.0, untyped), 2 and 3 (this module) are read. Each file is written as the
oldest format that says everything it holds: 3 for a model with ``inference.logit_adjust`` (post-hoc logit
adjustment: an imgrec that reads only 2 would ignore it and silently predict without it, so it must refuse the
file instead), 2 for every other model. ``inference.temperature`` (temperature scaling) needs no new version:
it divides every row's logits by one positive number, so a reader that ignores it predicts the same labels in
the same order and only shows the uncalibrated scores. A file of a newer or unknown version is refused with one line rather
than misread.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgrec.errors import ModelFileError
from imgrec.safeio import atomic_write_json, read_json_file

# the out-of-distribution scores inference.unknown may name (imgrec.infer.ood computes them)
OOD_SCORES = ("msp", "energy", "knn", "mahalanobis", "mahalanobis_layers")
FEATURE_SCORES = ("knn", "mahalanobis", "mahalanobis_layers")
MAX_META_BYTES = 64 << 20  # model.json: 2,000 classes with their per-class metrics take under 1 MB  # the ones that need the penultimate features and a statistics file

__all__ = ["FORMAT", "FORMAT_VERSION", "ModelMeta", "RunDir", "check_model_kwargs", "read_meta", "refuse_model_file",
           "write_meta"]

FORMAT = "imgrec-model"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

# How images are brought to the model's input size: squashed (no crop) with antialiased bilinear resampling,
# in the decoder (imgrec.data.decode) and for arrays (imgrec.data.transforms.resize_uint8). Exporters and other
# runtimes read this to resize the same way.
RESIZE_POLICY = "squash-bilinear-antialias"

# model.kwargs are architecture arguments (sizes, depths, rates): plain values only. A model.json is a file
# people hand each other, and these go to the model's builder (timm's create_model reads checkpoint_path,
# pretrained_cfg and pretrained_cfg_overlay as files and URLs to load). The timm builder checks its own
# allow-list (models.timm_models.TIMM_ARCH_KWARGS); this check refuses what no architecture argument looks like
# as soon as the file is read, before anything is built.
_MAX_KWARGS = 64
_MAX_KWARG_LIST = 16
_FILE_LIKE_NAMES = ("file", "path", "url", "dir", "checkpoint")


def _file_like(key: str) -> bool:
    """checkpoint_path, cache_dir, pretrained_cfg_overlay, file … (drop_path_rate is a rate, not a path)."""
    k = key.lower()
    return (k in _FILE_LIKE_NAMES or k.startswith(("pretrained", "checkpoint"))
            or k.endswith(tuple("_" + n for n in _FILE_LIKE_NAMES)))


def check_model_kwargs(kwargs: Any, where: str = "model.json") -> dict[str, Any]:
    """``model.kwargs`` as a dict of plain architecture arguments, or a ModelFileError naming the bad key."""
    if not isinstance(kwargs, dict) or len(kwargs) > _MAX_KWARGS:
        raise ModelFileError(f"{where}: model.kwargs must be a mapping of at most {_MAX_KWARGS} arguments")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ModelFileError(f"{where}: model.kwargs: bad argument name {str(key)[:40]!r}")
        if _file_like(key):
            raise ModelFileError(f"{where}: model.kwargs: {key!r} is refused (an argument that names a file, URL "
                                 f"or settings to load is not an architecture argument)")
        plain = isinstance(value, (str, int, float, bool, type(None))) or (
            isinstance(value, list) and len(value) <= _MAX_KWARG_LIST
            and all(isinstance(v, (str, int, float, bool)) for v in value))
        if not plain or (isinstance(value, str) and len(value) > 64):
            raise ModelFileError(f"{where}: model.kwargs: {key!r} must be a number, a short string, a boolean or a "
                                 f"short list of them, got {type(value).__name__}")
    return dict(kwargs)


# "classification": exactly one label per image (softmax, cross-entropy); "multilabel": any subset of the
# labels per image (one sigmoid per label, binary cross-entropy, a decision threshold per label)
TASKS = ("classification", "multilabel")


def check_format_version(where: str, value: Any, *, key: str, newest: int, readable, what: str,
                         unknown: str) -> int:
    """A file's format version ``value`` (its field ``key``) as an int this imgrec reads, or a ModelFileError
    naming ``where``: not a number, newer than ``newest`` (``what`` names the format there), or not one of
    ``readable`` (``unknown`` names it there)."""
    try:
        version = int(value)
    except (TypeError, ValueError):
        raise ModelFileError(f"{where}: bad {key} {value!r}") from None
    if version > newest:
        raise ModelFileError(f"{where}: written by a newer imgrec ({what} {version}, this one reads up to "
                             f"{newest}); upgrade imgrec")
    if version not in readable:
        raise ModelFileError(f"{where}: unknown {unknown} version {version}")
    return version


def _run_file(name: str) -> property:
    """A RunDir property: the path of its file ``name``."""
    return property(lambda self: self.path / name, doc=f"``{name}`` in the run directory")


@dataclass(frozen=True)
class RunDir:
    """The file names of a run (= model) directory; nothing else in imgrec spells them. Every writer takes
    its name from here, so :meth:`run_files` and :meth:`clear` (``--overwrite``) know every file a run left."""
    path: Path

    META = "model.json"
    BEST = "best.safetensors"
    LAST = "last.safetensors"
    CHECKPOINT = "checkpoint.safetensors"
    CONFIG = "config.yaml"
    METRICS = "metrics.csv"
    OOD = "ood.safetensors"                # the "unknown" score's statistics (imgrec.infer.ood)
    NEIGHBOURS = "neighbours.safetensors"  # the nearest-training-images bank (imgrec.infer.neighbours)
    ONNX = "model.onnx"                    # `imgrec export`'s default files (imgrec.infer.export.FORMATS)
    ONNX_INT8 = "model.int8.onnx"
    TORCHSCRIPT = "model.torchscript.pt"
    TENSORBOARD = "tensorboard"            # a folder: TensorBoard's event files
    WEIGHTS = {"best": BEST, "last": LAST}
    EXPORTS = (ONNX, ONNX_INT8, TORCHSCRIPT)
    FILES = (META, CHECKPOINT, CONFIG, METRICS, BEST, LAST, OOD, NEIGHBOURS, *EXPORTS)
    FOLDERS = (TENSORBOARD,)

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    meta = _run_file(META)
    checkpoint = _run_file(CHECKPOINT)
    config = _run_file(CONFIG)
    metrics = _run_file(METRICS)
    ood = _run_file(OOD)
    neighbours = _run_file(NEIGHBOURS)
    onnx = _run_file(ONNX)
    tensorboard = _run_file(TENSORBOARD)

    def weights(self, which: str = "best") -> Path:
        if which not in self.WEIGHTS:
            raise ModelFileError(f"{self.path}: no {which!r} weights (have: {', '.join(self.WEIGHTS)})")
        return self.path / self.WEIGHTS[which]

    def run_files(self) -> list[Path]:
        """Every file a run and the commands that write into its directory (calibrate, export) leave there:
        the named files, and the files now inside the run's folders (``tensorboard/``). What ``--overwrite``
        removes; :meth:`clear` removes the folders too."""
        inside = [f for d in self.FOLDERS if (self.path / d).is_dir() and not (self.path / d).is_symlink()
                  for f in sorted((self.path / d).rglob("*")) if not f.is_dir() or f.is_symlink()]
        return [self.path / n for n in self.FILES] + inside

    def clear(self) -> None:
        """Remove every file and folder of a run (:meth:`run_files`, ``tensorboard/``); nothing else in the
        directory is touched."""
        import shutil
        for f in self.run_files():
            if not f.is_dir() or f.is_symlink():
                f.unlink(missing_ok=True)
        for d in self.FOLDERS:
            if (self.path / d).is_symlink() or (self.path / d).is_file():
                (self.path / d).unlink()
            elif (self.path / d).is_dir():
                shutil.rmtree(self.path / d)

    def owns(self, path: str | Path) -> bool:
        """Whether ``path`` is (or would replace) one of this directory's run files (:meth:`run_files`), through
        whatever links or relative parts name it: an output written there would destroy the model."""
        target = os.path.realpath(path)
        return any(target == os.path.realpath(f) for f in self.run_files()) or \
            any(Path(target).is_relative_to(os.path.realpath(self.path / d)) for d in self.FOLDERS)

    def holds_run(self) -> bool:
        return any((self.path / n).exists() for n in (self.META, self.CHECKPOINT, self.CONFIG))


def refuse_model_file(out: str | Path, model: str | Path, option: str = "--out") -> None:
    """ConfigError when the output ``out`` is one of the model's own files (``model``: its directory, or an
    exported file, whose folder is then the model's)."""
    from imgrec.errors import ConfigError
    model = Path(model)
    owner = RunDir(model if model.is_dir() else model.parent)
    if owner.owns(out) or (not model.is_dir() and os.path.realpath(out) == os.path.realpath(model)):
        raise ConfigError(f"{option} {out}: that is one of the model's own files; write somewhere else")


def default_run_dir(data: str, model: str, root: str | Path = "runs") -> Path:
    """``runs/<data>-<model>``, or the first free ``-2``, ``-3`` … suffix: a new run never lands in an old one."""
    # "timm:resnet18" → "timm-resnet18": a colon is not allowed in Windows paths
    base = f"{Path(data).name or data}-{model}".replace("/", "-").replace(":", "-")
    out = Path(root) / base
    i = 2
    # an empty folder (made by hand, or by an older imgrec's failed start) is free
    while out.exists() and (not out.is_dir() or any(out.iterdir())):
        out = Path(root) / f"{base}-{i}"
        i += 1
    return out


@dataclass
class ModelMeta:
    """Everything prediction needs, and what the training run was. Serialised as ``model.json``.

    Fields: ``model`` (``{"name", "kwargs"}``: the registry name and the architecture arguments),
    ``task`` ("classification": one label per image, softmax; "multilabel": any number of labels per image,
    one sigmoid per class), ``thresholds`` (multilabel only: one decision threshold in 0..1 per class, chosen on
    the validation split to maximise each label's F1; None = 0.5), ``classes`` (index → label), ``image_size`` (square side, px), ``channels``
    (1 or 3), ``mean``/``std`` (per channel, in 0..1 units), ``resize`` (how inputs are resized, see
    RESIZE_POLICY), ``inference`` (``{"tta_flip": bool}``, and ``"logit_adjust": {"tau", "prior"}`` when
    the model predicts with post-hoc logit adjustment, ``"temperature": {"T", ...}`` when its probabilities
    are softmax(logits / T), fitted on the validation split; see imgrec.eval.calibration), ``training`` (recipe and how it was chosen,
    device, precision), ``data`` (source, split counts, validation split and seed), ``config`` (the resolved
    run config), ``metrics`` (best epoch, validation and test numbers), ``train_time_s``.
    """
    model: dict[str, Any]
    classes: list[str]
    image_size: int
    channels: int
    mean: list[float]
    std: list[float]
    task: str = "classification"
    thresholds: list[float] | None = None
    resize: str = RESIZE_POLICY
    inference: dict[str, Any] = field(default_factory=lambda: {"tta_flip": False})
    training: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    train_time_s: float | None = None
    weights: dict[str, str] = field(default_factory=lambda: dict(RunDir.WEIGHTS))
    imgrec_version: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def name(self) -> str:
        return str(self.model["name"])

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model.get("kwargs") or {})

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    @property
    def tta_flip(self) -> bool:
        return bool(self.inference.get("tta_flip", False))

    @property
    def logit_bias(self) -> list[float] | None:
        """Post-hoc logit adjustment (Menon et al. 2021): ``-tau * log(prior)`` per class, added to the logits
        at prediction, from ``inference.logit_adjust = {"tau", "prior"}`` (prior: the training split's class
        frequencies); None when the model has none. The argmax of the adjusted logits approximates the
        classifier that is best under a uniform class prior (balanced error) instead of the training prior."""
        la = self.inference.get("logit_adjust")
        if not la or not float(la.get("tau", 0)):
            return None
        import math
        return [-float(la["tau"]) * math.log(float(p)) for p in la["prior"]]

    @property
    def temperature(self) -> float:
        """Temperature scaling (Guo et al. 2017): single-label probabilities are ``softmax(logits / T)``, from
        ``inference.temperature.T``; 1.0 when the model has none (raw scores) and for multi-label models."""
        entry = self.inference.get("temperature")
        if self.multilabel or not isinstance(entry, dict) or entry.get("T") is None:
            return 1.0
        return float(entry["T"])

    @property
    def unknown(self) -> dict[str, Any] | None:
        """The out-of-distribution answer (imgrec.infer.ood, imgrec.infer.unknown): ``inference.unknown`` =
        ``{"score", "threshold", "accept_rate", "val_quantiles", "file"?}``; an image scoring below the
        threshold is answered "unknown". None when the model has none (and for multi-label models)."""
        entry = self.inference.get("unknown")
        return None if self.multilabel or not isinstance(entry, dict) else entry

    def model_kwargs(self) -> dict[str, Any]:
        """The arguments that rebuild the architecture: ``create_model(meta.name, **meta.model_kwargs())``."""
        kw = self.kwargs
        kw.setdefault("num_classes", len(self.classes))
        kw.setdefault("in_chans", int(self.channels))
        kw.setdefault("image_size", int(self.image_size))
        return kw

    def to_dict(self) -> dict[str, Any]:
        from imgrec import __version__
        d = dataclasses.asdict(self)
        # the oldest format that says everything this model needs: format-2 readers would ignore a logit
        # adjustment (and predict differently), so only models that carry one are written as format 3
        d["format_version"] = FORMAT_VERSION if self.logit_bias is not None else 2
        d["imgrec_version"] = __version__
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: Any, where: str = "model.json") -> "ModelMeta":
        """Check and convert a parsed ``model.json``; a ModelFileError naming ``where`` for anything wrong."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ModelFileError(f"{where}: not imgrec model metadata")
        version = check_format_version(where, d.get("format_version", 1), key="format_version",
                                       newest=FORMAT_VERSION, readable=READABLE_VERSIONS, what="format",
                                       unknown="model format")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise ModelFileError(f"{where}: model metadata lacks {', '.join(missing)}")
        if not isinstance(d["model"], dict) or not isinstance(d["model"].get("name"), str):
            raise ModelFileError(f"{where}: model metadata lacks the architecture name")
        kwargs = check_model_kwargs(d["model"].get("kwargs") or {}, where)
        # every field is read, by the reader its type names (_field_readers); only these two are computed here
        values: dict[str, Any] = {"model": {"name": d["model"]["name"], "kwargs": kwargs}, "format_version": version}
        try:
            for name, read in _field_readers(cls).items():
                if name not in values and name in d:
                    values[name] = read(d[name])
            meta = cls(**values)
        except (TypeError, ValueError, AttributeError, OverflowError) as e:  # OverflowError: int(1e999)
            raise ModelFileError(f"{where}: malformed model metadata ({str(e)[:200]})") from None
        meta.check(where)
        return meta

    def check(self, where: str = "model.json") -> None:
        # an imgrec from before multilabel refuses "multilabel" here in one line (it would misread the sigmoid
        # outputs as softmax), so adding the task needed no new format version
        if self.task not in TASKS:
            raise ModelFileError(f"{where}: task {self.task!r} is not supported by this imgrec")
        if self.thresholds is not None:
            if self.task != "multilabel":
                raise ModelFileError(f"{where}: thresholds are only used by multilabel models")
            if len(self.thresholds) != len(self.classes):
                raise ModelFileError(f"{where}: {len(self.thresholds)} thresholds for {len(self.classes)} classes")
            if not all(0.0 <= t <= 1.0 for t in self.thresholds):
                raise ModelFileError(f"{where}: thresholds must lie in 0..1")
        entry = self.inference.get("temperature")
        if entry is not None:
            # refused in one line here rather than turned into NaN or negative probabilities at prediction
            # (1e-320 divides the logits into infinities; imgrec's fits stay in 0.05..20)
            t = entry.get("T") if isinstance(entry, dict) else None
            if not _number_in(t, *TEMPERATURE_RANGE):
                raise ModelFileError(f"{where}: inference.temperature.T must be a positive number in "
                                     f"{TEMPERATURE_RANGE[0]:g}..{TEMPERATURE_RANGE[1]:g}, got {_short(t)}")
        if self.inference.get("unknown") is not None:
            reason = check_unknown_entry(self.inference["unknown"])
            if reason:
                raise ModelFileError(f"{where}: {reason}")
        la = self.inference.get("logit_adjust")
        if la:
            try:
                tau, prior = float(la["tau"]), [float(p) for p in la["prior"]]
            except (KeyError, TypeError, ValueError, OverflowError):
                raise ModelFileError(f"{where}: inference.logit_adjust needs tau and one prior per class") from None
            if len(prior) != len(self.classes) or not all(0 < p <= 1 for p in prior) or not 0 <= tau < 100:
                raise ModelFileError(f"{where}: inference.logit_adjust needs 0 ≤ tau < 100 and one prior in (0, 1] "
                                     f"per class ({len(self.classes)})")
        if self.channels not in (1, 3):
            raise ModelFileError(f"{where}: channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ModelFileError(f"{where}: mean/std need one value per channel ({self.channels})")
        if not all(_number_in(s, *STD_RANGE) for s in self.std):
            raise ModelFileError(f"{where}: std values must be positive numbers in {STD_RANGE[0]:g}..{STD_RANGE[1]:g} "
                                 f"(in 0..1 pixel units), got {', '.join(_short(s) for s in self.std)}")
        if not all(_number_in(m, *MEAN_RANGE) for m in self.mean):
            raise ModelFileError(f"{where}: mean values must be numbers in {MEAN_RANGE[0]:g}..{MEAN_RANGE[1]:g} "
                                 f"(in 0..1 pixel units), got {', '.join(_short(m) for m in self.mean)}")
        if len(self.classes) < 1:
            raise ModelFileError(f"{where}: no classes")
        head = self.kwargs.get("num_classes", len(self.classes))
        if isinstance(head, bool) or not isinstance(head, int) or head != len(self.classes):
            raise ModelFileError(f"{where}: {len(self.classes)} classes for a head of {_short(head)} outputs")
        if not 1 <= self.image_size <= 4096:
            raise ModelFileError(f"{where}: image_size {self.image_size} out of range")
        for name in self.weights.values():
            # only a plain file name inside the model directory: metadata must not point elsewhere on disk
            if Path(name).name != name or name in ("", ".", ".."):
                raise ModelFileError(f"{where}: bad weights file name {name!r}")

    def weights_path(self, model_dir: str | Path, which: str = "best") -> Path:
        if which not in self.weights:
            raise ModelFileError(f"{model_dir}: no {which!r} weights (have: {', '.join(self.weights)})")
        return Path(model_dir) / self.weights[which]


TEMPERATURE_RANGE = (1e-2, 1e2)  # inference.temperature.T: imgrec's fits stay in 0.05..20
STD_RANGE = (1e-3, 1e3)           # per channel, in 0..1 pixel units (a photo's is about 0.25)
MEAN_RANGE = (-1e3, 1e3)
SCORE_LIMIT = 1e30                # |an "unknown" threshold or quantile|: the scores are sums of squares of unit vectors


def _number_in(v: Any, lo: float, hi: float) -> bool:
    """``v`` is a JSON number (not a boolean) in lo..hi: False for NaN, infinities, and integers too large for a
    float (a 400-digit integer compared as a float raises OverflowError)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return lo <= float(v) <= hi
    except OverflowError:
        return False


def _short(v: Any) -> str:
    """A value for an error line: at most 40 characters (a 400-digit integer is not echoed whole)."""
    r = repr(v) if not isinstance(v, int) or abs(v) < 10 ** 30 else f"an integer of {len(str(abs(v)))} digits"
    return r if len(r) <= 40 else r[:37] + "..."


def check_unknown_entry(entry: Any) -> str | None:
    """The reason ``inference.unknown`` is malformed, or None."""
    if not isinstance(entry, dict):
        return "inference.unknown must be an object"
    if entry.get("score") not in OOD_SCORES:
        return f"inference.unknown.score must be one of {', '.join(OOD_SCORES)}"
    t, rate, table = entry.get("threshold"), entry.get("accept_rate"), entry.get("val_quantiles")
    if not _number_in(t, -SCORE_LIMIT, SCORE_LIMIT):
        return f"inference.unknown.threshold must be a finite number, got {_short(t)}"
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        return "inference.unknown.accept_rate must be in (0, 1]"
    if table is not None and (not isinstance(table, list) or len(table) < 2
                              or not all(_number_in(v, -SCORE_LIMIT, SCORE_LIMIT) for v in table)):
        return "inference.unknown.val_quantiles must be a list of finite numbers"
    name = entry.get("file")
    if entry["score"] in FEATURE_SCORES and (not isinstance(name, str) or "/" in name or "\\" in name
                                             or name in ("", ".", "..")):
        return "inference.unknown.file must be a plain file name in the model directory"
    layers = entry.get("layers")
    if layers is not None and (not isinstance(layers, list) or not all(isinstance(n, str) and n for n in layers)):
        return "inference.unknown.layers must be a list of module names"
    return None


def _reader(tp: Any, where: str) -> Callable[[Any], Any]:
    """The converter from a parsed JSON value to a field's type, as its annotation names it: ``str``, ``int``,
    ``float``, ``bool``, ``list[T]``, ``dict[str, T]`` (``dict[str, Any]`` keeps the values) and ``T | None``.
    Any other annotation is refused when this module is imported, so a new field is never left unread."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _reader(next(a for a in args if a is not type(None)), where)
        return lambda v: None if v is None else inner(v)
    if tp is bool:
        def read_bool(v: Any) -> bool:
            if not isinstance(v, bool):
                raise TypeError(f"expected true or false, got {type(v).__name__}")
            return v
        return read_bool
    if tp in (str, int, float):
        return tp
    if origin is list and len(args) == 1:
        item = _reader(args[0], where)

        def read_list(v: Any) -> list:
            if not isinstance(v, list):  # a string would be read as its characters
                raise TypeError(f"expected a list, got {type(v).__name__}")
            return [item(x) for x in v]
        return read_list
    if origin is dict and len(args) == 2:
        if args[1] is Any:
            return dict
        key, value = _reader(args[0], where), _reader(args[1], where)
        return lambda v: {key(k): value(x) for k, x in v.items()}
    raise TypeError(f"{where}: no reader for the annotation {tp!r}; give model.json a reader for it in _reader")


def _or_default(read: Callable[[Any], Any], default: Callable[[], Any]) -> Callable[[Any], Any]:
    return lambda v: read(v) if v else default()


@functools.cache
def _field_readers(cls: type) -> dict[str, Callable[[Any], Any]]:
    """One reader per dataclass field of ``cls``, built from the fields themselves (a new field is one edit).
    A mapping field given as null or {} gets its default, as model.json files have always been read."""
    hints = typing.get_type_hints(cls)
    readers: dict[str, Callable[[Any], Any]] = {}
    for f in dataclasses.fields(cls):
        read = _reader(hints[f.name], f"{cls.__name__}.{f.name}")
        if typing.get_origin(hints[f.name]) is dict and f.default_factory is not dataclasses.MISSING:
            read = _or_default(read, f.default_factory)
        readers[f.name] = read
    return readers


_field_readers(ModelMeta)  # an unreadable field type fails here, on import, not when a file is read


def read_meta(model_dir: str | Path) -> ModelMeta:
    """Read and check ``model_dir/model.json``; a clear ModelFileError for anything missing or malformed."""
    rd = RunDir(model_dir)
    if not rd.path.exists():
        raise ModelFileError(f"{rd.path}: no such model directory")
    if not rd.path.is_dir():
        raise ModelFileError(f"{rd.path}: a model is a directory holding {RunDir.META} and weights")
    if not rd.meta.is_file():
        raise ModelFileError(f"{rd.path}: missing {RunDir.META} (not an imgrec model directory)")
    # bounded: a size limit, and nesting checked before json.loads recurses (2,000 levels were a
    # RecursionError's traceback, 200,000 a silent exit)
    d = read_json_file(rd.meta, "unreadable model metadata", limit=MAX_META_BYTES, error=ModelFileError)
    return ModelMeta.from_dict(d, str(rd.meta))


def write_meta(model_dir: str | Path, meta: ModelMeta) -> Path:
    """Write ``model.json`` atomically."""
    path = RunDir(model_dir).meta
    atomic_write_json(path, meta.to_dict())
    return path
