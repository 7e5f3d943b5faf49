"""Run an inspect-ai task on the current weights from a training loop, and log its scores.

:class:`InspectEvaluator` is a :class:`~tinker_cookbook.eval.evaluators.SamplingClientEvaluator`:
put it in a loop's ``evaluators`` and it runs every ``eval_every`` steps on the loop's latest
sampler, through the ``tinker`` inspect provider (:mod:`.inspect_provider`)::

    evaluator = InspectEvaluator(my_task(), log_dir=f"{log_path}/inspect", limit=20)
    config = rl.train.Config(..., evaluators=[evaluator], eval_every=5)

Each call returns ``{"inspect/<task>/<scorer>/<metric>": value}`` (e.g.
``inspect/arithmetic/match/accuracy``); inspect's own logs go to ``log_dir``. Supervised loops
take training-client evaluators: ``evaluator.on_training_client()`` snapshots the weights into
a sampler first (``supervised.train.Config(evaluators=[...])``).
"""

from __future__ import annotations

from typing import Any

import tinker
from tinker_cookbook.eval.evaluators import SamplingClientEvaluator, TrainingClientEvaluator


class InspectEvaluator(SamplingClientEvaluator):
    """Scores a sampler with an inspect ``Task`` (see the module doc)."""

    def __init__(self, task: Any, log_dir: str, limit: int | None = None, renderer_name: str | None = None,
                 max_tokens: int | None = None, temperature: float = 0.0, seed: int | None = 0) -> None:
        from inspect_ai import Task

        if not isinstance(task, Task):
            raise TypeError(f"task: expected inspect_ai.Task, got {type(task).__name__}")
        self.task = task
        self.log_dir = log_dir
        self.limit = limit
        self.renderer_name = renderer_name
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed

    def on_training_client(self) -> TrainingClientEvaluator:
        """This evaluator for loops that hand evaluators the training client (supervised ones)."""
        return _SnapshotThen(self)

    async def __call__(self, sampling_client: tinker.SamplingClient) -> dict[str, float]:
        from inspect_ai import eval_async
        from inspect_ai.model import GenerateConfig, get_model

        import tinker_cookbook.eval.inspect_provider  # noqa: F401 (registers the provider)

        await sampling_client
        config = GenerateConfig(temperature=self.temperature, seed=self.seed, max_tokens=self.max_tokens)
        model = get_model(f"tinker/{sampling_client.get_base_model()}", config=config, memoize=False,
                          sampling_client=sampling_client, renderer=self.renderer_name)
        (log,) = await eval_async(self.task, model=model, log_dir=self.log_dir, limit=self.limit,
                                  score_display=False)
        if log.status != "success":
            raise RuntimeError(f"inspect task {self.task.name!r} ended with status {log.status}: {log.error}")
        metrics: dict[str, float] = {}
        for score in log.results.scores if log.results else []:
            for name, metric in score.metrics.items():
                metrics[f"inspect/{self.task.name}/{score.name}/{name}"] = float(metric.value)
        return metrics


class _SnapshotThen(TrainingClientEvaluator):
    def __init__(self, evaluator: SamplingClientEvaluator) -> None:
        self.evaluator = evaluator

    async def __call__(self, training_client: tinker.TrainingClient) -> dict[str, float]:
        return await self.evaluator(training_client.save_weights_and_get_sampling_client())
