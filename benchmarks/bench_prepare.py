"""`bertforge prepare` throughput and memory vs Hugging Face tokenizers on the same text; one JSON line.

Text: the first `--sizes` MB (decompressed, cut at a line end) of a shared pretraining file, written as
plain text slices. Throughput, on the largest slice:
- ours: `prepare` wall time with `--workers` worker processes (reading, document splitting,
  tokenizing, packing into seq-128 rows, writing shards and manifest all included);
- theirs: the same documents (read beforehand, not timed) through the same `tokenizers.Tokenizer`'s
  `encode_batch` (and `encode_batch_fast`, no offsets) with `add_special_tokens=False`, in batches of
  `--hf-batch` documents, Rayon threads = all cores. Nothing is packed or written.
Runs are interleaved `--repeat` times and the best of each is kept (the machine may be shared).
`ratio` = our MB/s / HF encode_batch MB/s (goal >= 0.8); `ratio_fast` uses encode_batch_fast.
`cpu_ratio` = HF CPU seconds / ours (main process + workers) for the same text: the efficiency
comparison, which holds even when other jobs steal cores and make wall-clock ratios noisy.

Memory: `prepare` runs once per slice size in a fresh process; `peak_rss_mb` is the main process's peak
RSS and `worker_peak_rss_mb` the largest worker's (getrusage). Flat means it does not grow with size.

    python benchmarks/bench_prepare.py --sizes 5 10 20 --workers 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_SOURCE = SHARED / "pretrain" / "wikipedia_en_2015.part1.txt.gz"
DEFAULT_TOKENIZER = SHARED / "all-MiniLM-L6-v2"

_MEMORY_PROBE = """
import json, resource, sys
from bertforge.data.shards import PrepareConfig, prepare
cfg = PrepareConfig(**json.loads(sys.argv[1]))
summary = prepare(cfg)
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"self_kb": self_kb, "child_kb": child_kb, "sequences": summary["sequences"]}))
"""


def write_slice(source: Path, mb: float, out: Path) -> int:
    """The first `mb` MB of decompressed `source`, cut at a line end, to `out`; returns bytes written."""
    limit, written = int(mb * 1e6), 0
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rb") as src, open(out, "wb") as dst:
        for line in src:
            if written + len(line) > limit:
                break
            dst.write(line)
            written += len(line)
    return written


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished children (our pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_ours(path: Path, args, out: Path) -> tuple[float, float, dict]:
    from bertforge.data.shards import PrepareConfig, prepare

    cfg = PrepareConfig(sources=[str(path)], output=str(out), tokenizer=str(args.tokenizer), seq_len=128,
                        num_workers=args.workers, overwrite=True, show_progress=False)
    start, cpu = time.perf_counter(), cpu_seconds()
    summary = prepare(cfg)
    return time.perf_counter() - start, cpu_seconds() - cpu, summary


def time_hf(docs: list[str], backend, batch: int, fast: bool) -> tuple[float, float]:
    encode = backend.encode_batch_fast if fast else backend.encode_batch
    start, cpu = time.perf_counter(), cpu_seconds()
    for i in range(0, len(docs), batch):
        encode(docs[i:i + batch], add_special_tokens=False)
    return time.perf_counter() - start, cpu_seconds() - cpu


def peak_memory(path: Path, args, out: Path) -> dict:
    cfg = {"sources": [str(path)], "output": str(out), "tokenizer": str(args.tokenizer), "seq_len": 128,
           "num_workers": args.workers, "overwrite": True, "show_progress": False}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, json.dumps(cfg)], capture_output=True,
                          text=True, check=True)
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peak_rss_mb": round(probe["self_kb"] / 1024, 1), "worker_peak_rss_mb": round(probe["child_kb"] / 1024, 1),
            "sequences": probe["sequences"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[5.0, 10.0, 20.0], help="MB of text per slice")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="text or .gz file")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hf-batch", type=int, default=1000, help="documents per HF encode_batch call")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from tokenizers import Tokenizer

    from bertforge.data.corpus import iter_documents
    from bertforge.wordpiece import WordPieceTokenizer

    backend = Tokenizer.from_str(WordPieceTokenizer.from_pretrained(args.tokenizer).backend.to_str())
    backend.no_truncation()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slices = {mb: tmp / f"slice_{mb:g}mb.txt" for mb in args.sizes}
        nbytes = {mb: write_slice(args.source, mb, p) for mb, p in slices.items()}
        memory = {f"{mb:g}": peak_memory(p, args, tmp / "mem") for mb, p in slices.items()}
        big = max(args.sizes)
        docs = list(iter_documents(str(slices[big])))
        ours, hf, hf_fast, summary = [], [], [], None
        for _ in range(args.repeat):
            *timing, summary = time_ours(slices[big], args, tmp / "out")
            ours.append(timing)
            hf.append(time_hf(docs, backend, args.hf_batch, fast=False))
            hf_fast.append(time_hf(docs, backend, args.hf_batch, fast=True))
    mb = nbytes[big] / 1e6
    (ours_s, ours_cpu), (hf_s, hf_cpu), (fast_s, fast_cpu) = (min(r) for r in (ours, hf, hf_fast))
    ours_mb_s, hf_mb_s, hf_fast_mb_s = mb / ours_s, mb / hf_s, mb / fast_s
    print(json.dumps({
        "bench": "prepare", "source": args.source.name, "mb": round(mb, 2), "documents": len(docs),
        "tokens": summary["tokens"], "sequences": summary["sequences"], "fill_rate": round(summary["fill_rate"], 5),
        "workers": args.workers, "prepare_mb_s": round(ours_mb_s, 3), "hf_encode_batch_mb_s": round(hf_mb_s, 3),
        "hf_encode_batch_fast_mb_s": round(hf_fast_mb_s, 3), "ratio": round(ours_mb_s / hf_mb_s, 3),
        "ratio_fast": round(ours_mb_s / hf_fast_mb_s, 3),
        "prepare_mb_per_cpu_s": round(mb / ours_cpu, 3), "hf_mb_per_cpu_s": round(mb / hf_cpu, 3),
        "cpu_ratio": round(hf_cpu / ours_cpu, 3), "cpu_ratio_fast": round(fast_cpu / ours_cpu, 3),
        "memory_by_mb": memory, "prepare_wall_cpu_s": [[round(x, 2) for x in r] for r in ours],
        "hf_wall_cpu_s": [[round(x, 2) for x in r] for r in hf],
        "hf_fast_wall_cpu_s": [[round(x, 2) for x in r] for r in hf_fast],
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
