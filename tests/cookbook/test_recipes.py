"""Every recipe's real entry point (``python -m ...``) for 2 steps on the tiny model, and the
RL actor-loop example at a small size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinker_cookbook.utils.plotting import read_metrics

from .conftest import TINY

REPO = Path(__file__).resolve().parents[2]

RECIPES = [
    ("sl_loop", [], "train_mean_nll"),
    ("sl_basic", [], "train_mean_nll"),
    ("rl_loop", [], "reward/total"),
    ("rl_basic", ["mode=async"], "reward/total"),
    ("math_rl.train", ["env=arithmetic", "mode=stream", "test_size=4"], "reward/total"),
    ("math_rl.train", ["env=gsm", "max_tokens=16", "batch_size=2", "group_size=2", "test_size=2"], "reward/total"),
]


def run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TINKER_BASE_URL"}
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.timeout(180)  # a recipe subprocess: 15-40 s loaded
@pytest.mark.parametrize(("recipe", "extra", "key"), RECIPES, ids=[f"{r}-{'-'.join(e)}" for r, e, _ in RECIPES])
def test_recipe_runs_two_steps(tmp_path, recipe, extra, key):
    if "env=gsm" in extra:
        pytest.importorskip("reasoning_gym")
    log_path = tmp_path / "run"
    run(["-m", f"tinker_cookbook.recipes.{recipe}", f"model_name={TINY}", "max_steps=2", f"log_path={log_path}", *extra])
    rows = read_metrics(log_path / "metrics.jsonl")
    assert [r["step"] for r in rows if key in r] == [0, 1]
    assert (log_path / "metrics.png").stat().st_size > 0
    assert (log_path / "config.json").exists()


def test_recipe_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    result = subprocess.run(
        [sys.executable, "-m", "tinker_cookbook.recipes.sl_loop", f"log_path={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "log_path: " in result.stderr and "if_exists=resume" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(180)  # est. 45 s loaded
def test_rl_actor_loop_example(tmp_path):
    result = run(["examples/rl_actor_loop.py", f"model_name={TINY}", "steps=3", "actors=4", "groups_per_step=2"])
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == ["step 0", "step 1", "step 2"]
    assert any(line.startswith("throughput: ") and "samples/s" in line for line in lines)
