"""train/batches.py: the one batch iterator: rank shares, epochs, exact resume, plans that vary by epoch."""

from __future__ import annotations

import numpy as np
import pytest

from bertforge.errors import BertforgeError
from bertforge.train.batches import EpochBatches, shuffled_batches


def take(batches: EpochBatches, n: int) -> list[list[int]]:
    return [batches.next_batch() for _ in range(n)]


def test_shuffled_plan_covers_every_example_once_per_epoch():
    plan = shuffled_batches(10, 4, seed=3, epoch=0)
    assert [len(b) for b in plan] == [4, 4, 2]
    assert sorted(int(i) for b in plan for i in b) == list(range(10))
    assert [b.tolist() for b in plan] != [b.tolist() for b in shuffled_batches(10, 4, seed=3, epoch=1)]


def test_processes_split_the_plan_and_every_process_takes_the_same_count():
    def plan(epoch):
        return [[epoch, i] for i in range(7)]  # 7 batches over 3 processes: 2 each, the 7th is left out

    ranks = [EpochBatches(plan, list, rank=r, world=3) for r in range(3)]
    got = [take(b, 4) for b in ranks]
    assert got[0] == [[0, 0], [0, 3], [1, 0], [1, 3]]
    assert got[1] == [[0, 1], [0, 4], [1, 1], [1, 4]]
    assert got[2] == [[0, 2], [0, 5], [1, 2], [1, 5]]


def test_state_resumes_exactly_also_when_epochs_differ_in_length():
    def plan(epoch):
        return [[epoch, i] for i in range(3 + epoch % 2)]  # 3, 4, 3, 4 ... batches

    straight = take(EpochBatches(plan, list), 12)
    first = EpochBatches(plan, list)
    head = take(first, 5)
    again = EpochBatches(plan, list)
    again.load_state_dict(first.state_dict())
    assert head + take(again, 7) == straight
    assert straight[3:7] == [[1, 0], [1, 1], [1, 2], [1, 3]]  # epoch 1 has 4 batches


def test_too_few_batches_for_the_processes_is_an_error():
    with pytest.raises(BertforgeError, match="fewer than the 4 processes"):
        EpochBatches(lambda epoch: [np.arange(2)], list, rank=0, world=4)
