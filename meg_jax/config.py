"""Config plumbing shared by every component: JSON round-trip, CLI overrides, diffs.

Every config in meg-jax is a frozen ``dataclasses.dataclass`` whose fields are plain
values (int, float, str, bool, None), tuples of them, or nested config dataclasses.
Component configs live next to their component (``meg_jax.backbone.config``,
``meg_jax.env.config``, ...); this module only knows how to move any of them to and
from JSON, apply ``a.b=value`` overrides from a command line, and name the fields in
which two configs differ (used to refuse a checkpoint made with another config).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

C = TypeVar("C")

__all__ = [
    "to_dict",
    "from_dict",
    "to_json",
    "from_json",
    "save_json",
    "load_json",
    "apply_overrides",
    "diff",
]


def to_dict(config: Any) -> dict[str, Any]:
    """Converts a (nested) config dataclass to a JSON-ready dict (tuples become lists)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a config dataclass instance, got {type(config).__name__}")
    return _encode(config)


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar
        return value.item()
    return value


def from_dict(cls: type[C], data: Mapping[str, Any], *, strict: bool = True) -> C:
    """Builds config ``cls`` from a dict written by :func:`to_dict`.

    Args:
      cls: the config dataclass type.
      data: field name -> value; nested configs as nested dicts.
      strict: if True, a key that is not a field of ``cls`` raises ``ValueError`` naming it.
    """
    return _decode(cls, data, path=cls.__name__, strict=strict)


def _decode(tp: Any, value: Any, *, path: str, strict: bool) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _decode(arg, value, path=path, strict=strict)
            except (TypeError, ValueError) as e:  # try the next member of the union
                errors.append(str(e))
        raise ValueError(f"{path}: {value!r} fits none of {tp}: {errors}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - names)
        if unknown and strict:
            raise ValueError(
                f"{path}: unknown field(s) {unknown}; {tp.__name__} has {sorted(names)}"
            )
        kwargs = {
            k: _decode(hints[k], v, path=f"{path}.{k}", strict=strict)
            for k, v in value.items()
            if k in names
        }
        return tp(**kwargs)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, path=f"{path}[{i}]", strict=strict) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ValueError(f"{path}: expected {len(args)} items, got {len(value)}")
        if not args:
            return tuple(value)
        return tuple(_decode(a, v, path=f"{path}[{i}]", strict=strict) for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Mapping) or tp is dict:
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected a string, got {value!r}")
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    return value


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


def from_json(cls: type[C], text: str) -> C:
    return from_dict(cls, json.loads(text))


def save_json(config: Any, path: str | os.PathLike) -> None:
    """Writes ``config`` as JSON, atomically (write then rename).

    The temporary name carries the process id: two jobs started at once in one work
    directory (e.g. two distillation stages side by side) must not rename each other's file.
    """
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(to_json(config) + "\n")
    os.replace(tmp, path)


def load_json(cls: type[C], path: str | os.PathLike) -> C:
    with open(path) as f:
        return from_json(cls, f.read())


def apply_overrides(config: C, overrides: Sequence[str]) -> C:
    """Returns ``config`` with ``dotted.path=value`` overrides applied.

    Values are parsed as JSON when possible (``3``, ``0.5``, ``true``, ``[1,2]``, ``null``)
    and otherwise taken as strings. An unknown path raises ``ValueError`` listing the valid
    fields at that level.
    """
    data = to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like field.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:depth]) or type(config).__name__
                valid = sorted(node) if isinstance(node, dict) else []
                raise ValueError(f"unknown config field {key!r}: {where} has fields {valid}")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return from_dict(type(config), data)


def diff(a: Any, b: Any) -> list[str]:
    """Dotted paths of the fields in which configs ``a`` and ``b`` differ, with both values."""
    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k, "<missing>"), y.get(k, "<missing>"), f"{path}.{k}" if path else k)
        elif x != y:
            out.append(f"{path}: {x!r} != {y!r}")

    walk(_encode(a) if not isinstance(a, dict) else a, _encode(b) if not isinstance(b, dict) else b, "")
    return out
