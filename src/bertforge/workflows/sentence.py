"""Sentence-BERT: train a bi-encoder (`SentenceEncoder`: BertModel -> pooling -> optional normalize),
evaluate it on STS, calibrate a similar / not-similar threshold, export it for sentence-transformers.

The losses (softmax, mnrl, cosent, cosine) live in `bertforge.workflows.sentence_losses`.

`SentenceTrainingModel(encoder, loss)` runs every column of a batch through the encoder in one pass
and returns an object with `.loss`, which is what `bertforge.train.loop.Trainer` steps.

`main(SentenceRunConfig) -> metrics` reads NLI files (SNLI/MNLI JSONL or TSV, SICK) for softmax and
MNRL, scored pairs (STS-B, SICK relatedness) for CoSENT and cosine, trains, evaluates Spearman and
Pearson (x100) of cosine similarity against the gold scores of a dev file, optionally calibrates a
threshold on a labelled dev set, and writes `<output_dir>/model` in the sentence-transformers layout
(so `SentenceTransformer(path)` loads it) with `similarity_threshold.json` beside it. Texts longer
than `data.max_seq_length` tokens are cut to it (as sentence-transformers does) and counted in the
metrics as `truncated_texts`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bertforge.config import config_to_dict, parse_duration
from bertforge.errors import require
from bertforge.eval.metrics import pearson, spearman
from bertforge.model.folders import load_encoder
from bertforge.train.batches import EpochBatches
from bertforge.train.faults import stopped_early
from bertforge.train.loop import Trainer
from bertforge.train.optim import OptimConfig, build_optimizer, build_schedule
from bertforge.train.settings import TrainConfig, seed_everything
from bertforge.workflows.sentence_losses import LOSSES, build_loss

NLI_LOSSES = ("softmax", "mnrl")
THRESHOLD_FILE = "similarity_threshold.json"


@dataclass
class SentenceOutput:
    loss: torch.Tensor | None
    embeddings: list[torch.Tensor]


class SentenceTrainingModel(nn.Module):
    """Encoder + loss: inputs (K, B, T) hold K text columns; one encoder pass over all K*B texts."""

    def __init__(self, encoder: nn.Module, loss: nn.Module):
        super().__init__()
        self.encoder, self.loss = encoder, loss

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None) -> SentenceOutput:
        K, B, T = input_ids.shape
        types = token_type_ids.reshape(K * B, T) if token_type_ids is not None else None
        emb = self.encoder(input_ids.reshape(K * B, T), attention_mask.reshape(K * B, T), types)  # (K*B, H)
        columns = list(emb.view(K, B, -1).unbind(0))  # K x (B, H)
        return SentenceOutput(self.loss(columns, labels), columns)


# ------------------------------------------------------------------------------------------- data

def tokenize_texts(tokenizer, texts: list[str], max_len: int) -> tuple[list[list[int]], int]:
    """Token ids of each text ([CLS] ... [SEP]), cut to `max_len`; also how many were cut."""
    ids = [e.input_ids for e in tokenizer.encode_batch(texts, max_length=10**9, truncation=False)]
    cut = sum(len(x) > max_len for x in ids)
    return [x if len(x) <= max_len else x[:max_len - 1] + x[-1:] for x in ids], cut


def no_duplicate_batches(keys: list[tuple[str, ...]], order: np.ndarray, batch_size: int) -> list[list[int]]:
    """Batches over `order` in which no text occurs twice (sentence-transformers' NoDuplicatesBatchSampler)."""
    remaining = dict.fromkeys(int(i) for i in order)
    batches = []
    while remaining:
        batch, seen = [], set()
        for i in remaining:
            if seen.isdisjoint(keys[i]):
                batch.append(i)
                seen.update(keys[i])
                if len(batch) == batch_size:
                    break
        for i in batch:
            del remaining[i]
        batches.append(batch)
    return batches


class PairBatches(EpochBatches):
    """Batches of K tokenized text columns (+ labels), shuffled per epoch from (seed, epoch); with `texts`,
    a batch holds each text at most once (in-batch negatives stay negatives). Runs on train/batches.py."""

    def __init__(self, columns: list[list[list[int]]], labels: list | None, batch_size: int, seed: int,
                 pad_id: int, texts: list[tuple[str, ...]] | None = None):
        self.columns, self.labels, self.B, self.seed, self.pad_id = columns, labels, batch_size, seed, pad_id
        self.texts = texts  # set: batches hold each text at most once
        self.n = len(columns[0])
        require(self.n >= 1, "the training file gave no examples: pass a non-empty file")
        super().__init__(self.plan_epoch, self.collate)

    def plan_epoch(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        if self.texts is not None:
            return no_duplicate_batches(self.texts, order, self.B)
        return [order[i:i + self.B].tolist() for i in range(0, self.n, self.B)]

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        T = max(len(col[i]) for col in self.columns for i in rows)
        ids = torch.full((len(self.columns), len(rows), T), self.pad_id, dtype=torch.long)  # (K, B, T)
        for k, col in enumerate(self.columns):
            for b, i in enumerate(rows):
                ids[k, b, :len(col[i])] = torch.tensor(col[i])
        batch = {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}
        if self.labels is not None:
            batch["labels"] = torch.tensor([self.labels[i] for i in rows])
        return batch


def training_examples(path: str, loss: str, hard_negatives: bool, limit: int | None, seed: int
                      ) -> tuple[list[tuple[str, ...]], list | None]:
    """(text columns per example, labels or None) for `loss` from an NLI or scored-pair file."""
    from bertforge.data.pairs import nli_triplets, read_nli_pairs, read_scored_pairs

    if loss in NLI_LOSSES:
        pairs = read_nli_pairs(path)[:limit]
        if loss == "softmax":
            return [(p.premise, p.hypothesis) for p in pairs], [p.label for p in pairs]
        if hard_negatives:
            return [(t.anchor, t.positive, t.negative) for t in nli_triplets(pairs, seed=seed)], None
        rows = [(p.premise, p.hypothesis) for p in pairs if p.label == 0]
        require(bool(rows), f"'{path}' has no entailment pairs: MNRL needs (anchor, positive) pairs")
        return rows, None
    scored = read_scored_pairs(path)[:limit]
    return [(p.text_a, p.text_b) for p in scored], [float(p.score) for p in scored]


# ------------------------------------------------------------------------------------------- evaluation

def read_sts(path: str | Path, limit: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(sentences A, sentences B, gold scores) of an STS-B or SICK-relatedness file, first `limit` rows."""
    from bertforge.data.pairs import read_scored_pairs

    pairs = read_scored_pairs(path)[:limit]
    return [p.text_a for p in pairs], [p.text_b for p in pairs], np.array([p.score for p in pairs])


@torch.no_grad()
def pair_cosines(encoder: nn.Module, tokenizer, a: list[str], b: list[str], batch_size: int = 64) -> np.ndarray:
    """Cosine similarity of each (a_i, b_i) under `encoder` (a SentenceEncoder), as float64."""
    ea = encoder.encode(a, tokenizer, batch_size=batch_size)  # (N, H)
    eb = encoder.encode(b, tokenizer, batch_size=batch_size)
    return F.cosine_similarity(ea.float(), eb.float(), dim=-1).double().cpu().numpy()


def sts_scores(cosines: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson (x100) of cosine similarity against the gold scores."""
    return {"spearman": 100 * spearman(cosines, gold), "pearson": 100 * pearson(cosines, gold), "n": len(gold)}


def sts_eval(model_dir: str | Path, file: str | Path, *, limit: int | None = None, batch_size: int = 64) -> dict:
    """Zero-shot STS of any model folder (ours, HF BERT, sentence-transformers): {spearman, pearson, n}."""
    encoder, tokenizer = load_encoder(model_dir)
    a, b, gold = read_sts(file, limit)
    return sts_scores(pair_cosines(encoder.eval(), tokenizer, a, b, batch_size), gold)


def calibrate_threshold(scores, labels, metric: str = "accuracy") -> tuple[float, float]:
    """The cosine threshold t maximising `metric` ("accuracy" or "f1") of `score >= t` vs 0/1 labels.

    Cuts are only placed between distinct scores (tied scores always get the same decision); t is
    the midpoint of the two scores around the best cut. Ties in the metric keep the highest t.
    Returns (t, metric value).
    """
    require(metric in ("accuracy", "f1"), f"calibration metric '{metric}' is unknown: use accuracy or f1")
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    require(len(s) == len(y) and len(s) > 0, f"calibrate_threshold got {len(s)} scores and {len(y)} labels: "
            "pass one 0/1 label per score")
    require(bool(np.isin(y, (0, 1)).all()), "calibrate_threshold labels must be 0 or 1: binarize them first")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order].astype(np.int64)
    n, positives = len(s), int(y.sum())
    k = np.arange(n + 1)  # the top k scores are called similar
    tp = np.r_[0, np.cumsum(y)]
    valid = np.r_[True, s[1:] < s[:-1], True]  # a cut between equal scores is impossible
    if metric == "accuracy":
        value = (tp + (n - positives) - (k - tp)) / n
    else:
        value = np.where(k + positives > 0, 2 * tp / np.maximum(k + positives, 1), 0.0)
    best = int(np.argmax(np.where(valid, value, -1.0)))
    if best == 0:
        threshold = float(np.nextafter(s[0], np.inf))  # nothing is similar
    elif best == n:
        threshold = float(s[-1])
    else:
        threshold = float((s[best - 1] + s[best]) / 2)
    return threshold, float(value[best])


def calibration_set(path: str, task: str, binarize_at: float, limit: int | None
                    ) -> tuple[list[str], list[str], np.ndarray]:
    """(A, B, 0/1 labels): a binary pair task (mrpc, qqp), or a scored one binarized at `binarize_at`."""
    from bertforge.data.glue import get_task, read_task_file

    spec = get_task(task)
    require(spec.text_b is not None and (spec.is_regression or spec.num_labels == 2),
            f"calibration task '{task}' is not a binary or scored sentence-pair task: use mrpc, qqp, stsb "
            "or sick_relatedness")
    examples = read_task_file(path, spec)[:limit]
    labels = [(e.label >= binarize_at) if spec.is_regression else e.label for e in examples]
    return [e.text_a for e in examples], [e.text_b for e in examples], np.asarray(labels, dtype=np.int64)


def calibrate_encoder(encoder: nn.Module, tokenizer, c: CalibrationConfig, save_to: str | Path | None = None,
                      batch_size: int = 64) -> dict:
    """Calibrate the cosine threshold on `c.file`; write it to `save_to`/similarity_threshold.json if given."""
    from bertforge.atomic import atomic_write_text

    require(bool(c.file), "calibration.file is empty: pass labelled pairs such as mrpc/dev.tsv")
    a, b, y = calibration_set(c.file, c.task, c.binarize_at, c.limit)
    threshold, value = calibrate_threshold(pair_cosines(encoder, tokenizer, a, b, batch_size), y, c.metric)
    record = {"threshold": threshold, "metric": c.metric, "value": value, "file": str(c.file), "task": c.task,
              "n": len(y), "positives": int(y.sum())}
    if save_to is not None:
        atomic_write_text(Path(save_to) / THRESHOLD_FILE, json.dumps(record, indent=2) + "\n")
    return record


def calibrate_model(model_dir: str | Path, c: CalibrationConfig, *, save: bool = False) -> dict:
    """`calibrate_encoder` for any model folder; `save` writes the threshold into that folder."""
    encoder, tokenizer = load_encoder(model_dir)
    return calibrate_encoder(encoder.eval(), tokenizer, c, model_dir if save else None)


def load_threshold(model_dir: str | Path) -> float:
    path = Path(model_dir) / THRESHOLD_FILE
    require(path.is_file(), f"'{model_dir}' has no {THRESHOLD_FILE}: train with calibration.file set or "
            "run calibrate on a labelled dev set")
    return float(json.loads(path.read_text())["threshold"])


def is_similar(model_dir: str | Path, a: list[str], b: list[str]) -> list[tuple[float, bool]]:
    """(cosine, cosine >= saved threshold) for each pair (a_i, b_i), with the model's calibrated threshold."""
    threshold = load_threshold(model_dir)
    encoder, tokenizer = load_encoder(model_dir)
    return [(float(c), bool(c >= threshold)) for c in pair_cosines(encoder.eval(), tokenizer, a, b)]


# ------------------------------------------------------------------------------------------- run

@dataclass
class SentenceModelConfig:
    path: str = ""  # starting model folder: ours, HF BERT or sentence-transformers
    pooling: str | None = None  # mean | cls | max; None keeps the model's (mean for plain BERT)
    normalize: bool | None = None  # None keeps the model's


@dataclass
class SentenceDataConfig:
    train: str = ""  # NLI file (softmax, mnrl) or scored pairs (cosent, cosine)
    dev: str | None = None  # STS-B / SICK file: Spearman and Pearson of cosine
    max_seq_length: int = 128
    limit: int | None = None  # first N training pairs
    eval_limit: int | None = None
    eval_batch_size: int = 64


@dataclass
class SentenceLossConfig:
    name: str = "mnrl"  # softmax | mnrl | cosent | cosine
    scale: float = 20.0  # mnrl and cosent
    hard_negatives: bool = True  # mnrl on NLI: add a contradiction as a third column


@dataclass
class CalibrationConfig:
    file: str | None = None  # labelled pairs, e.g. mrpc/dev.tsv or stsb/dev.tsv
    task: str = "mrpc"  # mrpc | qqp (labels) or stsb | sick_relatedness (scores binarized)
    binarize_at: float = 4.0  # scored tasks: gold >= this is "similar"
    metric: str = "accuracy"  # accuracy | f1
    limit: int | None = None


@dataclass
class SentenceRunConfig:
    model: SentenceModelConfig = field(default_factory=SentenceModelConfig)
    data: SentenceDataConfig = field(default_factory=SentenceDataConfig)
    loss: SentenceLossConfig = field(default_factory=SentenceLossConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_ratio=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/sentence", batch_size=32,
                                                                   best_metric="eval_spearman",
                                                                   greater_is_better=True))

    RENAMED: ClassVar[dict[str, str]] = {"data.epochs": "train.epochs"}


def load_encoder_for_training(cfg: SentenceModelConfig):
    """(SentenceEncoder, tokenizer) from cfg.path with pooling / normalize overrides applied."""
    from bertforge.model.pooling import check_pooling

    require(bool(cfg.path), "model.path is empty: pass a model folder (ours, HF BERT or sentence-transformers)")
    encoder, tokenizer = load_encoder(cfg.path)
    if cfg.pooling is not None:
        check_pooling(cfg.pooling)
        encoder.pooling = cfg.pooling
    if cfg.normalize is not None:
        encoder.normalize = cfg.normalize
    return encoder, tokenizer


def _set_budget(cfg: SentenceRunConfig, batches_per_epoch: int) -> None:
    t = cfg.train
    if t.max_steps is None and t.max_tokens is None and t.time_budget is None:
        epochs = 1.0 if t.epochs is None else t.epochs
        require(epochs > 0, f"train.epochs={epochs} must be positive: pass e.g. 1")
        t.max_steps = max(1, math.ceil(epochs * batches_per_epoch / t.grad_accum))


def main(cfg: SentenceRunConfig) -> dict:
    """Train a sentence encoder as configured; returns the final metrics (also in metrics.json)."""
    from bertforge.atomic import atomic_write_text

    require(cfg.loss.name in LOSSES, f"loss.name '{cfg.loss.name}' is unknown: use one of {', '.join(LOSSES)}")
    require(bool(cfg.data.train), "data.train is empty: pass an NLI file (softmax, mnrl) or STS file (cosent, cosine)")
    seed_everything(cfg.train.seed)
    encoder, tokenizer = load_encoder_for_training(cfg.model)
    max_len = min(cfg.data.max_seq_length, encoder.bert.config.max_position_embeddings)
    rows, labels = training_examples(cfg.data.train, cfg.loss.name, cfg.loss.hard_negatives, cfg.data.limit,
                                     cfg.train.seed)
    tokenized = [tokenize_texts(tokenizer, [r[k] for r in rows], max_len) for k in range(len(rows[0]))]
    truncated = sum(cut for _, cut in tokenized)
    batches = PairBatches([ids for ids, _ in tokenized], labels, cfg.train.batch_size, cfg.train.seed,
                          tokenizer.pad_token_id, rows if cfg.loss.name == "mnrl" else None)
    _set_budget(cfg, len(batches.epoch_batches(0)))
    model = SentenceTrainingModel(encoder, build_loss(cfg.loss.name, encoder.bert.config.hidden_size, cfg.loss.scale))
    device_type = "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    optimizer = build_optimizer(model, cfg.optim, device_type)
    scheduler = build_schedule(optimizer, cfg.optim, cfg.train.max_steps,
                               budget_seconds=parse_duration(cfg.train.time_budget))
    dev = read_sts(cfg.data.dev, cfg.data.eval_limit) if cfg.data.dev else None

    def evaluate(m: nn.Module) -> dict:
        if dev is None:
            return {}
        scores = sts_scores(pair_cosines(m.encoder, tokenizer, dev[0], dev[1], cfg.data.eval_batch_size), dev[2])
        return {"eval_spearman": scores["spearman"], "eval_pearson": scores["pearson"]}

    def write_model(m: nn.Module, directory: Path) -> None:
        m.encoder.save_sentence_transformers(directory / "model", tokenizer)

    run_config = config_to_dict(cfg)
    def read_weights(directory: Path) -> dict:  # the encoder's weights back from a checkpoint's folder
        return {f"encoder.{k}": v for k, v in load_encoder(directory / "model")[0].state_dict().items()}

    trainer = Trainer(model, optimizer, scheduler, batches, cfg.train, evaluate=evaluate, save_model=write_model,
                      run_config=run_config, clip_grad_norm=cfg.optim.clip_grad_norm or None,
                      load_weights=read_weights, weights_prefix="encoder.")
    out = Path(cfg.train.output_dir)
    initial = {f"initial_{k}": v for k, v in evaluate(model).items()}  # the starting model, zero-shot
    resumed = trainer.start()
    metrics = {**trainer.fit(), **({} if resumed else initial), "train_examples": len(rows),
               "truncated_texts": truncated}
    stopped_early(metrics, trainer)
    encoder.eval()
    encoder.save_sentence_transformers(out / "model", tokenizer)
    if cfg.calibration.file:
        record = calibrate_encoder(encoder, tokenizer, cfg.calibration, out / "model", cfg.data.eval_batch_size)
        metrics.update(threshold=record["threshold"], **{f"threshold_{record['metric']}": record["value"]})
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics

