"""torchrun plumbing: environment, init/cleanup, rank helpers, reductions.

Launch: `torchrun --nproc_per_node N -m bertforge pretrain ...` (DistributedDataParallel), or with
`train.parallel=fsdp` (FSDP2, `bertforge.train.fsdp`). Without torchrun's environment every helper
degrades to the single-process answer, so library code calls them unconditionally.
Backend: nccl on CUDA, gloo on CPU (both parallel modes tested with two CPU processes).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist


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


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed() -> bool:
    """Initialise the process group when launched by torchrun; returns True when distributed."""
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend)
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
