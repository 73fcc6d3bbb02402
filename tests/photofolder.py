"""A small folder of real photos for tests: crops of Debian's ``mate-backgrounds`` nature photos.

    from photofolder import make_photo_folder
    root = make_photo_folder(tmp_path / "photos", classes=4, train_per_class=24, test_per_class=12, seed=0)

writes ``root/train/<class>/*`` and ``root/test/<class>/*`` (no ``val/``: imgrec carves validation from train).
A class is one photo (``aqua``, ``yellowflower``, ``greenmeadow``, ... up to 12); each photo is cut in two across
its longer side, training crops come from one part and test crops from the other, so train and test never share
pixels (as a user's new photos differ from the old ones). Crops are taken at random scales (12–95 % of the part's
shorter side) and aspects (0.6–1.7), resized to a longer side of 40–160 px, about a tenth of them grey, saved as
JPEG (quality 60–95) or PNG. Deterministic for a given seed.

The photos come from the Debian package ``mate-backgrounds`` (``apt-get install -y mate-backgrounds``), files
``/usr/share/backgrounds/mate/nature/*.jpg``; when they are missing the function raises FileNotFoundError saying so
(``photos_available()`` tells beforehand, for a skip). Not scikit-image's or scikit-learn's sample images: those
are kept aside for acceptance checks. benchmarks/photo_folders.py builds the larger suite the same way.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGE = "mate-backgrounds"
PHOTO_DIR = Path("/usr/share/backgrounds/mate/nature")
# class name -> file, in the order classes are taken (the first few are the most unlike each other)
PHOTOS = {
    "aqua": "Aqua.jpg", "yellowflower": "YellowFlower.jpg", "greenmeadow": "GreenMeadow.jpg", "storm": "Storm.jpg",
    "wood": "Wood.jpg", "ladybird": "LadyBird.jpg", "raindrops": "RainDrops.jpg", "dune": "Dune.jpg",
    "freshflower": "FreshFlower.jpg", "garden": "Garden.jpg", "twowings": "TwoWings.jpg", "blinds": "Blinds.jpg",
}
MAX_SIDE = 800  # photos are decoded at about this size (JPEG draft mode): quick, and crops stay sharp


def photos_available(classes: int = len(PHOTOS)) -> bool:
    return all((PHOTO_DIR / f).is_file() for f in list(PHOTOS.values())[:classes])


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.draft("RGB", (MAX_SIDE, MAX_SIDE))
        im = im.convert("RGB")
        s = MAX_SIDE / max(im.size)
        if s < 1:
            im = im.resize((round(im.width * s), round(im.height * s)), Image.LANCZOS)
        return np.asarray(im)


def _parts(photo: np.ndarray, name: str, seed: int) -> dict[str, tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of the train and test parts: the photo cut across its longer side at 55–70 %."""
    h, w = photo.shape[:2]
    rng = np.random.default_rng(_seed("parts", name, seed))
    frac, first = rng.uniform(0.55, 0.70), rng.random() < 0.5
    long_ = max(w, h)
    cut = round(long_ * (frac if first else 1 - frac))
    a, b = ((0, 0, cut, h), (cut, 0, w, h)) if w >= h else ((0, 0, w, cut), (0, cut, w, h))
    return {"train": a, "test": b} if first else {"train": b, "test": a}


def _crop(photo: np.ndarray, box, sizes, grey: bool, rng: np.random.Generator) -> Image.Image:
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    side = rng.uniform(0.12, 0.95) * min(bw, bh)
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
    cw, ch = min(bw, max(8, round(side * aspect ** 0.5))), min(bh, max(8, round(side / aspect ** 0.5)))
    cx, cy = x0 + int(rng.integers(0, bw - cw + 1)), y0 + int(rng.integers(0, bh - ch + 1))
    im = Image.fromarray(photo[cy:cy + ch, cx:cx + cw])
    s = int(rng.integers(sizes[0], sizes[1] + 1)) / max(cw, ch)
    im = im.resize((max(1, round(cw * s)), max(1, round(ch * s))), Image.BICUBIC if s > 1 else Image.LANCZOS)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return im.convert("L") if grey else im


def make_photo_folder(root, classes: int = 4, train_per_class: int = 24, test_per_class: int = 12, seed: int = 0,
                      sizes: tuple[int, int] = (40, 160), grey: float = 0.1, junk: bool = False) -> Path:
    """Write a small real-photo ImageFolder at ``root`` and return ``root`` as a Path.

    ``classes``: how many photos (1–12), one class each. ``sizes``: the range of the images' longer side.
    ``grey``: the share of images saved grey (mode L). ``junk=True`` adds a ``notes.txt`` and a truncated JPEG
    to the first and last training class folders. Raises FileNotFoundError when the photos are missing."""
    if not 1 <= classes <= len(PHOTOS):
        raise ValueError(f"classes must be 1..{len(PHOTOS)} (one photo each), not {classes}")
    names = list(PHOTOS)[:classes]
    missing = [str(PHOTO_DIR / PHOTOS[n]) for n in names if not (PHOTO_DIR / PHOTOS[n]).is_file()]
    if missing:
        raise FileNotFoundError(f"real photos for make_photo_folder are missing: {', '.join(missing)}; they come "
                                f"from the Debian package {PACKAGE} (apt-get install -y {PACKAGE})")
    root = Path(root)
    for name in names:
        photo = _load(PHOTO_DIR / PHOTOS[name])
        parts = _parts(photo, name, seed)
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(_seed("crops", name, split, seed))
            for i in range(n):
                im = _crop(photo, parts[split], sizes, bool(rng.random() < grey), rng)
                if rng.random() < 0.8:
                    im.save(d / f"{name}_{i:03d}.jpg", "JPEG", quality=int(rng.integers(60, 96)))
                else:
                    im.save(d / f"{name}_{i:03d}.png", "PNG")
    if junk:
        first, last = root / "train" / names[0], root / "train" / names[-1]
        (first / "notes.txt").write_text("holiday photos\n")
        buf = io.BytesIO()
        Image.fromarray(_load(PHOTO_DIR / PHOTOS[names[0]])[:120, :160]).save(buf, "JPEG", quality=90)
        (last / "IMG_0000.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    return root


# Semantic classes for make_kinds_folder: several photos of one kind each, and the test photos are other photos
# (a "photo split"). mate-backgrounds' nature photos plus Debian's lomiri-wallpapers-16.04 (mountains, objects).
KINDS_PACKAGES = (PACKAGE, "lomiri-wallpapers-16.04")
LOMIRI_DIR = Path("/usr/share/backgrounds")
KINDS = {  # kind -> (training photos, test photos)
    "flower": (["FreshFlower.jpg", "Garden.jpg", "TwoWings.jpg"], ["YellowFlower.jpg", "LadyBird.jpg"]),
    "foliage": (["Blinds.jpg", "RainDrops.jpg", "lomiri:Dragonfly_by_Bolly.jpg"], ["GreenMeadow.jpg"]),
    "mountain": (["lomiri:aitzgorri_by_Aitzol_Berasategi.jpg", "lomiri:picosdeeuropa_by_Aitzol_Berasategi.jpg"],
                 ["lomiri:sunset_by_Aitzol_Berasategi.jpg"]),
    "objects": (["lomiri:Picture_0B_by_freespace.jpg", "lomiri:Picture_1A_by_freespace.jpg",
                 "lomiri:greentock_by_Peter_Nerlich.jpg"],
                ["lomiri:Wine_by_Jakkub_Mede.jpg", "lomiri:free_by_Peter_Nerlich.jpg"]),
}


def _kind_path(name: str) -> Path:
    return LOMIRI_DIR / name.removeprefix("lomiri:") if name.startswith("lomiri:") else PHOTO_DIR / name


def kinds_available() -> bool:
    return all(_kind_path(n).is_file() for train, test in KINDS.values() for n in train + test)


def make_kinds_folder(root, train_per_class: int = 40, test_per_class: int = 20, seed: int = 0,
                      sizes: tuple[int, int] = (48, 240), grey: float = 0.05) -> Path:
    """A real-photo ImageFolder of 4 semantic classes (flower, foliage, mountain, objects) whose test images
    come from photos not in training at all: what a classifier of kinds of things must generalise to. Crops of
    the whole photos, as in :func:`make_photo_folder`. Raises FileNotFoundError when the photos are missing."""
    missing = [str(_kind_path(n)) for train, test in KINDS.values() for n in train + test
               if not _kind_path(n).is_file()]
    if missing:
        raise FileNotFoundError(f"real photos for make_kinds_folder are missing: {', '.join(missing[:3])}; they "
                                f"come from the Debian packages {' and '.join(KINDS_PACKAGES)}")
    root = Path(root)
    for kind, photos in KINDS.items():
        for split, names, n in (("train", photos[0], train_per_class), ("test", photos[1], test_per_class)):
            d = root / split / kind
            d.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(_seed("kinds", kind, split, seed))
            loaded = [_load(_kind_path(name)) for name in names]
            for i in range(n):
                photo = loaded[i % len(loaded)]
                box = (0, 0, photo.shape[1], photo.shape[0])
                im = _crop(photo, box, sizes, bool(rng.random() < grey), rng)
                im.save(d / f"{kind}_{i:03d}.jpg", "JPEG", quality=int(rng.integers(60, 96)))
    return root
