"""The GPU path measured: tokens/s, MFU and peak memory of one pretraining step, bertforge vs transformers.

One training step = forward + backward + gradient clipping (0.5) + fused AdamW step, on one fixed batch
(random token ids in [5, 30522) with [CLS]/[SEP] at the ends, no padding, exactly 25% of the positions
labelled, as `configs/gpu-budget.yaml` masks; 80% of those shown as [MASK]). Random ids cost the same
FLOPs as text. Every case gets the same batch for its batch size and sequence length, and
`transformers.BertForMaskedLM` gets bertforge's weights through the HF key table (post-LN presets only;
the budget layout has no HF counterpart).

Cases, run in priority order (the headline first) so a run cut short by `--budget-s` still has them:
  ours   preset mini/small/base x layout post (original BERT, our presets) / budget (pre-LN, no bias,
         GeGLU, no dropout, rotary positions: the gpu-budget recipe's layout at that size; the recipe
         itself, `crammed` = 16 layers x 768, runs too) x bf16 autocast / fp32 x
         torch.compile / eager
  hf     transformers.BertForMaskedLM (SDPA attention), bf16 / fp32, eager (and compiled for base)
  gc     model.gradient_checkpointing on / off for base at seq 128 and 512 (same tokens per batch)
  offload  optim.offload=cpu for base (AdamW state and step on the host, copies overlapped)

Timing: `--warmup` steps first (compilation happens there; `compile_s` = warm-up time minus that many
steady steps), then `--steps` steps between two `torch.cuda.synchronize()`; `step_ms` is their mean.
MFU = model FLOPs per step / step time / peak. Model FLOPs come from the shapes: 3 x the forward's
matmul FLOPs (qkv, attention scores and weighted sum 4*T*H per token and layer, output projection,
feed-forward, MLM head dense + decoder), counting for bertforge the sparse MLM head (last layer's output
projection and feed-forward, and the head, at the labelled rows only) and for HF its dense head (every
position); recomputation under gradient checkpointing is not counted (it is not model work). The peak is
`--peak-tflops` (default 989: H100/H200 SXM dense bf16), used for every precision. `peak_mem_gb` is
`torch.cuda.max_memory_allocated()` over the timed case (model, gradients, AdamW state, activations),
reset before each case; `torch._dynamo.reset()` runs between cases. A case that fails (OOM, compile
error, `--case-timeout-s`) is recorded with its error and the run goes on. Results are rewritten after
every case: JSON to `--out`, a markdown table beside it (`.md`).

    PYTHONPATH=src python benchmarks/bench_gpu.py --out results/gpu.json            # one GPU, ~3 min
    PYTHONPATH=src python benchmarks/bench_gpu.py --cpu-smoke --out /tmp/smoke.json  # CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

VOCAB = 30522  # bert-base-uncased; the model pads it to 30528
MASK_ID, CLS_ID, SEP_ID = 103, 101, 102
LAYOUTS = {"post": {}, "budget": dict(norm_position="pre", bias=False, ffn="geglu", hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, position_embedding_type="rotary")}
BATCH = {"mini": 1024, "small": 512, "base": 256, "crammed": 256}  # x 128 tokens: enough work to keep an H200 busy
COMPILE_GUESS_S = {"mini": 25.0, "small": 30.0, "base": 50.0, "crammed": 60.0}  # before one is measured


@dataclass
class Case:
    impl: str  # "ours" | "hf"
    preset: str  # mini | small | base
    layout: str  # post | budget
    precision: str  # bf16 | fp32
    compile: bool
    batch: int
    seq: int = 128
    gc: bool = False
    offload: bool = False  # optim.offload=cpu

    @property
    def name(self) -> str:
        parts = [self.impl, self.preset, self.layout, self.precision, "compile" if self.compile else "eager"]
        parts += [flag for flag, on in (("gc", self.gc), ("offload", self.offload)) if on]
        return "/".join(parts) + f"/{self.batch}x{self.seq}"


@dataclass
class Result:
    case: str
    status: str = "ok"  # ok | failed | skipped
    error: str = ""
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    model_tflop_per_step: float = 0.0
    step_ms: float = 0.0
    compile_s: float | None = None
    warmup_s: float = 0.0
    peak_mem_gb: float = 0.0
    loss: float = float("nan")
    params_m: float = 0.0
    attention: str = ""  # HF's attention implementation as loaded
    spec: dict = field(default_factory=dict)


def plan(smoke: bool) -> list[Case]:
    """Every case, most important first: the gpu-budget recipe (budget layout, bf16, compiled) at base size
    beside HF on the same batch, base's eager / fp32 / gradient-checkpointing variants, the recipe at small
    and mini, then the rest. Cases that would overrun --budget-s are skipped, cheaper later ones still run."""
    b = BATCH
    c = [Case("ours", "base", "budget", "bf16", True, b["base"]),
         Case("hf", "base", "post", "bf16", False, b["base"]),
         Case("ours", "base", "post", "bf16", False, b["base"]),
         Case("ours", "base", "budget", "bf16", False, b["base"]),
         Case("ours", "base", "post", "fp32", False, b["base"]),
         Case("hf", "base", "post", "fp32", False, b["base"]),
         Case("ours", "base", "post", "bf16", False, b["base"], gc=True),
         Case("ours", "base", "post", "bf16", False, 64, seq=512),
         Case("ours", "base", "post", "bf16", False, 64, seq=512, gc=True),
         Case("ours", "base", "post", "bf16", False, b["base"], offload=True),
         Case("ours", "small", "budget", "bf16", True, b["small"]),
         Case("ours", "mini", "budget", "bf16", True, b["mini"]),
         Case("ours", "crammed", "budget", "bf16", True, b["base"]),
         Case("ours", "base", "post", "bf16", True, b["base"])]
    for preset in ("small", "mini"):
        c += [Case("hf", preset, "post", "bf16", False, b[preset]),
              Case("ours", preset, "post", "bf16", False, b[preset]),
              Case("ours", preset, "budget", "bf16", False, b[preset]),
              Case("ours", preset, "post", "fp32", False, b[preset]),
              Case("hf", preset, "post", "fp32", False, b[preset])]
    c += [Case("ours", "base", "budget", "fp32", False, b["base"]),
          Case("hf", "base", "post", "bf16", True, b["base"]),
          Case("ours", "base", "budget", "bf16", True, b["base"], gc=True),
          Case("ours", "base", "budget", "bf16", True, 64, seq=512),
          Case("ours", "base", "budget", "bf16", True, 64, seq=512, gc=True),
          Case("ours", "small", "post", "bf16", True, b["small"]),
          Case("ours", "mini", "post", "bf16", True, b["mini"]),
          Case("ours", "base", "budget", "fp32", True, b["base"])]
    if smoke:  # the same cases on tiny shapes
        for case in c:
            case.batch, case.seq = 4, (64 if case.seq == 512 else 32)
    return c


def model_config(case: Case, smoke: bool):
    from bertforge.model.bert import BertConfig, pad_vocab_size

    preset = "tiny" if smoke else case.preset
    vocab = 99 if smoke else pad_vocab_size(VOCAB)
    return BertConfig.from_preset(preset, vocab_size=vocab, gradient_checkpointing=case.gc, **LAYOUTS[case.layout])


def train_flops(cfg, B: int, T: int, labelled: int, sparse: bool) -> float:
    """Model FLOPs of one training step (3 x forward matmuls); `labelled` rows get the MLM head."""
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    up = 2 * I if cfg.ffn == "geglu" else I
    rows = B * T
    mix = 2 * H * 3 * H + 4 * T * H  # per row and layer: qkv projection, q k^T and att v
    rest = 2 * H * H + 2 * H * up + 2 * I * H  # per row and layer: output projection, feed-forward
    head_rows = labelled if sparse else rows
    fwd = rows * L * mix + (rows * (L - 1) + head_rows) * rest + head_rows * (2 * H * H + 2 * H * V)
    return 3.0 * fwd


def make_batch(B: int, T: int, vocab: int, device: torch.device, rate: float = 0.25) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = CLS_ID % vocab, SEP_ID % vocab
    n = round(rate * (T - 2))  # exactly n labelled positions per row, never [CLS]/[SEP]
    pos = torch.rand(B, T - 2, generator=g).argsort(dim=1)[:, :n] + 1
    labels = torch.full((B, T), -100)
    labels.scatter_(1, pos, ids.gather(1, pos))
    shown = ids.clone()
    hide = torch.zeros(B, T, dtype=torch.bool).scatter_(1, pos, True) & (torch.rand(B, T, generator=g) < 0.8)
    shown[hide] = MASK_ID % vocab
    batch = {"input_ids": shown, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def build_models(case: Case, cfg, device: torch.device) -> torch.nn.Module:
    from bertforge.model.heads import BertForMaskedLM

    torch.manual_seed(0)
    with device:
        ours = BertForMaskedLM(cfg)
    if case.impl == "ours":
        return ours
    from transformers import BertConfig as HFConfig
    from transformers import BertForMaskedLM as HFMLM

    from bertforge.model.hf_compat import config_to_hf, to_hf_state_dict

    hf_cfg = HFConfig(**{k: v for k, v in config_to_hf(cfg, "masked_lm").items() if k != "architectures"})
    try:
        hf_cfg._attn_implementation = "sdpa"
    except (AttributeError, ValueError):  # transformers versions differ; SDPA is BERT's default where available
        pass
    with device:
        hf = HFMLM(hf_cfg)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg, "masked_lm", tied=True), strict=True)
    return hf


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CaseTimeout in the main thread after `seconds` (SIGALRM; a no-op where there is none)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def fire(signum, frame):
        raise CaseTimeout(f"case ran past --case-timeout-s={seconds:.0f}")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():  # CPU smoke: process peak RSS
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def run_case(case: Case, args, device: torch.device) -> Result:
    from bertforge.train.optim import OptimConfig, build_optimizer

    res = Result(case.name, spec=asdict(case))
    cfg = model_config(case, args.cpu_smoke)
    model = build_models(case, cfg, device).train()
    res.params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    res.attention = str(getattr(getattr(model, "config", None), "_attn_implementation", cfg.attn_implementation))
    batch = make_batch(case.batch, case.seq, min(VOCAB, cfg.vocab_size), device)
    labelled = int((batch["labels"] != -100).sum())
    res.model_tflop_per_step = train_flops(cfg, case.batch, case.seq, labelled, sparse=case.impl == "ours") / 1e12
    opt = build_optimizer(model, OptimConfig(lr=1e-4, betas=(0.9, 0.98), eps=1e-12,
                                             offload="cpu" if case.offload else "none"), device.type)
    fwd = torch.compile(model, backend=args.compile_backend) if case.compile else model
    dtype = torch.bfloat16 if case.precision == "bf16" else None

    def step() -> torch.Tensor:
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            loss = fwd(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    res.warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    res.loss = float(loss)
    if not math.isfinite(res.loss):
        raise RuntimeError(f"loss became {res.loss}")
    res.step_ms = seconds * 1e3
    res.tokens_per_s = case.batch * case.seq / seconds
    res.mfu = res.model_tflop_per_step / seconds / args.peak_tflops
    res.peak_mem_gb = peak_gb(device)
    if case.compile:
        res.compile_s = max(0.0, res.warmup_s - args.warmup * seconds)
    return res


def estimate_s(case: Case, measured_compile: dict, smoke: bool) -> float:
    if smoke:
        return 1.0
    eager = 15.0 if case.precision == "fp32" else 8.0
    if not case.compile:
        return eager
    return eager + measured_compile.get(case.preset, COMPILE_GUESS_S[case.preset])


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(meta: dict, results: list[Result]) -> str:
    lines = [f"bench_gpu on {meta['device_name']} — torch {meta['torch']}, transformers {meta['transformers']}, "
             f"MFU against {meta['peak_tflops']:g} TFLOP/s (dense bf16) for every precision; fp32 matmul precision "
             f"'{meta['float32_matmul_precision']}'; random token ids, 25% labelled; {meta['steps']} timed steps "
             f"after {meta['warmup']} warm-up steps; total {meta['total_s']:.0f} s.", "",
             "| impl | preset | layout | precision | mode | gc | batch x seq | tokens/s | MFU | step ms "
             "| peak GiB | compile s | status |",
             "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        s, ok = r.spec, r.status == "ok"
        status = "ok" if ok else f"{r.status}: {r.error[:80]}"
        mode = ("compile" if s["compile"] else "eager") + (" + offload" if s.get("offload") else "")
        lines.append(f"| {s['impl']} | {s['preset']} | {s['layout']} | {s['precision']} | "
                     f"{mode} | {'on' if s['gc'] else 'off'} | "
                     f"{s['batch']} x {s['seq']} | {fmt(r.tokens_per_s if ok else None, ',.0f')} | "
                     f"{fmt(100 * r.mfu if ok else None, '.1f')}{'%' if ok else ''} | "
                     f"{fmt(r.step_ms if ok else None, '.1f')} | {fmt(r.peak_mem_gb if ok else None, '.2f')} | "
                     f"{fmt(r.compile_s, '.1f')} | {status} |")
    return "\n".join(lines) + "\n"


def write(out: Path, meta: dict, results: list[Result]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON results; the markdown table goes beside (.md)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--budget-s", type=float, default=160.0,
                    help="skip cases that would end past this many seconds since start")
    ap.add_argument("--case-timeout-s", type=float, default=120.0, help="give up on one case after this long")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device dense bf16 peak for MFU")
    ap.add_argument("--only", nargs="*", default=[], help="run only cases whose name contains one of these")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--tf32", action="store_true", help="fp32 matmuls on TF32 tensor cores (off, as in training)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on the CPU, aot_eager compile, 1+1 steps: checks the script runs")
    ap.add_argument("--list", action="store_true", help="print the cases in order and exit")
    args = ap.parse_args()
    cases = [c for c in plan(args.cpu_smoke) if not args.only or any(o in c.name for o in args.only)]
    if args.list:
        print("\n".join(c.name for c in cases))
        return
    if args.cpu_smoke:  # every case runs, however slow the machine: no budget, no per-case timeout
        device = torch.device("cpu")
        args.steps, args.warmup, args.compile_backend = 1, 1, "aot_eager"
        args.budget_s, args.case_timeout_s = float("inf"), 0.0
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device; use --cpu-smoke to check the script on a CPU")
    else:
        device = torch.device("cuda")
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    import transformers

    start = time.perf_counter()
    meta = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or "cpu", "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(), "peak_tflops": args.peak_tflops, "steps": args.steps,
            "warmup": args.warmup, "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "compile_backend": args.compile_backend, "data": "random ids, fixed batch, 25% labelled",
            "command": " ".join(sys.argv), "total_s": 0.0}
    results: list[Result] = []
    measured_compile: dict[str, float] = {}
    print(f"bench_gpu: {len(cases)} cases on {meta['device_name']}, budget {args.budget_s:.0f} s", flush=True)
    for i, case in enumerate(cases, 1):
        elapsed = time.perf_counter() - start
        if elapsed + estimate_s(case, measured_compile, args.cpu_smoke) > args.budget_s:
            results.append(Result(case.name, status="skipped", error="time budget (--budget-s)", spec=asdict(case)))
            print(f"[{i}/{len(cases)}] {case.name}: skipped (time budget)", flush=True)
            continue
        t = time.perf_counter()
        try:
            with time_limit(args.case_timeout_s):
                res = run_case(case, args, device)
            if res.compile_s is not None:
                measured_compile[case.preset] = max(res.compile_s, measured_compile.get(case.preset, 0.0))
            print(f"[{i}/{len(cases)}] {case.name}: {res.tokens_per_s:,.0f} tok/s, MFU {100 * res.mfu:.1f}%, "
                  f"{res.step_ms:.1f} ms/step, peak {res.peak_mem_gb:.2f} GiB"
                  + (f", compile {res.compile_s:.1f} s" if res.compile_s is not None else "")
                  + f" ({time.perf_counter() - t:.0f} s)", flush=True)
        except Exception as e:  # one failing case (OOM, compile error, timeout) must not end the run
            msg = f"{type(e).__name__}: {' '.join(str(e).split())}"  # dynamo wraps the cause: keep all of it
            res = Result(case.name, status="failed", error=msg[:600], spec=asdict(case))
            print(f"[{i}/{len(cases)}] {case.name}: FAILED {msg[:200]}", flush=True)
        results.append(res)
        free(device)
        meta["total_s"] = time.perf_counter() - start
        write(args.out, meta, results)
    meta["total_s"] = time.perf_counter() - start
    write(args.out, meta, results)
    print(f"bench_gpu: done in {meta['total_s']:.0f} s -> {args.out} and {args.out.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    main()
