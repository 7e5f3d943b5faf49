"""Pairwise preference data: two completions of one prompt, and which one is preferred.

>>> prompt = [{"role": "user", "content": "What is 2 + 2?"}]
>>> c = Comparison(prompt, [{"role": "assistant", "content": "4."}], [{"role": "assistant", "content": "5."}])
>>> LabeledComparison(c, "A").chosen[0]["content"]
'4.'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tinker_cookbook.exceptions import DataError
from tinker_cookbook.renderers import Message

Label = Literal["A", "B"]


@dataclass(frozen=True)
class Comparison:
    """A prompt and two candidate completions of it (each a list of messages, usually one
    assistant message). Construction checks every field and names the bad one."""

    prompt_conversation: list[Message]
    """The conversation so far; may be empty (then the completions are the whole text)."""
    completion_A: list[Message]
    completion_B: list[Message]

    def __post_init__(self) -> None:
        check_messages(self.prompt_conversation, "prompt_conversation", allow_empty=True)
        check_messages(self.completion_A, "completion_A")
        check_messages(self.completion_B, "completion_B")


@dataclass(frozen=True)
class LabeledComparison:
    """A comparison and its label: ``"A"`` if ``completion_A`` is preferred, ``"B"`` otherwise."""

    comparison: Comparison
    label: Label

    def __post_init__(self) -> None:
        if not isinstance(self.comparison, Comparison):
            raise DataError(f"comparison: expected a Comparison, got {type(self.comparison).__name__}")
        if self.label not in ("A", "B"):
            raise DataError(f"label: expected 'A' or 'B', got {self.label!r:.40}")

    @property
    def chosen(self) -> list[Message]:
        """The preferred completion."""
        c = self.comparison
        return c.completion_A if self.label == "A" else c.completion_B

    @property
    def rejected(self) -> list[Message]:
        """The other completion."""
        c = self.comparison
        return c.completion_B if self.label == "A" else c.completion_A


def check_messages(value: Any, field: str, allow_empty: bool = False) -> list[Message]:
    """``value`` as a list of ``{"role": str, "content": str}``, or a ``DataError`` naming ``field``."""
    if not isinstance(value, list) or (not value and not allow_empty):
        kind = "a list" if allow_empty else "a non-empty list"
        raise DataError(f"{field}: expected {kind} of {{role, content}} messages, got {value!r:.80}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{field}[{i}]: expected {{'role': str, 'content': str}}, got {m!r:.80}")
    return value
