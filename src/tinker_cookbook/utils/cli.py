"""Command-line configs: ``python -m tinker_cookbook.recipes.NAME key=value ...`` into a dataclass.

Each recipe keeps a flat ``CLIConfig`` dataclass. :func:`parse_cli` turns ``key=value``
arguments into an instance, converting each value by the field's annotation (``int``,
``float``, ``bool``, ``str``, ``Literal[...]`` and ``X | None``, where ``None`` is spelled
``None``), and rejects unknown keys, naming the valid ones. ``--help`` lists the fields.
Field docs come from ``field(metadata={"help": ...})``.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, Union

from tinker_cookbook.exceptions import ConfigurationError

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_cli(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Build ``cls`` (a dataclass) from ``key=value`` arguments (default: ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(usage(cls))
        raise SystemExit(0)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise ConfigurationError(f"argument {arg!r}: expected key=value")
        if key not in fields:
            raise ConfigurationError(f"{key}: not a field of {cls.__name__}; valid fields: {', '.join(fields)}")
        values[key] = convert(key, raw, hints[key])
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigurationError(f"{', '.join(missing)}: required, pass {missing[0]}=...")
    return cls(**values)


def convert(key: str, raw: str, annotation: Any) -> Any:
    """Convert the string ``raw`` to ``annotation``; raise ``ConfigurationError`` naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if type(None) in options and raw == "None":
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(key, raw, option)
            except ConfigurationError as e:
                errors.append(str(e))
        raise ConfigurationError(errors[0] if len(errors) == 1 else f"{key}: cannot parse {raw!r} as {annotation}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        for choice in choices:
            if str(choice) == raw:
                return choice
        raise ConfigurationError(f"{key}: expected one of {list(choices)}, got {raw!r}")
    if annotation is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigurationError(f"{key}: expected true or false, got {raw!r}")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            raise ConfigurationError(f"{key}: expected {'an int' if annotation is int else 'a float'}, got {raw!r}") from None
    if annotation is str:
        return raw
    raise ConfigurationError(f"{key}: fields of type {annotation} cannot be set from the command line")


def usage(cls: type) -> str:
    """One line per field: name, type, default and help."""
    hints = typing.get_type_hints(cls)
    lines = [f"{cls.__name__} fields (pass as key=value):"]
    for f in dataclasses.fields(cls):
        default = "required" if f.default is dataclasses.MISSING else f"default {f.default!r}"
        help_text = f.metadata.get("help", "")
        lines.append(f"  {f.name}: {_type_name(hints[f.name])} ({default}) {help_text}".rstrip())
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
