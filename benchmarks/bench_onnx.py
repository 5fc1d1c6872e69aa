"""CPU inference: bertforge's encoder in PyTorch vs its ONNX export in onnxruntime.

For each preset (default: the budget shapes budget-mini and budget-small, pre-LN, no biases, GeGLU;
`base` adds the BERT architecture) one encoder (`BertModel`, head "base") is built with random weights
(every parameter perturbed), exported with `bertforge.model.onnx_export.export_onnx` (the graph
`bertforge convert --to onnx` writes) and loaded in an onnxruntime CPU session (all graph
optimisations, `intra_op_num_threads = --threads`). Both run the same batches of sequence length 128:

- `full`: every position a real token (our encoder drops the all-ones mask; the graph always applies it);
- `padded`: rows of 16..128 real tokens (uniform, fixed seed) padded to 128 (`real_token_fraction`).

PyTorch runs under `torch.inference_mode()` with `torch.set_num_threads(--threads)`; rounds alternate
the two back to back. `tokens_per_s` counts real tokens, best round; `ratio` is the median over rounds
of PyTorch's time / onnxruntime's (> 1: ONNX faster); `max_abs_diff` compares the outputs at real
tokens (last_hidden_state and pooler_output). One JSON line per preset and setting.

    python benchmarks/bench_onnx.py --threads 2 --repeats 5
    python benchmarks/bench_onnx.py --presets budget-mini --repeats 2 --batch 16   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bertforge.model.bert import BertConfig, BertModel
from bertforge.model.onnx_export import ONNX_NAME, export_onnx

SEQ = 128
MIN_SECONDS = 0.5  # each timed measurement repeats its batches until it lasts about this long


def make_batches(vocab: int, batch: int, count: int, padded: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(5, vocab, (batch, SEQ), generator=g)
        mask = torch.ones(batch, SEQ, dtype=torch.long)
        if padded:
            lengths = torch.randint(16, SEQ + 1, (batch,), generator=g)
            mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        out.append((ids * mask, mask, torch.zeros_like(ids)))
    return out


def timed(fn, batches) -> float:
    """Seconds per pass over `batches` (repeated until MIN_SECONDS)."""
    runs, start = 0, time.perf_counter()
    while True:
        for b in batches:
            fn(b)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_SECONDS:
            return elapsed / runs


def bench(preset: str, threads: int, repeats: int, batch: int, workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    config = BertConfig.from_preset(preset, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    start = time.perf_counter()
    export_onnx(model, "base", workdir)
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(workdir / ONNX_NAME), options, providers=["CPUExecutionProvider"])

    def ours(b):
        with torch.inference_mode():
            return model(*b)

    def onnx(b):
        return session.run(None, {"input_ids": b[0].numpy(), "attention_mask": b[1].numpy(),
                                  "token_type_ids": b[2].numpy()})

    rows = []
    for setting in ("full", "padded"):
        batches = make_batches(config.vocab_size, batch, 2, setting == "padded")
        real = sum(int(b[1].sum()) for b in batches)
        diff = 0.0
        for b in batches:  # correctness first, at real tokens
            a, o = ours(b), onnx(b)
            keep = b[1].bool().numpy()
            diff = max(diff, float(np.abs(a.last_hidden_state.numpy()[keep] - o[0][keep]).max()),
                       float(np.abs(a.pooler_output.numpy() - o[1]).max()))
        ours(batches[0]), onnx(batches[0])  # warm-up
        load_before = os.getloadavg()[0]
        t_ours, t_onnx = [], []
        for _ in range(repeats):
            t_ours.append(timed(ours, batches))
            t_onnx.append(timed(onnx, batches))
        rows.append({"bench": "onnx", "preset": preset, "setting": setting, "threads": threads, "batch": batch,
                     "seq": SEQ, "real_token_fraction": round(real / (len(batches) * batch * SEQ), 3),
                     "bertforge_tokens_per_s": round(real / min(t_ours)),
                     "onnxruntime_tokens_per_s": round(real / min(t_onnx)),
                     "ratio": round(statistics.median(a / b for a, b in zip(t_ours, t_onnx)), 3),
                     "max_abs_diff": diff, "export_s": round(export_s, 1),
                     "torch": torch.__version__, "onnxruntime": ort.__version__,
                     "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["budget-mini", "budget-small"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            for row in bench(preset, args.threads, args.repeats, args.batch, Path(tmp)):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
