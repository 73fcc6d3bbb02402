"""The figures of the evaluation report and of ``imgrec explain``, drawn with matplotlib, returned as PNG bytes.

We build ``matplotlib.figure.Figure`` objects and render them with the Agg canvas directly instead of going
through ``pyplot``: no global figure registry to leak memory in a long-running server, no GUI backend picked
up from the environment, and nothing changed for a user who imports imgrec into a notebook.
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = ["to_png", "training_curves", "confusion_heatmaps", "reliability_diagram", "class_counts",
           "explain_figure", "steps_figure", "mosaic"]

HEAT_CMAP = "turbo"       # Grad-CAM heat maps (a perceptually smoother "jet")
SIGNED_CMAP = "RdBu_r"    # filters and raw convolution outputs: red positive, blue negative, white 0
ACT_CMAP = "magma"        # non-negative maps (after ReLU / pooling)


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render ``fig`` with the Agg canvas and return the PNG file's bytes."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.08,
                metadata={"Software": None})  # no version string: the same inputs give the same bytes
    return buf.getvalue()


def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else name[:n - 1] + "…"


# -- report figures --------------------------------------------------------------------------------
def training_curves(rows: Sequence[dict[str, float]]) -> bytes:
    """Loss, accuracy and learning rate per epoch from ``metrics.csv`` rows (train and validation)."""
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(11, 3.1))
    axes = fig.subplots(1, 3)
    panels = (("loss", ("train_loss", "val_loss")), ("accuracy", ("train_acc", "val_acc")), ("learning rate", ("lr",)))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            ys = [r.get(key, math.nan) for r in rows]
            ax.plot(epochs, ys, marker="o", ms=3, label=key.replace("_", " "))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    return to_png(fig)


def confusion_heatmaps(cm: np.ndarray, classes: Sequence[str]) -> bytes:
    """The confusion matrix as counts and row-normalised (each true class's row sums to 1), side by side."""
    cm = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    side = min(max(4.0, 0.5 * k + 2), 14)
    fig = Figure(figsize=(2 * side + 1, side))
    axes = fig.subplots(1, 2)
    annotate = k <= 20  # more cells than that and the numbers are unreadable; the table has them
    labels = [_short(c) for c in classes]
    panels = ((axes[0], cm, "counts", "d"), (axes[1], norm, "row-normalised (recall on the diagonal)", ".2f"))
    for ax, data, title, fmt in panels:
        vmax = max(float(data.max()), 1e-12)
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=vmax)
        ax.set_title(title)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(k), labels, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center", fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        if annotate:
            for i in range(k):
                for j in range(k):
                    v = data[i, j]
                    if fmt == "d" or v >= 0.005:
                        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7 if k > 10 else 8,
                                color="white" if v > 0.6 * vmax else "black")
    fig.tight_layout()
    return to_png(fig)


def reliability_diagram(bins: dict[str, list], ece: float, subtitle: str | None = None) -> bytes:
    """Accuracy against confidence per confidence bin (a calibrated model sits on the diagonal), and how
    many predictions fall in each bin; ``subtitle`` names the scores (raw, or at which temperature)."""
    lower, upper = np.asarray(bins["lower"]), np.asarray(bins["upper"])
    count = np.asarray(bins["count"])
    acc, conf = np.asarray(bins["accuracy"]), np.asarray(bins["confidence"])
    width = upper - lower
    filled = count > 0
    fig = Figure(figsize=(5.2, 5.6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
    top.bar(lower[filled], acc[filled], width=width[filled], align="edge", color="#4c72b0", edgecolor="white",
            label="accuracy")
    # the gap between accuracy and mean confidence is what ECE averages (weighted by the bin's count)
    top.bar(lower[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width[filled], align="edge",
            facecolor=(0.87, 0.2, 0.2, 0.18), edgecolor="#c03030", hatch="//", lw=0.8,
            label="gap to the bin's mean confidence")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability diagram (ECE {ece:.4f})" + (f"\n{subtitle}" if subtitle else ""))
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(lower, count, width=width, align="edge", color="#8c8c8c", edgecolor="white")
    # log scale when one bin (usually the most confident) dwarfs the typical bin and would flatten the rest
    typical = float(np.median(count[filled])) if filled.any() else 1.0
    bottom.set_yscale("log" if count.max(initial=0) > 50 * max(1.0, typical) else "linear")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("predictions")
    fig.tight_layout()
    return to_png(fig)


def class_counts(counts: dict[str, Sequence[int]], classes: Sequence[str]) -> bytes:
    """Images per class in each split, as grouped bars (classes along the x axis)."""
    splits = list(counts)
    k = len(classes)
    fig = Figure(figsize=(min(14.0, max(6.0, 0.28 * k * len(splits) + 2)), 3.2))
    ax = fig.subplots()
    w = 0.8 / max(1, len(splits))
    x = np.arange(k)
    for i, s in enumerate(splits):
        ax.bar(x + (i - (len(splits) - 1) / 2) * w, counts[s], width=w, label=s)
    ax.set_xticks(x, [_short(c, 16) for c in classes], rotation=35 if k > 6 else 0, ha="right" if k > 6 else "center",
                  fontsize=8)
    ax.set_ylabel("images")
    ax.legend(fontsize=8, ncols=len(splits), loc="upper center", bbox_to_anchor=(0.5, 1.15), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlim(-0.6, k - 0.4)
    fig.tight_layout()
    return to_png(fig)


# -- explain figures -------------------------------------------------------------------------------
def _show_image(ax, image: np.ndarray) -> None:
    """An H×W×C uint8 image without axes; grey images in grey."""
    if image.shape[2] == 1:
        ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str) -> None:
    """The heat map over the image. Opacity grows with the heat, so the image stays visible where there is
    no evidence instead of disappearing under the colour map's dark blue."""
    _show_image(ax, image)
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)
    ax.imshow(heat, cmap=HEAT_CMAP, alpha=0.1 + 0.55 * heat, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)


def _prob_bars(ax, result: dict[str, Any], top: int = 10) -> None:
    """Softmax output as horizontal bars, the most probable class on top; the explained class in red."""
    probs = np.asarray(result["probabilities"], dtype=float)
    order = np.argsort(-probs, kind="stable")[:top]
    labels = [_short(result["classes"][i], 16) for i in order]
    colors = ["#c44e52" if i == result["target_index"] else "#4c72b0" for i in order]
    ax.barh(range(len(order)), probs[order], color=colors)
    ax.set_yticks(range(len(order)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    for y, i in enumerate(order):
        ax.text(min(probs[i] + 0.02, 0.8), y, f"{probs[i] * 100:.1f}%", va="center", fontsize=7)
    ax.set_title("softmax: class probabilities", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)


def explain_figure(result: dict[str, Any]) -> bytes:
    """Input, Grad-CAM overlay (and attention rollout for a ViT), and the class probabilities."""
    has_attention = "attention" in result
    n = 4 if has_attention else 3
    fig = Figure(figsize=(3.2 * n, 3.4))
    axes = fig.subplots(1, n, gridspec_kw={"width_ratios": [1] * (n - 1) + [1.3]})
    _show_image(axes[0], result["image"])
    axes[0].set_title(f"input ({result['image'].shape[1]}×{result['image'].shape[0]} px)", fontsize=9)
    _overlay(axes[1], result["image"], result["heatmap"],
             f"Grad-CAM for {_short(result['target'], 18)!s} ({result['target_probability'] * 100:.1f}%)")
    if has_attention:
        _overlay(axes[2], result["image"], result["attention"], "attention rollout (class token)")
    _prob_bars(axes[-1], result)
    fig.suptitle(f"predicted: {result['predicted']} ({result['predicted_probability'] * 100:.1f}%)", fontsize=11)
    fig.tight_layout()
    return to_png(fig, dpi=110)


def neighbours_figure(image: np.ndarray, predicted: str, neighbours: list[dict[str, Any]]) -> bytes:
    """The input beside its nearest training images (label and cosine similarity under each)."""
    n = len(neighbours) + 1
    fig = Figure(figsize=(1.7 * n, 2.3))
    axes = fig.subplots(1, n)
    axes = list(np.atleast_1d(axes))
    _show_image(axes[0], image)
    axes[0].set_title(f"input\npredicted {_short(predicted, 16)}", fontsize=8)
    for ax in axes[0].spines.values():
        ax.set_edgecolor("#1d4ed8")
        ax.set_linewidth(2)
    for ax, nb in zip(axes[1:], neighbours):
        _show_image(ax, nb["image"])
        ax.set_title(f"{_short(nb['label'], 16)}\ncos {nb['similarity']:.3f}", fontsize=8)
        ax.set_xlabel(f"train #{nb['index']}", fontsize=7)
    fig.suptitle("nearest training images in feature space", fontsize=10)
    fig.tight_layout()
    return to_png(fig, dpi=110)


def mosaic(maps: np.ndarray, ncols: int, pad: int = 1, normalize: str = "signed") -> np.ndarray:
    """Tile N×h×w maps into one 2-D array, each tile scaled on its own (``signed``: to -1..1 around 0;
    ``positive``: to 0..1), gaps NaN (drawn as the background). One imshow for many maps is far faster
    than one axes per map."""
    maps = np.asarray(maps, dtype=np.float32)
    n, h, w = maps.shape
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (h + pad) - pad, ncols * (w + pad) - pad), np.nan, dtype=np.float32)
    for i, m in enumerate(maps):
        scale = float(np.abs(m).max()) if normalize == "signed" else float(m.max())
        tile = m / scale if scale > 0 else np.zeros_like(m)
        r, c = divmod(i, ncols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = tile
    return out


def _rgb_mosaic(filters: np.ndarray, ncols: int, pad: int = 1) -> np.ndarray:
    """RGB first-layer filters (N×3×k×k) as colour tiles, each min-max scaled (the AlexNet-paper view)."""
    n, _, h, w = filters.shape
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    out = np.ones((nrows * (h + pad) - pad, ncols * (w + pad) - pad, 3), dtype=np.float32)
    for i, f in enumerate(filters):
        f = f.transpose(1, 2, 0)
        lo, hi = float(f.min()), float(f.max())
        r, c = divmod(i, ncols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = (f - lo) / (hi - lo) if hi > lo else 0.5
    return out


def _numbers(ax, values: np.ndarray, cmap: str, vmin: float, vmax: float, fmt: str, title: str,
             fontsize: int = 7) -> None:
    """A small matrix drawn as coloured cells with its numbers written in them."""
    ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    mid = (vmin + vmax) / 2
    for (i, j), v in np.ndenumerate(values):
        dark = v < mid if cmap == "gray" else abs(v - mid) > 0.35 * (vmax - vmin)
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def _pick_channels(act: np.ndarray, n: int, must: int | None) -> list[int]:
    """The ``n`` channels with the most varied activation (blank maps teach nothing), in index order,
    always including ``must`` (the most edge-like channel)."""
    spread = act.reshape(act.shape[0], -1).std(axis=1)
    chosen = list(np.argsort(-spread, kind="stable")[:n])
    if must is not None and must not in chosen:
        chosen[-1] = must
    return sorted(int(c) for c in chosen)


def steps_figure(result: dict[str, Any], n_maps: int = 8) -> bytes:
    """The pipeline made visible: input pixels as numbers, first-layer filters, feature maps after the
    convolution, the activation and pooling, the classic vertical-edge filter beside the most similar learned
    one, the Grad-CAM heat map and the softmax output; then training on the same image (when ``result`` has
    ``training``): features × weights = logits, the loss, the gradient per layer, the input saliency and one
    SGD step."""
    s = result["steps"]
    training = result.get("training")
    fig = Figure(figsize=(15, 20 if training else 13), layout="constrained")
    ratios = [1.1, 1, 1] + ([1, 1] if training else []) + [0.42]
    grid = fig.add_gridspec(len(ratios), 4, height_ratios=ratios)
    _row_input(fig, grid, result)
    if "filters" not in s:
        fig.suptitle("this network has no convolution to show", fontsize=12)
        return to_png(fig, dpi=90)
    _row_filters(fig, grid, s, n_maps)
    _row_edge(fig, grid, s)
    if training:
        _rows_training(fig, grid, result)
    _text_row(fig, grid[len(ratios) - 1, :], result)
    fig.suptitle(f"Inside the network: predicted {result['predicted']} "
                 f"({result['predicted_probability'] * 100:.1f}%)", fontsize=13)
    return to_png(fig, dpi=90)


def _plain(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _row_input(fig, grid, result: dict[str, Any]) -> None:
    """Row 1: the input, a window of it as numbers, the heat map, the output."""
    s, img = result["steps"], result["image"]
    ax = fig.add_subplot(grid[0, 0])
    _show_image(ax, img)
    r, c = s["patch_origin"]
    k = s["patch"].shape[-1]
    ax.add_patch(Rectangle((c - 0.5, r - 0.5), k, k, fill=False, ec="#e8000b", lw=2))
    ax.set_title("1. the input image\n(red box: the window on the right)", fontsize=9)
    ax = fig.add_subplot(grid[0, 1])
    channel = "" if img.shape[2] == 1 else " (red channel)"
    _numbers(ax, s["patch"][0].astype(int), "gray", 0, 255, "d",
             f"2. what the network gets: numbers 0-255{channel}\nrows {r}-{r + k - 1}, columns {c}-{c + k - 1}")
    ax = fig.add_subplot(grid[0, 2])
    _overlay(ax, img, result["heatmap"], f"Grad-CAM: where it looked for\n{_short(result['target'], 24)}")
    _prob_bars(fig.add_subplot(grid[0, 3]), result)


def _row_filters(fig, grid, s: dict[str, Any], n_maps: int) -> None:
    """Row 2: the learned filters and what they make of the image."""
    filters = s["filters"]
    nf = min(len(filters), 32)
    ax = fig.add_subplot(grid[1, 0])
    kh, kw = filters.shape[-2:]
    if filters.shape[1] == 3:
        ax.imshow(_rgb_mosaic(filters[:nf], 8), interpolation="nearest")
    else:
        ax.imshow(mosaic(filters[:nf].mean(axis=1), 8), cmap=SIGNED_CMAP, vmin=-1, vmax=1, interpolation="nearest")
    _plain(ax)
    ax.set_title(f"3. first layer: {nf} of {len(filters)} learned {kh}×{kw} filters\n(red +, blue -)", fontsize=9)
    chans = _pick_channels(s["activation"], n_maps, s.get("edge_like_channel"))
    for col, (key, title, norm, cmap) in enumerate((
            ("conv", "4. feature maps after the convolution", "signed", SIGNED_CMAP),
            ("activation", f"5. after the activation:\n{s['activation_note']}", "positive", ACT_CMAP),
            ("pool", f"6. after pooling:\n{s['pool_note']}", "positive", ACT_CMAP)), start=1):
        ax = fig.add_subplot(grid[1, col])
        maps = np.asarray(s[key])[chans]
        vmin = -1 if norm == "signed" else 0
        ax.imshow(mosaic(maps, 4, normalize=norm), cmap=cmap, vmin=vmin, vmax=1, interpolation="nearest")
        _plain(ax)
        h, w = maps.shape[-2:]
        ax.set_title(f"{title}\n({len(chans)} of {len(s[key])} channels, {w}×{h} each)", fontsize=9)


def _signed_map(ax, m: np.ndarray) -> None:
    lim = float(np.abs(m).max()) or 1.0
    ax.imshow(m, cmap=SIGNED_CMAP, vmin=-lim, vmax=lim, interpolation="nearest")
    _plain(ax)


def _row_edge(fig, grid, s: dict[str, Any]) -> None:
    """Row 3: a filter slides over the image and makes a feature map."""
    ax = fig.add_subplot(grid[2, 0])
    _numbers(ax, s["edge_filter"].astype(int), SIGNED_CMAP, -1.5, 1.5, "d",
             "7. the classic vertical-edge filter\n(slid over the image, 3×3 at a time)", fontsize=12)
    ax = fig.add_subplot(grid[2, 1])
    _signed_map(ax, s["edge_map"])
    ax.set_title("8. its feature map: strong where brightness\nchanges from left to right", fontsize=9)
    best = s["edge_like_channel"]
    ax = fig.add_subplot(grid[2, 2])
    learned = s["filters"][best].mean(axis=0)
    lim = float(np.abs(learned).max()) or 1.0
    if learned.size <= 49:  # up to 7×7: the weights can be read as numbers
        _numbers(ax, learned, SIGNED_CMAP, -lim, lim, ".2f", "", fontsize=8 if learned.shape[0] <= 5 else 6)
    else:
        _signed_map(ax, learned)
    corr = s["edge_like_correlation"]
    mirror = ", a mirror image:\nit answers brighter on the right" if corr < 0 else ""
    ax.set_title(f"9. the learned filter most like it: channel {best}\n(maps correlate {corr:+.2f}{mirror})",
                 fontsize=9)
    ax = fig.add_subplot(grid[2, 3])
    _signed_map(ax, np.asarray(s["conv"][best]))
    what = "the network's own edge detector" if abs(corr) >= 0.5 else "the nearest it has to an edge detector"
    ax.set_title(f"10. channel {best}'s feature map\n({what})", fontsize=9)


def _rows_training(fig, grid, result: dict[str, Any]) -> None:
    """Rows 4-5: the classifier as arithmetic, the loss, the backward pass and one SGD step."""
    t, classes = result["training"], result["classes"]
    c = t["classifier"]
    k = int(np.argmax(c["logits"]))
    con = c["contributions"][k]
    ax = fig.add_subplot(grid[3, 0:2])
    labels = [f"feature {i} = {v:.2f} × weight {w:+.2f}" for i, v, w in zip(con["features"], con["values"],
                                                                            con["weights"])]
    ax.barh(range(len(labels)), con["products"], color=["#c44e52" if p > 0 else "#4c72b0" for p in con["products"]])
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"11. the fully connected layer: {c['num_features']} features × weights + bias = logit of "
                 f"{_short(classes[k], 16)}\n({float(c['logits'][k]):.2f} = these {len(labels)} products + "
                 f"{con['rest']:.2f} from the rest + bias {con['bias']:.2f})", fontsize=9)
    ax = fig.add_subplot(grid[3, 2])
    order = np.argsort(-np.asarray(c["logits"]), kind="stable")[:10]
    ax.barh(range(len(order)), np.asarray(c["logits"])[order],
            color=["#c44e52" if i == t["label_index"] else "#4c72b0" for i in order])
    ax.set_yticks(range(len(order)), [_short(classes[i], 16) for i in order], fontsize=8)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("12. logits, one per class\n(red: the true label)", fontsize=9)
    ax = fig.add_subplot(grid[3, 3])
    p = np.linspace(0.002, 1, 300)
    ax.plot(p, -np.log(p), color="gray")
    pt = float(t["probabilities"][t["label_index"]])
    ax.plot([pt], [t["loss"]], "o", color="#c44e52")
    _small_axis(ax, f"13. CrossEntropyLoss = -log p\n-log {pt:.3f} = {t['loss']:.3f} "
                    f"(label {_short(t['label'], 14)}, {t['label_source']})", "p(true label) after softmax")
    _row_backward(fig, grid, result)


def _row_backward(fig, grid, result: dict[str, Any]) -> None:
    t = result["training"]
    ax = fig.add_subplot(grid[4, 0:2])
    norms = [max(layer["grad_norm"], 1e-12) for layer in t["layers"]]
    ax.bar(range(len(norms)), norms, color="#55a868")
    ax.set_yscale("log")
    _small_axis(ax, f"14. backpropagation: size of ∂loss/∂weights per layer ({len(norms)} layers; "
                    f"first {t['layers'][0]['name']}, last {t['layers'][-1]['name']})",
                "weight layer, input side → output side")
    ax = fig.add_subplot(grid[4, 2])
    _overlay(ax, result["image"], t["saliency"], "15. ∂loss/∂pixel: the pixels whose\nchange moves the loss most")
    st = t["step"]
    ax = fig.add_subplot(grid[4, 3])
    ax.bar([0, 1], [st["probability_before"], st["probability_after"]], color=["#8c8c8c", "#55a868"])
    ax.set_xticks([0, 1], ["before", "after"], fontsize=8)
    ax.set_ylim(0, 1)
    _small_axis(ax, f"16. one SGD step (lr {st['lr']:g}) on this image alone\nloss {st['loss_before']:.3f} → "
                    f"{st['loss_after']:.3f}; p(label) shown (on a copy)")


def _small_axis(ax, title: str, xlabel: str | None = None) -> None:
    """A panel's title, x label and tick labels in the step-by-step figure's small type."""
    if xlabel is not None:
        ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)


def _text_row(fig, cell, result: dict[str, Any]) -> None:
    """The path as text, so the figure reads without a teacher."""
    ax = fig.add_subplot(cell)
    ax.axis("off")
    text = (
        "How to read this. (2) An image is a grid of numbers. (3) A convolution filter is a small grid of weights; it "
        "slides over the image and at every position multiplies the pixels under it by its weights and adds them up, "
        "which gives one number of a feature map (4). (7-8) The hand-made filter [[1,0,-1],[1,0,-1],[1,0,-1]] "
        "answers \"is it brighter on the left than on the right?\", so its map lights up at vertical edges; "
        "training found filters like it by itself (9-10). (5) The activation keeps positive evidence and zeroes the "
        "rest; (6) pooling keeps the strongest answer in each small neighbourhood, halving the size. Deeper layers "
        "repeat this on the feature maps, the last layer turns them into one score per class, and softmax turns "
        "the scores into probabilities that sum to 1 (top right). Grad-CAM (top, third) colours the places whose "
        f"features raised the score of \"{result['target']}\" the most (layer: {result['layer']}). Steps marked "
        "\"for illustration only\" show what a textbook CNN does there; this network does something else."
    )
    if "training" in result:
        text += (" Training (11-16): the logits are the features times the last layer's weights plus a bias; the "
                 "loss is -log of the probability softmax gives the true label; backpropagation gives every weight "
                 "its gradient, and an SGD step moves each weight a little against it, which raises that "
                 "probability. An epoch does this over every training image, a batch at a time.")
    ax.text(0.0, 1.0, text, ha="left", va="top", fontsize=10, wrap=True, transform=ax.transAxes)
