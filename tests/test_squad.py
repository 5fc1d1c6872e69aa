"""SQuAD reader, sliding windows and offsets on real contexts, and n-best post-processing."""

from __future__ import annotations

import gzip
import json
import unicodedata

import numpy as np
import pytest

from bertforge.data.squad import (
    SquadAnswer,
    SquadExample,
    collate_qa,
    featurize_squad,
    gold_answers,
    postprocess_qa_predictions,
    read_squad,
    write_predictions,
)
from bertforge.errors import BertforgeError
from bertforge.eval.metrics import squad_metrics
from bertforge.wordpiece import WordPieceTokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(shared_data):
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizerFast.from_pretrained(str(shared_data / "all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    return WordPieceTokenizer.from_pretrained(shared_data / "all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def dev(shared_data):
    return read_squad(shared_data / "squad" / "dev-from-train-v1.1.json")


def _strip_accents_lower(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")


def test_read_squad_json_and_gz(shared_data, tmp_path, dev):
    assert len(dev) == 3556 and len({e.title for e in dev}) == 22
    assert dev[0].id == "train-420-000-00" and dev[0].answers == (SquadAnswer("Latin", 13),)
    document = json.loads((shared_data / "squad" / "dev-from-train-v1.1.json").read_text(encoding="utf-8"))
    document["data"] = document["data"][:2]
    with gzip.open(tmp_path / "part.json.gz", "wt", encoding="utf-8") as handle:
        json.dump(document, handle)
    part = read_squad(tmp_path / "part.json.gz")
    assert part == dev[:len(part)] and part[-1].title != part[0].title
    assert gold_answers(part[:1]) == {"train-420-000-00": ["Latin"]}


def test_windows_match_hf_overflow_and_offsets(dev, tokenizer, hf_tokenizer):
    example = max(dev, key=lambda e: len(e.context))
    features = featurize_squad([example], tokenizer, max_length=96, doc_stride=24, max_query_length=64)
    hf = hf_tokenizer(example.question.lstrip(), example.context, truncation="only_second", max_length=96, stride=24,
                      return_overflowing_tokens=True, return_offsets_mapping=True)
    assert len(features) == len(hf["input_ids"]) >= 5
    for k, feature in enumerate(features):
        assert feature.input_ids == hf["input_ids"][k] and feature.token_type_ids == hf["token_type_ids"][k]
        sequence_ids = hf.sequence_ids(k)
        hf_offsets = [tuple(o) if s == 1 else None for o, s in zip(hf["offset_mapping"][k], sequence_ids)]
        assert feature.offset_mapping == hf_offsets
        for token_id, span in zip(feature.input_ids, feature.offset_mapping):
            if span is not None:  # the offsets point at the characters the token spells
                piece = hf_tokenizer.convert_ids_to_tokens(token_id).removeprefix("##")
                assert piece == "[UNK]" or _strip_accents_lower(example.context[span[0]:span[1]]) == piece
    context_spans = [[s for s in f.offset_mapping if s is not None] for f in features]
    for previous, following in zip(context_spans, context_spans[1:]):
        assert previous[-24:] == following[:24]  # doc_stride = tokens shared by neighbours
    assert context_spans[0][0][0] == 0 and context_spans[-1][-1][1] == len(example.context.rstrip())
    holding = [f for f in features if f.start_position != 0]
    assert holding, "the answer lies in at least one window"
    answer = example.answers[0]
    for feature in features:
        if feature.start_position == 0:
            assert feature.end_position == 0
            continue
        span = feature.offset_mapping[feature.start_position][0], feature.offset_mapping[feature.end_position][1]
        assert span[0] <= answer.answer_start and answer.answer_start + len(answer.text) <= span[1]


def _aligned(example: SquadExample, tokenizer, cache: dict) -> bool:
    """Whether the first answer starts and ends on token boundaries (else no span can equal it)."""
    if example.context not in cache:
        offsets = tokenizer.backend.encode(example.context, add_special_tokens=False).offsets
        cache[example.context] = {a for a, _ in offsets}, {b for _, b in offsets}
    starts, ends = cache[example.context]
    answer = example.answers[0]
    return answer.answer_start in starts and answer.answer_start + len(answer.text) in ends


def test_gold_logits_recover_gold_spans_over_windows(dev, tokenizer):
    examples = dev[:1500]
    features = featurize_squad(examples, tokenizer, max_length=128, doc_stride=32, max_query_length=64)
    rng = np.random.default_rng(0)
    start = rng.normal(size=(len(features), 140)).astype(np.float32)  # (N, T) noise, T > longest window
    end = rng.normal(size=(len(features), 140)).astype(np.float32)
    windows, answered = np.zeros(len(examples), dtype=int), np.zeros(len(examples), dtype=bool)
    for row, feature in enumerate(features):
        start[row, len(feature.input_ids):] = end[row, len(feature.input_ids):] = 1e3  # padding: must be ignored
        windows[feature.example_index] += 1
        if feature.start_position != 0:
            start[row, feature.start_position] += 10.0
            end[row, feature.end_position] += 10.0
            answered[feature.example_index] = True
    predictions = postprocess_qa_predictions(examples, features, start, end, n_best_size=20, max_answer_length=128)
    cache = {}
    checked = [i for i, e in enumerate(examples) if answered[i] and _aligned(e, tokenizer, cache)]
    assert len(checked) >= 0.97 * len(examples)
    assert (windows[checked] > 1).sum() > 500  # many answers decoded across several windows
    first_window = {}
    for feature in features:
        first_window.setdefault(feature.example_index, feature)
    later = [i for i in checked if first_window[i].start_position == 0]
    assert len(later) > 100  # answer absent from the first window, found in a later one
    for i in checked:
        assert predictions[examples[i].id] == examples[i].answers[0].text
    references = gold_answers([examples[i] for i in checked])
    assert squad_metrics({k: predictions[k] for k in references}, references) == {"exact_match": 100.0, "f1": 100.0}


def _one_window(tokenizer, context="alpha beta gamma delta epsilon zeta"):
    example = SquadExample("q", "t", "which?", context, (SquadAnswer("beta", 6),))
    (feature,) = featurize_squad([example], tokenizer, max_length=32, doc_stride=8)
    first = feature.offset_mapping.index((0, 5))  # "alpha"
    return example, feature, first


def test_max_answer_length_and_n_best(tokenizer):
    example, feature, first = _one_window(tokenizer)
    assert feature.offset_mapping[first + 1] == (6, 10) and (feature.start_position, feature.end_position) == (
        first + 1, first + 1)
    start, end = np.zeros((1, 32)), np.zeros((1, 32))
    start[0, first] = 10.0  # "alpha"
    end[0, first + 4] = 10.0  # "epsilon": a 5-token span
    end[0, first + 1] = 5.0  # "beta"
    assert postprocess_qa_predictions([example], [feature], start, end)["q"] == "alpha beta gamma delta epsilon"
    limited = postprocess_qa_predictions([example], [feature], start, end, max_answer_length=3)
    assert limited["q"] == "alpha beta"
    start, end = np.zeros((1, 32)), np.zeros((1, 32))
    start[0, first + 3] = 10.0  # best start after the best end
    end[0, first + 1] = 10.0
    end[0, first + 5] = 1.0
    assert postprocess_qa_predictions([example], [feature], start, end, n_best_size=1)["q"] == ""
    assert postprocess_qa_predictions([example], [feature], start, end, n_best_size=2)["q"] == "delta epsilon zeta"
    start[0, 0] = end[0, 0] = 100.0  # [CLS] is never an answer
    assert postprocess_qa_predictions([example], [feature], start, end)["q"] == "delta epsilon zeta"


def test_unlabeled_collate_and_write(tokenizer, tmp_path):
    example, feature, first = _one_window(tokenizer)
    unlabeled = SquadExample("u", "t", "q", example.context, ())
    features = featurize_squad([example, unlabeled], tokenizer, max_length=32, doc_stride=8)
    assert (features[1].start_position, features[1].end_position) == (0, 0)
    batch = collate_qa(features, tokenizer.pad_token_id)
    longest = max(len(f.input_ids) for f in features)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, longest)
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(f.input_ids) for f in features]
    assert batch["start_positions"].tolist() == [first + 1, 0]
    write_predictions({"q": "beta", "u": "ünïcode"}, tmp_path / "predictions.json")
    assert json.loads((tmp_path / "predictions.json").read_text(encoding="utf-8")) == {"q": "beta", "u": "ünïcode"}


def test_squad_errors(tokenizer, tmp_path, dev):
    bad = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "one two three", "qas": [
        {"id": "a", "question": "q?", "answers": [{"answer_start": 0, "text": "two"}]}]}]}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(BertforgeError, match="answer 'two' of question 'a' is not at answer_start 0"):
        read_squad(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]", encoding="utf-8")
    with pytest.raises(BertforgeError, match="no top-level 'data' list"):
        read_squad(tmp_path / "list.json")
    with pytest.raises(BertforgeError, match="doc_stride 40 must be smaller than the"):
        featurize_squad(dev[:1], tokenizer, max_length=48, doc_stride=40)
    features = featurize_squad(dev[:2], tokenizer, max_length=64, doc_stride=16)
    logits = np.zeros((len(features), 64))
    with pytest.raises(BertforgeError, match="pass the examples the features were built from"):
        postprocess_qa_predictions(dev[1:3], features, logits, logits)
    with pytest.raises(BertforgeError, match="one row of start and end logits per feature"):
        postprocess_qa_predictions(dev[:2], features, logits[:1], logits[:1])
