"""OmegaConf glue: typed YAML loading, dotlist overrides and YAML dumps, with one-line errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.errors import UserError, check_no_control_chars

T = TypeVar("T")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def _explain(exc: OmegaConfBaseException) -> tuple[str | None, str]:
    """(key, reason) from an OmegaConf error, without its multi-line context dump."""
    key = getattr(exc, "full_key", None) or None
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if type(exc).__name__ == "ConfigKeyError":
        parent = key.rsplit(".", 1)[0] if key and "." in key else None
        first = "unknown key" + (f" in '{parent}'" if parent else "")
    return key, first


def _valid_keys(schema: Any, key: str | None) -> str:
    """For an unknown key, the keys that do exist at that level."""
    node = schema
    for part in (key or "").split(".")[:-1]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    if isinstance(node, DictConfig) and not node._is_missing():
        try:
            return "; valid keys: " + ", ".join(str(k) for k in node.keys())
        except OmegaConfBaseException:
            return ""
    return ""


def merge(schema: DictConfig, update: Any, where: str) -> DictConfig:
    """Merge ``update`` into the structured ``schema``; errors name ``where`` and the key."""
    try:
        return OmegaConf.merge(schema, update)
    except OmegaConfBaseException as exc:
        key, reason = _explain(exc)
        hint = _valid_keys(schema, key) if reason.startswith("unknown key") else ""
        raise UserError(reason + hint, f"{where}{key}" if key else where.rstrip(": ")) from None


def to_object(cfg: DictConfig, where: str) -> Any:
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key, reason = _explain(exc)
        if "Missing mandatory value" in reason:
            reason = "missing value"
        raise UserError(reason, f"{where}{key}" if key else where) from None


def typed(obj: T, where: str) -> T:
    """Type-check a dataclass instance built in Python (dataclasses do not): '8' becomes 8, 'eight' is an error."""
    try:
        cfg = OmegaConf.structured(obj)
    except OmegaConfBaseException as exc:
        key, reason = _explain(exc)
        raise UserError(reason, f"{where}{key}" if key else where.rstrip(": ")) from None
    return to_object(cfg, where)


def load_yaml_into(cls: type[T], path: Path) -> T:
    """Read a YAML file into dataclass ``cls``, type-checked (unknown keys and wrong types are errors)."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"not valid YAML{line}: {getattr(exc, 'problem', exc)}", str(path)) from None
    if not isinstance(data, dict):
        raise UserError("must be a YAML mapping of keys to values", str(path))
    check_no_control_chars(data, str(path))
    cfg = merge(OmegaConf.structured(cls), data, f"{path}: ")
    return to_object(cfg, f"{path}: ")


def apply_dotlist(obj: T, overrides: list[str], where: str = "override ") -> T:
    """Apply ``key=value`` overrides to a dataclass instance; returns a new instance."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not _KEY.match(key):
            raise UserError(f"{item!r} is not of the form key=value (e.g. train.max_steps=100)", "override")
        check_no_control_chars(value, f"override {key}")
    schema = OmegaConf.structured(obj)
    try:
        update = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as exc:
        raise UserError(str(exc).splitlines()[0], "override") from None
    except yaml.YAMLError as exc:
        raise UserError(f"value is not valid YAML: {getattr(exc, 'problem', exc)}", "override") from None
    return to_object(merge(schema, update, where), where)


def to_yaml(obj: Any) -> str:
    """YAML of a dataclass config (what OmegaConf.to_yaml gives, without building a structured config: 10x faster)."""
    return yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False, default_flow_style=None, width=120)


def read_jsonl(file: Path) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSON Lines file. ValueError names the line of bad JSON."""
    import json

    rows = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    return rows
