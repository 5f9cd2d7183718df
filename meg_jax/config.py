"""Config plumbing shared by every component: JSON round-trip, CLI overrides, diffs.

Every config in meg-jax is a frozen ``dataclasses.dataclass`` whose fields are plain
values (int, float, str, bool, None), tuples of them, or nested config dataclasses.
Component configs live next to their component (``meg_jax.backbone.config``,
``meg_jax.env.config``, ...); this module only knows how to move any of them to and
from JSON, parse a job's command line into one (:func:`parse_cli`, the one syntax of every
job: ``--a.b value``, typed, with ``--help`` listing every field), apply ``a.b=value``
overrides in code, and name the fields in which two configs differ (used to refuse a
checkpoint made with another config).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from typing import Annotated, Any, Mapping, Sequence, TypeVar

C = TypeVar("C")
J = TypeVar("J")

__all__ = [
    "to_dict",
    "from_dict",
    "to_json",
    "from_json",
    "save_json",
    "load_json",
    "apply_overrides",
    "diff",
    "inline",
    "parse_cli",
    "flag_value",
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


def read_json_object(path: str | os.PathLike, what: str | None = None,
                     error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in ``path``, or an ``error`` naming the file and what is wrong with it.

    Args:
      path: a JSON file (a config, ``model_index.json``, ``backbone.json``...).
      what: what the file is, for the message (e.g. "the backbone's settings").
      error: the exception class raised for a truncated/corrupt file or a non-object.

    Raises:
      FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    label = f" ({what})" if what else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}{label}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise error(f"{path}{label} is not valid JSON (truncated or corrupt?): not UTF-8 text ({e.reason})") from e
    except json.JSONDecodeError as e:
        raise error(
            f"{path}{label} is not valid JSON (truncated or corrupt?): {e.msg} at line {e.lineno} "
            f"column {e.colno} of {len(text)} characters"
        ) from e
    if not isinstance(data, dict):
        raise error(f"{path}{label} holds a JSON {type(data).__name__}, not an object")
    return data


def load_json(cls: type[C], path: str | os.PathLike) -> C:
    """Reads a config written by :func:`save_json`.

    Raises:
      ValueError: the file is not valid JSON (truncated, corrupt) or does not describe a
        ``cls``; the message names the file and what is wrong.
    """
    data = read_json_object(path)
    try:
        return from_dict(cls, data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.fspath(path)} does not hold a valid {cls.__name__}: {e}") from e


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


# ------------------------------------------------------------------------------ command line
# Every job parses its command line with tyro over a frozen "job arguments" dataclass whose
# config field is inlined (no prefix): ``--workdir runs/x --cvpo.batch_size 64 --no_progress``.
# One syntax everywhere: ``--field value`` (``--field=value`` too), dotted paths into nested
# configs, tuples as several values (``--cvpo.actor_hidden 64 64``), booleans as
# ``--flag`` / ``--no_flag``, ``None`` for an optional value. Field names are shown as in
# ``config.json`` (underscores); the hyphenated spelling is accepted too.


def inline(tp: Any) -> Any:
    """``tp`` annotated so that its fields appear without a prefix on the job's command line.

    Use as the type of the config field of a job-arguments dataclass::

        RunFlags = config_lib.inline(RunConfig)

        @dataclasses.dataclass(frozen=True)
        class Args:
            workdir: str  # run directory
            run: RunFlags = RunConfig()
    """
    import tyro

    return Annotated[tp, tyro.conf.arg(name=""), _INLINE]


_INLINE = "meg_jax.config.inline"  # marks the config field of a job-arguments dataclass


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value given to ``flag`` (``--flag value`` or ``--flag=value``; the last wins), or None.

    Jobs read a flag that picks the defaults (a preset name, a base config file) with this
    before the full parse, so that ``--help`` shows the defaults of that preset.
    """
    names = {flag, flag.replace("_", "-"), flag.replace("-", "_")}
    value = None
    for i, item in enumerate(argv):
        if item in names and i + 1 < len(argv):
            value = argv[i + 1]
        elif "=" in item and item.split("=", 1)[0] in names:
            value = item.split("=", 1)[1]
    return value


def _optional_sections(config: Any, prefix: str = "") -> list[tuple[str, type]]:
    """Dotted paths (and types) of every ``SomeConfig | None`` field below ``config``."""
    out: list[tuple[str, type]] = []
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1 and dataclasses.is_dataclass(members[0]) and type(None) in typing.get_args(tp):
                out.append((path, members[0]))
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.extend(_optional_sections(value, path + "."))
    return out


def _replace_path(config: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: _replace_path(getattr(config, head), rest, value)})


def _get_path(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


_NONE_WORDS = ("None", "none", "null")


def _switch_sections(config: C, argv: list[str]) -> tuple[C, list[str]]:
    """Applies the optional-section words of ``argv`` to ``config``; returns the rest of ``argv``.

    tyro would turn each ``SomeConfig | None`` field into a pair of positional subcommands;
    instead ``--section None`` switches a section off and any ``--section.field`` flag switches
    a section that is off on (at its class defaults), so every option keeps one syntax.
    """
    norm = lambda s: "--" + s[2:].replace("-", "_") if s.startswith("--") else s  # noqa: E731
    rest: list[str] = []
    i = 0
    sections = dict(_optional_sections(config))
    while i < len(argv):
        item = argv[i]
        key, eq, inline_value = norm(item).partition("=")
        if item.startswith("--") and key[2:] in sections:
            value = inline_value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value not in _NONE_WORDS:
                raise ValueError(
                    f"{key[2:]}: an optional section takes only None (to switch it off), got {value!r}; "
                    f"set its fields as --{key[2:]}.FIELD VALUE"
                )
            config = _replace_path(config, key[2:], None)
            i += 1 if eq else 2
            continue
        rest.append(item)
        i += 1
    for path, cls in sections.items():
        wanted = any(norm(a).split("=", 1)[0].startswith(f"--{path}.") for a in rest)
        if wanted and _get_path(config, path) is None:
            config = _replace_path(config, path, cls())
    return config, rest


def parse_cli(job_type: type[J], argv: Sequence[str], *, prog: str, description: str | None = None,
              config: Any = None) -> J:
    """Parses a job's command line into ``job_type`` (a frozen dataclass of the job's flags).

    Args:
      job_type: dataclass whose fields are the job's flags, each with a ``# comment`` that
        becomes its help text; at most one field typed ``inline(SomeConfig)`` carries the config.
      argv: the command line after the program name.
      prog: program name shown in usage lines.
      description: text above the options in ``--help``.
      config: defaults of the inlined config (a preset, or a config read from a file);
        None: the field's own default.

    Returns:
      The parsed ``job_type`` instance (its config field holds the resolved config).

    Raises:
      SystemExit: ``--help`` (code 0), or an unknown flag, a malformed value or a config the
        values make invalid (code 2; the message names the field).
    """
    import tyro

    argv = list(argv)
    hints = typing.get_type_hints(job_type, include_extras=True)
    inline_fields = [f for f in dataclasses.fields(job_type)
                     if typing.get_origin(hints[f.name]) is Annotated and _INLINE in typing.get_args(hints[f.name])[1:]]
    try:
        default = None
        if inline_fields:
            (field,) = inline_fields
            if config is None:
                config = field.default
            config, argv = _switch_sections(config, argv)
            sections = [p for p, _ in _optional_sections(config)]
            if sections:
                description = (description or "") + (
                    "\n\nOptional sections (" + ", ".join(sections) + "): `--SECTION None` switches one off; "
                    "setting any `--SECTION.FIELD` switches one that is off on."
                )
            values = {}
            for f in dataclasses.fields(job_type):
                if f.default is not dataclasses.MISSING:
                    values[f.name] = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    values[f.name] = f.default_factory()
                else:
                    values[f.name] = tyro.MISSING
            values[field.name] = config
            default = job_type(**values)
        return tyro.cli(job_type, args=argv, prog=prog, description=description, default=default,
                        use_underscores=True, config=(tyro.conf.AvoidSubcommands,))
    except (TypeError, ValueError) as e:  # a config's own checks (__post_init__, presets)
        sys.stderr.write(f"{prog}: error: {e}\n")
        raise SystemExit(2) from e
