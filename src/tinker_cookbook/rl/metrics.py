"""RL metrics and the KL penalty against a reference model."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import numpy as np

import tinker
from tinker_cookbook.rl.types import TrajectoryGroup


def compute_kl_sample_train(
    data_D: list[tinker.Datum], masks_D: list[np.ndarray], training_logprobs_D: list[np.ndarray]
) -> dict[str, float]:
    """How far the trainer's logprobs of the sampled tokens are from the sampler's.

    ``optim/kl_sample_train_v1`` is the mean of ``sampler - trainer`` over sampled tokens (an
    estimate of KL(sampler || trainer)), ``_v2`` half the mean squared difference. On-policy
    they should be ~0; large values mean the sampler and trainer disagree (a numerics bug,
    or stale samples in async training).
    """
    diffs = [
        (d.loss_fn_inputs["logprobs"].to_numpy() - lp)[m > 0]
        for d, m, lp in zip(data_D, masks_D, training_logprobs_D, strict=True)
    ]
    diff = np.concatenate(diffs) if diffs else np.zeros(0)
    if diff.size == 0:
        return {}
    return {"optim/kl_sample_train_v1": float(diff.mean()), "optim/kl_sample_train_v2": float(0.5 * (diff**2).mean())}


async def incorporate_kl_penalty(
    data_D: list[tinker.Datum],
    masks_D: list[np.ndarray],
    reference: tinker.SamplingClient,
    kl_penalty_coef: float,
) -> dict[str, float]:
    """Penalise drifting from ``reference``: add ``coef * (mean_diff - diff_t)`` to each sampled
    token's advantage, where ``diff_t = logp_sampler - logp_reference`` (a per-token KL
    estimate) and ``mean_diff`` its batch mean (so the penalty only re-ranks tokens).

    The datums' ``advantages`` are replaced in place. Returns ``kl_policy_base``, the mean
    ``diff_t`` (an estimate of KL(policy || reference)).
    """
    full_sequences = [
        tinker.ModelInput.from_ints(d.model_input.to_ints() + d.loss_fn_inputs["target_tokens"].to_numpy()[-1:].tolist())
        for d in data_D
    ]
    ref_logprobs = await asyncio.gather(*(reference.compute_logprobs(seq) for seq in full_sequences))
    diffs_D = []
    for d, m, ref in zip(data_D, masks_D, ref_logprobs, strict=True):
        ref_lp = np.asarray([0.0 if x is None else x for x in ref[1:]], dtype=np.float32)  # logprob of each target
        diffs_D.append((d.loss_fn_inputs["logprobs"].to_numpy() - ref_lp) * m)
    total = sum(float(m.sum()) for m in masks_D)
    mean_diff = sum(float(x.sum()) for x in diffs_D) / max(total, 1.0)
    for d, m, diff in zip(data_D, masks_D, diffs_D, strict=True):
        advantages = d.loss_fn_inputs["advantages"].to_numpy() + kl_penalty_coef * m * (mean_diff - diff)
        d.loss_fn_inputs["advantages"] = tinker.TensorData.from_numpy(advantages.astype(np.float32))
    return {"kl_policy_base": mean_diff}


def compute_trajectory_metrics(groups_P: list[TrajectoryGroup]) -> dict[str, float]:
    """Batch means: ``reward/total``, ``env/all/<episode metric>`` and ``env/<tag>/...``,
    ``frac_mixed`` (groups whose rewards differ, i.e. that carry signal) and error counts."""
    by_tag: dict[str, list[dict[str, float]]] = defaultdict(list)
    rewards = []
    for group in groups_P:
        totals = group.get_total_rewards()
        rewards += totals
        for metrics, total in zip(group.metrics_G, totals, strict=True):
            row = {**metrics, "reward": total}
            for tag in ["all", *group.tags]:
                by_tag[tag].append(row)
    out: dict[str, float] = {}
    if rewards:
        out["reward/total"] = float(np.mean(rewards))
    for tag, rows in by_tag.items():
        for key in sorted({k for r in rows for k in r}):
            values = [r[key] for r in rows if key in r]
            out[f"env/{tag}/{key}"] = float(np.mean(values))
    out["frac_mixed"] = float(np.mean([len(set(g.get_total_rewards())) > 1 for g in groups_P])) if groups_P else 0.0
    out["rollout/errors"] = float(sum(len(g.errors) for g in groups_P))
    return out
