"""Run configs: defaults <- file <- dotted overrides, typed, unknown keys rejected; durations; checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from bertforge.config import load_run_config, parse_duration
from bertforge.errors import BertforgeError
from bertforge.train.checkpoint import CheckpointManager
from bertforge.workflows.pretrain import PretrainRunConfig, build_model_config


def test_partial_section_keeps_the_run_defaults():
    cfg = load_run_config(PretrainRunConfig, overrides=["optim.lr=1e-3", "train.max_steps=5"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.warmup_ratio == 0.06  # the run's default, not OptimConfig's 0
    assert cfg.train.max_steps == 5 and cfg.train.output_dir == "runs/pretrain"


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "optim:\n  lr: 2.0e-3\n  betas: [0.9, 0.98]\ntrain:\n  batch_size: 8\n"),
    (".toml", "[optim]\nlr = 2.0e-3\nbetas = [0.9, 0.98]\n[train]\nbatch_size = 8\n"),
    (".json", json.dumps({"optim": {"lr": 2e-3, "betas": [0.9, 0.98]}, "train": {"batch_size": 8}})),
])
def test_file_then_overrides(tmp_path, suffix, text):
    path = tmp_path / f"recipe{suffix}"
    path.write_text(text)
    cfg = load_run_config(PretrainRunConfig, file=path, overrides=["train.batch_size=16", "model.preset=tiny"])
    assert cfg.optim.lr == 2e-3 and cfg.optim.betas == (0.9, 0.98)
    assert cfg.train.batch_size == 16 and cfg.model == {"preset": "tiny"}


@pytest.mark.parametrize("override, needle", [
    ("optim.nonsense=1", "optim.nonsense"),
    ("train.batch_size=many", "integer"),
    ("train.progress=maybe", "true/false"),
    ("optim.lr", "no '='"),
    ("optim.lr.x=1", "is a value"),
])
def test_bad_overrides_are_one_line_errors(override, needle):
    with pytest.raises(BertforgeError, match=None) as err:
        load_run_config(PretrainRunConfig, overrides=[override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_shipped_recipes_load(tmp_path):
    from pathlib import Path

    for recipe in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        cfg = load_run_config(PretrainRunConfig, file=recipe)
        model = build_model_config(cfg.model, vocab_size=30522)
        assert model.vocab_size == 30528  # padded to a multiple of 64
        assert cfg.train.max_steps or cfg.train.time_budget


def test_model_section_rejects_unknown_fields():
    with pytest.raises(BertforgeError, match="hidden_sise"):
        build_model_config({"preset": "tiny", "hidden_sise": 3}, 100)
    with pytest.raises(BertforgeError, match="smaller than the tokenizer"):
        build_model_config({"preset": "tiny", "vocab_size": 64}, 100)


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("15m", 900), ("1.5h", 5400), (None, None)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_duration():
    with pytest.raises(BertforgeError, match="duration"):
        parse_duration("soon")


def test_checkpoints_keep_last_n_and_best(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        ckpt.save(step, {"step": step}, is_best=step == 20)
    kept = sorted(p.name for p in tmp_path.glob("step_*"))
    assert kept == ["step_00000020", "step_00000030", "step_00000040"]  # last two + best
    assert ckpt.latest().name == "step_00000040" and ckpt.best().name == "step_00000020"
    assert ckpt.load()["step"] == 40
    (tmp_path / ".tmp-leftover").mkdir()  # a save killed half way
    ckpt.save(50, {"step": torch.tensor(50)})
    assert not (tmp_path / ".tmp-leftover").exists() and ckpt.load()["step"] == 50
    (tmp_path / ".step_00000060.tmp-1-ab").mkdir()  # the same, as atomic.atomic_folder names it
    ckpt.save(60, {"step": torch.tensor(60)})
    assert not list(tmp_path.glob(".*")) and ckpt.load()["step"] == 60


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(1, {"step": 1})
    (tmp_path / "step_00000001" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BertforgeError, match="cannot be read"):
        ckpt.load()
