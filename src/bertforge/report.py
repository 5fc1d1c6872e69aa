"""`bertforge report RUN [RUN ...] --out DIR`: training curves as PNG and tables comparing runs.

A run directory (written by the Trainer, layout in `train/checkpoint.py`) holds

    config.json    the resolved run config (optimizer, lr, model shape)
    metrics.jsonl  training lines {step, tokens, elapsed, loss, lr, tokens_per_s} and evaluation lines
                   {step, tokens, elapsed, eval_loss, eval_accuracy, ...}
    summary.json   the final metrics (absent while running, or when the run was killed)
    metrics.json   fine-tuning runs only: {"task", "model", "seed", metric: value, ...}

`build_report` writes into DIR:

    report.md                 the runs table, the fine-tuning table and the plots, in one page
    runs.csv                  one row per run (raw numbers)
    finetune.csv              task x model x metric: median, min, max, quartiles over seeds
    {train_loss,lr,eval_<metric>}_vs_{step,time}.png     one line per run, labelled "name (optimizer)"

Partial runs never stop a report: a line of metrics.jsonl that does not parse (a run killed while
writing leaves a truncated last line) is skipped with a warning, and because the Trainer appends to
metrics.jsonl, lines written after the last checkpoint of a killed run are superseded by the lines the
resumed run writes for the same steps. Runs are read in `bertforge.report_runs`, plots drawn in `bertforge.report_plots`.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertforge.errors import BertforgeError
from bertforge.report_plots import plot_runs
from bertforge.report_runs import RunData, finite_or_none, load_runs

FINETUNE_ID_KEYS = ("task", "model", "seed")
# runs table: (CSV column, markdown header)
RUN_TABLE = (("run", "run"), ("optimizer", "optimizer"), ("lr", "lr"), ("preset", "preset"), ("steps", "steps"),
             ("tokens", "tokens"), ("tokens_per_s", "tokens/s"), ("wall_s", "wall time"),
             ("train_loss", "train loss"), ("eval_loss", "eval loss"), ("best_eval_loss", "best eval loss"),
             ("eval_accuracy", "eval acc"), ("best_eval_accuracy", "best eval acc"), ("eval_top5_accuracy", "eval top-5"),
             ("eval_perplexity", "perplexity"), ("status", "status"))
RUN_COLUMNS = tuple(c for c, _ in RUN_TABLE)
CELL_FORMATS = {"steps": "{:,.0f}", "tokens": "{:,.0f}", "tokens_per_s": "{:,.0f}", "lr": "{:.2e}",
                "eval_perplexity": "{:,.2f}"}  # others: "{:.4f}"
FINETUNE_COLUMNS = ("task", "model", "metric", "n", "seeds", "median", "min", "max", "q1", "q3")


@dataclass
class Report:
    files: list[Path]
    runs: list[RunData]
    runs_markdown: str
    finetune_markdown: str | None
    warnings: list[str]
    compare_markdown: str | None = None  # task x metric, one column per model (two or more models)


# ----------------------------------------------------------------------------- the runs table


def infer_preset(model: dict) -> str | None:
    """The preset name saved in the config, else the preset whose shape matches the saved model fields."""
    if not model:
        return None
    if isinstance(model.get("preset"), str):
        return model["preset"]
    from bertforge.model.bert import PRESETS

    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "norm_position", "bias", "ffn")
    found = [name for name, preset in PRESETS.items() if all(model.get(k) == getattr(preset, k) for k in shape)]
    if found:
        return found[0]
    return f"custom L{model['num_hidden_layers']} H{model['hidden_size']}" if "hidden_size" in model else None


def _last(records: list[dict], key: str) -> float | None:
    for r in reversed(records):
        if finite_or_none(r.get(key)) is not None:
            return finite_or_none(r[key])
    return None


def _best(records: list[dict], key: str, lower: bool) -> float | None:
    values = [v for v in (finite_or_none(r.get(key)) for r in records) if v is not None and math.isfinite(v)]
    return (min(values) if lower else max(values)) if values else None


def run_row(run: RunData) -> dict:
    """The runs-table row: raw numbers (None where the run did not log the value)."""
    records = run.train + run.evals
    summary = run.summary or {}
    evals = run.evals or ([summary] if any(k.startswith("eval_") for k in summary) else [])

    def final(key: str) -> float | None:
        value = finite_or_none(summary.get(key))
        return value if value is not None else max((r[key] for r in records if key in r), default=None)

    eval_loss = _last(evals, "eval_loss")
    perplexity = _last(evals, "eval_perplexity")
    if perplexity is None and eval_loss is not None:
        perplexity = math.exp(min(eval_loss, 50.0))
    rates = [v for v in (finite_or_none(r.get("tokens_per_s")) for r in run.train) if v is not None]
    optim = run.config.get("optim") if isinstance(run.config.get("optim"), dict) else {}
    model = run.config.get("model") if isinstance(run.config.get("model"), dict) else {}
    reason = summary.get("stop_reason", "budget")  # budget = finished; diverged / loss_threshold = stopped early
    status = ("done" if reason == "budget" else str(reason)) if run.summary is not None else "incomplete"
    return {
        "run": run.name, "optimizer": run.optimizer, "lr": finite_or_none(optim.get("lr")), "preset": infer_preset(model),
        "steps": final("step"), "tokens": final("tokens"),
        "tokens_per_s": statistics.median(rates) if rates else None, "wall_s": final("elapsed"),
        "train_loss": _last(run.train, "loss"),
        "eval_loss": eval_loss, "best_eval_loss": _best(evals, "eval_loss", lower=True),
        "eval_accuracy": _last(evals, "eval_accuracy"), "best_eval_accuracy": _best(evals, "eval_accuracy", lower=False),
        "eval_top5_accuracy": _last(evals, "eval_top5_accuracy"), "eval_perplexity": perplexity, "status": status,
    }


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def format_cell(column: str, value: Any) -> str:
    """Markdown rendering of one runs-table cell; '—' for a missing value."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value.replace("|", "\\|")
    if column == "wall_s":
        return format_duration(value)
    return CELL_FORMATS.get(column, "{:.4f}").format(value)


def markdown_table(headers: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def runs_markdown(rows: list[dict]) -> str:
    return markdown_table([h for _, h in RUN_TABLE], [[format_cell(c, row[c]) for c in RUN_COLUMNS] for row in rows])


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})


# ----------------------------------------------------------------------------- fine-tuning aggregation


def finetune_rows(runs: list[RunData]) -> tuple[list[dict], list[str]]:
    """task x model x metric -> median, min, max and quartiles over seeds (numeric fields of metrics.json)."""
    import numpy as np

    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        if run.finetune is not None:
            groups.setdefault((str(run.finetune["task"]), str(run.finetune.get("model"))), []).append(run.finetune)
    rows, warnings = [], []
    for (task, model), items in sorted(groups.items()):
        seeds = [m.get("seed") for m in items]
        if len(set(map(str, seeds))) < len(seeds):
            warnings.append(f"task {task}, model {model}: seeds {seeds} repeat; every run is counted")
        metrics = sorted({k for m in items for k, v in m.items() if k not in FINETUNE_ID_KEYS and finite_or_none(v) is not None})
        for metric in metrics:
            values = [finite_or_none(m.get(metric)) for m in items]
            values = [v for v in values if v is not None]
            q1, q3 = (float(q) for q in np.percentile(values, [25, 75]))
            rows.append({"task": task, "model": model, "metric": metric, "n": len(values),
                         "seeds": " ".join(str(m.get("seed")) for m in items if finite_or_none(m.get(metric)) is not None),
                         "median": statistics.median(values), "min": min(values), "max": max(values),
                         "q1": q1, "q3": q3})
    return rows, warnings


def finetune_markdown(rows: list[dict]) -> str:
    headers = ("task", "model", "metric", "seeds", "median", "min–max", "IQR (q1–q3)")
    body = [[r["task"], r["model"].replace("|", "\\|"), r["metric"], str(r["n"]), f"{r['median']:.4f}",
             f"{r['min']:.4f}–{r['max']:.4f}", f"{r['q1']:.4f}–{r['q3']:.4f}"] for r in rows]
    return markdown_table(headers, body)


def short_model_name(model: str) -> str:
    """A model path as a column label: its last component, or the last two when that is just `model`
    (`runs/cpu-budget/model` -> `cpu-budget/model`)."""
    parts = Path(model).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 and parts[-1] == "model" else (parts[-1] if parts else model)


def compare_markdown(rows: list[dict]) -> str | None:
    """The fine-tuning medians side by side: one row per task and metric, one column per model (in order of
    first appearance); `n=K` after a median over K seeds, `—` where a model has no run of that task."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    if len(models) < 2:
        return None
    cells = {(r["task"], r["metric"], r["model"]): r for r in rows}
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    body = []
    for task, metric in keys:
        line = [task, metric]
        for model in models:
            r = cells.get((task, metric, model))
            line.append("—" if r is None else f"{r['median']:.4f}" + (f" (n={r['n']})" if r["n"] > 1 else ""))
        body.append(line)
    headers = ["task", "metric", *(short_model_name(m).replace("|", "\\|") for m in models)]
    return markdown_table(headers, body)


# ----------------------------------------------------------------------------- the report


def build_report(paths: list[str | Path], out: str | Path, *, plots: bool = True) -> Report:
    """Read the runs, write tables (markdown + CSV) and plots into `out`; returns what was written."""
    runs = load_runs(paths)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise BertforgeError(f"--out '{out}' is a file: pass a folder for the report")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [run_row(run) for run in runs if run.train or run.evals or run.summary]
    ft_rows, ft_warnings = finetune_rows(runs)
    files = [out_dir / "report.md"]
    for name, columns, table_rows in (("runs.csv", RUN_COLUMNS, rows), ("finetune.csv", FINETUNE_COLUMNS, ft_rows)):
        if table_rows:
            write_csv(out_dir / name, columns, table_rows)
            files.append(out_dir / name)
    table, ft_table = runs_markdown(rows) if rows else "", finetune_markdown(ft_rows) if ft_rows else None
    side_by_side = compare_markdown(ft_rows) if ft_rows else None
    if plots:

        pngs = plot_runs(runs, out_dir)
    else:
        pngs = []
    page = ["# bertforge report\n", "Runs: " + ", ".join(f"`{run.path}`" for run in runs) + "\n"]
    page += [f"## Runs\n\n{table}"] if table else []
    page += [f"## Fine-tuning, models side by side (median over seeds)\n\n{side_by_side}"] if side_by_side else []
    page += [f"## Fine-tuning (over seeds)\n\n{ft_table}"] if ft_table else []
    page += [f"## {p.stem.replace('_', ' ')}\n\n![{p.stem}]({p.name})\n" for p in pngs]
    (out_dir / "report.md").write_text("\n".join(page), encoding="utf-8")
    warnings = [w for run in runs for w in run.warnings] + ft_warnings
    return Report(files + pngs, runs, table, ft_table, warnings, side_by_side)


# ----------------------------------------------------------------------------- CLI
