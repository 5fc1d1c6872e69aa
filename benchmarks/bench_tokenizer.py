"""WordPiece speed: bertforge vs Hugging Face, on the same text, in one run; prints one JSON line.

Training: `bertforge.wordpiece.train_wordpiece` (lines streamed by bertforge.data.corpus, batched into
`train_from_iterator`) vs `tokenizers.implementations.BertWordPieceTokenizer.train` (files read in Rust)
with the same settings; both vocabularies are compared. Encoding: our `encode_batch` (full Encoding
records: ids, types, mask, offsets, special mask, word and sequence ids) vs `transformers`
`BertTokenizerFast.__call__` on the same lines, same vocab, max_length 512: once for ids, types and
mask only (`encode_ratio`) and once also returning offsets and the special-tokens mask
(`encode_offsets_ratio`). Ratios are HF time / our time (> 1: we are faster). HF's trainer is not
deterministic (tokenizers#1794), so `vocab_jaccard` compares token sets, not equality.

    python benchmarks/bench_tokenizer.py --mb 20
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from tokenizers.implementations import BertWordPieceTokenizer
from transformers import BertTokenizerFast

from bertforge.data.corpus import CorpusLines
from bertforge.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer, train_wordpiece

DEFAULT_SOURCE = (
    Path(__file__).resolve().parents[1].parent / "shared/data/pretrain/wikipedia_en_2015.part1.txt.gz"
)


def write_slice(source: Path, mb: float, out: Path) -> int:
    """Copy the first `mb` MB of (decompressed) `source`, cut at a line end, to `out`; returns bytes."""
    limit, written = int(mb * 1e6), 0
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rb") as src, open(out, "wb") as dst:
        for line in src:
            if written + len(line) > limit:
                break
            dst.write(line)
            written += len(line)
    return written


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_train(path: Path, args) -> tuple[WordPieceTokenizer, float, float, float]:
    ours, t_ours = timed(
        lambda: train_wordpiece(
            CorpusLines(path), vocab_size=args.vocab_size, min_frequency=2, limit_alphabet=1000, show_progress=False
        )
    )
    hf = BertWordPieceTokenizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    _, t_hf = timed(
        lambda: hf.train(
            [str(path)],
            vocab_size=args.vocab_size,
            min_frequency=2,
            limit_alphabet=1000,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
    )
    a, b = set(ours.backend.get_vocab()), set(hf.get_vocab())
    return ours, t_ours, t_hf, len(a & b) / len(a | b)


def bench_encode(tok: WordPieceTokenizer, lines: list[str], args) -> tuple[float, float, float, bool]:
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        hf = BertTokenizerFast.from_pretrained(tmp)
    batches = [lines[i : i + args.batch_size] for i in range(0, len(lines), args.batch_size)]
    full = {"return_offsets_mapping": True, "return_special_tokens_mask": True}
    times: dict[str, list[float]] = {"ours": [], "hf": [], "hf_full": []}
    for _ in range(args.repeat):  # interleaved, best of N: the machine is shared
        ours, t = timed(lambda: [tok.encode_batch(b, max_length=512) for b in batches])
        times["ours"].append(t)
        theirs, t = timed(lambda: [hf(b, truncation=True, max_length=512)["input_ids"] for b in batches])
        times["hf"].append(t)
        times["hf_full"].append(
            timed(lambda: [hf(b, truncation=True, max_length=512, **full) for b in batches])[1]
        )
    same = all(e.input_ids == ids for o, t in zip(ours, theirs) for e, ids in zip(o, t))
    return min(times["ours"]), min(times["hf"]), min(times["hf_full"]), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="MB of text to use (default: %(default)s)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="text or .gz file")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--batch-size", type=int, default=1000, help="lines per encode batch")
    parser.add_argument(
        "--repeat", type=int, default=3, help="encode timings: best of N (default: %(default)s)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slice.txt"
        nbytes = write_slice(args.source, args.mb, path)
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        tok, train_s, hf_train_s, overlap = bench_train(path, args)
        enc_s, hf_enc_s, hf_full_s, same_ids = bench_encode(tok, lines, args)
    mb = nbytes / 1e6
    print(
        json.dumps(
            {
                "bench": "tokenizer",
                "source": args.source.name,
                "mb": round(mb, 2),
                "vocab_size": tok.vocab_size,
                "train_mb_s": round(mb / train_s, 3),
                "hf_train_mb_s": round(mb / hf_train_s, 3),
                "train_ratio": round(hf_train_s / train_s, 3),
                "vocab_jaccard": round(overlap, 4),
                "encode_mb_s": round(mb / enc_s, 3),
                "hf_encode_mb_s": round(mb / hf_enc_s, 3),
                "encode_ratio": round(hf_enc_s / enc_s, 3),
                "hf_encode_offsets_mb_s": round(mb / hf_full_s, 3),
                "encode_offsets_ratio": round(hf_full_s / enc_s, 3),
                "same_ids": same_ids,
                "lines": len(lines),
                "encode_repeat": args.repeat,
                "cpus": os.cpu_count(),
                "rayon_threads": os.environ.get("RAYON_NUM_THREADS"),
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
