"""`bertforge pretrain` and `bertforge sanity`: argument tables and runners (rows in cli.COMMANDS), and the
`--resume/--resume-from/--overwrite` options every training command shares.

Both take the same run config: a recipe file (`--config configs/cpu-budget.yaml`), a few common
flags, and any field as a dotted override (`optim.lr=1e-3 model.preset=small`).
"""

from __future__ import annotations

import argparse
import json


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of any config field, e.g. optim.lr=1e-3 model.preset=small")
    p.add_argument("--config", metavar="FILE", help="a recipe file (.yaml/.toml/.json) or the name of a packaged "
                                                   "recipe: cpu-budget, gpu-budget, tiny-smoke")
    p.add_argument("--data", metavar="DIR", help="prepared shards (from `bertforge prepare`) = data.path")


def add_run_folder_arguments(p: argparse.ArgumentParser) -> None:
    """--resume, --resume-from, --overwrite: what to do with a run folder that holds an earlier run."""
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint that "
                                                         "reads (a damaged one is skipped)")
    p.add_argument("--resume-from", metavar="CKPT", help="continue from this checkpoint folder (or another run "
                                                         "folder's newest) = train.resume_from")
    p.add_argument("--overwrite", action="store_true", help="delete the earlier run in the output folder and start "
                                                            "over (without it, a used folder is refused)")


def run_folder_flags(args: argparse.Namespace) -> dict:
    """The train.* values of `add_run_folder_arguments`' flags (None: not given)."""
    return {"train.resume": True if args.resume else None, "train.resume_from": args.resume_from,
            "train.overwrite": True if args.overwrite else None}


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--output", metavar="DIR", help="run directory = train.output_dir")
    add_run_folder_arguments(p)
    p.add_argument("--time-budget", metavar="DURATION", help="wall-clock budget, e.g. 1h or 45m = train.time_budget")
    p.add_argument("--max-steps", type=int, metavar="N", help="= train.max_steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")


def resolve_config(args: argparse.Namespace):
    from bertforge.config import load_run_config
    from bertforge.workflows.pretrain import PretrainRunConfig

    flags = {"data.path": args.data, "train.output_dir": getattr(args, "output", None),
             "train.time_budget": getattr(args, "time_budget", None), "train.max_steps": getattr(args, "max_steps", None),
             "train.progress": False if getattr(args, "no_progress", False) else None}
    if hasattr(args, "resume"):  # pretrain (sanity has no run folder)
        flags.update(run_folder_flags(args))
    return load_run_config(PretrainRunConfig, file=args.config, overrides=args.overrides, flags=flags)


def run_pretrain(args: argparse.Namespace) -> int:
    from bertforge.train import distributed as dist
    from bertforge.workflows.pretrain import main

    summary = main(resolve_config(args))
    if dist.launch_rank() == 0:
        print(json.dumps(summary, indent=2))
    if summary.get("stop_reason") == "interrupted":
        return 128 + summary["signal"]  # as a shell reports a process a signal ended: 130 Ctrl-C, 143 SIGTERM
    return 0 if summary.get("stop_reason") == "budget" else 1


def add_sanity_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps on the batch (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="rows in the batch (default: %(default)s)")
    p.add_argument("--target-loss", type=float, default=0.5, help="pass below this loss (default: %(default)s)")


def run_sanity(args: argparse.Namespace) -> int:
    from bertforge.workflows.sanity import sanity_on_data

    report = sanity_on_data(resolve_config(args), steps=args.steps, batch_size=args.batch_size,
                            target_loss=args.target_loss)
    print(report.render())
    return 0 if report.passed else 1
