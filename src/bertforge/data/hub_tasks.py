"""`hub:NAME[:CONFIG]` task data for online users: rows of SQuAD / SWAG / ARC / WinoGrande from the
`datasets` hub, written in the task's official file format so the task's own reader checks them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from bertforge.errors import BertforgeError, require


def _hub_rows(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise BertforgeError(f"hub dataset {name!r} needs the `datasets` package: pip install 'bertforge[hub]'") from None
    dataset, _, config = name.partition(":")
    hub_split = {"dev": "validation"}.get(split, split)
    return list(datasets.load_dataset(dataset, config or None, split=hub_split))


def hub_to_file(task: str, name: str, split: str, directory: Path, rows: list[dict] | None = None) -> Path:
    """Write hub rows (`hub:NAME[:CONFIG]`) of SQuAD / SWAG / ARC / WinoGrande in the task's official file
    format, so the official reader checks them. `rows` given: use them instead of downloading."""
    rows = _hub_rows(name, split) if rows is None else rows
    require(bool(rows), f"hub dataset {name!r} split {split!r} is empty: pick another split")
    need = {"squad": ("id", "context", "question", "answers"), "swag": ("sent1", "sent2", "ending0"),
            "arc_easy": ("question", "choices"), "arc_challenge": ("question", "choices"),
            "winogrande": ("sentence", "option1", "option2")}[task]
    missing = [k for k in need if k not in rows[0]]
    require(not missing, f"hub dataset {name!r} lacks column(s) {', '.join(missing)}: pass the {task} dataset")
    if task == "squad":
        data = [{"title": r.get("title", ""), "paragraphs": [{"context": r["context"], "qas": [{
            "id": r["id"], "question": r["question"], "answers": [
                {"text": t, "answer_start": int(s)} for t, s in zip(r["answers"]["text"],
                                                                    r["answers"]["answer_start"])]}]}]}
                for r in rows]
        path = directory / "squad.json"
        path.write_text(json.dumps({"version": "1.1", "data": data}), encoding="utf-8")
        return path
    if task == "swag":
        path = directory / "swag.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: ("" if v == -1 and k == "label" else v) for k, v in r.items()} for r in rows)
        return path
    if task.startswith("arc"):
        rows = [{"id": r.get("id"), "answerKey": r.get("answerKey", ""), "question": {
            "stem": r["question"], "choices": [{"text": t, "label": c} for t, c in zip(r["choices"]["text"],
                                                                                      r["choices"]["label"])]}}
            for r in rows]
    path = directory / f"{task}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
