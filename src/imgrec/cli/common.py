"""What several commands share: option groups declared once, JSON and table printing."""
from __future__ import annotations

import argparse
import json

BACKENDS = ("auto", "torch", "onnxruntime")  # imgrec.infer.backends.BACKENDS, without importing it for --help


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def fmt_table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(r):
        return "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def bool_flag(p, name: str, help: str) -> None:
    """``--name/--no-name``, None when not given (so a recipe or config file decides)."""
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, default=None,
                   help=help)


def add_model_dir_options(p, *, which: bool = True) -> None:
    """--model DIR [--which best|last] [--device]: a trained model to load."""
    p.add_argument("--model", required=True, help="model directory (a run directory)")
    if which:
        p.add_argument("--which", default="best", choices=("best", "last"), help="which weights (default best)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")


def add_eval_data_options(p, default_split: str = "test, else val") -> None:
    """--data/--data-dir/--split/--on-bad-image: a labelled split to evaluate on. Each defaults to what the
    model directory recorded of its run (data source, validation split, bad-image policy)."""
    p.add_argument("--data", help="dataset (default: the one it was trained on)")
    p.add_argument("--data-dir", help="folder holding the named dataset's IDX files (default: the run's)")
    p.add_argument("--split", default=None, choices=("test", "val", "train"),
                   help=f"split to use (default: {default_split})")
    p.add_argument("--on-bad-image", default=None, choices=("fail", "skip"),
                   help="an unreadable image stops the command (fail) or is reported and left out (skip); "
                        "default: what the run was trained with")


def add_bad_image_option(p, default: str | None = "fail") -> None:
    p.add_argument("--on-bad-image", default=default, choices=("fail", "skip"),
                   help="an unreadable image stops the command (fail) or is reported and left out (skip)")


def add_json_option(p, help: str = "print JSON only") -> None:
    p.add_argument("--json", action="store_true", help=help)


def add_backend_option(p) -> None:
    """--backend auto|torch|onnxruntime (predict, eval, serve)."""
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto (default: onnxruntime for a .onnx file, else torch), torch, or onnxruntime "
                        "(runs DIR/model.onnx from `imgrec export`, without PyTorch)")
