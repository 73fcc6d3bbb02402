"""What a dataset looks like before it is decoded: how many training images, of which sizes, grey or colour,
how many classes and how balanced — the facts the default recipe is chosen from (``imgrec.engine.recipes``).

The facts are asked of the source that claims the dataset (imgrec.data.sources): a source may describe itself
(``Source.describe``: the named datasets know their counts and sizes without reading a file); the others are
described from their listing, where only file headers are read (Pillow's lazy ``Image.open`` reads the size
and mode, no pixels), of at most ``sample`` files spread evenly over the training files, so probing a folder
of 50,000 images costs about as long as listing it. A file whose header cannot be read is left out of the size statistics; decoding reports it.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field

from imgrec.errors import ConfigError, DatasetError, ImageDecodeError

# grey modes: one channel after decoding (palette and two-channel images are treated as the decoder does)
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
HEADER_BYTES = 64 << 10  # enough for the size and mode of every allowed format (EXIF blocks included)


@dataclass
class DataProbe:
    """A dataset's shape, as far as the recipe needs it. Sides and aspect ratios are of the sampled files."""
    kind: str                              # the source's kind (named, folder, csv, …), pack or tensor
    n_train: int                           # training images after the validation split is carved
    num_classes: int
    counts: list[int] = field(default_factory=list)   # training files per class (before the split)
    channels: int = 1                      # 3 when any sampled image is colour
    min_side: int = 28
    median_side: int = 28
    max_side: int = 28
    aspect_min: float = 1.0                # width / height
    aspect_max: float = 1.0
    sampled: int = 0                       # headers read for the size statistics
    has_val: bool = False                  # the source brings its own validation split

    @property
    def imbalance(self) -> float:
        """Largest class over smallest (inf when a class has no training image)."""
        c = [x for x in self.counts]
        if not c:
            return 1.0
        return math.inf if min(c) == 0 else max(c) / min(c)

    def describe(self) -> str:
        """``1,437 training images, 10 classes, colour, 25–225 px (median 64)``: for the recipe's reason."""
        colour = "colour" if self.channels == 3 else "grey"
        sides = (f"{self.median_side} px" if self.min_side == self.max_side
                 else f"{self.min_side}–{self.max_side} px (median {self.median_side})")
        return f"{self.n_train:,} training images, {self.num_classes} classes, {colour}, {sides}"

    def image_sizes(self) -> dict:
        """The training images' size range, as the model directory records it (``data.image_sizes``), so that
        prediction can say when an input lies far outside it."""
        return {"min_side": self.min_side, "median_side": self.median_side, "max_side": self.max_side,
                "aspect_min": round(self.aspect_min, 3), "aspect_max": round(self.aspect_max, 3),
                "channels_seen": self.channels, "sampled": self.sampled}

    def to_dict(self) -> dict:
        return asdict(self)


def probe_tensor(n_train: int, num_classes: int, channels: int, side: int, counts: list[int] | None = None
                 ) -> DataProbe:
    """A probe for images already in memory at one size (the label audit's folds)."""
    return DataProbe("tensor", int(n_train), int(num_classes), list(counts or []), int(channels),
                     int(side), int(side), int(side), 1.0, 1.0, int(n_train))


def probe_source(spec: str, *, val_split: float | None = None, data_dir: str | None = None,
                 sample: int = 256) -> DataProbe | None:
    """The probe of a dataset as ``load_data`` would read it, asked of the source that claims ``spec``
    (imgrec.data.sources): its own ``describe`` when it has one (a named dataset's facts, no file read), else
    :func:`probe_listing` over its listing (file headers sampled). None when it cannot be probed cheaply (a URL
    pack, a spec no source claims, a listing that fails — ``load_data`` then says what is wrong)."""
    from imgrec.data import stream
    from imgrec.data.sources import resolve_source
    if stream.is_pack(spec):  # opened before the registry, as load_data does: already split and sized
        return _probe_pack(spec)
    try:
        source = resolve_source(spec)
        if source.describe is not None:  # a DataProbe, or its fields as a dict
            facts = source.describe(spec, data_dir=data_dir, val_split=val_split, sample=sample)
            return facts if facts is None or isinstance(facts, DataProbe) else DataProbe(**facts)
        listing = source.listing(spec, data_dir=data_dir, splits=("train", "val"), task=None, classes=None)
    except (DatasetError, ConfigError, OSError, ValueError):
        return None  # load_data reports the problem in its own words
    return probe_listing(listing, val_split=val_split, sample=sample)


def probe_listing(listing, *, val_split: float | None = None, sample: int = 256) -> DataProbe | None:
    """The probe of a source's ``Listing``: counts from its labels, sizes and colour from up to ``sample`` file
    headers (or an in-memory array's shape). The default ``describe`` of a registered source."""
    train = listing.splits.get("train") or {}
    labels = list(train.get("labels", []))
    if not labels or len(listing.classes) < 2:
        return None
    k = len(listing.classes)
    index = {c: i for i, c in enumerate(listing.classes)}
    counts = [0] * k
    for lab in labels:  # multi-label rows hold label names; one-label rows an index
        for c in (lab if isinstance(lab, (list, tuple)) else [lab]):
            counts[index[c] if isinstance(c, str) else int(c)] += 1
    has_val = "val" in listing.splits
    n = len(labels) if has_val else len(labels) - _n_val(0.1 if val_split is None else val_split, len(labels))
    probe = DataProbe(listing.kind, max(1, n), k, counts, has_val=has_val)
    if "images" in train:
        _array_sizes(probe, train["images"])
    else:
        _sizes(probe, list(train.get("paths", [])), sample)
    return probe


def _n_val(val_split: float, n: int) -> int:
    return int(round(val_split * n)) if val_split < 1 else int(val_split)


def _array_sizes(probe: DataProbe, images) -> None:
    """Sizes and colour of an in-memory N×H×W (grey) or N×H×W×C / N×C×H×W array, all of one size."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) == 3:
        h, w, c = shape[1], shape[2], 1
    elif len(shape) == 4:
        chw = shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4)
        h, w, c = (shape[2], shape[3], shape[1]) if chw else (shape[1], shape[2], shape[3])
    else:
        return
    probe.min_side = probe.median_side = probe.max_side = int(min(h, w))
    probe.aspect_min = probe.aspect_max = float(w / h) if h else 1.0
    probe.channels = 3 if c >= 3 else 1
    probe.sampled = int(shape[0])


def _sizes(probe: DataProbe, paths: list, sample: int) -> None:
    """Fill the probe's size, aspect and colour statistics from the headers of up to ``sample`` files."""
    step = max(1, len(paths) // max(1, sample))
    sides, aspects, colour = [], [], False
    for p in paths[::step][:sample]:
        try:
            (w, h), mode = read_header(p)
        except ImageDecodeError:
            continue
        sides.append(min(w, h))
        aspects.append(w / h)
        colour = colour or mode not in _GREY_MODES
    if not sides:
        return
    sides.sort()
    probe.min_side, probe.max_side = int(sides[0]), int(sides[-1])
    probe.median_side = int(sides[len(sides) // 2])
    probe.aspect_min, probe.aspect_max = float(min(aspects)), float(max(aspects))
    probe.channels = 3 if colour else 1
    probe.sampled = len(sides)


def read_header(path) -> tuple[tuple[int, int], str]:
    """(width, height) and Pillow's mode of an image file, from its first bytes only (no pixels decoded).
    Only the formats the decoder allows are opened (by their magic bytes); anything else is an
    ImageDecodeError."""
    from PIL import Image

    from imgrec.data.decode import sniff_format
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ImageDecodeError(e.strerror or "unreadable", str(path)) from None
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageDecodeError("not an allowed image format", str(path))
    try:
        with Image.open(io.BytesIO(head), formats=[fmt]) as im:
            return (int(im.width), int(im.height)), str(im.mode)
    except Exception as e:  # noqa: BLE001 - a header Pillow cannot parse from these bytes: not counted
        raise ImageDecodeError(f"header unreadable ({type(e).__name__})", str(path)) from None


def _probe_pack(spec: str) -> DataProbe | None:
    from imgrec.data import stream
    if stream.is_url(spec):
        return None  # never fetched just to choose a recipe; the defaults for a large dataset apply
    try:
        meta = stream.read_pack_meta(spec)
    except Exception:  # noqa: BLE001 - a URL pack or a broken one: opening it later says why
        return None
    counts = list(meta.get("counts", {}).get("train") or [])
    n = int(meta["splits"]["train"]["images"])
    side = int(meta["image_size"])
    return DataProbe("pack", n, len(meta["classes"]), counts, int(meta["channels"]), side, side, side, 1.0, 1.0, 0,
                     "val" in meta["splits"])
