"""Rollouts: run envs against a policy, all members of all groups concurrently (asyncio)."""

from __future__ import annotations

import asyncio
import logging

from tinker_cookbook.completers import StopCondition, TokenCompleter
from tinker_cookbook.rl.types import (
    Action,
    Env,
    EnvGroupBuilder,
    Observation,
    RolloutError,
    StepResult,
    Trajectory,
    TrajectoryGroup,
    Transition,
)

logger = logging.getLogger(__name__)


async def do_single_rollout(policy: TokenCompleter, env: Env) -> Trajectory:
    """Play one episode: observe, sample, step, until the env says it is done."""
    transitions = []
    ob, stop = await env.initial_observation()
    while True:
        ac = await policy(ob, stop)
        result = await env.step(ac.tokens)
        transitions.append(Transition(ob, ac, result.reward, result.episode_done, result.metrics))
        if result.episode_done:
            return Trajectory(transitions, result.next_observation)
        ob, stop = result.next_observation, result.next_stop_condition


async def do_group_rollout(builder: EnvGroupBuilder, policy: TokenCompleter, sampler_step: int = 0) -> TrajectoryGroup:
    """Roll out every env of the group concurrently.

    An exception inside an env is kept as a :class:`RolloutError` and that member is left
    out, so one bad env does not fail the batch. Exceptions from the policy (the sampling
    service) are not env failures and propagate.
    """
    envs = list(await builder.make_envs())
    results = await asyncio.gather(*(_guarded_rollout(policy, env) for env in envs))
    kept = [(env, r) for env, r in zip(envs, results, strict=True) if isinstance(r, Trajectory)]
    errors = [r for r in results if isinstance(r, RolloutError)]
    trajectories = [t for _, t in kept]
    final_rewards = await builder.compute_group_rewards(trajectories, [e for e, _ in kept]) if kept else []
    metrics = [_episode_metrics(t) for t in trajectories]
    return TrajectoryGroup(trajectories, final_rewards, metrics, builder.logging_tags(), errors, sampler_step)


class _EnvFailure(Exception):
    """An exception raised by the env itself (not by the policy)."""


class _GuardedEnv(Env):
    def __init__(self, env: Env) -> None:
        self.env = env

    async def initial_observation(self) -> tuple[Observation, StopCondition]:
        try:
            return await self.env.initial_observation()
        except Exception as e:
            raise _EnvFailure() from e

    async def step(self, action: Action) -> StepResult:
        try:
            return await self.env.step(action)
        except Exception as e:
            raise _EnvFailure() from e


async def _guarded_rollout(policy: TokenCompleter, env: Env) -> Trajectory | RolloutError:
    try:
        return await do_single_rollout(policy, _GuardedEnv(env))
    except _EnvFailure as failure:
        e = failure.__cause__
        logger.warning("rollout failed in %s: %s: %s", type(env).__name__, type(e).__name__, e)
        return RolloutError(type(e).__name__, str(e))


def _episode_metrics(trajectory: Trajectory) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for t in trajectory.transitions:
        metrics.update(t.metrics)
    metrics["ac_tokens"] = float(sum(len(t.ac.tokens) for t in trajectory.transitions))
    metrics["turns"] = float(len(trajectory.transitions))
    return metrics
