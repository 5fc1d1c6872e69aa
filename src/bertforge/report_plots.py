"""The plots of `bertforge report`: one PNG per metric and x-axis (step, wall time), one line per run.

matplotlib's Agg canvas is used directly (no pyplot state); matplotlib comes with the `plot` extra and
is imported only when a plot is drawn, so `--no-plots` works without it.
"""

from __future__ import annotations

import math
from pathlib import Path

from bertforge.errors import BertforgeError
from bertforge.report_runs import EVAL_NOT_PLOTTED, RunData, finite_or_none


def _figure_tools():
    """matplotlib's Figure and Agg canvas, imported on first use."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BertforgeError("bertforge report draws its plots with matplotlib, which is not installed: "
                             "pip install 'bertforge[plot]' (or pass --no-plots for the tables only)") from None
    return Figure, FigureCanvasAgg


def time_unit(runs: list[RunData]) -> tuple[str, float]:
    longest = max((finite_or_none(r.get("elapsed")) or 0.0 for run in runs for r in run.train + run.evals), default=0.0)
    return ("hours", 3600.0) if longest > 7200 else (("minutes", 60.0) if longest > 120 else ("seconds", 1.0))


def _series(records: list[dict], x_key: str, y_key: str, scale: float) -> tuple[list[float], list[float]]:
    points = [(finite_or_none(r.get(x_key)), finite_or_none(r.get(y_key))) for r in records]
    points = [(x / scale, y if math.isfinite(y) else math.nan) for x, y in points  # diverged: a gap
              if x is not None and y is not None]
    return [x for x, _ in points], [y for _, y in points]


def plot_metric(runs: list[RunData], source: str, key: str, x_key: str, path: Path, *,
                ylabel: str, xlabel: str, scale: float = 1.0) -> bool:
    """One PNG, one line per run; False (nothing written) when no run logged `key`."""
    Figure, FigureCanvasAgg = _figure_tools()
    fig = Figure(figsize=(8, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series = [(run.label, *_series(getattr(run, source), x_key, key, scale)) for run in runs]
    series = [(label, xs, ys) for label, xs, ys in series if xs]
    if not series:
        return False
    for label, xs, ys in series:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.4)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel} vs {xlabel.split(' ')[0]}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def plot_runs(runs: list[RunData], out: Path) -> list[Path]:
    """Training loss, learning rate and every logged eval metric, each vs step and vs time; the PNG paths."""
    unit, scale = time_unit(runs)
    eval_keys = sorted({k for run in runs for r in run.evals for k in r
                        if k.startswith("eval_") and k not in EVAL_NOT_PLOTTED and finite_or_none(r[k]) is not None},
                       key=lambda k: (k != "eval_loss", k != "eval_accuracy", k))
    plans = [("train", "loss", "train_loss", "training loss"), ("train", "lr", "lr", "learning rate")]
    plans += [("evals", key, key, key.replace("_", " ")) for key in eval_keys]
    written = []
    for source, key, stem, ylabel in plans:
        for x_key, x_name, xlabel, s in (("step", "step", "step", 1.0), ("elapsed", "time", f"time ({unit})", scale)):
            path = out / f"{stem}_vs_{x_name}.png"
            if plot_metric(runs, source, key, x_key, path, ylabel=ylabel, xlabel=xlabel, scale=s):
                written.append(path)
    return written


