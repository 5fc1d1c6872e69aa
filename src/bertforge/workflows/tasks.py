"""Task runtime shared by fine-tuning, evaluation and prediction: one adapter per task family.

`get_task_adapter(name)` returns the adapter of a task:

    family           tasks                                              head
    classification   cola sst2 mrpc stsb qqp mnli qnli rte wnli         sequence_classification
                     snli sick sick_relatedness (stsb, sick_relatedness: regression, num_labels 1)
    squad            squad (v1.1)                                       question_answering
    choice           swag arc_easy arc_challenge winogrande             multiple_choice

An adapter reads a split (`read`: a file, a folder holding the canonical file name, or `hub:` name),
featurizes it (`featurize`: returns the features and how many inputs were cut to fit, never silently:
with `truncate=False` any cut is an error), batches it (`collate`, `length`, `group`), runs a model
over it (`run`: batches of similar length, original order back), turns the outputs into predictions
(`decode`; SQuAD: n-best span search over every window), scores them with the task's official metrics
from `bertforge.eval.metrics` (`metrics`) and writes them (`write_predictions`: GLUE and multiple
choice `predictions*.tsv` with `id, prediction, label`, label names as in the task's files; SQuAD the
official `predictions.json`). MNLI has two evaluation sets; their metrics and files carry the
suffixes `_matched` / `_mismatched`. The model-selection score is the mean of the official metrics.

`hub:` rows of SQuAD / SWAG / ARC / WinoGrande come through `bertforge.data.hub_tasks`.
Scoring a split and running a fine-tuned model directory live in `bertforge.workflows.evaluate`.
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bertforge.data import multiple_choice as mc
from bertforge.data import squad
from bertforge.data.glue import TASKS, get_task, load_task_data, open_text, read_task_file
from bertforge.data.hub_tasks import hub_to_file
from bertforge.errors import BertforgeError, require
from bertforge.eval.metrics import compute_task_metrics

SUFFIX = {"dev": "", "test": "", "dev_matched": "_matched", "dev_mismatched": "_mismatched",
          "test_matched": "_matched", "test_mismatched": "_mismatched"}
CHOICE_FILES = {
    "swag": {"train": ("train.csv",), "dev": ("val.csv",), "test": ("test.csv",)},
    "arc_easy": {s: (f"ARC-Easy-{s.title()}.jsonl",) for s in ("train", "dev", "test")},
    "arc_challenge": {s: (f"ARC-Challenge-{s.title()}.jsonl",) for s in ("train", "dev", "test")},
    "winogrande": {"train": tuple(f"train_{x}.jsonl" for x in ("xl", "l", "m", "s", "xs")),
                   "dev": ("dev.jsonl",), "test": ("test.jsonl",)},
}
SQUAD_FILES = {"train": ("train-v1.1.json", "train-v1.1.json.gz"),
               "dev": ("dev-v1.1.json", "dev-from-train-v1.1.json"), "test": ("test-v1.1.json",)}
ALL_TASKS = (*TASKS, "squad", *CHOICE_FILES)


@dataclass
class TaskSettings:
    """Featurization and decoding settings; saved in a fine-tuned model's meta."""

    max_seq_length: int = 128
    doc_stride: int = 128  # SQuAD: context tokens shared by consecutive windows
    max_query_length: int = 64  # SQuAD: question tokens kept
    truncate: bool = True  # False: an input longer than max_seq_length is an error
    n_best_size: int = 20
    max_answer_length: int = 30
    eval_batch_size: int = 64


def canonical_split(split: str) -> str:
    return {"validation": "dev", "val": "dev"}.get(split, split).replace("validation_", "dev_")


def resolve_file(source: str, candidates: dict[str, tuple[str, ...]], task: str, split: str) -> Path:
    """A file passed as is, or the first canonical file name of `split` inside a folder."""
    path = Path(source)
    if path.is_file():
        return path
    require(path.is_dir(), f"data path '{source}' does not exist: pass a {task} file, a folder with the "
            "canonical file names, or hub:<name>")
    require(split in candidates, f"split {split!r} is not a {task} split: use one of {', '.join(candidates)}")
    for name in candidates[split]:
        if (path / name).is_file():
            return path / name
    raise BertforgeError(f"folder '{source}' has no {task} {split} file (expected one of "
                         f"{', '.join(candidates[split])}): add it or pass the file itself")


def _first_line(path: Path) -> str:
    with open_text(path) as handle:
        for line in handle:
            if line.strip():
                return line
    raise BertforgeError(f"task file '{path}' is empty: pass a file with data rows")


def has_labels(task: str, path: Path) -> bool:
    """Whether a task file carries gold labels (decided from its header or first record)."""
    line = _first_line(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BertforgeError(f"{path}:1: not valid JSON ({error.msg}): pass a JSON Lines file") from None
        key = {"arc_easy": "answerKey", "arc_challenge": "answerKey", "winogrande": "answer"}.get(task)
        return bool(record.get(key or get_task(task).label, "") not in ("", None))
    if task == "swag":
        return "label" in next(csv.reader([line]))
    spec = get_task(task)
    cells = [c.strip() for c in line.rstrip("\r\n").split("\t")]
    return spec.label in cells if spec.text_a in cells else len(cells) == len(spec.columns)


def truncation_note(task: str, cut: int, what: str, settings) -> str:
    """The one-line note for `cut` inputs of `what` that were truncated to fit."""
    if task == "squad":  # contexts are windowed, never cut; only questions can be
        limit = f"questions were longer than max_query_length={settings.max_query_length} tokens"
    else:
        limit = f"inputs were longer than max_seq_length={settings.max_seq_length} tokens"
    return f"note: {cut} {what} {limit} and were truncated; --no-truncate makes this an error"


def encode_checked(tokenizer, firsts: list[str], seconds: list[str] | None, limit: int, truncate: bool,
                   what: str) -> tuple[list, list[int]]:
    """Encodings without truncation and the indices of those longer than `limit` (an error when not
    `truncate`, naming the count and the first one)."""
    encs = tokenizer.encode_batch(firsts, seconds, max_length=1 << 30, truncation=False)
    long = [i for i, e in enumerate(encs) if len(e.input_ids) > limit]
    if long and not truncate:
        raise BertforgeError(f"{len(long)} of {len(encs)} {what} are longer than max_seq_length={limit} tokens "
                             f"(first: #{long[0]}, {len(encs[long[0]].input_ids)} tokens): raise --max-seq-length "
                             "or allow truncation (drop --no-truncate)")
    return encs, long


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    length = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)  # (B, T)


@dataclass
class SeqFeature:
    input_ids: list[int]
    token_type_ids: list[int]
    label: int | float | None


def suffix(split: str) -> str:
    """Metric / predictions-file suffix of an evaluation split ("" for dev and test)."""
    return SUFFIX.get(split, "_" + split)


class TaskAdapter:
    """A task's head, data, batching, inference, metrics and prediction files.

    Each family defines `read_file(path, labeled)`, `featurize(examples, tokenizer, settings, what) ->
    (features, number cut to fit)` and `collate(features)`; the base gives classifier-style defaults
    for `outputs` (a logits row), `decode` (argmax), `metrics` and `write_predictions`.
    """

    name: str
    head: str
    metric_task: str
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    eval_splits: tuple[str, ...] = ("dev",)
    files: dict[str, tuple[str, ...]] = {}
    pad_id: int = 0
    n_best: int = 20
    max_answer: int = 30

    def read(self, source: str, split: str, labeled: bool | None = None) -> list:
        """Examples of `split` from a file, a folder or `hub:`; `labeled=None` decides from the file."""
        split = canonical_split(split)
        if source.startswith("hub:"):
            with tempfile.TemporaryDirectory() as tmp:
                path = hub_to_file(self.name, source[4:], split, Path(tmp))
                return self.read_file(path, labeled is not False and not split.startswith("test"))
        return self.read_file(resolve_file(source, self.files, self.name, split), labeled)

    def group(self, feature) -> int:
        return 0

    def length(self, feature) -> int:
        return len(feature.input_ids)

    def run(self, model: nn.Module, features: list, batch_size: int) -> list:
        """Raw per-feature outputs (numpy), batches of similar length in one group, original order."""
        device = next(model.parameters()).device
        order = sorted(range(len(features)), key=lambda i: (self.group(features[i]), self.length(features[i])))
        results: list = [None] * len(features)
        for idx in split_batches(order, [self.group(f) for f in features], batch_size):
            batch = {k: v.to(device) for k, v in self.collate([features[i] for i in idx]).items()
                     if k not in ("labels", "start_positions", "end_positions")}
            out = model(**batch)
            for row, i in enumerate(idx):
                results[i] = self.outputs(out, row, batch)
        return results

    def outputs(self, out, row: int, batch: dict) -> Any:
        return out.logits[row].float().cpu().numpy()  # (num_labels,) or (C,)

    def decode(self, examples: list, features: list, raw: list) -> Any:
        return [int(np.argmax(r)) for r in raw]

    def metrics(self, examples: list, predictions: Any) -> dict[str, float]:
        return compute_task_metrics(self.metric_task, predictions, [e.label for e in examples])

    def show(self, value) -> str:
        return "" if value is None else str(value)

    def write_predictions(self, directory: Path, split: str, examples: list, predictions: Any) -> Path:
        """`predictions<suffix>.tsv` with id, prediction, label (empty when unlabelled)."""
        path = directory / f"predictions{suffix(split)}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write("id\tprediction\tlabel\n")
            f.writelines(f"{getattr(e, 'id', i)}\t{self.show(p)}\t{self.show(e.label)}\n"
                         for i, (e, p) in enumerate(zip(examples, predictions)))
        return path


def split_batches(order: list[int], groups: list[int], batch_size: int) -> list[list[int]]:
    """Cut `order` into runs of at most `batch_size` indices sharing one group."""
    batches: list[list[int]] = []
    for i in order:
        if not batches or len(batches[-1]) == batch_size or groups[batches[-1][0]] != groups[i]:
            batches.append([])
        batches[-1].append(i)
    return batches


class ClassificationTask(TaskAdapter):
    """GLUE, SNLI and SICK: [CLS] a [SEP] (b [SEP]) -> classifier (or a regression score)."""

    head = "sequence_classification"

    def __init__(self, name: str):
        self.spec = get_task(name)
        self.name = self.metric_task = self.spec.name
        self.num_labels = self.spec.num_labels
        self.id2label = None if self.spec.is_regression else dict(enumerate(self.spec.labels))
        self.files = self.spec.files
        self.eval_splits = ("dev_matched", "dev_mismatched") if self.name == "mnli" else ("dev",)

    def read(self, source: str, split: str, labeled: bool | None = None) -> list:
        if source.startswith("hub:"):
            return load_task_data(self.spec, source, canonical_split(split))
        return super().read(source, split, labeled)

    def read_file(self, path: Path, labeled: bool | None) -> list:
        return read_task_file(path, self.spec, labeled=has_labels(self.name, path) if labeled is None else labeled)

    def featurize(self, examples: list, tokenizer, s: TaskSettings, what: str) -> tuple[list, int]:
        self.pad_id = tokenizer.pad_token_id
        a = [e.text_a for e in examples]
        b = [e.text_b for e in examples] if self.spec.text_b else None
        encs, long = encode_checked(tokenizer, a, b, s.max_seq_length, s.truncate, what)
        if long:  # re-encode only the long ones, truncated longest-first (as HF)
            cut = tokenizer.encode_batch([a[i] for i in long], [b[i] for i in long] if b else None,
                                         max_length=s.max_seq_length, truncation="longest_first")
            for i, enc in zip(long, cut):
                encs[i] = enc
        return [SeqFeature(e.input_ids, e.token_type_ids, x.label) for e, x in zip(encs, examples)], len(long)

    def collate(self, features: list) -> dict[str, torch.Tensor]:
        batch = {"input_ids": _pad([f.input_ids for f in features], self.pad_id),  # (B, T)
                 "token_type_ids": _pad([f.token_type_ids for f in features], 0),  # (B, T)
                 "attention_mask": _pad([[1] * len(f.input_ids) for f in features], 0)}  # (B, T)
        if all(f.label is not None for f in features):
            dtype = torch.float32 if self.spec.is_regression else torch.long
            batch["labels"] = torch.tensor([f.label for f in features], dtype=dtype)  # (B,)
        return batch

    def decode(self, examples: list, features: list, raw: list) -> list:
        return [float(r[0]) for r in raw] if self.spec.is_regression else super().decode(examples, features, raw)

    def show(self, value) -> str:
        if value is None:
            return ""
        return f"{value:.9g}" if self.spec.is_regression else self.spec.labels[value]


class SquadTask(TaskAdapter):
    """SQuAD v1.1: sliding windows (doc stride), span logits, n-best decoding, EM/F1."""

    name = metric_task = "squad"
    head = "question_answering"
    files = SQUAD_FILES

    def read_file(self, path: Path, labeled: bool | None) -> list:
        examples = squad.read_squad(path)
        missing = [e.id for e in examples if not e.answers] if labeled else []
        require(not missing, f"SQuAD file '{path}': {len(missing)} questions have no answer (first: "
                f"{missing[0] if missing else ''!r}): pass a labelled file")
        return examples

    def featurize(self, examples: list, tokenizer, s: TaskSettings, what: str) -> tuple[list, int]:
        self.pad_id = tokenizer.pad_token_id
        questions = tokenizer.backend.encode_batch([e.question.lstrip() for e in examples], add_special_tokens=False)
        cut = sum(len(e.ids) > s.max_query_length for e in questions)
        require(s.truncate or not cut, f"{cut} of {len(examples)} {what} questions are longer than max_query_length="
                f"{s.max_query_length} tokens: raise data.max_query_length or allow truncation (drop --no-truncate)")
        return squad.featurize_squad(examples, tokenizer, max_length=s.max_seq_length, doc_stride=s.doc_stride,
                                     max_query_length=s.max_query_length), cut

    def collate(self, features: list) -> dict[str, torch.Tensor]:
        return squad.collate_qa(features, self.pad_id)

    def outputs(self, out, row: int, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        n = int(batch["attention_mask"][row].sum())
        return out.start_logits[row, :n].float().cpu().numpy(), out.end_logits[row, :n].float().cpu().numpy()

    def decode(self, examples: list, features: list, raw: list) -> dict[str, str]:
        width = max(len(f.input_ids) for f in features)
        start, end = np.zeros((len(raw), width), np.float32), np.zeros((len(raw), width), np.float32)  # (N, T)
        for i, (s_, e_) in enumerate(raw):
            start[i, :len(s_)], end[i, :len(e_)] = s_, e_
        return squad.postprocess_qa_predictions(examples, features, start, end, n_best_size=self.n_best,
                                                max_answer_length=self.max_answer)

    def metrics(self, examples: list, predictions: dict) -> dict[str, float]:
        return compute_task_metrics("squad", predictions, squad.gold_answers(examples))

    def write_predictions(self, directory: Path, split: str, examples: list, predictions: dict) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        squad.write_predictions(predictions, directory / f"predictions{suffix(split)}.json")
        return directory / f"predictions{suffix(split)}.json"


class ChoiceTask(TaskAdapter):
    """SWAG, ARC, WinoGrande: (context, ending_i) pairs scored jointly; batches share a choice count."""

    head = "multiple_choice"

    def __init__(self, name: str):
        self.name, self.metric_task = name, name.split("_")[0]
        self.files = CHOICE_FILES[name]

    def read_file(self, path: Path, labeled: bool | None) -> list:
        labeled = has_labels(self.name, path) if labeled is None else labeled
        return mc.read_choice_file(self.metric_task, path, labeled=labeled)

    def featurize(self, examples: list, tokenizer, s: TaskSettings, what: str) -> tuple[list, int]:
        self.pad_id = tokenizer.pad_token_id
        a = [e.context for e in examples for _ in e.endings]
        b = [x for e in examples for x in e.endings]
        _, long = encode_checked(tokenizer, a, b, s.max_seq_length, s.truncate, f"{what} (context, choice) pairs")
        return mc.featurize_choices(examples, tokenizer, max_length=s.max_seq_length), len(long)

    def group(self, feature) -> int:
        return feature.num_choices

    def length(self, feature) -> int:
        return len(feature.input_ids[0])

    def collate(self, features: list) -> dict[str, torch.Tensor]:
        return mc.collate_choices(features, self.pad_id)


def get_task_adapter(name: str, settings: TaskSettings | None = None) -> TaskAdapter:
    """The adapter of task `name` (see the module table); unknown names are an error."""
    key = str(name).lower().replace("-", "_")
    if key == "arc":
        raise BertforgeError("task 'arc' is ambiguous: use arc_easy or arc_challenge")
    if key in CHOICE_FILES:
        adapter: TaskAdapter = ChoiceTask(key)
    elif key == "squad":
        adapter = SquadTask()
    else:
        try:
            adapter = ClassificationTask(key)
        except BertforgeError:
            raise BertforgeError(f"unknown task {name!r}: use one of {', '.join(ALL_TASKS)}") from None
    s = settings or TaskSettings()
    adapter.n_best, adapter.max_answer = s.n_best_size, s.max_answer_length
    return adapter
