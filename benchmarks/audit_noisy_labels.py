"""Measure `imgrec data audit` on Fashion-MNIST with planted label noise (issue 13).

A seeded random subset of the training set (default 10,000 images) is written as PNG files with 5% of its
labels flipped to another class at random (seeded), together with the 10,000 test images, as a CSV list.
The audit runs on it; precision and recall of finding the flipped images at the audit's own cut-off are
reported, and then `imgrec train` is run on the noisy list and on the cleaned list (suspects removed) and the
test accuracies compared.

    python benchmarks/audit_noisy_labels.py [--n 10000] [--noise 0.05] [--folds 5] [--epochs N] [--set KEY=VALUE] [--no-train]
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_noisy_list(out: Path, n: int, noise: float, seed: int) -> tuple[Path, set[str]]:
    from PIL import Image

    from imgrec.data.named import FASHION_MNIST_CLASSES as classes, load_named
    x, y = load_named("fashion-mnist", "train")
    xt, yt = load_named("fashion-mnist", "test")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(y), size=n, replace=False))
    labels = y[pick].copy()
    flip = rng.choice(n, size=int(round(noise * n)), replace=False)
    labels[flip] = (labels[flip] + rng.integers(1, len(classes), size=len(flip))) % len(classes)
    rows = []
    for d in ("train", "test"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(pick):
        rel = f"train/{i:05d}.png"
        if not (out / rel).exists():
            Image.fromarray(x[i]).save(out / rel)
        rows.append([rel, classes[labels[k]], "train"])
    flipped = {f"train/{pick[k]:05d}.png" for k in flip}
    for i in range(len(yt)):
        rel = f"test/{i:05d}.png"
        if not (out / rel).exists():
            Image.fromarray(xt[i]).save(out / rel)
        rows.append([rel, classes[yt[i]], "test"])
    path = out / "noisy.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return path, flipped


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None, help="epochs per fold (default: the recipe's)")
    ap.add_argument("--method", default="prune_by_noise_rate")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another training setting for the folds, e.g. label_smoothing=0 (YAML value)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/imgrec-audit-bench")
    ap.add_argument("--no-train", action="store_true", help="skip the noisy-vs-cleaned training comparison")
    args = ap.parse_args()
    out = Path(args.out)
    noisy, flipped = write_noisy_list(out, args.n, args.noise, args.seed)
    from imgrec.engine.audit import audit
    import yaml
    overrides = {"epochs": args.epochs} if args.epochs else {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    t0 = time.perf_counter()
    res = audit(str(noisy), folds=args.folds, overrides=overrides, image_size=28, method=args.method, progress=True)
    audit_s = time.perf_counter() - t0
    found = {str(Path(s["path"]).relative_to(out.resolve())) for s in res.suspects}
    tp = len(found & flipped)
    precision = tp / max(len(found), 1)
    recall = tp / max(len(flipped), 1)
    # the same probabilities under every flagging method of imgrec.data.confident (no retraining)
    from imgrec.data.confident import METHODS, find_label_issues
    rel = [str(Path(res.catalog.refs[i]).resolve().relative_to(out.resolve())) for i in res.audited]
    is_flipped = np.array([r in flipped for r in rel])
    np.savez(out / "probs.npz", probs=res.probs, labels=res.labels, flipped=is_flipped)
    methods = {}
    for m in METHODS:
        mask = find_label_issues(res.labels, res.probs, method=m).is_issue
        t = int((mask & is_flipped).sum())
        methods[m] = {"flagged": int(mask.sum()), "precision": round(t / max(int(mask.sum()), 1), 4),
                      "recall": round(t / max(int(is_flipped.sum()), 1), 4)}
    # the whole ranking, for what a reader could reach by taking the top-k
    res.write_csv(out / "suspects.csv")
    res.write_html(out / "audit.html", limit=200)
    info = res.write_clean_csv(out / "cleaned.csv", mode="remove")
    result = {"n": args.n, "noise": args.noise, "flipped": len(flipped), "folds": args.folds,
              "epochs_per_fold": res.settings["epochs"], "overrides": overrides, "method": args.method,
              "out_of_sample_acc": res.to_dict()["out_of_sample_acc"], "suspects": len(found), "true_positives": tp,
              "precision": round(precision, 4), "recall": round(recall, 4),
              "estimated_noise_rate": round(res.issues.estimated_noise_rate, 4), "audit_s": round(audit_s, 1),
              "cleaned": info, "methods": methods}
    print(json.dumps(result, indent=2), flush=True)
    if not args.no_train:
        for name, data in (("noisy", noisy), ("cleaned", out / "cleaned.csv")):
            run = out / f"run-{name}"
            r = subprocess.run([sys.executable, "-m", "imgrec.cli", "train", "--data", str(data), "--image-size", "28",
                                "--out", str(run), "--overwrite", "--json"], capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
            meta = json.loads((run / "model.json").read_text())
            result[f"test_acc_{name}"] = meta["metrics"].get("test_acc")
        print(json.dumps({k: result[k] for k in result if k.startswith("test_acc")}, indent=2))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
