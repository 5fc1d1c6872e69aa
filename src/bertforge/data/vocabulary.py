"""`bertforge tokenizer train`'s work: a WordPiece vocabulary trained on a corpus (files, folders, .gz,
.jsonl read through `data.corpus`) and saved in the Hugging Face layout, with a summary for the command."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bertforge.data.corpus import CorpusLines, iter_lines
from bertforge.errors import BertforgeError
from bertforge.wordpiece import train_wordpiece


def train_tokenizer(corpus: list[str], out, *, vocab_size: int = 30522, lowercase: bool = True,
                    strip_accents: bool | None = None, min_frequency: int = 2, limit_alphabet: int = 1000,
                    overwrite: bool = False) -> dict:
    """Train a WordPiece vocabulary on `corpus` (files, folders, .gz, .jsonl) and save it in `out`."""
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise BertforgeError(f"tokenizer output '{out}' is a file: pass a folder")
    if out_path.is_dir() and (out_path / "vocab.txt").exists() and not overwrite:
        raise BertforgeError(f"'{out}' already holds a vocab.txt: pass another --out or --overwrite")
    start = time.perf_counter()
    tokenizer = train_wordpiece(CorpusLines(corpus), vocab_size=vocab_size, lowercase=lowercase,
                                strip_accents=strip_accents, min_frequency=min_frequency,
                                limit_alphabet=limit_alphabet, show_progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    out_path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out_path)
    example = next(iter_lines(corpus))[:80]
    return {"vocab_size": tokenizer.vocab_size, "seconds": seconds, "out": str(out_path),
            "files": sorted(p.name for p in out_path.iterdir()), "example": example,
            "example_tokens": tokenizer.tokenize(example), "tokenizer": tokenizer}
