"""Recipe search with short proxy runs: which pretraining recipe leaves the MLM plateau in a CPU budget?

A grid file names variants (a data folder written by `bertforge prepare` + dotted `bertforge pretrain`
overrides on top of the grid's `base`). Two stages:

    # 1. CPU tokens/s of every distinct shape (model, batch, vocabulary, masking, sequence), on this machine
    python benchmarks/recipe_search.py measure --grid benchmarks/grids/cpu.yaml --out runs/search/cpu
    # 2. every variant for `minutes` of CPU-equivalent budget, evaluated at the half and at the end
    python benchmarks/recipe_search.py run --grid benchmarks/grids/cpu.yaml --out runs/search/cpu \
        [--device cuda --parallel 8]
    python benchmarks/recipe_search.py table --out runs/search/cpu        # markdown table of the results

A CPU minute of a variant is `60 x` its measured CPU tokens/s: stage 2 gives each variant a token budget
(`train.max_tokens`) equal to what 2 CPU cores process in `minutes`, with the wall-clock schedule replaced
by the same schedule over tokens. The updates a variant makes are then the ones it would make on the CPU
(the same batches, masks, learning rates), whatever device runs them, so a GPU can run the whole search
in minutes. What the proxy leaves out: evaluation pauses (a CPU run spends part of its budget on them) and
the few-percent throughput noise of a shared machine. Evaluation is the held-out protocol of
`bertforge.data.mlm_eval` (fixed masks, 15%, every target shown as [MASK]) on the prepared validation split.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

SPEED_KEYS = ("model.", "train.batch_size", "masking.mlm_probability", "data.path", "train.grad_accum",
              "optim.optimizer")  # LAMB has no fused CPU kernel: slower than AdamW per step


def load_grid(path: Path) -> dict:
    grid = yaml.safe_load(path.read_text())
    base = grid.get("base", [])
    for v in grid["variants"]:
        v["all"] = [*base, f"data.path={v.get('data', grid.get('data'))}", *v.get("overrides", [])]
    return grid


def shape_key(overrides: list[str]) -> str:
    """The overrides that change tokens/s (the last value of each key wins)."""
    kept = {}
    for o in overrides:
        k, _, val = o.partition("=")
        if k.startswith(SPEED_KEYS):
            kept[k] = val
    return ";".join(f"{k}={kept[k]}" for k in sorted(kept))


def pretrain_cmd(overrides: list[str], out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "bertforge", "pretrain", f"train.output_dir={out}", *overrides,
            "train.progress=false", "train.eval_every_minutes=0", "train.save_every_minutes=0", *extra]


def read_metrics(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def measure(grid: dict, out: Path, steps: int) -> None:
    """CPU tokens/s per distinct shape: median of the logged windows after the first."""
    speeds_file = out / "speeds.json"
    speeds = json.loads(speeds_file.read_text()) if speeds_file.exists() else {}
    for v in grid["variants"]:
        key = shape_key(v["all"])
        if key in speeds:
            continue
        run = out / "measure" / v["name"]
        cmd = pretrain_cmd(v["all"], run, [f"train.max_steps={steps}", "train.log_every=5", "data.eval_rows=64",
                                           "train.device=cpu", "optim.schedule=linear"])
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        windows = [r["tokens_per_s"] for r in read_metrics(run) if "tokens_per_s" in r][1:]
        speeds[key] = statistics.median(windows)
        print(f"{v['name']:<28} {speeds[key]:8,.0f} tokens/s  ({time.time() - t0:.0f} s)  {key}", flush=True)
        speeds_file.write_text(json.dumps(speeds, indent=1))


def run_variant(v: dict, grid: dict, speeds: dict, out: Path, device: str) -> subprocess.Popen | None:
    run = out / "runs" / v["name"]
    if (run / "summary.json").exists():
        return None
    minutes = float(v.get("minutes", grid["minutes"]))
    tok_s = speeds[shape_key(v["all"])]
    budget = int(tok_s * minutes * 60)
    batch = int(next((o.split("=")[1] for o in reversed(v["all"]) if o.startswith("train.batch_size=")), 32))
    seq = json.loads((Path(v.get("data", grid.get("data"))) / "manifest.json").read_text())["seq_len"]
    evals = int(v.get("evals", grid.get("evals", 2)))
    every = max(1, round(budget / evals / (batch * seq)))
    extra = [f"train.max_tokens={budget}", f"train.eval_every={every}", f"train.device={device}",
             "train.time_budget=null", "train.save_every=0", "train.keep_last=1"]
    v["budget_tokens"], v["cpu_tokens_per_s"] = budget, tok_s
    run.mkdir(parents=True, exist_ok=True)
    (run / "variant.json").write_text(json.dumps(v, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1" if device != "cpu" else os.environ.get("OMP_NUM_THREADS", "2")}
    log = open(run / "log.txt", "w")
    return subprocess.Popen(pretrain_cmd(v["all"], run, extra), stdout=log, stderr=subprocess.STDOUT, env=env)


def run_all(grid: dict, out: Path, device: str, parallel: int, only: list[str] | None) -> None:
    speeds = json.loads((out / "speeds.json").read_text())
    todo = [v for v in grid["variants"] if not only or v["name"] in only]
    running: list[tuple[str, subprocess.Popen, float]] = []
    t_start = time.time()

    def stop(signum, frame):  # a timeout ends the children too, and the table shows what finished
        for _, p, _ in running:
            p.terminate()
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    while todo or running:
        while todo and len(running) < parallel:
            v = todo.pop(0)
            p = run_variant(v, grid, speeds, out, device)
            if p is not None:
                running.append((v["name"], p, time.time()))
        for item in list(running):
            name, p, t0 = item
            if p.poll() is not None:
                running.remove(item)
                print(f"[{time.time() - t_start:6.0f} s] {name:<28} exit {p.returncode} in {time.time() - t0:.0f} s",
                      flush=True)
        time.sleep(0.5)


def collect(out: Path) -> list[dict]:
    rows = []
    for run in sorted((out / "runs").glob("*/variant.json")):
        v = json.loads(run.read_text())
        evals = [r for r in read_metrics(run.parent) if "eval_loss" in r]
        row = {"name": v["name"], "change": v.get("note", ""), "cpu_tokens_per_s": v["cpu_tokens_per_s"],
               "budget_tokens": v["budget_tokens"], "overrides": v.get("overrides", []), "evals": evals}
        rows.append(row)
    return rows


def at_mark(evals: list[dict], tok_s: float, minutes: float) -> dict | None:
    """The evaluation closest to `minutes` of CPU time (tokens / CPU tokens/s), within 10% of it."""
    best = min(evals, key=lambda e: abs(e["tokens"] / tok_s / 60 - minutes), default=None)
    if best is None or abs(best["tokens"] / tok_s / 60 - minutes) > 0.1 * minutes:
        return None
    return best


def table(out: Path, marks: list[float]) -> str:
    """Markdown: per variant, held-out loss / accuracy at each CPU-minute mark, top-5 and the most frequent
    prediction's share at the last evaluation."""
    rows = collect(out)
    head = " | ".join(f"{m:g} min: loss / acc" for m in marks)
    lines = [f"| variant | change | CPU tok/s | updates | tokens | {head} | last: loss / acc / top-5 | top prediction (share) |",
             "|---|---|---|---|---|" + "---|" * len(marks) + "---|---|"]
    for r in rows:
        e, tok_s = r["evals"], r["cpu_tokens_per_s"]
        if not e:
            lines.append(f"| {r['name']} | {r['change']} | {tok_s:,.0f} | failed |" + " |" * (len(marks) + 3))
            continue
        cells = []
        for m in marks:
            x = at_mark(e, tok_s, m)
            cells.append(f"{x['eval_loss']:.2f} / {x['eval_accuracy']:.1%}" if x else "—")
        end = e[-1]
        minutes = end["tokens"] / tok_s / 60
        lines.append(
            f"| {r['name']} | {r['change']} | {tok_s:,.0f} | {end['step']:,} | {end['tokens'] / 1e6:.2f}M "
            f"({minutes:.1f} min) | {' | '.join(cells)} | {end['eval_loss']:.2f} / {end['eval_accuracy']:.1%} / "
            f"{end.get('eval_top5_accuracy', float('nan')):.1%} | "
            f"{end.get('eval_top_prediction', '?')!r} ({end.get('eval_top_prediction_share', float('nan')):.0%}) |")
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("measure", "run", "table"))
    ap.add_argument("--grid", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30, help="measure: steps per shape")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--marks", type=float, nargs="+", default=[5, 10], help="table: CPU minutes to show")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "measure":
        measure(load_grid(args.grid), args.out, args.steps)
    elif args.stage == "run":
        run_all(load_grid(args.grid), args.out, args.device, args.parallel, args.only)
        print(table(args.out, args.marks))
    else:
        print(table(args.out, args.marks))


if __name__ == "__main__":
    main()
