"""Exactly one training step, and the loop around it (fit / validate / checkpoint / resume)."""
from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from imgrec.config import TrainConfig
from imgrec.engine import distributed
from imgrec.engine.callbacks import Callback
from imgrec.engine.checkpoint import load_checkpoint, save_checkpoint, write_weights
from imgrec.engine.losses import build_loss, count_correct, eval_loss, set_class_weights
from imgrec.errors import ModelFileError
from imgrec.infer.runtime import autocast, forward_logits
from imgrec.modeldir import RunDir


@contextlib.contextmanager
def _ctrl_c_after_the_step():
    """Ctrl-C during one step is taken when the step and its bookkeeping are done: a KeyboardInterrupt between
    the scheduler's step and the count of finished steps would leave a checkpoint one step out of line with its
    schedule (its resume then steps the one-cycle schedule past its end). A second Ctrl-C stops at once. Only in
    the main thread and under Python's own SIGINT handler (several processes have their own: StopRequest)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []

    def later(signum, frame):
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)

    signal.signal(signal.SIGINT, later)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# torch.optim.Optimizer's add_param_group, zero_grad, state_dict and load_state_dict are wrapped so that
# torch.compile never traces them; the wrapper imports torch._dynamo on its first call, which is 0.9-1.1 s of a
# 30-40 s default training command (measured on a 2-core Zen 5). Outside torch.compile the wrapper only calls the
# method, so a run that compiles nothing gives each wrapper its own method as the cached "disabled" version. A
# torch whose wrappers differ is left as it is (the import then happens as before). torch's own SGD and Adam
# steps import torch._dynamo anyway, so SGD runs step with imgrec's ConvMuon (SGD groups only).
_DYNAMO_WRAPPED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def _optimizer_without_dynamo_import() -> None:
    if "torch._dynamo" in sys.modules:
        return
    for name in _DYNAMO_WRAPPED:
        fn = getattr(getattr(torch.optim.Optimizer, name, None), "__wrapped__", None)
        if fn is not None and getattr(fn, "__dynamo_disable", None) is None:
            setattr(fn, "__dynamo_disable", fn)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weights (≥2-D), none on biases and norm parameters, as is standard."""
    if not cfg.compile:
        _optimizer_without_dynamo_import()
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "muon":
        from imgrec.engine.muon import ConvMuon, muon_groups
        return ConvMuon(muon_groups(model, cfg.weight_decay, cfg.muon_lr, cfg.lr), lr=cfg.lr,
                        momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        # torch.optim.SGD's update (Nesterov where there is momentum, coupled weight decay; tests/test_muon.py
        # checks they agree, and that torch SGD's checkpoints resume into it) without the import of torch._dynamo
        # its step makes on the first call: 0.9 s of a 9 s default run on a 400-image folder (2-core Zen 5)
        from imgrec.engine.muon import ConvMuon
        return ConvMuon([{**g, "muon": False} for g in groups], lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warm = max(1, int(cfg.warmup * total_steps)) if cfg.warmup > 0 else 0
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(  # each group's own peak (Muon's filters have theirs)
            opt, max_lr=[g.get("peak_lr", cfg.lr) for g in opt.param_groups], total_steps=max(total_steps, 2),
            pct_start=min(max(cfg.warmup, 0.01), 0.99),
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


def _best_metric(cfg: TrainConfig, task: str) -> str:
    """The validation number that picks the best epoch: cfg.best_metric, where "auto" is balanced accuracy when
    an imbalance option is on (the run asks for the rare classes to count) and accuracy otherwise."""
    metric = getattr(cfg, "best_metric", "auto")
    if task == "multilabel":
        return "acc"
    if metric != "auto":
        return metric
    imbalance = str(cfg.class_weights or "none").lower() != "none" or cfg.sampler == "balanced" or cfg.logit_adjust
    imbalance = imbalance or bool(getattr(cfg, "logit_adjust_loss", 0.0))
    return "balanced_acc" if imbalance else "acc"


class _AgreedStop(KeyboardInterrupt):
    """Several processes: all ranks stop after the same step (SIGINT/SIGTERM); the checkpoint is written."""


class Trainer:
    """Trains ``model`` on ``train_loader`` and selects the best epoch on ``val_loader`` (never the test split)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_loader, val_loader, *, device: torch.device,
                 amp: torch.dtype | None, channels_last: bool = False, run_dir: str | Path | None = None,
                 callbacks: Sequence[Callback] = (), on_save: Callable[["Trainer"], None] | None = None,
                 task: str = "classification", class_weights: torch.Tensor | None = None,
                 logit_bias: torch.Tensor | None = None, train_prior=None):
        self.cfg, self.device, self.amp = cfg, device, amp
        self.task = task  # "classification" or "multilabel" (imgrec.engine.losses)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.model = self._place_model(model, channels_last)
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
        self._set_loss(class_weights, logit_bias, train_prior)
        module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            module = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = torch.compile(module) if cfg.compile else module
        self._reset_progress()

    def _place_model(self, model: nn.Module, channels_last: bool) -> nn.Module:
        """The model on the device, in its memory format, with synchronised BatchNorm when asked for."""
        model = model.to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        # several processes (torchrun): every rank runs this trainer on its share of each global batch, DDP
        # averages the gradients, and rank 0 alone writes files (two writers could interleave one checkpoint)
        self.world = distributed.world_size()
        self.is_writer = distributed.is_main()
        if getattr(self.cfg, "sync_bn", False) and self.world > 1:
            distributed.check_sync_bn(True, self.device, self.world)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state-dict keys
        return model

    def _set_loss(self, class_weights, logit_bias, train_prior) -> None:
        cfg = self.cfg
        # deferred re-weighting (cfg.reweight_from, Cao et al. 2019): the class weights apply from epoch
        # reweight_epoch on (0-based); _run_epoch switches them by the epoch, so a resumed run does the same
        self.class_weights = class_weights
        self.reweight_epoch = math.ceil(float(getattr(cfg, "reweight_from", 0.0) or 0.0) * cfg.epochs - 1e-9)
        # train_prior (training class frequencies) with cfg.logit_adjust_loss: the logit-adjusted loss
        self.loss_fn = build_loss(self.task, cfg.label_smoothing,
                                  class_weights if self.reweight_epoch <= 0 else None, logit_prior=train_prior,
                                  logit_tau=float(getattr(cfg, "logit_adjust_loss", 0.0) or 0.0)).to(self.device)
        # post-hoc logit adjustment (cfg.logit_adjust): validation sees the logits prediction will produce, so
        # the best epoch is chosen for the adjusted model (imgrec.infer.runtime.forward_logits adds the same bias)
        self.logit_bias = logit_bias
        self.best_metric = _best_metric(cfg, self.task)

    def _reset_progress(self) -> None:
        """Where training stands: nothing run yet."""
        self.best_score = -math.inf  # the best epoch's validation best_metric
        self.epoch = 0            # the epoch in progress (0-based)
        self.start_step = 0       # first step of self.epoch still to run (non-zero after a mid-epoch resume)
        self.history: list[dict] = []
        self.best_acc, self.best_loss, self.best_epoch = -1.0, math.inf, -1
        self.baseline: dict | None = None  # the weights before the first epoch, when they were fitted (set_baseline)
        self.stop_training = False
        self.partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}
        self._pending_loss, self._pending_correct = 0.0, 0  # device-side sums not yet in partial
        self._pending_seen = 0        # several processes: images this rank trained on since the last flush
        self._stop: distributed.StopRequest | None = None  # several processes: SIGINT/SIGTERM seen during fit
        self._torn_step = False  # a step stopped between its optimizer step and its count (a second Ctrl-C)
        self._stop_agreed = False     # … and the ranks agreed at the last flush to stop after this step
        self.resume_note: str | None = None  # what a resume on another number of processes changed (printed)
        self.train_time_s = 0.0
        self.last_lr = self.cfg.lr

    # -- the one step --------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   loss_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward, (clip), optimizer and scheduler step, EMA update.

        Returns (mean loss, number correct) as 0-dim tensors on the device: turning them into Python numbers
        here would make the host wait for a GPU at every step, so the loop reads them once per log interval.
        ``loss_scale`` (several processes): this rank's share of the global batch times the number of ranks,
        so that DDP's average of the ranks' gradients is the gradient of the global batch's mean loss even
        when the shares differ in size (1 when they are equal).
        """
        self.model.train()
        with autocast(self.device, self.amp):
            logits = self.forward(x)
            loss = self.loss_fn(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss if loss_scale == 1.0 else loss * loss_scale).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self._torn_step = True  # the weights change from here until the loop counts this step
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used (for the log)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        with torch.no_grad():
            correct = count_correct(self.task, logits, y)
        return loss.detach(), correct

    def _flush(self, step: int, collective: bool = True) -> None:
        """Add the device-side running sums into ``partial`` (one host-device sync); check for divergence.

        On several processes the sums are added over all ranks (``collective``: every rank calls this at the
        same steps), so ``partial`` and the logs describe the global batches, as in one process."""
        loss_sum, correct = float(self._pending_loss), int(self._pending_correct)
        self._pending_loss, self._pending_correct = 0.0, 0
        if self.world > 1:
            loss_sum, correct = self._sum_over_ranks(loss_sum, correct, collective)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training diverged at epoch {self.epoch + 1}, by step {step} "
                                     f"(loss {loss_sum}); try a lower --lr")
        self.partial["loss_sum"] += loss_sum
        self.partial["correct"] += correct

    def _sum_over_ranks(self, loss_sum: float, correct: int, collective: bool) -> tuple[float, int]:
        # the stop flag rides on the same all-reduce: every rank learns at the same step that one of them got
        # SIGINT/SIGTERM (see distributed.StopRequest); a NaN loss reaches every rank too, so all stop together
        stop = float(self._stop is not None and self._stop.requested)
        sums = torch.tensor([loss_sum, float(correct), float(self._pending_seen), stop], dtype=torch.float64,
                            device=self.device)
        if collective:
            distributed.all_reduce_sum(sums)
        loss_sum, correct_f, seen, stops = sums.tolist()
        self.partial["seen"] += int(round(seen))
        self._pending_seen = 0
        self._stop_agreed = collective and stops > 0
        return loss_sum, int(round(correct_f))

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def validate(self, loader, model: nn.Module | None = None) -> dict:
        """Loss and accuracy on ``loader`` (the validation split) with the evaluated weights, as the model
        directory will predict (test-time flip included); also the logits and labels."""
        model = model or self.eval_model
        if self.world > 1:
            # each rank's forward passes updated its own BatchNorm statistics (and EMA buffers): evaluate rank
            # 0's copy everywhere, the one the weights files and the checkpoint hold
            distributed.broadcast_state(model)
        was = model.training
        model.eval()
        outs, ys = [], []
        for x, y in loader:
            outs.append(forward_logits(model, x, tta_flip=self.cfg.tta_flip, amp=self.amp,
                                       logit_bias=self.logit_bias).cpu())
            ys.append(y.cpu())
        logits, labels = torch.cat(outs), torch.cat(ys)
        if getattr(loader, "world_size", 1) > 1:
            # each rank evaluated its own contiguous slice (no padding, no duplicates): gather the slices in
            # rank order, so every rank computes the metrics of the whole split exactly as one process would
            logits = distributed.all_gather_cat(logits, self.device)
            labels = distributed.all_gather_cat(labels, self.device)
        model.train(was)
        loss = eval_loss(self.task, logits, labels)
        acc = (count_correct(self.task, logits, labels).float() / max(len(labels), 1)).item() \
            if self.task == "multilabel" else (logits.argmax(1) == labels).float().mean().item()
        out = {"loss": loss, "acc": acc, "logits": logits, "labels": labels}
        if self.task != "multilabel":
            # for imbalanced data accuracy hides the rare classes; these can choose the best epoch instead
            from imgrec.eval.metrics import balanced_accuracy, confusion_matrix, per_class_prf
            cm = confusion_matrix(logits.argmax(1), labels, logits.shape[1])
            f1 = per_class_prf(cm)["f1"]
            out.update(balanced_acc=balanced_accuracy(cm), macro_f1=sum(f1) / max(len(f1), 1))
        return out

    def set_baseline(self, logs: dict, val: dict) -> None:
        """The model's weights before the first epoch count as the best so far (``best_epoch`` -1, shown as
        epoch 0): a linear probe's head on a pretrained backbone, which fine-tuning must beat on validation to
        replace. Writes them as the best and last weights and model.json, as an epoch end does."""
        self.baseline = dict(logs)
        self.best_acc, self.best_loss, self.best_epoch = val["acc"], val["loss"], -1
        self.best_score = val.get(self.best_metric, val["acc"])
        if self.run_dir is not None and self.is_writer:
            write_weights(self.run_dir, "last", self.eval_model)
            write_weights(self.run_dir, "best", self.eval_model)
            for cb in self.callbacks:
                if getattr(cb, "logs_baseline", False):
                    cb.on_epoch_end(self, -1, self.baseline)
            if self.on_save is not None:
                self.on_save(self)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        for cb in self.callbacks:
            cb.on_train_begin(self)
        # several processes: SIGINT/SIGTERM only set a flag, and the ranks stop together at a step boundary
        stop = distributed.StopRequest() if self.world > 1 else contextlib.nullcontext()
        try:
            with stop as self._stop:
                while self.epoch < self.cfg.epochs and not self.stop_training:
                    self._run_epoch()
        except KeyboardInterrupt as e:
            # Ctrl-C: keep what was done so far as a resumable checkpoint, then let the caller exit
            # (not after a step stopped halfway: the last checkpoint written stays the one to resume from)
            if self.run_dir is not None and self.is_writer and not isinstance(e, _AgreedStop) \
                    and not self._torn_step:
                self.save_checkpoint()
            raise
        finally:
            self._stop = None
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.history

    def _run_epoch(self) -> None:
        epoch = self.epoch
        self.train_loader.set_epoch(epoch)
        if self.class_weights is not None and self.reweight_epoch > 0:
            set_class_weights(self.loss_fn, self.class_weights if epoch >= self.reweight_epoch else None)
        for cb in self.callbacks:
            cb.on_epoch_begin(self, epoch)
        self._end_epoch(epoch, self._train_steps())

    def _train_steps(self) -> float:
        """This epoch's steps from ``start_step`` on (a resumed epoch continues where it stopped), with the
        agreed stop of several processes and mid-epoch checkpoints; returns the epoch's training time."""
        p = self.partial
        t0 = time.perf_counter() - p["time"]
        ckpt_every = int(self.cfg.checkpoint_every or 0)
        # on a GPU, read the running sums every 25 steps only (each read waits for the device); on a CPU the
        # read costs nothing and a diverged loss is caught at the step it happens
        read_every = 1 if self.device.type == "cpu" else 25
        global_batch = getattr(self.train_loader, "global_batch", None)
        for step, (x, y) in enumerate(self.train_loader.iterate(self.start_step), start=self.start_step):
            n = int(y.shape[0])
            with _ctrl_c_after_the_step():
                if self.world > 1:
                    scale = n * self.world / global_batch(step) if global_batch is not None else 1.0
                    loss, correct = self.train_step(x, y, loss_scale=scale)
                    self._pending_seen += n
                else:
                    loss, correct = self.train_step(x, y)
                    p["seen"] += n
                self._pending_loss = self._pending_loss + loss.float() * n
                self._pending_correct = self._pending_correct + correct
                self.start_step = step + 1
                self._torn_step = False
            ckpt_due = bool(ckpt_every) and self.run_dir is not None and self.start_step % ckpt_every == 0 \
                and self.start_step < self.steps_per_epoch
            if self.start_step % read_every == 0 or (self.world > 1 and ckpt_due):
                self._flush(step)
                if self._stop_agreed:  # all ranks, after this same step
                    if self.run_dir is not None and self.is_writer:
                        self.save_checkpoint()
                    # the others wait for rank 0's checkpoint: torchrun stops every process once one has exited
                    distributed.barrier()
                    raise _AgreedStop
            p["time"] = time.perf_counter() - t0
            for cb in self.callbacks:
                cb.on_batch_end(self, step, loss, correct, n)
            if ckpt_due and self.is_writer:
                self.save_checkpoint()
        self._flush(self.start_step - 1)
        return time.perf_counter() - t0

    def _end_epoch(self, epoch: int, train_time: float) -> None:
        """Validate (unless --val-last skips this epoch), log, pick the best epoch, tell the callbacks, and
        write the weights, model.json and the checkpoint."""
        p = self.partial
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
        if val is not None and "balanced_acc" in val:
            logs.update(val_balanced_acc=val["balanced_acc"], val_macro_f1=val["macro_f1"])
        score = None if val is None else val.get(self.best_metric, val["acc"])
        improved = val is not None and (score, -val["loss"]) > (self.best_score, -self.best_loss)
        if improved:
            self.best_acc, self.best_loss, self.best_epoch = val["acc"], val["loss"], epoch
            self.best_score = score
        self.epoch, self.start_step = epoch + 1, 0
        self.partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}
        for cb in self.callbacks:
            cb.on_epoch_end(self, epoch, logs)
        if self.run_dir is not None and self.is_writer:
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
        # no collective here: after Ctrl-C rank 0 saves while the other ranks are leaving (on a stop the ranks
        # agreed on, the sums were just added over the ranks and nothing is pending)
        self._flush(self.start_step - 1, collective=False)
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
            "best_score": self.best_score, "baseline": self.baseline,
            "train_time_s": self.train_time_s, "rng": rng,
            # the number of processes and the global batch of the steps counted above (see load_state_dict)
            "world_size": self.world, "global_batch": int(self.cfg.batch_size),
            # a streamed loader's position (imgrec.data.stream.StreamLoader): LitData's own trainer integration
            # does not restore it, so the checkpoint carries it; the in-memory loader needs none (its batches
            # follow from seed, epoch and step)
            "loader": self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None,
        }

    def set_epochs(self, epochs: int) -> None:
        """Change the run's length now (``--time-budget``): the schedule is rebuilt for the new number of steps
        and continues from the step reached, as an extended ``--resume`` does."""
        import warnings
        done = self.epoch * self.steps_per_epoch + self.start_step
        self.cfg.epochs = int(epochs)
        self.total_steps = self.cfg.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(self.optimizer, self.cfg, self.total_steps)
        self.scheduler.last_epoch = done - 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
            self.scheduler.step()

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
        self.best_score = float(state.get("best_score", self.best_acc))  # older checkpoints chose by accuracy
        self.baseline = state.get("baseline")
        self.train_time_s = float(state.get("train_time_s", 0.0))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np_state = rng["numpy"]
        np.random.set_state(tuple(np_state) if isinstance(np_state, list) else np_state)
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if state.get("loader") is not None and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(state["loader"])
        self._remap_position(int(state.get("world_size", 1)), int(state.get("global_batch", self.cfg.batch_size)))

    def _remap_position(self, saved_world: int, saved_batch: int) -> None:
        """A checkpoint written by another number of processes: say what the run continues with.

        ``--batch-size`` is the global batch, so the optimisation (global batch, learning rate, schedule) is
        the same at any number of processes. A mid-epoch position carries over exactly when the loader's
        batches depend on (seed, epoch, step, global batch) only (``position_is_global``, the in-memory path)
        and the global batch is unchanged; otherwise the epoch restarts from its first batch, with a warning.
        """
        self.resume_note = None
        if saved_world == self.world and saved_batch == self.cfg.batch_size:
            return
        note = f"checkpoint written by {saved_world} process{'es' if saved_world > 1 else ''}"
        exact = getattr(self.train_loader, "position_is_global", False) and saved_batch == self.cfg.batch_size
        if self.start_step and not exact:
            import warnings
            skipped = self.start_step
            self.start_step = 0
            self.partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}
            self.scheduler.last_epoch = self.epoch * self.steps_per_epoch - 1  # back to the epoch's first step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.scheduler.step()
            note += (f"; WARNING: its position in epoch {self.epoch + 1} (step {skipped}) cannot be mapped to "
                     f"{self.world} process{'es' if self.world > 1 else ''} (global batch {saved_batch} → "
                     f"{self.cfg.batch_size}, or a loader that shards by itself): the epoch restarts from its "
                     "first batch")
        elif self.start_step:
            note += f"; the position in epoch {self.epoch + 1} (step {self.start_step}) maps exactly"
        self.resume_note = note

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.run_dir, self.state_dict())

    def resume(self, path: str | Path | None = None) -> None:
        path = Path(path) if path else RunDir(self.run_dir).checkpoint
        state = load_checkpoint(path)
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise ModelFileError(f"{path}: checkpoint does not match this run ({str(e).splitlines()[0][:200]})") from None
