"""Training for real on Fashion-MNIST subsets: learning, run directory, resume, determinism, early stopping."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from imgrec.config import RunConfig
from imgrec.engine.train import resolve_config, train
from imgrec.errors import ConfigError
from imgrec.safeio import load_weights


def small_cfg(**kw):
    base = {"name": "simple_cnn", "epochs": 2, "train_limit": 3000, "val_split": 1000, "batch_size": 100,
            "lr": 3e-3, "eval_batch_size": 1000}
    base.update(kw)
    return resolve_config(None, None, base)


def test_trained_run_beats_chance_and_writes_run_dir(trained_run):
    out, summary = trained_run
    assert summary["test_acc"] > 0.70, summary  # chance is 0.10
    assert summary["val_acc"] > 0.70
    meta = json.loads((out / "model.json").read_text())
    assert meta["model"]["name"] == "simple_cnn" and meta["classes"][7] == "Sneaker"
    assert meta["image_size"] == 28 and meta["channels"] == 1 and len(meta["mean"]) == 1
    assert meta["metrics"]["test_acc"] == pytest.approx(summary["test_acc"])
    assert meta["imgrec_version"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "val_loss", "val_acc", "lr", "images_per_s"} <= set(rows[0])
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["name"] == "simple_cnn" and cfg["train"]["epochs"] == 2
    for f in ("best.safetensors", "last.safetensors", "checkpoint.safetensors"):
        assert (out / f).stat().st_size > 0
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind


@pytest.mark.slow
def test_resume_extends_a_finished_run(tmp_path):
    b = tmp_path / "b"
    train(small_cfg(epochs=1, deterministic=True, train_limit=1000), b, progress=False, evaluate_test=False)
    # resuming with more epochs picks up at epoch 2 with optimizer/scheduler/RNG state restored;
    # the schedule must be the 2-epoch one, so run b was configured for 1 epoch: extend it
    cfg_b = RunConfig.from_dict(yaml.safe_load((b / "config.yaml").read_text()))
    assert cfg_b.train.epochs == 1
    s = train(small_cfg(epochs=5), b, resume=True, progress=False, evaluate_test=False, extend_epochs=2)
    assert s["epochs_run"] == 2
    rows = list(csv.DictReader((b / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert yaml.safe_load((b / "config.yaml").read_text())["train"]["epochs"] == 2


@pytest.mark.slow
def test_mid_epoch_resume_equals_uninterrupted(tmp_path):
    """Interrupt after 7 steps (as Ctrl-C does), resume, and end with the same weights."""
    from imgrec.engine import trainer as trainer_mod

    cfg = small_cfg(epochs=2, deterministic=True, train_limit=1200, val_split=300, ema=0.9)
    ref = tmp_path / "ref"
    train(cfg, ref, progress=False, evaluate_test=False)

    calls = {"n": 0}
    orig = trainer_mod.Trainer.train_step

    def flaky(self, x, y):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return orig(self, x, y)

    run = tmp_path / "run"
    trainer_mod.Trainer.train_step = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            train(small_cfg(epochs=2, deterministic=True, train_limit=1200, val_split=300, ema=0.9), run,
                  progress=False, evaluate_test=False)
    finally:
        trainer_mod.Trainer.train_step = orig
    assert (run / "checkpoint.safetensors").exists()
    train(cfg, run, resume=True, progress=False, evaluate_test=False)
    for f in ("last.safetensors", "best.safetensors"):
        wa, wb = load_weights(ref / f), load_weights(run / f)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_deterministic_same_seed_same_losses(tmp_path):
    losses = []
    for name in ("x", "y"):
        train(small_cfg(epochs=1, deterministic=True, train_limit=1000), tmp_path / name, progress=False,
              evaluate_test=False)
        losses.append((tmp_path / name / "metrics.csv").read_text())
    # epoch, train_loss, train_acc, val_loss, val_acc, lr: identical (only timings may differ)
    rows = [[r.split(",")[:6] for r in text.splitlines()] for text in losses]
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_existing_run_needs_resume_or_overwrite(tmp_path, trained_run):
    out, _ = trained_run
    with pytest.raises(ConfigError, match="already holds a run"):
        train(small_cfg(), out, progress=False)


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(small_cfg(), tmp_path / "none", resume=True)
    # stopped before the first checkpoint: --resume starts over with the saved config
    from imgrec.config import RunConfig
    (tmp_path / "early").mkdir()
    cfg = small_cfg(epochs=1, train_limit=300, val_split=100)
    (tmp_path / "early" / "config.yaml").write_text(cfg.to_yaml())
    s = train(small_cfg(epochs=9), tmp_path / "early", resume=True, progress=False, evaluate_test=False)
    assert s["epochs_run"] == 1


@pytest.mark.slow
def test_early_stopping(tmp_path, monkeypatch):
    from imgrec.engine.trainer import Trainer
    orig = Trainer.validate

    def flat(self, loader, model=None):  # validation never improves after the first epoch
        r = orig(self, loader, model)
        r["acc"], r["loss"] = 0.5, 1.0
        return r

    monkeypatch.setattr(Trainer, "validate", flat)
    s = train(small_cfg(epochs=6, patience=2, train_limit=300, val_split=100), tmp_path / "es", progress=False,
              evaluate_test=False)
    assert s["epochs_run"] == 3 and s["best_epoch"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("opt,sched", [("sgd", "cosine"), ("adam", "linear"), ("adamw", "none")])
def test_optimizers_and_schedulers_learn(tmp_path, opt, sched):
    lr = {"sgd": 0.05, "adam": 2e-3, "adamw": 2e-3}[opt]
    s = train(small_cfg(epochs=1, optimizer=opt, scheduler=sched, lr=lr, train_limit=2000, label_smoothing=0.0),
              tmp_path / opt, progress=False, evaluate_test=False)
    assert s["val_acc"] > 0.5


def test_config_precedence_and_unknown_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 7\n  lr: 0.5\nmodel:\n  name: lenet5\n")
    cfg = resolve_config(None, str(f), {"lr": 0.01})
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.01 and cfg.model.name == "lenet5"
    with pytest.raises(ConfigError, match="unknown setting"):
        resolve_config(None, None, {"learning_rate": 1})
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        resolve_config(None, None, {"optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match="unknown recipe"):
        resolve_config("turbo", None, {})


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    """The running loss is read from the device in intervals (not every step on a GPU); a NaN still ends the run
    with one line naming the epoch, and what was saved before stays loadable."""
    cfg = small_cfg(epochs=1, train_limit=600, val_split=200, optimizer="sgd", lr=1e12, scheduler="none",
                    warmup=0.0)
    with pytest.raises(FloatingPointError, match=r"diverged at epoch 1, by step \d+ .*lower --lr"):
        train(cfg, tmp_path / "nan", progress=False, evaluate_test=False)
    assert not (tmp_path / "nan" / "best.safetensors").exists()  # nothing half-trained was published as "best"


@pytest.mark.slow
def test_val_last_validates_only_the_last_epochs(tmp_path):
    s = train(small_cfg(epochs=3, val_last=1, patience=1), tmp_path / "vl", progress=False, evaluate_test=False)
    rows = list(csv.DictReader((tmp_path / "vl" / "metrics.csv").open()))
    assert [r["val_acc"] == "" for r in rows] == [True, True, False]  # and patience did not stop it early
    assert s["best_epoch"] == 3 and s["epochs_run"] == 3 and s["val_acc"] == pytest.approx(float(rows[2]["val_acc"]))
    meta = json.loads((tmp_path / "vl" / "model.json").read_text())
    assert meta["metrics"]["best_epoch"] == 3 and (tmp_path / "vl" / "best.safetensors").exists()


# -- one resolution of the settings for the command line and the Python API (issue 36) -----------------------
def _cli_config(monkeypatch, *args):
    """The RunConfig ``imgrec train ARGS`` hands to the engine (the training itself is replaced by a stub)."""
    import imgrec.engine.train as engine_train
    from conftest import run_cli
    seen = []

    def fake_train(cfg, out, **kw):
        seen.append(cfg)
        return {"val_acc": 0.0, "best_epoch": 0}

    monkeypatch.setattr(engine_train, "train", fake_train)
    r = run_cli("train", *args, "--json")
    assert r.returncode == 0 and len(seen) == 1, r.stderr
    return seen[0]


@pytest.fixture(scope="module")
def tiny_folder(fmnist_arrays, tmp_path_factory):
    from conftest import write_image_folder
    x, y, _, _ = fmnist_arrays
    return write_image_folder(tmp_path_factory.mktemp("tiny") / "shoes", x, y, ["a", "b", "c"], per_class=8)


@pytest.mark.parametrize("case", ["readme", "folder_model", "folder_default", "recipe", "config_file"])
def test_the_python_api_resolves_as_the_command_line(case, monkeypatch, tiny_folder, tmp_path):
    """The README's Python example (``resolve_config(None, None, {"name": "resnet18", "epochs": 5})``) gets what
    ``imgrec train --model resnet18 --epochs 5`` gets — the defaults for a named model, not the machine's recipe
    for its own network — and so do a folder with and without a model, a named recipe and a config file."""
    folder = str(tiny_folder)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  name: simple_cnn\ntrain:\n  lr: 0.01\n")
    api, cli = {
        "readme": (((None, None, {"name": "resnet18", "epochs": 5}), ("--model", "resnet18", "--epochs", "5"))),
        "folder_model": ((None, None, {"data": folder, "name": "simple_cnn", "lr": 0.01}),
                         ("--data", folder, "--model", "simple_cnn", "--lr", "0.01")),
        "folder_default": ((None, None, {"data": folder}), ("--data", folder)),
        "recipe": (("fast-fp32", None, {"data": folder}), ("--recipe", "fast-fp32", "--data", folder)),
        "config_file": ((None, str(cfg_file), {"data": folder}), ("--config", str(cfg_file), "--data", folder)),
    }[case]
    from_api = resolve_config(*api)
    from_cli = _cli_config(monkeypatch, *cli, "--out", str(tmp_path / "run"))
    assert from_api.to_dict() == from_cli.to_dict()
    assert (from_api.recipe, from_api.recipe_reason, from_api.data_recipe) == (
        from_cli.recipe, from_cli.recipe_reason, from_cli.data_recipe)
    if case in ("readme", "folder_model", "config_file"):  # a model named: no machine recipe on top of it
        assert from_api.recipe is None and from_api.train.optimizer != "muon"
    if case == "readme":
        assert (from_api.model.name, from_api.train.epochs) == ("resnet18", 5)
    if case == "recipe":  # a named recipe is taken as it is
        assert from_api.recipe == "fast-fp32" and from_api.data_recipe is None
