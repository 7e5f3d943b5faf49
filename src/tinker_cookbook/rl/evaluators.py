"""Evaluate a sampler on a test ``RLDataset``: roll out every group, report rewards and env metrics."""

from __future__ import annotations

import asyncio

import tinker
from tinker_cookbook.completers import TinkerTokenCompleter
from tinker_cookbook.eval.evaluators import SamplingClientEvaluator
from tinker_cookbook.rl.metrics import compute_trajectory_metrics
from tinker_cookbook.rl.rollouts import do_group_rollout
from tinker_cookbook.rl.types import RLDataset


class RLTestSetEvaluator(SamplingClientEvaluator):
    """Metrics of :func:`compute_trajectory_metrics` over the whole dataset, prefixed ``{name}/``
    (e.g. ``test/reward/total``, ``test/env/all/correct``). Greedy by default; with a
    ``temperature`` above 0, ``seed`` makes each evaluation sample the same way."""

    def __init__(self, dataset: RLDataset, max_tokens: int, temperature: float = 0.0, name: str = "test",
                 seed: int | None = None) -> None:
        self.dataset = dataset
        self.seed = seed
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.name = name

    async def __call__(self, sampling_client: tinker.SamplingClient) -> dict[str, float]:
        policy = TinkerTokenCompleter(sampling_client, self.max_tokens, self.temperature, self.seed)
        builders = [b for i in range(len(self.dataset)) for b in self.dataset.get_batch(i)]
        groups = await asyncio.gather(*(do_group_rollout(b, policy) for b in builders))
        metrics = compute_trajectory_metrics(list(groups))
        return {f"{self.name}/{k}": v for k, v in metrics.items() if k not in ("frac_mixed", "rollout/errors")}
