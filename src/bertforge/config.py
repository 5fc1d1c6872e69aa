"""Typed run configs: nested stdlib dataclasses, an optional YAML/TOML file, dotted CLI overrides.

    cfg = load_run_config(PretrainRunConfig, file="configs/tiny-smoke.yaml", overrides=["optim.lr=1e-3"])

Rules: unknown keys are errors (with the known ones listed), values are checked against the field's
type, and `config_to_dict` gives the resolved config that is saved next to every checkpoint so resume
and serving need no flags. A `model` section may name a preset (`model.preset=mini`) and override
any `BertConfig` field on top of it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from bertforge.errors import BertforgeError

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|d)?\s*$")
_UNIT_SECONDS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


def parse_duration(text: str | float | int | None) -> float | None:
    """'90', '90s', '15m', '1.5h' -> seconds; None stays None."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    m = _DURATION.match(str(text))
    if not m:
        raise BertforgeError(f"duration '{text}' not understood: write seconds or a number with s, m or h (e.g. 45m)")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a parsed value against a field type (Optional, Union, list, tuple, scalars)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except BertforgeError as e:
                errors.append(str(e))
        raise BertforgeError(errors[0] if errors else f"{where}: bad value {value!r}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise BertforgeError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise BertforgeError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any or tp is dict or origin is dict:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise BertforgeError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise BertforgeError(f"{where}: expected a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, bool):
            raise BertforgeError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(e\d+)?", value.replace("_", "")):
            return int(float(value.replace("_", "")))
        raise BertforgeError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise BertforgeError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build a (nested) dataclass from a dict; unknown keys are errors naming the known ones."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise BertforgeError(f"unknown key(s) {', '.join(where + '.' + k for k in unknown)}: "
                             f"known keys are {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


RECIPES = Path(__file__).parent / "configs"  # the recipes shipped inside the package


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or the name of a packaged recipe (`cpu-budget`, `cpu-budget.yaml`)."""
    p = Path(path)
    if p.is_file():
        return p
    packaged = RECIPES / (p.name if p.suffix else f"{p.name}.yaml")
    if p.parent == Path(".") and packaged.is_file():
        return packaged
    raise BertforgeError(f"config file '{path}' does not exist: pass a .yaml, .toml or .json file, or a "
                         f"packaged recipe name ({', '.join(recipe_names())})")


def read_config_file(path: str | Path) -> dict:
    """A YAML (.yaml/.yml), TOML (.toml) or JSON file, or a packaged recipe name -> nested dict."""
    p = resolve_config_path(path)
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise BertforgeError(f"config file '{path}': unknown extension, use .yaml, .toml or .json")
    except BertforgeError:
        raise
    except Exception as e:  # parser errors carry line numbers; keep them on one line
        raise BertforgeError(f"config file '{path}' does not parse: {_parse_problem(e)}: fix that line") from None
    if not isinstance(data, dict):
        raise BertforgeError(f"config file '{path}' must hold a mapping of sections, not {type(data).__name__}")
    return data


def _parse_problem(e: Exception) -> str:
    """A parser error on one line; YAML's first line lacks the position, its `problem_mark` has it."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f"{getattr(e, 'problem', None) or 'syntax error'} at line {mark.line + 1}, column {mark.column + 1}"
    return str(e).splitlines()[0]


def parse_override(item: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-3' -> (['optim', 'lr'], 0.001); values parse as YAML scalars/lists."""
    if "=" not in item:
        raise BertforgeError(f"override '{item}' has no '=': write section.key=value, e.g. optim.lr=1e-3")
    key, raw = item.split("=", 1)
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def merge_into(base: dict, path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BertforgeError(f"override '{'.'.join(path)}': '{part}' is a value, not a section")
    node[path[-1]] = value


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_run_config(cls: type[T], *, file: str | Path | None = None, overrides: list[str] | None = None,
                    base: dict | None = None, flags: dict[str, Any] | None = None) -> T:
    """The one way every command builds its run config, validated into `cls`:

        defaults <- base (a preset or protocol, nested) <- file <- flags <- dotted overrides

    `flags` maps dotted keys to values taken as they are (a command's options; None = not given);
    `overrides` are "key=value" strings whose values are parsed as YAML scalars. Starting from the
    class's own defaults keeps a section's other fields when only one is given (`optim.lr=1e-3` leaves
    the run's warmup as it was)."""
    try:
        defaults = config_to_dict(cls())
    except TypeError:  # a class with required fields: no defaults to start from
        defaults = {}
    data: dict = deep_merge(defaults, base or {})
    if file is not None:
        data = deep_merge(data, read_config_file(file))
    for key, value in (flags or {}).items():
        if value is not None:
            merge_into(data, key.split("."), value)
    for item in overrides or []:
        path, value = parse_override(item)
        merge_into(data, path, value)
    rename_deprecated(data, getattr(cls, "RENAMED", {}))
    return from_dict(cls, data)


def rename_deprecated(data: dict, renamed: dict[str, str]) -> None:
    """Move keys a run config used to have to their new place, with a one-line note each: {"epochs":
    "train.epochs"}; a scalar given where a section now stands (`model: DIR` for `model.path`) moves too."""
    for old, new in renamed.items():
        *parents, leaf = old.split(".")
        node = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node or isinstance(node[leaf], dict):
            continue
        value = node.pop(leaf)
        merge_into(data, new.split("."), value)
        print(f"note: '{old}' is deprecated and will be removed in the next release: use '{new}' (read as "
              f"{new}={value!r})", file=sys.stderr)
