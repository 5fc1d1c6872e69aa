"""System tests of pretraining: loss goes down, SIGKILL + resume equals an uninterrupted run (bitwise),
two-process gloo DDP equals one process with twice the accumulation, sanity passes and fails, CLI smoke."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_PRETRAIN, step_losses

from bertforge.cli import main as cli_main

TINY = TINY_PRETRAIN


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bertforge", *args], env=env(), capture_output=True, text=True,
                          timeout=300, **kw)


def test_pretrain_loss_goes_down_and_saves_model(prepared, tmp_path):
    from bertforge.config import load_run_config
    from bertforge.model.loading import load_model
    from bertforge.workflows.pretrain import PretrainRunConfig, main

    cfg = load_run_config(PretrainRunConfig, file=Path(__file__).parents[1] / "configs" / "tiny-smoke.yaml",
                          overrides=[f"data.path={prepared}", f"train.output_dir={tmp_path / 'run'}",
                                     "train.max_steps=60", "train.eval_every=30", "optim.lr=2e-3", *TINY])
    summary = main(cfg)
    curve = step_losses(tmp_path / "run")
    first = sum(curve[s] for s in range(1, 6)) / 5
    last = sum(curve[s] for s in range(56, 61)) / 5
    assert last < first - 0.5, (first, last)  # from ln(V) = 6.9 towards the unigram level
    assert summary["step"] == 60 and summary["stop_reason"] == "budget"
    assert 0 < summary["eval_accuracy"] <= 1 and summary["eval_perplexity"] == pytest.approx(
        torch.tensor(summary["eval_loss"]).exp().item(), rel=1e-6)
    loaded = load_model(tmp_path / "run" / "model")
    assert loaded.head == "masked_lm" and loaded.tokenizer is not None
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["preset"] == "tiny"


def test_sigkill_and_resume_equals_uninterrupted(prepared, tmp_path):
    common = ["pretrain", "--data", str(prepared), "--max-steps", "1200", "--config",
              str(Path(__file__).parents[1] / "configs" / "tiny-smoke.yaml"), *TINY,
              "train.save_every=100", "train.eval_every=0", "train.batch_size=8", "optim.lr=1e-3",
              "model.hidden_dropout_prob=0.1"]  # dropout on: its RNG state must resume too
    straight = run_cli([*common, "--output", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bertforge", *common, "--output", str(killed_dir)],
                            env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed_dir / "checkpoints" / "step_00000200").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(step_losses(killed_dir))
    assert killed_at < 1200
    resumed = run_cli([*common, "--output", str(killed_dir), "--resume"])
    assert resumed.returncode == 0, resumed.stderr

    a, b = step_losses(tmp_path / "straight"), step_losses(killed_dir)
    assert sorted(a) == sorted(b) == list(range(1, 1201))
    assert a == b  # the same loss curve, bit for bit
    wa = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    wb = load_file(killed_dir / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_accumulation(prepared, tmp_path):
    common = ["pretrain", "--data", str(prepared), "--max-steps", "6", *TINY, "train.batch_size=8",
              "train.eval_every=0", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant"]
    single = run_cli([*common, "--output", str(tmp_path / "single"), "train.grad_accum=2"])
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "bertforge", *common, "--output", str(tmp_path / "ddp"),
                          "train.grad_accum=1"], env=env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count('"stop_reason"') == 1  # the summary comes from rank 0 only
    wa = load_file(tmp_path / "single" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    la, lb = step_losses(tmp_path / "single"), step_losses(tmp_path / "ddp")
    assert all(abs(la[s] - lb[s]) <= 1e-5 for s in la)


@pytest.mark.slow
def test_two_process_ddp_time_budget_with_batch_ramp_ends_together(prepared, tmp_path):
    """Under a wall-clock budget the ranks share one clock (the slowest rank's), so they agree on the
    time schedule, the batch-size ramp's micro-batch count and the last step: the run ends cleanly."""
    args = ["pretrain", "--data", str(prepared), *TINY, "train.batch_size=4", "train.eval_every=0",
            "train.max_steps=null", "train.time_budget=6s", "optim.schedule=time", "train.grad_accum=3",
            "train.batch_ramp_start=4", "train.batch_ramp=0.5", "--output", str(tmp_path / "ddp")]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29534", "-m", "bertforge", *args], env=env(), capture_output=True,
                         text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["stop_reason"] == "budget" and summary["elapsed"] >= 6.0 and summary["step"] > 2
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["tokens"] for r in records if "loss" in r]
    assert per_step[-1] == summary["tokens"]
    micro = [round((b - a) / (2 * 4 * 64)) for a, b in zip([0, *per_step], per_step)]  # micro-batches per step
    assert micro[0] == 1 and micro[-1] == 3 and micro == sorted(micro)  # the ramp: 1 micro-batch, then 2, 3


def test_sanity_passes_healthy_and_fails_broken(prepared, capsys):
    ok = cli_main(["sanity", "--data", str(prepared), *TINY, "optim.lr=3e-3", "--steps", "150"])
    out = capsys.readouterr().out
    assert ok == 0, out
    assert "PASS" in out
    bad = cli_main(["sanity", "--data", str(prepared), *TINY, "optim.lr=1.0", "optim.clip_grad_norm=0",
                    "--steps", "60"])
    out = capsys.readouterr().out
    assert bad == 1 and "FAIL" in out and "too high" in out


def test_cli_raw_text_to_checkpoint(shared_data, tmp_path):
    """tokenizer train -> prepare -> pretrain through the CLI; the loss went down."""
    text = (shared_data / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")[:200_000]
    (tmp_path / "raw.txt").write_text(text, encoding="utf-8")
    assert cli_main(["tokenizer", "train", str(tmp_path / "raw.txt"), "--out", str(tmp_path / "tok"),
                     "--vocab-size", "800"]) == 0
    assert cli_main(["prepare", str(tmp_path / "raw.txt"), "--tokenizer", str(tmp_path / "tok"), "--output",
                     str(tmp_path / "data"), "--seq-len", "64", "--num-workers", "0", "--no-progress"]) == 0
    assert cli_main(["pretrain", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"),
                     "--max-steps", "40", *TINY, "optim.lr=2e-3", "train.batch_size=16"]) == 0
    curve = step_losses(tmp_path / "run")
    assert curve[40] < curve[1] - 0.5
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_bad_inputs_give_one_line_errors(prepared, tmp_path, capsys):
    assert cli_main(["pretrain", "--data", str(tmp_path / "nope"), "--max-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "prepare" in err[0]
    assert cli_main(["pretrain", "--data", str(prepared), "--max-steps", "2", "optim.nonsense=1"]) == 2
    assert "optim.nonsense" in capsys.readouterr().err
    assert cli_main(["pretrain", "--data", str(prepared), "model.preset=gigantic", "--max-steps", "2"]) == 2
    assert "preset" in capsys.readouterr().err
    assert cli_main(["pretrain", "--data", str(prepared)]) == 2  # no stopping rule
    assert "max_steps" in capsys.readouterr().err
