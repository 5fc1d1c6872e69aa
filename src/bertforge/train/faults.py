"""What a training run does when the machine or the run misbehaves (used by `Trainer` in loop.py).

- `StopSignals`: SIGTERM (preemption) and Ctrl-C set a flag instead of killing the process; the loop
  finishes its step, writes a checkpoint and stops (exit 128 + signal). A second signal acts as usual.
- `weights_finite`: checked before every checkpoint and before the final model, so a diverged run never
  saves NaN weights nor names them "the last good checkpoint".
- `check_run_folder`: a new run refuses a folder holding an earlier run unless told `--resume` (continue)
  or `--overwrite` (start over); it never appends to old metrics or keeps old checkpoints silently.
- `check_resume_config`: resuming with other settings than the checkpoint's is one error line naming the
  fields, found before anything in the run folder is written.
- `trim_metrics`: on resume, drop the records a killed run logged after its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path

import torch
from torch import nn

from bertforge.atomic import atomic_write_text
from bertforge.errors import BertforgeError
from bertforge.train import distributed as dist

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "metrics.json", "checkpoints", "model", "tensorboard")
# settings that may change when a run is continued, by full name: the budget, logging and where things are
# (a moved data folder, the starting model that the checkpoint's weights replace). Every other one (model,
# data order, masking, optimizer, batch, seed, precision, parallelism) must match the checkpoint's.
MAY_CHANGE = frozenset(
    [f"train.{k}" for k in ("epochs", "max_steps", "max_tokens", "time_budget", "progress", "log_every", "eval_every",
                            "eval_every_minutes", "save_every", "save_every_minutes", "keep_last", "resume",
                            "resume_from", "overwrite", "output_dir", "tensorboard", "dist_timeout_minutes", "device",
                            "loss_threshold", "loss_threshold_after", "plateau_warn_after", "compile")]
    + [f"data.{k}" for k in ("path", "tokenizer", "dev", "eval_rows", "eval_batches", "eval_limit", "eval_batch_size")]
    + ["model.path", "tokenizer", "seeds"])


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGTERM/SIGINT only record themselves (`stop.received`)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame) -> None:
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one acts as usual
        dist.print0(f"\n{signal.Signals(signum).name}: finishing this step, writing a checkpoint, then stopping "
                    "(send it again to stop at once)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, device: torch.device, check: bool) -> int:
        """The signal this process received; under torchrun, the one any process received, asked only when
        `check` (the same on every process, e.g. at log steps) so the step itself gains no collective."""
        if not dist.is_distributed():
            return self.received
        return int(dist.max_float(self.received, device)) if check else 0


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name if signum else "a signal"


def weights_finite(model: nn.Module, device: torch.device) -> bool:
    """True when every parameter of every process is finite (FSDP: each process checks its shards)."""
    bad = 0.0
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if not torch.isfinite(local).all():
                bad = 1.0
                break
    return dist.max_float(bad, device) == 0.0


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding an earlier run unless resuming or overwriting; `overwrite` removes that run's
    files (rank 0; the caller holds a barrier after)."""
    if resume and overwrite:
        raise BertforgeError("--resume continues the run in the folder and --overwrite deletes it: pass one")
    if out.exists() and not out.is_dir():
        raise BertforgeError(f"output '{out}' is a file: pass a folder")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise BertforgeError(f"output folder '{out}' already holds a run ({', '.join(found)}): continue it with "
                             "--resume, start over with --overwrite, or pass another --output")
    if dist.is_main():
        for name in found:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict | None, current: dict, checkpoint: Path) -> None:
    """One error naming every setting that differs between the checkpoint's run and this command."""
    if not saved:
        return
    a, b = _flat(saved), _flat(current)
    diff = sorted(k for k in a.keys() | b.keys() if k not in MAY_CHANGE and a.get(k) != b.get(k))
    if diff:
        shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6]) + ("; ..." if len(diff) > 6 else "")
        raise BertforgeError(f"cannot resume from '{checkpoint}' with other settings ({shown}): pass the settings "
                             "it was started with (its run folder's config.json), or start a new run (--output)")


def trim_metrics(path: Path, step: int) -> None:
    """Keep the records of steps up to `step` (the checkpoint resumed from); rank 0 only."""
    if not dist.is_main() or not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    atomic_write_text(path, "".join(x + "\n" for x in kept))


def stopped_early(summary: dict, trainer) -> None:
    """One error line when a run ended diverged or interrupted, so no final model is written after it."""
    reason = summary.get("stop_reason")
    if reason not in ("diverged", "interrupted"):
        return
    how = "continue with --resume" if reason == "interrupted" else "lower optim.lr or use fp32, then --resume-from it"
    raise BertforgeError(f"training stopped ({reason}) at step {summary['step']}: no model written; the last good "
                         f"checkpoint is {trainer.ckpt.latest() or 'none'} ({how})")
