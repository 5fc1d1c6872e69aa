"""save_model / load_model / export_hf: round trips for every head, atomic writes, head changes, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_config as tiny

from bertforge.errors import BertforgeError
from bertforge.model import loading
from bertforge.model.bert import BertConfig
from bertforge.model.heads import HEADS, build_model
from bertforge.model.loading import export_hf, load_model, save_model
from bertforge.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "##s", "##ed", "ran", "big", "small", ".", ","]
CASES = [("base", None), ("pretraining", None), ("masked_lm", None), ("sequence_classification", 3),
         ("sequence_classification", 1), ("question_answering", None), ("multiple_choice", None)]




def tokenizer(n_extra: int = 0) -> WordPieceTokenizer:
    return WordPieceTokenizer([*SPECIAL_TOKENS, *WORDS, *(f"w{i}" for i in range(n_extra))])


def randomized(head: str, num_labels: int | None = None, config: BertConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(head, config or tiny(), num_labels).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def inputs(head: str) -> dict:
    g = torch.Generator().manual_seed(3)
    shape = (2, 2, 9) if head == "multiple_choice" else (2, 9)
    mask = torch.ones(shape, dtype=torch.long)
    mask.view(-1, 9)[1, 6:] = 0
    return {"input_ids": torch.randint(5, 99, shape, generator=g) * mask, "attention_mask": mask,
            "token_type_ids": torch.zeros(shape, dtype=torch.long)}


def outputs(model, head: str) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs(head))
    names = {"base": ("last_hidden_state", "pooler_output"), "pretraining": ("logits", "nsp_logits"),
             "question_answering": ("start_logits", "end_logits")}.get(head, ("logits",))
    return [getattr(out, n) for n in names]


def error_for(call, *path_parts) -> str:
    """Run `call`, expect one BertforgeError line naming every given path."""
    with pytest.raises(BertforgeError) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg
    for part in path_parts:
        assert str(part) in msg, msg
    return msg


@pytest.mark.parametrize("head,num_labels", CASES)
def test_round_trip_every_head(head, num_labels, tmp_path):
    model = randomized(head, num_labels)
    id2label = {i: f"label{i}" for i in range(num_labels)} if num_labels else None
    save_model(model, tmp_path / "m", tokenizer=tokenizer(), meta={"task": "demo", "id2label": id2label})
    loaded = load_model(tmp_path / "m")
    assert (loaded.head, loaded.source, loaded.initialized, loaded.config) == (head, "bertforge", [], tiny())
    assert type(loaded.model) is HEADS[head] and not loaded.model.training
    assert loaded.meta["task"] == "demo" and loaded.meta["num_labels"] == num_labels
    assert loaded.meta["id2label"] == id2label
    assert loaded.tokenizer.fingerprint() == tokenizer().fingerprint()
    for a, b in zip(outputs(model, head), outputs(loaded.model, head)):
        assert torch.equal(a, b)


def test_round_trip_budget_switches(tmp_path):
    cfg = tiny(norm_position="pre", bias=False, ffn="geglu")
    model = randomized("masked_lm", config=cfg)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config == cfg and loaded.tokenizer is None
    assert torch.equal(outputs(model, "masked_lm")[0], outputs(loaded.model, "masked_lm")[0])


def test_our_format_on_disk(tmp_path):
    """A BERT architecture is saved as a plain HF BERT folder, plus our `bertforge` block."""
    save_model(randomized("pretraining", config=tiny(max_position_embeddings=64)), tmp_path / "m",
               tokenizer=tokenizer(), meta={"task": "demo"})
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["hidden_size"]) == ("bert", ["BertForPreTraining"], 32)
    assert (cfg["bertforge"]["head"], cfg["bertforge"]["meta"]) == ("pretraining", {"task": "demo"})
    keys = set(load_file(tmp_path / "m" / "model.safetensors"))
    assert "bert.encoder.layer.0.attention.self.query.weight" in keys and "cls.predictions.bias" in keys
    assert not [k for k in keys if "decoder" in k]  # tied to the word embeddings, stored once
    assert {"vocab.txt", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())["model_max_length"] == 64


def test_save_replaces_an_existing_model(tmp_path):
    save_model(randomized("masked_lm", seed=1), tmp_path / "m")
    new = randomized("question_answering", seed=2)
    save_model(new, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.head == "question_answering"
    assert torch.equal(outputs(new, "question_answering")[0], outputs(loaded.model, "question_answering")[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or backup folder left


def test_failed_save_leaves_no_partial_dir(tmp_path, monkeypatch):
    def save_then_fail(state, path, metadata=None):
        save_file(state, path, metadata=metadata)
        raise OSError("disk full")

    monkeypatch.setattr(loading.export, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_model(randomized("masked_lm"), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_model(tmp_path, monkeypatch):
    old = randomized("masked_lm", seed=4)
    save_model(old, tmp_path / "m")

    class BrokenTokenizer:
        vocab_size = 10

        def save(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(randomized("masked_lm", seed=5), tmp_path / "m", tokenizer=BrokenTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert torch.equal(outputs(old, "masked_lm")[0], outputs(load_model(tmp_path / "m").model, "masked_lm")[0])


@pytest.mark.slow
def test_killed_save_never_leaves_a_half_model(tmp_path):
    """SIGKILL in the middle of a save (weights written, tokenizer not yet): the old model stays whole."""
    old = randomized("masked_lm", seed=6)
    save_model(old, tmp_path / "m")
    script = textwrap.dedent(f"""
        import os, signal, torch
        from bertforge.model.heads import build_model
        from bertforge.model.bert import BertConfig
        from bertforge.model.loading import save_model
        class Killer:
            vocab_size = 10
            def save(self, directory):
                os.kill(os.getpid(), signal.SIGKILL)
        save_model(build_model("base", BertConfig.from_preset("tiny")), {str(tmp_path / "m")!r}, tokenizer=Killer())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert torch.equal(outputs(old, "masked_lm")[0], outputs(load_model(tmp_path / "m").model, "masked_lm")[0])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "m"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".m.tmp-")  # beside the target, never at it
    assert (tmp_path / leftovers[0] / "model.safetensors").is_file()  # the kill did hit mid-save


def test_different_head_reports_initialized_and_discarded(tmp_path):
    pre = randomized("pretraining")
    save_model(pre, tmp_path / "pre")
    loaded = load_model(tmp_path / "pre", "sequence_classification", num_labels=3)
    assert loaded.initialized == ["classifier.bias", "classifier.weight"]  # pooler comes from NSP pretraining
    assert {k.split(".")[0] for k in loaded.meta["discarded"]} == {"cls", "nsp"}
    assert loaded.meta["num_labels"] == 3 and loaded.model.classifier.out_features == 3
    enc, ref = loaded.model.bert.state_dict(), pre.bert.state_dict()
    assert all(torch.equal(enc[k], ref[k]) for k in ref)


def test_pooler_less_checkpoint_initializes_the_pooler(tmp_path):
    save_model(randomized("masked_lm"), tmp_path / "mlm")
    loaded = load_model(tmp_path / "mlm", "multiple_choice")
    assert loaded.initialized == ["bert.pooler.bias", "bert.pooler.weight", "classifier.bias", "classifier.weight"]
    base = load_model(tmp_path / "mlm", "base")
    assert base.initialized == ["pooler.bias", "pooler.weight"]


def test_new_label_count_reinitializes_the_classifier(tmp_path):
    save_model(randomized("sequence_classification", 3), tmp_path / "c", meta={"id2label": {0: "a", 1: "b", 2: "c"}})
    loaded = load_model(tmp_path / "c", num_labels=5)
    assert loaded.initialized == ["classifier.bias", "classifier.weight"]
    assert loaded.meta["id2label"] is None and loaded.meta["num_labels"] == 5


def test_base_to_mlm_initializes_the_mlm_head(tmp_path):
    save_model(randomized("base"), tmp_path / "b")
    loaded = load_model(tmp_path / "b", "masked_lm")
    assert loaded.initialized == ["cls.bias", "cls.dense.bias", "cls.dense.weight", "cls.norm.bias", "cls.norm.weight"]


def test_resave_from_loaded_meta(tmp_path):
    save_model(randomized("sequence_classification", 2), tmp_path / "a", meta={"id2label": {0: "no", 1: "yes"}})
    loaded = load_model(tmp_path / "a")
    save_model(loaded.model, tmp_path / "b", meta=loaded.meta)
    assert load_model(tmp_path / "b").meta["id2label"] == {0: "no", 1: "yes"}


def test_export_hf_then_load_model(tmp_path):
    model = randomized("sequence_classification", 2)
    export_hf(model, tmp_path / "hf", tokenizer=tokenizer(), id2label={0: "no", 1: "yes"})
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["id2label"]) == \
        ("bert", ["BertForSequenceClassification"], {"0": "no", "1": "yes"})
    loaded = load_model(tmp_path / "hf")
    assert (loaded.source, loaded.head, loaded.meta["id2label"]) == ("hf", "sequence_classification", {0: "no", 1: "yes"})
    assert torch.equal(outputs(model, "sequence_classification")[0],
                       outputs(loaded.model, "sequence_classification")[0])


# ----------------------------------------------------------------------------- bad inputs

def test_missing_path(tmp_path):
    error_for(lambda: load_model(tmp_path / "nope"), tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x")
    error_for(lambda: load_model(tmp_path / "f.bin"), tmp_path / "f.bin")


def test_directory_without_config(tmp_path):
    (tmp_path / "d").mkdir()
    msg = error_for(lambda: load_model(tmp_path / "d"), tmp_path / "d")
    assert "config.json" in msg


def test_unreadable_config(tmp_path):
    save_model(randomized("base"), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    error_for(lambda: load_model(tmp_path / "m"), tmp_path / "m" / "config.json")


def test_bad_config_values(tmp_path):
    save_model(randomized("base"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "mish"}))
    error_for(lambda: load_model(tmp_path / "m"), tmp_path / "m" / "config.json", "mish")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertSummarizer"]}))
    error_for(lambda: load_model(tmp_path / "m"), tmp_path / "m" / "config.json", "BertSummarizer")


@pytest.mark.parametrize("fmt", ["bertforge", "hf"])
def test_missing_weights(fmt, tmp_path):
    (save_model if fmt == "bertforge" else export_hf)(randomized("base"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    msg = error_for(lambda: load_model(tmp_path / "m"), tmp_path / "m")
    assert "model.safetensors" in msg and "pytorch_model.bin" in msg


def test_corrupt_weights(tmp_path):
    save_model(randomized("base"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 40)
    error_for(lambda: load_model(tmp_path / "m"), tmp_path / "m" / "model.safetensors")


def test_tokenizer_larger_than_model_vocab(tmp_path):
    save_model(randomized("base"), tmp_path / "m")
    tokenizer(n_extra=100).save(tmp_path / "m")  # 119 tokens > vocab_size 99
    msg = error_for(lambda: load_model(tmp_path / "m"), tmp_path / "m")
    assert "119" in msg and "99" in msg
    error_for(lambda: save_model(randomized("base"), tmp_path / "n", tokenizer=tokenizer(100)), tmp_path / "n")
    assert not (tmp_path / "n").exists()


def test_unexpected_and_missing_keys_are_listed(tmp_path):
    # a budget architecture: saved with our weight names (and a modeling file for transformers)
    save_model(randomized("masked_lm", config=tiny(norm_position="pre", bias=False, ffn="geglu")), tmp_path / "m")
    sd = load_file(tmp_path / "m" / "model.safetensors")
    sd["bert.layers.0.attention.extra"] = torch.zeros(1)
    del sd["bert.layers.1.ffn.up.weight"]
    sd["cls.dense.weight"] = torch.zeros(3, 3)
    save_file(sd, tmp_path / "m" / "model.safetensors")
    error_for(lambda: load_model(tmp_path / "m"), tmp_path / "m", "bert.layers.0.attention.extra",
              "bert.layers.1.ffn.up.weight", "cls.dense.weight")
    # a different head still loads the encoder strictly
    error_for(lambda: load_model(tmp_path / "m", "question_answering"), "bert.layers.1.ffn.up.weight")


def test_wrong_encoder_shape(tmp_path):
    save_model(randomized("base"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))
    error_for(lambda: load_model(tmp_path / "m"), tmp_path / "m", "layers.0.ffn.up.weight (37, 32) != (40, 32)")


def test_bad_head_arguments(tmp_path):
    save_model(randomized("base"), tmp_path / "m")
    error_for(lambda: load_model(tmp_path / "m", "translation"), "translation")
    error_for(lambda: load_model(tmp_path / "m", "masked_lm", num_labels=3), "num_labels")


def test_save_refuses_a_foreign_folder_and_object(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    error_for(lambda: save_model(randomized("base"), tmp_path / "docs"), tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"
    error_for(lambda: save_model(torch.nn.Linear(2, 2), tmp_path / "x"), "Linear")
    error_for(lambda: save_model(randomized("sequence_classification", 2), tmp_path / "y",
                                 meta={"id2label": {0: "a"}}), "id2label")
    assert os.listdir(tmp_path / "docs") == ["notes.txt"]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_sentence_transformers_layout(tmp_path):
    """modules.json -> the Transformer module's folder; pooling and normalize land in meta."""
    model = randomized("base")
    export_hf(model, tmp_path / "st" / "0_Transformer", tokenizer=tokenizer())
    (tmp_path / "st" / "1_Pooling").mkdir()
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (tmp_path / "st" / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    loaded = load_model(tmp_path / "st")
    assert (loaded.source, loaded.head, loaded.meta["pooling"], loaded.meta["normalize"]) == \
        ("sentence-transformers", "base", "cls", False)
    assert loaded.tokenizer is not None
    assert torch.equal(outputs(model, "base")[0], outputs(loaded.model, "base")[0])
    (tmp_path / "st" / "modules.json").write_text("[]")
    error_for(lambda: load_model(tmp_path / "st"), Path(tmp_path / "st" / "modules.json"))
