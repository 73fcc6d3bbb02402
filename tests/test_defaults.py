"""Good by default on data like users' own: a small folder of mixed sizes, colour, with junk files, trained with
no options beyond ``--data``; the recipe chosen from the data; guard rails; run folders; the audit's refusal."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, run_cli
from imgrec.data.probe import DataProbe, probe_source, probe_tensor
from imgrec.engine.recipes import LARGE_DATA, adapt_to_data, get_recipe

# three Fashion-MNIST classes a small model tells apart well: Trouser, Bag, Sneaker
CLASSES = {"trouser": 1, "bag": 8, "sneaker": 7}


def user_folder(root: Path, fmnist, per_class: int, test_per_class: int = 0, seed: int = 0) -> Path:
    """A folder as users bring one: real images at mixed sizes (20-150 px, some not square), PNG and JPEG,
    half of them tinted colour on a coloured background, plus junk (.ipynb_checkpoints/, ._x.jpg, .DS_Store)."""
    x, y, xt, yt = fmnist
    rng = np.random.default_rng(seed)

    def write(split_root: Path, xs, ys, n):
        for name, c in CLASSES.items():
            d = split_root / name
            d.mkdir(parents=True, exist_ok=True)
            for i in rng.permutation(np.nonzero(ys == c)[0])[:n]:
                side = int(rng.integers(20, 150))
                w = int(side * rng.uniform(0.75, 1.33))
                g = np.asarray(Image.fromarray(xs[i]).resize((w, side), Image.BILINEAR), dtype=np.float32) / 255
                if rng.random() < 0.5:
                    tint, bg = rng.uniform(0.4, 1, 3), rng.uniform(0, 0.4, 3)
                    im = Image.fromarray(((g[..., None] * tint + (1 - g[..., None]) * bg) * 255).astype(np.uint8))
                else:
                    im = Image.fromarray((g * 255).astype(np.uint8))
                if i % 2:
                    im.save(d / f"{i}.jpg", quality=90)
                else:
                    im.save(d / f"{i}.png")
    write(root / "train", x, y, per_class)
    if test_per_class:
        write(root / "test", xt, yt, test_per_class)
    first = root / "train" / "bag"
    (first / ".ipynb_checkpoints").mkdir()
    Image.fromarray(x[0]).save(first / ".ipynb_checkpoints" / "copy.png")  # a T-shirt: would be a wrong label
    (first / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # macOS AppleDouble: not an image
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


def test_a_small_user_folder_trains_well_with_no_options(tmp_path, fmnist_arrays):
    data = user_folder(tmp_path / "photos", fmnist_arrays, per_class=40, test_per_class=40)
    r = run_cli("train", "--data", data, "--out", tmp_path / "run", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["test_acc"] >= 0.8, summary  # chance is 1/3; the Fashion-MNIST recipe reached chance here
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    chosen = meta["training"]["data_recipe"]
    assert "108 training images" in chosen["reason"] and "validating every epoch" in chosen["reason"]
    cfg = meta["config"]["train"]
    assert cfg["batch_size"] <= 32 and cfg["val_last"] == 0 and cfg["epochs"] * (108 // cfg["batch_size"]) >= 200
    assert meta["channels"] == 3 and meta["image_size"] == 64  # colour photos, median side above 40 px
    assert meta["data"]["image_sizes"]["max_side"] >= 100 and meta["data"]["image_sizes"]["channels_seen"] == 3
    # the junk was skipped, not trained on and not an unreadable image that stops the run
    assert sum(meta["data"]["counts"]["train"]) + sum(meta["data"]["counts"]["val"]) == 120


def test_the_recipe_line_says_what_was_chosen_and_why(tmp_path, fmnist_arrays):
    data = user_folder(tmp_path / "photos", fmnist_arrays, per_class=20)
    r = run_cli("train", "--data", data, "--out", tmp_path / "run", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("recipe fast-") and "54 training images, 3 classes, colour" in first
    assert "batch 16" in first and "1 epochs" in first  # --epochs given: kept as given
    assert "trained from scratch: no pretrained backbone on this machine" in first  # tests run offline


def test_fashion_mnist_keeps_the_measured_recipe():
    from imgrec.engine.train import resolve_config
    cfg = resolve_config(None, None, {})
    recipe = get_recipe(cfg.recipe)
    t = cfg.train
    assert (t.batch_size, t.lr, t.epochs, t.val_last, t.crop_padding) == (
        recipe["batch_size"], recipe["lr"], recipe["epochs"], recipe["val_last"], recipe["crop_padding"])
    assert cfg.data.image_size is None and cfg.data_recipe["changes"] == {}


@pytest.mark.parametrize("n", [60, 300, 1500, 6000, 15000])
def test_small_data_gets_enough_steps_and_validation(n):
    probe = DataProbe("folder", n, 5, [n // 5] * 5, 3, 40, 90, 300)
    base = {**get_recipe("fast-bf16"), "image_size": None}
    changes, reason = adapt_to_data(probe, base, set())
    batch, epochs = changes["batch_size"], changes.get("epochs", base["epochs"])  # a change only where it differs
    steps = max(1, -(-n // batch)) if n < 4 * batch else n // batch
    assert 16 <= batch <= 512 and steps >= 3 and steps * epochs >= 200
    assert changes["val_last"] == 0 and changes["image_size"] == 64
    assert 0 < changes.get("lr", base["lr"]) <= base["lr"] and "validating every epoch" in reason
    assert base["flip_order"] == "alternate" and changes["flip_order"] == "random"  # as small data was measured


def test_large_small_image_data_is_left_alone_and_explicit_settings_win():
    probe = DataProbe("folder", LARGE_DATA, 10, [], 1, 28, 28, 28)
    assert adapt_to_data(probe, get_recipe("fast-bf16"), set())[0] == {}
    small = probe_tensor(500, 10, 1, 32)
    changes, _ = adapt_to_data(small, {**get_recipe("fast-bf16"), "image_size": 32}, {"batch_size", "epochs"})
    assert "batch_size" not in changes and "epochs" not in changes and "image_size" not in changes
    assert "flip_order" not in adapt_to_data(small, get_recipe("fast-bf16"), {"flip_order"})[0]


def test_guard_rails_speak(tmp_path, fmnist_arrays):
    data = user_folder(tmp_path / "photos", fmnist_arrays, per_class=40)  # 12 val images (6: too few)
    r = run_cli("train", "--data", data, "--out", tmp_path / "run", "--model", "simple_cnn", "--batch-size", "256",
                "--epochs", "3", "--val-last", "1", "--lr", "1e-6")
    assert r.returncode == 0, r.stderr
    assert "optimizer step an epoch (batch 256): too few to learn from" in r.stderr
    assert "validating only the last 1 of 3 epochs (--val-last 1" in r.stderr
    assert "is near chance (0.333 for 3 classes)" in r.stderr


def test_a_failed_start_leaves_no_run_folder_and_the_next_run_takes_the_name(tmp_path):
    r = run_cli("train", "--data", tmp_path / "no-such-folder", "--model", "simple_cnn", cwd=tmp_path)
    assert_clean_error(r, "no such dataset")
    assert not (tmp_path / "runs" / "no-such-folder-simple_cnn").exists()
    (tmp_path / "runs" / "photos-simple_cnn").mkdir(parents=True)  # an empty folder (an older failed start)
    from imgrec.modeldir import default_run_dir
    assert default_run_dir("photos", "simple_cnn", tmp_path / "runs") == tmp_path / "runs" / "photos-simple_cnn"


def test_resume_shows_the_run_and_a_finished_run_says_so(tmp_path, fmnist_arrays):
    data = user_folder(tmp_path / "photos", fmnist_arrays, per_class=10)
    run = tmp_path / "mine"
    r = run_cli("train", "--data", data, "--model", "simple_cnn", "--epochs", "2", "--out", run)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--resume", "--out", run)
    assert r.returncode == 0, r.stderr
    assert f"resuming simple_cnn on {data} → {run}" in r.stderr
    assert "the run is finished (2 of 2 epochs)" in r.stderr and "best val_acc" in r.stdout


def test_time_budget_sets_the_length_from_the_first_epoch(monkeypatch):
    """With a clock this test controls: a 10 s budget and 3 s epochs → 3 epochs, the schedule rebuilt for them;
    a later slow epoch stops training at its end."""
    from imgrec.config import TrainConfig
    from imgrec.engine import callbacks
    from imgrec.engine.trainer import build_scheduler
    clock = [100.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])

    class FakeTrainer:
        def __init__(self):
            self.cfg = TrainConfig(epochs=20, lr=0.1, optimizer="sgd")
            self.steps_per_epoch, self.train_time_s, self.history = 5, 0.0, []
            self.epoch = self.start_step = 0
            self.best_epoch, self.stop_training = 0, False
            self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            self.scheduler = build_scheduler(self.optimizer, self.cfg, 100)

        from imgrec.engine.trainer import Trainer
        set_epochs = Trainer.set_epochs

    tr, changed = FakeTrainer(), []
    cb = callbacks.TimeBudget(10, enabled=False, on_change=changed.append)
    cb.on_train_begin(tr)
    clock[0] += 3.0
    tr.history.append({}); tr.epoch = 1
    cb.on_epoch_end(tr, 0, {})
    assert tr.cfg.epochs == 3 and tr.total_steps == 15 and changed == [tr]
    assert tr.scheduler.total_steps == 15 and tr.scheduler.last_epoch == 5
    clock[0] += 6.0  # the second epoch took twice as long: a third would overrun the budget
    tr.history.append({}); tr.epoch = 2
    cb.on_epoch_end(tr, 1, {})
    assert tr.stop_training


def test_audit_refuses_to_rank_when_its_fold_models_are_weak(tmp_path, fmnist_arrays):
    """Random labels: no model can beat the majority guess out of sample, so no ranking is reported."""
    x = fmnist_arrays[0]
    rng = np.random.default_rng(0)
    for i in range(90):
        d = tmp_path / "noise" / f"c{rng.integers(0, 3)}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(d / f"{i}.png")
    r = run_cli("data", "audit", tmp_path / "noise", "--folds", "3", "--epochs", "2", "--model", "simple_cnn")
    assert_clean_error(r, "not ranking label errors", "always guessing the largest class", "--force")


def test_audit_judges_folds_against_chance_and_each_other():
    from imgrec.engine.audit import judge_folds
    labels = np.array([0] * 50 + [1] * 50)
    good = np.eye(2)[labels] * 0.8 + 0.1
    assert judge_folds(good, labels, [{"held_out_acc": 1.0}, {"held_out_acc": 0.95}])["weak"] is None
    guess = np.tile([0.6, 0.4], (100, 1))
    assert "skill" in judge_folds(guess, labels, [{"held_out_acc": 0.5}])["weak"]
    apart = judge_folds(good, labels, [{"held_out_acc": 1.0}, {"held_out_acc": 0.6}])
    assert "disagree" in apart["weak"]


def test_probe_reads_headers_only_and_skips_junk(tmp_path, fmnist_arrays):
    data = user_folder(tmp_path / "photos", fmnist_arrays, per_class=10)
    p = probe_source(str(data))
    assert p.kind == "folder" and p.num_classes == 3 and sum(p.counts) == 30 and p.channels == 3
    assert 20 <= p.min_side <= p.median_side <= p.max_side < 150 and p.sampled == 30


@pytest.mark.parametrize("k,n_val,best,said", [
    (2, 4, 1.0, None),              # 4 images at 100%: not "near chance"
    (2, 4, 0.5, "too few validation images to judge"),
    (3, 6, 0.5, "too few validation images to judge"),
    (10, 5000, 0.55, None),         # at least halfway from chance to perfect
    (10, 5000, 0.12, "is near chance (0.100 for 10 classes)"),
    (3, 12, 0.33, "is near chance (0.333 for 3 classes)"),
])
def test_guard_rails_near_chance_only_when_the_split_can_tell(k, n_val, best, said, capsys):
    from types import SimpleNamespace

    from imgrec.engine.callbacks import GuardRails
    GuardRails(k, n_val).on_train_end(SimpleNamespace(best_acc=best, best_epoch=2, baseline=None))
    err = capsys.readouterr().err
    assert (said in err) if said else err == "", err
    assert not ("near chance" in err and "too few" in err)
