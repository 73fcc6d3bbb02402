"""``imgrec data audit``: rank the training images most likely to carry a wrong label.

1. K-fold cross-fitting: the audited images are split into K class-stratified folds; for each fold a model is
   trained with a named recipe (default ``fast``: the recipe ``imgrec train`` uses, with its settings
   unchanged unless overridden) on the other K−1 folds and predicts the held-out fold. Every image thus gets
   class probabilities from a model that never saw it — the "out-of-sample" probabilities confident learning
   requires (a model that trained on a mislabelled image has partly memorised the wrong label).
2. Confident learning (:mod:`imgrec.data.confident`, Northcutt et al., JAIR 2021) turns those probabilities
   into per-class thresholds, the confident joint, the estimated number of label errors per (given, true)
   class pair, and a ranked list of suspects with a suggested label.

Outputs: JSON / CSV of the suspects, an HTML gallery, and a cleaned CSV list (suspects removed or relabelled)
that ``imgrec train --data cleaned.csv`` reads. Memory: the audited images are held as one uint8 tensor at the
training size (as ``imgrec train`` holds them), decoded file by file through the safe decoder; the original
files are never held, so folders larger than RAM work as long as their training-size tensor fits.

Use from Python: ``imgrec.engine.audit.audit("path/to/folder", folds=5)``.
"""
from __future__ import annotations

import csv
import html
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgrec.data.confident import METHODS, RANKINGS, LabelIssues, find_label_issues
from imgrec.data.datacheck import SPLITS, Catalog, catalog, html_page, thumbnail_uri
from imgrec.errors import ConfigError, DatasetError, ImageDecodeError

__all__ = ["audit", "AuditResult", "stratified_folds", "cross_fit"]


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) per example: each class's examples shuffled (seeded) and dealt round-robin."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        members = members[rng.permutation(len(members))]
        # continue the deal where the last class stopped, so small classes do not all start in fold 0
        fold[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)
    return fold


def _load_images(cat: Catalog, idx: np.ndarray, image_size: int | None, channels: int | None,
                 progress: bool) -> tuple[torch.Tensor, np.ndarray, list[tuple[str, str]], int, int]:
    """The audited images as an N×C×H×W uint8 tensor at the training size; returns (images, kept positions into
    ``idx``, unreadable (path, reason), size, channels)."""
    from imgrec.data.transforms import convert_channels, resize_uint8
    if cat.kind == "named":
        size = int(image_size or 28)
        chans = int(channels or 1)
        parts = []
        for s in ("train", "test"):
            sel = [int(cat.refs[i]) for i in idx if cat.splits[i] == s]
            if sel:
                parts.append(torch.from_numpy(cat.arrays[s][sel]).unsqueeze(1))
        images = convert_channels(resize_uint8(torch.cat(parts), size), chans)
        # named-data order above is train-then-test; idx is sorted by split in the same order (catalog order)
        return images, np.arange(len(idx)), [], size, chans
    from imgrec.data.batchdecode import decode_files
    from imgrec.data.dataset import guess_channels
    size = int(image_size or 32)
    paths = [cat.refs[i] for i in idx]
    chans = int(channels or guess_channels(paths))
    bad: list[tuple[str, str]] = []
    images, kept = decode_files(paths, channels=chans, size=size, on_bad_image="skip", progress=progress)
    if len(kept) < len(paths):
        from imgrec.data.decode import decode_image
        kept_set = set(int(k) for k in kept)
        for pos, p in enumerate(paths):
            if pos not in kept_set:
                try:
                    decode_image(p, channels=chans, size=8)
                    reason = "unreadable"
                except ImageDecodeError as e:
                    reason = e.reason
                bad.append((str(p), reason))
    return images, np.asarray(kept, dtype=np.int64), bad, size, chans


# The fold models must be far better than a guess before their probabilities can judge labels: confident
# learning takes every disagreement of a weak model with a label as evidence of a label error (fold models at
# 13% on 10 classes "found" 87% label noise). SKILL is the fraction of the way from the majority-class guess to
# perfect that the out-of-sample accuracy must reach; FOLD_SPREAD the most the fold models may disagree.
MIN_SKILL = 0.5
MAX_FOLD_SPREAD = 0.2


def fold_config(recipe: str | None, overrides: dict | None, *, n_fit: int, num_classes: int, channels: int,
                side: int, counts: list[int] | None = None):
    """The training settings of every fold: ``recipe`` as named, or (None) the one ``imgrec train`` would choose
    for this machine and for data of the fold's size, with ``overrides`` on top."""
    from imgrec.data.probe import probe_tensor
    from imgrec.engine.train import adapt_config, explicit_keys, resolve_config
    overrides = dict(overrides or {})
    cfg = resolve_config(recipe, None, overrides, adapt=False)
    if recipe is None:
        # the images are already decoded at their training size: only the schedule adapts to them
        adapt_config(cfg, explicit_keys(overrides) | {"image_size"},
                     probe_tensor(n_fit, num_classes, channels, side, counts))
    return cfg


def judge_folds(probs: np.ndarray, labels: np.ndarray, stats: list[dict]) -> dict:
    """How far the fold models are to be trusted: their out-of-sample accuracy against the majority-class guess
    (``skill``: 0 = no better than the guess, 1 = perfect) and against each other (``fold_spread``: best minus
    worst fold accuracy); ``weak`` says in words why they cannot judge labels, or is None."""
    m = probs.shape[1]
    acc = float((probs.argmax(1) == labels).mean()) if len(labels) else 0.0
    base = float(np.bincount(labels, minlength=m).max() / max(1, len(labels)))
    skill = (acc - base) / max(1e-9, 1 - base)
    accs = [f["held_out_acc"] for f in stats]
    spread = float(max(accs) - min(accs)) if accs else 0.0
    weak = None
    if skill < MIN_SKILL:
        weak = (f"the fold models reach {acc:.1%} out of sample, against {base:.1%} for always guessing the largest "
                f"class (skill {skill:.2f}, at least {MIN_SKILL} needed)")
    elif spread > MAX_FOLD_SPREAD:
        weak = (f"the fold models disagree: their accuracies range from {min(accs):.1%} to {max(accs):.1%} "
                f"(at most {MAX_FOLD_SPREAD:.0%} apart needed)")
    return {"out_of_sample_acc": round(acc, 4), "majority_guess_acc": round(base, 4), "skill": round(skill, 4),
            "fold_spread": round(spread, 4), "weak": weak}


def cross_fit(images: torch.Tensor, labels: np.ndarray, classes: list[str], *, folds: int = 5,
              recipe: str | None = None, overrides: dict | None = None, flip: bool = True, seed: int = 0,
              progress: bool = True, cfg=None) -> tuple[np.ndarray, list[dict]]:
    """Out-of-sample class probabilities (N, m) by K-fold cross-fitting, and per-fold statistics.

    ``recipe`` and ``overrides`` are resolved exactly as ``imgrec train --recipe`` and its options are
    (``fold_config``), unless ``cfg`` gives the resolved settings.
    """
    from imgrec.device import pick_device, set_threads
    from imgrec.engine.run import uses_channels_last
    from imgrec.infer.runtime import resolve_amp

    n, m = len(labels), len(classes)
    counts = np.bincount(labels, minlength=m)
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, not {folds}")
    if (counts > 0).sum() < 2:
        raise DatasetError("the audited images hold fewer than 2 classes")
    if n < 2 * folds:
        raise DatasetError(f"{n} images are too few for {folds} folds")
    if cfg is None:
        cfg = fold_config(recipe, overrides, n_fit=n - n // folds, num_classes=m, channels=int(images.shape[1]),
                          side=int(images.shape[-1]), counts=counts.tolist())
    t = cfg.train
    set_threads(t.threads)
    device = pick_device(t.device)
    amp = resolve_amp(t.amp, device, cfg.model.name)
    channels_last = uses_channels_last(cfg)
    fold_of = stratified_folds(labels, folds, seed)
    probs = np.zeros((n, m), dtype=np.float64)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    stats = []
    for k in range(folds):
        t0 = time.perf_counter()
        held = np.nonzero(fold_of == k)[0]
        fit = np.nonzero(fold_of != k)[0]
        p = _fold_probabilities(cfg, k, folds, images, y_all, fit, held, classes, flip, device, amp, channels_last,
                                progress)
        probs[held] = p
        acc = float((p.argmax(1) == labels[held]).mean())
        stats.append({"fold": k + 1, "train_images": int(len(fit)), "held_out": int(len(held)),
                      "held_out_acc": round(acc, 4), "time_s": round(time.perf_counter() - t0, 2)})
    return probs, stats


def _fold_probabilities(cfg, k: int, folds: int, images: torch.Tensor, y_all: torch.Tensor, fit: np.ndarray,
                        held: np.ndarray, classes: list[str], flip: bool, device, amp, channels_last: bool,
                        progress: bool) -> np.ndarray:
    """Train fold ``k``'s model on ``fit`` as `imgrec train` would (the same model builder, loaders and
    Trainer) and return its class probabilities for the held-out images."""
    from imgrec.data.dataset import DataBundle, ImageData, channel_stats
    from imgrec.data.memory import BatchLoader
    from imgrec.engine.callbacks import ProgressBar
    from imgrec.engine.run import build_loaders, build_model
    from imgrec.engine.trainer import Trainer, seed_everything
    from imgrec.infer.runtime import forward_logits
    t = cfg.train
    size, chans = int(images.shape[-1]), int(images.shape[1])
    train_part = ImageData(images[torch.from_numpy(fit)], y_all[torch.from_numpy(fit)])
    held_part = ImageData(images[torch.from_numpy(held)], y_all[torch.from_numpy(held)])
    mean, std = channel_stats(train_part.images)
    # the per-epoch log line needs a validation set: a slice of the held-out fold (never trained on)
    monitor = held_part.subset(torch.arange(min(len(held_part), 1024)))
    bundle = DataBundle("audit", list(classes), train_part, monitor, None, chans, size, mean, std, flip)
    seed_everything(t.seed + k, t.deterministic)
    train_loader, monitor_loader = build_loaders(bundle, cfg, device, channels_last)
    # the fold model is built as `imgrec train` builds its model (initial weights and frozen parts included)
    model, _ = build_model(cfg, bundle, seed=t.seed + k)
    if progress:
        print(f"fold {k + 1}/{folds}: training {cfg.model.name} on {len(fit)} images, scoring {len(held)}",
              file=sys.stderr)
    trainer = Trainer(model, t, train_loader, monitor_loader, device=device, amp=amp,
                      channels_last=channels_last, callbacks=[ProgressBar(enabled=progress)])
    trainer.fit()
    loader = BatchLoader(held_part, t.eval_batch_size, mean, std, device=device, channels_last=channels_last)
    trainer.model.eval()
    logits = torch.cat([forward_logits(trainer.eval_model, x, tta_flip=t.tta_flip, amp=amp).cpu()
                        for x, _ in loader])
    return torch.softmax(logits.double(), dim=1).numpy()


@dataclass
class AuditResult:
    """What :func:`audit` found: the suspects (ranked), the probabilities, and how to write them out."""
    source: str
    catalog: Catalog
    audited: np.ndarray              # catalog indices of the scored images
    labels: np.ndarray               # given label per scored image
    probs: np.ndarray                # out-of-sample probabilities per scored image
    issues: LabelIssues
    folds: list[dict]
    settings: dict
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    time_s: float = 0.0

    @property
    def suspects(self) -> list[dict]:
        cat, out = self.catalog, []
        for rank, pos in enumerate(self.issues.issues, start=1):
            i = int(self.audited[pos])
            given, sug = int(self.labels[pos]), int(self.issues.suggested[pos])
            out.append({"rank": rank, **cat.describe(i), "given": cat.classes[given],
                        "suggested": cat.classes[sug], "score": round(float(self.issues.quality[pos]), 5),
                        "p_given": round(float(self.probs[pos, given]), 5),
                        "p_suggested": round(float(self.probs[pos, sug]), 5)})
        return out

    def to_dict(self) -> dict:
        classes = self.catalog.classes
        acc = float((self.probs.argmax(1) == self.labels).mean()) if len(self.labels) else 0.0
        return {
            "source": self.source, "classes": classes, "audited": int(len(self.audited)),
            "settings": self.settings, "folds": self.folds, "out_of_sample_acc": round(acc, 4),
            "estimated_noise_rate": round(self.issues.estimated_noise_rate, 5),
            "thresholds": {c: round(float(v), 5) for c, v in zip(classes, self.issues.thresholds)},
            "confident_joint": self.issues.confident_joint.tolist(),
            "suspects_total": int(len(self.issues.issues)), "suspects": self.suspects,
            "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
            "time_s": round(self.time_s, 2),
        }

    def summary(self, limit: int = 10) -> str:
        d = self.to_dict()
        lines = [f"{d['source']}: audited {d['audited']} images with {len(self.folds)}-fold cross-fitting "
                 f"({self.settings['recipe']}, {self.settings['epochs']} epochs per fold), out-of-sample accuracy "
                 f"{d['out_of_sample_acc']:.4f} [{d['time_s']:.1f} s]",
                 f"estimated label noise: {d['estimated_noise_rate']:.2%}; suspects ({self.settings['method']}): "
                 f"{d['suspects_total']}"]
        q = self.settings.get("quality")
        if q:
            lines.insert(1, f"fold models: skill {q['skill']:.2f} over always guessing the largest class "
                            f"({q['majority_guess_acc']:.1%}); folds within {q['fold_spread']:.1%} of each other")
        for s in d["suspects"][:limit]:
            where = s.get("path", f"{s['split']}#{s.get('index')}")
            lines.append(f"  {s['rank']:>4}  {where}  given {s['given']!r} → suggested {s['suggested']!r}  "
                         f"score {s['score']:.4f}")
        if d["suspects_total"] > limit:
            lines.append(f"  … and {d['suspects_total'] - limit} more (--csv / --json list them all)")
        if self.unreadable:
            lines.append(f"{len(self.unreadable)} unreadable file(s) were not audited (imgrec data check lists them)")
        return "\n".join(lines)

    def write_json(self, path) -> Path:
        from imgrec.safeio import atomic_write_text
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))
        return Path(path)

    def write_csv(self, path) -> Path:
        """The suspects, one row each: rank, path (or split and index), given, suggested, score, probabilities."""
        from imgrec.safeio import atomic_write_text
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["rank", "path", "split", "index", "given", "suggested", "score", "p_given", "p_suggested"])
        for s in self.suspects:
            w.writerow([s["rank"], s.get("path", ""), s["split"], s.get("index", ""), s["given"], s["suggested"],
                        s["score"], s["p_given"], s["p_suggested"]])
        atomic_write_text(Path(path), buf.getvalue())
        return Path(path)

    def write_html(self, path, limit: int = 500) -> Path:
        """A self-contained gallery: image, given label, suggested label, score (escaped, data: URIs)."""
        from imgrec.safeio import atomic_write_text
        e = html.escape
        d = self.to_dict()
        parts = [f"<h1>Label audit: {e(self.source)}</h1>",
                 f"<p>{d['audited']} images scored out of sample by {len(self.folds)}-fold cross-fitting "
                 f"(recipe {e(str(self.settings['recipe']))}, model {e(self.settings['model'])}, "
                 f"{self.settings['epochs']} epochs per fold); out-of-sample accuracy {d['out_of_sample_acc']:.2%}. "
                 f"Confident learning ({e(self.settings['method'])}, ranked by {e(self.settings['rank_by'])}) "
                 f"estimates {d['estimated_noise_rate']:.2%} label noise and flags {d['suspects_total']} "
                 f"image(s). Lower score = more likely mislabelled.</p><div>"]
        for s in d["suspects"][:limit]:
            i = int(self.audited[self.issues.issues[s["rank"] - 1]])
            try:
                img = f'<img src="{thumbnail_uri(self.catalog.pixels(i))}" alt="">'
            except ImageDecodeError:
                img = "[unreadable]"
            where = s.get("path", f"{s['split']} #{s.get('index')}")
            parts.append(f'<div class="card">{img}<br>#{s["rank"]} score {s["score"]:.4f}<br>given '
                         f'<b>{e(s["given"])}</b> ({s["p_given"]:.2f})<br>suggested <b>{e(s["suggested"])}</b> '
                         f'({s["p_suggested"]:.2f})<br><small>{e(str(where))}</small></div>')
        parts.append("</div>")
        if d["suspects_total"] > limit:
            parts.append(f"<p>… and {d['suspects_total'] - limit} more (in the CSV / JSON output).</p>")
        rows = "".join(f"<tr><td>{f['fold']}</td><td>{f['train_images']}</td><td>{f['held_out']}</td>"
                       f"<td>{f['held_out_acc']:.4f}</td><td>{f['time_s']}</td></tr>" for f in self.folds)
        parts.append("<h2>Folds</h2><table><tr><th>fold</th><th>trained on</th><th>scored</th><th>accuracy</th>"
                     f"<th>seconds</th></tr>{rows}</table>")
        classes = self.catalog.classes
        cj = "".join(f"<tr><th>{e(classes[i])}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
                     for i, row in enumerate(self.issues.confident_joint.tolist()))
        parts.append("<h2>Confident joint (rows: given label, columns: likely true label)</h2><table><tr><th></th>"
                     + "".join(f"<th>{e(c)}</th>" for c in classes) + f"</tr>{cj}</table>")
        atomic_write_text(Path(path), html_page(f"imgrec data audit: {self.source}", "\n".join(parts)))
        return Path(path)

    def write_clean_csv(self, path, mode: str = "remove") -> dict:
        """A CSV list (``path,label,split``) of the whole source with the suspects removed (``mode="remove"``)
        or given their suggested label (``"relabel"``); splits that were not audited are copied unchanged.
        Unreadable files are left out. A named dataset's images are written as PNG files next to the CSV.
        Returns counts of what was written."""
        from imgrec.safeio import atomic_write_text
        if mode not in ("remove", "relabel"):
            raise ConfigError(f"--clean must be remove or relabel, not {mode!r}")
        path = Path(path)
        if path.suffix.lower() != ".csv":
            raise ConfigError(f"{path}: the cleaned list must be a .csv file")
        cat = self.catalog
        path.parent.mkdir(parents=True, exist_ok=True)
        suspect_pos = {int(self.audited[p]): int(self.issues.suggested[p]) for p in self.issues.issues}
        bad_paths = {p for p, _ in self.unreadable}
        image_dir = path.parent / f"{path.stem}_images"
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "label", "split"])
        written = removed = relabelled = 0
        for i in range(len(cat)):
            label = cat.labels[i]
            if i in suspect_pos:
                if mode == "remove":
                    removed += 1
                    continue
                label = suspect_pos[i]
                relabelled += 1
            ref = cat.refs[i]
            if cat.kind == "named":
                file = image_dir / cat.splits[i] / f"{int(ref):05d}.png"
                if not file.exists():
                    from PIL import Image
                    file.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(cat.arrays[cat.splits[i]][int(ref)]).save(file)
            else:
                if str(ref) in bad_paths:
                    continue
                file = Path(ref)
            try:
                rel = os.path.relpath(Path(file).resolve(), path.parent.resolve())
            except ValueError:  # another drive (Windows)
                rel = str(Path(file).resolve())
            w.writerow([rel, cat.classes[label], cat.splits[i]])
            written += 1
        atomic_write_text(path, buf.getvalue())
        return {"path": str(path), "rows": written, "removed": removed, "relabelled": relabelled}


def _check_audit_options(folds: int, splits: tuple[str, ...], method: str, rank_by: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}")
    if rank_by not in RANKINGS:
        raise ConfigError(f"--rank-by must be one of {', '.join(RANKINGS)}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ConfigError(f"--splits must name some of {', '.join(SPLITS)}, got {','.join(splits) or 'nothing'}")
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, not {folds}")


def _files_image_size(source: str, data_dir: str | None) -> int | None:
    """The image size ``imgrec train`` would choose for these files (None: its default)."""
    from imgrec.data.probe import probe_source
    from imgrec.engine.recipes import adapt_to_data
    probe = probe_source(source, data_dir=data_dir)
    return adapt_to_data(probe, {"image_size": None}, set())[0].get("image_size") if probe else None


def _refuse_weak_folds(source: str, quality: dict, force: bool, progress: bool) -> None:
    """DatasetError when the fold models are too weak to judge labels (``judge_folds``), unless ``force``."""
    if quality["weak"] and not force:
        raise DatasetError(f"{source}: not ranking label errors: {quality['weak']}, too weak to tell a wrong label "
                           f"from a model error; train longer (--epochs), or pass --force to rank anyway")
    if quality["weak"] and progress:
        print(f"imgrec: warning: {quality['weak']}; ranking anyway (--force)", file=sys.stderr)


def audit(source: str, *, folds: int = 5, recipe: str | None = None, overrides: dict | None = None,
          data_dir: str | None = None, image_size: int | None = None, channels: int | None = None,
          splits: tuple[str, ...] = ("train",), method: str = "prune_by_noise_rate",
          rank_by: str = "self_confidence", seed: int = 0, progress: bool = True, force: bool = False) -> AuditResult:
    """Find likely label errors in ``source`` (named dataset, folder or CSV list) by K-fold cross-fitting and
    confident learning.

    Args:
        folds: K; each image is scored by a model trained on the other K−1 folds (default 5).
        recipe: the training recipe of every fold (default: chosen for this machine and the data, as ``imgrec
            train`` chooses it); ``overrides`` are settings on top, as ``imgrec train``'s options (e.g.
            ``{"epochs": 4, "batch_size": 256}``).
        force: rank even when the fold models are too weak to judge labels (otherwise a DatasetError says so).
        splits: which splits to audit (pooled); splits not audited are copied unchanged into a cleaned CSV.
        method: how suspects are flagged (``prune_by_noise_rate`` default; see ``imgrec.data.confident``).
        rank_by: ``self_confidence`` (default) or ``normalized_margin``.
        seed: fixes the folds.
    """
    t0 = time.perf_counter()
    _check_audit_options(folds, splits, method, rank_by)
    from imgrec.engine.train import resolve_config
    # settings first: an unknown recipe, model or option fails before any image is decoded
    cfg = resolve_config(recipe, None, overrides, adapt=False)
    cat = catalog(source, data_dir)
    if image_size is None and cat.kind != "named":
        image_size = _files_image_size(source, data_dir)
    idx = np.array([i for i in range(len(cat)) if cat.splits[i] in splits], dtype=np.int64)
    if len(idx) == 0:
        raise DatasetError(f"{source}: no images in the split(s) {', '.join(splits)}")
    images, kept, bad, size, chans = _load_images(cat, idx, image_size, channels, progress)
    if len(kept) == 0:
        raise DatasetError(f"{source}: none of the audited images is readable")
    idx = idx[kept]
    labels = np.asarray([cat.labels[i] for i in idx], dtype=np.int64)
    cfg = fold_config(recipe, overrides, n_fit=len(labels) - len(labels) // folds, num_classes=len(cat.classes),
                      channels=chans, side=size)
    probs, fold_stats = cross_fit(images, labels, cat.classes, folds=folds, recipe=recipe, overrides=overrides,
                                  flip=cat.flip, seed=seed, progress=progress, cfg=cfg)
    del images
    quality = judge_folds(probs, labels, fold_stats)
    _refuse_weak_folds(source, quality, force, progress)
    issues = find_label_issues(labels, probs, method=method, rank_by=rank_by)
    settings = {"folds": folds, "recipe": cfg.recipe, "model": cfg.model.name, "epochs": cfg.train.epochs,
                "batch_size": cfg.train.batch_size, "quality": quality,
                "overrides": dict(overrides or {}), "method": method, "rank_by": rank_by, "seed": seed,
                "splits": list(splits), "image_size": size, "channels": chans}
    return AuditResult(source, cat, idx, labels, probs, issues, fold_stats, settings, bad,
                       time.perf_counter() - t0)
