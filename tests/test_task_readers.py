"""Task readers on real slices of the shared data, hand-made rows in official formats, and bad inputs."""

from __future__ import annotations

import collections
import gzip
import json
import sys
import types
from pathlib import Path

import pytest

from bertforge.data.glue import (
    GLUE_TASKS,
    TASKS,
    Example,
    get_task,
    load_task_data,
    qnli_from_squad,
    read_task_file,
)
from bertforge.data.multiple_choice import (
    ChoiceCountBatchSampler,
    collate_choices,
    featurize_choices,
    read_arc,
    read_choice_file,
    read_swag,
    read_winogrande,
)
from bertforge.data.pairs import nli_triplets, read_nli_pairs, read_scored_pairs
from bertforge.data.squad import read_squad
from bertforge.errors import BertforgeError
from bertforge.wordpiece import WordPieceTokenizer


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    return WordPieceTokenizer.from_pretrained(shared_data / "all-MiniLM-L6-v2")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- GLUE on real data

def test_sst2_dev(shared_data):
    examples = load_task_data("sst2", shared_data / "sst2", "validation")
    lines = (shared_data / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(examples) == 872
    assert examples[0] == Example("it 's a charming and often affecting journey . ", None, 1)
    assert sum(e.label for e in examples) == sum(line.endswith("\t1") for line in lines)


def test_cola_headerless(shared_data):
    dev = load_task_data("cola", shared_data / "cola", "dev")  # val.tsv
    assert len(dev) == 1301 and len(load_task_data("cola", shared_data / "cola", "train")) == 7250
    assert dev[0] == Example("Bill broke the bathtub.", None, 1)
    assert dev[2] == Example("The car honked down the road.", None, 0)  # mark '*' -> unacceptable


def test_rte_header_and_headerless(shared_data):
    train = read_task_file(shared_data / "rte" / "train.tsv", "rte")
    val = read_task_file(shared_data / "rte" / "val.tsv", "rte")  # same columns, no header
    assert (len(train), len(val)) == (2127, 363)
    assert train[0] == Example("No Weapons of Mass Destruction Found in Iraq Yet.",
                               "Weapons of Mass Destruction Found in Iraq.", 1)
    assert val[0].text_b == "Herceptin can be used to treat breast cancer." and val[0].label == 0
    assert {e.label for e in train} == {0, 1}


def test_mrpc_bom_file_and_split(shared_data):
    full = read_task_file(shared_data / "mrpc" / "msr_paraphrase_train.txt", "mrpc")  # UTF-8 BOM
    train = load_task_data("mrpc", shared_data / "mrpc", "train")  # train.tsv wins over the MSR file
    dev = load_task_data("mrpc", shared_data / "mrpc", "dev")
    assert (len(full), len(train), len(dev)) == (4076, 3668, 408)
    assert full == train + dev
    assert full[0].text_a.startswith("Amrozi accused his brother") and full[0].label == 1 and full[1].label == 0


def test_stsb_scores(shared_data):
    dev = load_task_data("stsb", shared_data / "stsb", "dev")
    assert len(dev) == 1500 and get_task("STS-B").is_regression
    assert dev[0] == Example("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert dev[1].label == 4.75 and all(0.0 <= e.label <= 5.0 for e in dev)


def test_snli_jsonl_and_tsv(shared_data):
    jsonl = load_task_data("snli", shared_data / "snli", "dev")  # snli_1.0_dev.jsonl, '-' skipped
    assert len(jsonl) == 1289 - 16
    assert collections.Counter(e.label for e in jsonl) == {0: 433, 1: 421, 2: 419}
    tsv = read_task_file(shared_data / "snli" / "dev_full.tsv", "snli")
    assert collections.Counter(e.label for e in tsv) == {0: 3329, 2: 3278, 1: 3235}


def test_sick_entailment_and_relatedness(shared_data):
    train = load_task_data("sick", shared_data / "sick", "train")
    assert collections.Counter(e.label for e in train) == {0: 1274, 1: 2524, 2: 641}
    trial = load_task_data("sick_relatedness", shared_data / "sick", "dev")
    assert len(trial) == 495 and trial[0].label == 3.6 and all(1.0 <= e.label <= 5.0 for e in trial)


def test_task_table_covers_glue():
    assert set(GLUE_TASKS) <= set(TASKS)
    assert TASKS["mnli"].num_labels == 3 and "dev_matched" in TASKS["mnli"].files
    assert TASKS["mrpc"].metrics == ("accuracy", "f1") and TASKS["cola"].metrics == ("matthews_correlation",)
    assert TASKS["stsb"].num_labels == 1


# ---------------------------------------------------------------------------- hand-made official rows

MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n")


def test_mnli_tsv_folder_and_jsonl(tmp_path):
    row = "0\t63735\t63735n\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{}\t{}\tneutral\tentailment\tneutral\tneutral\tneutral\t{}\n"
    write(tmp_path / "dev_matched.tsv", MNLI_HEADER + row.format('He said "hi.', "It's late.", "neutral")
          + row.format("A b", "C d", "-") + row.format("E f", "G h", "contradiction"))
    examples = load_task_data("mnli", tmp_path, "validation_matched")
    assert examples == [Example('He said "hi.', "It's late.", 1), Example("E f", "G h", 2)]
    with pytest.raises(BertforgeError, match="split 'dev' is not a mnli split: use one of train, dev_matched"):
        load_task_data("mnli", tmp_path, "dev")
    records = [{"annotator_labels": ["entailment"], "genre": "fiction", "gold_label": "entailment", "pairID": "1e",
                "promptID": "1", "sentence1": "The cat sat.", "sentence2": "A cat is sitting."},
               {"gold_label": "-", "sentence1": "x", "sentence2": "y"}]
    with gzip.open(tmp_path / "multinli_1.0_dev_mismatched.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in records) + "\n")
    jsonl = read_task_file(tmp_path / "multinli_1.0_dev_mismatched.jsonl.gz", "mnli")
    assert jsonl == [Example("The cat sat.", "A cat is sitting.", 0)]


def test_snli_official_txt(tmp_path):
    header = ("gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
              "sentence1\tsentence2\tcaptionID\tpairID\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\n")
    rows = ("neutral\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tTwo women are embracing.\tThe sisters are hugging.\t"
            "4705552913.jpg#2\t4705552913.jpg#2r1n\tneutral\tentailment\tneutral\tneutral\tneutral\n"
            "-\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tx\ty\tc\tp\tneutral\tcontradiction\t\t\t\n")
    write(tmp_path / "snli_1.0_dev.txt", header + rows)
    assert load_task_data("snli", tmp_path, "dev") == [Example("Two women are embracing.", "The sisters are hugging.", 1)]


def test_qqp_qnli_wnli_rows(tmp_path):
    qqp = write(tmp_path / "qqp.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                "201359\t303345\t303346\tWhy are African-Americans so beautiful?\tWhy are hispanics so beautiful?\t0\n"
                '5\t11\t12\t"What is x?\tWhat\'s "x"?\t1\n')  # unbalanced quote opening a field
    assert read_task_file(qqp, "qqp") == [
        Example("Why are African-Americans so beautiful?", "Why are hispanics so beautiful?", 0),
        Example('"What is x?', 'What\'s "x"?', 1)]
    qnli = write(tmp_path / "qnli.tsv", "index\tquestion\tsentence\tlabel\n"
                 "0\tWhat came into force after the new constitution was herald?\tAs of that day, the new constitution "
                 "heralding the Second Republic came into force.\tentailment\n1\tq?\ts.\tnot_entailment\n")
    assert [e.label for e in read_task_file(qnli, "qnli")] == [0, 1]
    wnli = write(tmp_path / "wnli.tsv", "index\tsentence1\tsentence2\tlabel\n"
                 "0\tI stuck a pin through a carrot. When I pulled the pin out, it had a hole.\tThe carrot had a hole.\t1\n")
    assert read_task_file(wnli, "wnli")[0].label == 1
    write(tmp_path / "test.tsv", "index\tsentence1\tsentence2\n0\ta\tb\n")
    assert load_task_data("wnli", tmp_path, "test") == [Example("a", "b", None)]


def test_qnli_from_squad(shared_data):
    examples = read_squad(shared_data / "squad" / "dev-from-train-v1.1.json")[:400]
    pairs = qnli_from_squad(examples)
    by_question = collections.defaultdict(list)
    for pair in pairs:
        by_question[pair.text_a].append(pair)
    assert len(by_question) >= 0.97 * len({e.question for e in examples})
    answers = {e.question: e.answers[0].text for e in examples}
    for question, group in by_question.items():
        positives = [p for p in group if p.label == 0]
        assert len(positives) >= 1 and all(answers[question] in p.text_b for p in positives)
    assert 0.1 < sum(p.label == 0 for p in pairs) / len(pairs) < 0.5


# ---------------------------------------------------------------------------- hub loading

def fake_datasets(rows, columns, names):
    class Data(list):
        column_names = columns
        features = {"label": types.SimpleNamespace(names=names)}

    module = types.ModuleType("datasets")
    module.calls = []

    def load_dataset(name, config, split):
        module.calls.append((name, config, split))
        return Data(rows)

    module.load_dataset = load_dataset
    return module


def test_hub_loading(monkeypatch):
    rows = [{"sentence": "good", "label": 1, "idx": 0}, {"sentence": "bad", "label": 0, "idx": 1}]
    module = fake_datasets(rows, ["sentence", "label", "idx"], ["negative", "positive"])
    monkeypatch.setitem(sys.modules, "datasets", module)
    assert load_task_data("sst2", "hub:glue/sst2", "dev") == [Example("good", None, 1), Example("bad", None, 0)]
    assert module.calls == [("glue", "sst2", "validation")]
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(rows, ["sentence", "label"], ["pos", "neg"]))
    with pytest.raises(BertforgeError, match="has labels"):
        load_task_data("sst2", "hub:glue/sst2", "train")
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(rows, ["text", "label"], None))
    with pytest.raises(BertforgeError, match="lacks column\\(s\\) 'sentence'"):
        load_task_data("sst2", "hub:glue/sst2", "train")


def test_hub_nli_skips_unlabeled_and_test_has_no_labels(monkeypatch):
    rows = [{"premise": "p", "hypothesis": "h", "label": 2}, {"premise": "q", "hypothesis": "i", "label": -1}]
    module = fake_datasets(rows, ["premise", "hypothesis", "label"], ["entailment", "neutral", "contradiction"])
    monkeypatch.setitem(sys.modules, "datasets", module)
    assert load_task_data("mnli", "hub:nyu-mll/glue/mnli", "validation_mismatched") == [Example("p", "h", 2)]
    assert module.calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert [e.label for e in load_task_data("snli", "hub:stanfordnlp/snli/plain_text", "test")] == [None, None]


def test_hub_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(BertforgeError, match=r"pip install 'bertforge\[hub\]'"):
        load_task_data("sst2", "hub:glue/sst2", "dev")


# ---------------------------------------------------------------------------- bad inputs

def test_glue_bad_inputs(tmp_path, shared_data):
    with pytest.raises(BertforgeError, match="unknown task 'glu': use one of cola, sst2, mrpc"):
        get_task("glu")
    with pytest.raises(BertforgeError, match="lacks column\\(s\\) 'sentence2'"):
        read_task_file(write(tmp_path / "a.tsv", "index\tsentence1\tlabel\n0\tx\tentailment\n"), "rte")
    with pytest.raises(BertforgeError, match=r"b.tsv:3: label 'maybe' is not a rte label"):
        read_task_file(write(tmp_path / "b.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
                             "1\tc\td\tmaybe\n"), "rte")
    with pytest.raises(BertforgeError, match="is empty"):
        read_task_file(write(tmp_path / "c.tsv", ""), "sst2")
    with pytest.raises(BertforgeError, match="has no labeled data rows"):
        read_task_file(write(tmp_path / "d.tsv", "sentence\tlabel\n"), "sst2")
    with pytest.raises(BertforgeError, match=r"e.tsv:2: 3 tab-separated fields, expected 2"):
        read_task_file(write(tmp_path / "e.tsv", "sentence\tlabel\nx\t1\textra\n"), "sst2")
    with pytest.raises(BertforgeError, match="no header naming 'sentence' and 3 columns instead of the 4"):
        read_task_file(write(tmp_path / "f.tsv", "gj04\t1\tBill.\n"), "cola")
    with pytest.raises(BertforgeError, match="score 'high' is not a number"):
        read_task_file(write(tmp_path / "g.tsv", "sentence1\tsentence2\tscore\na\tb\thigh\n"), "stsb")
    with pytest.raises(BertforgeError, match="h.jsonl:1: not valid JSON"):
        read_task_file(write(tmp_path / "h.jsonl", "{oops\n"), "mnli")
    with pytest.raises(BertforgeError, match="record lacks key\\(s\\) 'gold_label'"):
        read_task_file(write(tmp_path / "i.jsonl", '{"sentence1": "a", "sentence2": "b"}\n'), "snli")
    with pytest.raises(BertforgeError, match="does not exist"):
        read_task_file(tmp_path / "missing.tsv", "sst2")
    with pytest.raises(BertforgeError, match="has no qqp train file: expected one of train.tsv"):
        load_task_data("qqp", shared_data / "arc", "train")


# ---------------------------------------------------------------------------- multiple choice

SWAG_CSV = (
    ",video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label\n"
    '0,anetv_jkn6uvmqwh4,3416,"Members of the procession walk down the street holding small horn brass '
    'instruments. A drum line","Members of the procession walk down the street holding small horn brass '
    'instruments.",A drum line,gold,passes by walking down the street playing their instruments.,has heard '
    "approaching them.,\"arrives and they're outside dancing, asleep.\",turns the lead singer watches the "
    "performance.,0\n"
)


def test_swag_csv(tmp_path):
    (example,) = read_choice_file("swag", write(tmp_path / "train.csv", SWAG_CSV))
    assert example.context.startswith("Members of the procession") and example.label == 0
    assert example.endings[2] == "A drum line arrives and they're outside dancing, asleep."
    assert len(example.endings) == 4 and example.id == "3416"
    unlabeled = SWAG_CSV.replace(",label\n", "\n").replace("performance.,0\n", "performance.\n")
    assert read_swag(write(tmp_path / "test.csv", unlabeled), labeled=False)[0].label is None
    with pytest.raises(BertforgeError, match="lacks column\\(s\\) 'label'"):
        read_swag(tmp_path / "test.csv")


def test_arc(shared_data):
    examples = read_arc(shared_data / "arc" / "ARC-Easy-Train.jsonl")
    assert len(examples) == 2251
    assert collections.Counter(len(e.endings) for e in examples) == {4: 2241, 3: 6, 5: 4}
    lines = (shared_data / "arc" / "ARC-Easy-Train.jsonl").read_text(encoding="utf-8").splitlines()
    for line, example in zip(lines, examples):
        record = json.loads(line)
        keys = [c["label"] for c in record["question"]["choices"]]
        assert keys[example.label] == record["answerKey"] and example.context == record["question"]["stem"]
    assert {json.loads(line)["answerKey"] for line in lines} >= {"1", "A", "E"}


def test_winogrande_split_at_blank(shared_data):
    path = shared_data / "winogrande" / "train_l.jsonl"
    examples = read_winogrande(path)
    answers = (shared_data / "winogrande" / "train_l-labels.lst").read_text().split()
    assert len(examples) == 10234 and [str(e.label + 1) for e in examples] == answers
    first = examples[0]
    assert first.context == "Ian volunteered to eat Dennis's menudo after already having a bowl because "
    assert first.endings == ("Ian despised eating intestine.", "Dennis despised eating intestine.")
    assert first.label == 1 and first.id == "3QHITW7OYO7Q6B6ISU2UMJB84ZLAQE-2"


def test_choice_bad_inputs(tmp_path):
    with pytest.raises(BertforgeError, match="has 0 blanks '_', expected exactly 1"):
        read_winogrande(write(tmp_path / "w.jsonl", '{"sentence": "no blank", "option1": "a", "option2": "b", '
                              '"answer": "1"}\n'))
    with pytest.raises(BertforgeError, match="w2.jsonl:1: answer '3' is not '1' or '2'"):
        read_winogrande(write(tmp_path / "w2.jsonl", '{"sentence": "a _ b", "option1": "a", "option2": "b", '
                              '"answer": "3"}\n'))
    arc = {"id": "x", "question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
           "answerKey": "C"}
    with pytest.raises(BertforgeError, match="answerKey 'C' is not one of the choice labels"):
        read_arc(write(tmp_path / "a.jsonl", json.dumps(arc) + "\n"))
    with pytest.raises(BertforgeError, match="unknown multiple-choice task 'hellaswag'"):
        read_choice_file("hellaswag", tmp_path / "a.jsonl")
    with pytest.raises(BertforgeError, match="has no examples"):
        read_arc(write(tmp_path / "empty.jsonl", "\n"))


def test_featurize_collate_and_batch_by_choice_count(shared_data, tokenizer):
    examples = read_arc(shared_data / "arc" / "ARC-Easy-Train.jsonl")
    picked = [e for e in examples if len(e.endings) != 4][:6] + examples[:10]
    features = featurize_choices(picked, tokenizer, max_length=32)
    for example, feature in zip(picked, features):
        assert feature.num_choices == len(example.endings) and feature.label == example.label
        lengths = {len(row) for row in feature.input_ids}
        assert len(lengths) == 1 and lengths.pop() <= 32
        for ids, types_, mask, ending in zip(feature.input_ids, feature.token_type_ids, feature.attention_mask,
                                             example.endings):
            real = ids[:sum(mask)]
            assert real[0] == tokenizer.cls_token_id and real[-1] == tokenizer.sep_token_id
            ending_ids = tokenizer.backend.encode(ending, add_special_tokens=False).ids
            second = [i for i, t in zip(real, types_) if t == 1][:-1]  # drop the final [SEP]
            assert ending_ids[:len(second)] == second
    sampler = ChoiceCountBatchSampler(features, batch_size=4, shuffle=True, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(features))) and len(sampler) == len(batches)
    for batch in batches:
        collated = collate_choices([features[i] for i in batch], tokenizer.pad_token_id)
        count = features[batch[0]].num_choices
        assert collated["input_ids"].shape[:2] == (len(batch), count)
        assert collated["input_ids"].shape == collated["attention_mask"].shape == collated["token_type_ids"].shape
        assert collated["labels"].tolist() == [features[i].label for i in batch]
    with pytest.raises(BertforgeError, match="batch mixes choice counts"):
        collate_choices(features[:8], tokenizer.pad_token_id)


# ---------------------------------------------------------------------------- sentence pairs

def test_nli_pairs_and_triplets(shared_data):
    snli = read_nli_pairs(shared_data / "snli" / "snli_1.0_dev.jsonl")
    assert len(snli) == 1273 and read_nli_pairs(shared_data / "snli" / "dev_full.tsv")[1].label == 0
    sick = read_nli_pairs(shared_data / "sick" / "SICK_trial.txt")
    assert len(sick) == 495 and sick[0].label == 2  # CONTRADICTION
    triplets = nli_triplets(snli, seed=0)
    labels = {(p.premise, p.hypothesis): p.label for p in snli}
    for t in triplets:
        assert labels[(t.anchor, t.positive)] == 0 and labels[(t.anchor, t.negative)] == 2
    with_both = {p.premise for p in snli if p.label == 2} & {p.premise for p in snli if p.label == 0}
    assert {t.anchor for t in triplets} == with_both
    assert len(triplets) == len({(p.premise, p.hypothesis) for p in snli if p.label == 0 and p.premise in with_both})
    assert nli_triplets(snli, seed=0) == triplets


def test_scored_pairs(shared_data, tmp_path):
    stsb = read_scored_pairs(shared_data / "stsb" / "dev.tsv")
    assert stsb[0].score == 1.0 and stsb[1].score == pytest.approx(4.75 / 5)
    sick = read_scored_pairs(shared_data / "sick" / "SICK_train.txt")
    assert len(sick) == 4439 and all(0.0 <= p.score <= 1.0 for p in sick)
    assert read_scored_pairs(shared_data / "sick" / "SICK_trial.txt")[0].score == pytest.approx((3.6 - 1) / 4)
    with pytest.raises(BertforgeError, match="score 7.0 is outside \\[0, 5\\]"):
        read_scored_pairs(write(tmp_path / "s.tsv", "sentence1\tsentence2\tscore\na\tb\t7\n"))
    with pytest.raises(BertforgeError, match="is not a scored-pair file"):
        read_scored_pairs(shared_data / "sst2" / "dev.tsv")
    with pytest.raises(BertforgeError, match="is not an NLI file"):
        read_nli_pairs(shared_data / "sst2" / "dev.tsv")
