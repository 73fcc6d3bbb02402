"""Build the guided tour (docs/tour.md and its pictures in docs/tour/) from one fresh run of imgrec.

    python docs/make_tour.py --out docs            # what `make docs` runs
    python docs/make_tour.py --out /tmp/t --work /tmp/t/work   # keep the run directory and the JSON files

The tour trains its own small model, then explains, evaluates, exports and predicts with it through the
`imgrec` command line (run as `python -m imgrec.cli`, the same program as the `imgrec` script). Every number
and every picture in tour.md comes from this run: nothing in the text is typed in by hand, so the tour
cannot drift away from what imgrec does. The one exception is docs/cnn_vs_vit.png, a measurement made
elsewhere (benchmarks/cnn_vs_vit.py), which the tour links to and says so.

The files of the run (run directory, samples, eval.json, explain.json, export.json, predict*.csv) are
written to --work, a temporary folder removed at the end unless --work is given.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CNN_VS_VIT = ROOT / "docs" / "cnn_vs_vit.png"   # measured by benchmarks/cnn_vs_vit.py, not by this script
PICTURES = "tour"                                 # folder of the pictures, beside tour.md
MAX_PNG_BYTES = 290_000                           # keep every picture small in the repository

# The tour's own model: the textbook CNN on a slice of Fashion-MNIST, small enough to train in well under a
# minute on 2 CPU cores.
TRAIN_ARGS = ["--data", "fashion-mnist", "--model", "simple_cnn", "--epochs", "5", "--train-limit", "8000",
              "--val-split", "2000", "--seed", "0"]
N_SAMPLES = 8        # test images exported as PNG files and predicted in the last section
RUN = "run"          # the run directory, relative to the work folder

# The section headings, in order (tests/test_tour.py checks them).
SECTIONS = [
    "1. An image is numbers",
    "2. Filters, feature maps, ReLU and pooling",
    "3. From features to a decision, and how one image teaches the network",
    "4. Epochs: learning from the whole training set, again and again",
    "5. Evaluating honestly",
    "6. CNN or Vision Transformer?",
    "7. Predicting and serving",
]


# -- running imgrec --------------------------------------------------------------------------------
class Imgrec:
    """Runs `imgrec` commands in the work folder and remembers how long each took."""

    def __init__(self, work: Path):
        self.work = work
        self.env = {**os.environ, "MPLBACKEND": "Agg"}
        self.seconds: dict[str, float] = {}

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "imgrec.cli", *args]
        print(f"$ {shown(args)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=self.work, env=self.env, capture_output=True, text=True)
        self.seconds[args[0]] = self.seconds.get(args[0], 0.0) + time.perf_counter() - t0
        if p.returncode != 0:
            sys.stderr.write(p.stdout + p.stderr)
            raise SystemExit(f"make_tour: `{shown(args)}` failed with exit code {p.returncode}")
        return p

    def json(self, *args: str, save: str | None = None):
        out = self(*args).stdout
        if save:
            (self.work / save).write_text(out, encoding="utf-8")
        return json.loads(out)


def shown(args) -> str:
    """A command as a reader would type it."""
    return "imgrec " + shlex.join(args)


# -- small helpers ---------------------------------------------------------------------------------
def pct(x: float, digits: int = 2) -> str:
    return f"{x * 100:.{digits}f}%"


def code(text: str) -> str:
    return "```\n" + text.rstrip("\n") + "\n```"


def md_table(rows: list[list], header: list[str], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def save_png(data: bytes | object, path: Path) -> None:
    """Write a PNG (bytes or a matplotlib figure); a picture over MAX_PNG_BYTES is stored with a 256-colour
    palette, which these plots survive unchanged to the eye."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray)):
        buf = io.BytesIO()
        data.savefig(buf, format="png", dpi=100)
        data = buf.getvalue()
    if len(data) > MAX_PNG_BYTES:
        img = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
    path.write_bytes(data)


def figure(w: float, h: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), layout="constrained")


def file_label(name: str, classes: list[str]) -> str:
    """The class of an `imgrec export-samples` file, `<index>_<label>.png` (the label with '/' as '-' and ' '
    as '_')."""
    stem = Path(name).stem.split("_", 1)[1]
    for c in classes:
        if c.replace("/", "-").replace(" ", "_") == stem:
            return c
    raise SystemExit(f"make_tour: no class matches the sample file {name}")


def read_predictions(path: Path) -> list[dict]:
    """`imgrec predict --csv` rows (file, rank, label, score, ...) as [{"file", "predictions": [{label, score}]}],
    in the file's order."""
    out: dict[str, list] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("error"):
                raise SystemExit(f"make_tour: imgrec predict could not read {row['file']}: {row['error']}")
            out.setdefault(row["file"], []).append((int(row["rank"]), row["label"], float(row["score"])))
    return [{"file": k, "predictions": [{"label": lab, "score": sc} for _, lab, sc in sorted(v)]}
            for k, v in out.items()]


# -- pictures ---------------------------------------------------------------------------------------
def pixels_figure(img: np.ndarray, label: str):
    fig = figure(15, 8.4)
    a, b = fig.subplots(1, 2, width_ratios=[1, 1.9])
    a.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    a.set_title(f"what you see\n(label: {label})", fontsize=12)
    b.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    for r in range(img.shape[0]):
        for c in range(img.shape[1]):
            v = int(img[r, c])
            b.text(c, r, str(v), ha="center", va="center", fontsize=7, color="black" if v > 127 else "#bbbbbb")
    b.set_title(f"what the network gets\n{img.shape[0]}×{img.shape[1]} numbers, 0 (black) to 255 (white)",
                fontsize=12)
    for ax in (a, b):
        ax.set_xticks(range(0, img.shape[1], 4))
        ax.set_yticks(range(0, img.shape[0], 4))
        ax.tick_params(labelsize=8)
        ax.set_xlabel("column", fontsize=9)
        ax.set_ylabel("row", fontsize=9)
    return fig


def curves_figure(rows: list[dict], best_epoch: int):
    ep = [int(r["epoch"]) for r in rows]
    fig = figure(11, 4.2)
    a, b, c = fig.subplots(1, 3)
    a.plot(ep, [float(r["train_loss"]) for r in rows], "o-", label="training (smoothed labels, augmented)")
    a.plot(ep, [float(r["val_loss"]) for r in rows], "s-", label="validation")
    a.set_title("loss (lower is better)")
    b.plot(ep, [float(r["train_acc"]) * 100 for r in rows], "o-", label="training")
    b.plot(ep, [float(r["val_acc"]) * 100 for r in rows], "s-", label="validation")
    b.axvline(best_epoch, color="gray", ls=":", label=f"best epoch ({best_epoch})")
    b.set_title("accuracy (%)")
    c.plot(ep, [float(r["lr"]) for r in rows], "o-", color="tab:green")
    c.set_title("learning rate at the epoch's end")
    for ax in (a, b, c):
        ax.set_xlabel("epoch")
        ax.set_xticks(ep)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    return fig


def confusion_figure(cm: np.ndarray, classes: list[str]):
    fig = figure(8.5, 7.2)
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    hi = cm.max()
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > hi / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(len(classes)), classes, fontsize=9)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix on the test split ({int(cm.sum()):,} images)")
    return fig


def predictions_figure(images: list[np.ndarray], truths: list[str], torch_pred: list[dict], onnx_pred: list[dict]):
    n = len(images)
    fig = figure(2.0 * n, 2.9)
    axes = fig.subplots(1, n)
    for ax, img, t, p, o in zip(axes, images, truths, torch_pred, onnx_pred):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ok = p["label"] == t
        ax.set_title(f"true: {t}", fontsize=8)
        ax.set_xlabel(f"PyTorch: {p['label']} {p['score'] * 100:.1f}%\nONNX: {o['label']} {o['score'] * 100:.1f}%",
                      fontsize=8, color="black" if ok else "#c00000")
    return fig


# -- the tour -------------------------------------------------------------------------------------
def build(out: Path, work: Path) -> dict:
    from PIL import Image

    pics = out / PICTURES
    pics.mkdir(parents=True, exist_ok=True)
    imgrec = Imgrec(work)
    commands: dict[str, str] = {}

    # -- the data and the model -------------------------------------------------------------------
    a = ["export-samples", "--data", "fashion-mnist", "--split", "test", "--count", str(N_SAMPLES),
         "--out", "samples"]
    imgrec(*a)
    commands["samples"] = shown(a)
    sample_files = sorted((work / "samples").glob("*.png"))
    a = ["train", *TRAIN_ARGS, "--out", RUN]
    t0 = time.perf_counter()
    imgrec(*a)
    train_wall = time.perf_counter() - t0
    commands["train"] = shown(a)
    meta = json.loads((work / RUN / "model.json").read_text())
    classes = meta["classes"]
    metrics = meta["metrics"]
    cfg_train = meta["config"]["train"]
    with open(work / RUN / "metrics.csv", newline="") as f:
        epochs = list(csv.DictReader(f))
    counts = {k: sum(v) for k, v in meta["data"]["counts"].items()}

    first = sample_files[0]
    label = file_label(first.name, classes)
    img = np.asarray(Image.open(first))
    assert img.ndim == 2, "Fashion-MNIST images are grey: one channel"
    sample_rel = f"samples/{first.name}"

    # -- 1. pixels ------------------------------------------------------------------------------------
    save_png(pixels_figure(img, label), pics / "pixels.png")
    pixel_text = "\n".join(" ".join(f"{int(v):3d}" for v in row) for row in img)
    mean, std = meta["mean"][0], meta["std"][0]
    r0, c0 = np.unravel_index(int(np.argmax(img)), img.shape)
    brightest = int(img[r0, c0])

    # -- 2 and 3. explain --steps ---------------------------------------------------------------------
    a = ["explain", "--model", RUN, sample_rel, "--steps", "--label", label, "--out", "explain.png",
         "--json-out", "explain.json", "--json"]
    summary = imgrec.json(*a)
    commands["explain"] = shown(a)
    save_png((work / "explain.png").read_bytes(), pics / "explain_steps.png")
    ex = json.loads((work / "explain.json").read_text())
    st, tr = ex["steps"], ex["training"]
    filters = np.asarray(st["filters"])
    conv, act, pool = (np.asarray(st[k]) for k in ("conv", "activation", "pool"))
    edge_map, edge_filter = np.asarray(st["edge_map"]), np.asarray(st["edge_filter"])
    # the classic edge filter at the place it answers most, computed here from the pixels and checked
    # against the map explain drew (grey in 0..1, the border padded by repeating the edge pixels)
    gray = np.pad(img.astype(np.float64) / 255.0, 1, mode="edge")
    er, ec = np.unravel_index(int(np.argmax(edge_map)), edge_map.shape)
    window = gray[er:er + 3, ec:ec + 3]
    edge_value = float((window * edge_filter).sum())
    assert abs(edge_value - edge_map[er, ec]) < 1e-4, (edge_value, edge_map[er, ec])
    ch = int(st["edge_like_channel"])
    ps = int(np.asarray(st["patch"]).shape[-1])   # the side of the window of pixels shown as numbers
    neg_share = float((conv < 0).mean())
    zero_after = float((act == 0).mean())
    # one pooling window: the 2×2 block of the edge-like channel that gives its largest pooled value
    pr, pc = np.unravel_index(int(np.argmax(pool[ch])), pool[ch].shape)
    block = act[ch, 2 * pr:2 * pr + 2, 2 * pc:2 * pc + 2]
    assert abs(block.max() - pool[ch, pr, pc]) < 1e-5

    clf = tr["classifier"]
    k = int(tr["label_index"])
    contrib = clf["contributions"][k]
    logits = np.asarray(clf["logits"])
    probs = np.asarray(tr["probabilities"])
    temperature = meta["inference"].get("temperature", {}).get("T", 1.0)
    p_model = np.exp(logits / temperature - (logits / temperature).max())
    p_model /= p_model.sum()
    step = tr["step"]
    order = np.argsort(-logits)

    # -- 4. epochs ----------------------------------------------------------------------------------
    best_epoch = int(metrics["best_epoch"])
    save_png(curves_figure(epochs, best_epoch), pics / "training_curves.png")
    steps_per_epoch = counts["train"] / int(cfg_train["batch_size"])   # about: a last short batch is dropped

    # -- 5. eval ----------------------------------------------------------------------------------------
    a = ["eval", "--model", RUN, "--json"]
    ev = imgrec.json(*a, save="eval.json")
    commands["eval"] = shown(a)
    cm = np.asarray(ev["confusion_matrix"])
    save_png(confusion_figure(cm, classes), pics / "confusion.png")
    off = cm.copy()
    np.fill_diagonal(off, 0)
    ci, cj = np.unravel_index(int(np.argmax(off)), off.shape)
    per_class = sorted(ev["per_class"], key=lambda r: r["recall"])
    worst, best = per_class[0], per_class[-1]
    cal = ev["calibration"]

    # -- 6. CNN vs ViT ------------------------------------------------------------------------------------
    a = ["models", "--json"]
    catalog = {r["name"]: r for r in imgrec.json(*a)}
    commands["models"] = shown(a)
    cnn, vit = catalog["simple_cnn"], catalog["vit_tiny"]
    vs_link = Path(os.path.relpath(CNN_VS_VIT, out)).as_posix()

    # -- 7. predict, export, predict with ONNX Runtime ------------------------------------------------------
    # --csv with --verbose: the table on the screen and the same answers, with more digits, in a CSV file
    a = ["predict", "--model", RUN, "samples", "--top-k", "3", "--csv", "predict.csv", "--verbose"]
    predict_text = imgrec(*a).stdout
    commands["predict"] = shown(a)
    pred_torch = read_predictions(work / "predict.csv")
    # "unknown": an image of none of the classes (random noise), and the threshold the run chose
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(work / "noise.png")
    a = ["predict", "--model", RUN, "noise.png", "--json"]
    noise_res = imgrec.json(*a)[0]
    commands["predict_noise"] = shown(a)
    unk = json.loads((work / RUN / "model.json").read_text())["inference"].get("unknown") or {}
    a = ["export", "--model", RUN, "--json"]
    exp = imgrec.json(*a, save="export.json")
    commands["export"] = shown(a)
    onnx_path = Path(exp["path"]).as_posix()
    a = ["predict", "--model", onnx_path, "--backend", "onnxruntime", "samples", "--top-k", "3",
         "--csv", "predict_onnx.csv", "--verbose"]
    onnx_text = imgrec(*a).stdout
    commands["predict_onnx"] = shown(a)
    pred_onnx = read_predictions(work / "predict_onnx.csv")
    by_file = {r["file"]: r for r in pred_onnx}
    truths = [file_label(Path(r["file"]).name, classes) for r in pred_torch]
    top_t = [r["predictions"][0] for r in pred_torch]
    top_o = [by_file[r["file"]]["predictions"][0] for r in pred_torch]
    agree = sum(t["label"] == o["label"] for t, o in zip(top_t, top_o))
    max_diff = max(abs(t["score"] - o["score"]) for t, o in zip(top_t, top_o))
    right = sum(t["label"] == y for t, y in zip(top_t, truths))
    sample_imgs = [np.asarray(Image.open(work / r["file"])) for r in pred_torch]
    save_png(predictions_figure(sample_imgs, truths, top_t, top_o), pics / "predictions.png")
    serve_cmd = shown(["serve", "--model", RUN])
    serve_onnx_cmd = shown(["serve", "--model", onnx_path, "--backend", "onnxruntime"])
    serve_block = "\n".join([serve_cmd, f"{serve_onnx_cmd}     # the exported file, without PyTorch",
                             f"curl -F files=@{sample_rel} 'http://127.0.0.1:8000/v1/predict?top_k=3'"])

    if unk and "unknown" in noise_res:
        top = noise_res["predictions"][0]
        verdict = ("is answered **unknown**" if noise_res["unknown"] else
                   "is still accepted here (this small model's threshold lets it through)")
        unknown_text = (
            "**Not every image shows one of the ten classes.** A softmax always sums to 1, so the model names "
            "*some* class for anything. After training, imgrec also fitted an out-of-distribution score "
            f"(`{unk['score']}`: how far the image's features, at several layers of the network, lie from the "
            "training images' class averages) and chose a threshold on the validation split that answers "
            f"{pct(unk['accept_rate'], 0)} of its images. Random noise:\n\n{code(commands['predict_noise'])}\n\n"
            f"{verdict}: its score is {noise_res['ood_score']:.1f} against the threshold "
            f"{unk['threshold']:.1f}, although its top label, {top['label']}, gets {pct(top['score'], 1)}. "
            "`--accept-rate` and `--no-unknown` change this; the JSON answer carries `unknown` and `ood_score`.")
    else:
        unknown_text = ""

    # the precision `predict` computes in on this machine (bfloat16 where the CPU is fast at it)
    from imgrec.infer.predictor import Classifier
    amp = Classifier.load(work / RUN).amp
    amp_name = "float32" if amp is None else str(amp).removeprefix("torch.")
    first_onnx = by_file[f"samples/{first.name}"]["predictions"][0]
    same_as_onnx = first_onnx["label"] == label and abs(first_onnx["score"] - float(p_model[k])) < 5e-4
    precision_note = (", the same up to rounding" if amp is None else
                      (", as the ONNX model in section 7 gives too" if same_as_onnx else "")
                      + f"; the poster's number comes from `predict`'s own forward pass, which on this CPU "
                        f"computes in {amp_name}, faster and a little less precise")
    onnx_note = "" if amp is None else f" (PyTorch computed in {amp_name} here, ONNX Runtime in float32)"
    last = epochs[-1]
    loss_note = (f"The training loss is higher than the validation loss here because it is measured with label "
                 f"smoothing (ε = {cfg_train['label_smoothing']:g}) on augmented (shifted, mirrored) images while "
                 f"the weights are still moving."
                 if float(last["train_loss"]) > float(last["val_loss"]) else
                 "The training loss ends below the validation loss: the model fits the images it learns from "
                 "a little better than new ones, as expected.")
    edge_like = ("Training found a filter much like it" if abs(st["edge_like_correlation"]) >= 0.5 else
                 "The learned filter most like it, found")
    gap = abs(ev["top1"] - metrics["val_acc"])
    val_vs_test = ("close, as it should be when the validation images are like the test images" if gap < 0.02
                   else f"{gap * 100:.1f} points apart: {counts['val']:,} validation images give a noisy "
                        "estimate")
    timid = ("T < 1: the raw scores were too timid (label smoothing teaches that), so T sharpens them."
             if cal["temperature"] < 1 else "T > 1: the raw scores were overconfident, so T softens them."
             if cal["temperature"] > 1 else "")

    # -- the text ------------------------------------------------------------------------------------------
    md = f"""# A guided tour of image recognition

This tour follows one small convolutional network (CNN) from raw pixels to a served prediction. Everything
below — every number, table and picture — was produced by `docs/make_tour.py`, which trained the model and
ran the commands shown. Run `make docs` to build it again on your machine; your numbers will be close, not
identical.

The model is `simple_cnn`, the textbook CNN: two rounds of (3×3 convolution → ReLU → 2×2 max pooling), a
fully connected layer of 128 features, and a last fully connected layer with one output per class. The data
is [Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist): 28×28 grey photos of clothes in 10
classes ({", ".join(classes)}).

## {SECTIONS[0]}

To a computer an image is a grid of numbers. A grey image has one number per pixel, from 0 (black) to
255 (white); a colour image has three (red, green, blue), so its shape is H×W×C (height × width ×
channels). Here is the first test image, `{first.name}` (its label: **{label}**), written out by

{code(commands["samples"])}

Its {img.shape[0]}×{img.shape[1]}×1 = {img.size} numbers, row by row:

{code(pixel_text)}

![the test image and its pixel values]({PICTURES}/pixels.png)

The brightest pixel is {brightest} (row {r0}, column {c0}); {pct(float((img == 0).mean()), 0)} of the pixels
are 0, the black background. Before the network sees them, imgrec scales the numbers to 0–1 and
normalises them with the training set's mean and standard deviation (`model.json`: mean {mean:.4f},
std {std:.4f}), so the network works with values around 0.

## {SECTIONS[1]}

The tour's own model was trained with

{code(commands["train"])}

({counts["train"]:,} training images, {counts["val"]:,} held out for validation, {cfg_train["epochs"]} epochs:
{train_wall:.0f} s for the whole command on this machine). Then `imgrec explain --steps` shows what happens
inside it to our {label}:

{code(commands["explain"])}

![imgrec explain --steps: the pipeline inside the network, and one training step]({PICTURES}/explain_steps.png)

Read the poster from the top:

- **Panel 2**: a window of {ps}×{ps} pixels of the input (rows {st["patch_origin"][0]}–{st["patch_origin"][0] + ps - 1},
  columns {st["patch_origin"][1]}–{st["patch_origin"][1] + ps - 1}) as the numbers the network gets.
- **A filter** is a small grid of weights. The first layer (`{st["conv_layer"]}`) has {filters.shape[0]}
  filters of {filters.shape[2]}×{filters.shape[3]} weights (panel 3), all learned in training. Each one slides
  over the image; at every position it multiplies the {filters.shape[2]}×{filters.shape[3]} pixels under it by its weights and adds them up. The
  result is a **feature map** (panel 4): {conv.shape[0]} maps of {conv.shape[1]}×{conv.shape[2]} numbers, one
  per filter.
- **By hand**: the classic vertical-edge filter (panel 7) has weights {edge_filter.astype(int).tolist()}. Where
  it answers most strongly (row {er}, column {ec} of panel 8) the pixels under it, scaled to 0–1, are
  {np.round(window, 2).tolist()}; multiplied by the weights and added up they give **{edge_value:.3f}**: bright
  on the left, dark on the right. {edge_like} by itself: channel {ch}, whose map
  correlates {st["edge_like_correlation"]:+.2f} with the edge map (panels 9–10; a negative correlation is the
  mirror image, an edge the other way round).
- **ReLU** (panel 5, `{st["activation_note"]}`) keeps positive numbers and replaces negative ones by 0:
  {pct(neg_share, 0)} of the numbers in the feature maps were negative, so {pct(zero_after, 0)} are 0 after it.
  What is left is evidence *for* a pattern.
- **Pooling** (panel 6, `{st["pool_note"]}`) keeps the largest number of each 2×2 block, halving the size:
  {act.shape[1]}×{act.shape[2]} → {pool.shape[1]}×{pool.shape[2]}. In channel {ch}, the block
  {np.round(block, 3).tolist()} becomes {pool[ch, pr, pc]:.3f}. The pattern stays; its exact position matters
  less.

The second convolution works on these maps the same way, finding patterns of patterns. Grad-CAM (top row,
third picture) colours where the features that raised the score of {ex["target"]} sit (`{ex["layer"]}`).

## {SECTIONS[2]}

After the last pooling the network has {clf["num_features"]} numbers for the image, its **features**. The last
fully connected layer turns them into one score per class, a **logit**: each feature times a learned weight,
all added up, plus a bias. For the true class {label} the largest products were (panel 11):

{md_table([[f"feature {i}", f"{v:.3f}", f"{w:+.4f}", f"{p:+.4f}"]
           for i, v, w, p in list(zip(contrib["features"], contrib["values"], contrib["weights"],
                                      contrib["products"]))[:5]],
          ["feature", "value", "weight", "value × weight"])}

These {len(contrib["products"])} largest products add up to {sum(contrib["products"]):.3f}, the other
{clf["num_features"] - len(contrib["products"])} add {contrib["rest"]:.3f}, and the bias is {contrib["bias"]:.4f}:
the logit of {label} is **{logits[k]:.3f}**.

**Softmax** turns the logits into probabilities that add up to 1: p = exp(logit) / Σ exp(logits). The top
three:

{md_table([[classes[i], f"{logits[i]:.3f}", f"{probs[i]:.4f}"] for i in order[:3]],
          ["class", "logit", "softmax probability"])}

**The loss.** Training measures how wrong the network is with CrossEntropyLoss, which is −log of the
probability given to the true label: −log({probs[k]:.4f}) = **{tr["loss"]:.4f}** (panel 13). A sure, right
answer costs almost 0; a confident wrong one costs a lot. (The run trained with label smoothing ε =
{tr["label_smoothing"]:g}, which spreads a little of the target over the other classes; that loss is
{tr["smoothed_loss"]:.4f}.)

**Backpropagation** computes, for every weight, how much the loss would change if that weight changed: the
gradient. Its size per layer (panel 14), from the input side to the output side:

{md_table([[f"`{l['name']}`", "×".join(map(str, l["shape"])), f"{l['grad_norm']:.4f}", f"{l['weight_norm']:.3f}"]
           for l in tr["layers"]], ["layer", "weights", "gradient size ‖∂loss/∂w‖", "weight size ‖w‖"])}

**One SGD step** moves every weight a little against its gradient: w ← w − lr·∂loss/∂w, with lr =
{step["lr"]:g} (panel 16, done on a copy of the model). The loss on this image went from
{step["loss_before"]:.4f} to **{step["loss_after"]:.4f}** (the straight-line estimate from the gradient,
−lr·‖gradient‖², was {step["predicted_change"]:+.4f}), and the probability of {label} from {step["probability_before"]:.4f} to
**{step["probability_after"]:.4f}**. Training is nothing more than this, repeated over many images.

(The poster's top-right bars say {pct(ex["predicted_probability"], 1)}, not {pct(probs[k], 1)}: `predict`
divides the logits by a temperature T = {temperature:.3f} before the softmax, see section 5; with it the
softmax of these logits gives {pct(float(p_model[k]), 1)}{precision_note}.)

## {SECTIONS[3]}

The training images are shuffled and cut into batches of {cfg_train["batch_size"]}; one optimizer step per
batch ({cfg_train["optimizer"]}, a cleverer cousin of the SGD step above), about {steps_per_epoch:.0f} steps to go once
through all {counts["train"]:,} training images: one **epoch**. After each epoch imgrec measures the loss and
accuracy on the validation images, which it never trains on, and keeps the weights of the best epoch.
From the run's `metrics.csv`:

{md_table([[r["epoch"], f"{float(r['train_loss']):.4f}", pct(float(r["train_acc"]), 1),
            f"{float(r['val_loss']):.4f}", pct(float(r["val_acc"]), 1), f"{float(r['lr']):.2e}"]
           for r in epochs], ["epoch", "training loss", "training accuracy", "validation loss",
                              "validation accuracy", "learning rate"])}

![training curves from metrics.csv]({PICTURES}/training_curves.png)

The best validation accuracy was {pct(metrics["val_acc"], 2)} at epoch {best_epoch}. {loss_note}
The learning rate follows the `{cfg_train["scheduler"]}` schedule: it rises during a warm-up (the first
{pct(float(cfg_train["warmup"] or 0), 0)} of the steps), then falls to almost 0 — big steps early, small careful ones at the
end. More epochs and all of Fashion-MNIST's 60,000 training images would give a better
model; this one is kept small so that the tour builds quickly.

## {SECTIONS[4]}

A model is only as good as its score on images it has never seen and that were never used to make a choice.
The validation split chose the best epoch and the temperature T; the **test split**
({ev["n"]:,} images) is looked at once, at the end:

{code(commands["eval"])}

Test accuracy: **{pct(ev["top1"])}** (the run's own final test in `model.json`: {pct(metrics["test_acc"])}),
top-5 accuracy {pct(ev["top5"])}, macro F1 {ev["macro_f1"]:.4f}. Compare the validation accuracy of
{pct(metrics["val_acc"])}: {val_vs_test}.

![confusion matrix on the test split]({PICTURES}/confusion.png)

The confusion matrix counts, for each true class (row), what the model said (column). The diagonal is
right. The most common mistake: {cm[ci, cj]} images of **{classes[ci]}** called **{classes[cj]}**. The hardest
class is {worst["class"]} (recall {pct(worst["recall"], 1)}: the share of its images found), the easiest
{best["class"]} ({pct(best["recall"], 1)}).

**Are the scores honest?** A model that says "90%" should be right 90% of the time. The expected calibration
error (ECE) measures the gap between confidence and accuracy. With the raw softmax (T = 1) the test ECE is
{cal["before"]["ece"]:.4f}; imgrec fitted a temperature T = {cal["temperature"]:.3f} on the validation split
(the scores become softmax(logits / T)), and the test ECE drops to **{cal["after"]["ece"]:.4f}** (negative
log-likelihood {cal["before"]["nll"]:.4f} → {cal["after"]["nll"]:.4f}). The predicted labels do not change,
only how sure they sound. {timid}

## {SECTIONS[5]}

A CNN looks at small neighbourhoods (3×3 filters) and builds larger patterns layer by layer; that built-in
assumption — nearby pixels belong together, a pattern means the same anywhere — lets it learn from little
data. A **Vision Transformer** (ViT) cuts the image into patches, turns each into a vector, and lets every
patch attend to every other one from the first layer on. It assumes less, so it needs more data (or
pretraining) to learn what a CNN gets for free. From `{commands["models"]}`:

{md_table([[f"`{r['name']}`", r["family"], f"{r['params']:,}", r["default_image_size"], r["description"]]
           for r in (cnn, vit)], ["model", "family", "parameters (10 classes, RGB)", "input (px)", "description"],
          "llrrl")}

The picture below was **not** made by this tour's run: it is the measurement in the README, made by
`python benchmarks/cnn_vs_vit.py` with a CNN and a ViT of the same size trained on growing slices of
Fashion-MNIST. There the CNN won at every training-set size.

![CNN vs ViT test accuracy against training-set size (measured by benchmarks/cnn_vs_vit.py)]({vs_link})

## {SECTIONS[6]}

Predicting is the forward pass alone: pixels → features → logits → softmax → the most likely labels.

{code(commands["predict"])}

{code(predict_text)}

{right} of the {len(truths)} images are right (the file names hold the true labels).

![the test images with their predictions]({PICTURES}/predictions.png)

{unknown_text}

To deploy without PyTorch, export the model to ONNX. The exported graph takes uint8 pixels and does the
resizing, normalisation, network and softmax inside, so nobody can preprocess differently from training.
imgrec checks the file against PyTorch before it keeps it:

{code(commands["export"])}

It wrote `{onnx_path}` ({exp["bytes"] / 1e6:.1f} MB); on the {exp["check"]["n"]:,} images of the
{exp["check"]["data"]} the two agree on {pct(exp["check"]["agreement"])} of the top-1 labels and the
probabilities differ by at most {exp["check"]["max_dprob"]:.1e}. Predicting with ONNX Runtime:

{code(commands["predict_onnx"])}

{code(onnx_text)}

Same top label on {agree} of {len(top_t)} images; the top scores differ by at most {max_diff:.1e}{onnx_note}.

To serve predictions over HTTP (a JSON API and a web page on http://127.0.0.1:8000; not run by the tour):

{code(serve_block)}

Where to go next: `imgrec report --model {RUN}` writes an HTML report of the evaluation, `imgrec train`
without options trains the recipe chosen for your machine on all of Fashion-MNIST, and the
[README](../README.md) has everything else.
"""
    (out / "tour.md").write_text(md, encoding="utf-8")
    return {"train_wall_s": train_wall, "seconds": imgrec.seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the guided tour (tour.md and tour/*.png) from a fresh run.")
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder for tour.md and tour/ (default docs/)")
    p.add_argument("--work", help="folder for the run and its JSON files (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.work:
        work = Path(args.work).resolve()
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"make_tour: --work {work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
        tmp = None
    else:
        tmp = tempfile.mkdtemp(prefix="imgrec-tour-")
        work = Path(tmp)
    t0 = time.perf_counter()
    try:
        info = build(out, work)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    took = ", ".join(f"{k} {v:.1f} s" for k, v in info["seconds"].items())
    print(f"wrote {out / 'tour.md'} and {out / PICTURES}/ in {time.perf_counter() - t0:.0f} s ({took})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
