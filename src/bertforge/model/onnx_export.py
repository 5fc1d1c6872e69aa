"""ONNX export of every head, and of sentence encoders with their pooling (`bertforge convert --to onnx`).

`export_onnx` uses the torch.export-based exporter (`dynamo=True`, onnxscript), dynamic batch and
sequence axes (and choices for multiple choice), inputs `input_ids`, `attention_mask`,
`token_type_ids` (int64). During the export the attention mask is always applied (our encoder drops
an all-ones mask at run time, a data-dependent branch a graph cannot keep).

Shapes: B batch, T sequence length, C choices, H hidden size.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from bertforge.errors import BertforgeError
from bertforge.model import bert as bert_module
from bertforge.model.pooling import normalize, pool

ONNX_NAME = "model.onnx"
ONNX_OUTPUTS: dict[str, tuple[str, ...]] = {
    "base": ("last_hidden_state", "pooler_output"),
    "pretraining": ("prediction_logits", "seq_relationship_logits"),
    "masked_lm": ("logits",),
    "sequence_classification": ("logits",),
    "question_answering": ("start_logits", "end_logits"),
    "multiple_choice": ("logits",),
    "sentence": ("token_embeddings", "sentence_embedding"),
}
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_OPSET = 18


class _OnnxHead(nn.Module):
    """Our head with plain tensor inputs and a tuple of the outputs named in ONNX_OUTPUTS."""

    def __init__(self, model: nn.Module, head: str, pooling: str | None = None, normalize: bool = False):
        super().__init__()
        self.model, self.head, self.pooling, self.normalize = model, head, pooling, normalize

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids, attention_mask, token_type_ids)
        if self.head == "sentence":
            h = out.last_hidden_state  # (B, T, H)
            emb = pool(h, attention_mask, self.pooling)  # (B, H)
            return h, normalize(emb) if self.normalize else emb
        if self.head == "base":
            return out.last_hidden_state, out.pooler_output
        if self.head == "pretraining":
            return out.logits, out.nsp_logits
        if self.head == "question_answering":
            return out.start_logits, out.end_logits
        return (out.logits,)


def _always_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if attention_mask is None else attention_mask[:, None, None, :].to(torch.bool)


def export_onnx(model: nn.Module, head: str, folder: Path, *, pooling: str | None = None,
                normalize: bool = False, opset: int = ONNX_OPSET) -> dict:
    """Write `folder/model.onnx` for `model` (head `head`, or "sentence": a bare encoder + pooling).

    Returns the input and output names. Needs the `onnx` extra (onnx, onnxscript).
    """
    for package in ("onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            raise BertforgeError(f"ONNX export needs the '{package}' package: pip install 'bertforge[onnx]'")
    config = model.config
    wrapper = _OnnxHead(model, head, pooling, normalize).eval()
    choice = head == "multiple_choice"
    B, C, T = 2, 2, min(8, config.max_position_embeddings)
    shape = (B, C, T) if choice else (B, T)
    ids = torch.randint(0, config.vocab_size, shape)
    mask = torch.ones(shape, dtype=torch.long)
    mask.view(-1, T)[0, T // 2:] = 0  # a padded row, so the mask is a real input of the graph
    types = torch.zeros(shape, dtype=torch.long)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", min=1, max=config.max_position_embeddings)
    axes = {0: batch, 1: torch.export.Dim("choices"), 2: seq} if choice else {0: batch, 1: seq}
    names = ONNX_OUTPUTS[head]
    with torch.no_grad(), mock.patch.object(bert_module, "extended_attention_mask", _always_mask), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # names are kept
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = registry_log.level
        registry_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms"
        try:
            torch.onnx.export(wrapper, (ids, mask, types), str(folder / ONNX_NAME), input_names=list(ONNX_INPUTS),
                              output_names=list(names), dynamic_shapes={k: axes for k in ONNX_INPUTS},
                              opset_version=opset, dynamo=True, external_data=False, verbose=False)
        finally:
            registry_log.setLevel(level)
    return {"inputs": list(ONNX_INPUTS), "outputs": list(names), "opset": opset}
