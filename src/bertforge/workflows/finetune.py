"""`bertforge finetune`: GLUE, SNLI/SICK, SQuAD v1.1 and multiple choice on the one Trainer.

    cfg = load_finetune_config(overrides=["task=rte", "model=path/to/bert", "data.path=data/rte"])
    metrics = main(cfg)

Tasks differ by their adapter (`bertforge.workflows.tasks`): head, reader, featurizer, collate,
metric and prediction file. Everything else is shared: the model comes from `load_model` (our
checkpoint, an HF BERT or a sentence-transformers directory) with the task's head; `ExampleBatches`
shuffles the training features per epoch from (seed, epoch), groups them by length (features of
similar length share a batch: less padding) and pads each batch to its longest; the Trainer
evaluates after every epoch and checkpoints, so a killed run resumes exactly (`train.resume=true`).

A run directory holds config.json (resolved), metrics.jsonl (training curve and per-epoch
evaluations), summary.json (steps, truncation counts, chosen checkpoint), metrics.json (`{task,
model, seed, metric: value}`, the official metrics of the kept model), the predictions on the
evaluation split(s) and `model/` (save_model, with id2label and the task settings, ready for
`bertforge evaluate` / `predict`). The kept model is the best evaluation (by the mean of the task's
official metrics) or, with `select=last`, the final one.

`seeds=N` runs N seeds (train.seed, +1, ...) into `seed_<s>/` and writes `seeds.json` with every
run's metrics and their median, min, max and standard deviation. The `glue-sane` protocol (after
cramming's `GLUE_sane.yaml`) is one global setting for every task: 5 epochs at most, batch 16,
lr 4e-5 with cosine decay and 10% warmup, 128 tokens, the last checkpoint (no selection on the dev
set that is reported) and the median of 5 seeds unless `seeds` says otherwise.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bertforge import config as conf
from bertforge.errors import require
from bertforge.model.loading import load_model
from bertforge.train import distributed as dist
from bertforge.train.batches import EpochBatches
from bertforge.train.faults import stopped_early
from bertforge.train.loop import Trainer
from bertforge.train.optim import OptimConfig, build_optimizer, build_schedule
from bertforge.train.settings import TrainConfig, seed_everything
from bertforge.workflows.evaluate import main_score, score_split
from bertforge.workflows.tasks import TaskAdapter, TaskSettings, get_task_adapter, truncation_note

PROTOCOLS: dict[str, dict] = {
    "glue-sane": {"seeds": 5, "select": "last", "train": {"batch_size": 16, "epochs": 5},
                  "optim": {"lr": 4e-5, "schedule": "cosine", "warmup_ratio": 0.1},
                  "data": {"max_seq_length": 128}},
}
MAX_EPOCHS = {"glue-sane": 5}


@dataclass
class FinetuneDataConfig(TaskSettings):
    path: str = ""  # folder with the task's canonical file names, or hub:<name>
    train_file: str | None = None  # instead of the folder's train file
    dev_files: list[str] = field(default_factory=list)  # instead of the folder's dev file(s) (MNLI: m, mm)
    dev_from_train: int = 0  # hold out the last N training examples as the dev set (WinoGrande has none)
    max_train_examples: int | None = None  # the first N (quick runs)
    max_eval_examples: int | None = None
    max_seq_length: int | None = None  # None: 128, SQuAD 384
    group_by_length: bool = True  # batches of similar lengths (shuffled), less padding


@dataclass
class FinetuneModelConfig:
    path: str = ""  # our model directory, an HF BERT or a sentence-transformers directory (or a hub id)
    # None keeps the model's own value; set, they replace it for fine-tuning and in the saved model (a budget
    # model pretrains without dropout; a small task may want it back)
    hidden_dropout_prob: float | None = None
    attention_probs_dropout_prob: float | None = None
    classifier_dropout: float | None = None
    classifier_pooling: str | None = None  # "cls" (BERT's) | "mean" (the real tokens' mean, ModernBERT's option)

    def runtime(self) -> dict:
        """The settings given, as `load_model(config_overrides=...)` takes them."""
        return {k: v for k, v in asdict(self).items() if k != "path" and v is not None}


DEFAULT_EPOCHS = 3.0  # train.epochs when unset


@dataclass
class FinetuneRunConfig:
    task: str = ""
    model: FinetuneModelConfig = field(default_factory=lambda: FinetuneModelConfig())
    tokenizer: str | None = None  # default: the model directory's tokenizer
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_ratio=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        output_dir="runs/finetune", batch_size=32, log_every=20, keep_last=1, max_steps=None))
    seeds: int = 1  # N > 1: N runs into seed_<s>/ and their median
    protocol: str | None = None  # "glue-sane"
    select: str = "best"  # kept model: "best" evaluation or "last"

    RENAMED: ClassVar[dict[str, str]] = {"epochs": "train.epochs", "model": "model.path"}


def epochs_of(cfg: FinetuneRunConfig) -> float:
    return cfg.train.epochs if cfg.train.epochs is not None else DEFAULT_EPOCHS


def load_finetune_config(file: str | Path | None = None, overrides: list[str] | None = None,
                         protocol: str | None = None, flags: dict[str, Any] | None = None) -> FinetuneRunConfig:
    """defaults <- protocol preset <- file <- `flags` ({dotted key: value}, values taken as they are) <-
    dotted `overrides` ("optim.lr=3e-5", values parsed as YAML scalars)."""
    base = None
    if protocol is not None:
        require(protocol in PROTOCOLS, f"protocol {protocol!r} is unknown: use one of {', '.join(PROTOCOLS)}")
        base = {**copy.deepcopy(PROTOCOLS[protocol]), "protocol": protocol}
    return conf.load_run_config(FinetuneRunConfig, file=file, overrides=overrides, base=base, flags=flags)


def validate(cfg: FinetuneRunConfig) -> None:
    require(bool(cfg.task), "no task: pass --task (e.g. sst2, mnli, squad, arc_easy)")
    require(bool(cfg.model.path), "no model: pass --model (our model directory or a Hugging Face BERT directory)")
    require(bool(cfg.data.path or cfg.data.train_file), "no data: pass --data (a folder or hub:<name>) or "
            "data.train_file=FILE")
    epochs = epochs_of(cfg)
    require(epochs > 0 and cfg.seeds >= 1, f"train.epochs={epochs}, seeds={cfg.seeds}: need epochs > 0, seeds >= 1")
    require(cfg.train.batch_size >= 1, f"train.batch_size={cfg.train.batch_size}: pass --batch-size 1 or more")
    require(cfg.select in ("best", "last"), f"select={cfg.select!r}: use best or last")
    require(cfg.protocol is None or cfg.protocol in PROTOCOLS,
            f"protocol {cfg.protocol!r} is unknown: use one of {', '.join(PROTOCOLS)}")
    if cfg.protocol is not None:
        require(get_task_adapter(cfg.task).head == "sequence_classification", f"protocol {cfg.protocol} is for "
                f"GLUE-style tasks, not {cfg.task}: drop --protocol")
        require(cfg.train.max_steps is None, f"protocol {cfg.protocol} trains whole epochs: drop train.max_steps")
        require(epochs <= MAX_EPOCHS[cfg.protocol], f"protocol {cfg.protocol} allows at most "
                f"{MAX_EPOCHS[cfg.protocol]} epochs, got {epochs}: lower --epochs or drop --protocol")
        require(cfg.select == "last", f"protocol {cfg.protocol} reports the last checkpoint, not one chosen on "
                "the reported dev set: drop select=best or drop --protocol")


class ExampleBatches(EpochBatches):
    """Resumable fine-tuning batches over featurized examples (train/batches.py runs them).

    Epoch e permutes the features with `default_rng([seed, e])`; features of one group (the choice
    count for multiple choice) are cut into chunks of `bucket` batches, each chunk sorted by length
    and split into batches (with `group_by_length`), then the batch order is permuted too. Every epoch
    has the same number of batches, the last of a group may be short. As in pretraining, process r of
    W takes batches r, r+W, ... The state is (epoch, position): nothing else is needed to resume.
    """

    def __init__(self, features: list, collate: Callable[[list], dict], batch_size: int, seed: int, *,
                 lengths: list[int], groups: list[int], group_by_length: bool = True, bucket: int = 50,
                 rank: int = 0, world: int = 1):
        require(len(features) > 0, "no training examples: pass a non-empty training file")
        self.features, self.B, self.seed = features, batch_size, seed
        self.lengths, self.groups = np.asarray(lengths), np.asarray(groups)
        self.group_by_length, self.bucket = group_by_length, bucket
        super().__init__(self.plan_epoch, lambda idx: collate([features[i] for i in idx]), rank=rank, world=world,
                         what=f"{len(features)} training features")

    def plan_epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.features))
        chunk = self.B * self.bucket if self.group_by_length else self.B
        batches = []
        for g in np.unique(self.groups):
            idx = perm[self.groups[perm] == g]
            for c in range(0, len(idx), chunk):
                part = idx[c:c + chunk]
                if self.group_by_length:
                    part = part[np.argsort(self.lengths[part], kind="stable")]
                batches += [part[i:i + self.B] for i in range(0, len(part), self.B)]
        return [batches[i] for i in rng.permutation(len(batches))]


def task_settings(cfg: FinetuneRunConfig) -> TaskSettings:
    values = {f.name: getattr(cfg.data, f.name) for f in fields(TaskSettings)}
    if values["max_seq_length"] is None:
        values["max_seq_length"] = 384 if cfg.task.lower() == "squad" else 128
    return TaskSettings(**values)


def load_splits(cfg: FinetuneRunConfig, adapter: TaskAdapter) -> tuple[list, dict[str, list]]:
    """Training examples and {eval split: examples}, honouring the file overrides and the slices."""
    d = cfg.data
    train = adapter.read(d.train_file or d.path, "train", labeled=True)
    if d.dev_from_train:
        require(0 < d.dev_from_train < len(train), f"data.dev_from_train={d.dev_from_train} must leave training "
                f"examples (the file has {len(train)}): lower it")
        evals = {"dev": train[-d.dev_from_train:]}
        train = train[:-d.dev_from_train]
    elif d.dev_files:
        splits = adapter.eval_splits if len(d.dev_files) == len(adapter.eval_splits) else ("dev",)
        require(len(d.dev_files) == len(splits), f"{len(d.dev_files)} dev files for {adapter.name}: pass one, or "
                f"one per evaluation split ({', '.join(adapter.eval_splits)})")
        evals = {s: adapter.read(f, s, labeled=True) for s, f in zip(splits, d.dev_files)}
    else:
        folder = Path(d.path)
        lacking = [s for s in adapter.eval_splits if folder.is_dir()
                   and not any((folder / name).is_file() for name in adapter.files.get(s, ()))]
        require(bool(d.path) and not lacking, f"no {adapter.name} {' / '.join(lacking) or 'dev'} data in "
                f"'{d.path}': pass data.dev_files=FILE, or hold out training examples with data.dev_from_train=N")
        evals = {s: adapter.read(d.path, s, labeled=True) for s in adapter.eval_splits}
    train = train[:d.max_train_examples] if d.max_train_examples else train
    evals = {s: ex[:d.max_eval_examples] if d.max_eval_examples else ex for s, ex in evals.items()}
    return train, evals


def _load(cfg: FinetuneRunConfig, adapter: TaskAdapter, settings: TaskSettings):
    from bertforge.wordpiece import WordPieceTokenizer

    loaded = load_model(cfg.model.path, head=adapter.head, num_labels=adapter.num_labels,
                        config_overrides=cfg.model.runtime())
    tokenizer = WordPieceTokenizer.from_pretrained(cfg.tokenizer) if cfg.tokenizer else loaded.tokenizer
    require(tokenizer is not None, f"model '{cfg.model.path}' has no tokenizer files: pass tokenizer=PATH")
    require(tokenizer.vocab_size <= loaded.config.vocab_size, f"tokenizer of {tokenizer.vocab_size} tokens "
            f"does not fit the model's vocab_size {loaded.config.vocab_size}: pass the model's own tokenizer")
    positions = loaded.config.max_position_embeddings
    require(settings.max_seq_length <= positions, f"max_seq_length={settings.max_seq_length} exceeds the model's "
            f"{positions} positions: pass --max-seq-length {positions} or less")
    if loaded.initialized:
        dist.print0(f"note: new {adapter.head} head parameters initialised: {', '.join(loaded.initialized)}")
    return loaded.model.train(), tokenizer


def _featurize(adapter, tokenizer, settings, name: str, examples: list) -> tuple[list, int]:
    features, cut = adapter.featurize(examples, tokenizer, settings, name)
    if cut:
        dist.print0(truncation_note(adapter.name, cut, name, settings))
    return features, cut


def _write_json(path: Path, data: dict) -> None:
    from bertforge.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def run_one(cfg: FinetuneRunConfig) -> dict:
    """One seed: train, keep the best (or last) model, write metrics, predictions and the model."""
    from bertforge.model.loading import save_model

    out, seed = Path(cfg.train.output_dir), cfg.train.seed
    settings = task_settings(cfg)
    adapter = get_task_adapter(cfg.task, settings)
    seed_everything(seed)
    model, tokenizer = _load(cfg, adapter, settings)
    train_ex, eval_ex = load_splits(cfg, adapter)
    train_feats, cut = _featurize(adapter, tokenizer, settings, "train", train_ex)
    evals = {s: (ex, *_featurize(adapter, tokenizer, settings, s, ex)) for s, ex in eval_ex.items()}
    batches = ExampleBatches(train_feats, adapter.collate, cfg.train.batch_size, seed,
                             lengths=[adapter.length(f) for f in train_feats],
                             groups=[adapter.group(f) for f in train_feats],
                             group_by_length=cfg.data.group_by_length, rank=dist.rank(), world=dist.world_size())
    per_epoch = math.ceil(batches.per_rank / cfg.train.grad_accum)
    t = cfg.train
    train_cfg = replace(t, max_steps=t.max_steps or max(1, math.ceil(epochs_of(cfg) * per_epoch)),
                        eval_every=t.eval_every or (0 if t.eval_every_minutes else per_epoch),
                        save_every=t.save_every or (0 if t.save_every_minutes else per_epoch),
                        best_metric="eval_score", greater_is_better=True)
    device_type = "cuda" if torch.cuda.is_available() and t.device != "cpu" else "cpu"
    optimizer = build_optimizer(model, cfg.optim, device_type)
    scheduler = build_schedule(optimizer, cfg.optim, train_cfg.max_steps)
    meta = {"task": adapter.name, "settings": asdict(settings), "base_model": cfg.model.path, "id2label": adapter.id2label}

    def evaluate(m: nn.Module) -> dict:
        if not dist.is_main():
            return {}
        metrics = {k: v for s, (ex, feats, _) in evals.items()
                   for k, v in score_split(adapter, m, ex, feats, s, settings.eval_batch_size)[1].items()}
        return {"eval_score": main_score(metrics), **{f"eval_{k}": v for k, v in metrics.items()}}

    def write_model(m: nn.Module, directory: Path) -> None:  # directory: <checkpoint>/model
        save_model(m, directory, tokenizer=tokenizer, meta=meta)

    run_config = {**conf.config_to_dict(cfg), "train": asdict(train_cfg), "steps_per_epoch": per_epoch}
    trainer = Trainer(model, optimizer, scheduler, batches, train_cfg, evaluate=evaluate, save_model=write_model,
                      load_weights=lambda d: load_model(d).model.state_dict(),
                      run_config=run_config, clip_grad_norm=cfg.optim.clip_grad_norm or None)
    trainer.start()
    summary = trainer.fit()
    stopped_early(summary, trainer)
    if not dist.is_main():
        return {}
    kept = trainer.ckpt.best() if cfg.select == "best" else None
    metrics = _score_kept(model, kept, adapter, evals, settings, out)
    result = {"task": adapter.name, "model": cfg.model.path, "seed": seed, **metrics}
    _write_json(out / "metrics.json", result)
    _write_json(out / "summary.json", {**summary, "kept": kept.name if kept else "last", "steps_per_epoch": per_epoch,
                                       "truncated": {"train": cut, **{s: e[2] for s, e in evals.items()}},
                                       "examples": {"train": len(train_ex), **{s: len(e[0]) for s, e in evals.items()}}})
    save_model(model, out / "model", tokenizer=tokenizer, meta=meta)
    return result


def _score_kept(model: nn.Module, kept: Path | None, adapter: TaskAdapter, evals: dict, settings: TaskSettings,
                out: Path) -> dict[str, float]:
    """Load the kept checkpoint's weights (None: keep the final ones), score every evaluation split and
    write its predictions."""
    if kept is not None:
            model.load_state_dict(load_model(kept / "model").model.state_dict())  # any folder layout save_model writes
    model.eval()
    metrics: dict[str, float] = {}
    with torch.no_grad():
        for split, (examples, features, _) in evals.items():
            predictions, split_metrics = score_split(adapter, model, examples, features, split,
                                                     settings.eval_batch_size)
            adapter.write_predictions(out, split, examples, predictions)
            metrics.update(split_metrics)
    return metrics


def aggregate(runs: list[dict]) -> dict:
    """Median, min, max and standard deviation over seeds of every metric."""
    names = [k for k in runs[0] if k not in ("task", "model", "seed")]
    spread = {}
    for name in names:
        values = [r[name] for r in runs]
        spread[name] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                        "std": statistics.pstdev(values) if len(values) > 1 else 0.0}
    return {"task": runs[0]["task"], "model": runs[0]["model"], "seeds": [r["seed"] for r in runs],
            **{k: v["median"] for k, v in spread.items()}, "spread": spread, "runs": runs}


def main(cfg: FinetuneRunConfig) -> dict:
    """Fine-tune as configured; returns metrics.json's content (seeds > 1: the aggregate of seeds.json)."""
    validate(cfg)
    dist.init_distributed(cfg.train.dist_timeout_minutes)
    try:
        if cfg.seeds == 1:
            return run_one(cfg)
        out, runs = Path(cfg.train.output_dir), []
        for i in range(cfg.seeds):
            seed = cfg.train.seed + i
            sub = replace(cfg, seeds=1, train=replace(cfg.train, seed=seed, output_dir=str(out / f"seed_{seed}")))
            done = Path(sub.train.output_dir) / "metrics.json"
            if cfg.train.resume and done.is_file():
                dist.print0(f"seed {seed}: finished before, reusing {done}")
                runs.append(json.loads(done.read_text()))
            else:
                dist.print0(f"seed {seed} ({i + 1} of {cfg.seeds})")
                runs.append(run_one(sub))
        if not dist.is_main():
            return {}
        result = aggregate(runs)
        _write_json(out / "seeds.json", result)
        _write_json(out / "config.json", conf.config_to_dict(cfg))
        return result
    finally:
        dist.cleanup()


__all__ = ["PROTOCOLS", "ExampleBatches", "FinetuneDataConfig", "FinetuneRunConfig", "aggregate",
           "load_finetune_config", "load_splits", "main", "run_one", "validate"]
