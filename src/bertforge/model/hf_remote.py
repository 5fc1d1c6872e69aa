"""Thin `transformers` classes around our own model: the tail of the exported `modeling_bertforge.py`.

This module is not imported by bertforge itself. `bertforge.model.export.modeling_source` reads its
source, inlines the bertforge modules it imports (`errors`, `model/bert.py`, `model/heads.py`, and
whatever they import from bertforge) and writes the result beside exported weights, so that

    AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)

runs *our* modules, byte for byte the code that trained the model, with only torch and transformers
installed. Nothing here re-implements a layer: each class builds our head (`build_model`), adopts its
submodules (so the state dict keys are ours and the weights file is the one `save_model` writes) and
calls our head's forward. What the classes add is Hugging Face's calling convention: HF output types,
full (B, T, V) MLM logits with an HF-style loss, `return_dict`, and `from_pretrained` / `save_pretrained`.

The config class takes our `BertConfig` fields by name (read from the dataclass, so a field added to
`BertConfig` flows through untouched) plus the usual `PretrainedConfig` keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    ModelOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
)

from bertforge.model.bert import BertConfig
from bertforge.model.heads import IGNORE_INDEX, MLMHead, build_model

try:  # transformers 5: initialisers that skip weights already loaded from the checkpoint
    from transformers import initialization as hf_init
except ImportError:  # transformers 4 initialises before loading
    hf_init = nn.init

# BertConfig fields a transformers config carries; attn_implementation is HF's own runtime setting
_MODEL_FIELDS = tuple(f for f in fields(BertConfig) if f.name != "attn_implementation")


class BertforgeConfig(PretrainedConfig):
    """Our `BertConfig` fields (HF names) plus the standard `PretrainedConfig` keys."""

    model_type = "bertforge"

    def __init__(self, **kwargs):
        values = {f.name: kwargs.pop(f.name, f.default) for f in _MODEL_FIELDS}
        kwargs.setdefault("tie_word_embeddings", False)  # the MLM decoder reads the embedding matrix itself
        super().__init__(pad_token_id=values.pop("pad_token_id"), **kwargs)
        for name, value in values.items():
            setattr(self, name, value)

    def to_bertforge(self) -> BertConfig:
        """Our dataclass config; eager attention when transformers was asked for it, SDPA otherwise."""
        eager = getattr(self, "_attn_implementation", None) == "eager"
        return BertConfig(**{f.name: getattr(self, f.name) for f in _MODEL_FIELDS},
                          attn_implementation="eager" if eager else "sdpa")


@dataclass
class BertforgePreTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None  # (B, T, V)
    seq_relationship_logits: torch.Tensor | None = None  # (B, 2)
    hidden_states: tuple[torch.Tensor, ...] | None = None


class BertforgePreTrainedModel(PreTrainedModel):
    """Holds our head's submodules under our names; `_head` is the head object that runs them."""

    config_class = BertforgeConfig
    base_model_prefix = "bert"
    main_input_name = "input_ids"
    _supports_sdpa = True
    HEAD = "base"

    def __init__(self, config: BertforgeConfig):
        super().__init__(config)
        num_labels = config.num_labels if self.HEAD == "sequence_classification" else None
        head = build_model(self.HEAD, config.to_bertforge(), num_labels)
        for name, child in head.named_children():
            self.add_module(name, child)  # shared with `head`: one set of parameters, our key names
        object.__setattr__(self, "_head", head)  # not a submodule: its parameters are registered above
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # BERT's scheme: N(0, initializer_range), zero biases, unit norms
        if isinstance(module, MLMHead):
            hf_init.zeros_(module.bias)

    def train(self, mode: bool = True):
        self._head.train(mode)
        return super().train(mode)

    def get_input_embeddings(self) -> nn.Module:
        bert = self if self.HEAD == "base" else self.bert
        return bert.embeddings.word_embeddings

    def _run(self, input_ids, attention_mask, token_type_ids, output_hidden_states, **extra):
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        return self._head(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                          **extra)

    @staticmethod
    def _finish(out: ModelOutput, return_dict: bool | None):
        return out if return_dict is None or return_dict else out.to_tuple()


class BertforgeModel(BertforgePreTrainedModel):
    """The bare encoder: last_hidden_state (B, T, H) and the tanh-pooled [CLS] (B, H)."""

    HEAD = "base"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=None, return_dict=None):
        out = self._head(input_ids, attention_mask, token_type_ids, position_ids,
                         output_hidden_states=bool(output_hidden_states or self.config.output_hidden_states))
        return self._finish(BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state,
                                                       pooler_output=out.pooler_output,
                                                       hidden_states=out.hidden_states), return_dict)


def _mlm_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    if labels is None:
        return None
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX)


class BertforgeForMaskedLM(BertforgePreTrainedModel):
    """Full (B, T, V) logits, as transformers returns them; loss over positions where labels != -100."""

    HEAD = "masked_lm"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=None, return_dict=None):
        out = self._run(input_ids, attention_mask, token_type_ids, output_hidden_states)
        return self._finish(MaskedLMOutput(loss=_mlm_loss(out.logits, labels), logits=out.logits,
                                           hidden_states=out.hidden_states), return_dict)


class BertforgeForPreTraining(BertforgePreTrainedModel):
    """Masked-LM logits (B, T, V) and next-sentence logits (B, 2); loss = MLM + NSP when labels are given."""

    HEAD = "pretraining"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                next_sentence_label=None, output_hidden_states=None, return_dict=None):
        out = self._run(input_ids, attention_mask, token_type_ids, output_hidden_states)
        parts = [_mlm_loss(out.logits, labels)]
        if next_sentence_label is not None:
            parts.append(F.cross_entropy(out.nsp_logits.float(), next_sentence_label.view(-1)))
        parts = [p for p in parts if p is not None]
        return self._finish(BertforgePreTrainingOutput(
            loss=sum(parts) if parts else None, prediction_logits=out.logits,
            seq_relationship_logits=out.nsp_logits, hidden_states=out.hidden_states), return_dict)


class BertforgeForSequenceClassification(BertforgePreTrainedModel):
    """Linear on the pooled [CLS]; one label = regression (MSE), more = classification (cross-entropy)."""

    HEAD = "sequence_classification"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=None, return_dict=None):
        out = self._run(input_ids, attention_mask, token_type_ids, output_hidden_states, labels=labels)
        return self._finish(SequenceClassifierOutput(loss=out.loss, logits=out.logits,
                                                     hidden_states=out.hidden_states), return_dict)


class BertforgeForQuestionAnswering(BertforgePreTrainedModel):
    """Start and end logits (B, T) per token."""

    HEAD = "question_answering"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, start_positions=None,
                end_positions=None, output_hidden_states=None, return_dict=None):
        out = self._run(input_ids, attention_mask, token_type_ids, output_hidden_states,
                        start_positions=start_positions, end_positions=end_positions)
        return self._finish(QuestionAnsweringModelOutput(
            loss=out.loss, start_logits=out.start_logits, end_logits=out.end_logits,
            hidden_states=out.hidden_states), return_dict)


class BertforgeForMultipleChoice(BertforgePreTrainedModel):
    """Inputs (B, C, T); one score per choice, logits (B, C)."""

    HEAD = "multiple_choice"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=None, return_dict=None):
        out = self._run(input_ids, attention_mask, token_type_ids, output_hidden_states, labels=labels)
        return self._finish(MultipleChoiceModelOutput(loss=out.loss, logits=out.logits,
                                                      hidden_states=out.hidden_states), return_dict)
