"""ONNX export checked against onnxruntime: every head, BERT and budget architectures, sentence models.

Each graph is exported once at (B=2, T=8) and run by onnxruntime at other batch and sequence sizes
(1 x 5, 3 x 13 with padding) to show the axes are dynamic; outputs equal ours within 1e-4.
"""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest
import torch

from bertforge.cli import main
from bertforge.errors import BertforgeError
from bertforge.model import export, onnx_export
from bertforge.model.bert import BertConfig
from bertforge.model.heads import build_model
from bertforge.model.loading import save_model
from bertforge.model.pooling import SentenceEncoder
from bertforge.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

TOL = 1e-4
BUDGET = dict(norm_position="pre", bias=False, ffn="geglu")
HEADS = [("base", None), ("pretraining", None), ("masked_lm", None), ("sequence_classification", 3),
         ("question_answering", None), ("multiple_choice", None)]
TEXTS = ["the cat sat on the mat.", "a big dog ran", "the small cats sat", "dog"]


def tiny(**overrides) -> BertConfig:
    return BertConfig.from_preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  max_position_embeddings=32, **overrides)


def randomized(head: str, num_labels: int | None, config: BertConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(head, config, num_labels).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def inputs(head: str, B: int, T: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(B * 100 + T)
    shape = (B, 2, T) if head == "multiple_choice" else (B, T)
    mask = torch.ones(shape, dtype=torch.long)
    if B > 1:
        mask.view(-1, T)[-1, T // 2:] = 0
    types = torch.zeros(shape, dtype=torch.long)
    types[..., T // 3:] = 1
    return {"input_ids": torch.randint(5, 99, shape, generator=g) * mask, "attention_mask": mask,
            "token_type_ids": types * mask}


def ours(head: str, model, x: dict) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(**x)
    names = {"base": ("last_hidden_state", "pooler_output"), "pretraining": ("logits", "nsp_logits"),
             "question_answering": ("start_logits", "end_logits")}.get(head, ("logits",))
    return [getattr(out, n).numpy() for n in names]


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# every head on the budget architecture; the BERT architecture through its encoder and MLM head
CASES = [(h, n, "budget") for h, n in HEADS] + [("base", None, "bert"), ("masked_lm", None, "bert")]
ARCHS = {"budget": BUDGET, "bert": {}}
if "position_embedding_type" in {f.name for f in fields(BertConfig)}:  # rotary positions, where they exist
    CASES.append(("masked_lm", None, "budget-rotary"))
    ARCHS["budget-rotary"] = {**BUDGET, "position_embedding_type": "rotary"}


@pytest.mark.parametrize("head,num_labels,arch", CASES, ids=[f"{h}-{a}" for h, _, a in CASES])
def test_onnx_equals_ours(head, num_labels, arch, tmp_path):
    model = randomized(head, num_labels, tiny(**ARCHS[arch]))
    info = onnx_export.export_onnx(model, head, tmp_path)
    assert info["outputs"] == list(onnx_export.ONNX_OUTPUTS[head])
    sess = session(tmp_path / onnx_export.ONNX_NAME)
    assert [i.name for i in sess.get_inputs()] == list(onnx_export.ONNX_INPUTS)
    assert [o.name for o in sess.get_outputs()] == info["outputs"]
    for B, T in ((1, 5), (3, 13), (2, 32)):
        x = inputs(head, B, T)
        theirs = sess.run(None, {k: v.numpy() for k, v in x.items()})
        for a, b in zip(ours(head, model, x), theirs):
            assert a.shape == b.shape
            assert np.abs(a - b).max() <= TOL, (B, T)


def test_convert_to_onnx_sentence_model(tmp_path, capsys):
    """`convert --to onnx` of a budget sentence-transformers folder: token and sentence embeddings."""
    tok = WordPieceTokenizer([*SPECIAL_TOKENS, "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "big",
                              "small", "##s", "."])
    encoder = SentenceEncoder(randomized("base", None, tiny(**BUDGET)), pooling="mean", normalize=True,
                              max_seq_length=16)
    encoder.save_sentence_transformers(tmp_path / "st", tok)
    assert main(["convert", str(tmp_path / "st"), str(tmp_path / "onnx"), "--to", "onnx"]) == 0
    assert "token_embeddings, sentence_embedding" in capsys.readouterr().out
    files = {p.name for p in (tmp_path / "onnx").iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "vocab.txt", export.MODELING_FILE} <= files
    assert "model.safetensors" not in files  # the graph holds the weights
    cfg = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert cfg["bertforge"]["meta"]["pooling"] == "mean" and cfg["bertforge"]["meta"]["onnx"]["opset"] == 18
    encs = tok.encode_batch(TEXTS)
    T = max(len(e.input_ids) for e in encs)
    feed = {name: np.array([getattr(e, name) + [0] * (T - len(e.input_ids)) for e in encs], dtype=np.int64)
            for name in onnx_export.ONNX_INPUTS}
    token_emb, sentence_emb = session(tmp_path / "onnx" / "model.onnx").run(None, feed)
    assert np.abs(sentence_emb - encoder.encode(TEXTS, tok).numpy()).max() <= TOL
    assert token_emb.shape == (len(TEXTS), T, 32)
    assert np.allclose(np.linalg.norm(sentence_emb, axis=1), 1.0, atol=1e-5)


def test_onnx_needs_its_packages(tmp_path, monkeypatch):
    real = onnx_export.importlib.util.find_spec
    monkeypatch.setattr(onnx_export.importlib.util, "find_spec", lambda n: None if n == "onnxscript" else real(n))
    with pytest.raises(BertforgeError, match=r"bertforge\[onnx\]"):
        onnx_export.export_onnx(build_model("base", tiny()), "base", tmp_path)


def test_convert_to_onnx_of_a_classifier_keeps_labels(tmp_path):
    model = randomized("sequence_classification", 2, tiny())
    save_model(model, tmp_path / "m", meta={"id2label": {0: "neg", 1: "pos"}},
               tokenizer=WordPieceTokenizer([*SPECIAL_TOKENS, "ok"]))
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "o"), "--to", "onnx"]) == 0
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["architectures"] == ["BertForSequenceClassification"]
    x = inputs("sequence_classification", 2, 7)
    (logits,) = session(tmp_path / "o" / "model.onnx").run(None, {k: v.numpy() for k, v in x.items()})
    assert np.abs(logits - ours("sequence_classification", model, x)[0]).max() <= TOL
