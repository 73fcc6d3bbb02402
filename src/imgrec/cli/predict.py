"""``imgrec predict``: ``predict_files`` over files and folders, printed as a table, JSON or CSV.

``--backend onnxruntime`` (or ``--model x.onnx``) runs an exported file with ONNX Runtime; that path never
imports PyTorch (imgrec.infer.backends).

Unreadable files (``--on-bad-image``): by default (``report``) each gets an error row in the table, JSON and
CSV, the other files are predicted, and the exit code is 1 when any file could not be read; ``skip`` prints
the same rows and exits 0; ``fail`` stops at the first unreadable file (exit 2, nothing written).

A new output format is one more writer function here and one more option.
"""
from __future__ import annotations

import sys

from imgrec.cli.common import DEVICE_HELP, add_command, backend_option, fmt_table, print_json
from imgrec.safeio import printable

EXIT_SOME_UNREADABLE = 1  # some files could not be read; the others were predicted (imgrec.cli: 2 = bad input)
BAD_IMAGE_HELP = ("what an unreadable file does: report (default: an error row in the table, JSON and CSV, "
                  "the rest is predicted, exit code 1), skip (the same rows, exit code 0) or fail (stop at the "
                  "first one, exit code 2)")


PREDICT_OPTIONS = (
    ("--model", {"required": True, "help": "model directory, or an exported .onnx file"}),
    ("inputs", {"nargs": "+", "help": "image files and folders (searched recursively)"}),
    ("--top-k", {"type": int, "help": "labels per image, best first (default 5; single-label models)"}),
    ("--threshold", {"action": "append", "metavar": "T|LABEL=T",
                     "help": "multi-label models: decision threshold in 0..1 for every label (0.3) or one label "
                             "(dog=0.3); repeatable; default: the thresholds chosen on the validation split"}),
    ("--accept-rate", {"type": float, "metavar": "RATE",
                       "help": "share of in-distribution images to answer: images whose out-of-distribution score "
                               "is lower than that share of the validation images' are answered \"unknown\" "
                               "(default: the rate the model was trained with, 0.95)"}),
    ("--no-unknown", {"action": "store_true", "help": "always name one of the classes, never \"unknown\""}),
    ("--batch-size", {"type": int, "default": 64}),
    ("--device", {"default": "auto", "help": DEVICE_HELP}),
    ("--amp", {"default": "auto", "choices": ("auto", "bf16", "fp16", "none"),
               "help": "PyTorch autocast: auto (default: bf16 where this CPU/GPU runs the model faster in it), bf16, "
                       "fp16 (GPU) or none (fp32); ONNX Runtime runs the exported file's precision"}),
    backend_option(),
    ("--decode-threads", {"type": int,
                          "help": "threads decoding images while the model runs (default: one per core; 0: no "
                                  "pipeline)"}),
    ("--on-bad-image", {"default": "report", "choices": ("report", "skip", "fail"), "help": BAD_IMAGE_HELP}),
    ("--json", {"action": "store_true",
                "help": 'print [{"file", "predictions": [{"label", "score"}], "input_notes": [...]}] (with '
                        '"unknown" and "ood_score" when the model answers unknown); an unreadable file has "error" '
                        'and no predictions'}),
    ("--csv", {"help": "write file,rank,label,score,error,input_notes(,unknown,ood_score) rows to this CSV file"}),
    ("--verbose", {"action": "store_true", "help": "print the table even with --csv"}),
)


def add_parsers(sub) -> None:
    add_command(sub, "predict", cmd_predict, PREDICT_OPTIONS, help="predict labels for image files and folders",
                description="Predict every image file given or found in the folders given. Each answer comes with "
                            "notes where the image differs much from the training images (colour into a grey model, "
                            "a much larger or smaller size, a far-off aspect ratio). "
                            + BAD_IMAGE_HELP[0].upper() + BAD_IMAGE_HELP[1:] + ".")


def cmd_predict(args) -> int:
    from imgrec.errors import ConfigError, ImageDecodeError
    from imgrec.infer.backends import load_classifier

    if args.top_k is not None and args.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    if args.csv:
        from imgrec.modeldir import refuse_model_file
        refuse_model_file(args.csv, args.model, "--csv")
    clf = load_classifier(args.model, backend=args.backend, device=args.device, amp=args.amp)
    multilabel = clf.multilabel
    if multilabel and args.top_k is not None:
        from imgrec.infer.multilabel import top_k_error
        raise top_k_error()
    if args.threshold:
        clf.set_thresholds(args.threshold)  # a single-label model refuses in one line
    if args.no_unknown and args.accept_rate is not None:
        raise ConfigError("--accept-rate and --no-unknown contradict each other: give one")
    if args.no_unknown:
        clf.set_accept_rate(None)
    elif args.accept_rate is not None:
        clf.set_accept_rate(args.accept_rate)  # a model without an out-of-distribution score refuses in one line
    args.top_k = 5 if args.top_k is None else args.top_k
    try:
        # report and skip both go on past an unreadable file; they differ only in the exit code
        out = clf.predict_files(args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                                on_bad_image="fail" if args.on_bad_image == "fail" else "skip", warn=False,
                                decode_threads=args.decode_threads)
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{e.reason}; pass --on-bad-image report to list unreadable files and predict the "
                               "rest", e.source) from None
    entries = out.entries()
    if args.csv:
        write_csv(args.csv, entries)
    if args.json:
        print_json(entries)
    elif not args.csv or args.verbose:
        print(format_labels(entries) if multilabel else format_table(entries, args.top_k))
    if args.csv and not args.json:
        print(f"wrote {len(entries)} files' predictions to {args.csv}", file=sys.stderr)
    if out.skipped:
        shown = "; ".join(f"{f}: {r}" for f, r in out.skipped[:3]) + (" …" if len(out.skipped) > 3 else "")
        what = f"{len(out.skipped)} of {len(entries)} file(s) could not be read ({shown})"
        if args.on_bad_image == "skip":
            print(f"imgrec: warning: {what}; skipped", file=sys.stderr)
            return 0
        print(f"imgrec: error: {what}; the others were predicted; pass --on-bad-image skip to exit 0 anyway",
              file=sys.stderr)
        return EXIT_SOME_UNREADABLE
    return 0


def _notes(r: dict) -> str:
    return "; ".join(r.get("input_notes") or [])


def _answer(r: dict) -> str:
    """The answer column: "unknown (score s)" for an image unlike the training images, else the top label."""
    if "error" in r:
        return "-"
    if r.get("unknown"):
        return f"unknown (score {r['ood_score']:.4g})"
    return r["predictions"][0]["label"] if r["predictions"] else "-"


def format_table(results: list[dict], top_k: int) -> str:
    width = max([len(r["predictions"]) for r in results] + [1])
    answers = any("unknown" in r for r in results)  # the model answers "unknown": one more column
    rows = []
    for r in results:
        if "error" in r:
            cells = [f"error: {r['error']}"] + [""] * (width - 1)
        else:
            cells = [f"{p['label']} ({p['score'] * 100:.1f}%)" for p in r["predictions"]]
            cells += [""] * (width - len(cells))
        rows.append([r["file"]] + ([_answer(r)] if answers else []) + cells)
    header = ["file"] + (["answer"] if answers else []) + [f"top {i}" for i in range(1, min(top_k, width) + 1)]
    return _table_with_notes(rows, header, results)


def format_labels(results: list[dict]) -> str:
    """Multi-label: every label at or above its threshold, best first ("-" for none)."""
    rows = [[r["file"], f"error: {r['error']}" if "error" in r else
             ", ".join(f"{p['label']} ({p['score'] * 100:.1f}%)" for p in r["predictions"]) or "-"]
            for r in results]
    return _table_with_notes(rows, ["file", "labels"], results)


def _table_with_notes(rows: list[list], header: list[str], results: list[dict]) -> str:
    """The table, with an "input notes" column last when any image has notes."""
    if any(r.get("input_notes") for r in results):
        header = header + ["input notes"]
        rows = [row + [_notes(r)] for row, r in zip(rows, results)]
    # file names with bytes that are not UTF-8 (and error messages quoting them) as \xNN escapes
    return fmt_table([[printable(str(c)) for c in row] for row in rows], header)


def write_csv(path: str, results: list[dict]) -> None:
    """``file,rank,label,score,error,input_notes`` rows, and ``unknown,ood_score`` when the model answers
    "unknown" (one row per label; one row with the reason and no label
    for an unreadable file), written atomically (without importing PyTorch: the ONNX Runtime path)."""
    from imgrec.safeio import atomic_write_text, csv_text

    unknown = any("unknown" in r for r in results)  # two more columns when the model answers "unknown"
    rows = [["file", "rank", "label", "score", "error", "input_notes"] + (["unknown", "ood_score"] if unknown else [])]
    for r in results:
        extra = [str(r["unknown"]).lower(), f"{r['ood_score']:.6g}"] if unknown and "unknown" in r else \
            (["", ""] if unknown else [])
        if "error" in r:
            rows.append([r["file"], "", "", "", r["error"], ""] + extra)
            continue
        for i, p in enumerate(r["predictions"], 1):
            rows.append([r["file"], i, p["label"], f"{p['score']:.6f}", "", _notes(r)] + extra)
    # cells escaped: a class or file named =HYPERLINK(...) runs no formula; non-UTF-8 file names as \xNN
    atomic_write_text(path, csv_text(rows))
