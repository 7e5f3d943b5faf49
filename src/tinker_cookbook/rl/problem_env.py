"""Single-turn question/answer environments with a checkable answer (math, puzzles)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tinker
from tinker_cookbook.completers import StopCondition
from tinker_cookbook.renderers import Message, Renderer
from tinker_cookbook.rl.types import Action, Env, EnvGroupBuilder, Observation, StepResult


class ProblemEnv(Env):
    """Ask one question; reward ``format_coef * (format_ok - 1) + correct``.

    ``format_ok`` means the reply ended with a stop sequence and passes :meth:`check_format`;
    ``correct`` is :meth:`check_answer`. ``convo_prefix`` (e.g. a system prompt or few-shot
    examples) goes before the question.
    """

    def __init__(self, renderer: Renderer, convo_prefix: list[Message] | None = None, format_coef: float = 0.1) -> None:
        self.renderer = renderer
        self.convo_prefix = convo_prefix or []
        self.format_coef = format_coef

    @abstractmethod
    def get_question(self) -> str: ...

    @abstractmethod
    def check_answer(self, reply: str) -> bool: ...

    def check_format(self, reply: str) -> bool:
        return True

    async def initial_observation(self) -> tuple[Observation, StopCondition]:
        messages = [*self.convo_prefix, Message(role="user", content=self.get_question())]
        return self.renderer.build_generation_prompt(messages), self.renderer.get_stop_sequences()

    async def step(self, action: Action) -> StepResult:
        message, clean = self.renderer.parse_response(action)
        reply = message["content"]
        format_ok = clean and self.check_format(reply)
        correct = self.check_answer(reply)
        return StepResult(
            reward=self.format_coef * (float(format_ok) - 1.0) + float(correct),
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=[],
            metrics={"format": float(format_ok), "correct": float(correct)},
        )


@dataclass(frozen=True)
class ProblemGroupBuilder(EnvGroupBuilder):
    """``num_envs`` attempts at the same problem; ``env_thunk`` makes one env."""

    env_thunk: Callable[[], ProblemEnv]
    num_envs: int
    dataset_name: str = "problems"

    async def make_envs(self) -> Sequence[Env]:
        return [self.env_thunk() for _ in range(self.num_envs)]

    def logging_tags(self) -> list[str]:
        return [self.dataset_name]
