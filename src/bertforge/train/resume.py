"""The Trainer's state and run folder: what a checkpoint holds, how a run starts (folder rules, resume with
fallback, config.json) and how checkpoints and the final model are written. `Trainer` (loop.py) inherits
`RunState`; the rules for faults themselves live in faults.py."""

from __future__ import annotations

import json
from pathlib import Path

from bertforge.atomic import atomic_write_text
from bertforge.errors import BertforgeError
from bertforge.train import distributed as dist
from bertforge.train import faults
from bertforge.train.checkpoint import STATE_FILE, CheckpointManager, DamagedCheckpoint
from bertforge.train.settings import rng_state, set_rng_state


class RunState:
    """Checkpoint and run-folder methods of `Trainer`; they use its model, optimizer, scheduler, scaler,
    batches, counters, `cfg`, `out`, `ckpt`, `run_config`, `save_model_fn`, `load_weights_fn` and `sharded`."""

    def state_dict(self) -> dict:
        """Model, optimizer and progress. When `load_weights_fn` can read the weights under `weights_prefix`
        back from the checkpoint's model/ folder, they are left out (stored once) and marked so."""
        weights = self.model.state_dict()
        if self.load_weights_fn is None or self.save_model_fn is None:
            return {"model": weights, "optimizer": self.optimizer.state_dict(), **self.progress_state()}
        rest = {k: v for k, v in weights.items() if not k.startswith(self.weights_prefix)}
        return {"model": rest, "weights_in_folder": True, "optimizer": self.optimizer.state_dict(),
                **self.progress_state()}

    def progress_state(self) -> dict:
        """Everything but the model and optimizer: schedule, scaler, counters, data position, RNG, config."""
        return {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "best": self.best,
            "batches": self.batches.state_dict(),
            "rng": rng_state(),
            "config": self.run_config,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_progress_state(state)

    def load_progress_state(self, state: dict) -> None:
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens, self.elapsed, self.best = state["step"], state["tokens"], state["elapsed"], state["best"]
        self.batches.load_state_dict(state["batches"])
        set_rng_state(state["rng"])

    def start(self) -> bool:
        """Check the run folder, resume when asked, then write config.json; True if resumed. Nothing in the
        folder is written before the checks pass (faults.check_run_folder, faults.check_resume_config)."""
        resuming = self.cfg.resume or bool(self.cfg.resume_from)
        faults.check_run_folder(self.out, resuming, self.cfg.overwrite)
        dist.barrier()
        resumed = self.maybe_resume() if resuming else False
        if dist.is_main():
            atomic_write_text(self.out / "config.json", json.dumps(self.run_config, indent=2, default=str) + "\n")
            if resuming:  # records logged after the checkpoint (or all, when none was found) are redone
                faults.trim_metrics(self.out / "metrics.jsonl", self.step)
        return resumed

    def resume_candidates(self) -> list[Path]:
        """Checkpoints to try, best first: `resume_from` (a checkpoint, or a run folder's), else this run's."""
        if not self.cfg.resume_from:
            return self.ckpt.candidates()
        given = Path(self.cfg.resume_from)
        if (given / STATE_FILE).is_file():
            return [given]
        for root in (given / "checkpoints", given):
            found = CheckpointManager(root).candidates() if root.is_dir() else []
            if found:
                return found
        raise BertforgeError(f"--resume-from '{given}' is not a checkpoint (no {STATE_FILE}) nor a run folder with "
                             "checkpoints: pass e.g. runs/x/checkpoints/step_00001000")

    def _read_checkpoint(self, path: Path) -> dict:
        """The state to resume from `path` (under FSDP: this process's progress), checked against this run."""
        if self.sharded:
            from bertforge.train import fsdp

            return fsdp.read_progress(self, path)
        state = self.ckpt.load(path, weights_from=self.load_weights_fn)
        if state.get("sharded"):
            raise BertforgeError(f"checkpoint '{path}' holds FSDP shards: resume it with train.parallel=fsdp "
                                 f"and the same number of processes")
        faults.check_resume_config(state.get("config"), self.run_config, path)
        return state

    def maybe_resume(self) -> bool:
        """Load the newest checkpoint that reads (a damaged one is skipped with a note); True if resumed."""
        candidates = self.resume_candidates()
        if not candidates:
            dist.print0(f"resume: no checkpoint in {self.ckpt.root}, starting fresh")
            return False
        for i, path in enumerate(candidates):
            problem = None
            try:
                state = self._read_checkpoint(path)
            except DamagedCheckpoint as exc:
                problem = str(exc)
            # under FSDP each process reads its own part: one damaged part sends every process on
            if self.sharded and dist.max_float(1.0 if problem else 0.0, self.device) and problem is None:
                problem = f"checkpoint '{path}' is damaged on another process"
            if problem is not None:
                if i + 1 == len(candidates):
                    raise DamagedCheckpoint(problem)
                dist.print0(f"warning: {problem}; trying {candidates[i + 1].name}")
                continue
            if self.sharded:
                from bertforge.train import fsdp

                fsdp.load_checkpoint(self, path, state)
            else:
                self.load_state_dict(state)
            break
        dist.print0(f"resumed from {path} at step {self.step} ({self.elapsed:.0f}s of budget used)")
        return True

    def save_checkpoint(self, is_best: bool = False) -> Path | None:
        """Write a checkpoint (rank 0; every rank under FSDP); returns its folder on rank 0. Every rank calls
        it. Non-finite weights are never saved: `self.diverged` is set instead and nothing is written."""
        if not faults.weights_finite(self.model, self.device):
            self.diverged = True
            return None
        if self.sharded:
            from bertforge.train import fsdp

            return fsdp.save_checkpoint(self, is_best)
        path = None
        if dist.is_main():
            def write_model(d: Path) -> None:
                if self.save_model_fn is not None:
                    self.save_model_fn(self.model, d)

            path = self.ckpt.save(self.step, self.state_dict(), write_model, is_best=is_best)
        dist.barrier()  # no process runs ahead of a checkpoint that may still fail
        return path

    def save_model(self, directory: Path) -> None:
        """The final model through `save_model` (rank 0; gathered from every rank under FSDP)."""
        if self.save_model_fn is None:
            return
        if self.sharded:
            from bertforge.train import fsdp

            fsdp.save_consolidated(self.model, Path(directory), self.save_model_fn)
        elif dist.is_main():
            self.save_model_fn(self.model, Path(directory))
