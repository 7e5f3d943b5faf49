"""Code RL environments: the model completes a HumanEval function, the sandbox runs its tests."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import tinker
from tinker_cookbook.completers import StopCondition
from tinker_cookbook.recipes.code_rl.tasks import CodeProblem, extract_code, grade_async, split
from tinker_cookbook.renderers import Message, Renderer
from tinker_cookbook.rl.types import Action, Env, EnvGroupBuilder, Observation, RLDataset, StepResult
from tinker_cookbook.sandbox import Limits

SYSTEM_PROMPT = (
    "You are a Python programmer. Complete the function the user gives you. "
    "Reply with the whole function in one ```python code block."
)


class CodeEnv(Env):
    """One attempt at one problem. Reward: the fraction of its tests that pass in the sandbox.

    Metrics: ``passed`` (same as the reward), ``all_passed`` (1 if every test passed),
    ``ran`` (the program compiled and exited cleanly), ``timeout``.
    """

    def __init__(self, problem: CodeProblem, renderer: Renderer, limits: Limits | None = None) -> None:
        self.problem = problem
        self.renderer = renderer
        self.limits = limits

    async def initial_observation(self) -> tuple[Observation, StopCondition]:
        messages = [
            Message(role="system", content=SYSTEM_PROMPT),
            Message(role="user", content=f"```python\n{self.problem.prompt}```"),
        ]
        return self.renderer.build_generation_prompt(messages), self.renderer.get_stop_sequences()

    async def step(self, action: Action) -> StepResult:
        message, _ = self.renderer.parse_response(action)
        result = await grade_async(self.problem, extract_code(message["content"]), self.limits)
        ran = result.run is not None and result.run.ok
        timed_out = result.run is not None and result.run.timed_out
        return StepResult(
            reward=result.fraction,
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=[],
            metrics={"passed": result.fraction, "all_passed": float(result.passed == result.total),
                     "ran": float(ran), "timeout": float(timed_out)},
        )


@dataclass(frozen=True)
class CodeGroupBuilder(EnvGroupBuilder):
    """``group_size`` attempts at one problem (GRPO advantages are taken within the group)."""

    problem: CodeProblem
    renderer: Renderer
    group_size: int
    limits: Limits | None = None

    async def make_envs(self) -> Sequence[Env]:
        return [CodeEnv(self.problem, self.renderer, self.limits) for _ in range(self.group_size)]

    def logging_tags(self) -> list[str]:
        return ["humaneval"]


class CodeDataset(RLDataset):
    """``batch_size`` problems per batch (a seeded shuffle of the split, repeated as needed)."""

    def __init__(self, problems: list[CodeProblem], batch_size: int, group_size: int, n_batches: int,
                 renderer: Renderer, seed: int, limits: Limits | None = None) -> None:
        rng = random.Random(seed)
        order: list[CodeProblem] = []
        while len(order) < batch_size * n_batches:
            epoch = list(problems)
            rng.shuffle(epoch)
            order += epoch
        self.problems = order[: batch_size * n_batches]
        self.batch_size = batch_size
        self.group_size = group_size
        self.n_batches = n_batches
        self.renderer = renderer
        self.limits = limits

    def __len__(self) -> int:
        return self.n_batches

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        batch = self.problems[index * self.batch_size : (index + 1) * self.batch_size]
        return [CodeGroupBuilder(p, self.renderer, self.group_size, self.limits) for p in batch]


@dataclass
class CodeDatasetBuilder:
    """Train batches from the HumanEval train split; the first ``test_size`` test-split problems
    (one greedy attempt each) as the test set."""

    batch_size: int
    group_size: int
    n_batches: int
    test_size: int = 0
    seed: int = 0
    limits: Limits | None = None

    def __call__(self, renderer: Renderer) -> tuple[CodeDataset, CodeDataset | None]:
        train = CodeDataset(split("train"), self.batch_size, self.group_size, self.n_batches, renderer, self.seed,
                            self.limits)
        test = None
        if self.test_size:
            problems: Sequence[CodeProblem] = split("test")[: self.test_size]
            test = CodeDataset(list(problems), len(problems), 1, 1, renderer, self.seed, self.limits)
        return train, test
