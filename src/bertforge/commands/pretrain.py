"""`bertforge pretrain` and `bertforge sanity`: argument tables and runners (rows in cli.COMMANDS).

Both take the same run config: a recipe file (`--config configs/cpu-budget.yaml`), a few common
flags, and any field as a dotted override (`optim.lr=1e-3 model.preset=small`).
"""

from __future__ import annotations

import argparse
import json

from bertforge.commands.run_options import add_config_arguments, add_run_options, run_flags

RECIPE_HELP = ("a recipe file (.yaml/.toml/.json) or the name of a packaged recipe: cpu-budget, gpu-budget, "
               "tiny-smoke")


def add_data_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", help="prepared shards (from `bertforge prepare`) = data.path")


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    add_run_options(p, config_help=RECIPE_HELP)
    add_data_argument(p)
    p.add_argument("--time-budget", metavar="DURATION", help="wall-clock budget, e.g. 1h or 45m = train.time_budget")
    p.add_argument("--max-steps", type=int, metavar="N", help="= train.max_steps")


def resolve_config(args: argparse.Namespace):
    """pretrain's or sanity's run config (sanity has no run folder options)."""
    from bertforge.config import load_run_config
    from bertforge.workflows.pretrain import PretrainRunConfig

    flags = {"data.path": args.data, "train.time_budget": getattr(args, "time_budget", None),
             "train.max_steps": getattr(args, "max_steps", None), **(run_flags(args) if hasattr(args, "resume") else {})}
    return load_run_config(PretrainRunConfig, file=args.config, overrides=args.overrides, flags=flags)


def run_pretrain(args: argparse.Namespace) -> int:
    from bertforge.launch import launch_rank
    from bertforge.workflows.pretrain import main

    summary = main(resolve_config(args))
    if launch_rank() == 0:
        print(json.dumps(summary, indent=2))
    if summary.get("stop_reason") == "interrupted":
        return 128 + summary["signal"]  # as a shell reports a process a signal ended: 130 Ctrl-C, 143 SIGTERM
    return 0 if summary.get("stop_reason") == "budget" else 1


def add_sanity_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, RECIPE_HELP)
    add_data_argument(p)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps on the batch (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="rows in the batch (default: %(default)s)")
    p.add_argument("--target-loss", type=float, default=0.5, help="pass below this loss (default: %(default)s)")


def run_sanity(args: argparse.Namespace) -> int:
    from bertforge.workflows.sanity import sanity_on_data

    report = sanity_on_data(resolve_config(args), steps=args.steps, batch_size=args.batch_size,
                            target_loss=args.target_loss)
    print(report.render())
    return 0 if report.passed else 1
