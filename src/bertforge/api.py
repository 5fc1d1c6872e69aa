"""The Python API: `bertforge.load(path_or_hub_id)` -> `Model`, one object per model for every use.

    import bertforge
    m = bertforge.load("path/to/all-MiniLM-L6-v2")       # or a Hugging Face hub id, e.g. "org/name"
    m.encode(["A man is eating.", "Someone eats."])        # (2, 384) float32, equal to `bertforge embed`
    m.fill_mask("paris is the [MASK] of france.")          # MLM models
    m.classify([("a", "b")]); m.answer(question, context)  # fine-tuned classifiers / SQuAD models

A folder loads as `bertforge info` describes it (ours, Hugging Face BERT, sentence-transformers); a
string that is not a local path and looks like `org/name` goes through
`huggingface_hub.snapshot_download` (cache first; `HF_HUB_OFFLINE=1` never touches the network).
Each method checks the head it needs and otherwise raises a one-line `BertforgeError` naming the
model's head. Embeddings come from the encoder of any head (mean pooling unless the sentence-transformers
layout or our meta says otherwise), so an MLM or a classifier can embed too.

Every task is split in three steps the server reuses: `prepare_*` (tokenize, check lengths; no model),
`run_*` (one forward over prepared rows, any number, length-sorted inside) and a small decoding step,
so the HTTP server batches rows of many requests through the same code the methods use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertforge.data.squad import SquadExample, best_span, featurize_squad
from bertforge.errors import BertforgeError
from bertforge.inference import count_parameters
from bertforge.inspect_mlm import masked_predictions
from bertforge.model.folders import load_checked
from bertforge.model.loading import export_hf, save_model
from bertforge.model.pooling import TOKENS_PER_BATCH, SentenceEncoder, plan_batches
from bertforge.workflows.tasks import TaskSettings

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MLM_HEADS = ("masked_lm", "pretraining")
FORWARD_TOKENS = 4096  # padded tokens per forward for classification, fill-mask and QA rows


@dataclass
class Row:
    """One prepared model input: token ids (with [CLS]/[SEP]) and token types."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None


def resolve_path(path_or_id: str | os.PathLike) -> Path:
    """A local model folder, or the hub snapshot folder of `org/name` (downloaded unless cached)."""
    path = Path(path_or_id)
    if path.exists() or not HUB_ID.match(str(path_or_id)):
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise BertforgeError(f"model '{path_or_id}' is not a local folder and huggingface_hub is missing: "
                             'pip install "bertforge[hub]", or pass a local model folder') from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(str(path_or_id), local_files_only=offline))
    except LocalEntryNotFoundError:
        raise BertforgeError(f"model '{path_or_id}' is not a local folder nor in the Hugging Face cache and "
                             "downloads are off (HF_HUB_OFFLINE): download it once online or pass a folder") from None
    except RepositoryNotFoundError:
        raise BertforgeError(f"model '{path_or_id}' is neither a local folder nor a Hugging Face hub repository "
                             "you can access: check the name (and HF_TOKEN for private repositories)") from None
    except Exception as exc:  # network errors of any kind: one line, naming the id
        raise BertforgeError(f"cannot fetch '{path_or_id}' from the Hugging Face hub ({type(exc).__name__}: "
                             f"{exc}): check the connection or pass a local folder") from None


def load(path_or_id: str | os.PathLike, *, name: str | None = None) -> Model:
    """Load a model folder (ours, Hugging Face BERT, sentence-transformers) or a hub id -> `Model`."""
    return Model(resolve_path(path_or_id), name=name or str(path_or_id))


class Model:
    """A loaded model with its tokenizer; see the module doc. Thread-compatible, not thread-safe."""

    def __init__(self, path: Path, name: str) -> None:
        self.name, self.path = name, path
        self.loaded = load_checked(path)
        self.head = self.loaded.head
        self.tokenizer = self.loaded.tokenizer
        self.config = self.loaded.config
        if self.head == "base":  # sentence models: pooling, normalize and length exactly as `bertforge embed`
            self.encoder = SentenceEncoder.from_pretrained(path).eval()
            self.loaded.model = self.encoder.bert  # one copy of the weights
        else:
            meta, positions = self.loaded.meta, self.config.max_position_embeddings
            self.encoder = SentenceEncoder(self.loaded.model.bert, pooling=meta.get("pooling") or "mean",
                                           normalize=bool(meta.get("normalize", False)),
                                           max_seq_length=min(int(meta.get("max_seq_length") or positions),
                                                              positions)).eval()
        self.max_length = self.encoder.max_seq_length  # tokens per text for embeddings
        self.positions = self.config.max_position_embeddings  # tokens per input for the task heads
        self.task_max_length = int((self.loaded.meta.get("settings") or {}).get("max_seq_length") or self.positions)
        self.dim = self.config.hidden_size
        self.mask_token = self.tokenizer.convert_ids_to_tokens([self.tokenizer.mask_token_id])[0]

    # ------------------------------------------------------------------ description

    @property
    def labels(self) -> list[str] | None:
        """Label names of a classifier (None for regression and other heads)."""
        if self.head != "sequence_classification" or self.loaded.meta.get("num_labels") == 1:
            return None
        id2label = self.loaded.meta.get("id2label") or {}
        return [str(id2label.get(i, f"LABEL_{i}")) for i in range(self.loaded.meta["num_labels"])]

    @property
    def tasks(self) -> list[str]:
        """What this model can do: embed and tokenize always, plus its head's task."""
        extra = {"masked_lm": ["fill_mask"], "pretraining": ["fill_mask"], "question_answering": ["answer"],
                 "sequence_classification": ["classify"]}.get(self.head, [])
        return ["encode", "tokenize", *extra]

    @property
    def info(self) -> dict:
        """Name, path, head, dimensions, lengths, labels, pooling, tokenizer size: plain JSON values."""
        total, _ = count_parameters(self.loaded.model)
        return {"name": self.name, "path": str(self.path), "source": self.loaded.source, "head": self.head,
                "tasks": self.tasks, "dim": self.dim, "max_length": self.max_length,
                "max_position_embeddings": self.positions, "pooling": self.encoder.pooling,
                "normalize": self.encoder.normalize, "vocab_size": self.tokenizer.vocab_size,
                "mask_token": self.mask_token, "labels": self.labels, "parameters": total,
                "regression": self.head == "sequence_classification" and self.loaded.meta.get("num_labels") == 1}

    def require(self, task: str) -> None:
        """Raise a one-line error naming this model's head unless it can do `task`."""
        if task not in self.tasks:
            need = {"fill_mask": "a masked-LM head (masked_lm or pretraining)", "answer": "a question_answering "
                    "(SQuAD) head", "classify": "a sequence_classification head"}[task]
            raise BertforgeError(f"model '{self.name}' has head '{self.head}', but {task} needs {need}: "
                                 f"use a model fine-tuned for it (its tasks: {', '.join(self.tasks)})")

    # ------------------------------------------------------------------ tokenize

    def tokenize(self, texts: str | list[str], pairs: list[str] | None = None) -> list[dict]:
        """Tokens, ids and character offsets of each text (or pair), with [CLS]/[SEP], never truncated."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        encs = self.tokenizer.encode_batch(texts, pairs, max_length=1 << 30, truncation=False)
        return [{"tokens": self.tokenizer.convert_ids_to_tokens(e.input_ids), "ids": e.input_ids,
                 "offsets": [list(o) for o in e.offsets], "token_type_ids": e.token_type_ids} for e in encs]

    # ------------------------------------------------------------------ embeddings

    def prepare_embed(self, texts: list[str], truncate: bool = True, max_length: int | None = None
                      ) -> tuple[list[list[int]], int]:
        """Token ids per text cut to the embedding length (as `bertforge embed`), and how many were cut;
        `truncate=False` makes a too-long text an error instead."""
        check_texts(texts)
        limit = max_length or self.max_length
        ids = [e.ids for e in self.tokenizer.backend.encode_batch_fast(list(texts))]
        return cut_ids(ids, limit, self.tokenizer.sep_token_id, truncate), sum(len(r) > limit for r in ids)

    def run_embed(self, ids: list[list[int]]) -> np.ndarray:
        """(N, D) float32 sentence embeddings of prepared id rows, row i for ids[i] (no normalisation beyond
        the model's own)."""
        lengths = [len(r) for r in ids]
        threads = torch.get_num_threads()
        # as `bertforge embed` (64 texts, 2048 tokens per forward), but small sets still give every thread
        # a forward of its own (a server batch is often a few hundred tokens)
        budget = min(TOKENS_PER_BATCH, max(32, -(-sum(lengths) // threads)))
        out = self.encoder.encode_ids(ids, self.tokenizer.pad_token_id, batch_size=64, max_tokens=budget)
        return out.float().numpy()

    def encode(self, texts: str | list[str], batch_size: int = 64, normalize: bool | None = None, *,
               dimensions: int | None = None, truncate: bool = True) -> np.ndarray:
        """(N, D) float32 embeddings (one text -> (1, D)); `normalize` None keeps the model's setting,
        `dimensions` keeps the first coordinates and re-normalises (Matryoshka-style)."""
        if batch_size < 1:
            raise BertforgeError(f"batch_size {batch_size} must be at least 1")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, _ = self.prepare_embed(texts, truncate)
        return postprocess_embeddings(self.run_embed(ids), normalize, dimensions, self.dim)

    # ------------------------------------------------------------------ fill-mask

    def prepare_fill_mask(self, text: str, truncate: bool = False) -> Row:
        """Ids of one text holding at least one mask token (longer than the model: an error)."""
        self.require("fill_mask")
        check_texts([text])
        ids = self.tokenizer.backend.encode(text).ids
        if len(ids) > self.positions:
            raise BertforgeError(f"the text has {len(ids)} tokens but model '{self.name}' has {self.positions} "
                                 "positions: shorten it")
        if self.tokenizer.mask_token_id not in ids:
            raise BertforgeError(f"text {text[:60]!r} has no {self.mask_token} token: put {self.mask_token} where "
                                 f"a word should be predicted")
        return Row(ids)

    def run_fill_mask(self, rows: list[Row], top_k: int = 5) -> list[list[list[dict]]]:
        """Per row, per mask (left to right), the top_k {token, token_id, score}, most likely first."""
        tok, mask_id = self.tokenizer, self.tokenizer.mask_token_id
        out: list = [None] * len(rows)
        for idx, ids, mask in _padded_batches(rows, tok.pad_token_id):
            labels = torch.where(ids == mask_id, 0, -100)  # the head computes logits only there
            with torch.inference_mode():
                logits = self.loaded.model(ids, attention_mask=mask, labels=labels).logits  # (M, V)
            probs, top = logits[:, :tok.vocab_size].float().softmax(-1).topk(min(top_k, tok.vocab_size), -1)
            counts = (ids == mask_id).sum(1).tolist()
            start = 0
            for i, n in zip(idx, counts):
                out[i] = [[{"token": t, "token_id": j, "score": p} for t, j, p in
                           zip(tok.convert_ids_to_tokens(top[m].tolist()), top[m].tolist(), probs[m].tolist())]
                          for m in range(start, start + n)]
                start += n
        return out

    def fill_mask(self, text: str, top_k: int = 5) -> list[list[dict]]:
        """For each mask token in `text`, the `top_k` predictions {token, token_id, score}."""
        if top_k < 1:
            raise BertforgeError(f"top_k {top_k} must be at least 1")
        return self.run_fill_mask([self.prepare_fill_mask(text)], top_k)[0]

    # ------------------------------------------------------------------ classification

    def prepare_classify(self, texts: list[str], pairs: list[str] | None = None, truncate: bool = True
                         ) -> tuple[list[Row], int]:
        """[CLS] a [SEP] (b [SEP]) rows cut to the fine-tuning length (longest first), and how many were cut."""
        self.require("classify")
        check_texts(texts if pairs is None else [*texts, *pairs])
        limit = min(self.task_max_length, self.positions)
        full = self.tokenizer.encode_batch(texts, pairs, max_length=1 << 30, truncation=False)
        long = [i for i, e in enumerate(full) if len(e.input_ids) > limit]
        if long and not truncate:
            raise BertforgeError(f"{len(long)} input(s) are longer than model '{self.name}''s {limit} tokens "
                                 f"(first: #{long[0]}): shorten them or allow truncation")
        if long:
            cut = self.tokenizer.encode_batch([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                                              max_length=limit, truncation="longest_first")
            for i, e in zip(long, cut):
                full[i] = e
        return [Row(e.input_ids, e.token_type_ids) for e in full], len(long)

    def run_classify(self, rows: list[Row]) -> list[dict]:
        """{label, score, scores} per row (softmax), or {score} for a regression model."""
        regression = self.labels is None
        out: list = [None] * len(rows)
        for idx, ids, mask, types in _padded_batches(rows, self.tokenizer.pad_token_id, with_types=True):
            with torch.inference_mode():
                logits = self.loaded.model(ids, attention_mask=mask, token_type_ids=types).logits.float()  # (B, C)
            for i, row in zip(idx, logits):
                if regression:
                    out[i] = {"score": float(row[0])}
                else:
                    p = row.softmax(-1).tolist()
                    best = int(np.argmax(p))
                    out[i] = {"label": self.labels[best], "score": p[best],
                              "scores": [{"label": lab, "score": s} for lab, s in zip(self.labels, p)]}
        return out

    def classify(self, texts: str | list[str] | list[tuple[str, str]], truncate: bool = True) -> list[dict]:
        """Labels with scores (regression: a score) for texts or (text, text) pairs."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        firsts, seconds = split_pairs(texts)
        rows, _ = self.prepare_classify(firsts, seconds, truncate)
        return self.run_classify(rows)

    # ------------------------------------------------------------------ question answering

    def prepare_answer(self, question: str, context: str) -> tuple[Any, list]:
        """The SQuAD example and its sliding windows, with the settings the model was fine-tuned with."""
        self.require("answer")
        check_texts([question, context])
        saved = {k: v for k, v in (self.loaded.meta.get("settings") or {}).items()
                 if k in TaskSettings.__dataclass_fields__}
        s = TaskSettings(**{"max_seq_length": min(384, self.positions), **saved})
        example = SquadExample("q", "", question, context, ())
        features = featurize_squad([example], self.tokenizer, max_length=min(s.max_seq_length, self.positions),
                                   doc_stride=s.doc_stride, max_query_length=s.max_query_length)
        return example, features

    def run_answer(self, rows: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """(start logits, end logits) per window (QAFeature), unpadded."""
        out: list = [None] * len(rows)
        plain = [Row(f.input_ids, f.token_type_ids) for f in rows]
        for idx, ids, mask, types in _padded_batches(plain, self.tokenizer.pad_token_id, with_types=True):
            with torch.inference_mode():
                res = self.loaded.model(ids, attention_mask=mask, token_type_ids=types)
            for b, i in enumerate(idx):
                n = len(plain[i].input_ids)
                out[i] = (res.start_logits[b, :n].float().numpy(), res.end_logits[b, :n].float().numpy())
        return out

    def decode_answer(self, example, features: list, logits: list) -> dict:
        """The best span over all windows, as `evaluate` picks it: {answer, start, end, score}."""
        s = self.loaded.meta.get("settings") or {}
        best = None
        for feature, (start, end) in zip(features, logits):
            span = best_span(feature, start, end, int(s.get("n_best_size", 20)), int(s.get("max_answer_length", 30)))
            if span is not None and (best is None or span[0] > best[0]):
                ctx = np.array([o is not None for o in feature.offset_mapping])
                prob = np.exp(span[0] - _logsumexp(start[ctx]) - _logsumexp(end[ctx]))  # p(start) * p(end)
                best = (span[0], span[1], span[2], float(prob))
        if best is None:
            return {"answer": "", "start": 0, "end": 0, "score": 0.0}
        return {"answer": example.context[best[1]:best[2]], "start": best[1], "end": best[2], "score": best[3]}

    def answer(self, question: str, context: str) -> dict:
        """The answer span of `question` in `context`: {answer, start, end (characters), score}."""
        example, features = self.prepare_answer(question, context)
        return self.decode_answer(example, features, self.run_answer(features))

    # ------------------------------------------------------------------ inspect, save

    def inspect(self, text: str, mask_rate: float = 0.15, seed: int = 0, top_k: int = 5) -> list:
        """`bertforge inspect`'s masked-prediction records (right/wrong) of a passage."""
        self.require("fill_mask")
        check_texts([text])
        if not 0 < mask_rate <= 1:
            raise BertforgeError(f"mask_rate {mask_rate} must be in (0, 1]")
        return masked_predictions(self.loaded.model, self.tokenizer, text, mask_rate=mask_rate, seed=seed,
                                  top_k=top_k)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model in our format (head, labels and embedding settings kept)."""
        save_model(self.loaded.model, path, tokenizer=self.tokenizer, meta=self.loaded.meta)

    def to_hf(self, path: str | os.PathLike) -> None:
        """Write a Hugging Face BERT folder (sentence models: the sentence-transformers layout too)."""
        if self.head == "base" and self.loaded.source == "sentence-transformers":
            self.encoder.save_sentence_transformers(path, self.tokenizer)
        else:
            export_hf(self.loaded.model, path, tokenizer=self.tokenizer, id2label=self.loaded.meta.get("id2label"))

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, head={self.head!r}, dim={self.dim}, max_length={self.max_length})"


# ----------------------------------------------------------------------------- helpers


def check_texts(texts: list) -> None:
    if not texts:
        raise BertforgeError("no input texts: pass at least one non-empty text")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise BertforgeError(f"input #{i} is a {type(t).__name__}, not a string: pass texts as strings")
        if not t.strip():
            raise BertforgeError(f"input #{i} is empty: pass non-empty texts")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise BertforgeError(f"input #{i} is not valid Unicode (a lone surrogate): pass UTF-8 text") from None


def split_pairs(items: list) -> tuple[list[str], list[str] | None]:
    """Texts, or (a, b) pairs -> (firsts, seconds or None); mixing both is an error."""
    pairs = [isinstance(x, (tuple, list)) for x in items]
    if not any(pairs):
        return list(items), None
    if not all(pairs) or any(len(x) != 2 for x in items):
        raise BertforgeError("pass either texts or (text, text) pairs, each pair of exactly two texts")
    return [x[0] for x in items], [x[1] for x in items]


def cut_ids(ids: list[list[int]], limit: int, sep_id: int, truncate: bool) -> list[list[int]]:
    """Cut rows longer than `limit` to [CLS] + first tokens + [SEP] (as `bertforge embed`), or refuse."""
    long = [i for i, r in enumerate(ids) if len(r) > limit]
    if long and not truncate:
        raise BertforgeError(f"{len(long)} input(s) are longer than the model's {limit} tokens (first: #{long[0]}, "
                             f"{len(ids[long[0]])} tokens): shorten them or allow truncation")
    return [r[:limit - 1] + [sep_id] if len(r) > limit else r for r in ids]


def postprocess_embeddings(emb: np.ndarray, normalize: bool | None, dimensions: int | None, dim: int) -> np.ndarray:
    """Optionally keep the first `dimensions` coordinates and (re-)normalise rows to unit length."""
    if dimensions is not None:
        if not 1 <= dimensions <= dim:
            raise BertforgeError(f"dimensions {dimensions} must be between 1 and the model's {dim}")
        emb = emb[:, :dimensions]
        normalize = True if normalize is None else normalize
    if normalize:
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = emb / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(emb, dtype=np.float32)


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + float(np.log(np.exp(x - m).sum()))


def _padded_batches(rows: list[Row], pad_id: int, with_types: bool = False):
    """Length-sorted (indices, ids (B, T), mask (B, T) or None[, types (B, T)]) batches of <= FORWARD_TOKENS."""
    lengths = np.fromiter((len(r.input_ids) for r in rows), dtype=np.int64, count=len(rows))
    for idx in plan_batches(lengths, 256, FORWARD_TOKENS):
        T = int(lengths[idx].max())
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        types = torch.zeros((len(idx), T), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, :lengths[i]] = torch.tensor(rows[i].input_ids)
            if rows[i].token_type_ids is not None:
                types[b, :lengths[i]] = torch.tensor(rows[i].token_type_ids)
        mask = torch.arange(T)[None, :] < torch.from_numpy(lengths[idx])[:, None]  # (B, T)
        yield (idx, ids, mask, types) if with_types else (idx, ids, mask)
