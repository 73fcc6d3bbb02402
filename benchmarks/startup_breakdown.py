"""Where the whole `imgrec train` command spends its time, outside the training steps.

    python benchmarks/startup_breakdown.py [--recipe NAME] [--amp none] [-- extra imgrec train options]

Measures, each in a fresh interpreter: the bare interpreter, ``import torch``, the imports of the train
command, and whether torchvision gets imported on the default path; then runs ``imgrec train`` in-process
under cProfile and reports the cumulative time of its phases (data loading, training epochs, per-epoch
validation, checkpoint/weights writes, the final test evaluation). cProfile slows Python-heavy code a little,
so these phase times are upper bounds; the training steps themselves are C++ and barely affected.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time


def fresh(code: str, env: dict | None = None) -> float:
    """Wall seconds of ``python -c code`` in a fresh interpreter (best of 3)."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        best = min(best, time.perf_counter() - t)
    return best


# phases: (label, substrings matched against "file:function" of profiled functions; the largest cumulative wins)
PHASES = [
    ("data loading (IDX gz read, split, channel stats)", [":load_data"]),
    ("training loop (Trainer.fit, incl. validation and writes)", ["trainer.py:fit"]),
    ("  per-epoch validation (all epochs)", ["trainer.py:validate", "trainer.py:evaluate"]),
    ("  weights + checkpoint writes (all epochs)", [":save_checkpoint", ":write_weights"]),
    ("final test evaluation (load best weights + 10k images)", ["predictor.py:load", "evaluate.py:evaluate",
                                                                "predictor.py:evaluate"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--amp", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()

    out = {"interpreter_s": fresh("pass"), "import_torch_s": fresh("import torch")}
    train_mod = "imgrec.engine.train"
    try:
        __import__(train_mod)
    except ImportError:
        train_mod = "imgrec.engine.run"
    out["import_train_path_s"] = fresh(f"import imgrec.cli, {train_mod}")
    out["train_path_modules"] = train_mod

    args = ["train", "--data", "fashion-mnist", "--seed", str(a.seed), "--quiet", "--json"]
    args += (["--recipe", a.recipe] if a.recipe else []) + (["--amp", a.amp] if a.amp else []) + a.extra
    from imgrec.cli import main as cli_main
    with tempfile.TemporaryDirectory() as tmp:
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        try:
            rc = cli_main([*args, "--out", f"{tmp}/run"])
        except SystemExit as e:
            rc = e.code
        prof.disable()
        out["train_command_in_process_s"] = time.perf_counter() - t
        out["exit_code"] = rc
    out["torchvision_imported"] = "torchvision" in sys.modules
    stats = pstats.Stats(prof)
    rows = []
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        rows.append((f"{os.path.basename(file)}:{func}", ct))
    for label, keys in PHASES:
        matches = [(name, ct) for name, ct in rows if any(name.endswith(k) for k in keys)]
        if not matches:
            continue
        if label.startswith(("  weights", "final test")):  # separate calls: add them up
            out[label] = {"s": round(sum(c for _, c in matches), 2), "functions": sorted({n for n, _ in matches})}
        else:
            name, ct = max(matches, key=lambda r: r[1])
            out[label] = {"s": round(ct, 2), "function": name}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
