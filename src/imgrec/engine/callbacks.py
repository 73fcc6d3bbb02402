"""Training hooks (Keras-style no-op methods) and the standard callbacks: progress, CSV log, TensorBoard event
files, early stopping."""
from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path

from imgrec.config import TENSORBOARD_MISSING
from imgrec.errors import ConfigError
from imgrec.safeio import atomic_write_text


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"  # an epoch that was not validated (--val-last)


class Callback:
    """Override what you need. ``trainer.stop_training = True`` ends training after the current epoch."""

    def on_train_begin(self, trainer) -> None: ...
    def on_epoch_begin(self, trainer, epoch: int) -> None: ...

    def on_batch_end(self, trainer, step: int, loss, correct, n: int) -> None:
        """``loss`` (batch mean) and ``correct`` (count) are 0-dim tensors on the training device: reading them
        (``float(loss)``) waits for a GPU, so do it only as often as you need."""

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None: ...
    def on_train_end(self, trainer) -> None: ...


class ProgressBar(Callback):
    """A tqdm bar per epoch with running loss, accuracy and images/s (on stderr)."""

    def __init__(self, every: int = 10, enabled: bool = True):
        self.every, self.enabled = every, enabled
        self.bar = None

    def on_epoch_begin(self, trainer, epoch):
        # the live bar only on a terminal; logs (CI, `make demo > log`) get the one line per epoch below
        if not self.enabled or not sys.stderr.isatty():
            return
        from tqdm import tqdm
        self.bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.start_step, leave=False, file=sys.stderr,
                        desc=f"epoch {epoch + 1}/{trainer.cfg.epochs}", unit="batch", dynamic_ncols=True)
        self.t0, self.seen, self.loss_sum, self.correct = time.perf_counter(), 0, 0.0, 0

    def on_batch_end(self, trainer, step, loss, correct, n):
        if self.bar is None:
            return
        self.seen += n
        self.loss_sum = self.loss_sum + loss.float() * n  # stays on the device until shown
        self.correct = self.correct + correct
        self.bar.update(1)
        if step % self.every == 0 or step == trainer.steps_per_epoch - 1:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(loss=f"{float(self.loss_sum) / self.seen:.4f}",
                                 acc=f"{int(self.correct) / self.seen:.4f}", img_s=f"{self.seen / dt:.0f}",
                                 refresh=False)

    def on_epoch_end(self, trainer, epoch, logs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            print(f"epoch {epoch + 1:>3}/{trainer.cfg.epochs}  train_loss {logs['train_loss']:.4f}  "
                  f"train_acc {logs['train_acc']:.4f}  val_loss {_fmt(logs['val_loss'])}  val_acc {_fmt(logs['val_acc'])}  "
                  f"lr {logs['lr']:.2e}  {logs['images_per_s']:.0f} img/s  {logs['epoch_time_s']:.1f}s",
                  file=sys.stderr)


class CSVLogger(Callback):
    """Rewrites ``metrics.csv`` (atomically) from the trainer's history at every epoch end."""

    FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "images_per_s")
    logs_baseline = True  # also the row of weights fitted before the first epoch (Trainer.set_baseline): epoch 0

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_epoch_end(self, trainer, epoch, logs):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        rows = ([trainer.baseline] if getattr(trainer, "baseline", None) else []) + list(trainer.history)
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v) for k, v in row.items()})
        atomic_write_text(self.path, buf.getvalue())


def tensorboard_enabled(setting: str | bool) -> bool:
    """Whether to write TensorBoard event files: ``auto`` when the tensorboard package imports, ``on`` always
    (a ConfigError naming the pip extra when it does not import), ``off`` never. YAML's bare on/off are bools."""
    if setting is False or setting == "off":
        return False
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - only whether it imports
    except ImportError:
        if setting is True or setting == "on":
            raise ConfigError(TENSORBOARD_MISSING) from None
        return False
    return True


class TensorBoardLogger(Callback):
    """Per-epoch scalars as TensorBoard event files in ``log_dir``, the step being the epoch number as in
    metrics.csv: train/loss, train/acc, val/loss, val/acc (left out for epochs not validated), lr, images_per_s,
    epoch_time_s. ``tensorboard --logdir runs`` then shows every run under runs/."""

    TAGS = {"train/loss": "train_loss", "train/acc": "train_acc", "val/loss": "val_loss", "val/acc": "val_acc",
            "lr": "lr", "images_per_s": "images_per_s", "epoch_time_s": "epoch_time_s"}

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.writer = None

    def on_train_begin(self, trainer):
        from torch.utils.tensorboard import SummaryWriter
        if trainer.epoch == 0:
            # a new run (or --overwrite) starts from nothing: curves of an earlier run in this folder would
            # otherwise be drawn into the new run's
            for old in self.log_dir.glob("events.out.tfevents.*"):
                old.unlink(missing_ok=True)
        # a resumed run appends a new event file to the same folder. purge_step hides what an interrupted attempt
        # wrote for the epochs about to run again (written at the epoch end, before its checkpoint was)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=trainer.epoch + 1)

    def on_epoch_end(self, trainer, epoch, logs):
        if self.writer is None:
            return
        for tag, key in self.TAGS.items():
            if logs.get(key) is not None:
                self.writer.add_scalar(tag, float(logs[key]), global_step=logs["epoch"])
        # at once rather than every 2 minutes: a running TensorBoard shows the epoch, and Ctrl-C loses nothing
        self.writer.flush()

    def on_train_end(self, trainer):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class EarlyStopping(Callback):
    """Stop when validation accuracy has not improved for ``patience`` epochs."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, trainer, epoch, logs):
        if logs["val_acc"] is not None and epoch - trainer.best_epoch >= self.patience:
            print(f"early stopping: no val_acc improvement for {self.patience} epochs", file=sys.stderr)
            trainer.stop_training = True


class GuardRails(Callback):
    """Warnings a user can act on, where the run cannot learn well: too few optimizer steps an epoch or in all,
    validation skipped (and why), and a best validation accuracy near chance at the end."""

    MIN_STEPS_PER_EPOCH = 4
    MIN_STEPS = 100

    def __init__(self, num_classes: int, val_images: int, task: str = "classification", enabled: bool = True):
        self.k, self.n_val, self.task, self.enabled = int(num_classes), max(1, int(val_images)), task, enabled

    def _say(self, text: str) -> None:
        if self.enabled:
            print(f"imgrec: warning: {text}", file=sys.stderr)

    def on_train_begin(self, trainer):
        if trainer.epoch or not trainer.cfg.epochs:  # resumed: said when the run started; no epochs: a probe
            return
        spe, cfg = trainer.steps_per_epoch, trainer.cfg
        total = spe * cfg.epochs
        if spe < self.MIN_STEPS_PER_EPOCH:
            self._say(f"{spe} optimizer step{'s' * (spe != 1)} an epoch (batch {cfg.batch_size}): too few to learn "
                      f"from; a smaller --batch-size gives more")
        elif total < self.MIN_STEPS:
            self._say(f"{total} optimizer steps in all ({spe} an epoch × {cfg.epochs} epochs): short for a model "
                      f"trained from scratch; more --epochs or a smaller --batch-size give more")
        if cfg.val_last and cfg.val_last < cfg.epochs and self.enabled:
            # not a warning: the fast recipes skip early validation on purpose (their last epoch was the best
            # in every measured run), but a "-" in the log must not look like a failure
            print(f"validating only the last {cfg.val_last} of {cfg.epochs} epochs (--val-last {cfg.val_last}; "
                  f"--val-last 0 validates every epoch)", file=sys.stderr)

    def on_train_end(self, trainer):
        if self.task != "classification" or (trainer.best_epoch < 0 and not trainer.baseline) or self.k < 2:
            return
        chance, best = 1.0 / self.k, trainer.best_acc
        halfway = (1 + chance) / 2  # at least halfway from a guess to perfect is never "near chance"
        # near chance: within two standard errors of a guess, or less than a tenth of the way to perfect
        margin = max(2 * math.sqrt(chance * (1 - chance) / self.n_val), 0.1 * (1 - chance))
        if best >= halfway:
            return
        if chance + margin >= halfway:  # two standard errors reach halfway: the split cannot tell learning from luck
            self._say(f"too few validation images to judge ({self.n_val} for {self.k} classes): the best validation "
                      f"accuracy {best:.3f} (chance {chance:.3f}) says little; hold out more with --val-split")
        elif best <= chance + margin:
            self._say(f"the best validation accuracy {best:.3f} is near chance ({chance:.3f} for "
                      f"{self.k} classes): the model has not learned. Try more --epochs, a smaller --batch-size or "
                      f"--lr, or check the labels (imgrec data check)")


class TimeBudget(Callback):
    """``--time-budget``: after the first epoch, the run's length is set from its measured speed so that training
    ends within ``seconds`` (the learning-rate schedule is rebuilt for the new length, so it still anneals); if
    later epochs run slower, training stops cleanly at an epoch end, keeping the best weights so far."""

    def __init__(self, seconds: float, enabled: bool = True, on_change=None):
        self.budget, self.enabled, self.on_change = float(seconds), enabled, on_change
        self.t0 = None

    def on_train_begin(self, trainer):
        self.t0 = time.perf_counter() - float(trainer.train_time_s or 0.0)

    def on_epoch_end(self, trainer, epoch, logs):
        elapsed = time.perf_counter() - self.t0
        per_epoch = elapsed / max(1, len(trainer.history))
        if epoch == 0 and len(trainer.history) == 1:
            fits = max(1, int(self.budget // max(per_epoch, 1e-9)))
            if fits < trainer.cfg.epochs:
                if self.enabled:
                    print(f"time budget {self.budget:g}s: an epoch takes {per_epoch:.1f}s, so {fits} epochs "
                          f"instead of {trainer.cfg.epochs}", file=sys.stderr)
                trainer.set_epochs(fits)
                if self.on_change is not None:
                    self.on_change(trainer)
        elif elapsed + per_epoch > self.budget * 1.05 and trainer.epoch < trainer.cfg.epochs:
            if self.enabled:
                print(f"time budget {self.budget:g}s reached after {elapsed:.0f}s: stopping with the best weights "
                      f"(epoch {trainer.best_epoch + 1})", file=sys.stderr)
            trainer.stop_training = True
