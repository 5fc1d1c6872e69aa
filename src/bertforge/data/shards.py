"""Tokenized pretraining data: raw text -> fixed-length rows in flat memmap shards + `manifest.json`.

`prepare(PrepareConfig)` streams documents from `bertforge.data.corpus.iter_documents`, tokenizes
batches of them (about `batch_bytes` of text each) in `num_workers` worker processes, and writes rows
of `seq_len` token ids. Memory stays flat: at most `2 * num_workers` batches are in flight (a
`Pool.imap` would drain the whole input iterator into its task queue, so tasks are submitted with
`apply_async` into a bounded deque and collected in submission order), and each split keeps one
shard buffer. Results are consumed in document order, so the output does not depend on
`num_workers` or on the batch size. Workers build the tokenizer once (from its JSON), encode with
`add_special_tokens=False` and no truncation, and run single-threaded (one core per worker).

Split: document i goes to "val" when splitmix64(i + f(seed)) / 2**64 < val_fraction, else "train";
a document never has rows in both splits.

Rows (`seq_len` = T):
- "packed": per split, the documents' tokens joined with one [SEP] between documents form a
  stream S; row k is `[CLS] S[k*(T-2):(k+1)*(T-2)] [SEP]`. A document separator can land at a row
  edge (a row starting `[CLS] [SEP]` or ending `[SEP] [SEP]`); that is harmless and keeps every
  token. The final partial row of each split is kept and padded with [PAD] after its closing [SEP].
- "nsp": BERT's `create_instances_from_document`: documents are split into sentences (lines, then
  a punctuation rule), sentences are gathered up to T-3 tokens (a random shorter target with
  `short_seq_prob`), cut at a random sentence boundary into A and B; with probability 0.5 (always
  when the chunk is one sentence) B is replaced by a random window from another document of the same
  split (a ring of recent windows, so memory is bounded) and the unused sentences are put back.
  Rows are `[CLS] A [SEP] B [SEP] [PAD]...` after trimming the longer side; `<shard>.pairs.bin`
  (int32, shape (N, 2)) holds per row the index where segment B starts (token type 1 from there to
  the last [SEP]) and is_next (1 = B follows A). Randomness is drawn per document from
  `default_rng((seed, document_index))`.

Files: `train_00000.bin`, ..., `val_00000.bin`, ... hold rows as raw C-order `uint16` (vocab <=
65535) or `uint32`, shape (rows, T); shards have `shard_size` rows except the last of each split.
Each file is written atomically (`bertforge.atomic`: a temp file beside it, fsynced, renamed).
`manifest.json` records the tokenizer fingerprint, the settings that shape the output, the finished
shards and the counts; `tokenizer/` holds a copy of the tokenizer (`WordPieceTokenizer.save`).

Resume: after a batch in which a shard was finished, the state needed to continue (next document
index, per-split carry tokens, rows buffered for the next shards, NSP windows, counters) is saved to
`resume_NNNNN.npz` and then the manifest (pointing at it and listing the finished shards) is
replaced atomically. A re-run with the same settings checks the recorded shards, skips the documents
already consumed (they are read but not tokenized) and continues from that state, so the output is
byte-identical to an uninterrupted run; shards written after the last saved state are rewritten with
the same bytes. A finished output is detected and left untouched.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bertforge.atomic import atomic_replace
from bertforge.data.corpus import BOUNDARIES, iter_documents
from bertforge.data.packing import SPLITS, NspBuilder, PackedBuilder, split_sentences
from bertforge.data.shard_output import (
    FORMAT,
    ShardWriter,
    open_output,
    source_bytes,
    write_manifest,
)
from bertforge.errors import BertforgeError, require

MODES = ("packed", "nsp")
DTYPES = ("uint16", "uint32")
# fork where the OS has it: workers start at once and a user's script needs no `if __name__ == "__main__"`
# guard (spawn/forkserver re-import __main__). Workers only run the Rust tokenizer, single-threaded.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
# settings that change the bytes written; a re-run must match them to resume
_OUTPUT_KEYS = ("sources", "seq_len", "mode", "val_fraction", "seed", "shard_size", "boundary",
                "text_field", "short_seq_prob", "dtype")


@dataclass
class PrepareConfig:
    """What `prepare` reads, how it cuts rows and where it writes them."""

    sources: list[str]
    output: str
    tokenizer: str  # folder or vocab.txt / tokenizer.json for WordPieceTokenizer.from_pretrained
    seq_len: int = 128
    mode: str = "packed"  # "packed" | "nsp"
    val_fraction: float = 0.01  # share of documents in the validation split
    seed: int = 0
    shard_size: int = 16384  # rows per shard file (2.1M tokens at seq_len 128)
    num_workers: int = 2  # tokenizer processes; 0 = tokenize in this process
    boundary: str = "blank"  # corpus document boundary: blank | line | heading
    text_field: str = "text"  # JSONL / hub record field
    short_seq_prob: float = 0.1  # NSP: share of pairs with a random shorter target length
    dtype: str | None = None  # None = uint16 when the vocabulary fits, else uint32
    max_positions: int = 512  # the model's max_position_embeddings: seq_len may not exceed it
    overwrite: bool = False  # replace an existing output instead of resuming it
    batch_bytes: int = 1 << 20  # text per worker task
    show_progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sources, (str, os.PathLike)):
            self.sources = [self.sources]
        self.sources = [os.fspath(s) for s in self.sources]

    def validate(self) -> None:
        require(bool(self.sources), "prepare got no sources: pass text files, folders, .gz, .jsonl or hub:NAME")
        require(self.mode in MODES, f"prepare mode '{self.mode}' is unknown: use packed or nsp")
        require(8 <= self.seq_len <= self.max_positions,
                f"seq_len={self.seq_len} is out of range: use 8..{self.max_positions} (the model's positions)")
        require(0.0 <= self.val_fraction < 1.0, f"val_fraction={self.val_fraction} is out of range: use [0, 1)")
        require(self.shard_size >= 1, f"shard_size={self.shard_size} is invalid: pass rows per shard >= 1")
        require(self.num_workers >= 0, f"num_workers={self.num_workers} is invalid: pass 0 or more")
        require(self.boundary in BOUNDARIES, f"boundary '{self.boundary}' is unknown: use {', '.join(BOUNDARIES)}")
        require(0.0 <= self.short_seq_prob <= 1.0, f"short_seq_prob={self.short_seq_prob} is out of range: use [0, 1]")
        require(self.dtype in (None, *DTYPES), f"dtype '{self.dtype}' is unknown: use uint16 or uint32")
        require(self.batch_bytes >= 1, f"batch_bytes={self.batch_bytes} is invalid: pass a positive size")


def choose_dtype(vocab_size: int, requested: str | None) -> str:
    """uint16 when every id fits (vocab <= 65535), else uint32; an explicit uint16 that cannot hold the
    vocabulary is an error."""
    fits = vocab_size <= 65535
    if requested == "uint16":
        require(fits, f"dtype uint16 cannot hold a vocabulary of {vocab_size} tokens: use --dtype uint32 "
                      "or leave --dtype unset")
    return requested or ("uint16" if fits else "uint32")


def is_val_document(index: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """(n,) bool: which of the document indices go to the validation split (splitmix64 hash)."""
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        z = np.asarray(index, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 1) & 0xFFFFFFFFFFFFFFFF)
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & mask
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & mask
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_fraction


# ----------------------------------------------------------------------------- tokenizing workers


class _Encoder:
    """Text batch -> flat ids + lengths (per document, or per sentence with per-document counts)."""

    def __init__(self, tokenizer_json: str, dtype: str, mode: str) -> None:
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tokenizer_json)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # no offsets
        self.dtype = np.dtype(dtype)
        self.mode = mode

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        counts = None
        if self.mode == "nsp":
            per_doc = [split_sentences(t) for t in texts]
            counts = np.array([len(s) for s in per_doc], dtype=np.int64)
            texts = [s for doc in per_doc for s in doc]
        ids = [e.ids for e in self.encode(texts, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return flat, lengths, counts


_WORKER: dict[str, _Encoder] = {}


def _init_worker(tokenizer_json: str, dtype: str, mode: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _WORKER["encoder"] = _Encoder(tokenizer_json, dtype, mode)


def _work(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return _WORKER["encoder"](texts)


def _text_batches(docs: Iterator[str], first: int, batch_bytes: int) -> Iterator[tuple[int, list[str], int]]:
    """(index of the batch's first document, texts, UTF-8 bytes), about batch_bytes of text each."""
    texts, size = [], 0
    for doc in docs:
        if "\x00" in doc:
            raise BertforgeError(f"document {first + len(texts)} contains NUL bytes (binary data): "
                                 "pass UTF-8 text files")
        texts.append(doc)
        size += len(doc.encode("utf-8"))
        if size >= batch_bytes:
            yield first, texts, size
            first, texts, size = first + len(texts), [], 0
    if texts:
        yield first, texts, size


def _tokenized(batches: Iterator[tuple[int, list[str], int]], tokenizer_json: str, dtype: str, mode: str,
               num_workers: int) -> Iterator[tuple[int, int, tuple]]:
    """Yield (first document index, bytes, encoder result) in input order, at most 2*workers in flight."""
    if num_workers == 0:
        encoder = _Encoder(tokenizer_json, dtype, mode)
        for first, texts, size in batches:
            yield first, size, encoder(texts)
        return
    ctx = mp.get_context(START_METHOD)
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer_json, dtype, mode)) as pool:
        pending: deque = deque()
        for first, texts, size in batches:
            pending.append((first, size, pool.apply_async(_work, (texts,))))
            if len(pending) >= 2 * num_workers:
                first, size, result = pending.popleft()
                yield first, size, result.get()
        while pending:
            first, size, result = pending.popleft()
            yield first, size, result.get()


# ----------------------------------------------------------------------------- shard files


def _new_manifest(cfg: PrepareConfig, tok, dtype: str) -> dict:
    sources = [s if str(s).startswith("hub:") else os.path.abspath(s) for s in cfg.sources]
    settings = {k: getattr(cfg, k) for k in _OUTPUT_KEYS} | {"sources": sources, "dtype": dtype}
    settings["source_bytes"] = [source_bytes(s) for s in sources]
    if cfg.mode != "nsp":
        settings["short_seq_prob"] = None
    ids = {k: getattr(tok, k) for k in ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id",
                                         "mask_token_id")}
    tokenizer = {"path": os.path.abspath(cfg.tokenizer), "fingerprint": tok.fingerprint(),
                 "vocab_size": tok.vocab_size, "do_lower_case": tok.do_lower_case, **ids}
    return {"format": FORMAT, "complete": False, "tokenizer": tokenizer, "vocab_size": tok.vocab_size,
            "dtype": dtype, "seq_len": cfg.seq_len, "mode": cfg.mode, "seed": cfg.seed, "sources": sources,
            "settings": settings, "shards": [], "resume": None}


# ----------------------------------------------------------------------------- prepare


class _Preparer:
    """One `prepare` run: routes tokenized documents to splits, builds rows, writes shards and state."""

    def __init__(self, cfg: PrepareConfig, tok, out: Path, manifest: dict) -> None:
        self.cfg, self.out, self.manifest = cfg, out, manifest
        ids = (cfg.seq_len, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, manifest["dtype"])
        self.builder = (NspBuilder(*ids, cfg.seed, cfg.short_seq_prob) if cfg.mode == "nsp"
                        else PackedBuilder(*ids))
        self.writer = ShardWriter(out, manifest, cfg.shard_size, tok.pad_token_id)
        self.saved_written = 0
        resume = manifest["resume"]
        self.counts = resume["counts"] if resume else {
            "next_document": 0, "bytes_read": 0, "documents": dict.fromkeys(SPLITS, 0),
            "tokens": dict.fromkeys(SPLITS, 0)}
        if resume:
            with np.load(out / resume["file"]) as state:
                arrays = dict(state)
            self.writer.load(arrays)
            self.builder.load(arrays)

    def consume(self, first: int, result: tuple) -> None:
        flat, lengths, per_doc = result
        pieces = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
        n = len(lengths) if per_doc is None else len(per_doc)
        val = is_val_document(np.arange(first, first + n), self.cfg.seed, self.cfg.val_fraction)
        if per_doc is None:  # packed: one piece per document
            for split, take in (("train", ~val), ("val", val)):
                docs = [d for d, t in zip(pieces, take) if t]
                self._count(split, len(docs), int(lengths[take].sum()))
                if docs:
                    self.writer.add(split, self.builder.add(split, docs))
        else:  # nsp: per_doc[j] sentence pieces per document
            starts = np.concatenate([[0], np.cumsum(per_doc)])
            for j in range(n):
                split = "val" if val[j] else "train"
                sents = pieces[starts[j]:starts[j + 1]]
                self._count(split, 1, sum(len(s) for s in sents))
                self.writer.add(split, *self.builder.add(split, first + j, sents))
        self.counts["next_document"] = first + n

    def _count(self, split: str, documents: int, tokens: int) -> None:
        self.counts["documents"][split] += documents
        self.counts["tokens"][split] += tokens

    def save_state(self) -> None:
        """State file first, then the manifest that points at it (atomic pair), then the old state."""
        old = self.manifest["resume"]
        number = old["id"] + 1 if old else 0
        name = f"resume_{number:05d}.npz"
        state = {**self.writer.state(), **self.builder.state()}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
                np.savez(f, **state)

        atomic_replace(self.out / name, write)
        self.manifest["resume"] = {"id": number, "file": name, "counts": json.loads(json.dumps(self.counts))}
        write_manifest(self.out, self.manifest)
        if old and old["file"] != name:
            (self.out / old["file"]).unlink(missing_ok=True)

    def run(self, tokenizer_json: str) -> None:
        cfg, start = self.cfg, self.counts["next_document"]
        docs = islice(iter_documents(cfg.sources, boundary=cfg.boundary, text_field=cfg.text_field), start, None)
        batches = _text_batches(docs, start, cfg.batch_bytes)
        bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1000, initial=self.counts["bytes_read"],
                   desc="prepare", disable=not cfg.show_progress, dynamic_ncols=True)
        with bar:
            for first, size, result in _tokenized(batches, tokenizer_json, self.manifest["dtype"], cfg.mode,
                                                  cfg.num_workers):
                self.consume(first, result)
                self.counts["bytes_read"] += size
                bar.update(size)
                bar.set_postfix(docs=self.counts["next_document"], shards=len(self.manifest["shards"]), refresh=False)
                if self.writer.written > self.saved_written:
                    self.save_state()
                    self.saved_written = self.writer.written
        self.finish()

    def finish(self) -> None:
        """Last partial rows, last shards, totals; the manifest is marked complete, the state removed."""
        for split in SPLITS:
            if isinstance(self.builder, PackedBuilder):
                self.writer.add(split, self.builder.finish(split))
        self.writer.finish()
        m, c = self.manifest, self.counts
        tokens = sum(c["tokens"].values())
        if tokens == 0:
            raise BertforgeError(f"corpus {self.cfg.sources} produced no tokens: pass text the tokenizer can read")
        splits = {}
        for split in SPLITS:
            shards = [s for s in m["shards"] if s["split"] == split]
            splits[split] = {"documents": c["documents"][split], "tokens": c["tokens"][split],
                             "sequences": sum(s["rows"] for s in shards), "shards": len(shards),
                             "pad_tokens": sum(s["pad_tokens"] for s in shards)}
        if splits["train"]["sequences"] == 0:
            raise BertforgeError(f"val_fraction={self.cfg.val_fraction} left no training sequences: "
                                 "lower val_fraction or add text")
        sequences = sum(s["sequences"] for s in splits.values())
        pads = sum(s["pad_tokens"] for s in splits.values())
        m.update(complete=True, splits=splits, documents=sum(c["documents"].values()), tokens=tokens,
                 sequences=sequences, fill_rate=1.0 - pads / (sequences * m["seq_len"]),
                 bytes_read=c["bytes_read"], resume=None)
        if m["mode"] == "nsp":
            m["nsp"] = {"is_next_rate": sum(s["is_next"] for s in m["shards"]) / sequences,
                        "skipped_chunks": self.builder.skipped}
        write_manifest(self.out, m)
        for path in self.out.glob("resume_*.npz"):
            path.unlink()


def prepare(cfg: PrepareConfig) -> dict:
    """Tokenize `cfg.sources` into shards in `cfg.output` (resuming a matching unfinished output);
    return a summary dict (see module docstring for the layout)."""
    from bertforge.wordpiece import WordPieceTokenizer

    cfg.validate()
    tok = WordPieceTokenizer.from_pretrained(cfg.tokenizer)
    dtype = choose_dtype(tok.vocab_size, cfg.dtype)
    out = Path(cfg.output)
    manifest = open_output(out, _new_manifest(cfg, tok, dtype), cfg.overwrite)
    start, shards_before = time.perf_counter(), len(manifest["shards"])
    if not manifest["complete"]:
        tok.save(out / "tokenizer")  # a copy beside the shards, so the folder is self-contained
        job = _Preparer(cfg, tok, out, manifest)
        job.run(tok.backend.to_str())
        manifest = job.manifest
    seconds = time.perf_counter() - start
    return summarize(manifest, out, written=len(manifest["shards"]) - shards_before, skipped=shards_before,
                     seconds=seconds)


def summarize(manifest: dict, out: Path, *, written: int, skipped: int, seconds: float) -> dict:
    """The run summary: the manifest's counts plus what this run did."""
    keys = ("mode", "seq_len", "dtype", "vocab_size", "documents", "tokens", "sequences", "fill_rate", "splits")
    summary = {"output": str(out), **{k: manifest[k] for k in keys}}
    mb = manifest["bytes_read"] / 1e6
    summary.update(shards=len(manifest["shards"]), shards_written=written, shards_skipped=skipped,
                   mb_read=mb, seconds=seconds, complete=manifest["complete"])
    if "nsp" in manifest:
        summary["nsp"] = manifest["nsp"]
    return summary
