"""Typed settings for data, model and training; YAML in, YAML out (the resolved config is saved with every run).

Precedence, lowest first: the dataclass defaults, a ``--recipe`` (see ``imgrec.engine.recipes``),
a ``--config`` YAML file, then explicit command-line options.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgrec.errors import ConfigError


@dataclass
class DataConfig:
    data: str = "fashion-mnist"        # named dataset, image folder, or CSV list
    data_dir: str | None = None        # where named datasets' IDX files are (else searched, else downloaded)
    image_size: int | None = None      # square side in pixels; None = the data's own (28 for the MNIST family, 32 for files)
    channels: int | None = None        # 1 or 3; None = the data's own
    val_split: float | None = None     # fraction (<1) or count (≥1) carved from training data; None = 5000 / 0.1
    split_seed: int = 0                # fixes the validation split independently of the training seed
    train_limit: int | None = None     # use only the first N training images (quick experiments, tests)
    on_bad_image: str = "fail"         # fail | skip


@dataclass
class ModelConfig:
    name: str = "fastnet"
    pretrained: bool = False           # torchvision ImageNet weights for this architecture
    weights: str | None = None         # a local state dict to start from (safetensors or weights-only .pt)
    freeze_backbone: bool = False      # train only the classifier head
    kwargs: dict[str, Any] = field(default_factory=dict)   # extra architecture arguments


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3                   # peak learning rate
    optimizer: str = "adamw"           # sgd (nesterov) | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "onecycle"        # onecycle | cosine | linear | none
    warmup: float = 0.2                # fraction of all steps spent warming up (onecycle, cosine, linear)
    label_smoothing: float = 0.1
    crop_padding: int | None = None    # random-crop padding in pixels; None = size // 14 (2 px at 28 px)
    flip: bool | None = None           # horizontal flips; None = the dataset's default (off for digits)
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


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str | None = None          # the named recipe applied (imgrec.engine.recipes), if any
    recipe_reason: str | None = None   # why: chosen by hand, or what this machine has

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
            if key in ("recipe", "recipe_reason"):
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


def load_yaml(path: str | Path) -> dict:
    try:
        d = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config ({str(e).splitlines()[0]})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config file must be a mapping")
    return d


def validate(cfg: RunConfig) -> None:
    t = cfg.train
    choices = {"optimizer": ("sgd", "adam", "adamw"), "scheduler": ("onecycle", "cosine", "linear", "none"),
               "amp": ("auto", "bf16", "fp16", "none")}
    for k, allowed in choices.items():
        if getattr(t, k) not in allowed:
            raise ConfigError(f"{k} must be one of {', '.join(allowed)}, got {getattr(t, k)!r}")
    if cfg.data.on_bad_image not in ("fail", "skip"):
        raise ConfigError(f"on_bad_image must be fail or skip, got {cfg.data.on_bad_image!r}")
    for k in ("epochs", "batch_size", "eval_batch_size"):
        if int(getattr(t, k)) < 1:
            raise ConfigError(f"{k} must be at least 1")
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
