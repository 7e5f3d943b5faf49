"""The examples run as users run them: as scripts, on the embedded backend, with the tiny model."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, tmp_path: Path) -> str:
    env = {"TINKER_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    import os

    env.update({k: v for k, v in os.environ.items() if k in ("HOME", "TINKER_CACHE_DIR", "HF_HOME")})
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Task was destroyed" not in result.stderr
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(150)  # an example in a subprocess: 15-40 s loaded
def test_quickstart(tmp_path):
    out = run_example("quickstart.py", "--model", "tiny-llama", "--steps", "12", "--lr", "5e-3", tmp_path=tmp_path)
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0], out
    assert "saved tinker://" in out and "after training:" in out


@pytest.mark.slow
@pytest.mark.timeout(150)  # an example in a subprocess: 15-40 s loaded
def test_async_agent(tmp_path):
    out = run_example("async_agent.py", "--model", "tiny-llama", "--steps", "10", tmp_path=tmp_path)
    assert "loss" in out and "never blocked" in out
    first, last = (float(x) for x in out.split("loss ")[1].split(" in ")[0].split(" -> "))
    assert last < first
    ticks = int(out.split("ticked ")[1].split()[0])
    assert ticks > 20


@pytest.mark.slow
@pytest.mark.timeout(300)  # SmolLM2-135M: est. 60-100 s loaded
@pytest.mark.smollm2
def test_quickstart_smollm2_learns_the_fact(tmp_path):
    out = run_example("quickstart.py", "--steps", "12", tmp_path=tmp_path)
    assert "Blue Falcon" in out.split("after training:")[1], out
