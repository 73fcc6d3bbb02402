"""Training and inference images/s for every registered model: plain fp32 eager against imgrec's engine.

    python benchmarks/throughput.py [--models a,b] [--batch 64] [--steps 6] [--out benchmarks/results/throughput.md]

"Plain" is what a user gets from a textbook loop: fp32, contiguous (NCHW) tensors, eager mode.
"Engine" is what ``imgrec train`` does with ``--amp auto`` and the default memory format on this machine:
the autocast dtype chosen by ``imgrec.infer.runtime.resolve_amp`` for that model, and channels_last for CNNs.
Each model runs at its small-image configuration (28 px, 1 channel, 10 classes — Fashion-MNIST's shape);
the numbers are medians over ``--steps`` timed steps after 2 warm-up steps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_markdown, write_result  # noqa: E402

from imgrec.device import set_threads  # noqa: E402
from imgrec.infer.runtime import resolve_amp  # noqa: E402
from imgrec.infer.runtime import autocast  # noqa: E402
from imgrec.models import create_model, list_models, model_info  # noqa: E402


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp, channels_last: bool, steps: int):
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    dev = x.device
    train_t = []
    model.train()
    for i in range(steps + 2):
        t = time.perf_counter()
        with autocast(dev, amp):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            train_t.append(time.perf_counter() - t)
    model.eval()
    infer_t = []
    with torch.inference_mode():
        for i in range(steps + 2):
            t = time.perf_counter()
            with autocast(dev, amp):
                model(x)
            if i >= 2:
                infer_t.append(time.perf_counter() - t)
    n = x.shape[0]
    return n / statistics.median(train_t), n / statistics.median(infer_t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.md"))
    args = ap.parse_args()
    set_threads(None)
    header = machine_markdown()
    dev = torch.device("cpu")
    names = args.models.split(",") if args.models else list_models()
    rows = []
    for name in names:
        info = model_info(name)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 1, args.size, args.size, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        torch.manual_seed(0)
        plain = measure(create_model(name, 10, 1, args.size), x, y, None, False, args.steps)
        torch.manual_seed(0)
        amp = resolve_amp("auto", dev, name)
        cl = info.family != "vit"
        eng = measure(create_model(name, 10, 1, args.size), x, y, amp, cl, args.steps)
        setting = f"{'bf16' if amp == torch.bfloat16 else 'fp32'}{' + channels_last' if cl else ''}"
        rows.append((name, setting, plain, eng))
        print(f"{name:16s} plain train {plain[0]:8.0f} img/s  infer {plain[1]:8.0f} | engine ({setting}) "
              f"train {eng[0]:8.0f}  infer {eng[1]:8.0f}  speedup train {eng[0] / plain[0]:.2f}x", file=sys.stderr)
    speed_train = [e[0] / p[0] for _, _, p, e in rows]
    speed_inf = [e[1] / p[1] for _, _, p, e in rows]
    lines = ["# Training and inference throughput per model\n", header,
             f"Command: `python benchmarks/throughput.py --batch {args.batch} --steps {args.steps} --size {args.size}` "
             f"(batch {args.batch}, {args.size}×{args.size}×1, 10 classes; medians of {args.steps} steps)\n",
             "| model | engine setting | train img/s fp32 eager | train img/s engine | speed-up | infer img/s fp32 | "
             "infer img/s engine | speed-up |", "|---|---|---|---|---|---|---|---|"]
    for (name, setting, p, e), st, si in zip(rows, speed_train, speed_inf):
        lines.append(f"| {name} | {setting} | {p[0]:.0f} | {e[0]:.0f} | {st:.2f}× | {p[1]:.0f} | {e[1]:.0f} | {si:.2f}× |")
    lines.append(f"\nMedian training speed-up: **{statistics.median(speed_train):.2f}×** (min {min(speed_train):.2f}×, "
                 f"max {max(speed_train):.2f}×); median inference speed-up: **{statistics.median(speed_inf):.2f}×**.")
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
