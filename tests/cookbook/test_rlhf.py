"""RLHF: the verifier-labelled pairs, the pairwise judge's preference arithmetic, judge-ranked
group rewards, and the three-stage pipeline end to end on the tiny model."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

import tinker
from tinker_cookbook.checkpoint_utils import load_checkpoints
from tinker_cookbook.completers import TokensWithLogprobs
from tinker_cookbook.preference.judge import (
    PairwiseJudge,
    PairwisePreferenceGroupBuilder,
    judge_training_rows,
)
from tinker_cookbook.recipes.rlhf import train as rlhf
from tinker_cookbook.recipes.rlhf.data import accepted, comparisons, questions, sft_rows
from tinker_cookbook.renderers import get_renderer
from tinker_cookbook.rl.rollouts import do_group_rollout
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.plotting import read_metrics

from .conftest import TINY


@pytest.fixture
def renderer(tiny_tokenizer):
    return get_renderer("chatml", tiny_tokenizer)


def test_pairs_are_labelled_by_the_scorer():
    qa = questions(40, seed=3)
    assert len({q for q, _ in qa}) == 40
    pairs = comparisons(qa, seed=3)
    assert {p.label for p in pairs} == {"A", "B"}
    for (question, answer), pair in zip(qa, pairs, strict=True):
        assert pair.comparison.prompt_conversation[-1]["content"] == question
        assert accepted(pair.chosen[0]["content"], answer) and not accepted(pair.rejected[0]["content"], answer)
    assert accepted(" 12.", "12") and not accepted("12 apples", "12") and not accepted("The answer is 12.", "12")
    assert [r["messages"][-1] for r in sft_rows(pairs[:2])] == [pairs[0].chosen[0], pairs[1].chosen[0]]
    rows = judge_training_rows(pairs[:1])
    assert [r["messages"][-1]["content"] for r in rows] == ["A", "B"]  # both orders: position carries no signal
    chosen = pairs[0].chosen[0]["content"]
    assert f"Reply A: {chosen}\n" in rows[0]["messages"][1]["content"] and f"Reply B: {chosen}\n" in rows[1]["messages"][1]["content"]


class FakeJudgeSampler:
    """A judge whose logprob of the answer token is ``score(reply in that slot)``: it likes
    replies by their length, and a little the first slot (a position bias)."""

    def __init__(self, renderer) -> None:
        self.renderer = renderer
        self.calls = 0

    def compute_logprobs(self, prompt: tinker.ModelInput):
        self.calls += 1
        ints = prompt.to_ints()
        text = self.renderer.tokenizer.decode(ints[:-1])
        a = text.split("Reply A: ")[1].split("\n")[0]
        b = text.split("Reply B: ")[1].split("\n")[0]
        slot_a = ints[-1] == self.renderer.encode("A")[0]
        logit = 0.1 * len(a if slot_a else b) + (0.3 if slot_a else 0.0)

        async def result():
            return [None] * (len(ints) - 1) + [logit]

        return result()


def test_judge_preference_is_order_free(renderer):
    judge = PairwiseJudge(FakeJudgeSampler(renderer), renderer)  # type: ignore[arg-type]
    prompt = [{"role": "user", "content": "What is 1 + 1?"}]
    p = asyncio.run(judge.prefer(prompt, "a longer reply", "short"))
    q = asyncio.run(judge.prefer(prompt, "short", "a longer reply"))
    assert p + q == pytest.approx(1.0) and p > 0.5
    # forward: sigmoid(0.1*14 + 0.3 - 0.1*5); backward (longer reply in slot B): sigmoid(0.1*5 + 0.3 - 0.1*14)
    expected = 0.5 * (1 / (1 + math.exp(-1.2)) + 1 - 1 / (1 + math.exp(0.6)))
    assert p == pytest.approx(expected)
    assert asyncio.run(judge.prefer(prompt, "same", "same")) == 0.5


class ScriptedReplies:
    def __init__(self, renderer, replies) -> None:
        self.renderer, self.replies = renderer, list(replies)

    async def __call__(self, model_input, stop):
        tokens = [*self.renderer.encode(self.replies.pop(0)), stop[0]]
        return TokensWithLogprobs(tokens, [-1.0] * len(tokens))


def test_group_reward_is_the_judged_win_rate(renderer):
    sampler = FakeJudgeSampler(renderer)
    judge = PairwiseJudge(sampler, renderer)  # type: ignore[arg-type]
    prompt = [{"role": "user", "content": "Say something."}]
    builder = PairwisePreferenceGroupBuilder(renderer, judge, prompt, 0, 3, scorer=lambda reply, i: reply == "bb")
    group = asyncio.run(do_group_rollout(builder, ScriptedReplies(renderer, ["a", "bb", "bb"])))  # type: ignore[arg-type]
    rewards = group.get_total_rewards()
    assert np.mean(rewards) == pytest.approx(0.5)  # pairwise wins are zero-sum
    assert rewards[1] == rewards[2] > rewards[0]  # the judge prefers longer replies
    assert sampler.calls == 2 * 4  # (a, bb) twice; identical replies are not sent to the judge
    assert [m["correct"] for m in group.metrics_G] == [0.0, 1.0, 1.0]


TINY_ARGS = [
    f"model_name={TINY}", "lora_rank=8", "sft_steps=6", "judge_steps=10", "max_steps=2", "eval_every=2", "n_train=64",
    "n_test=16", "max_tokens=4", "sft_learning_rate=1e-2", "judge_learning_rate=1e-2", "learning_rate=1e-2",
]


@pytest.mark.slow
@pytest.mark.timeout(600)  # 6 SFT + 10 judge + 2 RL steps and the evaluations: est. 2-5 min loaded
def test_three_stages_on_the_tiny_model(tmp_path, embedded):
    asyncio.run(rlhf.main(parse_cli(rlhf.CLIConfig, [f"log_path={tmp_path}", *TINY_ARGS])))
    sft = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    nll = [r["train_mean_nll"] for r in sft if "train_mean_nll" in r]
    assert len(nll) == 6 and nll[-1] < 0.6 * nll[0], nll  # measured 7.70 -> 3.08
    judge = read_metrics(tmp_path / "judge" / "metrics.jsonl")
    judge_nll = [r["train_mean_nll"] for r in judge if "train_mean_nll" in r]
    # The judge learns to answer A or B (NLL near log 2: measured 7.67 -> 0.70); which one, the
    # random tiny model cannot learn in 10 steps (held-out accuracy measured 0.375: chance).
    assert len(judge_nll) == 10 and judge_nll[-1] < 1.0, judge_nll
    accuracy = [r["judge/accuracy"] for r in judge if "judge/accuracy" in r]
    assert len(accuracy) == 2 and all(0.0 <= a <= 1.0 for a in accuracy)  # before and after, on 16 held-out pairs
    rl = read_metrics(tmp_path / "rl" / "metrics.jsonl")
    steps = [r for r in rl if "reward/total" in r]
    assert len(steps) == 2 and all(r["reward/total"] == pytest.approx(0.5) for r in steps)  # mean pairwise win rate
    evals = [r for r in rl if "test/win_rate" in r]
    # At step 0 the policy is the SFT model: greedy replies are identical, so exactly 0.5.
    assert evals[0]["step"] == 0 and evals[0]["test/win_rate"] == 0.5 and evals[0]["test/true_win_rate"] == 0.5
    assert evals[-1]["step"] == 2
    for stage in ("sft", "judge", "rl"):  # each stage's final checkpoint, read by the next
        assert any(r.get("final") for r in load_checkpoints(tmp_path / stage)), stage
