"""The ``imgrec`` command. Each subcommand module declares its options (``add_parsers``) and one ``cmd_*``
function that parses, calls one library function and prints; nothing here is needed by a library caller.

Bad input never shows a traceback: imgrec's own errors (ImgrecError) and OS errors become one line on
stderr and a non-zero exit code (2 for bad input, 1 for other failures, 130 for Ctrl-C).
"""
from __future__ import annotations

import argparse
import sys

from imgrec.cli import calibrate, data, embed, evaluate, export, models, predict, serve, train, weights

EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130
COMMAND_MODULES = (models, train, evaluate, predict, serve, export, calibrate, data, embed, weights)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error as imgrec reports every bad input: one line on stderr, exit 2. argparse
    would print the whole usage first (some twenty lines for ``train``); it is one ``--help`` away."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"imgrec: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from imgrec import __version__

    # subcommands' parsers take the class of this one (argparse's add_subparsers default)
    parser = OneLineParser(prog="imgrec", description="Image recognition: train, evaluate, predict.")
    parser.add_argument("--version", action="version", version=f"imgrec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return parser


def _take_sigint() -> None:
    """Make SIGINT (Ctrl-C, ``kill -INT``) raise KeyboardInterrupt even when imgrec was started with it ignored.

    A shell without job control starts background commands (``imgrec train ... &`` in a script, CI runners)
    with SIGINT set to "ignore", and Python keeps that disposition: Ctrl-C or ``kill -INT`` would then be
    lost and a training run would go on to the end instead of leaving a resumable checkpoint. imgrec's
    commands are meant to stop on SIGINT wherever they run, so the handler is installed explicitly.
    """
    import signal
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread (main() called from a library caller's thread): leave it
        pass


def main(argv: list[str] | None = None) -> int:
    from imgrec.errors import ImgrecError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `imgrec train --nproc N` passes them to torchrun
    _take_sigint()
    try:
        return int(args.func(args) or 0)
    except (ImgrecError, FloatingPointError) as e:  # bad input, or a training run whose loss diverged
        print(f"imgrec: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(e, ImgrecError) else EXIT_FAILURE
    except KeyboardInterrupt:
        import os
        if os.environ.get("RANK", "0") not in ("", "0"):  # several processes (torchrun): rank 0 alone says it
            return EXIT_INTERRUPTED
        out = getattr(args, "out", None)
        hint = f"; resume with: imgrec train --resume --out {out}" if args.command == "train" and out else ""
        print(f"imgrec: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except (OSError, MemoryError) as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"imgrec: error: {where}{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return EXIT_FAILURE


__all__ = ["build_parser", "main"]
