"""Typed, literal config IO: YAML files and ``key=value`` overrides into the schema dataclasses.

Values are taken exactly as written. A YAML scalar or an override value is text until the schema says
what it is: ``NCCL_IB_TIMEOUT: 022`` in an env mapping stays the string ``022``, ``on`` stays ``on``,
``${HOME}`` stays ``${HOME}`` (nothing is interpolated or resolved on the machine that runs ``launch``);
only a field typed int, float or bool parses its text (``8``, ``1e-5``, ``true``), and the bare word
``null`` (or ``~``, or nothing) sets an optional field to None.

Why not OmegaConf's structured configs, which the project used before: they resolve ``${...}`` on the
launch host (and refuse an unknown one), YAML-type override values (``env.X=010`` became ``10``) and
cost most of a dry run's time. The schema here is the dataclasses themselves; this module is the ~100
lines that walk them.

String fields hold one line (no newline or control character: they end up on one-line places such as
#SBATCH lines, YAML scalars and error messages), except fields whose metadata says ``multiline``: the
``env`` mappings, whose values are shell-quoted and reach the job byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar, Union

import yaml

from launcher.errors import UserError

T = TypeVar("T")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_INT = re.compile(r"^[+-]?[0-9]+$")
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")
_NULL = ("null", "~", "")


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader that resolves no implicit types but null: plain scalars stay the text written."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag == "tag:yaml.org,2002:null"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, tuple[Any, bool, bool]]:
    """name -> (type, has a default, multiline) of a dataclass, types resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
                     bool(f.metadata.get("multiline"))) for f in dataclasses.fields(cls) if f.init}


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return repr(value)


def _optional(tp: Any) -> Any:
    """X for Optional[X], else None."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return None


def convert(tp: Any, value: Any, key: str, multiline: bool = False) -> Any:
    """``value`` (text, or a Python value from a recipe file) as schema type ``tp``; UserError names ``key``."""
    inner = _optional(tp)
    if inner is not None:
        return None if value is None else convert(inner, value, key, multiline)
    if value is None:
        raise UserError("missing value (null is not allowed here)", key)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f: getattr(value, f) for f in _fields(type(value))}
        if not isinstance(value, dict):
            raise UserError(f"expected a mapping of {', '.join(_fields(tp))}; got {_kind(value)}", key)
        return build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"expected a list, e.g. [a, b]; got {_kind(value)}", key)
        (item,) = typing.get_args(tp)
        return [convert(item, v, f"{key}[{i}]", multiline) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"expected a mapping of names to values; got {_kind(value)}", key)
        _, item = typing.get_args(tp)
        return {_text(k, f"{key}.{k}"): convert(item, v, f"{key}.{k}", multiline) for k, v in value.items()}
    if isinstance(value, (dict, list, tuple)):
        raise UserError(f"expected a single value; got {_kind(value)}", key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise UserError(f"expected true or false; got {value!r}", key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT.match(value.strip()):
            return int(value)
        if isinstance(value, str):  # 1e3, 2.0: a whole number written as a float
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"expected an integer; got {value!r}", key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            try:
                number = float(value) if isinstance(value, str) and value.strip().lower() not in ("nan", "inf", "+inf", "-inf", "infinity") else None
            except ValueError:
                number = None
        if number is None or number != number or number in (float("inf"), float("-inf")):
            raise UserError(f"expected a finite number (e.g. 0.5, 1e-5); got {value!r}", key)
        return number
    if tp is str:
        if isinstance(value, bool):
            raise UserError(f"expected text; got {value!r} (quote it in a recipe file: {str(value).lower()!r})", key)
        text = _text(value, key)
        if not multiline and _CONTROL.search(text):
            raise UserError(f"contains a newline or control character: {text!r}; this field holds one line "
                            "(only env values may hold any character)", key)
        return text
    raise TypeError(f"schema type {tp!r} of {key} is not supported")  # a bug in the schema, not user input


def _text(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"expected text; got {_kind(value)}", key)


def build(cls: type[T], data: dict, where: str = "") -> T:
    """A ``cls`` instance from a mapping, every field converted; unknown and missing keys are errors."""
    fields = _fields(cls)
    prefix = f"{where}." if where and not where.endswith((": ", " ")) else where
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            parent = where.rstrip(": .") if where and not where.endswith((": ", " ")) else None
            raise UserError("unknown key" + (f" in '{parent.rsplit(': ', 1)[-1]}'" if parent else "")
                            + f"; valid keys: {', '.join(fields)}", f"{prefix}{name}")
        tp, _, multiline = fields[name]
        kwargs[name] = convert(tp, value, f"{prefix}{name}", multiline)
    for name, (_, has_default, _) in fields.items():
        if name not in kwargs and not has_default:
            raise UserError("missing value", f"{prefix}{name}")
    return cls(**kwargs)


def typed(obj: T, where: str) -> T:
    """Type-check a dataclass instance built in Python (dataclasses do not): '8' becomes 8, 'eight' is an error."""
    return build(type(obj), {f: getattr(obj, f) for f in _fields(type(obj))}, where)


def load_yaml_into(cls: type[T], path: Path) -> T:
    """Read a YAML file into dataclass ``cls``, type-checked and literal (see the module docstring)."""
    try:
        data = parse_yaml(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"not valid YAML{line}: {getattr(exc, 'problem', None) or exc}", str(path)) from None
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", str(path)) from None
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", str(path)) from None
    if not isinstance(data, dict):
        raise UserError("must be a YAML mapping of keys to values", str(path))
    return build(cls, data, f"{path}: ")


def _target(cls: type, key: str, where: str) -> tuple[list[str], Any, bool]:
    """(path, type, multiline) of a dotted override key; a key into a mapping field (env.X) ends there."""
    parts, tp, multiline = key.split("."), cls, False
    for i, part in enumerate(parts):
        inner = _optional(tp) or tp
        if typing.get_origin(inner) is dict:
            if i != len(parts) - 1:
                raise UserError(f"'{'.'.join(parts[:i])}' maps names to values: one level only", f"{where}{key}")
            return parts, typing.get_args(inner)[1], multiline
        if not dataclasses.is_dataclass(inner):
            raise UserError(f"'{'.'.join(parts[:i])}' is a value, not a section", f"{where}{key}")
        fields = _fields(inner)
        if part not in fields:
            section = ".".join(parts[:i])
            raise UserError("unknown key" + (f" in '{section}'" if section else "") + f"; valid keys: {', '.join(fields)}",
                            f"{where}{key}")
        tp, _, multiline = fields[part]
    return parts, tp, multiline


def _override_value(tp: Any, text: str, key: str) -> Any:
    """An override's text as the field's type: literal for text; YAML flow syntax only for lists."""
    inner = _optional(tp)
    if inner is not None and text == "null":
        return None
    tp = inner or tp
    if dataclasses.is_dataclass(tp):
        raise UserError(f"is a section; set its keys, e.g. {key.split(' ')[-1]}.{next(iter(_fields(tp)))}=..."
                        + (" (or null)" if inner else ""), key)
    if typing.get_origin(tp) is list:
        try:
            value = parse_yaml(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, list):
            raise UserError(f"expected a list like [a,b]; got {text!r}", key)
        return value
    if typing.get_origin(tp) is dict:
        raise UserError("maps names to values; set one at a time, e.g. env.NAME=value", key)
    return text


def apply_dotlist(obj: T, overrides: list[str], where: str = "override ") -> T:
    """Apply ``key=value`` overrides to a dataclass instance (literal values); returns a new instance."""
    data = dataclasses.asdict(obj)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not _KEY.match(key):
            raise UserError(f"{item!r} is not of the form key=value (e.g. train.max_steps=100)", "override")
        parts, tp, multiline = _target(type(obj), key, where)
        value = convert(tp, _override_value(tp, text, f"{where}{key}"), f"{where}{key}", multiline)
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:  # an optional section that is None (model.rope_scaling): start from defaults
                node[part] = {}
            node = node[part]
        node[parts[-1]] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return build(type(obj), data, where)


_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's: 5x faster, the same text


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=120, allow_unicode=True)


def to_yaml(obj: Any) -> str:
    """YAML of a dataclass config; :func:`load_yaml_into` reads it back to an equal object."""
    return dump_yaml(dataclasses.asdict(obj))


def json_line(line: str, lineno: int, file: object) -> Any:
    """One line of a JSON Lines file, parsed; bad JSON is a UserError naming the file and the line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"line {lineno}: invalid JSON: {e.msg} (column {e.colno})", str(file)) from None


def jsonl_records(f: Iterable[str], file: object) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of an open JSON Lines file (see :func:`json_line`)."""
    for lineno, line in enumerate(f, 1):
        if line.strip():
            yield lineno, json_line(line, lineno, file)
