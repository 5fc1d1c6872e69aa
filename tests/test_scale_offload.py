"""optim.offload=cpu: the offloaded optimizer updates exactly as the plain one, its state dict is the plain
layout (checkpoints move between the two), and a pretraining run with it equals the plain run."""

from __future__ import annotations

import pytest
import torch

from bertforge.model.bert import BertConfig
from bertforge.model.heads import BertForMaskedLM
from bertforge.train.offload import CPUOffloadOptimizer
from bertforge.train.optim import OptimConfig, build_optimizer, build_schedule, make_optimizer, param_groups


def tiny_model() -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig.from_preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def batches(n: int, vocab: int = 99) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (4, 16), generator=g)
        labels = torch.where(torch.rand(4, 16, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        out.append({"input_ids": ids, "labels": labels})
    return out


def train(model, optimizer, data, clip: float = 1.0, warmup: int = 2) -> list[float]:
    sched = OptimConfig(lr=3e-3, warmup_steps=warmup, schedule="linear" if warmup else "constant")
    schedule = build_schedule(optimizer, sched, total_steps=len(data))
    losses = []
    for b in data:
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    return losses


def offloaded(model, cfg: OptimConfig, bucket_mb: float) -> CPUOffloadOptimizer:
    return CPUOffloadOptimizer(param_groups(model, cfg), lambda g: make_optimizer(g, cfg, "cpu"), bucket_mb=bucket_mb)


@pytest.mark.parametrize("optimizer", ["adamw", "lamb", "adafactor"])
@pytest.mark.parametrize("bucket_mb", [32.0, 0.002])  # one bucket per group; many small buckets
def test_offload_updates_exactly_as_the_plain_optimizer(optimizer, bucket_mb):
    cfg = OptimConfig(optimizer=optimizer, lr=3e-3)
    data = batches(6)
    plain, off = tiny_model(), tiny_model()
    opt = offloaded(off, cfg, bucket_mb)
    assert (len(opt.buckets) > 2) == (bucket_mb < 1)
    la = train(plain, build_optimizer(plain, cfg, "cpu"), data)
    lb = train(off, opt, data)
    assert la == lb
    for (name, a), b in zip(plain.state_dict().items(), off.state_dict().values()):
        assert torch.equal(a, b), name


def test_state_dict_moves_between_offloaded_and_plain():
    cfg = OptimConfig(lr=3e-3)
    data = batches(8)
    ref = tiny_model()
    ref_losses = train(ref, build_optimizer(ref, cfg), data, warmup=0)

    a = tiny_model()  # 4 steps offloaded: its state dict equals the plain optimizer's after 4 steps
    opt_a = offloaded(a, cfg, 0.002)
    train(a, opt_a, data[:4], warmup=0)
    saved = opt_a.state_dict()
    plain_ref = tiny_model()
    plain_opt = build_optimizer(plain_ref, cfg)
    train(plain_ref, plain_opt, data[:4], warmup=0)
    expected = plain_opt.state_dict()
    assert saved["param_groups"] == expected["param_groups"] and saved["state"].keys() == expected["state"].keys()
    for i, st in expected["state"].items():
        assert all(torch.equal(st[k], saved["state"][i][k]) for k in st)

    b = tiny_model()  # a plain checkpoint resumed by the offloaded optimizer continues identically
    b.load_state_dict(plain_ref.state_dict())
    opt_b = offloaded(b, cfg, 32.0)
    opt_b.load_state_dict(expected)
    assert train(b, opt_b, data[4:], warmup=0) == ref_losses[4:]
    assert all(torch.equal(x, y) for x, y in zip(ref.state_dict().values(), b.state_dict().values()))


def test_offload_keeps_no_optimizer_state_beside_the_parameters_and_rejects_bad_values():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(offload="cpu"))
    train(model, opt, batches(1), warmup=0)
    assert not opt.state  # the outer optimizer (device side) holds nothing
    inner = [t for b in opt.buckets for st in b.inner.state.values() for t in st.values() if torch.is_tensor(t)]
    assert inner and all(t.device.type == "cpu" for t in inner)
    from bertforge.errors import BertforgeError

    with pytest.raises(BertforgeError, match="offload 'gpu'"):
        OptimConfig(offload="gpu")
