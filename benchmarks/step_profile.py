"""Where a training step of a recipe's network spends its time on this CPU: the step, its ops, each convolution.

    python benchmarks/step_profile.py [--recipe NAME] [--batch N] [--steps 20] [--threads N]
                                      [--out benchmarks/results/step_profile.md]

Without ``--recipe`` the recipe ``imgrec train`` would choose on this machine is profiled (``fast-bf16`` on a CPU
with bf16 units, ``fast-fp32`` on one without). Everything runs imgrec's own pieces: the recipe's model from the
registry, its optimizer (``build_optimizer``), its loss and autocast dtype, at its batch size, on random
28x28 inputs of Fashion-MNIST's shape (speed does not depend on the pixel values).

1. The whole step (forward + loss, backward, optimizer step), median over ``--steps`` steps after warm-up, in
   channels_last (what the recipe uses) and in contiguous NCHW.
2. ``torch.profiler``: each op's share of the step's self CPU time.
3. Each convolution alone, forward + backward at the recipe's batch, with the max pool that follows it where
   there is one: multiply-adds per image, time, GFLOP/s, and that as a share of what a large convolution's
   forward pass reaches on the same cores and dtype (a measured ceiling: clocks and FMA units differ from CPU
   to CPU).

Results are written as one section per machine class (``cpu-bf16``, ``cpu-fp32``, ``cpu-fp32, emulated AVX2``)
into ``--out``, keeping the other classes' sections. ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` in
the environment emulates a CPU without bf16 on a newer one; an emulated profile is labelled as such, since a
real AVX2-only CPU (e.g. AMD Zen 3) runs the same instructions at other speeds.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_family_model, cpu_flags_line, machine_class, machine_markdown, replace_section  # noqa: E402

from imgrec.device import set_threads  # noqa: E402
from imgrec.engine.losses import build_loss  # noqa: E402
from imgrec.engine.train import resolve_config  # noqa: E402
from imgrec.engine.trainer import build_optimizer  # noqa: E402
from imgrec.infer.runtime import autocast, resolve_amp  # noqa: E402
from imgrec.models import create_model  # noqa: E402
from imgrec.models.fast import ConvBeforePool  # noqa: E402

HEADING = ("# Training step profiles\n\nOne section per machine class, each written by "
           "`python benchmarks/step_profile.py` on such a machine.\n")


def median_ms(fn, steps: int, warmup: int = 4) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def make_step(model: nn.Module, cfg, dtype, batch: int, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = build_optimizer(model, cfg)
    loss_fn = build_loss("multiclass", cfg.label_smoothing)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    cpu = torch.device("cpu")
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def step():
        t0 = time.perf_counter()
        with autocast(cpu, dtype):
            loss = loss_fn(model(x).float(), y)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        for k, t in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[k].append(t)
    return step, parts


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d, bool, tuple]]:
    """(name, conv, followed by a max pool, input shape for one image) for every Conv2d of the model."""
    shapes: dict[str, tuple] = {}
    hooks = []
    pooled: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (a, m1), (_, m2) in zip(kids, kids[1:]):
                if isinstance(m1, nn.Conv2d) and isinstance(m2, nn.MaxPool2d):
                    pooled.add(f"{name}.{a}" if name else a)
        if isinstance(mod, nn.Conv2d):
            def record(m, inp, out, name=name) -> None:  # returns None: the output stays as it is
                shapes.setdefault(name, tuple(inp[0].shape[1:]))
            hooks.append(mod.register_forward_hook(record))
    with torch.no_grad():
        model.eval()(torch.zeros(2, 1, 28, 28))
    for h in hooks:
        h.remove()
    return [(n, m, n in pooled, shapes[n]) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and n in shapes]


def conv_row(name, conv, pooled, shape, dtype, batch, steps, ceiling) -> str:
    conv = copy.deepcopy(conv).train().to(memory_format=torch.channels_last)
    first = shape[0] == 1  # the stem: no gradient for the input image
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last).requires_grad_(not first)
    cpu = torch.device("cpu")

    def run():
        with autocast(cpu, dtype):
            y = conv(x)
            if pooled:
                y = nn.functional.max_pool2d(y, 2)
        y.float().sum().backward()
    ms = median_ms(run, steps)
    with torch.no_grad():
        out = conv(torch.zeros(1, *shape))
    oh, ow = out.shape[-2], out.shape[-1]
    if pooled and isinstance(conv, ConvBeforePool) and dtype == torch.bfloat16:
        oh, ow = oh // 2 * 2, ow // 2 * 2  # it computes only the rows and columns its pool looks at
    mac = conv.in_channels // conv.groups * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] * oh * ow
    flop = 2 * mac * batch * (2 if first else 3)  # forward, weight gradient, input gradient
    gflops = flop / ms / 1e6
    c, h, w = shape
    return (f"| `{name}` | {c}->{conv.out_channels}, {conv.kernel_size[0]}x{conv.kernel_size[1]}"
            f"{' s' + str(conv.stride[0]) if conv.stride[0] > 1 else ''} @{h}x{w}{' + pool' if pooled else ''} "
            f"| {mac / 1e6:.2f} | {ms:.1f} | {gflops:.0f} | {gflops / ceiling:.0%} |")


def conv_ceiling(dtype) -> float:
    """GFLOP/s of a large 3x3 convolution's forward pass (256 -> 256 channels at 14x14, batch 64, channels_last)
    through the same oneDNN, dtype and threads: what this CPU reaches on a shape that keeps its FMA units busy.
    (Not a BLAS matrix product: on a 2-core Zen 5 the MKL inside torch ran a 2048x2048 fp32 product at ~200
    GFLOP/s, this convolution at ~520.)"""
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(64, 256, 14, 14).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(torch.device("cpu"), dtype):
        ms = median_ms(lambda: conv(x), 8, warmup=2)
    return 2 * 256 * 256 * 9 * 14 * 14 * 64 / ms / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=None, help="a named recipe (default: the one chosen for this machine)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the recipe's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="0 = every usable core, as imgrec train does")
    ap.add_argument("--out", default="benchmarks/results/step_profile.md")
    a = ap.parse_args()

    cfg = resolve_config(a.recipe, adapt=False)
    t = cfg.train
    set_threads(a.threads or None)
    batch = a.batch or t.batch_size
    cpu = torch.device("cpu")
    dtype = resolve_amp(t.amp, cpu, cfg.model.name)
    precision = "bf16 autocast" if dtype == torch.bfloat16 else "fp32" if dtype is None else str(dtype)
    torch.manual_seed(0)
    model = create_model(cfg.model.name, num_classes=10, in_chans=1, image_size=28).train()

    rows = {}
    for cl in (True, False):
        step, parts = make_step(copy.deepcopy(model), t, dtype, batch, cl)
        median_ms(step, a.steps)
        rows[cl] = {k: statistics.median(v[-a.steps:]) * 1e3 for k, v in parts.items()}
    step, _ = make_step(copy.deepcopy(model), t, dtype, batch, True)
    median_ms(step, 3)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(min(a.steps, 15)):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    ceiling = conv_ceiling(dtype)
    convs = [conv_row(n, m, p, s, dtype, batch, a.steps, ceiling) for n, m, p, s in conv_layers(model)]

    cls = machine_class()
    fm = cpu_family_model()
    env = " ".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ)
    cmd = (env + " " if env else "") + "python benchmarks/step_profile.py" + (f" --recipe {a.recipe}" if a.recipe else "") + \
        (f" --batch {a.batch}" if a.batch else "")
    lines = [f"## {cls}", "", machine_markdown().rstrip("\n"),
             f"- CPU {fm}" if fm else "- CPU family/model: unknown",
             f"- CPU flags: `{cpu_flags_line()}`"]
    if cls.endswith("emulated AVX2"):
        lines.append("- **emulation**: `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` on the CPU above — the "
                     "instruction set of a CPU without bf16, not its micro-architecture or clock")
    lines += ["", f"Command: `{cmd}` (recipe `{cfg.recipe}`: `{cfg.model.name}`, {precision}, batch {batch}, "
              f"optimizer {t.optimizer})", "",
              "| layout | forward + loss | backward | optimizer | step | images/s |", "|---|---|---|---|---|---|"]
    for cl, r in rows.items():
        s = sum(r.values())
        lines.append(f"| {'channels_last' if cl else 'contiguous (NCHW)'} | {r['forward']:.1f} ms | "
                     f"{r['backward']:.1f} ms | {r['optimizer']:.1f} ms | **{s:.1f} ms** | {batch / s * 1e3:,.0f} |")
    lines += ["", "Ops by self CPU time (channels_last):", "", "| op | share | per step |", "|---|---|---|"]
    n_steps = min(a.steps, 15)
    for e in top:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / total:.1%} | "
                     f"{e.self_cpu_time_total / 1e3 / n_steps:.1f} ms |")
    lines += ["", f"Each convolution alone, forward + backward, batch {batch}, channels_last; ceiling: a large 3x3 "
              f"convolution's forward (256 -> 256 at 14x14, batch 64) runs at **{ceiling:.0f} GFLOP/s** on these cores "
              f"in the same dtype; MMAC/img counts the "
              f"outputs computed (under bf16 a pooled convolution skips those its pool drops):", "",
              "| layer | shape | MMAC/img | ms | GFLOP/s | of the ceiling |", "|---|---|---|---|---|---|", *convs]
    out = Path(a.out)
    text = replace_section(out, cls, lines, HEADING)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
