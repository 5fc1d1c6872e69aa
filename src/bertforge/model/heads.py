"""Task heads on top of `BertModel`: pretraining (sparse MLM + NSP), MLM, classification/regression,
span QA and multiple choice. Each head is thin: the encoder, one small module, a loss.

The MLM decoder is tied to the word embeddings. With labels, logits are computed only at labelled
positions (`labels != -100`), in row-major order: the vocabulary projection, the most expensive op of
pretraining a small BERT, shrinks by the masking rate (about 7x at 15%). `BertForMaskedLM` goes one
step further (sparse prediction): its encoder's last layer runs its output projection and feed-forward
only at those positions (`BertModel(output_positions=...)`), since nothing else reaches the loss.
Without labels the full (B, T, V) logits come back, as Hugging Face's `BertForMaskedLM` returns them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bertforge.model.bert import ACTIVATIONS, BertConfig, BertModel, init_weights

IGNORE_INDEX = -100


@dataclass
class PreTrainingOutput:
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (M, V) at labelled positions, or (B, T, V) without labels
    nsp_logits: torch.Tensor | None = None  # (B, 2)
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class ClassifierOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, num_labels) / (B, C) / (B,) for regression
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class SpanOutput:
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None  # (B, T)
    end_logits: torch.Tensor | None = None  # (B, T)
    hidden_states: tuple[torch.Tensor, ...] | None = None


class MLMHead(nn.Module):
    """Dense -> act -> LayerNorm -> decoder tied to the word embeddings (+ its own bias).

    The decoder weight is passed in at call time (the word embedding matrix), so the tie is explicit
    and the state dict holds the matrix once.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.dense = nn.Linear(H, H, bias=config.bias)
        self.act = ACTIVATIONS[config.hidden_act]
        self.norm = nn.LayerNorm(H, eps=config.layer_norm_eps, bias=config.bias)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.act(self.dense(h)))  # (..., H)
        return F.linear(h, decoder_weight, self.bias)  # (..., V)


def sparse_mlm(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Without labels: hidden (B, T, H) -> full logits (B, T, V), no loss. With labels: hidden (M, H) holds
    the final states at the labelled positions (`labels != -100`, row-major) -> their logits (M, V) and
    mean cross-entropy."""
    weight = model.bert.embeddings.word_embeddings.weight  # (V, H), tied decoder
    logits = model.cls(hidden, weight)
    if labels is None:
        return logits, None
    targets = labels[labels != IGNORE_INDEX]  # (M,)
    if targets.numel() == 0:
        return logits, hidden.sum() * 0.0  # no masked token in this batch: zero loss, graph intact
    return logits, F.cross_entropy(logits.float(), targets)


class BertForMaskedLM(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = MLMHead(config)
        self.cls.apply(lambda m: init_weights(m, config))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states: bool = False) -> PreTrainingOutput:
        keep = labels != IGNORE_INDEX if labels is not None else None  # (B, T): the positions the loss reads
        out = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states,
                        output_positions=keep)
        logits, loss = sparse_mlm(self, out.last_hidden_state, labels)
        return PreTrainingOutput(loss=loss, mlm_loss=loss, logits=logits, hidden_states=out.hidden_states)


class BertForPreTraining(nn.Module):
    """Sparse MLM + next-sentence prediction on the pooled [CLS]."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=True)
        self.cls = MLMHead(config)
        self.nsp = nn.Linear(config.hidden_size, 2)
        self.cls.apply(lambda m: init_weights(m, config))
        init_weights(self.nsp, config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                next_sentence_label=None, output_hidden_states: bool = False) -> PreTrainingOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state if labels is None else out.last_hidden_state[labels != IGNORE_INDEX]
        logits, mlm_loss = sparse_mlm(self, hidden, labels)  # the pooled [CLS] needs every position's last layer
        nsp_logits = self.nsp(out.pooler_output)  # (B, 2)
        nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label) if next_sentence_label is not None else None
        parts = [x for x in (mlm_loss, nsp_loss) if x is not None]
        loss = sum(parts) if parts else None
        return PreTrainingOutput(loss, mlm_loss, nsp_loss, logits, nsp_logits, out.hidden_states)


def classifier_input(bert: BertModel, out, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """What a classifier reads (B, H): the tanh pooler over the [CLS] state (`classifier_pooling="cls"`,
    BERT's) or over the mean of the real tokens' final states ("mean", ModernBERT's option)."""
    if bert.config.classifier_pooling == "cls":
        return out.pooler_output
    h = out.last_hidden_state  # (B, T, H)
    if attention_mask is None:
        mean = h.mean(dim=1)
    else:
        m = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        mean = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    return torch.tanh(bert.pooler(mean))  # (B, H)


class BertForSequenceClassification(nn.Module):
    """Dropout + linear on the pooled [CLS] (or mean, see `classifier_input`); num_labels == 1 is
    regression (MSE)."""

    def __init__(self, config: BertConfig, num_labels: int = 2):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config, add_pooling_layer=True)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self.classifier, config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states: bool = False) -> ClassifierOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(classifier_input(self.bert, out, attention_mask)))  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.view(-1).float(), labels.float().view(-1))
            else:
                loss = F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(loss, logits, out.hidden_states)


class BertForQuestionAnswering(nn.Module):
    """Start/end logits per token; positions outside the sequence are clamped and ignored (as HF)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        init_weights(self.qa_outputs, config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start_positions=None,
                end_positions=None, output_hidden_states: bool = False) -> SpanOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states)
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).unbind(dim=-1)  # 2 x (B, T)
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start_logits.shape[1]
            start = start_positions.clamp(0, T)
            end = end_positions.clamp(0, T)
            loss = (F.cross_entropy(start_logits.float(), start, ignore_index=T)
                    + F.cross_entropy(end_logits.float(), end, ignore_index=T)) / 2
        return SpanOutput(loss, start_logits, end_logits, out.hidden_states)


class BertForMultipleChoice(nn.Module):
    """Each (context, choice) pair scored by a linear on its pooled [CLS] (or mean); softmax over choices."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=True)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, 1)
        init_weights(self.classifier, config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                choice_mask=None, output_hidden_states: bool = False) -> ClassifierOutput:
        """input_ids (B, C, T); choice_mask (B, C) bool marks real choices when counts differ."""
        B, C, T = input_ids.shape

        def flat(x):
            return x.reshape(B * C, T) if x is not None else None

        out = self.bert(flat(input_ids), flat(attention_mask), flat(token_type_ids),
                        output_hidden_states=output_hidden_states)
        pooled = classifier_input(self.bert, out, flat(attention_mask))  # (B * C, H)
        logits = self.classifier(self.dropout(pooled)).view(B, C)  # (B, C)
        if choice_mask is not None:
            logits = logits.masked_fill(~choice_mask.bool(), torch.finfo(logits.dtype).min)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ClassifierOutput(loss, logits, out.hidden_states)


# name -> class; the name is stored in a saved model's config so loading needs no flags.
HEADS: dict[str, type[nn.Module]] = {
    "base": BertModel,
    "pretraining": BertForPreTraining,
    "masked_lm": BertForMaskedLM,
    "sequence_classification": BertForSequenceClassification,
    "question_answering": BertForQuestionAnswering,
    "multiple_choice": BertForMultipleChoice,
}


def build_model(head: str, config: BertConfig, num_labels: int | None = None) -> nn.Module:
    """Instantiate a head by name (see HEADS)."""
    from bertforge.errors import BertforgeError

    if head not in HEADS:
        raise BertforgeError(f"unknown model head '{head}': use one of {', '.join(HEADS)}")
    if head == "sequence_classification":
        return BertForSequenceClassification(config, num_labels or 2)
    return HEADS[head](config)
