"""``imgrec data check``: what is wrong with a dataset before anyone trains on it.

One pass over every image of every split (named dataset, image folder or CSV list), one image at a time
through the safe decoder in a thread pool, keeping only a small fingerprint per image:

* unreadable or refused files, with the decoder's reason (the same :func:`~imgrec.data.decode.decode_image`
  that training uses, so what fails here fails there);
* size, aspect ratio, channels, pixel mode and file format (a summary, the outliers, and what imgrec will do
  with them);
* class counts per split and the imbalance ratio (largest class / smallest class);
* exact duplicates: identical decoded pixels (a BLAKE2b digest of the H×W×C array, so the same picture saved
  as PNG and as BMP is one image twice);
* near duplicates: found in two stages, both a few lines of numpy/Pillow (no new dependency):

  1. a 64-bit perceptual hash (pHash: the 8×8 lowest DCT frequencies of a 32×32 grayscale thumbnail compared
     with their median, as Zauner 2010 and the ``imagehash`` library compute it) indexes the images; pairs
     within Hamming distance ``HASH_RADIUS`` (10 of 64 bits) are candidates;
  2. a candidate pair is a near duplicate when the Pearson correlation of the two 16×16 grayscale thumbnails
     (antialiased) is at least ``NEAR_MIN_CORR`` (0.995).

  Why two stages, and these numbers (measured on Fashion-MNIST on this machine): its 28-pixel products look
  alike, and a pHash alone puts 1,158 of the 10,000 test images within distance 2 of some *distinct*
  training image, so a hash threshold either misses edits or floods the report. Over 200 real test images ×
  7 edits (JPEG re-encoded at quality 50 and 75, resized by ±3 pixels, brightened ×1.2 and ×1.3, resized by
  2 and saved as JPEG 80), 99% of the edited copies correlate with their original at ≥ 0.9955 (the worst,
  JPEG quality 50, at 0.989), and the hash moved by ≤ 10 bits except for brightening ×1.3 (≤ 12). Lower
  ``near_threshold`` finds harsher edits and more look-alike products; higher, the reverse. Blurred 32×32
  thumbnails separated about as well (at the same edit recall, 843 instead of 958 of the 3,000 most similar
  distinct pairs passed) for 4× the memory traffic, which made the pair search 5× slower.

On all 70,000 Fashion-MNIST images (2-core Zen 4, ~27 s): no exact duplicates (the 43 train, 1 test and 10
train/test byte-level duplicates reported in zalandoresearch/fashion-mnist issue 44 were replaced in 2017), and
1,060 near-duplicate pairs, 245 of them across train/test, touching 155 test images; 15 cross pairs correlate at
≥ 0.999 (the same product photo), the rest are mostly plain look-alike products (trousers, T-shirts); 8 pairs
carry different labels (`benchmarks/data_check_fmnist.py`).

Pairs are classified as within one split or **across splits** (leakage: a test or validation image whose
twin is in training), and as **conflicting** when their labels differ. Memory: per image a few dozen bytes
in RAM plus a 1 KiB thumbnail in a temporary memory-mapped file, never the pixels; the pair search compares
hashes in fixed-size tiles (O(N²) XOR-popcounts, about 2.5·10⁹ for Fashion-MNIST's 70,000 images).
"""
from __future__ import annotations

import hashlib
import html
import io
import math
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from imgrec.errors import DatasetError, ImageDecodeError

__all__ = ["check", "CheckReport", "phash", "thumbnail_vector", "fingerprint", "HASH_RADIUS", "NEAR_MIN_CORR",
           "Catalog", "catalog", "thumbnail_uri", "html_page"]

HASH_RADIUS = 10          # candidate pairs: pHash Hamming distance ≤ this (of 64 bits)
NEAR_MIN_CORR = 0.995     # near duplicate: correlation of 16×16 thumbnails ≥ this
THUMB = 32                # thumbnail side for the pHash
VERIFY = 16               # thumbnail side for the correlation
MAX_PAIRS = 200_000       # near pairs kept (a folder of near-identical images must not exhaust memory)
IMBALANCE_WARN = 3.0      # recommend something when largest/smallest class exceeds this
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------------
# Fingerprints


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.astype(np.float32)


_DCT = _dct_matrix(THUMB)


def _bilinear():
    from PIL import Image
    return Image.Resampling.BILINEAR  # antialiased when shrinking: Pillow widens the filter


def _gray_image(array: np.ndarray):
    """H×W×C uint8 → grayscale PIL image (a large photo is first reduced to ≤ 256 px: faster, same thumbnails)."""
    from PIL import Image
    im = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if im.mode != "L":
        im = im.convert("L")
    if max(im.size) > 256:
        im = im.reduce(max(1, max(im.size) // 128))
    return im


def phash(gray: np.ndarray) -> int:
    """64-bit pHash of a 32×32 float grayscale image: the 8×8 lowest DCT coefficients above their median
    (the median taken without the DC term, which only carries brightness)."""
    coeffs = (_DCT @ gray @ _DCT.T)[:8, :8].ravel()
    bits = coeffs > np.median(coeffs[1:])
    return int(np.packbits(bits).view(">u8")[0])


def thumbnail_vector(gray_img) -> np.ndarray:
    """Zero-mean, unit-norm 16×16 thumbnail of a grayscale PIL image as 256 float32: the dot product of two is
    their Pearson correlation (a flat image gives the zero vector, which matches nothing)."""
    from PIL import Image
    small = gray_img.resize((VERIFY, VERIFY), Image.Resampling.BILINEAR)
    v = np.asarray(small, dtype=np.float32).ravel()
    v = v - v.mean()
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 1e-3 else np.zeros_like(v)


def fingerprint(array: np.ndarray) -> tuple[bytes, int, np.ndarray]:
    """(pixel digest, pHash, thumbnail vector) of an H×W×C uint8 image."""
    digest = hashlib.blake2b(array.tobytes(), digest_size=16, person=b"imgrec-px1")
    digest.update(np.asarray(array.shape, dtype=np.int64).tobytes())
    gray = _gray_image(array)
    thumb = gray.resize((THUMB, THUMB), _bilinear())
    return digest.digest(), phash(np.asarray(thumb, dtype=np.float32)), thumbnail_vector(gray)


# ---------------------------------------------------------------------------------------------------
# What a source holds: (split, label, locator) per image, without pixels


@dataclass
class Catalog:
    """The images of a source: parallel lists, one entry per image. ``refs`` are paths (files) or indices
    into the named dataset's split (then ``arrays`` holds the IDX arrays, which are read whole anyway)."""
    name: str
    kind: str                     # "named", "folder" or "csv"
    classes: list[str]
    splits: list[str]
    labels: list[int]
    refs: list                    # Path for files, int index for named data
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    flip: bool = True
    # what the folder scan left out: {"hidden": n, "outside": n, "examples": [...]} (folder.FileList)
    skipped: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> dict:
        ref = self.refs[i]
        d = {"split": self.splits[i], "label": self.classes[self.labels[i]]}
        if isinstance(ref, (int, np.integer)):
            d["index"] = int(ref)
        else:
            d["path"] = str(ref)
        return d

    def pixels(self, i: int, channels: int | None = None) -> np.ndarray:
        """The image as H×W×C uint8 (through the safe decoder for files)."""
        ref = self.refs[i]
        if isinstance(ref, (int, np.integer)):
            a = self.arrays[self.splits[i]][int(ref)]
            return a[:, :, None] if a.ndim == 2 else a
        from imgrec.data.decode import decode_image
        return decode_image(ref, channels=channels)


def catalog(spec: str, data_dir: str | None = None, splits: Iterable[str] = SPLITS) -> Catalog:
    """List the images of a named dataset, image folder or CSV list (no decoding), from the source registry
    (imgrec.data.sources) as training reads it."""
    from imgrec.data import folder as folder_source
    from imgrec.data.sources import _is_csv, list_source
    want = tuple(splits)
    # a CSV list is read one label per row here, as before multi-label lists existed: the checks need one class
    listing = list_source(spec, data_dir=data_dir, splits=want, task="classification" if _is_csv(spec) else None)
    sp, labels, refs = [], [], []
    if listing.in_memory:
        arrays = {}
        for s in ("train", "test"):
            if s in want and s in listing.splits:
                part = listing.splits[s]
                arrays[s] = part["images"]
                sp += [s] * len(part["labels"])
                labels += [int(v) for v in part["labels"]]
                refs += list(range(len(part["labels"])))
        # kind "named": the images are arrays in memory (what the checks and the audit read them as)
        return Catalog(listing.name, "named", list(listing.classes), sp, labels, refs, arrays, listing.flip)
    skipped = folder_source.FileList()
    for s in SPLITS:
        if s in listing.splits and s in want:
            part = listing.splits[s]
            sp += [s] * len(part["paths"])
            labels += list(part["labels"])
            refs += list(part["paths"])
            skipped.absorb(part["paths"])
    return Catalog(listing.name, listing.kind, list(listing.classes), sp, labels, refs,
                   skipped={**skipped.skipped, "examples": skipped.examples} if listing.kind == "folder" else {})


# ---------------------------------------------------------------------------------------------------
# The streaming pass


def bounded_map(fn: Callable, items: Iterable, workers: int, window: int = 1024) -> Iterator:
    """``map(fn, items)`` in a thread pool, in order, with at most ``window`` results pending: memory stays
    bounded however many items there are (``Executor.map`` would submit them all at once)."""
    from collections import deque
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr, shown on a terminal or for long jobs (a log of a big run still shows progress)."""
    from tqdm import tqdm
    show = enabled and (sys.stderr.isatty() or total >= 20_000)
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not show, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 10.0)


def _inspect_file(path) -> tuple:
    """Decode one file; returns ("ok", (w, h, channels, mode, format, nbytes), fingerprint) or ("bad", reason)."""
    from PIL import Image

    from imgrec.data.decode import DEFAULT_MAX_BYTES, _read_path, decode_image, sniff_format
    source = str(path)
    try:
        data = _read_path(os.fspath(path), DEFAULT_MAX_BYTES, source)  # regular files only, bounded read
        array = decode_image(data, channels=None, source=source)
    except ImageDecodeError as e:
        return "bad", e.reason
    fmt = sniff_format(data) or "?"
    try:  # the header of a file that just decoded: its pixel mode before conversion (RGBA, P, I;16, CMYK …)
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            mode = im.mode
    except Exception:  # noqa: BLE001 - the mode is informational only
        mode = "?"
    h, w, c = array.shape
    return "ok", (w, h, c, mode, fmt, len(data)), fingerprint(array)


def _inspect_array(array: np.ndarray) -> tuple:
    a = array[:, :, None] if array.ndim == 2 else array
    h, w, c = a.shape
    return "ok", (w, h, c, "L" if c == 1 else "RGB", "IDX", h * w * c), fingerprint(a)


# ---------------------------------------------------------------------------------------------------
# The report


@dataclass
class CheckReport:
    """What :func:`check` found. ``to_dict()`` is the ``--json`` output; ``problems`` what ``--strict`` fails on."""
    data: dict
    catalog: Catalog | None = None

    def to_dict(self) -> dict:
        return self.data

    @property
    def leakage(self) -> int:
        return self._groups_and_pairs("leakage")

    @property
    def conflicts(self) -> int:
        return self._groups_and_pairs("conflicting_labels")

    def _groups_and_pairs(self, finding: str) -> int:
        """Exact groups plus near pairs counted under ``finding`` ("leakage", "conflicting_labels")."""
        return int(self.data[finding]["exact_groups"] + self.data[finding]["near_pairs"])

    @property
    def problems(self) -> list[str]:
        out = []
        if self.leakage:
            out.append(f"{self.data['leakage']['eval_images_with_train_twin']} evaluation image(s) duplicated in "
                       f"training ({self.data['leakage']['exact_groups']} exact group(s), "
                       f"{self.data['leakage']['near_pairs']} near pair(s))")
        if self.conflicts:
            out.append(f"duplicates with conflicting labels ({self.data['conflicting_labels']['exact_groups']} "
                       f"exact group(s), {self.data['conflicting_labels']['near_pairs']} near pair(s))")
        return out

    def summary(self, limit: int = 5) -> str:
        """A human-readable text report."""
        d = self.data
        lines = [f"{d['source']} ({d['kind']}): {d['images']} images, {d['readable']} readable, "
                 f"{len(d['classes'])} classes, splits: "
                 + ", ".join(f"{s} {n}" for s, n in d["split_sizes"].items()) + f"  [{d['time_s']:.1f} s]"]
        sk = d.get("skipped") or {}
        if sk.get("hidden") or sk.get("outside"):
            lines.append(f"skipped: {sk.get('hidden', 0)} hidden or system entries (.* files and folders, ._* "
                         f"AppleDouble files, __MACOSX), {sk.get('outside', 0)} symbolic link(s) leading outside "
                         f"the folder; e.g. " + ", ".join(sk.get("examples", [])[:3]))
        bad = d["unreadable"]
        lines.append(f"unreadable files: {len(bad)}")
        for b in bad[:limit]:
            lines.append(f"  {b['path']}: {b['reason']}")
        if len(bad) > limit:
            lines.append(f"  … and {len(bad) - limit} more")
        sz = d["sizes"]
        if sz:
            lines.append(f"sizes: width {sz['width']['min']}–{sz['width']['max']} (median {sz['width']['median']}), "
                         f"height {sz['height']['min']}–{sz['height']['max']} (median {sz['height']['median']}), "
                         f"square {sz['square_fraction']:.0%}; channels "
                         + ", ".join(f"{k}: {v}" for k, v in sz["channels"].items())
                         + "; modes " + ", ".join(f"{k}: {v}" for k, v in sz["modes"].items())
                         + "; formats " + ", ".join(f"{k}: {v}" for k, v in sz["formats"].items()))
            if sz["outliers"]:
                lines.append(f"size outliers: {len(sz['outliers'])}, e.g. "
                             + "; ".join(f"{_where(o)} {o['width']}x{o['height']}" for o in sz["outliers"][:3]))
        lines.append("class counts:")
        for s, counts in d["class_counts"].items():
            ratio = d["imbalance"].get(s)
            lines.append(f"  {s}: " + ", ".join(f"{c} {n}" for c, n in counts.items())
                         + (f"  (imbalance {ratio:.2f})" if ratio is not None else "  (imbalance: a class is empty)"))
        ex, near = d["exact_duplicates"], d["near_duplicates"]
        lines.append(f"exact duplicates: {len(ex)} group(s) ({sum(g['across_splits'] for g in ex)} across splits, "
                     f"{sum(g['conflicting'] for g in ex)} with conflicting labels)")
        for g in ex[:limit]:
            lines.append("  " + " = ".join(_where(m) for m in g["members"]))
        lines.append(f"near duplicates: {d['near_pairs_total']} pair(s) ({sum(p['across_splits'] for p in near)} "
                     f"across splits, {sum(p['conflicting'] for p in near)} with conflicting labels)"
                     + (" [list truncated]" if d["near_pairs_truncated"] else ""))
        shown = sorted(near, key=lambda p: (not p["across_splits"], not p["conflicting"], -p["similarity"]))
        for p in shown[:limit]:
            lines.append(f"  {_where(p['a'])} ~ {_where(p['b'])}  (corr {p['similarity']:.4f}, hash distance "
                         f"{p['hamming']})")
        lk = d["leakage"]
        lines.append(f"leakage: {lk['eval_images_with_train_twin']} evaluation image(s) with a twin in training "
                     f"({lk['exact_groups']} exact group(s), {lk['near_pairs']} near pair(s))")
        for r in d["recommendations"]:
            lines.append(f"note: {r}")
        return "\n".join(lines)

    def write_html(self, path: str | os.PathLike, limit: int = 500) -> Path:
        """A self-contained HTML report (thumbnails as data: URIs, every user string escaped)."""
        from imgrec.safeio import atomic_write_text
        path = Path(path)
        atomic_write_text(path, _render_html(self, limit))
        return path


def _where(m: dict) -> str:
    loc = m.get("path") if "path" in m else f"#{m['index']}"
    return f"{m['split']}:{loc} [{m['label']}]"


def check_settings(near_threshold: float, hash_radius: int, error: type[Exception] = ValueError,
                   names: tuple[str, str] = ("near_threshold", "hash_radius")) -> None:
    """``error`` for a near-duplicate threshold outside (0, 1] or a pHash radius outside 0..64; ``names``: how
    the message calls them (the CLI's option names there)."""
    if not 0.0 < near_threshold <= 1.0:
        raise error(f"{names[0]} must be in (0, 1], not {near_threshold}")
    if not 0 <= hash_radius <= 64:
        raise error(f"{names[1]} must be in 0..64, not {hash_radius}")


def check(source: str, *, data_dir: str | None = None, near_threshold: float = NEAR_MIN_CORR,
          hash_radius: int = HASH_RADIUS, workers: int | None = None, progress: bool = True,
          splits: Iterable[str] = SPLITS) -> CheckReport:
    """Check a dataset (named dataset, image folder or CSV list) for unreadable files, size and mode outliers,
    class imbalance, exact and near duplicates within and across splits, and duplicates with conflicting labels.

    Args:
        source: ``fashion-mnist``, ``mnist``, a folder (``root/<class>/<image>``, optionally under
            train/ val/ test/) or a CSV list (``path,label[,split]``).
        data_dir: folder holding a named dataset's IDX files.
        near_threshold: minimum thumbnail correlation of a near-duplicate pair (default 0.995).
        hash_radius: pHash Hamming radius within which pairs are compared (default 10 of 64 bits).
        workers: decoding threads (default: the usable cores).
        progress: show progress bars on stderr (on a terminal, or for more than 20,000 images).

    Raises:
        DatasetError: the source does not exist, has fewer than two classes, or no readable image.
    """
    t0 = time.perf_counter()
    check_settings(near_threshold, hash_radius)
    cat = catalog(source, data_dir, splits)
    n = len(cat)
    if n == 0:
        raise DatasetError(f"{source}: no images found")
    workers = workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                             (os.cpu_count() or 1))
    seen, exact_groups, near = _scan(cat, source, hash_radius, near_threshold, workers, progress)
    data = _report_data(source, cat, seen, exact_groups, near, hash_radius, near_threshold)
    data["recommendations"] = _recommendations(data, cat)
    data["time_s"] = round(time.perf_counter() - t0, 2)
    return CheckReport(data, cat)


def _scan(cat: Catalog, source: str, hash_radius: int, near_threshold: float, workers: int,
          progress: bool) -> tuple[dict, list[list[int]], tuple]:
    """Decode every image once (``_inspect_all``), then group the exact duplicates and find the near pairs:
    ``(seen, exact_groups, (pairs, truncated, total_pairs))``. DatasetError when no image is readable."""
    n = len(cat)
    with tempfile.TemporaryDirectory(prefix="imgrec-check-") as tmp:
        # thumbnails on disk, not in RAM: 1 KiB per image, paged in by the OS while pairs are verified
        vecs = np.lib.format.open_memmap(os.path.join(tmp, "thumbs.npy"), mode="w+", dtype=np.float32,
                                         shape=(n, VERIFY * VERIFY))
        seen = _inspect_all(cat, vecs, workers, progress)
        ok, bad = seen["ok"], seen["bad"]
        if int(ok.sum()) == 0:
            raise DatasetError(f"{source}: none of its {n} images is readable (e.g. {bad[0]['path']}: "
                               f"{bad[0]['reason']})" if bad else f"{source}: no readable images")
        vecs.flush()
        exact_groups = _exact_groups(seen["digests"])
        group_of = {i: gi for gi, g in enumerate(exact_groups) for i in g}
        near = _near_pairs(seen["hashes"], vecs, ok, hash_radius, near_threshold, group_of, workers, progress)
        del vecs
    return seen, exact_groups, near


def _report_data(source: str, cat: Catalog, seen: dict, exact_groups: list[list[int]], near_pairs: tuple,
                 hash_radius: int, near_threshold: float) -> dict:
    """The report's numbers and findings (``CheckReport.data``), all but the recommendations and the time."""
    pairs, truncated, total_pairs = near_pairs
    ok = seen["ok"]
    exact, near, twins = _duplicates(cat, exact_groups, pairs)
    data = {
        "source": source, "kind": cat.kind, "classes": cat.classes, "images": len(cat), "readable": int(ok.sum()),
        "split_sizes": dict(Counter(cat.splits)),
        "unreadable": seen["bad"],
        "skipped": cat.skipped,
        "sizes": _size_summary(cat, ok, seen["width"], seen["height"], seen["chans"], seen["modes"], seen["formats"]),
        "class_counts": {}, "imbalance": {},
        "exact_duplicates": exact, "near_duplicates": near,
        "near_pairs_total": total_pairs, "near_pairs_truncated": truncated,
        "leakage": {"exact_groups": sum(g["across_splits"] for g in exact),
                    "near_pairs": sum(p["across_splits"] for p in near),
                    "eval_images_with_train_twin": len(twins)},
        "conflicting_labels": {"exact_groups": sum(g["conflicting"] for g in exact),
                               "near_pairs": sum(p["conflicting"] for p in near)},
        "settings": {"hash": "pHash 64-bit (8x8 DCT of 32x32 grayscale)", "hash_radius": hash_radius,
                     "near_threshold": near_threshold, "thumbnail": VERIFY},
    }
    _class_counts(data, cat, ok)
    return data


def _inspect_all(cat: Catalog, vecs: np.ndarray, workers: int, progress: bool) -> dict:
    """Every image decoded once, in a thread pool: its digest, pHash, thumbnail (into ``vecs``), size, channels,
    mode and format; the unreadable ones listed with their reason."""
    n = len(cat)
    seen = {"digests": [None] * n, "hashes": np.zeros(n, dtype=np.uint64), "ok": np.zeros(n, dtype=bool),
            "width": np.zeros(n, dtype=np.int32), "height": np.zeros(n, dtype=np.int32),
            "chans": np.zeros(n, dtype=np.int8), "modes": Counter(), "formats": Counter(), "bad": []}
    if cat.kind == "named":
        jobs: Iterable = (cat.arrays[cat.splits[i]][cat.refs[i]] for i in range(n))
        fn: Callable = _inspect_array
    else:
        jobs, fn = iter(cat.refs), _inspect_file
    with progress_bar(n, "checking", progress) as bar:
        for i, res in enumerate(bounded_map(fn, jobs, workers)):
            bar.update(1)
            if res[0] == "bad":
                seen["bad"].append({**cat.describe(i), "reason": res[1]})
                continue
            (w, h, c, mode, fmt, _), (digest, ph, vec) = res[1], res[2]
            seen["ok"][i] = True
            seen["digests"][i], seen["hashes"][i], vecs[i] = digest, ph, vec
            seen["width"][i], seen["height"][i], seen["chans"][i] = w, h, c
            seen["modes"][mode] += 1
            seen["formats"][fmt] += 1
    return seen


def _duplicates(cat: Catalog, exact_groups: list[list[int]], pairs) -> tuple[list[dict], list[dict], set[int]]:
    """Exact groups and near pairs as reported (across splits? conflicting labels?), and the evaluation images
    (val/test) with a twin in train: the number that says how much a test score is inflated. val ↔ test pairs
    are leakage too (model selection on test images), counted in the pairs."""
    split_arr = np.array([SPLITS.index(s) for s in cat.splits], dtype=np.int8)
    label_arr = np.asarray(cat.labels, dtype=np.int64)
    exact = [{"members": [cat.describe(i) for i in g], "across_splits": len({cat.splits[i] for i in g}) > 1,
              "conflicting": len({cat.labels[i] for i in g}) > 1} for g in exact_groups]
    near = [{"a": cat.describe(i), "b": cat.describe(j), "hamming": int(ham), "similarity": round(float(corr), 5),
             "across_splits": bool(split_arr[i] != split_arr[j]), "conflicting": bool(label_arr[i] != label_arr[j])}
            for i, j, ham, corr in pairs]
    twins: set[int] = set()
    for g in exact_groups:
        if any(cat.splits[i] == "train" for i in g):
            twins |= {i for i in g if cat.splits[i] != "train"}
    for i, j, _, _ in pairs:
        if cat.splits[i] == "train" and cat.splits[j] != "train":
            twins.add(j)
        elif cat.splits[j] == "train" and cat.splits[i] != "train":
            twins.add(i)
    return exact, near, twins


def _class_counts(data: dict, cat: Catalog, ok: np.ndarray) -> None:
    """Readable images per class and the largest/smallest class ratio, per split present."""
    split_arr = np.array([SPLITS.index(s) for s in cat.splits], dtype=np.int8)
    label_arr = np.asarray(cat.labels, dtype=np.int64)
    for s in SPLITS:
        mask = (split_arr == SPLITS.index(s)) & ok
        if (split_arr == SPLITS.index(s)).any():
            counts = np.bincount(label_arr[mask], minlength=len(cat.classes))
            data["class_counts"][s] = {c: int(k) for c, k in zip(cat.classes, counts)}
            data["imbalance"][s] = round(float(counts.max() / counts.min()), 3) if counts.min() > 0 else None


def _exact_groups(digests: list[bytes | None]) -> list[list[int]]:
    seen: dict[bytes, list[int]] = {}
    for i, d in enumerate(digests):
        if d is not None:
            seen.setdefault(d, []).append(i)
    return [g for g in seen.values() if len(g) > 1]


def _near_pairs(hashes: np.ndarray, vecs: np.ndarray, ok: np.ndarray, radius: int, threshold: float,
                group_of: dict[int, int], workers: int, progress: bool):
    """All pairs i < j with pHash distance ≤ radius and thumbnail correlation ≥ threshold (exact-duplicate
    pairs left out: they are reported as groups). Returns (pairs, truncated, total)."""
    idx = np.nonzero(ok)[0]
    h = hashes[idx]
    m = len(idx)
    # tiles of 256 rows × 32,768 columns: the XOR temporary is 64 MiB per thread whatever the image count
    block, cols = 256, 32_768

    def one_block(start: int) -> list[tuple[int, int, int, float]]:
        rows = h[start:start + block]
        out = []
        for c0 in range(start, m, cols):
            d = np.bitwise_count(rows[:, None] ^ h[None, c0:c0 + cols])
            ii, jj = np.nonzero(d <= radius)
            upper = c0 + jj > start + ii  # each pair once (j > i), never an image with itself
            ii, jj = ii[upper], jj[upper]
            dist_all = d[ii, jj]
            del d
            for s in range(0, len(ii), 20_000):  # verify candidates in bounded batches
                a, b = idx[start + ii[s:s + 20_000]], idx[c0 + jj[s:s + 20_000]]
                corr = np.einsum("ij,ij->i", vecs[a], vecs[b])
                hit = corr >= threshold
                for x, y, c, dist in zip(a[hit], b[hit], corr[hit], dist_all[s:s + 20_000][hit]):
                    gx, gy = group_of.get(int(x)), group_of.get(int(y))
                    if gx is not None and gx == gy:
                        continue
                    out.append((int(x), int(y), int(dist), float(c)))
        return out

    pairs: list = []
    total = 0
    truncated = False
    starts = range(0, m, block)
    with progress_bar(m, "comparing", progress) as bar:
        for found in bounded_map(one_block, starts, workers, window=2 * workers):
            bar.update(min(block, m - bar.n))
            total += len(found)
            room = MAX_PAIRS - len(pairs)
            if len(found) > room:
                truncated = True
                found = sorted(found, key=lambda p: -p[3])[:max(room, 0)]
            pairs += found
    pairs.sort(key=lambda p: (-p[3], p[0], p[1]))
    return pairs, truncated, total


def _stats(v: np.ndarray) -> dict:
    return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}


def _size_summary(cat: Catalog, ok, width, height, chans, modes, formats) -> dict:
    if not ok.any():
        return {}
    w, h = width[ok].astype(np.float64), height[ok].astype(np.float64)
    aspect = w / h
    med_w, med_h = np.median(w), np.median(h)
    # outliers: more than 4× off the median side, or an aspect ratio past 2:1 either way, or under 8 px
    odd = ok & ((width > 4 * med_w) | (width < med_w / 4) | (height > 4 * med_h) | (height < med_h / 4)
                | (width > 2 * height) | (height > 2 * width) | (np.minimum(width, height) < 8))
    outliers = [{**cat.describe(int(i)), "width": int(width[i]), "height": int(height[i])}
                for i in np.nonzero(odd)[0][:1000]]
    return {
        "width": _stats(w), "height": _stats(h),
        "aspect": {"min": round(float(aspect.min()), 3), "median": round(float(np.median(aspect)), 3),
                   "max": round(float(aspect.max()), 3)},
        "square_fraction": round(float((np.abs(aspect - 1) <= 0.05).mean()), 4),
        "channels": {("grayscale" if c == 1 else "colour"): int((chans[ok] == c).sum()) for c in (1, 3)
                     if (chans[ok] == c).any()},
        "modes": dict(modes.most_common()), "formats": dict(formats.most_common()),
        "outliers": outliers, "outliers_total": int(odd.sum()),
    }


def _recommendations(d: dict, cat: Catalog) -> list[str]:
    out = []
    sz = d["sizes"]
    if d["unreadable"]:
        out.append(f"{len(d['unreadable'])} file(s) cannot be decoded: `imgrec train` stops on them unless given "
                   f"--on-bad-image skip; fix or remove them")
    if sz and cat.kind != "named":
        if sz["square_fraction"] < 0.5:
            out.append(f"most images are not square (median aspect {sz['aspect']['median']}): imgrec squashes each "
                       f"image to --image-size × --image-size without cropping, so shapes are distorted; crop or pad "
                       f"them first if the aspect carries meaning")
        side = min(sz["width"]["median"], sz["height"]["median"])
        if side >= 96:
            out.append(f"median image side is {side:.0f} px but imgrec trains files at --image-size 32 by default; "
                       f"pass --image-size 64 or more if detail matters")
        elif side < 32:
            out.append(f"median image side is {side:.0f} px: the default --image-size 32 enlarges them; "
                       f"pass --image-size {int(side)} to train at their own size")
        ch = sz["channels"]
        if len(ch) == 2:
            out.append(f"grayscale ({ch['grayscale']}) and colour ({ch['colour']}) images are mixed: imgrec decodes "
                       f"all of them as colour when any of the first 32 training images is colour (grayscale is "
                       f"replicated to 3 channels); pass --channels to choose")
        if any(m in sz["modes"] for m in ("RGBA", "LA", "PA", "P")):
            out.append("some images have transparency: it is composited onto white before training")
    for s, ratio in d["imbalance"].items():
        if ratio is None:
            empty = [c for c, k in d["class_counts"][s].items() if k == 0]
            out.append(f"{s} split has no images of: {', '.join(empty[:10])}")
        elif ratio > IMBALANCE_WARN:
            out.append(f"{s} split is imbalanced (largest/smallest class {ratio:.1f}): accuracy hides the small "
                       f"classes; read per-class recall (`imgrec report`), collect more of the small classes, or "
                       f"train with --class-weights auto, --sampler balanced or --logit-adjust")
    lk = d["leakage"]
    if lk["exact_groups"] or lk["near_pairs"]:
        out.append(f"{lk['eval_images_with_train_twin']} validation/test image(s) have a duplicate in training: "
                   f"test accuracy is inflated; remove them from one side")
    within = sum(1 for g in d["exact_duplicates"] if not g["across_splits"] and g["members"][0]["split"] == "train")
    if within and "val" not in d["split_sizes"]:
        out.append(f"{within} exact duplicate group(s) inside train: the validation split imgrec carves from train "
                   f"can put copies on both sides, inflating validation accuracy")
    cf = d["conflicting_labels"]
    if cf["exact_groups"] or cf["near_pairs"]:
        out.append("duplicates with different labels: at most one label is right; fix the labels "
                   "(`imgrec data audit` ranks likely label errors)")
    return out


# ---------------------------------------------------------------------------------------------------
# HTML (self-contained; shared with the audit's gallery)


def thumbnail_uri(array: np.ndarray, side: int = 96) -> str:
    """An H×W×C uint8 image as a PNG data: URI, scaled so its longer side is ``side`` (small ones enlarged
    with nearest-neighbour so pixels stay visible)."""
    import base64

    from PIL import Image
    im = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    scale = side / max(im.size)
    size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
    im = im.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}.pair{display:inline-block;margin:6px;padding:6px;border:1px solid #ddd;
border-radius:4px;font-size:12px;max-width:560px;vertical-align:top}.pair img{image-rendering:pixelated;
border:1px solid #ccc;margin:2px}.bad{color:#a00}.warn{background:#fff4e0;padding:6px 10px;border-left:4px solid
#e90;margin:4px 0}.tag{display:inline-block;padding:0 5px;border-radius:3px;background:#eee;margin-right:3px}
.member{display:inline-block;width:160px;margin:2px 6px 2px 0;vertical-align:top;word-break:break-all}.leak{background:#fdd}.conf{background:#ffd}.card{display:inline-block;margin:5px;padding:5px;border:1px solid #ddd;
border-radius:4px;font-size:12px;width:150px;vertical-align:top;word-wrap:break-word}"""


def html_page(title: str, body: str) -> str:
    """A whole HTML document with the shared style; ``body`` must already be escaped."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width\"><style>{_CSS}</style></head>"
            f"<body>{body}</body></html>\n")


def _img(cat: Catalog | None, member: dict, idx: int | None) -> str:
    if cat is None or idx is None:
        return ""
    try:
        return f'<img src="{thumbnail_uri(cat.pixels(idx))}" alt="">'
    except ImageDecodeError:
        return '<span class="bad">[unreadable]</span>'


def _member_html(m: dict) -> str:
    loc = m.get("path", f"#{m.get('index')}")
    return (f'<span class="tag">{html.escape(m["split"])}</span><b>{html.escape(m["label"])}</b> '
            f'{html.escape(str(loc))}')


def _thumbnailer(cat: Catalog | None) -> Callable[[dict], str]:
    """A member dict (split and index or path) → its thumbnail ``<img>`` (or nothing without a catalog)."""
    lookup: dict = {}
    if cat is not None:
        for i in range(len(cat)):
            ref = cat.refs[i]
            lookup[(cat.splits[i], int(ref) if isinstance(ref, (int, np.integer)) else str(ref))] = i

    def img(m: dict) -> str:
        return _img(cat, m, lookup.get((m["split"], m["index"] if "index" in m else m.get("path"))))
    return img


def _overview_html(d: dict) -> list[str]:
    e = html.escape
    parts = [f"<h1>Data check: {e(d['source'])}</h1>",
             f"<p>{d['images']} images ({e(d['kind'])}), {d['readable']} readable, {len(d['classes'])} classes; "
             + ", ".join(f"{e(s)}: {k}" for s, k in d["split_sizes"].items()) + f". Checked in {d['time_s']} s.</p>"]
    for r in d["recommendations"]:  # they include the leakage and conflicts that --strict fails on
        parts.append(f'<div class="warn">{e(r)}</div>')
    return parts


def _unreadable_html(unreadable: list[dict], limit: int) -> list[str]:
    e = html.escape
    parts = [f"<h2>Unreadable files ({len(unreadable)})</h2>"]
    if unreadable:
        rows = "".join(f"<tr><td>{e(b['split'])}</td><td>{e(b['label'])}</td><td>{e(b['path'])}</td>"
                       f"<td class=bad>{e(b['reason'])}</td></tr>" for b in unreadable[:limit])
        parts.append(f"<table><tr><th>split</th><th>label</th><th>file</th><th>reason</th></tr>{rows}</table>")
    return parts


def _sizes_html(sz: dict, img: Callable[[dict], str], limit: int) -> list[str]:
    if not sz:
        return []
    parts = ["<h2>Sizes and modes</h2><table>"]
    for k in ("width", "height"):
        parts.append(f"<tr><th>{k}</th><td>min {sz[k]['min']}, median {sz[k]['median']}, max {sz[k]['max']}</td></tr>")
    parts.append(f"<tr><th>aspect (w/h)</th><td>min {sz['aspect']['min']}, median {sz['aspect']['median']}, "
                 f"max {sz['aspect']['max']}; square {sz['square_fraction']:.0%}</td></tr>")
    for k in ("channels", "modes", "formats"):
        parts.append(f"<tr><th>{k}</th><td>" + ", ".join(f"{html.escape(str(a))}: {b}" for a, b in sz[k].items())
                     + "</td></tr>")
    parts.append("</table>")
    if sz["outliers"]:
        parts.append(f"<p>Size outliers ({sz['outliers_total']}):</p><div>")
        for o in sz["outliers"][:limit]:
            parts.append(f'<div class="card">{img(o)}<br>{_member_html(o)} {o["width"]}×{o["height"]}</div>')
        parts.append("</div>")
    return parts


def _class_counts_html(d: dict) -> list[str]:
    e = html.escape
    parts = ["<h2>Class counts</h2><table><tr><th>class</th>"
             + "".join(f"<th>{e(s)}</th>" for s in d["class_counts"]) + "</tr>"]
    for c in d["classes"]:
        parts.append(f"<tr><td>{e(c)}</td>" + "".join(f"<td>{d['class_counts'][s][c]}</td>" for s in d["class_counts"])
                     + "</tr>")
    parts.append("<tr><th>imbalance</th>" + "".join(
        f"<td>{'–' if v is None else v}</td>" for v in d["imbalance"].values()) + "</tr></table>")
    return parts


def _finding_class(f: dict) -> str:
    """A duplicate group's or pair's CSS classes: red across splits (leakage), yellow with conflicting labels."""
    return "pair" + (" leak" if f["across_splits"] else "") + (" conf" if f["conflicting"] else "")


# the duplicate sections, leakage first (a group or pair across splits is shown there whether or not its labels
# also disagree): (title for exact groups, title for near pairs, which findings)
_DUPLICATE_SECTIONS = (
    ("Exact duplicates across splits", "Near duplicates across splits", lambda f: f["across_splits"]),
    ("Duplicates with conflicting labels", "Near duplicates with conflicting labels",
     lambda f: f["conflicting"] and not f["across_splits"]),
    ("Exact duplicates within a split", "Near duplicates within a split",
     lambda f: not f["across_splits"] and not f["conflicting"]),
)


def _duplicates_html(d: dict, img: Callable[[dict], str], limit: int) -> list[str]:
    def group_html(g: dict) -> str:
        inner = "".join(f'<span class="member">{img(m)}<br>{_member_html(m)}</span>' for m in g["members"])
        return f'<div class="{_finding_class(g)}">{inner}</div>'

    def pair_html(p: dict) -> str:
        a, b = p["a"], p["b"]
        return (f'<div class="{_finding_class(p)}">{img(a)}{img(b)}<br>{_member_html(a)}<br>{_member_html(b)}'
                f'<br>correlation {p["similarity"]:.4f}, hash distance {p["hamming"]}</div>')

    parts = ["<p>Red: across splits (leakage). Yellow: labels disagree.</p>"]
    for exact_title, near_title, keep in _DUPLICATE_SECTIONS:
        parts += _section_html(exact_title, [g for g in d["exact_duplicates"] if keep(g)], group_html, limit)
        parts += _section_html(near_title, [p for p in d["near_duplicates"] if keep(p)], pair_html, limit)
    return parts


def _section_html(title: str, items: list, render: Callable[[dict], str], limit: int) -> list[str]:
    more = [f"<p>… and {len(items) - limit} more (all of them are in the --json output)</p>"] if len(items) > limit else []
    return [f"<h2>{html.escape(title)} ({len(items)})</h2><div>", *map(render, items[:limit]), *more, "</div>"]


def _method_html(st: dict) -> str:
    return (f"<h2>Method</h2><p>Exact: identical decoded pixels. Near: {html.escape(st['hash'])} within Hamming "
            f"distance {st['hash_radius']}, then correlation of {st['thumbnail']}×{st['thumbnail']} grayscale "
            f"thumbnails ≥ {st['near_threshold']}.</p>")


def _render_html(report: CheckReport, limit: int) -> str:
    d = report.data
    img = _thumbnailer(report.catalog)
    parts = (_overview_html(d) + _unreadable_html(d["unreadable"], limit) + _sizes_html(d["sizes"], img, limit)
             + _class_counts_html(d) + _duplicates_html(d, img, limit) + [_method_html(d["settings"])])
    return html_page(f"imgrec data check: {d['source']}", "\n".join(parts))
