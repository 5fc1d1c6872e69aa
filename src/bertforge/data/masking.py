"""Dynamic masked-language-model masking, done in the collator at batch time.

`mask_tokens` picks positions to predict and applies BERT's 80/10/10 replacement; `MLMCollator` turns
a batch of packed token rows (uint16/uint32 numpy, already holding [CLS]/[SEP]/[PAD]) into the
LongTensors the pretraining heads take. Everything is vectorised torch over the whole (B, T) batch, and
every random draw comes from one `torch.Generator` whose state the trainer checkpoints, so a resumed run
masks exactly as an uninterrupted one would.

How many positions are masked (`MaskingConfig.sampling`):
- "fixed" (default): each sequence gets exactly `round(mlm_probability * n)` masked units, where n is its
  number of maskable units (tokens, or whole words with `whole_word=True`) and `round` is round-half-
  to-even (Python's and torch's). This removes the batch-to-batch variance of the MLM target count,
  which keeps the sparse MLM head's (M, V) logits a near-constant size.
- "bernoulli": each unit is masked independently with probability `mlm_probability` (HF's
  DataCollatorForLanguageModeling).

Whole-word masking treats a word (a token not starting with "##" plus the "##" pieces after it) as
one unit, so all its pieces are masked together; the expected fraction of masked tokens is still
`mlm_probability`. Special tokens and padding are never masked, labelled, or drawn as random
replacements. A "##" piece directly after a special token (a word cut by packing) is its own unit.

Run the collator in the main process (DataLoader `num_workers=0` for it, or call it on batches the
workers return): worker processes would each hold a copy of the generator, and its state could not be
checkpointed. Masking a 256 x 128 batch takes about 2 ms on one CPU core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bertforge.errors import require

IGNORE_INDEX = -100
SAMPLING = ("fixed", "bernoulli")


@dataclass
class MaskingConfig:
    """MLM masking settings: rate, replacement split, whole-word units, and how the count is drawn."""

    mlm_probability: float = 0.15
    mlm_probability_final: float | None = None  # pretraining: the rate moves linearly to this over the budget
    mask_replace: float = 0.8  # of the chosen positions: share replaced by [MASK]
    random_replace: float = 0.1  # share replaced by a random non-special token; the rest stay as is
    whole_word: bool = False
    sampling: str = "fixed"  # "fixed" | "bernoulli" (see module docstring)

    def __post_init__(self) -> None:
        require(0.0 < self.mlm_probability < 1.0,
                f"mlm_probability={self.mlm_probability} is out of range: pass a value in (0, 1), e.g. 0.15")
        require(self.mlm_probability_final is None or 0.0 < self.mlm_probability_final < 1.0,
                f"mlm_probability_final={self.mlm_probability_final} is out of range: pass a value in (0, 1)")
        require(self.mask_replace >= 0.0 and self.random_replace >= 0.0
                and self.mask_replace + self.random_replace <= 1.0,
                f"mask_replace={self.mask_replace} + random_replace={self.random_replace} must be two "
                "non-negative shares summing to at most 1: use e.g. 0.8 and 0.1")
        require(self.sampling in SAMPLING,
                f"masking sampling '{self.sampling}' is unknown: pass one of {', '.join(SAMPLING)}")


def word_start_table(tokens: Sequence[str]) -> torch.Tensor:
    """(V,) bool: True where vocabulary entry i starts a word (does not begin with "##")."""
    return torch.tensor([not t.startswith("##") for t in tokens], dtype=torch.bool)


def random_token_pool(vocab_size: int, special_ids: Sequence[int] | torch.Tensor = ()) -> torch.Tensor:
    """(N,) LongTensor of the ids random replacements are drawn from: the vocabulary minus specials."""
    special = special_ids.tolist() if torch.is_tensor(special_ids) else list(special_ids)
    return _pool(int(vocab_size), tuple(sorted(set(special))))


@lru_cache(maxsize=8)
def _pool(vocab_size: int, special: tuple[int, ...]) -> torch.Tensor:
    ids = torch.arange(vocab_size)
    pool = ids[~torch.isin(ids, torch.tensor(special, dtype=torch.long))]
    require(pool.numel() > 0, f"vocab_size={vocab_size} leaves no non-special token to draw: check the vocabulary")
    return pool


def _word_units(word_starts: torch.Tensor, maskable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group tokens into words. Returns units (B, T) bool: maskable word starts; owner (B, T) long:
    position of the start of each token's word. Non-maskable tokens are one-token groups, and a token
    right after one always starts a new group, so a group is either all maskable or a single special."""
    B, T = maskable.shape
    prev_maskable = F.pad(maskable[:, :-1], (1, 0), value=False)  # (B, T); False at column 0
    starts = word_starts.to(torch.bool) | ~maskable | ~prev_maskable  # (B, T)
    pos = torch.arange(T, device=maskable.device).expand(B, T)  # (B, T)
    owner = torch.where(starts, pos, 0).cummax(dim=1).values  # (B, T) index of the group's first token
    return starts & maskable, owner


def _choose_fixed(keys: torch.Tensor, units: torch.Tensor, rate: float) -> torch.Tensor:
    """Exactly round(rate * n_units) units per row: the ones with the smallest random keys."""
    count = torch.round(units.sum(dim=1).double() * rate).long()  # (B,)
    kmax = int(count.max()) if count.numel() else 0
    keyed = keys.masked_fill(~units, 2.0)  # (B, T) non-units sort after every unit (keys < 1)
    idx = keyed.topk(kmax, dim=1, largest=False, sorted=True).indices  # (B, kmax) smallest keys first
    take = torch.arange(kmax, device=units.device) < count[:, None]  # (B, kmax) first count[b] of row b
    return torch.zeros_like(units).scatter_(1, idx, take)  # (B, T)


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    vocab_size: int,
    mask_token_id: int,
    cfg: MaskingConfig,
    generator: torch.Generator,
    word_starts: torch.Tensor | None = None,
    *,
    special_ids: Sequence[int] | torch.Tensor = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a (B, T) batch. Returns (masked input_ids, labels), both (B, T) long, labels = -100 except at
    masked positions where they hold the original id.

    `special_mask` (B, T) bool marks positions never to mask ([CLS], [SEP], [PAD], ...). `vocab_size` is
    the tokenizer's (unpadded) size; random replacements come from it minus `special_ids`. With
    `cfg.whole_word`, `word_starts` (B, T) bool marks tokens that begin a word. The generator must live on
    input_ids' device; the same generator state and inputs always give the same output, and the number
    of draws per call depends only on the batch shape.
    """
    require(input_ids.dim() == 2, f"input_ids has shape {tuple(input_ids.shape)}: pass a (batch, seq_len) tensor")
    maskable = ~special_mask.to(torch.bool)  # (B, T)
    if cfg.whole_word:
        require(word_starts is not None,
                "whole_word masking needs word_starts: pass a (batch, seq_len) bool tensor or set whole_word=False")
        units, owner = _word_units(word_starts, maskable)
    else:
        units, owner = maskable, None
    shape, device = input_ids.shape, input_ids.device
    keys = torch.rand(shape, generator=generator, device=device)  # (B, T) selection keys
    action = torch.rand(shape, generator=generator, device=device)  # (B, T) 80/10/10 draw
    pool = random_token_pool(vocab_size, special_ids).to(device)
    random_ids = pool[torch.randint(pool.numel(), shape, generator=generator, device=device)]  # (B, T)

    if cfg.sampling == "fixed":
        chosen = _choose_fixed(keys, units, cfg.mlm_probability)
    else:
        chosen = units & (keys < cfg.mlm_probability)
    masked = chosen if owner is None else chosen.gather(1, owner) & maskable  # (B, T)

    labels = torch.where(masked, input_ids, IGNORE_INDEX)
    to_mask = masked & (action < cfg.mask_replace)
    to_random = masked & ~to_mask & (action < cfg.mask_replace + cfg.random_replace)
    out = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    out = torch.where(to_random, random_ids, out)
    return out, labels


def _stack_rows(rows: Sequence[Any], what: str) -> np.ndarray:
    """Stack equal-length 1-D integer rows into a (B, T) int64 array; ragged rows are a user error."""
    lengths = {len(r) for r in rows}
    require(len(lengths) == 1,
            f"collator got {what} rows of lengths {sorted(lengths)}: pack or pad sequences to one length "
            "(bertforge prepare does)")
    return np.stack([np.asarray(r) for r in rows]).astype(np.int64, copy=False)


class MLMCollator:
    """Batch of packed rows -> {input_ids, attention_mask, token_type_ids, labels[, next_sentence_label]}.

    A batch is a (B, T) integer array, a list of 1-D rows, or a list of mappings with "input_ids" and
    optionally "token_type_ids" and "next_sentence_label" (NSP pairs). Token types are taken from the
    rows when given; for NSP pairs without them, positions after the first [SEP] (up to padding) are
    segment 1; otherwise all zeros (packed multi-document rows are one segment, as in RoBERTa).
    """

    def __init__(
        self,
        vocab_size: int,
        mask_token_id: int,
        pad_token_id: int,
        special_ids: Sequence[int],
        cfg: MaskingConfig | None = None,
        *,
        sep_token_id: int | None = None,
        word_starts: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        self.cfg = cfg or MaskingConfig()
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.sep_token_id = sep_token_id
        self.special_ids = torch.tensor(sorted(set(special_ids) | {pad_token_id}), dtype=torch.long)
        self.special_table = torch.zeros(vocab_size, dtype=torch.bool)  # (V,) id -> is special
        self.special_table[self.special_ids] = True
        require(not self.cfg.whole_word or word_starts is not None,
                "whole_word masking needs the vocabulary's word starts: build the collator with "
                "MLMCollator.from_tokenizer(...) or pass word_starts=word_start_table(tokens)")
        require(word_starts is None or word_starts.numel() == vocab_size,
                f"word_starts has {0 if word_starts is None else word_starts.numel()} entries but "
                f"vocab_size={vocab_size}: build it from the same vocabulary")
        self.word_starts = word_starts
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, cfg: MaskingConfig | None = None, *, seed: int = 0) -> MLMCollator:
        """Build from a `bertforge.wordpiece.WordPieceTokenizer` (or anything with the same fields)."""
        cfg = cfg or MaskingConfig()
        starts = None
        if cfg.whole_word:
            starts = word_start_table(tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size))))
        return cls(tokenizer.vocab_size, tokenizer.mask_token_id, tokenizer.pad_token_id,
                   sorted(tokenizer.special_ids), cfg, sep_token_id=tokenizer.sep_token_id,
                   word_starts=starts, seed=seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator state; restoring it makes the next batches mask exactly as before."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def _read_batch(self, batch: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Return (input_ids (B, T), token_type_ids (B, T) or None, next_sentence_label (B,) or None)."""
        if isinstance(batch, np.ndarray):
            require(batch.ndim == 2, f"collator got an array of shape {batch.shape}: pass (batch, seq_len) rows")
            return batch.astype(np.int64, copy=False), None, None
        require(len(batch) > 0, "collator got an empty batch: pass at least one row")
        if not isinstance(batch[0], Mapping):
            return _stack_rows(batch, "input_ids"), None, None
        ids = _stack_rows([b["input_ids"] for b in batch], "input_ids")
        has_tt = ["token_type_ids" in b for b in batch]
        has_nsp = ["next_sentence_label" in b for b in batch]
        require(len(set(has_tt)) == 1 and len(set(has_nsp)) == 1,
                "collator got rows with and without token_type_ids/next_sentence_label: make every row alike")
        types = _stack_rows([b["token_type_ids"] for b in batch], "token_type_ids") if has_tt[0] else None
        nsp = np.asarray([int(b["next_sentence_label"]) for b in batch], dtype=np.int64) if has_nsp[0] else None
        return ids, types, nsp

    def _token_types(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """NSP pairs: 1 after the first [SEP] (inclusive of the second), 0 elsewhere and at padding."""
        require(self.sep_token_id is not None,
                "NSP pairs without token_type_ids need sep_token_id: pass it to MLMCollator")
        is_sep = (input_ids == self.sep_token_id).long()  # (B, T)
        after_first = (is_sep.cumsum(dim=1) - is_sep) >= 1  # (B, T)
        return (after_first & attention_mask.bool()).long()

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        ids_np, types_np, nsp_np = self._read_batch(batch)
        input_ids = torch.from_numpy(ids_np)  # (B, T)
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            require(lo >= 0 and hi < self.vocab_size,
                    f"token id {hi if hi >= self.vocab_size else lo} is outside the vocabulary of size "
                    f"{self.vocab_size}: the shards were built with another vocab; re-run prepare")
        attention_mask = (input_ids != self.pad_token_id).long()  # (B, T)
        special_mask = self.special_table[input_ids]  # (B, T)
        word_starts = self.word_starts[input_ids] if self.cfg.whole_word else None
        masked, labels = mask_tokens(input_ids, special_mask, self.vocab_size, self.mask_token_id, self.cfg,
                                     self.generator, word_starts, special_ids=self.special_ids)
        if types_np is not None:
            token_type_ids = torch.from_numpy(types_np)
        elif nsp_np is not None:
            token_type_ids = self._token_types(input_ids, attention_mask)
        else:
            token_type_ids = torch.zeros_like(input_ids)
        out = {"input_ids": masked, "attention_mask": attention_mask,
               "token_type_ids": token_type_ids, "labels": labels}
        if nsp_np is not None:
            out["next_sentence_label"] = torch.from_numpy(nsp_np)
        return out


__all__ = ["IGNORE_INDEX", "MLMCollator", "MaskingConfig", "mask_tokens", "random_token_pool",
           "word_start_table"]
