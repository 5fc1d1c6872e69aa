"""Reading run directories for `bertforge report`: metrics lines (a truncated last line is skipped with a
warning; lines a resumed run rewrote supersede the killed run's), config, summary and fine-tuning metrics,
into one `RunData` per run. The tables (`report.py`) and the plots (`report_plots.py`) both read these.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertforge.errors import BertforgeError

RUN_HINT = "pass a folder written by `bertforge pretrain` or `bertforge finetune`"
# evaluation keys that are bookkeeping or redundant with another curve, not plotted
EVAL_NOT_PLOTTED = {"eval_masked_tokens", "eval_perplexity", "eval_runtime", "eval_samples", "eval_examples",
                    "eval_rows", "eval_mask_rate"}

@dataclass
class RunData:
    """Everything read from one run directory."""

    path: Path
    name: str
    config: dict = field(default_factory=dict)
    train: list[dict] = field(default_factory=list)  # lines with "loss"
    evals: list[dict] = field(default_factory=list)  # lines with eval_* keys
    summary: dict | None = None
    finetune: dict | None = None  # metrics.json of a fine-tuning run
    warnings: list[str] = field(default_factory=list)

    @property
    def optimizer(self) -> str | None:
        optim = self.config.get("optim")
        return optim.get("optimizer") if isinstance(optim, dict) else None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.optimizer})" if self.optimizer and self.optimizer not in self.name else self.name


def read_metrics_lines(path: Path) -> tuple[list[dict], list[str]]:
    """Parse metrics.jsonl; malformed lines are skipped and named in the returned warnings."""
    records, warnings = [], []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            where = "the truncated last line" if i == last else f"malformed line {i + 1}"
            warnings.append(f"{path}: skipped {where} ({line[:40]!r}...); the run was probably killed while writing")
            continue
        records.append(record)
    return records, warnings


def _is_eval(record: dict) -> bool:
    return "loss" not in record and any(k.startswith("eval_") for k in record)


def drop_superseded(records: list[dict]) -> tuple[list[dict], int]:
    """Undo a resume in the log: the Trainer appends, so a resumed run logs again from just after its
    checkpoint. A line whose step goes back (below the largest step so far, or not past the last line of
    its kind) starts a resumed segment, and every earlier line at or after that step is dropped."""
    kept: list[dict] = []
    dropped = 0
    last = {True: -math.inf, False: -math.inf}  # last step per kind (eval / training)
    for record in records:
        step, kind = record["step"], _is_eval(record)
        if kept and (step < max(r["step"] for r in kept) or step <= last[kind]):
            survivors = [r for r in kept if r["step"] < step]
            dropped += len(kept) - len(survivors)
            kept = survivors
            last = {k: max((r["step"] for r in kept if _is_eval(r) == k), default=-math.inf) for k in last}
        kept.append(record)
        last[kind] = step
    return kept, dropped


def _read_json(path: Path, warnings: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        warnings.append(f"{path}: ignored, it does not parse ({type(e).__name__})")
        return None


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Read one run directory; raises BertforgeError when `path` is not one."""
    p = Path(path)
    if not p.exists():
        raise BertforgeError(f"run directory '{path}' does not exist: {RUN_HINT}")
    if not p.is_dir():
        raise BertforgeError(f"'{path}' is a file, not a run directory: {RUN_HINT}")
    names = ("metrics.jsonl", "summary.json", "metrics.json")
    if not any((p / n).is_file() for n in names):
        raise BertforgeError(f"'{path}' is not a run directory (it has no {', '.join(names)}): {RUN_HINT}")
    run = RunData(path=p, name=name or p.resolve().name)
    config = _read_json(p / "config.json", run.warnings)
    run.config = config if isinstance(config, dict) else {}
    if not (p / "config.json").is_file() and (p / "metrics.jsonl").is_file():
        run.warnings.append(f"{p}: no config.json, so optimizer, lr and preset are unknown")
    if (p / "metrics.jsonl").is_file():
        records, warnings = read_metrics_lines(p / "metrics.jsonl")
        run.warnings += warnings
        records, dropped = drop_superseded(records)
        run.train = [r for r in records if "loss" in r]
        run.evals = [r for r in records if _is_eval(r)]
        if dropped:
            run.warnings.append(f"{p / 'metrics.jsonl'}: {dropped} lines logged after the checkpoint a resumed run "
                                "started from were superseded by the resumed run's lines")
    summary = _read_json(p / "summary.json", run.warnings)
    run.summary = summary if isinstance(summary, dict) else None
    finetune = _read_json(p / "metrics.json", run.warnings)
    if isinstance(finetune, dict) and "task" in finetune:
        run.finetune = finetune
    elif finetune is not None:
        run.warnings.append(f"{p / 'metrics.json'}: ignored, it has no \"task\" field")
    if not (run.train or run.evals or run.summary or run.finetune):
        run.warnings.append(f"{p}: no metrics logged yet")
    return run


def load_runs(paths: list[str | Path]) -> list[RunData]:
    """Load several runs; folders with the same name are told apart by their parent folder."""
    if not paths:
        raise BertforgeError(f"no run directory given: {RUN_HINT}")
    resolved = [Path(p).resolve() for p in paths]
    names = [r.name for r in resolved]
    return [load_run(p, name=(f"{r.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name))
            for p, r in zip(paths, resolved)]


def finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


