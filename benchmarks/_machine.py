"""Machine facts written beside every benchmark result."""
from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path


def machine_info() -> dict:
    info = cpuinfo("model name", "flags")
    cpu = info.get("model name") or platform.processor() or "unknown"
    flags = info.get("flags", "")
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
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)


def machine_class() -> str:
    """cpu-bf16 | cpu-fp32 | cpu-fp32, emulated AVX2 | gpu: which table this invocation's numbers belong to."""
    m = machine_info()
    if m["gpu"]:
        return "gpu"
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("AVX2"):
        return "cpu-fp32, emulated AVX2"
    return "cpu-bf16" if ("avx512_bf16" in m["isa"] or "amx_bf16" in m["isa"]) else "cpu-fp32"


def cpuinfo(*keys: str) -> dict[str, str]:
    """The first value of each of ``keys`` in /proc/cpuinfo (keys it lacks, or a system without it: absent)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in keys and key not in found:
                    found[key] = value.strip()
                    if len(found) == len(keys):
                        break
    except OSError:
        pass
    return found


def cpu_flags_line() -> str:
    return cpuinfo("flags").get("flags", "unknown")


def cpu_family_model() -> str:
    """'family F model M' from /proc/cpuinfo (x86), or '' where it does not say."""
    info = cpuinfo("cpu family", "model")
    return f"family {info['cpu family']} model {info['model']}" if len(info) == 2 else ""


def replace_section(path, cls: str, lines: list[str], heading: str) -> str:
    """The text of the file at ``path`` with the section of machine class ``cls`` replaced by ``lines`` (the
    sections of other machine classes kept); a file without sections starts with ``heading``."""
    path = Path(path)
    begin, end = f"<!-- machine-class: {cls} -->", f"<!-- end: {cls} -->"
    block = "\n".join([begin, *lines, end])
    text = path.read_text() if path.is_file() else ""
    if "<!-- machine-class:" not in text:
        text = heading
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip("\n") + "\n\n" + block + "\n"
