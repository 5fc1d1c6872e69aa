"""HTTP serving throughput and latency: `bertforge serve` under 64 concurrent loopback clients vs the same
sentences through `bertforge embed`'s encoder and `SentenceTransformer.encode`, in one run.

1. `bertforge serve minilm=all-MiniLM-L6-v2 --threads T` starts in a subprocess on a free 127.0.0.1 port.
2. Idle latency: `--idle-requests` sequential requests of one short text to `/v1/embeddings` (p50, p99).
3. Load: `--clients` concurrent clients (one asyncio process, one keep-alive HTTP/1.1 connection each, a
   lean hand-written client so that the load generator takes little of the cores it shares) send the
   first `--sentences` unique STS-B sentences (dev then train), `--per-request` per request, base64 (the
   openai client's default), until every sentence is sent or `--max-seconds` pass. Reported:
   sentences/s over the wall time, per-request latency p50/p99, and the server's peak RSS (sampled
   every 5 ms from /proc). The clients share the machine with the server, as they would on loopback;
   `client_cpu_share` is the share of all cores the load generator itself used. The load phase runs
   `--repeats` times and the fastest is kept, as for the direct peers.
4. The server stops; in this process, with `torch.set_num_threads(T)`: bertforge's encoder as
   `bertforge embed` runs it (`SentenceEncoder.encode`, batch 64) and sentence-transformers (batch 32)
   embed the same sentences after a warm-up (best of `--repeats`). `max_abs_diff` compares the served
   vectors with bertforge's. `model_busy_fraction` (model time / wall time, from the server's /metrics)
   and `model_sent_per_s_in_server` split the gap to `bertforge embed` into idle time and batch shape.

Goals (issue 10): `ratio_vs_sentence_transformers` >= 1.2, `ratio_vs_embed` >= 0.8 and `idle_p99_ms`
< 50 on 2 cores. One JSON line on stdout.

    python benchmarks/bench_serve.py                     # the full run (a few minutes on 2 idle cores)
    python benchmarks/bench_serve.py --quick             # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import load_sentences, model_path  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
SHORT = "A man is playing a guitar."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path, threads: int, port: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "bertforge", "serve", f"minilm={path}", "--port", str(port),
                             "--threads", str(threads), "--log-level", "warning", *extra], env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not answer /health within 180 s")


class PeakRSS:
    """Samples a process's resident set size every 5 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.done.is_set():
            with open(f"/proc/{self.pid}/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page / 2**20)
            time.sleep(0.005)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak


def model_seconds(url: str) -> tuple[float, float]:
    """(seconds the model ran, batches) so far, from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        for name in ("bertforge_batch_duration_seconds_sum", "bertforge_batch_duration_seconds_count"):
            if line.startswith(name + "{") and 'kind="embed"' in line:
                values[name] = float(line.rsplit(" ", 1)[1])
    return values["bertforge_batch_duration_seconds_sum"], values["bertforge_batch_duration_seconds_count"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def idle_latency(url: str, n: int) -> list[float]:
    times = []
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            start = time.perf_counter()
            r = client.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": SHORT})
            times.append(time.perf_counter() - start)
            r.raise_for_status()
    return times


async def post_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str,
                    body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 POST on a kept-alive connection -> (status, body). The load generator shares the two
    cores with the server, so it is kept lean: no client library, Content-Length framing only."""
    writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), host.encode(), len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return status, await reader.readexactly(length)


async def load_run(url: str, texts: list[str], clients: int, per_request: int, max_seconds: float):
    """(wall seconds, latencies, embeddings by sentence index, sentences sent)."""
    chunks = [list(range(i, min(i + per_request, len(texts)))) for i in range(0, len(texts), per_request)]
    queue: asyncio.Queue = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)
    latencies: list[float] = []
    vectors: dict[int, np.ndarray] = {}
    deadline = time.perf_counter() + max_seconds
    host, port = url.removeprefix("http://").split(":")

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < deadline and not queue.empty():
                idx = queue.get_nowait()
                body = json.dumps({"model": "minilm", "encoding_format": "base64",
                                   "input": [texts[i] for i in idx]}).encode()
                start = time.perf_counter()
                status, payload = await post_json(reader, writer, host, "/v1/embeddings", body)
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
                for i, d in zip(idx, json.loads(payload)["data"]):
                    vectors[i] = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        finally:
            writer.close()

    async with httpx.AsyncClient(timeout=120) as http:  # one warm-up request
        await http.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": texts[:per_request]})
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    return wall, latencies, vectors, len(vectors)


def direct(texts: list[str], threads: int, repeats: int) -> dict:
    """Sentences/s of bertforge's encoder (as `bertforge embed`) and sentence-transformers; embeddings."""
    import torch
    from sentence_transformers import SentenceTransformer

    from bertforge.model.folders import load_encoder

    torch.set_num_threads(threads)
    path = model_path()
    encoder, tokenizer = load_encoder(path)
    st = SentenceTransformer(str(path), device="cpu")
    runs = {"embed": lambda: encoder.encode(texts, tokenizer, batch_size=64).float().numpy(),
            "st": lambda: st.encode(texts, batch_size=32, convert_to_numpy=True)}
    best, out = {k: 0.0 for k in runs}, {}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            out[name] = fn()
            best[name] = max(best[name], len(texts) / (time.perf_counter() - start))
    return {"rates": best, "embed": out["embed"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", type=int, default=4000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--per-request", type=int, default=8, help="sentences per request (default: %(default)s)")
    p.add_argument("--idle-requests", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=300, help="cap on the load phase (default: %(default)s)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="passed to bertforge serve (default: its own)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="passed to bertforge serve (default: its own)")
    p.add_argument("--quick", action="store_true", help="256 sentences, 8 clients, 20 idle requests, 1 repeat")
    args = p.parse_args()
    if args.quick:
        args.sentences, args.clients, args.idle_requests, args.repeats = 256, 8, 20, 1
    texts = load_sentences(args.sentences)
    load_before = os.getloadavg()[0]
    port = free_port()
    extra = [x for flag in ("max_batch_tokens", "max_wait_ms") if getattr(args, flag) is not None
             for x in (f"--{flag.replace('_', '-')}", str(getattr(args, flag)))]
    proc = start_server(model_path(), args.threads, port, extra)
    url = f"http://127.0.0.1:{port}"
    try:
        idle = idle_latency(url, args.idle_requests)
        rss = PeakRSS(proc.pid)
        runs = []  # the load phase `--repeats` times, the best kept: the protocol the direct peers get
        for _ in range(args.repeats):
            busy_before, batches_before = model_seconds(url)
            cpu_before = time.process_time()
            wall, latencies, vectors, sent = asyncio.run(load_run(url, texts, args.clients, args.per_request,
                                                                  args.max_seconds))
            client_cpu = time.process_time() - cpu_before
            busy, batches = model_seconds(url)
            runs.append((wall, latencies, vectors, sent, busy - busy_before, batches - batches_before, client_cpu))
        peak_rss = rss.stop()
        wall, latencies, vectors, sent, busy, batches, client_cpu = min(runs, key=lambda r: r[0] / r[3])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    served_rate = sent / wall
    peers = direct(texts, args.threads, args.repeats)
    rates = peers["rates"]
    diff = max(float(np.abs(vectors[i] - peers["embed"][i]).max()) for i in vectors)
    result = {
        "bench": "serve", "model": "all-MiniLM-L6-v2", "sentences": sent, "clients": args.clients,
        "per_request": args.per_request, "threads": args.threads, "server_args": extra,
        "server_sent_per_s": round(served_rate, 1), "load_p50_ms": round(percentile(latencies, 50), 1),
        "load_p99_ms": round(percentile(latencies, 99), 1), "server_peak_rss_mb": round(peak_rss, 1),
        "idle_p50_ms": round(percentile(idle, 50), 2), "idle_p99_ms": round(percentile(idle, 99), 2),
        "embed_sent_per_s": round(rates["embed"], 1), "sentence_transformers_sent_per_s": round(rates["st"], 1),
        "ratio_vs_embed": round(served_rate / rates["embed"], 3),
        "ratio_vs_sentence_transformers": round(served_rate / rates["st"], 3),
        "model_busy_fraction": round(busy / wall, 3), "batches": int(batches),
        "model_sent_per_s_in_server": round(sent / busy, 1),
        "server_sent_per_s_each_repeat": [round(r[3] / r[0], 1) for r in runs],
        "client_cpu_share": round(client_cpu / (wall * os.cpu_count()), 3), "max_abs_diff": diff, "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    result["goals_met"] = {"vs_st_1.2x": result["ratio_vs_sentence_transformers"] >= 1.2,
                           "vs_embed_0.8x": result["ratio_vs_embed"] >= 0.8, "idle_p99_under_50ms":
                           result["idle_p99_ms"] < 50, "vectors_equal": diff <= 1e-5}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
