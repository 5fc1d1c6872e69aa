"""The distillation model and its loss: `DistillationModel` wraps a trainable student and a frozen
teacher and returns the loss described in `bertforge.workflows.distill` (soft KL at temperature T, the
student's hard loss, optional hidden-state MSE or cosine); `init_student_from_teacher` copies the
teacher's embeddings, evenly spaced layers and matching heads into the student.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bertforge.errors import require

HIDDEN_LOSSES = ("mse", "cosine")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over rows (N, C)."""
    T = temperature
    log_s = F.log_softmax(student_logits.float() / T, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return T * T * F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def hidden_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) indices into `hidden_states` (0 = embeddings): i <-> round(i * Lt / Ls)."""
    return [(0, 0)] + [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]


def default_teacher_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers to copy, starting at 0: 6 -> 3 gives [0, 2, 4] (every other)."""
    require(0 < student_layers <= teacher_layers, f"student has {student_layers} layers, teacher "
            f"{teacher_layers}: a student needs between 1 and the teacher's number of layers")
    return [round(i * teacher_layers / student_layers) for i in range(student_layers)]


def _encoder(model: nn.Module) -> nn.Module:
    return model.bert if hasattr(model, "bert") else model


def init_student_from_teacher(student: nn.Module, teacher: nn.Module, layers: list[int] | None = None) -> list[int]:
    """Copy the teacher's embeddings, its layers `layers` (default evenly spaced), final norm and pooler into
    the student, and head weights where names and shapes match. Widths must match. Returns `layers`."""
    s_cfg, t_cfg = _encoder(student).config, _encoder(teacher).config
    width = ("hidden_size", "num_attention_heads", "intermediate_size", "ffn", "norm_position", "bias", "vocab_size")
    diff = [f"{k} {getattr(s_cfg, k)} != {getattr(t_cfg, k)}" for k in width if getattr(s_cfg, k) != getattr(t_cfg, k)]
    require(not diff, f"cannot initialise the student from the teacher ({'; '.join(diff)}): use the teacher's "
            "width (student.preset unset) or set student.init_from_teacher=false")
    layers = default_teacher_layers(t_cfg.num_hidden_layers, s_cfg.num_hidden_layers) if layers is None else layers
    require(len(layers) == s_cfg.num_hidden_layers and all(0 <= i < t_cfg.num_hidden_layers for i in layers),
            f"student.teacher_layers {layers}: give {s_cfg.num_hidden_layers} teacher layer indices in "
            f"[0, {t_cfg.num_hidden_layers - 1}]")
    t_state = _encoder(teacher).state_dict()
    new = {}
    for key, value in _encoder(student).state_dict().items():
        m = re.match(r"layers\.(\d+)\.(.*)", key)
        src = f"layers.{layers[int(m[1])]}.{m[2]}" if m else key
        if src in t_state and t_state[src].shape == value.shape:
            new[key] = t_state[src]
    missing = [k for k in _encoder(student).state_dict() if k not in new and not k.startswith("pooler.")]
    require(not missing, f"teacher lacks student weights {missing[:4]}: set student.init_from_teacher=false")
    _encoder(student).load_state_dict(new, strict=False)
    if student is not _encoder(student) and teacher is not _encoder(teacher):  # heads: same names and shapes
        heads = {k: v for k, v in teacher.state_dict().items() if not k.startswith("bert.")}
        mine = student.state_dict()
        student.load_state_dict({k: v for k, v in heads.items() if k in mine and mine[k].shape == v.shape},
                                strict=False)
    return list(layers)


@dataclass
class DistillLossConfig:
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft (teacher) term; 1 - alpha on the hard labels
    hidden_weight: float = 0.0  # weight of the hidden-state term; 0 = off
    hidden_loss: str = "mse"  # mse | cosine

    def __post_init__(self) -> None:
        require(self.temperature > 0, f"loss.temperature={self.temperature} must be positive: pass e.g. 2")
        require(0.0 <= self.alpha <= 1.0, f"loss.alpha={self.alpha} is out of range: pass a value in [0, 1]")
        require(self.hidden_weight >= 0, f"loss.hidden_weight={self.hidden_weight} is negative: pass >= 0")
        require(self.hidden_loss in HIDDEN_LOSSES, f"loss.hidden_loss '{self.hidden_loss}': use mse or cosine")


@dataclass
class DistillOutput:
    loss: torch.Tensor
    soft_loss: torch.Tensor
    hard_loss: torch.Tensor | None
    hidden_loss: torch.Tensor | None
    logits: torch.Tensor  # student's: (B, C), (B, 1) for regression, (M, V) for MLM
    teacher_logits: torch.Tensor


class DistillationModel(nn.Module):
    """Student (trained) + frozen teacher (not a submodule: not saved, not trained, kept in eval mode)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillLossConfig, regression: bool = False):
        super().__init__()
        self.student, self.cfg, self.regression = student, cfg, regression
        self._teacher = (teacher.eval().requires_grad_(False),)
        s, t = _encoder(student).config, _encoder(teacher).config
        self.pairs = hidden_pairs(s.num_hidden_layers, t.num_hidden_layers) if cfg.hidden_weight > 0 else []
        wide = cfg.hidden_weight > 0 and s.hidden_size != t.hidden_size
        self.proj = nn.Linear(s.hidden_size, t.hidden_size) if wide else None

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def hidden_loss(self, hs: tuple, ht: tuple, mask: torch.Tensor | None) -> torch.Tensor:
        keep = (mask.bool() if mask is not None else torch.ones(hs[0].shape[:2], dtype=torch.bool,
                                                                  device=hs[0].device))  # (B, T)
        total = hs[0].new_zeros((), dtype=torch.float32)
        for i, j in self.pairs:
            a, b = hs[i][keep].float(), ht[j][keep].float()  # (N, Hs), (N, Ht)
            a = self.proj(a) if self.proj is not None else a
            part = F.mse_loss(a, b) if self.cfg.hidden_loss == "mse" else (1 - F.cosine_similarity(a, b)).mean()
            total = total + part
        return total / len(self.pairs)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> DistillOutput:
        teacher, hidden = self.teacher, bool(self.pairs)
        if next(teacher.parameters()).device != input_ids.device:
            teacher.to(input_ids.device)
        with torch.no_grad():
            t_out = teacher(input_ids, attention_mask, token_type_ids, labels=labels, output_hidden_states=hidden)
        s_out = self.student(input_ids, attention_mask, token_type_ids, labels=labels, output_hidden_states=hidden)
        if self.regression:
            soft = F.mse_loss(s_out.logits.float(), t_out.logits.float())
        else:
            soft = kd_loss(s_out.logits, t_out.logits, self.cfg.temperature)
        a = self.cfg.alpha
        loss = a * soft if s_out.loss is None else a * soft + (1 - a) * s_out.loss
        h_loss = None
        if hidden:
            h_loss = self.hidden_loss(s_out.hidden_states, t_out.hidden_states, attention_mask)
            loss = loss + self.cfg.hidden_weight * h_loss
        return DistillOutput(loss, soft, s_out.loss, h_loss, s_out.logits, t_out.logits)
