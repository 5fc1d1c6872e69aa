"""`bertforge sentence-train`, `bertforge sts-eval`, `bertforge distill`: argument tables and runners.

Rows in `cli.COMMANDS` point here; this module imports no torch at load time (fast `--help`).
The work lives in `bertforge.workflows.sentence` and `bertforge.workflows.distill`. Settings layer as:
defaults <- `--config FILE` <- the flags below <- dotted `KEY=VALUE` overrides of any config field
(e.g. `loss.scale=30` or `student.teacher_layers=[0,3]`).
"""

from __future__ import annotations

import argparse
import json

from bertforge.commands.run_options import add_run_options, run_flags


def _common(p: argparse.ArgumentParser) -> None:
    add_run_options(p, config_help="YAML / TOML / JSON file with the run config's sections")
    p.add_argument("--epochs", type=float, metavar="N", help="training epochs when no --max-steps (default: 1)")
    p.add_argument("--max-steps", type=int, metavar="N", help="= train.max_steps")
    p.add_argument("--lr", type=float, metavar="LR", help="peak learning rate = optim.lr")
    p.add_argument("--batch-size", type=int, metavar="N", help="= train.batch_size")
    p.add_argument("--max-seq-length", type=int, metavar="T", help="tokens per text (longer ones are cut and counted)")
    p.add_argument("--seed", type=int, metavar="S", help="= train.seed")


def _common_flags(args: argparse.Namespace) -> dict:
    return {"train.epochs": args.epochs, "train.max_steps": args.max_steps, "optim.lr": args.lr,
            "train.batch_size": args.batch_size, "data.max_seq_length": args.max_seq_length, "train.seed": args.seed,
            **run_flags(args)}


def _print_metrics(metrics: dict, keys: tuple[str, ...], where: str) -> None:
    shown = {k: metrics[k] for k in keys if k in metrics}
    print(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    print(f"wrote metrics.json and model/ to {where}")


# ----------------------------------------------------------------------------- sentence-train

def add_sentence_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="starting model: ours, Hugging Face BERT or sentence-transformers")
    p.add_argument("--train", metavar="FILE", help="NLI file (SNLI/MNLI .jsonl or .tsv, SICK) for softmax/mnrl; "
                                                   "STS-B or SICK file for cosent/cosine")
    p.add_argument("--loss", choices=("softmax", "mnrl", "cosent", "cosine"), help="training loss (default: mnrl)")
    p.add_argument("--dev", metavar="FILE", help="STS-B / SICK file: Spearman and Pearson of cosine (x100)")
    p.add_argument("--pooling", choices=("mean", "cls", "max"), help="pooling (default: the model's, else mean)")
    p.add_argument("--calibrate", metavar="FILE", help="labelled pairs to calibrate a similar / not-similar threshold")
    p.add_argument("--calibrate-task", metavar="TASK", help="mrpc or qqp (labels), stsb or sick_relatedness "
                                                            "(scores >= calibration.binarize_at, default 4)")
    _common(p)


def run_sentence_train(args: argparse.Namespace) -> int:
    from bertforge.config import load_run_config
    from bertforge.workflows.sentence import SentenceRunConfig, main

    flags = {"model.path": args.model, "data.train": args.train, "loss.name": args.loss, "data.dev": args.dev,
             "model.pooling": args.pooling, "calibration.file": args.calibrate,
             "calibration.task": args.calibrate_task, **_common_flags(args)}
    cfg = load_run_config(SentenceRunConfig, file=args.config, overrides=args.overrides, flags=flags)
    metrics = main(cfg)
    _print_metrics(metrics, ("step", "eval_spearman", "eval_pearson", "threshold", "threshold_accuracy",
                             "threshold_f1", "truncated_texts"), cfg.train.output_dir)
    return 0


# ----------------------------------------------------------------------------- sts-eval

def add_sts_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="any model folder: ours, HF BERT, sentence-transformers")
    p.add_argument("--data", required=True, metavar="FILE", help="STS-B (sentence1, sentence2, score) or SICK file")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N pairs")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="texts per batch (default: %(default)s)")
    p.add_argument("--calibrate", metavar="FILE", help="also calibrate a similar / not-similar cosine threshold "
                                                       "on these labelled pairs (e.g. mrpc/dev.tsv)")
    p.add_argument("--calibrate-task", default="mrpc", metavar="TASK",
                   help="mrpc or qqp (labels), stsb or sick_relatedness (scores >= 4 similar) (default: %(default)s)")
    p.add_argument("--metric", choices=("accuracy", "f1"), default="accuracy",
                   help="what the threshold maximises (default: %(default)s)")
    p.add_argument("--save-threshold", action="store_true",
                   help="write similarity_threshold.json into the model folder (used by is_similar)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run_sts_eval(args: argparse.Namespace) -> int:
    from bertforge.workflows.sentence import CalibrationConfig, calibrate_model, sts_eval

    result = sts_eval(args.model, args.data, limit=args.limit, batch_size=args.batch_size)
    if args.calibrate:
        c = CalibrationConfig(file=args.calibrate, task=args.calibrate_task, metric=args.metric)
        result["calibration"] = calibrate_model(args.model, c, save=args.save_threshold)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"spearman {result['spearman']:.2f}  pearson {result['pearson']:.2f}  ({result['n']:,} pairs)")
    if args.calibrate:
        c = result["calibration"]
        print(f"threshold {c['threshold']:.4f}: {c['metric']} {c['value']:.4f} on {c['n']:,} pairs of {c['file']}"
              + (" (saved with the model)" if args.save_threshold else ""))
    return 0


# ----------------------------------------------------------------------------- distill

def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", metavar="DIR", help="fine-tuned classifier (task) or MLM model (--mlm): ours or HF")
    p.add_argument("--data", metavar="PATH", help="task folder (train + dev files) or train file with data.dev=; "
                                                  "with --mlm a `bertforge prepare` folder")
    p.add_argument("--task", help="GLUE / SNLI / SICK task name (default: sst2)")
    p.add_argument("--mlm", action="store_true", help="distil masked-LM predictions instead of a task")
    p.add_argument("--student-preset", metavar="NAME", help="student shape (default: the teacher's, half the layers)")
    p.add_argument("--student-layers", type=int, metavar="N", help="student layers (default: half the teacher's)")
    p.add_argument("--no-init-from-teacher", action="store_true",
                   help="start the student from random weights instead of evenly spaced teacher layers")
    p.add_argument("--temperature", type=float, metavar="T", help="softmax temperature (default: 2)")
    p.add_argument("--alpha", type=float, metavar="A", help="weight of the teacher term; 1-A on labels (default: 0.5)")
    p.add_argument("--hidden-weight", type=float, metavar="W", help="weight of the hidden-state MSE (default: 0)")
    _common(p)


def run_distill(args: argparse.Namespace) -> int:
    from bertforge.config import load_run_config
    from bertforge.workflows.distill import DistillRunConfig, main

    flags = {"teacher": args.teacher, "data.path": args.data, "data.task": args.task,
             "data.mode": "mlm" if args.mlm else None, "student.preset": args.student_preset,
             "student.num_hidden_layers": args.student_layers,
             "student.init_from_teacher": False if args.no_init_from_teacher else None,
             "loss.temperature": args.temperature, "loss.alpha": args.alpha, "loss.hidden_weight": args.hidden_weight,
             **_common_flags(args)}
    cfg = load_run_config(DistillRunConfig, file=args.config, overrides=args.overrides, flags=flags)
    metrics = main(cfg)
    primary = [k for k in metrics if k.startswith("teacher_") and k[8:] not in ("layers", "parameters",
                                                                              "examples_per_s")]
    keys = ("student_layers", "teacher_layers", *(f"eval_{k[8:]}" for k in primary), *primary,
            "score_kept", "speed_up", "eval_kl")
    _print_metrics(metrics, keys, cfg.train.output_dir)
    return 0
