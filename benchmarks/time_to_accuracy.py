"""Time to 92.5% Fashion-MNIST test accuracy: imgrec's default recipe against the usual tutorial loop.

    python benchmarks/time_to_accuracy.py [--seeds 3] [--skip-tutorial] [--recipe NAME] [--amp none]
                                          [--out benchmarks/results/time_to_accuracy.md]

1. imgrec: the whole command ``imgrec train --data fashion-mnist`` (the default recipe, or ``--recipe``) as a
   subprocess, timed from process start to exit (interpreter, imports, data loading, training, validation and
   the final test evaluation included), once per seed; its final test accuracy is read from its JSON summary,
   its peak RSS from the kernel's accounting of the child (``wait4``), and the 1-minute load average is taken
   just before each run.
2. The tutorial loop (our reference), in the same invocation right after: torchvision's ``FashionMNIST`` with
   per-sample ``ToTensor``/``Normalize`` through a ``DataLoader``, a 2-conv + BatchNorm CNN, Adam at 1e-3,
   batch 64, fp32 eager, the test accuracy measured after every epoch; the time is when it first reaches 92.5%
   (training time plus the per-epoch test evaluations, as a tutorial user would watch it).
The benchmark looks at test accuracy per epoch for the tutorial loop only to time it; no choice is made on it.

Results are written as one section per machine class (``cpu-bf16``, ``cpu-fp32``, ``cpu-fp32, emulated AVX2``,
``gpu``) into ``--out``; the sections of other machine classes already in the file are kept. To emulate a CPU
without bf16 (AVX2 + FMA only, e.g. AMD Zen 3) on a newer one, run with
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` in the environment: same instruction set, not the same
micro-architecture or clock, so its times are a lower bound for such a machine.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_flags_line, machine_class, machine_markdown, replace_section  # noqa: E402

TARGET = 0.925
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def run_imgrec(seed: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "imgrec.cli", "train", "--data", "fashion-mnist", "--seed", str(seed),
               "--out", f"{tmp}/run", "--json", *extra]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
            _, status, usage = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            p.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if p.returncode != 0:
            raise SystemExit(f"imgrec train failed: {stderr[-2000:]}")
        s = json.loads(stdout)
        s.update(wall_s=wall, load_before=load, peak_rss_mb=usage.ru_maxrss / 1024,
                 cpu_s=usage.ru_utime + usage.ru_stime)
        meta = Path(tmp, "run", "model.json")
        if meta.is_file():
            m = json.loads(meta.read_text())
            s.setdefault("recipe", (m.get("config") or {}).get("recipe"))
        return s


def tutorial_loop(max_epochs: int, data_root: Path) -> dict:
    import torch
    import torch.nn as nn
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    train = datasets.FashionMNIST(str(data_root), train=True, download=False, transform=tf)
    test = datasets.FashionMNIST(str(data_root), train=False, download=False, transform=tf)
    train_dl = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    test_dl = torch.utils.data.DataLoader(test, batch_size=1000)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    history, reached = [], None
    for epoch in range(1, max_epochs + 1):
        model.train()
        for x, y in train_dl:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_dl:
                correct += (model(x).argmax(1) == y).sum().item()
        acc = correct / len(test)
        elapsed = time.perf_counter() - t0
        history.append((epoch, acc, elapsed))
        print(f"  tutorial epoch {epoch}: test acc {acc:.4f} at {elapsed:.0f}s", file=sys.stderr)
        if acc >= TARGET and reached is None:
            reached = (epoch, elapsed)
            break
    return {"reached": reached, "history": history}


def prepare_torchvision_root(tmp: Path) -> Path:
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FMNIST.glob("*.gz"):
        shutil.copy(f, raw / f.name)
        (raw / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    return tmp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--skip-tutorial", action="store_true")
    ap.add_argument("--tutorial-epochs", type=int, default=20)
    ap.add_argument("--recipe", default=None, help="benchmark a named recipe instead of the default")
    ap.add_argument("--amp", default=None, help="pass --amp to imgrec train (e.g. none under AVX2 emulation)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "time_to_accuracy.md"))
    args = ap.parse_args()
    cls = machine_class()
    header = machine_markdown() + f"- CPU flags: `{cpu_flags_line()}`\n"
    if cls.endswith("emulated AVX2"):
        header += ("- **emulation**: `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` on the CPU above — the "
                   "instruction set of a CPU without bf16 (e.g. AMD Zen 3), not its micro-architecture or clock\n")
    extra = (["--recipe", args.recipe] if args.recipe else []) + (["--amp", args.amp] if args.amp else [])
    runs = []
    for seed in range(args.seeds):
        s = run_imgrec(seed, extra)
        runs.append(s)
        print(f"imgrec seed {seed}: test acc {s['test_acc']:.4f}, wall {s['wall_s']:.1f}s "
              f"(train {s['train_time_s']:.1f}s, load before {s['load_before']:.2f}, "
              f"peak RSS {s['peak_rss_mb']:.0f} MB)", file=sys.stderr)
    accs = [r["test_acc"] for r in runs]
    walls = [r["wall_s"] for r in runs]
    cmd = "python benchmarks/time_to_accuracy.py --seeds " + str(args.seeds) + "".join(
        f" --{k} {v}" for k, v in (("recipe", args.recipe), ("amp", args.amp)) if v)
    if args.skip_tutorial:
        cmd += " --skip-tutorial"
    if cls.endswith("emulated AVX2"):
        cmd = "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 " + cmd
    recipe = args.recipe or (runs[0].get("recipe") if runs else None) or "default"
    lines = [f"## {cls}\n", header, f"Command: `{cmd}` (imgrec recipe: `{recipe}`"
             + (f", `--amp {args.amp}`" if args.amp else "") + ")\n",
             "| run | test accuracy | wall time (whole command) | training time | peak RSS | load before |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(runs):
        lines.append(f"| imgrec seed {i} | {r['test_acc']:.4f} | {r['wall_s']:.1f} s | {r['train_time_s']:.1f} s | "
                     f"{r['peak_rss_mb']:.0f} MB | {r['load_before']:.2f} |")
    lines.append(f"| **imgrec mean** | **{statistics.mean(accs):.4f}** | **{statistics.mean(walls):.1f} s** | "
                 f"{statistics.mean(r['train_time_s'] for r in runs):.1f} s | | |")
    reached_imgrec = [r["wall_s"] for r in runs if r["test_acc"] >= TARGET]
    if args.skip_tutorial:
        lines.append("\nThe tutorial loop was not run in this invocation.")
    else:
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            root = prepare_torchvision_root(Path(tmp))
            tut = tutorial_loop(args.tutorial_epochs, root)
        if tut["reached"]:
            ep, t = tut["reached"]
            lines.append(f"| tutorial loop | {tut['history'][-1][1]:.4f} (epoch {ep}) | {t:.1f} s to reach "
                         f"{TARGET:.1%} | | | {load:.2f} |")
            if reached_imgrec:
                lines.append(f"\nTime to {TARGET:.1%}: imgrec {statistics.mean(reached_imgrec):.1f} s (mean over the "
                             f"seeds that reached it: {len(reached_imgrec)}/{len(runs)}), tutorial loop {t:.1f} s: "
                             f"**{t / statistics.mean(reached_imgrec):.1f}× faster**.")
        else:
            lines.append(f"| tutorial loop | best {max(a for _, a, _ in tut['history']):.4f} | did not reach "
                         f"{TARGET:.1%} in {args.tutorial_epochs} epochs | | | {load:.2f} |")
    out = Path(args.out)
    text = replace_section(out, cls, lines, "# Time to accuracy on Fashion-MNIST\n\nOne section per machine class, each "
                           "written by `python benchmarks/time_to_accuracy.py` on such a machine (the tutorial loop "
                           "run in the same invocation unless the section says otherwise).\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
