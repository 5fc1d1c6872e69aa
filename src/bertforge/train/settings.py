"""The engine's run settings (`TrainConfig`, the `train:` section of every recipe), the device choice and
the random generators' state (saved in checkpoints as tensors and plain values, so they load with
`torch.load(weights_only=True)`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from bertforge.errors import BertforgeError
from bertforge.train import distributed as dist

PRECISIONS = ("fp32", "bf16", "fp16")
PARALLELS = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    output_dir: str = "runs/run"
    batch_size: int = 32  # per process, per micro-batch
    grad_accum: int = 1
    # Batch-size ramp (optional): the effective batch per process (batch_size x micro-batches) grows
    # linearly from batch_ramp_start to batch_size * grad_accum over the first batch_ramp share of the
    # budget, in whole micro-batches. The micro-batch stays fixed, so the data position stays exact.
    batch_ramp_start: int = 0  # 0 = no ramp; else a multiple of batch_size, <= batch_size * grad_accum
    batch_ramp: float = 0.0  # share of the budget (steps, tokens or time) spent ramping
    epochs: float | None = None  # passes over the data when no other budget is set (None: the workflow's
    # default, fine-tuning 3, sentence-train and distill 1); pretraining sets max_steps/tokens/time instead
    max_steps: int | None = None  # optimizer steps
    max_tokens: int | None = None  # non-padding tokens seen, all processes
    time_budget: str | None = None  # wall clock, e.g. "1h", "45m"
    precision: str = "fp32"  # fp32 | bf16 (autocast, CPU/CUDA) | fp16 (autocast + GradScaler, CUDA)
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallel: str = "ddp"  # under torchrun: ddp (replicated) | fsdp (FSDP2, sharded; train/fsdp.py)
    dist_timeout_minutes: float = 30.0  # under torchrun: a collective waiting longer fails the run
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # steps; 0 = only at the end
    eval_every_minutes: float = 0.0
    save_every: int = 0  # steps; 0 = only at the end
    save_every_minutes: float = 0.0
    keep_last: int = 2
    best_metric: str = "eval_loss"
    greater_is_better: bool = False
    resume: bool = False
    resume_from: str | None = None  # a checkpoint folder (or a run folder) to resume from; implies resume
    overwrite: bool = False  # start over in a folder that holds an earlier run (its files are deleted)
    loss_threshold: float | None = None  # stop if train loss stays above it ...
    loss_threshold_after: float = 0.25  # ... once this share of the budget is spent
    plateau_warn_after: float = 0.3  # warn once if the loss is still on the unigram plateau by then (0 = off)
    progress: bool = True
    tensorboard: bool = False

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise BertforgeError(f"train.precision '{self.precision}': use one of {', '.join(PRECISIONS)}")
        if self.max_steps is None and self.max_tokens is None and self.time_budget is None:
            raise BertforgeError("no stopping rule: set train.max_steps, train.max_tokens or train.time_budget")
        if not self.dist_timeout_minutes > 0:
            raise BertforgeError(f"train.dist_timeout_minutes={self.dist_timeout_minutes}: give a positive number "
                                 "of minutes, e.g. 30")
        if self.parallel not in PARALLELS:
            raise BertforgeError(f"train.parallel '{self.parallel}': use one of {', '.join(PARALLELS)}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise BertforgeError("train.batch_size and train.grad_accum must be at least 1")
        if self.batch_ramp_start:
            final = self.batch_size * self.grad_accum
            if self.batch_ramp_start % self.batch_size or not 0 < self.batch_ramp_start <= final:
                raise BertforgeError(f"train.batch_ramp_start={self.batch_ramp_start}: use a multiple of "
                                     f"train.batch_size={self.batch_size} up to batch_size * grad_accum = {final}")
            if not 0.0 < self.batch_ramp <= 1.0:
                raise BertforgeError(f"train.batch_ramp={self.batch_ramp}: give the share of the budget to ramp "
                                     "over, in (0, 1], e.g. 0.1")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if dist.is_distributed() and torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BertforgeError(f"device '{name}' requested but CUDA is not available: use train.device=cpu")
    return device


def rng_state() -> dict:
    """Every generator's state in types `torch.load(weights_only=True)` reads (no numpy arrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                 numpy["cached_gaussian"])
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
