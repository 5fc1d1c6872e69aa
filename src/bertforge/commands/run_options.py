"""The options every training command shares (pretrain, finetune, sentence-train, distill; sanity takes the
config pair only) and the config values they set: the run config (`--config`, `KEY=VALUE` overrides), the
run folder (`--output`, and what to do with an earlier run there), and the progress bar."""

from __future__ import annotations

import argparse


def add_config_arguments(p: argparse.ArgumentParser, config_help: str) -> None:
    p.add_argument("--config", metavar="FILE", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of any config field, e.g. optim.lr=1e-3 train.batch_size=16")


def add_run_options(p: argparse.ArgumentParser, *, config_help: str,
                    output_help: str = "run directory = train.output_dir") -> None:
    add_config_arguments(p, config_help)
    p.add_argument("--output", "-o", metavar="DIR", help=output_help)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint that "
                                                         "reads (a damaged one is skipped)")
    p.add_argument("--resume-from", metavar="CKPT", help="continue from this checkpoint folder (or another run "
                                                         "folder's newest) = train.resume_from")
    p.add_argument("--overwrite", action="store_true", help="delete the earlier run in the output folder and start "
                                                            "over (without it, a used folder is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")


def run_flags(args: argparse.Namespace) -> dict:
    """The train.* values of `add_run_options`' flags (None: not given)."""
    return {"train.output_dir": args.output, "train.resume": True if args.resume else None,
            "train.resume_from": args.resume_from, "train.overwrite": True if args.overwrite else None,
            "train.progress": False if args.no_progress else None}
