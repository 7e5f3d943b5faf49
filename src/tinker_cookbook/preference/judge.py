"""A pairwise judge: a model fine-tuned to say which of two replies to a prompt is better, and
what RLHF builds on it.

The judge sees one prompt and two replies and answers ``A`` or ``B`` (trained with SFT on
labelled comparisons, both orders of each pair so position carries no signal). Its preference
for reply ``a`` over ``b`` is the probability it puts on ``A`` versus ``B`` as the next token,
averaged over both orders, so ``prefer(a, b) + prefer(b, a) == 1`` and ``prefer(a, a) == 0.5``.

* :func:`judge_conversation` / :func:`judge_training_rows`: the judge's prompt and SFT rows.
* :class:`PairwiseJudge`: the preference from a judge sampler.
* :class:`JudgeAccuracyEvaluator`: accuracy on held-out comparisons (``judge/accuracy``).
* :class:`PairwisePreferenceGroupBuilder`: RL groups whose reward is each reply's mean win
  rate against the other replies of its group, as the judge sees it.
* :class:`WinRateEvaluator`: the policy's greedy replies against a reference policy's
  (``{name}/win_rate``, judged), plus the ground truth when a scorer is given.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

import tinker
from tinker_cookbook.completers import StopCondition, TinkerTokenCompleter
from tinker_cookbook.eval.evaluators import SamplingClientEvaluator, TrainingClientEvaluator
from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.preference.types import LabeledComparison
from tinker_cookbook.renderers import Message, Renderer
from tinker_cookbook.rl.types import (
    Action,
    Env,
    EnvGroupBuilder,
    Observation,
    RLDataset,
    StepResult,
    Trajectory,
)

JUDGE_SYSTEM = "Compare two replies to the user's message. Answer A if reply A is better, B if reply B is better."

Scorer = Callable[[str, int], bool]
"""``(reply, question index) -> accepted``: a ground-truth check, for metrics only."""


def judge_conversation(prompt: Sequence[Message], reply_a: str, reply_b: str) -> list[Message]:
    """The judge's conversation (without its answer) for two replies to ``prompt``."""
    question = prompt[-1]["content"] if prompt else ""
    text = f"Message: {question}\nReply A: {reply_a}\nReply B: {reply_b}\nWhich reply is better?"
    return [Message(role="system", content=JUDGE_SYSTEM), Message(role="user", content=text)]


def judge_training_rows(comparisons: Sequence[LabeledComparison]) -> list[dict[str, list[Message]]]:
    """SFT rows (``{"messages": [...]}``) teaching the judge each comparison, in both orders."""
    rows = []
    for c in comparisons:
        prompt, chosen, rejected = c.comparison.prompt_conversation, c.chosen[-1]["content"], c.rejected[-1]["content"]
        for reply_a, reply_b, answer in ((chosen, rejected, "A"), (rejected, chosen, "B")):
            rows.append({"messages": [*judge_conversation(prompt, reply_a, reply_b), Message(role="assistant", content=answer)]})
    return rows


class PairwiseJudge:
    """Preferences from a judge sampler (a model trained on :func:`judge_training_rows`)."""

    def __init__(self, sampler: tinker.SamplingClient, renderer: Renderer) -> None:
        self.sampler = sampler
        self.renderer = renderer
        token_a, token_b = renderer.encode("A"), renderer.encode("B")
        if len(token_a) != 1 or len(token_b) != 1:
            raise ConfigurationError(f"renderer: expected 'A' and 'B' to be one token each, got {token_a} and {token_b}")
        self.token_a, self.token_b = token_a[0], token_b[0]

    async def _p_first(self, prompt: Sequence[Message], reply_a: str, reply_b: str) -> float:
        """P(answer A | A vs B), renormalised over the two answers."""
        ints = self.renderer.build_generation_prompt(judge_conversation(prompt, reply_a, reply_b)).to_ints()
        lp_a, lp_b = await asyncio.gather(
            self.sampler.compute_logprobs(tinker.ModelInput.from_ints([*ints, self.token_a])),
            self.sampler.compute_logprobs(tinker.ModelInput.from_ints([*ints, self.token_b])),
        )
        a, b = lp_a[-1], lp_b[-1]
        assert a is not None and b is not None
        return 1.0 / (1.0 + math.exp(b - a))

    async def prefer(self, prompt: Sequence[Message], reply_a: str, reply_b: str) -> float:
        """How much the judge prefers ``reply_a`` to ``reply_b``, in ``[0, 1]`` (0.5: no preference)."""
        if reply_a == reply_b:
            return 0.5
        forward, backward = await asyncio.gather(self._p_first(prompt, reply_a, reply_b), self._p_first(prompt, reply_b, reply_a))
        return 0.5 * (forward + 1.0 - backward)


class JudgeAccuracyEvaluator(TrainingClientEvaluator):
    """Share of held-out comparisons where the current judge weights prefer the chosen reply
    (``judge/accuracy``) and its mean preference for it (``judge/mean_preference``)."""

    def __init__(self, comparisons: Sequence[LabeledComparison], renderer: Renderer) -> None:
        self.comparisons = list(comparisons)
        self.renderer = renderer

    async def __call__(self, training_client: tinker.TrainingClient) -> dict[str, float]:
        judge = PairwiseJudge(training_client.save_weights_and_get_sampling_client(), self.renderer)
        prefs = await asyncio.gather(*(
            judge.prefer(c.comparison.prompt_conversation, c.chosen[-1]["content"], c.rejected[-1]["content"])
            for c in self.comparisons
        ))
        return {"judge/accuracy": float(np.mean([p > 0.5 for p in prefs])), "judge/mean_preference": float(np.mean(prefs))}


class ReplyEnv(Env):
    """One reply to ``prompt``; the reward comes from the group (the judge). ``correct`` (when a
    scorer is given) is the ground truth, reported but never rewarded."""

    def __init__(self, renderer: Renderer, prompt: list[Message], index: int, scorer: Scorer | None) -> None:
        self.renderer, self.prompt, self.index, self.scorer = renderer, prompt, index, scorer
        self.reply = ""

    async def initial_observation(self) -> tuple[Observation, StopCondition]:
        return self.renderer.build_generation_prompt(self.prompt), self.renderer.get_stop_sequences()

    async def step(self, action: Action) -> StepResult:
        message, _ = self.renderer.parse_response(action)
        self.reply = message["content"]
        metrics = {"correct": float(self.scorer(self.reply, self.index))} if self.scorer else {}
        return StepResult(0.0, True, tinker.ModelInput.empty(), [], metrics)


@dataclass(frozen=True)
class PairwisePreferenceGroupBuilder(EnvGroupBuilder):
    """``group_size`` replies to one prompt; each one's reward is its mean judged win rate
    against the others (every pair compared once, in both orders)."""

    renderer: Renderer
    judge: PairwiseJudge
    prompt: list[Message]
    index: int
    group_size: int
    scorer: Scorer | None = None

    async def make_envs(self) -> Sequence[Env]:
        return [ReplyEnv(self.renderer, self.prompt, self.index, self.scorer) for _ in range(self.group_size)]

    async def compute_group_rewards(self, trajectories_G: list[Trajectory], envs_G: Sequence[Env]) -> list[float]:
        replies = [env.reply for env in envs_G]  # type: ignore[attr-defined]
        if len(replies) < 2:
            return [0.0] * len(replies)
        pairs = list(itertools.combinations(range(len(replies)), 2))
        prefs = await asyncio.gather(*(self.judge.prefer(self.prompt, replies[i], replies[j]) for i, j in pairs))
        wins = np.zeros(len(replies))
        for (i, j), p in zip(pairs, prefs, strict=True):
            wins[i] += p
            wins[j] += 1.0 - p
        return (wins / (len(replies) - 1)).tolist()

    def logging_tags(self) -> list[str]:
        return ["pairwise"]


class PromptDataset(RLDataset):
    """Batches of ``batch_size`` prompts (cycled), each a :class:`PairwisePreferenceGroupBuilder`."""

    def __init__(self, prompts: Sequence[list[Message]], renderer: Renderer, judge: PairwiseJudge, batch_size: int,
                 group_size: int, n_batches: int, scorer: Scorer | None = None) -> None:
        self.prompts, self.renderer, self.judge = list(prompts), renderer, judge
        self.batch_size, self.group_size, self.n_batches, self.scorer = batch_size, group_size, n_batches, scorer

    def __len__(self) -> int:
        return self.n_batches

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        ids = [(index * self.batch_size + k) % len(self.prompts) for k in range(self.batch_size)]
        return [
            PairwisePreferenceGroupBuilder(self.renderer, self.judge, self.prompts[i], i, self.group_size, self.scorer)
            for i in ids
        ]


class WinRateEvaluator(SamplingClientEvaluator):
    """The policy's greedy reply to each prompt against ``reference``'s: ``{name}/win_rate`` is
    the judge's mean preference for the policy's reply (0.5 when they are the same). With a
    ``scorer``: ``{name}/correct``, ``{name}/reference_correct`` and ``{name}/true_win_rate``
    (1 a win, 0.5 a tie, 0 a loss by the scorer)."""

    def __init__(self, prompts: Sequence[list[Message]], judge: PairwiseJudge, reference: tinker.SamplingClient,
                 renderer: Renderer, max_tokens: int, scorer: Scorer | None = None, name: str = "test") -> None:
        self.prompts, self.judge, self.reference, self.renderer = list(prompts), judge, reference, renderer
        self.max_tokens, self.scorer, self.name = max_tokens, scorer, name

    async def _replies(self, sampler: tinker.SamplingClient) -> list[str]:
        completer = TinkerTokenCompleter(sampler, self.max_tokens, temperature=0.0)
        stop = self.renderer.get_stop_sequences()
        results = await asyncio.gather(*(completer(self.renderer.build_generation_prompt(p), stop) for p in self.prompts))
        return [self.renderer.parse_response(r.tokens)[0]["content"] for r in results]

    async def __call__(self, sampling_client: tinker.SamplingClient) -> dict[str, float]:
        ours, theirs = await asyncio.gather(self._replies(sampling_client), self._replies(self.reference))
        prefs = await asyncio.gather(*(self.judge.prefer(p, a, b) for p, a, b in zip(self.prompts, ours, theirs, strict=True)))
        metrics = {f"{self.name}/win_rate": float(np.mean(prefs))}
        if self.scorer is not None:
            ok = np.array([self.scorer(r, i) for i, r in enumerate(ours)], dtype=float)
            ref_ok = np.array([self.scorer(r, i) for i, r in enumerate(theirs)], dtype=float)
            metrics[f"{self.name}/correct"] = float(ok.mean())
            metrics[f"{self.name}/reference_correct"] = float(ref_ok.mean())
            metrics[f"{self.name}/true_win_rate"] = float(np.mean(0.5 + 0.5 * (ok - ref_ok)))
        return metrics
