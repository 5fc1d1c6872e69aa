"""train.parallel=fsdp (FSDP2) and optim.offload=cpu through the real pretraining command: two gloo processes
equal one process with accumulation, a killed FSDP run resumes from its sharded checkpoint bit for bit, the
consolidated model folder loads as usual, and an offloaded run equals the plain one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_STEADY, step_losses

TINY = TINY_STEADY


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def command(args: list[str], nproc: int = 1, port: int = 29541) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "bertforge", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(port), "-m", "bertforge", *args]


def run(args: list[str], nproc: int = 1, port: int = 29541) -> str:
    proc = subprocess.run(command(args, nproc, port), env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def children(pid: int) -> list[int]:
    """The direct child processes of `pid` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_and_resume_after_kill(prepared, tmp_path):
    common = ["pretrain", "--data", str(prepared), *TINY]
    run([*common, "--max-steps", "6", "--output", str(tmp_path / "single"), "train.grad_accum=2"])
    fsdp = [*common, "train.parallel=fsdp", "train.grad_accum=1", "train.save_every=20"]
    run([*fsdp, "--max-steps", "6", "--output", str(tmp_path / "fsdp")], nproc=2)
    la, lb = step_losses(tmp_path / "single"), step_losses(tmp_path / "fsdp")
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    assert all(abs(la[s] - lb[s]) <= 1e-5 for s in la), (la, lb)
    assert max_diff(weights(tmp_path / "single"), weights(tmp_path / "fsdp")) <= 1e-5

    # kill -9 of the launcher mid-run: its workers die with it (no orphan keeps writing), then resume from the
    # sharded checkpoint
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run([*fsdp, "--max-steps", "200", "--output", str(straight)], nproc=2, port=29542)
    proc = subprocess.Popen(command([*fsdp, "--max-steps", "200", "--output", str(killed)], 2, 29543), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 900
    pointer = killed / "checkpoints" / "latest"
    while not (pointer.is_file() and pointer.read_text().strip() >= "step_00000040"):
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    proc.kill()
    proc.wait()
    gone = time.monotonic() + 60
    while any(alive(w) for w in workers):
        assert time.monotonic() < gone, "a worker outlived its killed launcher"
        time.sleep(0.05)
    assert max(step_losses(killed)) < 200
    shards = killed / "checkpoints" / pointer.read_text().strip() / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["dcp", "trainer_rank0.pt", "trainer_rank1.pt"]
    run([*fsdp, "--max-steps", "200", "--output", str(killed), "--resume"], nproc=2, port=29544)
    a, b = step_losses(straight), step_losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 201))
    assert a == b  # bit for bit
    assert max_diff(weights(straight), weights(killed)) == 0.0

    # one process's part of the newest checkpoint damaged: every process falls back to the previous one
    part = killed / "checkpoints" / "step_00000200" / "shards" / "trainer_rank1.pt"
    part.write_bytes(part.read_bytes()[:300])
    out = run([*fsdp, "--max-steps", "200", "--output", str(killed), "--resume"], nproc=2, port=29545)
    assert "trying step_00000180" in out and "at step 180" in out, out
    assert step_losses(killed) == a and max_diff(weights(straight), weights(killed)) == 0.0

    from bertforge.model.loading import load_model  # the consolidated folder is a normal model

    loaded = load_model(straight / "model")
    ckpt = load_model(straight / "checkpoints" / "step_00000200" / "model")
    assert loaded.head == "masked_lm" and loaded.tokenizer is not None
    assert all(torch.equal(x, y) for x, y in zip(loaded.model.state_dict().values(), ckpt.model.state_dict().values()))


def test_fsdp_checkpoint_is_refused_without_fsdp_and_bad_values_are_errors(prepared, tmp_path):
    from bertforge.errors import BertforgeError
    from bertforge.train.settings import TrainConfig

    with pytest.raises(BertforgeError, match="train.parallel 'zero3'"):
        TrainConfig(parallel="zero3", max_steps=1).validate()
    step = tmp_path / "run" / "checkpoints" / "step_00000002"  # a sharded checkpoint, as FSDP writes state.pt
    step.mkdir(parents=True)
    torch.save({"sharded": True, "world_size": 2}, step / "state.pt")
    (step.parent / "latest").write_text("step_00000002\n")
    proc = subprocess.run(command(["pretrain", "--data", str(prepared), *TINY, "--max-steps", "4", "--output",
                                   str(tmp_path / "run"), "--resume"]), env=env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 2 and "train.parallel=fsdp" in proc.stderr.strip().splitlines()[-1]


def test_offloaded_pretraining_equals_plain(prepared, tmp_path):
    common = ["pretrain", "--data", str(prepared), *TINY, "--max-steps", "8", "optim.schedule=linear",
              "optim.warmup_ratio=0.25"]
    run([*common, "--output", str(tmp_path / "plain")])
    run([*common, "--output", str(tmp_path / "offload"), "optim.offload=cpu"])
    assert step_losses(tmp_path / "plain") == step_losses(tmp_path / "offload")
    assert max_diff(weights(tmp_path / "plain"), weights(tmp_path / "offload")) == 0.0
    saved = json.loads((tmp_path / "offload" / "config.json").read_text())
    assert saved["optim"]["offload"] == "cpu"
