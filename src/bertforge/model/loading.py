"""Save and load models: transformers folders (ours and anyone's), sentence-transformers folders.

`save_model` writes a folder transformers opens directly (see `export`): BERT architectures as a plain
Hugging Face BERT folder, the others (the budget presets: pre-LN, no biases, GeGLU, ...) with our
weight names and a generated `modeling_bertforge.py` for `trust_remote_code=True`. Either way
config.json carries a `bertforge` block (version, head, run metadata) and the tokenizer files say
`model_max_length` = the model's position count. `export_hf` writes the plain BERT folder only.

`load_model` reads those, HF BERT folders, sentence-transformers folders, and the flat folders older
bertforge versions wrote (`model_type: "bertforge"`, `head`, `num_labels`, `id2label`,
`bertforge_version`, `meta`, our weight names).

Writes are atomic: everything goes into a temporary folder beside the target, every file is fsynced,
then the folder is renamed into place, so a killed save leaves the previous model (or nothing) at
the target, never half a model. A kill can leave a `.<name>.tmp-*` folder beside it, safe to delete.

Loading is strict. Every encoder weight must be present with its exact shape, and the saved head's
weights must all be there when that head is asked for. Asking for a different head than the saved
one (or a different `num_labels`) keeps the encoder, drops the saved head's weights (listed in
`meta["discarded"]`) and initialises the new head's parameters (listed in `.initialized`). The
pooler counts as head-side here: only NSP and the classifiers train it, and checkpoints of
pooler-less heads lack it. In folders bertforge wrote, a key the saved head does not own is an error; an HF
checkpoint may also hold weights of a sibling BERT head (bert-base-uncased is a BertForMaskedLM with
pooler and NSP weights), which are dropped and listed like HF's "weights not used" (any key outside
the BERT key table is still an error).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import nn

from bertforge.atomic import atomic_folder
from bertforge.errors import BertforgeError
from bertforge.model import export, hf_compat
from bertforge.model.bert import BertConfig
from bertforge.model.heads import HEADS, build_model
from bertforge.model.st_layout import is_st_folder, read_model_json, read_st_layout

if TYPE_CHECKING:
    from bertforge.wordpiece import WordPieceTokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HF_BIN_NAME = "pytorch_model.bin"
_OWN_KEYS = ("model_type", "head", "num_labels", "id2label", "bertforge_version", "meta")
_SEQ = "sequence_classification"


@dataclass
class LoadedModel:
    model: nn.Module  # the head (or BertModel for head="base"), eval mode, on CPU
    config: BertConfig
    head: str  # key of heads.HEADS
    tokenizer: WordPieceTokenizer | None
    source: str  # "bertforge" | "hf" | "sentence-transformers"
    meta: dict = field(default_factory=dict)  # num_labels, id2label, task, pooling config, discarded, ...
    initialized: list[str] = field(default_factory=list)  # head params freshly initialised


# ----------------------------------------------------------------------------- saving

def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def head_name(model: nn.Module) -> str:
    """The HEADS key of a model's class."""
    for name, cls in HEADS.items():
        if type(model) is cls:
            return name
    raise BertforgeError(f"cannot save a {type(model).__name__}: pass a BertModel or a head from "
                         f"bertforge.model.heads ({', '.join(c.__name__ for c in HEADS.values())})")


def _num_labels(model: nn.Module, head: str) -> int | None:
    return model.num_labels if head == _SEQ else None


def _id2label(id2label: Mapping | None, num_labels: int | None, where: str) -> dict[int, str] | None:
    if id2label is None:
        return None
    out = {int(k): str(v) for k, v in id2label.items()}
    if num_labels is None or sorted(out) != list(range(num_labels)):
        raise BertforgeError(f"{where}: id2label {out} does not name labels 0..{(num_labels or 0) - 1} "
                             f"of this model: pass one name per label id")
    return out


def _check_tokenizer(tokenizer: Any, config: BertConfig, where: str) -> None:
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise BertforgeError(f"{where}: tokenizer vocabulary of {tokenizer.vocab_size} tokens is larger than the "
                             f"model's vocab_size {config.vocab_size}: use the tokenizer the model was built for")


def save_model(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None,
               meta: dict | None = None) -> None:
    """Write `model` (a BertModel or a head) as a transformers folder, atomically (see `export`).

    BERT architectures get a plain Hugging Face BERT folder; the others (pre-LN, no bias, GeGLU, ...)
    our weight names plus `modeling_bertforge.py` for `trust_remote_code=True`. `meta` (and the
    labels in it) lands in config.json's `bertforge` block; `load_model` reads it all back.
    """
    model = unwrap(model)
    head, target = head_name(model), Path(directory)
    meta = dict(meta or {})
    num_labels = _num_labels(model, head)
    meta.pop("discarded", None)
    saved_labels = meta.pop("num_labels", None)
    if saved_labels is not None and saved_labels != num_labels:
        raise BertforgeError(f"meta num_labels {saved_labels} != the model's {num_labels}: drop it from meta")
    id2label = _id2label(meta.pop("id2label", None), num_labels, f"save_model('{target}')")
    _check_tokenizer(tokenizer, model.config, f"save_model('{target}')")
    try:
        json.dumps(meta)
    except TypeError as e:
        raise BertforgeError(f"save_model('{target}'): meta is not JSON-serialisable ({e}): "
                             f"keep meta to strings, numbers, lists and dicts") from None
    write_atomic(target, lambda tmp: export.write_transformers_folder(
        model, head, tmp, tokenizer=tokenizer, num_labels=num_labels, id2label=id2label, meta=meta))


def export_hf(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None,
              id2label: Mapping[int, str] | None = None, remote_code: bool = False) -> None:
    """Write `model` as a plain Hugging Face BERT directory, without bertforge's metadata block.

    Other architectures raise, unless `remote_code`: then they get our modeling file (see `export`).
    """
    model = unwrap(model)
    head, config, target = head_name(model), model.config, Path(directory)
    if not remote_code:
        hf_compat.require_hf_compatible(config)
    num_labels = _num_labels(model, head)
    id2label = _id2label(id2label, num_labels, f"export_hf('{target}')")
    _check_tokenizer(tokenizer, config, f"export_hf('{target}')")
    write_atomic(target, lambda tmp: export.write_transformers_folder(
        model, head, tmp, tokenizer=tokenizer, num_labels=num_labels, id2label=id2label))


def write_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)` and put the folder in `target`'s place atomically (replacing an older model there)."""
    if target.exists() and not target.is_dir():
        raise BertforgeError(f"model path '{target}' is a file: pass a directory path")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
        raise BertforgeError(f"model path '{target}' is a non-empty folder without config.json: "
                             f"pass a new or empty folder, or an existing model folder to replace")
    atomic_folder(target, write)


# ----------------------------------------------------------------------------- loading

def load_model(path: str | os.PathLike, head: str | None = None, *, num_labels: int | None = None,
               config_overrides: Mapping[str, Any] | None = None) -> LoadedModel:
    """Load our directory, an HF BERT directory or a sentence-transformers directory (see module doc).
    `config_overrides`: settings that leave the weights alone (`BertConfig.with_runtime`), e.g. dropout."""
    root = Path(path)
    if not root.exists():
        raise BertforgeError(f"model path '{root}' does not exist: pass a directory written by save_model, "
                             f"an HF BERT directory or a sentence-transformers directory")
    if not root.is_dir():
        raise BertforgeError(f"model path '{root}' is a file: pass the model's directory")
    model_dir, st_meta = _locate(root)
    raw = _read_config(model_dir)
    if raw.get("model_type") == export.REMOTE_MODEL_TYPE:
        read = _our_config if "architectures" not in raw and "auto_map" not in raw else _remote_config
        config, saved_head, meta = read(raw, model_dir / CONFIG_NAME)
        sd = hf_compat.add_prefix(_read_weights(model_dir, allow_bin=False))
        source = "bertforge"
    else:
        config, saved_head, meta = _hf_config(raw, model_dir / CONFIG_NAME)
        sd = hf_compat.convert_from_hf(_read_weights(model_dir, allow_bin=True), f"weights in '{model_dir}'")
        source = "bertforge" if isinstance(raw.get("bertforge"), dict) else "hf"
    if st_meta is not None:
        meta.update(st_meta)
    if config_overrides:
        config = config.with_runtime(**config_overrides)
    head = head or saved_head
    model, initialized, discarded, num_labels = _fit(sd, config, saved_head, meta.get("num_labels"), head,
                                                     num_labels, str(model_dir), strict_extra=source == "bertforge")
    if head != saved_head or num_labels != meta.get("num_labels"):
        meta["id2label"] = None
    meta.update(num_labels=num_labels, discarded=discarded)
    tokenizer = _load_tokenizer(model_dir, config)
    source = "sentence-transformers" if st_meta is not None else source
    return LoadedModel(model.eval(), config, head, tokenizer, source, meta, initialized)


def _locate(root: Path) -> tuple[Path, dict | None]:
    """The folder holding the BERT weights; for sentence-transformers also its pooling/normalize meta."""
    if not is_st_folder(root):
        return root, None
    layout = read_st_layout(root)
    meta: dict = {"modules": list(layout.modules), "normalize": layout.normalize}
    if layout.max_seq_length is not None:
        meta["max_seq_length"] = layout.max_seq_length
    if layout.pooling_config is not None:
        meta.update(pooling_config=layout.pooling_config, pooling=layout.pooling)
    return layout.model_dir, meta


def _read_config(model_dir: Path) -> dict:
    cfg = model_dir / CONFIG_NAME
    if not cfg.is_file():
        raise BertforgeError(f"'{model_dir}' is not a model directory (no {CONFIG_NAME}): pass a directory "
                             f"written by save_model or export_hf, or an HF / sentence-transformers model")
    raw = read_model_json(cfg)
    if not isinstance(raw, dict):
        raise BertforgeError(f"'{cfg}' is unreadable (not a JSON object): restore the file or re-save the model")
    return raw


def _our_config(raw: dict, where: Path) -> tuple[BertConfig, str, dict]:
    try:
        config = BertConfig.from_dict({k: v for k, v in raw.items() if k not in _OWN_KEYS})
    except (BertforgeError, TypeError) as e:
        raise BertforgeError(f"'{where}': {e}") from None
    head = raw.get("head")
    if head not in HEADS:
        raise BertforgeError(f"'{where}': head '{head}' is unknown: use one of {', '.join(HEADS)}")
    meta = dict(raw.get("meta") or {})
    meta["num_labels"] = raw.get("num_labels")
    meta["id2label"] = _id2label(raw.get("id2label"), raw.get("num_labels"), f"'{where}'")
    return config, head, meta


def _remote_config(raw: dict, where: Path) -> tuple[BertConfig, str, dict]:
    """A remote-code folder (`save_model` of a non-BERT architecture, or its transformers re-save)."""
    try:
        config, head, block = export.read_remote_config(raw)
    except (BertforgeError, TypeError) as e:
        raise BertforgeError(f"'{where}': {e}") from None
    return config, head, _labels_and_meta(raw, head, block)


def _hf_config(raw: dict, where: Path) -> tuple[BertConfig, str, dict]:
    try:
        config, head = hf_compat.config_from_hf(raw), hf_compat.head_from_hf(raw)
    except (BertforgeError, TypeError) as e:
        raise BertforgeError(f"'{where}': {e}") from None
    return config, head, _labels_and_meta(raw, head, raw.get("bertforge"))


def _labels_and_meta(raw: dict, head: str, block: Any) -> dict:
    """num_labels / id2label from a transformers config, plus the run metadata `save_model` stored."""
    num_labels, id2label = hf_compat.labels_from_hf(raw)
    if head != _SEQ:
        num_labels, id2label = None, None
    meta = dict(block.get("meta") or {}) if isinstance(block, dict) else {}
    return {**meta, "num_labels": num_labels, "id2label": id2label}


def _read_weights(model_dir: Path, allow_bin: bool) -> dict[str, torch.Tensor]:
    files = [model_dir / WEIGHTS_NAME]
    index = model_dir / f"{WEIGHTS_NAME}.index.json"
    if allow_bin:
        files.append(model_dir / HF_BIN_NAME)
    if not files[0].is_file() and index.is_file():
        shards = sorted(set(read_model_json(index).get("weight_map", {}).values()))
        return {k: v for s in shards for k, v in _read_weight_file(model_dir / s).items()}
    for f in files:
        if f.is_file():
            return _read_weight_file(f)
    raise BertforgeError(f"no weights in '{model_dir}': expected {' or '.join(f.name for f in files)}; "
                         f"re-save the model or point at the folder that holds them")


def _read_weight_file(f: Path) -> dict[str, torch.Tensor]:
    try:
        if f.suffix == ".safetensors":
            return load_file(f, device="cpu")
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors / pickle errors name no file: say which one is broken
        raise BertforgeError(f"weights file '{f}' is unreadable ({type(e).__name__}: {e}): "
                             f"restore it or re-save the model") from None


def _fit(sd: dict[str, torch.Tensor], config: BertConfig, saved_head: str, saved_labels: int | None,
         head: str, num_labels: int | None, where: str, strict_extra: bool
         ) -> tuple[nn.Module, list[str], list[str], int | None]:
    """Build `head` and load `sd` (canonical keys) into it under the rules of the module doc.

    `strict_extra` (our format): a key the saved head does not own is an error. HF checkpoints often
    carry weights of a sibling head (bert-base-uncased: BertForMaskedLM with pooler and NSP weights);
    those are BERT keys the table knows, so they are dropped and listed in `discarded`, as HF does.
    """
    if head not in HEADS:
        raise BertforgeError(f"unknown model head '{head}': use one of {', '.join(HEADS)}")
    if num_labels is not None and (head != _SEQ or num_labels < 1):
        raise BertforgeError(f"num_labels={num_labels} does not apply to head '{head}': pass a positive "
                             f"num_labels with head '{_SEQ}' only")
    if head == _SEQ:
        num_labels = num_labels or (saved_labels if saved_head == _SEQ else None) or 2
    same = head == saved_head and num_labels == saved_labels
    owned = hf_compat.add_prefix(hf_compat.expected_shapes(config, saved_head, saved_labels))
    model = build_model(head, config, num_labels)
    target = hf_compat.add_prefix(model.state_dict())

    def required(k: str) -> bool:  # must come from the checkpoint
        if k.startswith("bert.pooler."):  # a bare encoder may be saved without it: initialised, reported
            return same and k in owned and head != "base"
        return k.startswith("bert.") or (same and k in owned)

    fits = {k for k in sd if k in target and sd[k].shape == target[k].shape}
    unexpected = [k for k in sd if k not in owned or (same and k not in target)] if strict_extra else []
    missing = [k for k in target if required(k) and k not in sd]
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(target[k].shape)}" for k in target
              if required(k) and k in sd and k not in fits]
    if unexpected or missing or shapes:
        problems = [f"{label} [{hf_compat.format_keys(keys)}]" for label, keys in
                    (("unexpected keys", unexpected), ("missing keys", missing)) if keys]
        problems += [f"shape mismatches [{'; '.join(shapes[:6])}]"] if shapes else []
        raise BertforgeError(f"checkpoint in '{where}' does not fit head '{head}': {'; '.join(problems)}: "
                             f"check the checkpoint is complete and matches its config.json")
    loaded = {k: sd[k] for k in fits}
    result = model.load_state_dict(hf_compat.strip_prefix(loaded) if head == "base" else loaded, strict=False)
    initialized = sorted(result.missing_keys)
    discarded = sorted(set(sd) - fits)
    return model, initialized, discarded, num_labels


def _load_tokenizer(model_dir: Path, config: BertConfig) -> WordPieceTokenizer | None:
    if not ((model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.txt").is_file()):
        return None
    from bertforge.wordpiece import WordPieceTokenizer

    tokenizer = WordPieceTokenizer.from_pretrained(model_dir)
    _check_tokenizer(tokenizer, config, f"'{model_dir}'")
    return tokenizer
