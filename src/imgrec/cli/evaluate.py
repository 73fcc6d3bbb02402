"""``imgrec eval``, ``imgrec report`` and ``imgrec explain``: parse, call imgrec.eval, print.

matplotlib and jinja2 (the ``report`` extra) are imported only when report/explain run, so ``imgrec --help``
and the other commands work without them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from imgrec.cli.common import (add_command, backend_option, eval_data_options, fmt_table, json_option,
                               model_dir_options, print_json)


TOP_K_HELP = ("top-k accuracy to report (default 5; single-label models; '-' in text and null in JSON where k is "
              "not below the number of classes)")


TOP_K = ("--top-k", {"type": int, "help": TOP_K_HELP})

EVAL_OPTIONS = (*model_dir_options(), *eval_data_options(), TOP_K, backend_option(), json_option())

REPORT_OPTIONS = (
    *model_dir_options(),
    *eval_data_options(),
    ("--out", {"default": "report.html", "help": "HTML file to write (default report.html)"}),
    TOP_K,
    ("--max-gallery", {"type": int, "default": 60, "help": "misclassified images shown (default 60)"}),
    json_option("print the report's numbers as JSON"),
)

EXPLAIN_OPTIONS = (
    *model_dir_options(),
    ("image", {"help": "an image file"}),
    ("--out", {"help": "PNG file to write (default <image name>-explain.png)"}),
    ("--target", {"help": "class to explain (label or index; default the predicted class)"}),
    ("--steps", {"action": "store_true", "help": "show the pipeline step by step, training included"}),
    ("--label", {"help": "the image's true class for the loss (default its folder name when that names a class, "
                         "else the predicted class)"}),
    ("--lr", {"type": float, "default": 0.01, "help": "learning rate of the one SGD step shown (default 0.01)"}),
    ("--json-out", {"help": "with --steps: also write every number and array shown as JSON to this file"}),
    (("--neighbours", "--neighbors"), {"type": int, "metavar": "K",
                                       "help": "also show the K training images nearest to it in feature space "
                                               "(<out>-neighbours.png)"}),
    json_option(),
)


def add_parsers(sub) -> None:
    for name, func, options, help, description in (
        ("eval", cmd_eval, EVAL_OPTIONS, "evaluate a model on a dataset split", None),
        ("report", cmd_report, REPORT_OPTIONS, "write an HTML evaluation report",
         "Evaluate a model on a dataset split and write one self-contained HTML report: training curves, accuracy "
         "with confidence intervals, per-class metrics, confusion matrix, misclassified images, calibration and "
         "the dataset."),
        ("explain", cmd_explain, EXPLAIN_OPTIONS, "show where the model looked (Grad-CAM) and what its first layers do",
         "Draw a Grad-CAM heat map over the image for the predicted class (or --target); with --steps, the whole "
         "pipeline: pixels as numbers, first-layer filters, feature maps after convolution, activation and "
         "pooling, a classic edge filter, softmax."),
    ):
        add_command(sub, name, func, options, help=help, description=description)


def _load_labelled(args):
    """The classifier and the labelled split that eval and report look at (the same data, the same numbers).
    Data settings not given are the run's own (model.json); ``args.split`` becomes the split used."""
    from imgrec.data.dataset import load_run_split
    from imgrec.errors import ConfigError
    from imgrec.infer.backends import load_classifier

    if args.top_k is not None and args.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    # eval --backend onnxruntime: the exported file's metadata carries the classes, size and data source
    clf = load_classifier(args.model, backend=getattr(args, "backend", "torch"), which=args.which,
                          device=args.device)
    if clf.multilabel and args.top_k is not None:
        from imgrec.infer.multilabel import top_k_error
        raise top_k_error()
    args.top_k = 5 if args.top_k is None else args.top_k
    r = load_run_split(clf.meta, args.data, args.data_dir, args.split, args.on_bad_image)
    if r.note:
        print(f"imgrec: note: {r.note}", file=sys.stderr)
    args.split = r.split
    return clf, r.bundle, r.data


def cmd_eval(args) -> int:
    from imgrec.eval.evaluate import evaluate

    clf, _, data = _load_labelled(args)
    res = evaluate(clf, data.images, data.labels, top_k=args.top_k).metrics
    res.update(model=str(args.model), data=args.data or clf.meta.data.get("source"), split=args.split)
    if args.json:
        print_json(res)
        return 0
    if res.get("task") == "multilabel":
        print_multilabel(args, clf, res)
        return 0
    print(f"model {args.model} ({clf.name})  data {res['data']}  split {args.split}  n={res['n']}")
    topk = res.get(f"top{args.top_k}")
    shown = "" if args.top_k == 1 else \
        f"top-{args.top_k} accuracy {'-' if topk is None else f'{topk:.4f}'}   "
    print(f"top-1 accuracy {res['top1']:.4f}   {shown}"
          f"loss {res['loss']:.4f}   macro F1 {res['macro_f1']:.4f}   balanced accuracy {res['balanced_acc']:.4f}")
    cal = res.get("calibration")
    if cal:
        b, a = cal["before"], cal["after"]
        print(f"calibration, raw scores (T = 1) → the model's (T = {cal['temperature']:.3f}):   "
              f"ECE {b['ece']:.4f} → {a['ece']:.4f}   NLL {b['nll']:.4f} → {a['nll']:.4f}   "
              f"Brier {b['brier']:.4f} → {a['brier']:.4f}")
    print()
    print_per_class_and_matrix(res)
    return 0


def print_per_class_and_matrix(res: dict) -> None:
    """The per-class table (the worst and best classes of many, with a line for the rest) and the confusion
    matrix (up to MATRIX_MAX_CLASSES classes): 2,000 classes printed 22 MB. ``--json`` keeps every class."""
    from imgrec.eval.metrics import MATRIX_MAX_CLASSES, more_classes_line, worst_and_best
    rows, hidden = worst_and_best(res["per_class"])
    print(fmt_table([[r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
                     for r in rows], ["class", "precision", "recall", "f1", "support"]))
    if hidden:
        print(f"{more_classes_line(hidden)}; above: the {len(rows) // 2} worst and best by F1")
    k = len(res["classes"])
    if k > MATRIX_MAX_CLASSES:
        print(f"\nconfusion matrix: {k:,} classes, too many to print (all in --json)")
        return
    print("\nconfusion matrix (rows: true, columns: predicted)")
    print(fmt_table([[res["classes"][i][:12]] + [str(v) for v in res["confusion_matrix"][i]] for i in range(k)],
                    ["true \\ pred"] + [str(j) for j in range(k)]))


def print_multilabel(args, clf, res: dict) -> None:
    print(f"model {args.model} ({clf.name}, multi-label)  data {res['data']}  split {args.split}  n={res['n']}")
    print(f"mAP macro {res['map_macro']:.4f}   mAP micro {res['map_micro']:.4f}   F1 macro {res['f1_macro']:.4f}   "
          f"F1 micro {res['f1_micro']:.4f}\nexact match {res['exact_match']:.4f}   Hamming loss "
          f"{res['hamming_loss']:.4f}   loss {res['loss']:.4f}   (decisions at the per-label thresholds)\n")
    from imgrec.eval.metrics import more_classes_line, worst_and_best
    rows, hidden = worst_and_best(res["per_class"])
    print(fmt_table([[r["class"], f"{r['threshold']:.3f}", f"{r['precision']:.4f}", f"{r['recall']:.4f}",
                      f"{r['f1']:.4f}", "-" if r["ap"] is None else f"{r['ap']:.4f}", r["support"]]
                     for r in rows], ["label", "threshold", "precision", "recall", "f1", "AP", "support"]))
    if hidden:
        print(f"{more_classes_line(hidden)}; above: the {len(rows) // 2} worst and best by F1")


def _need_report_extra() -> None:
    """A one-line error instead of a traceback when the optional plotting/templating packages are missing."""
    from imgrec.errors import require_modules
    require_modules(("matplotlib", "jinja2"), "this command", "report")


def cmd_report(args) -> int:
    _need_report_extra()
    from imgrec.eval.report import build_report

    clf, bundle, data = _load_labelled(args)
    report = build_report(clf, data, bundle=bundle, split=args.split,
                          data_name=args.data or clf.meta.data.get("source"), model_dir=args.model,
                          top_k=args.top_k, max_gallery=args.max_gallery)
    out = report.save(args.out)
    if args.json:
        print(json.dumps({"report": str(out), **report.numbers}, indent=2))
    elif report.numbers["eval"].get("task") == "multilabel":
        r, ex = report.numbers["eval"], report.numbers["exact_match"]
        print(f"wrote {out} ({len(report.html) / 1e6:.1f} MB): mAP {r['map_macro']:.4f}  exact match "
              f"{ex['value']:.4f} [{ex['ci_low']:.4f}, {ex['ci_high']:.4f}]  Hamming loss {r['hamming_loss']:.4f}  "
              f"n={r['n']}")
    else:
        acc, ece = report.numbers["accuracy"]["top1"], report.numbers["calibration"]["ece"]
        after = report.numbers["calibration_after"]
        shown = f"ECE {ece:.4f}" if after["temperature"] == 1.0 else \
            f"ECE {ece:.4f} raw, {after['ece']:.4f} at T = {after['temperature']:.3f}"
        print(f"wrote {out} ({len(report.html) / 1e6:.1f} MB): top-1 {acc['value']:.4f} "
              f"[{acc['ci_low']:.4f}, {acc['ci_high']:.4f}]  {shown}  n={report.numbers['eval']['n']}")
    return 0


def cmd_explain(args) -> int:
    _need_report_extra()
    from imgrec.eval import plots
    from imgrec.eval.explain import explain
    from imgrec.infer.predictor import Classifier
    from imgrec.safeio import atomic_write_bytes

    from imgrec.errors import ConfigError
    if (args.label or args.json_out) and not args.steps:
        raise ConfigError("--label and --json-out need --steps")
    if not args.lr > 0:
        raise ConfigError("--lr must be positive")
    if args.neighbours is not None and not 1 <= args.neighbours <= 50:
        raise ConfigError("--neighbours must be between 1 and 50")
    clf = Classifier.load(args.model, which=args.which, device=args.device)
    finder = None
    if args.neighbours:  # before the explanation's work: a model without a bank fails in one line at once
        from imgrec.eval.neighbours import Neighbours
        finder = Neighbours(clf, args.model)
    result = explain(clf, args.image, target=args.target, steps=args.steps, label=args.label, lr=args.lr)
    out = Path(args.out) if args.out else Path(f"{Path(args.image).stem}-explain.png")
    atomic_write_bytes(out, plots.steps_figure(result) if args.steps else plots.explain_figure(result))
    nb_out = None
    if finder is not None:
        result["neighbours"] = finder.lookup(clf.load_image(args.image)[None], args.neighbours)[0]
        nb_out = out.with_name(out.stem + "-neighbours.png")
        atomic_write_bytes(nb_out, plots.neighbours_figure(result["image"], result["predicted"], result["neighbours"]))
    summary = {"image": str(args.image), "out": str(out), "predicted": result["predicted"],
               "probability": result["predicted_probability"], "target": result["target"],
               "target_probability": result["target_probability"], "method": result["method"],
               "layer": result["layer"]}
    if nb_out is not None:
        summary["neighbours"] = [{k: v for k, v in nb.items() if k != "image"} for nb in result["neighbours"]]
        summary["neighbours_out"] = str(nb_out)
    if "training" in result:
        t = result["training"]
        summary.update(label=t["label"], label_source=t["label_source"], loss=t["loss"], step=dict(t["step"]))
        summary["step"].pop("probabilities_after")
    if args.json_out:
        from imgrec.eval.explain import to_json
        from imgrec.safeio import atomic_write_text
        atomic_write_text(args.json_out, json.dumps(to_json(result)))
    if args.json:
        print_json(summary)
    else:
        about = "" if result["target_index"] == result["predicted_index"] else \
            f"; explaining {result['target']} ({result['target_probability'] * 100:.1f}%)"
        print(f"{args.image}: {result['predicted']} ({result['predicted_probability'] * 100:.1f}%){about} → {out}")
        if nb_out is not None:
            near = ", ".join(f"{nb['label']} ({nb['similarity']:.2f})" for nb in result["neighbours"])
            print(f"nearest training images: {near} → {nb_out}")
    if not result["heatmap"].any():
        print(f"imgrec: note: no positive evidence for {result['target']} in {result['layer']}; the heat map is empty",
              file=sys.stderr)
    return 0
