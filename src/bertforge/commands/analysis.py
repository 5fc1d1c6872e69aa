"""The commands that look at runs and plans: `plan` (memory estimate), `inspect` (masked predictions of a
model, in the terminal or as HTML) and `report` (curves and tables of runs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="base", help="model preset: tiny, mini, small, medium, base, large, "
                   "budget-mini, budget-small, crammed (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch per process (default: %(default)s)")
    p.add_argument("--seq", type=int, default=128, help="sequence length (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--gradient-checkpointing", action="store_true", help="model.gradient_checkpointing=true")
    p.add_argument("--offload", action="store_true", help="optim.offload=cpu")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "lamb", "adafactor"))
    p.add_argument("--fsdp", type=int, default=1, metavar="N", help="shard over N processes (train.parallel=fsdp)")
    p.add_argument("--mlm-probability", type=float, default=0.15)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="attention kernel and dropout-mask sizes follow this device (default: %(default)s)")
    p.add_argument("--device-gb", type=float, nargs="+", default=[16.0, 24.0, 40.0, 80.0, 141.0], metavar="GB",
                   help="device sizes to check (default: 16 24 40 80 141)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from bertforge.errors import require
    from bertforge.model.bert import BertConfig
    from bertforge.plan import GIB, estimate

    cfg = BertConfig.from_preset(args.preset, gradient_checkpointing=args.gradient_checkpointing)
    for flag, value, least in (("--batch", args.batch, 1), ("--seq", args.seq, 2), ("--fsdp", args.fsdp, 1)):
        require(value >= least, f"{flag} {value} is out of range: pass {least} or more")
    require(0 < args.mlm_probability < 1, f"--mlm-probability {args.mlm_probability} is out of range: pass a "
            "value in (0, 1), e.g. 0.15")
    require(all(gb > 0 for gb in args.device_gb), f"--device-gb {' '.join(f'{g:g}' for g in args.device_gb)}: "
            "pass positive device sizes in GB, e.g. --device-gb 24 80")
    plan = estimate(cfg, args.batch, args.seq, precision=args.precision, offload=args.offload,
                    gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                    mlm_probability=args.mlm_probability, device=args.device, shards=args.fsdp)
    fits = {f"{gb:g}": {"fits": plan.fits(gb * GIB), "max_batch": plan.max_batch(gb * GIB)}
            for gb in args.device_gb}
    if args.json:
        print(json.dumps({"preset": args.preset, "batch": args.batch, "seq": args.seq, **asdict(plan),
                          "devices_gib": fits}, indent=2))
        return 0
    opts = [args.precision] + [o for o, on in (("gradient checkpointing", args.gradient_checkpointing),
                                                ("optimizer offload", args.offload),
                                                (f"FSDP over {args.fsdp}", args.fsdp > 1)) if on]
    print(f"{args.preset}: {plan.num_parameters / 1e6:.1f}M parameters, batch {args.batch} x {args.seq} "
          f"({plan.masked_per_sequence} masked per sequence), {args.optimizer}, {', '.join(opts)}, {args.device}")
    rows = [("parameters", plan.parameters), ("gradients", plan.gradients),
            ("optimizer state", plan.optimizer), ("activations", plan.activations),
            ("backward transients", plan.transient), ("peak (estimate)", plan.peak)]
    if args.offload:
        rows.append(("host memory (offload)", plan.host))
    for name, value in rows:
        print(f"  {name:<22} {value / GIB:8.2f} GiB")
    print(f"  {'each extra sequence':<22} {plan.per_sample / 2**20:8.1f} MiB")
    print("  device    fits   largest batch")
    for gb, f in fits.items():
        print(f"  {gb:>4} GiB  {'yes' if f['fits'] else 'no ':<5}  {f['max_batch']}")
    return 0


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder with a masked-LM head (ours or Hugging Face), or a run folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the passage to mask and predict")
    source.add_argument("--data", metavar="DIR", help="a folder written by `bertforge prepare`: use a validation row")
    p.add_argument("--index", type=int, default=0, metavar="N", help="validation row with --data (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder (default: the one saved with the model)")
    p.add_argument("--mask-rate", type=float, default=0.15, metavar="P", help="share of tokens masked (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="masking seed (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="predictions listed per position (default: %(default)s)")
    p.add_argument("--whole-word", action="store_true", help="mask whole words")
    p.add_argument("--bert-replacement", action="store_true",
                   help="80/10/10 [MASK]/random/kept as in training (default: every target shows [MASK])")
    p.add_argument("--html", metavar="FILE", help="also write the view as a standalone HTML page")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="ANSI colours in the terminal (default: auto = when stdout is a terminal and NO_COLOR is unset)")


def run_inspect(args: argparse.Namespace) -> int:
    from bertforge.atomic import atomic_write_text
    from bertforge.errors import BertforgeError
    from bertforge.inspect_mlm import (
        MLM_HEADS,
        masked_predictions,
        render_html,
        render_terminal,
        validation_row,
    )
    from bertforge.model.loading import load_model

    model_dir = Path(args.model)
    if (model_dir / "metrics.jsonl").is_file() and (model_dir / "model" / "config.json").is_file():
        model_dir = model_dir / "model"  # a run directory: its final model
        print(f"using the final model of the run: {model_dir}", file=sys.stderr)
    if not 0 < args.mask_rate < 1:
        raise BertforgeError(f"--mask-rate {args.mask_rate} is out of range: pass a value in (0, 1), e.g. 0.15")
    loaded = load_model(model_dir)
    if loaded.head not in MLM_HEADS:
        raise BertforgeError(f"model '{args.model}' has a '{loaded.head}' head, not a masked-LM head: pass a "
                             "pretrained model (BertForMaskedLM / BertForPreTraining)")
    tokenizer = loaded.tokenizer
    if args.tokenizer:
        from bertforge.wordpiece import WordPieceTokenizer

        tokenizer = WordPieceTokenizer.from_pretrained(args.tokenizer)
    if tokenizer is None:
        raise BertforgeError(f"model '{args.model}' has no tokenizer saved with it: pass --tokenizer PATH")
    if tokenizer.vocab_size > loaded.config.vocab_size:
        raise BertforgeError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{loaded.config.vocab_size}: pass the tokenizer this model was trained with")
    types = None
    source = args.text
    if args.data is not None:
        source, types = validation_row(args.data, args.index, tokenizer)
    records = masked_predictions(loaded.model, tokenizer, source, args.mask_rate, args.seed, args.top_k,
                                 token_type_ids=types, whole_word=args.whole_word,
                                 bert_replacement=args.bert_replacement)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    print(render_terminal(records, color=color))
    if args.html:
        where = f"validation row {args.index} of {args.data}" if args.data else "text"
        page = render_html(records, f"{model_dir}: masked predictions ({where})")
        atomic_write_text(Path(args.html), page)
        print(f"wrote {args.html}")
    return 0


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (pretraining or fine-tuning)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md, the CSV tables and the PNGs")
    p.add_argument("--no-plots", action="store_true", help="write the tables only (no matplotlib needed)")


def run_report(args: argparse.Namespace) -> int:
    from bertforge.report import build_report

    report = build_report(args.runs, args.out, plots=not args.no_plots)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.runs_markdown:
        print(report.runs_markdown)
    if report.compare_markdown:
        print(report.compare_markdown)
    elif report.finetune_markdown:
        print(report.finetune_markdown)
    print(f"wrote {len(report.files)} files to {args.out}: {', '.join(f.name for f in report.files)}")
    return 0
