"""Optimizer-state offload (`optim.offload=cpu`): the optimizer's state and its fp32 master step on the CPU.

AdamW keeps two fp32 moments per parameter, so with fp32 weights and gradients the optimizer is half of
a model's training memory before activations. `CPUOffloadOptimizer` keeps on the device only what the
forward and backward need (parameters and their gradients) and holds on the CPU an fp32 master copy of
every parameter and the wrapped optimizer's state (moments, step):

    step():  gradients -> CPU (pinned buffers)  ->  optimizer step on the fp32 masters (fused CPU AdamW)
             ->  masters -> parameters on the device (cast to the parameter dtype)

The parameters are split into buckets of about `bucket_mb`; each bucket has its own inner optimizer, so
the copies overlap with the CPU work: all gradient copies start at once (non-blocking, each bucket
records a CUDA event), the CPU steps bucket i as soon as its gradients have landed, and bucket i's
updated masters go back (non-blocking, from pinned memory) while the CPU steps bucket i + 1. Copies on
the current stream are ordered before the next forward, so no extra synchronisation is needed.

On a machine without CUDA the same staging path runs with ordinary (unpinned) CPU buffers: the update
is then exactly the plain optimizer's (tested bitwise), with the extra memory of the master copy.

The outer object is a `torch.optim.Optimizer` over the device parameters, so schedulers, `GradScaler`,
gradient clipping and `zero_grad` work unchanged; learning rate and other hyperparameters set on its
`param_groups` are copied to the inner optimizers before each step. `state_dict()` has the plain
optimizer's layout (state keyed by parameter index, tensors on the CPU), so a checkpoint loads into
either the offloaded or the plain optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bertforge.errors import BertforgeError


@dataclass
class _Bucket:
    group: int  # index of the outer param group
    indices: list[int]  # outer parameter indices (torch's state_dict numbering)
    params: list[torch.nn.Parameter]  # on the device
    masters: list[torch.Tensor]  # fp32 on the CPU
    grads: list[torch.Tensor]  # fp32 on the CPU, the staging buffers
    inner: torch.optim.Optimizer | None = None
    event: Any = None  # torch.cuda.Event after the gradient copies were queued
    has_grad: list[bool] = field(default_factory=list)


class CPUOffloadOptimizer(torch.optim.Optimizer):
    """Wraps the optimizer `make_inner(groups)` builds so its state and step live on the CPU."""

    def __init__(self, groups: list[dict], make_inner: Callable[[list[dict]], torch.optim.Optimizer],
                 bucket_mb: float = 32.0):
        probe = make_inner([{"params": [torch.zeros(1, requires_grad=True)]}])
        super().__init__(groups, dict(probe.defaults))
        self.pin = torch.cuda.is_available()  # pinned host memory needs CUDA; plain buffers otherwise
        self.buckets: list[_Bucket] = []
        limit = int(bucket_mb * 2**20 / 4)
        index = 0
        for g, group in enumerate(self.param_groups):
            bucket: _Bucket | None = None
            size = 0
            for p in group["params"]:
                if bucket is None or size + p.numel() > limit:
                    bucket, size = _Bucket(g, [], [], [], []), 0
                    self.buckets.append(bucket)
                size += p.numel()
                bucket.indices.append(index)
                bucket.params.append(p)
                bucket.masters.append(self._host(p))
                bucket.grads.append(self._host(p, zero=True))
                index += 1
        for b in self.buckets:
            hyper = {k: v for k, v in self.param_groups[b.group].items() if k != "params"}
            b.inner = make_inner([{"params": b.masters, **hyper}])
        self._synced = False  # masters are refreshed from the parameters before the first step

    def _host(self, p: torch.Tensor, zero: bool = False) -> torch.Tensor:
        t = torch.zeros(p.shape, dtype=torch.float32, device="cpu", pin_memory=self.pin)
        if not zero:
            t.copy_(p.detach())
        return t

    @torch.no_grad()
    def sync_masters(self) -> None:
        """Copy the device parameters into the fp32 masters (after loading weights into the model)."""
        for b in self.buckets:
            for p, m in zip(b.params, b.masters):
                m.copy_(p.detach())
        self._synced = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._synced:
            self.sync_masters()
        for b in self.buckets:  # queue every gradient copy first
            b.has_grad = [p.grad is not None for p in b.params]
            for p, m, buf, has in zip(b.params, b.masters, b.grads, b.has_grad):
                if has:
                    buf.copy_(p.grad, non_blocking=p.grad.is_cuda)
                m.grad = buf if has else None
            if any(p.is_cuda for p in b.params):
                b.event = torch.cuda.Event()
                b.event.record()
        for b in self.buckets:  # step each bucket on the CPU as its gradients land; copy it back
            if b.event is not None:
                b.event.synchronize()
                b.event = None
            if not any(b.has_grad):
                continue
            inner_group = b.inner.param_groups[0]
            inner_group.update({k: v for k, v in self.param_groups[b.group].items() if k != "params"})
            b.inner.step()
            for p, m, has in zip(b.params, b.masters, b.has_grad):
                if has:
                    p.copy_(m, non_blocking=p.is_cuda and self.pin)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The plain optimizer's layout: {"state": {index: {...}}, "param_groups": [...]}, tensors on the CPU."""
        out = super().state_dict()
        state = {}
        for b in self.buckets:
            for i, m in zip(b.indices, b.masters):
                if m in b.inner.state:
                    state[i] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.inner.state[m].items()}
        out["state"] = state
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the plain optimizer (state tensors go to the CPU)."""
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise BertforgeError("optimizer checkpoint does not match the model's parameter groups: "
                                 "resume with the same model and optimizer settings")
        for mine, saved in zip(self.param_groups, groups):
            mine.update({k: v for k, v in saved.items() if k != "params"})
        saved_state = state_dict["state"]
        for b in self.buckets:
            b.inner.state.clear()
            for i, m in zip(b.indices, b.masters):
                if i in saved_state:
                    b.inner.state[m] = {k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v)
                                        for k, v in saved_state[i].items()}
        self._synced = False  # the model's weights are loaded alongside: re-read them before the next step
