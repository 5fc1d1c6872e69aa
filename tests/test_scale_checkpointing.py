"""Activation (gradient) checkpointing: same loss and gradients as the plain path, less saved for backward."""

from __future__ import annotations

import pytest
import torch

from bertforge.model.bert import BertConfig
from bertforge.model.heads import BertForMaskedLM, BertForSequenceClassification


def batch(vocab: int, B: int = 4, T: int = 24, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 18:] = 0  # one padded row: the attention mask goes through the checkpoint too
    labels = torch.full((B, T), -100)
    pick = torch.rand(B, T, generator=g) < 0.3
    labels[pick] = ids[pick]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model: torch.nn.Module, b: dict, seed: int = 7) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)  # dropout draws the same masks in both runs
    model.zero_grad(set_to_none=True)
    loss = model(**b).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", [{}, {"norm_position": "pre", "ffn": "geglu", "bias": False,
                                         "position_embedding_type": "rotary"}])
@pytest.mark.parametrize("head", [BertForMaskedLM, BertForSequenceClassification])
def test_checkpointing_gives_the_same_loss_and_gradients(layout, head):
    kw = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **layout)
    cfg = BertConfig.from_preset("tiny", **kw)
    torch.manual_seed(0)
    plain = head(cfg).train()
    ckpt = head(BertConfig.from_preset("tiny", gradient_checkpointing=True, **kw)).train()
    ckpt.load_state_dict(plain.state_dict())
    b = batch(cfg.vocab_size)
    if head is BertForSequenceClassification:
        b["labels"] = torch.tensor([0, 1, 1, 0])
    la, ga = loss_and_grads(plain, b)
    lb, gb = loss_and_grads(ckpt, b)
    assert abs(la.item() - lb.item()) <= 1e-6
    assert ga.keys() == gb.keys() and len(ga) == sum(1 for p in plain.parameters() if p.requires_grad)
    assert max((ga[k] - gb[k]).abs().max().item() for k in ga) <= 1e-6


def saved_bytes(model: torch.nn.Module, b: dict) -> int:
    """Bytes of tensors autograd keeps for backward during one forward (the activation memory)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**b).loss.backward()
    return total


def test_checkpointing_keeps_less_for_backward_and_is_off_in_eval():
    kw = dict(num_hidden_layers=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    plain = BertForMaskedLM(BertConfig.from_preset("tiny", **kw)).train()
    ckpt = BertForMaskedLM(BertConfig.from_preset("tiny", gradient_checkpointing=True, **kw)).train()
    ckpt.load_state_dict(plain.state_dict())
    b = batch(plain.config.vocab_size, B=8, T=64)
    full, kept = saved_bytes(plain, b), saved_bytes(ckpt, b)
    assert kept < 0.5 * full, (kept, full)
    with torch.no_grad():  # inference never recomputes: same outputs, no checkpoint calls
        assert torch.equal(plain.eval()(**b).logits, ckpt.eval()(**b).logits)
