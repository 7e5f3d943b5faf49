"""Evaluators run during training: they score a training client (NLL) or a sampler (sampling)."""

from tinker_cookbook.eval.evaluators import (
    NLLEvaluator,
    SamplingClientEvaluator,
    SamplingEvaluator,
    TrainingClientEvaluator,
    compute_mean_nll,
)

__all__ = [
    "NLLEvaluator",
    "SamplingClientEvaluator",
    "SamplingEvaluator",
    "TrainingClientEvaluator",
    "compute_mean_nll",
]
