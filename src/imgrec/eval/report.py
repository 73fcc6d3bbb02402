"""The evaluation report: one self-contained HTML file that shows how a model does and where it fails.

``build_report(clf, data, ...)`` runs the model once over a labelled split and renders
``templates/report.html.j2`` with jinja2 (autoescaped: class names and file names come from the user's
folders). Every figure is a PNG embedded as a ``data:`` URI, the little JavaScript that sorts tables is
inline, and nothing refers to a network address, so the file opens anywhere, offline, and can be mailed.

Numbers: accuracy, loss, per-class precision/recall/F1/support and the confusion matrix come from
:func:`imgrec.eval.evaluate.evaluate`, the one evaluation path, so they equal ``imgrec eval --json`` for the same model and data (the tests check this). The page also embeds
all of its numbers as JSON (``<script id="report-numbers" type="application/json">``) for other tools.
"""
from __future__ import annotations

import base64
import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgrec.eval.evaluate import evaluate
from imgrec.eval.metrics import (MATRIX_MAX_CLASSES, expected_calibration_error, has_topk,
                                 worst_and_best)

__all__ = ["Report", "build_report", "wilson_interval", "chart_notes", "read_metrics_csv", "png_data_uri", "image_data_uri"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile
THUMB_MAX = 96           # px: larger images are shrunk for the galleries (the report stays a few MB)


@dataclass
class Report:
    """A rendered report: ``html`` (the page) and ``numbers`` (every number on it, JSON-ready)."""
    html: str
    numbers: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        from imgrec.safeio import atomic_write_text
        atomic_write_text(path, self.html)
        return Path(path)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927).

    Unlike the normal approximation p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and does not collapse to a
    zero-width interval at 0% or 100% accuracy, which matters for small test sets and near-perfect models.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a run's ``metrics.csv`` as floats (``epoch`` as int); [] when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out: dict[str, float] = {}
            for k, v in row.items():
                try:
                    out[k] = int(v) if k == "epoch" else float(v)
                except (TypeError, ValueError):
                    continue  # an unparseable cell is left out of the curves, not fatal
            if "epoch" in out:
                rows.append(out)
    return rows


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_data_uri(image: torch.Tensor | np.ndarray, max_side: int = THUMB_MAX) -> str:
    """A C×H×W (or H×W×C) uint8 image as a PNG data URI, shrunk to ``max_side`` when larger."""
    from PIL import Image
    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    im = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return png_data_uri(buf.getvalue())


def _confused_pairs(cm: np.ndarray, limit: int) -> list[tuple[int, int, int]]:
    """(true, predicted, count) of the largest off-diagonal cells, largest first (ties by class index)."""
    k = cm.shape[0]
    cells = [(int(cm[i, j]), i, j) for i in range(k) for j in range(k) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [(i, j, n) for n, i, j in cells[:limit]]


def _example(i: int, data, classes: list[str], pred: np.ndarray, conf: np.ndarray, probs: np.ndarray) -> dict:
    true = int(data.labels[i])
    return {"index": i, "image": image_data_uri(data.images[i]), "true": classes[true], "pred": classes[int(pred[i])],
            "confidence": float(conf[i]), "true_prob": float(probs[i, true]),
            "file": Path(data.paths[i]).name if data.paths is not None else None,
            "path": data.paths[i] if data.paths is not None else None}


GALLERY_NEIGHBOURS = 3  # nearest training images under each misclassified one


def _add_neighbours(gallery: list[dict], clf, data, model_dir, bundle) -> None:
    """Under each misclassified image, its nearest training images in feature space (label, similarity), when
    the model directory has the bank (imgrec.infer.neighbours): a mistake next to training images of the
    predicted class often shows why it was made, or a mislabelled training image. Models without the bank
    get the gallery alone."""
    if not gallery or model_dir is None or not clf.meta.inference.get("neighbours"):
        return
    from imgrec.errors import ImgrecError
    from imgrec.eval.neighbours import Neighbours
    try:
        finder = Neighbours(clf, model_dir, bundle.train.images if bundle is not None and bundle.train is not None
                            else None)
        found = finder.lookup(data.images[[e["index"] for e in gallery]], GALLERY_NEIGHBOURS)
    except ImgrecError:  # the bank or the training data is not readable here: the gallery alone
        return
    for e, near in zip(gallery, found):
        e["neighbours"] = [{"image": image_data_uri(torch.from_numpy(nb["image"]).permute(2, 0, 1)),
                            "label": nb["label"], "similarity": nb["similarity"], "index": nb["index"]} for nb in near]


def _class_samples(split, classes: list[str], per_class: int, only: set[str] | None = None) -> list[dict]:
    """The first ``per_class`` images of each class of a split (first, not random: the report is reproducible);
    of the classes in ``only`` when given."""
    labels = split.labels.numpy()
    rows = []
    for c, name in enumerate(classes):
        if only is not None and name not in only:
            continue
        idx = np.nonzero(labels == c)[0][:per_class]
        rows.append({"class": name, "images": [image_data_uri(split.images[i]) for i in idx]})
    return rows


def _run_info(clf, model_dir: Path | None, model_label: str, data_name: str | None, split: str,
              n: int) -> dict[str, Any]:
    from imgrec.models.base import count_params

    from imgrec.modeldir import RunDir

    meta = clf.meta
    d, m = meta.data, meta.metrics
    config_text = None
    if model_dir is not None and RunDir(model_dir).config.is_file():
        config_text = RunDir(model_dir).config.read_text(encoding="utf-8", errors="replace")
    elif meta.config:
        import yaml
        config_text = yaml.safe_dump(meta.config, sort_keys=False)
    return {
        "model_dir": model_label if model_dir is not None else None,
        "architecture": clf.name,
        "kwargs": meta.kwargs,
        "params": count_params(clf.model),
        "classes": len(clf.classes),
        "image_size": clf.image_size,
        "channels": clf.channels,
        "mean": meta.mean,
        "std": meta.std,
        "tta_flip": clf.tta_flip,
        "trained_on": d.get("source") or d.get("name"),
        "data": data_name,
        "split": split,
        "n": n,
        "train_time_s": meta.train_time_s,
        "epochs_run": m.get("epochs_run"),
        "best_epoch": m.get("best_epoch"),
        "val_acc": m.get("val_acc"),
        "imgrec_version": meta.imgrec_version,
        "config": config_text,
    }


def build_report(clf, data, *, bundle=None, split: str = "test", data_name: str | None = None,
                 model_dir: str | Path | None = None, top_k: int = 5, n_bins: int = 15, max_gallery: int = 60,
                 max_pairs: int = 8, per_pair: int = 6, samples_per_class: int = 10) -> Report:
    """Evaluate ``clf`` on ``data`` (an ImageData: uint8 images, labels, optional paths) and render the report.

    Args:
        clf: a loaded :class:`~imgrec.infer.predictor.Classifier`.
        data: the labelled split to evaluate.
        bundle: the DataBundle it came from (for the class counts and sample grid of every split); optional.
        split: the split's name, as shown. data_name: the dataset, as shown (default: what the model was trained on).
        model_dir: the run directory, for ``metrics.csv`` (training curves) and ``config.yaml``.
        top_k: the second accuracy reported (as ``imgrec eval --top-k``). n_bins: calibration bins.
        max_gallery: misclassified images shown. max_pairs / per_pair: most-confused pairs and examples each.
        samples_per_class: images per class in the dataset's sample grid.
    """
    if len(data) == 0:
        from imgrec.errors import DatasetError
        raise DatasetError(f"the {split} split holds no images to evaluate")
    model_label = str(model_dir) if model_dir is not None else clf.name  # as given, like `imgrec eval` prints it
    model_dir = Path(model_dir) if model_dir is not None else None
    data_name = data_name or clf.meta.data.get("source")
    if clf.multilabel:
        return _build_multilabel_report(clf, data, bundle=bundle, split=split, data_name=data_name,
                                        model_dir=model_dir, model_label=model_label, max_gallery=max_gallery)
    return _build_single_label_report(clf, data, bundle=bundle, split=split, data_name=data_name,
                                      model_dir=model_dir, model_label=model_label, top_k=top_k, n_bins=n_bins,
                                      max_gallery=max_gallery, max_pairs=max_pairs, per_pair=per_pair,
                                      samples_per_class=samples_per_class)


def _build_single_label_report(clf, data, *, bundle, split: str, data_name: str | None, model_dir: Path | None,
                               model_label: str, top_k: int, n_bins: int, max_gallery: int, max_pairs: int,
                               per_pair: int, samples_per_class: int) -> Report:
    """build_report for a single-label model: accuracy, calibration, confusion and the galleries."""
    from imgrec.modeldir import RunDir

    classes = list(clf.classes)
    labels = data.labels.long()
    t0 = time.perf_counter()
    # The evaluation `imgrec eval` runs: one forward pass gives both its numbers and the probabilities for
    # calibration and the galleries.
    ev = evaluate(clf, data.images, labels, top_k)
    logits, results = ev.logits, ev.metrics
    eval_seconds = time.perf_counter() - t0
    results.update(model=model_label, data=data_name, split=split)
    temperature = float(getattr(clf, "temperature", 1.0))
    calibration, calibration_after, probs = _calibrations(logits, labels, temperature, n_bins)
    cm = np.asarray(results["confusion_matrix"], dtype=np.int64)
    shown_k = top_k if has_topk(top_k, len(classes)) else None  # top-k with k ≥ K would always be 100%
    accuracy = _accuracies(cm, logits, labels, results, shown_k)
    pred = logits.float().argmax(dim=1).numpy()  # exactly summarize's predictions (the confusion matrix's)
    wrong, gallery, pairs = _mistakes(data, classes, pred, probs, cm, max_gallery, max_pairs, per_pair)
    _add_neighbours(gallery, clf, data, model_dir, bundle if data_name == clf.meta.data.get("source") else None)
    top2 = np.sort(probs, axis=1)[:, -2:]
    ties = int((top2[:, 0] == top2[:, 1]).sum()) if len(classes) > 1 else 0

    counts = _split_counts(clf.meta, bundle, data_name, split, results["per_class"])
    sample_split = bundle.train if bundle is not None and len(bundle.train) else data
    curves = read_metrics_csv(RunDir(model_dir).metrics) if model_dir is not None else []
    figures = _figures(curves, cm, classes, calibration, calibration_after, temperature, counts)
    numbers = {"eval": results, "accuracy": accuracy, "calibration": calibration,
               "calibration_after": calibration_after,
               "confused_pairs": [{k: p[k] for k in ("true", "pred", "count", "share")} for p in pairs],
               "misclassified": int(len(wrong)), "tied_top_scores": ties, "counts": counts}
    context = {
        "title": f"{clf.name} on {data_name} ({split})",
        "run": _run_info(clf, model_dir, model_label, data_name, split, results["n"]),
        "r": results, "top_k": shown_k, "accuracy": accuracy, "calibration": calibration, "n_bins": n_bins,
        "calibration_after": calibration_after, "cal": results.get("calibration"),
        "temperature_split": (clf.meta.inference.get("temperature") or {}).get("split", "validation")
        if isinstance(getattr(clf.meta, "inference", None), dict) else "validation",
        "classes": classes, "cm": cm.tolist(), "per_class_hidden": 0,
        "pairs": pairs, "gallery": gallery, "misclassified": int(len(wrong)), "max_gallery": max_gallery,
        "counts": counts, "count_splits": list(counts),
        "sample_split": "train" if sample_split is not data else split,
        "curves": curves, "figures": figures, "numbers": numbers,
        "notes": chart_notes(clf.meta, calibration, calibration_after if temperature != 1.0 else None),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "eval_seconds": eval_seconds,
    }
    context.update(_capped_for_page(results, numbers, sample_split, samples_per_class))
    return Report(_render(context), numbers)


HEATMAP_MAX_CLASSES = 100  # the confusion heat map is drawn up to this many classes (2,000 took most of a minute)


def _capped_for_page(results: dict, numbers: dict, sample_split, samples_per_class: int) -> dict:
    """What the page shows of many classes (2,000 classes made a 56 MB page): the worst and best classes' rows
    and samples, the confusion matrix as numbers up to MATRIX_MAX_CLASSES classes, and the numbers embedded
    without what the page leaves out. ``Report.numbers`` (``imgrec report --json``) keeps every class."""
    classes = results["classes"]
    rows, hidden = worst_and_best(results["per_class"])
    if not hidden and len(classes) <= MATRIX_MAX_CLASSES:
        return {"samples": _class_samples(sample_split, classes, samples_per_class)}
    out: dict[str, Any] = {"r": {**results, "per_class": rows}, "per_class_hidden": hidden}
    out["samples"] = _class_samples(sample_split, classes, samples_per_class, {r["class"] for r in rows})
    page_eval = {k: v for k, v in results.items() if k != "confusion_matrix"}
    page_eval["per_class"] = rows
    out["numbers"] = {**numbers, "eval": page_eval, "left_out": "per-class rows beyond the worst and best "
                      "and the confusion matrix: imgrec eval --json has them"}
    if len(classes) > MATRIX_MAX_CLASSES:
        out["cm"] = None
    return out


def _calibrations(logits: torch.Tensor, labels: torch.Tensor, temperature: float, n_bins: int):
    """The raw scores' calibration (T = 1), the model's (softmax of logits / T; the same as the raw ones when it
    has no temperature) — both diagrams are shown — and the model's probabilities, which the galleries show."""
    calibration = expected_calibration_error(torch.softmax(logits.float(), dim=1), labels, n_bins)
    probs_t = torch.softmax(logits.float() / temperature, dim=1)
    calibration_after = expected_calibration_error(probs_t, labels, n_bins)
    calibration_after["temperature"] = temperature
    return calibration, calibration_after, probs_t.numpy()


def _accuracies(cm: np.ndarray, logits: torch.Tensor, labels: torch.Tensor, results: dict,
                shown_k: int | None) -> dict:
    """Top-1 (and top-k) with their hit counts and Wilson intervals. The hits are counted rather than the float
    fraction rounded back: top-1 is the confusion matrix's diagonal (summarize takes top-1 from the same
    argmax), top-k caps k at K as topk_accuracy does."""
    n, accuracy = results["n"], {}
    for key, k in (("top1", 1), (f"top{shown_k}", shown_k)) if shown_k else (("top1", 1),):
        if k == 1:
            hits = int(np.trace(cm))
        else:
            top = logits.float().topk(min(k, cm.shape[0]), dim=1).indices
            hits = int((top == labels[:, None]).any(dim=1).sum())
        lo, hi = wilson_interval(hits, n)
        accuracy[key] = {"value": results[key], "correct": hits, "ci_low": lo, "ci_high": hi}
    return accuracy


def _mistakes(data, classes: list[str], pred: np.ndarray, probs: np.ndarray, cm: np.ndarray, max_gallery: int,
              max_pairs: int, per_pair: int) -> tuple[np.ndarray, list[dict], list[dict]]:
    """The misclassified images, worst (most confident) first (ties: lower index first), the gallery of the
    first ``max_gallery``, and the most-confused pairs with ``per_pair`` examples each."""
    conf = probs[np.arange(len(pred)), pred]
    y = data.labels.long().numpy()
    wrong = np.nonzero(pred != y)[0]
    wrong = wrong[np.lexsort((wrong, -conf[wrong]))]
    gallery = [_example(int(i), data, classes, pred, conf, probs) for i in wrong[:max_gallery]]
    pairs = []
    for i, j, count in _confused_pairs(cm, max_pairs):
        idx = np.nonzero((y == i) & (pred == j))[0]
        idx = idx[np.lexsort((idx, -conf[idx]))][:per_pair]
        pairs.append({"true": classes[i], "pred": classes[j], "count": count,
                      "share": count / max(1, int(cm[i].sum())),
                      "examples": [_example(int(e), data, classes, pred, conf, probs) for e in idx]})
    return wrong, gallery, pairs


def _figures(curves, cm, classes, calibration, calibration_after, temperature: float, counts) -> dict:
    from imgrec.eval import plots
    return {
        "curves": png_data_uri(plots.training_curves(curves)) if curves else None,
        "confusion": png_data_uri(plots.confusion_heatmaps(cm, classes)) if len(classes) <= HEATMAP_MAX_CLASSES
        else None,
        "reliability": png_data_uri(plots.reliability_diagram(calibration["bins"], calibration["ece"],
                                                              "raw scores, T = 1")),
        "reliability_after": png_data_uri(plots.reliability_diagram(
            calibration_after["bins"], calibration_after["ece"], f"T = {temperature:.3g}"))
        if temperature != 1.0 else None,
        "counts": png_data_uri(plots.class_counts(counts, classes)) if counts else None,
    }


def _build_multilabel_report(clf, data, *, bundle, split: str, data_name: str | None, model_dir: Path | None,
                             model_label: str, max_gallery: int) -> Report:
    """The report of a multi-label model: mAP, exact match (Wilson interval), Hamming loss, per-label
    threshold/P/R/F1/AP, training curves, and the images whose label set was got wrong (most wrong decisions
    first). Its numbers are ``imgrec eval --json``'s (the same :func:`evaluate`)."""
    from imgrec.eval import plots
    from imgrec.modeldir import RunDir

    classes = list(clf.classes)
    t0 = time.perf_counter()
    ev = evaluate(clf, data.images, data.labels)
    results = ev.metrics
    eval_seconds = time.perf_counter() - t0
    results.update(model=model_label, data=data_name, split=split)
    n = results["n"]
    probs = torch.sigmoid(ev.logits.float()).numpy()
    thr = np.asarray(results["thresholds"], np.float32)
    pred, y = probs >= thr, data.labels.numpy() > 0.5
    errors = (pred != y).sum(1)
    exact = int((errors == 0).sum())
    lo, hi = wilson_interval(exact, n)
    wrong = np.nonzero(errors)[0]
    wrong = wrong[np.lexsort((wrong, -errors[wrong]))]  # most wrong decisions first, then by index

    def names(row) -> list[str]:
        return [classes[j] for j in np.flatnonzero(row)]

    gallery = [{"index": int(i), "image": image_data_uri(data.images[i]), "true": names(y[i]), "pred": names(pred[i]),
                "errors": int(errors[i]), "file": Path(data.paths[i]).name if data.paths is not None else None,
                "path": data.paths[i] if data.paths is not None else None} for i in wrong[:max_gallery]]
    curves = read_metrics_csv(RunDir(model_dir).metrics) if model_dir is not None else []
    counts = _split_counts(clf.meta, bundle, data_name, split, results["per_class"])
    numbers = {"eval": results, "exact_match": {"value": results["exact_match"], "correct": exact, "ci_low": lo,
                                                 "ci_high": hi}, "wrong_sets": int(len(wrong)), "counts": counts}
    context = {
        "title": f"{clf.name} on {data_name} ({split})",
        "run": _run_info(clf, model_dir, model_label, data_name, split, n), "r": results, "classes": classes,
        "exact": numbers["exact_match"], "gallery": gallery, "wrong_sets": int(len(wrong)),
        "counts": counts, "count_splits": list(counts), "curves": curves,
        "figures": {"curves": png_data_uri(plots.training_curves(curves)) if curves else None},
        "numbers": numbers, "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "eval_seconds": eval_seconds,
    }
    return Report(_render(context, "report_multilabel.html.j2"), numbers)


def chart_notes(meta, calibration: dict[str, Any], after: dict[str, Any] | None = None) -> dict[str, str]:
    """One sentence per chart saying how to read it, from the run's own settings and the calibration bins:
    ``curves`` (why training loss can sit above validation loss) and ``calibration`` (the direction of the
    miscalibration: mean confidence above accuracy is over-confident)."""
    train = ((getattr(meta, "config", None) or {}).get("train") or {})
    reasons = []
    if train.get("label_smoothing"):
        reasons.append(f"label smoothing {train['label_smoothing']:g} keeps the training loss above zero even "
                       "for images it gets right (the validation loss is plain cross-entropy)")
    if train.get("crop_padding") or train.get("flip"):
        reasons.append("training images are augmented (random crops and flips) and so harder than the validation "
                       "images")
    if train.get("val_last"):
        reasons.append(f"validation ran only in the last {train['val_last']} epochs (--val-last), so its curve "
                       "starts late")
    curves = ("Lower loss and higher accuracy are better; the training numbers are averages over each epoch "
              "while the weights still changed, the validation ones are measured at the epoch's end"
              + ("; training loss can sit above validation loss here because " + "; ".join(reasons)
                 if reasons else "") + ".")
    gap = _confidence_gap(calibration["bins"])
    direction = "over-confident: its scores are higher than its accuracy" if gap > 0 else \
        "under-confident: it is right more often than its scores say"
    cal = (f"Bars below the diagonal mean over-confidence, above it under-confidence; on average the raw scores "
           f"are {direction} (mean confidence {'+' if gap > 0 else '−'}{abs(gap) * 100:.1f} points from the "
           f"accuracy).")
    notes = {"curves": curves, "calibration": cal, "calibration_gap": gap}
    if after is not None:
        g = _confidence_gap(after["bins"])
        notes["calibration_after"] = (
            f"The same diagram for the probabilities the model gives (T = {after.get('temperature', 1.0):.3g}): "
            f"the closer the bars to the diagonal, the better its scores say how sure it is; the mean confidence "
            f"is now {'+' if g > 0 else '−'}{abs(g) * 100:.1f} points from the accuracy.")
    return notes


def _confidence_gap(bins: dict[str, list]) -> float:
    """Mean confidence minus accuracy over the predictions (positive: over-confident)."""
    n = sum(bins["count"])
    gap = sum(c * (conf - acc) for c, conf, acc in zip(bins["count"], bins["confidence"], bins["accuracy"]) if c)
    return gap / n if n else 0.0


def _split_counts(meta, bundle, data_name: str | None, split: str, per_class: list[dict]) -> dict[str, list[int]]:
    """Images per class in each split. The evaluated split's counts are its supports (the numbers of the
    report); train and val are what ``model.json`` recorded at training time when the data is the model's
    own (they include --train-limit), else what the loaded bundle holds."""
    d = meta.data
    counts: dict[str, list[int]] = {}
    if bundle is not None:
        counts.update({s: list(map(int, c)) for s, c in bundle.counts.items()})
    if data_name == d.get("source") and isinstance(d.get("counts"), dict):
        counts.update({s: list(map(int, c)) for s, c in d["counts"].items() if s != split})
    counts[split] = [int(row["support"]) for row in per_class]
    order = [s for s in ("train", "val", "test") if s in counts]
    return {s: counts[s] for s in order + [s for s in counts if s not in order]}


def _render(context: dict[str, Any], template: str = "report.html.j2") -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(
        loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=True,                   # class and file names come from the user's folders
        undefined=StrictUndefined,         # a typo in the template fails loudly instead of printing nothing
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(
        pct=lambda v, d=2: f"{v * 100:.{d}f}%",
        f4=lambda v: f"{v:.4f}",
        exact=lambda v: repr(float(v)),    # full precision for data-sort attributes (float repr round-trips)
        duration=_duration,
    )
    return env.get_template(template).render(**context)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
