"""Hugging Face BERT <-> bertforge: one explicit key table, state-dict conversion both ways, configs.

`KEY_MAP` is the whole correspondence, one row per parameter family. Both sides are written in a
canonical form where the encoder carries the `bert.` prefix (a bare `BertModel` state dict, ours or
HF's, is prefixed on the way in and stripped on the way out). Our fused attention projection `qkv`
is `cat(query, key, value)` along dim 0, so its row maps to three HF tensors.

Every conversion checks every key and shape (nanoGPT-style) and raises one `BertforgeError` listing
all unmapped, missing and unexpected keys and all shape mismatches, never a partial load.

HF extras handled explicitly: old `LayerNorm.gamma`/`beta` names, the tied MLM decoder
(`cls.predictions.decoder.weight/bias`, checked equal to what they are tied to, then dropped), and
the `embeddings.position_ids`/`token_type_ids` buffers older checkpoints saved.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch.overrides import TorchFunctionMode

from bertforge.errors import BertforgeError
from bertforge.model.bert import ACTIVATIONS, BertConfig

# HF architecture name <-> our head name (bertforge.model.heads.HEADS)
HF_ARCHITECTURES: dict[str, str] = {
    "BertModel": "base",
    "BertForPreTraining": "pretraining",
    "BertForMaskedLM": "masked_lm",
    "BertForSequenceClassification": "sequence_classification",
    "BertForQuestionAnswering": "question_answering",
    "BertForMultipleChoice": "multiple_choice",
}
HEAD_TO_ARCHITECTURE = {head: arch for arch, head in HF_ARCHITECTURES.items()}

_QKV = ("query", "key", "value")
_LAYER = "bert.encoder.layer.{i}."

# ours <-> HF, canonical names; {i} = layer index, {p} = weight|bias. A tuple is fused (cat on dim 0).
KEY_MAP: list[tuple[str, str | tuple[str, ...]]] = [
    ("bert.embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
    ("bert.embeddings.position_embeddings.weight", "bert.embeddings.position_embeddings.weight"),
    ("bert.embeddings.token_type_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"),
    ("bert.embeddings.norm.{p}", "bert.embeddings.LayerNorm.{p}"),
    ("bert.layers.{i}.attention.qkv.{p}", tuple(_LAYER + f"attention.self.{n}.{{p}}" for n in _QKV)),
    ("bert.layers.{i}.attention.out.{p}", _LAYER + "attention.output.dense.{p}"),
    ("bert.layers.{i}.attn_norm.{p}", _LAYER + "attention.output.LayerNorm.{p}"),
    ("bert.layers.{i}.ffn.up.{p}", _LAYER + "intermediate.dense.{p}"),
    ("bert.layers.{i}.ffn.down.{p}", _LAYER + "output.dense.{p}"),
    ("bert.layers.{i}.ffn_norm.{p}", _LAYER + "output.LayerNorm.{p}"),
    ("bert.pooler.{p}", "bert.pooler.dense.{p}"),
    ("cls.dense.{p}", "cls.predictions.transform.dense.{p}"),
    ("cls.norm.{p}", "cls.predictions.transform.LayerNorm.{p}"),
    ("cls.bias", "cls.predictions.bias"),
    ("nsp.{p}", "cls.seq_relationship.{p}"),
    ("classifier.{p}", "classifier.{p}"),
    ("qa_outputs.{p}", "qa_outputs.{p}"),
]

# HF keys tied to another HF key (the MLM decoder): equal to their source or the model is not ours.
HF_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
           "cls.predictions.decoder.bias": "cls.predictions.bias"}
# Non-persistent buffers that older transformers versions wrote into checkpoints.
HF_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
_ENCODER_ROOTS = ("embeddings.", "encoder.", "pooler.", "layers.", "final_norm.")


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(rx + "$")


_OURS_RX = [(_pattern(ours), hf) for ours, hf in KEY_MAP]
_HF_RX = []  # (pattern of one HF name, our template, number of fused parts, index of this part)
for _ours, _hf in KEY_MAP:
    _names = _hf if isinstance(_hf, tuple) else (_hf,)
    _HF_RX += [(_pattern(name), _ours, len(_names), j) for j, name in enumerate(_names)]


def _fill(template: str, m: re.Match) -> str:
    groups = m.groupdict()
    return template.replace("{i}", groups.get("i") or "").replace("{p}", groups.get("p") or "")


def add_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare encoder keys (`embeddings.`, `layers.`, ...) -> `bert.`-prefixed canonical keys."""
    return {("bert." + k if k.startswith(_ENCODER_ROOTS) else k): v for k, v in sd.items()}


def strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("bert."): v for k, v in sd.items()}


def format_keys(keys) -> str:
    """Sorted keys, comma-separated, the first 12 then a count."""
    keys = sorted(keys)
    return ", ".join(keys[:12]) + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "")


def _normalize_hf_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> canonical HF names: `bert.` prefix on the encoder, LayerNorm gamma/beta -> weight/bias."""
    out = {}
    for k, v in add_prefix(sd).items():
        if ".LayerNorm." in k or k.startswith("LayerNorm."):
            k = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k))
        out[k] = v
    return out


def convert_from_hf(sd: Mapping[str, torch.Tensor], what: str = "HF state dict") -> dict[str, torch.Tensor]:
    """Rename HF keys to ours (canonical, `bert.`-prefixed) and fuse q/k/v; no check against a model.

    Raises on keys the table does not know, on a fused q/k/v with a part missing, and on an untied
    decoder (a decoder that differs from the word embeddings cannot live in our tied MLM head).
    """
    sd = _normalize_hf_keys(sd)
    for key in HF_BUFFERS:
        sd.pop(key, None)
    for key, source in HF_TIED.items():
        if key in sd:
            tied = sd.pop(key)
            if source in sd and not torch.equal(tied, sd[source]):
                raise BertforgeError(f"{what}: '{key}' differs from '{source}' (an untied MLM decoder): "
                                     f"bertforge ties the decoder to '{source}', re-tie it before converting")
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}
    unmapped = []
    for key, value in sd.items():
        for rx, ours, n_parts, j in _HF_RX:
            m = rx.match(key)
            if m:
                name = _fill(ours, m)
                if n_parts == 1:
                    out[name] = value
                else:
                    fused.setdefault(name, [None] * n_parts)[j] = value
                break
        else:
            unmapped.append(key)
    incomplete = []
    for name, parts in fused.items():
        if any(p is None for p in parts):
            incomplete.append(name)
        else:
            out[name] = torch.cat(parts, dim=0)  # (3H, H) or (3H,)
    if unmapped or incomplete:
        parts = [f"{label} [{format_keys(keys)}]" for label, keys in
                 (("unmapped keys", unmapped), ("query/key/value incomplete for", incomplete)) if keys]
        raise BertforgeError(f"{what}: {'; '.join(parts)}: this is not a supported BERT checkpoint")
    return out


def convert_to_hf(sd: Mapping[str, torch.Tensor], *, tied: bool = False) -> dict[str, torch.Tensor]:
    """Rename our canonical keys to HF's and split qkv; `tied` also writes the tied decoder keys."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in sd.items():
        for rx, hf in _OURS_RX:
            m = rx.match(key)
            if m:
                names = hf if isinstance(hf, tuple) else (hf,)
                parts = value.chunk(len(names), dim=0) if len(names) > 1 else (value,)
                for name, part in zip(names, parts):
                    out[_fill(name, m)] = part.contiguous()
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise BertforgeError(f"bertforge state dict: unmapped keys [{format_keys(unmapped)}]: "
                             f"only BERT-compatible bertforge models convert to Hugging Face")
    if tied and "cls.predictions.bias" in out:  # an MLM head
        for key, source in HF_TIED.items():
            out[key] = out[source]
    return out


class _SkipRandomInit(TorchFunctionMode):
    """Random init is a no-op: on the meta device `normal_` would import torch._dynamo (seconds)."""

    SKIP = frozenset({torch.nn.init.normal_, torch.nn.init.trunc_normal_, torch.nn.init.uniform_,
                      torch.nn.init.kaiming_uniform_, torch.Tensor.normal_, torch.Tensor.uniform_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIP:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def expected_shapes(config: BertConfig, head: str, num_labels: int | None = None) -> dict[str, torch.Size]:
    """Our parameter names and shapes for `head`, from the model built on the meta device (no memory)."""
    from bertforge.model.heads import build_model

    with torch.device("meta"), _SkipRandomInit():
        model = build_model(head, config, num_labels)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_state_dict(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str) -> None:
    """Raise one error listing every missing key, unexpected key and shape mismatch."""
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k])}" for k in sorted(set(sd) & set(expected))
              if tuple(sd[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        parts = [f"{label} [{format_keys(keys)}]" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected)) if keys]
        if shapes:
            parts.append(f"shape mismatches [{'; '.join(shapes[:12])}]")
        raise BertforgeError(f"{what} does not fit the model: {'; '.join(parts)}: "
                             f"check the config and head match the checkpoint")


def _num_labels(sd: Mapping[str, torch.Tensor], head: str) -> int | None:
    w = sd.get("classifier.weight")
    return int(w.shape[0]) if head == "sequence_classification" and w is not None else None


def from_hf_state_dict(sd: Mapping[str, torch.Tensor], config: BertConfig, head: str,
                       num_labels: int | None = None) -> dict[str, torch.Tensor]:
    """HF BERT state dict (with or without `bert.`) -> our state dict for `head`, every key checked.

    `num_labels` defaults to the classifier's row count for sequence classification.
    """
    ours = convert_from_hf(sd)
    check_state_dict(ours, add_prefix(expected_shapes(config, head, num_labels or _num_labels(ours, head))),
                     f"HF state dict for head '{head}'")
    return strip_prefix(ours) if head == "base" else ours


def to_hf_state_dict(our_sd: Mapping[str, torch.Tensor], config: BertConfig, head: str, *,
                     tied: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict for `head` -> HF BERT state dict (`bert.` prefix except for head "base").

    The tied decoder keys are left out, as `save_pretrained` does, unless `tied=True` (needed for a
    strict `load_state_dict` into a transformers model).
    """
    require_hf_compatible(config)
    sd = add_prefix(our_sd)
    check_state_dict(sd, add_prefix(expected_shapes(config, head, _num_labels(sd, head))),
                     f"bertforge state dict for head '{head}'")
    hf = convert_to_hf(sd, tied=tied)
    return {k.removeprefix("bert."): v for k, v in hf.items()} if head == "base" else hf


def require_hf_compatible(config: BertConfig) -> None:
    """Raise unless Hugging Face's BERT can hold a model with this config exactly."""
    if not config.hf_compatible:
        why = [s for s, bad in (("norm_position='pre'", config.norm_position != "post"),
                                ("bias=False", not config.bias), ("ffn='geglu'", config.ffn != "mlp"),
                                ("position_embedding_type='rotary'", config.position_embedding_type != "absolute"),
                                ("classifier_pooling='mean'", config.classifier_pooling != "cls")) if bad]
        raise BertforgeError(f"model config with {', '.join(why)} has no Hugging Face BERT equivalent: "
                             f"save_model and `bertforge convert --to hf` write it with its own modeling file "
                             f"(load with trust_remote_code=True)")


_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
              "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "classifier_dropout")


def config_from_hf(hf: Mapping) -> BertConfig:
    """An HF BERT config.json dict -> BertConfig; anything HF BERT features we lack is an error."""
    if hf.get("model_type") != "bert":
        raise BertforgeError(f"config model_type '{hf.get('model_type')}' is not 'bert': bertforge loads "
                             f"BERT checkpoints only (BertModel and its task heads)")
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise BertforgeError(f"position_embedding_type '{position}' is not supported: bertforge models use "
                             f"'absolute' position embeddings only")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise BertforgeError("config has is_decoder/add_cross_attention set: bertforge loads BERT encoders only")
    if "pad_token_id" in hf and hf["pad_token_id"] is None:
        raise BertforgeError("config pad_token_id is null: set it to the id of [PAD] (0 in BERT vocabularies)")
    if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise BertforgeError(f"config hidden_act '{hf.get('hidden_act')}' is not supported: use one of "
                             f"{', '.join(sorted(ACTIVATIONS))}")
    return BertConfig(**{k: hf[k] for k in _HF_FIELDS if k in hf})


def head_from_hf(hf: Mapping) -> str:
    """The head named by an HF config's `architectures` ("base" when it names none)."""
    archs = hf.get("architectures") or ["BertModel"]
    if len(archs) != 1 or archs[0] not in HF_ARCHITECTURES:
        raise BertforgeError(f"config architectures {archs} is not supported: use one of "
                             f"{', '.join(HF_ARCHITECTURES)}")
    return HF_ARCHITECTURES[archs[0]]


def labels_from_hf(hf: Mapping) -> tuple[int | None, dict[int, str] | None]:
    """(num_labels, id2label) from an HF config; id2label keys as ints."""
    id2label = hf.get("id2label")
    if id2label is not None:
        id2label = {int(k): str(v) for k, v in id2label.items()}
    num_labels = hf.get("num_labels", len(id2label) if id2label else None)
    return num_labels, id2label


def config_to_hf(config: BertConfig, head: str = "base", num_labels: int | None = None,
                 id2label: Mapping[int, str] | None = None) -> dict:
    """BertConfig (+ head, labels) -> an HF config.json dict that transformers' AutoConfig reads."""
    require_hf_compatible(config)
    if head not in HEAD_TO_ARCHITECTURE:
        raise BertforgeError(f"unknown head '{head}': use one of {', '.join(HEAD_TO_ARCHITECTURE)}")
    out = {"architectures": [HEAD_TO_ARCHITECTURE[head]], "model_type": "bert",
           **{k: getattr(config, k) for k in _HF_FIELDS},
           "position_embedding_type": "absolute", "tie_word_embeddings": True,
           "is_decoder": False, "add_cross_attention": False}
    if head == "sequence_classification":
        num_labels = num_labels or (len(id2label) if id2label else 2)
        if id2label is not None and len(id2label) != num_labels:
            raise BertforgeError(f"id2label has {len(id2label)} entries but the model has {num_labels} labels: "
                                 f"pass one name per label")
        id2label = dict(id2label) if id2label else {i: f"LABEL_{i}" for i in range(num_labels)}
        out["id2label"] = {str(i): name for i, name in id2label.items()}
        out["label2id"] = {name: int(i) for i, name in id2label.items()}
        out["problem_type"] = "regression" if num_labels == 1 else "single_label_classification"
    return out
