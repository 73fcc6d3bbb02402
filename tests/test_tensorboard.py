"""TensorBoard event files written by a training run (imgrec.engine.callbacks.TensorBoardLogger): the scalars
are metrics.csv's numbers, one per epoch; `tensorboard: off` writes nothing; a resumed run appends."""
from __future__ import annotations

import csv
import sys

import pytest

from imgrec.config import RunConfig, validate
from imgrec.errors import ConfigError

pytest.importorskip("tensorboard")

TAGS = {"train/loss": "train_loss", "train/acc": "train_acc", "val/loss": "val_loss", "val/acc": "val_acc",
        "lr": "lr", "images_per_s": "images_per_s", "epoch_time_s": "epoch_time_s"}
TINY = {"name": "simple_cnn", "train_limit": 2000, "val_split": 500, "val_last": 0, "batch_size": 128,
        "lr": 3e-3, "calibrate": False, "unknown": False}


def _train(out, **overrides):
    from imgrec.engine.train import resolve_config, train
    cfg = resolve_config(None, None, {**TINY, **overrides})
    return train(cfg, out, progress=False, evaluate_test=False)


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_matches_csv(run_dir, epochs: int) -> None:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == epochs
    scalars = _scalars(run_dir / "tensorboard")
    assert set(scalars) == set(TAGS)
    for tag, column in TAGS.items():
        assert [step for step, _ in scalars[tag]] == list(range(1, epochs + 1)), tag
        # metrics.csv keeps 6 significant digits, the event file float32: relative 1e-5 covers both
        want = [float(r[column]) for r in rows]
        assert [v for _, v in scalars[tag]] == pytest.approx(want, rel=1e-5, abs=1e-5), tag


@pytest.mark.slow
def test_event_files_hold_metrics_csv_per_epoch_and_a_resume_appends(tmp_path):
    out = tmp_path / "runs" / "fm-tb"
    _train(out, epochs=2)
    _assert_matches_csv(out, 2)
    # a resumed run (extended by one epoch) writes a second event file into the same folder
    from imgrec.engine.train import train
    train(RunConfig(), out, resume=True, extend_epochs=3, progress=False, evaluate_test=False)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    _assert_matches_csv(out, 3)


def test_tensorboard_off_writes_no_folder(tmp_path):
    out = tmp_path / "fm-off"
    _train(out, epochs=1, train_limit=500, val_split=100, tensorboard="off")
    assert (out / "metrics.csv").is_file() and not (out / "tensorboard").exists()


def test_the_setting_is_checked_and_yaml_booleans_read_as_on_off():
    cfg = RunConfig()
    cfg.update({"tensorboard": False})  # what YAML makes of `tensorboard: off`
    validate(cfg)
    assert cfg.train.tensorboard == "off"
    cfg.update({"tensorboard": "sometimes"})
    with pytest.raises(ConfigError, match="tensorboard must be auto, on or off"):
        validate(cfg)


def test_on_without_the_package_is_one_line_naming_the_extra(monkeypatch):
    from imgrec.engine.callbacks import tensorboard_enabled
    # as where the package is not installed: `import tensorboard` raises, find_spec finds nothing
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = RunConfig()
    cfg.update({"tensorboard": "on"})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "pip install 'imgrec[tensorboard]'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"imgrec\[tensorboard\]"):
        tensorboard_enabled("on")  # a resumed run whose config says on: refused where the callback is built
    assert tensorboard_enabled("auto") is False and tensorboard_enabled("off") is False


def test_the_cli_flag_sets_the_config_key():
    from imgrec.cli import build_parser
    from imgrec.cli.train import train_options
    parse = lambda *a: build_parser().parse_args(["train", *a]).tensorboard  # noqa: E731
    assert (parse(), parse("--tensorboard"), parse("--no-tensorboard")) == (None, True, False)
    assert train_options(set(vars(build_parser().parse_args(["train"]))))["tensorboard"] == "tensorboard"
