"""Grading math answers: pull the final number out of a reply and compare it with the reference."""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_final_number(text: str) -> str | None:
    """The last number in ``text`` (``1,234`` -> ``1234``), preferring what follows an
    ``Answer:`` / ``ANSWER:`` marker or ``\\boxed{...}`` when present."""
    for marker in (r"\\boxed\{([^}]*)\}", r"answer\s*(?:is|:)\s*(.*)"):
        found = re.findall(marker, text, flags=re.IGNORECASE)
        if found:
            numbers = _NUMBER.findall(found[-1])
            if numbers:
                return numbers[0].replace(",", "")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def numbers_equal(a: str, b: str) -> bool:
    """Numeric equality of two number strings (``"4.0" == "4"``, ``"1/2" == "0.5"``)."""
    try:
        return Fraction(a.replace(",", "")) == Fraction(b.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return a.strip() == b.strip()


def grade_answer(reply: str, reference: str) -> bool:
    """Whether the final number of ``reply`` equals ``reference``."""
    answer = extract_final_number(reply)
    return answer is not None and numbers_equal(answer, reference)
