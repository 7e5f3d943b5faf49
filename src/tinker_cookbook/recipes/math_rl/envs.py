"""Math environments and datasets: generated arithmetic, and GSM8K-style word problems
from ``reasoning-gym``'s ``gsm_symbolic`` generator (offline; ``pip install reasoning-gym``)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import partial

from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.recipes.math_rl.math_grading import grade_answer
from tinker_cookbook.renderers import Message, Renderer
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder
from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset

ARITHMETIC_SYSTEM = "You are a calculator. Reply with only the number."
GSM_SYSTEM = "Solve the problem step by step, then give the final answer on the last line as 'Answer: <number>'."


class MathEnv(ProblemEnv):
    """One question with a numeric reference answer; ``correct`` if the reply's final number matches.

    The format check (on top of ending with a stop sequence) asks for a reply that is just a
    number with ``answer_line=False`` (arithmetic), or an ``Answer:`` line with ``answer_line=True``.
    """

    def __init__(self, question: str, answer: str, renderer: Renderer, system_prompt: str,
                 answer_line: bool = False, format_coef: float = 0.1) -> None:
        super().__init__(renderer, [Message(role="system", content=system_prompt)], format_coef)
        self.question = question
        self.answer = answer
        self.answer_line = answer_line

    def get_question(self) -> str:
        return self.question

    def check_answer(self, reply: str) -> bool:
        return grade_answer(reply, self.answer)

    def check_format(self, reply: str) -> bool:
        if self.answer_line:
            return re.search(r"answer\s*:", reply, re.IGNORECASE) is not None
        return re.fullmatch(r"\s*-?\d+\s*", reply) is not None


def arithmetic_problem(rng: random.Random, max_operand: int) -> tuple[str, str]:
    """``What is a + b?`` with operands in ``[0, max_operand]``."""
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return f"What is {a} + {b}?", str(a + b)


def gsm_problems(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` GSM8K-style word problems (question, answer) from reasoning-gym's ``gsm_symbolic``."""
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigurationError("env: 'gsm' needs reasoning-gym (pip install reasoning-gym)") from None
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    return [(entry["question"], str(entry["answer"])) for entry in dataset]


class MathDataset(RLDataset):
    """``batch_size`` problems per batch, each attempted ``group_size`` times."""

    def __init__(self, problems: list[tuple[str, str]], batch_size: int, group_size: int, renderer: Renderer,
                 system_prompt: str, answer_line: bool, name: str) -> None:
        self.problems = problems
        self.batch_size = batch_size
        self.group_size = group_size
        self.renderer = renderer
        self.system_prompt = system_prompt
        self.answer_line = answer_line
        self.name = name

    def __len__(self) -> int:
        return len(self.problems) // self.batch_size

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        batch = self.problems[index * self.batch_size : (index + 1) * self.batch_size]
        return [
            ProblemGroupBuilder(
                partial(MathEnv, q, a, self.renderer, self.system_prompt, self.answer_line), self.group_size, self.name
            )
            for q, a in batch
        ]


@dataclass
class MathDatasetBuilder:
    """Train (``n_batches`` batches) and test (``test_size`` problems) sets for ``env``:
    ``arithmetic`` (generated sums, operands up to ``max_operand``) or ``gsm`` (gsm_symbolic)."""

    env: str
    batch_size: int
    group_size: int
    n_batches: int
    test_size: int = 0
    max_operand: int = 20
    seed: int = 0

    def problems(self, n: int, seed: int) -> list[tuple[str, str]]:
        if self.env == "arithmetic":
            rng = random.Random(seed)
            return [arithmetic_problem(rng, self.max_operand) for _ in range(n)]
        if self.env == "gsm":
            return gsm_problems(n, seed)
        raise ConfigurationError(f"env: expected 'arithmetic' or 'gsm', got {self.env!r}")

    def __call__(self, renderer: Renderer) -> tuple[MathDataset, MathDataset | None]:
        system, answer_line = (ARITHMETIC_SYSTEM, False) if self.env == "arithmetic" else (GSM_SYSTEM, True)
        train = MathDataset(self.problems(self.batch_size * self.n_batches, self.seed), self.batch_size,
                            self.group_size, renderer, system, answer_line, self.env)
        test = None
        if self.test_size:
            # A different seed, so test problems are (mostly) unseen.
            test = MathDataset(self.problems(self.test_size, self.seed + 1_000_003), self.test_size, 1,
                               renderer, system, answer_line, self.env)
        return train, test
