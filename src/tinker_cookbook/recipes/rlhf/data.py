"""Offline preference pairs with a verifiable quality signal, for the RLHF recipe.

Every prompt asks a calculator question ("What is 7 + 12?", system: reply with only the
number). The scorer accepts a reply that is exactly the right number (a trailing period
allowed). Each pair's chosen reply is one the scorer accepts; the rejected one is one it
rejects, of three kinds: a wrong number, a hedged wrong answer, or the right number buried in
a sentence. The pairs, the SFT rows (prompt + chosen reply) and the RL prompts all come from
one seeded generator, with disjoint questions for training and held-out evaluation.
"""

from __future__ import annotations

import random

from tinker_cookbook.preference.types import Comparison, LabeledComparison
from tinker_cookbook.recipes.math_rl.envs import ARITHMETIC_SYSTEM
from tinker_cookbook.renderers import Message


def accepted(reply: str, answer: str) -> bool:
    """The scorer: the reply is exactly ``answer`` (optionally ending with a period)."""
    return reply.strip().removesuffix(".") == answer


def questions(n: int, seed: int, max_operand: int = 20) -> list[tuple[str, str]]:
    """``n`` distinct ``(question, answer)`` sums and differences, in a seeded order."""
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    while len(seen) < n:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        a, b = (a, b) if a >= b else (b, a)
        op = rng.choice("+-")
        seen.setdefault(f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b))
    return list(seen.items())


def prompt_of(question: str) -> list[Message]:
    return [Message(role="system", content=ARITHMETIC_SYSTEM), Message(role="user", content=question)]


def rejected_reply(rng: random.Random, question: str, answer: str) -> str:
    wrong = str(int(answer) + rng.choice([-3, -2, -1, 1, 2, 3]))
    kind = rng.randrange(3)
    if kind == 0:
        return wrong
    if kind == 1:
        return f"I think it is {wrong}, but I am not sure."
    return f"{question.removeprefix('What is ').removesuffix('?')} equals {answer}, I believe."


def comparisons(qa: list[tuple[str, str]], seed: int) -> list[LabeledComparison]:
    """One labelled pair per question; the chosen reply's position (A or B) is random."""
    rng = random.Random(seed)
    out = []
    for question, answer in qa:
        chosen, rejected = answer, rejected_reply(rng, question, answer)
        assert accepted(chosen, answer) and not accepted(rejected, answer)
        a, b, label = (chosen, rejected, "A") if rng.random() < 0.5 else (rejected, chosen, "B")
        out.append(LabeledComparison(
            Comparison(prompt_of(question), [Message(role="assistant", content=a)], [Message(role="assistant", content=b)]),
            label,  # type: ignore[arg-type]
        ))
    return out


def sft_rows(pairs: list[LabeledComparison]) -> list[dict[str, list[Message]]]:
    """The preferred replies as SFT conversations (stage 1)."""
    return [{"messages": [*c.comparison.prompt_conversation, *c.chosen]} for c in pairs]
