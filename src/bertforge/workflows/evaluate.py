"""Evaluate and predict with fine-tuned models: score a split, pick the model-selection score, run a
model directory without training.

`score_split(adapter, model, examples, features, split, batch_size)` runs a task adapter (see
`bertforge.workflows.tasks`) over featurized examples and returns the predictions and the official metrics
with the split's suffix (`_matched` / `_mismatched` for MNLI). `main_score(metrics)` is the
model-selection score: the mean of the official metrics.

`evaluate(model_dir, data)` and `predict(model_dir, data, output)` run a fine-tuned model directory
(written by `bertforge finetune`, whose config holds the task and sequence settings) without training.
`evaluate_mlm_data(model_dir, paths)` scores a masked-LM model on held-out text with the one MLM protocol.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bertforge.data.mlm_eval import DEFAULT_MASK_RATE, EVAL_SEED, evaluate_mlm, pack_texts
from bertforge.errors import require
from bertforge.workflows.tasks import (
    TaskAdapter,
    TaskSettings,
    canonical_split,
    get_task_adapter,
    suffix,
    truncation_note,
)


def score_split(adapter: TaskAdapter, model: nn.Module, examples: list, features: list, split: str,
                batch_size: int) -> tuple[Any, dict[str, float]]:
    """(predictions, metrics with the split's suffix); metrics empty when the split has no labels."""
    predictions = adapter.decode(examples, features, adapter.run(model, features, batch_size))
    labeled = all(getattr(e, "label", None) is not None or getattr(e, "answers", None) for e in examples)
    if not labeled:
        return predictions, {}
    metrics = adapter.metrics(examples, predictions)
    return predictions, {f"{k}{suffix(split)}": float(v) for k, v in metrics.items()}


def main_score(metrics: dict[str, float]) -> float:
    """The selection score: the mean of the task's official metrics (the GLUE convention for MRPC,
    QQP, STS-B; MNLI averages matched and mismatched); nan when any is nan."""
    values = list(metrics.values())
    return float(np.mean(values)) if values and all(math.isfinite(v) for v in values) else float("nan")


# ----------------------------------------------------------------------------- evaluate / predict

def _load_finetuned(model_dir: str | Path, task: str | None, device: str):
    from bertforge.model.loading import load_model
    from bertforge.train.settings import resolve_device

    loaded = load_model(model_dir)
    task = task or loaded.meta.get("task")
    require(task is not None, f"model '{model_dir}' has no task in its config: pass --task, or fine-tune it first "
            "with `bertforge finetune`")
    saved = {k: v for k, v in (loaded.meta.get("settings") or {}).items() if k in TaskSettings.__dataclass_fields__}
    settings = TaskSettings(**saved)
    adapter = get_task_adapter(task, settings)
    require(loaded.head == adapter.head, f"model '{model_dir}' has head {loaded.head!r}, task {task} needs "
            f"{adapter.head!r}: fine-tune it with `bertforge finetune --task {task}` first")
    require(adapter.num_labels is None or loaded.meta.get("num_labels") == adapter.num_labels,
            f"model '{model_dir}' has {loaded.meta.get('num_labels')} labels, task {task} has {adapter.num_labels}: "
            "pass the model fine-tuned for this task")
    require(loaded.tokenizer is not None, f"model '{model_dir}' has no tokenizer files: save it with its tokenizer")
    return loaded.model.to(resolve_device(device)).eval(), loaded.tokenizer, adapter, settings


def _apply(settings: TaskSettings, overrides: dict) -> TaskSettings:
    unknown = sorted(set(overrides) - set(TaskSettings.__dataclass_fields__))
    require(not unknown, f"unknown setting(s) {unknown}: use {', '.join(TaskSettings.__dataclass_fields__)}")
    return TaskSettings(**{**asdict(settings), **{k: v for k, v in overrides.items() if v is not None}})


def _run_splits(model_dir, data: str, splits: tuple[str, ...] | None, task, device, labeled, overrides,
                output_dir) -> tuple[TaskAdapter, dict]:
    """Score (and write predictions of) each split; splits None = the task's evaluation splits for a
    folder or hub name, the file itself otherwise."""
    model, tokenizer, adapter, settings = _load_finetuned(model_dir, task, device)
    settings = _apply(settings, overrides)
    if splits is None:
        splits = ("dev",) if Path(data).is_file() else adapter.eval_splits
    result: dict = {"task": adapter.name, "model": str(model_dir), "data": str(data), "examples": 0, "truncated": 0}
    for split in map(canonical_split, splits):
        examples = adapter.read(data, split, labeled)
        what = f"'{data}'" if Path(data).is_file() else f"'{data}' {split}"
        features, cut = adapter.featurize(examples, tokenizer, settings, what)
        if cut:
            print(truncation_note(adapter.name, cut, f"of {what}", settings), file=sys.stderr)
        with torch.inference_mode():
            predictions, metrics = score_split(adapter, model, examples, features, split, settings.eval_batch_size)
        if output_dir is not None:
            result.setdefault("predictions", []).append(
                str(adapter.write_predictions(Path(output_dir), split, examples, predictions)))
        result["examples"] += len(examples)
        result["truncated"] += cut
        result.update(metrics)
    return adapter, result


def evaluate(model_dir: str | Path, data: str, *, split: str | None = None, task: str | None = None,
             output_dir: str | Path | None = None, device: str = "auto", **overrides) -> dict:
    """Official metrics of a fine-tuned model on labelled data: a file, or a folder / hub name (then
    `split`, default the task's dev split(s), e.g. MNLI matched and mismatched). `overrides` are
    TaskSettings fields (max_seq_length, truncate, eval_batch_size, ...). With `output_dir`,
    predictions and metrics.json are written there."""
    splits = None if split is None else (split,)
    adapter, result = _run_splits(model_dir, data, splits, task, device, True, overrides, output_dir)
    if output_dir is not None:
        (Path(output_dir) / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def predict(model_dir: str | Path, data: str, output_dir: str | Path, *, split: str = "test",
            task: str | None = None, device: str = "auto", **overrides) -> dict:
    """Write predictions of a fine-tuned model into `output_dir` for a file (labelled or not: decided
    from its header or first record) or a folder / hub split. Returns {task, examples, predictions
    (paths), truncated, and the metrics when the data is labelled}."""
    _, result = _run_splits(model_dir, data, (split,), task, device, None, overrides, output_dir)
    return result


# ----------------------------------------------------------------------------- held-out masked LM

def evaluate_mlm_data(model_dir: str | Path, data: list[str], *, split: str = "val", seq_len: int = 128,
                      mask_rate: float = DEFAULT_MASK_RATE, seed: int = EVAL_SEED, max_rows: int | None = None,
                      batch_size: int = 64, boundary: str = "blank", device: str = "auto",
                      bert_replacement: bool = False) -> dict:
    """The held-out MLM protocol (`bertforge.data.mlm_eval`) for a masked-LM model directory (ours or a
    Hugging Face BERT) on raw text (files, folders, .gz, .jsonl; packed into `seq_len`-token rows as
    `prepare` packs them) or on a folder written by `bertforge prepare` (its `split`)."""
    from bertforge.data.corpus import iter_documents
    from bertforge.data.dataset import PackedDataset
    from bertforge.model.loading import load_model
    from bertforge.train.settings import resolve_device

    require(0 < mask_rate < 1, f"--mask-rate {mask_rate} is out of range: pass a value in (0, 1), e.g. 0.15")
    require(max_rows is None or max_rows >= 1, f"--max-rows {max_rows}: pass 1 or more, or leave it out for all rows")
    loaded = load_model(model_dir)
    require(loaded.head in ("masked_lm", "pretraining"),
            f"model '{model_dir}' has head {loaded.head!r}: MLM evaluation needs a masked-LM head (a pretrained "
            "model, not a fine-tuned or sentence-only one)")
    require(loaded.tokenizer is not None, f"model '{model_dir}' has no tokenizer files: save it with its tokenizer")
    tokenizer, positions = loaded.tokenizer, loaded.config.max_position_embeddings
    if len(data) == 1 and (Path(data[0]) / "manifest.json").is_file():
        rows = PackedDataset(data[0], split)
        require(rows.seq_len <= positions, f"shards in '{data[0]}' hold {rows.seq_len}-token rows but the model has "
                f"{positions} positions: prepare them with --seq-len {positions}")
        manifest = rows.manifest["tokenizer"]
        require(manifest.get("fingerprint") == tokenizer.fingerprint(),
                f"the shards in '{data[0]}' were prepared with another tokenizer than model '{model_dir}' has: "
                "pass raw text instead, or shards prepared with the model's tokenizer")
        source = f"{data[0]} ({split} split)"
    else:
        require(seq_len <= positions, f"--seq-len {seq_len} is longer than the model's {positions} positions: "
                f"pass --seq-len {positions} or less")
        rows = pack_texts(iter_documents(data, boundary=boundary), tokenizer, seq_len, max_rows)
        source = ", ".join(map(str, data))
    model = loaded.model.to(resolve_device(device))
    metrics = evaluate_mlm(model, rows, tokenizer, mask_rate=mask_rate, seed=seed, max_rows=max_rows,
                           batch_size=batch_size, bert_replacement=bert_replacement)
    return {"task": "mlm", "model": str(model_dir), "data": source, "protocol": "bert 80/10/10" if bert_replacement
            else "every target [MASK]", **metrics}
