"""The one batch iterator of the training workflows: a plan, this process's share of it, and a collate.

    batches = EpochBatches(plan, collate, rank=r, world=W)
    batch = batches.next_batch()       # dict of tensors for the Trainer
    state = batches.state_dict()       # {"epoch", "position"}: all that resuming needs

`plan(epoch)` returns the epoch's batches as lists of example indices, the same on every process (seeded
by the run's seed and the epoch, never by the process); process r of W takes batches r, r + W, ... and an
epoch ends after `len(plan(epoch)) // W` of them, so every process takes the same number. `collate(indices)`
builds the tensors (`self.current` = (epoch, the batch's index in the plan) while it runs). Pretraining
(packed rows in `data.dataset.ShardLoader`'s order, masks seeded per batch), fine-tuning (length-grouped
buckets), sentence-train (batches without a repeated text) and distillation (plain shuffles) differ only in
their plan and collate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from bertforge.errors import require


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """A plan: the examples permuted by (seed, epoch), cut into batches in that order (the last may be short)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class EpochBatches:
    """Resumable batches from `plan(epoch) -> [indices, ...]` and `collate(indices) -> {name: tensor}`."""

    def __init__(self, plan: Callable[[int], Sequence], collate: Callable[[Sequence[int]], dict], *, rank: int = 0,
                 world: int = 1, what: str = "training examples") -> None:
        self.plan, self.collate_indices, self.rank, self.world = plan, collate, rank, world
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, Sequence] | None = None
        require(self.per_rank_in(0) >= 1, f"the {what} make {len(self.epoch_batches(0))} batches, fewer than the "
                                          f"{world} processes: use fewer processes or more data")

    def epoch_batches(self, epoch: int) -> Sequence:
        """Every process's batches of `epoch` (cached: the plan is computed once per epoch)."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.plan(epoch))
        return self._cache[1]

    def per_rank_in(self, epoch: int) -> int:
        return len(self.epoch_batches(epoch)) // self.world

    @property
    def per_rank(self) -> int:
        """Batches per epoch for one process (epoch 0's count; plans that vary by epoch use per_rank_in)."""
        return self.per_rank_in(0)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.position >= self.per_rank_in(self.epoch):
            self.epoch, self.position = self.epoch + 1, 0
        index = self.position * self.world + self.rank  # the batch's index in the epoch's plan
        self.current = (self.epoch, index)  # for collates that seed by it (pretraining's masks)
        self.position += 1
        return self.collate_indices(self.epoch_batches(self.epoch)[index])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
