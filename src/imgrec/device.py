"""Device, precision and thread choices: what runs fast where."""
from __future__ import annotations

import functools
import os

import torch

from imgrec.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA GPU is available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device mps requested but MPS is not available")
    return dev


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AMX or AVX512-BF16), where bf16 autocast pays off.

    Without them PyTorch emulates bf16 and autocast is slower than fp32, so imgrec stays in fp32.
    """
    # oneDNN limited below its bf16 instruction sets (ONEDNN_MAX_CPU_ISA=AVX2, say) runs bf16 emulated too
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if not (isa == "ALL" or any(k in isa for k in ("BF16", "AMX", "FP16", "AVX10"))):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        return False


def amp_dtype(amp: str, device: torch.device, model_gains_from_cpu_bf16: bool = True) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (auto | bf16 | fp16 | none) on ``device``, or None for fp32.

    On a CPU, "auto" means bf16 where the CPU has bf16 instructions *and* the model gains from it
    (``model_gains_from_cpu_bf16``): memory-bound networks (depthwise convolutions, tiny channel counts) run
    slower in bf16 there, measured per model by benchmarks/throughput.py and recorded as ``cpu_bf16`` in the
    registry (the caller looks it up: this module knows nothing of models).
    """
    if amp == "none":
        return None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        if amp == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if device.type == "mps":
        return torch.float16 if amp in ("auto", "fp16") else torch.bfloat16
    if amp == "fp16":
        raise ConfigError("fp16 autocast is not supported on the CPU; use --amp bf16 or none")
    if amp == "bf16":
        return torch.bfloat16
    if not cpu_has_fast_bf16() or not model_gains_from_cpu_bf16:
        return None
    return torch.bfloat16


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads: int | None) -> None:
    torch.set_num_threads(max(1, int(threads or usable_cores())))
