"""Atomic checkpoints: write into a temporary sibling, fsync, rename. Keep the last N plus the best.

The weights are stored once: when the caller can read them back from the checkpoint's `model/` folder
(`Trainer(load_weights=..., weights_prefix=...)`: pretraining, fine-tuning, sentence-train, distill), `state.pt`
holds only the other weights (a loss head, a frozen teacher) and `weights_in_folder: True`.

Layout of a run directory:

    run/
      config.json            resolved run config
      metrics.jsonl          one JSON object per logged step / evaluation
      checkpoints/
        step_00001000/       trainer state (state.pt) + model/ (our format: config.json, model.safetensors, tokenizer)
        step_00002000/
        best -> step_...     (a plain text file `best` naming the best step directory)
        latest               (a plain text file naming the newest complete checkpoint)

A killed save leaves only a hidden `.step_*.tmp-*` folder (atomic.atomic_folder), which the next save removes; `latest` is replaced
atomically after the directory rename, so it always names a complete checkpoint. A checkpoint damaged
later (a truncated copy, a bad disk) is skipped on resume for the newest one that reads (`candidates`).
States are read with `torch.load(weights_only=True)`: a run folder from elsewhere cannot run code.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import torch

from bertforge.atomic import atomic_folder, atomic_write_text, clear_stale
from bertforge.errors import BertforgeError

STATE_FILE = "state.pt"


class DamagedCheckpoint(BertforgeError):
    """A checkpoint that cannot be used (unreadable, truncated, non-finite weights): resume tries an older one."""


def load_state(file: Path) -> dict:
    """A checkpoint state file read without running code (weights_only); damage is a one-line error."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # torch names the blocked callable
            raise BertforgeError(f"checkpoint file '{file}' holds Python objects other than tensors and plain "
                                 "values, which bertforge does not write: it refuses to load it (it could run "
                                 "code); use a checkpoint you trust") from None
        raise DamagedCheckpoint(f"checkpoint file '{file}' cannot be read (truncated or damaged): resume from an "
                                "earlier checkpoint (--resume-from) or start over") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise DamagedCheckpoint(f"checkpoint file '{file}' cannot be read ({type(e).__name__}: truncated or damaged): "
                             "resume from an earlier checkpoint (--resume-from) or start over") from None


class CheckpointManager:
    """Saves trainer states under `root/step_XXXXXXXX`, keeps the last `keep_last` and the best."""

    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def save(self, step: int, state: dict, write_model=None, *, is_best: bool = False) -> Path:
        """Write `state` (and the model via `write_model(dir)`) atomically as checkpoint `step`."""
        self.root.mkdir(parents=True, exist_ok=True)
        clear_stale(self.root, "step_*")
        for stale in self.root.glob(".tmp-*"):  # the leftovers of saves killed under earlier versions
            shutil.rmtree(stale, ignore_errors=True)
        final = self.step_dir(step)
        self._check_space(final)

        def write(tmp: Path) -> None:
            torch.save(state, tmp / STATE_FILE)
            if write_model is not None:
                write_model(tmp / "model")

        try:
            atomic_folder(final, write)
        except RuntimeError as e:  # torch's writer reports a full disk as "PytorchStreamWriter failed writing"
            if "failed writing" not in str(e):
                raise
            free = shutil.disk_usage(self.root).free / 2**20
            raise BertforgeError(f"cannot write checkpoint '{final}' ({free:.0f} MiB free on that disk): free some "
                                 "space or write elsewhere; completed checkpoints are intact (continue with --resume)"
                                 ) from None
        atomic_write_text(self.root / "latest", final.name + "\n")
        if is_best:
            atomic_write_text(self.root / "best", final.name + "\n")
        self._prune()
        return final

    def _check_space(self, final: Path) -> None:
        """Refuse to start a save that the disk cannot hold: the newest checkpoint's size + 10% must be free."""
        previous = self.latest()
        if previous is None:
            return
        need = 1.1 * sum(f.stat().st_size for f in previous.rglob("*") if f.is_file())
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise BertforgeError(f"not enough disk space for checkpoint '{final}': {free / 2**20:.0f} MiB free, about "
                                 f"{need / 2**20:.0f} MiB needed; free some space or write elsewhere; completed "
                                 "checkpoints are intact (continue with --resume)")

    def _pointer(self, name: str) -> Path | None:
        f = self.root / name
        if not f.is_file():
            return None
        d = self.root / f.read_text().strip()
        return d if (d / STATE_FILE).is_file() else None

    def latest(self) -> Path | None:
        found = self._pointer("latest")
        if found is not None:
            return found
        complete = self.complete()
        return complete[-1] if complete else None

    def complete(self) -> list[Path]:
        """Checkpoint folders holding a state file, oldest first."""
        return sorted(d for d in self.root.glob("step_*") if (d / STATE_FILE).is_file())

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, best first: the one `latest` names, then the others newest first."""
        latest = self.latest()
        rest = [d for d in reversed(self.complete()) if d != latest]
        return ([latest] if latest is not None else []) + rest

    def best(self) -> Path | None:
        return self._pointer("best")

    def _prune(self) -> None:
        keep = {p.name for p in (self.latest(), self.best()) if p is not None}
        steps = sorted(d for d in self.root.glob("step_*") if d.is_dir())
        for d in steps[:-self.keep_last]:
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def load(self, path: Path | None = None, weights_from=None) -> dict:
        """The state of checkpoint `path` (default: the latest). A state saved without its weights
        (`weights_in_folder`: they are in `path/model/` once) gets them from `weights_from(path / "model")`.
        Unreadable states, missing weights and non-finite weights are one-line errors."""
        path = path or self.latest()
        if path is None:
            raise BertforgeError(f"no checkpoint found in '{self.root}': start without --resume or point to a run directory")
        state = load_state(path / STATE_FILE)
        if state.get("weights_in_folder"):
            if weights_from is None:
                raise BertforgeError(f"checkpoint '{path}' keeps its weights in its model folder, which this run "
                                     "cannot read back: resume it with the command that wrote it")
            try:
                state["model"] = {**state["model"], **weights_from(path / "model")}
            except BertforgeError as e:
                raise DamagedCheckpoint(f"checkpoint '{path}' has an unreadable model folder ({e})") from None
            except (OSError, RuntimeError, ValueError, KeyError) as e:
                raise DamagedCheckpoint(f"checkpoint '{path}' has an unreadable model folder ({type(e).__name__}: "
                                     "truncated or damaged)") from None
        weights = state.get("model") or {}
        if not all(torch.isfinite(t).all() for t in weights.values() if torch.is_tensor(t) and t.is_floating_point()):
            raise DamagedCheckpoint(f"checkpoint '{path}' holds non-finite weights (NaN or inf): resume from an earlier "
                                 "checkpoint (--resume-from)")
        return state
