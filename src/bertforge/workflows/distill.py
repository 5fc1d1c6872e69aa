"""Knowledge distillation: a frozen teacher (ours or Hugging Face, via `load_model`) into a smaller
student, for sequence-classification tasks (GLUE-format files) and for masked-LM pretraining (shards
written by `bertforge prepare`). `main(DistillRunConfig) -> metrics`.

The loss of a batch (Hinton et al., 2015; DistilBERT; TinyBERT for the hidden-state term):

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * hard loss (the student head's own loss on the gold labels)
         + hidden_weight * mean over mapped layers of MSE or (1 - cosine) of hidden states

The T^2 keeps the soft term's gradients the same size as T changes. For MLM the KL is taken at
the masked positions only (the heads' sparse logits, the same positions for both models). For
regression (STS-B) there is no distribution to soften: the soft term is MSE(student, teacher).
Hidden states are compared at non-padding tokens; student layer i (1..Ls) is matched with teacher
layer round(i * Lt / Ls), embeddings with embeddings, through a learned linear projection when the
widths differ.

The student is a preset or, by default, the teacher's shape with half its layers, and can start from
the teacher (`init_student_from_teacher`: embeddings, evenly spaced layers, heads where shapes
match). The teacher is never trained and stays in eval mode (no dropout); it is not part of the
trainable module, so checkpoints hold the student only. `main` reports the student's and the
teacher's score on the dev set, the score kept (%) and the speed-up (student vs teacher inference
examples/s on the same dev batches).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bertforge.config import config_to_dict, parse_duration
from bertforge.data.masking import IGNORE_INDEX, MaskingConfig
from bertforge.errors import require
from bertforge.model.bert import BertConfig
from bertforge.model.loading import load_model
from bertforge.train.batches import EpochBatches, shuffled_batches
from bertforge.train.faults import stopped_early
from bertforge.train.loop import Trainer
from bertforge.train.optim import OptimConfig, build_optimizer, build_schedule
from bertforge.train.settings import TrainConfig, seed_everything
from bertforge.workflows.distill_model import (
    DistillationModel,
    DistillLossConfig,
    init_student_from_teacher,
    kd_loss,
)
from bertforge.workflows.tasks import ClassificationTask, TaskSettings

MODES = ("task", "mlm")


# ------------------------------------------------------------------------------------------- data

# ------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_distill(model: DistillationModel, batches: list[dict], task: str | None) -> dict:
    """Distillation loss, KL to the teacher (T = 1; MSE for regression) and both models' scores."""
    from bertforge.eval.metrics import compute_task_metrics

    device = next(model.student.parameters()).device
    loss = dist = 0.0
    rows, s_pred, t_pred, gold = 0, [], [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        labels = batch["labels"]
        labels = labels[labels != IGNORE_INDEX] if task is None else labels  # MLM: masked positions
        n = len(out.logits)
        loss += float(out.loss) * n
        dist += float(F.mse_loss(out.logits.float(), out.teacher_logits.float()) if model.regression
                      else kd_loss(out.logits, out.teacher_logits)) * n
        pick = (lambda x: x.squeeze(-1)) if model.regression else (lambda x: x.argmax(-1))
        s_pred.append(pick(out.logits).cpu())
        t_pred.append(pick(out.teacher_logits).cpu())
        gold.append(labels.cpu())
        rows += n
    s_pred, t_pred, gold = torch.cat(s_pred).tolist(), torch.cat(t_pred).tolist(), torch.cat(gold).tolist()
    name = "eval_teacher_mse" if model.regression else "eval_kl"
    metrics = {"eval_loss": loss / max(rows, 1), name: dist / max(rows, 1)}
    score = (lambda p: compute_task_metrics(task, p, gold)) if task else (
        lambda p: {"accuracy": float(np.mean(np.asarray(p) == np.asarray(gold)))})
    metrics.update({f"eval_{k}": v for k, v in score(s_pred).items()})
    metrics.update({f"teacher_{k}": v for k, v in score(t_pred).items()})
    return metrics


@torch.inference_mode()
def throughput(models: list[nn.Module], batches: list[dict], device: torch.device, repeats: int = 3) -> list[float]:
    """Inference examples per second of each model over `batches` (labels dropped): after a warm-up batch,
    the models take turns `repeats` times and each keeps its fastest pass (robust to a busy machine)."""
    inputs = [{k: v.to(device) for k, v in b.items() if k != "labels"} for b in batches]
    best = [math.inf] * len(models)
    for model in models:
        model.eval().to(device)(**inputs[0])
    for _ in range(repeats):
        for i, model in enumerate(models):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for b in inputs:
                model(**b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - start)
    return [sum(len(b["input_ids"]) for b in inputs) / t for t in best]


# ------------------------------------------------------------------------------------------- run

@dataclass
class StudentConfig:
    preset: str | None = None  # None: the teacher's shape
    num_hidden_layers: int | None = None  # None: half the teacher's (or the preset's own)
    overrides: dict = field(default_factory=dict)  # any BertConfig field
    init_from_teacher: bool = True  # embeddings + evenly spaced teacher layers (needs the teacher's width)
    teacher_layers: list[int] | None = None  # which teacher layers to copy; default evenly spaced from 0


@dataclass
class DistillDataConfig:
    mode: str = "task"  # task (GLUE-format files) | mlm (a folder written by `bertforge prepare`)
    task: str = "sst2"  # task mode: a GLUE/SNLI/SICK task name
    path: str = ""  # task: train file or task folder; mlm: prepared shard folder
    dev: str | None = None  # task: dev file (default: the dev split of the `path` folder)
    max_seq_length: int = 128
    limit: int | None = None  # first N training examples
    eval_limit: int | None = None
    eval_batch_size: int = 64
    eval_batches: int = 20  # mlm: validation batches (fixed masks)
    speed_batches: int = 10  # dev batches timed for the speed-up


@dataclass
class DistillRunConfig:
    teacher: str = ""  # model folder: ours or Hugging Face (a fine-tuned classifier, or an MLM model)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_ratio=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/distill"))

    RENAMED: ClassVar[dict[str, str]] = {"data.epochs": "train.epochs"}


def student_config(cfg: StudentConfig, teacher: BertConfig) -> BertConfig:
    fields = {"vocab_size": teacher.vocab_size, **cfg.overrides}
    if cfg.num_hidden_layers is not None:
        fields["num_hidden_layers"] = cfg.num_hidden_layers
    if cfg.preset is not None:
        return BertConfig.from_preset(cfg.preset, **fields)
    fields.setdefault("num_hidden_layers", max(1, teacher.num_hidden_layers // 2))
    return BertConfig.from_dict({**teacher.to_dict(), **fields})


def load_teacher(cfg: DistillRunConfig):
    """The teacher LoadedModel with a trained head for the mode (classifier for task, MLM head for mlm)."""
    from bertforge.data.glue import get_task

    require(bool(cfg.teacher), "teacher is empty: pass a model folder (ours or Hugging Face)")
    require(cfg.data.mode in MODES, f"data.mode '{cfg.data.mode}' is unknown: use task or mlm")
    if cfg.data.mode == "mlm":
        loaded = load_model(cfg.teacher, "masked_lm")
        hint = "a model with an MLM head (ours pretrained, or an HF BertForMaskedLM)"
    else:
        spec = get_task(cfg.data.task)
        loaded = load_model(cfg.teacher, "sequence_classification", num_labels=spec.num_labels)
        hint = f"one fine-tuned on {spec.name} first (bertforge finetune --task {spec.name})"
    require(not loaded.initialized, f"teacher '{cfg.teacher}' has no trained weights for "
            f"{', '.join(loaded.initialized[:3])}: pass {hint}")
    require(loaded.tokenizer is not None, f"teacher '{cfg.teacher}' has no tokenizer files: save them with it")
    return loaded


def _task_data(cfg: DistillRunConfig, tokenizer, max_len: int):
    from bertforge.data.glue import get_task, load_task_data

    d, spec = cfg.data, get_task(cfg.data.task)
    require(d.dev is not None or Path(d.path).is_dir(), f"data.path '{d.path}' is a file: pass data.dev too")
    train = load_task_data(spec, d.path, "train")[:d.limit]
    dev = load_task_data(spec, d.dev or d.path, "dev")[:d.eval_limit]
    # the fine-tuning task adapter featurizes and collates (longest-first cut at max_len, as HF)
    adapter, settings = ClassificationTask(spec.name), TaskSettings(max_seq_length=max_len)
    train_feats, cut_train = adapter.featurize(train, tokenizer, settings, "train")
    dev_feats, cut_dev = adapter.featurize(dev, tokenizer, settings, "dev")
    B, seed = cfg.train.batch_size, cfg.train.seed
    batches = EpochBatches(lambda epoch: shuffled_batches(len(train_feats), B, seed, epoch),
                           lambda idx: adapter.collate([train_feats[i] for i in idx]))
    eval_batches = [adapter.collate(dev_feats[i:i + d.eval_batch_size])
                    for i in range(0, len(dev_feats), d.eval_batch_size)]
    return batches, batches.per_rank, eval_batches, {"truncated_examples": cut_train + cut_dev}


def _mlm_data(cfg: DistillRunConfig, tokenizer):
    from bertforge.data.dataset import PackedDataset
    from bertforge.data.masking import MLMCollator
    from bertforge.workflows.pretrain import PretrainBatches

    root, fingerprint = Path(cfg.data.path), tokenizer.fingerprint()
    rows = PackedDataset(root, "train", fingerprint=fingerprint)
    require(rows.mode == "packed", f"'{root}' holds NSP pairs: prepare packed rows (--mode packed) for MLM distillation")
    require(any(s["split"] == "val" for s in rows.manifest["shards"]),
            f"'{root}' has no val split: prepare it with --val-fraction above 0")
    batches = PretrainBatches(rows, MLMCollator.from_tokenizer(tokenizer, cfg.masking, seed=cfg.train.seed),
                              cfg.train.batch_size, cfg.train.seed)
    val, collator = PackedDataset(root, "val", fingerprint=fingerprint), MLMCollator.from_tokenizer(
        tokenizer, cfg.masking, seed=0)
    eval_batches, B = [], cfg.data.eval_batch_size
    for b in range(min(cfg.data.eval_batches, math.ceil(len(val) / B))):
        collator.generator.manual_seed(12345 + b)  # fixed masks: every evaluation sees the same targets
        eval_batches.append(collator(val.batch(np.arange(b * B, min((b + 1) * B, len(val))))))
    return batches, len(batches.loader), eval_batches, {}


def main(cfg: DistillRunConfig) -> dict:
    """Distil as configured; returns (and writes to metrics.json) student and teacher scores, score kept, speed-up."""
    from bertforge.atomic import atomic_write_text
    from bertforge.data.glue import get_task
    from bertforge.model.heads import BertForMaskedLM, BertForSequenceClassification
    from bertforge.model.loading import save_model

    seed_everything(cfg.train.seed)
    loaded = load_teacher(cfg)
    teacher, tokenizer, task_mode = loaded.model, loaded.tokenizer, cfg.data.mode == "task"
    s_config = student_config(cfg.student, loaded.config)
    spec = get_task(cfg.data.task) if task_mode else None
    student = BertForSequenceClassification(s_config, spec.num_labels) if task_mode else BertForMaskedLM(s_config)
    layers = init_student_from_teacher(student, teacher, cfg.student.teacher_layers) \
        if cfg.student.init_from_teacher else None
    max_len = min(cfg.data.max_seq_length, s_config.max_position_embeddings, loaded.config.max_position_embeddings)
    batches, per_epoch, eval_batches, extra = _task_data(cfg, tokenizer, max_len) if task_mode else _mlm_data(cfg, tokenizer)
    t = cfg.train
    if t.max_steps is None and t.max_tokens is None and t.time_budget is None:
        epochs = 1.0 if t.epochs is None else t.epochs
        require(epochs > 0, f"train.epochs={epochs} must be positive: pass e.g. 1")
        t.max_steps = max(1, math.ceil(epochs * per_epoch / t.grad_accum))
    model = DistillationModel(student, teacher, cfg.loss, regression=bool(spec and spec.is_regression))
    device_type = "cuda" if torch.cuda.is_available() and t.device != "cpu" else "cpu"
    optimizer = build_optimizer(model, cfg.optim, device_type)
    scheduler = build_schedule(optimizer, cfg.optim, t.max_steps, budget_seconds=parse_duration(t.time_budget))
    task_name = spec.name if spec else None
    meta = {"task": task_name, "teacher": str(cfg.teacher), "teacher_layers": layers}
    if spec and spec.labels:
        meta["id2label"] = dict(enumerate(spec.labels))

    def write_model(m: nn.Module, directory: Path) -> None:
        save_model(m.student, directory / "model", tokenizer=tokenizer, meta=meta)

    run_config = config_to_dict(cfg)
    trainer = Trainer(model, optimizer, scheduler, batches, t, evaluate=lambda m: evaluate_distill(m, eval_batches,
                      task_name), save_model=write_model, run_config=run_config,
                      clip_grad_norm=cfg.optim.clip_grad_norm or None,
                      load_weights=lambda d: {f"student.{k}": v
                                              for k, v in load_model(d / "model").model.state_dict().items()},
                      weights_prefix="student.")
    out = Path(t.output_dir)
    model.eval()
    initial = {f"initial_{k}": v for k, v in evaluate_distill(model, eval_batches, task_name).items()
               if not k.startswith("teacher_")}
    resumed = trainer.start()
    metrics = trainer.fit()
    stopped_early(metrics, trainer)
    primary = spec.metrics[0] if spec else "accuracy"
    save_model(student, out / "model", tokenizer=tokenizer, meta=meta)
    metrics.update({} if resumed else initial)
    timed = eval_batches[:cfg.data.speed_batches]
    s_speed, t_speed = throughput([student, teacher], timed, trainer.device)
    metrics.update(extra, student_layers=s_config.num_hidden_layers, teacher_layers=loaded.config.num_hidden_layers,
                   student_parameters=sum(p.numel() for p in student.parameters()),
                   teacher_parameters=sum(p.numel() for p in teacher.parameters()),
                   student_examples_per_s=s_speed, teacher_examples_per_s=t_speed, speed_up=s_speed / t_speed,
                   score_kept=100 * metrics[f"eval_{primary}"] / metrics[f"teacher_{primary}"]
                   if metrics[f"teacher_{primary}"] else float("nan"))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
