"""`bertforge quickstart`: its arguments and runner (the work is `bertforge.quickstart`)."""

from __future__ import annotations

import argparse


def add_quickstart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", nargs="+", action="extend", metavar="PATH",
                   help="text files, folders, .gz or .jsonl to train on (default: the docstrings and "
                        "comments of this Python's standard library, no download)")
    p.add_argument("--out", default="bertforge-quickstart", metavar="DIR",
                   help="folder for everything quickstart writes (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, metavar="N",
                   help="WordPiece vocabulary size (default: %(default)s)")
    p.add_argument("--max-mb", type=float, default=3.0, metavar="N",
                   help="use at most N MB of the corpus (default: %(default)s)")
    p.add_argument("--preset", default="budget-mini", choices=("tiny", "mini", "small", "budget-mini", "budget-small"),
                   help="model shape (default: %(default)s: 4 layers, hidden 256, pre-LN, GeGLU, rotary positions)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=3.25, metavar="M",
                   help="pretraining wall-clock budget in minutes (default: %(default)s)")


def run_quickstart(args: argparse.Namespace) -> int:
    from bertforge.quickstart import QuickstartOptions
    from bertforge.quickstart import run_quickstart as run

    run(QuickstartOptions(corpus=args.corpus, out=args.out, vocab_size=args.vocab_size,
                          max_mb=args.max_mb, preset=args.preset, seed=args.seed,
                          minutes=args.minutes))
    return 0
