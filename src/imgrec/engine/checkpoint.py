"""The model directory (weights + everything prediction needs) and resumable training checkpoints.

A run directory ``runs/<name>/`` is also a model directory:

    model.json            architecture, classes, input size, channels, mean/std, config, metrics, version
    best.safetensors      weights with the best validation accuracy (what predict/eval/serve load)
    last.safetensors      weights after the last epoch
    checkpoint.safetensors  resumable training state (optimizer, scheduler, EMA, RNG …), no pickle
    config.yaml           the resolved training config
    metrics.csv           per-epoch train/val loss and accuracy, learning rate, speed

Every file is written atomically (see imgrec.safeio), so a crash never leaves a half-written file in place.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import imgrec
from imgrec.errors import ModelFileError
from imgrec.safeio import atomic_write_json, load_state_dict_strict, load_weights, save_weights

FORMAT = "imgrec-model"
FORMAT_VERSION = 1
META_NAME = "model.json"
WEIGHT_FILES = {"best": "best.safetensors", "last": "last.safetensors"}
CHECKPOINT_NAME = "checkpoint.safetensors"
REQUIRED = ("model", "classes", "image_size", "channels", "mean", "std")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the underlying module (unwrapping torch.compile's and EMA's wrappers)."""
    model = getattr(model, "_orig_mod", model)
    return model.state_dict()


def write_weights(run_dir: str | Path, which: str, model: torch.nn.Module) -> Path:
    path = Path(run_dir) / WEIGHT_FILES[which]
    save_weights(path, model_state(model), metadata={"format": FORMAT, "imgrec_version": imgrec.__version__})
    return path


def write_meta(run_dir: str | Path, meta: dict[str, Any]) -> Path:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "imgrec_version": imgrec.__version__,
            "weights": dict(WEIGHT_FILES), **meta}
    path = Path(run_dir) / META_NAME
    atomic_write_json(path, meta)
    return path


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """Read and check ``model.json``; a clear ModelFileError for anything missing or malformed."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelFileError(f"{model_dir}: no such model directory")
    if not model_dir.is_dir():
        raise ModelFileError(f"{model_dir}: a model is a directory holding {META_NAME} and weights")
    path = model_dir / META_NAME
    if not path.is_file():
        raise ModelFileError(f"{model_dir}: missing {META_NAME} (not an imgrec model directory)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: unreadable model metadata ({str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not imgrec model metadata")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ModelFileError(f"{path}: model metadata lacks {', '.join(missing)}")
    if not isinstance(meta["model"], dict) or "name" not in meta["model"]:
        raise ModelFileError(f"{path}: model metadata lacks the architecture name")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(f"{path}: written by a newer imgrec (format {meta['format_version']}); upgrade imgrec")
    return meta


def weights_path(model_dir: str | Path, meta: dict, which: str = "best") -> Path:
    names = meta.get("weights") or WEIGHT_FILES
    if which not in names:
        raise ModelFileError(f"{model_dir}: no {which!r} weights (have: {', '.join(names)})")
    name = str(names[which])
    # only a plain file name inside the model directory: metadata must not point elsewhere on disk
    if Path(name).name != name or name in ("", ".", ".."):
        raise ModelFileError(f"{model_dir}: bad weights file name {name!r} in {META_NAME}")
    return Path(model_dir) / name


def build_model(meta: dict) -> torch.nn.Module:
    from imgrec.models import create_model

    spec = meta["model"]
    kwargs = dict(spec.get("kwargs") or {})
    kwargs.setdefault("num_classes", len(meta["classes"]))
    kwargs.setdefault("in_chans", int(meta["channels"]))
    kwargs.setdefault("image_size", int(meta["image_size"]))
    return create_model(spec["name"], **kwargs)


def load_model_dir(model_dir: str | Path, which: str = "best") -> tuple[torch.nn.Module, dict]:
    """Build the architecture named in ``model.json`` and load its weights strictly. Nothing is unpickled."""
    meta = read_meta(model_dir)
    model = build_model(meta)
    path = weights_path(model_dir, meta, which)
    state = load_weights(path)
    load_state_dict_strict(model, state, str(path))
    model.eval()
    return model, meta
