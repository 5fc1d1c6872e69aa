"""Fully sharded data parallelism for `train.parallel=fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`).

Launched exactly as DDP (`torchrun --nproc_per_node N -m bertforge pretrain ... train.parallel=fsdp`). Each
`BertLayer` is one FSDP unit and the root module (embeddings, tied MLM head, final norm) another, so a
process holds 1/N of every parameter, gradient and optimizer moment and all-gathers one layer at a time.
Gradients are averaged over processes (reduce-scatter), so N processes with accumulation A equal one
process with accumulation N * A, as with DDP. Autocast (`train.precision`) works unchanged.

The optimizer is built before the Trainer wraps the model; `fully_shard` replaces every parameter by a
sharded `DTensor` one, so `shard_model` points the optimizer's groups at the new parameters by name.

Checkpoints (every rank takes part):

    checkpoints/step_XXXXXXXX/
      state.pt                   rank 0's trainer progress (marks the checkpoint complete, as without FSDP)
      model/                     the consolidated model in our format (gathered to rank 0), as without FSDP
      shards/dcp/                model + optimizer, sharded, written by torch.distributed.checkpoint
      shards/trainer_rank{r}.pt  each rank's progress: step, scheduler, RNG, data position

Shards are written into `checkpoints/.shards-step_XXXXXXXX` and moved into the step folder by rank 0 inside
the atomic save, so a killed save leaves no half checkpoint. Resume needs the same number of processes
(the data order is split by rank); the model + optimizer shards themselves are re-shardable by DCP.
"""

from __future__ import annotations

import copy
import os
import shutil
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bertforge.errors import BertforgeError
from bertforge.train import distributed as dist
from bertforge.train.checkpoint import DamagedCheckpoint, load_state
from bertforge.train.faults import check_resume_config

SHARDS = "shards"
_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # sharded model -> meta-device copy


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """fully_shard each BertLayer, then the root, in place; re-point `optimizer` at the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from bertforge.model.bert import BertLayer
    from bertforge.train.offload import CPUOffloadOptimizer

    if isinstance(optimizer, CPUOffloadOptimizer):
        raise BertforgeError("optim.offload=cpu does not combine with train.parallel=fsdp (FSDP already splits "
                             "the optimizer state over the processes): use one of them")
    if optimizer.state:
        raise BertforgeError("shard_model needs a fresh optimizer: build it before the first step")
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    # a parameter-free copy on the meta device: the consolidated model is loaded into it for saving
    memo = {id(t): (nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad) if isinstance(t, nn.Parameter)
                    else torch.empty_like(t, device="meta")) for t in [*model.parameters(), *model.buffers()]}
    _TEMPLATES[model] = copy.deepcopy(model, memo)
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    for module in model.modules():
        if isinstance(module, BertLayer):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = dict(model.named_parameters())
    for group, keys in zip(optimizer.param_groups, group_names):
        group["params"] = [sharded[k] for k in keys]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0's CPU ({} on the other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def consolidated(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded) module of the same class holding `state` (from `full_state_dict`), for saving."""
    plain = _TEMPLATES[model]
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


def save_consolidated(model: nn.Module, directory: Path, write) -> None:
    """Gather the model to rank 0 and `write(plain_module, directory)` there; every rank must call it."""
    state = full_state_dict(model)
    if dist.is_main():
        write(consolidated(model, state), directory)
    dist.barrier()


def save_checkpoint(trainer: Any, is_best: bool) -> Path | None:
    """Sharded model + optimizer (DCP), per-rank progress, consolidated model; returns the folder on rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root, step = trainer.ckpt.root, trainer.step
    staging = root / f".shards-step_{step:08d}"
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".shards-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=staging / "dcp")
    progress = {**trainer.progress_state(), "sharded": True, "world_size": dist.world_size()}
    torch.save(progress, staging / f"trainer_rank{dist.rank()}.pt")
    full = full_state_dict(trainer.model)
    dist.barrier()
    path = None
    if dist.is_main():
        def write(directory: Path) -> None:
            if trainer.save_model_fn is not None:
                trainer.save_model_fn(consolidated(trainer.model, full), directory)
            os.replace(staging, directory.parent / SHARDS)

        path = trainer.ckpt.save(step, progress, write, is_best=is_best)
    dist.barrier()
    return path


def read_progress(trainer: Any, path: Path) -> dict:
    """This process's progress in sharded checkpoint `path`, checked (a missing or unreadable part:
    DamagedCheckpoint; another process count or config: an error)."""
    shards = path / SHARDS
    if not shards.is_dir():
        raise BertforgeError(f"checkpoint '{path}' was written without FSDP: resume it with train.parallel=ddp "
                             f"or start a new run directory")
    mine = shards / f"trainer_rank{dist.rank()}.pt"
    if not mine.is_file():
        raise BertforgeError(f"checkpoint '{path}' has no state for process {dist.rank()}: resume with the "
                             f"number of processes that wrote it")
    if not (shards / "dcp" / ".metadata").is_file():
        raise DamagedCheckpoint(f"checkpoint '{path}' lacks its shard index ({shards / 'dcp' / '.metadata'})")
    progress = load_state(mine)
    if progress["world_size"] != dist.world_size():
        raise BertforgeError(f"checkpoint '{path}' was written by {progress['world_size']} processes, this run has "
                             f"{dist.world_size()}: resume with --nproc_per_node {progress['world_size']}")
    check_resume_config(progress.get("config"), trainer.run_config, path)
    return progress


def load_checkpoint(trainer: Any, path: Path, progress: dict) -> None:
    """Every rank loads its model + optimizer shards (DCP) and its progress (from `read_progress`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path / SHARDS / "dcp")
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    trainer.load_progress_state(progress)
