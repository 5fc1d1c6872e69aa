"""SQuAD v1.1 extractive QA: JSON reader, sliding-window featurizer, n-best span post-processing.

- `read_squad(path)` reads the official `{"version", "data": [{"title", "paragraphs": [{"context",
  "qas": [{"id", "question", "answers": [{"answer_start", "text"}]}]}]}]}` file (`.json` or
  `.json.gz`) into `SquadExample`s, checking that every answer text sits at its `answer_start`.
- `featurize_squad(examples, tokenizer, max_length, doc_stride, max_query_length)` builds windows
  `[CLS] question [SEP] context-window [SEP]` (token types 0 then 1). The question keeps its first
  `max_query_length` tokens (as the original BERT `run_squad.py`). `doc_stride` is the number of
  context tokens shared by consecutive windows, as `stride` in HF `run_qa.py` / `tokenizers`
  overflow (original BERT used it as the step between window starts); windows are exactly those of a
  HF fast tokenizer with `truncation="only_second", return_overflowing_tokens=True, stride=doc_stride`.
  Each window keeps `offset_mapping` (character span in the context for context tokens, None for the
  rest) and `start_position`/`end_position` of the first gold answer, or the [CLS] index 0 when the
  answer is not wholly inside the window.
- `postprocess_qa_predictions(examples, features, start_logits, end_logits, n_best_size,
  max_answer_length)` scores start+end over the `n_best_size` best starts and ends of every window of
  an example (context tokens only, end >= start, length <= max_answer_length) and returns the official
  predictions.json mapping `{id: answer text}` (text sliced from the context by character offsets).

Tokenization uses the contract's `tokenizer.backend` (a HF `tokenizers.Tokenizer`), copied with
truncation and padding switched off, so contexts are tokenized once and windows are cut here.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bertforge.data.glue import open_text
from bertforge.errors import BertforgeError, require

__all__ = [
    "QAFeature",
    "SquadAnswer",
    "SquadExample",
    "collate_qa",
    "featurize_squad",
    "gold_answers",
    "postprocess_qa_predictions",
    "read_squad",
    "write_predictions",
]


@dataclass(frozen=True)
class SquadAnswer:
    text: str
    answer_start: int  # character offset into the context


@dataclass(frozen=True)
class SquadExample:
    id: str
    title: str
    question: str
    context: str
    answers: tuple[SquadAnswer, ...]  # empty for unlabeled (test) questions


@dataclass
class QAFeature:
    """One window of one example; lists are unpadded (see `collate_qa`)."""

    input_ids: list[int]
    token_type_ids: list[int]
    attention_mask: list[int]
    offset_mapping: list[tuple[int, int] | None]  # context char span per token, None off-context
    example_index: int  # position of the example in the list given to featurize_squad
    example_id: str
    start_position: int  # token index of the answer start, 0 ([CLS]) if not in this window
    end_position: int


def _parse_qa(qa: dict, context: str, title: str, where: str) -> SquadExample:
    missing = [key for key in ("id", "question") if key not in qa]
    require(not missing, f"{where}: question lacks {', '.join(missing)}: pass a SQuAD v1.1 file")
    answers = []
    for answer in qa.get("answers", []):
        start, text = answer.get("answer_start"), answer.get("text")
        require(isinstance(start, int) and isinstance(text, str),
                f"{where}: question {qa['id']!r} has an answer without int answer_start and text: fix the file")
        require(context[start:start + len(text)] == text,
                f"{where}: answer {text!r} of question {qa['id']!r} is not at answer_start {start} of its "
                "context: fix answer_start")
        answers.append(SquadAnswer(text, start))
    return SquadExample(str(qa["id"]), title, qa["question"], context, tuple(answers))


def read_squad(path: str | Path) -> list[SquadExample]:
    """All questions of a SQuAD v1.1 JSON file (`.json` or `.json.gz`), in file order."""
    path = Path(path)
    require(path.is_file(), f"SQuAD file '{path}' does not exist: pass an existing .json or .json.gz file")
    with open_text(path) as handle:
        try:
            document = json.load(handle)
        except json.JSONDecodeError as error:
            raise BertforgeError(f"SQuAD file '{path}' is not valid JSON ({error.msg}): pass a SQuAD v1.1 file") \
                from None
    require(isinstance(document, dict) and isinstance(document.get("data"), list),
            f"SQuAD file '{path}' has no top-level 'data' list: pass a SQuAD v1.1 file")
    examples, seen = [], set()
    for a, article in enumerate(document["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            require("context" in paragraph and "qas" in paragraph,
                    f"{where} lacks 'context' or 'qas': pass a SQuAD v1.1 file")
            for qa in paragraph["qas"]:
                example = _parse_qa(qa, paragraph["context"], article.get("title", ""), where)
                require(example.id not in seen, f"{where}: question id {example.id!r} repeats: ids must be unique")
                seen.add(example.id)
                examples.append(example)
    require(bool(examples), f"SQuAD file '{path}' has no questions: pass a non-empty SQuAD file")
    return examples


def gold_answers(examples: Sequence[SquadExample]) -> dict[str, list[str]]:
    """`{id: [gold answer texts]}`, the references of `bertforge.eval.metrics.squad_metrics`."""
    return {example.id: [answer.text for answer in example.answers] for example in examples}


def _plain_backend(tokenizer):
    """A copy of the HF backend tokenizer that neither truncates nor pads."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def _window_starts(num_tokens: int, window: int, doc_stride: int) -> list[int]:
    """Start of each window of `window` tokens, consecutive windows sharing `doc_stride` tokens."""
    starts = [0]
    while starts[-1] + window < num_tokens:
        starts.append(starts[-1] + window - doc_stride)
    return starts


def _answer_tokens(example: SquadExample, offsets: list[tuple[int, int]]) -> tuple[int, int] | None:
    """Context token indices (first, last) covering the first gold answer, or None if unlabeled."""
    if not example.answers:
        return None
    answer = example.answers[0]
    start_char, end_char = answer.answer_start, answer.answer_start + len(answer.text)
    first = max(bisect.bisect_right([a for a, _ in offsets], start_char) - 1, 0)
    last = min(bisect.bisect_left([b for _, b in offsets], end_char), len(offsets) - 1)
    return first, last


def _example_windows(example: SquadExample, index: int, question_ids: list[int], context_encoding, cls_id: int,
                     sep_id: int, max_length: int, doc_stride: int) -> list[QAFeature]:
    context_ids, offsets = context_encoding.ids, context_encoding.offsets
    require(len(context_ids) > 0, f"SQuAD question {example.id!r} has an empty context: drop it")
    window = max_length - len(question_ids) - 3
    require(window > doc_stride, f"doc_stride {doc_stride} must be smaller than the {window} context tokens "
            f"per window of question {example.id!r} (max_length {max_length} - {len(question_ids)} question "
            "tokens - 3): lower doc_stride or max_query_length, or raise max_length")
    answer = _answer_tokens(example, offsets)
    prefix = [cls_id, *question_ids, sep_id]
    features = []
    for start in _window_starts(len(context_ids), window, doc_stride):
        stop = min(start + window, len(context_ids))
        ids = prefix + context_ids[start:stop] + [sep_id]
        types = [0] * len(prefix) + [1] * (stop - start + 1)
        mapping = [None] * len(prefix) + list(offsets[start:stop]) + [None]
        start_position = end_position = 0
        if answer is not None and start <= answer[0] and answer[1] < stop:
            start_position, end_position = answer[0] - start + len(prefix), answer[1] - start + len(prefix)
        features.append(QAFeature(ids, types, [1] * len(ids), mapping, index, example.id,
                                  start_position, end_position))
    return features


def featurize_squad(examples: Sequence[SquadExample], tokenizer, *, max_length: int = 384,
                    doc_stride: int = 128, max_query_length: int = 64) -> list[QAFeature]:
    """Sliding-window features of every example (one or more per example, in example order)."""
    require(doc_stride >= 0 and max_query_length > 0, f"doc_stride {doc_stride} and max_query_length "
            f"{max_query_length}: need doc_stride >= 0 and max_query_length >= 1")
    backend = _plain_backend(tokenizer)
    questions = backend.encode_batch([example.question.lstrip() for example in examples], add_special_tokens=False)
    unique_contexts = list(dict.fromkeys(example.context for example in examples))
    encoded = dict(zip(unique_contexts, backend.encode_batch(unique_contexts, add_special_tokens=False)))
    features = []
    for index, example in enumerate(examples):
        question_ids = questions[index].ids[:max_query_length]
        features.extend(_example_windows(example, index, question_ids, encoded[example.context],
                                         tokenizer.cls_token_id, tokenizer.sep_token_id, max_length, doc_stride))
    return features


def collate_qa(features: Sequence[QAFeature], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch of windows to its longest: input_ids/token_type_ids/attention_mask (B, T),
    start_positions/end_positions (B,)."""
    length = max(len(feature.input_ids) for feature in features)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)

    return {
        "input_ids": pad([f.input_ids for f in features], pad_token_id),  # (B, T)
        "token_type_ids": pad([f.token_type_ids for f in features], 0),  # (B, T)
        "attention_mask": pad([f.attention_mask for f in features], 0),  # (B, T)
        "start_positions": torch.tensor([f.start_position for f in features], dtype=torch.long),  # (B,)
        "end_positions": torch.tensor([f.end_position for f in features], dtype=torch.long),  # (B,)
    }


def best_span(feature: QAFeature, start_logits: np.ndarray, end_logits: np.ndarray,
               n_best_size: int, max_answer_length: int) -> tuple[float, int, int] | None:
    """(score, first char, end char) of the best valid span of one window, or None.

    Candidates are the `n_best_size` best starts x best ends that are context tokens with
    0 <= end - start < max_answer_length; ties go to the better-ranked start, then end."""
    mapping = feature.offset_mapping
    in_context = np.array([span is not None for span in mapping])  # (T,)
    starts = np.argsort(-start_logits, kind="stable")[:n_best_size]
    ends = np.argsort(-end_logits, kind="stable")[:n_best_size]
    starts, ends = starts[in_context[starts]], ends[in_context[ends]]
    if len(starts) == 0 or len(ends) == 0:
        return None
    scores = start_logits[starts][:, None] + end_logits[ends][None, :]  # (S, E)
    length = ends[None, :] - starts[:, None] + 1  # (S, E)
    scores = np.where((length >= 1) & (length <= max_answer_length), scores, -np.inf)
    best = int(np.argmax(scores))
    s, e = divmod(best, len(ends))
    if not np.isfinite(scores[s, e]):
        return None
    return float(scores[s, e]), mapping[starts[s]][0], mapping[ends[e]][1]


def postprocess_qa_predictions(examples: Sequence[SquadExample], features: Sequence[QAFeature],
                               start_logits, end_logits, *, n_best_size: int = 20,
                               max_answer_length: int = 30) -> dict[str, str]:
    """Best answer text per example over all its windows -> `{id: text}` ("" when no valid span).

    `start_logits`/`end_logits` are (N, T) arrays or tensors, row i for `features[i]`, T >= the
    longest window (padding columns are ignored).
    """
    start_logits = np.asarray(torch.as_tensor(start_logits, dtype=torch.float32))  # (N, T)
    end_logits = np.asarray(torch.as_tensor(end_logits, dtype=torch.float32))  # (N, T)
    require(start_logits.shape == end_logits.shape and start_logits.shape[0] == len(features),
            f"logits of shapes {start_logits.shape} / {end_logits.shape} do not match {len(features)} features: "
            "pass one row of start and end logits per feature")
    by_example: dict[int, list[int]] = defaultdict(list)
    for row, feature in enumerate(features):
        require(feature.example_index < len(examples) and examples[feature.example_index].id == feature.example_id,
                f"feature {row} belongs to question {feature.example_id!r}, which is not at position "
                f"{feature.example_index} of examples: pass the examples the features were built from")
        by_example[feature.example_index].append(row)
    predictions = {}
    for index, example in enumerate(examples):
        best = None
        for row in by_example[index]:
            length = len(features[row].input_ids)
            span = best_span(features[row], start_logits[row, :length], end_logits[row, :length],
                              n_best_size, max_answer_length)
            if span is not None and (best is None or span[0] > best[0]):
                best = span
        predictions[example.id] = "" if best is None else example.context[best[1]:best[2]]
    return predictions


def write_predictions(predictions: dict[str, str], path: str | Path) -> None:
    """Write the official predictions.json ({id: answer text}, UTF-8)."""
    Path(path).write_text(json.dumps(predictions, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
