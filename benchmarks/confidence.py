"""How far imgrec's scores can be trusted: calibration before/after temperature scaling, and how well each
out-of-distribution score tells the model's own kind of images from things it was never shown.

    python benchmarks/confidence.py --model runs/fm                # a trained model directory
    python benchmarks/confidence.py --train fashion-mnist          # trains one with the defaults first
    python benchmarks/confidence.py --near-ood                     # 8 Fashion-MNIST classes known, 2 unknown
    python benchmarks/confidence.py --small-folder                 # a small folder of mixed photos, defaults
    python benchmarks/confidence.py --dev-folders                  # 7 more small folders, calibration only
    python benchmarks/confidence.py --model runs/x --out benchmarks/results/confidence.md

For each model: ECE, NLL and Brier on the test split with the raw scores and with the stored temperature,
each ECE with a 95% bootstrap interval and its noise floor (the ECE a perfectly calibrated model with the same
scores gets by chance on as many images: 1,000 test images leave about 0.03 at 80% accuracy, so a target
below that cannot be read from one folder);
then, for ``msp``, ``energy``, ``knn`` and ``mahalanobis`` (imgrec.infer.ood), AUROC and the false-positive rate
at 95% true-positive rate (the share of unknown images accepted when 95% of the test images are) against
far-OOD sets built here: Gaussian and uniform noise, rendered text, drawn shapes, and digits rendered with
the machine's fonts. The statistics a score needs come from the training split, the threshold from the
validation split; the test split is only measured. ``--near-ood`` trains on 8 classes of Fashion-MNIST (a
folder of its images) and scores the other 2 classes' test images as the unknowns.

The far-OOD sets avoid the sample images bundled with scikit-image and scikit-learn on purpose: those are
kept aside for checking the finished "unknown" answer.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_markdown  # noqa: E402

from imgrec.data.dataset import load_run_split  # noqa: E402
from imgrec.data.transforms import convert_channels, resize_uint8  # noqa: E402
from imgrec.eval.calibration import calibration_metrics, ece_bootstrap, ece_noise_floor  # noqa: E402
from imgrec.infer import ood  # noqa: E402
from imgrec.infer.predictor import Classifier  # noqa: E402

_EXE = Path(sys.executable).parent / "imgrec"
IMGREC = [str(_EXE)] if _EXE.exists() else [sys.executable, "-m", "imgrec.cli"]
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"))


# -- far-OOD sets, drawn at 28×28 grey and brought to the model's size ----------------------------------
def _fonts() -> list[str]:
    out = []
    for d in FONT_DIRS:
        for p in Path(d).rglob("*.ttf") if Path(d).is_dir() else ():
            out.append(str(p))
    return sorted(out)


def _font(fonts: list[str], rng: random.Random, size: int):
    if fonts:
        return ImageFont.truetype(rng.choice(fonts), size)
    return ImageFont.load_default(size=size)


def far_ood_sets(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng, nrng, fonts = random.Random(seed), np.random.default_rng(seed), _fonts()
    sets = {"gaussian noise": np.clip(nrng.normal(128, 64, (n, 28, 28)), 0, 255).astype(np.uint8),
            "uniform noise": nrng.integers(0, 256, (n, 28, 28), dtype=np.uint8)}
    text, shapes, digits = [], [], []
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for _ in range(n):
        im = Image.new("L", (28, 28), 0)
        d = ImageDraw.Draw(im)
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 5)))
        d.text((rng.randint(-2, 4), rng.randint(0, 12)), word, fill=rng.randint(150, 255),
               font=_font(fonts, rng, rng.randint(8, 14)))
        text.append(np.asarray(im))

        im = Image.new("L", (28, 28), 0)
        d = ImageDraw.Draw(im)
        for _ in range(rng.randint(1, 3)):
            box = sorted(rng.sample(range(2, 27), 2))
            box2 = sorted(rng.sample(range(2, 27), 2))
            xy = [box[0], box2[0], box[1], box2[1]]
            kind, fill = rng.choice(("ellipse", "rectangle", "line", "polygon")), rng.randint(100, 255)
            if kind == "ellipse":
                d.ellipse(xy, fill=fill if rng.random() < 0.5 else None, outline=fill, width=2)
            elif kind == "rectangle":
                d.rectangle(xy, fill=fill if rng.random() < 0.5 else None, outline=fill, width=2)
            elif kind == "line":
                d.line(xy, fill=fill, width=rng.randint(1, 4))
            else:
                d.polygon([(rng.randint(2, 26), rng.randint(2, 26)) for _ in range(3)], fill=fill)
        shapes.append(np.asarray(im))

        im = Image.new("L", (28, 28), 0)
        d = ImageDraw.Draw(im)
        f = _font(fonts, rng, rng.randint(16, 24))
        ch = str(rng.randint(0, 9))
        l, t, r, b = d.textbbox((0, 0), ch, font=f)
        d.text(((28 - (r - l)) / 2 - l, (28 - (b - t)) / 2 - t), ch, fill=rng.randint(180, 255), font=f)
        digits.append(np.asarray(im))
    sets.update({"rendered text": np.stack(text), "shapes": np.stack(shapes), "font digits": np.stack(digits)})
    return sets


def to_model(images: np.ndarray | torch.Tensor, size: int, channels: int) -> torch.Tensor:
    t = torch.as_tensor(images)
    if t.ndim == 3:
        t = t[:, None]
    if t.shape[-1] != size:
        t = resize_uint8(t, size)
    return convert_channels(t, channels)


# -- logits and penultimate features ------------------------------------------------------------------
@torch.inference_mode()
def outputs(clf: Classifier, images: torch.Tensor, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits (no temperature) and penultimate features, averaged over the mirror when the model
    predicts with flip test-time augmentation, as the Classifier does."""
    logits, feats = [], []
    m = clf.model
    for chunk in images.split(batch):
        x = clf.normalize(chunk)
        views = (x, x.flip(3)) if clf.tta_flip else (x,)
        f = sum(m.forward_head(m.forward_features(v), pre_logits=True).float() for v in views) / len(views)
        z = sum(m(v).float() for v in views) / len(views)
        if clf.logit_bias is not None:
            z = z + clf.logit_bias
        logits.append(z.numpy())
        feats.append(f.numpy())
    return np.concatenate(logits), np.concatenate(feats)


def split_images(model_dir: str, split: str, size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    meta = Classifier.load(model_dir, device="cpu").meta
    s = load_run_split(meta, split=split if split != "train" else "val")
    data = s.bundle.train if split == "train" else s.data
    return to_model(data.images, size, channels), data.labels, list(s.bundle.classes)


def calibration_report(clf: Classifier, te_x: torch.Tensor, te_y: torch.Tensor, draws: int = 1000) -> dict:
    """ECE, NLL and Brier of the test split with the raw scores and with the stored temperature, on the logits
    predict returns (Classifier.logits: flip-TTA, logit adjustment, the model's autocast); with each ECE a 95%
    bootstrap interval and the noise floor: the ECE a perfectly calibrated model with the same scores gets on
    as many images by chance (imgrec.eval.calibration.ece_noise_floor)."""
    z = clf.logits(te_x)
    out: dict = {}
    for side, t in (("raw", 1.0), ("scaled", clf.meta.temperature)):
        m = calibration_metrics(z, te_y, t)
        probs = torch.softmax(z.double() / t, dim=1)
        m["ece_ci95"] = ece_bootstrap(probs, te_y, draws=draws)
        m["floor"] = ece_noise_floor(probs, draws=draws)
        out[side] = m
    return out


def evaluate_model(model_dir: str, *, n_ood: int = 2000, unknown: dict[str, np.ndarray] | None = None,
                   accept: float = 0.95, calibration_only: bool = False) -> dict:
    clf = Classifier.load(model_dir, device="cpu")
    size, ch, T = clf.image_size, clf.channels, clf.meta.temperature
    entry = clf.meta.inference.get("temperature") or {}
    res: dict = {"model": model_dir, "name": clf.meta.name, "temperature": T, "T_nll": entry.get("T_nll"),
                 "n_val": entry.get("n")}
    te_x, te_y, classes = split_images(model_dir, "test", size, ch)
    res["calibration"] = calibration_report(clf, te_x, te_y)
    res["test_accuracy"] = float((clf.logits(te_x).argmax(1) == te_y).double().mean())
    if calibration_only:
        return res
    tr_x, tr_y, _ = split_images(model_dir, "train", size, ch)
    va_x, _, _ = split_images(model_dir, "val", size, ch)
    tr_z, tr_f = outputs(clf, tr_x)
    va_z, va_f = outputs(clf, va_x)
    te_z, te_f = outputs(clf, te_x)
    stats = ood.fit_stats(tr_f, tr_y.numpy(), len(classes))
    res["bank_bytes"] = int(stats.bank.nbytes)
    res["stats_bytes"] = int(sum(a.nbytes for a in stats.arrays().values()))
    sets = unknown if unknown is not None else {k: to_model(v, size, ch) for k, v in far_ood_sets(n_ood).items()}
    outs = {k: outputs(clf, v) for k, v in sets.items()}
    res["scores"] = {}
    for kind in ood.SCORES:
        val_s = ood.score(kind, va_z, va_f, stats, temperature=T)
        thr = ood.threshold_for_accept_rate(val_s, accept)
        ins = ood.score(kind, te_z, te_f, stats, temperature=T)
        row = {"test_accept_rate": float((ins >= thr).mean())}
        for name, (z, f) in outs.items():
            o = ood.score(kind, z, f, stats, temperature=T)
            row[name] = {"auroc": ood.auroc(ins, o), "fpr95": ood.fpr_at_tpr(ins, o), "accepted": float((o >= thr).mean())}
        aur = [v["auroc"] for k, v in row.items() if isinstance(v, dict)]
        row["mean_auroc"] = float(np.mean(aur))
        row["min_auroc"] = float(np.min(aur))
        res["scores"][kind] = row
    if clf.unknown_threshold is not None:
        # the answer the model directory ships (imgrec train's own fit: ≤10,000 strided training images,
        # threshold at the stored accept rate), as predict and serve give it
        _, s_te = clf.scored(te_x)
        t = clf.unknown_threshold
        res["shipped"] = {"score": clf.unknown["score"], "accept_rate": clf.unknown["accept_rate"],
                          "test_answered": float((s_te >= t).mean()),
                          "unknown": {k: float((clf.scored(v)[1] < t).mean()) for k, v in sets.items()},
                          "auroc": {k: ood.auroc(s_te, clf.scored(v)[1]) for k, v in sets.items()}}
    return res


# -- near-OOD: 8 known classes, 2 unknown -------------------------------------------------------------
def near_ood(root: Path, unknown=(6, 9), extra: list[str] = ()) -> dict:
    from imgrec.data.named import load_named
    x, y = load_named("fashion-mnist", "train")
    xt, yt = load_named("fashion-mnist", "test")
    x, y, xt, yt = (np.asarray(a) for a in (x, y, xt, yt))
    data = root / "fm8"
    if not (data / ".done").exists():
        for split, (xs, ys) in (("train", (x, y)), ("test", (xt, yt))):
            for i, (im, lab) in enumerate(zip(xs, ys)):
                if int(lab) in unknown:
                    continue
                d = data / split / f"c{int(lab)}"
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(im).save(d / f"{i}.png")
        (data / ".done").write_text("")
    out = root / "fm8-run"
    if not (out / "model.json").exists():
        subprocess.run([*IMGREC, "train", "--data", str(data), "--out", str(out),
                        "--overwrite", *extra], check=True)
    clf = Classifier.load(str(out), device="cpu")
    held = xt[np.isin(yt, unknown)]
    res = evaluate_model(str(out), unknown={"2 held-out classes": to_model(held, clf.image_size, clf.channels)})
    res["unknown_classes"] = list(unknown)
    return res


# -- a small folder as users bring one ----------------------------------------------------------------
def build_small_folder(data: Path, per_class: int = 40, test_per_class: int = 100, seed: int = 0,
                       n_classes: int = 10, sides: tuple[int, int] = (28, 96)) -> Path:
    """A small ImageFolder tree made from Fashion-MNIST as a user's photos would come: mixed sizes (``sides``,
    inclusive), a third in colour, PNG and JPEG, and the junk files folders carry (.ipynb_checkpoints/,
    ._x.jpg). Seed 0 with 10 classes is the benchmark's own folder (the first images of each class); any other
    folder draws its classes and images at random from the rest of Fashion-MNIST, so its test split never holds
    one of the benchmark folder's test images."""
    from imgrec.data.named import load_named
    if (data / ".done").exists():
        return data
    x, y = (np.asarray(a) for a in load_named("fashion-mnist", "train"))
    xt, yt = (np.asarray(a) for a in load_named("fashion-mnist", "test"))
    rng = np.random.default_rng(seed)
    own = seed == 0 and n_classes == 10
    pick = np.random.default_rng([seed, n_classes, 1])  # a separate stream: seed 0's sizes and tints stay as before
    classes = list(range(10)) if own else sorted(pick.choice(10, n_classes, replace=False).tolist())
    for split, (xs, ys, n, skip) in (("train", (x, y, per_class, 40)), ("test", (xt, yt, test_per_class, 100))):
        for c in classes:
            d = data / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            members = np.nonzero(ys == c)[0]
            chosen = members[:n] if own else np.sort(pick.choice(members[skip:], n, replace=False))
            for i in chosen:
                im = Image.fromarray(xs[i])
                side = int(rng.integers(sides[0], sides[1] + 1))
                im = im.resize((side, side), Image.BILINEAR)
                if rng.random() < 1 / 3:
                    tint = rng.uniform(0.6, 1.0, 3)
                    im = Image.fromarray((np.asarray(im)[..., None] * tint).astype(np.uint8))
                im.save(d / (f"{i}.jpg" if i % 2 else f"{i}.png"), quality=92)
        (data / split / ".ipynb_checkpoints").mkdir(exist_ok=True)
        (data / split / f"class{classes[0]}" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 Mac resource fork")
    (data / ".done").write_text("")
    return data


# the folders the temperature prior was chosen on (imgrec.eval.calibration): other seeds, class counts and
# sizes than the benchmark's own folder, and none of its test images (seed, classes, smallest and largest side)
DEV_FOLDERS = ((1, 10, (28, 96)), (2, 10, (28, 96)), (3, 10, (40, 128)), (4, 6, (28, 96)), (5, 10, (28, 96)),
               (6, 10, (28, 96)), (7, 5, (28, 64)))


def small_folder(root: Path, per_class: int = 40, test_per_class: int = 100, seed: int = 0, n_classes: int = 10,
                 sides: tuple[int, int] = (28, 96), calibration_only: bool = False) -> dict:
    """Train with the defaults (no option but --data) on the small folder of :func:`build_small_folder` and
    measure it as the others (``calibration_only``: the calibration table only)."""
    own = seed == 0 and n_classes == 10 and sides == (28, 96)
    tag = "" if own else f"-s{seed}-k{n_classes}-{sides[0]}-{sides[1]}"
    data = build_small_folder(root / f"small{tag}", per_class, test_per_class, seed, n_classes, sides)
    out = root / f"small{tag}-run"
    if not (out / "model.json").exists():
        subprocess.run([*IMGREC, "train", "--data", str(data), "--out", str(out), "--overwrite"], check=True)
    res = evaluate_model(str(out), calibration_only=calibration_only)
    res["folder"] = (f"{per_class} training images per class ({n_classes} classes, {sides[0]}-{sides[1]} px), "
                     f"{test_per_class} test images per class" + ("" if own else f", seed {seed}"))
    return res


def _ece_cell(m: dict) -> str:
    lo, hi = m["ece_ci95"]
    return f"{m['ece']:.4f} [{lo:.4f}, {hi:.4f}] | {m['floor']['mean']:.4f} ({m['floor']['p95']:.4f})"


def calibration_table(results: list[dict]) -> list[str]:
    """One row a model: test accuracy, validation images, T (and the NLL-only T), ECE raw and scaled, each with
    its 95% bootstrap interval and noise floor (mean and 95th percentile)."""
    lines = ["| folder | test acc | val images | T (NLL alone) | raw ECE [95%] | floor (p95) | scaled ECE [95%] | "
             "floor (p95) | raw → scaled NLL |", "|---" * 9 + "|"]
    for r in results:
        c = r["calibration"]
        t_nll = f" ({r['T_nll']:.3f})" if r.get("T_nll") is not None else ""
        lines.append(f"| {r.get('folder', r['model'])} | {r['test_accuracy']:.3f} | {r.get('n_val')} | "
                     f"{r['temperature']:.3f}{t_nll} | {_ece_cell(c['raw'])} | {_ece_cell(c['scaled'])} | "
                     f"{c['raw']['nll']:.4f} → {c['scaled']['nll']:.4f} |")
    return lines


def markdown(results: list[dict]) -> str:
    lines = ["# Confidence: calibration and out-of-distribution scores", "",
             "`python benchmarks/confidence.py` (see its docstring); statistics from the training split, thresholds "
             "from the validation split (95% of in-distribution images accepted), measured on the test split.", "",
             machine_markdown(), ""]
    dev = [r for r in results if r.get("dev")]
    if dev:
        lines += ["## Development folders (calibration only; `confidence.py --dev-folders`)", "",
                  "The folders the temperature prior was chosen on: their test splits are the development set. The "
                  "benchmark's own small folder below was measured once, after the choice.", "",
                  *calibration_table(dev), ""]
    for r in results:
        if r.get("dev"):
            continue
        c = r["calibration"]
        lines += [f"## {r['model']} ({r['name']}, test accuracy {r['test_accuracy']:.2%}, T = {r['temperature']:.3f})", "",
                  *([r["folder"], ""] if "folder" in r else []),
                  *([f"Known: 8 classes; unknown: the test images of classes {r['unknown_classes']}.", ""]
                    if "unknown_classes" in r else []),
                  "| | ECE [95% bootstrap] | noise floor: mean (95th pct.) | NLL | Brier |", "|---|---|---|---|---|",
                  *(f"| {k} | {_ece_cell(c[k])} | {c[k]['nll']:.4f} | {c[k]['brier']:.4f} |" for k in ("raw", "scaled")),
                  "", *([f"T by the NLL alone on the {r['n_val']} validation images: {r['T_nll']:.3f}.", ""]
                        if r.get("T_nll") is not None else []),
                  f"Feature bank: {r['bank_bytes'] / 1e6:.2f} MB (float16); all statistics {r['stats_bytes'] / 1e6:.2f} MB.", ""]
        sets = [k for k, v in next(iter(r["scores"].values())).items() if isinstance(v, dict)]
        lines += ["| score | " + " | ".join(f"{s} AUROC / FPR95" for s in sets) + " | mean AUROC | test accepted |",
                  "|---" * (len(sets) + 3) + "|"]
        for kind, row in r["scores"].items():
            lines.append(f"| {kind} | " + " | ".join(f"{row[s]['auroc']:.3f} / {row[s]['fpr95']:.3f}" for s in sets)
                         + f" | {row['mean_auroc']:.3f} | {row['test_accept_rate']:.3f} |")
        lines.append("")
        if "shipped" in r:
            sh = r["shipped"]
            lines += [f"As shipped (`{sh['score']}`, `inference.unknown` of the model directory, threshold for "
                      f"{sh['accept_rate']:.0%} of the validation images): {sh['test_answered']:.1%} of the test images "
                      "answered; share answered \"unknown\" and AUROC per set:", "",
                      "| set | unknown | AUROC |", "|---|---|---|",
                      *(f"| {k} | {v:.3f} | {sh['auroc'][k]:.3f} |" for k, v in sh["unknown"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], help="a trained model directory (repeatable)")
    ap.add_argument("--train", help="train a model on this data with the defaults first")
    ap.add_argument("--near-ood", action="store_true", help="also run the 8-known / 2-unknown protocol")
    ap.add_argument("--small-folder", action="store_true", help="also train and measure on a small image folder")
    ap.add_argument("--dev-folders", action="store_true",
                    help="also train and measure (calibration only) the development folders: other seeds, class "
                         "counts and sizes (DEV_FOLDERS)")
    ap.add_argument("--work", default=None, help="where trained models and folders go (default: a temp dir)")
    ap.add_argument("--n-ood", type=int, default=2000, help="images per far-OOD set")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--json-out", help="write the raw results here")
    a = ap.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="imgrec-confidence-"))
    models = list(a.model)
    if a.train:
        out = work / "trained"
        subprocess.run([*IMGREC, "train", "--data", a.train, "--out", str(out), "--overwrite"],
                       check=True)
        models.append(str(out))
    results = [evaluate_model(m, n_ood=a.n_ood) for m in models]
    if a.dev_folders:
        for seed, k, sides in DEV_FOLDERS:
            results.append({**small_folder(work, seed=seed, n_classes=k, sides=sides, calibration_only=True),
                            "dev": True})
    if a.small_folder:
        results.append(small_folder(work))
    if a.near_ood:
        results.append(near_ood(work))
    text = markdown(results)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
