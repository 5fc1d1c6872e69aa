"""`bertforge plan`: estimate the training memory of a model shape before running it, and what fits where.

    bertforge plan --preset base --batch 32 --seq 128 --precision bf16 [--gradient-checkpointing] [--offload]

Per process, in bytes, for masked-LM pretraining (`BertForMaskedLM`, sparse head) with an Adam-type
optimizer:

    parameters       4 P (fp32 weights; autocast keeps them fp32)          / FSDP shards
    gradients        4 P                                                   / FSDP shards
    optimizer state  8 P AdamW / LAMB (two fp32 moments), Adafactor's factored rows + columns; 0 on the
                     device with --offload (then 16 P on the host: fp32 master, gradient staging, moments)
    activations      what autograd saves in one forward, counted tensor by tensor for this model (checked
                     against torch's saved-tensor hooks in tests/test_scale_plan.py), with a = 2 bytes under
                     bf16/fp16 autocast, 4 in fp32, per token (row) and layer:
                       linear inputs 3H*a (qkv, output projection, FFN up) + FFN 2I*a (GELU) or 4I*a (GeGLU)
                       + 2 LayerNorm inputs 2*(4H + 8) + attention: fused kernels (CUDA; CPU without attention
                       dropout) 3H*a + 4*nh (+ 2H*a: rotated queries and keys with rotary positions), CPU
                       math path with dropout 12H + 12*nh*T
                       + hidden-dropout masks 2H (1 byte each on CUDA, a on CPU)
                     the last layer past attention, the final norm and the MLM head only at the M masked rows;
                     the head keeps log-softmax over the vocabulary (4*M*V); autocast keeps a 2-byte copy of
                     every matmul weight. Gradient checkpointing keeps each layer's input (4*H per row); one
                     layer's activations are rebuilt at a time in backward (counted as a transient).
    peak             parameters + optimizer state + max(activations + backward transients (the head's
                     logits gradients, 8*M*V, and the embedding gradient), gradients + the embedding lookup's
                     dense gradient 4*V*H), plus on a CPU the offloaded optimizer's host memory

Measured peaks on CPU (benchmarks/bench_memory.py) agree within 20% (tests/test_scale_plan.py); on CUDA add
the context (~0.5 GiB) and allocator slack, which the "fits" column covers with a 10% margin.
"""

from __future__ import annotations

from dataclasses import dataclass

from bertforge.errors import BertforgeError

GIB = 2**30
DEVICES_GB = (16.0, 24.0, 40.0, 80.0, 141.0)
MARGIN = 0.9  # usable share of a device's memory (context, allocator fragmentation)


@dataclass
class MemoryPlan:
    parameters: int  # counts of bytes, per process
    gradients: int
    optimizer: int
    activations: int
    transient: int
    peak: int
    host: int  # CPU memory the offloaded optimizer holds
    per_sample: int  # activation + transient bytes each sequence adds (they are affine in the batch)
    num_parameters: int
    masked_per_sequence: int
    fixed: int  # parameters + optimizer state (+ host memory on a CPU): independent of the batch
    floor: int  # fixed + gradients at the end of backward: no batch needs less
    intercept: int  # activations + transients = intercept + per_sample * batch

    def fits(self, device_bytes: float) -> bool:
        return self.peak <= MARGIN * device_bytes

    def max_batch(self, device_bytes: float) -> int:
        """The largest batch whose peak fits in `device_bytes` (with the 10% margin); 0 if none does."""
        room = MARGIN * device_bytes
        if self.floor > room:
            return 0
        return max(0, int((room - self.fixed - self.intercept) // self.per_sample))


def _optimizer_bytes(model, optimizer: str) -> int:
    if optimizer in ("adamw", "lamb"):
        return 8 * sum(p.numel() for p in model.parameters())
    total = 0  # Adafactor: row + column second-moment factors for matrices, a full one for vectors
    for p in model.parameters():
        total += 4 * (sum(p.shape[-2:]) if p.ndim >= 2 else p.numel())
    return total


def layer_activation_bytes(cfg, rows: int, sparse_rows: int, T: int, a: int, device: str) -> int:
    """Bytes one BertLayer saves for backward: attention over `rows`, the rest over `sparse_rows`."""
    H, I, nh = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    if device == "cpu" and cfg.attention_probs_dropout_prob > 0:
        attention = 12 * H + 12 * nh * T  # math path: fp32 q, k, v copies and three (T, T) maps per head
    else:
        attention = 3 * H * a + 4 * nh  # fused kernel: the qkv projection and the log-sum-exp
        if cfg.position_embedding_type == "rotary":
            attention += 2 * H * a  # the rotated queries and keys
    ffn = (4 if cfg.ffn == "geglu" else 2) * I * a
    dropout = 2 * H * (1 if device == "cuda" else a) if cfg.hidden_dropout_prob > 0 else 0
    before = H * a + attention  # the qkv input and the attention, at every row
    after = 2 * H * a + ffn + 2 * (4 * H + 8) + dropout  # output projection onwards
    return rows * before + sparse_rows * after


def estimate(cfg, batch: int, seq: int, *, precision: str = "fp32", gradient_checkpointing: bool = False,
             offload: bool = False, optimizer: str = "adamw", mlm_probability: float = 0.15,
             device: str = "cuda", shards: int = 1) -> MemoryPlan:
    """The memory plan of pretraining `cfg` (a BertConfig) with micro-batch `batch` x `seq` tokens."""
    import torch

    from bertforge.model.heads import BertForMaskedLM

    if precision not in ("fp32", "bf16", "fp16"):
        raise BertforgeError(f"precision '{precision}': use fp32, bf16 or fp16")
    if optimizer not in ("adamw", "lamb", "adafactor"):
        raise BertforgeError(f"optimizer '{optimizer}': use adamw, lamb or adafactor")
    if batch < 1 or seq < 2 or shards < 1:
        raise BertforgeError(f"batch {batch}, seq {seq}, shards {shards}: need batch >= 1, seq >= 2, shards >= 1")
    if seq > cfg.max_position_embeddings:
        raise BertforgeError(f"seq {seq} exceeds the preset's max_position_embeddings "
                             f"{cfg.max_position_embeddings}: lower --seq")
    with torch.device("meta"):
        model = BertForMaskedLM(cfg)
    P = sum(p.numel() for p in model.parameters())
    matmul = sum(p.numel() for n, p in model.named_parameters()
                 if p.ndim == 2 and "position" not in n and "token_type" not in n)
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    a = 4 if precision == "fp32" else 2
    m = round(mlm_probability * (seq - 2))  # masked positions per sequence ([CLS]/[SEP] never)

    def activations(b: int) -> tuple[int, int]:
        N, M = b * seq, b * m
        embed = N * (8 * H + 16)  # LayerNorm input and its output (or the dropout mask), statistics, token ids
        if cfg.position_embedding_type == "rotary":
            embed += 8 * seq * cfg.head_size  # the (T, hs) cos and sin tables, shared by every layer
        head = M * (3 * H * a + 4 * H + 8 + 4 * V) + (M * (4 * H + 8) if cfg.norm_position == "pre" else 0)
        full, last = layer_activation_bytes(cfg, N, N, seq, a, device), layer_activation_bytes(cfg, N, M, seq, a, device)
        copies = 2 * matmul if a == 2 else 0
        transient = 8 * M * V + 4 * V * H  # logits gradients; the (tied) embedding gradient comes first
        if gradient_checkpointing:  # layer inputs kept; one layer (and its weight copies) rebuilt in backward
            head_copies = 2 * (V * H + H * H) if a == 2 else 0
            kept = L * N * H * 4 + head_copies
            transient = max(transient, full + ((copies - head_copies) // L if a == 2 else 0))  # one after the other
        else:
            kept = (L - 1) * full + last + copies
        return embed + head + kept, transient

    act, transient = activations(batch)
    act1, transient1 = activations(batch + 1)
    params, grads = 4 * P // shards, 4 * P // shards
    if shards > 1:  # FSDP: the root (embeddings, head) and a layer or two are unsharded at a time
        unsharded = 4 * (V * H + 2 * (P - V * H) // L)
        params += unsharded
    opt = 0 if offload else _optimizer_bytes(model, optimizer) // shards
    host = (8 * P + _optimizer_bytes(model, optimizer)) if offload else 0
    # backward starts with every activation alive and ends with every gradient, where the embedding lookup's
    # dense gradient (V, H) is added to the tied decoder's
    fixed = params + opt + (host if device == "cpu" else 0)
    floor = fixed + grads + 4 * V * H // shards
    peak = max(fixed + act + transient, floor)
    per_sample = (act1 + transient1) - (act + transient)
    intercept = act + transient - per_sample * batch
    return MemoryPlan(params, grads, opt, act, transient, peak, host, per_sample, P, m, fixed, floor, intercept)


__all__ = ["MemoryPlan", "estimate", "layer_activation_bytes"]
