"""What several commands share: option groups declared once, JSON and table printing."""
from __future__ import annotations

import argparse
import json

BACKENDS = ("auto", "torch", "onnxruntime")  # imgrec.infer.backends.BACKENDS, without importing it for --help
DEVICE_HELP = "auto (default), cpu, cuda, cuda:N, mps"
DATA_DIR_HELP = "folder holding the named dataset's IDX files"
SOURCE_HELP = "fashion-mnist, mnist, an image folder or a CSV list (path,label[,split])"
VAL_SPLIT_HELP = "fraction (<1) or count carved from training data"
BAD_IMAGE_HELP = "an unreadable image stops the command (fail) or is reported and left out (skip)"
WHICH_OPTION = ("--which", {"default": "best", "choices": ("best", "last"), "help": "which weights (default best)"})
BOOL = {"action": argparse.BooleanOptionalAction, "default": None}  # --name/--no-name, None when not given


def val_split_value(text: str) -> float:
    """--val-split where no config validates it (data pack): a finite positive fraction or count."""
    import math
    v = float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a fraction (<1) or a count (≥1) of images, got {text[:40]!r}")
    return v


def existing_folder(text: str) -> str:
    """--data-dir: a folder that exists (argparse says so in one usage line); one given but missing was ignored,
    and the data found elsewhere (the cache, a download) used instead."""
    import os
    if not os.path.isdir(text):
        shown = text if len(text) <= 200 else text[:200] + "…"
        raise argparse.ArgumentTypeError(f"{shown!r} is not a folder (it holds the named dataset's IDX files)")
    return text


def add_options(p, options) -> None:
    """Add the rows of a declarative option table to a parser or argument group, in order: ``(flag or tuple of
    flags, {argparse keywords})``."""
    for flags, kwargs in options:
        p.add_argument(*((flags,) if isinstance(flags, str) else flags), **kwargs)


def add_command(sub, name: str, func, options=(), **parser_kwargs):
    """A subcommand: its parser (``help``, ``description``), its option table and the ``cmd_*`` it runs."""
    p = sub.add_parser(name, **parser_kwargs)
    add_options(p, options)
    p.set_defaults(func=func)
    return p


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def fmt_table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(r):
        return "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def model_dir_options(*, which: bool = True) -> tuple:
    """--model DIR [--which best|last] [--device]: a trained model to load."""
    return (("--model", {"required": True, "help": "model directory (a run directory)"}),
            *([WHICH_OPTION] if which else []),
            ("--device", {"default": "auto", "help": DEVICE_HELP}))


def eval_data_options(default_split: str = "test, else val") -> tuple:
    """--data/--data-dir/--split/--on-bad-image: a labelled split to evaluate on. Each defaults to what the
    model directory recorded of its run (data source, validation split, bad-image policy)."""
    return (("--data", {"help": "dataset (default: the one it was trained on)"}),
            ("--data-dir", {"type": existing_folder, "help": DATA_DIR_HELP + " (default: the run's)"}),
            ("--split", {"default": None, "choices": ("test", "val", "train"),
                         "help": f"split to use (default: {default_split})"}),
            bad_image_option(None, BAD_IMAGE_HELP + "; default: what the run was trained with"))


def bad_image_option(default: str | None = "fail", help: str = BAD_IMAGE_HELP) -> tuple[str, dict]:
    """The ``--on-bad-image fail|skip`` row of an option table."""
    return "--on-bad-image", {"default": default, "choices": ("fail", "skip"), "help": help}


def json_option(help: str = "print JSON only") -> tuple[str, dict]:
    """The ``--json`` row of an option table."""
    return "--json", {"action": "store_true", "help": help}


def add_json_option(p, help: str = "print JSON only") -> None:
    add_options(p, [json_option(help)])


def backend_option() -> tuple[str, dict]:
    """The ``--backend auto|torch|onnxruntime`` row (predict, eval, serve)."""
    return "--backend", {"default": "auto", "choices": BACKENDS,
                         "help": "auto (default: onnxruntime for a .onnx file, else torch), torch, or onnxruntime "
                                 "(runs DIR/model.onnx from `imgrec export`, without PyTorch)"}


def add_backend_option(p) -> None:
    add_options(p, [backend_option()])
