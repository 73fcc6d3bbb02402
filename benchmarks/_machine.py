"""Machine facts written beside every benchmark result."""
from __future__ import annotations

import datetime
import os
import platform


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    import torch
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags.split()]
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": ",".join(isa), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "date": datetime.date.today().isoformat(), "load_1min": round(load, 2),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_markdown() -> str:
    m = machine_info()
    return (f"- CPU: {m['cpu']} ({m['cores']} cores available; {m['isa']})\n"
            f"- GPU: {m['gpu'] or 'none'}\n- torch {m['torch']}, Python {m['python']}, {m['torch_threads']} threads\n"
            f"- date: {m['date']}; 1-minute load average when it started: {m['load_1min']}\n")


def write_result(out: str, lines: list[str]) -> None:
    """Print a Markdown result and write it to ``out``."""
    from pathlib import Path
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
