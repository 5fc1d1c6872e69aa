"""benchmarks/bench_gpu.py: its FLOP formula against torch's FLOP counter, and a CPU smoke run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_gpu  # noqa: E402


@pytest.mark.parametrize("impl,layout", [("ours", "post"), ("hf", "post"), ("ours", "budget")])
def test_train_flops_match_the_counted_matmuls(impl, layout):
    """Forward + backward of one step, counted op by op (eager attention so every matmul is visible)."""
    from bertforge.model.bert import BertConfig

    cfg = BertConfig.from_preset("mini", vocab_size=30528, num_hidden_layers=2, **bench_gpu.LAYOUTS[layout])
    case = bench_gpu.Case(impl, "mini", layout, "fp32", False, 2, 32)
    model = bench_gpu.build_models(case, cfg, torch.device("cpu"))
    if impl == "hf":
        model.config._attn_implementation = "eager"
    else:
        for layer in model.bert.layers:
            layer.attention.eager = True
    batch = bench_gpu.make_batch(2, 32, 30522, torch.device("cpu"))
    labelled = int((batch["labels"] != -100).sum())
    assert labelled == 2 * round(0.25 * 30)
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    assert bench_gpu.train_flops(cfg, 2, 32, labelled, sparse=impl == "ours") == counter.get_total_flops()


@pytest.mark.slow
def test_cpu_smoke_runs_and_records_every_case(tmp_path):
    out = tmp_path / "gpu.json"
    cases = ["ours/base/budget/bf16/compile/4x32", "hf/base/post/fp32/eager", "gc/4x64", "offload"]
    proc = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--cpu-smoke", "--out", str(out),
                           "--only", *cases], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    names = [r["case"] for r in data["results"]]
    assert len(names) == 5 and all(r["status"] == "ok" for r in data["results"]), data["results"]
    for r in data["results"]:
        assert r["tokens_per_s"] > 0 and r["model_tflop_per_step"] > 0 and r["loss"] > 0
        assert (r["compile_s"] is not None) == r["spec"]["compile"]
    assert data["meta"]["peak_tflops"] == 989.0
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ours") + table.count("\n| hf") == 5
