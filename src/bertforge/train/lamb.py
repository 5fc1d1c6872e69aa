"""LAMB: Layer-wise Adaptive Moments for Batch training (You et al. 2019, arXiv:1904.00962, Algorithm 2).

torch ships no LAMB, so this is ours: one readable loop over parameters, no foreach/fused kernels. For
every parameter tensor w (one "layer" in the paper's sense) at step t with gradient g:

    m_t = beta1 * m_{t-1} + (1 - beta1) * g                 # first moment (Adam)
    v_t = beta2 * v_{t-1} + (1 - beta2) * g^2               # second moment (Adam)
    m^  = m_t / (1 - beta1^t),  v^ = v_t / (1 - beta2^t)    # bias correction (bias_correction=True)
    r   = m^ / (sqrt(v^) + eps) + weight_decay * w          # Adam direction + decoupled weight decay
    trust = phi(||w||) / ||r||                              # layer-wise trust ratio
            (1.0 when ||w|| == 0 or ||r|| == 0, so fresh zero-initialised tensors still move)
    w   = w - lr * trust * r

phi is the identity, or with `clamp=c` the paper's phi(z) = min(z, c) bounding the weight norm used in
the ratio. A param group with `adapt=False` skips the trust ratio (trust = 1, i.e. plain AdamW-like
steps): Google's BERT LAMB excludes biases and LayerNorm weights from layer adaptation, and
`bertforge.train.optim.build_optimizer` sets it so for the no-weight-decay group.

The trust ratio stays a 0-d tensor (torch.where, no .item()), so a step never syncs the host with GPU.
State per parameter: `step` (int), `exp_avg`, `exp_avg_sq`; `state_dict`/`load_state_dict` are
torch.optim.Optimizer's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from bertforge.errors import require


class Lamb(torch.optim.Optimizer):
    """LAMB optimizer; see the module docstring for the update rule."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        clamp: float | None = None,
        adapt: bool = True,
        bias_correction: bool = True,
    ) -> None:
        require(lr >= 0.0, f"LAMB lr={lr} is negative: pass a learning rate >= 0")
        require(0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0,
                f"LAMB betas={tuple(betas)} are out of range: pass two values in [0, 1), e.g. (0.9, 0.999)")
        require(eps >= 0.0, f"LAMB eps={eps} is negative: pass eps >= 0, e.g. 1e-6")
        require(weight_decay >= 0.0, f"LAMB weight_decay={weight_decay} is negative: pass a value >= 0")
        require(clamp is None or clamp > 0.0, f"LAMB clamp={clamp} must be positive: pass e.g. 10.0 or None")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, clamp=clamp,
                        adapt=adapt, bias_correction=bias_correction)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One LAMB update of every parameter that has a gradient; returns closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Apply the paper's update to one parameter tensor (one "layer")."""
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            # moments in p's dtype, as torch.optim.Optimizer.load_state_dict casts them back to it
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = state["step"]
        grad = p.grad.float()  # update computed in fp32 even for low-precision parameters
        m, v = state["exp_avg"], state["exp_avg_sq"]

        m.mul_(beta1).add_(grad.to(m.dtype), alpha=1.0 - beta1)  # m_t
        v.mul_(beta2).addcmul_(grad.to(v.dtype), grad.to(v.dtype), value=1.0 - beta2)  # v_t
        c1 = 1.0 - beta1**t if group["bias_correction"] else 1.0
        c2 = 1.0 - beta2**t if group["bias_correction"] else 1.0
        m_hat = m.float() / c1
        v_hat = v.float() / c2

        w = p.float()
        r = m_hat / (v_hat.sqrt() + group["eps"])  # Adam direction
        if group["weight_decay"] != 0.0:
            r = r + group["weight_decay"] * w  # decoupled weight decay inside the trust-ratio norm

        if group["adapt"]:
            w_norm = w.norm()
            if group["clamp"] is not None:
                w_norm = w_norm.clamp(max=group["clamp"])  # phi(z) = min(z, clamp)
            r_norm = r.norm()
            ok = (w_norm > 0) & (r_norm > 0)
            trust = torch.where(ok, w_norm / torch.where(ok, r_norm, 1.0), 1.0)  # 0-d tensor
            p.add_((r * (-group["lr"] * trust)).to(p.dtype))
        else:
            p.add_(r.to(p.dtype), alpha=-group["lr"])


__all__ = ["Lamb"]
