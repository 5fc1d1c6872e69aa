"""The BERT encoder, read top to bottom: config and presets, embeddings, attention, layers, BertModel.

Field names follow Hugging Face's `BertConfig` so a `config.json` reads the same in both worlds.
Three switches go beyond the original BERT, each shipped and tested:

- `norm_position`: "post" (original BERT; LayerNorm after each residual add, HF-compatible) or
  "pre" (LayerNorm before attention / feed-forward, plus a final LayerNorm; the budget recipe).
- `bias`: linear and LayerNorm biases on (original) or off (budget recipe).
- `ffn`: "mlp" (Linear -> act -> Linear) or "geglu" (Linear to 2*I, act(gate) * value, Linear).
- `position_embedding_type`: "absolute" (a learned table, original BERT) or "rotary" (RoPE on queries and
  keys, no table; `rope_theta` sets the base; the rotate-half convention of ModernBERT and Llama).

Attention runs through `torch.nn.functional.scaled_dot_product_attention`; the eager version is kept
as the reference the tests compare against (`attn_implementation="eager"`). Query, key and value
share one fused projection (`qkv`, one GEMM instead of three); `hf_compat` splits it for HF.

Shapes: B batch, T sequence length, H hidden size, nh heads, hs head size (H // nh), I intermediate.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from bertforge.errors import BertforgeError

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def pad_vocab_size(n: int, multiple: int = 64) -> int:
    """Round a vocabulary size up to a multiple (fast matmuls on every device)."""
    return ((n + multiple - 1) // multiple) * multiple


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float | None = None
    # what the classification and multiple-choice heads read (ModernBERT's field): the [CLS] state, or the
    # mean of the real tokens' states; either then goes through the tanh pooler
    classifier_pooling: str = "cls"  # "cls" | "mean"
    # bertforge switches (the HF-compatible values are the defaults)
    norm_position: str = "post"  # "post" | "pre"
    bias: bool = True
    ffn: str = "mlp"  # "mlp" | "geglu"
    position_embedding_type: str = "absolute"  # "absolute" | "rotary"
    rope_theta: float = 10000.0
    attn_implementation: str = "sdpa"  # "sdpa" | "eager"
    # training only: recompute each layer in backward (torch.utils.checkpoint, non-reentrant), storing only
    # the layer inputs; trades about one extra forward for most of the activation memory
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise BertforgeError(f"invalid model config: {msg}")

        for f in fields(self):  # a string or list from JSON/YAML would fail below as a bare TypeError
            value = getattr(self, f.name)
            if str(f.type).startswith(("int", "float")) and not (value is None and "None" in str(f.type)):
                check(isinstance(value, numbers.Real) and not isinstance(value, bool),
                      f"{f.name} must be a number, got {value!r}: fix it in config.json / the model section")
        check(self.num_attention_heads > 0, f"num_attention_heads must be positive, got {self.num_attention_heads}")
        check(self.hidden_size % self.num_attention_heads == 0,
              f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
              f"{self.num_attention_heads}: pick a head count that divides it")
        check(self.norm_position in ("post", "pre"), f"norm_position '{self.norm_position}': use 'post' or 'pre'")
        check(self.ffn in ("mlp", "geglu"), f"ffn '{self.ffn}': use 'mlp' or 'geglu'")
        check(self.position_embedding_type in ("absolute", "rotary"),
              f"position_embedding_type '{self.position_embedding_type}': use 'absolute' or 'rotary'")
        check(self.classifier_pooling in ("cls", "mean"),
              f"classifier_pooling '{self.classifier_pooling}': use 'cls' or 'mean'")
        check(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        check(self.attn_implementation in ("sdpa", "eager"),
              f"attn_implementation '{self.attn_implementation}': use 'sdpa' or 'eager'")
        check(self.hidden_act in ACTIVATIONS,
              f"hidden_act '{self.hidden_act}': use one of {', '.join(sorted(ACTIVATIONS))}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            p = getattr(self, name)
            check(p is None or 0.0 <= p < 1.0, f"{name} {p} must be in [0, 1)")
        check(self.layer_norm_eps > 0, f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
        check(0 <= self.pad_token_id < self.vocab_size,
              f"pad_token_id {self.pad_token_id} outside the vocabulary of {self.vocab_size}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def hf_compatible(self) -> bool:
        """True when Hugging Face's BERT classes hold these weights and compute what ours do."""
        return (self.norm_position == "post" and self.bias and self.ffn == "mlp"
                and self.position_embedding_type == "absolute" and self.classifier_pooling == "cls")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, strict: bool = True) -> BertConfig:
        """Build from a dict; unknown keys are an error when `strict`, ignored otherwise (HF extras)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if strict and unknown:
            raise BertforgeError(f"unknown model config keys {unknown}: remove them or check their spelling")
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_runtime(self, **values) -> BertConfig:
        """A copy with settings that leave the weights' shapes alone (dropout, classifier pooling, attention
        kernel, gradient checkpointing), as Hugging Face's `from_pretrained(path, hidden_dropout_prob=...)`."""
        other = sorted(set(values) - set(RUNTIME_FIELDS))
        if other:
            raise BertforgeError(f"model setting(s) {other} fix the weights' shapes and cannot change on a trained "
                                 f"model: change only {', '.join(RUNTIME_FIELDS)}")
        return replace(self, **values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> BertConfig:
        if name not in PRESETS:
            raise BertforgeError(f"unknown model preset '{name}': use one of {', '.join(PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise BertforgeError(f"unknown model config keys {unknown}: use BertConfig fields such as hidden_size")
        return replace(PRESETS[name], **overrides)


# BertConfig fields a trained model may change (its weights fit either way)
RUNTIME_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "classifier_pooling",
                  "attn_implementation", "gradient_checkpointing")

# The budget recipe (Cramming, ModernBERT): pre-LN, no biases, GeGLU, no dropout.
_BUDGET = dict(norm_position="pre", bias=False, ffn="geglu", hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)

PRESETS: dict[str, BertConfig] = {
    "tiny": BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=512),
    "mini": BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small": BertConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "medium": BertConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
    "base": BertConfig(),
    "large": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "budget-mini": BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                              intermediate_size=1024, max_position_embeddings=128, **_BUDGET),
    "budget-small": BertConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                               intermediate_size=2048, max_position_embeddings=128, **_BUDGET),
    "crammed": BertConfig(hidden_size=768, num_hidden_layers=16, num_attention_heads=12,
                          intermediate_size=3072, max_position_embeddings=128, **_BUDGET),
}


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor  # (B, T, H); (M, H) at the kept positions with output_positions
    pooler_output: torch.Tensor | None = None  # (B, H); None with output_positions
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + each layer, each (B, T, H)


class BertEmbeddings(nn.Module):
    """word + position (absolute only) + token type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                    if config.position_embedding_type == "absolute" else None)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.word_embeddings(input_ids)  # (B, T, H)
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(T, device=input_ids.device)  # (T,)
            x = x + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.n_head = config.num_attention_heads
        self.qkv = nn.Linear(H, 3 * H, bias=config.bias)
        self.out = nn.Linear(H, H, bias=config.bias)
        self.dropout_p = config.attention_probs_dropout_prob
        self.eager = config.attn_implementation == "eager"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, H); mask (B, 1, 1, T) bool, True where a key may be attended, or None; rope: (cos, sin)
        tables (T, hs) for rotary positions, or None. Returns (B, T, H), or (M, H) at the M positions where
        `keep` (B, T) is True (row-major): every position is still a key and value, but the output
        projection runs on the kept rows only."""
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, H // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        p = self.dropout_p if self.training else 0.0
        if self.eager:
            y = eager_attention(q, k, v, mask, p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, H)
        return self.out(y if keep is None else y[keep])  # (B, T, H) or (M, H)


def rotary_tables(T: int, head_size: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (cos, sin), each (T, hs): angle t * theta^(-2i/hs), repeated over the two halves."""
    inv_freq = theta ** (-torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by their position: x cos + rotate_half(x) sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """The reference: softmax(q k^T / sqrt(hs) + mask) v, with q, k, v (B, nh, T, hs)."""
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
    if mask is not None:
        att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
    att = att.softmax(dim=-1)
    if mask is not None:
        att = att.masked_fill(~mask, 0.0)  # a fully masked row attends to nothing (0), as SDPA does
    att = F.dropout(att, p=dropout_p)
    return att @ v  # (B, nh, T, hs)


class FeedForward(nn.Module):
    """Linear -> act -> Linear, or GeGLU: Linear to 2*I, act(gate) * value, Linear."""

    def __init__(self, config: BertConfig):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.glu = config.ffn == "geglu"
        self.up = nn.Linear(H, 2 * I if self.glu else I, bias=config.bias)
        self.down = nn.Linear(I, H, bias=config.bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # (B, T, I) or (B, T, 2I)
        if self.glu:
            gate, value = h.chunk(2, dim=-1)
            h = self.act(gate) * value
        else:
            h = self.act(h)
        return self.down(h)  # (B, T, H)


class BertLayer(nn.Module):
    """One transformer block; post-LN (original BERT) or pre-LN."""

    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.pre_norm = config.norm_position == "pre"
        self.attention = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(H, eps=config.layer_norm_eps, bias=config.bias)
        self.ffn = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(H, eps=config.layer_norm_eps, bias=config.bias)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H), or (M, H) at the positions where `keep` (B, T) is True: attention reads
        every position, the residual, output projection and feed-forward run on the kept rows only."""
        if self.pre_norm:
            a = self.attention(self.attn_norm(x), mask, keep, rope)
            x = (x if keep is None else x[keep]) + self.dropout(a)
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        a = self.attention(x, mask, keep, rope)
        x = self.attn_norm((x if keep is None else x[keep]) + self.dropout(a))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


def extended_attention_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) 1 = token, 0 = padding -> bool (B, 1, 1, T), True = attend; None when nothing is padded.

    A boolean mask works under autocast whatever the compute dtype. Dropping the mask when nothing is
    padded lets SDPA pick its fastest kernel; the check syncs once per forward, not per layer.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask[:, None, None, :].to(torch.bool)


class BertModel(nn.Module):
    """Embeddings -> N layers (-> final norm when pre-LN) -> optional tanh pooler over [CLS]."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])
        self.final_norm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
                           if config.norm_position == "pre" else None)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias) if add_pooling_layer else None
        self.apply(lambda m: init_weights(m, config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_positions: torch.Tensor | None = None) -> EncoderOutput:
        """The encoder. `output_positions` (B, T) bool: return only those positions' final states, (M, H)
        in row-major order, and run the last layer's projections and feed-forward on them alone (sparse
        prediction: an MLM loss needs nothing else; no pooler output then). With output_hidden_states the
        last layer runs in full and the kept rows are selected from it."""
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise BertforgeError(
                f"input of {T} tokens is longer than max_position_embeddings "
                f"{self.config.max_position_embeddings}: truncate it or use a model with more positions")
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, H)
        mask = extended_attention_mask(attention_mask)
        rope = None
        if self.config.position_embedding_type == "rotary":
            if position_ids is not None:
                raise BertforgeError("position_ids are not supported with rotary positions: leave them out")
            rope = rotary_tables(T, self.config.head_size, self.config.rope_theta, input_ids.device)
        hidden_states = [x] if output_hidden_states else None
        last = len(self.layers) - 1
        sparse_last = output_positions is not None and not output_hidden_states
        checkpointed = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            keep = output_positions if sparse_last and i == last else None
            if checkpointed:  # same numbers (dropout RNG replayed), only the layer input kept for backward
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, keep, rope, use_reentrant=False)
            else:
                x = layer(x, mask, keep, rope)
            if hidden_states is not None:
                hidden_states.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
            if hidden_states is not None:
                hidden_states[-1] = x
        if output_positions is not None:
            x = x if sparse_last else x[output_positions]  # (M, H)
            return EncoderOutput(x, None, tuple(hidden_states) if hidden_states is not None else None)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None  # (B, H)
        return EncoderOutput(x, pooled, tuple(hidden_states) if hidden_states is not None else None)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = self.parameters() if not exclude_embeddings else (
            p for n, p in self.named_parameters() if not n.startswith("embeddings."))
        return sum(p.numel() for p in params)


def init_weights(module: nn.Module, config: BertConfig) -> None:
    """BERT's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
