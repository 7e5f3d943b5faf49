"""Tools: typed Python functions the policy can call, with a JSON schema built from the signature.

>>> @tool
... def add(a: Annotated[int, "first addend"], b: Annotated[int, "second addend"] = 0) -> int:
...     '''Add two integers.'''
...     return a + b
>>> add.parameters["required"]
['a']

:func:`handle_tool_call` runs a :class:`ToolCall` against a list of tools and never raises for
the model's mistakes: an unknown tool, arguments that do not match the schema, or an exception
inside the tool all become a :class:`ToolResult` with ``error=True`` whose text says what went
wrong (the argument, what was expected, what was given), so it can be shown to the model.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, Union

JsonSchema = dict[str, Any]

_JSON_TYPES: dict[type, str] = {int: "integer", float: "number", str: "string", bool: "boolean"}


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for: a tool name and its (JSON-decoded) arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolResult:
    """What a call returned, as text for the model; ``error`` marks a failed call."""

    content: str
    error: bool = False


class Tool(Protocol):
    """Anything with a name, a description, a JSON schema of its arguments and an async ``run``."""

    name: str
    description: str
    parameters: JsonSchema

    async def run(self, arguments: dict[str, Any]) -> ToolResult: ...


@dataclass(frozen=True)
class FunctionTool:
    """A Python function (sync or async) as a :class:`Tool`; made by :func:`tool`."""

    fn: Callable[..., Any]
    name: str
    description: str
    parameters: JsonSchema

    def spec(self) -> dict[str, Any]:
        """``{"name", "description", "parameters"}``, as listed to the model."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    async def run(self, arguments: dict[str, Any]) -> ToolResult:
        """Call the function with ``arguments`` (assumed valid, see :func:`validate_arguments`)."""
        value = self.fn(**arguments)
        if inspect.isawaitable(value):
            value = await value
        if isinstance(value, ToolResult):
            return value
        return ToolResult(value if isinstance(value, str) else _to_text(value))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The decorated function stays callable as before."""
        return self.fn(*args, **kwargs)


@typing.overload
def tool(fn: Callable[..., Any], /) -> FunctionTool: ...
@typing.overload
def tool(*, name: str | None = None, description: str | None = None) -> Callable[[Callable[..., Any]], FunctionTool]: ...


def tool(
    fn: Callable[..., Any] | None = None, /, *, name: str | None = None, description: str | None = None
) -> FunctionTool | Callable[[Callable[..., Any]], FunctionTool]:
    """Turn a typed function into a :class:`FunctionTool` (``@tool`` or ``@tool(name=...)``).

    The name defaults to the function's, the description to its docstring. Each parameter
    needs a type hint among ``int``, ``float``, ``str``, ``bool``, ``list`` / ``list[T]`` and
    ``Literal[...]`` (optionally ``X | None``); ``Annotated[T, "text"]`` adds a description.
    Parameters without a default are required. Unsupported hints raise ``TypeError`` here,
    at decoration time.
    """

    def wrap(f: Callable[..., Any]) -> FunctionTool:
        doc = description if description is not None else inspect.cleandoc(f.__doc__ or "")
        return FunctionTool(f, name or f.__name__, doc, function_schema(f))

    return wrap(fn) if fn is not None else wrap


def function_schema(fn: Callable[..., Any]) -> JsonSchema:
    """The JSON schema (an ``object``) of ``fn``'s keyword arguments."""
    hints = typing.get_type_hints(fn, include_extras=True)
    properties: dict[str, JsonSchema] = {}
    required = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"{fn.__name__}: parameter {param.name!r} must be passable by keyword")
        if param.name not in hints:
            raise TypeError(f"{fn.__name__}: parameter {param.name!r} needs a type hint")
        schema = type_schema(hints[param.name], f"{fn.__name__}.{param.name}")
        if param.default is param.empty:
            required.append(param.name)
        elif _jsonable(param.default):
            schema["default"] = param.default
        properties[param.name] = schema
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def type_schema(hint: Any, where: str) -> JsonSchema:
    """The JSON schema of one type hint (``where`` names it in errors)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        schema = type_schema(args[0], where)
        notes = [a for a in args[1:] if isinstance(a, str)]
        if notes:
            schema["description"] = " ".join(notes)
        return schema
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if hint is list or origin is list:
        return {"type": "array", "items": type_schema(args[0], where)} if args else {"type": "array"}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = type_schema(next(a for a in args if a is not type(None)), where)
        return {"anyOf": [inner, {"type": "null"}]}
    raise TypeError(f"{where}: unsupported type hint {hint!r} (use int, float, str, bool, list, Literal)")


def validate_arguments(schema: JsonSchema, arguments: Any) -> str | None:
    """None if ``arguments`` match the object ``schema``, else a message naming the argument,
    what was expected and what was given."""
    if not isinstance(arguments, dict):
        return f"arguments: expected an object, got {_describe(arguments)}"
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in arguments:
            return f"argument {name!r}: required, missing (expected {_expected(properties[name])})"
    for name, value in arguments.items():
        if name not in properties:
            return f"argument {name!r}: unexpected; expected one of {sorted(properties)}"
        problem = _check_value(properties[name], value, f"argument {name!r}")
        if problem:
            return problem
    return None


async def handle_tool_call(tools: Sequence[Tool] | Mapping[str, Tool], call: ToolCall) -> ToolResult:
    """Run ``call`` on the matching tool. Never raises for the call's content: an unknown tool,
    invalid arguments or an exception inside the tool give an error :class:`ToolResult`."""
    by_name = dict(tools) if isinstance(tools, Mapping) else {t.name: t for t in tools}
    found = by_name.get(call.name)
    if found is None:
        return ToolResult(f"unknown tool {call.name!r}; available: {', '.join(sorted(by_name)) or 'none'}", error=True)
    problem = validate_arguments(found.parameters, call.arguments)
    if problem:
        return ToolResult(f"{call.name}: {problem}", error=True)
    try:
        return await found.run(dict(call.arguments))
    except Exception as e:  # the tool's failure is the model's feedback, not the rollout's
        return ToolResult(f"{call.name}: {type(e).__name__}: {e}", error=True)


def _check_value(schema: JsonSchema, value: Any, where: str) -> str | None:
    if "anyOf" in schema:
        if any(_check_value(s, value, where) is None for s in schema["anyOf"]):
            return None
        return f"{where}: expected {_expected(schema)}, got {_describe(value)}"
    if "enum" in schema:
        return None if value in schema["enum"] else f"{where}: expected one of {schema['enum']}, got {_describe(value)}"
    kind = schema.get("type")
    ok = {
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "array": isinstance(value, list),
        "null": value is None,
    }.get(kind, True)
    if not ok:
        return f"{where}: expected {_expected(schema)}, got {_describe(value)}"
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            problem = _check_value(schema["items"], item, f"{where}[{i}]")
            if problem:
                return problem
    return None


def _expected(schema: JsonSchema) -> str:
    if "anyOf" in schema:
        return " or ".join(_expected(s) for s in schema["anyOf"])
    if "enum" in schema:
        return f"one of {schema['enum']}"
    if schema.get("type") == "array" and "items" in schema:
        return f"array of {_expected(schema['items'])}"
    return str(schema.get("type", "any value"))


def _describe(value: Any) -> str:
    """``string "3"``, ``integer 3``, ... for error messages."""
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    kind = "null" if value is None else kinds.get(type(value), type(value).__name__)
    text = _to_text(value)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


def _to_text(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
