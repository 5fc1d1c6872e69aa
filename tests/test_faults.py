"""Runs that survive what real machines do, by fault injection on shards the tests make themselves:
SIGTERM mid-run (checkpoint, exit 143, resume bit for bit), NaN weights (never saved), a damaged newest
checkpoint (skipped), a changed config on resume, a used run folder, an untrusted pickle, a full disk."""

from __future__ import annotations

import errno
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
from tiny import TINY_STEADY, step_losses
from torch import nn

from bertforge.cli import main as cli_main
from bertforge.errors import BertforgeError
from bertforge.train.faults import check_resume_config
from bertforge.train.loop import Trainer
from bertforge.train.settings import TrainConfig

TINY = TINY_STEADY


def pretrain(prepared: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(prepared), *TINY, "--output", str(out), *extra]


def steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)]


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.slow
def test_sigterm_checkpoints_stops_and_resume_equals_uninterrupted(prepared, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # one thread: the same sums in every run

    def run(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "bertforge", *args], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]

    run(*pretrain(prepared, straight, "--max-steps", "120"))
    proc = subprocess.Popen([sys.executable, "-m", "bertforge", *pretrain(prepared, stopped, "--max-steps", "120")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = stopped / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 10):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in out and "--resume" in out
    at = json.loads(out[out.index("{"):])["step"]
    assert 10 <= at < 120
    assert (stopped / "checkpoints" / "latest").read_text().strip() == f"step_{at:08d}"
    assert not (stopped / "model").exists()  # an interrupted run writes no final model
    run(*pretrain(prepared, stopped, "--max-steps", "120", "--resume"))
    assert steps(stopped) == list(range(1, 121))  # no step logged twice
    assert step_losses(stopped) == step_losses(straight)  # bit for bit
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(stopped / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class Toy(nn.Module):
    """A three-weight model; an infinite input makes its weights NaN at that step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, input_ids: torch.Tensor):
        return type("Out", (), {"loss": ((self.w * input_ids).sum() - 1) ** 2})()


class Batches:
    def __init__(self, poison_at: int) -> None:
        self.i, self.poison_at = 0, poison_at

    def next_batch(self) -> dict:
        self.i += 1
        x = torch.full((3,), float("inf") if self.i == self.poison_at else 0.1)
        return {"input_ids": x}

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def test_nan_weights_are_never_checkpointed(tmp_path):
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=10, save_every=1, log_every=100, progress=False,
                      device="cpu", keep_last=100)
    trainer = Trainer(model, opt, None, Batches(poison_at=4), cfg)
    trainer.start()
    summary = trainer.fit()
    assert summary["stop_reason"] == "diverged" and summary["step"] == 4
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert saved == ["step_00000001", "step_00000002", "step_00000003"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    for name in saved:
        state = torch.load(tmp_path / "run" / "checkpoints" / name / "state.pt", weights_only=True)
        assert torch.isfinite(state["model"]["w"]).all()


def test_damaged_newest_checkpoint_is_skipped_and_resume_from(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    args = pretrain(prepared, run, "--max-steps", "4", "train.save_every=2")
    assert cli_main(args) == 0
    reference = step_losses(run)
    newest = run / "checkpoints" / "step_00000004" / "state.pt"
    stored = torch.load(newest, weights_only=True)
    assert stored["weights_in_folder"] and stored["model"] == {}  # the weights are stored once, in model/
    newest.write_bytes(newest.read_bytes()[:1000])  # a truncated copy
    capsys.readouterr()
    assert cli_main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "step_00000004" in out and "trying step_00000002" in out and "at step 2" in out
    assert step_losses(run) == reference and steps(run) == [1, 2, 3, 4]
    # a newest checkpoint holding NaN weights (written by something else) is never chosen either
    from safetensors.torch import save_file

    folder = run / "checkpoints" / "step_00000004" / "model" / "model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in load_file(folder).items()}, folder)
    capsys.readouterr()
    assert cli_main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "non-finite weights" in out and "trying step_00000002" in out and "at step 2" in out
    assert step_losses(run) == reference
    # ... and one whose model folder (where its weights are) is damaged
    weights = run / "checkpoints" / "step_00000004" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    assert cli_main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "unreadable model folder" in out and "trying step_00000002" in out and "at step 2" in out
    assert step_losses(run) == reference
    # --resume-from another run's checkpoint, into a new folder
    other = tmp_path / "other"
    assert cli_main(pretrain(prepared, other, "--max-steps", "4", "--resume-from",
                             str(run / "checkpoints" / "step_00000002"))) == 0
    assert "resumed from" in capsys.readouterr().out
    assert step_losses(other) == {s: v for s, v in reference.items() if s > 2}


def test_changed_config_on_resume_is_one_line_and_writes_nothing(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(pretrain(prepared, run, "--max-steps", "2", "train.save_every=2")) == 0
    before = (run / "config.json").read_bytes()
    capsys.readouterr()
    assert cli_main([*pretrain(prepared, run, "--max-steps", "4", "--resume"), "optim.lr=5e-3"]) == 2
    one_error_line(capsys, "optim.lr", "0.001", "0.005", "config.json")
    assert (run / "config.json").read_bytes() == before
    assert cli_main(pretrain(prepared, run, "--max-steps", "4", "--resume")) == 0  # a longer budget may change


def test_what_may_change_on_resume_is_named_in_full():
    """The budget, logging and paths may change; the same leaf name in another section may not (a teacher's
    path, a masking value named like a train setting)."""
    saved = {"data": {"path": "a"}, "train": {"max_steps": 2}, "teacher": {"path": "t1"}, "masking": {"eval_rows": 1}}
    check_resume_config(saved, {**saved, "data": {"path": "b"}, "train": {"max_steps": 9}}, Path("ckpt"))
    for section, value in (("teacher", {"path": "t2"}), ("masking", {"eval_rows": 2})):
        with pytest.raises(BertforgeError, match=f"{section}\\."):
            check_resume_config(saved, {**saved, section: value}, Path("ckpt"))


def test_used_run_folder_needs_resume_or_overwrite(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(pretrain(prepared, run, "--max-steps", "3")) == 0
    capsys.readouterr()
    assert cli_main(pretrain(prepared, run, "--max-steps", "3")) == 2
    one_error_line(capsys, str(run), "--resume", "--overwrite")
    assert cli_main(pretrain(prepared, run, "--max-steps", "2", "--overwrite")) == 0
    assert steps(run) == [1, 2]  # the old run's records are gone, not appended to
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002"]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_checkpoint_that_would_run_code_is_refused(prepared, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    torch.save({"step": 2, "evil": Payload()}, step / "state.pt")
    (step.parent / "latest").write_text("step_00000002\n")
    monkeypatch.chdir(tmp_path)
    assert cli_main(pretrain(prepared, run, "--max-steps", "4", "--resume")) == 2
    one_error_line(capsys, "state.pt", "could run code")
    assert not (tmp_path / "PWNED").exists()


def test_a_full_disk_is_one_line(prepared, tmp_path, capsys, monkeypatch):
    import bertforge.train.checkpoint as checkpoint

    def full(obj, f, *a, **k):
        raise RuntimeError(f"[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           f"data/0: file write failed ({os.strerror(errno.ENOSPC)})")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    run = tmp_path / "run"
    assert cli_main(pretrain(prepared, run, "--max-steps", "2", "train.save_every=1")) == 2
    one_error_line(capsys, "cannot write checkpoint", "free some space", "--resume")
    assert not list((run / "checkpoints").glob(".tmp-*"))  # no half-written checkpoint left behind


@pytest.mark.slow
def test_ten_random_sigkills_then_resume_reach_the_uninterrupted_weights(prepared, tmp_path):
    """SIGKILL at 10 random moments of a run that checkpoints every step (so many kills land inside a
    checkpoint write); each restart resumes from what the last one left. The end equals the straight run."""
    import random

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["--max-steps", "150", "train.save_every=1", "train.keep_last=2"]

    def start(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "bertforge", *pretrain(prepared, out, *args, *extra)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def logged(out: Path) -> int:
        try:
            return max(steps(out), default=0)
        except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or a line being written
            return 0

    assert start(straight).wait(timeout=600) == 0
    rng = random.Random(0)
    kills = 0
    for attempt, target in enumerate(sorted(rng.sample(range(3, 148), 10))):  # 10 random steps, then instants
        proc = start(killed, *(["--resume"] if attempt else []))
        deadline = time.monotonic() + 600
        while proc.poll() is None and logged(killed) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        assert proc.wait(timeout=600) in (0, -signal.SIGKILL), proc.stderr.read()
    assert kills >= 8  # the restarts were really cut short
    final = start(killed, "--resume")
    assert final.wait(timeout=600) == 0, final.stderr.read()
    assert steps(killed) == list(range(1, 151))
    assert step_losses(killed) == step_losses(straight)
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(prepared, tmp_path, capsys, monkeypatch):
    import shutil as shutil_mod

    import bertforge.train.checkpoint as checkpoint

    run = tmp_path / "run"
    assert cli_main(pretrain(prepared, run, "--max-steps", "2", "train.save_every=1")) == 0
    real = shutil_mod.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    capsys.readouterr()
    assert cli_main(pretrain(prepared, run, "--max-steps", "4", "--resume")) == 2
    one_error_line(capsys, "not enough disk space", "MiB free", "--resume")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"  # nothing lost
