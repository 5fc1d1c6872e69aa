"""Sentence embeddings: pooling (cls / mean / max), L2 normalisation and `SentenceEncoder`.

`SentenceEncoder` is sentence-transformers' `Transformer -> Pooling -> Normalize` as one small module:
`forward` is differentiable (training), `encode` is the fast inference path. `encode` is built for
throughput on CPU and gives the same embeddings as `sentence_transformers.SentenceTransformer.encode`:

- the texts are tokenized once, in one call to the Rust backend (no per-sentence Python work);
- they are sorted by their exact token count (sentence-transformers sorts by character count, which
  leaves about 30% padding on STS-B sentences at batch 32; exact counts leave about 2.5%);
- batches are cut by a token budget: short sentences go in large batches, long ones in small ones, so
  every forward has about the same number of tokens (cache-friendly activations, no tiny GEMMs);
- a batch ends where the length changes once it is half full, so most batches have one length and no
  attention mask: `BertModel` drops the mask, SDPA takes its mask-free kernel, pooling is a plain mean;
- on CPU, `torch.get_num_threads()` batches run at once, one thread each, instead of one batch whose
  every small op is split across the threads: on 2 cores this scales 2.0x over one thread where
  splitting ops scales 1.8x (STS-B, MiniLM), and a busy machine hurts it far less (no barriers);
- everything runs under `torch.inference_mode()`, and the embeddings come back in the input order.

Texts longer than `max_seq_length` tokens are cut to it ([CLS] + the first tokens + [SEP]), exactly as
sentence-transformers does; that is what `max_seq_length` means for an embedding model.

`from_pretrained` reads our directories, Hugging Face BERT directories and sentence-transformers
directories (the layout is parsed in `st_layout`, classic and sentence-transformers 6 files);
`save_sentence_transformers` writes the classic layout (the encoder as a transformers folder, see
`export`), which every sentence-transformers version since 2.0 loads unchanged (with
`trust_remote_code=True` for architectures transformers has no class for).

Shapes: B batch, T sequence length, H hidden size, N texts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bertforge.errors import BertforgeError
from bertforge.model.bert import BertModel
from bertforge.model.export import write_transformers_folder
from bertforge.model.loading import load_model, write_atomic
from bertforge.model.st_layout import POOLING_MODES, is_st_folder, read_st_layout, write_st_layout

TOKENS_PER_BATCH = 2048  # padded tokens per encode() forward; 512-2048 within 3% on 1 thread, 4096 -8%


def pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None, mode: str = "mean") -> torch.Tensor:
    """(B, T, H) token states -> (B, H) sentence vectors; padding (mask 0) never counts.

    cls: the state at position 0 (the [CLS] token). mean: the average over unmasked tokens. max: the
    elementwise maximum over unmasked tokens. A None mask means every token counts.
    """
    check_pooling(mode)
    h = last_hidden_state
    if mode == "cls":
        return h[:, 0]  # (B, H)
    if attention_mask is None:
        return h.mean(dim=1) if mode == "mean" else h.amax(dim=1)
    keep = attention_mask[:, :, None].to(torch.bool)  # (B, T, 1)
    if mode == "max":
        return h.masked_fill(~keep, float("-inf")).amax(dim=1)
    counts = keep.sum(dim=1).clamp(min=1).to(h.dtype)  # (B, 1)
    return (h * keep.to(h.dtype)).sum(dim=1) / counts


def normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """L2-normalise each row: (N, H) -> (N, H) with unit norms (a zero row stays zero)."""
    return F.normalize(embeddings, p=2.0, dim=-1)


def check_pooling(mode: str) -> None:
    if mode not in POOLING_MODES:
        raise BertforgeError(f"pooling mode '{mode}' is unknown: use one of {', '.join(POOLING_MODES)}")


def plan_batches(lengths: np.ndarray, batch_size: int, max_tokens: int) -> list[np.ndarray]:
    """Index batches over texts of token counts `lengths`, longest texts first.

    Texts are sorted by length; a batch takes texts while it has at most `batch_size` of them and its
    padded size (count x longest) stays within `max_tokens` (a text longer than the budget gets a
    batch of its own). A batch also ends where the length changes once it is at least half full, so
    most batches hold texts of one length: no padding, no attention mask.
    """
    order = np.argsort(-lengths, kind="stable")  # longest first: any memory problem shows at once
    batches, start, cap = [], 0, 1
    for pos in range(len(order)):
        size = pos - start
        if size == 0:
            cap = max(1, min(batch_size, max_tokens // max(int(lengths[order[pos]]), 1)))
        elif size == cap or (2 * size >= cap and lengths[order[pos]] != lengths[order[pos - 1]]):
            batches.append(order[start:pos])
            start, cap = pos, max(1, min(batch_size, max_tokens // max(int(lengths[order[pos]]), 1)))
    if start < len(order):
        batches.append(order[start:])
    return batches


class SentenceEncoder(nn.Module):
    """BertModel -> pooling -> optional L2 normalisation, as sentence-transformers composes them."""

    def __init__(self, bert: BertModel, pooling: str = "mean", normalize: bool = True,
                 max_seq_length: int = 256) -> None:
        super().__init__()
        check_pooling(pooling)
        limit = bert.config.max_position_embeddings
        if not 1 < max_seq_length <= limit:
            raise BertforgeError(f"max_seq_length {max_seq_length} does not fit the model's {limit} positions: "
                                 f"pass a value from 2 to {limit}")
        self.bert = bert
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_length = max_seq_length

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids and mask -> (B, H) sentence embeddings (differentiable)."""
        h = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, T, H)
        emb = pool(h, attention_mask, self.pooling)  # (B, H)
        return normalize(emb) if self.normalize else emb

    # ------------------------------------------------------------------ inference

    def encode(self, texts: Sequence[str], tokenizer, *, batch_size: int = 64, max_seq_length: int | None = None,
               show_progress: bool = False, max_tokens: int = TOKENS_PER_BATCH, workers: int | None = None
               ) -> torch.Tensor:
        """Embed `texts` -> (N, H) on the model's device, row i for texts[i].

        `batch_size` caps the texts per forward and `max_tokens` the padded tokens per forward
        (see `plan_batches`); `max_seq_length` (default: the encoder's) cuts longer texts. On CPU,
        `workers` batches run at once, one thread each (default `torch.get_num_threads()`, so the
        process uses the threads it was given; 1 = one batch at a time on all threads).
        """
        if batch_size < 1 or max_tokens < 1:
            raise BertforgeError(f"batch_size {batch_size} and max_tokens {max_tokens} must be at least 1")
        ids, _ = self._tokenize(texts, tokenizer, max_seq_length)
        return self.encode_ids(ids, tokenizer.pad_token_id, batch_size=batch_size, max_tokens=max_tokens,
                               workers=workers, show_progress=show_progress)

    def encode_ids(self, ids: list[list[int]], pad_id: int, *, batch_size: int = 64,
                   max_tokens: int = TOKENS_PER_BATCH, workers: int | None = None, show_progress: bool = False
                   ) -> torch.Tensor:
        """Embed token-id rows that are ready ([CLS] ... [SEP], within the length limit) -> (N, H), row i
        for ids[i]: the batching of `encode` without its tokenizer (the server tokenizes per request)."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        device = next(self.bert.parameters()).device
        threads = torch.get_num_threads()
        workers = (threads if device.type == "cpu" else 1) if workers is None else workers
        if workers < 1:
            raise BertforgeError(f"workers {workers} must be at least 1: pass 1 to run one batch at a time")
        batches = plan_batches(lengths, batch_size, max_tokens)

        def embed(idx: np.ndarray) -> torch.Tensor:
            input_ids, mask = _pad([ids[i] for i in idx], lengths[idx], pad_id)
            with torch.inference_mode():
                return self.forward(input_ids.to(device), None if mask is None else mask.to(device))  # (B, H)

        out = torch.empty(len(ids), self.bert.config.hidden_size, device=device)
        was_training = self.training
        self.eval()
        progress = tqdm(total=len(batches), desc="encode", unit="batch", disable=not show_progress)
        try:
            for idx, emb in _run(embed, batches, min(workers, len(batches))):
                out = out.to(emb.dtype) if out.dtype != emb.dtype else out
                out[torch.from_numpy(idx).to(device)] = emb
                progress.update()
        finally:
            progress.close()
            self.train(was_training)
            if workers > 1:
                torch.set_num_threads(threads)  # the workers' set_num_threads(1) also set the global default
        return out

    def _tokenize(self, texts: Sequence[str], tokenizer, max_seq_length: int | None
                  ) -> tuple[list[list[int]], np.ndarray]:
        """Token ids of every text ([CLS] ... [SEP]), cut to the length limit, and their lengths."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise BertforgeError("encode() takes a list of strings: wrap a single text as [text]")
        limit = self.max_seq_length if max_seq_length is None else max_seq_length
        positions = self.bert.config.max_position_embeddings
        if not 1 < limit <= positions:
            raise BertforgeError(f"max_seq_length {limit} does not fit the model's {positions} positions: "
                                 f"pass a value from 2 to {positions}")
        ids = [e.ids for e in tokenizer.backend.encode_batch_fast(list(texts))]
        sep = tokenizer.sep_token_id
        for i, row in enumerate(ids):
            if len(row) > limit:  # [CLS] a b c ... [SEP] -> [CLS] + first limit-2 tokens + [SEP]
                ids[i] = row[:limit - 1] + [sep]
        return ids, np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> SentenceEncoder:
        """Load a sentence-transformers directory, our directory or a Hugging Face BERT directory.

        Pooling, normalisation and max_seq_length come from the sentence-transformers files
        (`st_layout`); a plain BERT directory gets what sentence-transformers gives it: mean pooling,
        no normalisation and the model's position count (our directories may carry them in their meta).
        """
        loaded = load_model(path, head="base")
        meta, config = loaded.meta, loaded.config
        pooling, normalize_, max_len = meta.get("pooling", "mean"), bool(meta.get("normalize", False)), None
        if is_st_folder(Path(path)):
            layout = read_st_layout(Path(path))
            layout.check_embedding_pipeline()
            pooling, normalize_, max_len = layout.pooling, layout.normalize, layout.max_seq_length
        max_len = max_len or meta.get("max_seq_length") or config.max_position_embeddings
        if pooling not in POOLING_MODES:
            raise BertforgeError(f"'{path}' uses a pooling mode other than {', '.join(POOLING_MODES)}: "
                                 f"re-save it with cls, mean or max pooling")
        return cls(loaded.model, pooling=pooling, normalize=normalize_,
                   max_seq_length=min(int(max_len), config.max_position_embeddings))

    def save_sentence_transformers(self, directory: str | os.PathLike, tokenizer) -> None:
        """Write a directory that `sentence_transformers.SentenceTransformer(directory)` loads as is.

        The encoder goes to the root as a transformers folder (`export.write_transformers_folder`:
        plain HF BERT, or our modeling file for other architectures, which then load with
        `SentenceTransformer(directory, trust_remote_code=True)`), the pipeline files beside it
        (`st_layout.write_st_layout`). The write is atomic, like `save_model`.
        """
        if tokenizer is None:
            raise BertforgeError("save_sentence_transformers needs the tokenizer: pass the model's tokenizer")

        def write(tmp: Path) -> None:
            write_transformers_folder(self.bert, "base", tmp, tokenizer=tokenizer,
                                      meta={"pooling": self.pooling, "normalize": self.normalize,
                                            "max_seq_length": self.max_seq_length})
            write_st_layout(tmp, hidden_size=self.bert.config.hidden_size, pooling=self.pooling,
                            normalize=self.normalize, max_seq_length=self.max_seq_length)

        write_atomic(Path(directory), write)


def _run(embed, batches: list[np.ndarray], workers: int):
    """Yield (indices, embeddings) per batch; with workers > 1, that many batches run at once on
    single-threaded workers (data parallelism instead of splitting each small op across threads)."""
    if workers <= 1:
        for idx in batches:
            yield idx, embed(idx)
        return
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from zip(batches, pool.map(embed, batches))


def _pad(rows: list[list[int]], lengths: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad id lists into (B, T) ids and a (B, T) mask; the mask is None when no row is padded."""
    T = int(lengths.max())
    if int(lengths.min()) == T:
        return torch.tensor(rows), None
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    for j, row in enumerate(rows):
        ids[j, :len(row)] = row
    mask = np.arange(T)[None, :] < lengths[:, None]  # (B, T)
    return torch.from_numpy(ids), torch.from_numpy(mask)
