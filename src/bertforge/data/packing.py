"""Row builders: how tokenized documents become fixed-length rows, packed or NSP pairs.

`PackedBuilder` joins a split's documents with one [SEP] between them and cuts the stream into
`[CLS] body [SEP]` rows of `seq_len` tokens, carrying the remainder to the next batch (the last
partial row is padded by `finish`). `NspBuilder` follows BERT's `create_instances_from_document`:
sentences (`split_sentences`) are gathered into A/B pairs, B is a random window from another
document of the same split half the time, and `_truncate_pair` trims the longer side; rows are
`[CLS] A [SEP] B [SEP] [PAD]...` with per-row (segment B start, is_next). Both builders keep per-split
state that `state()` / `load()` save and restore for an exact resume. The file layout these rows are
written in is described in `bertforge.data.shards`.
"""

from __future__ import annotations

import re

import numpy as np

SPLITS = ("train", "val")
NSP_POOL = 512  # random-next windows kept per split
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(document: str) -> list[str]:
    """NSP segments: the document's lines, each split after . ! ? followed by a capital or digit."""
    return [s for line in document.split("\n") for s in _SENTENCE_END.split(line) if s.strip()]


class PackedBuilder:
    """Per split: document tokens -> `[CLS] body [SEP]` rows of the joined stream (module docstring)."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, pad_id: int, dtype: str) -> None:
        self.seq_len, self.cls_id, self.sep_id, self.pad_id = seq_len, cls_id, sep_id, pad_id
        self.dtype = np.dtype(dtype)
        self.carry = {s: np.empty(0, self.dtype) for s in SPLITS}
        self.started = {s: False for s in SPLITS}

    def add(self, split: str, docs: list[np.ndarray]) -> np.ndarray:
        """Append documents to the split's stream; return the completed rows (n, T)."""
        pieces, sep = [self.carry[split]], np.array([self.sep_id], self.dtype)
        for doc in docs:
            if len(doc) == 0:
                continue
            if self.started[split]:
                pieces.append(sep)
            pieces.append(doc)
            self.started[split] = True
        stream = np.concatenate(pieces)
        body = self.seq_len - 2
        n = len(stream) // body
        self.carry[split] = stream[n * body:].copy()
        return self._rows(stream[: n * body].reshape(n, body))

    def _rows(self, body: np.ndarray) -> np.ndarray:
        rows = np.full((len(body), self.seq_len), self.pad_id, self.dtype)  # (n, T)
        rows[:, 0] = self.cls_id
        rows[:, 1:body.shape[1] + 1] = body
        rows[:, body.shape[1] + 1] = self.sep_id
        return rows

    def finish(self, split: str) -> np.ndarray:
        """The split's final partial row, padded (0 or 1 rows)."""
        carry, self.carry[split] = self.carry[split], np.empty(0, self.dtype)
        return self._rows(carry[None, :]) if len(carry) else np.empty((0, self.seq_len), self.dtype)

    def state(self) -> dict[str, np.ndarray]:
        out = {f"carry_{s}": self.carry[s] for s in SPLITS}
        out["started"] = np.array([self.started[s] for s in SPLITS])
        return out

    def load(self, state: dict[str, np.ndarray]) -> None:
        for i, s in enumerate(SPLITS):
            self.carry[s] = state[f"carry_{s}"].astype(self.dtype)
            self.started[s] = bool(state["started"][i])


class NspBuilder:
    """Per document: sentences -> (A, B, is_next) pairs as in BERT's create_pretraining_data.py."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, pad_id: int, dtype: str, seed: int,
                 short_seq_prob: float) -> None:
        self.seq_len, self.cls_id, self.sep_id, self.pad_id = seq_len, cls_id, sep_id, pad_id
        self.max_tokens = seq_len - 3
        self.dtype, self.seed, self.short_seq_prob = np.dtype(dtype), seed, short_seq_prob
        self.pool: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.skipped = 0  # one-sentence chunks before any other document existed to draw B from

    def _target(self, rng: np.random.Generator) -> int:
        if rng.random() < self.short_seq_prob:
            return int(rng.integers(2, self.max_tokens + 1))
        return self.max_tokens

    def add(self, split: str, doc_index: int, sents: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Rows (n, T) and pair info (n, 2) = (segment B start, is_next) for one document."""
        rng = np.random.default_rng((self.seed, doc_index))
        sents = [s for s in sents if len(s)]
        pool, pairs, chunk, length, i = self.pool[split], [], [], 0, 0
        target = self._target(rng)
        while i < len(sents):
            chunk.append(sents[i])
            length += len(sents[i])
            if i == len(sents) - 1 or length >= target:
                a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
                a = np.concatenate(chunk[:a_end])
                if (len(chunk) == 1 or rng.random() < 0.5) and pool:
                    b = pool[int(rng.integers(len(pool)))][: max(1, target - len(a))]
                    pairs.append((a, b, 0))
                    i -= len(chunk) - a_end  # put the unused sentences back
                elif len(chunk) >= 2:
                    pairs.append((a, np.concatenate(chunk[a_end:]), 1))
                else:
                    self.skipped += 1
                chunk, length, target = [], 0, self._target(rng)
            i += 1
        self._remember(split, sents, rng)
        return self._rows(pairs, rng)

    def _remember(self, split: str, sents: list[np.ndarray], rng: np.random.Generator) -> None:
        if not sents:
            return
        start = int(rng.integers(len(sents)))
        window, total = [], 0
        for s in sents[start:]:
            window.append(s)
            total += len(s)
            if total >= self.max_tokens:
                break
        window = np.concatenate(window)[: self.max_tokens]
        pool = self.pool[split]
        if len(pool) < NSP_POOL:
            pool.append(window)
        else:
            pool[int(rng.integers(NSP_POOL))] = window

    def _rows(self, pairs: list, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        rows = np.full((len(pairs), self.seq_len), self.pad_id, self.dtype)  # (n, T)
        info = np.zeros((len(pairs), 2), np.int32)
        for r, (a, b, is_next) in enumerate(pairs):
            a, b = _truncate_pair(a, b, self.max_tokens, rng)
            la, lb = len(a), len(b)
            rows[r, 0] = self.cls_id
            rows[r, 1:la + 1] = a
            rows[r, la + 1] = self.sep_id
            rows[r, la + 2:la + 2 + lb] = b
            rows[r, la + 2 + lb] = self.sep_id
            info[r] = (la + 2, is_next)
        return rows, info

    def state(self) -> dict[str, np.ndarray]:
        out = {"skipped": np.array(self.skipped)}
        for s in SPLITS:
            windows = self.pool[s]
            out[f"pool_{s}"] = np.concatenate(windows) if windows else np.empty(0, self.dtype)
            out[f"pool_len_{s}"] = np.array([len(w) for w in windows], np.int64)
        return out

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.skipped = int(state["skipped"])
        for s in SPLITS:
            bounds = np.cumsum(state[f"pool_len_{s}"])[:-1]
            flat = state[f"pool_{s}"].astype(self.dtype)
            self.pool[s] = list(np.split(flat, bounds)) if len(state[f"pool_len_{s}"]) else []


def _truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT's truncate_seq_pair in closed form: trim the longer side one token at a time (ties trim B),
    each token from the front or the back at random."""
    la, lb = len(a), len(b)
    if la + lb <= max_tokens:
        return a, b
    new_a = min(la, max(max_tokens - lb, (max_tokens + 1) // 2))
    new_b = max_tokens - new_a

    def cut(x: np.ndarray, keep: int) -> np.ndarray:
        drop = len(x) - keep
        front = int(rng.binomial(drop, 0.5)) if drop else 0
        return x[front:front + keep]

    return cut(a, new_a), cut(b, new_b)
