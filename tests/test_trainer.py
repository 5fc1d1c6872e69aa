"""Trainer unit tests on a toy model: the batch-size ramp (micro-batches per step, data position, the
update it makes) and its configuration errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bertforge.errors import BertforgeError
from bertforge.train.loop import Trainer
from bertforge.train.optim import batch_size_at
from bertforge.train.settings import TrainConfig


class ToyRegression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 1)

    def forward(self, input_ids: torch.Tensor, target: torch.Tensor):
        return SimpleNamespace(loss=((self.linear(input_ids.float()).squeeze(-1) - target) ** 2).mean())


class CountingBatches:
    """Deterministic batch k (B, 3) with a target; its position is the count handed out."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.position = batch_size, 0

    def make(self, k: int) -> dict:
        g = torch.Generator().manual_seed(k)
        x = torch.randn(self.batch_size, 3, generator=g)
        return {"input_ids": x, "target": x.sum(-1) * 0.5 + 1.0}

    def next_batch(self) -> dict:
        self.position += 1
        return self.make(self.position - 1)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def toy_trainer(tmp_path, **train) -> tuple[Trainer, CountingBatches]:
    model = ToyRegression()
    batches = CountingBatches(train.get("batch_size", 4))
    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, log_every=1, **train)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(model, opt, None, batches, cfg), batches


def test_batch_ramp_grows_micro_batches_and_updates_like_a_plain_loop(tmp_path):
    trainer, batches = toy_trainer(tmp_path, batch_size=4, grad_accum=4, max_steps=10,
                                   batch_ramp_start=4, batch_ramp=0.5)
    counts = []
    while not trainer.done():
        counts.append(trainer.micro_batches())
        trainer.train_step()
    expected = [batch_size_at(s * 100_000, 4, 16, 500_000, multiple=4) // 4 for s in range(10)]
    assert counts == expected == [1, 1, 2, 2, 3, 4, 4, 4, 4, 4]
    assert batches.position == sum(counts)  # every micro-batch consumed once, in order

    # the same updates by hand: SGD on the mean loss of each step's micro-batches
    ref = ToyRegression()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    k = 0
    for n in counts:
        opt.zero_grad()
        for _ in range(n):
            b = batches.make(k)
            (ref(**b).loss / n).backward()
            k += 1
        opt.step()
    for a, b in zip(trainer.model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_no_ramp_uses_grad_accum_every_step(tmp_path):
    trainer, batches = toy_trainer(tmp_path, batch_size=2, grad_accum=3, max_steps=4)
    trainer.fit()
    assert batches.position == 12 and trainer.step == 4


@pytest.mark.parametrize("start, ramp, match", [
    (3, 0.5, "multiple of train.batch_size=4"),
    (32, 0.5, "up to batch_size \\* grad_accum = 16"),
    (8, 0.0, "share of the budget"),
    (8, 1.5, "share of the budget"),
])
def test_batch_ramp_bad_settings_are_named(tmp_path, start, ramp, match):
    with pytest.raises(BertforgeError, match=match):
        TrainConfig(batch_size=4, grad_accum=4, max_steps=5, batch_ramp_start=start, batch_ramp=ramp).validate()
