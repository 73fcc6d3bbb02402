"""Build a folder of images like the ones people bring, from Fashion-MNIST.

    from userlike import make_user_folder
    make_user_folder("/tmp/photos", n_train=200, n_test=100, classes=["Sneaker", "Bag"], colour="mixed",
                     sizes=(40, 160), junk=True, seed=0)

writes the ImageFolder layout ``root/train/<class>/<image>`` and ``root/test/<class>/<image>`` (no ``val/``: imgrec
carves validation from train, so the test split is never used for a choice). The images are Fashion-MNIST
garments (training images from its train split, test images from its test split, so the two are disjoint),
upscaled to a random side in ``sizes`` (a third of them non-square: stretched, or the garment off-centre on a
wider or taller picture), saved as a mix of PNG and JPEG (quality
70–95). ``colour``: ``"grey"`` (mode L), ``"colour"`` (every image RGB: the garment tinted, composited on a
coloured, noisy or gradient background) or ``"mixed"`` (half of each). The tint's hue follows the class for
``class_hue`` of the images (default 0.5: colour carries some, not all, of the signal) and is random otherwise.
``junk=True`` adds what real folders carry: a ``.ipynb_checkpoints/`` copy of a few images inside one class folder,
a macOS AppleDouble ``._<name>.jpg`` of garbage bytes, and ``.DS_Store`` files.

``variants=2`` makes two classes of each garment: ``<class>`` and ``<class>_rot90`` (the garment turned 90°
clockwise), so 10 garments give 20 distinguishable classes (a horizontal flip never maps one onto the other).

Self-contained on purpose (numpy and Pillow; Fashion-MNIST read from its IDX files, or passed in as arrays), so a
test can copy the idea without importing benchmarks/.
"""
from __future__ import annotations

import colorsys
import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FMNIST_DIRS = ("/usr/share/datasets/fashion-mnist", os.path.expanduser("~/.cache/imgrec/datasets/fashion-mnist"))
_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def folder_name(cls: str) -> str:
    """A class name as a folder name: ``T-shirt/top`` → ``T-shirt_top``, ``Ankle boot`` → ``Ankle_boot``."""
    return cls.replace("/", "_").replace(" ", "_")


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N×28×28 uint8, labels N) of Fashion-MNIST's ``train`` or ``test`` split."""
    try:  # imgrec's own finder knows every place the files may be (and can download them)
        from imgrec.data.named import load_named
        x, y = load_named("fashion-mnist", split)
        return np.asarray(x, np.uint8).reshape(-1, 28, 28), np.asarray(y, np.int64)
    except ImportError:
        pass
    img_name, lab_name = _IDX[split]
    for d in FMNIST_DIRS:
        for suffix in ("", ".gz"):
            ip, lp = Path(d) / (img_name + suffix), Path(d) / (lab_name + suffix)
            if ip.exists() and lp.exists():
                return _read_idx(ip).reshape(-1, 28, 28), _read_idx(lp).astype(np.int64)
    raise FileNotFoundError(f"Fashion-MNIST {split} IDX files not found in {', '.join(FMNIST_DIRS)}")


def _pick(labels: np.ndarray, wanted: list[int], n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(source index, position in ``wanted``) for ``n`` images spread evenly over ``wanted`` (stratified)."""
    k = len(wanted)
    counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
    out: list[tuple[int, int]] = []
    used: set[int] = set()  # a garment class listed twice (variants) never gets the same image twice
    for pos, (src, c) in enumerate(zip(wanted, counts)):
        pool = np.array([i for i in np.flatnonzero(labels == src) if int(i) not in used], dtype=np.int64)
        if c > len(pool):
            raise ValueError(f"class {FASHION_MNIST[src]}: {c} images wanted, {len(pool)} available")
        chosen = [int(i) for i in rng.choice(pool, size=c, replace=False)]
        used.update(chosen)
        out += [(i, pos) for i in chosen]
    rng.shuffle(out)
    return out


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An H×W×3 float background in 0..255: a flat colour, a two-colour gradient or coloured noise."""
    kind = rng.integers(3)
    c1 = rng.uniform(0, 255, 3)
    if kind == 0:
        bg = np.broadcast_to(c1, (h, w, 3)).copy()
    elif kind == 1:
        c2 = rng.uniform(0, 255, 3)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
        t = t[None, :, None] if t.size == w else t[:, None, None]
        bg = np.broadcast_to(c1 * (1 - t) + c2 * t, (h, w, 3)).copy()
    else:
        bg = c1 + rng.normal(0, rng.uniform(10, 45), (h, w, 3))
    return np.clip(bg, 0, 255)


def _hue_rgb(h: float, rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, rng.uniform(0.45, 1.0), rng.uniform(0.6, 1.0))) * 255


def _render(g: np.ndarray, colour: bool, hue: float | None, side: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One garment (28×28 uint8, bright on black) as a user-like picture of ``side`` (w, h)."""
    w, h = side
    if w != h and rng.random() < 0.5:  # the garment at its own shape, off-centre on a wider or taller picture
        s = min(w, h)
        big = np.zeros((h, w), np.float32)
        y0, x0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        big[y0:y0 + s, x0:x0 + s] = np.asarray(Image.fromarray(g).resize((s, s), Image.BICUBIC), np.float32)
    else:  # stretched to the picture's shape
        big = np.asarray(Image.fromarray(g).resize((w, h), Image.BICUBIC), np.float32)
    if not colour:
        if rng.random() < 0.3:  # a grey background of its own, like a scanned or photographed sheet
            base = rng.uniform(0, 90)
            big = base + big * (255 - base) / 255 + rng.normal(0, rng.uniform(0, 8), big.shape)
        return Image.fromarray(np.clip(big, 0, 255).astype(np.uint8), "L")
    texture = big / 255.0
    alpha = np.clip(texture * 1.6, 0, 1)[..., None]
    tint = _hue_rgb(rng.random() if hue is None else hue + rng.normal(0, 0.03), rng)
    fg = tint * (0.35 + 0.65 * texture[..., None])
    out = alpha * fg + (1 - alpha) * _background(h, w, rng)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def _save(img: Image.Image, path_stem: Path, rng: np.random.Generator) -> Path:
    if rng.random() < 0.5:
        path = path_stem.with_suffix(".jpg" if rng.random() < 0.8 else ".jpeg")
        img.save(path, "JPEG", quality=int(rng.integers(70, 96)))
    else:
        path = path_stem.with_suffix(".png")
        img.save(path, "PNG")
    return path


def _add_junk(split_dir: Path, class_dirs: list[Path], rng: np.random.Generator) -> list[str]:
    """The junk real folders carry; returns what was written (relative paths)."""
    written = []
    (split_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + rng.bytes(2000))
    written.append(".DS_Store")
    for d in class_dirs[:2]:
        (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + rng.bytes(600))
        written.append(str((d / ".DS_Store").relative_to(split_dir)))
    # a Jupyter checkpoint folder inside a class folder holding copies of a few of its images
    d = class_dirs[0]
    ck = d / ".ipynb_checkpoints"
    ck.mkdir(exist_ok=True)
    for f in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))[:3]:
        dst = ck / f"{f.stem}-checkpoint{f.suffix}"
        shutil.copyfile(f, dst)
        written.append(str(dst.relative_to(split_dir)))
    # a macOS AppleDouble file: the magic number and garbage, named like an image
    d = class_dirs[min(1, len(class_dirs) - 1)]
    first = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))[0]
    ad = d / f"._{first.stem}.jpg"
    ad.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + rng.bytes(4000))
    written.append(str(ad.relative_to(split_dir)))
    return written


def make_user_folder(root: str | os.PathLike, n_train: int = 200, n_test: int = 200,
                     classes: list[str] | tuple[str, ...] | None = None, colour: str = "mixed",
                     sizes: tuple[int, int] = (40, 200), junk: bool = False, seed: int = 0, *,
                     variants: int = 1, class_hue: float = 0.5, non_square: float = 0.33,
                     source: dict | None = None) -> dict:
    """Write a user-like ImageFolder tree at ``root`` (replacing it); returns a summary (also in ``root/BUILD.json``).

    ``classes``: Fashion-MNIST class names (default all 10). ``colour``: grey | colour | mixed. ``sizes``: the
    range of an image's side in pixels (the other side of a non-square image is 0.65–1.5× it). ``variants``: 1, or 2 for ``<class>`` + ``<class>_rot90``.
    ``source``: ``{"train": (x, y), "test": (x, y)}`` arrays instead of reading Fashion-MNIST.
    """
    if colour not in ("grey", "colour", "mixed"):
        raise ValueError(f"colour: grey, colour or mixed, not {colour!r}")
    if variants not in (1, 2):
        raise ValueError("variants: 1 or 2")
    root = Path(root)
    classes = list(classes or FASHION_MNIST)
    wanted = [FASHION_MNIST.index(c) for c in classes]
    names = [folder_name(c) for c in classes]
    if variants == 2:
        names = [n for c in names for n in (c, f"{c}_rot90")]
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    hues = rng.permutation(len(names)) / len(names)  # the per-class hue, spread around the wheel
    summary: dict = {"classes": names, "colour": colour, "sizes": list(sizes), "junk": junk, "seed": seed,
                     "variants": variants, "class_hue": class_hue, "counts": {}, "junk_files": []}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = source[split] if source else load_fashion_mnist(split)
        x, y = np.asarray(x).reshape(-1, 28, 28), np.asarray(y)
        split_dir = root / split
        dirs = [split_dir / c for c in names]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        # variants == 2: every garment class is listed twice, so each of its two classes gets its own images
        picks = _pick(y, [w for w in wanted for _ in range(variants)], n, rng)
        modes = {"grey": 0, "colour": 0}
        for j, (src, pos) in enumerate(picks):
            g = x[src]
            if variants == 2 and pos % 2 == 1:
                g = np.rot90(g, k=-1).copy()
            s = int(rng.integers(sizes[0], sizes[1] + 1))
            if rng.random() < non_square:
                r = rng.uniform(0.65, 1.5)
                side = (s, max(8, int(round(s * r)))) if rng.random() < 0.5 else (max(8, int(round(s * r))), s)
            else:
                side = (s, s)
            is_colour = colour == "colour" or (colour == "mixed" and rng.random() < 0.5)
            hue = float(hues[pos]) if rng.random() < class_hue else None
            img = _render(g, is_colour, hue, side, rng)
            modes["colour" if is_colour else "grey"] += 1
            _save(img, dirs[pos] / f"{split}_{j:05d}", rng)
        summary["counts"][split] = {"images": len(picks), **modes}
        if junk:
            summary["junk_files"] += [f"{split}/{p}" for p in _add_junk(split_dir, dirs, rng)] if split == "train" \
                else [f"{split}/{p}" for p in _ds_store_only(split_dir, rng)]
    (root / "BUILD.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _ds_store_only(split_dir: Path, rng: np.random.Generator) -> list[str]:
    (split_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + rng.bytes(1000))
    return [".DS_Store"]


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


if __name__ == "__main__":  # python benchmarks/userlike.py ROOT [N_TRAIN N_TEST]
    import argparse
    ap = argparse.ArgumentParser(description="Write a folder of user-like images (train/ and test/) from Fashion-MNIST.")
    ap.add_argument("root", help="the folder to write")
    ap.add_argument("n_train", type=int, nargs="?", help="training images (make_user_folder's default if left out)")
    ap.add_argument("n_test", type=int, nargs="?", help="test images (make_user_folder's default if left out)")
    a = ap.parse_args()
    counts = {k: v for k, v in (("n_train", a.n_train), ("n_test", a.n_test)) if v is not None}
    out = make_user_folder(a.root, junk=True, **counts)
    print(json.dumps(out["counts"]), out["classes"])
