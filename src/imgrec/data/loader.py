"""In-memory uint8 datasets and a batch loader that augments and normalises whole batches as tensors.

Why not torch's DataLoader with per-sample transforms: for data that fits in memory (all of the MNIST
family, most user folders at small sizes) per-sample Python costs more than the network itself on a
2-core CPU. Holding one uint8 tensor and cropping/flipping/normalising a whole batch at once (as airbench
does) removes that cost. Data too big for memory would need a streaming path; imgrec does not have one yet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgrec.data import csv as csv_source
from imgrec.data import datasets as named
from imgrec.data import folder as folder_source
from imgrec.data.files import decode_files
from imgrec.errors import ConfigError, DatasetError


@dataclass
class ImageData:
    """One split: ``images`` N×C×H×W uint8, ``labels`` N int64, ``paths`` when it came from files."""
    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx) -> "ImageData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        paths = [self.paths[i] for i in idx.tolist()] if self.paths is not None else None
        return ImageData(self.images[idx], self.labels[idx], paths)


@dataclass
class DataBundle:
    """Everything training needs to know about a dataset, and what the model directory records."""
    name: str
    classes: list[str]
    train: ImageData
    val: ImageData
    test: ImageData | None
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    flip: bool = True                       # horizontal flip is a valid augmentation for this data
    counts: dict[str, list[int]] = field(default_factory=dict)

    def split(self, name: str) -> ImageData:
        data = {"train": self.train, "val": self.val, "test": self.test}.get(name)
        if data is None:
            raise DatasetError(f"dataset {self.name!r} has no {name!r} split")
        return data


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in the 0..1 range (computed on the training split only)."""
    x = images.to(torch.float64)
    mean = (x.mean(dim=(0, 2, 3)) / 255).tolist()
    std = (x.std(dim=(0, 2, 3)) / 255).clamp_min(1e-3).tolist()
    return mean, std


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


def split_off(data: ImageData, val_split: float, seed: int) -> tuple[ImageData, ImageData]:
    """Carve a validation split from ``data``: a fraction (< 1) or a count (≥ 1), stratified by class."""
    n = len(data)
    n_val = int(round(val_split * n)) if val_split < 1 else int(val_split)
    if n_val <= 0:
        raise DatasetError("the validation split must hold at least one image (use --val-split > 0)")
    if n_val >= n:
        raise DatasetError(f"validation split of {n_val} images is not smaller than the {n} training images")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    # stratify: take each class's share of the validation set, so small classes are not left out of it
    labels = data.labels[perm]
    val_idx = []
    for c in labels.unique().tolist():
        members = perm[labels == c]
        k = int(round(n_val * len(members) / n))
        val_idx.append(members[:k])
    val = torch.cat(val_idx) if val_idx else perm[:0]
    if len(val) == 0:
        val = perm[:n_val]
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    train_idx = torch.arange(n)[mask]
    return data.subset(train_idx), data.subset(val.sort().values)


def load_data(spec: str, *, image_size: int | None = None, channels: int | None = None,
              val_split: float | None = None, split_seed: int = 0, data_dir: str | None = None,
              on_bad_image: str = "fail", classes: list[str] | None = None,
              splits: tuple[str, ...] = ("train", "val", "test"), progress: bool = True) -> DataBundle:
    """Load a named dataset (``fashion-mnist``, ``mnist``), an image folder or a CSV list.

    ``val_split``: fraction or count carved from training data when the source has no validation split
    (default 5000 images for named datasets, 0.1 otherwise); ``split_seed`` fixes which images, independent
    of the training seed, so the validation set stays the same across runs.
    """
    name = named.canonical_name(spec)
    if name is not None:
        return _load_named(name, image_size, channels, val_split, split_seed, data_dir, splits)
    path = Path(spec).expanduser()
    if not path.exists():
        choices = ", ".join(named.NAMED)
        raise DatasetError(f"{spec}: no such dataset, folder or CSV file (named datasets: {choices})")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"{spec}: a dataset is a folder, a .csv list or one of: {', '.join(named.NAMED)}")
        return _load_files(path, "csv", image_size, channels, val_split, split_seed, on_bad_image, classes, progress)
    return _load_files(path, "folder", image_size, channels, val_split, split_seed, on_bad_image, classes, progress)


def _load_named(name, image_size, channels, val_split, split_seed, data_dir, splits) -> DataBundle:
    ds = named.NAMED[name]
    x, y = named.load_named(name, "train", data_dir)
    train = ImageData(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y))
    test = None
    if "test" in splits:
        xt, yt = named.load_named(name, "test", data_dir)
        test = ImageData(torch.from_numpy(xt).unsqueeze(1), torch.from_numpy(yt))
    size = int(image_size or x.shape[-1])
    chans = int(channels or 1)
    for part in (train, test):
        if part is not None:
            part.images = convert_channels(resize_uint8(part.images, size), chans)
    bad = int(((train.labels < 0) | (train.labels >= len(ds.classes))).sum())
    if bad:
        raise DatasetError(f"{name}: {bad} training labels outside 0..{len(ds.classes) - 1}")
    train, val = split_off(train, 5000 if val_split is None else val_split, split_seed)
    mean, std = channel_stats(train.images)
    return _bundle(name, list(ds.classes), train, val, test, chans, size, mean, std, ds.flip)


def _load_files(path: Path, kind: str, image_size, channels, val_split, split_seed, on_bad_image,
                classes, progress) -> DataBundle:
    size = int(image_size or 32)
    groups: dict[str, tuple[list[Path], list[int]]] = {}
    if kind == "folder":
        if folder_source.has_split_folders(path):
            p, l, classes = folder_source.scan_class_folders(path / "train", classes)
            groups["train"] = (p, l)
            for s in ("val", "test"):
                if (path / s).is_dir():
                    groups[s] = folder_source.scan_class_folders(path / s, classes)[:2]
        else:
            p, l, classes = folder_source.scan_class_folders(path, classes)
            groups["train"] = (p, l)
    else:
        rows = csv_source.read_csv_list(path, classes)
        if classes is None:
            classes = sorted({lab for _, labs in rows.values() for lab in labs})
        for s, (p, labs) in rows.items():
            groups[s] = (p, [classes.index(lab) for lab in labs])
    if len(classes) < 2:
        raise DatasetError(f"{path}: needs at least 2 classes, found {len(classes)}")
    chans = channels or _guess_channels(groups["train"][0])
    parts: dict[str, ImageData] = {}
    for s, (paths, labels) in groups.items():
        images, kept = decode_files(paths, channels=chans, size=size, on_bad_image=on_bad_image, progress=progress)
        if len(kept) == 0:
            raise DatasetError(f"{path}: no readable images in the {s} split")
        parts[s] = ImageData(images, torch.tensor(labels, dtype=torch.long)[torch.from_numpy(kept)],
                             [str(paths[i]) for i in kept])
    if "val" in parts:
        if val_split:
            raise DatasetError(f"{path}: has a val split already; drop --val-split")
        train, val = parts["train"], parts["val"]
    else:
        train, val = split_off(parts["train"], 0.1 if val_split is None else val_split, split_seed)
    mean, std = channel_stats(train.images)
    return _bundle(path.name if kind == "folder" else path.stem, list(classes), train, val, parts.get("test"),
                   chans, size, mean, std, True)


def _guess_channels(paths: list[Path], probe: int = 32) -> int:
    """1 when the first images are all grayscale, else 3 (a colour dataset decoded as colour)."""
    from imgrec.data.decode import decode_image
    from imgrec.errors import ImageDecodeError
    for p in paths[:probe]:
        try:
            if decode_image(p, channels=None, size=8).shape[2] == 3:
                return 3
        except ImageDecodeError:  # bad files are reported when the whole set is decoded
            continue
    return 1


def _bundle(name, classes, train, val, test, chans, size, mean, std, flip) -> DataBundle:
    k = len(classes)
    counts = {s: torch.bincount(d.labels, minlength=k).tolist() for s, d in (("train", train), ("val", val), ("test", test)) if d is not None}
    return DataBundle(name, classes, train, val, test, chans, size, mean, std, flip, counts)


def load_eval_split(meta: dict, data: str | None, data_dir: str | None, split: str, on_bad_image: str = "fail"):
    """The data a model directory was trained on (or ``data``), with the same validation split, at the model's
    size and channels; returns (bundle, the requested split). Used by ``imgrec eval`` and ``imgrec report``."""
    d = meta.get("data") or {}
    spec = data or d.get("source")
    if not spec:
        raise ConfigError("--data is required (the model directory does not say what it was trained on)")
    splits = ("train", "val", "test") if split == "test" else ("train", "val")
    same_source = spec == d.get("source")
    bundle = load_data(spec, image_size=int(meta["image_size"]), channels=int(meta["channels"]),
                       val_split=d.get("val_split") if same_source else None,
                       split_seed=int(d.get("split_seed") or 0), data_dir=data_dir, on_bad_image=on_bad_image,
                       splits=splits, progress=False)
    if list(bundle.classes) != list(meta["classes"]):
        raise DatasetError(f"{spec}: its classes ({', '.join(bundle.classes[:5])}…) differ from the model's")
    return bundle, bundle.split(split)


# ----------------------------------------------------------------------------------------------
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
        c = self.images.shape[1]
        self.mean = torch.tensor(mean, device=self.device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, c, 1, 1) * 255
        self.channels_last, self.dtype = channels_last, dtype
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
                x = self.augment(x, self._generator(step))
            yield self.normalize(x), self.labels.index_select(0, idx)

    def augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.crop_padding:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
            # one slice per distinct offset ((2p+1)² of them) instead of a per-pixel gather: 2-3× faster
            key = dy * (2 * p + 1) + dx
            out = torch.empty_like(x)
            for k in key.unique().tolist():
                idx = (key == k).nonzero().squeeze(1)
                oy, ox = divmod(k, 2 * p + 1)
                out[idx] = padded[idx, :, oy:oy + h, ox:ox + w]
            x = out
        if self.flip:
            mask = (torch.rand(n, generator=g) < 0.5).to(x.device).view(n, 1, 1, 1)
            x = torch.where(mask, x.flip(3), x)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(torch.float32) - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype) if self.dtype != torch.float32 else x
