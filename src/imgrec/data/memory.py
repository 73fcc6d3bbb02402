"""The in-memory training path: batches drawn from one uint8 tensor, augmented and normalised on the device.

Why not torch's DataLoader with per-sample transforms: for data that fits in memory (all of the MNIST family,
most user folders at small sizes) per-sample Python costs more than the network itself on a 2-core CPU.
Holding one uint8 tensor and cropping/flipping/normalising a whole batch at once (as airbench does) removes it.
"""
from __future__ import annotations

import math

import torch

from imgrec.data.dataset import ImageData
from imgrec.data.transforms import Preprocess, augment_batch

__all__ = ["BatchLoader"]


class BatchLoader:
    """Iterates over an :class:`ImageData` in batches of normalised float tensors, augmenting on the device.

    Augmentation (random crop from a zero-padded image, horizontal flip) is applied to the whole uint8
    batch at once. Randomness comes from a generator seeded by (seed, epoch, step), so any batch can be
    reproduced exactly — which makes a resumed run identical to an uninterrupted one.
    """

    def __init__(self, data: ImageData, batch_size: int, mean, std, *, shuffle: bool = False,
                 crop_padding: int = 0, flip: bool = False, drop_last: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 dtype: torch.dtype = torch.float32):
        self.data = data
        self.batch_size = int(batch_size)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.crop_padding, self.flip = int(crop_padding), bool(flip)
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.preprocess = Preprocess(mean, std, self.device, channels_last=channels_last, dtype=dtype)
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, *salt: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + 7919 * self.epoch + sum(s * 104_729 for s in salt)) % (2**63))
        return g

    def order(self) -> torch.Tensor:
        n = len(self.data)
        return torch.randperm(n, generator=self._generator(-1)) if self.shuffle else torch.arange(n)

    def __iter__(self):
        return self.iterate(start_step=0)

    def iterate(self, start_step: int = 0):
        """Yield (x, y) from batch ``start_step`` of the current epoch onwards."""
        order = self.order().to(self.device)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            x = self.images.index_select(0, idx)
            if self.crop_padding or self.flip:
                x = augment_batch(x, self._generator(step), self.crop_padding, self.flip)
            yield self.preprocess(x), self.labels.index_select(0, idx)
