"""Optimizers, learning-rate schedules and the batch-size ramp.

`build_optimizer` makes AdamW (the fused kernel on CPU and CUDA; on CPU it updates about 7x faster than
the foreach one, docs/RESULTS.md), our LAMB (`bertforge.train.lamb`) or `torch.optim.Adafactor` over
two parameter groups: weight decay on matrices, none on biases and norm weights (every tensor with
ndim < 2, or whose name contains "norm", which covers the embeddings' LayerNorm). Embedding matrices
are decayed, as in Hugging Face's BERT recipes. `offload="cpu"` wraps any of them so its state and the
fp32 master step live on the CPU (`bertforge.train.offload.CPUOffloadOptimizer`).

Every schedule is one pure function, `lr_multiplier(progress, cfg, total_steps)`, of training progress
in [0, 1] (clamped outside it), so boundaries can be tested directly:

    warmup   progress < w: multiplier = progress / w     (w from warmup_steps / total_steps or warmup_ratio)
    constant 1 after warmup
    linear   1 at w, straight down to min_lr_ratio at progress 1
    cosine   1 at w, half a cosine down to min_lr_ratio at progress 1
    one-cycle  1 at w, straight down to exactly 0 at progress 1 (the budget "triangle")
    wsd      warmup, stable at 1 until 1 - decay_ratio, straight down to min_lr_ratio at progress 1
    time     one-cycle in wall-clock time: progress = elapsed_seconds / budget_seconds, so the rate is
             exactly 0 at the deadline and stays 0 past it; warmup is a fraction of the budget

Step schedules are `torch.optim.lr_scheduler.LambdaLR` with progress = step / total_steps, where step
counts completed optimizer steps (LambdaLR's convention): the first update runs at multiplier(0) (0 with
warmup, as in Hugging Face's schedules) and the end value is reached at step == total_steps, just after
the last update. The time schedule is `TimeBudgetSchedule`: the trainer sets its progress (the share of
the budget spent) before each update, or passes elapsed seconds; its state_dict carries it across resumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bertforge.errors import require
from bertforge.train.lamb import Lamb

OPTIMIZERS = ("adamw", "lamb", "adafactor")
OFFLOADS = ("none", "cpu")
SCHEDULES = ("linear", "cosine", "constant", "one-cycle", "wsd", "time")
TO_ZERO = ("one-cycle", "time")  # schedules that end at exactly 0, so min_lr_ratio does not apply


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule settings (validated on construction)."""

    optimizer: str = "adamw"  # "adamw" | "lamb" | "adafactor"
    lr: float = 1e-4  # peak learning rate (Adafactor: its maximum relative step size)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW and LAMB; Adafactor has no first moment
    eps: float = 1e-6  # AdamW and LAMB; Adafactor keeps its own (None, 1e-3)
    schedule: str = "linear"  # "linear" | "cosine" | "constant" | "one-cycle" | "wsd" | "time"
    warmup_steps: int = 0  # give this or warmup_ratio, not both
    warmup_ratio: float = 0.0  # fraction of total steps (or of the time budget for "time")
    decay_ratio: float = 0.1  # wsd: final fraction of training spent decaying
    min_lr_ratio: float = 0.0  # end multiplier for linear, cosine, wsd
    clip_grad_norm: float = 1.0  # max global gradient norm; 0 disables clipping
    offload: str = "none"  # "cpu": optimizer state and the fp32 master step on the CPU (train/offload.py)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # YAML/TOML give lists
        require(self.optimizer in OPTIMIZERS,
                f"optimizer '{self.optimizer}' is unknown: pass one of {', '.join(OPTIMIZERS)}")
        require(self.schedule in SCHEDULES,
                f"schedule '{self.schedule}' is unknown: pass one of {', '.join(SCHEDULES)}")
        require(self.lr > 0, f"lr={self.lr} must be positive: pass e.g. 1e-4")
        require(self.weight_decay >= 0, f"weight_decay={self.weight_decay} is negative: pass a value >= 0")
        require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
                f"betas={self.betas} are out of range: pass two values in [0, 1), e.g. (0.9, 0.999)")
        require(self.eps > 0, f"eps={self.eps} must be positive: pass e.g. 1e-6")
        require(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} is negative: pass a value >= 0")
        require(0.0 <= self.warmup_ratio < 1.0,
                f"warmup_ratio={self.warmup_ratio} is out of range: pass a value in [0, 1)")
        require(not (self.warmup_steps and self.warmup_ratio),
                f"warmup_steps={self.warmup_steps} and warmup_ratio={self.warmup_ratio} are both set: pass one")
        require(0.0 < self.decay_ratio <= 1.0,
                f"decay_ratio={self.decay_ratio} is out of range: pass a value in (0, 1], e.g. 0.1")
        require(0.0 <= self.min_lr_ratio <= 1.0,
                f"min_lr_ratio={self.min_lr_ratio} is out of range: pass a value in [0, 1]")
        require(self.schedule not in TO_ZERO or self.min_lr_ratio == 0.0,
                f"min_lr_ratio={self.min_lr_ratio} does not apply to schedule '{self.schedule}' (it ends at 0): "
                "set min_lr_ratio=0 or use 'linear'")
        require(self.schedule != "time" or self.warmup_steps == 0,
                "schedule 'time' warms up over a fraction of the time budget: set warmup_ratio, not warmup_steps")
        require(self.schedule != "wsd" or self.warmup_ratio + self.decay_ratio <= 1.0,
                f"wsd warmup_ratio={self.warmup_ratio} + decay_ratio={self.decay_ratio} exceed 1: lower one")
        require(self.offload in OFFLOADS, f"offload '{self.offload}' is unknown: pass one of {', '.join(OFFLOADS)}")
        require(self.clip_grad_norm >= 0,
                f"clip_grad_norm={self.clip_grad_norm} is negative: pass a value > 0, or 0 to disable")


# ---------------------------------------------------------------------------------------------- optimizer


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases and norm weights (any tensor with ndim < 2, or a name containing 'norm') get no decay."""
    return p.ndim < 2 or "norm" in name.lower()


def split_decay_params(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(decayed, not decayed) trainable named parameters; tied weights appear once."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append((name, p))
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` over the decay / no-decay groups (build after moving the model).
    With `cfg.offload == "cpu"` it is wrapped so that its state and step live on the CPU."""
    groups = param_groups(model, cfg)
    if cfg.offload == "cpu":
        from bertforge.train.offload import CPUOffloadOptimizer

        return CPUOffloadOptimizer(groups, lambda host_groups: make_optimizer(host_groups, cfg, "cpu"))
    return make_optimizer(groups, cfg, device_type)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Weight decay on matrices, none on biases and norms; LAMB's groups also say whether to adapt."""
    decay, no_decay = split_decay_params(model)
    require(bool(decay or no_decay), "model has no trainable parameters: unfreeze some before training")
    lamb = cfg.optimizer == "lamb"
    groups: list[dict[str, Any]] = []
    for params, wd, adapt in ((decay, cfg.weight_decay, True), (no_decay, 0.0, False)):
        if params:
            groups.append({"params": [p for _, p in params], "weight_decay": wd})
            if lamb:  # as Google's BERT LAMB: biases and norm weights skip layer adaptation too
                groups[-1]["adapt"] = adapt
    return groups


def make_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """`cfg.optimizer` over prepared parameter groups; fused AdamW on CPU and CUDA."""
    if cfg.optimizer == "adamw":
        kernel = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kernel)
    if cfg.optimizer == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.Adafactor(groups, lr=cfg.lr)


# ---------------------------------------------------------------------------------------------- schedules


def warmup_fraction(cfg: OptimConfig, total_steps: int | None = None) -> float:
    """Warmup as a fraction of training: warmup_steps / total_steps, else warmup_ratio."""
    if cfg.warmup_steps:
        require(total_steps is not None and total_steps >= cfg.warmup_steps,
                f"warmup_steps={cfg.warmup_steps} exceeds total_steps={total_steps}: lower warmup_steps")
        return cfg.warmup_steps / total_steps  # type: ignore[operator]
    return cfg.warmup_ratio


def lr_multiplier(progress: float, cfg: OptimConfig, total_steps: int | None = None) -> float:
    """Multiplier of the peak lr at `progress` in [0, 1] (clamped); see the module docstring."""
    p = min(max(float(progress), 0.0), 1.0)
    w = warmup_fraction(cfg, total_steps)
    if p < w:
        return p / w
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        start = 1.0 - cfg.decay_ratio
        if p < start:
            return 1.0
        remaining = (1.0 - p) / (1.0 - start)  # exactly 1 -> 0 over the decay phase
    else:
        remaining = (1.0 - p) / (1.0 - w) if w < 1.0 else 0.0  # 1 at end of warmup -> 0 at the end
    floor = 0.0 if cfg.schedule in TO_ZERO else cfg.min_lr_ratio
    shape = 0.5 * (1.0 - math.cos(math.pi * remaining)) if cfg.schedule == "cosine" else remaining
    return floor + (1.0 - floor) * shape


def build_schedule(
    optimizer: torch.optim.Optimizer,
    cfg: OptimConfig,
    total_steps: int | None = None,
    *,
    budget_seconds: float | None = None,
) -> torch.optim.lr_scheduler.LambdaLR | TimeBudgetSchedule:
    """LambdaLR over `total_steps` for step schedules; `TimeBudgetSchedule` for schedule "time" (give
    `budget_seconds` to drive it with `step(elapsed_seconds)`, or none and call `set_progress(p)`)."""
    if cfg.schedule == "time":
        return TimeBudgetSchedule(optimizer, cfg, budget_seconds)
    require(total_steps is not None and total_steps > 0,
            f"schedule '{cfg.schedule}' needs total_steps > 0, got {total_steps}: set max_steps or epochs")
    w = warmup_fraction(cfg, total_steps)
    require(cfg.schedule != "wsd" or w + cfg.decay_ratio <= 1.0,
            f"wsd warmup ({w:.3f} of training) + decay_ratio={cfg.decay_ratio} exceed 1: lower one")
    fn: Callable[[int], float] = lambda step: lr_multiplier(step / total_steps, cfg, total_steps)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


class TimeBudgetSchedule:
    """Wall-clock one-cycle schedule: lr = base_lr * lr_multiplier(elapsed / budget), 0 at the deadline.

    The trainer either calls `set_progress(p)` before each update with the share of its budget spent, or
    `step(elapsed_seconds)` with its accumulated training time when built with `budget_seconds`;
    `finished` turns true at the deadline. `state_dict` holds budget, progress and base lrs, so a
    resumed run continues on the same curve.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                 budget_seconds: float | None = None) -> None:
        require(cfg.schedule == "time", f"TimeBudgetSchedule needs schedule 'time', got '{cfg.schedule}'")
        require(budget_seconds is None or budget_seconds > 0,
                f"time budget {budget_seconds}s must be positive: pass seconds > 0")
        self.optimizer = optimizer
        self.cfg = cfg
        self.budget_seconds = None if budget_seconds is None else float(budget_seconds)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.progress = 0.0
        self._apply()

    @property
    def multiplier(self) -> float:
        return lr_multiplier(self.progress, self.cfg)

    @property
    def finished(self) -> bool:
        return self.progress >= 1.0

    def _apply(self) -> None:
        m = self.multiplier
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * m

    def set_progress(self, progress: float) -> None:
        """Set progress (elapsed / budget; values past 1 mean past the deadline) and update the lrs."""
        self.progress = max(float(progress), 0.0)
        self._apply()

    def step(self, elapsed_seconds: float) -> None:
        """Update the lrs for `elapsed_seconds` of training time spent so far."""
        require(self.budget_seconds is not None,
                "TimeBudgetSchedule.step(elapsed) needs budget_seconds: build it with one or call set_progress(p)")
        self.set_progress(elapsed_seconds / self.budget_seconds)  # type: ignore[operator]

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"budget_seconds": self.budget_seconds, "progress": self.progress, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budget_seconds = state["budget_seconds"]
        self.base_lrs = list(state["base_lrs"])
        self.set_progress(state["progress"])


# ---------------------------------------------------------------------------------------------- batch size


def batch_size_at(step: int, start: int, final: int, ramp_steps: int, multiple: int = 1) -> int:
    """Batch size at `step` of a linear ramp from `start` to `final` over `ramp_steps`, rounded down to a
    multiple of `multiple` (start and final must be multiples); `final` from `ramp_steps` on."""
    require(multiple > 0, f"batch-size multiple={multiple} must be positive: pass e.g. 8")
    require(0 < start <= final, f"batch-size ramp start={start}, final={final}: need 0 < start <= final")
    require(start % multiple == 0 and final % multiple == 0,
            f"batch-size ramp start={start} and final={final} must be multiples of {multiple}: round them")
    require(step >= 0 and ramp_steps >= 0, f"step={step} and ramp_steps={ramp_steps} must be >= 0")
    if step >= ramp_steps:
        return final
    grown = (final - start) * step // ramp_steps  # exact integer arithmetic
    return start + grown // multiple * multiple


__all__ = ["OFFLOADS", "OPTIMIZERS", "SCHEDULES", "OptimConfig", "TimeBudgetSchedule", "batch_size_at", "build_optimizer",
           "build_schedule", "lr_multiplier", "make_optimizer", "param_groups", "split_decay_params",
           "warmup_fraction"]
