"""Preference data and DPO: the loss against a plain numpy reference, data errors, learning on
the tiny model, and the recipe's entry point."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinker_cookbook.exceptions import DataError
from tinker_cookbook.preference import train_dpo
from tinker_cookbook.preference.datasets import ComparisonFileBuilder, load_comparisons_jsonl
from tinker_cookbook.preference.types import Comparison, LabeledComparison
from tinker_cookbook.recipes.dpo import BUNDLED
from tinker_cookbook.renderers import get_renderer
from tinker_cookbook.supervised.data import datum_from_tokens_weights
from tinker_cookbook.utils.plotting import read_metrics

from .conftest import TINY

REPO = Path(__file__).resolve().parents[2]


def row(label="A", **overrides):
    base = {
        "prompt_conversation": [{"role": "user", "content": "What is 2 + 2?"}],
        "completion_A": [{"role": "assistant", "content": "4."}],
        "completion_B": "5, I think.",
        "label": label,
    }
    return base | overrides


# --- the loss --------------------------------------------------------------------------------


def numpy_dpo(lp_D, w_D, ref_D, beta):
    """DPO from per-token logprobs, written independently: data is [chosen, rejected] * P."""
    pi = np.array([float(np.sum(lp * w)) for lp, w in zip(lp_D, w_D, strict=True)])
    reward = beta * (pi - np.asarray(ref_D))
    chosen, rejected = reward[0::2], reward[1::2]
    margin = chosen - rejected
    loss = np.mean(np.log1p(np.exp(-margin)))
    # d loss / d lp: -(1 - sigmoid(margin)) * beta / P, with opposite signs for the pair.
    coef = -(1 - 1 / (1 + np.exp(-margin))) * beta / len(margin)
    grads = [(coef[i // 2] if i % 2 == 0 else -coef[i // 2]) * w for i, w in enumerate(w_D)]
    metrics = {
        "dpo_loss": loss,
        "accuracy": np.mean(margin > 0),
        "margin": np.mean(margin),
        "chosen_reward": np.mean(chosen),
        "rejected_reward": np.mean(rejected),
    }
    return metrics, grads


def test_dpo_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    lengths = [5, 7, 4, 6, 8, 3]  # three pairs
    data_D, lp_D, w_D = [], [], []
    for n in lengths:
        w = (rng.random(n) > 0.3).astype(np.float32)
        w[-1] = 1.0
        data_D.append(datum_from_tokens_weights(list(range(n + 1)), [0.0, *w.tolist()]))
        lp_D.append(-rng.random(n).astype(np.float32) * 3)
        w_D.append(w)
    ref_D = [float(np.sum(lp * w)) + d for lp, w, d in zip(lp_D, w_D, [0.5, -0.4, -1.0, 0.2, 0.3, 0.1], strict=True)]
    beta = 0.3
    logprobs = [torch.tensor(lp, requires_grad=True) for lp in lp_D]
    loss, metrics = train_dpo.make_dpo_loss_fn(ref_D, beta)(data_D, logprobs)
    loss.backward()
    expected, grads = numpy_dpo(lp_D, w_D, ref_D, beta)
    assert float(loss.detach()) == pytest.approx(expected["dpo_loss"], rel=1e-5)
    assert set(metrics) == set(train_dpo.DPO_METRICS)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert 0 < metrics["accuracy"] < 1  # the fixed deltas give a mixed batch
    for lp, g in zip(logprobs, grads, strict=True):
        np.testing.assert_allclose(lp.grad.numpy(), g, rtol=1e-5, atol=1e-7)


def test_equal_policy_and_reference_give_log_2():
    zeros = torch.zeros(4)
    loss, metrics = train_dpo.dpo_loss_and_metrics(zeros - 3, zeros - 5, zeros - 3, zeros - 5, beta=0.1)
    assert float(loss) == pytest.approx(math.log(2))
    assert metrics["margin"] == 0 and metrics["accuracy"] == 0


def test_datums_weight_only_the_completion(tiny_tokenizer):
    renderer = get_renderer("chatml", tiny_tokenizer)
    comparison = LabeledComparison(
        Comparison(row()["prompt_conversation"], row()["completion_A"], [{"role": "assistant", "content": "5."}]), "B"
    )
    chosen, rejected = train_dpo.comparison_to_datums(comparison, renderer)
    for datum, text in [(chosen, "5."), (rejected, "4.")]:
        targets = datum.loss_fn_inputs["target_tokens"].tolist()
        weights = datum.loss_fn_inputs["weights"].tolist()
        trained = tiny_tokenizer.decode([t for t, w in zip(targets, weights, strict=True) if w])
        assert trained.startswith(text) and "2 + 2" not in trained


# --- data ------------------------------------------------------------------------------------


def test_labeled_comparison_names_the_field():
    with pytest.raises(DataError, match="label: expected 'A' or 'B'"):
        LabeledComparison(Comparison([], [{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]), "C")
    with pytest.raises(DataError, match=r"completion_B: expected a non-empty list"):
        Comparison([], [{"role": "assistant", "content": "x"}], [])
    assert LabeledComparison(Comparison([], [{"role": "a", "content": "x"}], [{"role": "a", "content": "y"}]), "B").chosen[0]["content"] == "y"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", r":2: not valid JSON"),
        (json.dumps(row(label="C")), r":2: label: expected 'A' or 'B', got 'C'"),
        (json.dumps({k: v for k, v in row().items() if k != "completion_A"}), r":2: completion_A: missing"),
        (json.dumps(row(completion_B=[{"role": "assistant"}])), r":2: completion_B\[0\]: expected \{'role': str"),
        (json.dumps(row(prompt_conversation="hi")), r":2: prompt_conversation: expected a list"),
        (json.dumps([1, 2]), r":2: expected a JSON object"),
    ],
    ids=["json", "label", "missing", "message", "prompt", "not-object"],
)
def test_bad_rows_name_line_and_field(tmp_path, bad, message):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(row()) + "\n" + bad + "\n")
    with pytest.raises(DataError, match=f"{path.name}{message}"):
        load_comparisons_jsonl(path)


def test_bundled_file_and_builder():
    comparisons = load_comparisons_jsonl(BUNDLED)
    assert len(comparisons) >= 40
    assert {c.label for c in comparisons} == {"A", "B"}
    train, test = ComparisonFileBuilder(BUNDLED, batch_size=8, test_size=8)()
    assert test is not None and len(test.get_batch(0)) == 8 and len(train) == (len(comparisons) - 8) // 8
    first = train.get_batch(0)
    train.set_epoch(1)
    assert train.get_batch(0) != first  # reshuffled per epoch


# --- training --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)  # est. 30-60 s loaded
def test_dpo_learns_on_tiny_model(tmp_path, embedded):
    """On 8 fixed pairs, the loss starts at log(2) (policy == reference) and falls well below
    it, and the share of pairs ranked right rises to (nearly) all of them."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(Path(BUNDLED).read_text().splitlines(keepends=True)[:8]))
    config = train_dpo.Config(
        log_path=str(tmp_path / "run"),
        model_name=TINY,
        dataset_builder=ComparisonFileBuilder(str(data), batch_size=8),
        beta=0.1,
        learning_rate=2e-3,
        lr_schedule="constant",
        num_epochs=100,
        max_steps=10,
        lora_rank=8,
        save_every=0,
        seed=0,
    )
    asyncio.run(train_dpo.main(config))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    loss = [r["dpo_loss"] for r in rows if "dpo_loss" in r]
    accuracy = [r["accuracy"] for r in rows if "accuracy" in r]
    assert len(loss) == 10
    assert loss[0] == pytest.approx(math.log(2), abs=1e-3)  # the reference is the initial weights
    assert max(loss[-3:]) < math.log(2) - 0.25, loss
    assert min(accuracy[-3:]) >= 0.875 and accuracy[-1] > accuracy[0], accuracy
    assert rows[-1]["margin"] > 0 and rows[-1]["chosen_reward"] > rows[-1]["rejected_reward"]


@pytest.mark.slow
@pytest.mark.timeout(180)  # a recipe subprocess: est. 30-60 s loaded
def test_recipe_runs_two_steps(tmp_path):
    log_path = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TINKER_BASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "tinker_cookbook.recipes.dpo", f"model_name={TINY}", "max_steps=2", f"log_path={log_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_metrics(log_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "dpo_loss" in r] == [0, 1]
    for key in train_dpo.DPO_METRICS:
        assert all(key in r for r in rows if "dpo_loss" in r), key
    first = next(r for r in rows if "dpo_loss" in r)
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3)  # the reference is the initial weights
    assert 0 < rows[-1]["test/dpo_loss"] < 2 * math.log(2)  # held-out pairs, after two small steps
    assert (log_path / "metrics.png").stat().st_size > 0
