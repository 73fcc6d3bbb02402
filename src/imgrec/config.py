"""Typed settings for data, model and training; YAML in, YAML out (the resolved config is saved with every run).

Precedence, lowest first: the dataclass defaults, a ``--recipe`` (see ``imgrec.engine.recipes``),
a ``--config`` YAML file, then explicit command-line options.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgrec.errors import ConfigError
from imgrec.safeio import load_yaml_text, read_text_file


@dataclass
class DataConfig:
    data: str = "fashion-mnist"        # named dataset, image folder, or CSV list
    data_dir: str | None = None        # where named datasets' IDX files are (else searched, else downloaded)
    image_size: int | None = None      # square side in pixels; None = the data's own (28 for the MNIST family, 32 for files)
    channels: int | None = None        # 1 or 3; None = the data's own
    val_split: float | None = None     # fraction (<1) or count (≥1) carved from training data; None = 5000 / 0.1
    split_seed: int = 0                # fixes the validation split independently of the training seed
    val_files: list[str] | None = None # the validation split as files (relative to the data source), when it was
                                       # held out by groups of similar images (imgrec.engine.transfer); None = carved
                                       # at random by val_split
    train_limit: int | None = None     # use only the first N training images (quick experiments, tests)
    long_tail: float | None = None     # experiments: keep a long-tailed subset of train and val, class i keeping
                                       # ratio^(-i/(K-1)) of its images (1 … 1/ratio; imgrec.data.imbalance)
    on_bad_image: str = "fail"         # fail | skip
    stream: bool | None = None         # packed data: True streams the shards, False loads them; None = in memory
                                       # when the decoded size fits (imgrec.data.stream.choose_stream)
    stream_workers: int | None = None  # streaming DataLoader worker processes; None = 0 on ≤2 cores, else ≤4
    task: str | None = None            # classification | multilabel; None = detected (multilabel: a CSV whose
                                       # label cells hold several labels separated by ';')


@dataclass
class ModelConfig:
    name: str = "fastnet"
    pretrained: bool = False           # torchvision ImageNet weights for this architecture
    weights: str | None = None         # a local state dict to start from (safetensors or weights-only .pt)
    freeze_backbone: bool = False      # train only the classifier head
    probe: bool | None = None          # first fit the classifier on the frozen backbone's features (L-BFGS,
                                       # seconds); None = when starting from pretrained weights
    kwargs: dict[str, Any] = field(default_factory=dict)   # extra architecture arguments


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128              # the global batch, shared by all processes (imgrec.engine.distributed)
    lr: float = 2e-3                   # peak learning rate
    optimizer: str = "adamw"           # sgd (nesterov) | adam | adamw | muon (convolution filters; SGD for the rest)
    momentum: float = 0.9
    muon_lr: float = 0.2               # optimizer muon: peak step of the filters, relative to their norm
    weight_decay: float = 5e-4
    scheduler: str = "onecycle"        # onecycle | cosine | linear | none
    warmup: float = 0.2                # fraction of all steps spent warming up (onecycle, cosine, linear)
    label_smoothing: float = 0.1
    crop_padding: int | None = None    # random-crop padding in pixels; None = size // 14 (2 px at 28 px)
    flip: bool | None = None           # horizontal flips; None = the dataset's default (off for digits)
    flip_order: str = "random"         # random (each epoch draws anew) | alternate (each image mirrored every other epoch)
    ema: float | None = None           # EMA decay per step for the evaluated weights, or None
    tta_flip: bool = False             # average predictions over the image and its mirror at evaluation
    grad_clip: float | None = None     # max gradient norm, or None
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N | mps
    amp: str = "auto"                  # auto | bf16 | fp16 | none
    channels_last: bool | None = None  # None = auto (on for CNNs)
    compile: bool = False              # torch.compile the model (pays off only on long runs)
    patience: int | None = None        # early stopping: epochs without val improvement
    deterministic: bool = False        # deterministic algorithms; same seed → identical losses
    eval_batch_size: int = 1024
    threads: int | None = None         # CPU threads; None = all cores
    checkpoint_every: int = 0          # also checkpoint every N steps (0 = at epoch ends only)
    val_last: int = 0                  # validate only the last N epochs (0 = every epoch); best is chosen among them
    sync_bn: bool = False              # several CUDA processes: BatchNorm statistics of the global batch
    # class imbalance (imgrec.data.imbalance); all off by default
    class_weights: str | None = None   # none | auto (= effective) | inverse | effective | a JSON/YAML/CSV file
    class_weight_beta: float = 0.999   # β of the effective number of samples (Cui et al. 2019)
    sampler: str = "shuffle"           # shuffle | balanced (classes drawn uniformly, images with replacement)
    logit_adjust: float | str = 0.0    # τ of post-hoc logit adjustment at prediction (Menon et al. 2021); 0 = off;
                                       # "auto" = the τ in 0…2 with the best validation balanced accuracy
    best_metric: str = "auto"          # acc | balanced_acc | macro_f1 on validation picks the best epoch;
                                       # auto = balanced_acc when an imbalance option is on, else acc
    reweight_from: float = 0.0         # deferred re-weighting (Cao et al. 2019): class_weights apply from this
                                       # fraction of the epochs on (0 = from the start; 0.7 = the last 30%)
    logit_adjust_loss: float = 0.0     # τ of the logit-adjusted training loss (Menon et al. 2021); 0 = off
    time_budget: float | None = None   # seconds of training: the epochs are set from the first epoch's speed
                                       # to fit, and training stops at an epoch end when the time is up
    calibrate: bool = True             # fit a temperature T (unitless, > 0) on the validation split after
                                       # training; probabilities become softmax(logits / T) (single-label only)
    unknown: bool = True               # fit an out-of-distribution score after training and answer "unknown"
                                       # below a threshold chosen on the validation split (single-label only)
    accept_rate: float = 0.95          # share of validation images the "unknown" threshold answers (0..1]
    tensorboard: str = "auto"          # auto | on | off: event files in <run>/tensorboard/ (auto: when the
                                       # tensorboard package is installed)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str | None = None          # the named recipe applied (imgrec.engine.recipes), if any
    recipe_reason: str | None = None   # why: chosen by hand, or what this machine has
    data_recipe: dict | None = None    # what the default recipe changed for this data, and why
                                       # ({"reason": ..., "changes": {...}}; imgrec.engine.recipes.adapt_to_data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        cfg = cls()
        cfg.update(d, source="config")
        return cfg

    def update(self, d: dict, source: str = "config") -> None:
        """Apply nested ``{"train": {"lr": ...}}`` or flat ``{"lr": ...}`` overrides, checking every key."""
        for key, value in (d or {}).items():
            if key in ("recipe", "recipe_reason", "data_recipe"):
                setattr(self, key, value)
                continue
            if key in ("data", "model", "train") and isinstance(value, dict):
                section = getattr(self, key)
                for k, v in value.items():
                    _set(section, k, v, f"{source}: {key}.{k}")
                continue
            section = _section_for(self, key)
            if section is None:
                raise ConfigError(f"{source}: unknown setting {key!r}")
            _set(section, key, value, f"{source}: {key}")


def _section_for(cfg: RunConfig, key: str):
    for s in (cfg.train, cfg.data, cfg.model):
        if key in {f.name for f in dataclasses.fields(s)}:
            return s
    return None


def _set(section, key, value, where) -> None:
    names = {f.name: f for f in dataclasses.fields(section)}
    if key not in names:
        raise ConfigError(f"{where}: unknown setting")
    setattr(section, key, value)


TENSORBOARD_MISSING = ("tensorboard is on, but the tensorboard package is not installed: "
                       "pip install 'imgrec[tensorboard]'")

MAX_CONFIG_BYTES = 1 << 20  # a run config is a few hundred bytes; nothing legitimate comes near 1 MB


def load_yaml(path: str | Path) -> dict:
    """A config file as a dict: at most 1 MB, plain YAML without aliases, nested at most 64 levels, a mapping
    at the top (imgrec.safeio's bounded readers)."""
    head = "cannot read config"
    d = load_yaml_text(read_text_file(path, head, limit=MAX_CONFIG_BYTES), str(path), head)
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config file must be a mapping")
    return d


def _number_kinds(tp: Any) -> tuple[set, bool]:
    """(the number types a field's annotation allows, whether it allows anything else but None)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    kinds = {a for a in args if a in (int, float)}
    return kinds, any(a not in (int, float, type(None)) for a in args)


def _validate_numbers(cfg: RunConfig) -> None:
    """Every number field holds a finite number of its type: NaN passes every ``x <= 0`` check below (``--lr
    nan`` trained on NaN, ``--val-split nan`` failed deep in the split), and a config's ``epochs: "many"``
    failed with a traceback."""
    for section in (cfg.data, cfg.model, cfg.train):
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            kinds, other = _number_kinds(hints[f.name])
            v = getattr(section, f.name)
            if not kinds or v is None or (other and not isinstance(v, (int, float))):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{f.name} must be a number, got {str(v)[:40]!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name} must be a finite number, got {v}")
            if float not in kinds and isinstance(v, float) and not v.is_integer():
                raise ConfigError(f"{f.name} must be a whole number, got {v}")


def validate(cfg: RunConfig) -> None:
    _validate_numbers(cfg)
    t = cfg.train
    choices = {"optimizer": ("sgd", "adam", "adamw", "muon"), "scheduler": ("onecycle", "cosine", "linear", "none"),
               "flip_order": ("random", "alternate"), "amp": ("auto", "bf16", "fp16", "none")}
    for k, allowed in choices.items():
        if getattr(t, k) not in allowed:
            raise ConfigError(f"{k} must be one of {', '.join(allowed)}, got {getattr(t, k)!r}")
    if cfg.data.task not in (None, "classification", "multilabel"):
        raise ConfigError(f"task must be classification or multilabel, got {cfg.data.task!r}")
    if cfg.data.on_bad_image not in ("fail", "skip"):
        raise ConfigError(f"on_bad_image must be fail or skip, got {cfg.data.on_bad_image!r}")
    for k in ("batch_size", "eval_batch_size"):
        if int(getattr(t, k)) < 1:
            raise ConfigError(f"{k} must be at least 1")
    m = cfg.model
    probe = m.probe if m.probe is not None else bool(m.pretrained or m.weights)
    if int(t.epochs) < 0 or (int(t.epochs) == 0 and not probe):
        raise ConfigError("epochs must be at least 1 (0 only when a linear probe fits the classifier: "
                          "with --pretrained or --weights)")
    if t.lr <= 0:
        raise ConfigError("lr must be positive")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError("label_smoothing must be in [0, 1)")
    if t.ema is not None and not 0 < t.ema < 1:
        raise ConfigError("ema must be a decay in (0, 1)")
    if cfg.data.channels not in (None, 1, 3):
        raise ConfigError("channels must be 1 or 3")
    if cfg.data.val_split is not None and cfg.data.val_split <= 0:
        raise ConfigError("val_split must be positive")
    _validate_answers(t)
    _validate_ranges(cfg)
    _validate_tensorboard(t)
    _validate_imbalance(t)
    if t.time_budget is not None and not (isinstance(t.time_budget, (int, float)) and t.time_budget > 0):
        raise ConfigError(f"time_budget must be a positive number of seconds, got {t.time_budget!r}")
    if cfg.data.long_tail is not None and not cfg.data.long_tail >= 1:
        raise ConfigError(f"long_tail must be an imbalance ratio ≥ 1, got {cfg.data.long_tail}")


# (low, high, what) of the whole-number settings that have a sane range: a negative seed, or an image size or
# batch of 999999999999 (accepted, then allocated) are refused in one line before any data is read
INT_RANGES = {
    "seed": (0, 2**32 - 1, "a seed"), "split_seed": (0, 2**32 - 1, "a seed"),
    "image_size": (16, 512, "pixels (what the model registry builds)"),
    "batch_size": (1, 65536, "images"), "eval_batch_size": (1, 65536, "images"),
    "threads": (1, 1024, "CPU threads"), "patience": (0, 100_000, "epochs (0: no early stopping)"),
    "crop_padding": (0, 256, "pixels"), "val_last": (0, 100_000, "epochs"), "checkpoint_every": (0, 10**9, "steps"),
    "stream_workers": (0, 256, "processes"), "train_limit": (1, 10**10, "images"),
}
TIME_BUDGET_MAX = 366 * 24 * 3600.0  # a year of training, in seconds


def _validate_ranges(cfg: RunConfig) -> None:
    """Numbers inside the ranges imgrec can use (their types were checked by _validate_numbers)."""
    t = cfg.train
    for key, (low, high, what) in INT_RANGES.items():
        v = getattr(cfg.data if hasattr(cfg.data, key) else t, key)
        if v is not None and not low <= v <= high:
            raise ConfigError(f"{key} must be between {low} and {high} {what}, got {v}")
    if not 0 <= t.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {t.momentum}")
    if isinstance(t.time_budget, (int, float)) and t.time_budget > TIME_BUDGET_MAX:
        raise ConfigError(f"time_budget must be at most {TIME_BUDGET_MAX:.0f} seconds (a year), got {t.time_budget!r}")


def _validate_answers(t: TrainConfig) -> None:
    """The choices made after training: the temperature and the "unknown" answer."""
    if not isinstance(t.calibrate, bool):
        raise ConfigError(f"calibrate must be true or false, got {t.calibrate!r}")
    if not isinstance(t.unknown, bool):
        raise ConfigError(f"unknown must be true or false, got {t.unknown!r}")
    if isinstance(t.accept_rate, bool) or not isinstance(t.accept_rate, (int, float)) or not 0 < t.accept_rate <= 1:
        raise ConfigError(f"accept_rate must be in (0, 1], got {t.accept_rate!r}")


def _validate_imbalance(t: TrainConfig) -> None:
    """Class weights, the balanced sampler, the best-epoch metric and the logit adjustments, and the
    combinations of them that would correct for the class prior twice."""
    cw = str(t.class_weights if t.class_weights is not None else "none")
    if cw.lower() not in ("none", "auto", "inverse", "effective") and not Path(cw).is_file():
        raise ConfigError(f"class_weights must be auto, inverse, effective, none or a weights file; {cw!r} is "
                          f"none of them (no such file)")
    if not 0 <= t.class_weight_beta < 1:
        raise ConfigError(f"class_weight_beta must be in [0, 1), got {t.class_weight_beta}")
    if t.sampler not in ("shuffle", "balanced"):
        raise ConfigError(f"sampler must be shuffle or balanced, got {t.sampler!r}")
    if t.best_metric not in ("auto", "acc", "balanced_acc", "macro_f1"):
        raise ConfigError(f"best_metric must be one of auto, acc, balanced_acc, macro_f1, got {t.best_metric!r}")
    if t.logit_adjust != "auto" and not (isinstance(t.logit_adjust, (int, float)) and 0 <= t.logit_adjust < 100):
        raise ConfigError(f"logit_adjust must be auto or a number τ ≥ 0 (1 is Menon et al.'s), got {t.logit_adjust!r}")
    # post-hoc adjustment removes the training prior from a model trained on the natural class frequencies;
    # re-weighted or re-sampled training already changed that prior, and subtracting it again over-corrects
    if t.logit_adjust and (t.sampler == "balanced" or str(t.class_weights or "none").lower() != "none"):
        raise ConfigError("logit_adjust corrects a model trained on the natural class frequencies: use it "
                          "without class_weights and sampler balanced")
    if not (isinstance(t.reweight_from, (int, float)) and 0 <= t.reweight_from < 1):
        raise ConfigError(f"reweight_from must be a fraction of the epochs in [0, 1), got {t.reweight_from!r}")
    if t.reweight_from and str(t.class_weights or "none").lower() == "none":
        raise ConfigError("reweight_from defers the class weights: give class_weights too (e.g. auto)")
    if not (isinstance(t.logit_adjust_loss, (int, float)) and 0 <= t.logit_adjust_loss < 100):
        raise ConfigError(f"logit_adjust_loss must be a number τ ≥ 0 (1 is Menon et al.'s), "
                          f"got {t.logit_adjust_loss!r}")
    # the adjusted loss already trains for the balanced error: adjusting again at prediction, or re-weighting /
    # re-sampling as well, corrects twice
    if t.logit_adjust_loss and (t.logit_adjust or t.sampler == "balanced"
                                or str(t.class_weights or "none").lower() != "none"):
        raise ConfigError("logit_adjust_loss already corrects for the class prior: use it without logit_adjust, "
                          "class_weights and sampler balanced")


def _validate_tensorboard(t: TrainConfig) -> None:
    if isinstance(t.tensorboard, bool):  # YAML 1.1 reads a bare `tensorboard: off` as false
        t.tensorboard = "on" if t.tensorboard else "off"
    if t.tensorboard not in ("auto", "on", "off"):
        raise ConfigError(f"tensorboard must be auto, on or off, got {t.tensorboard!r}")
    # said now rather than after the data has loaded; find_spec looks for the package without importing it
    if t.tensorboard == "on" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(TENSORBOARD_MISSING)
