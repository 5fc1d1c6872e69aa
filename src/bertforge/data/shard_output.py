"""The output side of `bertforge prepare`: the shard writer and the output folder's manifest.

`ShardWriter` keeps one preallocated `shard_size`-row buffer per split and turns each full buffer into
`<split>_NNNNN.bin` (+ `.pairs.bin` for NSP), each written atomically (`bertforge.atomic.atomic_replace`:
a temp file beside it, fsynced, renamed).
`open_output` decides what a (re-)run continues from: the folder's manifest when its format, tokenizer
fingerprint, settings and listed shards match, a fresh one otherwise (or an error naming the mismatch
and the fix). The file layout and the resume protocol are described in `bertforge.data.shards`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bertforge.atomic import atomic_replace, atomic_write_text
from bertforge.data.packing import SPLITS
from bertforge.errors import BertforgeError

MANIFEST = "manifest.json"
FORMAT = "bertforge-shards/1"


def write_array(path: Path, rows: np.ndarray) -> None:
    """Raw C-order bytes of `rows`, written atomically (temp file, fsync, rename)."""
    atomic_replace(path, lambda tmp: np.ascontiguousarray(rows).tofile(tmp))


def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


class ShardWriter:
    """One preallocated `shard_size`-row buffer per split; a full buffer becomes `<split>_NNNNN.bin`
    (+ `.pairs.bin` for NSP). Memory: at most shard_size rows per split, however large the corpus."""

    def __init__(self, out: Path, manifest: dict, shard_size: int, pad_id: int) -> None:
        self.out, self.shards, self.shard_size, self.pad_id = out, manifest["shards"], shard_size, pad_id
        self.nsp = manifest["mode"] == "nsp"
        self.rows = {s: np.empty((shard_size, manifest["seq_len"]), manifest["dtype"]) for s in SPLITS}
        self.info = {s: np.zeros((shard_size, 2), np.int32) for s in SPLITS}
        self.count = {s: 0 for s in SPLITS}
        self.written = 0

    def add(self, split: str, rows: np.ndarray, info: np.ndarray | None = None) -> None:
        done = 0
        while done < len(rows):
            have = self.count[split]
            take = min(self.shard_size - have, len(rows) - done)
            self.rows[split][have:have + take] = rows[done:done + take]
            if info is not None:
                self.info[split][have:have + take] = info[done:done + take]
            self.count[split] += take
            done += take
            if self.count[split] == self.shard_size:
                self._flush(split)

    def _flush(self, split: str) -> None:
        n, rows, info = self.count[split], self.rows[split], self.info[split]
        name = f"{split}_{sum(s['split'] == split for s in self.shards):05d}"
        entry = {"file": f"{name}.bin", "split": split, "rows": n, "pad_tokens": int((rows[:n] == self.pad_id).sum())}
        if self.nsp:
            write_array(self.out / f"{name}.pairs.bin", info[:n])
            entry["is_next"] = int(info[:n, 1].sum())
        write_array(self.out / entry["file"], rows[:n])
        self.shards.append(entry)
        self.count[split] = 0
        self.written += 1

    def finish(self) -> None:
        for split in SPLITS:
            if self.count[split]:
                self._flush(split)

    def state(self) -> dict[str, np.ndarray]:
        out = {f"rows_{s}": self.rows[s][: self.count[s]] for s in SPLITS}
        out.update({f"info_{s}": self.info[s][: self.count[s]] for s in SPLITS})
        return out

    def load(self, state: dict[str, np.ndarray]) -> None:
        for s in SPLITS:
            self.count[s] = 0
            self.add(s, state[f"rows_{s}"], state[f"info_{s}"])


# ----------------------------------------------------------------------------- output folder


def source_bytes(source: str) -> int | None:
    """Size of a local source (a folder: all its files), so a resume notices a changed corpus."""
    if os.path.isfile(source):
        return os.path.getsize(source)
    if os.path.isdir(source):
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(source) for f in files)
    return None  # hub:NAME (or a missing path, which the corpus reader reports)


def clear_output(out: Path) -> None:
    """Remove what `prepare` writes (and nothing else) from `out`."""
    for pattern in (MANIFEST, "resume_*.npz", "*.tmp", "train_*.bin", "val_*.bin"):
        for path in out.glob(pattern):
            path.unlink()


def open_output(out: Path, fresh: dict, overwrite: bool) -> dict:
    """The manifest to continue from: the existing one when it matches, else a new one."""
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise BertforgeError(f"output '{out}' is a file: pass a folder for --output")
    if overwrite:
        clear_output(out)
    elif path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BertforgeError(f"output '{out}' has an unreadable {MANIFEST}: use a new --output or --overwrite") from None
        check_compatible(out, old, fresh)
        return old
    elif any(out.glob("train_*.bin")):
        raise BertforgeError(f"output '{out}' holds shard files but no {MANIFEST}: use a new --output or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, fresh)
    return fresh


def check_compatible(out: Path, old: dict, fresh: dict) -> None:
    if old.get("format") != FORMAT:
        raise BertforgeError(f"output '{out}' holds a {MANIFEST} of another format ({old.get('format')!r}): "
                             "use a new --output or --overwrite")
    have, want = old["tokenizer"]["fingerprint"], fresh["tokenizer"]["fingerprint"]
    if have != want:
        raise BertforgeError(f"output '{out}' holds shards made with another tokenizer (fingerprint {have[:12]} "
                             f"vs {want[:12]}): use a new --output or --overwrite")
    diff = [f"{k} {old['settings'].get(k)!r} -> {v!r}" for k, v in fresh["settings"].items()
            if old["settings"].get(k) != v]
    if diff:
        raise BertforgeError(f"output '{out}' holds shards made with other settings ({'; '.join(diff)}): "
                             "use a new --output or --overwrite")
    itemsize = np.dtype(old["dtype"]).itemsize
    for shard in old["shards"]:
        file = out / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["rows"] * old["seq_len"] * itemsize:
            raise BertforgeError(f"shard '{file}' listed in the manifest is missing or has the wrong size: "
                                 "use --overwrite to prepare again")
