"""From trajectory groups to training data: GRPO-style advantages and datums with masks."""

from __future__ import annotations

import msgspec
import numpy as np

import tinker
from tinker_cookbook.rl.types import Trajectory, TrajectoryGroup


def compute_advantages(groups_P: list[TrajectoryGroup]) -> list[np.ndarray]:
    """Per group, each trajectory's total reward minus the group mean (no std scaling)."""
    advantages_P = []
    for group in groups_P:
        rewards_G = np.asarray(group.get_total_rewards(), dtype=np.float64)
        advantages_P.append(rewards_G - rewards_G.mean() if len(rewards_G) else rewards_G)
    return advantages_P


def remove_constant_reward_groups(groups_P: list[TrajectoryGroup]) -> list[TrajectoryGroup]:
    """Groups whose members did not all get the same reward (the others have zero advantage)."""
    return [g for g in groups_P if len(set(g.get_total_rewards())) > 1]


def trajectory_to_data(trajectory: Trajectory, advantage: float) -> tuple[list[tinker.Datum], list[np.ndarray]]:
    """Datums for one trajectory and, per datum, the mask of sampled target positions.

    Turns are merged into one sequence while each observation extends the previous
    observation plus action (as multi-turn chat prompts do); otherwise a new datum starts.
    Sampled tokens get the sampler's logprob and ``advantage``; observation tokens get 0
    for both (so the RL losses ignore them) and mask 0. When every action names its sampled
    sequence, the datum carries provenance spans (``stable_reinforce`` needs them).
    """
    data, masks = [], []
    tokens: list[int] = []
    logprobs: list[float] = []
    mask: list[float] = []
    spans: list[tinker.types.ProvenanceSpan] | None = []  # None once an action has no sequence_id

    def flush() -> None:
        if len(tokens) >= 2:
            m = np.asarray(mask[1:], dtype=np.float32)
            datum = tinker.Datum(
                model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "logprobs": logprobs[1:],
                    "advantages": (m * advantage).tolist(),
                },
            )
            if spans:  # the input drops the last position, the targets the first
                datum = datum.with_provenance(_cut(spans, 0, len(tokens) - 1), _cut(spans, 1, len(tokens)))
            data.append(datum)
            masks.append(m)

    for transition in trajectory.transitions:
        ob = transition.ob.to_ints()
        if ob[: len(tokens)] != tokens or len(ob) < len(tokens):
            flush()
            tokens, logprobs, mask, spans = [], [], [], []
        new_ob = ob[len(tokens) :]
        sequence_id = transition.ac.sequence_id
        if spans is not None and sequence_id is not None:
            spans.append(tinker.PromptProvenanceSpan(sequence_id=sequence_id, offset=len(tokens), length=len(new_ob)))
            spans.append(tinker.SampledProvenanceSpan(sequence_id=sequence_id, length=len(transition.ac.tokens)))
        else:
            spans = None
        tokens += new_ob
        logprobs += [0.0] * len(new_ob)
        mask += [0.0] * len(new_ob)
        tokens += transition.ac.tokens
        logprobs += transition.ac.logprobs
        mask += [1.0] * len(transition.ac.tokens)
    flush()
    return data, masks


def _cut(spans: list[tinker.types.ProvenanceSpan], start: int, stop: int) -> list[tinker.types.ProvenanceSpan]:
    """The spans of positions ``[start, stop)`` of the sequence the spans tile."""
    out, position = [], 0
    for span in spans:
        lo, hi = max(start, position), min(stop, position + span.length)
        if lo < hi:
            out.append(msgspec.structs.replace(span, offset=span.offset + lo - position, length=hi - lo))
        position += span.length
    return out


def assemble_training_data(
    groups_P: list[TrajectoryGroup], advantages_P: list[np.ndarray]
) -> tuple[list[tinker.Datum], list[np.ndarray]]:
    """All datums of a batch and their masks."""
    data_D, masks_D = [], []
    for group, advantages_G in zip(groups_P, advantages_P, strict=True):
        for trajectory, advantage in zip(group.trajectories_G, advantages_G, strict=True):
            data, masks = trajectory_to_data(trajectory, float(advantage))
            data_D += data
            masks_D += masks
    return data_D, masks_D
