"""``imgrec train`` as a library call: data → model → Trainer → run directory, then the final test number."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from imgrec.config import RunConfig, load_yaml, validate
from imgrec.data.dataset import DataBundle, load_data
from imgrec.data.memory import BatchLoader
from imgrec.device import cpu_has_fast_bf16, pick_device, set_threads, usable_cores
from imgrec.engine.callbacks import CSVLogger, EarlyStopping, ProgressBar
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
                   model_given: bool = False) -> RunConfig:
    """Defaults ← recipe ← config file ← command line.

    Without a recipe and without a model (``--model`` or the config file's), the recipe is chosen for this
    machine (``auto_recipe``); ``cfg.recipe_reason`` says why, and ``imgrec train`` prints it.
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
    if recipe is not None:
        cfg.update(get_recipe(recipe), source=f"recipe {recipe}")
        cfg.recipe, cfg.recipe_reason = recipe, reason
    cfg.update(file_cfg, source=str(config_file))
    cfg.update(overrides, source="command line")
    validate(cfg)
    from imgrec.models import model_info
    model_info(cfg.model.name)  # an unknown name fails now, listing the choices
    return cfg


def build_loaders(bundle: DataBundle, cfg: RunConfig, device: torch.device, channels_last: bool):
    t = cfg.train
    pad = t.crop_padding if t.crop_padding is not None else max(1, bundle.image_size // 14)
    flip = bundle.flip if t.flip is None else t.flip
    n = len(bundle.train)
    train = BatchLoader(bundle.train, t.batch_size, bundle.mean, bundle.std, shuffle=True, crop_padding=pad,
                        flip=flip, drop_last=n >= 4 * t.batch_size, seed=t.seed, device=device,
                        channels_last=channels_last)
    val = BatchLoader(bundle.val, t.eval_batch_size, bundle.mean, bundle.std, device=device,
                      channels_last=channels_last)
    return train, val


def model_meta(bundle: DataBundle, cfg: RunConfig, model_kwargs: dict, device: torch.device,
               amp: torch.dtype | None) -> ModelMeta:
    """What the model directory records about this run (metrics are added as training goes)."""
    return ModelMeta(
        model={"name": cfg.model.name, "kwargs": model_kwargs},
        classes=list(bundle.classes), image_size=bundle.image_size, channels=bundle.channels,
        mean=list(bundle.mean), std=list(bundle.std),
        inference={"tta_flip": bool(cfg.train.tta_flip)},
        training={"recipe": cfg.recipe, "recipe_reason": cfg.recipe_reason, "device": str(device),
                  "precision": "fp32" if amp is None else str(amp).removeprefix("torch."),
                  "channels_last": cfg.train.channels_last, "compile": bool(cfg.train.compile)},
        data={"name": bundle.name, "source": cfg.data.data, "counts": bundle.counts,
              "val_split": cfg.data.val_split, "split_seed": cfg.data.split_seed},
        config=cfg.to_dict(),
    )


def train(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, evaluate_test: bool = True, extend_epochs: int | None = None) -> dict:
    """Train per ``cfg`` into run directory ``out``; returns a summary (best val accuracy, test accuracy, times).

    With ``resume`` the run's saved config.yaml governs and ``cfg`` is ignored, except that
    ``extend_epochs`` may raise the number of epochs of a run (a finished one included).
    """
    t_start = time.perf_counter()
    out = Path(out)
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
        for f in rd.run_files():
            f.unlink(missing_ok=True)
    check_writable(out, need_bytes=64 << 20)
    for stale in out.glob(".*.tmp"):  # temporary files left by a crash mid-write; the real files are intact
        stale.unlink(missing_ok=True)

    t = cfg.train
    set_threads(t.threads)
    seed_everything(t.seed, t.deterministic)
    device = pick_device(t.device)
    amp = resolve_amp(t.amp, device, cfg.model.name)

    d = cfg.data
    bundle = load_data(d.data, image_size=d.image_size, channels=d.channels, val_split=d.val_split,
                       split_seed=d.split_seed, data_dir=d.data_dir, on_bad_image=d.on_bad_image, progress=progress)
    d.image_size, d.channels = bundle.image_size, bundle.channels
    if d.train_limit:
        bundle.train = bundle.train.subset(torch.arange(min(int(d.train_limit), len(bundle.train))))
        bundle.counts["train"] = torch.bincount(bundle.train.labels, minlength=len(bundle.classes)).tolist()

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

    train_loader, val_loader = build_loaders(bundle, cfg, device, channels_last)
    meta = model_meta(bundle, cfg, model_kwargs, device, amp)

    def on_save(tr: Trainer, test_metrics: dict | None = None) -> None:
        best = tr.history[tr.best_epoch] if tr.best_epoch >= 0 else {}
        meta.metrics = {"best_epoch": tr.best_epoch + 1, "val_acc": best.get("val_acc"),
                        "val_loss": best.get("val_loss"), "epochs_run": len(tr.history), **(test_metrics or {})}
        meta.train_time_s = round(tr.train_time_s, 3)
        write_meta(out, meta)

    callbacks = [ProgressBar(enabled=progress), CSVLogger(rd.metrics)]
    if t.patience:
        callbacks.append(EarlyStopping(t.patience))
    trainer = Trainer(model, t, train_loader, val_loader, device=device, amp=amp, channels_last=channels_last,
                      run_dir=out, callbacks=callbacks, on_save=on_save)
    if resume and has_checkpoint:
        trainer.resume()
        atomic_write_text(rd.config, cfg.to_yaml())  # records an extended --epochs
        if progress:
            print(f"resuming {out} at epoch {trainer.epoch + 1}, step {trainer.start_step}", file=sys.stderr)
    else:
        atomic_write_text(rd.config, cfg.to_yaml())
    trainer.fit()

    summary = {"run": str(out), "model": cfg.model.name, "recipe": cfg.recipe, "epochs_run": len(trainer.history),
               "best_epoch": trainer.best_epoch + 1, "val_acc": trainer.best_acc, "train_time_s": trainer.train_time_s}
    if evaluate_test and bundle.test is not None:
        # the test split is looked at once, at the end, with the best-on-validation weights, through the same
        # evaluation as `imgrec eval`
        from imgrec.eval.evaluate import evaluate
        from imgrec.infer.predictor import Classifier
        clf = Classifier.load(out, device=str(device), amp=t.amp)
        res = evaluate(clf, bundle.test.images, bundle.test.labels).metrics
        summary.update(test_acc=res["top1"], test_top5=res["top5"], test_n=res["n"])
        on_save(trainer, {"test_acc": res["top1"], "test_top5": res["top5"]})
    summary["wall_time_s"] = time.perf_counter() - t_start
    return summary


