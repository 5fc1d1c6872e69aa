"""`bertforge prepare`: argument table, runner and the end-of-run summary table.

The row in `cli.COMMANDS` names these functions.
The work itself lives in `bertforge.data.shards.prepare`.
"""

from __future__ import annotations

import argparse

from bertforge.data.corpus import BOUNDARIES


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `bertforge prepare` (defaults from `PrepareConfig`)."""
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="text files, folders, .gz, .jsonl, or hub:NAME[:CONFIG][:SPLIT]")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="tokenizer folder (vocab.txt / tokenizer.json) or a vocab.txt file")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for the shards and manifest.json")
    p.add_argument("--seq-len", type=int, default=128, metavar="T", help="tokens per row (default: %(default)s)")
    p.add_argument("--mode", choices=("packed", "nsp"), default="packed",
                   help="packed documents, or [CLS] A [SEP] B [SEP] pairs with is_next labels (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                   help="share of documents held out for validation (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split and NSP seed (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=16384, metavar="ROWS",
                   help="rows per shard file (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=2, metavar="N",
                   help="tokenizer processes, 0 = in this process (default: %(default)s)")
    p.add_argument("--boundary", choices=BOUNDARIES, default="blank",
                   help="document boundary: blank lines, one per line, or ' = Title = ' headings (default: %(default)s)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSONL / hub record field holding the text (default: %(default)s)")
    p.add_argument("--short-seq-prob", type=float, default=0.1, metavar="P",
                   help="NSP: share of pairs with a shorter random length (default: %(default)s)")
    p.add_argument("--dtype", choices=("uint16", "uint32"), default=None,
                   help="token id type (default: uint16 when the vocabulary fits, else uint32)")
    p.add_argument("--max-positions", type=int, default=512, metavar="N",
                   help="the model's max_position_embeddings; seq_len may not exceed it (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards already in --output instead of resuming them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    from bertforge.data.shards import PrepareConfig

    return PrepareConfig(sources=list(args.sources), output=args.output, tokenizer=args.tokenizer,
                         seq_len=args.seq_len, mode=args.mode, val_fraction=args.val_fraction, seed=args.seed,
                         shard_size=args.shard_size, num_workers=args.num_workers, boundary=args.boundary,
                         text_field=args.text_field, short_seq_prob=args.short_seq_prob, dtype=args.dtype,
                         max_positions=args.max_positions, overwrite=args.overwrite,
                         show_progress=not args.no_progress)


def run_prepare(args: argparse.Namespace) -> int:
    """Run `prepare` from parsed arguments and print the summary table."""
    from bertforge.data.shards import prepare

    print(format_summary(prepare(config_from_args(args))))
    return 0


def format_summary(summary: dict) -> str:
    """A plain-text table: documents, tokens, sequences, fill rate per split, then the run."""
    splits = summary["splits"]
    lines = [f"{'split':<8}{'documents':>12}{'tokens':>15}{'sequences':>12}{'shards':>8}{'fill rate':>11}"]
    for name, s in splits.items():
        cells = s["sequences"] * summary["seq_len"]
        fill = 1.0 - s["pad_tokens"] / cells if cells else 0.0
        lines.append(f"{name:<8}{s['documents']:>12,}{s['tokens']:>15,}{s['sequences']:>12,}{s['shards']:>8}"
                     f"{fill:>11.2%}")
    lines.append(f"{'total':<8}{summary['documents']:>12,}{summary['tokens']:>15,}{summary['sequences']:>12,}"
                 f"{summary['shards']:>8}{summary['fill_rate']:>11.2%}")
    rate = summary["mb_read"] / summary["seconds"] if summary["shards_skipped"] == 0 and summary["seconds"] else None
    run = (f"{summary['mode']} rows of {summary['seq_len']} tokens ({summary['dtype']}, vocab "
           f"{summary['vocab_size']:,}) in {summary['output']}; {summary['mb_read']:.1f} MB of text")
    run += f" at {rate:.2f} MB/s" if rate else ""
    if summary["shards_skipped"]:
        run += f"; {summary['shards_skipped']} shards already done, {summary['shards_written']} written now"
    if "nsp" in summary:
        run += f"; is_next {summary['nsp']['is_next_rate']:.1%}"
    return "\n".join(lines + [run])
