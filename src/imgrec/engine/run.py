"""One training run as named steps (``run``): prepare the run directory, start the processes, open the data,
build the model, build the trainer, fit, then the choices made on the validation split and the final test.
``imgrec.engine.train.train`` calls it; the loaders and ``model.json``'s first content are made here too.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from imgrec.config import RunConfig, load_yaml
from imgrec.data.dataset import DataBundle, class_counts, load_data
from imgrec.data.imbalance import class_weights, imbalance_hint, logit_adjust_entry, long_tail_indices
from imgrec.data.memory import BatchLoader
from imgrec.data.pack import Packed, open_data
from imgrec.data.stream import StreamLoader, default_workers
from imgrec.device import pick_device, set_threads, usable_cores
from imgrec.engine import distributed
from imgrec.engine.choices import (MIN_UNKNOWN_VAL, choose_logit_adjust, choose_temperature, choose_unknown,
                                   choose_val_thresholds, validation_pass)
from imgrec.engine.callbacks import (CSVLogger, EarlyStopping, GuardRails, ProgressBar, TensorBoardLogger, TimeBudget,
                                     tensorboard_enabled)
from imgrec.engine.trainer import Trainer, seed_everything
from imgrec.errors import ConfigError
from imgrec.infer.runtime import resolve_amp
from imgrec.modeldir import ModelMeta, RunDir, write_meta
from imgrec.safeio import atomic_write_text, check_writable

__all__ = ["run", "build_loaders", "build_model", "model_meta", "uses_channels_last", "backbone_normalisation",
           "uses_probe", "backbone_entry"]


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
                        channels_last=channels_last, sampler=t.sampler, rank=rank, world_size=world_size,
                        flip_order=t.flip_order)
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
                  "channels_last": cfg.train.channels_last, "compile": bool(cfg.train.compile),
                  **({"backbone": backbone_entry(cfg)} if cfg.model.pretrained or cfg.model.weights else {})},
        data={"name": bundle.name, "source": cfg.data.data, "counts": bundle.counts,
              "val_split": cfg.data.val_split, "split_seed": cfg.data.split_seed, "val_files": cfg.data.val_files,
              "on_bad_image": cfg.data.on_bad_image, "image_sizes": _image_sizes(cfg)},
        config=cfg.to_dict(),
    )


def backbone_entry(cfg: RunConfig) -> dict:
    """What a model started from pretrained weights records of them (``training.backbone`` in model.json, and
    every export's metadata): the backbone, the weights' origin and their licence, which the trained model
    inherits. A file of the user's own keeps the user's licence."""
    from imgrec.models.weights import BACKBONES
    known = next((b for b in BACKBONES.values() if b.model == cfg.model.name), None)
    origin = cfg.model.weights or ("the architecture's pretrained weights" if cfg.model.pretrained else None)
    if known is None:
        return {"name": cfg.model.name, "weights": origin, "licence": "that of the weights file given"}
    return {"name": known.name, "weights": origin, "hf_repo": known.hf_repo, "licence": known.licence,
            "imagenet_top1": known.imagenet_top1}


def _image_sizes(cfg: RunConfig) -> dict | None:
    """The training images' size range (``DataProbe.image_sizes``): from the data recipe's probe, else probed
    now (file headers only)."""
    from imgrec.data.probe import DataProbe, probe_source
    p = (cfg.data_recipe or {}).get("probe")
    probe = DataProbe(**p) if p else probe_source(cfg.data.data, val_split=cfg.data.val_split,
                                                  data_dir=cfg.data.data_dir)
    return None if probe is None else probe.image_sizes()


def run(cfg: RunConfig, out: Path, *, resume: bool, overwrite: bool, progress: bool, evaluate_test: bool,
           extend_epochs: int | None, user_callbacks: list) -> dict:
    """The run as named steps: prepare the run directory, start the processes, open the data, build the model,
    build the trainer, fit, then (rank 0) the choices made on the validation split and the final test."""
    t_start = time.perf_counter()
    # several processes (torchrun): rank 0 alone prints and writes the run directory; the others read it
    main = distributed.env_rank() == 0
    progress = progress and main
    rd = RunDir(out)
    has_checkpoint = rd.checkpoint.is_file()
    cfg = _prepare_run_dir(cfg, rd, resume=resume, overwrite=overwrite, extend_epochs=extend_epochs, main=main,
                           progress=progress)
    ctx, amp = _start_processes(cfg)
    bundle, packed = _open_run_data(cfg, main, progress)
    weights = _imbalance_setup(bundle, cfg, progress)
    model, model_kwargs = build_model(cfg, bundle, rank=ctx.rank, resume=resume, progress=progress)
    backbone_normalisation(model, cfg, bundle)
    channels_last = uses_channels_last(cfg)
    probing = uses_probe(cfg, bundle, model) and not (resume and has_checkpoint)
    if not cfg.train.epochs and not probing and not (resume and has_checkpoint):
        raise ConfigError(f"--epochs 0 trains nothing here: a linear probe needs single-label data in memory and a "
                          f"classifier that is one linear layer ({cfg.model.name}'s is "
                          f"{type(model.get_classifier()).__name__}); give --epochs 1 or more")
    plain = _transfer_features(model, bundle, cfg, ctx.device, amp, channels_last, progress) if probing else None
    t = cfg.train
    train_loader, val_loader = build_loaders(bundle, cfg, ctx.device, channels_last, rank=ctx.rank,
                                             world_size=ctx.world_size, packed=packed)
    meta = _run_meta(bundle, cfg, model_kwargs, ctx.device, amp, weights)
    on_save = _meta_writer(out, meta)
    trainer = Trainer(model, t, train_loader, val_loader, device=ctx.device, amp=amp, channels_last=channels_last,
                      run_dir=out, callbacks=_run_callbacks(cfg, rd, bundle, main, progress) + user_callbacks,
                      on_save=on_save, task=bundle.task, class_weights=weights,
                      logit_bias=None if meta.logit_bias is None else torch.tensor(meta.logit_bias),
                      train_prior=_train_prior(bundle) if t.logit_adjust_loss else None)
    if resume and has_checkpoint:
        if _resume(trainer, cfg, rd, ctx, main, progress):
            return _finished_summary(out, cfg, trainer, t_start)
    else:
        if main:
            atomic_write_text(rd.config, cfg.to_yaml())
        if probing:
            _probe_step(trainer, bundle, cfg, meta, amp, channels_last, progress, plain)
    trainer.fit()
    if ctx.world_size > 1:
        # every rank leaves the process group together, here: a rank that exits while another still holds the
        # group open aborted now and then in gloo's teardown ("terminate called without an active exception");
        # what follows (the final test) is rank 0's alone and needs no collective
        distributed.barrier()
        distributed.cleanup(ctx)
    summary = {"run": str(out), "model": cfg.model.name, "recipe": cfg.recipe, "epochs_run": len(trainer.history),
               "best_epoch": trainer.best_epoch + 1, "val_acc": trainer.best_acc, "train_time_s": trainer.train_time_s}
    if main:
        # the final numbers are rank 0's: it evaluates the best weights once, through the same one-process
        # path as `imgrec eval` (exact by construction; a few seconds for a test split that fits in memory)
        if ctx.world_size > 1:
            set_threads(t.threads)  # the other ranks are done: rank 0 may use the machine's cores
        extra = _choose_on_validation(summary, out, bundle, meta, ctx.device, t, lambda *a: on_save(trainer, *a),
                                      progress)
        if evaluate_test and bundle.test is not None:
            _final_test(summary, out, bundle, ctx.device, t.amp, lambda *a: on_save(trainer, *a), extra)
    summary["wall_time_s"] = time.perf_counter() - t_start
    return summary


def _prepare_run_dir(cfg: RunConfig, rd: RunDir, *, resume: bool, overwrite: bool, extend_epochs: int | None,
                     main: bool, progress: bool) -> RunConfig:
    """Check the run directory (a run to resume, one to overwrite, room to write) and clear what a crash left;
    returns the config the run goes on with (a resumed run's own, perhaps with more epochs)."""
    out = rd.path
    if resume:
        if not rd.config.is_file():
            raise ConfigError(f"{out}: nothing to resume (no config.yaml; start it without --resume)")
        saved = RunConfig.from_dict(load_yaml(rd.config))
        if extend_epochs and extend_epochs > saved.train.epochs:
            saved.train.epochs = int(extend_epochs)  # resuming may extend a run, nothing else changes
        cfg = saved
        if not rd.checkpoint.is_file() and progress:
            print(f"{out}: no checkpoint yet (stopped during the first epoch); starting over", file=sys.stderr)
    elif out.exists() and rd.holds_run():
        if not overwrite:
            raise ConfigError(f"{out}: already holds a run; use --resume to continue it or --overwrite to replace it")
        if main:
            rd.clear()
    if main:
        check_writable(out, need_bytes=64 << 20)
        for stale in out.glob(".*.tmp"):  # temporary files left by a crash mid-write; the real files are intact
            stale.unlink(missing_ok=True)
    return cfg


def _start_processes(cfg: RunConfig):
    """Join the process group (one process: nothing to join), set threads and seeds; the context and the
    autocast dtype."""
    t = cfg.train
    ctx = distributed.setup(pick_device(t.device))  # ctx.device is the device
    distributed.barrier()  # the other ranks wait until rank 0 has prepared the run directory
    # N processes on one machine share its cores: each takes cores/N threads unless --threads says otherwise
    set_threads(t.threads or max(1, usable_cores() // ctx.local_world_size))
    seed_everything(t.seed, t.deterministic)
    return ctx, resolve_amp(t.amp, ctx.device, cfg.model.name)


def _open_run_data(cfg: RunConfig, main: bool, progress: bool) -> tuple[DataBundle, Packed | None]:
    """The run's data: a pack (imgrec data pack), or a source too big for memory, streamed or read into memory
    (imgrec.data.stream); else the source loaded into memory. Rank 0 loads first, so that a download or a
    decode cache is made once. What was detected (size, channels, task) is recorded in ``cfg.data``."""
    d, t = cfg.data, cfg.train
    if not main:
        distributed.barrier()
    packed, data_why = open_data(d.data, stream=d.stream, image_size=d.image_size, channels=d.channels,
                                 val_split=d.val_split, split_seed=d.split_seed, data_dir=d.data_dir,
                                 on_bad_image=d.on_bad_image, progress=progress)
    bundle = packed.bundle if packed is not None else load_data(
        d.data, image_size=d.image_size, channels=d.channels, val_split=d.val_split, split_seed=d.split_seed,
        data_dir=d.data_dir, on_bad_image=d.on_bad_image, progress=progress, task=d.task, val_files=d.val_files)
    if progress and data_why:
        how = "in memory" if packed is None or not packed.stream else f"streamed from {packed.split_dir('train')}"
        print(f"data {how}: {data_why}", file=sys.stderr)
    if progress and packed is not None and packed.stream and t.flip_order == "alternate" \
            and (bundle.flip if t.flip is None else t.flip):
        # a stream hands out images without their place in the split, which alternating flips are keyed by
        print("note: the streamed training images are flipped at random (alternating flips need them in memory)",
              file=sys.stderr)
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
    return bundle, packed


def uses_channels_last(cfg: RunConfig) -> bool:
    """Whether the run trains in channels_last: CNNs do unless told otherwise, ViTs do not."""
    from imgrec.models import model_info
    t = cfg.train
    return model_info(cfg.model.name).family != "vit" if t.channels_last is None else bool(t.channels_last)


def build_model(cfg: RunConfig, bundle: DataBundle, *, rank: int = 0, resume: bool = False, progress: bool = False,
                seed: int | None = None):
    """The architecture for this data, its initial weights (pretrained or a file; not when resuming: the
    checkpoint has them) and frozen parts, built after seeding with ``seed`` (default the run's); the model
    and its arguments (for model.json). ``imgrec train`` and the audit's fold models are built here alike."""
    from imgrec.models import create_model
    t = cfg.train
    model_kwargs = {"num_classes": len(bundle.classes), "in_chans": bundle.channels,
                    "image_size": bundle.image_size, **cfg.model.kwargs}
    torch.manual_seed(t.seed if seed is None else seed)
    model = create_model(cfg.model.name, **model_kwargs)
    if (cfg.model.pretrained or cfg.model.weights) and not resume:
        from imgrec.models.pretrained import load_pretrained
        report = load_pretrained(model, cfg.model.name, pretrained=cfg.model.pretrained, weights_file=cfg.model.weights)
        if progress:
            print(f"initial weights: {report}", file=sys.stderr)
    if cfg.model.freeze_backbone:
        from imgrec.models.pretrained import freeze_backbone
        freeze_backbone(model)
    if rank:
        # the model above is the same on every rank (DDP also copies rank 0's); random layers (dropout) must not
        # draw the same numbers on every rank
        torch.manual_seed(t.seed + 1_000_003 * rank)
    return model, model_kwargs


def backbone_normalisation(model, cfg: RunConfig, bundle: DataBundle) -> None:
    """A model started from pretrained weights sees its images normalised as its backbone was trained (timm's
    ``pretrained_cfg`` mean/std, else ImageNet's), not with the data's own statistics: a frozen backbone's
    BatchNorm layers expect exactly that input. Grey images get the mean of the three channels' numbers."""
    if not (cfg.model.pretrained or cfg.model.weights):
        return
    from imgrec.models.weights import IMAGENET_MEAN, IMAGENET_STD  # torchvision's weights; timm's carry their own
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = tuple(pcfg.get("mean") or IMAGENET_MEAN), tuple(pcfg.get("std") or IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        return
    if bundle.channels == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    bundle.mean, bundle.std = [float(v) for v in mean], [float(v) for v in std]


def uses_probe(cfg: RunConfig, bundle: DataBundle, model=None) -> bool:
    """Whether the run first fits its classifier as a linear probe on frozen features (imgrec.engine.transfer):
    ``model.probe``, by default when it starts from pretrained weights and its classifier is one linear layer
    (an MLP head, as VGG's, is fine-tuned as before); single-label data in memory only."""
    m = cfg.model
    linear = model is None or isinstance(getattr(model, "get_classifier", lambda: None)(), torch.nn.Linear)
    on = m.probe if m.probe is not None else bool(m.pretrained or m.weights) and linear
    return bool(on) and bundle.task != "multilabel" and hasattr(bundle.train, "images")


def _transfer_features(model, bundle: DataBundle, cfg: RunConfig, device, amp, channels_last: bool,
                       progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen backbone's features of the training and validation images (computed once, for the probe);
    a validation split carved at random is first held out again by groups of similar images
    (``transfer.grouped_split``) and recorded as files (``data.val_files``), so that it predicts accuracy on
    new photos and ``eval``, ``calibrate`` and the neighbours read the same split."""
    from imgrec.data.dataset import source_relative
    from imgrec.engine.transfer import extract_features, grouped_split
    if progress:
        print(f"transfer: computing the frozen backbone's features of {len(bundle.train) + len(bundle.val):,} "
              f"images", file=sys.stderr)
    kw = dict(device=device, amp=amp, channels_last=channels_last)
    z_tr = extract_features(model, bundle.train.images, bundle.mean, bundle.std, **kw)
    z_val = extract_features(model, bundle.val.images, bundle.mean, bundle.std, **kw)
    if not (bundle.val_carved and bundle.train.paths is not None and len(bundle.val)):
        return z_tr, z_val
    both = _union_in_source_order(bundle, cfg)
    if both is None:
        return z_tr, z_val
    order, data = both
    z = torch.cat([z_tr, z_val])[order]
    tr_idx, val_idx, groups = grouped_split(z, data.labels, len(bundle.val), seed=cfg.data.split_seed)
    if len(val_idx) == 0:
        return z_tr, z_val
    bundle.train, bundle.val = data.subset(tr_idx), data.subset(val_idx)
    k = len(bundle.classes)
    bundle.counts.update(train=class_counts(bundle.train.labels, k), val=class_counts(bundle.val.labels, k))
    cfg.data.val_files = [source_relative(p, cfg.data.data) for p in bundle.val.paths]
    if progress:
        print(f"transfer: validation held out by groups of similar images: {len(val_idx)} images in {groups} "
              f"groups", file=sys.stderr)
    return z[tr_idx], z[val_idx]


def _union_in_source_order(bundle: DataBundle, cfg: RunConfig):
    """(permutation, ImageData) of training and validation images together, in the source's listing order (the
    order a split given as files keeps: imgrec.data.dataset.split_by_files), or None when some image is not in
    the listing (then the random split stays)."""
    from imgrec.data.dataset import ImageData
    from imgrec.data.sources import list_source
    listing = list_source(cfg.data.data, data_dir=cfg.data.data_dir, splits=("train",), task=bundle.task)
    position = {str(p): i for i, p in enumerate(listing.splits["train"]["paths"])}
    paths = list(bundle.train.paths) + list(bundle.val.paths)
    if any(p not in position for p in paths):
        return None
    order = torch.tensor(sorted(range(len(paths)), key=lambda i: position[paths[i]]), dtype=torch.long)
    data = ImageData(torch.cat([bundle.train.images, bundle.val.images])[order],
                     torch.cat([bundle.train.labels, bundle.val.labels])[order], [paths[i] for i in order.tolist()])
    return order, data


def _probe_step(trainer: Trainer, bundle: DataBundle, cfg: RunConfig, meta: ModelMeta, amp, channels_last: bool,
                progress: bool, plain=None) -> None:
    """Fit the classifier on the frozen backbone's features; its weights become the run's best so far (what
    fine-tuning must beat on validation) and, when there are no epochs to train, the model."""
    from imgrec.engine.transfer import fit_probe
    t = cfg.train
    t0 = time.perf_counter()
    res = fit_probe(trainer.model, bundle.train.images, bundle.train.labels, bundle.val.images, bundle.val.labels,
                    bundle.mean, bundle.std, num_classes=len(bundle.classes), device=trainer.device, amp=amp,
                    flip=bundle.flip if t.flip is None else bool(t.flip), tta_flip=bool(t.tta_flip),
                    channels_last=channels_last, progress=progress, plain=plain)
    val = trainer.validate(trainer.val_loader) if len(bundle.val) else {"acc": 0.0, "loss": float("inf")}
    seconds = time.perf_counter() - t0
    trainer.train_time_s += seconds
    meta.training["transfer"] = {"method": "linear probe" + (", then fine-tuning" if t.epochs else ""),
                                 "weights": cfg.model.weights or ("pretrained" if cfg.model.pretrained else None),
                                 "l2": res.l2, "views": res.views, "features_s": round(res.features_s, 3),
                                 "fit_s": round(res.fit_s, 3), "grid": res.grid}
    logs = {"epoch": 0, "phase": "probe", "train_loss": None, "train_acc": None, "val_loss": val["loss"],
            "val_acc": val["acc"] if len(bundle.val) else None, "lr": None, "epoch_time_s": seconds,
            "images_per_s": len(bundle.train) * res.views / max(seconds, 1e-9)}
    trainer.set_baseline(logs, val)


def _run_meta(bundle: DataBundle, cfg: RunConfig, model_kwargs: dict, device, amp, weights) -> ModelMeta:
    """model.json's content before training, with the imbalance settings the run trains with."""
    t = cfg.train
    meta = model_meta(bundle, cfg, model_kwargs, device, amp)
    if weights is not None or t.sampler != "shuffle" or t.logit_adjust_loss:
        meta.training["imbalance"] = {"sampler": t.sampler, "class_weights": None if weights is None else
                                      dict(zip(bundle.classes, [round(float(w), 6) for w in weights]))}
        if t.reweight_from or t.logit_adjust_loss:
            meta.training["imbalance"].update(reweight_from=t.reweight_from, logit_adjust_loss=t.logit_adjust_loss)
    return meta


def _meta_writer(out: Path, meta: ModelMeta):
    """The one writer of model.json during a run: the trainer calls it when it saves weights, and the steps
    after training with the numbers they add."""
    def on_save(tr: Trainer, test_metrics: dict | None = None) -> None:
        best = tr.history[tr.best_epoch] if tr.best_epoch >= 0 else (tr.baseline or {})
        meta.metrics = {"best_epoch": tr.best_epoch + 1, "val_acc": best.get("val_acc"),
                        "val_loss": best.get("val_loss"), "epochs_run": len(tr.history), **(test_metrics or {})}
        if best.get("val_balanced_acc") is not None:
            meta.metrics.update(val_balanced_acc=best["val_balanced_acc"], val_macro_f1=best["val_macro_f1"])
        meta.train_time_s = round(tr.train_time_s, 3)
        write_meta(out, meta)
    return on_save


def _run_callbacks(cfg: RunConfig, rd: RunDir, bundle: DataBundle, main: bool, progress: bool) -> list:
    """imgrec's own callbacks: progress, the CSV log, guard rails, early stopping, the time budget, TensorBoard."""
    t = cfg.train
    callbacks = [ProgressBar(enabled=progress)] + ([CSVLogger(rd.metrics)] if main else [])
    callbacks.append(GuardRails(len(bundle.classes), len(bundle.val), bundle.task, enabled=progress))
    if t.patience:
        callbacks.append(EarlyStopping(t.patience))
    if t.time_budget:
        # the new length is recorded at once, so that --resume continues the same schedule
        callbacks.append(TimeBudget(t.time_budget, enabled=progress, on_change=lambda tr: main and atomic_write_text(
            rd.config, cfg.to_yaml())))
    if main and tensorboard_enabled(t.tensorboard):
        callbacks.append(TensorBoardLogger(rd.tensorboard))
    return callbacks


def _resume(trainer: Trainer, cfg: RunConfig, rd: RunDir, ctx, main: bool, progress: bool) -> bool:
    """Continue from the checkpoint; True when the run was already finished (nothing left to do)."""
    t, out = cfg.train, rd.path
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
        return True
    if progress:
        print(f"resuming {out} at epoch {trainer.epoch + 1}, step {trainer.start_step}", file=sys.stderr)
    if main and (trainer.resume_note or ctx.world_size > 1):
        # never silently different: what the run continues with on this number of processes
        per = t.batch_size / ctx.world_size
        print(f"resuming on {ctx.world_size} process{'es' if ctx.world_size > 1 else ''}: global batch "
              f"{t.batch_size} ({per:g} per process), learning rate {t.lr:g} at its peak, "
              f"{trainer.optimizer.param_groups[0]['lr']:.4g} at the next step"
              + (f" ({trainer.resume_note})" if trainer.resume_note else ""), file=sys.stderr)
    return False


def _choose_on_validation(summary: dict, out: Path, bundle: DataBundle, meta: ModelMeta, device, t,
                          save, progress: bool) -> dict:
    """What is chosen on the validation split after training, in order, each saved to model.json: the logit
    adjustment, the temperature (on the logits predict will use), the "unknown" score (read through the
    temperature), a multi-label model's thresholds. Returns the multi-label validation numbers (or {})."""
    single = bundle.task != "multilabel"
    if str(t.logit_adjust).lower() == "auto" and single:
        summary["logit_adjust_tau"] = choose_logit_adjust(out, bundle, meta, device, t.amp)
        save()
    unknown = t.unknown and single and len(bundle.val) and hasattr(bundle.train, "images")
    shared = None  # the validation split's forward pass, once for the temperature and the "unknown" score
    if t.calibrate and single and len(bundle.val):
        # a multi-label model is skipped: its per-label sigmoids and thresholds would need one T per label; a
        # validation split streamed from shards (too big for memory) is not held here, so none is fitted then
        if unknown and len(bundle.val) >= MIN_UNKNOWN_VAL:
            shared = validation_pass(out, bundle, device, t.amp)
        summary["temperature"] = choose_temperature(out, bundle, meta, device, t.amp, shared)
        save()
    if unknown:
        # the statistics come from training images, the threshold from the validation images, never the test split
        if len(bundle.val) < MIN_UNKNOWN_VAL:
            if progress:
                print(f"note: {len(bundle.val)} validation images are too few to choose an \"unknown\" threshold "
                      f"(at least {MIN_UNKNOWN_VAL}); this model always names one of its classes", file=sys.stderr)
        else:
            threshold = choose_unknown(out, bundle, meta, device, t.amp, t.accept_rate, shared)
            if threshold is not None:
                summary["unknown_threshold"] = threshold
                save()
    if single:
        return {}
    extra = choose_val_thresholds(out, bundle, meta, device, t.amp)
    summary.update(task="multilabel", **extra)
    save(extra)
    return extra


def _final_test(summary: dict, out: Path, bundle: DataBundle, device, amp: str, save, extra: dict) -> None:
    """The test split, looked at once, at the end, with the best-on-validation weights, through the same
    evaluation as `imgrec eval`."""
    from imgrec.eval.evaluate import evaluate
    from imgrec.infer.predictor import Classifier
    clf = Classifier.load(out, device=str(device), amp=amp)
    res = evaluate(clf, bundle.test.images, bundle.test.labels).metrics
    if bundle.task == "multilabel":
        test = {f"test_{k}": res[k] for k in ("map_macro", "map_micro", "f1_macro", "hamming_loss")}
        test["test_acc"] = res["exact_match"]  # exact-match ratio (subset accuracy)
        summary.update(test_n=res["n"], **test)
        save({**extra, **test})
    else:
        summary.update(test_acc=res["top1"], test_top5=res.get("top5"), test_n=res["n"],
                       test_macro_f1=res["macro_f1"], test_balanced_acc=res["balanced_acc"])
        save({"test_acc": res["top1"], "test_top5": res.get("top5"), "test_macro_f1": res["macro_f1"],
              "test_balanced_acc": res["balanced_acc"]})


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
