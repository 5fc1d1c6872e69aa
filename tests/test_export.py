"""Every architecture leaves bertforge: transformers folders, remote code, sentence-transformers, old folders.

For every switch combination (norm_position x bias x ffn, and position_embedding_type where BertConfig
has it) and every head: `save_model` -> transformers' AutoModel* (trust_remote_code for non-BERT
architectures) gives our outputs within 1e-4 with no missing or unexpected weights; `save_model` ->
`load_model` gives identical outputs. The generated modeling file loads in a process where bertforge
cannot be imported. Random tiny models with every parameter perturbed; padding and token types in
every batch.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import fields

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_hf_parity import AUTO, CASES  # the heads and their transformers Auto classes, in one place

from bertforge.cli import main
from bertforge.errors import BertforgeError
from bertforge.model import bert as bert_module
from bertforge.model import export
from bertforge.model.bert import BertConfig
from bertforge.model.heads import build_model
from bertforge.model.loading import load_model, save_model
from bertforge.model.pooling import SentenceEncoder
from bertforge.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer

TOL = 1e-4
SWITCHES = {"norm_position": ("post", "pre"), "bias": (True, False), "ffn": ("mlp", "geglu")}
if "position_embedding_type" in {f.name for f in fields(BertConfig)}:  # the rotary switch, where it exists
    SWITCHES["position_embedding_type"] = ("absolute", "rotary")
COMBOS = [dict(zip(SWITCHES, values)) for values in itertools.product(*SWITCHES.values())]
BUDGET = dict(norm_position="pre", bias=False, ffn="geglu")
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "big", "small", "##s", "##ed", ".", ","]
TEXTS = ["the cat sat on the mat.", "a big dog ran", "the small cats sat", "dog", "a cat, a dog."]


def combo_id(combo: dict) -> str:
    return "-".join(str(v) for v in combo.values())


def tiny(**overrides) -> BertConfig:
    return BertConfig.from_preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  max_position_embeddings=64, **overrides)


def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer([*SPECIAL_TOKENS, *WORDS])


def randomized(head: str, num_labels: int | None, config: BertConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(head, config, num_labels).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # biases and norms too: no mapping error hides behind zeros/ones
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def batch(head: str, B: int = 3, T: int = 11, C: int = 2) -> dict:
    g = torch.Generator().manual_seed(7)
    shape = (B, C, T) if head == "multiple_choice" else (B, T)
    mask = torch.ones(shape, dtype=torch.long)
    mask.view(-1, T)[1, 8:] = 0
    mask.view(-1, T)[-1, 5:] = 0
    types = torch.zeros(shape, dtype=torch.long)
    types[..., 4:] = 1
    return {"input_ids": torch.randint(5, 99, shape, generator=g) * mask, "attention_mask": mask,
            "token_type_ids": types * mask}


def labels(head: str, num_labels: int | None) -> dict:
    g = torch.Generator().manual_seed(8)
    mlm = torch.full((3, 11), -100)
    mlm[0, 1], mlm[1, 3], mlm[2, 2] = 7, 42, 98
    return {"pretraining": {"labels": mlm, "next_sentence_label": torch.tensor([0, 1, 1])},
            "masked_lm": {"labels": mlm},
            "sequence_classification": {"labels": torch.randn(3, generator=g) if num_labels == 1
                                        else torch.tensor([2, 0, 1])},
            "question_answering": {"start_positions": torch.tensor([1, 3, 4]), "end_positions": torch.tensor([2, 6, 4])},
            "multiple_choice": {"labels": torch.tensor([1, 0, 1])}}.get(head, {})


def ours_outputs(head: str, model, inputs: dict) -> dict[str, torch.Tensor]:
    """Our outputs under transformers' names; MLM logits in full (no labels), losses from a labelled call."""
    with torch.no_grad():
        out = model(**inputs)
        lab = labels(head, getattr(model, "num_labels", None))
        loss = model(**inputs, **lab).loss if lab else None
    res = {"base": lambda: {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output},
           "pretraining": lambda: {"prediction_logits": out.logits, "seq_relationship_logits": out.nsp_logits},
           "question_answering": lambda: {"start_logits": out.start_logits, "end_logits": out.end_logits},
           }.get(head, lambda: {"logits": out.logits})()
    return {**res, **({"loss": loss} if loss is not None else {})}


def hf_outputs(head: str, model, inputs: dict) -> dict[str, torch.Tensor]:
    names = {"base": ("last_hidden_state", "pooler_output"),
             "pretraining": ("prediction_logits", "seq_relationship_logits"),
             "question_answering": ("start_logits", "end_logits")}.get(head, ("logits",))
    with torch.no_grad():
        out = model(**inputs)
        lab = labels(head, getattr(model.config, "num_labels", None))
        loss = model(**inputs, **lab).loss if lab else None
    return {**{n: getattr(out, n) for n in names}, **({"loss": loss} if loss is not None else {})}


def assert_close(ours: dict, theirs: dict, tol: float = TOL) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        diff = (ours[name] - theirs[name]).abs().max().item()
        assert diff <= tol, f"{name}: max abs diff {diff:.2e}"


# ----------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_every_switch_and_head_loads_in_transformers(combo, tmp_path):
    config = tiny(**combo)
    remote = not config.hf_compatible
    for head, num_labels in CASES:
        ours = randomized(head, num_labels, config)
        folder = tmp_path / f"{head}-{num_labels}"
        save_model(ours, folder, tokenizer=tokenizer())
        theirs, info = AUTO[head].from_pretrained(folder, trust_remote_code=remote, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (head, info)
        expected = export.REMOTE_CLASSES[head] if remote else {
            "base": "BertModel", "pretraining": "BertForPreTraining", "masked_lm": "BertForMaskedLM",
            "sequence_classification": "BertForSequenceClassification",
            "question_answering": "BertForQuestionAnswering", "multiple_choice": "BertForMultipleChoice"}[head]
        assert type(theirs).__name__ == expected
        assert (folder / export.MODELING_FILE).is_file() == remote
        inputs = batch(head)
        assert_close(ours_outputs(head, ours, inputs), hf_outputs(head, theirs.eval(), inputs))


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_save_then_load_model_is_identical(combo, tmp_path):
    config = tiny(**combo)
    for head, num_labels in CASES:
        ours = randomized(head, num_labels, config, seed=3)
        id2label = {i: f"l{i}" for i in range(num_labels)} if num_labels else None
        save_model(ours, tmp_path / head, tokenizer=tokenizer(), meta={"task": "t", "id2label": id2label})
        loaded = load_model(tmp_path / head)
        assert (loaded.head, loaded.source, loaded.config, loaded.initialized) == (head, "bertforge", config, [])
        assert (loaded.meta["task"], loaded.meta["id2label"]) == ("t", id2label)
        a, b = ours_outputs(head, ours, batch(head)), ours_outputs(head, loaded.model, batch(head))
        assert all(torch.equal(a[k], b[k]) for k in a), head


def test_remote_code_runs_without_bertforge(tmp_path):
    """A fresh interpreter where `import bertforge` fails loads every head and gives our logits."""
    config = tiny(**BUDGET)
    expected = {}
    for head, num_labels in CASES[:5] + CASES[6:]:
        model = randomized(head, num_labels, config, seed=5)
        save_model(model, tmp_path / head, tokenizer=tokenizer())
        out = ours_outputs(head, model, batch(head))
        expected[head] = out.get("logits", out.get("last_hidden_state", out.get("prediction_logits",
                                                                                out.get("start_logits"))))
        save_file(batch(head), tmp_path / f"{head}-inputs.safetensors")
    script = textwrap.dedent(f"""
        import sys
        class NoBertforge:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "bertforge":
                    raise ImportError("bertforge is blocked in this process")
        sys.meta_path.insert(0, NoBertforge())
        import torch, transformers
        from safetensors.torch import load_file, save_file
        auto = {{"base": transformers.AutoModel, "pretraining": transformers.AutoModelForPreTraining,
                "masked_lm": transformers.AutoModelForMaskedLM,
                "sequence_classification": transformers.AutoModelForSequenceClassification,
                "multiple_choice": transformers.AutoModelForMultipleChoice}}
        outs = {{}}
        for head, cls in auto.items():
            model = cls.from_pretrained({str(tmp_path)!r} + "/" + head, trust_remote_code=True).eval()
            with torch.no_grad():
                out = model(**load_file({str(tmp_path)!r} + f"/{{head}}-inputs.safetensors"))
            outs[head] = out[0].contiguous()
        try:
            import bertforge
            raise SystemExit("bertforge was importable")
        except ImportError:
            pass
        assert not [m for m in sys.modules if m.startswith("bertforge")]
        save_file(outs, {str(tmp_path / "theirs.safetensors")!r})
    """)
    env = {"PATH": "/usr/bin:/bin", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(tmp_path / "theirs.safetensors")
    assert set(theirs) == set(expected)
    for head in expected:
        assert (theirs[head] - expected[head]).abs().max() <= TOL, head


def test_modeling_file_is_our_source():
    """The exported modeling file holds our layers' code verbatim and imports nothing from bertforge."""
    source = export.modeling_source()
    for obj in (bert_module.BertModel, bert_module.BertLayer, bert_module.SelfAttention, bert_module.FeedForward,
                bert_module.BertEmbeddings, build_model.__globals__["MLMHead"]):
        assert inspect.getsource(obj) in source, obj
    tree = ast.parse(source)
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [m for m in imported if m.split(".")[0] == "bertforge"], imported
    # only the standard library, torch and transformers: what a transformers user has installed
    assert {m.split(".")[0] for m in imported} - set(sys.stdlib_module_names) <= {"torch", "transformers"}
    assert source.count("from __future__ import annotations") == 1


@pytest.mark.parametrize("text,error", [
    ("from bertforge.model import bert\n", "import the names it defines"),
    ("import bertforge.errors\n", "use `from bertforge.x import name`"),
    ("from bertforge.errors import BertforgeError\n\ndef require():\n    pass\n", "'require' is defined in both"),
])
def test_modeling_source_refuses_what_it_cannot_inline(text, error, tmp_path, monkeypatch):
    """A future import the generator cannot follow fails at export time, never as a broken file."""
    (tmp_path / "wrapper.py").write_text(text)
    real = export._module_path
    monkeypatch.setattr(export, "_module_path", lambda n: tmp_path / "wrapper.py" if n == "wrapper" else real(n))
    monkeypatch.setattr(export, "_TEMPLATE", "wrapper")
    with pytest.raises(RuntimeError, match=re.escape(error)):
        export.modeling_source()


def test_transformers_resave_and_head_change(tmp_path):
    """A budget MLM loaded as a classifier in transformers, fine-tuned there and re-saved, loads back in
    bertforge with the same outputs (the folder transformers writes is one of ours)."""
    save_model(randomized("masked_lm", None, tiny(**BUDGET)), tmp_path / "mlm", tokenizer=tokenizer())
    clf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "mlm", num_labels=4, trust_remote_code=True, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["bert.pooler.weight", "classifier.bias", "classifier.weight"]
    assert clf.classifier.weight.abs().sum() > 0  # initialised, not left at zero or empty
    clf.save_pretrained(tmp_path / "clf")
    loaded = load_model(tmp_path / "clf")
    assert (loaded.head, loaded.meta["num_labels"], loaded.initialized) == ("sequence_classification", 4, [])
    inputs = batch("sequence_classification")
    with torch.no_grad():
        assert (loaded.model(**inputs).logits - clf.eval()(**inputs).logits).abs().max() <= TOL


def test_legacy_bertforge_folder_still_loads(tmp_path):
    """The flat `model_type: "bertforge"` folders earlier versions wrote keep loading, strictly."""
    for config in (tiny(), tiny(**BUDGET)):
        model = randomized("sequence_classification", 2, config, seed=9)
        folder = tmp_path / config.norm_position
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
        legacy = {**config.to_dict(), "model_type": "bertforge", "head": "sequence_classification", "num_labels": 2,
                  "id2label": {"0": "no", "1": "yes"}, "bertforge_version": "0.1.0", "meta": {"task": "x"}}
        (folder / "config.json").write_text(json.dumps(legacy))
        tokenizer().save(folder)
        loaded = load_model(folder)
        assert (loaded.source, loaded.head, loaded.config, loaded.meta["id2label"], loaded.meta["task"]) == \
            ("bertforge", "sequence_classification", config, {0: "no", 1: "yes"}, "x")
        inputs = batch("sequence_classification")
        assert torch.equal(model(**inputs).logits, loaded.model(**inputs).logits)
        (folder / "config.json").write_text(json.dumps({**legacy, "hidden_sise": 3}))  # still strict
        with pytest.raises(BertforgeError, match="hidden_sise"):
            load_model(folder)


def test_folder_with_an_unknown_switch_is_refused(tmp_path):
    """A remote-code folder from a newer bertforge with a switch this one lacks: an error, not a
    silently different model."""
    save_model(randomized("base", None, tiny(**BUDGET)), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["bertforge"]["config_fields"].append("attention_sinks")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "attention_sinks": 4}))
    with pytest.raises(BertforgeError, match=r"attention_sinks.*upgrade bertforge"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("positions", [64, 128])
def test_tokenizer_model_max_length_is_the_position_count(positions, tmp_path):
    config = BertConfig.from_preset("budget-mini" if positions == 128 else "tiny", vocab_size=99,
                                    hidden_size=32, intermediate_size=37, max_position_embeddings=positions)
    save_model(build_model("masked_lm", config), tmp_path / "m", tokenizer=tokenizer())
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())["model_max_length"] == positions
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    assert hf_tok.model_max_length == positions
    assert len(hf_tok(" ".join(["cat"] * 300), truncation=True)["input_ids"]) == positions
    tokenizer().save(tmp_path / "alone")  # a tokenizer without a model claims no length
    assert "model_max_length" not in json.loads((tmp_path / "alone" / "tokenizer_config.json").read_text())


# ----------------------------------------------------------------------------- sentence-transformers


ARCHITECTURES = {"bert": {}, "budget": BUDGET}
if "position_embedding_type" in SWITCHES:
    ARCHITECTURES["budget-rotary"] = {**BUDGET, "position_embedding_type": "rotary"}


@pytest.mark.parametrize("combo", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_sentence_transformers_loads_every_architecture(combo, tmp_path):
    from sentence_transformers import SentenceTransformer

    config = tiny(**combo)
    encoder = SentenceEncoder(randomized("base", None, config, seed=11), pooling="mean", normalize=True,
                              max_seq_length=32)
    tok = tokenizer()
    encoder.save_sentence_transformers(tmp_path / "st", tok)
    ours = encoder.encode(TEXTS, tok).numpy()
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu", trust_remote_code=not config.hf_compatible)
    assert st.max_seq_length == 32
    theirs = st.encode(TEXTS, convert_to_numpy=True, batch_size=2)
    assert abs(ours - theirs).max() <= TOL
    back = SentenceEncoder.from_pretrained(tmp_path / "st")  # and back into bertforge
    assert (back.pooling, back.normalize, back.max_seq_length) == ("mean", True, 32)
    assert abs(back.encode(TEXTS, tok).numpy() - ours).max() <= 1e-6


def test_convert_cli_budget_model(tmp_path, capsys):
    save_model(randomized("masked_lm", None, tiny(**BUDGET), seed=2), tmp_path / "m", tokenizer=tokenizer(),
               meta={"pooling": "mean"})
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    out = capsys.readouterr().out
    assert "trust_remote_code=True" in out and "bertforge (masked_lm) -> hf" in out
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForMaskedLM"] == "modeling_bertforge.BertforgeForMaskedLM"
    assert "meta" not in cfg["bertforge"]  # a plain export carries no run metadata
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "st"), "--to", "sentence-transformers"]) == 0
    assert json.loads((tmp_path / "st" / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    assert (tmp_path / "st" / export.MODELING_FILE).is_file()
    assert main(["convert", "--help"]) == 0
    help_text = capsys.readouterr().out
    for target in ("hf", "sentence-transformers", "onnx", "bertforge", "trust_remote_code", "dynamic batch"):
        assert target in help_text


def test_sentence_train_saves_a_budget_model(tmp_path, capsys):
    """sentence-train on a budget (pre-LN, no bias, GeGLU) model ends with a model sentence-transformers
    loads (it used to train to the end and then fail at saving)."""
    from sentence_transformers import SentenceTransformer

    save_model(randomized("base", None, tiny(**BUDGET), seed=4), tmp_path / "m", tokenizer=tokenizer())
    rows = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
    rows += [f"{i}\t{TEXTS[i % 5]}\t{TEXTS[(i * 2) % 5]}\t{1 + i % 5}\tNEUTRAL" for i in range(16)]
    (tmp_path / "sick.txt").write_text("\n".join(rows) + "\n")
    assert main(["sentence-train", "--model", str(tmp_path / "m"), "--train", str(tmp_path / "sick.txt"),
                 "--loss", "cosine", "--output", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4",
                 "--no-progress"]) == 0, capsys.readouterr().err
    model = tmp_path / "run" / "model"
    assert (model / "modules.json").is_file() and (model / export.MODELING_FILE).is_file()
    theirs = SentenceTransformer(str(model), device="cpu", trust_remote_code=True).encode(TEXTS)
    ours = SentenceEncoder.from_pretrained(model).encode(TEXTS, tokenizer()).numpy()
    assert abs(theirs - ours).max() <= TOL


def test_mean_classifier_pooling_exports_with_our_modeling_file(tmp_path):
    """classifier_pooling="mean" has no transformers BERT class: the folder carries our modeling file, and
    transformers computes what we do, for both heads that read it."""
    config = tiny(classifier_pooling="mean")
    assert not config.hf_compatible
    for head, num_labels in (("sequence_classification", 3), ("multiple_choice", None)):
        ours = randomized(head, num_labels, config)
        save_model(ours, tmp_path / head, tokenizer=tokenizer())
        assert (tmp_path / head / export.MODELING_FILE).is_file()
        theirs = AUTO[head].from_pretrained(tmp_path / head, trust_remote_code=True).eval()
        assert_close(ours_outputs(head, ours, batch(head)), hf_outputs(head, theirs, batch(head)))
        loaded = load_model(tmp_path / head)
        assert loaded.config.classifier_pooling == "mean"
        with pytest.raises(BertforgeError, match="classifier_pooling='mean'"):
            export_hf_plain(ours, tmp_path / f"{head}-plain")


def export_hf_plain(model, folder):
    from bertforge.model.loading import export_hf

    export_hf(model, folder, tokenizer=tokenizer())
