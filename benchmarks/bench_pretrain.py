"""Pretraining throughput: bertforge vs transformers.BertForMaskedLM, same config, batch and data.

Both models get identical weights (ours exported through the HF key table), the same packed rows of
real text (the shared Wikipedia file, tokenized with the bert-base-uncased vocabulary of
all-MiniLM-L6-v2) and the same dynamic masks. One training step = forward + backward + AdamW step,
fp32, `--threads` threads. Both use torch's fused AdamW, each library's default (bertforge's
`build_optimizer`; the `transformers` Trainer's `adamw_torch_fused` for torch >= 2.8). Timing
alternates the two implementations step by step so machine load hits both alike; the median step
time is reported. Peak memory is each implementation's own process peak RSS (VmHWM, reset through /proc/self/clear_refs at the child's start, since a spawned
child otherwise inherits its parent's high-water mark), measured in a fresh subprocess that runs
only that model; `rss_before` is its RSS once data and model are built.

    python benchmarks/bench_pretrain.py --presets mini small --batch 32 --steps 10

Prints one JSON line per preset: tokens/s of both, the ratio (ours / HF) and both peak RSS.

A recipe's real run beside its bare step (`--recipe`): the same model, batch and masking rate as the
recipe file, timed two ways in the same invocation: the bare step in this process (forward + backward +
the recipe's optimizer on prepared rows, masks drawn once), and a real `bertforge pretrain` run of that
recipe on the same prepared data (data loading, masking in the collator, clipping, the schedule, logging;
no evaluation), its steady state being the median tokens/s of its logged windows after the first two:

    python benchmarks/bench_pretrain.py --recipe configs/cpu-budget.yaml --data runs/shards8k --steps 40
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def real_rows(batch: int, seq_len: int, vocab_dir: Path) -> np.ndarray:
    """(batch, seq_len) packed rows of real Wikipedia text: [CLS] tokens [SEP]."""
    from bertforge.wordpiece import WordPieceTokenizer

    tok = WordPieceTokenizer.from_pretrained(vocab_dir)
    with gzip.open(SHARED / "pretrain" / "wikipedia_en_2015.part1.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read(2_000_000)
    ids = [i for enc in tok.encode_batch(text.splitlines()[:4000], add_special_tokens=False, truncation=False,
                                         max_length=10**6) for i in enc.input_ids]
    body = seq_len - 2
    rows = [[tok.cls_token_id, *ids[k * body:(k + 1) * body], tok.sep_token_id] for k in range(batch)]
    return np.asarray(rows, dtype=np.int64), tok


def build(preset: str, vocab_size: int):
    from transformers import BertConfig as HFConfig
    from transformers import BertForMaskedLM as HFMLM

    from bertforge.model.bert import BertConfig, pad_vocab_size
    from bertforge.model.heads import BertForMaskedLM
    from bertforge.model.hf_compat import config_to_hf, to_hf_state_dict

    cfg = BertConfig.from_preset(preset, vocab_size=pad_vocab_size(vocab_size), hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ours = BertForMaskedLM(cfg)
    hf_cfg = HFConfig(**{k: v for k, v in config_to_hf(cfg, "masked_lm").items() if k != "architectures"})
    hf_cfg._attn_implementation = "sdpa"
    hf = HFMLM(hf_cfg)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg, "masked_lm", tied=True), strict=True)
    return ours, hf


def step_fn(model, batch, optimizer):
    def step():
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def batches(preset: str, batch: int, seq_len: int):
    from bertforge.data.masking import MaskingConfig, MLMCollator

    rows, tok = real_rows(batch, seq_len, SHARED / "all-MiniLM-L6-v2")
    collator = MLMCollator.from_tokenizer(tok, MaskingConfig(mlm_probability=0.15), seed=0)
    b = collator(rows)
    return b, tok


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_one(impl: str, preset: str, batch: int, seq_len: int, steps: int) -> dict:
    """Child process: train `impl` alone for `steps`, report peak RSS."""
    reset_peak_rss()
    b, tok = batches(preset, batch, seq_len)
    ours, hf = build(preset, tok.vocab_size)
    model = ours if impl == "ours" else hf
    del ours, hf
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    before = peak_rss_mb()
    step = step_fn(model, b, opt)
    for _ in range(steps):
        step()
    return {"impl": impl, "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_before_mb": round(before, 1)}


def compare(preset: str, batch: int, seq_len: int, steps: int, threads: int) -> dict:
    b, tok = batches(preset, batch, seq_len)
    ours, hf = build(preset, tok.vocab_size)
    ours.train(), hf.train()
    with torch.no_grad():  # same weights, same masks: same loss
        diff = abs(float(ours(**b).loss) - float(hf(**b).loss))
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_h = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    so, sh = step_fn(ours, b, opt_o), step_fn(hf, b, opt_h)
    so(), sh()  # warm-up
    times_o, times_h = [], []
    for _ in range(steps):
        for fn, times in ((so, times_o), (sh, times_h)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    tokens = int(b["attention_mask"].sum())
    to, th = statistics.median(times_o), statistics.median(times_h)
    mem = {}
    for impl in ("ours", "hf"):
        out = subprocess.run([sys.executable, __file__, "--child", impl, "--presets", preset, "--batch", str(batch),
                              "--seq-len", str(seq_len), "--steps", "3", "--threads", str(threads)],
                             capture_output=True, text=True, check=True)
        mem[impl] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return {"bench": "pretrain_step", "preset": preset, "batch": batch, "seq_len": seq_len, "threads": threads,
            "masked_tokens": int((b["labels"] != -100).sum()), "initial_loss_diff": round(diff, 7),
            "ours_tokens_per_s": round(tokens / to, 1), "hf_tokens_per_s": round(tokens / th, 1),
            "ratio": round(th / to, 3), "ours_peak_rss_mb": mem["ours"], "hf_peak_rss_mb": mem["hf"],
            "torch": torch.__version__}


def recipe_bare_step(recipe: str, data: str, steps: int) -> dict:
    """The recipe's model + optimizer on its batch shape, prepared rows and masking rate; no data loading."""
    from bertforge.config import load_run_config
    from bertforge.data.dataset import PackedDataset
    from bertforge.data.masking import MLMCollator
    from bertforge.model.heads import BertForMaskedLM
    from bertforge.train.optim import build_optimizer
    from bertforge.wordpiece import WordPieceTokenizer
    from bertforge.workflows.pretrain import PretrainRunConfig, build_model_config, data_tokenizer_path

    cfg = load_run_config(PretrainRunConfig, file=recipe, overrides=[f"data.path={data}"])
    rows = PackedDataset(data, "train")
    tok = WordPieceTokenizer.from_pretrained(data_tokenizer_path(cfg.data, rows.manifest))
    torch.manual_seed(0)
    model = BertForMaskedLM(build_model_config(cfg.model, tok.vocab_size)).train()
    opt = build_optimizer(model, cfg.optim, "cpu")
    b = MLMCollator.from_tokenizer(tok, cfg.masking, seed=0)(rows.batch(np.arange(cfg.train.batch_size)))

    def step():
        out = model(**b)
        out.loss.backward()
        if cfg.optim.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"tokens_per_s": round(int(b["attention_mask"].sum()) / statistics.median(times), 1),
            "batch": cfg.train.batch_size}


def recipe_real_run(recipe: str, data: str, steps: int, threads: int) -> dict:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "bertforge", "pretrain", "--config", recipe, "--data", data, "--output", tmp,
               f"train.max_steps={steps}", "train.time_budget=null", "optim.schedule=linear", "train.log_every=5",
               "train.eval_every=0", "train.eval_every_minutes=0", "train.save_every_minutes=0", "data.eval_rows=64",
               "train.progress=false", "train.plateau_warn_after=0"]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        windows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    speeds = [w["tokens_per_s"] for w in windows if "tokens_per_s" in w][2:]
    return {"tokens_per_s": round(statistics.median(speeds), 1), "windows": len(speeds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["mini", "small"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=("ours", "hf"))
    ap.add_argument("--recipe", help="a recipe file: time its real run beside its bare step (needs --data)")
    ap.add_argument("--data", help="prepared shards for --recipe")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.recipe:
        bare = recipe_bare_step(args.recipe, args.data, args.steps)
        real = recipe_real_run(args.recipe, args.data, args.steps, args.threads)
        print(json.dumps({"bench": "recipe_real_vs_bare", "recipe": args.recipe, "threads": args.threads,
                          "batch": bare["batch"], "bare_tokens_per_s": bare["tokens_per_s"],
                          "real_tokens_per_s": real["tokens_per_s"],
                          "real_over_bare": round(real["tokens_per_s"] / bare["tokens_per_s"], 3)}))
        return
    if args.child:
        print(json.dumps(run_one(args.child, args.presets[0], args.batch, args.seq_len, args.steps)))
        return
    for preset in args.presets:
        print(json.dumps(compare(preset, args.batch, args.seq_len, args.steps, args.threads)), flush=True)


if __name__ == "__main__":
    main()
