"""`bertforge pretrain`: MLM (NSP optional) pretraining from prepared shards. `main(cfg) -> metrics`.

Batches are defined by one global order so every launch shape sees the same data: in epoch e,
micro-batch g holds rows `perm_e[g*B:(g+1)*B]` and its masks come from a generator seeded by
(seed, e, g). Process r of W takes g = r, r+W, r+2W, ... — so two processes with accumulation 1 see
exactly the micro-batches one process with accumulation 2 sees, and a resumed run needs only
(epoch, position) to continue bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bertforge.config import config_to_dict
from bertforge.data.dataset import ShardLoader
from bertforge.data.masking import MaskingConfig, MLMCollator
from bertforge.data.mlm_eval import evaluate_mlm, unigram_loss
from bertforge.errors import BertforgeError
from bertforge.model.bert import BertConfig, pad_vocab_size
from bertforge.train import distributed as dist
from bertforge.train.batches import EpochBatches
from bertforge.train.loop import Trainer
from bertforge.train.optim import OptimConfig, build_optimizer, build_schedule
from bertforge.train.settings import TrainConfig, seed_everything


@dataclass
class PretrainDataConfig:
    path: str = ""  # a directory written by `bertforge prepare`
    tokenizer: str | None = None  # default: the tokenizer saved inside the prepared directory
    eval_rows: int = 1024  # held-out rows scored at each evaluation (bertforge.data.mlm_eval protocol)
    eval_batches: int | None = None  # deprecated: eval_rows = eval_batches x train.batch_size


@dataclass
class PretrainRunConfig:
    model: dict = field(default_factory=lambda: {"preset": "mini"})  # preset + any BertConfig field
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_ratio=0.06))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/pretrain"))


def build_model_config(section: dict, vocab_size: int) -> BertConfig:
    """`{"preset": "mini", "hidden_size": 128, ...}` -> BertConfig with the vocab padded to 64."""
    fields = dict(section)
    preset = fields.pop("preset", "mini")
    fields.setdefault("vocab_size", pad_vocab_size(vocab_size))
    if fields["vocab_size"] < vocab_size:
        raise BertforgeError(f"model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
                             f"{vocab_size}: remove model.vocab_size or raise it")
    known = set(BertConfig.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise BertforgeError(f"unknown model key(s) {unknown}: use a BertConfig field such as hidden_size")
    return BertConfig.from_preset(preset, **fields)


class PretrainBatches(EpochBatches):
    """Packed rows of a prepared split in `data.dataset.ShardLoader`'s order (one permutation per (seed, epoch);
    global micro-batch g holds rows g*B .. (g+1)*B - 1, process r takes g = r, r + W, ...), masked dynamically
    with a generator seeded by (seed, epoch, g): every process and every resume masks a batch the same way.
    The state keeps ShardLoader's format, so the loader settings are checked on resume."""

    def __init__(self, dataset, collator: MLMCollator, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.loader = ShardLoader(dataset, batch_size, seed, rank=rank, world_size=world)  # order + checks
        self.dataset, self.collator, self.seed, self.B = dataset, collator, seed, batch_size
        self.start_rate = collator.cfg.mlm_probability  # a masking schedule starts here
        super().__init__(self.plan_epoch, self.collate, rank=rank, world=world, what=f"{len(dataset)} rows")

    def plan_epoch(self, epoch: int) -> list[np.ndarray]:
        order, B = self.loader.order(epoch), self.B
        return [order[g * B:(g + 1) * B] for g in range(len(self.loader) * self.world)]

    def collate(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        epoch, g = self.current
        self.collator.generator.manual_seed(mask_seed(self.seed, epoch, g))
        return self.collator(self.dataset.batch(idx))

    def set_progress(self, progress: float) -> None:
        """A masking schedule (masking.mlm_probability_final): the rate for the budget share spent."""
        cfg = self.collator.cfg
        if cfg.mlm_probability_final is not None:
            rate = self.start_rate + (cfg.mlm_probability_final - self.start_rate) * progress
            self.collator.cfg = replace(cfg, mlm_probability=round(rate, 6))

    def state_dict(self) -> dict:
        return {**self.loader.state_dict(), "epoch": self.epoch, "step": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)  # checks seed, batch size, world size, rows
        self.epoch, self.position = self.loader.epoch, self.loader.step


def mask_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2**63 - 1)


def data_tokenizer_path(data: PretrainDataConfig, manifest: dict) -> Path:
    """data.tokenizer if given, else the tokenizer copy inside the prepared folder, else the one prepare used."""
    if data.tokenizer:
        return Path(data.tokenizer)
    inside = Path(data.path) / "tokenizer"
    return inside if inside.is_dir() else Path(manifest["tokenizer"]["path"])


def main(cfg: PretrainRunConfig) -> dict:
    """Pretrain as configured; returns the final metrics. Writes the run directory (see checkpoint.py)."""
    from bertforge.data.dataset import PackedDataset
    from bertforge.model.heads import BertForMaskedLM, BertForPreTraining
    from bertforge.model.loading import load_model, save_model
    from bertforge.wordpiece import WordPieceTokenizer

    dist.init_distributed(cfg.train.dist_timeout_minutes)
    seed_everything(cfg.train.seed)
    if not cfg.data.path:
        raise BertforgeError("no data: pass data.path=DIR, a directory written by `bertforge prepare`")
    data_dir = Path(cfg.data.path)
    train_rows = PackedDataset(data_dir, "train")
    manifest = train_rows.manifest
    tokenizer = WordPieceTokenizer.from_pretrained(data_tokenizer_path(cfg.data, manifest))
    if manifest["tokenizer"]["fingerprint"] != tokenizer.fingerprint():
        raise BertforgeError(f"tokenizer '{data_tokenizer_path(cfg.data, manifest)}' is not the one the shards in "
                             f"'{data_dir}' were prepared with: pass the matching data.tokenizer or re-run prepare")
    nsp = manifest["mode"] == "nsp"
    model_cfg = build_model_config(cfg.model, tokenizer.vocab_size)
    if manifest["seq_len"] > model_cfg.max_position_embeddings:
        raise BertforgeError(f"shards hold {manifest['seq_len']}-token rows but the model has "
                             f"{model_cfg.max_position_embeddings} positions: raise model.max_position_embeddings")
    model = (BertForPreTraining if nsp else BertForMaskedLM)(model_cfg)
    run_config = {**config_to_dict(cfg), "model": {"head": "pretraining" if nsp else "masked_lm",
                                                   "preset": cfg.model.get("preset", "mini"),
                                                   **model_cfg.to_dict()}}
    device_type = "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    optimizer = build_optimizer(model, cfg.optim, device_type)
    budget = None
    if cfg.train.time_budget is not None:
        from bertforge.config import parse_duration

        budget = parse_duration(cfg.train.time_budget)
    if cfg.optim.schedule != "time" and cfg.train.max_steps is None:
        raise BertforgeError(f"optim.schedule={cfg.optim.schedule} counts steps: set train.max_steps, "
                             "or use optim.schedule=time with train.time_budget")
    scheduler = build_schedule(optimizer, cfg.optim, cfg.train.max_steps, budget_seconds=budget)
    collator = MLMCollator.from_tokenizer(tokenizer, cfg.masking, seed=cfg.train.seed)
    batches = PretrainBatches(train_rows, collator, cfg.train.batch_size, cfg.train.seed,
                              dist.rank(), dist.world_size())
    val_rows = PackedDataset(data_dir, "val") if any(sh["split"] == "val" for sh in manifest["shards"]) else None
    eval_rows = cfg.data.eval_rows
    if cfg.data.eval_batches is not None:
        print(f"note: data.eval_batches is deprecated: use data.eval_rows (now {cfg.data.eval_batches} x "
              f"{cfg.train.batch_size} rows)")
        eval_rows = cfg.data.eval_batches * cfg.train.batch_size

    sharded = dist.is_distributed() and cfg.train.parallel == "fsdp"

    def evaluate(m: nn.Module) -> dict:  # rank 0 only, except under FSDP: its forward needs every rank
        if val_rows is None or not (dist.is_main() or sharded):
            return {}
        return evaluate_mlm(m, val_rows, tokenizer, max_rows=eval_rows)

    def write_model(m: nn.Module, directory: Path) -> None:
        save_model(m, directory, tokenizer=tokenizer)

    trainer = Trainer(model, optimizer, scheduler, batches, cfg.train, evaluate=evaluate,
                      save_model=write_model, run_config=run_config,
                      load_weights=lambda d: load_model(d).model.state_dict(),
                      clip_grad_norm=cfg.optim.clip_grad_norm or None, supports_fsdp=True,
                      plateau_level=unigram_loss(train_rows, tokenizer) if not nsp else None)
    out = Path(cfg.train.output_dir)
    trainer.start()
    summary = trainer.fit()
    if summary["stop_reason"] not in ("diverged", "interrupted"):
        trainer.save_model(out / "model")  # consolidated from the shards under FSDP
    if dist.is_main():
        from bertforge.atomic import atomic_write_text

        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    dist.cleanup()
    return summary
