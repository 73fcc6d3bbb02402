"""Reading packed training data: the pack's metadata, the shard allow-list, whole splits into memory, and
``StreamLoader``, which streams a split through DataLoader workers with the same batched augmentation and
normalisation as the in-memory path. Packs are made by :mod:`imgrec.data.pack` (which also opens them for
training); this module imports nothing of imgrec.data above it, so ``dataset.py`` can read packs too.

Layout of a pack (a local folder, or the same tree under ``s3://`` / ``gs://``)::

    DIR/imgrec-pack.json            classes, channels, image size, mean/std, counts, skipped files (plain JSON)
    DIR/train/index.json            LitData's index: data format, chunk names and sizes
    DIR/train/chunk-0-0.bin …       samples {"image": uint8 C×H×W tensor, "label": int}
    DIR/val/…  DIR/test/…           the other splits, same format

Why raw uint8 pixels at the packed size rather than PNG/JPEG bytes: reading is a copy (no decoder on the hot
path: a 2-core CPU decoding PNGs would spend more time there than in the network), the pixels are exactly the
ones the in-memory path trains on (no lossy re-encode), and no image parser ever runs on a shard someone hands
you. The cost is disk: a pack is the decoded size (N×C×H×W bytes), typically 3–10× the JPEG files.

Shards are data, never code. LitData stores each leaf with a serializer named in ``index.json`` and falls back
to pickle for types it does not know; a crafted ``index.json`` could name ``pickle`` (or PIL, video, graph …
decoders). imgrec writes only a tensor and an int, checks ``index.json`` against that allow-list before a
dataset is built (:func:`check_index`), and also replaces every other serializer with one that refuses, so the
pickle path cannot run even if the file changed between the check and the read.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from imgrec.errors import DatasetError, first_line
from imgrec.safeio import plain

# LitData may ask PyPI for a newer version when a dataset is built (a 30 s timeout offline); never phone home.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

__all__ = ["PACK_META", "StreamLoader", "available_memory", "check_chunk_name", "check_index", "choose_stream",
           "default_workers",
           "is_pack", "is_url", "read_pack_meta", "read_split"]

PACK_META = "imgrec-pack.json"
PACK_FORMAT = "imgrec-pack"
PACK_VERSION = 1
SPLITS = ("train", "val", "test")
URL_SCHEMES = ("s3://", "gs://", "gcs://", "azure://", "az://", "hf://", "local:")
# What imgrec writes: the image leaf as a tensor (3-D, so LitData's "tensor" serializer) and the label as an int.
ALLOWED_FORMAT = ["tensor", "int"]
ALLOWED_KEYS = ["image", "label"]
DEFAULT_CHUNK_BYTES = 16 << 20   # small enough that even a small pack spreads over workers and shuffles well


def is_url(spec: str) -> bool:
    return any(str(spec).startswith(s) for s in URL_SCHEMES)


def is_pack(spec: str | os.PathLike) -> bool:
    """True for a local folder holding ``imgrec-pack.json`` or any object-store URL (checked when read)."""
    s = str(spec)
    if is_url(s):
        return True
    return (Path(s).expanduser() / PACK_META).is_file()


# -- reading: metadata, the index allow-list, shards -------------------------------------------------
def _fetch(url: str, name: str, into: Path) -> Path:
    """Download ``url/name`` into ``into`` with LitData's own downloaders (s3/gs/…); one clear line on failure."""
    from litdata.streaming.downloader import get_downloader

    into.mkdir(parents=True, exist_ok=True)
    local = into / name
    try:
        get_downloader(url, str(into), []).download_file(f"{url.rstrip('/')}/{name}", str(local))
    except Exception as e:  # missing credentials, unreachable endpoint, no such object: one line, no traceback
        first = first_line(e, 200)
        raise DatasetError(f"{url}/{name}: cannot download ({first})") from None
    return local


def _url_cache(url: str) -> Path:
    import hashlib

    from imgrec.data.named import user_cache_dir
    return user_cache_dir() / "streams" / hashlib.sha256(url.encode()).hexdigest()[:16]


def read_pack_meta(spec: str | os.PathLike) -> dict:
    """The pack's ``imgrec-pack.json``, checked: format, version, classes, sizes, splits."""
    s = str(spec)
    path = _fetch(s, PACK_META, _url_cache(s)) if is_url(s) else Path(s).expanduser() / PACK_META
    try:
        meta = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"{spec}: not a pack (no {PACK_META}; make one with `imgrec data pack`)") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable pack metadata ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(meta, dict) or meta.get("format") != PACK_FORMAT:
        raise DatasetError(f"{path}: not an imgrec pack")
    if int(meta.get("version", 0)) > PACK_VERSION:
        raise DatasetError(f"{path}: pack format {meta.get('version')} is newer than this imgrec reads "
                           f"({PACK_VERSION}); upgrade imgrec")
    try:
        ok = (isinstance(meta["classes"], list) and len(meta["classes"]) >= 2 and meta["channels"] in (1, 3)
              and 1 <= int(meta["image_size"]) <= 4096 and len(meta["mean"]) == meta["channels"]
              and len(meta["std"]) == meta["channels"] and "train" in meta["splits"])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise DatasetError(f"{path}: malformed pack metadata")
    return meta


def check_index(split_dir: str | os.PathLike, meta: dict | None = None) -> dict:
    """Read a split's ``index.json`` and refuse anything imgrec did not write: only an image tensor and an int
    label, no compression or encryption, LitData's PyTreeLoader. Local chunk files are checked against the
    sizes the index records, so a truncated shard is named before training starts. Returns the index."""
    s = str(split_dir)
    path = _fetch(s, "index.json", _url_cache(s)) if is_url(s) else Path(s) / "index.json"
    try:
        index = json.loads(Path(path).read_text())
        config, chunks = index["config"], index["chunks"]
        fmt = list(config["data_format"])
    except FileNotFoundError:
        raise DatasetError(f"{split_dir}: no index.json (not a packed split, or an incomplete copy)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: corrupt shard index ({str(e).splitlines()[0][:120]})") from None
    spec = str(config.get("data_spec") or "")
    keys_ok = all(f'\\"{k}\\"' in spec or f'"{k}"' in spec for k in ALLOWED_KEYS)
    if fmt != ALLOWED_FORMAT or not keys_ok or config.get("item_loader", "PyTreeLoader") != "PyTreeLoader" \
            or config.get("compression") or config.get("encryption"):
        raise DatasetError(f"{path}: refusing shards with data format {fmt} (imgrec reads only an image tensor and "
                           f"an int label; other formats may unpickle code)")
    if not isinstance(chunks, list) or not all(isinstance(ch, dict) for ch in chunks):
        raise DatasetError(f"{path}: corrupt shard index (no chunk list)")
    for ch in chunks:  # every location: URLs are joined the same way as folders
        check_chunk_name(ch.get("filename"), str(path))
    if not is_url(s):
        for ch in chunks:
            f = Path(s) / ch["filename"]
            if not f.is_file():
                raise DatasetError(f"{f}: shard missing")
            size, want = f.stat().st_size, int(ch.get("chunk_bytes", -1))
            if size != want:
                raise DatasetError(f"{f}: truncated or corrupt shard ({size} bytes, the index says {want})")
    return index


def check_chunk_name(name: object, where: str = "index.json") -> str:
    """A chunk file name from an index, or a DatasetError: only a plain file name is allowed.

    LitData joins the name to the pack's location to read it and to its cache folder to write it, for every
    scheme (s3://, gs://, hf://, local:, a folder), so ``../../x`` would be read from outside the pack and
    written outside the cache. imgrec writes ``chunk-<rank>-<n>.bin``; anything with a separator, a parent
    reference, a drive letter or a NUL is refused."""
    ok = (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..")
          and not any(ch in name for ch in "/\\\0:") and not name.startswith(("~", "..")) and name.isprintable())
    if not ok:
        raise DatasetError(f"{where}: refusing a shard named {str(name)[:80]!r} (a chunk must be a plain file name "
                           f"inside the pack)")
    return name


class _Refuse:
    """Stands in for every LitData serializer imgrec does not write: deserializing raises instead of decoding."""

    def __init__(self, name: str):
        self.name = name

    def serialize(self, item):
        raise DatasetError(f"imgrec does not write {self.name!r} shard items")

    def deserialize(self, data):
        raise DatasetError(f"refusing a {self.name!r} shard item (imgrec reads only tensors and ints)")

    def can_serialize(self, item) -> bool:
        return False

    def setup(self, metadata) -> None:
        pass


def _safe_serializers() -> dict:
    from litdata.streaming.serializers import _SERIALIZERS, IntegerSerializer, TensorSerializer

    out = {name: _Refuse(name) for name in _SERIALIZERS}
    out.update({"tensor": TensorSerializer(), "int": IntegerSerializer()})
    return out


def _dataset(split_dir: str, *, shuffle: bool, seed: int, drop_last: bool, cache_dir: str | None = None,
             max_cache_size: str | None = None, every_rank: bool = False):
    """A StreamingDataset over one packed split, reading only the allowed item types. ``every_rank``: the whole
    split in every process, also under torch.distributed (LitData otherwise gives each rank its share) — for
    validation and test, which every rank must see whole so that all ranks compute the same numbers."""
    import logging

    from litdata import StreamingDataset
    from litdata.utilities.env import _DistributedEnv

    kwargs = {}
    if is_url(split_dir):
        kwargs["cache_dir"] = cache_dir or str(_url_cache(split_dir) / "chunks")
        if max_cache_size:
            kwargs["max_cache_size"] = max_cache_size
    with _litdata_errors(f"{split_dir}: cannot open packed split"):
        # item_shuffle_window=0: a full permutation inside each chunk, so a batch is not the same 256 neighbours
        # every epoch (LitData's default window); batch_decode="all": deserialize a chunk once when it is opened
        # (raw pixels, a few ms per 16 MB chunk) — with per-window decoding a full permutation would decode each
        # window once per item (measured 171 img/s against 23,000 with "all" on Fashion-MNIST)
        lit_log = logging.getLogger("litdata.streaming.dataset")
        level = lit_log.level
        if every_rank:
            lit_log.setLevel(logging.ERROR)  # its "drop_last disabled under distributed" is about training loaders
        try:
            ds = StreamingDataset(split_dir, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                  serializers=_safe_serializers(), item_shuffle_window=0, batch_decode="all",
                                  **kwargs)
        finally:
            lit_log.setLevel(level)
        # the index LitData itself downloaded and will use (for a URL, a second copy of index.json that may
        # differ from the one check_index read): its chunk names pass the same check before any chunk is read
        for name in getattr(ds, "subsampled_files", None) or []:
            check_chunk_name(name, f"{split_dir}/index.json")
        if every_rank:
            ds.distributed_env = _DistributedEnv(1, 0, 1)
        return ds


@contextlib.contextmanager
def _litdata_errors(what: str) -> Iterator[None]:
    """Any exception LitData raises (it has no error type of its own) as one DatasetError line ``what (the
    exception's first line)``; imgrec's own DatasetErrors pass as they are."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{what} ({first_line(e, 200)})") from None


def _split_dir(spec: str, split: str) -> str:
    return f"{spec.rstrip('/')}/{split}" if is_url(spec) else str(Path(spec).expanduser() / split)


def read_split(spec: str, split: str, meta: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole packed split in memory: (uint8 images N×C×H×W, int64 labels N), every sample checked."""
    meta = meta or read_pack_meta(spec)
    d = _split_dir(spec, split)
    check_index(d, meta)
    # every_rank: under torch.distributed LitData's len() would be this rank's share (while ds[i] reads global
    # item i); every rank needs every validation/test image (evaluation slices them itself)
    ds = _dataset(d, shuffle=False, seed=0, drop_last=False, every_rank=True)
    n = len(ds)
    expected = (meta.get("splits") or {}).get(split, {}).get("images")
    if expected is not None and int(expected) != n:
        raise DatasetError(f"{d}: index lists {n} images, the pack's metadata {expected}; corrupt pack")
    c, s = int(meta["channels"]), int(meta["image_size"])
    images = torch.empty((n, c, s, s), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    with _litdata_errors(f"{d}: corrupt shard"):
        for i in range(n):
            item = ds[i]
            images[i] = _check_item(item, c, s, len(meta["classes"]), d)
            labels[i] = int(item["label"])
    return images, labels


def _check_item(item, c: int, s: int, k: int, where: str) -> torch.Tensor:
    img = item.get("image") if isinstance(item, dict) else None
    if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or tuple(img.shape) != (c, s, s):
        shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise DatasetError(f"{where}: a sample is not a {c}×{s}×{s} uint8 image ({shape}); corrupt shard")
    lab = item.get("label")
    if not isinstance(lab, int) or not 0 <= lab < k:
        raise DatasetError(f"{where}: a sample's label {lab!r} is outside 0..{k - 1}; corrupt shard")
    return img


# -- how much memory, which path ----------------------------------------------------------------------
def available_memory() -> int:
    """Bytes this process may still use: MemAvailable, capped by a cgroup limit, or ``IMGREC_MEMORY_LIMIT``
    (bytes, or with a K/M/G suffix) when set — to pretend a smaller machine."""
    env = os.environ.get("IMGREC_MEMORY_LIMIT")
    if env:
        return _parse_bytes(env)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = Path(f).read_text().strip()
            if v.isdigit() and int(v) < (1 << 60):
                used_f = f.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")
                used = int(Path(used_f).read_text().strip())
                left = int(v) - used
                avail = left if avail is None else min(avail, left)
        except (OSError, ValueError):
            continue
    if avail is None:
        try:
            import psutil
            avail = int(psutil.virtual_memory().available)
        except Exception:
            avail = 8 << 30
    return int(avail)


def _parse_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if t[-1:] in "KMGT" else t) * mult)
    except ValueError:
        raise DatasetError(f"IMGREC_MEMORY_LIMIT={text!r}: not a size (e.g. 2G, 500M)") from None


# The in-memory path holds the decoded split and, while loading, a second copy (resize, subset, the kept
# rows); keep that under half of what is available so the model, the optimizer and the OS keep the rest.
MEMORY_FACTOR = 2
MEMORY_SHARE = 0.5


def choose_stream(decoded_bytes: int, forced: bool | None) -> tuple[bool, str]:
    """(stream?, why) for a dataset whose splits decode to ``decoded_bytes``."""
    need, avail = decoded_bytes * MEMORY_FACTOR, available_memory()
    size = f"decoded size {_fmt(decoded_bytes)}"
    if forced is True:
        return True, f"{size}; --stream given"
    if forced is False:
        return False, f"{size}; --no-stream given"
    if need <= avail * MEMORY_SHARE:
        return False, f"{size} fits in memory ({_fmt(avail)} available)"
    return True, f"{size} does not fit in memory ({_fmt(avail)} available; in memory needs about {_fmt(need)})"


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# -- the streamed loader --------------------------------------------------------------------------------
def _bound_worker_heap(_worker_id: int) -> None:
    """In a loader worker, serve allocations ≥ 1 MB with their own mmap, returned to the OS when freed.

    Measured (tests/test_stream.py, 805 MB pack, 16 MB chunks): a worker's RSS grew by 760 MB over one epoch —
    the size of the data — although nothing keeps the chunks. glibc raises its mmap threshold up to 32 MB each
    time a large mmapped block is freed, after which every 16 MB chunk buffer comes from the worker thread's
    arena, which fragments and is never trimmed. A fixed threshold (which also turns the raising off) keeps the
    worker flat (+0 MB). Not glibc (musl, macOS): nothing to do.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _collate(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    imgs = [it.get("image") if isinstance(it, dict) else None for it in items]
    if not all(isinstance(x, torch.Tensor) and x.dtype == torch.uint8 for x in imgs):
        raise DatasetError("a sample is not a uint8 image tensor; corrupt shard")
    return torch.stack(imgs), torch.tensor([int(it["label"]) for it in items], dtype=torch.long)


class StreamLoader:
    """Streams a packed split in batches of normalised float tensors: the interface of
    :class:`~imgrec.data.memory.BatchLoader` (``len``, ``set_epoch``, ``iterate(start_step)``, iteration) plus
    ``state_dict()`` / ``load_state_dict()`` for exact mid-epoch resume.

    LitData's StreamingDataLoader reads the shards in ``num_workers`` processes (uint8 batches, so 4× less to
    pass between processes than floats); augmentation and normalisation run on the whole batch in the main
    process, on the device, with the generator seeded by (seed, epoch, step) exactly as BatchLoader does.
    The order is LitData's: chunks shuffled, then items within a chunk, seeded by (seed, epoch). Under
    torch.distributed each rank reads its own share, and ``drop_last`` gives every rank the same number of
    batches.
    """

    def __init__(self, split_dir: str, batch_size: int, mean, std, *, shuffle: bool = False, crop_padding: int = 0,
                 flip: bool = False, drop_last: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, num_workers: int = 1,
                 meta: dict | None = None, cache_dir: str | None = None, max_cache_size: str | None = None,
                 every_rank: bool = False):
        from litdata import StreamingDataLoader

        from imgrec.data.transforms import Preprocess

        self.split_dir = str(split_dir)
        self.index = check_index(self.split_dir, meta)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.crop_padding, self.flip = int(crop_padding), bool(flip)
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self.dataset = _dataset(self.split_dir, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                cache_dir=cache_dir, max_cache_size=max_cache_size, every_rank=every_rank)
        self.loader = StreamingDataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                          collate_fn=_collate, drop_last=drop_last,
                                          worker_init_fn=_bound_worker_heap if self.num_workers else None)
        self.preprocess = Preprocess(mean, std, self.device, channels_last=channels_last, dtype=dtype)
        self.epoch = 0
        self.step = 0                       # batches of self.epoch handed out so far
        self._restored: dict | None = None  # a checkpoint's loader state, used by the next iterate(start_step)
        self._pos = self._prev_pos = None   # LitData's (samples yielded, last worker) after this / the last batch
        self._len = len(self.loader)
        self._shape = None if meta is None else (int(meta["channels"]), int(meta["image_size"]),
                                                 int(meta["image_size"]))
        self._k = 0 if meta is None else len(meta["classes"])

    def __len__(self) -> int:
        return self._len

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _generator(self, *salt: int) -> torch.Generator:
        from imgrec.data.transforms import augment_generator
        return augment_generator(self.seed, self.epoch, *salt)  # as BatchLoader's

    def __iter__(self):
        return self.iterate(start_step=0)

    def iterate(self, start_step: int = 0):
        """Yield (x, y) from batch ``start_step`` of the current epoch onwards. ``start_step > 0`` needs the
        loader state saved at that step (``load_state_dict``), which the checkpoint carries."""
        start_step = int(start_step)
        st = self._restored
        self._restored = None
        self._pos = self._prev_pos = None
        if start_step > 0:
            pos = None
            if st and int(st.get("epoch", -1)) == self.epoch:
                # the trainer may have saved after LitData handed out a batch it never trained on (Ctrl-C inside
                # a step): the state one batch earlier is kept for that case
                if int(st.get("step", -1)) == start_step:
                    pos = st.get("litdata")
                elif int(st.get("step", -1)) == start_step + 1:
                    pos = st.get("litdata_prev")
            if pos is None:
                raise DatasetError(f"{self.split_dir}: cannot resume the stream at epoch {self.epoch + 1}, step "
                                   f"{start_step}: the checkpoint has no loader state for that position")
            self.loader.load_state_dict(pos)
            self._pos = (int(pos["num_samples_yielded"]), int(pos["latest_worker_idx"]))
        else:
            # LitData counts epochs itself (+1 per __iter__) and seeds its shuffle with that count; pin it to ours
            # so that the order depends on (seed, epoch) only, whatever happened before in this process
            self.loader.restore = False
            self.loader.current_epoch = self.epoch
        self.step = start_step
        it = iter(self.loader)
        while True:
            try:
                x, y = next(it)
            except StopIteration:
                break
            except DatasetError:
                raise
            except Exception as e:  # a shard damaged in a way its size did not show, a download that failed
                raise DatasetError(f"{self.split_dir}: cannot read a shard ({first_line(e, 200)})") from None
            # LitData's counters after handing out this batch (what its state_dict() is built from)
            pos = (int(self.loader._num_samples_yielded_streaming), int(self.loader._latest_worker_idx))
            if self._shape is not None and (tuple(x.shape[1:]) != self._shape or int(y.min()) < 0
                                            or int(y.max()) >= self._k):
                raise DatasetError(f"{self.split_dir}: a batch of {tuple(x.shape[1:])} images or labels outside "
                                   f"0..{self._k - 1} (the pack says {self._shape}); corrupt shard")
            step = self.step
            x = x.to(self.device, non_blocking=True)
            if self.crop_padding or self.flip:
                from imgrec.data.transforms import augment_batch
                x = augment_batch(x, self._generator(step), self.crop_padding, self.flip)
            x = self.preprocess(x)
            self._prev_pos, self._pos = self._pos, pos
            self.step = step + 1
            yield x, y.to(self.device, non_blocking=True)

    def _litdata_state(self, pos) -> dict | None:
        """StreamingDataLoader.state_dict() as of ``pos`` = (samples yielded, last worker), as plain values."""
        if pos is None:
            return None
        n, worker = pos
        ds = plain(self.dataset.state_dict(n, self.loader.num_workers, self.batch_size))
        return {"dataset": ds, "current_epoch": int(self.loader.current_epoch), "num_samples_yielded": n,
                "latest_worker_idx": worker}

    def state_dict(self) -> dict:
        """Where the stream is: epoch, step and LitData's loader state there and one batch earlier (numbers,
        strings and lists only, so the checkpoint stores it without pickle)."""
        mid = 0 < self.step < self._len
        return {"epoch": self.epoch, "step": self.step, "batch_size": self.batch_size,
                "num_workers": self.num_workers,
                "litdata": self._litdata_state(self._pos) if mid else None,
                "litdata_prev": self._litdata_state(self._prev_pos) if mid else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("litdata") is not None and (int(state.get("batch_size", self.batch_size)) != self.batch_size
                                                 or int(state.get("num_workers", self.num_workers)) != self.num_workers):
            raise DatasetError("the checkpoint's stream position was saved with another batch size or number of "
                               "loader workers; resume with the same settings")
        self._restored = state
        self.epoch = int(state.get("epoch", self.epoch))
        self.step = int(state.get("step", 0))


def default_workers() -> int:
    """Streaming DataLoader workers: none on ≤2 cores (reading raw pixels is a copy; a worker process would only
    compete with the training step for the cores), else up to 4."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if n <= 2 else min(4, n // 2)


