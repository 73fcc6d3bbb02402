"""``imgrec export``: a model directory → one ONNX (fp32 or int8) or TorchScript file that takes uint8 pixels,
checked against PyTorch before it is put in place (imgrec.infer.export)."""
from __future__ import annotations

import re
import sys

from imgrec.cli.common import WHICH_OPTION, add_command, eval_data_options, json_option, print_json


class _FormatNames:
    """The names in imgrec.infer.export.FORMATS, as argparse ``choices``, read only when argparse uses them (a
    --format value, --help): that module imports torch, and the parser is built for every imgrec command,
    `imgrec serve --backend onnxruntime` without torch included."""

    def _names(self) -> tuple[str, ...]:
        from imgrec.infer.export import FORMATS
        return tuple(FORMATS)

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


def _format_error_in_one_line(p) -> None:
    """argparse answers an unknown --format with its usage and its own error line; imgrec reports bad input as
    one line, and in the words export_model uses for the same mistake, so a script sees one message."""
    usage_error = p.error

    def error(message: str):
        bad = re.match(r"argument --format: invalid choice: (.*?) \(choose from", message)
        if bad:
            p.exit(2, f"imgrec: error: unknown export format {bad.group(1)}; choose one of: "
                      f"{', '.join(_FormatNames())}\n")
        usage_error(message)
    p.error = error


EXPORT_OPTIONS = (
    ("--model", {"required": True, "help": "model directory (a run directory)"}),
    WHICH_OPTION,
    # a metavar, so that argparse does not list the choices (importing torch) while the parser is built
    ("--format", {"default": "onnx", "choices": _FormatNames(), "metavar": "FORMAT",
                  "help": "%(choices)s (default %(default)s)"}),
    ("--out", {"help": "file to write (default DIR/model.onnx, DIR/model.int8.onnx or DIR/model.torchscript.pt)"}),
    ("--int8", {"action": "store_true",
                "help": "int8 static quantisation (ONNX Runtime, QDQ, per-channel), calibrated on training images"}),
    ("--calib-size", {"type": int, "default": 512, "help": "training images used to calibrate --int8 (default 512)"}),
    ("--check", {"action": "store_true",
                 "help": "only check an existing exported file (--out, default DIR/model.onnx) against PyTorch"}),
    ("--check-data", {"nargs": "+", "metavar": "PATH",
                      "help": "image files/folders to check on (default: the model's validation split)"}),
    ("--check-limit", {"type": int, "help": "check on at most this many images (default all)"}),
    *eval_data_options(default_split="val"),
    json_option(),
)


def add_parsers(sub) -> None:
    p = add_command(
        sub, "export", cmd_export, EXPORT_OPTIONS,
        help="export a model to ONNX or TorchScript with the preprocessing inside, and check it",
        description="Write one file whose graph takes uint8 pixels (N×H×W×C, RGB or gray, any size) and does the "
                    "resize, normalisation, network, flip-TTA and softmax; class names and input size go into its "
                    "metadata. The export is checked against PyTorch on the validation split (or --split, "
                    "--data, --check-data) and replaces --out only when top-1 agreement and probabilities are within "
                    "tolerance. The data options default to the run's own (model.json), as for `imgrec eval`.")
    _format_error_in_one_line(p)


def cmd_export(args) -> int:
    from imgrec.errors import ConfigError
    from imgrec.infer.export import check_exported, export_model

    if args.check_limit is not None and args.check_limit < 1:
        raise ConfigError("--check-limit must be at least 1")
    if args.check:
        res = check_exported(args.model, args.out, which=args.which, data=args.check_data, data_dir=args.data_dir,
                             limit=args.check_limit, source=args.data, split=args.split,
                             on_bad_image=args.on_bad_image)
        if args.json:
            from dataclasses import asdict
            print_json(asdict(res))
        else:
            print(res.summary())
        if not res.passed:
            raise ConfigError(f"check failed: {'; '.join(res.failures)}")
        return 0
    log = None if args.json else (lambda s: print(f"imgrec: {s}", file=sys.stderr))
    result = export_model(args.model, args.out, args.format, which=args.which, int8=args.int8,
                          check_data=args.check_data, data_dir=args.data_dir, check_limit=args.check_limit,
                          calib_size=args.calib_size, log=log, source=args.data, split=args.split,
                          on_bad_image=args.on_bad_image)
    if args.json:
        print_json(result.to_dict())
    else:
        print(f"wrote {result.path} ({result.format} {result.precision}, {result.bytes / 1e6:.1f} MB)")
        print(result.check.summary())
    return 0
