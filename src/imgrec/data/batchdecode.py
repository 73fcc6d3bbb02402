"""Decode a list of image files into one uint8 N×C×H×W tensor: in parallel, through the safe decoder, reporting
every bad file, and cached on disk so that a second run over the same files skips decoding."""
from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from imgrec.data.decode import decode_image
from imgrec.errors import DatasetError, ImageDecodeError

ON_BAD_IMAGE = ("fail", "skip")
CACHE_VERSION = "1"


def format_bad(bad: list[tuple[str, str]], limit: int = 5) -> str:
    shown = "; ".join(f"{p}: {r}" for p, r in bad[:limit])
    more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
    return f"{len(bad)} unreadable image(s): {shown}{more}"


def decode_files(paths: list[Path], *, channels: int, size: int, on_bad_image: str = "fail",
                 cache: bool = True, progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """Decode ``paths`` to an N×C×H×W uint8 tensor; returns it and the indices of the files kept.

    ``on_bad_image="fail"`` raises DatasetError naming the bad files (all of them are looked at first, so
    the user sees every problem at once); ``"skip"`` warns on stderr and goes on with the rest.
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise DatasetError(f"--on-bad-image must be one of {', '.join(ON_BAD_IMAGE)}")
    key = _cache_key(paths, channels, size) if cache else None
    cached = _cache_load(key) if key else None
    if cached is not None:
        images, kept, bad = cached
    else:
        images, kept, bad = _decode_all(paths, channels, size, progress)
        if key:
            _cache_save(key, images, kept, bad)
    handle_bad(bad, on_bad_image, "train on the rest")
    return images, kept


def handle_bad(bad: list[tuple[str, str]], on_bad_image: str, rest: str) -> None:
    """Unreadable files found: DatasetError under ``fail`` (the hint says that ``skip`` would ``rest``), else a
    warning on stderr."""
    if bad:
        if on_bad_image == "fail":
            raise DatasetError(format_bad(bad) + f"; pass --on-bad-image skip to {rest}")
        print(f"imgrec: warning: skipped {format_bad(bad)}", file=sys.stderr)


def _decode_one(args):
    path, channels, size = args
    try:
        arr = decode_image(path, channels=channels, size=size)
        return arr, None
    except ImageDecodeError as e:
        return None, e.reason


def _decode_all(paths, channels, size, progress):
    from tqdm import tqdm

    n = len(paths)
    out = np.empty((n, size, size, channels), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    bad: list[tuple[str, str]] = []
    # Pillow releases the GIL while decoding, so threads give real parallelism without pickling images.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(_decode_one, [(p, channels, size) for p in paths], chunksize=64)
        for i, (arr, reason) in enumerate(tqdm(results, total=n, desc="decoding", unit="img",
                                               disable=not progress or n < 2000, file=sys.stderr)):
            if arr is None:
                bad.append((str(paths[i]), reason))
            else:
                out[i] = arr.reshape(size, size, channels)
                ok[i] = True
    kept = np.nonzero(ok)[0]
    images = torch.from_numpy(out[kept]).permute(0, 3, 1, 2).contiguous()
    return images, kept, bad


# -- the decoded-dataset cache: a second run over the same files skips decoding ------------------
def _cache_key(paths, channels, size) -> str | None:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{channels}|{size}".encode())
    hash_file_stats(h, paths)
    return h.hexdigest()[:32]


def hash_file_stats(h, paths) -> None:
    """Feed each file's absolute path, size and modification time (or that it is missing) to the hash ``h``:
    a cache key that changes when a file changes, without reading the files."""
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{os.path.abspath(p)}|missing\n".encode())


def _cache_dir() -> Path:
    from imgrec.data.named import user_cache_dir
    return user_cache_dir() / "decoded"


def _cache_load(key):
    from imgrec.safeio import load_tree
    path = _cache_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        t = load_tree(path)
        return t["images"], np.asarray(t["kept"].numpy() if isinstance(t["kept"], torch.Tensor) else t["kept"]), \
            [tuple(b) for b in t["bad"]]
    except Exception:  # a damaged cache entry is just a miss
        return None


def _cache_save(key, images, kept, bad):
    from imgrec.safeio import save_tree
    try:
        save_tree(_cache_dir() / f"{key}.safetensors",
                  {"images": images, "kept": torch.from_numpy(kept.astype(np.int64)), "bad": [list(b) for b in bad]})
    except OSError:  # a read-only home must not stop training
        pass
