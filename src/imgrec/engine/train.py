"""``imgrec train`` as a library call: data → model → Trainer → run directory, then the final test number."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from imgrec.config import RunConfig, load_yaml, validate
from imgrec.data.dataset import DataBundle, class_counts, load_data
from imgrec.data.imbalance import TAU_GRID, class_weights, imbalance_hint, logit_adjust_entry, long_tail_indices
from imgrec.data.memory import BatchLoader
from imgrec.data.pack import Packed, open_data
from imgrec.data.stream import StreamLoader, default_workers
from imgrec.device import cpu_has_fast_bf16, pick_device, set_threads, usable_cores
from imgrec.engine import distributed
from imgrec.engine.callbacks import (CSVLogger, EarlyStopping, GuardRails, ProgressBar, TensorBoardLogger, TimeBudget,
                                     tensorboard_enabled)
from imgrec.engine.trainer import Trainer, seed_everything
from imgrec.errors import ConfigError
from imgrec.infer.runtime import resolve_amp
from imgrec.modeldir import ModelMeta, RunDir, default_run_dir, write_meta
from imgrec.safeio import atomic_write_text, check_writable

__all__ = ["auto_recipe", "default_run_dir", "resolve_config", "train"]


def auto_recipe(device: str = "auto") -> tuple[str, str]:
    """The default recipe for this machine (see ``imgrec.engine.recipes.choose_recipe``) and why."""
    from imgrec.engine.recipes import choose_recipe
    dev = pick_device(device)
    return choose_recipe(dev.type, dev.type == "cpu" and cpu_has_fast_bf16(), usable_cores())


def resolve_config(recipe: str | None = None, config_file: str | None = None, overrides: dict | None = None,
                   model_given: bool = False, adapt: bool = True) -> RunConfig:
    """Defaults ← recipe ← config file ← command line.

    Without a recipe and without a model (``--model`` or the config file's), the recipe is chosen for this
    machine (``auto_recipe``); ``cfg.recipe_reason`` says why, and ``imgrec train`` prints it. Unless a recipe
    was named (``--recipe``) or ``adapt`` is false, what depends on the data (batch, lr, epochs, validation,
    image size, a pretrained start) is then chosen from it for every setting the user did not give
    (``adapt_config``); ``cfg.data_recipe`` says what and why.
    """
    from imgrec.engine.recipes import get_recipe

    cfg = RunConfig()
    file_cfg = load_yaml(config_file) if config_file else {}
    recipe = recipe or file_cfg.get("recipe")
    overrides = dict(overrides or {})
    reason = "chosen with --recipe" if recipe else None
    if recipe is None and not model_given and "name" not in (file_cfg.get("model") or {}):
        device = overrides.get("device") or (file_cfg.get("train") or {}).get("device") or file_cfg.get("device")
        recipe, reason = auto_recipe(device or "auto")
    chosen_by_hand = recipe is not None and reason == "chosen with --recipe"
    if recipe is not None:
        cfg.update(get_recipe(recipe), source=f"recipe {recipe}")
        cfg.recipe, cfg.recipe_reason = recipe, reason
    cfg.update(file_cfg, source=str(config_file))
    cfg.update(overrides, source="command line")
    validate(cfg)
    if adapt and not chosen_by_hand:
        adapt_config(cfg, explicit_keys(file_cfg, overrides))
        validate(cfg)
    from imgrec.models import model_info
    model_info(cfg.model.name)  # an unknown name fails now, listing the choices
    return cfg


def explicit_keys(*layers: dict) -> set[str]:
    """The setting names given in config layers (flat ``{"lr": …}`` or nested ``{"train": {"lr": …}}``)."""
    keys: set[str] = set()
    for layer in layers:
        for k, v in (layer or {}).items():
            if k in ("data", "model", "train") and isinstance(v, dict):
                keys.update(v)
            else:
                keys.add(k)
    return keys


def adapt_config(cfg: RunConfig, explicit: set[str], probe=None) -> None:
    """Change the settings that depend on the data, per ``imgrec.engine.recipes.adapt_to_data``, leaving the
    ``explicit`` ones alone; records what changed and why in ``cfg.data_recipe``. ``probe``: the data's
    ``DataProbe`` (default: probed from ``cfg.data.data``)."""
    from imgrec.data.probe import probe_source
    from imgrec.engine.recipes import adapt_to_data
    d, m, t = cfg.data, cfg.model, cfg.train
    if probe is None:
        probe = probe_source(d.data, val_split=d.val_split, data_dir=d.data_dir)
    if probe is None:
        return
    current = {"name": m.name, "pretrained": m.pretrained, "image_size": d.image_size,
               **{k: getattr(t, k) for k in ("batch_size", "lr", "optimizer", "epochs", "val_last", "crop_padding")}}
    changes, reason = adapt_to_data(probe, current, explicit)
    for key, value in changes.items():
        section = m if key in ("name", "pretrained") else d if key == "image_size" else t
        setattr(section, key, value)
    cfg.data_recipe = {"reason": reason, "changes": changes, "probe": probe.to_dict()}


def build_loaders(bundle: DataBundle, cfg: RunConfig, device: torch.device, channels_last: bool, *,
                  rank: int = 0, world_size: int = 1, packed: Packed | None = None):
    """The in-memory loaders; on several processes each rank gets its share of every training batch
    (``--batch-size`` is the global batch) and its own slice of the validation split. With a streamed pack
    (``packed.stream``) the training split streams instead (and the validation split when it is too big)."""
    t = cfg.train
    pad = t.crop_padding if t.crop_padding is not None else max(1, bundle.image_size // 14)
    flip = bundle.flip if t.flip is None else t.flip
    if packed is not None and packed.stream:
        return _stream_loaders(packed, bundle, cfg, device, channels_last, pad, flip, rank, world_size)
    n = len(bundle.train)
    train = BatchLoader(bundle.train, t.batch_size, bundle.mean, bundle.std, shuffle=True, crop_padding=pad,
                        flip=flip, drop_last=n >= 4 * t.batch_size, seed=t.seed, device=device,
                        channels_last=channels_last, sampler=t.sampler, rank=rank, world_size=world_size)
    val = BatchLoader(bundle.val, t.eval_batch_size, bundle.mean, bundle.std, device=device,
                      channels_last=channels_last, rank=rank, world_size=world_size, shard="split")
    return train, val


def _stream_loaders(packed: Packed, bundle: DataBundle, cfg: RunConfig, device: torch.device, channels_last: bool,
                    pad: int, flip: bool, rank: int, world_size: int):
    """LitData shards through DataLoader workers. Under torch.distributed LitData gives each rank its own
    share of the chunks; ``drop_last`` then gives every rank the same number of batches of the per-rank size."""
    t, d = cfg.train, cfg.data
    workers = default_workers() if d.stream_workers is None else int(d.stream_workers)
    if workers < 0:
        raise ConfigError(f"stream_workers must be 0 or more, got {workers}")
    per_rank = max(1, t.batch_size // world_size)
    n = int(packed.meta["splits"]["train"]["images"])
    train = StreamLoader(packed.split_dir("train"), per_rank, bundle.mean, bundle.std, shuffle=True,
                         crop_padding=pad, flip=flip, drop_last=world_size > 1 or n >= 4 * t.batch_size,
                         seed=t.seed, device=device, channels_last=channels_last, num_workers=workers,
                         meta=packed.meta)
    if packed.stream_val:
        # validation too big for memory: read once per epoch in order (no test split at the end; see imgrec eval);
        # every rank reads all of it (world_size × the validation compute, but every rank gets the same, exact
        # numbers to choose the best epoch and stop early with)
        val = StreamLoader(packed.split_dir("val"), t.eval_batch_size, bundle.mean, bundle.std, device=device,
                           channels_last=channels_last, num_workers=workers, meta=packed.meta, every_rank=True)
    else:
        val = BatchLoader(bundle.val, t.eval_batch_size, bundle.mean, bundle.std, device=device,
                          channels_last=channels_last, rank=rank, world_size=world_size, shard="split")
    return train, val


def model_meta(bundle: DataBundle, cfg: RunConfig, model_kwargs: dict, device: torch.device,
               amp: torch.dtype | None) -> ModelMeta:
    """What the model directory records about this run (metrics are added as training goes)."""
    return ModelMeta(
        model={"name": cfg.model.name, "kwargs": model_kwargs}, task=bundle.task,
        classes=list(bundle.classes), image_size=bundle.image_size, channels=bundle.channels,
        mean=list(bundle.mean), std=list(bundle.std),
        inference={"tta_flip": bool(cfg.train.tta_flip),
                   **logit_adjust_entry(bundle.counts.get("train", []), cfg.train.logit_adjust)},
        training={"recipe": cfg.recipe, "recipe_reason": cfg.recipe_reason, "data_recipe": cfg.data_recipe,
                  "device": str(device),
                  "precision": "fp32" if amp is None else str(amp).removeprefix("torch."),
                  "channels_last": cfg.train.channels_last, "compile": bool(cfg.train.compile)},
        data={"name": bundle.name, "source": cfg.data.data, "counts": bundle.counts,
              "val_split": cfg.data.val_split, "split_seed": cfg.data.split_seed,
              "on_bad_image": cfg.data.on_bad_image, "image_sizes": _image_sizes(cfg)},
        config=cfg.to_dict(),
    )


def _image_sizes(cfg: RunConfig) -> dict | None:
    """The training images' size range (``DataProbe.image_sizes``): from the data recipe's probe, else probed
    now (file headers only)."""
    from imgrec.data.probe import DataProbe, probe_source
    p = (cfg.data_recipe or {}).get("probe")
    probe = DataProbe(**p) if p else probe_source(cfg.data.data, val_split=cfg.data.val_split,
                                                  data_dir=cfg.data.data_dir)
    return None if probe is None else probe.image_sizes()


def train(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, evaluate_test: bool = True, extend_epochs: int | None = None,
          callbacks: list | None = None) -> dict:
    """Train per ``cfg`` into run directory ``out``; returns a summary (best val accuracy, test accuracy, times).

    With ``resume`` the run's saved config.yaml governs and ``cfg`` is ignored, except that
    ``extend_epochs`` may raise the number of epochs of a run (a finished one included). ``callbacks``: your own
    ``imgrec.engine.callbacks.Callback`` objects, called after imgrec's own.

    A run folder that did not exist before is removed again when the run fails before writing anything into it
    (a bad dataset, an unknown option), so the next run does not get a ``-2`` name beside an empty folder.
    """
    out = Path(out)
    created = not out.exists()
    try:
        return _train(cfg, out, resume=resume, overwrite=overwrite, progress=progress, evaluate_test=evaluate_test,
                      extend_epochs=extend_epochs, user_callbacks=list(callbacks or []))
    except BaseException:
        if created and out.is_dir() and distributed.env_rank() == 0:
            for stale in out.glob(".imgrec-write-test-*"):
                stale.unlink(missing_ok=True)
            if not any(out.iterdir()):
                out.rmdir()
        raise


def _train(cfg: RunConfig, out: Path, *, resume: bool, overwrite: bool, progress: bool, evaluate_test: bool,
           extend_epochs: int | None, user_callbacks: list) -> dict:
    t_start = time.perf_counter()
    # several processes (torchrun): rank 0 alone prints and writes the run directory; the others read it
    main = distributed.env_rank() == 0
    progress = progress and main
    rd = RunDir(out)
    has_checkpoint = rd.checkpoint.is_file()
    if resume:
        if not rd.config.is_file():
            raise ConfigError(f"{out}: nothing to resume (no config.yaml; start it without --resume)")
        saved = RunConfig.from_dict(load_yaml(rd.config))
        if extend_epochs and extend_epochs > saved.train.epochs:
            saved.train.epochs = int(extend_epochs)  # resuming may extend a run, nothing else changes
        cfg = saved
        if not has_checkpoint and progress:
            print(f"{out}: no checkpoint yet (stopped during the first epoch); starting over", file=sys.stderr)
    elif out.exists() and rd.holds_run():
        if not overwrite:
            raise ConfigError(f"{out}: already holds a run; use --resume to continue it or --overwrite to replace it")
        for f in rd.run_files() if main else ():
            f.unlink(missing_ok=True)
    if main:
        check_writable(out, need_bytes=64 << 20)
        for stale in out.glob(".*.tmp"):  # temporary files left by a crash mid-write; the real files are intact
            stale.unlink(missing_ok=True)

    t = cfg.train
    ctx = distributed.setup(pick_device(t.device))  # one process: nothing to join, ctx.device is the device
    distributed.barrier()  # the other ranks wait until rank 0 has prepared the run directory
    # N processes on one machine share its cores: each takes cores/N threads unless --threads says otherwise
    set_threads(t.threads or max(1, usable_cores() // ctx.local_world_size))
    seed_everything(t.seed, t.deterministic)
    device = ctx.device
    amp = resolve_amp(t.amp, device, cfg.model.name)

    d = cfg.data
    if not main:
        distributed.barrier()  # rank 0 loads first, so that a download or a decode cache is made once
    # a pack (imgrec data pack), or a source too big for memory: streamed or read into memory (imgrec.data.stream)
    packed, data_why = open_data(d.data, stream=d.stream, image_size=d.image_size, channels=d.channels,
                                 val_split=d.val_split, split_seed=d.split_seed, data_dir=d.data_dir,
                                 on_bad_image=d.on_bad_image, progress=progress)
    bundle = packed.bundle if packed is not None else load_data(
        d.data, image_size=d.image_size, channels=d.channels, val_split=d.val_split, split_seed=d.split_seed,
        data_dir=d.data_dir, on_bad_image=d.on_bad_image, progress=progress, task=d.task)
    if progress and data_why:
        how = "in memory" if packed is None or not packed.stream else f"streamed from {packed.split_dir('train')}"
        print(f"data {how}: {data_why}", file=sys.stderr)
    if main:
        distributed.barrier()
    d.image_size, d.channels = bundle.image_size, bundle.channels
    d.task = bundle.task  # recorded when detected from the data, so --resume and eval read it back
    if packed is not None and packed.stream and (d.train_limit or d.long_tail or t.sampler != "shuffle"):
        raise ConfigError("--train-limit, long_tail and --sampler balanced need the training data in memory; "
                          "pack a subset (imgrec data pack --train-limit N) or pass --no-stream")
    if d.train_limit:
        bundle.train = bundle.train.subset(torch.arange(min(int(d.train_limit), len(bundle.train))))
        bundle.counts["train"] = class_counts(bundle.train.labels, len(bundle.classes))
    weights = _imbalance_setup(bundle, cfg, progress)

    from imgrec.models import create_model, model_info
    info = model_info(cfg.model.name)
    model_kwargs = {"num_classes": len(bundle.classes), "in_chans": bundle.channels,
                    "image_size": bundle.image_size, **cfg.model.kwargs}
    torch.manual_seed(t.seed)
    model = create_model(cfg.model.name, **model_kwargs)
    if (cfg.model.pretrained or cfg.model.weights) and not resume:
        from imgrec.models.pretrained import load_pretrained
        report = load_pretrained(model, cfg.model.name, pretrained=cfg.model.pretrained, weights_file=cfg.model.weights)
        if progress:
            print(f"initial weights: {report}", file=sys.stderr)
    if cfg.model.freeze_backbone:
        from imgrec.models.pretrained import freeze_backbone
        freeze_backbone(model)
    channels_last = info.family != "vit" if t.channels_last is None else bool(t.channels_last)
    if ctx.rank:
        # the model above is the same on every rank (DDP also copies rank 0's); random layers (dropout) must not
        # draw the same numbers on every rank
        torch.manual_seed(t.seed + 1_000_003 * ctx.rank)

    train_loader, val_loader = build_loaders(bundle, cfg, device, channels_last, rank=ctx.rank,
                                             world_size=ctx.world_size, packed=packed)
    meta = model_meta(bundle, cfg, model_kwargs, device, amp)
    if weights is not None or t.sampler != "shuffle" or t.logit_adjust_loss:
        meta.training["imbalance"] = {"sampler": t.sampler, "class_weights": None if weights is None else
                                      dict(zip(bundle.classes, [round(float(w), 6) for w in weights]))}
        if t.reweight_from or t.logit_adjust_loss:
            meta.training["imbalance"].update(reweight_from=t.reweight_from, logit_adjust_loss=t.logit_adjust_loss)

    def on_save(tr: Trainer, test_metrics: dict | None = None) -> None:
        best = tr.history[tr.best_epoch] if tr.best_epoch >= 0 else {}
        meta.metrics = {"best_epoch": tr.best_epoch + 1, "val_acc": best.get("val_acc"),
                        "val_loss": best.get("val_loss"), "epochs_run": len(tr.history), **(test_metrics or {})}
        if best.get("val_balanced_acc") is not None:
            meta.metrics.update(val_balanced_acc=best["val_balanced_acc"], val_macro_f1=best["val_macro_f1"])
        meta.train_time_s = round(tr.train_time_s, 3)
        write_meta(out, meta)

    callbacks = [ProgressBar(enabled=progress)] + ([CSVLogger(rd.metrics)] if main else [])
    callbacks.append(GuardRails(len(bundle.classes), len(bundle.val), bundle.task, enabled=progress))
    if t.patience:
        callbacks.append(EarlyStopping(t.patience))
    if t.time_budget:
        # the new length is recorded at once, so that --resume continues the same schedule
        callbacks.append(TimeBudget(t.time_budget, enabled=progress, on_change=lambda tr: main and atomic_write_text(
            rd.config, cfg.to_yaml())))
    if main and tensorboard_enabled(t.tensorboard):
        callbacks.append(TensorBoardLogger(out / "tensorboard"))
    callbacks += user_callbacks
    trainer = Trainer(model, t, train_loader, val_loader, device=device, amp=amp, channels_last=channels_last,
                      run_dir=out, callbacks=callbacks, on_save=on_save, task=bundle.task, class_weights=weights,
                      logit_bias=None if meta.logit_bias is None else torch.tensor(meta.logit_bias),
                      train_prior=_train_prior(bundle) if t.logit_adjust_loss else None)
    if resume and has_checkpoint:
        trainer.resume()
        if ctx.rank:  # the checkpoint holds rank 0's random state: give this rank its own again
            torch.manual_seed(t.seed + 1_000_003 * ctx.rank + 7919 * (trainer.epoch * trainer.steps_per_epoch
                                                                      + trainer.start_step))
        if main:
            atomic_write_text(rd.config, cfg.to_yaml())  # records an extended --epochs
        if trainer.epoch >= t.epochs:
            # nothing left to do: say so, and return what the run reached (its model.json is complete)
            if progress:
                print(f"{out}: the run is finished ({trainer.epoch} of {t.epochs} epochs); pass --epochs N (more "
                      f"than {t.epochs}) to extend it", file=sys.stderr)
            distributed.cleanup(ctx) if ctx.world_size > 1 else None
            return _finished_summary(out, cfg, trainer, t_start)
        if progress:
            print(f"resuming {out} at epoch {trainer.epoch + 1}, step {trainer.start_step}", file=sys.stderr)
        if main and (trainer.resume_note or ctx.world_size > 1):
            # never silently different: what the run continues with on this number of processes
            per = t.batch_size / ctx.world_size
            print(f"resuming on {ctx.world_size} process{'es' if ctx.world_size > 1 else ''}: global batch "
                  f"{t.batch_size} ({per:g} per process), learning rate {t.lr:g} at its peak, "
                  f"{trainer.optimizer.param_groups[0]['lr']:.4g} at the next step"
                  + (f" ({trainer.resume_note})" if trainer.resume_note else ""), file=sys.stderr)
    elif main:
        atomic_write_text(rd.config, cfg.to_yaml())
    trainer.fit()
    if ctx.world_size > 1:
        # every rank leaves the process group together, here: a rank that exits while another still holds the
        # group open aborted now and then in gloo's teardown ("terminate called without an active exception");
        # what follows (the final test) is rank 0's alone and needs no collective
        distributed.barrier()
        distributed.cleanup(ctx)

    summary = {"run": str(out), "model": cfg.model.name, "recipe": cfg.recipe, "epochs_run": len(trainer.history),
               "best_epoch": trainer.best_epoch + 1, "val_acc": trainer.best_acc, "train_time_s": trainer.train_time_s}
    extra: dict = {}
    if not main:
        # the final numbers are rank 0's: it evaluates the best weights once, through the same one-process
        # path as `imgrec eval` (exact by construction; a few seconds for a test split that fits in memory)
        summary["wall_time_s"] = time.perf_counter() - t_start
        return summary
    if ctx.world_size > 1:
        set_threads(t.threads)  # the other ranks are done: rank 0 may use the machine's cores
    if str(t.logit_adjust).lower() == "auto" and bundle.task != "multilabel":
        summary["logit_adjust_tau"] = choose_logit_adjust(out, bundle, meta, device, t.amp)
        on_save(trainer)
    if t.calibrate and bundle.task != "multilabel" and len(bundle.val):
        # after the logit adjustment (written just above), so T is fitted on the logits predict will use; a
        # multi-label model is skipped: its per-label sigmoids and thresholds would need one T per label; a
        # validation split streamed from shards (too big for memory) is not held here, so none is fitted then
        summary["temperature"] = choose_temperature(out, bundle, meta, device, t.amp)
        on_save(trainer)
    if t.unknown and bundle.task != "multilabel" and len(bundle.val) and hasattr(bundle.train, "images"):
        # after the temperature (the score of msp and energy is read through it); the statistics come from
        # training images, the threshold from the validation images, never from the test split
        if len(bundle.val) < MIN_UNKNOWN_VAL:
            if progress:
                print(f"note: {len(bundle.val)} validation images are too few to choose an \"unknown\" threshold "
                      f"(at least {MIN_UNKNOWN_VAL}); this model always names one of its classes", file=sys.stderr)
        else:
            summary["unknown_threshold"] = choose_unknown(out, bundle, meta, device, t.amp, t.accept_rate)
            on_save(trainer)
    if bundle.task == "multilabel":
        extra = choose_val_thresholds(out, bundle, meta, device, t.amp)
        summary.update(task="multilabel", **extra)
        on_save(trainer, extra)
    if evaluate_test and bundle.test is not None:
        # the test split is looked at once, at the end, with the best-on-validation weights, through the same
        # evaluation as `imgrec eval`
        from imgrec.eval.evaluate import evaluate
        from imgrec.infer.predictor import Classifier
        clf = Classifier.load(out, device=str(device), amp=t.amp)
        res = evaluate(clf, bundle.test.images, bundle.test.labels).metrics
        if bundle.task == "multilabel":
            test = {f"test_{k}": res[k] for k in ("map_macro", "map_micro", "f1_macro", "hamming_loss")}
            test["test_acc"] = res["exact_match"]  # exact-match ratio (subset accuracy)
            summary.update(test_n=res["n"], **test)
            on_save(trainer, {**extra, **test})
        else:
            summary.update(test_acc=res["top1"], test_top5=res.get("top5"), test_n=res["n"],
                           test_macro_f1=res["macro_f1"], test_balanced_acc=res["balanced_acc"])
            on_save(trainer, {"test_acc": res["top1"], "test_top5": res.get("top5"), "test_macro_f1": res["macro_f1"],
                              "test_balanced_acc": res["balanced_acc"]})
    summary["wall_time_s"] = time.perf_counter() - t_start
    return summary


def _finished_summary(out: Path, cfg: RunConfig, trainer: Trainer, t_start: float) -> dict:
    """The summary of a finished run that ``--resume`` found nothing left to do in, from its model.json."""
    from imgrec.modeldir import read_meta
    metrics = dict(read_meta(out).metrics or {})
    summary = {"run": str(out), "model": cfg.model.name, "recipe": cfg.recipe, "epochs_run": len(trainer.history),
               "best_epoch": trainer.best_epoch + 1, "val_acc": trainer.best_acc, "train_time_s": trainer.train_time_s,
               "finished": True}
    summary.update({k: v for k, v in metrics.items() if k.startswith("test_") or k.startswith("val_")})
    summary["val_acc"] = trainer.best_acc
    summary["wall_time_s"] = time.perf_counter() - t_start
    return summary


def choose_temperature(out: Path, bundle: DataBundle, meta: ModelMeta, device: torch.device, amp: str) -> float:
    """Temperature scaling: the T minimising the validation NLL of ``softmax(logits / T)``, for the best weights
    as the model directory predicts them (the same forward pass, flip-TTA and logit adjustment included);
    stored in ``meta.inference["temperature"]`` (written with the next save). The test split is never used to
    fit it. Returns T."""
    from imgrec.eval.calibration import temperature_entry
    from imgrec.eval.evaluate import EVAL_BATCH_SIZE
    from imgrec.infer.predictor import Classifier
    clf = Classifier.load(out, device=str(device), amp=amp)
    logits = clf.logits(bundle.val.images, EVAL_BATCH_SIZE)  # raw: Classifier.logits never divides by T
    meta.inference["temperature"] = temperature_entry(logits, bundle.val.labels, "val")
    return float(meta.inference["temperature"]["T"])


MIN_UNKNOWN_VAL = 20  # validation images below which no "unknown" threshold is chosen: its quantile would be noise


def choose_unknown(out: Path, bundle: DataBundle, meta: ModelMeta, device: torch.device, amp: str,
                   accept_rate: float) -> float:
    """The "unknown" answer: the out-of-distribution score's statistics fitted on the training images (written
    to the model directory), its threshold chosen on the validation split to answer ``accept_rate`` of it;
    stored in ``meta.inference["unknown"]`` (written with the next save), and the bank of training features
    for the nearest-training-images lookup (``meta.inference["neighbours"]``). Returns the threshold."""
    from imgrec.infer.predictor import Classifier
    from imgrec.infer.unknown import fit_unknown
    clf = Classifier.load(out, device=str(device), amp=amp)
    neighbours: dict = {}  # the nearest-training-images bank, from the same forward pass
    meta.inference["unknown"] = fit_unknown(clf, out, bundle.train.images, bundle.train.labels, bundle.val.images,
                                            accept_rate=accept_rate, neighbours=neighbours)
    meta.inference["neighbours"] = neighbours
    return float(meta.inference["unknown"]["threshold"])


def choose_val_thresholds(out: Path, bundle: DataBundle, meta: ModelMeta, device: torch.device, amp: str) -> dict:
    """Multi-label: per-label decision thresholds maximising each label's F1 on the validation split, with
    the best weights as the model directory predicts (same forward pass), stored in ``meta.thresholds``
    (written with the next save). The test split is never used to choose them. Returns validation metrics
    at those thresholds."""
    from imgrec.eval.evaluate import EVAL_BATCH_SIZE
    from imgrec.eval.multilabel import choose_thresholds, summarize_multilabel
    from imgrec.infer.predictor import Classifier
    clf = Classifier.load(out, device=str(device), amp=amp)
    logits = clf.logits(bundle.val.images, EVAL_BATCH_SIZE)
    meta.thresholds = choose_thresholds(torch.sigmoid(logits), bundle.val.labels)
    res = summarize_multilabel(logits, bundle.val.labels, list(bundle.classes), meta.thresholds)
    return {f"val_{k}": res[k] for k in ("map_macro", "map_micro", "f1_macro", "exact_match", "hamming_loss")}


def _imbalance_setup(bundle: DataBundle, cfg: RunConfig, progress: bool) -> torch.Tensor | None:
    """The long-tailed subset (``data.long_tail``), the one-line imbalance hint, and the loss's class weights
    (``train.class_weights``, or None); see imgrec.data.imbalance."""
    d, t = cfg.data, cfg.train
    on = str(t.class_weights or "none").lower() != "none" or t.sampler != "shuffle" or bool(t.logit_adjust)
    on = on or bool(t.logit_adjust_loss)
    if bundle.task == "multilabel":
        if on or d.long_tail:
            raise ConfigError("class_weights, sampler balanced, logit_adjust and long_tail apply to single-label "
                              "classification, not multilabel")
        return None
    k = len(bundle.classes)
    if d.long_tail:
        # experiments (benchmarks/imbalance.py): train and validation alike, as if the stratified split had been
        # carved from long-tailed data; the test split stays balanced
        bundle.train = bundle.train.subset(long_tail_indices(bundle.train.labels, k, d.long_tail))
        bundle.val = bundle.val.subset(long_tail_indices(bundle.val.labels, k, d.long_tail))
        for split in ("train", "val"):
            bundle.counts[split] = torch.bincount(getattr(bundle, split).labels, minlength=k).tolist()
    counts = bundle.counts.get("train") or torch.bincount(bundle.train.labels, minlength=k).tolist()
    hint = None if on else imbalance_hint(counts, bundle.classes)
    if hint and progress:
        print(hint, file=sys.stderr)
    return class_weights(t.class_weights, counts, bundle.classes, t.class_weight_beta)


def _train_prior(bundle: DataBundle) -> list[float]:
    """The training class frequencies for the logit-adjusted loss (a class without images counts as one, as
    in logit_adjust_entry, so log(prior) stays finite)."""
    k = len(bundle.classes)
    counts = bundle.counts.get("train") or torch.bincount(bundle.train.labels, minlength=k).tolist()
    return logit_adjust_entry(counts, 1.0)["logit_adjust"]["prior"]


def choose_logit_adjust(out: Path, bundle: DataBundle, meta: ModelMeta, device: torch.device, amp: str) -> float:
    """``--logit-adjust auto``: the τ of TAU_GRID with the best balanced accuracy on the validation split, for
    the best weights as the model directory predicts them; stored in ``meta.inference`` (written with the next
    save). The test split is never used to choose it. Returns τ."""
    from imgrec.eval.evaluate import EVAL_BATCH_SIZE
    from imgrec.eval.metrics import best_logit_adjustment
    from imgrec.infer.predictor import Classifier
    clf = Classifier.load(out, device=str(device), amp=amp)
    clf.logit_bias = None  # the raw logits, whatever model.json holds now
    logits = clf.logits(bundle.val.images, EVAL_BATCH_SIZE)
    entry = logit_adjust_entry(bundle.counts["train"], 1.0)["logit_adjust"]
    tau, score = best_logit_adjustment(logits, bundle.val.labels, entry["prior"], TAU_GRID)
    if tau:
        meta.inference["logit_adjust"] = {**entry, "tau": tau, "chosen": f"validation balanced accuracy {score:.4f}"}
    return tau
