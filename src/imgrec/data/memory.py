"""The in-memory training path: batches drawn from one uint8 tensor, augmented and normalised on the device.

Why not torch's DataLoader with per-sample transforms: for data that fits in memory (all of the MNIST family,
most user folders at small sizes) per-sample Python costs more than the network itself on a 2-core CPU.
Holding one uint8 tensor and cropping/flipping/normalising a whole batch at once (as airbench does) removes it.
"""
from __future__ import annotations

import math

import torch

from imgrec.data.dataset import ImageData
from imgrec.data.transforms import Preprocess, alternating_flips, augment_batch, augment_generator
from imgrec.errors import ConfigError

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
                 dtype: torch.dtype = torch.float32, sampler: str = "shuffle", rank: int = 0, world_size: int = 1,
                 shard: str = "batch", flip_order: str = "random"):
        # several processes (rank of world_size): shard "batch" splits every global batch of ``batch_size`` into
        # contiguous per-rank shares (training: the ranks together see exactly the batches one process would);
        # shard "split" gives each rank one contiguous slice of the data (evaluation: every image once, no padding)
        self.rank, self.world_size, self.shard = int(rank), int(world_size), shard
        if self.world_size > 1 and shard == "split":
            if len(data) < self.world_size:
                raise ConfigError(f"{len(data)} images cannot be shared by {self.world_size} processes")
            lo, hi = _share(len(data), self.rank, self.world_size)
            data = data.subset(torch.arange(lo, hi))
        self.data = data
        self.batch_size = int(batch_size)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.crop_padding, self.flip = int(crop_padding), bool(flip)
        if flip_order not in ("random", "alternate"):
            raise ConfigError(f"flip_order must be random or alternate, got {flip_order!r}")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        # "alternate": image i is mirrored in the even epochs if its coin says so and in the odd ones if not; a
        # pure function of (seed, epoch, image), so exact resume and any number of processes see the same flips
        self._flip_base = alternating_flips(seed, len(data)).to(self.device) if flip and flip_order == "alternate" \
            else None
        self.preprocess = Preprocess(mean, std, self.device, channels_last=channels_last, dtype=dtype)
        self.epoch = 0
        # sampler "balanced" (with shuffle): each of the epoch's n draws picks a class uniformly, then one of its
        # images uniformly (with replacement) — class-balanced sampling; the epoch keeps n images so the step
        # count and the learning-rate schedule do not change. The images are grouped by class once here.
        self.sampler = sampler
        self._by_class = None
        if sampler == "balanced" and data.labels.ndim == 1:
            labels = data.labels.cpu().long()
            counts = torch.bincount(labels)
            self._by_class = (torch.argsort(labels, stable=True), torch.cumsum(counts, 0) - counts, counts,
                              (counts > 0).nonzero().flatten())
        if self.world_size > 1 and shard == "batch":
            n, b = len(data), self.batch_size
            last = 0 if drop_last else n % b
            if b < self.world_size or 0 < last < self.world_size:
                raise ConfigError(f"a batch of {min(b, last or b)} images cannot be shared by {self.world_size} "
                                  "processes: use a larger --batch-size, another --train-limit or fewer processes")

    # every process computes the same global batches, so a position (epoch, step) means the same images at any
    # number of processes: a mid-epoch checkpoint resumes exactly on another world size (the trainer asks)
    position_is_global = True

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def global_batch(self, step: int) -> int:
        """Images in global batch ``step`` (all ranks together; the last one may be short)."""
        return min(self.batch_size, len(self.data) - step * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, *salt: int) -> torch.Generator:
        return augment_generator(self.seed, self.epoch, *salt)

    def order(self) -> torch.Tensor:
        n = len(self.data)
        if self.shuffle and self._by_class is not None:
            # a global order from (seed, epoch) alone, like randperm: exact resume holds and ranks can shard it
            by_class, starts, counts, present = self._by_class
            g = self._generator(-1)
            c = present[torch.randint(len(present), (n,), generator=g)]
            offset = (torch.rand(n, generator=g, dtype=torch.float64) * counts[c]).long().minimum(counts[c] - 1)
            return by_class[starts[c] + offset]
        return torch.randperm(n, generator=self._generator(-1)) if self.shuffle else torch.arange(n)

    def _flips(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The alternating flips of images ``idx`` this epoch (None: random flips)."""
        if self._flip_base is None:
            return None
        return self._flip_base.index_select(0, idx) ^ bool(self.epoch % 2)

    def __iter__(self):
        return self.iterate(start_step=0)

    def iterate(self, start_step: int = 0):
        """Yield (x, y) from batch ``start_step`` of the current epoch onwards."""
        order = self.order().to(self.device)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            if self.world_size > 1 and self.shard == "batch":
                n_global = int(idx.shape[0])
                lo, hi = _share(n_global, self.rank, self.world_size)
                idx = idx[lo:hi]
                x = self.images.index_select(0, idx)
                if self.crop_padding or self.flip:  # this share's rows of the global batch's random numbers
                    x = augment_batch(x, self._generator(step), self.crop_padding, self.flip, draw=n_global, start=lo,
                                      flip_mask=self._flips(idx))
                yield self.preprocess(x), self.labels.index_select(0, idx)
                continue
            x = self.images.index_select(0, idx)
            if self.crop_padding or self.flip:
                x = augment_batch(x, self._generator(step), self.crop_padding, self.flip, flip_mask=self._flips(idx))
            yield self.preprocess(x), self.labels.index_select(0, idx)


def _share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``n`` that ``rank`` of ``world`` takes: contiguous, sizes differing by at most one."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)
