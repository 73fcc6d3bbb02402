"""The prediction runtime: model directory → module on a device, the precision to run it in, and the one
forward pass. Training (imgrec.engine) and prediction (Classifier, the server, eval, report) both use it,
so ``train``, ``eval``, ``predict`` and ``serve`` give the same numbers for the same weights — and nothing
here imports training code.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from imgrec.device import amp_dtype
from imgrec.errors import ConfigError
from imgrec.modeldir import ModelMeta, read_meta
from imgrec.safeio import load_state_dict_strict, load_weights

__all__ = ["autocast", "build_model", "forward_logits", "load_model", "resolve_amp"]


def build_model(meta: ModelMeta) -> torch.nn.Module:
    """The architecture ``meta`` names, with fresh weights."""
    from imgrec.models import create_model
    return create_model(meta.name, **meta.model_kwargs())


def load_model(model_dir: str | Path, which: str = "best") -> tuple[torch.nn.Module, ModelMeta]:
    """Build the architecture named in ``model.json`` and load its weights strictly, in eval mode.
    Nothing is unpickled (safetensors only)."""
    meta = read_meta(model_dir)
    model = build_model(meta)
    path = meta.weights_path(model_dir, which)
    load_state_dict_strict(model, load_weights(path), str(path))
    return model.eval(), meta


def resolve_amp(amp: str, device: torch.device, model_name: str | None = None) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` for this architecture (the registry knows which models
    lose speed in bf16 on a CPU), or None for fp32."""
    gains = True
    if model_name is not None:
        from imgrec.models import model_info
        try:
            gains = model_info(model_name).cpu_bf16
        except ConfigError:
            gains = True
    return amp_dtype(amp, device, gains)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def forward_logits(model: torch.nn.Module, x: torch.Tensor, *, tta_flip: bool = False,
                   amp: torch.dtype | None = None, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits for a normalised batch; with ``tta_flip`` the logits of the image and its mirror are averaged.
    ``logit_bias`` (K, from ``ModelMeta.logit_bias``: post-hoc logit adjustment) is added last, in fp32."""
    with autocast(x.device, amp):
        logits = model(x).float()
        if tta_flip:
            logits = (logits + model(x.flip(3)).float()) / 2
    if logit_bias is not None:
        logits = logits + logit_bias.to(device=logits.device, dtype=torch.float32)
    return logits
