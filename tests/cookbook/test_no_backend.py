"""The cookbook runs without the backend installed: it reaches models only through the client."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    class NoBackend(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tinker_backend" or name.startswith("tinker_backend."):
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, NoBackend())

    import tinker_cookbook
    from tinker_cookbook.exceptions import ConfigurationError

    names = [m.name for m in pkgutil.walk_packages(tinker_cookbook.__path__, "tinker_cookbook.")]
    for name in names:
        importlib.import_module(name)
    assert "tinker_cookbook.hyperparam_utils" in names and len(names) > 30, names
    assert not [m for m in sys.modules if m.split(".")[0] == "tinker_backend"]

    from tinker_cookbook.hyperparam_utils import get_lr
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    assert 1e-4 < get_lr("meta-llama/Llama-3.1-8B") < 1e-3
    assert get_lr("tiny-llama") > get_lr("HuggingFaceTB/SmolLM2-135M-Instruct")
    try:  # neither local nor a backend to ask: a clear configuration error
        get_tokenizer("tiny-llama")
    except ConfigurationError as e:
        assert "TINKER_BASE_URL" in str(e), e
    else:
        raise AssertionError("expected a ConfigurationError")
    print("ok", len(names))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(180)  # a subprocess that imports every cookbook module
def test_cookbook_imports_and_runs_without_the_backend(tmp_path: Path):
    src = Path(__file__).resolve().parents[2] / "src"
    env = {k: v for k, v in os.environ.items() if k not in ("TINKER_BASE_URL", "PYTHONPATH")}
    env.update(PYTHONPATH=str(src), HF_HUB_OFFLINE="1", TINKER_CACHE_DIR=str(tmp_path), HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok")
