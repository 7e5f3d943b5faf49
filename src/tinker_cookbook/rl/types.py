"""The RL interfaces, in one place.

Shape suffixes in names: ``_G`` members of a group, ``_P`` groups (problems) of a batch,
``_T`` tokens, ``_D`` datums.

An :class:`Env` is one episode: it gives an observation (a prompt) and a stop condition,
takes the policy's sampled tokens and returns a :class:`StepResult`. Envs are single-use.
An :class:`EnvGroupBuilder` makes the ``G`` envs of a group (e.g. ``G`` attempts at one
problem, whose rewards are compared to compute advantages); builders are small picklable
configs. An :class:`RLDataset` hands out a list of builders per batch.

A complete single-turn environment::

    class Reverse(Env):
        def __init__(self, renderer, word):
            self.renderer, self.word = renderer, word

        async def initial_observation(self):
            prompt = self.renderer.build_generation_prompt(
                [{"role": "user", "content": f"Reverse the word {self.word}"}])
            return prompt, self.renderer.get_stop_sequences()

        async def step(self, action):
            reply, _ = self.renderer.parse_response(action)
            reward = float(reply["content"].strip() == self.word[::-1])
            return StepResult(reward=reward, episode_done=True, next_observation=tinker.ModelInput.empty(),
                              next_stop_condition=[], metrics={"correct": reward})
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

import tinker
from tinker_cookbook.completers import StopCondition, TokensWithLogprobs
from tinker_cookbook.renderers import Renderer

Action: TypeAlias = list[int]
"""The tokens the policy sampled."""
Observation: TypeAlias = tinker.ModelInput
"""What the policy sees: the whole context so far (not only the new part)."""
Metrics: TypeAlias = dict[str, float]


@dataclass
class StepResult:
    reward: float
    """Reward for this step (the group reward is added on top, see ``EnvGroupBuilder``)."""
    episode_done: bool
    next_observation: Observation
    """The next prompt (ignored when ``episode_done``)."""
    next_stop_condition: StopCondition
    metrics: Metrics = field(default_factory=dict)
    """Per-episode numbers, averaged into ``env/all/<key>`` (e.g. ``correct``, ``format``)."""


class Env(ABC):
    """One episode of interaction; call ``initial_observation`` once, then ``step`` until done."""

    @abstractmethod
    async def initial_observation(self) -> tuple[Observation, StopCondition]: ...

    @abstractmethod
    async def step(self, action: Action) -> StepResult: ...


@dataclass
class Transition:
    ob: Observation
    ac: TokensWithLogprobs
    reward: float
    episode_done: bool
    metrics: Metrics = field(default_factory=dict)


@dataclass
class Trajectory:
    transitions: list[Transition]
    final_ob: Observation


class EnvGroupBuilder(ABC):
    """Makes a group of envs whose rollouts are compared with each other (GRPO-style)."""

    @abstractmethod
    async def make_envs(self) -> Sequence[Env]: ...

    async def compute_group_rewards(self, trajectories_G: list[Trajectory], envs_G: Sequence[Env]) -> list[float]:
        """Extra reward per trajectory computed from the whole group (e.g. pairwise
        preferences). Default: 0 for each."""
        return [0.0] * len(trajectories_G)

    def logging_tags(self) -> list[str]:
        """Names under which this group's metrics are also reported (``env/<tag>/...``)."""
        return []


@dataclass
class RolloutError:
    """An exception raised inside an env during a rollout, kept as a value."""

    error_type: str
    message: str


@dataclass
class TrajectoryGroup:
    """The finished rollouts of one group. Failed members are left out and listed in ``errors``."""

    trajectories_G: list[Trajectory]
    final_rewards_G: list[float]
    """Group rewards from ``compute_group_rewards``, added to the step rewards."""
    metrics_G: list[Metrics]
    tags: list[str] = field(default_factory=list)
    errors: list[RolloutError] = field(default_factory=list)
    sampler_step: int = 0
    """The policy version (training step) that sampled this group; used by async training."""

    def get_total_rewards(self) -> list[float]:
        """Sum of step rewards plus the group reward, per trajectory."""
        return [
            sum(t.reward for t in traj.transitions) + final
            for traj, final in zip(self.trajectories_G, self.final_rewards_G, strict=True)
        ]


class RLDataset(ABC):
    """Batches of env group builders."""

    @abstractmethod
    def get_batch(self, index: int) -> list[EnvGroupBuilder]: ...

    @abstractmethod
    def __len__(self) -> int: ...


class RLDatasetBuilder(Protocol):
    """Builds the train and (optional) test datasets once the renderer is known."""

    def __call__(self, renderer: Renderer) -> tuple[RLDataset, RLDataset | None]: ...
