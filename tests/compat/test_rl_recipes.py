"""The official cookbook's own RL recipes, at their default loss (``stable_reinforce``), against
our server: ``math_rl`` on its arithmetic environment (synchronous and async), and ``rl_loop``.

Their defaults sample with ``record_stability_info=True`` and send every datum with provenance
spans, so each step here exercises recording, span checks and the loss over the HTTP protocol.
On the tiny random model the rewards barely vary; what these tests check is that the recipes
run to the end, unchanged, and log their reward and training columns. Learning is measured on
SmolLM2 (docs/compat.md) and, for the loss itself, in tests/test_stable_reinforce.py.

The official RL loops log no loss: ``rl.train.train_step`` keeps only the ``logprobs`` of
``forward_backward``'s answer and merges ``optim_step``'s metrics, and ``rl_loop`` drops the
answer. So the columns checked are those, and the loss per step is read from our server's own
run history (the console's JSON), which records every ``forward_backward``'s ``loss:sum``.
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.request
from pathlib import Path
from typing import Any

import datasets
import pytest

from tinker_cookbook import model_info
from tinker_cookbook.recipes import rl_loop
from tinker_cookbook.recipes.math_rl import train as math_rl

from .conftest import API_KEY, TINY, CompatServer

RECIPE_LEARNING_RATE = 1e-5  # math_rl.CLIConfig's default, checked in run_math_rl


def metrics_of(log_path: Path, column: str) -> list[dict[str, Any]]:
    """The rows of the run's ``metrics.jsonl`` that have ``column`` (one per training step)."""
    lines = (log_path / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if column in row]


def run_math_rl(log_path: Path, **overrides: Any) -> list[dict[str, Any]]:
    """``math_rl``'s own CLI entry point (``cli_main``), arithmetic env, default loss."""
    config = math_rl.CLIConfig(
        model_name=TINY,
        renderer_name="role_colon",
        lora_rank=8,
        groups_per_batch=2,
        max_steps=2,
        eval_every=0,
        save_every=0,
        log_path=str(log_path),
        behavior_if_log_dir_exists="delete",
        **overrides,
    )
    assert config.env == "arithmetic" and config.loss_fn == "stable_reinforce"
    assert config.learning_rate == RECIPE_LEARNING_RATE
    asyncio.run(math_rl.cli_main(config))
    return metrics_of(log_path, "env/all/reward/total")


def check_rl_columns(rows: list[dict[str, Any]], steps: int) -> None:
    assert [row["step"] for row in rows] == list(range(steps))
    for row in rows:
        assert -1.0 <= row["env/all/reward/total"] <= 1.0
        assert row["env/all/total_episodes"] == 8
        # The trainer's logprobs came back for every sampled token and equal the sampler's.
        assert abs(row["optim/kl_sample_train_v1"]) < 1e-3, row
        # optim_step's metrics, as our server answers them; forward_backward's are not logged.
        assert row["grad_norm:max"] >= 0.0
        assert row["learning_rate:max"] == RECIPE_LEARNING_RATE
        assert not [key for key in row if "loss" in key], row


def console(server: CompatServer, path: str) -> Any:
    request = urllib.request.Request(server.base_url + path, headers={"X-API-Key": API_KEY})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def run_ids(server: CompatServer) -> set[str]:
    return {run["run_id"] for run in console(server, "/console/api/runs")["runs"]}


def server_losses(server: CompatServer, before: set[str]) -> list[float]:
    """The loss per token of each step of the one run made since ``before``, from our history."""
    (run_id,) = run_ids(server) - before
    history = console(server, f"/console/api/runs/{run_id}")["history"]
    return [point["loss_sum"] / point["weight_sum"] for point in history]


@pytest.mark.slow
@pytest.mark.timeout(240)  # 15 s on an idle 2-core machine
def test_math_rl_arithmetic_with_its_defaults(
    tmp_path: Path, tiny_tokenizer: None, compat_server: CompatServer
) -> None:
    before = run_ids(compat_server)
    check_rl_columns(run_math_rl(tmp_path / "math_rl"), steps=2)
    losses = server_losses(compat_server, before)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses


@pytest.mark.slow
@pytest.mark.timeout(240)  # 10 s on an idle 2-core machine
def test_math_rl_async_trains_on_stale_samples(tmp_path: Path, tiny_tokenizer: None) -> None:
    """Async mode (``AsyncConfig.loss_fn`` defaults to ``stable_reinforce``): the second step
    trains on sequences sampled by the first step's sampler."""
    rows = run_math_rl(tmp_path / "async", max_steps_off_policy=1)
    check_rl_columns(rows, steps=2)
    assert rows[1]["async/staleness_max"] == 1


@pytest.mark.slow
@pytest.mark.timeout(240)  # 15 s on an idle 2-core machine
def test_rl_loop_core_with_a_local_dataset(
    tmp_path: Path, tiny_tokenizer: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rl_loop.main`` unchanged but for three things a tiny offline model needs: GSM8K from a
    local ``Dataset`` instead of the Hub, the ``role_colon`` renderer (the registry does not
    know ``tiny-llama``), and a reward the random model can earn (a group whose rewards are
    all equal is skipped, and the tiny model never writes a ``\\boxed`` answer)."""
    local = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({
            "question": [f"What is {a} + {a + 3}?" for a in range(8)],
            "answer": [f"#### {2 * a + 3}" for a in range(8)],
        })}
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: local)
    monkeypatch.setattr(model_info, "get_recommended_renderer_name", lambda name: "role_colon")
    monkeypatch.setattr(rl_loop, "get_reward", lambda response, answer: float(len(response) % 2))
    config = rl_loop.Config(
        log_path=str(tmp_path / "rl_loop"),
        model_name=TINY,
        batch_size=2,
        group_size=4,
        lora_rank=8,
        max_tokens=8,
        max_steps=2,
        save_every=0,
        ttl_seconds=None,
    )
    assert config.loss_fn == "stable_reinforce"
    rl_loop.main(config)
    rows = metrics_of(tmp_path / "rl_loop", "reward/total")
    assert [row["progress/batch"] for row in rows] == [0, 1]
    for row in rows:
        assert 0.0 <= row["reward/total"] <= 1.0
    # At least one step had mixed rewards, so it trained (its optim_step metrics are logged).
    assert any("grad_norm:max" in row for row in rows), rows
