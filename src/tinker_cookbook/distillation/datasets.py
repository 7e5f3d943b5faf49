"""Prompt-only data for on-policy distillation: envs that only ask, and batches of them.

The reward is always 0: in distillation the learning signal is the teacher's opinion of the
sampled tokens, added later (see :mod:`~tinker_cookbook.distillation.on_policy`). Each group
also knows the teacher's prompt for the same question, which may differ from the student's
(e.g. a system prompt only the teacher sees).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import tinker
from tinker_cookbook.completers import StopCondition
from tinker_cookbook.exceptions import DataError
from tinker_cookbook.renderers import Message, Renderer
from tinker_cookbook.rl.types import Action, Env, EnvGroupBuilder, Observation, RLDataset, StepResult


class PromptOnlyEnv(Env):
    """One reply to ``messages``; reward 0, and the episode ends after it."""

    def __init__(self, renderer: Renderer, messages: list[Message]) -> None:
        self.renderer = renderer
        self.messages = messages

    async def initial_observation(self) -> tuple[Observation, StopCondition]:
        return self.renderer.build_generation_prompt(self.messages), self.renderer.get_stop_sequences()

    async def step(self, action: Action) -> StepResult:
        _, clean = self.renderer.parse_response(action)
        return StepResult(0.0, True, tinker.ModelInput.empty(), [], {"clean_stop": float(clean)})


@dataclass(frozen=True)
class PromptGroupBuilder(EnvGroupBuilder):
    """``group_size`` student replies to one conversation; the teacher sees ``teacher_prefix``
    (e.g. a system message) before the same conversation."""

    renderer: Renderer
    messages: tuple[Message, ...]
    group_size: int
    teacher_prefix: tuple[Message, ...] = ()
    dataset_name: str = "prompts"

    async def make_envs(self) -> Sequence[Env]:
        return [PromptOnlyEnv(self.renderer, list(self.messages)) for _ in range(self.group_size)]

    def teacher_prompt(self) -> tinker.ModelInput:
        """The prompt the teacher scores the student's reply after."""
        return self.renderer.build_generation_prompt([*self.teacher_prefix, *self.messages])

    def logging_tags(self) -> list[str]:
        return [self.dataset_name]


class PromptDataset(RLDataset):
    """``groups_per_batch`` questions per batch, cycling through ``questions`` in a seeded
    shuffled order, for ``n_batches`` batches."""

    def __init__(
        self,
        renderer: Renderer,
        questions: Sequence[str],
        groups_per_batch: int,
        group_size: int,
        n_batches: int,
        teacher_system_prompt: str | None = None,
        seed: int = 0,
    ) -> None:
        if not questions:
            raise DataError("questions: expected at least one question, got none")
        self.renderer = renderer
        self.questions = list(questions)
        random.Random(seed).shuffle(self.questions)
        self.groups_per_batch = groups_per_batch
        self.group_size = group_size
        self.n_batches = n_batches
        self.teacher_prefix: tuple[Message, ...] = (
            (Message(role="system", content=teacher_system_prompt),) if teacher_system_prompt else ()
        )

    def __len__(self) -> int:
        return self.n_batches

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        start = index * self.groups_per_batch
        questions = [self.questions[(start + i) % len(self.questions)] for i in range(self.groups_per_batch)]
        return [
            PromptGroupBuilder(
                self.renderer, (Message(role="user", content=q),), self.group_size, self.teacher_prefix
            )
            for q in questions
        ]


@dataclass
class PromptDatasetBuilder:
    """Train (and optional test) :class:`PromptDataset`; the first ``test_size`` questions are
    held out and form one test batch."""

    questions: Sequence[str]
    groups_per_batch: int
    group_size: int
    n_batches: int
    teacher_system_prompt: str | None = None
    test_size: int = 0

    def __call__(self, renderer: Renderer) -> tuple[RLDataset, RLDataset | None]:
        if not 0 <= self.test_size < len(self.questions):
            raise DataError(f"test_size: expected in [0, {len(self.questions)}), got {self.test_size}")
        test_q, train_q = self.questions[: self.test_size], self.questions[self.test_size :]
        train = PromptDataset(
            renderer, train_q, self.groups_per_batch, self.group_size, self.n_batches, self.teacher_system_prompt
        )
        if not test_q:
            return train, None
        return train, PromptDataset(renderer, test_q, len(test_q), 1, 1, self.teacher_system_prompt)
