"""Datasets as uint8 tensors in memory: ``load_data`` (named dataset, image folder or CSV list → DataBundle),
the stratified validation split, channel statistics, and ``load_eval_split`` (the data a model was trained on).

Data too big for memory is packed into shards and streamed: :mod:`imgrec.data.pack`, :mod:`imgrec.data.stream`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from imgrec.data.batchdecode import decode_files
from imgrec.data.sources import Listing, list_source
from imgrec.data.transforms import convert_channels, resize_uint8
from imgrec.errors import ConfigError, DatasetError
from imgrec.modeldir import ModelMeta


@dataclass
class ImageData:
    """One split: ``images`` N×C×H×W uint8, ``labels`` N int64 (or, multi-label, N×K float32 multi-hot: 1 where
    the image carries class k), ``paths`` when it came from files."""
    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

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
    counts: dict[str, list[int]] = field(default_factory=dict)  # per split: images per class (multilabel: carrying it)
    task: str = "classification"            # or "multilabel" (see imgrec.modeldir.TASKS)
    val_carved: bool = False                # the validation split was carved from the training files at random

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


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Images per class: a bincount of class indices, or for N×K multi-hot labels the images carrying each."""
    if labels.ndim == 2:
        return labels.sum(0).round().long().tolist()
    return torch.bincount(labels, minlength=num_classes).tolist()


def _strata(labels: torch.Tensor) -> torch.Tensor:
    """One stratum per image: its class, or for multi-hot labels its rarest label (-1: none). Stratifying
    multi-label data on the rarest label keeps every rare label in the validation split, which choosing its
    threshold there needs; full iterative stratification would be exact but is far more code."""
    if labels.ndim == 1:
        return labels
    freq = labels.sum(0)
    rarity = torch.where(labels > 0, freq.expand_as(labels), torch.full_like(labels, float("inf")))
    rarest = rarity.argmin(1)
    return torch.where(labels.sum(1) > 0, rarest, torch.full_like(rarest, -1))


def split_off(data: ImageData, val_split: float, seed: int) -> tuple[ImageData, ImageData]:
    """Carve a validation split from ``data``: a fraction (< 1) or a count (≥ 1), stratified by class
    (multi-label: by each image's rarest label)."""
    n = len(data)
    n_val = int(round(val_split * n)) if val_split < 1 else int(val_split)
    if n_val <= 0:
        raise DatasetError("the validation split must hold at least one image (use --val-split > 0)")
    if n_val >= n:
        raise DatasetError(f"validation split of {n_val} images is not smaller than the {n} training images")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    # stratify: take each class's share of the validation set, so small classes are not left out of it
    labels = _strata(data.labels)[perm]
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
              splits: tuple[str, ...] = ("train", "val", "test"), progress: bool = True,
              task: str | None = None, sized: tuple[str, ...] | None = None,
              val_files: list[str] | None = None) -> DataBundle:
    """Load a named dataset (``fashion-mnist``, ``mnist``), an image folder or a CSV list.

    ``val_split``: fraction or count carved from training data when the source has no validation split
    (default 5000 images for named datasets, 0.1 otherwise); ``split_seed`` fixes which images, independent
    of the training seed, so the validation set stays the same across runs. ``task``: "classification",
    "multilabel" (a CSV list whose label cells hold ``;``-separated labels) or None (detected: multilabel
    when some label cell holds a ``;``). ``sized``: the splits of a named dataset brought to ``image_size`` and
    ``channels`` (default: all); the others keep the source's size and channels (``imgrec eval`` at 224 px
    needs only its one split at that size, not the 55,000 training images at 3×224×224 — more than 20 GB).
    Files are always decoded at ``image_size``. ``val_files``: the validation split as a list of files
    (:func:`source_relative` names) instead of one carved at random, as a run that held validation out by groups
    of similar images recorded it.
    """
    listing = list_source(spec, data_dir=data_dir, splits=tuple({"train", *splits}), task=task, classes=classes)
    if listing.in_memory:
        return _load_named(listing, image_size, channels, val_split, split_seed, splits, sized)
    return _load_files(spec, listing, image_size, channels, val_split, split_seed, on_bad_image, progress, val_files)


def source_relative(path: str, spec: str) -> str:
    """A file's name relative to the data source (the folder, or the CSV list's folder), so that a recorded
    validation split still names the same files when the source is reached by another path or moved."""
    root = Path(spec)
    root = root.parent if root.is_file() else root
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def split_by_files(data: ImageData, val_files: list[str], spec: str) -> tuple[ImageData, ImageData]:
    """(the rest, the files named by ``val_files``), each in ``data``'s order."""
    if data.paths is None:
        raise DatasetError(f"{spec}: a validation split given as files needs a source of files")
    wanted = set(val_files)
    is_val = torch.tensor([source_relative(p, spec) in wanted for p in data.paths], dtype=torch.bool)
    if not bool(is_val.any()) or bool(is_val.all()):
        raise DatasetError(f"{spec}: the recorded validation files ({len(wanted)}) do not match its training "
                           f"images; has the folder changed? (train again, or pass --data with the same folder)")
    return data.subset(torch.nonzero(~is_val)[:, 0]), data.subset(torch.nonzero(is_val)[:, 0])


def _load_named(listing: Listing, image_size, channels, val_split, split_seed, splits, sized=None) -> DataBundle:
    x, y = listing.splits["train"]["images"], listing.splits["train"]["labels"]
    train = ImageData(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y))
    test = None
    if "test" in splits and "test" in listing.splits:
        xt, yt = listing.splits["test"]["images"], listing.splits["test"]["labels"]
        test = ImageData(torch.from_numpy(xt).unsqueeze(1), torch.from_numpy(yt))
    # carved at the source's size: the split depends only on the labels, the count and the seed, and resizing
    # afterwards touches only the splits asked for
    train, val = split_off(train, 5000 if val_split is None else val_split, split_seed)
    size = int(image_size or x.shape[-1])
    chans = int(channels or 1)
    for s, part in (("train", train), ("val", val), ("test", test)):
        if part is not None and (sized is None or s in sized):
            part.images = convert_channels(resize_uint8(part.images, size), chans)
    mean, std = channel_stats(train.images)
    return _bundle(listing.name, list(listing.classes), train, val, test, chans, size, mean, std, listing.flip)


def _load_files(spec: str, listing: Listing, image_size, channels, val_split, split_seed, on_bad_image,
                progress, val_files=None) -> DataBundle:
    size, task, classes = int(image_size or 32), listing.task, listing.classes
    groups: dict[str, tuple[list[Path], list]] = {}
    for s, part in listing.splits.items():
        labels = part["labels"]
        if task == "multilabel":  # N×K multi-hot rows
            labels = [[1.0 if c in set(lab) else 0.0 for c in classes] for lab in labels]
        groups[s] = (part["paths"], labels)
    chans = channels or guess_channels(groups["train"][0])
    parts: dict[str, ImageData] = {}
    for s, (paths, labels) in groups.items():
        images, kept = decode_files(paths, channels=chans, size=size, on_bad_image=on_bad_image, progress=progress)
        if len(kept) == 0:
            raise DatasetError(f"{spec}: no readable images in the {s} split")
        dtype = torch.float32 if task == "multilabel" else torch.long
        parts[s] = ImageData(images, torch.tensor(labels, dtype=dtype)[torch.from_numpy(kept)],
                             [str(paths[i]) for i in kept])
    if "val" in parts:
        if val_split:
            raise DatasetError(f"{spec}: has a val split already; drop --val-split")
        train, val = parts["train"], parts["val"]
    elif val_files:
        train, val = split_by_files(parts["train"], list(val_files), spec)
    else:
        train, val = split_off(parts["train"], 0.1 if val_split is None else val_split, split_seed)
    mean, std = channel_stats(train.images)
    bundle = _bundle(listing.name, list(classes), train, val, parts.get("test"), chans, size, mean, std, True, task)
    bundle.val_carved = "val" not in parts and not val_files
    return bundle


def guess_channels(paths: list[Path], probe: int = 32) -> int:
    """1 when the first readable images are all grayscale, else 3 (a colour dataset decoded as colour)."""
    from imgrec.data.decode import decode_image
    from imgrec.errors import ImageDecodeError
    for p in paths[:probe]:
        try:
            if decode_image(p, channels=None, size=8).shape[2] == 3:
                return 3
        except ImageDecodeError:  # bad files are reported when the whole set is decoded
            continue
    return 1


def _bundle(name, classes, train, val, test, chans, size, mean, std, flip, task="classification") -> DataBundle:
    k = len(classes)
    counts = {s: class_counts(d.labels, k) for s, d in (("train", train), ("val", val), ("test", test)) if d is not None}
    return DataBundle(name, classes, train, val, test, chans, size, mean, std, flip, counts, task)


@dataclass
class EvalSplit:
    """What :func:`load_run_split` loaded: the bundle, the split's images, which split that is, and a note
    (None, or one line saying that the split asked for by default was not there and which one was used)."""
    bundle: DataBundle
    data: ImageData
    split: str
    note: str | None = None
    on_bad_image: str = "fail"


def run_data_settings(meta: ModelMeta, data: str | None = None, data_dir: str | None = None,
                      on_bad_image: str | None = None) -> dict:
    """The data settings a model directory's run used, with what was given explicitly taking precedence:
    ``source``, ``data_dir``, ``on_bad_image``, ``val_split``, ``split_seed``, ``same_source``. The validation
    split and the bad-image policy are the run's own so that ``eval``/``report``/``export`` see the images
    training saw (a run trained with ``--on-bad-image skip`` skips the same files again)."""
    import math

    from imgrec.errors import ModelFileError

    def recorded(key: str, value, ok: bool, what: str):  # a handed model.json's entry, or one line saying why not
        if value is not None and not ok:
            raise ModelFileError(f"model.json: data.{key} must be {what}, got {type(value).__name__} "
                                 f"{str(value)[:40]!r}")
        return value

    # an exported file's metadata (imgrec.infer.ort) has ``data`` but no ``config``
    d, cfg = meta.data or {}, (getattr(meta, "config", None) or {})
    cfg = cfg.get("data") if isinstance(cfg, dict) else None
    if not isinstance(d, dict) or not isinstance(cfg or {}, dict):
        raise ModelFileError("model.json: data and config.data must be mappings")
    d, cfg = dict(d), dict(cfg or {})
    for where in (d, cfg):
        for key, text in (("source", "a dataset name or path"), ("data", "a dataset name or path"),
                          ("data_dir", "a folder")):
            recorded(key, where.get(key), isinstance(where.get(key), str), text)
        recorded("on_bad_image", where.get("on_bad_image"), where.get("on_bad_image") in ("fail", "skip"),
                 "fail or skip")
        v = where.get("val_files")
        recorded("val_files", v, isinstance(v, list) and all(isinstance(f, str) for f in v), "a list of paths")
        v = where.get("val_split")
        recorded("val_split", v, isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 and v > 0, "a positive fraction or count")
        v = where.get("split_seed")
        recorded("split_seed", v, isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32, "a seed")
    spec = data or d.get("source") or cfg.get("data")
    same = bool(spec) and spec == (d.get("source") or cfg.get("data"))
    policy = on_bad_image or d.get("on_bad_image") or cfg.get("on_bad_image") or "fail"
    val_split = d.get("val_split", cfg.get("val_split")) if same else None
    seed = d.get("split_seed", cfg.get("split_seed"))
    val_files = (d.get("val_files") or cfg.get("val_files")) if same else None
    return {"source": spec, "data_dir": data_dir or (cfg.get("data_dir") if same else None),
            "on_bad_image": policy, "val_split": val_split, "split_seed": int(seed or 0), "same_source": same,
            "val_files": list(val_files) if isinstance(val_files, list) else None}


def load_run_split(meta: ModelMeta, data: str | None = None, data_dir: str | None = None, split: str | None = None,
                   on_bad_image: str | None = None, at_model_size: bool = True) -> EvalSplit:
    """The data a model directory was trained on (or ``data``), with the run's validation split and bad-image
    policy (:func:`run_data_settings`), at the model's size and channels. Used by ``imgrec eval``, ``report``
    and ``export``'s check.

    ``split`` None: the test split, or the validation split (with a note) when the source has none; a
    ``"test"`` asked for explicitly that is not there is a DatasetError that suggests ``--split val``.
    Of a named dataset only the requested split is brought to the model's size; the bundle's other splits keep
    the source's (see ``load_data``'s ``sized``).
    ``at_model_size=False``: at the source's own size and channels (a pack: its packed size) — to pick a
    subset first and bring only that to the model's size (see :func:`at_model_size`)."""
    run = run_data_settings(meta, data, data_dir, on_bad_image)
    spec = run["source"]
    if not spec:
        raise ConfigError("--data is required (the model directory does not say what it was trained on)")
    want = split or "test"
    from imgrec.data import stream
    if stream.is_pack(spec):  # a pack from `imgrec data pack`: read only the requested split
        if want == "test" and "test" not in stream.read_pack_meta(spec)["splits"]:
            want = _no_test(spec, split)
        bundle = _open_pack_split(spec, want, meta.image_size, meta.channels)
        if list(bundle.classes) != list(meta.classes):
            raise DatasetError(f"{spec}: its classes ({', '.join(bundle.classes[:5])}…) differ from the model's")
        return EvalSplit(bundle, bundle.split(want), want, _note(spec, split, want), run["on_bad_image"])
    splits = ("train", "val", "test") if want == "test" else ("train", "val")
    bundle = load_data(spec, image_size=meta.image_size if at_model_size else None,
                       channels=meta.channels if at_model_size else None,
                       val_split=run["val_split"], split_seed=run["split_seed"], data_dir=run["data_dir"],
                       on_bad_image=run["on_bad_image"], splits=splits, progress=False, task=meta.task,
                       val_files=run["val_files"],
                       sized=(want,) if at_model_size else (),
                       # multi-label: a label outside the model's is reported with its CSV row
                       classes=list(meta.classes) if meta.task == "multilabel" else None)
    if list(bundle.classes) != list(meta.classes):
        raise DatasetError(f"{spec}: its classes ({', '.join(bundle.classes[:5])}…) differ from the model's")
    if want == "test" and bundle.test is None:
        want = _no_test(spec, split)
    return EvalSplit(bundle, bundle.split(want), want, _note(spec, split, want), run["on_bad_image"])


def _no_test(spec: str, split: str | None) -> str:
    """The split to use when the source has no test split: validation when none was asked for."""
    if split == "test":
        raise DatasetError(f"{spec}: has no 'test' split (no test/ folder or test rows); pass --split val to "
                           "evaluate on the validation split")
    return "val"


def _note(spec: str, split: str | None, used: str) -> str | None:
    if split is None and used == "val":
        return f"{spec} has no test split: using the validation split (pass --split to choose)"
    return None


def load_eval_split(meta: ModelMeta, data: str | None, data_dir: str | None, split: str | None,
                    on_bad_image: str | None = None, at_model_size: bool = True) -> tuple[DataBundle, ImageData]:
    """:func:`load_run_split` as (bundle, the split's images)."""
    r = load_run_split(meta, data, data_dir, split, on_bad_image, at_model_size)
    return r.bundle, r.data


def at_model_size(data: ImageData, meta: ModelMeta) -> torch.Tensor:
    """``data`` (from ``load_eval_split(..., at_model_size=False)``) as the model takes it: files decoded
    again at the model's size (as ``load_data`` would have decoded them), arrays resized and converted (as
    ``load_data`` does for the named datasets)."""
    size, chans = int(meta.image_size), int(meta.channels)
    if data.paths is not None:
        images, _ = decode_files([Path(p) for p in data.paths], channels=chans, size=size, on_bad_image="fail",
                                 progress=False)
        return images
    return convert_channels(resize_uint8(data.images, size), chans)


def _open_pack_split(spec: str, split: str, image_size: int | None, channels: int | None) -> DataBundle:
    """One split of a pack (imgrec.data.stream) in memory, for ``imgrec eval``/``report``; the others empty."""
    from imgrec.data import stream

    meta = stream.read_pack_meta(spec)
    c, size = int(meta["channels"]), int(meta["image_size"])
    if (image_size and int(image_size) != size) or (channels and int(channels) != c):
        raise DatasetError(f"{spec}: packed at {c}×{size}×{size}; the model takes {channels}×{image_size}×{image_size}")
    if split not in meta["splits"]:
        raise DatasetError(f"{spec}: the pack has no {split!r} split")
    empty = ImageData(torch.empty((0, c, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.long))
    parts = {s: empty for s in ("train", "val", "test")}
    parts[split] = ImageData(*stream.read_split(spec, split, meta))
    return DataBundle(str(meta["name"]), list(meta["classes"]), parts["train"], parts["val"], parts["test"], c, size,
                      list(meta["mean"]), list(meta["std"]), bool(meta.get("flip", True)),
                      {k: list(v) for k, v in meta["counts"].items()})


def export_samples(data: str, split: str, count: int, out: str | Path, data_dir: str | None = None) -> int:
    """Write the first ``count`` images of a split as PNG files named ``<index>_<label>.png``; returns how many."""
    from PIL import Image

    bundle = load_data(data, data_dir=data_dir, splits=("train", "val", "test"), progress=False)
    part = bundle.split(split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = min(int(count), len(part))
    for i in range(n):
        arr = part.images[i].permute(1, 2, 0).numpy()
        if part.multilabel:
            label = "+".join(bundle.classes[j] for j in part.labels[i].nonzero().flatten().tolist())
        else:
            label = bundle.classes[int(part.labels[i])]
        label = label.replace("/", "-").replace(" ", "_")
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(out / f"{i:04d}_{label}.png")
    return n
