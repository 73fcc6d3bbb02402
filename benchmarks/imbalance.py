"""Class imbalance on a long-tailed Fashion-MNIST: none / class weights / balanced sampler / logit adjustment.

The training set is Fashion-MNIST's 55,000 training images (after the stratified 5,000-image validation split,
split_seed 0) made long-tailed: class i keeps 100^(-i/9) of its images, from all of them (T-shirt/top, 5,500)
down to 1% (Ankle boot, 55), geometrically (``--long-tail 100``; imgrec.data.imbalance.long_tail_indices).
The validation split is cut the same way (it is what a user of long-tailed data has); the test split stays
balanced (1,000 per class). Every run is ``imgrec.engine.train.train(cfg, out)`` — what ``imgrec train``
runs — with the ``fast-bf16`` recipe and the options below; the best epoch is chosen on the validation split
only, by balanced accuracy for every option (``best_metric``), so the options differ only in the method.
The test split is looked at once per run, at the end, and its macro-F1 and balanced accuracy are computed
by imgrec (imgrec.eval) and checked against scikit-learn on the same predictions.

    .venv/bin/python benchmarks/imbalance.py            # 3 seeds x 6 options, threads 1
    .venv/bin/python benchmarks/imbalance.py --seeds 1 --options none,logit
    .venv/bin/python benchmarks/imbalance.py \
        --options drw,la-loss,none-ls0,weights-ls0,logit-auto-ls0,drw-ls0,la-loss-ls0

``drw`` is deferred re-weighting (Cao et al. 2019), ``la-loss`` the logit-adjusted training loss (Menon et al.
2021); the ``-ls0`` options are the same with label smoothing 0 instead of the recipe's 0.1, and their Δ is
taken against ``none-ls0``.

Writes benchmarks/results/imbalance.md (and a JSON-lines log of every run beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_markdown, write_result  # noqa: E402

OPTIONS = {
    "none": {},
    "weights": {"class_weights": "auto"},            # effective number of samples, beta 0.999
    "weights-inverse": {"class_weights": "inverse"},
    "sampler": {"sampler": "balanced"},
    "logit": {"logit_adjust": 1.0},                  # post-hoc, tau = 1 (Menon et al.'s default)
    "logit-auto": {"logit_adjust": "auto"},          # post-hoc, tau in 0..2 chosen on validation balanced acc
    # deferred re-weighting (Cao et al. 2019): plain cross-entropy for 70% of the epochs, then effective-number
    # weights with the paper's beta 0.9999 (≈ inverse frequency at these counts) for the last 30%
    "drw": {"class_weights": "effective", "class_weight_beta": 0.9999, "reweight_from": 0.7},
    "la-loss": {"logit_adjust_loss": 1.0},           # logit-adjusted training loss, tau = 1 (Menon et al. eq. 10)
    # the same without the recipe's label smoothing 0.1 (it bounds logit margins and may fight the adjustment)
    "none-ls0": {"label_smoothing": 0.0},
    "drw-ls0": {"class_weights": "effective", "class_weight_beta": 0.9999, "reweight_from": 0.7,
                "label_smoothing": 0.0},
    "la-loss-ls0": {"logit_adjust_loss": 1.0, "label_smoothing": 0.0},
    "weights-ls0": {"class_weights": "auto", "label_smoothing": 0.0},
    "logit-auto-ls0": {"logit_adjust": "auto", "label_smoothing": 0.0},
}
LABELS = {"none": "none", "weights": "--class-weights auto (effective number)",
          "weights-inverse": "--class-weights inverse", "sampler": "--sampler balanced",
          "logit": "--logit-adjust 1 (post-hoc)", "logit-auto": "--logit-adjust auto (τ chosen on validation)",
          "drw": "--class-weights effective --class-weight-beta 0.9999 --reweight-from 0.7 (DRW)",
          "la-loss": "--logit-adjust-loss 1 (training-time)",
          "none-ls0": "none, --label-smoothing 0",
          "drw-ls0": "DRW (as above), --label-smoothing 0",
          "la-loss-ls0": "--logit-adjust-loss 1, --label-smoothing 0",
          "weights-ls0": "--class-weights auto, --label-smoothing 0",
          "logit-auto-ls0": "--logit-adjust auto, --label-smoothing 0"}


_TEST: dict = {}


def run_one(option: str, seed: int, args, root: Path) -> dict:
    import numpy as np
    import torch
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from imgrec.engine.train import resolve_config, train
    from imgrec.eval.evaluate import evaluate
    from imgrec.infer.predictor import Classifier
    from imgrec.data.dataset import load_data

    overrides = {"long_tail": args.ratio, "seed": seed, "threads": args.threads, "epochs": args.epochs,
                 "val_last": 0, "best_metric": "balanced_acc", **OPTIONS[option]}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    cfg = resolve_config(args.recipe, None, overrides)
    out = root / f"{option}-s{seed}"
    t0 = time.perf_counter()
    summary = train(cfg, out, progress=False, evaluate_test=False, overwrite=True)
    if "test" not in _TEST:
        _TEST["test"] = load_data("fashion-mnist", data_dir=args.data_dir, progress=False).test
    test = _TEST["test"]
    clf = Classifier.load(out, device="cpu")
    ev = evaluate(clf, test.images, test.labels)
    m = ev.metrics
    # the independent computation: scikit-learn on the same predictions
    y, pred = test.labels.numpy(), ev.logits.argmax(1).numpy()
    sk_f1 = f1_score(y, pred, average="macro", labels=np.arange(len(clf.classes)), zero_division=0)
    sk_bacc = balanced_accuracy_score(y, pred)
    assert abs(sk_f1 - m["macro_f1"]) < 1e-9 and abs(sk_bacc - m["balanced_acc"]) < 1e-9, (sk_f1, m["macro_f1"])
    meta = json.loads((out / "model.json").read_text())
    rec = {"option": option, "seed": seed, "test_macro_f1": m["macro_f1"], "test_balanced_acc": m["balanced_acc"],
           "test_acc": m["top1"], "sklearn_checked": True, "rare_class_recall": m["per_class"][-1]["recall"],
           "val_balanced_acc": meta["metrics"].get("val_balanced_acc"), "best_epoch": summary["best_epoch"],
           "train_counts": meta["data"]["counts"]["train"], "val_counts": meta["data"]["counts"]["val"],
           "tau": (meta["inference"].get("logit_adjust") or {}).get("tau", 0.0),
           "train_time_s": round(summary["train_time_s"], 1), "wall_s": round(time.perf_counter() - t0, 1),
           "load_1min": round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(rec), flush=True)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--options", default="none,weights,weights-inverse,sampler,logit,logit-auto")
    ap.add_argument("--ratio", type=float, default=100.0, help="largest/smallest class (default 100)")
    ap.add_argument("--recipe", default="fast-bf16")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--from-log", help="only rebuild the table from the RESULT lines of earlier runs' output "
                    "(files separated by commas)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "imbalance.md"))
    args = ap.parse_args(argv)
    options = args.options.split(",")
    started = machine_markdown()
    cmd = "python benchmarks/imbalance.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    log = Path(args.out).with_suffix(".jsonl")
    recs = []
    t0 = time.perf_counter()
    if args.from_log:
        recs = [json.loads(ln.split("RESULT ", 1)[1]) for f in args.from_log.split(",")
                for ln in Path(f).read_text().splitlines() if ln.startswith("RESULT ")]
        recs = [r for r in recs if r["option"] in options]
        options = [o for o in options if any(r["option"] == o for r in recs)]
        args.seeds = len({r["seed"] for r in recs})
        cmd += f" (table rebuilt from the RESULT lines; the runs took {sum(r['wall_s'] for r in recs) / 60:.1f} min)"
    else:
        with tempfile.TemporaryDirectory(prefix="imgrec-imbalance-") as tmp:
            for seed in range(args.seeds):
                for option in options:
                    recs.append(run_one(option, seed, args, Path(tmp)))
    total = sum(r["wall_s"] for r in recs) if args.from_log else time.perf_counter() - t0
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))

    import statistics as st

    def agg(option, key):
        v = [r[key] for r in recs if r["option"] == option]
        return st.mean(v), (st.stdev(v) if len(v) > 1 else 0.0), v

    def base_of(o):  # Δ against none trained with the same label smoothing (the "-ls0" options: 0)
        b = "none-ls0" if o.endswith("-ls0") else "none"
        return agg(b, "test_macro_f1")[0] if b in options and o != b else None
    lines = ["# Class imbalance: long-tailed Fashion-MNIST", "", started.rstrip(),
             f"- 1-minute load average at the end: {os.getloadavg()[0]:.2f}",
             "",
             f"Command: `{cmd}` ({total / 60:.1f} min in all; `threads` {args.threads} per run so it could share "
             f"the machine)", "",
             f"Training data: Fashion-MNIST train minus the 5,000-image validation split, long-tailed with ratio "
             f"{args.ratio:g} (class i keeps {args.ratio:g}^(-i/9)): {sum(recs[0]['train_counts'])} images, "
             f"{recs[0]['train_counts'][0]} … {recs[0]['train_counts'][-1]} per class; validation cut the same "
             f"way ({sum(recs[0]['val_counts'])} images, {recs[0]['val_counts'][-1]} of the rarest class). "
             f"Test: the balanced 10,000-image test split. Recipe `{args.recipe}` with {args.epochs} epochs, every "
             f"epoch validated; the best epoch is chosen by validation balanced accuracy for every option.", "",
             f"Mean ± standard deviation over {args.seeds} seed(s); macro-F1 and balanced accuracy from imgrec, "
             f"equal to scikit-learn's `f1_score(average='macro')` and `balanced_accuracy_score` on the same "
             f"predictions (checked in every run, |Δ| < 1e-9).", "",
             "| option | test macro-F1 | Δ vs none, same smoothing (points) | test balanced acc | recall of the "
             "rarest class (Ankle boot, 55 train images) | val balanced acc | train s / run |",
             "|---|---|---|---|---|---|---|"]
    for o in options:
        f1, f1sd, _ = agg(o, "test_macro_f1")
        ba, basd, _ = agg(o, "test_balanced_acc")
        rr = agg(o, "rare_class_recall")[0]
        vb = agg(o, "val_balanced_acc")[0]
        ts = agg(o, "train_time_s")[0]
        base = base_of(o)
        delta = "" if base is None else f"{(f1 - base) * 100:+.2f}"
        lines.append(f"| {LABELS[o]} | {f1 * 100:.2f} ± {f1sd * 100:.2f} | {delta} | {ba * 100:.2f} ± {basd * 100:.2f} "
                     f"| {rr * 100:.1f} | {vb * 100:.2f} | {ts:.0f} |")
    lines += ["", "Per run (test macro-F1 / balanced accuracy, %):", ""]
    for r in recs:
        lines.append(f"- {r['option']} seed {r['seed']}: {r['test_macro_f1'] * 100:.2f} / "
                     f"{r['test_balanced_acc'] * 100:.2f} (best epoch {r['best_epoch']}, "
                     f"post-hoc τ {r.get('tau', OPTIONS[r['option']].get('logit_adjust', 0.0))}, "
                     f"train {r['train_time_s']} s, "
                     f"load {r['load_1min']})")
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
