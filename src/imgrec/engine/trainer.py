"""Exactly one training step, and the loop around it (fit / validate / checkpoint / resume)."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from imgrec.config import TrainConfig
from imgrec.engine.callbacks import Callback
from imgrec.engine.checkpoint import load_checkpoint, save_checkpoint, write_weights
from imgrec.errors import ModelFileError
from imgrec.infer.runtime import autocast, forward_logits
from imgrec.modeldir import RunDir


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weights (≥2-D), none on biases and norm parameters, as is standard."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warm = max(1, int(cfg.warmup * total_steps)) if cfg.warmup > 0 else 0
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=max(total_steps, 2), pct_start=min(max(cfg.warmup, 0.01), 0.99),
            anneal_strategy="linear", div_factor=25.0, final_div_factor=1e3, cycle_momentum=False)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "none":
            return 1.0
        t = (step - warm) / max(1, total_steps - warm)
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return max(0.0, 1.0 - t)  # linear

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Trainer:
    """Trains ``model`` on ``train_loader`` and selects the best epoch on ``val_loader`` (never the test split)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_loader, val_loader, *, device: torch.device,
                 amp: torch.dtype | None, channels_last: bool = False, run_dir: str | Path | None = None,
                 callbacks: Sequence[Callback] = (), on_save: Callable[["Trainer"], None] | None = None):
        self.cfg, self.device, self.amp = cfg, device, amp
        self.train_loader, self.val_loader = train_loader, val_loader
        self.model = model.to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.run_dir = Path(run_dir) if run_dir else None
        self.callbacks = list(callbacks)
        self.on_save = on_save
        self.steps_per_epoch = len(train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a pass-through)
        self.scaler = torch.amp.GradScaler(device.type, enabled=(amp == torch.float16))
        self.ema = None
        if cfg.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.epoch = 0            # the epoch in progress (0-based)
        self.start_step = 0       # first step of self.epoch still to run (non-zero after a mid-epoch resume)
        self.history: list[dict] = []
        self.best_acc, self.best_loss, self.best_epoch = -1.0, math.inf, -1
        self.stop_training = False
        self.partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}
        self._pending_loss, self._pending_correct = 0.0, 0  # device-side sums not yet in partial
        self.train_time_s = 0.0
        self.last_lr = cfg.lr

    # -- the one step --------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward, (clip), optimizer and scheduler step, EMA update.

        Returns (mean loss, number correct) as 0-dim tensors on the device: turning them into Python numbers
        here would make the host wait for a GPU at every step, so the loop reads them once per log interval.
        """
        self.model.train()
        with autocast(self.device, self.amp):
            logits = self.forward(x)
            loss = self.loss_fn(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used (for the log)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum()
        return loss.detach(), correct

    def _flush(self, step: int) -> None:
        """Add the device-side running sums into ``partial`` (one host-device sync); check for divergence."""
        loss_sum, correct = float(self._pending_loss), int(self._pending_correct)
        self._pending_loss, self._pending_correct = 0.0, 0
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training diverged at epoch {self.epoch + 1}, by step {step} "
                                     f"(loss {loss_sum}); try a lower --lr")
        self.partial["loss_sum"] += loss_sum
        self.partial["correct"] += correct

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def validate(self, loader, model: nn.Module | None = None) -> dict:
        """Loss and accuracy on ``loader`` (the validation split) with the evaluated weights, as the model
        directory will predict (test-time flip included); also the logits and labels."""
        model = model or self.eval_model
        was = model.training
        model.eval()
        outs, ys = [], []
        for x, y in loader:
            outs.append(forward_logits(model, x, tta_flip=self.cfg.tta_flip, amp=self.amp).cpu())
            ys.append(y.cpu())
        logits, labels = torch.cat(outs), torch.cat(ys)
        model.train(was)
        loss = nn.functional.cross_entropy(logits, labels).item()
        return {"loss": loss, "acc": (logits.argmax(1) == labels).float().mean().item(), "logits": logits,
                "labels": labels}

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        for cb in self.callbacks:
            cb.on_train_begin(self)
        try:
            while self.epoch < self.cfg.epochs and not self.stop_training:
                self._run_epoch()
        except KeyboardInterrupt:
            # Ctrl-C: keep what was done so far as a resumable checkpoint, then let the caller exit
            if self.run_dir is not None:
                self.save_checkpoint()
            raise
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.history

    def _run_epoch(self) -> None:
        epoch = self.epoch
        self.train_loader.set_epoch(epoch)
        for cb in self.callbacks:
            cb.on_epoch_begin(self, epoch)
        p = self.partial
        t0 = time.perf_counter() - p["time"]
        ckpt_every = int(self.cfg.checkpoint_every or 0)
        # on a GPU, read the running sums every 25 steps only (each read waits for the device); on a CPU the
        # read costs nothing and a diverged loss is caught at the step it happens
        read_every = 1 if self.device.type == "cpu" else 25
        for step, (x, y) in enumerate(self.train_loader.iterate(self.start_step), start=self.start_step):
            loss, correct = self.train_step(x, y)
            n = int(y.shape[0])
            self._pending_loss = self._pending_loss + loss.float() * n
            self._pending_correct = self._pending_correct + correct
            p["seen"] += n
            self.start_step = step + 1
            if self.start_step % read_every == 0:
                self._flush(step)
            p["time"] = time.perf_counter() - t0
            for cb in self.callbacks:
                cb.on_batch_end(self, step, loss, correct, n)
            if ckpt_every and self.run_dir is not None and self.start_step % ckpt_every == 0 \
                    and self.start_step < self.steps_per_epoch:
                self.save_checkpoint()
        self._flush(self.start_step - 1)
        train_time = time.perf_counter() - t0
        # --val-last N: only the last N epochs are validated (and can be "best"); in short one-cycle runs the
        # last epoch was the best in every measured run, and each validation pass costs ~1 % of the run
        skip_val = bool(self.cfg.val_last) and epoch < self.cfg.epochs - int(self.cfg.val_last)
        val = None if skip_val else self.validate(self.val_loader)
        logs = {"epoch": epoch + 1, "train_loss": p["loss_sum"] / max(p["seen"], 1),
                "train_acc": p["correct"] / max(p["seen"], 1),
                "val_loss": None if val is None else val["loss"], "val_acc": None if val is None else val["acc"],
                "lr": self.last_lr, "epoch_time_s": train_time,
                "images_per_s": p["seen"] / max(train_time, 1e-9)}
        self.train_time_s += train_time
        self.history.append(logs)
        improved = val is not None and (val["acc"], -val["loss"]) > (self.best_acc, -self.best_loss)
        if improved:
            self.best_acc, self.best_loss, self.best_epoch = val["acc"], val["loss"], epoch
        self.epoch, self.start_step = epoch + 1, 0
        self.partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}
        for cb in self.callbacks:
            cb.on_epoch_end(self, epoch, logs)
        if self.run_dir is not None:
            # weights first, then metadata, then the checkpoint: a crash between them leaves an older but
            # consistent checkpoint, and resuming from it rewrites the same files
            write_weights(self.run_dir, "last", self.eval_model)
            if improved:
                write_weights(self.run_dir, "best", self.eval_model)
            if self.on_save is not None:
                self.on_save(self)
            self.save_checkpoint()

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self._flush(self.start_step - 1)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "start_step": self.start_step, "partial": dict(self.partial),
            "total_steps": self.total_steps,
            "history": self.history, "best": [self.best_acc, self.best_loss, self.best_epoch],
            "train_time_s": self.train_time_s, "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        done = int(state["epoch"]) * self.steps_per_epoch + int(state["start_step"])
        if int(state.get("total_steps", self.total_steps)) == self.total_steps:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            # the run was extended (--resume with more --epochs): follow the new schedule from where we are
            import warnings
            self.scheduler.last_epoch = done - 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
                self.scheduler.step()
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ModelFileError("checkpoint has no EMA state but this run uses --ema")
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.start_step = int(state["epoch"]), int(state["start_step"])
        self.partial = dict(state["partial"])
        self.history = list(state["history"])
        self.best_acc, self.best_loss, self.best_epoch = state["best"]
        self.best_epoch = int(self.best_epoch)
        self.train_time_s = float(state.get("train_time_s", 0.0))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np_state = rng["numpy"]
        np.random.set_state(tuple(np_state) if isinstance(np_state, list) else np_state)
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.run_dir, self.state_dict())

    def resume(self, path: str | Path | None = None) -> None:
        path = Path(path) if path else RunDir(self.run_dir).checkpoint
        state = load_checkpoint(path)
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise ModelFileError(f"{path}: checkpoint does not match this run ({str(e).splitlines()[0][:200]})") from None
