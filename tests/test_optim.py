"""LAMB against a hand-computed update, decay groups, schedules at their boundaries, batch-size ramp."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from bertforge.errors import BertforgeError
from bertforge.train.lamb import Lamb
from bertforge.train.optim import (
    OptimConfig,
    TimeBudgetSchedule,
    batch_size_at,
    build_optimizer,
    build_schedule,
    lr_multiplier,
    split_decay_params,
)

# ------------------------------------------------------------------------------------------------ LAMB


def lamb_by_hand(w, grads, lr, betas, eps, wd, adapt=True, clamp=None):
    """The paper's Algorithm 2 in float64 numpy, one tensor = one layer."""
    b1, b2 = betas
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        r = m_hat / (np.sqrt(v_hat) + eps) + wd * w
        w_norm = np.linalg.norm(w) if clamp is None else min(np.linalg.norm(w), clamp)
        r_norm = np.linalg.norm(r)
        trust = w_norm / r_norm if (adapt and w_norm > 0 and r_norm > 0) else 1.0
        w = w - lr * trust * r
    return w


def run_lamb(w0, grads, **kw):
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float32))
    opt = Lamb([p], **kw)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    return p.detach().numpy().astype(np.float64), opt


RNG = np.random.default_rng(0)
W0 = RNG.normal(size=(3, 4))
GRADS = [RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lamb_two_steps_match_hand_computation(wd):
    got, opt = run_lamb(W0, GRADS, lr=0.05, betas=(0.9, 0.999), eps=1e-6, weight_decay=wd)
    want = lamb_by_hand(W0, GRADS, lr=0.05, betas=(0.9, 0.999), eps=1e-6, wd=wd)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, W0)
    assert opt.state[opt.param_groups[0]["params"][0]]["step"] == 2


def test_lamb_trust_ratio_is_a_real_layer_scaling():
    # the step size per layer is lr * ||w||: scaling the weights by 10 scales the update by 10
    small, _ = run_lamb(W0, GRADS[:1], lr=0.01, weight_decay=0.0)
    big, _ = run_lamb(10 * W0, GRADS[:1], lr=0.01, weight_decay=0.0)
    np.testing.assert_allclose(big - 10 * W0, 10 * (small - W0), rtol=1e-4, atol=1e-6)
    update = np.linalg.norm(small - W0)
    assert update == pytest.approx(0.01 * np.linalg.norm(W0), rel=1e-5)


def test_lamb_zero_weights_clamp_and_no_adapt():
    zeros = np.zeros((3, 4))
    got, _ = run_lamb(zeros, GRADS, lr=0.05, weight_decay=0.1)  # ||w|| = 0 -> trust 1 on step 1
    np.testing.assert_allclose(got, lamb_by_hand(zeros, GRADS, 0.05, (0.9, 0.999), 1e-6, 0.1), rtol=1e-5, atol=1e-6)
    got, _ = run_lamb(W0, GRADS, lr=0.05, weight_decay=0.1, clamp=0.5)
    np.testing.assert_allclose(got, lamb_by_hand(W0, GRADS, 0.05, (0.9, 0.999), 1e-6, 0.1, clamp=0.5),
                               rtol=1e-5, atol=1e-6)
    got, _ = run_lamb(W0, GRADS, lr=0.05, weight_decay=0.0, adapt=False)
    np.testing.assert_allclose(got, lamb_by_hand(W0, GRADS, 0.05, (0.9, 0.999), 1e-6, 0.0, adapt=False),
                               rtol=1e-5, atol=1e-6)


def test_lamb_state_dict_round_trip():
    p = nn.Parameter(torch.tensor(W0, dtype=torch.float32))
    opt = Lamb([p], lr=0.05, weight_decay=0.1)
    for g in GRADS:
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    q = nn.Parameter(p.detach().clone())
    restored = Lamb([q], lr=0.05, weight_decay=0.1)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from disk: no shared moment tensors
    assert restored.state[q]["step"] == 2
    g3 = torch.tensor(RNG.normal(size=(3, 4)), dtype=torch.float32)
    p.grad, q.grad = g3, g3.clone()
    opt.step()
    restored.step()
    assert torch.equal(p, q)


def test_lamb_minimises_least_squares():
    torch.manual_seed(0)
    x, w_true = torch.randn(64, 8), torch.randn(8, 1)
    y = x @ w_true
    model = nn.Linear(8, 1)
    opt = Lamb(model.parameters(), lr=0.05, weight_decay=0.0)
    first = None
    for _ in range(200):
        loss = ((model(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first


# ------------------------------------------------------------------------------------------------ groups


class TinyBert(nn.Module):
    """Parameter names as in HF BERT (and a pre-LN final norm), with the MLM decoder tied."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(50, 8)
        self.embeddings.position_embeddings = nn.Embedding(16, 8)
        self.embeddings.LayerNorm = nn.LayerNorm(8)
        self.query = nn.Linear(8, 8)
        self.output_LayerNorm = nn.LayerNorm(8)
        self.final_norm = nn.LayerNorm(8, bias=False)
        self.decoder = nn.Linear(8, 50)
        self.decoder.weight = self.embeddings.word_embeddings.weight  # tied
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1])
        h = self.embeddings.LayerNorm(self.embeddings.word_embeddings(ids) + self.embeddings.position_embeddings(pos))
        h = self.final_norm(self.output_LayerNorm(h + self.query(h)))
        return self.decoder(h)  # (B, T, V)


DECAY = {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight", "query.weight"}
NO_DECAY = {"embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias", "query.bias", "output_LayerNorm.weight",
            "output_LayerNorm.bias", "final_norm.weight", "decoder.bias"}


def test_split_decay_params_on_bert_names():
    decay, no_decay = split_decay_params(TinyBert())
    assert {n for n, _ in decay} == DECAY  # tied decoder weight once, frozen layer excluded
    assert {n for n, _ in no_decay} == NO_DECAY


@pytest.mark.parametrize("name", ["adamw", "lamb", "adafactor"])
def test_build_optimizer_groups(name):
    model = TinyBert()
    opt = build_optimizer(model, OptimConfig(optimizer=name, weight_decay=0.05), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in decay["params"]} == DECAY
    assert {by_id[id(p)] for p in no_decay["params"]} == NO_DECAY
    if name == "lamb":
        assert decay["adapt"] and not no_decay["adapt"]
        no_wd = build_optimizer(model, OptimConfig(optimizer=name, weight_decay=0.0), "cpu").param_groups
        assert no_wd[0]["adapt"] and not no_wd[1]["adapt"]  # adaptation follows the group, not the decay value
    if name == "adamw":
        assert opt.defaults["fused"] is True  # the fused kernel on CPU too
        assert build_optimizer(model, OptimConfig(), "cuda").defaults["fused"] is True


def test_fused_cpu_adamw_steps_like_the_reference_loop():
    """Our CPU AdamW (fused kernel) makes the same updates as torch's single-tensor reference."""
    torch.manual_seed(0)
    model, ref = TinyBert(), TinyBert()
    ref.load_state_dict(model.state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, schedule="constant")
    opt = build_optimizer(model, cfg, "cpu")
    ref_opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in
                                 build_optimizer(ref, cfg, "cpu").param_groups],
                                lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
    ids = torch.randint(0, 50, (4, 16))
    for _ in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(ids).square().mean().backward()
            o.step()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert (a - b).abs().max().item() <= 1e-6, n


@pytest.mark.parametrize("name", ["adamw", "lamb", "adafactor"])
def test_optimizers_step_and_reduce_loss(name):
    torch.manual_seed(0)
    model = TinyBert()
    ids = torch.randint(0, 50, (4, 16))
    cfg = OptimConfig(optimizer=name, lr=1e-2, schedule="constant")
    opt = build_optimizer(model, cfg, "cpu")
    sched = build_schedule(opt, cfg, total_steps=30)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# ------------------------------------------------------------------------------------------------ schedules


def test_linear_warmup_and_decay_boundaries():
    cfg = OptimConfig(schedule="linear", warmup_steps=10, min_lr_ratio=0.1)
    m = [lr_multiplier(s / 100, cfg, 100) for s in (0, 5, 10, 55, 100, 150)]
    assert m == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1, 0.1], abs=1e-12)
    assert lr_multiplier(10 / 100, cfg, 100) == 1.0 and lr_multiplier(1.0, cfg, 100) == 0.1


def test_lambda_lr_follows_multiplier_step_by_step():
    cfg = OptimConfig(lr=1e-3, schedule="linear", warmup_steps=10)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched = build_schedule(opt, cfg, total_steps=100)
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(100):
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen[0] == 0.0 and seen[10] == pytest.approx(1e-3, abs=0) and seen[100] == 0.0
    assert seen[99] == pytest.approx(1e-3 / 90)  # the last update still moves
    assert all(a <= b for a, b in zip(seen[:10], seen[1:11])) and all(a >= b for a, b in zip(seen[10:], seen[11:]))


def test_cosine_boundaries_and_midpoint():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.2)
    assert lr_multiplier(0.0, cfg, 110) == 0.0
    assert lr_multiplier(10 / 110, cfg, 110) == 1.0
    assert lr_multiplier(60 / 110, cfg, 110) == pytest.approx(0.2 + 0.8 * 0.5, abs=1e-12)
    assert lr_multiplier(35 / 110, cfg, 110) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(1.0, cfg, 110) == 0.2


def test_constant_and_one_cycle():
    const = OptimConfig(schedule="constant", warmup_ratio=0.1)
    assert [lr_multiplier(p, const) for p in (0.0, 0.05, 0.1, 0.7, 1.0)] == pytest.approx([0, 0.5, 1, 1, 1])
    cycle = OptimConfig(schedule="one-cycle", warmup_ratio=0.25)
    assert [lr_multiplier(p, cycle) for p in (0.0, 0.125, 0.25, 0.625, 1.0)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    assert lr_multiplier(1.0, cycle) == 0.0


def test_wsd_phase_edges():
    cfg = OptimConfig(schedule="wsd", warmup_ratio=0.1, decay_ratio=0.2, min_lr_ratio=0.1)
    assert lr_multiplier(0.05, cfg) == pytest.approx(0.5)
    assert lr_multiplier(0.1, cfg) == 1.0  # end of warmup
    assert lr_multiplier(0.5, cfg) == 1.0 and lr_multiplier(0.7999, cfg) == 1.0  # stable
    assert lr_multiplier(0.8, cfg) == 1.0  # decay starts here
    assert lr_multiplier(0.9, cfg) == pytest.approx(0.55)
    assert lr_multiplier(1.0, cfg) == 0.1
    steps = OptimConfig(schedule="wsd", warmup_steps=7, decay_ratio=0.3)
    assert lr_multiplier(63 / 90, steps, 90) == 1.0 and lr_multiplier(1.0, steps, 90) == 0.0


def test_time_schedule_reaches_zero_exactly_at_deadline():
    cfg = OptimConfig(lr=2e-3, schedule="time", warmup_ratio=0.1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched = build_schedule(opt, cfg, budget_seconds=100.0)
    assert isinstance(sched, TimeBudgetSchedule) and sched.get_last_lr() == [0.0]
    sched.step(5.0)
    assert sched.get_last_lr()[0] == pytest.approx(1e-3)
    sched.step(10.0)
    assert sched.get_last_lr()[0] == pytest.approx(2e-3, abs=0)
    sched.step(50.0)  # half the budget: 1 - (0.5 - 0.1) / 0.9
    assert sched.get_last_lr()[0] == pytest.approx(2e-3 * 0.5 / 0.9)
    assert not sched.finished
    sched.step(100.0)
    assert sched.get_last_lr() == [0.0] and sched.finished
    sched.step(250.0)
    assert sched.get_last_lr() == [0.0]
    sched.set_progress(0.5)
    assert sched.get_last_lr()[0] == pytest.approx(2e-3 * 0.5 / 0.9)


def test_time_schedule_state_dict_round_trip():
    cfg = OptimConfig(lr=1e-3, schedule="time", warmup_ratio=0.05)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched = build_schedule(opt, cfg, budget_seconds=3600.0)
    sched.step(1234.5)
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched2 = build_schedule(opt2, cfg, budget_seconds=60.0)  # a different budget is overwritten by the state
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.budget_seconds == 3600.0
    sched.step(2000.0)
    sched2.step(2000.0)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 2000 / 3600) / 0.95)


def test_time_schedule_without_budget_uses_progress():
    cfg = OptimConfig(lr=1e-3, schedule="time")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched = build_schedule(opt, cfg)
    assert sched.get_last_lr() == [1e-3]
    sched.set_progress(0.75)
    assert sched.get_last_lr()[0] == pytest.approx(0.25e-3)
    with pytest.raises(BertforgeError, match="budget_seconds"):
        sched.step(10.0)


def test_bad_configs_raise():
    cases = [
        (dict(optimizer="sgd"), "optimizer 'sgd'"),
        (dict(schedule="poly"), "schedule 'poly'"),
        (dict(warmup_steps=10, warmup_ratio=0.1), "both set"),
        (dict(schedule="one-cycle", min_lr_ratio=0.1), "does not apply"),
        (dict(schedule="time", warmup_steps=5), "warmup_ratio"),
        (dict(schedule="wsd", warmup_ratio=0.5, decay_ratio=0.6), "exceed 1"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(lr=0.0), "lr=0.0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BertforgeError, match=message):
            OptimConfig(**kwargs)
    assert OptimConfig(betas=[0.9, 0.98]).betas == (0.9, 0.98)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(BertforgeError, match="exceeds total_steps"):
        build_schedule(opt, OptimConfig(warmup_steps=50), total_steps=20)
    with pytest.raises(BertforgeError, match="total_steps"):
        build_schedule(opt, OptimConfig())
    with pytest.raises(BertforgeError, match="exceed 1"):
        build_schedule(opt, OptimConfig(schedule="wsd", warmup_steps=90, decay_ratio=0.2), total_steps=100)
    with pytest.raises(BertforgeError, match="no trainable"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), OptimConfig())


# ------------------------------------------------------------------------------------------------ batch ramp


def test_batch_size_ramp():
    sizes = [batch_size_at(s, 32, 256, 100, 32) for s in range(150)]
    assert sizes[0] == 32 and sizes[50] == 128 and sizes[100] == 256 and sizes[149] == 256
    assert sizes[99] == 224  # rounded down to the multiple until the ramp ends
    assert all(s % 32 == 0 for s in sizes) and all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert batch_size_at(0, 64, 64, 10) == 64 and batch_size_at(3, 8, 128, 0) == 128
    with pytest.raises(BertforgeError, match="multiples of 32"):
        batch_size_at(0, 40, 256, 100, 32)
    with pytest.raises(BertforgeError, match="start <= final"):
        batch_size_at(0, 256, 32, 100)
