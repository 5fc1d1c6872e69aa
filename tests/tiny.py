"""Shared by the tests: a tiny model config, the CLI overrides of a tiny pretraining run, a run's losses."""

from __future__ import annotations

import json
from pathlib import Path

from bertforge.model.bert import BertConfig

# `bertforge pretrain` overrides for a tiny, deterministic run (dropout off, a log line every step)
TINY_PRETRAIN = ["model.preset=tiny", "model.max_position_embeddings=64", "model.hidden_dropout_prob=0",
                 "model.attention_probs_dropout_prob=0", "train.progress=false", "train.log_every=1"]
# ... with a fixed small batch, no evaluation until the end, and a constant learning rate
TINY_STEADY = [*TINY_PRETRAIN, "train.batch_size=8", "train.eval_every=0", "optim.lr=1e-3", "optim.warmup_steps=0",
               "optim.schedule=constant"]


def tiny_config(**overrides) -> BertConfig:
    """The `tiny` preset with dropout off (outputs comparable run to run); `overrides` win."""
    return BertConfig.from_preset("tiny", **{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                             **overrides})


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss logged in a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}
