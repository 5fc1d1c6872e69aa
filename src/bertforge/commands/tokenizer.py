"""`bertforge tokenizer train`: its arguments and runner."""

from __future__ import annotations

import argparse


def add_tokenizer_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", nargs="+", metavar="PATH", help="text files, folders, .gz or .jsonl files")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to write vocab.txt, tokenizer.json and tokenizer_config.json into")
    p.add_argument("--vocab-size", type=int, default=30522, metavar="N", help="(default: %(default)s)")
    p.add_argument("--min-frequency", type=int, default=2, metavar="N",
                   help="keep merges seen at least N times (default: %(default)s)")
    p.add_argument("--limit-alphabet", type=int, default=1000, metavar="N",
                   help="at most N distinct characters (default: %(default)s)")
    p.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=True,
                   help="lowercase the text (default: on; --no-lowercase for a cased vocabulary)")
    p.add_argument("--strip-accents", action=argparse.BooleanOptionalAction, default=None,
                   help="strip accents (default: the same as --lowercase)")
    p.add_argument("--overwrite", action="store_true", help="replace tokenizer files already in --out")


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from bertforge.data.vocabulary import train_tokenizer

    info = train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size, lowercase=args.lowercase,
                           strip_accents=args.strip_accents, min_frequency=args.min_frequency,
                           limit_alphabet=args.limit_alphabet, overwrite=args.overwrite)
    print(f"trained a WordPiece vocabulary of {info['vocab_size']:,} tokens in {info['seconds']:.1f} s")
    print(f"wrote {', '.join(info['files'])} to {info['out']}")
    print(f"example: {info['example']!r} -> {' '.join(info['example_tokens'])}")
    return 0
