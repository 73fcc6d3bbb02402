"""Several processes: data-parallel training started by ``torchrun`` (or ``imgrec train --nproc N``).

torchrun starts one process per device and describes the job in environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); :func:`setup` joins that process group — gloo on
CPUs, nccl on CUDA GPUs — and without those variables it does nothing, so one process runs exactly as before.
Rank 0 is the only process that prints progress or writes files; every collective here is called by all ranks
at the same point of the program, or it would wait for the missing ones.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from imgrec.errors import ConfigError

__all__ = ["Context", "StopRequest", "all_gather_cat", "all_reduce_sum", "barrier", "broadcast_state", "check_sync_bn",
           "cleanup", "env_rank", "is_main", "launched", "rank", "setup", "world_size"]


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {os.environ[name]!r}") from None


def env_rank() -> int:
    """This process's rank as the launcher set it (0 without one); readable before the group is joined."""
    return _env_int("RANK", 0)


def launched() -> bool:
    """True inside a process that torchrun started for a job of more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


@dataclass
class Context:
    """Where this process stands in the job. ``owns_group``: we joined the group, so we leave it."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> Context:
    """Join the process group that torchrun's environment describes; one process without it.

    ``device`` is the device the run asked for: each process of a CUDA job takes GPU ``LOCAL_RANK`` (so
    ``cuda:N`` means "CUDA" here), a CPU job uses gloo. A process group the caller already joined is used as is.
    """
    if not launched() and not is_initialized():
        return Context(device=device)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", _env_int("WORLD_SIZE", 1))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"several processes train on CPUs (gloo) or CUDA GPUs (nccl), not on {device.type}")
    owns = False
    if not is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start several processes with "
                              "torchrun or `imgrec train --nproc N`")
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        owns = True
        # leave the group when the process ends, however train() ends (error, Ctrl-C): no try/finally around it
        import atexit
        atexit.register(_destroy)
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   local_world_size=local_world, device=device, owns_group=owns)


def _destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def check_sync_bn(sync_bn: bool, device: torch.device, world: int) -> None:
    """--sync-bn is torch's SyncBatchNorm, which runs on GPUs only: say so before any process starts."""
    if sync_bn and world > 1 and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA GPUs; on CPUs each process normalises its own share of the batch "
                          "(leave --sync-bn out)")


def cleanup(ctx: Context) -> None:
    if ctx.owns_group:
        _destroy()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place (every rank gets the same bytes back)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0 in rank order (sizes may differ, none is padded into the
    result); the result is on the CPU. ``device`` is where the backend moves tensors (CPU for gloo)."""
    world = world_size()
    if world == 1:
        return t
    x = t.to(device).contiguous()
    sizes = torch.zeros(world, dtype=torch.long, device=device)
    sizes[rank()] = x.shape[0]
    all_reduce_sum(sizes)
    sizes_l = sizes.tolist()
    # all_gather needs equal shapes: pad to the largest share, then keep only each rank's real rows
    padded = torch.zeros((max(sizes_l), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes_l)]).cpu()


@torch.no_grad()
def broadcast_state(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (in place)."""
    if world_size() == 1:
        return
    for v in module.state_dict().values():
        if isinstance(v, torch.Tensor):
            dist.broadcast(v, src=0)


class StopRequest:
    """SIGINT and SIGTERM set a flag instead of raising, while training runs on several processes.

    Why: a KeyboardInterrupt lands wherever a process happens to be, and the ranks are then at different
    points — one inside a gradient all-reduce waits for a peer that has already left. With the flag, the
    ranks agree at the next step boundary (the flag rides on the all-reduce of the running sums), all stop
    after the same step, rank 0 alone writes the checkpoint, and every process then exits as after Ctrl-C.
    torchrun forwards a Ctrl-C or SIGTERM to every worker once and kills them 30 s later, so a second
    signal is not turned into an immediate exit here.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> "StopRequest":
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread: signals stay as they were
            self._old.clear()
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
