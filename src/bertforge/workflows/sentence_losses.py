"""Sentence-BERT losses: small modules with one signature, `loss(embeddings, labels) -> scalar`, where
`embeddings` is a list of (B, H) tensors, one per text column of the batch (anchor, positive,
negatives...), so each can be checked by hand on small tensors:

    SoftmaxLoss                   NLI labels; a linear classifier over (u, v, |u - v|)
    MultipleNegativesRankingLoss  (anchor, positive[, hard negative]); in-batch negatives
    CoSENTLoss                    (a, b, score); ranks pairs by cosine, as the gold scores rank them
    CosineSimilarityLoss          (a, b, score); MSE between cosine and the gold score in [0, 1]

`build_loss(name, hidden_size, scale)` makes one by its config name (one of `LOSSES`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bertforge.errors import require

LOSSES = ("softmax", "mnrl", "cosent", "cosine")


def cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of a (N, H) with every row of b (M, H) -> (N, M)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


class SoftmaxLoss(nn.Module):
    """Classify a sentence pair from its two embeddings (Sentence-BERT's NLI objective).

    With u = embedding of sentence A and v = of sentence B (each (B, H)), the features are the
    concatenation (u, v, |u - v|), shape (B, 3H); one linear layer maps them to `num_labels` logits
    and the loss is cross-entropy against the NLI label ids (entailment 0, neutral 1, contradiction 2).
    The classifier is thrown away after training: only the encoder is kept, and the point of the
    objective is that u and v end up close when the sentences mean the same thing.
    """

    def __init__(self, hidden_size: int, num_labels: int = 3):
        super().__init__()
        self.classifier = nn.Linear(3 * hidden_size, num_labels)

    def logits(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat([u, v, (u - v).abs()], dim=-1))  # (B, num_labels)

    def forward(self, embeddings: list[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        require(labels is not None and len(embeddings) == 2, "SoftmaxLoss needs (A, B) pairs with NLI labels")
        return F.cross_entropy(self.logits(*embeddings).float(), labels)


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch negatives: each anchor must pick its own positive out of every candidate in the batch.

    Batch of B rows (anchor_i, positive_i[, hard_negative_i ...]). The candidates are all positives
    followed by all hard negatives, C = B * (columns - 1) of them. The score matrix is
    `scale * cos(anchor_i, candidate_j)`, shape (B, C), and the loss is cross-entropy with target
    j = i: the positives of the other rows serve as (easy) negatives for free, the hard negatives
    (e.g. a contradiction of the premise) make the task harder. Larger batches give more negatives.
    `scale` (20, as sentence-transformers) is the inverse temperature of the softmax over candidates.
    Rows sharing a text make false negatives, so the batches `main` builds hold each text once.
    """

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = scale

    def forward(self, embeddings: list[torch.Tensor], labels: torch.Tensor | None = None) -> torch.Tensor:
        require(len(embeddings) >= 2, "MultipleNegativesRankingLoss needs (anchor, positive[, negative...]) columns")
        anchors, candidates = embeddings[0], torch.cat(embeddings[1:])  # (B, H), (C, H)
        scores = self.scale * cos_sim(anchors, candidates)  # (B, C)
        target = torch.arange(len(anchors), device=anchors.device)  # the positive of row i is candidate i
        return F.cross_entropy(scores, target)


class CoSENTLoss(nn.Module):
    """Rank the pairs of a batch by cosine similarity the way their gold scores rank them.

    With s_i = scale * cos(a_i, b_i) and gold scores y_i, every ordered pair (i, j) with y_i > y_j
    should have s_i > s_j; the loss is log(1 + sum over those pairs of exp(s_j - s_i)), i.e. a
    logsumexp over the violations with a 0 term added. Only the order of the scores matters, which
    matches how STS is evaluated (Spearman), and the loss never pushes cosine to a fixed value.
    `scale` 20 as in sentence-transformers' CoSENTLoss.
    """

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = scale

    def forward(self, embeddings: list[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        require(labels is not None and len(embeddings) == 2, "CoSENTLoss needs (A, B) pairs with scores")
        u, v = embeddings
        s = self.scale * F.cosine_similarity(u.float(), v.float(), dim=-1)  # (B,)
        diff = s[None, :] - s[:, None]  # (B, B): diff[i, j] = s_j - s_i
        should_rank = labels[:, None] > labels[None, :]  # (B, B): y_i > y_j
        terms = diff[should_rank]  # every violation term s_j - s_i
        return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)


class CosineSimilarityLoss(nn.Module):
    """Mean squared error between cos(a, b) and the gold similarity score (in [0, 1])."""

    def forward(self, embeddings: list[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        require(labels is not None and len(embeddings) == 2, "CosineSimilarityLoss needs (A, B) pairs with scores")
        u, v = embeddings
        return F.mse_loss(F.cosine_similarity(u.float(), v.float(), dim=-1), labels.float())


def build_loss(name: str, hidden_size: int, scale: float = 20.0) -> nn.Module:
    require(name in LOSSES, f"sentence loss '{name}' is unknown: use one of {', '.join(LOSSES)}")
    if name == "softmax":
        return SoftmaxLoss(hidden_size)
    if name == "mnrl":
        return MultipleNegativesRankingLoss(scale)
    return CoSENTLoss(scale) if name == "cosent" else CosineSimilarityLoss()
