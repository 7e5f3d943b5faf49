"""The text format of tool use (Hermes / Qwen2.5 style), on top of plain chat messages.

* The system prompt lists the tools as JSON inside ``<tools></tools>`` (:func:`tools_system_prompt`).
* The model calls a tool by writing, anywhere in its reply (several calls allowed)::

      <tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7"}}</tool_call>

  :func:`parse_tool_calls` finds them; a reply without ``<tool_call>`` is a final answer.
* Each result goes back in a **user** message of ``<tool_response>...</tool_response>``
  blocks (:func:`tool_response_message`), because our renderers have no ``tool`` role.
  Qwen2.5's own template does the same: it renders ``tool`` messages as a user turn holding
  ``<tool_response>`` blocks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tinker_cookbook.renderers import Message
from tinker_cookbook.tool_use.tools import Tool, ToolCall, ToolResult

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCallParseError:
    """A ``<tool_call>`` block that is not a valid call; ``message`` is shown to the model."""

    message: str
    text: str


def tools_system_prompt(tools: Sequence[Tool], preamble: str = "") -> str:
    """A system prompt that lists ``tools`` with their schemas and explains the call format."""
    specs = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}) for t in tools
    )
    return (
        (preamble.rstrip() + "\n\n" if preamble else "")
        + "You can call these tools:\n<tools>\n"
        + specs
        + "\n</tools>\n\nTo call a tool, write a JSON object with its name and arguments inside tags:\n"
        + CALL_OPEN
        + '{"name": <tool name>, "arguments": <arguments object>}'
        + CALL_CLOSE
        + "\nEach result comes back inside <tool_response></tool_response>. "
        + "When you know the answer, reply without a tool call."
    )


def format_tool_call(call: ToolCall) -> str:
    """The text the model writes for ``call`` (for scripted or supervised examples)."""
    return CALL_OPEN + json.dumps({"name": call.name, "arguments": call.arguments}) + CALL_CLOSE


def has_tool_call(text: str) -> bool:
    return CALL_OPEN in text


def parse_tool_calls(text: str) -> list[ToolCall | ToolCallParseError]:
    """Every ``<tool_call>`` block of ``text``, in order, as a call or a parse error.

    A block must hold a JSON object with a string ``name`` and an object ``arguments``
    (absent means ``{}``; a JSON string holding an object is accepted, as OpenAI-style
    models write it). A block without its closing tag is an error.
    """
    out: list[ToolCall | ToolCallParseError] = []
    for match in _CALL.finditer(text):
        body = match.group(1)
        if not match.group(0).endswith(CALL_CLOSE):
            out.append(ToolCallParseError(f"{CALL_OPEN} without a closing {CALL_CLOSE}", body))
            continue
        out.append(_parse_call(body.strip()))
    return out


def _parse_call(body: str) -> ToolCall | ToolCallParseError:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCallParseError(f"tool call is not valid JSON: {e.msg} at character {e.pos}", body)
    if not isinstance(data, dict):
        return ToolCallParseError(f"tool call: expected a JSON object, got {type(data).__name__}", body)
    name, arguments = data.get("name"), data.get("arguments", {})
    if not isinstance(name, str) or not name:
        return ToolCallParseError('tool call: expected a string "name"', body)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCallParseError(f'tool call {name!r}: expected an object "arguments", got {type(arguments).__name__}', body)
    return ToolCall(name, arguments)


def final_answer_text(text: str) -> str:
    """The reply without any tool-call blocks (what a reward function grades)."""
    return _CALL.sub("", text).strip()


def tool_response_text(result: ToolResult | ToolCallParseError) -> str:
    """One ``<tool_response>`` block; errors are prefixed ``Error:``."""
    if isinstance(result, ToolCallParseError):
        content = "Error: " + result.message
    else:
        content = ("Error: " if result.error else "") + result.content
    return f"<tool_response>\n{content}\n</tool_response>"


def tool_response_message(results: Sequence[ToolResult | ToolCallParseError]) -> Message:
    """The user message that feeds the results of one turn's calls back to the model."""
    return Message(role="user", content="\n".join(tool_response_text(r) for r in results))
