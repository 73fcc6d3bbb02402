"""Tensor transforms on whole uint8 batches: resizing, channel conversion, batched augmentation, and ``Preprocess``
— the one place where uint8 pixels become the model's normalised input, for training, ``Classifier``, the
server, the report and export alike.

Why whole batches (airbench's ``batch_flip_lr``/``batch_crop``, timm's PrefetchLoader): on a 2-core CPU the
per-sample Python of a PIL pipeline costs more than a small network's step; one tensor op per batch does not.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from imgrec.errors import DatasetError

__all__ = ["Preprocess", "alternating_flips", "augment_batch", "convert_channels", "resize_uint8"]


class Preprocess:
    """uint8 N×C×H×W pixels → float ``(x / 255 - mean) / std`` on ``device``, optionally channels_last.

    Args:
        mean, std: per channel, in 0..1 units (as ``model.json`` stores them).
        device: where the result lives (the input is moved there first, as uint8: 4× less to copy).
        channels_last: return an NHWC-strided tensor (faster convolutions on CPUs and tensor cores).
        dtype: the result's dtype (float32 unless a caller trains in a lower precision without autocast).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: str | torch.device = "cpu",
                 channels_last: bool = False, dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        c = len(mean)
        # folding the 1/255 into mean and std makes normalisation one subtraction and one division
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=self.device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(list(std), dtype=torch.float32, device=self.device).view(1, c, 1, 1) * 255
        self.channels_last, self.dtype = bool(channels_last), dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.device).to(torch.float32) - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype) if self.dtype != torch.float32 else x


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 N×C×H×W batch with antialiasing, in chunks to bound memory."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for chunk in images.split(4096):
        y = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """1 → 3 channels by replication, 3 → 1 by ITU-R 601 luminance (as Pillow's "L" conversion)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise DatasetError(f"cannot convert {c}-channel images to {channels} channels")


def alternating_flips(seed: int, n: int) -> torch.Tensor:
    """Which of ``n`` images are mirrored in even epochs (they are the others in odd ones): one fair coin per
    image from ``seed`` alone. Alternating flips (Keller Jordan's airbench) show every image both ways in every two
    epochs, where independent coins show ~25% of the images one way only in two epochs; in short runs that buys
    accuracy for nothing (benchmarks/results/fast_search.md)."""
    return torch.rand(n, generator=augment_generator(seed, -1, -1)) < 0.5


def augment_generator(seed: int, epoch: int, *salt: int) -> torch.Generator:
    """The random generator of one batch's augmentation (``salt``: its step): it depends on (seed, epoch, step)
    only, so a resumed run, a streamed run and an in-memory run draw the same crops and flips."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + 7919 * epoch + sum(s * 104_729 for s in salt)) % (2**63))
    return g


def augment_batch(x: torch.Tensor, g: torch.Generator, crop_padding: int = 0, flip: bool = False, *,
                  draw: int | None = None, start: int = 0, flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Random crops from a zero-padded image and random horizontal flips, for a whole uint8 batch at once.

    The randomness comes from ``g`` (a CPU generator), so the same generator state gives the same batch on any
    device — what makes a resumed run identical to an uninterrupted one.
    ``draw``/``start``: ``x`` is rows ``start:start+len(x)`` of a batch of ``draw`` images (one process's share
    of a global batch); the random numbers are drawn for all ``draw`` images, so each image gets the crop and
    flip it would get in one process.
    ``flip_mask``: which rows of ``x`` to mirror (bool, one per row), given instead of drawn (alternating flips).
    """
    n, c, h, w = x.shape
    draw = n if draw is None else int(draw)
    rows = slice(start, start + n)
    if crop_padding:
        p = int(crop_padding)
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (draw,), generator=g)[rows].to(x.device)
        dx = torch.randint(0, 2 * p + 1, (draw,), generator=g)[rows].to(x.device)
        # one slice per distinct offset ((2p+1)² of them) instead of a per-pixel gather: 2-3× faster
        key = dy * (2 * p + 1) + dx
        out = torch.empty_like(x)
        for k in key.unique().tolist():
            idx = (key == k).nonzero().squeeze(1)
            oy, ox = divmod(k, 2 * p + 1)
            out[idx] = padded[idx, :, oy:oy + h, ox:ox + w]
        x = out
    if flip_mask is not None:
        x = torch.where(flip_mask.to(x.device).view(n, 1, 1, 1), x.flip(3), x)
    elif flip:
        mask = (torch.rand(draw, generator=g)[rows] < 0.5).to(x.device).view(n, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    return x
