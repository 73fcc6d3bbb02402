"""``imgrec train``: parse the options, resolve the config, call ``imgrec.engine.train.train``, print."""
from __future__ import annotations

import sys

from imgrec.cli.common import (BOOL, DATA_DIR_HELP, DEVICE_HELP, VAL_SPLIT_HELP, add_command, add_options,
                               bad_image_option, existing_folder, json_option, print_json)

# the flags named otherwise than their config field; every other flag whose name is a field of DataConfig,
# ModelConfig or TrainConfig sets that field (RunConfig.update finds the section), so a new field needs only
# its row in one of the option tables below
RENAMED_FLAGS = {"model": "name", "tta": "tta_flip"}


def train_options(parser_dests: set[str]) -> dict[str, str]:
    """CLI flag (argparse dest) → config key, from the config dataclasses' fields."""
    from dataclasses import fields

    from imgrec.config import DataConfig, ModelConfig, TrainConfig
    keys = {f.name for section in (DataConfig, ModelConfig, TrainConfig) for f in fields(section)}
    options = {k: k for k in keys if k in parser_dests}
    options.update({flag: key for flag, key in RENAMED_FLAGS.items() if flag in parser_dests})
    return options


def _duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1.5h`` → seconds (argparse turns the ValueError into one usage line)."""
    t = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    value = float(t[:-1] if scale else t) * (scale or 1)
    if not value > 0:
        raise ValueError(text)
    return value


def _tau(text: str):
    return "auto" if text.strip().lower() == "auto" else float(text)


STORE_TRUE = {"action": "store_true", "default": None}  # a flag that, when not given, leaves it to the recipe

DATA_OPTIONS = (
    ("--data", {"help": "fashion-mnist, mnist, an image folder, a CSV list, or a pack from `imgrec data pack` (a "
                        "folder, s3://, gs://) (default fashion-mnist)"}),
    ("--data-dir", {"type": existing_folder, "help": DATA_DIR_HELP}),
    ("--image-size", {"type": int}),
    ("--channels", {"type": int, "choices": (1, 3)}),
    ("--val-split", {"type": float, "help": VAL_SPLIT_HELP}),
    ("--split-seed", {"type": int}),
    ("--train-limit", {"type": int, "help": "use only the first N training images"}),
    bad_image_option(default=None),
    ("--stream", {**BOOL, "help": "stream packed shards from disk or object storage (--no-stream: load them into "
                                  "memory); default: in memory when the decoded data fits"}),
    ("--stream-workers", {"type": int, "help": "DataLoader worker processes reading shards (default: 0 on 2 cores, "
                                               "else up to 4)"}),
    ("--task", {"choices": ("classification", "multilabel"),
                "help": "one label per image, or several (a CSV list with labels separated by ';'); default: "
                        "detected from the data"}),
)

TRAINING_OPTIONS = (
    ("--epochs", {"type": int}),
    ("--batch-size", {"type": int, "help": "the global batch (several processes share each batch)"}),
    ("--lr", {"type": float, "help": "peak learning rate"}),
    ("--optimizer", {"choices": ("sgd", "adam", "adamw", "muon"),
                     "help": "muon: Muon for convolution filters, SGD (Nesterov) for the rest"}),
    ("--momentum", {"type": float}),
    ("--muon-lr", {"type": float, "help": "optimizer muon: the filters' peak step, relative to their norm"}),
    ("--weight-decay", {"type": float}),
    ("--scheduler", {"choices": ("onecycle", "cosine", "linear", "none")}),
    ("--warmup", {"type": float, "help": "fraction of steps for warm-up"}),
    ("--label-smoothing", {"type": float}),
    ("--crop-padding", {"type": int, "help": "random-crop padding in pixels (0 = off)"}),
    ("--flip", {**BOOL, "help": "random horizontal flips (default: on, off for digits)"}),
    ("--flip-order", {"choices": ("random", "alternate"),
                      "help": "random: each epoch flips anew; alternate: each image mirrored every other epoch "
                              "(the CPU recipes' choice; data in memory only)"}),
    ("--no-augment", {"action": "store_true", "help": "no crop, no flip"}),
    ("--ema", {"type": float, "help": "EMA decay of the evaluated weights (e.g. 0.999)"}),
    ("--tta", {**BOOL, "help": "average predictions over the image and its mirror"}),
    ("--calibrate", {**BOOL, "help": "fit a temperature on the validation split after training so that scores say "
                                     "how sure the model is (default: on; --no-calibrate keeps the raw softmax "
                                     "scores)"}),
    ("--unknown", {**BOOL, "help": "fit an out-of-distribution score after training, so that predict and serve "
                                   "answer \"unknown\" for images unlike the training images (default: on)"}),
    ("--accept-rate", {"type": float, "metavar": "RATE",
                       "help": "share of validation images answered rather than called unknown (default 0.95)"}),
    ("--grad-clip", {"type": float}),
    ("--patience", {"type": int, "help": "early stopping after N epochs without val improvement"}),
    ("--time-budget", {"type": _duration, "metavar": "DURATION",
                       "help": "train for at most this long (90, 90s, 5m, 1h): the epochs are set from the first "
                               "epoch's speed, and training stops at an epoch end with the best weights when the "
                               "time is up"}),
    ("--val-last", {"type": int, "help": "validate only the last N epochs (0: every epoch)"}),
    ("--best-metric", {"choices": ("auto", "acc", "balanced_acc", "macro_f1"),
                       "help": "validation number that picks the best epoch (auto: balanced_acc with an imbalance "
                               "option)"}),
)

IMBALANCE_OPTIONS = (
    ("--class-weights", {"metavar": "auto|inverse|effective|none|FILE",
                         "help": "loss weights per class: auto = effective number of samples (Cui et al. 2019), "
                                 "inverse = 1/count, or a JSON/YAML {class: weight} or CSV class,weight file"}),
    ("--class-weight-beta", {"type": float, "help": "β of the effective number (default 0.999)"}),
    ("--sampler", {"choices": ("shuffle", "balanced"),
                   "help": "balanced: every batch draws classes uniformly (with replacement)"}),
    ("--logit-adjust", {"type": _tau, "nargs": "?", "const": 1.0, "metavar": "TAU|auto",
                        "help": "post-hoc logit adjustment at prediction (Menon et al. 2021): subtract TAU·log(class "
                                "prior); TAU defaults to 1; auto: the TAU in 0..2 best on validation balanced "
                                "accuracy"}),
    ("--reweight-from", {"type": float, "metavar": "FRACTION",
                         "help": "deferred re-weighting (Cao et al. 2019): --class-weights apply only from this "
                                 "fraction of the epochs on (e.g. 0.7: the last 30%%)"}),
    ("--logit-adjust-loss", {"type": float, "nargs": "?", "const": 1.0, "metavar": "TAU",
                             "help": "logit-adjusted training loss (Menon et al. 2021): cross-entropy of logits + "
                                     "TAU·log(class prior); predicts with the raw logits; TAU defaults to 1"}),
    ("--long-tail", {"type": float, "metavar": "RATIO",
                     "help": "experiments: keep a long-tailed subset, class i keeping RATIO^(-i/(K-1)) of its "
                             "images"}),
    ("--seed", {"type": int}),
    ("--deterministic", STORE_TRUE),
)

SPEED_OPTIONS = (
    ("--device", {"help": DEVICE_HELP}),
    ("--amp", {"choices": ("auto", "bf16", "fp16", "none"), "help": "mixed precision (auto: where it is fast)"}),
    ("--channels-last", {**BOOL, "help": "channels_last memory format (default: on for CNNs)"}),
    ("--compile", {**STORE_TRUE, "help": "torch.compile the model"}),
    ("--eval-batch-size", {"type": int}),
    ("--threads", {"type": int, "help": "CPU threads per process (default: the cores / processes)"}),
    ("--nproc", {"type": int, "metavar": "N",
                 "help": "train with N processes on this machine: starts torchrun (CPUs: gloo; CUDA: one GPU each); "
                         "--batch-size stays the global batch. Several machines: see the README"}),
    ("--sync-bn", {**STORE_TRUE,
                   "help": "several CUDA processes: BatchNorm statistics of the global batch (SyncBatchNorm)"}),
)

OUTPUT_OPTIONS = (
    ("--out", {"help": "run directory (default runs/<data>-<model>)"}),
    ("--resume", {"action": "store_true", "help": "continue the run in --out from its checkpoint"}),
    ("--overwrite", {"action": "store_true", "help": "replace a finished run in --out"}),
    ("--checkpoint-every", {"type": int, "help": "also checkpoint every N steps"}),
    ("--tensorboard", {**BOOL, "help": "write TensorBoard event files to OUT/tensorboard/ (`tensorboard --logdir "
                                       "runs`); default: on when the tensorboard package is installed"}),
    json_option("print only a JSON summary"),
    ("--quiet", {"action": "store_true"}),
)


def _model_options() -> tuple:
    from imgrec.engine.recipes import recipe_names
    return (
        ("--model", {"help": "architecture (see `imgrec models`); default: the recipe's"}),
        ("--recipe", {"help": f"a named recipe: {', '.join(recipe_names())} (default: chosen for this machine)"}),
        ("--config", {"help": "YAML config file (a saved config.yaml works)"}),
        ("--pretrained", {**STORE_TRUE, "help": "start from the architecture's ImageNet weights (torchvision's, or "
                                                "timm's for timm:NAME; see `imgrec weights`)"}),
        ("--weights", {"help": "start from a local state dict (.safetensors or weights-only .pt/.pth)"}),
        ("--freeze-backbone", {**STORE_TRUE, "help": "train only the classifier head"}),
        ("--probe", {**BOOL, "help": "fit the classifier on the frozen backbone's features first (seconds; with "
                                     "--epochs 0 that is the whole training); default: on with pretrained weights"}),
    )


def add_parsers(sub) -> None:
    p = add_command(sub, "train", cmd_train, help="train a model", description="Train a model; writes runs/<name>/.")
    groups = (("data", DATA_OPTIONS), ("model", _model_options()), ("training", TRAINING_OPTIONS),
              ("class imbalance", IMBALANCE_OPTIONS), ("speed", SPEED_OPTIONS), ("output", OUTPUT_OPTIONS))
    for title, options in groups:
        add_options(p.add_argument_group(title), options)


def cmd_train(args) -> int:
    from pathlib import Path

    from imgrec.engine import distributed
    from imgrec.engine.train import default_run_dir, resolve_config, train

    options = train_options(set(vars(args)))
    overrides = {options[k]: v for k, v in vars(args).items() if k in options and v is not None}
    if args.no_augment:
        overrides["crop_padding"], overrides["flip"] = 0, False
    # on --resume the run's saved config.yaml governs (only a larger --epochs is taken from the command line)
    cfg = resolve_config(args.recipe, args.config, overrides, adapt=not args.resume)
    out = Path(args.out) if args.out else default_run_dir(cfg.data.data, cfg.model.name)
    args.out = str(out)  # for the resume hint after Ctrl-C
    if not args.resume:
        _check_inputs(cfg, out, args.overwrite)
    if args.nproc is not None:
        _check_nproc(args.nproc)
        if args.nproc > 1 and not distributed.launched():
            from imgrec.device import pick_device
            distributed.check_sync_bn(cfg.train.sync_bn, pick_device(cfg.train.device), args.nproc)
            return _run_torchrun(args.nproc, getattr(args, "argv", sys.argv[1:]))
    if distributed.env_rank() != 0:  # several processes: rank 0 alone prints
        args.quiet = True
    if not args.quiet and not args.json:
        if not args.resume and (cfg.recipe or cfg.data_recipe):
            data_why = (cfg.data_recipe or {}).get("reason")
            head = f"recipe {cfg.recipe}: {cfg.recipe_reason}" if cfg.recipe else f"{cfg.model.name}"
            if "weights" in (cfg.data_recipe or {}).get("changes", {}):  # transfer: the machine's network is unused
                head = cfg.model.name
            print(head + (f"; for {data_why}" if data_why else ""), file=sys.stderr)
        shown = _saved_config(out) if args.resume else cfg  # on --resume the run's own settings, not the defaults
        print(f"{'resuming' if args.resume else 'training'} {shown.model.name} on {shown.data.data} → {out}",
              file=sys.stderr)
    summary = train(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not (args.quiet or args.json),
                    extend_epochs=args.epochs)
    if distributed.launched() and distributed.env_rank() != 0:
        _leave_now(0)
    if args.json:
        print_json(summary)
    else:
        msg = f"best val_acc {summary['val_acc']:.4f} (epoch {summary['best_epoch']})"
        if summary.get("task") == "multilabel":  # val_acc/test_acc are exact-match ratios here
            msg += f"  val_mAP {summary['val_map_macro']:.4f}"
            if "test_map_macro" in summary:
                msg += f"  test_mAP {summary['test_map_macro']:.4f}  test_exact_match {summary['test_acc']:.4f}"
        elif "test_acc" in summary:
            msg += f"  test_acc {summary['test_acc']:.4f}"
            if summary.get("test_top5") is not None:
                msg += f"  test_top5 {summary['test_top5']:.4f}"
        print(f"{msg}  train {summary['train_time_s']:.1f}s  wall {summary['wall_time_s']:.1f}s  → {out}")
    if distributed.launched():
        _leave_now(0)
    return 0


def _check_inputs(cfg, out, overwrite: bool) -> None:
    """What can be checked before the recipe and "training …" lines are printed, so that a bad --data, --weights
    or --out is the only line said: the data source is one imgrec knows, the weights are a file, and the run
    directory is not a file nor under one (nor a name the file system refuses), nor a finished run to keep."""
    import errno
    import os
    import stat

    from imgrec.data.sources import resolve_source
    from imgrec.errors import ConfigError, DatasetError, ModelFileError
    from imgrec.modeldir import RunDir
    try:
        resolve_source(cfg.data.data)
    except OSError as e:
        raise DatasetError(f"{str(cfg.data.data)[:200]}: cannot be read ({e.strerror or e})") from None
    w = cfg.model.weights
    if w is not None and not os.path.isfile(w):
        raise ModelFileError(f"{str(w)[:200]}: weights file not found" + (" (a folder)" if os.path.isdir(w) else ""))
    try:
        is_dir = stat.S_ISDIR(os.stat(out).st_mode)
    except OSError as e:  # missing is fine (made by the run); under a file, or a name too long, is not
        if e.errno != errno.ENOENT:
            raise ConfigError(f"{str(out)[:200]}: not writable as a run directory ({e.strerror or e})") from None
        is_dir = True
    if not is_dir:
        raise ConfigError(f"{str(out)[:200]}: --out is a file, not a run directory")
    if not overwrite and out.exists() and RunDir(out).holds_run():  # said again, as the run says it, by the run
        raise ConfigError(f"{out}: already holds a run; use --resume to continue it or --overwrite to replace it")


def _saved_config(out):
    """The run's saved config.yaml (what --resume continues), or a ConfigError saying there is nothing to resume."""
    from imgrec.config import RunConfig, load_yaml
    from imgrec.errors import ConfigError
    from imgrec.modeldir import RunDir
    path = RunDir(out).config
    if not path.is_file():
        raise ConfigError(f"{out}: nothing to resume (no config.yaml; start it without --resume)")
    return RunConfig.from_dict(load_yaml(path))


def _leave_now(code: int) -> None:
    """A process that torchrun started, its work done and every file written (atomically, fsynced): exit
    without the interpreter's teardown. About 1 run in 10 on a loaded 2-core machine, a rank aborted in C++
    static destruction after the process group was gone ("terminate called without an active exception",
    SIGABRT), which torchrun reports as a failed job although the run was complete."""
    import os
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _check_nproc(nproc: int) -> None:
    import os

    from imgrec.errors import ConfigError
    if nproc < 1:
        raise ConfigError("--nproc must be at least 1")
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local and int(local) > 1 and nproc != int(local):
        raise ConfigError(f"--nproc {nproc} starts torchrun, but this process is one of {local} that torchrun "
                          "started: leave --nproc out")


def _run_torchrun(nproc: int, argv: list[str]) -> int:
    """Run torchrun (no launcher of our own) in this process: ``imgrec train`` with the same arguments minus
    ``--nproc`` in ``nproc`` processes. Ctrl-C and SIGTERM reach torchrun's agent, which passes them to every
    process (they stop together and rank 0 writes the checkpoint); the agent's own exception is then turned
    into exit code 130 instead of a traceback, and a failed process's exit code is returned (the process has
    said why on stderr). One machine: ``--standalone`` picks a free port, unless MASTER_ADDR and MASTER_PORT
    are set. Returns the exit code."""
    import os

    rest, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0]
        if len(name) >= 4 and "--nproc".startswith(name):  # --nproc N, --nproc=N (or argparse's prefix)
            skip = "=" not in tok
            continue
        rest.append(tok)
    cmd = [f"--nproc_per_node={nproc}"]
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        cmd += [f"--master_addr={os.environ['MASTER_ADDR']}", f"--master_port={os.environ['MASTER_PORT']}"]
    else:
        cmd.append("--standalone")
    cmd += ["-m", "imgrec.cli", *rest]
    sys.stdout.flush()
    sys.stderr.flush()

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    try:
        torchrun.run(torchrun.parse_args(cmd))
    except SignalException:
        return 130  # every process has stopped; rank 0 wrote the checkpoint and printed how to resume
    except ChildFailedError as e:
        codes = [int(f.exitcode) for f in e.failures.values() if f.exitcode]
        return next((c for c in codes if c > 0), 1)
    return 0

