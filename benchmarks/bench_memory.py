"""Training memory per option, measured beside `bertforge plan`'s estimate: peak memory and step time.

Each case runs alone in a fresh process: build `BertForMaskedLM(preset)` and one fixed batch (random ids,
15% of the positions labelled, as the default masking), then `--steps` training steps (forward, backward,
clip 1.0, AdamW, zero_grad) with the case's option:

    plain    fp32                          gc       model.gradient_checkpointing=true
    offload  optim.offload=cpu             bf16     bf16 autocast        bf16-gc   both

Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the process's peak RSS (VmHWM, reset at
the start through /proc/self/clear_refs; glibc told to map large allocations on their own, MALLOC_ENV) minus its RSS once torch is imported, the batch is built and one
step of a tiny model has loaded the kernel libraries, so the number is what the model, its gradients, the
optimizer and the activations add. `step_s` is the
median step time after the first step. On a CPU, offload keeps everything in the same memory, so it adds
the fp32 master and the gradient staging instead of saving the moments: it is there to show the cost.

    python benchmarks/bench_memory.py --cases base:8:128:plain base:8:128:gc base:2:512:plain base:2:512:gc
    python benchmarks/bench_memory.py --cases mini:16:128:plain --steps 2 --json

Prints one JSON line per case (and a markdown table at the end): peak, the planner's estimate, their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# glibc malloc: every allocation over 64 KiB gets its own mapping, returned to the OS when freed, so the
# peak RSS follows the live tensors instead of heap memory malloc keeps for reuse (its adaptive threshold
# otherwise grows to 32 MiB and freed activations stay resident)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
OPTIONS = ("plain", "gc", "offload", "bf16", "bf16-gc")
DEFAULT_CASES = ["base:8:128:plain", "base:8:128:gc", "base:8:128:bf16", "base:8:128:bf16-gc", "base:8:128:offload",
                 "base:2:512:plain", "base:2:512:gc", "mini:32:128:plain", "mini:32:128:gc", "small:16:128:plain"]


def rss_mb(field: str = "VmRSS:") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


def make_batch(B: int, T: int, vocab: int, p: float = 0.15) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    m = round(p * (T - 2))
    pos = torch.rand(B, T - 2, generator=g).argsort(dim=1)[:, :m] + 1
    labels = torch.full((B, T), -100)
    labels.scatter_(1, pos, ids.gather(1, pos))
    return {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": labels}


def warm_up(cfg, option: str, dev: torch.device) -> None:
    """One step of a tiny model with the same option, so kernel libraries are loaded before measuring."""
    from bertforge.model.bert import BertConfig
    from bertforge.model.heads import BertForMaskedLM
    from bertforge.train.optim import OptimConfig, build_optimizer

    tiny = BertForMaskedLM(BertConfig.from_preset("tiny", gradient_checkpointing=cfg.gradient_checkpointing,
                                                  norm_position=cfg.norm_position, ffn=cfg.ffn, bias=cfg.bias)).to(dev)
    opt = build_optimizer(tiny, OptimConfig(offload="cpu" if option == "offload" else "none"), dev.type)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=option.startswith("bf16")):
        loss = tiny(**{k: v.to(dev) for k, v in make_batch(2, 32, 99).items()}).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
    opt.step()


def run_case(spec: str, steps: int, device: str) -> dict:
    """In this (fresh) process: train one case, measure its peak."""
    from bertforge.model.bert import BertConfig
    from bertforge.model.heads import BertForMaskedLM
    from bertforge.plan import estimate
    from bertforge.train.optim import OptimConfig, build_optimizer

    preset, batch, seq, option = spec.split(":")
    batch, seq = int(batch), int(seq)
    gc, bf16, offload = option in ("gc", "bf16-gc"), option.startswith("bf16"), option == "offload"
    cfg = BertConfig.from_preset(preset, gradient_checkpointing=gc)
    dev = torch.device(device)
    data = {k: v.to(dev) for k, v in make_batch(batch, seq, cfg.vocab_size).items()}
    warm_up(cfg, option, dev)
    if dev.type == "cpu":
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        base = rss_mb()
    else:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg).to(dev).train()
    opt = build_optimizer(model, OptimConfig(lr=1e-4, offload="cpu" if offload else "none"), dev.type)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
    peak = (rss_mb("VmHWM:") if dev.type == "cpu" else torch.cuda.max_memory_allocated(dev) / 2**20) - base
    plan = estimate(cfg, batch, seq, precision="bf16" if bf16 else "fp32", gradient_checkpointing=gc,
                    offload=offload, device=dev.type)
    planned = plan.peak / 2**20
    return {"bench": "memory", "case": spec, "preset": preset, "batch": batch, "seq": seq, "option": option,
            "device": dev.type, "peak_mb": round(peak, 1), "plan_mb": round(planned, 1),
            "plan_over_measured": round(planned / peak, 3), "step_s": round(statistics.median(times[1:] or times), 3),
            "loss": round(float(loss), 4), "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="preset:batch:seq:option, option one of "
                    + ", ".join(OPTIONS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.cases:
        if spec.count(":") != 3 or spec.rsplit(":", 1)[1] not in OPTIONS:
            sys.exit(f"case '{spec}': write preset:batch:seq:option with option one of {', '.join(OPTIONS)}")
    if args.child:
        print(json.dumps(run_case(args.cases[0], args.steps, args.device)), flush=True)
        return
    rows = []
    for spec in args.cases:
        out = subprocess.run([sys.executable, __file__, "--child", "--cases", spec, "--steps", str(args.steps),
                              "--threads", str(args.threads), "--device", args.device],
                             capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
        if out.returncode != 0:
            print(json.dumps({"bench": "memory", "case": spec, "error": out.stderr.strip().splitlines()[-1:]}),
                  flush=True)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| preset | batch x seq | option | peak MiB | plan MiB | plan / measured | step s |\n|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['batch']} x {r['seq']} | {r['option']} | {r['peak_mb']:,.0f} | "
              f"{r['plan_mb']:,.0f} | {r['plan_over_measured']:.2f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
