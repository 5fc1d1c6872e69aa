"""GLUE (and SNLI/SICK) sentence(-pair) tasks: the TASKS table, file readers and `load_task_data`.

`TASKS[name]` is a `TaskSpec`: text and label columns of the canonical files, the label list (None =
regression), the official metric names (from `bertforge.eval.metrics.TASK_METRICS`), the canonical
file names per split and the Hugging Face hub columns. Readers return `Example(text_a, text_b, label)`
with `label` a label id (int), a score (float, STS-B), or None for unlabeled test files.

Quirks of the canonical files that the readers handle:
- TSV is read with `csv.QUOTE_NONE` (texts contain unbalanced quotes) and `utf-8-sig` (MRPC's
  `msr_paraphrase_*.txt` starts with a BOM); `.gz` files are read transparently.
- A header is recognised by the text column name in the first row. Without one, the row must have
  the task's canonical column count (CoLA never has a header: source, label, mark, sentence; a
  headerless RTE/WNLI/QNLI/SST-2 file uses the header's column order).
- MNLI/SNLI: `gold_label` is read from TSV or the official JSONL; `-` (no gold label) rows are skipped.
- SICK's labels are upper case (ENTAILMENT/NEUTRAL/CONTRADICTION), ids in the same order as SNLI's;
  `sick_relatedness` reads the same files as a regression task (`relatedness_score` in [1, 5]).

`load_task_data(task, path_or_dir, split)` takes a file, a folder holding a canonical file name for
the split (the first name in `TaskSpec.files[split]` that exists wins: `dev.tsv` before `val.tsv`,
GLUE `train.tsv` before `msr_paraphrase_train.txt`), or `hub:<dataset>/<config>` (e.g. `hub:glue/sst2`,
needs the `hub` extra). Split aliases: `validation`/`val` -> `dev`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bertforge.errors import BertforgeError, require
from bertforge.eval.metrics import TASK_METRICS

__all__ = ["GLUE_TASKS", "TASKS", "Example", "TaskSpec", "get_task", "load_task_data", "open_text", "qnli_from_squad",
           "read_task_file", "split_sentences"]

_TEST_SPLITS = ("test", "test_matched", "test_mismatched")


@dataclass(frozen=True)
class Example:
    """One sentence or sentence pair; `label` is a class id, a regression score, or None (test)."""

    text_a: str
    text_b: str | None
    label: int | float | None


@dataclass(frozen=True)
class TaskSpec:
    """How to read one task's canonical files (column names are those of the files' header)."""

    name: str
    text_a: str
    text_b: str | None
    label: str
    labels: tuple[str, ...] | None  # None = regression (float score)
    columns: tuple[str, ...]  # canonical column order, used for headerless files
    files: dict[str, tuple[str, ...]]  # split -> candidate file names, first existing wins
    hub_text: tuple[str, str | None]  # hub dataset text columns (label column is "label")
    hub_labels: tuple[str, ...] | None = None  # hub ClassLabel names in our id order
    skip_labels: tuple[str, ...] = ()  # label values meaning "no gold label": row skipped
    hub_label: str = "label"  # hub dataset label column

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def metrics(self) -> tuple[str, ...]:
        return TASK_METRICS[self.name]


def _files(dev: tuple[str, ...] = ("dev.tsv", "val.tsv"), **extra: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {"train": ("train.tsv",), "dev": dev, "test": ("test.tsv",), **extra}


_NLI3 = ("entailment", "neutral", "contradiction")
_MNLI_COLUMNS = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                 "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label")
_SICK_COLUMNS = ("pair_ID", "sentence_A", "sentence_B", "entailment_label", "relatedness_score",
                 "entailment_AB", "entailment_BA", "sentence_A_original", "sentence_B_original",
                 "sentence_A_dataset", "sentence_B_dataset", "SemEval_set")
_PAIR = ("index", "sentence1", "sentence2", "label")
_ENT2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("cola", "sentence", None, "label", ("0", "1"), ("source", "label", "mark", "sentence"),
             _files(), ("sentence", None), ("unacceptable", "acceptable")),
    TaskSpec("sst2", "sentence", None, "label", ("0", "1"), ("sentence", "label"),
             _files(), ("sentence", None), ("negative", "positive")),
    TaskSpec("mrpc", "#1 String", "#2 String", "Quality", ("0", "1"),
             ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
             {"train": ("train.tsv", "msr_paraphrase_train.txt"), "dev": ("dev.tsv", "val.tsv"),
              "test": ("test.tsv", "msr_paraphrase_test.txt")},
             ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    TaskSpec("stsb", "sentence1", "sentence2", "score", None,
             ("index", "genre", "filename", "year", "old_index", "source1", "source2",
              "sentence1", "sentence2", "score"), _files(), ("sentence1", "sentence2")),
    TaskSpec("qqp", "question1", "question2", "is_duplicate", ("0", "1"),
             ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
             _files(), ("question1", "question2"), ("not_duplicate", "duplicate")),
    TaskSpec("mnli", "sentence1", "sentence2", "gold_label", _NLI3, _MNLI_COLUMNS,
             {"train": ("train.tsv", "multinli_1.0_train.jsonl"),
              "dev_matched": ("dev_matched.tsv", "multinli_1.0_dev_matched.jsonl"),
              "dev_mismatched": ("dev_mismatched.tsv", "multinli_1.0_dev_mismatched.jsonl"),
              "test_matched": ("test_matched.tsv",), "test_mismatched": ("test_mismatched.tsv",)},
             ("premise", "hypothesis"), _NLI3, ("-",)),
    TaskSpec("qnli", "question", "sentence", "label", _ENT2, ("index", "question", "sentence", "label"),
             _files(), ("question", "sentence"), _ENT2),
    TaskSpec("rte", "sentence1", "sentence2", "label", _ENT2, _PAIR, _files(), ("sentence1", "sentence2"), _ENT2),
    TaskSpec("wnli", "sentence1", "sentence2", "label", ("0", "1"), _PAIR, _files(),
             ("sentence1", "sentence2"), ("not_entailment", "entailment")),
    TaskSpec("snli", "sentence1", "sentence2", "gold_label", _NLI3, _MNLI_COLUMNS,
             _files(dev=("dev.tsv", "snli_1.0_dev.jsonl", "snli_1.0_dev.txt"),
                    train=("train.tsv", "snli_1.0_train.jsonl", "snli_1.0_train.txt"),
                    test=("test.tsv", "snli_1.0_test.jsonl", "snli_1.0_test.txt")),
             ("premise", "hypothesis"), _NLI3, ("-",)),
    TaskSpec("sick", "sentence_A", "sentence_B", "entailment_label", tuple(x.upper() for x in _NLI3),
             _SICK_COLUMNS, {"train": ("SICK_train.txt",), "dev": ("SICK_trial.txt",),
                             "test": ("SICK_test_annotated.txt",)},
             ("sentence_A", "sentence_B"), _NLI3),
    TaskSpec("sick_relatedness", "sentence_A", "sentence_B", "relatedness_score", None, _SICK_COLUMNS,
             {"train": ("SICK_train.txt",), "dev": ("SICK_trial.txt",), "test": ("SICK_test_annotated.txt",)},
             ("sentence_A", "sentence_B"), hub_label="relatedness_score"),
]}

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


def get_task(task: str | TaskSpec) -> TaskSpec:
    """The `TaskSpec` for a name (case-insensitive, `sst-2` == `sst2`); a spec passes through."""
    if isinstance(task, TaskSpec):
        return task
    key = task.lower().replace("-", "_").replace("sst_2", "sst2").replace("sts_b", "stsb")
    if key not in TASKS:
        raise BertforgeError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    return TASKS[key]


def open_text(path: Path) -> io.TextIOBase:
    """Open a UTF-8 text file (BOM stripped), gunzipping `*.gz`."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _convert_label(value: str, spec: TaskSpec, where: str) -> int | float | None:
    """Label text -> id (or float score); None for a skip value such as MNLI's '-'."""
    value = value.strip()
    if spec.labels is None:
        try:
            return float(value)
        except ValueError:
            raise BertforgeError(f"{where}: score {value!r} is not a number: {spec.name} needs a float "
                                 f"in column {spec.label!r}") from None
    if value in spec.skip_labels:
        return None
    if value not in spec.labels:
        raise BertforgeError(f"{where}: label {value!r} is not a {spec.name} label "
                             f"({', '.join(spec.labels)}): pass a {spec.name} file or fix that row")
    return spec.labels.index(value)


def _tsv_rows(path: Path, spec: TaskSpec, labeled: bool) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield (file:line, {column: value}) for each data row, header detected or positional."""
    try:
        yield from _tsv_rows_text(path, spec, labeled)
    except UnicodeDecodeError as e:  # a binary or non-UTF-8 file: name it (the CLI's fallback cannot)
        raise BertforgeError(f"task file '{path}' is not UTF-8 text ({e.reason} at byte {e.start}): pass a "
                             f"{spec.name} TSV saved as UTF-8") from None


def _tsv_rows_text(path: Path, spec: TaskSpec, labeled: bool) -> Iterator[tuple[str, dict[str, str]]]:
    with open_text(path) as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        first = next(reader, None)
        while first is not None and not any(cell.strip() for cell in first):
            first = next(reader, None)
        require(first is not None, f"task file '{path}' is empty: pass a {spec.name} file with data rows")
        has_header = spec.text_a in [cell.strip() for cell in first]
        if not has_header and len(first) != len(spec.columns):
            raise BertforgeError(
                f"'{path}' line 1 has no header naming {spec.text_a!r} and {len(first)} columns instead of "
                f"the {len(spec.columns)} of a headerless {spec.name} file ({', '.join(spec.columns)}): "
                "pass the canonical TSV")
        header = [cell.strip() for cell in first] if has_header else list(spec.columns)
        needed = [spec.text_a] + ([spec.text_b] if spec.text_b else []) + ([spec.label] if labeled else [])
        missing = [name for name in needed if name not in header]
        require(not missing, f"'{path}' lacks column(s) {', '.join(map(repr, missing))} "
                f"(header: {', '.join(header)}): pass a {spec.name} file with those columns")
        rows = reader if has_header else _chain_first(first, reader)
        for row in rows:
            where = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue  # blank line (e.g. at end of file)
            require(len(row) == len(header), f"{where}: {len(row)} tab-separated fields, expected "
                    f"{len(header)} ({', '.join(header)}): fix that row (files are read with QUOTE_NONE)")
            yield where, dict(zip(header, row))


def _chain_first(first: list[str], reader: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from reader


def _jsonl_rows(path: Path, spec: TaskSpec, labeled: bool) -> Iterator[tuple[str, dict]]:
    needed = [spec.text_a] + ([spec.text_b] if spec.text_b else []) + ([spec.label] if labeled else [])
    with open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise BertforgeError(f"{where}: not valid JSON ({error.msg}): pass a JSON Lines file") from None
            missing = [key for key in needed if key not in record]
            require(not missing, f"{where}: record lacks key(s) {', '.join(map(repr, missing))}: "
                    f"pass a {spec.name} JSONL file with those keys")
            yield where, record


def read_task_file(path: str | Path, task: str | TaskSpec, *, labeled: bool = True) -> list[Example]:
    """Read one task file (TSV/TXT, or JSONL for MNLI/SNLI; optionally gzipped) into Examples.

    `labeled=False` reads unlabeled (test) files: labels are None and no label column is needed.
    """
    spec, path = get_task(task), Path(path)
    require(path.is_file(), f"task file '{path}' does not exist: pass an existing {spec.name} file")
    is_jsonl = ".jsonl" in path.suffixes
    rows = _jsonl_rows(path, spec, labeled) if is_jsonl else _tsv_rows(path, spec, labeled)
    examples = []
    for where, row in rows:
        label = _convert_label(str(row[spec.label]), spec, where) if labeled else None
        if labeled and label is None:
            continue  # no gold label ('-'): not usable for training or scoring
        text_b = row[spec.text_b] if spec.text_b else None
        examples.append(Example(row[spec.text_a], text_b, label))
    require(len(examples) > 0, f"task file '{path}' has no {'labeled ' if labeled else ''}data rows: "
            f"pass a non-empty {spec.name} file")
    return examples


def _canonical_split(spec: TaskSpec, split: str) -> str:
    split = {"validation": "dev", "val": "dev"}.get(split, split).replace("validation_", "dev_")
    require(split in spec.files, f"split {split!r} is not a {spec.name} split: use one of {', '.join(spec.files)}")
    return split


def load_task_data(task: str | TaskSpec, path_or_dir: str | Path, split: str = "train") -> list[Example]:
    """Examples of one split from a file, a folder with the canonical file name, or `hub:<name>/<config>`."""
    spec = get_task(task)
    split = _canonical_split(spec, split)
    labeled = split not in _TEST_SPLITS
    if str(path_or_dir).startswith("hub:"):
        return _load_hub(spec, str(path_or_dir)[4:], split, labeled)
    path = Path(path_or_dir)
    if path.is_dir():
        candidates = [path / name for name in spec.files[split]]
        found = [candidate for candidate in candidates if candidate.is_file()]
        require(bool(found), f"folder '{path}' has no {spec.name} {split} file: expected one of "
                f"{', '.join(spec.files[split])}")
        path = found[0]
    return read_task_file(path, spec, labeled=labeled)


def _load_hub(spec: TaskSpec, name: str, split: str, labeled: bool) -> list[Example]:
    """Load a split with `datasets.load_dataset(<dataset>, <config>)`; ids checked against label names."""
    try:
        import datasets
    except ImportError:
        raise BertforgeError(f"hub dataset {name!r} needs the `datasets` package: "
                             "pip install 'bertforge[hub]'") from None
    dataset_name, _, config = name.rpartition("/")
    require(bool(dataset_name) and bool(config), f"hub name {name!r} is not <dataset>/<config>: "
            "write e.g. hub:glue/sst2")
    hub_split = split.replace("dev", "validation")
    data = datasets.load_dataset(dataset_name, config, split=hub_split)
    text_a, text_b = spec.hub_text
    needed = [text_a] + ([text_b] if text_b else []) + [spec.hub_label]
    missing = [column for column in needed if column not in data.column_names]
    require(not missing, f"hub dataset {name!r} lacks column(s) {', '.join(map(repr, missing))}: "
            f"pass the {spec.name} dataset")
    names = getattr(data.features.get(spec.hub_label), "names", None)
    if spec.hub_labels is not None and names is not None:
        require(tuple(names) == spec.hub_labels, f"hub dataset {name!r} has labels {names}, expected "
                f"{list(spec.hub_labels)} for {spec.name}: pass the {spec.name} dataset")
    examples = []
    for index, row in enumerate(data):
        label = row[spec.hub_label]
        if labeled and spec.labels is not None and label == -1 and spec.skip_labels:
            continue  # SNLI/MNLI pair without a gold label
        if labeled:
            valid = spec.labels is None or (isinstance(label, int) and 0 <= label < spec.num_labels)
            require(valid, f"hub dataset {name!r} {hub_split} row {index}: label {label!r} is not a "
                    f"{spec.name} label id: pass the {spec.name} dataset")
            label = float(label) if spec.labels is None else label
        examples.append(Example(row[text_a], row[text_b] if text_b else None, label if labeled else None))
    require(len(examples) > 0, f"hub dataset {name!r} split {hub_split!r} has no examples: pick another split")
    return examples


# ---------------------------------------------------------------------------- QNLI from SQuAD

_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "no", "mt", "ft", "gen",
                            "col", "lt", "sgt", "capt", "prof", "inc", "co", "corp", "ltd", "e.g", "i.e"})
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text`: a break after . ! ? (and closing quotes) before
    whitespace and a capital or digit, except after an abbreviation or a single letter ("U.S.")."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        word = text[start:match.start()].rsplit(None, 1)[-1].rstrip(".").lower() if match.start() > start else ""
        if text[match.start()] == "." and (len(word.rsplit(".", 1)[-1]) <= 1 or word in _ABBREVIATIONS):
            continue
        end = match.start() + len(match.group().rstrip())
        spans.append((start, end))
        start = match.end()
    if text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return spans


def qnli_from_squad(examples) -> list[Example]:
    """QNLI-style pairs built from SQuAD the way GLUE built QNLI: each question is paired with every
    sentence of its context, `entailment` (id 0) for the sentence holding the (first) answer span and
    `not_entailment` (id 1) for the others. GLUE's lexical-overlap filter (threshold unpublished) is not
    applied. A question whose answer crosses a sentence boundary is left out (its pairs would be wrong).

    `examples` are `bertforge.data.squad.SquadExample`s (`read_squad(path)`).
    """
    pairs, sentence_cache = [], {}
    for example in examples:
        require(bool(example.answers), f"SQuAD question {example.id!r} has no answer: pass a labelled SQuAD file")
        spans = sentence_cache.setdefault(example.context, split_sentences(example.context))
        answer = example.answers[0]
        answer_end = answer.answer_start + len(answer.text)
        holding = [s for s, e in spans if s <= answer.answer_start and answer_end <= e]
        if not holding:
            continue
        for start, end in spans:
            label = 0 if start == holding[0] else 1
            pairs.append(Example(example.question, example.context[start:end], label))
    require(bool(pairs), "no QNLI pairs could be built: pass SQuAD examples with answers")
    return pairs
