"""Evaluator interfaces and the two general evaluators: test-set NLL and graded sampling."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np

import tinker
from tinker_cookbook.completers import TinkerTokenCompleter
from tinker_cookbook.renderers import Message, Renderer


class TrainingClientEvaluator(ABC):
    """Scores the current weights through the training client (e.g. ``forward`` for NLL)."""

    @abstractmethod
    async def __call__(self, training_client: tinker.TrainingClient) -> dict[str, float]: ...


class SamplingClientEvaluator(ABC):
    """Scores a sampler (a frozen snapshot of the weights) by generating."""

    @abstractmethod
    async def __call__(self, sampling_client: tinker.SamplingClient) -> dict[str, float]: ...


def compute_mean_nll(outputs: Sequence[dict[str, tinker.TensorData]], data: Sequence[tinker.Datum]) -> float:
    """The weighted mean negative log-likelihood per target token: ``-sum(w * logp) / sum(w)``."""
    total, weight = 0.0, 0.0
    for out, datum in zip(outputs, data, strict=True):
        w = datum.loss_fn_inputs["weights"].to_numpy()
        total -= float(np.sum(out["logprobs"].to_numpy() * w))
        weight += float(np.sum(w))
    return total / weight if weight else float("nan")


class NLLEvaluator(TrainingClientEvaluator):
    """Mean NLL of a fixed list of datums (``forward`` only; no gradient), as ``{name}/nll``."""

    def __init__(self, data: Sequence[tinker.Datum], name: str = "test", batch_size: int = 32) -> None:
        if not data:
            raise ValueError("data: expected at least one Datum for the NLL evaluator")
        self.data = list(data)
        self.name = name
        self.batch_size = batch_size

    async def __call__(self, training_client: tinker.TrainingClient) -> dict[str, float]:
        chunks = [self.data[i : i + self.batch_size] for i in range(0, len(self.data), self.batch_size)]
        futures = [training_client.forward(chunk, "cross_entropy") for chunk in chunks]  # all submitted at once
        outputs = [o for fut in futures for o in (await fut).loss_fn_outputs]
        return {f"{self.name}/nll": compute_mean_nll(outputs, self.data)}


class SamplingEvaluator(SamplingClientEvaluator):
    """Samples one reply per prompt and grades it: ``{name}/score`` is the mean grade.

    ``grader(reply, index)`` returns a float (1.0 = correct) for the reply to ``prompts[index]``.
    Also reports ``{name}/clean_stop``, the share of replies that ended with a stop sequence.
    """

    def __init__(
        self,
        prompts: Sequence[list[Message]],
        grader: Callable[[Message, int], float],
        renderer: Renderer,
        max_tokens: int,
        temperature: float = 0.0,
        name: str = "test",
    ) -> None:
        self.prompts = list(prompts)
        self.grader = grader
        self.renderer = renderer
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.name = name

    async def __call__(self, sampling_client: tinker.SamplingClient) -> dict[str, float]:
        completer = TinkerTokenCompleter(sampling_client, self.max_tokens, self.temperature)
        stop = self.renderer.get_stop_sequences()
        results = await asyncio.gather(
            *(completer(self.renderer.build_generation_prompt(p), stop) for p in self.prompts)
        )
        grades, clean = [], []
        for i, result in enumerate(results):
            reply, ok = self.renderer.parse_response(result.tokens)
            grades.append(self.grader(reply, i))
            clean.append(float(ok))
        return {f"{self.name}/score": float(np.mean(grades)), f"{self.name}/clean_stop": float(np.mean(clean))}
