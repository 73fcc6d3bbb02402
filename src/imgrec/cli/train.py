"""``imgrec train``: parse the options, resolve the config, call ``imgrec.engine.train.train``, print."""
from __future__ import annotations

import sys

from imgrec.cli.common import add_bad_image_option, add_json_option, bool_flag, print_json

# CLI flag → config key (the section is resolved by RunConfig.update)
TRAIN_OPTIONS = {
    "data": "data", "data_dir": "data_dir", "image_size": "image_size", "channels": "channels",
    "val_split": "val_split", "split_seed": "split_seed", "train_limit": "train_limit", "on_bad_image": "on_bad_image",
    "model": "name", "pretrained": "pretrained", "weights": "weights", "freeze_backbone": "freeze_backbone",
    "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "optimizer": "optimizer", "momentum": "momentum",
    "weight_decay": "weight_decay", "scheduler": "scheduler", "warmup": "warmup",
    "label_smoothing": "label_smoothing", "crop_padding": "crop_padding", "flip": "flip", "ema": "ema",
    "tta": "tta_flip", "grad_clip": "grad_clip", "seed": "seed", "device": "device", "amp": "amp",
    "channels_last": "channels_last", "compile": "compile", "patience": "patience",
    "deterministic": "deterministic", "eval_batch_size": "eval_batch_size", "threads": "threads",
    "checkpoint_every": "checkpoint_every", "val_last": "val_last",
}


def add_parsers(sub) -> None:
    from imgrec.engine.recipes import recipe_names

    p = sub.add_parser("train", help="train a model", description="Train a model; writes runs/<name>/.")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="fashion-mnist, mnist, an image folder or a CSV list (default fashion-mnist)")
    g.add_argument("--data-dir", help="folder holding the named dataset's IDX files")
    g.add_argument("--image-size", type=int)
    g.add_argument("--channels", type=int, choices=(1, 3))
    g.add_argument("--val-split", type=float, help="fraction (<1) or count carved from training data")
    g.add_argument("--split-seed", type=int)
    g.add_argument("--train-limit", type=int, help="use only the first N training images")
    add_bad_image_option(g, default=None)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="architecture (see `imgrec models`); default: the recipe's")
    g.add_argument("--recipe", help=f"a named recipe: {', '.join(recipe_names())} (default: chosen for this machine)")
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
    bool_flag(g, "flip", "random horizontal flips (default: on, off for digits)")
    g.add_argument("--no-augment", action="store_true", help="no crop, no flip")
    g.add_argument("--ema", type=float, help="EMA decay of the evaluated weights (e.g. 0.999)")
    bool_flag(g, "tta", "average predictions over the image and its mirror")
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--patience", type=int, help="early stopping after N epochs without val improvement")
    g.add_argument("--val-last", type=int, help="validate only the last N epochs (0: every epoch)")
    g.add_argument("--seed", type=int)
    g.add_argument("--deterministic", action="store_true", default=None)
    g = p.add_argument_group("speed")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, mps")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), help="mixed precision (auto: where it is fast)")
    bool_flag(g, "channels-last", "channels_last memory format (default: on for CNNs)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--threads", type=int)
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run directory (default runs/<data>-<model>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    g.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps")
    add_json_option(g, "print only a JSON summary")
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from pathlib import Path

    from imgrec.engine.train import default_run_dir, resolve_config, train

    overrides = {TRAIN_OPTIONS[k]: v for k, v in vars(args).items() if k in TRAIN_OPTIONS and v is not None}
    if args.no_augment:
        overrides["crop_padding"], overrides["flip"] = 0, False
    # on --resume the run's saved config.yaml governs (only a larger --epochs is taken from the command line)
    cfg = resolve_config(args.recipe, args.config, overrides, model_given=args.model is not None or args.resume)
    out = Path(args.out) if args.out else default_run_dir(cfg.data.data, cfg.model.name)
    args.out = str(out)  # for the resume hint after Ctrl-C
    if not args.quiet and not args.json:
        if cfg.recipe and not args.resume:
            print(f"recipe {cfg.recipe}: {cfg.recipe_reason}", file=sys.stderr)
        print(f"training {cfg.model.name} on {cfg.data.data} → {out}", file=sys.stderr)
    summary = train(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not (args.quiet or args.json),
                    extend_epochs=args.epochs)
    if args.json:
        print_json(summary)
    else:
        msg = f"best val_acc {summary['val_acc']:.4f} (epoch {summary['best_epoch']})"
        if "test_acc" in summary:
            msg += f"  test_acc {summary['test_acc']:.4f}  test_top5 {summary['test_top5']:.4f}"
        print(f"{msg}  train {summary['train_time_s']:.1f}s  wall {summary['wall_time_s']:.1f}s  → {out}")
    return 0
