"""Multiple-choice tasks (SWAG, ARC, WinoGrande): readers, featurizer, collate and batching.

ARCHITECTURE.md names this module `swag.py`; it is `multiple_choice.py` because SWAG itself is not
in the shared data (too large to stage) and the module serves every multiple-choice task through one
`ChoiceExample(id, context, endings, label)`: choice i is the pair (context, endings[i]).

- SWAG CSV (`[,]video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0..3,label`): context =
  `sent1`, ending = `sent2 + " " + ending_i`, as HF `run_swag.py`.
- ARC JSONL (`question.stem`, `question.choices[{text,label}]`, `answerKey`): context = stem, endings =
  choice texts, label = position of `answerKey` among the choice labels.
- WinoGrande JSONL (`sentence` with one `_`, `option1`, `option2`, `answer` "1"/"2"): split at `_` as
  the official baseline: context = text before `_`, ending = option + " " + text after `_` (stripped).

Choice counts: ARC has 3, 4 or 5 choices. Decision: keep each example's own C and batch examples by
choice count (`ChoiceCountBatchSampler`) instead of padding to a fixed C with a choice mask. The
`BertForMultipleChoice` contract takes dense (B, C, T) inputs and has no choice mask; padded choices
would need -inf logits in the head, the loss and accuracy. Batching by count keeps every batch dense
and costs nothing for SWAG (always 4) and WinoGrande (always 2). `collate_choices` refuses a batch
mixing choice counts.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bertforge.data.glue import open_text
from bertforge.errors import BertforgeError, require

__all__ = [
    "CHOICE_READERS",
    "ChoiceCountBatchSampler",
    "ChoiceExample",
    "ChoiceFeature",
    "collate_choices",
    "featurize_choices",
    "read_arc",
    "read_choice_file",
    "read_swag",
    "read_winogrande",
]


@dataclass(frozen=True)
class ChoiceExample:
    id: str
    context: str  # first segment, shared by every choice
    endings: tuple[str, ...]  # second segment of each choice
    label: int | None  # index of the right ending, None for unlabeled (test) files


@dataclass
class ChoiceFeature:
    """One example as C rows of equal length T (padded within the example)."""

    input_ids: list[list[int]]  # (C, T)
    token_type_ids: list[list[int]]  # (C, T)
    attention_mask: list[list[int]]  # (C, T)
    label: int | None

    @property
    def num_choices(self) -> int:
        return len(self.input_ids)


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    require(path.is_file(), f"{what} file '{path}' does not exist: pass an existing file")
    return path


def _jsonl_records(path: Path, what: str) -> Iterator[tuple[str, dict]]:
    with open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as error:
                raise BertforgeError(f"{path}:{line_no}: not valid JSON ({error.msg}): pass a {what} JSONL file") \
                    from None


def _nonempty(examples: list[ChoiceExample], path: Path, what: str) -> list[ChoiceExample]:
    require(bool(examples), f"{what} file '{path}' has no examples: pass a non-empty {what} file")
    return examples


def read_swag(path: str | Path, *, labeled: bool = True) -> list[ChoiceExample]:
    """SWAG CSV (train/val; `labeled=False` for test.csv without `label`)."""
    path = _existing(path, "SWAG")
    with open_text(path) as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        needed = ["sent1", "sent2", *(f"ending{i}" for i in range(4))] + (["label"] if labeled else [])
        missing = [name for name in needed if name not in header]
        require(bool(header), f"SWAG file '{path}' is empty: pass a SWAG CSV file")
        require(not missing, f"SWAG file '{path}' lacks column(s) {', '.join(map(repr, missing))}: "
                "pass a SWAG CSV (video-id, fold-ind, startphrase, sent1, sent2, gold-source, ending0..3, label)")
        examples = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            label = None
            if labeled:
                require(row["label"] in ("0", "1", "2", "3"), f"{where}: label {row['label']!r} is not 0-3: fix that row")
                label = int(row["label"])
            endings = tuple(f"{row['sent2']} {row[f'ending{i}']}" for i in range(4))
            examples.append(ChoiceExample(row.get("fold-ind") or where, row["sent1"], endings, label))
    return _nonempty(examples, path, "SWAG")


def read_arc(path: str | Path, *, labeled: bool = True) -> list[ChoiceExample]:
    """ARC JSONL (3 to 5 choices per question)."""
    path = _existing(path, "ARC")
    examples = []
    for where, record in _jsonl_records(path, "ARC"):
        question = record.get("question")
        valid = isinstance(question, dict) and "stem" in question and isinstance(question.get("choices"), list)
        require(valid, f"{where}: record lacks question.stem / question.choices: pass an ARC JSONL file")
        choices = question["choices"]
        require(len(choices) >= 2 and all("text" in c and "label" in c for c in choices),
                f"{where}: question needs at least 2 choices with text and label: fix that record")
        label = None
        if labeled:
            keys = [str(choice["label"]) for choice in choices]
            require("answerKey" in record, f"{where}: record lacks 'answerKey': pass a labeled ARC file")
            require(str(record["answerKey"]) in keys, f"{where}: answerKey {record['answerKey']!r} is not one of "
                    f"the choice labels {keys}: fix that record")
            label = keys.index(str(record["answerKey"]))
        examples.append(ChoiceExample(str(record.get("id", where)), question["stem"],
                                      tuple(choice["text"] for choice in choices), label))
    return _nonempty(examples, path, "ARC")


def read_winogrande(path: str | Path, *, labeled: bool = True) -> list[ChoiceExample]:
    """WinoGrande JSONL: the blank `_` splits the sentence into context and option + rest."""
    path = _existing(path, "WinoGrande")
    examples = []
    for where, record in _jsonl_records(path, "WinoGrande"):
        needed = ["sentence", "option1", "option2"] + (["answer"] if labeled else [])
        missing = [key for key in needed if key not in record]
        require(not missing, f"{where}: record lacks key(s) {', '.join(map(repr, missing))}: "
                "pass a WinoGrande JSONL file")
        sentence = record["sentence"]
        require(sentence.count("_") == 1, f"{where}: sentence has {sentence.count('_')} blanks '_', "
                "expected exactly 1: fix that record")
        context, rest = sentence.split("_")
        endings = tuple(f"{record[key]} {rest.strip()}" for key in ("option1", "option2"))
        label = None
        if labeled:
            require(str(record["answer"]) in ("1", "2"), f"{where}: answer {record['answer']!r} is not "
                    "'1' or '2': fix that record")
            label = int(record["answer"]) - 1
        examples.append(ChoiceExample(str(record.get("qID", where)), context, endings, label))
    return _nonempty(examples, path, "WinoGrande")


CHOICE_READERS = {"swag": read_swag, "arc": read_arc, "winogrande": read_winogrande}


def read_choice_file(task: str, path: str | Path, *, labeled: bool = True) -> list[ChoiceExample]:
    """Read a multiple-choice file with the reader of `task` (swag, arc, winogrande)."""
    if task not in CHOICE_READERS:
        raise BertforgeError(f"unknown multiple-choice task {task!r}: use one of {', '.join(CHOICE_READERS)}")
    return CHOICE_READERS[task](path, labeled=labeled)


def featurize_choices(examples: Sequence[ChoiceExample], tokenizer, *, max_length: int = 128) -> list[ChoiceFeature]:
    """Encode every (context, ending) pair with `tokenizer.encode_batch` (longest_first truncation to
    `max_length`, as HF `run_swag.py`) and pad each example's C rows to its longest row."""
    firsts = [example.context for example in examples for _ in example.endings]
    seconds = [ending for example in examples for ending in example.endings]
    encodings = tokenizer.encode_batch(firsts, seconds, max_length=max_length, truncation="longest_first")
    pad_id, features, position = tokenizer.pad_token_id, [], 0
    for example in examples:
        rows = encodings[position:position + len(example.endings)]
        position += len(example.endings)
        length = max(len(row.input_ids) for row in rows)
        features.append(ChoiceFeature(
            [row.input_ids + [pad_id] * (length - len(row.input_ids)) for row in rows],
            [row.token_type_ids + [0] * (length - len(row.input_ids)) for row in rows],
            [row.attention_mask + [0] * (length - len(row.input_ids)) for row in rows],
            example.label,
        ))
    return features


def collate_choices(features: Sequence[ChoiceFeature], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack features of one choice count: input_ids/token_type_ids/attention_mask (B, C, T),
    labels (B,) when every feature has a label."""
    counts = sorted({feature.num_choices for feature in features})
    require(len(counts) == 1, f"batch mixes choice counts {counts}: batch with ChoiceCountBatchSampler")
    length = max(len(feature.input_ids[0]) for feature in features)

    def pad(field: str, value: int) -> torch.Tensor:
        rows = [[row + [value] * (length - len(row)) for row in getattr(f, field)] for f in features]
        return torch.tensor(rows, dtype=torch.long)

    batch = {"input_ids": pad("input_ids", pad_token_id),  # (B, C, T)
             "token_type_ids": pad("token_type_ids", 0),  # (B, C, T)
             "attention_mask": pad("attention_mask", 0)}  # (B, C, T)
    if all(feature.label is not None for feature in features):
        batch["labels"] = torch.tensor([feature.label for feature in features], dtype=torch.long)  # (B,)
    return batch


class ChoiceCountBatchSampler:
    """Batches of feature indices sharing one choice count; a `batch_sampler` for DataLoader.

    Without shuffling, batches follow feature order within each count (counts in ascending order).
    With shuffling, indices and batch order are permuted by `Random(seed + epoch)`; call `set_epoch`.
    """

    def __init__(self, features: Sequence[ChoiceFeature], batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False) -> None:
        require(batch_size > 0, f"batch_size {batch_size} must be positive: pass a batch size >= 1")
        self.groups: dict[int, list[int]] = defaultdict(list)
        for index, feature in enumerate(features):
            self.groups[feature.num_choices].append(index)
        self.batch_size, self.shuffle, self.seed, self.drop_last, self.epoch = batch_size, shuffle, seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        batches = []
        for count in sorted(self.groups):
            indices = list(self.groups[count])
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
