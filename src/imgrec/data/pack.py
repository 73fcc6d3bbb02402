"""Packing: ``pack`` decodes any source imgrec reads (named dataset, image folder, CSV list) once, through the
safe decoder, into LitData shards; ``open_data`` decides how ``imgrec train`` reads a dataset (in memory, or a
pack streamed by :class:`imgrec.data.stream.StreamLoader`) and packs a source too big for memory on the way.
The shard format and why raw pixels: :mod:`imgrec.data.stream`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from imgrec.data.dataset import DataBundle, ImageData
from imgrec.data.stream import (DEFAULT_CHUNK_BYTES, PACK_META, PACK_FORMAT, PACK_VERSION, SPLITS, _split_dir,
                                choose_stream, is_pack, is_url, read_pack_meta, read_split)
from imgrec.errors import DatasetError

__all__ = ["Packed", "load_split", "open_data", "pack"]

DECODE_BLOCK = 1024              # files decoded at once while packing (bounds packing memory)


def load_split(spec: str, split: str, meta: dict | None = None, progress: bool = False) -> ImageData:
    """A whole packed split in memory as :class:`~imgrec.data.dataset.ImageData` (for data that fits)."""
    images, labels = read_split(spec, split, meta)
    return ImageData(images, labels)


# -- packing ---------------------------------------------------------------------------------------
def pack(source: str, out: str | os.PathLike, *, image_size: int | None = None, channels: int | None = None,
         val_split: float | None = None, split_seed: int = 0, data_dir: str | None = None,
         on_bad_image: str = "fail", train_limit: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
         progress: bool = True, plan: dict | None = None) -> dict:
    """Decode ``source`` (named dataset, image folder or CSV list) once, through the safe decoder, into LitData
    shards under ``out`` (train/, val/, test/ and ``imgrec-pack.json``); returns the pack's metadata.

    The validation split is carved exactly as :func:`imgrec.data.dataset.load_data` carves it (same
    ``val_split``/``split_seed``), from the labels, before decoding; a bad file is then left out of whichever
    split it fell in. Training images are written in a seeded random order, so chunks hold a class mix (an
    ImageFolder lists files class by class and LitData shuffles chunks and items within chunks only).
    ``train_limit`` keeps only the first N training images (as ``imgrec train --train-limit`` does in memory).
    Everything is written into a temporary folder beside ``out`` and renamed at the end: no partial pack.
    """
    out = _check_pack_args(source, out, on_bad_image)
    plan = plan or _plan(source, image_size, channels, val_split, split_seed, data_dir)
    full_stats = _limit_train(plan, train_limit, split_seed) if train_limit else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        written, stats, bad = _write_splits(tmp, source, plan, chunk_bytes, on_bad_image, progress)
        mean, std = _mean_std(full_stats or stats)
        meta = {"format": PACK_FORMAT, "version": PACK_VERSION, "name": plan["name"], "source": str(source),
                "classes": plan["classes"], "channels": plan["channels"], "image_size": plan["size"],
                "mean": mean, "std": std, "flip": plan["flip"],
                "counts": {s: w["counts"] for s, w in written.items()},
                "splits": {s: {"images": w["images"], "bytes": w["bytes"]} for s, w in written.items()},
                "val_split": val_split, "split_seed": split_seed,
                "skipped": [{"file": p, "reason": r} for p, r in bad]}
        (tmp / PACK_META).write_text(json.dumps(meta, indent=1))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _check_pack_args(source: str, out: str | os.PathLike, on_bad_image: str) -> Path:
    """``out`` as a local path, after refusing what cannot be packed there (DatasetError)."""
    from imgrec.data.batchdecode import ON_BAD_IMAGE

    if on_bad_image not in ON_BAD_IMAGE:
        raise DatasetError(f"--on-bad-image must be one of {', '.join(ON_BAD_IMAGE)}")
    if is_url(str(out)):
        raise DatasetError(f"{out}: pack to a local folder, then copy it to object storage (e.g. aws s3 sync)")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: already exists and is not empty; choose another --out or remove it")
    if is_pack(source):
        raise DatasetError(f"{source}: is already a pack")
    return out


def _limit_train(plan: dict, train_limit: int, split_seed: int):
    """Keep the plan's first ``train_limit`` training images, in a new seeded order. Returns the statistics of
    the whole training split for a named dataset (None for files)."""
    tr = plan["splits"]["train"]
    full_stats = None
    if "images" in tr:
        # a named dataset: mean/std of the whole training split, as the in-memory path computes them before
        # --train-limit takes its first N images (cheap: the MNIST family is in memory anyway)
        full_stats = _stats(_blocks(tr, np.arange(len(tr["labels"])), plan["size"], plan["channels"], []),
                            plan["channels"])
    keep = int(train_limit)
    plan["splits"]["train"] = {k: (v[:keep] if k != "order" else None) for k, v in tr.items()}
    n = len(plan["splits"]["train"]["labels"])
    g = torch.Generator().manual_seed(int(split_seed) + 1)
    plan["splits"]["train"]["order"] = torch.randperm(n, generator=g).numpy()
    return full_stats


def _write_splits(tmp: Path, source: str, plan: dict, chunk_bytes: int, on_bad_image: str, progress: bool):
    """Every split's shards under ``tmp``: ``(written {split: images, bytes, counts}, training statistics,
    bad files)``; DatasetError for a split without a readable image, or for bad files under ``fail``."""
    from imgrec.data.batchdecode import handle_bad

    bad: list[tuple[str, str]] = []
    stats = None
    written: dict[str, dict] = {}
    for split, part in plan["splits"].items():
        order = part["order"]
        n, kept_labels, s = _write_split(tmp / split, part, order, plan, chunk_bytes, bad,
                                         progress, want_stats=(split == "train"))
        if n == 0:
            raise DatasetError(f"{source}: no readable images in the {split} split")
        written[split] = {"images": n, "bytes": n * plan["channels"] * plan["size"] ** 2,
                          "counts": np.bincount(kept_labels, minlength=len(plan["classes"])).tolist()}
        if s is not None:
            stats = s
    handle_bad(bad, on_bad_image, "pack the rest")
    return written, stats, bad


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished pack in ``tmp`` to ``out`` (an absent or empty folder), readable as ordinary data."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a pack is ordinary data
    if out.exists():
        out.rmdir()  # an empty folder (_check_pack_args)
    os.replace(tmp, out)


def _plan(source, image_size, channels, val_split, split_seed, data_dir) -> dict:
    """What to pack: per split the labels and either file paths or an in-memory array (named datasets), from
    the source registry (imgrec.data.sources) as training reads it."""
    from imgrec.data.dataset import guess_channels, split_off
    from imgrec.data.sources import list_source

    listing = list_source(source, data_dir=data_dir)
    if listing.task == "multilabel":
        raise DatasetError(f"{source}: multi-label CSV lists cannot be packed yet; train on the CSV list")
    splits: dict[str, dict] = {}
    if listing.in_memory:
        x, y = listing.splits["train"]["images"], listing.splits["train"]["labels"]
        train, val = split_off(ImageData(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)),
                               5000 if val_split is None else val_split, split_seed)
        xt, yt = listing.splits["test"]["images"], listing.splits["test"]["labels"]
        for s, d in (("train", train), ("val", val), ("test", ImageData(torch.from_numpy(xt).unsqueeze(1),
                                                                       torch.from_numpy(yt)))):
            splits[s] = {"images": d.images, "labels": d.labels}
        size, chans = int(image_size or x.shape[-1]), int(channels or 1)
    else:
        splits = _file_splits(source, listing, val_split, split_seed)
        size = int(image_size or 32)
        chans = int(channels or guess_channels(splits["train"]["paths"]))
    name, classes, flip = listing.name, listing.classes, listing.flip
    if size < 1 or size > 4096:
        raise DatasetError(f"--image-size must be in 1..4096, not {size}")
    g = torch.Generator().manual_seed(int(split_seed) + 1)
    for s, part in splits.items():
        n = len(part["labels"])
        # training images in a random order (see pack); val/test in their source order
        part["order"] = torch.randperm(n, generator=g).numpy() if s == "train" else np.arange(n)
    ordered = {s: splits[s] for s in SPLITS if s in splits}
    return {"name": name, "classes": list(classes), "size": size, "channels": chans, "flip": bool(flip),
            "splits": ordered}


def _file_splits(source: str, listing, val_split, split_seed) -> dict[str, dict]:
    """Paths and labels per split; a validation split carved from the labels alone (no pixels needed) when the
    source has none: the same stratified split as the in-memory path, except that there bad files are dropped
    before splitting."""
    from imgrec.data.dataset import split_off
    splits = {s: {"paths": list(part["paths"]), "labels": torch.tensor(part["labels"], dtype=torch.long)}
              for s, part in listing.splits.items()}
    if "val" in splits:
        if val_split:
            raise DatasetError(f"{source}: has a val split already; drop --val-split")
        return splits
    tr = splits["train"]
    n = len(tr["paths"])
    dummy = ImageData(torch.empty(n, 0, dtype=torch.uint8), tr["labels"], [str(q) for q in tr["paths"]])
    a, b = split_off(dummy, 0.1 if val_split is None else val_split, split_seed)
    splits["train"] = {"paths": [Path(q) for q in a.paths], "labels": a.labels}
    splits["val"] = {"paths": [Path(q) for q in b.paths], "labels": b.labels}
    return splits


def _blocks(part: dict, order: np.ndarray, size: int, chans: int, bad: list) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Yield (uint8 images N×C×H×W, labels) in ``order``, decoded a block at a time; bad files go to ``bad``."""
    from imgrec.data.batchdecode import _decode_all
    from imgrec.data.transforms import convert_channels, resize_uint8

    labels = part["labels"].numpy()
    for start in range(0, len(order), DECODE_BLOCK):
        idx = order[start:start + DECODE_BLOCK]
        if "images" in part:
            x = part["images"][torch.from_numpy(idx)]
            yield convert_channels(resize_uint8(x, size), chans), labels[idx]
        else:
            paths = [part["paths"][i] for i in idx]
            images, kept, b = _decode_all(paths, chans, size, progress=False)
            bad.extend(b)
            yield images, labels[idx[kept]]


def _write_split(folder: Path, part: dict, order: np.ndarray, plan: dict, chunk_bytes: int, bad: list,
                 progress: bool, want_stats: bool):
    from litdata.streaming.writer import BinaryWriter
    from tqdm import tqdm

    folder.mkdir(parents=True)
    writer = BinaryWriter(str(folder), chunk_bytes=int(chunk_bytes))
    c = plan["channels"]
    s1, s2, npix = [0] * c, [0] * c, 0
    n = 0
    kept_labels: list[np.ndarray] = []
    with tqdm(total=len(order), desc=f"packing {folder.name}", unit="img", file=sys.stderr,
              disable=not progress or len(order) < 2000) as bar:
        for images, labels in _blocks(part, order, plan["size"], c, bad):
            images = images.contiguous()
            for img, lab in zip(images, labels.tolist()):
                writer[n] = {"image": img.clone(), "label": int(lab)}
                n += 1
            if want_stats and len(images):
                s1, s2, npix = _add_stats((s1, s2, npix), images)
            kept_labels.append(labels)
            bar.update(len(images) + 0)
    if n:
        writer.done()
        writer.merge(1)
    labels = np.concatenate(kept_labels) if kept_labels else np.zeros(0, dtype=np.int64)
    return n, labels, ((s1, s2, npix) if want_stats else None)


def _add_stats(acc, images: torch.Tensor):
    """Exact integer per-channel sums of pixels and squares: the mean/std equal channel_stats() on the same
    images, whatever the number of blocks."""
    s1, s2, npix = acc
    x = images.to(torch.int64)
    s1 = [a + int(v) for a, v in zip(s1, x.sum(dim=(0, 2, 3)).tolist())]
    s2 = [a + int(v) for a, v in zip(s2, (x * x).sum(dim=(0, 2, 3)).tolist())]
    return s1, s2, npix + int(images.shape[0] * images.shape[2] * images.shape[3])


def _stats(blocks, c: int):
    acc = ([0] * c, [0] * c, 0)
    for images, _ in blocks:
        acc = _add_stats(acc, images)
    return acc


def _mean_std(stats) -> tuple[list[float], list[float]]:
    s1, s2, n = stats
    mean = [a / n / 255 for a in s1]
    std = [max(math.sqrt(max(b - a * a / n, 0) / max(n - 1, 1)) / 255, 1e-3) for a, b in zip(s1, s2)]
    return mean, std


# -- training data: a pack (or a source packed on the fly), in memory or streamed -----------------------
class Packed:
    """A pack opened for training: ``bundle`` (classes, mean/std, size; val/test in memory when they fit, train
    in memory unless streamed), whether the train split streams, and why."""

    def __init__(self, spec: str, meta: dict, bundle, stream: bool, stream_val: bool, reason: str):
        self.spec, self.meta, self.bundle = spec, meta, bundle
        self.stream, self.stream_val, self.reason = stream, stream_val, reason

    def split_dir(self, split: str) -> str:
        return _split_dir(self.spec, split)


def source_bytes(plan: dict) -> int:
    """Decoded size of every split of a packing plan (what the in-memory path would hold)."""
    per = plan["channels"] * plan["size"] ** 2
    return sum(len(p["labels"]) for p in plan["splits"].values()) * per


def open_data(spec: str, *, stream: bool | None = None, image_size: int | None = None, channels: int | None = None,
              val_split: float | None = None, split_seed: int = 0, data_dir: str | None = None,
              on_bad_image: str = "fail", progress: bool = True) -> tuple[Packed | None, str | None]:
    """Decide how ``imgrec train`` reads ``spec``; returns (packed, why). ``packed`` is None for the plain
    in-memory path (a source that fits in memory, or ``stream=False`` on a source), else a :class:`Packed`: a
    pack read in memory or streamed, or a source too big for memory (or ``stream=True``) packed first into the
    user cache. ``why`` is the line ``imgrec train`` prints (None when nothing was estimated)."""
    if is_pack(spec):
        meta = read_pack_meta(spec)
        for opt, have, want in (("--image-size", meta["image_size"], image_size), ("--channels", meta["channels"],
                                                                                    channels)):
            if want and int(want) != int(have):
                raise DatasetError(f"{spec}: packed with {opt} {have}, not {want}; pack again with `imgrec data pack "
                                   f"{meta.get('source', 'SOURCE')} {opt} {want}`")
        if val_split:
            raise DatasetError(f"{spec}: a pack's validation split is fixed when packing; drop --val-split")
    else:
        from imgrec.data import named
        if stream is False:
            return None, None
        if stream is None and named.canonical_name(spec) is not None and not image_size:
            return None, None  # the MNIST family at its own size: 55 MB, always in memory
        from imgrec.data import csvlist
        path = Path(spec).expanduser()
        if stream is None and path.suffix.lower() == ".csv" and path.is_file() and \
                getattr(csvlist, "csv_has_multiple_labels", lambda _: False)(path):
            return None, None  # multi-label lists are not packed (yet): in memory
        plan = _plan(spec, image_size, channels, val_split, split_seed, data_dir)
        use, why = choose_stream(source_bytes(plan), stream)
        if not use:
            return None, why
        spec = str(_pack_cached(spec, plan, image_size, channels, val_split, split_seed, data_dir, on_bad_image,
                                progress, why))
        meta = read_pack_meta(spec)
    sizes = {s: int(v["bytes"]) for s, v in meta["splits"].items()}
    use, why = choose_stream(sum(sizes.values()), stream)
    eval_bytes = sizes.get("val", 0) + sizes.get("test", 0)
    stream_val = use and choose_stream(eval_bytes, None)[0]
    c, size = int(meta["channels"]), int(meta["image_size"])

    def load(split):
        if split not in meta["splits"]:
            return None
        return load_split(spec, split, meta, progress)

    if use:
        # the train split stays on disk; a placeholder keeps the bundle's shape (no images, no labels)
        train = ImageData(torch.empty((0, c, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.long))
    else:
        train = load("train")
    val = ImageData(torch.empty((0, c, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.long)) \
        if stream_val else load("val")
    test = None if stream_val else load("test")
    if val is None:
        raise DatasetError(f"{spec}: the pack has no val split")
    bundle = DataBundle(name=str(meta["name"]), classes=list(meta["classes"]), train=train, val=val, test=test,
                        channels=c, image_size=size, mean=list(meta["mean"]), std=list(meta["std"]),
                        flip=bool(meta.get("flip", True)), counts={k: list(v) for k, v in meta["counts"].items()})
    return Packed(spec, meta, bundle, use, stream_val, why), why


def _pack_cached(source, plan, image_size, channels, val_split, split_seed, data_dir, on_bad_image, progress,
                 why) -> Path:
    """Pack a source into the user cache (once: the key covers the files' names, sizes and times)."""
    import hashlib

    from imgrec.data.batchdecode import hash_file_stats
    from imgrec.data.named import user_cache_dir

    h = hashlib.sha256(f"v{PACK_VERSION}|{source}|{plan['size']}|{plan['channels']}|{val_split}|{split_seed}|"
                       f"{on_bad_image}".encode())
    for part in plan["splits"].values():
        hash_file_stats(h, part.get("paths", []))
    out = user_cache_dir() / "packs" / h.hexdigest()[:24]
    if (out / PACK_META).is_file():
        return out
    if progress:
        print(f"packing {source} into {out} ({why}); `imgrec data pack` does this once, ahead of time",
              file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)  # a folder without metadata is an interrupted pack of ours
    pack(source, out, image_size=image_size, channels=channels, val_split=val_split, split_seed=split_seed,
         data_dir=data_dir, on_bad_image=on_bad_image, progress=progress, plan=plan)
    return out
