"""What training writes besides ``model.json``: the weights files of the model directory and the resumable
training checkpoint (optimizer, scheduler, EMA, RNG …), both as safetensors — nothing is ever pickled.
File names come from :class:`imgrec.modeldir.RunDir`; loading weights for prediction is
``imgrec.infer.runtime.load_model``.
"""
from __future__ import annotations

from pathlib import Path

import torch

import imgrec
from imgrec.errors import ModelFileError
from imgrec.modeldir import FORMAT, RunDir
from imgrec.safeio import load_tree, save_tree, save_weights

__all__ = ["load_checkpoint", "model_state", "save_checkpoint", "write_weights"]


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the underlying module (unwrapping torch.compile's wrapper)."""
    model = getattr(model, "_orig_mod", model)
    return model.state_dict()


def write_weights(run_dir: str | Path, which: str, model: torch.nn.Module) -> Path:
    """Write ``best`` or ``last`` weights atomically."""
    path = RunDir(run_dir).weights(which)
    save_weights(path, model_state(model), metadata={"format": FORMAT, "imgrec_version": imgrec.__version__})
    return path


def save_checkpoint(run_dir: str | Path, state: dict) -> Path:
    path = RunDir(run_dir).checkpoint
    save_tree(path, state)
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no checkpoint to resume from")
    return load_tree(path)
