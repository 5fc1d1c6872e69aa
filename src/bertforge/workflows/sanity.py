"""`bertforge sanity`: can this model + optimizer + masking overfit one batch? Pass/fail with hints.

A healthy setup drives the MLM loss on one fixed, fixed-masked batch close to zero within a few
hundred steps. When it cannot, the cause is almost always one of: a learning rate far too high
(loss explodes or oscillates) or too low (loss barely moves), labels that are empty or misaligned
with the inputs, or masking that masks nothing / only special tokens. Each check below reports
which it is, before a long run wastes a day.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from bertforge.data.dataset import PackedDataset
from bertforge.data.masking import IGNORE_INDEX, MLMCollator
from bertforge.errors import BertforgeError
from bertforge.model.heads import BertForMaskedLM
from bertforge.train.optim import build_optimizer
from bertforge.train.settings import seed_everything
from bertforge.wordpiece import WordPieceTokenizer
from bertforge.workflows.pretrain import build_model_config, data_tokenizer_path


@dataclass
class SanityReport:
    passed: bool
    initial_loss: float
    final_loss: float
    final_accuracy: float
    steps: int
    losses: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"sanity: {'PASS' if self.passed else 'FAIL'} — one batch, {self.steps} steps: "
                 f"loss {self.initial_loss:.3f} -> {self.final_loss:.3f}, "
                 f"masked-token accuracy {self.final_accuracy:.1%}"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  hint: {h}" for h in self.hints]
        return "\n".join(lines)


def check_batch(batch: dict, mask_token_id: int, special_ids) -> list[str]:
    """Problems visible in the batch itself, before any training."""
    labels, ids = batch["labels"], batch["input_ids"]
    problems = []
    labelled = labels != IGNORE_INDEX
    if not bool(labelled.any()):
        problems.append("the batch has no labelled (masked) positions: masking.mlm_probability is 0 or every "
                        "token is special — check masking and the prepared rows")
        return problems
    special = torch.isin(labels[labelled], torch.tensor(sorted(special_ids)))
    if bool(special.any()):
        problems.append(f"{int(special.sum())} labels are special tokens ([CLS]/[SEP]/[PAD]): they must never be targets")
    at_mask = (ids == mask_token_id) & labelled
    if int(at_mask.sum()) == 0:
        problems.append("no labelled position holds [MASK] in the input: labels and inputs are misaligned "
                        "or mask_replace is 0")
    rate = float(labelled.float().sum() / (batch["attention_mask"].sum()))
    if rate > 0.6:
        problems.append(f"{rate:.0%} of tokens are labelled: the masking rate is far above BERT's 15–30%")
    return problems


def run_sanity(model: torch.nn.Module, rows: np.ndarray, collator: MLMCollator, optim_cfg, *,
               steps: int = 300, target_loss: float = 0.5, seed: int = 0) -> SanityReport:
    """Overfit `rows` (one batch, masks fixed once) with the given optimizer settings (constant LR
    after a short warmup). Passes when the loss ends below `target_loss` and under a fifth of where it
    started, with no NaN."""
    seed_everything(seed)
    collator.generator.manual_seed(seed)
    batch = collator(rows)
    problems = check_batch(batch, collator.mask_token_id, collator.special_ids.tolist())
    opt_cfg = replace(optim_cfg, schedule="constant", warmup_steps=0, warmup_ratio=0.0)
    optimizer = build_optimizer(model, opt_cfg, "cpu")
    warmup = max(1, steps // 20)
    model.train()
    losses: list[float] = []
    for step in range(steps):
        for g in optimizer.param_groups:
            g["lr"] = opt_cfg.lr * min(1.0, (step + 1) / warmup)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opt_cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    model.eval()
    with torch.no_grad():
        out = model(**batch)
        targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
        final = float(out.loss)
        acc = float((out.logits.argmax(-1) == targets).float().mean()) if targets.numel() else 0.0
    report = SanityReport(False, losses[0], final, acc, len(losses), losses, problems)
    diagnose(report, opt_cfg.lr, target_loss)
    return report


def sanity_on_data(cfg, *, steps: int, batch_size: int, target_loss: float) -> SanityReport:
    """`run_sanity` on the first `batch_size` training rows of `cfg.data.path` with a fresh model of
    `cfg.model` (a PretrainRunConfig, as `bertforge pretrain` reads it)."""
    for flag, value in (("--steps", steps), ("--batch-size", batch_size)):
        if value < 1:
            raise BertforgeError(f"{flag} {value} is out of range: pass 1 or more")
    if not cfg.data.path:
        raise BertforgeError("sanity needs data: pass --data DIR (a `bertforge prepare` output)")
    rows = PackedDataset(cfg.data.path, "train")
    tokenizer = WordPieceTokenizer.from_pretrained(data_tokenizer_path(cfg.data, rows.manifest))
    model = BertForMaskedLM(build_model_config(cfg.model, tokenizer.vocab_size))
    collator = MLMCollator.from_tokenizer(tokenizer, cfg.masking, seed=cfg.train.seed)
    batch_rows = rows.rows(list(range(min(batch_size, len(rows)))))
    return run_sanity(model, batch_rows, collator, cfg.optim, steps=steps, target_loss=target_loss,
                      seed=cfg.train.seed)


def diagnose(report: SanityReport, lr: float, target_loss: float) -> None:
    """Fill pass/fail and hints from the loss curve."""
    losses, first = report.losses, report.initial_loss
    if not all(math.isfinite(x) for x in losses) or not math.isfinite(report.final_loss):
        report.problems.append(f"the loss became {losses[-1]} at step {len(losses)}")
        report.hints.append(f"learning rate {lr:g} is too high: try {lr / 10:g}, more warmup, or fp32")
    elif report.final_loss > first * 0.9:
        tail = losses[len(losses) // 2:]
        if max(tail) - min(tail) > 0.5 * first or report.final_loss > first * 1.05:
            report.problems.append("the loss oscillates or rises instead of falling")
            report.hints.append(f"learning rate {lr:g} is too high: try {lr / 10:g}")
        else:
            report.problems.append("the loss barely moves")
            report.hints.append(f"learning rate {lr:g} may be too low (try {lr * 10:g}); check that gradients "
                                "reach the encoder (frozen parameters?) and that labels match the inputs")
    elif report.final_loss > target_loss or report.final_loss > first * 0.2:
        report.problems.append(f"the loss fell but ended at {report.final_loss:.3f} (target {target_loss})")
        report.hints.append("train more steps (--steps) or raise the learning rate; a model this size should "
                            "memorise one batch")
    if report.problems and not report.hints:
        report.hints.append("fix the batch problems above first: they make the objective meaningless")
    report.passed = not report.problems
