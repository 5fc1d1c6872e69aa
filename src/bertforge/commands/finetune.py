"""`bertforge finetune`, `bertforge evaluate`, `bertforge predict`: argument tables and runners (named by
their rows in `cli.COMMANDS`).

The work lives in `bertforge.workflows.finetune` (training) and `bertforge.workflows.evaluate` (evaluate,
predict). Settings layer as: defaults <- `--protocol` <- `--config FILE` <- the flags below <- dotted
`KEY=VALUE` overrides (any field of `FinetuneRunConfig`, e.g. `optim.weight_decay=0` or
`data.max_train_examples=1000`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bertforge.commands.run_options import add_run_options, run_flags
from bertforge.errors import BertforgeError


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    add_run_options(p, config_help="YAML / TOML / JSON file with FinetuneRunConfig sections",
                    output_help="run directory (default: runs/finetune)")
    p.add_argument("--task", help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, snli, sick, "
                                  "sick_relatedness, squad, swag, arc_easy, arc_challenge, winogrande")
    p.add_argument("--model", metavar="DIR", help="our model directory, or a Hugging Face / sentence-transformers "
                                                  "BERT directory")
    p.add_argument("--data", metavar="PATH", help="folder with the task's canonical files (train + dev), or "
                                                  "hub:NAME (online; e.g. hub:glue/sst2, hub:rajpurkar/squad)")
    p.add_argument("--epochs", type=float, metavar="N", help="training epochs (default: 3; glue-sane: 5)")
    p.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (default: 2e-5)")
    p.add_argument("--batch-size", type=int, metavar="N", help="examples per batch (default: 32)")
    p.add_argument("--max-seq-length", type=int, metavar="T", help="tokens per input (default: 128, SQuAD 384)")
    p.add_argument("--seeds", type=int, metavar="N", help="run N seeds into seed_<s>/ and report the median")
    p.add_argument("--seed", type=int, metavar="S", help="first seed (default: 0)")
    p.add_argument("--protocol", choices=("glue-sane",), help="one global setting: <= 5 epochs, batch 16, lr 4e-5 "
                                                               "cosine, last checkpoint, median of 5 seeds")
    p.add_argument("--no-truncate", action="store_true", help="fail on inputs longer than --max-seq-length "
                                                              "instead of truncating them (and reporting how many)")


def finetune_config_from_args(args: argparse.Namespace):
    from bertforge.workflows.finetune import load_finetune_config

    flags = {"task": args.task, "model.path": args.model, "data.path": args.data, "train.epochs": args.epochs, "optim.lr": args.lr, "train.batch_size": args.batch_size,
             "data.max_seq_length": args.max_seq_length, "seeds": args.seeds, "train.seed": args.seed,
             "data.truncate": False if args.no_truncate else None, **run_flags(args)}
    return load_finetune_config(args.config, args.overrides, protocol=args.protocol, flags=flags)


def run_finetune(args: argparse.Namespace) -> int:
    from bertforge.workflows.finetune import main

    cfg = finetune_config_from_args(args)
    result = main(cfg)
    if not result:
        return 0  # not the main process
    metrics = {k: v for k, v in result.items() if k not in ("task", "model", "seed", "seeds", "spread", "runs")}
    where = "metrics.json, predictions and model/"
    if "seeds" in result:
        where = f"seeds.json (median over seeds {', '.join(map(str, result['seeds']))})"
    print(f"{result['task']}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"wrote {where} to {cfg.train.output_dir}")
    return 0


def _add_eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="a model directory written by `bertforge finetune`")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="a task file, a folder with canonical file names, or hub:NAME; for --task mlm: held-out "
                        "text files, folders, .gz, .jsonl, or a folder written by `bertforge prepare`")
    p.add_argument("--task", help="the task (default: the one the model was fine-tuned on)")
    p.add_argument("--batch-size", type=int, metavar="N", help="examples per inference batch (default: 64)")
    p.add_argument("--max-seq-length", type=int, metavar="T", help="tokens per input (default: the fine-tuning "
                                                                   "setting)")
    p.add_argument("--no-truncate", action="store_true", help="fail on inputs longer than --max-seq-length")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")


def _settings(args: argparse.Namespace) -> dict:
    return {"eval_batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
            "truncate": False if args.no_truncate else None}


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    _add_eval_common(p)
    p.add_argument("--split", help="split of a folder or hub dataset (default: dev; MNLI: matched and mismatched; "
                                   "mlm on prepared shards: val)")
    p.add_argument("--output", "-o", metavar="DIR", help="also write predictions and metrics.json there")
    mlm = p.add_argument_group("--task mlm (held-out masked-LM protocol: fixed masks, every target shown as [MASK])")
    mlm.add_argument("--mask-rate", type=float, default=0.15, metavar="P", help="share of tokens masked (default: 0.15)")
    mlm.add_argument("--seed", type=int, default=12345, help="mask seed (default: %(default)s)")
    mlm.add_argument("--seq-len", type=int, default=128, metavar="T", help="tokens per packed row of raw text "
                                                                           "(default: %(default)s)")
    mlm.add_argument("--max-rows", type=int, metavar="N", help="score at most N rows (default: all)")
    mlm.add_argument("--boundary", default="blank", choices=("blank", "line", "heading"),
                     help="document boundary in raw text (default: %(default)s)")
    mlm.add_argument("--bert-replacement", action="store_true",
                     help="BERT's 80/10/10 replacement instead of [MASK] everywhere (overstates accuracy: for "
                          "comparison with training-time figures only)")
    mlm.add_argument("--json", action="store_true", help="print the metrics as JSON")


def _one_data(args: argparse.Namespace) -> str:
    if len(args.data) != 1:
        raise BertforgeError(f"--data got {len(args.data)} paths: task {args.task or 'of the model'} reads one file, "
                             "folder or hub name (several paths are for --task mlm)")
    return args.data[0]


def run_evaluate(args: argparse.Namespace) -> int:
    from bertforge.workflows.evaluate import evaluate, evaluate_mlm_data

    if args.task == "mlm":
        from bertforge.data.mlm_eval import format_mlm_metrics

        result = evaluate_mlm_data(args.model, args.data, split=args.split or "val", seq_len=args.seq_len,
                                   mask_rate=args.mask_rate, seed=args.seed, max_rows=args.max_rows,
                                   batch_size=args.batch_size or 64, boundary=args.boundary, device=args.device,
                                   bert_replacement=args.bert_replacement)
        if args.output:
            from bertforge.atomic import atomic_write_text

            atomic_write_text(Path(args.output) / "metrics.json", json.dumps(result, indent=2) + "\n")
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"model {result['model']}\ndata  {result['data']}\nprotocol {result['protocol']}")
            print(format_mlm_metrics(result))
        return 0
    result = evaluate(args.model, _one_data(args), split=args.split, task=args.task, output_dir=args.output,
                      device=args.device, **_settings(args))
    print(json.dumps(result, indent=2))
    return 0


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    _add_eval_common(p)
    p.add_argument("--split", default="test", help="split of a folder or hub dataset (default: %(default)s)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for the predictions file")


def run_predict(args: argparse.Namespace) -> int:
    from bertforge.workflows.evaluate import predict

    result = predict(args.model, _one_data(args), args.output, split=args.split, task=args.task, device=args.device,
                     **_settings(args))
    print(f"{result['task']}: wrote {result['examples']:,} predictions to {', '.join(result['predictions'])}")
    scores = {k: v for k, v in result.items() if isinstance(v, float)}
    if scores:
        print("labelled data: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return 0
