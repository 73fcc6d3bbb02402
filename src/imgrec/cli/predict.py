"""``imgrec predict``: ``predict_files`` over files and folders, printed as a table, JSON or CSV.

``--backend onnxruntime`` (or ``--model x.onnx``) runs an exported file with ONNX Runtime; that path never
imports PyTorch (imgrec.infer.backends).

A new output format is one more writer function here and one more option.
"""
from __future__ import annotations

import csv
import io
import sys

from imgrec.cli.common import add_backend_option, add_bad_image_option, fmt_table, print_json



def add_parsers(sub) -> None:
    p = sub.add_parser("predict", help="predict labels for image files and folders")
    p.add_argument("--model", required=True, help="model directory, or an exported .onnx file")
    p.add_argument("inputs", nargs="+", help="image files and folders (searched recursively)")
    p.add_argument("--top-k", type=int, help="labels per image, best first (default 5; single-label models)")
    p.add_argument("--threshold", action="append", metavar="T|LABEL=T",
                   help="multi-label models: decision threshold in 0..1 for every label (0.3) or one label "
                        "(dog=0.3); repeatable; default: the thresholds chosen on the validation split")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                   help="PyTorch autocast: auto (default: bf16 where this CPU/GPU runs the model faster in it), "
                        "bf16, fp16 (GPU) or none (fp32); ONNX Runtime runs the exported file's precision")
    add_backend_option(p)
    p.add_argument("--decode-threads", type=int,
                   help="threads decoding images while the model runs (default: one per core; 0: no pipeline)")
    add_bad_image_option(p)
    p.add_argument("--json", action="store_true", help='print [{"file", "predictions": [{"label", "score"}]}]')
    p.add_argument("--csv", help="write file,rank,label,score rows to this CSV file")
    p.add_argument("--verbose", action="store_true", help="print the table even with --csv")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args) -> int:
    from imgrec.errors import ConfigError
    from imgrec.infer.backends import load_classifier

    if args.top_k is not None and args.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    clf = load_classifier(args.model, backend=args.backend, device=args.device, amp=args.amp)
    multilabel = getattr(clf, "multilabel", False)
    if multilabel and args.top_k is not None:
        from imgrec.infer.multilabel import top_k_error
        raise top_k_error()
    if args.threshold:
        clf.set_thresholds(args.threshold)  # a single-label model refuses in one line
    args.top_k = 5 if args.top_k is None else args.top_k
    results = clf.predict_files(args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                                on_bad_image=args.on_bad_image, decode_threads=args.decode_threads).results
    if args.csv:
        write_csv(args.csv, results)
    if args.json:
        print_json(results)
    elif not args.csv or args.verbose:
        print(format_labels(results) if multilabel else format_table(results, args.top_k))
    if args.csv and not args.json:
        print(f"wrote {len(results)} predictions to {args.csv}", file=sys.stderr)
    return 0


def format_table(results: list[dict], top_k: int) -> str:
    rows = [[r["file"]] + [f"{p['label']} ({p['score'] * 100:.1f}%)" for p in r["predictions"]] for r in results]
    return fmt_table(rows, ["file"] + [f"top {i}" for i in range(1, top_k + 1)][:len(rows[0]) - 1 if rows else 1])


def format_labels(results: list[dict]) -> str:
    """Multi-label: every label at or above its threshold, best first ("-" for none)."""
    rows = [[r["file"], ", ".join(f"{p['label']} ({p['score'] * 100:.1f}%)" for p in r["predictions"]) or "-"]
            for r in results]
    return fmt_table(rows, ["file", "labels"])


def write_csv(path: str, results: list[dict]) -> None:
    """``file,rank,label,score`` rows, written atomically (without importing PyTorch: the ONNX Runtime path)."""
    from imgrec.safeio import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "rank", "label", "score"])
    for r in results:
        for i, p in enumerate(r["predictions"], 1):
            w.writerow([r["file"], i, p["label"], f"{p['score']:.6f}"])
    atomic_write_text(path, buf.getvalue())
