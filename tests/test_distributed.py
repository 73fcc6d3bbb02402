"""Several processes (torchrun, DDP, gloo on the CPU, 127.0.0.1 only): the same numbers as one process, every
validation image counted once, rank 0 the only writer, and resuming on another number of processes.

Why the tolerance is tight: the in-memory loader makes the same global batches (and crops and flips) at any
number of processes and DDP averages the ranks' gradients, so a 2-process run differs from a 1-process run
with the same global batch only in the order floating-point sums are taken (each rank sums its half of the
batch, gloo adds the halves). In fp32 that was 3e-8 on the weights after one step and 2e-6 after the 24
AdamW steps of these runs, with identical metrics to 6 digits; the assertions allow 50× that on the weights
and one validation image (a near-tie could flip). bf16 autocast (``--amp auto`` on CPUs with AMX) rounds
each matrix product to 8 bits, where the batch split shows at 1e-3 — so these runs use ``--amp none``.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import assert_clean_error, run_cli, run_cli_process
from imgrec.data.dataset import ImageData
from imgrec.data.memory import BatchLoader
from imgrec.engine.train import resolve_config, train
from imgrec.errors import ConfigError
from imgrec.safeio import load_tree, load_weights

ARGS = {"name": "simple_cnn", "epochs": 2, "train_limit": 1200, "val_split": 310, "batch_size": 100, "lr": 3e-3,
        "eval_batch_size": 1000, "deterministic": True, "amp": "none"}
CLI = ["train", "--model", "simple_cnn", "--epochs", "2", "--train-limit", "1200", "--val-split", "310",
       "--batch-size", "100", "--lr", "3e-3", "--eval-batch-size", "1000", "--deterministic", "--amp", "none"]
N_VAL = 310
WEIGHT_TOL = 1e-4

# Loaded into every process of a run (PYTHONPATH): logs each file write under the run directory per rank,
# and can send rank 0 a signal right after its first checkpoint write (a deterministic "kill" moment).
SITECUSTOMIZE = '''
import builtins, os
_run, _log, _rank = os.environ.get("T_RUN_DIR"), os.environ.get("T_WRITE_LOG"), os.environ.get("RANK")
if _run and _log and _rank is not None:
    _open, _os_open, _replace, _unlink = builtins.open, os.open, os.replace, os.unlink
    _sig, _sent = os.environ.get("T_SIGNAL_RANK0"), []

    def _note(op, path):
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(_run):
            with _open(f"{_log}.{_rank}", "a") as f:
                f.write(f"{op} {os.fsdecode(path)}\\n")

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            _note("open", file)
        return _open(file, mode, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            _note("os.open", path)
        return _os_open(path, flags, *a, **k)

    def replace(src, dst, *a, **k):
        _note("replace", dst)
        r = _replace(src, dst, *a, **k)
        if _sig and _rank == "0" and not _sent and os.path.basename(os.fsdecode(dst)) == "checkpoint.safetensors":
            _sent.append(1)
            os.kill(os.getpid(), int(_sig))
        return r

    def unlink(path, *a, **k):
        _note("unlink", path)
        return _unlink(path, *a, **k)

    builtins.open, os.open, os.replace, os.unlink = open_, os_open, replace, unlink
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, run, signal_rank0: int | None = None) -> dict:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "T_RUN_DIR": str(run.resolve()), "T_WRITE_LOG": str(tmp_path / "writes")}
    if signal_rank0:
        env["T_SIGNAL_RANK0"] = str(int(signal_rank0))
    return env


def _writes(tmp_path, rank: int) -> list[str]:
    f = tmp_path / f"writes.{rank}"
    return f.read_text().splitlines() if f.exists() else []


def _val_acc(run) -> list[float]:
    return [float(r["val_acc"]) for r in csv.DictReader((run / "metrics.csv").open())]


def _assert_weights_close(a, b, tol=WEIGHT_TOL):
    wa, wb = load_weights(a / "last.safetensors"), load_weights(b / "last.safetensors")
    assert wa.keys() == wb.keys()
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert diff < tol, diff


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same global batch (library call, one thread as each of the 2 processes has)."""
    out = tmp_path_factory.mktemp("ref") / "one"
    summary = train(resolve_config(None, None, {**ARGS, "threads": 1}), out, progress=False,
                    evaluate_test=False)
    return out, summary


# -- the loaders: no processes needed ------------------------------------------------------------------------
def _data(n):
    g = torch.Generator().manual_seed(0)
    return ImageData(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (n,), generator=g))


def test_shards_are_the_global_batch_and_the_split_exactly_once():
    data = _data(230)

    def loader(rank, world, **kw):
        bl = BatchLoader(data, 100, [0.5], [0.25], shuffle=True, crop_padding=2, flip=True, seed=3, rank=rank,
                         world_size=world, **kw)
        bl.set_epoch(1)
        return bl

    one, shards = loader(0, 1), [loader(r, 3) for r in range(3)]
    assert len(one) == len(shards[0]) == 3  # the step count is global
    for step, batches in enumerate(zip(one, *shards)):
        (x, y), parts = batches[0], batches[1:]
        # the 3 shares (34/33/33, and 10/10/10 of the last batch) are the 1-process batch, crops and flips included
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
        assert sum(len(p[1]) for p in parts) == one.global_batch(step)
    # evaluation: contiguous slices, each image once, no padding (7 images on 3 ranks: 3 + 2 + 2)
    small = _data(7)
    slices = [BatchLoader(small, 2, [0.5], [0.25], rank=r, world_size=3, shard="split") for r in range(3)]
    assert [len(s.data) for s in slices] == [3, 2, 2]
    assert torch.equal(torch.cat([y for s in slices for _, y in s]), small.labels)
    # a last batch smaller than the number of processes cannot be shared: said at once, not a NaN later
    with pytest.raises(ConfigError, match="cannot be shared"):
        BatchLoader(_data(102), 100, [0.5], [0.25], shuffle=True, rank=0, world_size=3)


# -- torchrun runs --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_equal_one_and_only_rank0_writes(tmp_path, reference):
    ref, _ = reference
    run = tmp_path / "two"
    r = run_cli_process(*CLI, "--nproc", "2", "--out", run, "--json", env=_env(tmp_path, run))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # one JSON document: rank 1 printed nothing
    assert summary["epochs_run"] == 2 and summary["test_n"] == 10000
    meta = json.loads((run / "model.json").read_text())
    assert sum(meta["data"]["counts"]["val"]) == N_VAL
    accs, ref_accs = _val_acc(run), _val_acc(ref)
    for a, b in zip(accs, ref_accs):
        assert abs(a * N_VAL - round(a * N_VAL)) < 1e-3  # k / 310: every image counted once, none twice
        assert abs(a - b) <= 1 / N_VAL + 1e-9, (accs, ref_accs)
    _assert_weights_close(ref, run)
    w0, w1 = _writes(tmp_path, 0), _writes(tmp_path, 1)
    assert w1 == [], w1
    assert any(w.endswith("checkpoint.safetensors") for w in w0) and any(w.endswith("model.json") for w in w0)


@pytest.mark.slow
def test_sigterm_mid_epoch_on_2_then_resume_on_1(tmp_path, reference, capsys):
    ref, _ = reference
    run = tmp_path / "run"
    # rank 0 gets SIGTERM right after its step-4 checkpoint: the ranks agree to stop after step 5, rank 0
    # writes that checkpoint, every process exits as after Ctrl-C
    r = run_cli_process(*CLI, "--nproc", "2", "--checkpoint-every", "4", "--quiet", "--out", run,
                        env=_env(tmp_path, run, signal_rank0=signal.SIGTERM))
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "interrupted" in r.stderr and "--resume" in r.stderr, r.stderr[-3000:]
    state = load_tree(run / "checkpoint.safetensors")
    assert (state["epoch"], state["start_step"], state["world_size"], state["global_batch"]) == (0, 5, 2, 100)
    assert _writes(tmp_path, 1) == []
    assert not list(run.glob(".*.tmp"))

    capsys.readouterr()
    s = train(resolve_config(None, None, {**ARGS, "threads": 1}), run, resume=True,
              progress=False, evaluate_test=False)
    err = capsys.readouterr().err
    assert "resuming on 1 process: global batch 100 (100 per process), learning rate 0.003" in err, err
    assert "written by 2 processes" in err and "maps exactly" in err, err
    assert s["epochs_run"] == 2
    _assert_weights_close(ref, run)
    assert all(abs(a - b) <= 1 / N_VAL + 1e-9 for a, b in zip(_val_acc(run), _val_acc(ref)))


@pytest.mark.slow
def test_interrupted_on_1_then_resume_on_2_with_torchrun(tmp_path, reference):
    from imgrec.engine import trainer as trainer_mod

    ref, _ = reference
    run = tmp_path / "run"
    calls = {"n": 0}
    orig = trainer_mod.Trainer.train_step

    def flaky(self, x, y):  # Ctrl-C during step 8
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return orig(self, x, y)

    trainer_mod.Trainer.train_step = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            train(resolve_config(None, None, {**ARGS, "threads": 1}), run, progress=False,
                  evaluate_test=False)
    finally:
        trainer_mod.Trainer.train_step = orig
    assert load_tree(run / "checkpoint.safetensors")["start_step"] == 7

    env = _env(tmp_path, run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={env['MASTER_PORT']}", "-m", "imgrec.cli", "train", "--resume", "--out", str(run)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming on 2 processes: global batch 100 (50 per process), learning rate 0.003" in r.stderr
    assert "written by 1 process;" in r.stderr and "maps exactly" in r.stderr
    _assert_weights_close(ref, run)
    assert all(abs(a - b) <= 1 / N_VAL + 1e-9 for a, b in zip(_val_acc(run), _val_acc(ref)))
    assert _writes(tmp_path, 1) == []


@pytest.mark.slow
def test_ctrl_c_to_the_nproc_launcher_is_exit_130_without_a_traceback(tmp_path):
    """Ctrl-C reaches `imgrec train --nproc 2` (torchrun's agent in that process): every process stops, rank 0
    leaves a resumable checkpoint, the command says how to resume in one line and exits 130."""
    import time
    run = tmp_path / "run"
    env = {**os.environ, **_env(tmp_path, run)}
    p = subprocess.Popen([sys.executable, "-m", "imgrec.cli", *CLI, "--epochs", "50", "--checkpoint-every", "2",
                          "--nproc", "2", "--quiet", "--out", str(run)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        ckpt = run / "checkpoint.safetensors"
        while not ckpt.exists() and p.poll() is None:  # wait for the event: a first checkpoint is on disk
            time.sleep(0.1)
        assert p.poll() is None, p.communicate()[1][-3000:]
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "resume with: imgrec train --resume" in err, err[-3000:]
    assert load_tree(run / "checkpoint.safetensors")["world_size"] == 2
    assert _writes(tmp_path, 1) == []


def test_nproc_errors_before_any_process_starts():
    r = run_cli("train", "--nproc", "0", "--model", "simple_cnn")
    assert_clean_error(r, "--nproc must be at least 1")
    r = run_cli("train", "--nproc", "2", "--sync-bn", "--device", "cpu", "--model", "simple_cnn")
    assert_clean_error(r, "--sync-bn needs CUDA GPUs")


def _validate_on_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from imgrec.config import TrainConfig
    from imgrec.engine.trainer import Trainer
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        data, val = _data(40), _data(7)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        tl = BatchLoader(data, 20, [0.5], [0.25], shuffle=True, rank=rank, world_size=world)
        vl = BatchLoader(val, 2, [0.5], [0.25], rank=rank, world_size=world, shard="split")
        res = Trainer(model, TrainConfig(), tl, vl, device=torch.device("cpu"), amp=None).validate(vl)
        if rank == 0:
            torch.save({"logits": res["logits"], "labels": res["labels"], "acc": res["acc"]}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_validation_across_ranks_counts_each_image_once(tmp_path):
    """7 images on 2 ranks (4 + 3, no padding): the gathered logits are one process's, image for image."""
    import torch.multiprocessing as mp

    from imgrec.config import TrainConfig
    from imgrec.engine.trainer import Trainer
    out = tmp_path / "res.pt"
    # fork: the children start with torch and imgrec already imported (spawn would import them again)
    mp.start_processes(_validate_on_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    got = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    val = _data(7)
    one = Trainer(model, TrainConfig(), BatchLoader(_data(40), 20, [0.5], [0.25]), None,
                  device=torch.device("cpu"), amp=None).validate(BatchLoader(val, 2, [0.5], [0.25]))
    assert len(got["labels"]) == 7 and torch.equal(got["labels"], val.labels)
    assert torch.allclose(got["logits"], one["logits"], atol=1e-6) and got["acc"] == one["acc"]
