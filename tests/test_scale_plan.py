"""The memory planner: its activation count against what autograd really saves, its peak against measured
peaks on CPU (three shapes, within 20%), and the `bertforge plan` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bertforge.cli import main as cli_main
from bertforge.model.bert import BertConfig
from bertforge.model.heads import BertForMaskedLM
from bertforge.plan import estimate

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
sys.path.insert(0, str(BENCH.parent))
from bench_memory import MALLOC_ENV  # noqa: E402


def saved_bytes(cfg: BertConfig, B: int, T: int, precision: str) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward (parameters excluded)."""
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=g)
    pos = torch.rand(B, T - 2, generator=g).argsort(1)[:, :round(0.15 * (T - 2))] + 1
    labels = torch.full((B, T), -100).scatter_(1, pos, ids.gather(1, pos))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset,overrides", [
    ("mini", {}),  # post-LN with dropout: the CPU math attention path
    ("mini", {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}),  # fused attention
    ("budget-mini", {}),  # pre-LN, no bias, GeGLU
    ("mini", {"gradient_checkpointing": True}),
    ("budget-mini", {"position_embedding_type": "rotary"}),  # the gpu-budget recipe's positions
])
def test_activation_count_matches_what_autograd_saves(preset, overrides, precision):
    cfg = BertConfig.from_preset(preset, num_hidden_layers=2, **overrides)
    counted = saved_bytes(cfg, 2, 64, precision)
    planned = estimate(cfg, 2, 64, precision=precision, device="cpu",
                       gradient_checkpointing=cfg.gradient_checkpointing).activations
    assert abs(planned - counted) <= 0.03 * counted, (planned, counted)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mini:16:128:plain", "small:4:256:bf16", "mini:8:512:gc"])
def test_planned_peak_is_within_20_percent_of_the_measured_peak(case):
    proc = subprocess.run([sys.executable, str(BENCH), "--child", "--cases", case, "--steps", "2"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["peak_mb"] > 150  # the model and its activations, not the runtime, dominate
    assert 0.8 <= r["plan_mb"] / r["peak_mb"] <= 1.2, r


def test_plan_command_and_what_each_option_saves(capsys):
    def plan(*extra: str) -> dict:
        assert cli_main(["plan", "--preset", "base", "--batch", "32", "--seq", "128", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    plain, bf16, gc, off, fsdp = (plan(), plan("--precision", "bf16"), plan("--gradient-checkpointing"),
                                  plan("--offload"), plan("--fsdp", "4"))
    P = plain["num_parameters"]
    assert 109e6 < P < 111e6 and plain["parameters"] == plain["gradients"] == 4 * P and plain["optimizer"] == 8 * P
    assert bf16["activations"] < plain["activations"] and gc["activations"] < plain["activations"] / 4
    assert off["optimizer"] == 0 and off["host"] == 16 * P and off["peak"] < plain["peak"]
    assert fsdp["optimizer"] == 8 * P // 4 and fsdp["peak"] < plain["peak"]
    assert plain["devices_gib"]["16"]["fits"] and plain["devices_gib"]["16"]["max_batch"] > 32
    assert cli_main(["plan", "--preset", "base", "--seq", "1024"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
    assert cli_main(["plan", "--preset", "gigantic"]) == 2
    assert "preset" in capsys.readouterr().err
    assert cli_main(["plan", "--preset", "mini"]) == 0
    out = capsys.readouterr().out
    assert "peak (estimate)" in out and "141 GiB" in out
