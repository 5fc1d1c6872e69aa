"""The masked-prediction view: mask a passage, let an MLM model fill it in, mark each guess right or wrong.

    records = masked_predictions(model, tokenizer, "The capital of France is Paris.", mask_rate=0.15)
    print(render_terminal(records))                  # green = right, red = wrong (gold shown after it)
    Path("view.html").write_text(render_html(records, "step 5000"))

`masked_predictions` masks with the training collator (`bertforge.data.masking.MLMCollator`, so the
positions are the ones a training batch with the same rate and seed would pick), runs the model with
`labels=None` to get full (B, T, V) logits, and returns one `TokenRecord` per non-padding token. By
default every chosen position shows [MASK] (a clean fill-in-the-blank reading); `bert_replacement=True`
keeps BERT's 80/10/10 split, so some targets show a random token or themselves, as in training.
Predictions range over the tokenizer's vocabulary only: rows the model's embedding matrix carries past
it (padding to a multiple of 64) are no tokens and are never predicted. A record is `correct` when the
arg-max over that vocabulary equals the gold id.

`bertforge inspect MODEL --text ... | --data DIR` runs it on a text or on a validation row of a folder
written by `bertforge prepare`, prints the terminal view and optionally writes the HTML page.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bertforge.data.dataset import open_shard, read_manifest
from bertforge.data.masking import IGNORE_INDEX, MaskingConfig, MLMCollator
from bertforge.errors import BertforgeError

MLM_HEADS = ("masked_lm", "pretraining")
GREEN, RED, DIM, RESET = "\x1b[1;32m", "\x1b[1;31m", "\x1b[2m", "\x1b[0m"


@dataclass
class TokenRecord:
    """One token of the passage; prediction fields are set only at masked positions."""

    position: int
    token: str  # the original token at this position
    masked: bool  # a prediction target
    special: bool  # [CLS], [SEP], ...
    shown: str  # what the model saw here: [MASK], a random token, or the token itself
    gold: str | None = None
    predicted: str | None = None
    prob: float | None = None  # the model's probability of `predicted`
    gold_prob: float | None = None
    correct: bool | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)


def accuracy(records: Sequence[TokenRecord]) -> tuple[int, int]:
    """(correct, masked) counts over the records."""
    masked = [r for r in records if r.masked]
    return sum(bool(r.correct) for r in masked), len(masked)


# ----------------------------------------------------------------------------- predictions


def _input_ids(tokenizer: Any, text_or_ids: str | Sequence[int] | np.ndarray | torch.Tensor,
               max_length: int) -> np.ndarray:
    if isinstance(text_or_ids, str):
        if not text_or_ids.strip():
            raise BertforgeError("the passage to inspect is empty: pass a text with a few sentences")
        return np.asarray(tokenizer.encode(text_or_ids, max_length=max_length, truncation=False).input_ids)
    ids = np.asarray(text_or_ids.tolist() if torch.is_tensor(text_or_ids) else text_or_ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise BertforgeError(f"token ids of shape {ids.shape}: pass one non-empty row of ids (a 1-D sequence)")
    if ids.size > max_length:
        raise BertforgeError(f"the passage has {ids.size} tokens but the model has {max_length} positions: "
                             "pass a shorter row")
    return ids


def _logits(model: nn.Module, batch: dict[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits (T, V) of the single row in `batch`, from a model called with labels=None."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        token_type_ids=batch["token_type_ids"].to(device), labels=None)
    finally:
        model.train(was_training)
    logits = getattr(out, "logits", out)
    T = batch["input_ids"].shape[1]
    if not torch.is_tensor(logits) or logits.dim() != 3 or tuple(logits.shape[:2]) != (1, T) \
            or logits.shape[-1] < vocab_size:
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise BertforgeError(f"the model returned logits {shape}, not (1, {T}, >= {vocab_size}): inspect needs a "
                             "masked-LM head (BertForMaskedLM or BertForPreTraining) matching the tokenizer")
    return logits[0, :, :vocab_size].float().cpu()  # (T, V)


def masked_predictions(model: nn.Module, tokenizer: Any, text_or_ids: str | Sequence[int] | np.ndarray,
                       mask_rate: float = 0.15, seed: int = 0, top_k: int = 5, *,
                       token_type_ids: Sequence[int] | None = None, whole_word: bool = False,
                       bert_replacement: bool = False) -> list[TokenRecord]:
    """Mask a passage (text, or one row of ids with its [CLS]/[SEP]), predict the masked tokens.

    Returns one record per non-padding token, in order. Raises BertforgeError when masking selects no
    position (passage too short for the rate) or the model has no MLM head.
    """
    if top_k < 1:
        raise BertforgeError(f"top_k={top_k} must be at least 1: pass --top-k 1 or more")
    config = getattr(model, "config", None)
    ids = _input_ids(tokenizer, text_or_ids, getattr(config, "max_position_embeddings", 512))
    cfg = MaskingConfig(mlm_probability=mask_rate, whole_word=whole_word,
                        mask_replace=0.8 if bert_replacement else 1.0, random_replace=0.1 if bert_replacement else 0.0)
    collator = MLMCollator.from_tokenizer(tokenizer, cfg, seed=seed)
    row: Any = ids[None, :]
    if token_type_ids is not None:
        row = [{"input_ids": ids, "token_type_ids": np.asarray(token_type_ids, dtype=np.int64)}]
    batch = collator(row)
    labels = batch["labels"][0]  # (T,)
    if not bool((labels != IGNORE_INDEX).any()):
        raise BertforgeError(f"masking {mask_rate:.0%} of this {ids.size}-token passage selects no token: pass a "
                             "longer passage or a higher --mask-rate")
    probs = _logits(model, batch, tokenizer.vocab_size).softmax(-1)  # (T, V)
    k = min(top_k, tokenizer.vocab_size)
    top_p, top_i = probs.topk(k, dim=-1)  # (T, k)
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    shown = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    special = set(tokenizer.special_ids)
    records = []
    for t, tok in enumerate(tokens):
        if ids[t] == tokenizer.pad_token_id:
            continue
        rec = TokenRecord(position=t, token=tok, masked=bool(labels[t] != IGNORE_INDEX),
                          special=int(ids[t]) in special, shown=shown[t])
        if rec.masked:
            cand = tokenizer.convert_ids_to_tokens(top_i[t].tolist())
            rec.top_k = [(c, float(p)) for c, p in zip(cand, top_p[t].tolist())]
            rec.gold, rec.predicted, rec.prob = tok, cand[0], float(top_p[t, 0])
            rec.gold_prob = float(probs[t, int(ids[t])])
            rec.correct = int(top_i[t, 0]) == int(ids[t])
        records.append(rec)
    return records


# ----------------------------------------------------------------------------- rendering


def _edges(records: Sequence[TokenRecord]) -> set[int]:
    """Indices of a leading [CLS] and a trailing [SEP], which the views leave out."""
    out = set()
    if records and records[0].special:
        out.add(0)
    if len(records) > 1 and records[-1].special:
        out.add(len(records) - 1)
    return out


def _piece(token: str, glued: bool) -> str:
    """A WordPiece as displayed: `##` dropped when the piece continues the previous word."""
    return token[2:] if glued and token.startswith("##") else token


def render_terminal(records: Sequence[TokenRecord], color: bool = True) -> str:
    """The passage with predictions at masked positions: green when right; red followed by the gold
    token when wrong. Without color: `[pred✓]` and `[pred✗ gold]`. Ends with the accuracy line."""
    parts = []
    skip = _edges(records)
    for i, r in enumerate(records):
        if i in skip:
            continue
        glued = r.token.startswith("##")
        sep = "" if glued or not parts else " "
        if not r.masked:
            text = f"{DIM}{r.token}{RESET}" if (r.special and color) else _piece(r.token, glued)
        else:
            pred, gold = _piece(r.predicted or "", glued), _piece(r.gold or "", glued)
            if color:
                text = f"{GREEN}{pred}{RESET}" if r.correct else f"{RED}{pred}{RESET}{DIM}({gold}){RESET}"
            else:
                text = f"[{pred}✓]" if r.correct else f"[{pred}✗ {gold}]"
        parts.append(sep + text)
    correct, masked = accuracy(records)
    summary = f"{correct}/{masked} masked tokens predicted correctly ({correct / max(masked, 1):.1%})"
    return "".join(parts) + "\n" + summary


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; line-height: 2.1; color: #222; }
h1 { font-size: 1.3rem; } .summary { font-size: 1.05rem; } .legend { color: #666; font-size: .9rem; }
.passage { font-family: Georgia, serif; font-size: 1.05rem; }
.tok { position: relative; padding: .1rem .25rem; border-radius: .25rem; cursor: help; }
.ok { background: #d5f5d5; border-bottom: 2px solid #2a8a2a; }
.bad { background: #fbd9d9; border-bottom: 2px solid #b52a2a; }
.gold { font-size: .75rem; color: #555; margin-left: .2rem; }
.special { color: #aaa; font-size: .8rem; }
.tip { display: none; position: absolute; left: 0; top: 1.9rem; z-index: 2; background: #fff; border: 1px solid #bbb;
       border-radius: .3rem; padding: .3rem .5rem; font: .8rem/1.3 system-ui, sans-serif; white-space: nowrap;
       box-shadow: 0 2px 6px rgba(0,0,0,.15); }
.tok:hover .tip { display: block; }
.tip td { padding: 0 .4rem; } .tip .hit { font-weight: bold; }
"""


def _pct(p: float) -> str:
    return f"{p:.1%}" if p >= 0.001 else f"{100 * p:.1e}%"


def _tip(r: TokenRecord) -> str:
    rows = "".join(f'<tr class="{"hit" if tok == r.gold else ""}"><td>{n}.</td><td>{html.escape(tok)}</td>'
                   f"<td>{_pct(p)}</td></tr>" for n, (tok, p) in enumerate(r.top_k, 1))
    return (f'<span class="tip">gold: <b>{html.escape(r.gold or "")}</b> ({_pct(r.gold_prob or 0.0)})<br>'
            f"input: {html.escape(r.shown)}<table>{rows}</table></span>")


def _html_token(r: TokenRecord, glued: bool) -> str:
    if not r.masked:
        text = html.escape(_piece(r.token, glued))
        return f'<span class="special">{text}</span>' if r.special else text
    pred = html.escape(_piece(r.predicted or "", glued))
    gold = "" if r.correct else f'<span class="gold">{html.escape(_piece(r.gold or "", glued))}</span>'
    kind = "ok" if r.correct else "bad"
    return (f'<span class="tok {kind}" data-correct="{int(bool(r.correct))}" data-gold="{html.escape(r.gold or "")}" '
            f'data-pred="{html.escape(r.predicted or "")}">{pred}{gold}{_tip(r)}</span>')


def render_html(records: Sequence[TokenRecord], title: str = "bertforge masked predictions") -> str:
    """A standalone HTML page: the passage with masked positions highlighted (hover: top-k), and accuracy."""
    skip = _edges(records)
    body = []
    for i, r in enumerate(records):
        if i in skip:
            continue
        glued = r.token.startswith("##")
        body.append(("" if glued or not body else " ") + _html_token(r, glued))
    correct, masked = accuracy(records)
    acc = correct / max(masked, 1)
    t = html.escape(title)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{t}</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>{t}</h1>\n"
            f'<p class="summary" data-correct="{correct}" data-masked="{masked}">Accuracy <b>{acc:.1%}</b>: '
            f"{correct} of {masked} masked tokens predicted correctly.</p>\n"
            '<p class="legend"><span class="tok ok">right</span> <span class="tok bad">wrong '
            '<span class="gold">gold</span></span> &nbsp;hover a highlighted token for the top predictions.</p>\n'
            f'<div class="passage">{"".join(body)}</div>\n</body></html>\n')


# ----------------------------------------------------------------------------- prepared data


def validation_row(data_dir: str | os.PathLike, index: int, tokenizer: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Row `index` of the validation split of a `bertforge prepare` folder: (ids (T,), token types or None)."""
    d = Path(data_dir)
    if not (d / "manifest.json").is_file():
        raise BertforgeError(f"'{data_dir}' is not a prepared data folder (no manifest.json): pass the --output "
                             "folder of `bertforge prepare`, or use --text")
    manifest = read_manifest(d / "manifest.json", keys=("seq_len", "dtype", "shards"))
    fingerprint = (manifest.get("tokenizer") or {}).get("fingerprint") or manifest.get("tokenizer_fingerprint")
    if fingerprint and fingerprint != tokenizer.fingerprint():
        raise BertforgeError(f"'{data_dir}' was prepared with another tokenizer than the model's: pass the data "
                             "prepared for this model, or --tokenizer with the one used by prepare")
    shards = [s for s in manifest.get("shards", []) if s.get("split") == "val"]
    total = sum(s["rows"] for s in shards)
    if not 0 <= index < total:
        raise BertforgeError(f"--index {index} is out of range: '{data_dir}' has {total} validation rows"
                             + (" (re-run prepare with a validation fraction above 0)" if not total else ""))
    for shard in shards:
        if index < shard["rows"]:
            break
        index -= shard["rows"]
    rows = open_shard(d, shard["file"], shard["rows"], manifest["seq_len"], manifest["dtype"])
    ids = np.asarray(rows[index], dtype=np.int64)
    if manifest.get("mode") != "nsp":
        return ids, None
    pairs = np.fromfile(d / shard["file"].replace(".bin", ".pairs.bin"), dtype=np.int32).reshape(-1, 2)
    types = (np.arange(ids.size) >= pairs[index, 0]) & (ids != tokenizer.pad_token_id)  # B up to its [SEP]
    return ids, types.astype(np.int64)
