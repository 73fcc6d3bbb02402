"""Images/s of the streamed path (LitData shards, imgrec.data.stream.StreamLoader) against the in-memory path
(imgrec.data.memory.BatchLoader) on the same data and machine.

Two measurements per dataset:
- loader only: batches of normalised, augmented tensors handed to the training loop (what the data path costs);
- training: 40 timed steps (after 5 untimed) of `fastnet` (the default architecture; bf16 autocast where the CPU
  has it) fed by each loader (the loader's cost as a share of a real step).
Datasets: Fashion-MNIST at 28 px 1-channel and the same images at 64 px 3-channel (read from the pack into
memory for the in-memory path, streamed from its shards otherwise). Each number is the median of --repeats.

    python benchmarks/stream_throughput.py [--repeats 3] [--workers 0 1] [--out benchmarks/results/stream.md]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_markdown, write_result  # noqa: E402


def loader_rate(loader, epochs: int = 1) -> float:
    n, t0 = 0, time.perf_counter()
    for e in range(epochs):
        loader.set_epoch(e)
        for x, y in loader.iterate(0):
            n += int(y.shape[0])
    return n / (time.perf_counter() - t0)


def train_rate(loader, image_size: int, channels: int, steps: int = 40, warmup: int = 5) -> float:
    from imgrec.infer.runtime import autocast
    from imgrec.models import create_model

    torch.manual_seed(0)
    model = create_model("fastnet", num_classes=10, in_chans=channels, image_size=image_size)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = torch.bfloat16 if _bf16() else None
    loss_fn = torch.nn.CrossEntropyLoss()
    n, t0 = 0, time.perf_counter()
    loader.set_epoch(0)
    for step, (x, y) in enumerate(loader.iterate(0)):
        if step == warmup:  # the first steps (loader start-up, oneDNN's first calls) are not timed
            n, t0 = 0, time.perf_counter()
        if step == warmup + steps:
            break
        with autocast(torch.device("cpu"), amp):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += int(y.shape[0])
    return n / (time.perf_counter() - t0)


def _bf16() -> bool:
    from imgrec.device import cpu_has_fast_bf16
    return cpu_has_fast_bf16()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--sizes", type=int, nargs="+", default=[28, 64])
    ap.add_argument("--train-limit", type=int, default=None, help="pack only the first N training images")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", default="benchmarks/results/stream.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from imgrec.data.memory import BatchLoader
    from imgrec.data.pack import load_split, pack
    from imgrec.data.stream import StreamLoader, read_pack_meta

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    for size in args.sizes:
        chans = 1 if size == 28 else 3
        out = tmp / f"fm{size}"
        t0 = time.perf_counter()
        pack("fashion-mnist", out, image_size=size, channels=chans, train_limit=args.train_limit, progress=False)
        pack_s = time.perf_counter() - t0
        meta = read_pack_meta(out)
        train = load_split(str(out), "train", meta)
        gb = meta["splits"]["train"]["bytes"] / 1e9
        common = dict(crop_padding=max(1, size // 14), flip=True, drop_last=True, seed=0)

        def mem():
            return BatchLoader(train, args.batch, meta["mean"], meta["std"], shuffle=True, **common)

        def streamed(w):
            return StreamLoader(str(out / "train"), args.batch, meta["mean"], meta["std"], shuffle=True,
                                num_workers=w, meta=meta, **common)

        cases = [("in memory (BatchLoader)", mem)] + [(f"streamed, {w} worker{'s' if w != 1 else ''}",
                                                       (lambda w=w: streamed(w))) for w in args.workers]
        for name, make in cases:
            lr = statistics.median(loader_rate(make()) for _ in range(args.repeats))
            tr = statistics.median(train_rate(make(), size, chans) for _ in range(args.repeats))
            rows.append((f"{chans}×{size}×{size}, {len(train):,} images ({gb:.2f} GB decoded; packed in {pack_s:.1f} s)",
                         name, lr, tr))
            print(rows[-1], file=sys.stderr)
        train = None  # free the in-memory copy before the next size

    lines = ["# Streamed (LitData shards) vs in-memory training data", "", machine_markdown(),
             f"Command: `python benchmarks/stream_throughput.py --repeats {args.repeats} --workers "
             f"{' '.join(map(str, args.workers))} --batch {args.batch} --train-limit {args.train_limit} --threads "
             f"{args.threads}` (medians of {args.repeats}; random crop + "
             "flip + normalisation included in both paths; the training column is 40 steps of `fastnet`, "
             "bf16 autocast where the CPU has it). The pack sits on local disk, mostly in the page cache.", "",
             "| data | path | loader img/s | training img/s (fastnet) |", "|---|---|---|---|"]
    lines += [f"| {d} | {n} | {lr:,.0f} | {tr:,.0f} |" for d, n, lr, tr in rows]
    shutil.rmtree(tmp, ignore_errors=True)
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
