"""torchrun plumbing: environment, init/cleanup, rank helpers, reductions.

Launch: `torchrun --nproc_per_node N -m bertforge pretrain ...` (DistributedDataParallel), or with
`train.parallel=fsdp` (FSDP2, `bertforge.train.fsdp`). Without torchrun's environment every helper
degrades to the single-process answer, so library code calls them unconditionally.
Backend: nccl on CUDA, gloo on CPU (both parallel modes tested with two CPU processes).

Faults: every collective times out after `train.dist_timeout_minutes` (a rank that died or diverged ends
the run with an error instead of a silent hang), and each worker asks the kernel to kill it when its
launcher dies (`kill -9` of torchrun, a lost node agent), so no orphan keeps training into the run folder.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys

import torch
import torch.distributed as tdist

from bertforge.launch import launched_by_torchrun

PR_SET_PDEATHSIG = 1  # prctl(2) option: a signal sent to this process when its parent dies


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def die_with_launcher() -> None:
    """Linux: have the kernel SIGKILL this worker when its parent (the torchrun agent) dies."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def init_distributed(timeout_minutes: float = 30.0) -> bool:
    """Initialise the process group when launched by torchrun; returns True when distributed.

    `timeout_minutes` bounds every collective: a rank that waits longer for the others fails with an error."""
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    die_with_launcher()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def cleanup() -> None:
    if is_distributed():
        tdist.barrier()
        tdist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def _reduce(value: float, device: torch.device, op) -> float:
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=op)
    return t.item()


def sum_int(value: int, device: torch.device) -> int:
    return int(_reduce(value, device, tdist.ReduceOp.SUM)) if is_distributed() else int(value)


def mean_float(value: float, device: torch.device) -> float:
    if not is_distributed():
        return float(value)
    return _reduce(value, device, tdist.ReduceOp.SUM) / world_size()


def max_float(value: float, device: torch.device) -> float:
    """The largest value over ranks (the value itself without DDP)."""
    if not is_distributed():
        return float(value)
    return _reduce(value, device, tdist.ReduceOp.MAX)
