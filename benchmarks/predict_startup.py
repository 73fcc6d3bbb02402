"""How long `imgrec predict` takes for one image, whole command, with an ONNX model and with PyTorch.

    python benchmarks/predict_startup.py --model runs/x [--image shoe.png] [--repeats 7]

``--model`` is a trained model directory; its ``model.onnx`` is written with ``imgrec export`` when missing.
Each command runs ``--repeats`` times in a fresh process (the console script, as a user runs it), after one
untimed warm-up run that fills the page cache; the median and the minimum are reported, with the load average
before and after (a busy machine inflates every figure). ``-X importtime`` of the ONNX path lists what it
imports, to show that PyTorch stays out of it. Results: ``benchmarks/results/predict_startup.md``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_markdown, write_result  # noqa: E402

IMGREC = shutil.which("imgrec", path=os.path.dirname(sys.executable)) or "imgrec"


def _time(cmd: list[str], repeats: int) -> list[float]:
    subprocess.run(cmd, check=True, capture_output=True)  # warm-up: page cache, .pyc files
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - t)
    return out


def _sample_image(work: Path) -> Path:
    subprocess.run([IMGREC, "export-samples", "--data", "fashion-mnist", "--split", "test", "--count", "1",
                    "--out", str(work)], check=True, capture_output=True)
    return next(work.glob("*.png"))


def _imports_torch(model: Path, image: Path) -> bool:
    code = ("import sys; from imgrec.cli import main; sys.argv = ['imgrec', 'predict', '--model', sys.argv[1], "
            "sys.argv[2]]\ntry:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(model), str(image)], check=True, capture_output=True,
                       text=True)
    return "TORCH True" in r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained model directory")
    ap.add_argument("--image", help="the image (default: one Fashion-MNIST test image)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/predict_startup.md")
    args = ap.parse_args()
    model = Path(args.model)
    onnx = model / "model.onnx"
    if not onnx.exists():
        subprocess.run([IMGREC, "export", "--model", str(model)], check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(args.image) if args.image else _sample_image(Path(tmp))
        load_before = os.getloadavg()[0]
        rows = []
        for label, target in (("ONNX Runtime (`model.onnx`)", onnx), ("PyTorch (model directory)", model)):
            times = _time([IMGREC, "predict", "--model", str(target), str(image)], args.repeats)
            rows.append((label, statistics.median(times), min(times), _imports_torch(target, image)))
        load_after = os.getloadavg()[0]
    lines = ["# `imgrec predict` on one image, whole command", "", machine_markdown().rstrip(),
             f"- load average (1 min): {load_before:.2f} before, {load_after:.2f} after",
             f"- command: `python benchmarks/predict_startup.py --model {args.model} --repeats {args.repeats}`; "
             f"image: {args.image or 'one Fashion-MNIST test image (28×28 PNG)'}", "",
             "| model | median | min | imports torch |", "|---|---|---|---|"]
    lines += [f"| {label} | {med:.2f} s | {low:.2f} s | {'yes' if torch else 'no'} |"
              for label, med, low, torch in rows]
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
