"""Training hooks (Keras-style no-op methods) and the standard callbacks: progress, CSV log, early stopping."""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

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

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_epoch_end(self, trainer, epoch, logs):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in trainer.history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v) for k, v in row.items()})
        atomic_write_text(self.path, buf.getvalue())


class EarlyStopping(Callback):
    """Stop when validation accuracy has not improved for ``patience`` epochs."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, trainer, epoch, logs):
        if logs["val_acc"] is not None and epoch - trainer.best_epoch >= self.patience:
            print(f"early stopping: no val_acc improvement for {self.patience} epochs", file=sys.stderr)
            trainer.stop_training = True
