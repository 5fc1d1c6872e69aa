"""Held-out masked-LM evaluation: the one protocol every bertforge MLM number uses.

    metrics = evaluate_mlm(model, rows, tokenizer)            # rows: (N, T) token ids or a PackedDataset

The protocol (what `bertforge evaluate --task mlm`, training-time evaluation, `quickstart`, `report`,
`inspect` and docs/RESULTS.md report):

- a fixed share of the maskable tokens of each row (15% by default, exactly `round(0.15 * n)` per row)
  is chosen by a generator seeded from `seed` and the row's chunk of `MASK_CHUNK` rows, so the same rows
  get the same masks whatever the batch size, the model or the run;
- every chosen token is shown to the model as `[MASK]` (no 80/10/10: BERT's 10% unchanged tokens are
  free points that overstate what a model knows; `bert_replacement=True` gives that figure, labelled);
- scores are computed over the tokenizer's vocabulary only (padding rows of the embedding are never
  predicted): token-weighted cross-entropy (`eval_loss`), top-1 and top-5 accuracy, pseudo-perplexity
  `exp(eval_loss)`, and the share of all predictions taken by the single most frequent predicted token
  (`eval_top_prediction_share`: a model on the unigram plateau predicts "the" or "." almost everywhere).

Any masked-LM model works: ours (sparse logits `(M, V)` at the labelled positions) or a Hugging Face
`*ForMaskedLM` (full logits `(B, T, V)`), called with `input_ids, attention_mask, token_type_ids, labels`.
`pack_texts` turns raw documents into `[CLS] ... [SEP]` rows the way `bertforge prepare` packs them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bertforge.data.masking import IGNORE_INDEX, MaskingConfig, MLMCollator
from bertforge.data.packing import PackedBuilder
from bertforge.errors import BertforgeError

EVAL_SEED = 12345
DEFAULT_MASK_RATE = 0.15
MASK_CHUNK = 64  # rows masked together; masks depend on (seed, chunk index) only


def eval_masking(mask_rate: float = DEFAULT_MASK_RATE, bert_replacement: bool = False) -> MaskingConfig:
    """The evaluation masking: every target shown as [MASK], or BERT's 80/10/10 when asked."""
    if bert_replacement:
        return MaskingConfig(mlm_probability=mask_rate)
    return MaskingConfig(mlm_probability=mask_rate, mask_replace=1.0, random_replace=0.0)


def _rows_of(rows: Any, idx: np.ndarray) -> Any:
    return rows[idx] if isinstance(rows, np.ndarray) else rows.batch(idx)


def _masked_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """(logits (M, V') at the labelled positions, row-major, the model output), for sparse (ours) and full
    (HF) MLM heads."""
    out = model(**batch)
    logits = out.logits if hasattr(out, "logits") else out[1]
    keep = batch["labels"] != IGNORE_INDEX  # (B, T)
    if logits.dim() == 3:
        logits = logits[keep]  # (M, V')
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise BertforgeError(f"the model returned logits of shape {tuple(logits.shape)}: MLM evaluation needs a "
                             "masked-LM head (BertForMaskedLM, BertForPreTraining or a Hugging Face *ForMaskedLM)")
    return logits, out


@torch.no_grad()
def evaluate_mlm(model: nn.Module, rows: Any, tokenizer: Any, *, mask_rate: float = DEFAULT_MASK_RATE,
                 seed: int = EVAL_SEED, max_rows: int | None = None, batch_size: int = MASK_CHUNK,
                 bert_replacement: bool = False, prefix: str = "eval_") -> dict:
    """Score `rows` ((N, T) ids with [CLS]/[SEP]/[PAD], or anything with `len()` and `.batch(idx)`) with
    the protocol in the module docstring. Returns `{prefix}loss, accuracy, top5_accuracy, perplexity,
    top_prediction, top_prediction_share, masked_tokens, rows, mask_rate}`."""
    n = len(rows) if max_rows is None else min(len(rows), max_rows)
    if n == 0:
        raise BertforgeError("no rows to evaluate: pass held-out text with at least one document")
    device = next(model.parameters()).device
    V = tokenizer.vocab_size
    collator = MLMCollator.from_tokenizer(tokenizer, eval_masking(mask_rate, bert_replacement), seed=seed)
    was_training = model.training
    model.eval()
    loss_sum, correct, top5, count, nsp_correct, nsp_count = 0.0, 0, 0, 0, 0, 0
    predicted = torch.zeros(V, dtype=torch.long)
    try:
        for c, start in enumerate(range(0, n, MASK_CHUNK)):
            collator.generator.manual_seed(seed * 1_000_003 + c)
            chunk = collator(_rows_of(rows, np.arange(start, min(start + MASK_CHUNK, n))))
            for b in range(0, len(chunk["input_ids"]), batch_size):
                batch = {k: v[b:b + batch_size].to(device) for k, v in chunk.items()}
                targets = batch["labels"][batch["labels"] != IGNORE_INDEX]  # (M,)
                if not targets.numel():
                    continue
                logits, out = _masked_logits(model, batch)
                logits = logits[:, :V].float()  # (M, V)
                if getattr(out, "nsp_logits", None) is not None and "next_sentence_label" in batch:
                    nsp_correct += int((out.nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum())
                    nsp_count += len(batch["input_ids"])
                loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
                best = logits.topk(min(5, V), dim=-1).indices  # (M, 5)
                correct += int((best[:, 0] == targets).sum())
                top5 += int((best == targets[:, None]).any(-1).sum())
                count += targets.numel()
                predicted += torch.bincount(best[:, 0].cpu(), minlength=V)
    finally:
        model.train(was_training)
    if count == 0:
        raise BertforgeError(f"masking {mask_rate:.0%} of {n} rows selected no token: pass longer text or a "
                             "higher mask rate")
    loss = loss_sum / count
    top_id = int(predicted.argmax())
    p = prefix
    nsp = {f"{p}nsp_accuracy": nsp_correct / nsp_count} if nsp_count else {}
    return nsp | {f"{p}loss": loss, f"{p}accuracy": correct / count, f"{p}top5_accuracy": top5 / count,
            f"{p}perplexity": math.exp(min(loss, 50.0)), f"{p}top_prediction": tokenizer.convert_ids_to_tokens([top_id])[0],
            f"{p}top_prediction_share": int(predicted[top_id]) / count, f"{p}masked_tokens": count,
            f"{p}rows": n, f"{p}mask_rate": mask_rate}


def unigram_loss(rows: Any, tokenizer: Any, max_rows: int = 4096) -> float:
    """The MLM loss of predicting token frequencies alone (the entropy, in nats, of the non-special tokens
    of the first `max_rows` rows): the plateau a model sits on before it uses context."""
    n = min(len(rows), max_rows)
    if n == 0:
        raise BertforgeError("no rows to count: the data holds no training rows")
    ids = rows[:n] if isinstance(rows, np.ndarray) else rows.rows(np.arange(n))  # (n, T)
    counts = np.bincount(ids.reshape(-1).astype(np.int64), minlength=tokenizer.vocab_size)
    counts[sorted(set(tokenizer.special_ids) | {tokenizer.pad_token_id})] = 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def pack_texts(documents, tokenizer: Any, seq_len: int, max_rows: int | None = None) -> np.ndarray:
    """Documents -> (N, seq_len) packed `[CLS] body [SEP]` rows, documents joined by [SEP] as `prepare` does;
    the last partial row is padded. Stops once `max_rows` rows are complete."""
    if seq_len < 8:
        raise BertforgeError(f"--seq-len {seq_len} is too short: pass at least 8 (e.g. 128)")
    builder = PackedBuilder(seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, "int64")
    out, total, batch = [], 0, []

    def flush() -> int:
        encs = tokenizer.encode_batch(batch, truncation=False, max_length=10**9, add_special_tokens=False)
        rows = builder.add("val", [np.asarray(e.input_ids, dtype=np.int64) for e in encs])
        out.append(rows)
        batch.clear()
        return len(rows)

    for doc in documents:
        batch.append(doc)
        if len(batch) >= 64:
            total += flush()
            if max_rows is not None and total >= max_rows:
                break
    if batch:
        flush()
    if max_rows is None or total < max_rows:
        out.append(builder.finish("val"))
    rows = np.concatenate(out) if out else np.empty((0, seq_len), np.int64)
    return rows if max_rows is None else rows[:max_rows]


def format_mlm_metrics(metrics: dict, prefix: str = "eval_") -> str:
    """One readable block: loss, accuracy, top-5, pseudo-perplexity, the most frequent prediction."""
    m = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
    return "\n".join([
        f"masked tokens     {m['masked_tokens']:,} ({m['mask_rate']:.0%} of the tokens of {m['rows']:,} rows, "
        "each shown as [MASK])",
        f"loss              {m['loss']:.4f}",
        f"accuracy          {m['accuracy']:.2%}",
        f"top-5 accuracy    {m['top5_accuracy']:.2%}",
        f"pseudo-perplexity {m['perplexity']:,.1f}",
        f"top prediction    {m['top_prediction']!r} in {m['top_prediction_share']:.1%} of the predictions",
    ])
