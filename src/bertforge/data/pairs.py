"""Sentence-pair data for Sentence-BERT training and evaluation.

- `read_nli_pairs(path)`: labelled NLI pairs `NLIPair(premise, hypothesis, label)` with label ids of
  `NLI_LABELS` (entailment 0, neutral 1, contradiction 2) from SNLI/MultiNLI JSONL, SNLI/MNLI TSV
  (official `snli_1.0_*.txt`, GLUE-style or `sentence1 sentence2 gold_label`) or SICK
  (`sentence_A`, `sentence_B`, `entailment_label`). Pairs without a gold label (`-`) are skipped.
- `nli_triplets(pairs)`: `Triplet(anchor, positive, negative)` for MultipleNegativesRanking-style
  training, built as in sentence-transformers' `training_nli_v2.py`: per premise, every entailed
  hypothesis is a positive and one of the premise's contradicted hypotheses (picked with a seeded
  RNG, so the result is reproducible) its hard negative; premises lacking either give no triplet.
- `read_scored_pairs(path)`: `ScoredPair(text_a, text_b, score)` from STS-B (score in [0, 5]) or SICK
  relatedness ([1, 5]), the score mapped linearly to [0, 1]; a score outside the range is an error.

The file format is recognised from the extension (`.jsonl`) or the header row; the parsing itself is
`bertforge.data.glue.read_task_file`, so the same quirks (QUOTE_NONE, BOM, gzip) are handled.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bertforge.data.glue import TASKS, TaskSpec, open_text, read_task_file
from bertforge.errors import BertforgeError, require

__all__ = ["NLI_LABELS", "NLIPair", "ScoredPair", "Triplet", "nli_triplets", "read_nli_pairs", "read_scored_pairs"]

NLI_LABELS = ("entailment", "neutral", "contradiction")
_SCORE_RANGES = {"stsb": (0.0, 5.0), "sick_relatedness": (1.0, 5.0)}


@dataclass(frozen=True)
class NLIPair:
    premise: str
    hypothesis: str
    label: int  # index into NLI_LABELS


@dataclass(frozen=True)
class Triplet:
    anchor: str
    positive: str
    negative: str


@dataclass(frozen=True)
class ScoredPair:
    text_a: str
    text_b: str
    score: float  # similarity in [0, 1]


def _header(path: Path) -> list[str]:
    require(path.is_file(), f"pair file '{path}' does not exist: pass an existing file")
    with open_text(path) as handle:
        return [cell.strip() for cell in handle.readline().rstrip("\r\n").split("\t")]


def _nli_spec(path: Path) -> TaskSpec:
    if ".jsonl" in path.suffixes:
        return TASKS["snli"]
    header = _header(path)
    if "sentence_A" in header and "entailment_label" in header:
        return TASKS["sick"]
    if "sentence1" in header and "gold_label" in header:
        return TASKS["snli"]
    raise BertforgeError(f"'{path}' is not an NLI file: expected a .jsonl file or a TSV header with "
                         "sentence1, sentence2, gold_label (SNLI/MNLI) or sentence_A, sentence_B, entailment_label (SICK)")


def read_nli_pairs(path: str | Path) -> list[NLIPair]:
    """Gold-labelled NLI pairs of an SNLI/MNLI (JSONL or TSV) or SICK file."""
    path = Path(path)
    spec = _nli_spec(path)
    return [NLIPair(e.text_a, e.text_b, e.label) for e in read_task_file(path, spec)]


def nli_triplets(pairs: Sequence[NLIPair], *, seed: int = 0) -> list[Triplet]:
    """(premise, entailed hypothesis, contradicted hypothesis) triplets, premises in first-seen order."""
    entailment, contradiction = NLI_LABELS.index("entailment"), NLI_LABELS.index("contradiction")
    by_premise: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
    for pair in pairs:
        positives, negatives = by_premise.setdefault(pair.premise, ({}, {}))
        if pair.label == entailment:
            positives[pair.hypothesis] = None  # dict as an ordered set
        elif pair.label == contradiction:
            negatives[pair.hypothesis] = None
    rng = random.Random(seed)
    triplets = [
        Triplet(premise, positive, rng.choice(list(negatives)))
        for premise, (positives, negatives) in by_premise.items() if negatives
        for positive in positives
    ]
    require(bool(triplets), "no premise has both an entailed and a contradicted hypothesis: "
            "pass NLI pairs with entailment and contradiction labels")
    return triplets


def read_scored_pairs(path: str | Path) -> list[ScoredPair]:
    """Similarity-scored pairs of an STS-B or SICK file, scores mapped to [0, 1]."""
    path = Path(path)
    header = _header(path)
    if "relatedness_score" in header:
        spec = TASKS["sick_relatedness"]
    elif "score" in header and "sentence1" in header:
        spec = TASKS["stsb"]
    else:
        raise BertforgeError(f"'{path}' is not a scored-pair file: expected an STS-B header (sentence1, "
                             "sentence2, score) or a SICK header (sentence_A, sentence_B, relatedness_score)")
    low, high = _SCORE_RANGES[spec.name]
    pairs = []
    for row, example in enumerate(read_task_file(path, spec), start=1):
        require(low <= example.label <= high, f"'{path}' data row {row}: {spec.label} {example.label} is outside "
                f"[{low:g}, {high:g}]: fix that row or pass an {spec.name} file")
        pairs.append(ScoredPair(example.text_a, example.text_b, (example.label - low) / (high - low)))
    return pairs
