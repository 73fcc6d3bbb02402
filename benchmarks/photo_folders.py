"""Build photo-like ImageFolder trees from real photos: the transfer-learning suite (benchmarks/transfer.py).

    python benchmarks/photo_folders.py --out /tmp/imgrec-photos [--only A,B] [--rebuild]
    python benchmarks/photo_folders.py --list          # the source photos found on this machine, by kind

Every folder is ``root/train/<class>/*`` and ``root/test/<class>/*`` (no ``val/``: imgrec carves validation from
train, so the test split never takes part in a choice). Images are crops of real photos, taken at random scales
(a side of 12–95 % of the region's shorter side) and random aspect (0.6–1.7), resized to a random size (each
folder's ``sizes``, e.g. 33–400 px on the longer side), saved as JPEG (quality 55–95) or PNG; some are grey.

**Train and test never share pixels.** A class's test images come either from *other regions* of the same photos
(each photo is cut in two along its longer side at a per-photo position: one part gives the training crops, the
other the test crops; ``split: "region"``) or from *other photos* of the same kind (``split: "photo"``: a kind's
photos are divided, training crops from some, test crops from the rest). Both are how a user's new photos differ
from the ones they trained on; the photo split is the harder one.

The suite (``SUITE``):

- **A** ``scenes6``: 6 classes, each one photo (which scene is this?), 72 train / 30 test per class, 33–200 px,
  region split, ~10 % grey, junk in train (a ``notes.txt`` and a truncated JPEG). Like issue 35's colour folder.
- **B** ``fewshot20``: 20 classes, each one photo, **5** train / 20 test per class, 40–300 px, region split.
- **C** ``kinds3``: 3 semantic classes (flower, water, foliage; 4–6 photos each), **1,000** train / 200 test per
  class, 33–400 px, region split, ~15 % grey, junk in train.
- **D** ``kinds5new``: 5 semantic classes (flower, water, foliage, mountain, indoor objects), 30 train / 30 test
  per class, 48–320 px, **photo split**: the test photos are not in training at all.
- **E** ``grey6``: A's idea in grey only: 6 other photos, 40 train / 20 test per class, 33–160 px, region split.

Sources: Debian's wallpaper packages (real photos only; the drawn and abstract wallpapers are left out by name)
and matplotlib's ``grace_hopper.jpg`` sample. Install them with::

    apt-get install -y mate-backgrounds lomiri-wallpapers-16.04 plasma-workspace-wallpapers

Not scikit-image's or scikit-learn's sample images: those are kept aside for acceptance checks.

A folder is rebuilt only when its stamp (``STAMP.json``: the spec, the builder version and the source files'
names and sizes) differs. Deterministic: the same sources and spec give the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

BUILDER_VERSION = 1
MATE = "/usr/share/backgrounds/mate/nature"
LOMIRI = "/usr/share/backgrounds"
PLASMA = "/usr/share/wallpapers"

# name -> (package, path, kind). Real photos only, looked at one by one; kind is what the photo shows.
PHOTOS: dict[str, tuple[str, str, str]] = {
    # mate-backgrounds (nature/)
    "aqua": ("mate-backgrounds", f"{MATE}/Aqua.jpg", "water"),
    "blinds": ("mate-backgrounds", f"{MATE}/Blinds.jpg", "foliage"),
    "dune": ("mate-backgrounds", f"{MATE}/Dune.jpg", "grass-sea"),
    "freshflower": ("mate-backgrounds", f"{MATE}/FreshFlower.jpg", "flower"),
    "garden": ("mate-backgrounds", f"{MATE}/Garden.jpg", "flower"),
    "greenmeadow": ("mate-backgrounds", f"{MATE}/GreenMeadow.jpg", "foliage"),
    "ladybird": ("mate-backgrounds", f"{MATE}/LadyBird.jpg", "flower"),
    "raindrops": ("mate-backgrounds", f"{MATE}/RainDrops.jpg", "foliage"),
    "storm": ("mate-backgrounds", f"{MATE}/Storm.jpg", "sky"),
    "twowings": ("mate-backgrounds", f"{MATE}/TwoWings.jpg", "flower"),
    "wood": ("mate-backgrounds", f"{MATE}/Wood.jpg", "texture"),
    "yellowflower": ("mate-backgrounds", f"{MATE}/YellowFlower.jpg", "flower"),
    # lomiri-wallpapers-16.04
    "bridge": ("lomiri-wallpapers-16.04", f"{LOMIRI}/Bridge_by_Sander_Klootwijk.jpg", "sky"),
    "dragonfly": ("lomiri-wallpapers-16.04", f"{LOMIRI}/Dragonfly_by_Bolly.jpg", "foliage"),
    "fig": ("lomiri-wallpapers-16.04", f"{LOMIRI}/Picture_0B_by_freespace.jpg", "objects"),
    "brushes": ("lomiri-wallpapers-16.04", f"{LOMIRI}/Picture_1A_by_freespace.jpg", "objects"),
    "wine": ("lomiri-wallpapers-16.04", f"{LOMIRI}/Wine_by_Jakkub_Mede.jpg", "objects"),
    "aitzgorri": ("lomiri-wallpapers-16.04", f"{LOMIRI}/aitzgorri_by_Aitzol_Berasategi.jpg", "mountain"),
    "hummingbird": ("lomiri-wallpapers-16.04", f"{LOMIRI}/free_by_Peter_Nerlich.jpg", "objects"),
    "dogs": ("lomiri-wallpapers-16.04", f"{LOMIRI}/friends_by_Aitzol_Berasategi.jpg", "animals"),
    "clock": ("lomiri-wallpapers-16.04", f"{LOMIRI}/greentock_by_Peter_Nerlich.jpg", "objects"),
    "stream": ("lomiri-wallpapers-16.04", f"{LOMIRI}/life_by_Aitzol_Berasategi.jpg", "forest"),
    "picos": ("lomiri-wallpapers-16.04", f"{LOMIRI}/picosdeeuropa_by_Aitzol_Berasategi.jpg", "mountain"),
    "dandelion": ("lomiri-wallpapers-16.04", f"{LOMIRI}/seeding_by_Clements_Engelhardt.jpg", "flower"),
    "sunset": ("lomiri-wallpapers-16.04", f"{LOMIRI}/sunset_by_Aitzol_Berasategi.jpg", "mountain"),
    # plasma-workspace-wallpapers (the largest size of each; PLASMA/<Name>/contents/images/)
    "bythewater": ("plasma-workspace-wallpapers", f"{PLASMA}/BytheWater/contents/images/2560x1600.jpg", "water"),
    "coldripple": ("plasma-workspace-wallpapers", f"{PLASMA}/ColdRipple/contents/images/2560x1600.jpg", "water"),
    "cups": ("plasma-workspace-wallpapers", f"{PLASMA}/ColorfulCups/contents/images/2560x1600.jpg", "objects"),
    "darkesthour": ("plasma-workspace-wallpapers", f"{PLASMA}/DarkestHour/contents/images/2560x1600.jpg", "water"),
    "boats": ("plasma-workspace-wallpapers", f"{PLASMA}/EveningGlow/contents/images/2560x1600.jpg", "water"),
    "fallenleaf": ("plasma-workspace-wallpapers", f"{PLASMA}/FallenLeaf/contents/images/2560x1600.jpg", "foliage"),
    "facade": ("plasma-workspace-wallpapers", f"{PLASMA}/Grey/contents/images/2560x1600.jpg", "architecture"),
    "kite": ("plasma-workspace-wallpapers", f"{PLASMA}/Kite/contents/images/2560x1600.jpg", "sky"),
    "palms": ("plasma-workspace-wallpapers", f"{PLASMA}/OneStandsOut/contents/images/2560x1600.jpg", "foliage"),
    "forestpath": ("plasma-workspace-wallpapers", f"{PLASMA}/Path/contents/images/2560x1600.jpg", "forest"),
    "lakedusk": ("plasma-workspace-wallpapers", f"{PLASMA}/summer_1am/contents/images/2560x1600.jpg", "water"),
    # matplotlib's sample data (found through matplotlib at run time)
    "hopper": ("matplotlib", "sample_data/grace_hopper.jpg", "person"),
}
PACKAGES = ("mate-backgrounds", "lomiri-wallpapers-16.04", "plasma-workspace-wallpapers")

# spec: classes = {class: [photo, ...]}; for split "photo", test = {class: [photo, ...]} (the rest of train's kind)
SUITE: dict[str, dict] = {
    "A": dict(name="scenes6", split="region", train=72, test=30, sizes=(33, 200), grey=0.10, junk=True, seed=1,
              classes={"boats": ["boats"], "dogs": ["dogs"], "fig": ["fig"], "picos": ["picos"],
                       "garden": ["garden"], "forestpath": ["forestpath"]}),
    "B": dict(name="fewshot20", split="region", train=5, test=20, sizes=(40, 300), grey=0.05, junk=False, seed=2,
              classes={p: [p] for p in ["aqua", "blinds", "dune", "freshflower", "greenmeadow", "ladybird",
                                        "storm", "yellowflower", "bridge", "dragonfly", "brushes", "wine",
                                        "aitzgorri", "hummingbird", "clock", "stream", "bythewater", "cups",
                                        "fallenleaf", "kite"]}),
    "C": dict(name="kinds3", split="region", train=1000, test=200, sizes=(33, 400), grey=0.15, junk=True, seed=3,
              classes={"flower": ["freshflower", "garden", "yellowflower", "twowings", "dandelion"],
                       "water": ["aqua", "bythewater", "darkesthour", "boats", "lakedusk", "coldripple"],
                       "foliage": ["blinds", "greenmeadow", "raindrops", "dragonfly", "fallenleaf", "palms"]}),
    "D": dict(name="kinds5new", split="photo", train=30, test=30, sizes=(48, 320), grey=0.05, junk=False, seed=4,
              classes={"flower": ["freshflower", "garden", "twowings", "ladybird"],
                       "water": ["bythewater", "darkesthour", "coldripple", "aqua"],
                       "foliage": ["blinds", "raindrops", "palms", "dragonfly"],
                       "mountain": ["aitzgorri", "picos"],
                       "objects": ["fig", "brushes", "clock", "cups"]},
              test_classes={"flower": ["yellowflower", "dandelion"],
                            "water": ["boats", "lakedusk"],
                            "foliage": ["greenmeadow", "fallenleaf"],
                            "mountain": ["sunset"],
                            "objects": ["wine", "hummingbird"]}),
    "E": dict(name="grey6", split="region", train=40, test=20, sizes=(33, 160), grey=1.0, junk=False, seed=5,
              classes={p: [p] for p in ["facade", "stream", "clock", "raindrops", "kite", "hopper"]}),
}


# ---------------------------------------------------------------------------------------------------- sources
def photo_path(name: str) -> Path:
    pkg, path, _ = PHOTOS[name]
    if pkg == "matplotlib":
        try:
            import matplotlib
        except ImportError as e:
            raise FileNotFoundError(f"photo {name!r} comes from matplotlib's sample data: pip install matplotlib") from e
        return Path(matplotlib.get_data_path()) / path
    return Path(path)


def missing_photos(names) -> list[str]:
    out = []
    for n in names:
        try:
            if not photo_path(n).is_file():
                out.append(n)
        except FileNotFoundError:
            out.append(n)
    return out


def require(names) -> None:
    """Raise FileNotFoundError naming the packages to install when any of the photos ``names`` is missing."""
    gone = missing_photos(names)
    if gone:
        pkgs = sorted({PHOTOS[n][0] for n in gone})
        apt = [p for p in pkgs if p != "matplotlib"]
        how = (f"apt-get install -y {' '.join(apt)}" if apt else "") + \
              (" and " if apt and "matplotlib" in pkgs else "") + ("pip install matplotlib" if "matplotlib" in pkgs else "")
        raise FileNotFoundError(f"source photos missing: {', '.join(str(photo_path(n)) if PHOTOS[n][0] != 'matplotlib' else n for n in gone)} "
                                f"(from {', '.join(pkgs)}; install with: {how})")


_CACHE: dict[str, np.ndarray] = {}
MAX_SIDE = 1600  # photos are brought to at most this longer side once (a user's photo is rarely larger)


def load_photo(name: str) -> np.ndarray:
    """The photo as H×W×3 uint8, its longer side at most MAX_SIDE (cached)."""
    if name not in _CACHE:
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(photo_path(name)) as im:
            im = im.convert("RGB")
            s = MAX_SIDE / max(im.size)
            if s < 1:
                im = im.resize((round(im.width * s), round(im.height * s)), Image.LANCZOS)
            _CACHE[name] = np.asarray(im)
    return _CACHE[name]


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def regions(name: str, split: str, seed: int) -> dict[str, tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of the photo's ``train`` and ``test`` parts. Region split: cut across the longer side at
    55–70 %, which side trains chosen per photo; photo split: the whole photo for both."""
    h, w = load_photo(name).shape[:2]
    if split == "photo":
        return {"train": (0, 0, w, h), "test": (0, 0, w, h)}
    rng = np.random.default_rng(_seed("regions", name, seed))
    frac = rng.uniform(0.55, 0.70)
    first_trains = rng.random() < 0.5
    if w >= h:
        cut = round(w * (frac if first_trains else 1 - frac))
        a, b = (0, 0, cut, h), (cut, 0, w, h)
    else:
        cut = round(h * (frac if first_trains else 1 - frac))
        a, b = (0, 0, w, cut), (0, cut, w, h)
    return {"train": a, "test": b} if first_trains else {"train": b, "test": a}


def crop(photo: np.ndarray, box, sizes, grey: bool, rng: np.random.Generator) -> Image.Image:
    """A random crop of ``box`` at a random scale and aspect, resized so its longer side is in ``sizes``."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    short = min(bw, bh)
    side = rng.uniform(0.12, 0.95) * short
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
    cw, ch = min(bw, max(8, round(side * np.sqrt(aspect)))), min(bh, max(8, round(side / np.sqrt(aspect))))
    cx, cy = x0 + int(rng.integers(0, bw - cw + 1)), y0 + int(rng.integers(0, bh - ch + 1))
    im = Image.fromarray(photo[cy:cy + ch, cx:cx + cw])
    longer = int(rng.integers(sizes[0], sizes[1] + 1))
    s = longer / max(cw, ch)
    im = im.resize((max(1, round(cw * s)), max(1, round(ch * s))), Image.BICUBIC if s > 1 else Image.LANCZOS)
    if rng.random() < 0.5:  # half mirrored: photos of a scene are taken from either side
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return im.convert("L") if grey else im


def _save(im: Image.Image, stem: Path, rng: np.random.Generator) -> Path:
    if rng.random() < 0.8:
        path = stem.with_suffix(".jpg" if rng.random() < 0.85 else ".jpeg")
        im.save(path, "JPEG", quality=int(rng.integers(55, 96)))
    else:
        path = stem.with_suffix(".png")
        im.save(path, "PNG")
    return path


def _junk(train_dir: Path, class_dirs: list[Path], rng: np.random.Generator) -> list[str]:
    """A text file and a truncated JPEG among the training images (what real folders carry)."""
    (class_dirs[0] / "notes.txt").write_text("photos from the trip; the blurry ones are in the other folder\n")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    (class_dirs[-1] / "IMG_0000.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    return [str((class_dirs[0] / "notes.txt").relative_to(train_dir)),
            str((class_dirs[-1] / "IMG_0000.jpg").relative_to(train_dir))]


# ---------------------------------------------------------------------------------------------------- building
def build_folder(root, classes: dict[str, list[str]], train: int, test: int, sizes=(33, 400), grey: float = 0.1,
                 split: str = "region", test_classes: dict[str, list[str]] | None = None, junk: bool = False,
                 seed: int = 0) -> dict:
    """Write ``root/train/<class>/`` and ``root/test/<class>/`` from the photos listed per class; returns a summary
    (counts, photos used, junk written). Crops are spread evenly over a class's photos."""
    root = Path(root)
    every = [p for ps in classes.values() for p in ps] + [p for ps in (test_classes or {}).values() for p in ps]
    require(every)
    if split == "photo" and not test_classes:
        raise ValueError("split 'photo' needs test_classes: the photos the test images come from")
    if root.exists():
        shutil.rmtree(root)
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for ci, (cls, photos) in enumerate(classes.items()):
        for part, n in (("train", train), ("test", test)):
            src = (test_classes or {}).get(cls, photos) if (part == "test" and split == "photo") else photos
            d = root / part / cls
            d.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(_seed("crops", cls, part, seed))
            for i in range(n):
                p = src[i % len(src)]
                box = regions(p, split, seed)[part]
                im = crop(load_photo(p), box, sizes, bool(rng.random() < grey), rng)
                _save(im, d / f"{cls}_{i:04d}", rng)
            counts[part][cls] = n
    written = _junk(root / "train", sorted((root / "train").iterdir()), np.random.default_rng(seed)) if junk else []
    return {"counts": counts, "junk": written, "photos": {c: p for c, p in classes.items()},
            "test_photos": test_classes or None}


def source_fingerprint(names) -> list:
    return [[n, photo_path(n).name, photo_path(n).stat().st_size] for n in sorted(set(names))]


def build(key: str, out, rebuild: bool = False) -> tuple[Path, bool]:
    """Folder ``key`` of SUITE under ``out`` (``out/<key>-<name>``), built unless its stamp matches."""
    spec = SUITE[key]
    root = Path(out) / f"{key}-{spec['name']}"
    names = [p for ps in spec["classes"].values() for p in ps] + \
            [p for ps in (spec.get("test_classes") or {}).values() for p in ps]
    require(names)
    want = {"key": key, "spec": json.loads(json.dumps(spec)), "builder": BUILDER_VERSION,
            "sources": source_fingerprint(names)}
    want["hash"] = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:16]
    stamp = root / "STAMP.json"
    if not rebuild and stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("hash") == want["hash"]:
                return root, False
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    kw = {k: v for k, v in spec.items() if k != "name"}
    summary = build_folder(root, **kw)
    want.update(build_s=round(time.perf_counter() - t0, 2), counts=summary["counts"], junk=summary["junk"])
    stamp.write_text(json.dumps(want, indent=2) + "\n")  # last: a half-built folder has no stamp
    return root, True


def describe(key: str) -> str:
    s = SUITE[key]
    k = len(s["classes"])
    kinds = "one photo per class" if all(len(v) == 1 for v in s["classes"].values()) else "semantic classes"
    split = "test from other regions of the same photos" if s["split"] == "region" else "test from other photos"
    colour = "grey only" if s["grey"] >= 1 else f"colour, {round(100 * s['grey'])}% grey"
    return (f"{k} classes ({kinds}), {s['train']} train / {s['test']} test per class, {s['sizes'][0]}–{s['sizes'][1]} px, "
            f"{colour}, {split}" + (", junk files in train" if s["junk"] else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/imgrec-photos", help="where the folders go (default /tmp/imgrec-photos)")
    ap.add_argument("--only", default=None, help=f"comma-separated keys of the suite ({','.join(SUITE)})")
    ap.add_argument("--rebuild", action="store_true", help="rebuild even when the stamp matches")
    ap.add_argument("--list", action="store_true", help="list the source photos and whether they are here")
    args = ap.parse_args(argv)
    if args.list:
        for n, (pkg, _, kind) in PHOTOS.items():
            ok = not missing_photos([n])
            print(f"{n:13s} {kind:13s} {pkg:28s} {'ok' if ok else 'MISSING'}  {photo_path(n) if ok else ''}")
        return 0
    keys = [k.strip().upper() for k in args.only.split(",")] if args.only else list(SUITE)
    bad = [k for k in keys if k not in SUITE]
    if bad:
        ap.error(f"unknown folder {', '.join(bad)} (the suite: {', '.join(SUITE)})")
    for k in keys:
        try:
            root, built = build(k, args.out, args.rebuild)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        stamp = json.loads((root / "STAMP.json").read_text())
        n_tr, n_te = sum(stamp["counts"]["train"].values()), sum(stamp["counts"]["test"].values())
        how = f"built in {stamp['build_s']:.1f} s" if built else "up to date"
        print(f"{k} {root}: {describe(k)}; {n_tr} train + {n_te} test images ({how})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
