"""The ``imgrec`` command: each subcommand parses its options, calls the library, and prints.

Bad input never shows a traceback: imgrec's own errors (ImgrecError) and OS errors become one line on
stderr and a non-zero exit code (2 for bad input, 1 for other failures, 130 for Ctrl-C).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


# -- helpers -------------------------------------------------------------------------------------
def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def _fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _default_out(data: str, model: str) -> Path:
    base = f"{Path(data).name or data}-{model}".replace("/", "-")
    out = Path("runs") / base
    i = 2
    while out.exists():
        out = Path("runs") / f"{base}-{i}"
        i += 1
    return out


# -- subcommands ---------------------------------------------------------------------------------
def cmd_models(args) -> int:
    from imgrec.models import create_model, list_models, model_info
    from imgrec.models.pretrained import count_params

    rows = []
    for name in list_models():
        info = model_info(name)
        m = create_model(name, num_classes=10, in_chans=3, image_size=info.default_image_size)
        rows.append({"name": name, "params": count_params(m), "default_image_size": info.default_image_size,
                     "family": info.family, "pretrained": info.pretrained, "description": info.description})
    if args.json:
        _print_json(rows)
    else:
        print(_fmt_table([[r["name"], f"{r['params'] / 1e6:.2f}M", r["default_image_size"], r["pretrained"] or "-",
                           r["description"][:60]] for r in rows],
                         ["model", "params (10 classes, RGB)", "input", "pretrained weights", "description"]))
    return 0


TRAIN_OPTIONS = {  # CLI flag → config key (section resolved by RunConfig.update)
    "data": "data", "data_dir": "data_dir", "image_size": "image_size", "channels": "channels",
    "val_split": "val_split", "split_seed": "split_seed", "train_limit": "train_limit", "on_bad_image": "on_bad_image",
    "model": "name", "pretrained": "pretrained", "weights": "weights", "freeze_backbone": "freeze_backbone",
    "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "optimizer": "optimizer", "momentum": "momentum",
    "weight_decay": "weight_decay", "scheduler": "scheduler", "warmup": "warmup",
    "label_smoothing": "label_smoothing", "crop_padding": "crop_padding", "flip": "flip", "ema": "ema",
    "tta": "tta_flip", "grad_clip": "grad_clip", "seed": "seed", "device": "device", "amp": "amp",
    "channels_last": "channels_last", "compile": "compile", "patience": "patience",
    "deterministic": "deterministic", "eval_batch_size": "eval_batch_size", "threads": "threads",
    "checkpoint_every": "checkpoint_every",
}


def cmd_train(args) -> int:
    from imgrec.engine.run import resolve_config, train

    overrides = {TRAIN_OPTIONS[k]: v for k, v in vars(args).items() if k in TRAIN_OPTIONS and v is not None}
    if args.no_augment:
        overrides["crop_padding"], overrides["flip"] = 0, False
    # on --resume the run's saved config.yaml governs (only a larger --epochs is taken from the command line)
    cfg = resolve_config(args.recipe, args.config, overrides, model_given=args.model is not None or args.resume)
    out = Path(args.out) if args.out else _default_out(cfg.data.data, cfg.model.name)
    args.out = str(out)  # for the resume hint after Ctrl-C
    if not args.quiet and not args.json:
        print(f"training {cfg.model.name} on {cfg.data.data} → {out}"
              + (f" (recipe {cfg.recipe})" if cfg.recipe else ""), file=sys.stderr)
    summary = train(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not (args.quiet or args.json),
                    extend_epochs=args.epochs)
    if args.json:
        _print_json(summary)
    else:
        msg = f"best val_acc {summary['val_acc']:.4f} (epoch {summary['best_epoch']})"
        if "test_acc" in summary:
            msg += f"  test_acc {summary['test_acc']:.4f}  test_top5 {summary['test_top5']:.4f}"
        print(f"{msg}  train {summary['train_time_s']:.1f}s  wall {summary['wall_time_s']:.1f}s  → {out}")
    return 0


def cmd_eval(args) -> int:
    from imgrec.infer.predictor import Classifier

    clf = Classifier.load(args.model, which=args.which, device=args.device)
    from imgrec.data.loader import load_eval_split
    _, data = load_eval_split(clf.meta, args.data, args.data_dir, args.split, args.on_bad_image)
    res = clf.evaluate(data.images, data.labels, top_k=args.top_k)
    res.update(model=str(args.model), data=args.data or clf.meta["data"].get("source"), split=args.split)
    if args.json:
        _print_json(res)
        return 0
    print(f"model {args.model} ({clf.name})  data {res['data']}  split {args.split}  n={res['n']}")
    print(f"top-1 accuracy {res['top1']:.4f}   top-{args.top_k} accuracy {res[f'top{args.top_k}']:.4f}   "
          f"loss {res['loss']:.4f}   macro F1 {res['macro_f1']:.4f}\n")
    print(_fmt_table([[r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
                      for r in res["per_class"]], ["class", "precision", "recall", "f1", "support"]))
    print("\nconfusion matrix (rows: true, columns: predicted)")
    k = len(res["classes"])
    print(_fmt_table([[res["classes"][i][:12]] + [str(v) for v in res["confusion_matrix"][i]] for i in range(k)],
                     ["true \\ pred"] + [str(j) for j in range(k)]))
    return 0


def cmd_predict(args) -> int:
    import torch

    from imgrec.errors import ConfigError, ImageDecodeError
    from imgrec.infer.predictor import Classifier, expand_inputs

    if args.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    clf = Classifier.load(args.model, device=args.device)
    files = expand_inputs(args.inputs)
    if not files:
        raise ConfigError(f"no images found in {', '.join(args.inputs)} "
                          f"(looked for .jpg .jpeg .png .webp .bmp .gif)")
    results, bad = [], []
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        tensors, kept = [], []
        for f in chunk:
            try:
                tensors.append(clf.load_image(f))
                kept.append(f)
            except ImageDecodeError as e:
                if args.on_bad_image == "fail":
                    raise ImageDecodeError(e.reason, str(f)) from None
                bad.append((str(f), e.reason))
                print(f"imgrec: warning: skipped {f}: {e.reason}", file=sys.stderr)
        if tensors:
            preds = clf.topk(clf.probabilities(torch.stack(tensors)), args.top_k)
            results += [{"file": str(f), "predictions": p} for f, p in zip(kept, preds)]
    if args.csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["file", "rank", "label", "score"])
        for r in results:
            for i, p in enumerate(r["predictions"], 1):
                w.writerow([r["file"], i, p["label"], f"{p['score']:.6f}"])
        from imgrec.safeio import atomic_write_text
        atomic_write_text(args.csv, buf.getvalue())
    if args.json:
        _print_json(results)
    elif not args.csv or args.verbose:
        rows = [[r["file"]] + [f"{p['label']} ({p['score'] * 100:.1f}%)" for p in r["predictions"]] for r in results]
        print(_fmt_table(rows, ["file"] + [f"top {i}" for i in range(1, args.top_k + 1)][:len(rows[0]) - 1 if rows else 1]))
    if args.csv and not args.json:
        print(f"wrote {len(results)} predictions to {args.csv}", file=sys.stderr)
    return 0


def cmd_export_samples(args) -> int:
    """Write some images of a dataset split as PNG files (for trying predict, serve and explain)."""
    from PIL import Image

    from imgrec.data.loader import load_data
    bundle = load_data(args.data, data_dir=args.data_dir, splits=("train", "val", "test"), progress=False)
    data = bundle.split(args.split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = min(args.count, len(data))
    for i in range(n):
        arr = data.images[i].permute(1, 2, 0).numpy()
        label = bundle.classes[int(data.labels[i])].replace("/", "-").replace(" ", "_")
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(out / f"{i:04d}_{label}.png")
    print(f"wrote {n} images to {out}")
    return 0


# -- parser --------------------------------------------------------------------------------------
def _bool_flag(p, name, help):
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, default=None,
                   help=help)


def build_parser() -> argparse.ArgumentParser:
    from imgrec import __version__

    parser = argparse.ArgumentParser(prog="imgrec", description="Image recognition: train, evaluate, predict.")
    parser.add_argument("--version", action="version", version=f"imgrec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered architectures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train a model", description="Train a model; writes runs/<name>/.")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="fashion-mnist, mnist, an image folder or a CSV list (default fashion-mnist)")
    g.add_argument("--data-dir", help="folder holding the named dataset's IDX files")
    g.add_argument("--image-size", type=int)
    g.add_argument("--channels", type=int, choices=(1, 3))
    g.add_argument("--val-split", type=float, help="fraction (<1) or count carved from training data")
    g.add_argument("--split-seed", type=int)
    g.add_argument("--train-limit", type=int, help="use only the first N training images")
    g.add_argument("--on-bad-image", choices=("fail", "skip"))
    g = p.add_argument_group("model")
    g.add_argument("--model", help="architecture (see `imgrec models`); default: the recipe's")
    g.add_argument("--recipe", help="a named recipe: fast (default), accurate, best")
    g.add_argument("--config", help="YAML config file (a saved config.yaml works)")
    g.add_argument("--pretrained", action="store_true", default=None, help="start from torchvision's ImageNet weights")
    g.add_argument("--weights", help="start from a local state dict (.safetensors or weights-only .pt/.pth)")
    g.add_argument("--freeze-backbone", action="store_true", default=None, help="train only the classifier head")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--optimizer", choices=("sgd", "adam", "adamw"))
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--scheduler", choices=("onecycle", "cosine", "linear", "none"))
    g.add_argument("--warmup", type=float, help="fraction of steps for warm-up")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--crop-padding", type=int, help="random-crop padding in pixels (0 = off)")
    _bool_flag(g, "flip", "random horizontal flips (default: on, off for digits)")
    g.add_argument("--no-augment", action="store_true", help="no crop, no flip")
    g.add_argument("--ema", type=float, help="EMA decay of the evaluated weights (e.g. 0.999)")
    _bool_flag(g, "tta", "average predictions over the image and its mirror")
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--patience", type=int, help="early stopping after N epochs without val improvement")
    g.add_argument("--seed", type=int)
    g.add_argument("--deterministic", action="store_true", default=None)
    g = p.add_argument_group("speed")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, mps")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), help="mixed precision (auto: where it is fast)")
    _bool_flag(g, "channels-last", "channels_last memory format (default: on for CNNs)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--threads", type=int)
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run directory (default runs/<data>-<model>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    g.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps")
    g.add_argument("--json", action="store_true", help="print only a JSON summary")
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model on a dataset split")
    p.add_argument("--model", required=True, help="model directory (a run directory)")
    p.add_argument("--data", help="dataset (default: the one it was trained on)")
    p.add_argument("--data-dir")
    p.add_argument("--split", default="test", choices=("test", "val", "train"))
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--which", default="best", choices=("best", "last"))
    p.add_argument("--device", default="auto")
    p.add_argument("--on-bad-image", default="fail", choices=("fail", "skip"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="predict labels for image files and folders")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("inputs", nargs="+", help="image files and folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--on-bad-image", default="fail", choices=("fail", "skip"))
    p.add_argument("--json", action="store_true", help='print [{"file", "predictions": [{"label", "score"}]}]')
    p.add_argument("--csv", help="write file,rank,label,score rows to this CSV file")
    p.add_argument("--verbose", action="store_true", help="print the table even with --csv")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export-samples", help="write some dataset images as PNG files")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_samples)

    _add_extensions(sub)
    return parser


def _add_extensions(sub) -> None:
    """Subcommands whose modules need optional dependencies (serving, reports)."""
    for module in ("imgrec.serve.cli", "imgrec.eval.cli"):
        try:
            mod = __import__(module, fromlist=["add_parsers"])
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("imgrec"):
                continue
            raise
        mod.add_parsers(sub)


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
    _take_sigint()
    try:
        return int(args.func(args) or 0)
    except ImgrecError as e:
        print(f"imgrec: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = f"; resume with: imgrec train --resume --out {out}" if args.command == "train" and out else ""
        print(f"imgrec: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FloatingPointError as e:
        print(f"imgrec: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        return 0
    except (OSError, MemoryError) as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"imgrec: error: {where}{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
