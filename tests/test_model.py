"""The model itself: SDPA vs the eager reference, padding invariance, the switches, the sparse MLM loss,
presets and config validation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config as tiny

from bertforge.errors import BertforgeError
from bertforge.model.bert import PRESETS, BertConfig, BertModel
from bertforge.model.heads import BertForMaskedLM, BertForMultipleChoice, BertForSequenceClassification
from bertforge.model.hf_compat import expected_shapes

TOL = 1e-5
SWITCHES = list(itertools.product(["post", "pre"], [True, False], ["mlp", "geglu"]))




def randomized(config: BertConfig, seed: int = 0) -> BertModel:
    """A BertModel with every parameter random (LayerNorms and biases too)."""
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def padded_batch(lengths=(9, 4, 7), T: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    types = ((torch.arange(T)[None] >= 3) & (mask == 1)).long()
    return ids * mask, mask, types


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_sdpa_equals_eager(norm_position):
    sdpa = randomized(tiny(norm_position=norm_position))
    eager = BertModel(tiny(norm_position=norm_position, attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    ids, mask, types = padded_batch()
    with torch.no_grad():
        a = sdpa(ids, mask, types, output_hidden_states=True)
        b = eager(ids, mask, types, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    for x, y in zip((a.last_hidden_state, a.pooler_output, *a.hidden_states),
                    (b.last_hidden_state, b.pooler_output, *b.hidden_states)):
        assert max_diff(x, y) <= TOL


def test_sdpa_equals_eager_with_a_fully_padded_row():
    """A padded choice in multiple choice is an all-padding row: SDPA gives 0 there, the eager
    reference must agree and stay finite (forward and backward)."""
    config = tiny()
    torch.manual_seed(0)
    models = {impl: BertForMultipleChoice(tiny(attn_implementation=impl)) for impl in ("sdpa", "eager")}
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    ids = torch.randint(5, config.vocab_size, (2, 3, 6))
    mask = torch.ones(2, 3, 6, dtype=torch.long)
    mask[1, 2] = 0  # the second example has only two real choices
    choices = mask.any(-1)
    outs = {}
    for impl, model in models.items():
        out = model(ids * mask, mask, labels=torch.tensor([0, 1]), choice_mask=choices)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(torch.isfinite(g).all() for g in grads), f"{impl}: non-finite gradients"
        outs[impl] = out
    assert max_diff(outs["sdpa"].logits[choices], outs["eager"].logits[choices]) <= TOL


@pytest.mark.parametrize("norm_position,impl", list(itertools.product(["post", "pre"], ["sdpa", "eager"])))
def test_padding_does_not_change_real_positions(norm_position, impl):
    model = randomized(tiny(norm_position=norm_position, attn_implementation=impl))
    ids, mask, types = padded_batch()
    with torch.no_grad():
        batch = model(ids, mask, types)
        for i, n in enumerate(mask.sum(1).tolist()):
            alone = model(ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n])
            assert max_diff(batch.last_hidden_state[i, :n], alone.last_hidden_state[0]) <= TOL
            assert max_diff(batch.pooler_output[i], alone.pooler_output[0]) <= TOL


@pytest.mark.parametrize("norm_position,bias,ffn", SWITCHES)
def test_switches_build_expected_parameters(norm_position, bias, ffn):
    config = tiny(norm_position=norm_position, bias=bias, ffn=ffn)
    model = BertForMaskedLM(config)
    names = dict(model.named_parameters())
    bias_names = sorted(n for n in names if n.endswith("bias"))
    if bias:
        assert "bert.layers.0.attention.qkv.bias" in names and "bert.embeddings.norm.bias" in names
    else:
        assert bias_names == ["cls.bias"]  # only the decoder's output bias remains
    has_final = any(n.startswith("bert.final_norm.") for n in names)
    assert has_final == (norm_position == "pre")
    H, I = config.hidden_size, config.intermediate_size
    assert names["bert.layers.1.ffn.up.weight"].shape == ((2 * I if ffn == "geglu" else I), H)
    assert names["bert.layers.1.ffn.down.weight"].shape == (H, I)
    assert config.hf_compatible == (norm_position == "post" and bias and ffn == "mlp")


@pytest.mark.parametrize("norm_position,bias,ffn", SWITCHES)
def test_switches_train(norm_position, bias, ffn):
    """A few AdamW steps on one fixed batch lower the MLM loss, whatever the switches."""
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny(norm_position=norm_position, bias=bias, ffn=ffn)).train()
    ids, mask, types = padded_batch(seed=2)
    labels = torch.full_like(ids, -100)
    labels[:, 1::3] = ids[:, 1::3]
    labels[mask == 0] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, mask, types, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_sparse_mlm_loss_equals_dense_cross_entropy():
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny()).eval()
    ids, mask, types = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[0, [1, 5]] = torch.tensor([7, 8])
    labels[2, 3] = 11
    with torch.no_grad():
        sparse = model(ids, mask, types, labels=labels)
        dense = model(ids, mask, types).logits  # (B, T, V)
    assert sparse.logits.shape == (3, tiny().vocab_size)
    assert max_diff(sparse.logits, dense[labels != -100]) <= TOL
    ref = F.cross_entropy(dense.view(-1, dense.shape[-1]), labels.view(-1), ignore_index=-100)
    assert abs(sparse.loss.item() - ref.item()) <= TOL


def test_no_masked_token_gives_zero_loss_and_backprops():
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny())
    ids, mask, types = padded_batch()
    out = model(ids, mask, types, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.logits.shape == (0, tiny().vocab_size)
    out.loss.backward()
    grad = model.bert.layers[0].attention.qkv.weight.grad
    assert grad is not None and torch.all(grad == 0)


def bert_params(c: BertConfig) -> int:
    """BertModel parameters from the shapes in the BERT paper (embeddings, L layers, pooler)."""
    H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * H + 2 * H
    layer = 4 * H * H + 4 * H + 2 * H * I + I + H + 4 * H  # attention, ffn, two LayerNorms
    return embeddings + L * layer + H * H + H


def test_presets_are_sane():
    for name, config in PRESETS.items():
        assert BertConfig.from_preset(name) == config
        assert config.hidden_size % config.num_attention_heads == 0, name
        budget = name.startswith("budget") or name == "crammed"
        assert (config.norm_position, config.bias, config.ffn) == (
            ("pre", False, "geglu") if budget else ("post", True, "mlp")), name
    t = PRESETS["tiny"]
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == \
        (99, 32, 2, 4, 37)
    sizes = [sum(s.numel() for s in expected_shapes(PRESETS[n], "base").values())
             for n in ("mini", "small", "medium", "base", "large")]
    assert sizes == sorted(sizes)
    for name in ("tiny", "mini", "base", "large"):  # base: 109,482,240 as bert-base-uncased
        counted = sum(s.numel() for s in expected_shapes(PRESETS[name], "base").values())
        assert counted == bert_params(PRESETS[name]), name


@pytest.mark.parametrize("overrides,named", [
    (dict(hidden_size=30), "num_attention_heads"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(ffn="swiglu"), "ffn"),
    (dict(attn_implementation="flash"), "attn_implementation"),
    (dict(hidden_act="mish"), "hidden_act"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_hidden_layers=-1), "num_hidden_layers"),
    (dict(pad_token_id=99), "pad_token_id"),
    (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    (dict(attention_probs_dropout_prob=-0.1), "attention_probs_dropout_prob"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
])
def test_config_rejects_bad_values(overrides, named):
    with pytest.raises(BertforgeError, match=named):
        BertConfig.from_preset("tiny", **overrides)


def test_config_rejects_unknown_names():
    with pytest.raises(BertforgeError, match="hidden_sise"):
        BertConfig.from_dict({**tiny().to_dict(), "hidden_sise": 3})
    with pytest.raises(BertforgeError, match="gigantic"):
        BertConfig.from_preset("gigantic")


def test_too_long_input_raises():
    model = BertModel(tiny(max_position_embeddings=16))
    model(torch.ones(1, 16, dtype=torch.long))  # exactly the limit is fine
    with pytest.raises(BertforgeError, match="max_position_embeddings 16"):
        model(torch.ones(1, 17, dtype=torch.long))


@pytest.mark.parametrize("norm_position,ffn,positions", [("post", "mlp", "absolute"), ("pre", "geglu", "absolute"),
                                                        ("pre", "geglu", "rotary")])
def test_sparse_last_layer_equals_full_encoder_loss_and_gradients(norm_position, ffn, positions):
    """BertForMaskedLM with labels runs its last layer at the masked rows only; the loss and every
    gradient equal the full encoder followed by the gather (pre- and post-LN, padded rows, rotary)."""
    config = tiny(norm_position=norm_position, ffn=ffn, position_embedding_type=positions)
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    ids, mask, types = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[0, [0, 5, 8]] = torch.tensor([7, 8, 9])
    labels[1, 2] = 11
    labels[2, [3, 6]] = torch.tensor([12, 13])
    sparse = model(ids, mask, types, labels=labels)
    sparse.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = model.bert(ids, mask, types).last_hidden_state  # (B, T, H), every layer in full
    weight = model.bert.embeddings.word_embeddings.weight
    logits = model.cls(full[labels != -100], weight)
    ref = F.cross_entropy(logits, labels[labels != -100])
    ref.backward()
    assert abs(sparse.loss.item() - ref.item()) <= TOL
    assert max_diff(sparse.logits, logits) <= TOL
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert max_diff(grads[n], p.grad) <= TOL, n
    with_states = model(ids, mask, types, labels=labels, output_hidden_states=True)  # the full path
    assert abs(with_states.loss.item() - ref.item()) <= TOL
    assert with_states.hidden_states[-1].shape == (*ids.shape, config.hidden_size)


def test_mean_classifier_pooling_reads_the_real_tokens_only():
    """classifier_pooling="mean": the tanh pooler over the mean of the unpadded tokens' final states, so
    padding a sequence leaves its logits alone; "cls" (BERT's) reads the first token."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny(classifier_pooling="mean"), num_labels=3).eval()
    ids = torch.tensor([[2, 9, 17, 23, 3]])
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = (padded != 0).long()
    with torch.no_grad():
        alone = model(ids).logits
        with_pads = model(padded, attention_mask=mask).logits
        h = model.bert(ids).last_hidden_state
        by_hand = model.classifier(torch.tanh(model.bert.pooler(h.mean(dim=1))))
        cls = BertForSequenceClassification(tiny(), num_labels=3).eval()
        cls.load_state_dict(model.state_dict())
        first = cls.classifier(cls.bert(ids).pooler_output)
    assert torch.allclose(alone, with_pads, atol=1e-6)
    assert torch.allclose(alone, by_hand, atol=1e-6)
    assert not torch.allclose(cls(ids).logits.detach(), alone, atol=1e-3)
    assert torch.allclose(cls(ids).logits.detach(), first.detach(), atol=1e-6)
    with pytest.raises(BertforgeError, match="classifier_pooling 'max'"):
        tiny(classifier_pooling="max")
    with pytest.raises(BertforgeError, match=r"\['hidden_size'\] fix the weights' shapes"):
        tiny().with_runtime(hidden_size=64)
    assert tiny().with_runtime(hidden_dropout_prob=0.1).hidden_dropout_prob == 0.1
