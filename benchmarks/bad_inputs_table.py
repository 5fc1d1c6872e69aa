"""Bad inputs across every `bertforge` command, and the one-line error each gives.

    python benchmarks/bad_inputs_table.py --out bad_inputs.md     # writes | command | bad input | error line |

`CASES` is the single list of cases: `tests/test_bad_inputs.py` imports it and asserts, for every
case, exit status 2, exactly one `error:` line on stderr, no traceback, and the substrings that name
the input. Each case is a function that writes its bad input under a fresh folder and returns the
argv plus those substrings; the shared good inputs (a tokenizer, 32-token shards, a tiny masked-LM
and a tiny classifier) come from `build_fixtures`, which takes a few seconds on one CPU core.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WORDS = ("the small cat sees a green river . the old dog likes a quiet house . "
         "a tall tree finds the happy bird . the green river helps an old man .").split()


@dataclass(frozen=True)
class Fixtures:
    """Good inputs shared by the cases (never modified: cases copy what they break)."""

    root: Path
    corpus: Path  # a few hundred words of plain text
    tokenizer: Path  # WordPiece folder trained on the corpus
    shards: Path  # `bertforge prepare` output, 32-token packed rows, train + val
    mlm: Path  # tiny random BertForMaskedLM, 128 positions, with the tokenizer
    classifier: Path  # tiny random sequence classifier (sst2, 2 labels), with the tokenizer
    sst2_tsv: Path  # a valid sst2 file (sentence, label)
    stsb_tsv: Path  # a valid STS-B file (sentence1, sentence2, score)


def build_fixtures(root: Path) -> Fixtures:
    """Write the shared good inputs under `root` (a few seconds)."""
    import torch

    from bertforge.data.corpus import CorpusLines
    from bertforge.data.shards import PrepareConfig, prepare
    from bertforge.model.bert import BertConfig, pad_vocab_size
    from bertforge.model.heads import BertForMaskedLM, BertForSequenceClassification
    from bertforge.model.loading import save_model
    from bertforge.wordpiece import train_wordpiece

    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    docs = [" ".join(WORDS[i % 8:] + WORDS[:i % 8]) for i in range(40)]
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    tok = train_wordpiece(CorpusLines(corpus), vocab_size=120, show_progress=False)
    tok.save(root / "tok")
    prepare(PrepareConfig(sources=[str(corpus)], output=str(root / "shards"), tokenizer=str(root / "tok"),
                          seq_len=32, val_fraction=0.1, num_workers=0, show_progress=False))
    torch.manual_seed(0)
    cfg = BertConfig.from_preset("tiny", vocab_size=pad_vocab_size(tok.vocab_size), max_position_embeddings=128)
    save_model(BertForMaskedLM(cfg), root / "mlm", tokenizer=tok)
    save_model(BertForSequenceClassification(cfg, num_labels=2), root / "clf", tokenizer=tok,
               meta={"task": "sst2"})
    sst2 = root / "sst2.tsv"
    sst2.write_text("sentence\tlabel\nthe cat sees a river .\t1\nthe old dog .\t0\n", encoding="utf-8")
    stsb = root / "stsb.tsv"
    stsb.write_text("sentence1\tsentence2\tscore\nthe cat .\ta cat .\t4.5\nthe dog .\ta tree .\t0.5\n"
                    "the old man .\tthe man .\t3.0\n", encoding="utf-8")
    return Fixtures(root, corpus, root / "tok", root / "shards", root / "mlm", root / "clf", sst2, stsb)


# ----------------------------------------------------------------------------- the cases

CaseResult = tuple[list, list[str]]  # (argv, substrings the error line must contain)


@dataclass(frozen=True)
class Case:
    id: str
    command: str
    bad_input: str
    make: Callable[[Fixtures, Path], CaseResult]  # (fixtures, a fresh empty folder) -> argv, needles


CASES: list[Case] = []


def case(command: str, bad_input: str):
    """Register the decorated `make(fx, tmp)` function as a case."""
    def register(make: Callable[[Fixtures, Path], CaseResult]) -> Callable:
        CASES.append(Case(make.__name__, command, bad_input, make))
        return make
    return register


def copy_model(src: Path, tmp: Path) -> Path:
    dst = tmp / "model"
    shutil.copytree(src, dst)
    return dst


def copy_shards(fx: Fixtures, tmp: Path) -> tuple[Path, dict]:
    dst = tmp / "shards"
    shutil.copytree(fx.shards, dst)
    return dst, json.loads((dst / "manifest.json").read_text())


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def pretrain(fx: Fixtures, tmp: Path, *extra) -> list:
    return ["pretrain", "--data", fx.shards, "--output", tmp / "run", "--no-progress", *extra]


# --- config files -------------------------------------------------------------


@case("pretrain", "--config YAML with a syntax error (line 3)")
def config_yaml_syntax(fx, tmp):
    cfg = write(tmp / "bad.yaml", "model:\n  preset: tiny\n   hidden_size: 32\n")
    return pretrain(fx, tmp, "--config", cfg), [str(cfg), "line 3"]


@case("pretrain", "--config with an unknown key (optim.learning_rate)")
def config_unknown_key(fx, tmp):
    cfg = write(tmp / "bad.yaml", "optim:\n  learning_rate: 0.001\n")
    return pretrain(fx, tmp, "--config", cfg), ["optim.learning_rate", "known keys"]


@case("pretrain", "--config with a wrong type (train.batch_size: many)")
def config_wrong_type(fx, tmp):
    cfg = write(tmp / "bad.yaml", "train:\n  batch_size: many\n")
    return pretrain(fx, tmp, "--config", cfg), ["train.batch_size", "'many'"]


@case("pretrain", "--config holding a list, not a mapping")
def config_not_mapping(fx, tmp):
    cfg = write(tmp / "bad.yaml", "- model\n- optim\n")
    return pretrain(fx, tmp, "--config", cfg), [str(cfg), "mapping"]


@case("pretrain", "--config file that does not exist")
def config_missing(fx, tmp):
    return pretrain(fx, tmp, "--config", tmp / "nope.yaml"), [str(tmp / "nope.yaml"), "does not exist"]


@case("pretrain", "--config naming an unknown packaged recipe")
def config_unknown_recipe(fx, tmp):
    return pretrain(fx, tmp, "--config", "gpu-budgte"), ["gpu-budgte", "cpu-budget"]


@case("finetune", "--config TOML with a syntax error")
def config_toml_syntax(fx, tmp):
    cfg = write(tmp / "bad.toml", "[optim]\nlr = = 1\n")
    return ["finetune", "--config", cfg, "--task", "sst2", "--model", fx.mlm], [str(cfg), "line 2"]


@case("sanity", "--config with an unknown extension (run.cfg)")
def config_bad_extension(fx, tmp):
    cfg = write(tmp / "run.cfg", "optim:\n  lr: 1\n")
    return ["sanity", "--config", cfg, "--data", fx.shards], [str(cfg), ".yaml"]


# --- dotted overrides ---------------------------------------------------------


@case("pretrain", "override without '=' (optim.lr)")
def override_no_equals(fx, tmp):
    return pretrain(fx, tmp, "optim.lr"), ["optim.lr", "="]


@case("pretrain", "override of an unknown section (optimizer.lr=1e-3)")
def override_unknown_section(fx, tmp):
    return pretrain(fx, tmp, "optimizer.lr=1e-3"), ["optimizer", "known keys"]


@case("pretrain", "override with a bad value type (train.max_steps=ten)")
def override_bad_type(fx, tmp):
    return pretrain(fx, tmp, "train.max_steps=ten"), ["train.max_steps", "'ten'"]


@case("finetune", "override of an unknown key (data.train=x.tsv)")
def override_unknown_key_finetune(fx, tmp):
    return ["finetune", "--task", "sst2", "--model", fx.mlm, "data.train=x.tsv"], ["data.train"]


@case("pretrain", "override of a value as if a section (train.batch_size.x=1)")
def override_value_as_section(fx, tmp):
    return pretrain(fx, tmp, "train.batch_size.x=1"), ["batch_size"]


# --- model folders ------------------------------------------------------------


@case("info", "model folder that does not exist")
def model_missing(fx, tmp):
    return ["info", tmp / "nope"], [str(tmp / "nope"), "does not exist"]


@case("fill-mask", "model path that is a file")
def model_is_file(fx, tmp):
    f = write(tmp / "model.bin", b"\0" * 16)
    return ["fill-mask", f, "the [MASK] ."], [str(f)]


@case("embed", "model folder without config.json")
def model_no_config(fx, tmp):
    m = copy_model(fx.mlm, tmp)
    (m / "config.json").unlink()
    texts = write(tmp / "texts.txt", "the cat .\nthe dog .\n")
    return ["embed", m, "--input", texts, "--output", tmp / "e.npy"], [str(m), "config.json"]


@case("similarity", "model folder with a corrupt config.json")
def model_corrupt_config(fx, tmp):
    m = copy_model(fx.mlm, tmp)
    write(m / "config.json", '{"hidden_size": 32, ')
    return ["similarity", m, "a cat", "a dog"], ["config.json"]


@case("info", "model folder without weights")
def model_no_weights(fx, tmp):
    m = copy_model(fx.mlm, tmp)
    (m / "model.safetensors").unlink()
    return ["info", m], [str(m), "weights"]


@case("fill-mask", "model folder with truncated model.safetensors")
def model_truncated_weights(fx, tmp):
    m = copy_model(fx.mlm, tmp)
    w = m / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return ["fill-mask", m, "the [MASK] ."], ["model.safetensors"]


@case("fill-mask", "model folder whose vocab.txt is larger than the model's vocabulary")
def model_vocab_mismatch(fx, tmp):
    m = copy_model(fx.mlm, tmp)
    vocab = (m / "vocab.txt").read_text().splitlines() + [f"extra{i}" for i in range(400)]
    (m / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (m / "tokenizer.json").unlink(missing_ok=True)
    return ["fill-mask", m, "the [MASK] ."], [str(m), "vocab"]


@case("fill-mask", "a classifier (no masked-LM head) for fill-mask")
def model_wrong_head_fill_mask(fx, tmp):
    return ["fill-mask", fx.classifier, "the [MASK] ."], ["masked-LM"]


@case("evaluate", "--task mlm on a classifier (no masked-LM head)")
def model_wrong_head_mlm_eval(fx, tmp):
    return ["evaluate", "--task", "mlm", "--model", fx.classifier, "--data", fx.shards], ["masked-LM"]


@case("inspect", "inspect a classifier (no masked-LM head)")
def model_wrong_head_inspect(fx, tmp):
    return ["inspect", fx.classifier, "--text", "the cat sees a river ."], ["masked-LM"]


@case("evaluate", "evaluate an MLM model that was never fine-tuned, without --task")
def model_not_finetuned(fx, tmp):
    return ["evaluate", "--model", fx.mlm, "--data", fx.sst2_tsv], ["--task"]


@case("info", "config.json with a wrong field type (num_hidden_layers: \"two\")")
def model_config_wrong_type(fx, tmp):
    m = copy_model(fx.mlm, tmp)
    cfg = json.loads((m / "config.json").read_text())
    cfg["num_hidden_layers"] = "two"
    (m / "config.json").write_text(json.dumps(cfg))
    return ["info", m], [str(m)]


# --- checkpoints / --resume ---------------------------------------------------


@case("pretrain", "--resume on a run whose latest checkpoint is corrupt")
def resume_corrupt_checkpoint(fx, tmp):
    ckpt = tmp / "run" / "checkpoints" / "step_00000002"
    write(ckpt / "state.pt", b"not a torch file")
    write(tmp / "run" / "checkpoints" / "latest", "step_00000002\n")
    return pretrain(fx, tmp, "--resume", "--max-steps", "2", "model.preset=tiny"), [
        "step_00000002", "cannot be read"]


@case("finetune", "--resume on a run whose latest checkpoint is corrupt")
def resume_corrupt_checkpoint_finetune(fx, tmp):
    ckpt = tmp / "run" / "checkpoints" / "step_00000002"
    write(ckpt / "state.pt", b"\x80\x02garbage")
    write(tmp / "run" / "checkpoints" / "latest", "step_00000002\n")
    return ["finetune", "--task", "sst2", "--model", fx.mlm, "--output", tmp / "run", "--resume", "--no-progress",
            f"data.train_file={fx.sst2_tsv}", f"data.dev_files={fx.sst2_tsv}"], ["step_00000002", "cannot be read"]


# --- shards -------------------------------------------------------------------


@case("pretrain", "--data folder without manifest.json")
def shards_no_manifest(fx, tmp):
    d, _ = copy_shards(fx, tmp)
    (d / "manifest.json").unlink()
    return ["pretrain", "--data", d, "--output", tmp / "run"], [str(d), "manifest.json"]


@case("sanity", "--data with a truncated manifest.json")
def shards_truncated_manifest(fx, tmp):
    d, _ = copy_shards(fx, tmp)
    m = d / "manifest.json"
    m.write_text(m.read_text()[:100])
    return ["sanity", "--data", d, "model.preset=tiny"], [str(d), "manifest.json"]


@case("pretrain", "manifest.json naming a shard outside its folder (../../outside.bin)")
def shards_outside_folder(fx, tmp):
    d, man = copy_shards(fx, tmp)
    man["shards"][0]["file"] = "../../outside.bin"
    (d / "manifest.json").write_text(json.dumps(man))
    return ["pretrain", "--data", d, "--output", tmp / "run", "model.preset=tiny",
            "model.max_position_embeddings=64"], ["../../outside.bin", "outside its folder"]


@case("evaluate", "--task mlm on shards whose file is shorter than the manifest says")
def shards_short_file(fx, tmp):
    d, man = copy_shards(fx, tmp)
    val = next(s for s in man["shards"] if s["split"] == "val")
    f = d / val["file"]
    f.write_bytes(f.read_bytes()[:-8])
    return ["evaluate", "--task", "mlm", "--model", fx.mlm, "--data", d], [val["file"], "bytes"]


@case("inspect", "--data shards whose validation file is shorter than the manifest says")
def shards_short_file_inspect(fx, tmp):
    d, man = copy_shards(fx, tmp)
    val = next(s for s in man["shards"] if s["split"] == "val")
    f = d / val["file"]
    f.write_bytes(f.read_bytes()[:-8])
    return ["inspect", fx.mlm, "--data", d], [val["file"], "bytes"]


@case("pretrain", "--data whose manifest.json is a JSON list, not a prepare manifest")
def shards_manifest_not_mapping(fx, tmp):
    d, _ = copy_shards(fx, tmp)
    (d / "manifest.json").write_text("[1, 2]")
    return ["pretrain", "--data", d, "--output", tmp / "run"], ["manifest.json", "bertforge prepare"]


@case("pretrain", "shards made with another tokenizer (data.tokenizer=other)")
def shards_wrong_tokenizer(fx, tmp):
    from bertforge.data.corpus import CorpusLines
    from bertforge.wordpiece import train_wordpiece

    other = write(tmp / "other.txt", "zebra quokka yak " * 50)
    train_wordpiece(CorpusLines(other), vocab_size=60, show_progress=False).save(tmp / "othertok")
    return ["pretrain", "--data", fx.shards, "--output", tmp / "run", f"data.tokenizer={tmp / 'othertok'}",
            "model.preset=tiny", "model.max_position_embeddings=64"], ["tokenizer", str(fx.shards)]


@case("inspect", "--data folder that is not a prepare output")
def shards_not_prepared(fx, tmp):
    return ["inspect", fx.mlm, "--data", fx.root / "tok"], ["manifest.json"]


@case("pretrain", "shards of 32-token rows for a model with 16 positions")
def shards_longer_than_model(fx, tmp):
    return pretrain(fx, tmp, "model.preset=tiny", "model.max_position_embeddings=16"), ["32", "16"]


# --- task files ---------------------------------------------------------------


def finetune_on(fx, tmp, bad: Path, task: str = "sst2") -> list:
    return ["finetune", "--task", task, "--model", fx.mlm, "--output", tmp / "run", "--no-progress",
            f"data.train_file={bad}", f"data.dev_files={bad}"]


@case("finetune", "sst2 train file missing the label column")
def task_missing_column(fx, tmp):
    bad = write(tmp / "train.tsv", "sentence\tscore\nnice\t1\n")
    return finetune_on(fx, tmp, bad), ["label"]


@case("finetune", "empty train file")
def task_empty_file(fx, tmp):
    bad = write(tmp / "train.tsv", "")
    return finetune_on(fx, tmp, bad), ["empty"]


@case("finetune", "binary train file")
def task_binary_file(fx, tmp):
    bad = write(tmp / "train.tsv", bytes(range(256)) * 4)
    return finetune_on(fx, tmp, bad), [str(bad), "UTF-8"]


@case("finetune", "unknown task name (--task glue9)")
def task_unknown(fx, tmp):
    return finetune_on(fx, tmp, fx.sst2_tsv, task="glue9"), ["glue9"]


@case("evaluate", "--data file with a 'text' header instead of 'sentence' (read as a headerless row)")
def task_eval_wrong_header(fx, tmp):
    bad = write(tmp / "dev.tsv", "text\tlabel\nnice\t1\n")
    return ["evaluate", "--model", fx.classifier, "--data", bad], [f"{bad}:1", "label 'label'"]


@case("predict", "--data file that does not exist")
def task_predict_missing(fx, tmp):
    return ["predict", "--model", fx.classifier, "--data", tmp / "nope.tsv", "--output", tmp / "p"], [
        str(tmp / "nope.tsv")]


@case("sts-eval", "STS-B file without a score column")
def task_sts_missing_score(fx, tmp):
    bad = write(tmp / "sts.tsv", "sentence1\tsentence2\nthe cat .\ta cat .\n")
    return ["sts-eval", "--model", fx.mlm, "--data", bad], ["score"]


@case("sentence-train", "--train file that is empty")
def task_sentence_empty(fx, tmp):
    bad = write(tmp / "nli.tsv", "")
    return ["sentence-train", "--model", fx.mlm, "--train", bad, "--output", tmp / "run", "--no-progress"], [
        str(bad)]


@case("distill", "--teacher that is a masked-LM model for a task distillation")
def distill_wrong_teacher(fx, tmp):
    return ["distill", "--teacher", fx.mlm, "--data", fx.sst2_tsv, "--task", "sst2", "--output", tmp / "run",
            "--no-progress", f"data.dev={fx.sst2_tsv}"], ["teacher"]


# --- CLI values ---------------------------------------------------------------


@case("finetune", "--batch-size 0")
def value_batch_zero(fx, tmp):
    return finetune_on(fx, tmp, fx.sst2_tsv) + ["--batch-size", "0"], ["--batch-size"]


@case("embed", "--batch-size -4")
def value_batch_negative(fx, tmp):
    texts = write(tmp / "texts.txt", "the cat .\nthe dog .\n")
    return ["embed", fx.mlm, "--input", texts, "--output", tmp / "e.npy", "--batch-size", "-4"], [
        "--batch-size"]


@case("quickstart", "--minutes 0")
def value_minutes_zero(fx, tmp):
    return ["quickstart", "--out", tmp / "qs", "--minutes", "0"], ["--minutes"]


@case("tokenizer train", "--vocab-size -5")
def value_vocab_negative(fx, tmp):
    return ["tokenizer", "train", fx.corpus, "--out", tmp / "tok", "--vocab-size", "-5"], ["vocab"]


@case("inspect", "--mask-rate 1.5")
def value_mask_rate(fx, tmp):
    return ["inspect", fx.mlm, "--text", "the cat sees a river .", "--mask-rate", "1.5"], ["--mask-rate 1.5"]


@case("evaluate", "--task mlm --seq-len 512 on a 128-position model")
def value_seq_len_too_long(fx, tmp):
    return ["evaluate", "--task", "mlm", "--model", fx.mlm, "--data", fx.corpus, "--seq-len", "512"], ["512", "128"]


@case("quickstart", "unknown --preset")
def value_unknown_preset(fx, tmp):
    return ["quickstart", "--out", tmp / "qs", "--preset", "huge"], ["huge"]


@case("evaluate", "--data with two paths for a non-mlm task")
def value_several_data(fx, tmp):
    return ["evaluate", "--model", fx.classifier, "--data", fx.sst2_tsv, fx.sst2_tsv], ["--data"]


@case("prepare", "--seq-len 4")
def value_prepare_seq_len(fx, tmp):
    return ["prepare", fx.corpus, "--tokenizer", fx.tokenizer, "--output", tmp / "s", "--seq-len", "4"], ["seq_len"]


@case("sanity", "--steps 0")
def value_sanity_steps(fx, tmp):
    return ["sanity", "--data", fx.shards, "--steps", "0", "model.preset=tiny"], ["--steps"]


@case("sanity", "--batch-size 0")
def value_sanity_batch(fx, tmp):
    return ["sanity", "--data", fx.shards, "--batch-size", "0", "model.preset=tiny"], ["--batch-size"]


@case("plan", "--mlm-probability 1.5")
def plan_mlm_probability(fx, tmp):
    return ["plan", "--mlm-probability", "1.5"], ["1.5"]


@case("pretrain", "--time-budget soon")
def value_time_budget(fx, tmp):
    return pretrain(fx, tmp, "--time-budget", "soon"), ["soon"]


# --- evaluate --task mlm ------------------------------------------------------


@case("evaluate", "--task mlm --mask-rate 0")
def mlm_mask_rate_zero(fx, tmp):
    return ["evaluate", "--task", "mlm", "--model", fx.mlm, "--data", fx.corpus, "--mask-rate", "0"], ["--mask-rate 0"]


@case("evaluate", "--task mlm --data on a missing file")
def mlm_missing_data(fx, tmp):
    return ["evaluate", "--task", "mlm", "--model", fx.mlm, "--data", tmp / "held.txt"], [str(tmp / "held.txt")]


@case("evaluate", "--task mlm --split test on shards with train + val only")
def mlm_unknown_split(fx, tmp):
    return ["evaluate", "--task", "mlm", "--model", fx.mlm, "--data", fx.shards, "--split", "test"], ["test"]


@case("evaluate", "--task mlm --max-rows 0")
def mlm_max_rows_zero(fx, tmp):
    return ["evaluate", "--task", "mlm", "--model", fx.mlm, "--data", fx.shards, "--max-rows", "0"], ["--max-rows 0"]


# --- serve, plan, convert, report ---------------------------------------------


@case("serve", "--port 70000")
def serve_port(fx, tmp):
    return ["serve", fx.mlm, "--port", "70000"], ["--port", "70000"]


@case("serve", "a model folder that does not exist")
def serve_missing_model(fx, tmp):
    return ["serve", tmp / "nope", "--port", "0"], [str(tmp / "nope")]


@case("serve", "--max-texts 0")
def serve_max_texts(fx, tmp):
    return ["serve", fx.mlm, "--max-texts", "0"], ["--max-texts"]


@case("plan", "--batch 0")
def plan_batch_zero(fx, tmp):
    return ["plan", "--batch", "0"], ["--batch 0"]


@case("plan", "unknown --preset")
def plan_unknown_preset(fx, tmp):
    return ["plan", "--preset", "gigantic"], ["gigantic"]


@case("plan", "--seq longer than the preset's positions (4096 on base)")
def plan_seq_too_long(fx, tmp):
    return ["plan", "--seq", "4096"], ["4096"]


@case("plan", "--device-gb -1")
def plan_device_gb(fx, tmp):
    return ["plan", "--device-gb", "-1"], ["-1"]


@case("convert", "unknown --to target")
def convert_unknown_target(fx, tmp):
    return ["convert", fx.mlm, tmp / "out", "--to", "tflite"], ["tflite"]


@case("convert", "source folder that does not exist")
def convert_missing_source(fx, tmp):
    return ["convert", tmp / "nope", tmp / "out", "--to", "hf"], [str(tmp / "nope")]


@case("report", "a run folder without metrics.jsonl")
def report_no_metrics(fx, tmp):
    run = tmp / "run"
    run.mkdir()
    return ["report", run, "--out", tmp / "rep", "--no-plots"], [str(run)]


# --- more of each kind ---------------------------------------------------------


@case("prepare", "--tokenizer folder that does not exist")
def prepare_missing_tokenizer(fx, tmp):
    return ["prepare", fx.corpus, "--tokenizer", tmp / "notok", "--output", tmp / "s"], [str(tmp / "notok")]


@case("prepare", "a binary corpus file")
def prepare_binary_corpus(fx, tmp):
    bad = write(tmp / "corpus.txt", bytes(range(256)) * 8)
    return ["prepare", bad, "--tokenizer", fx.tokenizer, "--output", tmp / "s", "--num-workers", "0",
            "--no-progress"], [str(bad)]


@case("pretrain", "--data that is a file, not a prepare folder")
def shards_data_is_file(fx, tmp):
    return ["pretrain", "--data", fx.corpus, "--output", tmp / "run", "--max-steps", "2"], [str(fx.corpus)]


@case("similarity", "model folder whose tokenizer files were deleted")
def model_no_tokenizer(fx, tmp):
    m = copy_model(fx.mlm, tmp)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (m / name).unlink(missing_ok=True)
    return ["similarity", m, "a cat", "a dog"], [str(m), "tokenizer"]


@case("fill-mask", "model folder with a corrupt tokenizer.json")
def model_corrupt_tokenizer(fx, tmp):
    m = copy_model(fx.mlm, tmp)
    write(m / "tokenizer.json", '{"model": {"vocab": ')
    return ["fill-mask", m, "the [MASK] ."], ["tokenizer.json"]


@case("info", "config.json naming an unknown architecture")
def model_unknown_architecture(fx, tmp):
    m = copy_model(fx.mlm, tmp)
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["BertForTranslation"]
    (m / "config.json").write_text(json.dumps(cfg))
    return ["info", m], [str(m), "BertForTranslation"]


@case("finetune", "--model folder that does not exist")
def finetune_missing_model(fx, tmp):
    return ["finetune", "--task", "sst2", "--model", tmp / "nope", "--output", tmp / "run",
            f"data.train_file={fx.sst2_tsv}", f"data.dev_files={fx.sst2_tsv}"], [str(tmp / "nope")]


@case("finetune", "sst2 file with a label outside the task's labels")
def task_unseen_label(fx, tmp):
    bad = write(tmp / "train.tsv", "sentence\tlabel\nnice\t1\nbad\tpositive\n")
    return finetune_on(fx, tmp, bad), [f"{bad}:3", "positive"]


@case("sts-eval", "--data file that does not exist")
def sts_missing_data(fx, tmp):
    return ["sts-eval", "--model", fx.mlm, "--data", tmp / "sts.tsv"], [str(tmp / "sts.tsv")]


@case("sentence-train", "--loss cosent on an NLI file (needs scored pairs)")
def sentence_loss_mismatch(fx, tmp):
    nli = write(tmp / "nli.tsv", "sentence1\tsentence2\tgold_label\na cat .\ta pet .\tentailment\n")
    return ["sentence-train", "--model", fx.mlm, "--train", nli, "--loss", "cosent", "--output", tmp / "run",
            "--no-progress", "--max-steps", "1"], [str(nli)]


@case("distill", "--mlm with --data that is not a prepare folder")
def distill_mlm_raw_text(fx, tmp):
    return ["distill", "--mlm", "--teacher", fx.mlm, "--data", fx.corpus, "--output", tmp / "run", "--no-progress",
            "--max-steps", "1"], [str(fx.corpus)]


@case("embed", "--output with an unknown extension (.parquet)")
def embed_bad_output(fx, tmp):
    texts = write(tmp / "texts.txt", "the cat .\nthe dog .\n")
    return ["embed", fx.mlm, "--input", texts, "--output", tmp / "e.parquet"], ["e.parquet"]


@case("evaluate", "--task mlm on an empty text file")
def mlm_empty_text(fx, tmp):
    empty = write(tmp / "held.txt", "")
    return ["evaluate", "--task", "mlm", "--model", fx.mlm, "--data", empty], [str(empty), "no documents"]


@case("inspect", "--index past the validation rows")
def inspect_index(fx, tmp):
    return ["inspect", fx.mlm, "--data", fx.shards, "--index", "9999"], ["--index 9999"]


@case("quickstart", "--vocab-size 10")
def quickstart_vocab_small(fx, tmp):
    return ["quickstart", "--out", tmp / "qs", "--vocab-size", "10", "--corpus", fx.corpus], ["10"]


@case("plan", "--fsdp 0")
def plan_fsdp_zero(fx, tmp):
    return ["plan", "--fsdp", "0"], ["--fsdp 0"]


@case("serve", "NAME=PATH with an empty path (mlm=)")
def serve_empty_path(fx, tmp):
    return ["serve", "mlm=", "--port", "0"], ["mlm="]


@case("convert", "dest folder that already holds files, without --overwrite")
def convert_dest_not_empty(fx, tmp):
    dest = tmp / "out"
    write(dest / "keep.txt", "x")
    return ["convert", fx.mlm, dest, "--to", "hf"], [str(dest), "--overwrite"]


@case("report", "--out that is an existing file")
def report_out_is_file(fx, tmp):
    run = write(tmp / "run" / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n').parent
    out = write(tmp / "report.md", "x")
    return ["report", run, "--out", out, "--no-plots"], [str(out)]


# ----------------------------------------------------------------------------- running


@dataclass
class Outcome:
    rc: int | None
    stdout: str
    stderr: str
    traceback: str  # "" unless main raised

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if "error:" in line]


def run_case(c: Case, fx: Fixtures, tmp: Path) -> tuple[Outcome, list[str]]:
    """Make the case's bad input under `tmp` and run `bertforge` in this process."""
    from bertforge.cli import main

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    argv, needles = c.make(fx, tmp)
    out, err = io.StringIO(), io.StringIO()
    tb = ""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # pragma: no cover - main returns, it does not exit
            rc = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # a traceback: the bug this table exists to find
            rc, tb = None, traceback.format_exc()
    return Outcome(rc, out.getvalue(), err.getvalue(), tb), [str(n) for n in needles]


def problems(outcome: Outcome, needles: list[str]) -> list[str]:
    """What is wrong with a case's outcome (empty when it is one clear `error:` line, exit 2)."""
    found = []
    if outcome.traceback or "Traceback" in outcome.stderr:
        found.append("traceback: " + (outcome.traceback or outcome.stderr).strip().splitlines()[-1])
    if outcome.rc != 2:
        found.append(f"exit status {outcome.rc}, not 2")
    lines = outcome.error_lines()
    if len(lines) != 1:
        found.append(f"{len(lines)} error lines: {outcome.stderr.strip()[-300:]!r}")
    elif not (outcome.stderr.startswith("error: ") and outcome.stderr.count("\n") == 1
              or outcome.stderr.startswith("usage: ") and outcome.stderr.rstrip().endswith(lines[0])):
        found.append(f"stderr is more than the error line: {outcome.stderr!r}")
    for needle in needles:
        if lines and needle not in lines[0]:
            found.append(f"error line lacks {needle!r}")
    return found


def markdown_table(rows: list[tuple[Case, Outcome, list[str]]], work: Path) -> str:
    """The table; paths under the scratch folder `work` are shown relative to it (`<tmp>/...`)."""
    def cell(text: str) -> str:
        return text.replace(str(work), "<tmp>").replace("|", "\\|").replace("\n", " ")

    out = ["| command | bad input | error line |", "| --- | --- | --- |"]
    for c, outcome, found in rows:
        line = outcome.error_lines()[0] if len(outcome.error_lines()) == 1 else ""
        shown = f"`` {cell(line)} ``" if not found else f"**FAILS**: {cell('; '.join(found))}"
        out.append(f"| {c.command} | {cell(c.bad_input)} | {shown} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="markdown file to write the table to")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed afterwards)")
    p.add_argument("-k", dest="only", help="run only cases whose id contains this text")
    args = p.parse_args(argv)
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        fx = build_fixtures(work / "fixtures")
        rows = []
        for c in CASES:
            if args.only and args.only not in c.id:
                continue
            outcome, needles = run_case(c, fx, work / "cases" / c.id)
            rows.append((c, outcome, problems(outcome, needles)))
            status = "ok " if not rows[-1][2] else "BAD"
            print(f"{status} {c.id}: {outcome.stderr.strip()[-400:]} {'; '.join(rows[-1][2])}", file=sys.stderr)
        table = markdown_table(rows, work)
    Path(args.out).write_text(table, encoding="utf-8")
    bad = sum(1 for r in rows if r[2])
    print(json.dumps({"cases": len(rows), "failing": bad, "out": args.out}))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
