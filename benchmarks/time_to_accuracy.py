"""Time to 92.5% Fashion-MNIST test accuracy: imgrec's default recipe against the usual tutorial loop.

    python benchmarks/time_to_accuracy.py [--seeds 3] [--skip-tutorial] [--out benchmarks/results/time_to_accuracy.md]

1. imgrec: the whole command ``imgrec train --data fashion-mnist`` (the default recipe) as a subprocess, timed
   from process start to exit (interpreter, imports, data loading, training, validation and the final test
   evaluation included), once per seed; its final test accuracy is read from its JSON summary.
2. The tutorial loop (our reference): torchvision's ``FashionMNIST`` with per-sample ``ToTensor``/``Normalize``
   through a ``DataLoader``, a 2-conv + BatchNorm CNN, Adam at 1e-3, batch 64, fp32 eager, the test accuracy
   measured after every epoch; the time is when it first reaches 92.5% (training time plus the per-epoch
   test evaluations, as a tutorial user would watch it).
The benchmark looks at test accuracy per epoch for the tutorial loop only to time it; no choice is made on it.
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
from _machine import machine_markdown, write_result  # noqa: E402

TARGET = 0.925
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def run_imgrec(seed: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "imgrec.cli", "train", "--data", "fashion-mnist", "--seed", str(seed),
               "--out", f"{tmp}/run", "--json", *extra]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"imgrec train failed: {r.stderr[-2000:]}")
        s = json.loads(r.stdout)
        s["wall_s"] = wall
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
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "time_to_accuracy.md"))
    args = ap.parse_args()
    header = machine_markdown()
    extra = ["--recipe", args.recipe] if args.recipe else []
    runs = []
    for seed in range(args.seeds):
        s = run_imgrec(seed, extra)
        runs.append(s)
        print(f"imgrec seed {seed}: test acc {s['test_acc']:.4f}, wall {s['wall_s']:.1f}s "
              f"(train {s['train_time_s']:.1f}s)", file=sys.stderr)
    accs = [r["test_acc"] for r in runs]
    walls = [r["wall_s"] for r in runs]
    lines = [f"# Time to accuracy on Fashion-MNIST ({args.recipe or 'default recipe'})\n", header,
             f"Command: `python benchmarks/time_to_accuracy.py --seeds {args.seeds}"
             + (f" --recipe {args.recipe}" if args.recipe else "") + "`\n",
             "| run | test accuracy | wall time (whole command) | training time |", "|---|---|---|---|"]
    for i, r in enumerate(runs):
        lines.append(f"| imgrec seed {i} | {r['test_acc']:.4f} | {r['wall_s']:.1f} s | {r['train_time_s']:.1f} s |")
    lines.append(f"| **imgrec mean** | **{statistics.mean(accs):.4f}** | **{statistics.mean(walls):.1f} s** | |")
    reached_imgrec = [r["wall_s"] for r in runs if r["test_acc"] >= TARGET]
    if not args.skip_tutorial:
        with tempfile.TemporaryDirectory() as tmp:
            root = prepare_torchvision_root(Path(tmp))
            tut = tutorial_loop(args.tutorial_epochs, root)
        if tut["reached"]:
            ep, t = tut["reached"]
            lines.append(f"| tutorial loop | {tut['history'][-1][1]:.4f} (epoch {ep}) | {t:.1f} s to reach "
                         f"{TARGET:.1%} | |")
            if reached_imgrec:
                lines.append(f"\nTime to {TARGET:.1%}: imgrec {statistics.mean(reached_imgrec):.1f} s (mean over the "
                             f"seeds that reached it: {len(reached_imgrec)}/{len(runs)}), tutorial loop {t:.1f} s: "
                             f"**{t / statistics.mean(reached_imgrec):.1f}× faster**.")
        else:
            lines.append(f"| tutorial loop | best {max(a for _, a, _ in tut['history']):.4f} | did not reach "
                         f"{TARGET:.1%} in {args.tutorial_epochs} epochs | |")
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
