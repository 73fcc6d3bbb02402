"""Time-to-accuracy search for FastNet on Fashion-MNIST, on CPU (standalone; no imgrec engine).

Everything is timed: IDX loading, the split, training, per-epoch validation and the final eval.
Model selection uses only the 5,000-image validation split (fixed seed) carved from the 60k
training set; the 10k test split is evaluated only with ``--test`` (for the final configs).

Examples::

    .venv/bin/python benchmarks/fast_search.py --recipe fast --seeds 0 1 2 --test
    .venv/bin/python benchmarks/fast_search.py --recipe fast --set epochs=6 lr=0.3 --seeds 0
    .venv/bin/python benchmarks/fast_search.py --recipe fast --set amp=null channels_last=false
    .venv/bin/python benchmarks/fast_search.py --recipe fast --profile   # torch.profiler, one epoch

Each run prints one line per epoch and a summary line ``RESULT {json}``.  ``cpu/threads`` is the
process CPU time divided by the thread count: a load-independent estimate of the idle-machine time
(use it when other jobs share the CPU; under oversubscription, 2 OpenMP threads lose far more than
1 thread does, so run ``--threads 1`` on a busy machine and read the CPU column).

Findings so far (2-core EPYC Zen 4 + AVX512_BF16, no AMX; machine at load 4-9 from other jobs for
most of the session, so wall times below are marked with the load they were taken at):

* Microbenchmarks (conv fwd+bwd, batch 512, load < 1): 3x3 conv 64->128 at 14x14 fp32 238 ms
  (channels_last) / 332 ms; bf16 autocast 147 / 167 ms (~300 GFLOP/s).  1->32 3x3 stem at 28x28:
  45 ms (!) against 2-7 ms for a stride-2 stem -> stride-2 stem.
* Whole epoch, fastnet (5.2 M MACs), 1 thread CPU-seconds: bf16+channels_last 16.4, fp32+CL 24.7,
  bf16 NCHW 20.4, fp32 NCHW 30.3.
* Profile (pool variant, 10 M MACs, 2 threads, load < 1, 12 s/epoch): conv backward 39%, conv
  forward 16%, fill_ 8.5% (max-pool backward zero-fill), BN fwd+bwd 10%, GELU fwd+bwd 6%,
  max-pool 6%.
* Accuracy, fastnet, bs 512, onecycle, LS 0.1, crop 2 + flip: 4 epochs val 88.7% (lr 0.1),
  89.4% (lr 0.4), 89.5% (AdamW 3e-3); 10 epochs (lr 0.4) 91.7% val (92.0% flip-TTA).
  Without the random crop (flip only), 4 epochs: 91.1% (91.3% TTA).  Max-pool variant (10 M MACs,
  24 CPU-s/epoch) with crop 2, 4 epochs: 91.4%; flip only: 91.9% (92.2% TTA).  No augmentation
  at all (stride net): 91.4% (TTA then hurts: 84.5%).
* RECIPES["fast"], seed 0, --threads 1: val 91.3% (TTA), TEST 90.4%; 66 CPU-s of training.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import sys
import time

_T_START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from imgrec.models.fast import (FASTNET_CFG, FASTNET_WIDE_CFG, RECIPES, FastNet,  # noqa: E402
                               param_groups_no_decay)  # noqa: E402

_T_IMPORTS = time.perf_counter()

DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics (0..1 scale)
VAL_SIZE, SPLIT_SEED = 5000, 0

# Defaults for any key a recipe leaves out.
BASE = dict(model="fastnet", model_kw={}, epochs=8, batch_size=512, optimizer="sgd", lr=0.2,
            momentum=0.9, weight_decay=5e-4, scheduler="onecycle", warmup=0.2, label_smoothing=0.1,
            augment=dict(crop_padding=2, flip=True), ema=None, tta_flip=False, amp="bf16",
            channels_last=True, compile=False, no_decay_bn=False, eval_batch_size=2500)


# ---------------------------------------------------------------------------------------- data
def read_idx(path: str) -> np.ndarray:
    """Read a gzipped IDX file into a numpy array (big-endian header, uint8 payload)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist():
    """Return uint8 (N,1,28,28) images and int64 labels: train (55k), val (5k), test (10k)."""
    x = torch.from_numpy(read_idx(f"{DATA_DIR}/train-images-idx3-ubyte.gz").copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(f"{DATA_DIR}/train-labels-idx1-ubyte.gz").astype(np.int64))
    xt = torch.from_numpy(read_idx(f"{DATA_DIR}/t10k-images-idx3-ubyte.gz").copy()).unsqueeze(1)
    yt = torch.from_numpy(read_idx(f"{DATA_DIR}/t10k-labels-idx1-ubyte.gz").astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx, tr_idx = perm[:VAL_SIZE], perm[VAL_SIZE:]
    return (x[tr_idx], y[tr_idx]), (x[val_idx], y[val_idx]), (xt, yt)


def normalize(x_u8: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = (x_u8.float() * (1.0 / 255.0) - MEAN) * (1.0 / STD)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def batch_augment(x_u8: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding + per-sample offsets, one gather) and random horizontal flip.

    Works on a whole uint8 batch at once: no per-sample Python.
    """
    n, c, h, w = x_u8.shape
    if pad > 0:
        xp = F.pad(x_u8, (pad, pad, pad, pad))                     # N,C,H+2p,W+2p (zeros)
        wp = w + 2 * pad
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = torch.arange(h).view(1, h, 1) + dy.view(n, 1, 1)       # N,H,1
        cols = torch.arange(w).view(1, 1, w) + dx.view(n, 1, 1)       # N,1,W
        idx = (rows * wp + cols).view(n, 1, h * w).expand(n, c, h * w)
        x_u8 = xp.view(n, c, -1).gather(2, idx).view(n, c, h, w)
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x_u8 = torch.where(mask.view(n, 1, 1, 1), x_u8.flip(3), x_u8)
    return x_u8


# ---------------------------------------------------------------------------------------- model
def build_model(cfg: dict) -> nn.Module:
    # model_kw overrides the registered variant's sizes, so the search can try shapes freely.
    kw = dict({"fastnet": FASTNET_CFG, "fastnet_wide": FASTNET_WIDE_CFG}[cfg["model"]])
    kw.update(cfg.get("model_kw") or {})
    return FastNet(num_classes=10, in_chans=1, **kw)


def count_macs(model: nn.Module, size: int = 28) -> float:
    """Multiply-adds per image of the conv and linear layers (forward)."""
    macs = 0

    def hook(m, inp, out):
        nonlocal macs
        if isinstance(m, nn.Conv2d):
            macs += out.numel() // out.shape[0] * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            macs += m.in_features * m.out_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    for h in hs:
        h.remove()
    return macs


def lr_factor(step: int, total: int, scheduler: str, warmup: float) -> float:
    """Multiplier of the peak lr at ``step`` (0-based) of ``total`` optimizer steps."""
    t = step / max(total, 1)
    w = warmup if scheduler in ("onecycle", "cosine") else 0.0
    if scheduler == "none":
        return 1.0
    if t < w:
        return t / w
    u = (t - w) / max(1 - w, 1e-9)                     # 0..1 over the decay phase
    if scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * u))
    return 1.0 - u                                     # onecycle / linear: straight line to 0


# ---------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model, x_u8, y, cfg, tta_flip: bool | None = None):
    tta = cfg["tta_flip"] if tta_flip is None else tta_flip
    model.eval()
    correct, bs = 0, cfg["eval_batch_size"]
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if cfg["amp"] == "bf16" else contextlib.nullcontext()
    with amp:
        for i in range(0, len(x_u8), bs):
            xb = normalize(x_u8[i:i + bs], cfg["channels_last"])
            logits = model(xb).float()
            if tta:
                logits = logits + model(xb.flip(3)).float()
            correct += (logits.argmax(1) == y[i:i + bs]).sum().item()
    return correct / len(x_u8)


# ---------------------------------------------------------------------------------------- train
def run(cfg: dict, seed: int, data, test: bool, profile: bool = False, verbose: bool = True) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    (xtr, ytr), (xva, yva), (xte, yte) = data
    t0 = time.perf_counter()
    model = build_model(cfg)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if cfg["no_decay_bn"]:
        params = param_groups_no_decay(model, cfg["weight_decay"])
    else:
        params = [{"params": list(model.parameters()), "weight_decay": cfg["weight_decay"]}]
    if cfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True)
    elif cfg["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.99))
    elif cfg["optimizer"] == "adam":
        opt = torch.optim.Adam(params, lr=cfg["lr"])
    else:
        raise ValueError(cfg["optimizer"])
    ema = None
    if cfg["ema"]:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg["ema"]),
            use_buffers=True)
    step_model = torch.compile(model) if cfg["compile"] else model
    crit = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    bs, n = cfg["batch_size"], len(xtr)
    steps_per_epoch = n // bs                           # drop the last partial batch
    total = steps_per_epoch * cfg["epochs"]
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg["amp"] == "bf16" \
        else contextlib.nullcontext
    aug = cfg["augment"] or {}
    step, hist = 0, []
    prof = None
    if profile:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    t_train = c_train = 0.0
    for epoch in range(cfg["epochs"]):
        te, ce = time.perf_counter(), time.process_time()
        model.train()
        perm = torch.randperm(n, generator=gen)
        if prof is not None and epoch == 1:
            prof.__enter__()
        loss_sum = torch.zeros(())
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            xb = batch_augment(xtr[idx], aug.get("crop_padding", 0), aug.get("flip", False), gen)
            xb = normalize(xb, cfg["channels_last"])
            yb = ytr[idx]
            for g in opt.param_groups:
                g["lr"] = cfg["lr"] * lr_factor(step, total, cfg["scheduler"], cfg["warmup"])
            with amp():
                loss = crit(step_model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.detach()
            step += 1
        if prof is not None and epoch == 1:
            prof.__exit__(None, None, None)
        t_ep = time.perf_counter() - te
        # CPU seconds / threads: what the epoch would take on an idle machine (other jobs share it).
        c_ep = (time.process_time() - ce) / torch.get_num_threads()
        t_train += t_ep
        c_train += c_ep
        tv = time.perf_counter()
        eval_model = ema.module if ema is not None else model
        val = evaluate(eval_model, xva, yva, cfg)
        t_val = time.perf_counter() - tv
        hist.append(dict(epoch=epoch + 1, loss=round(loss_sum.item() / steps_per_epoch, 4),
                         val=round(val, 4), t_epoch=round(t_ep, 2), cpu_epoch=round(c_ep, 2),
                         t_val=round(t_val, 2)))
        if verbose:
            print(f"  seed {seed} ep {epoch + 1:2d} loss {hist[-1]['loss']:.4f} val {val:.4f} "
                  f"train {t_ep:5.2f}s (cpu/threads {c_ep:5.2f}s) val-eval {t_val:4.2f}s "
                  f"load1 {os.getloadavg()[0]:.1f}", flush=True)
    res = dict(seed=seed, val=hist[-1]["val"], t_train=round(t_train, 2), cpu_train=round(c_train, 2),
               t_run=round(time.perf_counter() - t0, 2), hist=hist)
    eval_model = ema.module if ema is not None else model
    res["val_noTTA"] = evaluate(eval_model, xva, yva, cfg, tta_flip=False)
    res["val_TTA"] = evaluate(eval_model, xva, yva, cfg, tta_flip=True)
    if test:
        tt = time.perf_counter()
        res["test"] = evaluate(eval_model, xte, yte, cfg)
        res["t_test"] = round(time.perf_counter() - tt, 2)
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return res


def parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=None, help="start from RECIPES[name] (else BASE)")
    ap.add_argument("--set", nargs="*", default=[], help="overrides key=json_value (dotted for dicts)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--test", action="store_true", help="also measure the 10k test split")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over the 2nd epoch")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = json.loads(json.dumps(BASE))
    if args.recipe:
        cfg.update(json.loads(json.dumps(RECIPES[args.recipe])))
    for kv in args.set:
        k, v = kv.split("=", 1)
        if "." in k:
            a, b = k.split(".", 1)
            cfg[a] = dict(cfg.get(a) or {})
            cfg[a][b] = parse_value(v)
        else:
            cfg[k] = parse_value(v)
    tl = time.perf_counter()
    data = load_fashion_mnist()
    t_load = time.perf_counter() - tl
    m = build_model(cfg)
    print(f"config: {json.dumps(cfg)}")
    print(f"params {sum(p.numel() for p in m.parameters()) / 1e6:.3f} M, "
          f"MACs/image {count_macs(m) / 1e6:.2f} M; imports {_T_IMPORTS - _T_START:.2f}s, "
          f"load+split {t_load:.2f}s; load1 {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for seed in args.seeds:
        r = run(cfg, seed, data, args.test, profile=args.profile)
        results.append(r)
        print("RESULT " + json.dumps({k: v for k, v in r.items() if k != "hist"}), flush=True)
    if len(results) > 1:
        def mean(key):
            vals = [r[key] for r in results if key in r]
            return (sum(vals) / len(vals), max(vals) - min(vals)) if vals else (float("nan"), 0)
        summary = {k: [round(x, 4) for x in mean(k)] for k in ("val", "val_noTTA", "val_TTA", "test", "t_train", "cpu_train", "t_run")}
        print("SUMMARY (mean, max-min) " + json.dumps(summary))
    print(f"total wall {time.perf_counter() - _T_START:.2f}s (process start to here; + interpreter "
          f"start); load1 {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
