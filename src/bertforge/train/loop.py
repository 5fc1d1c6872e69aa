"""One Trainer for pretraining and every fine-tuning task; tasks differ by model head, batches and metric.

The Trainer is stateful (torchtitan-style): model, optimizer, scheduler, grad scaler, step, tokens,
elapsed budget, RNG states and the batch source's position all go into `state_dict()`, so a run
killed at any point resumes exactly (bitwise on CPU fp32).

    trainer = Trainer(model, optimizer, scheduler, batches, cfg, evaluate=fn)
    trainer.start()               # checks the run folder, resumes when cfg.resume, writes config.json
    summary = trainer.fit()       # checkpoints and stops cleanly on SIGTERM/Ctrl-C (train/faults.py)

`batches` is any object with `next_batch() -> dict[str, Tensor]`, `state_dict()` and
`load_state_dict()`. `model(**batch)` returns an object with `.loss`. `evaluate(model) -> dict`
returns validation metrics (lower `eval_loss` is better unless `cfg.best_metric` says otherwise).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bertforge.errors import BertforgeError
from bertforge.train import distributed as dist
from bertforge.train import faults
from bertforge.train.checkpoint import CheckpointManager
from bertforge.train.optim import batch_size_at
from bertforge.train.resume import RunState
from bertforge.train.settings import TrainConfig, resolve_device


class Trainer(RunState):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batches: Any,
                 cfg: TrainConfig, *, evaluate: Callable[[nn.Module], dict] | None = None,
                 save_model: Callable[[nn.Module, Path], None] | None = None, run_config: dict | None = None,
                 clip_grad_norm: float | None = None, plateau_level: float | None = None,
                 supports_fsdp: bool = False, load_weights: Callable[[Path], dict] | None = None,
                 weights_prefix: str = ""):
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise BertforgeError("train.precision=fp16 needs a CUDA device: use bf16 or fp32 on CPU")
        self.model = model.to(self.device)  # the unwrapped module: saved, evaluated
        self.optimizer, self.scheduler, self.batches = optimizer, scheduler, batches
        self.evaluate_fn, self.save_model_fn, self.run_config = evaluate, save_model, run_config or {}
        # reads the weights under `weights_prefix` (full state-dict keys) back from a checkpoint's model/
        # folder; state.pt then keeps only the others (a loss head, a frozen teacher)
        self.load_weights_fn, self.weights_prefix = load_weights, weights_prefix
        self.clip_grad_norm = clip_grad_norm
        self.plateau_level = plateau_level  # the unigram loss of the training data (pretraining), or None
        self.plateau_warned = False
        self.supports_fsdp = supports_fsdp  # the caller evaluates on every rank and saves through save_model()
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.best: float | None = None
        self.diverged = False  # set when the weights stopped being finite (nothing is saved after that)
        self.budget_seconds = None
        if cfg.time_budget is not None:
            from bertforge.config import parse_duration

            self.budget_seconds = parse_duration(cfg.time_budget)
        self.out = Path(cfg.output_dir)
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.keep_last)
        self.train_model = self._wrap(model)
        self.log_file = None
        self.tb = None

    # ---------------------------------------------------------------- setup
    def _wrap(self, model: nn.Module) -> nn.Module:
        """DDP or FSDP2 (in place, see train/fsdp.py) under torchrun, then torch.compile when asked."""
        wrapped = model
        if dist.is_distributed() and self.cfg.parallel == "fsdp":
            from bertforge.train import fsdp

            if not self.supports_fsdp:
                raise BertforgeError("train.parallel=fsdp is supported by `bertforge pretrain`: use "
                                     "train.parallel=ddp for this command")

            fsdp.shard_model(model, self.optimizer, self.device)
        elif dist.is_distributed():
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DDP(model, device_ids=ids)
        if self.cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ---------------------------------------------------------------- state
    @property
    def sharded(self) -> bool:
        """True when the model is FSDP-sharded (checkpoints go through train/fsdp.py)."""
        from bertforge.train import fsdp

        return fsdp.is_sharded(self.model)

    # ---------------------------------------------------------------- budget
    def progress(self) -> float:
        """Share of the budget spent, in [0, 1]: the largest over steps, tokens and wall clock."""
        parts = []
        if self.cfg.max_steps:
            parts.append(self.step / self.cfg.max_steps)
        if self.cfg.max_tokens:
            parts.append(self.tokens / self.cfg.max_tokens)
        if self.budget_seconds:
            parts.append(self.elapsed / self.budget_seconds)
        return min(1.0, max(parts)) if parts else 0.0

    def done(self) -> bool:
        return self.progress() >= 1.0

    # ---------------------------------------------------------------- steps
    def forward_backward(self, batch: dict, sync: bool, accum: int) -> torch.Tensor:
        """One of `accum` micro-batches: forward under autocast, loss / accum backward. Returns the detached
        loss."""
        ctx = contextlib.nullcontext() if sync or not hasattr(self.train_model, "no_sync") else self.train_model.no_sync()
        with ctx:
            with self.autocast():
                out = self.train_model(**batch)
            loss = out.loss
            self.scaler.scale(loss / accum).backward()
        return loss.detach()

    def micro_batches(self) -> int:
        """Micro-batches in the next optimizer step: grad_accum, or fewer while the batch-size ramp runs."""
        cfg = self.cfg
        if not cfg.batch_ramp_start:
            return cfg.grad_accum
        scale = 1_000_000  # progress in millionths: integer arithmetic, identical on every rank
        effective = batch_size_at(int(self.progress() * scale), cfg.batch_ramp_start, cfg.batch_size * cfg.grad_accum,
                                  int(cfg.batch_ramp * scale), multiple=cfg.batch_size)
        return effective // cfg.batch_size

    def train_step(self) -> tuple[torch.Tensor, int]:
        """Micro-batches (grad_accum, or the ramp's count), clip, optimizer and scheduler step.
        Returns (mean loss, tokens)."""
        self.train_model.train()
        total = torch.zeros((), device=self.device)
        tokens = 0
        accum = self.micro_batches()
        for micro in range(accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in self.batches.next_batch().items()}
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            total += self.forward_backward(batch, sync=micro == accum - 1, accum=accum)
        if self.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and not hasattr(self.scheduler, "set_progress"):
            self.scheduler.step()  # step-indexed schedules; budget schedules are set before the step
        self.step += 1
        self.tokens += dist.sum_int(tokens, self.device)
        return total / accum, tokens

    def set_budget_progress(self) -> None:
        """Schedules that follow the budget (time-based LR, a masking schedule) get the current progress
        before each step."""
        if self.scheduler is not None and hasattr(self.scheduler, "set_progress"):
            self.scheduler.set_progress(self.progress())
        if hasattr(self.batches, "set_progress"):
            self.batches.set_progress(self.progress())

    # ---------------------------------------------------------------- run
    def run_eval(self) -> dict:
        if self.evaluate_fn is None:
            return {}
        self.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = self.evaluate_fn(self.model)
        self.model.train()
        return metrics

    def log(self, record: dict) -> None:
        if not dist.is_main():
            return
        if self.log_file is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log_file = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", self.step))

    def _open_tensorboard(self) -> None:
        if not (self.cfg.tensorboard and dist.is_main()):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise BertforgeError("train.tensorboard=true needs TensorBoard: pip install 'bertforge[tb]'") from None
        self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def _is_better(self, metrics: dict) -> bool:
        value = metrics.get(self.cfg.best_metric)
        if value is None or not math.isfinite(value):
            return False
        if self.best is None or (value > self.best if self.cfg.greater_is_better else value < self.best):
            self.best = value
            return True
        return False

    def evaluate_and_save(self, save: bool, bar=None) -> dict:
        metrics = self.run_eval()
        if metrics:
            self.log({"step": self.step, "tokens": self.tokens, "elapsed": round(self.elapsed, 2), **metrics})
            if bar is not None:
                bar.set_eval(metrics)
        is_best = self._is_better(metrics)
        if save or is_best:
            self.save_checkpoint(is_best=is_best)
        return metrics

    def fit(self) -> dict:
        """Train until the budget is spent; evaluate and checkpoint on schedule; return a summary."""
        from bertforge.train.progress import ProgressBar

        self._open_tensorboard()
        cfg = self.cfg
        bar = ProgressBar(enabled=cfg.progress and dist.is_main(), initial=self.progress())
        start, elapsed0 = time.monotonic(), self.elapsed
        last_eval = last_save = start
        window_loss, window_tokens, window_start = [], 0, start
        metrics: dict = {}
        stop_reason, got = "budget", 0
        with faults.StopSignals() as signals, contextlib.closing(bar):
            while not self.done():
                self.set_budget_progress()
                loss, tokens = self.train_step()
                window_loss.append(loss)
                window_tokens += tokens
                # wall clock, carried across resumes; under a time budget and DDP the slowest rank's, so
                # every rank agrees on the time schedule, the batch ramp and when the budget ends
                self.elapsed = elapsed0 + time.monotonic() - start
                if self.budget_seconds:
                    self.elapsed = dist.max_float(self.elapsed, self.device)
                if self.step % cfg.log_every == 0 or self.done():
                    stop_reason = self._log_window(window_loss, window_tokens, window_start, bar)
                    window_loss, window_tokens, window_start = [], 0, time.monotonic()
                    if stop_reason != "budget":
                        break
                if got := signals.agreed(self.device, check=self.step % cfg.log_every == 0):
                    stop_reason = "interrupted"
                    self.save_checkpoint()
                    break
                now = time.monotonic()
                eval_due = (cfg.eval_every and self.step % cfg.eval_every == 0) or (
                    cfg.eval_every_minutes and now - last_eval >= cfg.eval_every_minutes * 60)
                save_due = (cfg.save_every and self.step % cfg.save_every == 0) or (
                    cfg.save_every_minutes and now - last_save >= cfg.save_every_minutes * 60)
                if (eval_due or save_due) and not self.done():
                    if eval_due:
                        metrics = self.evaluate_and_save(save=bool(save_due), bar=bar)
                        last_eval = time.monotonic()
                    else:
                        self.save_checkpoint()
                    if save_due:
                        last_save = time.monotonic()
                if self.diverged:
                    stop_reason = "diverged"
                    break
        if stop_reason == "budget":
            metrics = self.evaluate_and_save(save=True)
            stop_reason = "diverged" if self.diverged else stop_reason
        if stop_reason == "diverged":
            dist.print0(f"stopping: the weights are no longer finite at step {self.step}; nothing was saved after "
                        f"that. The last good checkpoint is {self.ckpt.latest() or 'none'} — lower optim.lr, raise "
                        "the warmup, or use fp32, then resume from it with --resume-from")
        elif stop_reason == "interrupted":
            where = self.ckpt.latest() or "none"
            dist.print0(f"stopped by {faults.signal_name(got)} at step {self.step}; checkpoint {where}: "
                        "continue with the same command and --resume")
        summary = {"step": self.step, "tokens": self.tokens, "elapsed": round(self.elapsed, 2),
                   "stop_reason": stop_reason, "best": self.best, **metrics}
        if stop_reason == "interrupted":
            summary["signal"] = got
        if self.log_file is not None:
            self.log_file.close()
        if self.tb is not None:
            self.tb.close()
        return summary

    def _log_window(self, losses: list[torch.Tensor], tokens: int, start: float, bar) -> str:
        """Log the mean loss of the window; check for divergence. Returns 'budget' to go on."""
        loss = float(torch.stack(losses).mean())
        loss = dist.mean_float(loss, self.device)
        seconds = max(time.monotonic() - start, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        tok_s = dist.sum_int(tokens, self.device) / seconds
        self.log({"step": self.step, "tokens": self.tokens, "elapsed": round(self.elapsed, 2),
                  "loss": loss, "lr": lr, "tokens_per_s": round(tok_s, 1)})
        bar.update(self.progress(), step=self.step, loss=loss, lr=lr, tok_s=tok_s,
                   eta=self._eta(), force=self.done())
        self._check_plateau(loss)
        if not math.isfinite(loss):
            self.diverged = True
            return "diverged"
        thr = self.cfg.loss_threshold
        if thr is not None and self.progress() >= self.cfg.loss_threshold_after and loss > thr:
            dist.print0(f"stopping: training loss {loss:.3f} is still above train.loss_threshold={thr} after "
                        f"{self.progress():.0%} of the budget — check the learning rate, masking and data")
            return "loss_threshold"
        return "budget"

    def _check_plateau(self, loss: float) -> None:
        """Warn once when, past `plateau_warn_after` of the budget, the training loss is still within 0.25
        nats of the unigram level (what predicting token frequencies alone scores): the run is not learning
        context, and more of the same budget rarely fixes that."""
        share = self.cfg.plateau_warn_after
        if (self.plateau_warned or self.plateau_level is None or not share or self.progress() < share
                or not math.isfinite(loss) or loss < self.plateau_level - 0.25):
            return
        self.plateau_warned = True
        message = (f"warning: after {self.progress():.0%} of the budget the training loss {loss:.2f} is still on the "
                   f"unigram plateau (predicting token frequencies alone scores {self.plateau_level:.2f}): the model "
                   "is not using context yet. Likely causes: too few optimizer updates for the budget (lower "
                   "train.batch_size), a learning rate too low or a warmup too long (optim.lr, optim.warmup_ratio), "
                   "dropout on (model.hidden_dropout_prob=0), post-LN at a high learning rate (model.preset=budget-mini), "
                   "learned absolute positions (model.position_embedding_type=rotary); see docs/healthy-curves.md")
        dist.print0(message)
        self.log({"step": self.step, "tokens": self.tokens, "elapsed": round(self.elapsed, 2),
                  "warning": "plateau", "train_loss": loss, "plateau_level": self.plateau_level})

    def _eta(self) -> float | None:
        p = self.progress()
        if p <= 0 or self.elapsed <= 0:
            return None
        return self.elapsed * (1 - p) / p
