"""Rotary positions (`position_embedding_type="rotary"`): relative by construction, SDPA equals the eager
reference, padding leaves real positions alone, no position table, and save/load keeps the logits."""

from __future__ import annotations

import pytest
import torch

from bertforge.errors import BertforgeError
from bertforge.model.bert import BertConfig, BertModel, apply_rotary, rotary_tables
from bertforge.model.heads import BertForMaskedLM


def rotary_config(**overrides) -> BertConfig:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=32, norm_position="pre", bias=False, ffn="geglu", hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, position_embedding_type="rotary")
    return BertConfig(**{**base, **overrides})


def test_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = rotary_tables(20, 8, 10000.0, torch.device("cpu"))

    def score(i: int, j: int) -> float:
        return float((apply_rotary(q, cos[i:i + 1], sin[i:i + 1]) * apply_rotary(k, cos[j:j + 1], sin[j:j + 1])).sum())

    assert score(3, 7) == pytest.approx(score(10, 14), abs=1e-5)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-6)  # position 0 is not rotated
    assert score(3, 7) != pytest.approx(score(3, 9), abs=1e-3)


def test_sdpa_equals_eager_and_padding_is_ignored():
    torch.manual_seed(0)
    cfg = rotary_config()
    sdpa = BertModel(cfg).eval()
    eager = BertModel(rotary_config(attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(5, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    a = sdpa(ids, mask).last_hidden_state
    b = eager(ids, mask).last_hidden_state
    assert (a - b).abs().max() <= 1e-5
    short = sdpa(ids[1:, :8]).last_hidden_state
    assert (a[1, :8] - short[0]).abs().max() <= 1e-5


def test_no_position_table_and_position_matters():
    model = BertModel(rotary_config(initializer_range=0.5))  # sharp attention: order shows clearly
    assert model.embeddings.position_embeddings is None
    assert not any("position_embeddings" in n for n, _ in model.named_parameters())
    assert not rotary_config().hf_compatible
    torch.manual_seed(1)
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    flipped = torch.tensor([[2, 12, 11, 10, 3]])
    out = model(ids).last_hidden_state[0, 2]
    assert (out - model(flipped).last_hidden_state[0, 2]).abs().max() > 1e-2  # word order is seen
    with pytest.raises(BertforgeError, match="position_ids"):
        model(ids, position_ids=torch.arange(5))
    with pytest.raises(BertforgeError, match="position_embedding_type"):
        rotary_config(position_embedding_type="alibi")


def test_save_and_load_keep_the_logits(tmp_path):
    from bertforge.model.loading import load_model, save_model

    torch.manual_seed(0)
    model = BertForMaskedLM(rotary_config()).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.position_embedding_type == "rotary"
    ids = torch.randint(5, 97, (2, 10))
    with torch.no_grad():
        assert (loaded.model(ids).logits - model(ids).logits).abs().max() == 0
