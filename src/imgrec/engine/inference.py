"""The one forward pass used for evaluation and prediction, so ``train``, ``eval``, ``predict`` and
``serve`` produce the same numbers for the same weights."""
from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, *, tta_flip: bool = False,
                   amp: torch.dtype | None = None) -> torch.Tensor:
    """fp32 logits for a normalised batch; with ``tta_flip`` the logits of the image and its mirror are averaged."""
    with autocast(x.device, amp):
        logits = model(x).float()
        if tta_flip:
            logits = (logits + model(x.flip(3)).float()) / 2
    return logits


def logits_in_batches(model, loader, *, tta_flip=False, amp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``predict_logits`` over a BatchLoader; returns (logits N×K on the CPU, labels N)."""
    outs, labels = [], []
    for x, y in loader:
        outs.append(predict_logits(model, x, tta_flip=tta_flip, amp=amp).cpu())
        labels.append(y.cpu())
    return torch.cat(outs), torch.cat(labels)
