"""The control run of the recipe search: `transformers.BertForMaskedLM` trained exactly as bertforge trains.

Same prepared rows in the same order, the same masks (bertforge's collator, seeded per micro-batch), the
same optimizer and schedule (`build_optimizer`, `build_schedule` from the run config), the same Trainer
and the same held-out protocol (`bertforge.data.mlm_eval`); only the model differs. `--impl ours` runs
bertforge's `BertForMaskedLM` with the same config through the same code, so the two rows differ by the
model implementation alone. If transformers' BERT left the plateau sooner than ours, the difference would
be in initialisation, normalisation or masking, not in the recipe.

    python benchmarks/hf_control.py --impl hf --data runs/data/shards8192 --minutes 3 --out runs/control/hf \
        model.preset=mini model.hidden_dropout_prob=0 model.attention_probs_dropout_prob=0 train.batch_size=64 \
        optim.lr=1e-3 optim.warmup_ratio=0.05 masking.mlm_probability=0.25
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bertforge.config import load_run_config
from bertforge.data.dataset import PackedDataset
from bertforge.data.masking import MLMCollator
from bertforge.data.mlm_eval import evaluate_mlm
from bertforge.model.heads import BertForMaskedLM
from bertforge.model.hf_compat import config_to_hf, to_hf_state_dict
from bertforge.train.loop import Trainer
from bertforge.train.optim import build_optimizer, build_schedule
from bertforge.train.settings import seed_everything
from bertforge.wordpiece import WordPieceTokenizer
from bertforge.workflows.pretrain import (
    PretrainBatches,
    PretrainRunConfig,
    build_model_config,
    data_tokenizer_path,
)


def build(impl: str, cfg: PretrainRunConfig, vocab_size: int):
    """Our model, or transformers' with the same config and the same initial weights."""
    config = build_model_config(cfg.model, vocab_size)
    ours = BertForMaskedLM(config)
    if impl == "ours":
        return ours
    from transformers import BertConfig as HFConfig
    from transformers import BertForMaskedLM as HFMaskedLM

    hf_cfg = HFConfig(**{k: v for k, v in config_to_hf(config, "masked_lm").items() if k != "architectures"})
    hf = HFMaskedLM(hf_cfg)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), config, "masked_lm", tied=True), strict=True)
    return hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=("hf", "ours"), required=True)
    ap.add_argument("--data", required=True)
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=int, help="training tokens (the budget of the schedule)")
    budget.add_argument("--minutes", type=float, help="wall-clock budget instead (same minutes for both models)")
    ap.add_argument("--evals", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_run_config(PretrainRunConfig, overrides=[
        *args.overrides, f"data.path={args.data}", f"train.output_dir={args.out}", "optim.schedule=time",
        f"train.max_tokens={args.tokens}" if args.tokens else f"train.time_budget={args.minutes * 60}",
        "train.progress=false", f"train.device={args.device}"])
    rows, val = PackedDataset(args.data, "train"), PackedDataset(args.data, "val")
    tok = WordPieceTokenizer.from_pretrained(data_tokenizer_path(cfg.data, rows.manifest))
    seed_everything(cfg.train.seed)
    model = build(args.impl, cfg, tok.vocab_size)
    if args.tokens:
        cfg.train.eval_every = max(1, args.tokens // args.evals // (cfg.train.batch_size * rows.seq_len))
    else:
        cfg.train.eval_every_minutes = args.minutes / args.evals
    optimizer = build_optimizer(model, cfg.optim, "cuda" if torch.cuda.is_available() else "cpu")
    scheduler = build_schedule(optimizer, cfg.optim, None)  # driven by set_progress over the budget
    batches = PretrainBatches(rows, MLMCollator.from_tokenizer(tok, cfg.masking, seed=cfg.train.seed),
                              cfg.train.batch_size, cfg.train.seed)
    trainer = Trainer(model, optimizer, scheduler, batches, cfg.train,
                      evaluate=lambda m: evaluate_mlm(m, val, tok, max_rows=cfg.data.eval_rows),
                      clip_grad_norm=cfg.optim.clip_grad_norm or None)
    summary = trainer.fit()
    Path(args.out, "summary.json").write_text(json.dumps({"impl": args.impl, **summary}, indent=1))
    print(json.dumps({"impl": args.impl, **{k: v for k, v in summary.items() if k.startswith(("eval_", "step"))}}))


if __name__ == "__main__":
    main()
