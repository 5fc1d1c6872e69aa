"""Reading prepared shards back: `PackedDataset` (memmap rows of one split) and `ShardLoader` (a stateful,
resumable, DDP-shardable batch iterator).

Order: epoch e visits the rows in `default_rng((seed, e)).permutation(N)` (or 0..N-1 with
`shuffle=False`). Step k of the epoch takes the global batch `order[k*G:(k+1)*G]` with
G = batch_size * world_size; rank r gets its slice `[r*batch_size:(r+1)*batch_size]`. So ranks are
disjoint, together they cover the global batch, and two ranks at step k see exactly the rows one
process sees at steps 2k and 2k+1 (same seed, same batch_size): DDP equals one process with
gradient accumulation. With `drop_last=True` (default) an epoch has N // G steps on every rank; with
False the last global batch is split the same way, so the last rank slices can be short or empty
(empty ones are not yielded).

Position: `state_dict()` is (epoch, step) plus the settings it depends on; the step counter moves when
a batch is handed out, so a state saved after consuming batch k resumes at batch k+1, and a resumed
loader yields exactly the batches an uninterrupted one would.

Batches: packed shards give the (B, T) array of token ids in the stored dtype (uint16/uint32; the MLM
collator converts); NSP shards give a list of B mappings with "input_ids" (T,), "token_type_ids" (T,)
and "next_sentence_label", the row form `MLMCollator` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bertforge.errors import BertforgeError, require

MANIFEST = "manifest.json"


def read_manifest(path: Path, keys: tuple[str, ...] = ("seq_len", "mode", "dtype", "tokenizer", "shards")) -> dict:
    """The parsed manifest.json of a prepare output; unreadable ones, or ones without `keys`, are one-line errors."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BertforgeError(f"'{path}' is not valid JSON ({e}): prepare the data again (--overwrite)") from None
    require(isinstance(m, dict) and all(k in m for k in keys),
            f"'{path}' lacks {', '.join(keys)}: it is not a `bertforge prepare` manifest; prepare the data again")
    return m


def open_shard(directory: Path, name: str, rows: int, width: int, dtype: np.dtype) -> np.memmap:
    """The (rows, width) memmap of shard `name` in `directory`, checked to lie there and to have its size."""
    file = directory / name
    require(Path(name).name == name, f"'{directory / MANIFEST}' names shard '{name}' outside its folder: "
                                     "prepare the data again (--overwrite)")
    size = rows * width * np.dtype(dtype).itemsize
    if not file.is_file() or file.stat().st_size != size:
        raise BertforgeError(f"shard '{file}' is missing or not {size} bytes: prepare the data again (--overwrite)")
    return np.memmap(file, dtype=dtype, mode="r", shape=(rows, width))


class PackedDataset:
    """The rows of one split of a `bertforge prepare` output, memory-mapped read-only."""

    def __init__(self, directory: str | os.PathLike, split: str = "train", *, fingerprint: str | None = None) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        require(path.is_file(), f"no {MANIFEST} in '{self.directory}': run `bertforge prepare` with --output there")
        self.manifest = m = read_manifest(path)
        require(m.get("complete", False), f"shards in '{self.directory}' are unfinished: re-run the same "
                                          "`bertforge prepare` command to resume it")
        if fingerprint is not None and m["tokenizer"]["fingerprint"] != fingerprint:
            raise BertforgeError(f"shards in '{self.directory}' were made with another tokenizer: prepare them "
                                 "again with this tokenizer or use the tokenizer they were made with")
        shards = [s for s in m["shards"] if s["split"] == split]
        require(bool(shards), f"split '{split}' of '{self.directory}' has no rows: use one of "
                              f"{sorted({s['split'] for s in m['shards']})} or prepare with a larger corpus / val_fraction")
        self.split, self.seq_len, self.mode = split, m["seq_len"], m["mode"]
        self.dtype = np.dtype(m["dtype"])
        self.pad_token_id = m["tokenizer"]["pad_token_id"]
        self._maps = [self._open(s["file"], s["rows"], self.seq_len, self.dtype) for s in shards]
        self._pairs = ([self._open(s["file"][:-4] + ".pairs.bin", s["rows"], 2, np.dtype(np.int32)) for s in shards]
                       if self.mode == "nsp" else None)
        self._starts = np.cumsum([0] + [s["rows"] for s in shards])  # (S+1,)

    def _open(self, name: str, rows: int, width: int, dtype: np.dtype) -> np.memmap:
        return open_shard(self.directory, name, rows, width, dtype)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int):
        """Row `index`: (T,) ids for packed shards, a mapping with token types and label for NSP."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} out of range for {n} rows")
        return self.batch(np.array([index % n]))[0]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """(n, T) rows at `indices`, in that order (one fancy-index per shard touched)."""
        return self._gather(self._maps, np.asarray(indices, dtype=np.int64), self.seq_len, self.dtype)

    def pairs(self, indices: np.ndarray) -> np.ndarray:
        """(n, 2) int32 (segment B start, is_next) of NSP rows."""
        require(self._pairs is not None, f"shards in '{self.directory}' are packed rows, not NSP pairs")
        return self._gather(self._pairs, np.asarray(indices, dtype=np.int64), 2, np.dtype(np.int32))

    def _gather(self, maps: list[np.memmap], idx: np.ndarray, width: int, dtype: np.dtype) -> np.ndarray:
        if len(maps) == 1:
            return np.asarray(maps[0][idx])
        shard = np.searchsorted(self._starts, idx, side="right") - 1  # (n,)
        out = np.empty((len(idx), width), dtype)
        for s in np.unique(shard):
            take = shard == s
            out[take] = maps[s][idx[take] - self._starts[s]]
        return out

    def batch(self, indices: np.ndarray):
        """Rows at `indices` as the collator takes them (module docstring)."""
        ids = self.rows(indices)  # (B, T)
        if self._pairs is None:
            return ids
        info = self.pairs(indices)  # (B, 2)
        positions = np.arange(self.seq_len)[None, :]  # (1, T)
        types = ((positions >= info[:, :1]) & (ids != self.pad_token_id)).astype(np.int64)  # (B, T)
        return [{"input_ids": ids[i], "token_type_ids": types[i], "next_sentence_label": int(info[i, 1])}
                for i in range(len(ids))]


class ShardLoader:
    """Deterministic shuffled batches of a `PackedDataset`, per rank, resumable mid-epoch."""

    def __init__(self, dataset: PackedDataset, batch_size: int, seed: int = 0, *, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = True) -> None:
        require(batch_size >= 1, f"batch_size={batch_size} is invalid: pass a positive batch size")
        require(world_size >= 1 and 0 <= rank < world_size,
                f"rank={rank} / world_size={world_size} is invalid: need 0 <= rank < world_size")
        global_batch = batch_size * world_size
        require(len(dataset) >= global_batch or not drop_last,
                f"split '{dataset.split}' has {len(dataset)} rows, fewer than one global batch of {global_batch}: "
                "lower the batch size or prepare more text")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.drop_last = rank, world_size, shuffle, drop_last
        self.epoch, self.step = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Global steps per epoch (every rank takes the same number of steps)."""
        g, n = self.batch_size * self.world_size, len(self.dataset)
        return n // g if self.drop_last else -(-n // g)

    def order(self, epoch: int) -> np.ndarray:
        """(N,) the row order of `epoch`."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            perm = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, perm)
        return self._order[1]

    def indices(self, epoch: int, step: int) -> np.ndarray:
        """Row indices of this rank's batch at (epoch, step)."""
        start = step * self.batch_size * self.world_size + self.rank * self.batch_size
        return self.order(epoch)[start:start + self.batch_size]

    def __iter__(self):
        """The rest of the current epoch; afterwards the position is the start of the next one."""
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        while self.step < len(self):
            idx = self.indices(self.epoch, self.step)
            self.step += 1
            if len(idx):
                yield self.dataset.batch(idx)
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "num_rows": len(self.dataset), "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position; the settings that define the order must match."""
        mine = self.state_dict()
        diff = [f"{k} {state[k]!r} -> {mine[k]!r}" for k in ("seed", "batch_size", "world_size", "num_rows",
                                                             "shuffle", "drop_last") if state.get(k) != mine[k]]
        if diff:
            raise BertforgeError(f"data position cannot resume with other loader settings ({'; '.join(diff)}): "
                                 "resume with the same data, batch size, world size and seed")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
