"""Distillation: the reverse-KL advantages, on-policy distillation learning a trained teacher's
habit on the tiny model, prompt distillation, and both recipes' entry points."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

import tinker
from tinker_cookbook.completers import TokensWithLogprobs
from tinker_cookbook.distillation import on_policy, prompt_distillation
from tinker_cookbook.distillation.datasets import PromptDatasetBuilder, PromptGroupBuilder
from tinker_cookbook.renderers import Message, TrainOnWhat, get_renderer
from tinker_cookbook.rl.types import Trajectory, TrajectoryGroup, Transition
from tinker_cookbook.supervised.data import conversation_to_datum
from tinker_cookbook.utils.plotting import read_metrics

from .conftest import TINY
from .test_recipes import run

# --- advantages against a plain-loop reference --------------------------------------------------


class TableTeacher:
    """``compute_logprobs`` from a table: the logprob of token ``t`` is ``-t / 10``; records prompts."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    async def compute_logprobs(self, prompt: tinker.ModelInput) -> list[float | None]:
        tokens = prompt.to_ints()
        self.seen.append(tokens)
        return [None] + [-t / 10 for t in tokens[1:]]


def reference_advantages(targets, student, mask, teacher_of, kl_coef):
    out = []
    for t, s, m in zip(targets, student, mask, strict=True):
        out.append(-kl_coef * (s - teacher_of(t)) if m else 0.0)
    return out


def test_reverse_kl_advantages_match_a_reference(tiny_tokenizer):
    renderer = get_renderer("chatml", tiny_tokenizer)
    builder = PromptGroupBuilder(
        renderer, (Message(role="user", content="hi"),), 2, (Message(role="system", content="Be brief."),)
    )
    student_prompt = renderer.build_generation_prompt([Message(role="user", content="hi")])
    replies = [([5, 7, 9], [-0.2, -1.5, -3.0]), ([12, 3], [-0.9, -0.1])]
    trajectories = [
        Trajectory([Transition(student_prompt, TokensWithLogprobs(toks, lps), 0.0, True)], tinker.ModelInput.empty())
        for toks, lps in replies
    ]
    group = TrajectoryGroup(trajectories, [0.0, 0.0], [{}, {}])
    teacher = TableTeacher()
    data, masks, metrics = asyncio.run(on_policy.distillation_data([group], [builder], teacher, kl_coef=0.5))  # type: ignore[arg-type]

    teacher_prompt = builder.teacher_prompt().to_ints()
    assert teacher_prompt != student_prompt.to_ints()  # the teacher sees its system prompt
    assert sorted(teacher.seen) == sorted(teacher_prompt + toks for toks, _ in replies)
    diffs = []
    for datum, mask, (toks, lps) in zip(data, masks, replies, strict=True):
        n = student_prompt.length - 1  # target positions before the reply
        assert mask.tolist() == [0.0] * n + [1.0] * len(toks)
        student = [0.0] * n + lps
        expected = reference_advantages(datum.loss_fn_inputs["target_tokens"].tolist(), student, mask, lambda t: -t / 10, 0.5)
        assert datum.loss_fn_inputs["advantages"].tolist() == pytest.approx(expected, abs=1e-6)
        assert datum.loss_fn_inputs["logprobs"].tolist() == pytest.approx(student)
        diffs += [s - (-t / 10) for t, s in zip(toks, lps, strict=True)]
    assert metrics["teacher_kl"] == pytest.approx(np.mean(diffs), abs=1e-6)
    assert on_policy.reverse_kl_advantages(np.array([-1.0, -2.0]), np.array([-3.0, -1.0]), np.array([1.0, 0.0]), 2.0).tolist() == [-4.0, 0.0]


# --- on-policy distillation learns a trained teacher ------------------------------------------

HABIT = "yes yes yes"
QUESTIONS = ["Say something.", "What now?", "Go on.", "Tell me more.", "Hello?", "And then?"]


def train_teacher() -> str:
    """A tiny-llama adapter fine-tuned (briefly) to answer every question with ``HABIT``; its
    sampler path. Trained much longer, the teacher would put nearly all its mass on tokens the
    near-uniform random student never samples, and the per-token reverse KL, which only sees
    the student's samples, would have nothing to follow (KL ~2-12 nats, flat)."""
    service = tinker.ServiceClient()
    client = service.create_lora_training_client(TINY, rank=8, seed=1)
    renderer = get_renderer("chatml", client.get_tokenizer())
    data = [
        conversation_to_datum(
            [Message(role="user", content=q), Message(role="assistant", content=HABIT)], renderer, None,
            TrainOnWhat.LAST_ASSISTANT_MESSAGE,
        )
        for q in QUESTIONS
    ]
    for _ in range(4):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(tinker.AdamParams(learning_rate=1.5e-2))
    return client.save_weights_for_sampler("teacher").result().path


@pytest.mark.slow
@pytest.mark.timeout(480)  # about 100 s on a loaded 2-core machine, 330 s at load 10
def test_on_policy_distillation_kl_falls(tmp_path, embedded):
    teacher_path = train_teacher()
    steps = 12
    config = on_policy.Config(
        log_path=str(tmp_path / "run"), model_name=TINY, teacher_model=teacher_path,
        dataset_builder=PromptDatasetBuilder(QUESTIONS, groups_per_batch=3, group_size=8, n_batches=steps),
        learning_rate=1e-2, max_tokens=6, lora_rank=8, seed=0, save_every=0, eval_every=0,
    )
    # Seeded sampling makes the run reproducible. Measured mean KL, first 2 -> last 4 steps:
    # seed 0: 0.065 -> 0.0029 (ratio 0.045); seed 1: 0.076 -> 0.017 (ratio 0.23).
    asyncio.run(on_policy.main(config))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "teacher_kl" in r]
    kl = [r["teacher_kl"] for r in rows]
    assert len(kl) == steps
    assert np.mean(kl[:2]) > 0.02, kl  # the untrained student differs from the teacher
    assert np.mean(kl[-4:]) < 0.5 * np.mean(kl[:2]), kl
    assert all(abs(r["optim/kl_sample_train_v1"]) < 1e-3 for r in rows)  # on-policy


# --- prompt distillation -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)  # est. 30-60 s loaded
def test_prompt_distillation_trains_on_teacher_answers(tmp_path, embedded):
    queries = [f"Question number {i}?" for i in range(8)]
    config = prompt_distillation.Config(
        log_path=str(tmp_path), model_name=TINY, system_prompt="Answer briefly.", queries=queries,
        test_queries=["A held-out question?", "Another one?"], behaviour=lambda reply: float(len(reply) < 40),
        teacher_max_tokens=8, teacher_temperature=1.0, batch_size=8, num_epochs=3, learning_rate=1e-2, max_steps=3,
        lora_rank=8, eval_every=0, eval_max_tokens=8, seed=0,
        drop_truncated=False,  # the random tiny model rarely stops by itself within 8 tokens
    )
    asyncio.run(prompt_distillation.main(config))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    nll = [r["train_mean_nll"] for r in rows if "train_mean_nll" in r]  # one batch, seen 3 times
    assert len(nll) == 3 and nll[-1] < nll[0], nll
    final = rows[-1]
    assert {"behaviour/score", "behaviour/teacher_score", "behaviour/clean_stop"} <= final.keys()
    lines = (tmp_path / prompt_distillation.TEACHER_DATA_FILE).read_text().splitlines()
    assert all([m["role"] for m in json.loads(line)["messages"]] == ["user", "assistant"] for line in lines)


# --- recipes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "extra", "key"),
    [("on_policy_distillation", ["test_size=4"], "teacher_kl"), ("prompt_distillation", ["filter_by_behaviour=false", "drop_truncated=false"], "train_mean_nll")],
)
@pytest.mark.slow
@pytest.mark.timeout(180)  # a recipe subprocess: est. 30-60 s loaded
def test_recipe_runs_two_steps(tmp_path, recipe, extra, key):
    log_path = tmp_path / "run"
    run(["-m", f"tinker_cookbook.recipes.{recipe}", f"model_name={TINY}", "max_steps=2", f"log_path={log_path}", *extra])
    rows = read_metrics(log_path / "metrics.jsonl")
    assert [r["step"] for r in rows if key in r] == [0, 1]
    assert (log_path / "metrics.png").stat().st_size > 0
