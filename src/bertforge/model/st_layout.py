"""The sentence-transformers folder layout, read and written in one place.

A sentence-transformers model folder lists its pipeline in `modules.json`; bertforge understands the
BERT embedding pipeline `Transformer -> Pooling [-> Normalize]`:

    modules.json                 [{"idx", "name", "path", "type": "sentence_transformers.models.Pooling"}, ...]
    sentence_bert_config.json    {"max_seq_length", "do_lower_case"} (in the Transformer module's folder)
    1_Pooling/config.json        the classic flags (`pooling_mode_mean_tokens: true`, ...) or, from
                                 sentence-transformers 6, `pooling_mode: "mean"`
    2_Normalize/                 present when embeddings are L2-normalised

`read_st_layout` parses a folder (module paths must stay inside it); `load_model` uses it to find the
weights, `SentenceEncoder` to know how to pool. `write_st_layout` writes the classic layout, which every
sentence-transformers version since 2.0 loads. `read_model_json` is the one reader of a model folder's
JSON files (one error line naming the file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertforge.errors import BertforgeError

MODULES_FILE = "modules.json"
POOLING_MODES = ("cls", "mean", "max")
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}


@dataclass(frozen=True)
class StLayout:
    """What a sentence-transformers folder says about its pipeline."""

    root: Path
    model_dir: Path  # the Transformer module's folder (the BERT weights)
    modules: tuple[str, ...]  # module types as written in modules.json
    pooling: str | None  # cls / mean / max; None without a Pooling module or for a mode we lack
    pooling_config: dict | None
    normalize: bool
    max_seq_length: int | None

    @property
    def kinds(self) -> tuple[str, ...]:
        """Short module names: "...models.Transformer" (v2-v5) and "...transformer.Transformer" (v6) -> Transformer."""
        return tuple(t.rsplit(".", 1)[-1] for t in self.modules)

    def check_embedding_pipeline(self) -> None:
        """Raise unless the pipeline is Transformer -> Pooling [-> Normalize] with a pooling mode we have."""
        unknown = sorted(set(self.kinds) - {"Transformer", "Pooling", "Normalize"})
        if unknown:
            raise BertforgeError(f"'{self.root}' has sentence-transformers modules {unknown} beyond Transformer -> "
                                 f"Pooling -> Normalize: only that pipeline is supported")
        if "Pooling" not in self.kinds:
            raise BertforgeError(f"'{self.root}' has no Pooling module: pass a sentence-transformers embedding model")
        if self.pooling is None:
            raise BertforgeError(f"'{self.root}' uses a pooling mode other than {', '.join(POOLING_MODES)}: "
                                 f"re-save it with cls, mean or max pooling")


def read_model_json(path: Path) -> Any:
    """A model folder's JSON file, or one error line naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BertforgeError(f"'{path}' is unreadable ({e}): restore the file or re-save the model") from None


def is_st_folder(root: Path) -> bool:
    return (Path(root) / MODULES_FILE).is_file()


def _inside(root: Path, relative: Any, where: Path) -> Path:
    """`root / relative`, refusing a module path that leaves the folder (absolute, `..`, a link outside)."""
    if not isinstance(relative, str):
        raise BertforgeError(f"'{where}' has a module path {relative!r} that is not a string: restore the file")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BertforgeError(f"'{where}' points outside the model folder ('{relative}'): module paths must stay "
                             f"inside '{root}'")
    return path


def pooling_mode(cfg: dict) -> str | None:
    """cls / mean / max from a Pooling config (v6 `pooling_mode`, or the older flags); None when it asks
    for a mode we lack (mean_sqrt_len, weighted mean, last token) or several at once."""
    if "pooling_mode" in cfg:
        mode = cfg["pooling_mode"]
        return mode if isinstance(mode, str) and mode in POOLING_MODES else None
    on = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    return next((m for m, flag in _FLAGS.items() if on == [flag]), None)


def read_st_layout(root: Path) -> StLayout:
    """Parse `root/modules.json` and the Pooling / Transformer configs it points to."""
    root = Path(root)
    where = root / MODULES_FILE
    modules = read_model_json(where)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise BertforgeError(f"'{where}' is not a list of modules: restore it or re-save the model")
    types = tuple(str(m.get("type", "")) for m in modules)
    kinds = [t.rsplit(".", 1)[-1] for t in types]
    transformers_ = [m for m, k in zip(modules, kinds) if k == "Transformer"]
    if len(transformers_) != 1:
        raise BertforgeError(f"'{where}' lists {len(transformers_)} Transformer modules: a sentence-transformers "
                             f"BERT model has exactly one")
    model_dir = _inside(root, transformers_[0].get("path", ""), where)
    pooling = pooling_config = None
    pools = [m for m, k in zip(modules, kinds) if k == "Pooling"]
    if pools:
        cfg_file = _inside(root, pools[0].get("path", "1_Pooling"), where) / "config.json"
        if cfg_file.is_file():
            pooling_config = read_model_json(cfg_file)
            if not isinstance(pooling_config, dict):
                raise BertforgeError(f"'{cfg_file}' is not a JSON object: restore it or re-save the model")
            pooling = pooling_mode(pooling_config)
    max_len = None
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        f = model_dir / name
        if max_len is None and f.is_file():
            data = read_model_json(f)
            max_len = data.get(key) if isinstance(data, dict) else None
    return StLayout(root, model_dir, types, pooling, pooling_config, "Normalize" in kinds,
                    int(max_len) if isinstance(max_len, (int, float)) else None)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_st_layout(folder: Path, *, hidden_size: int, pooling: str, normalize: bool, max_seq_length: int) -> None:
    """modules.json, sentence_bert_config.json, 1_Pooling/ and 2_Normalize/ for an encoder written at the
    root of `folder` (the caller writes the transformers folder itself)."""
    modules = [(ST_TRANSFORMER, ""), (ST_POOLING, "1_Pooling")] + ([(ST_NORMALIZE, "2_Normalize")] if normalize else [])
    _write_json(folder / MODULES_FILE, [{"idx": i, "name": str(i), "path": p, "type": t}
                                        for i, (t, p) in enumerate(modules)])
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    (folder / "1_Pooling").mkdir()
    _write_json(folder / "1_Pooling" / "config.json",
                {"word_embedding_dimension": hidden_size,
                 **{flag: pooling == mode for mode, flag in _FLAGS.items()},
                 "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                 "pooling_mode_lasttoken": False, "include_prompt": True})
    if normalize:
        (folder / "2_Normalize").mkdir()
