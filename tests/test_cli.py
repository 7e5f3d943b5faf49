"""The ``tinker`` command line against a real server (in-process ``main`` and real subprocesses),
and on the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TENANT_KEYS, TINY, ServerProcess

import tinker
from tinker.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from tinker.types import AdamParams, Datum, ModelInput


def _train_and_save(server: ServerProcess) -> tuple[str, str, str]:
    """A tiny run of olga's with one step, a sampler checkpoint and a state checkpoint. No other
    test uses her key, so the keyed server's per-key storage limit is hers alone."""
    service = tinker.ServiceClient(base_url=server.base_url, api_key=TENANT_KEYS["olga"])
    tc = service.create_lora_training_client(TINY, rank=4, seed=3)
    tokens = tc.get_tokenizer().encode("the command line")
    datum = Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    tc.forward_backward([datum], "cross_entropy")
    tc.optim_step(AdamParams(learning_rate=1e-2)).result()
    sampler_path = tc.save_weights_for_sampler("cli").result().path
    state_path = tc.save_state("cli-state").result().path
    model_id = tc.model_id
    service.close().result(timeout=30)
    return model_id, sampler_path, state_path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cli_commands_against_a_server(
    keyed_server: ServerProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run_id, sampler_path, state_path = _train_and_save(keyed_server)
    monkeypatch.setenv("TINKER_BASE_URL", keyed_server.base_url)
    monkeypatch.setenv("TINKER_API_KEY", TENANT_KEYS["olga"])

    code, out, _ = run_cli(capsys, "run", "list")
    assert code == EXIT_OK and run_id in out and out.splitlines()[0].startswith("TRAINING_RUN_ID")
    code, out, _ = run_cli(capsys, "--json", "run", "info", sampler_path)
    assert code == EXIT_OK and json.loads(out)["training_run_id"] == run_id
    code, out, _ = run_cli(capsys, "--format", "json", "checkpoint", "list", "--run-id", run_id)
    assert code == EXIT_OK and {c["tinker_path"] for c in json.loads(out)} == {sampler_path, state_path}
    code, out, _ = run_cli(capsys, "--json", "checkpoint", "info", sampler_path)
    info = json.loads(out)
    assert (info["base_model"], info["lora_rank"], info["tinker_path"]) == (TINY, 4, sampler_path)

    assert run_cli(capsys, "checkpoint", "set-ttl", state_path, "7200")[0] == EXIT_OK
    code, out, _ = run_cli(capsys, "--json", "checkpoint", "list", "--run-id", run_id)
    expires = {c["tinker_path"]: c["expires_at"] for c in json.loads(out)}
    assert expires[state_path] is not None and expires[sampler_path] is None

    code, out, _ = run_cli(capsys, "checkpoint", "download", sampler_path, "-o", str(tmp_path / "dl"))
    assert code == EXIT_OK and (tmp_path / "dl" / "adapter_model.safetensors").is_file(), out
    code, out, _ = run_cli(capsys, "export", "adapter", sampler_path, str(tmp_path / "adapter"))
    assert code == EXIT_OK and (tmp_path / "adapter" / "adapter_config.json").is_file(), out
    code, out, _ = run_cli(capsys, "export", "merged", sampler_path, str(tmp_path / "merged"), "--dtype", "float32")
    assert code == EXIT_OK and (tmp_path / "merged" / "config.json").is_file(), out
    assert list((tmp_path / "merged").glob("*.safetensors"))

    code, out, _ = run_cli(capsys, "--json", "sample", sampler_path, "the command", "--max-tokens", "4", "--n", "2")
    rows = json.loads(out)
    assert code == EXIT_OK and len(rows) == 2 and all(1 <= r["tokens"] <= 4 for r in rows)

    assert run_cli(capsys, "checkpoint", "delete", state_path)[0] == EXIT_OK
    code, _, err = run_cli(capsys, "checkpoint", "info", state_path)
    assert code == EXIT_FAILED and "unknown checkpoint" in err


def test_cli_refuses_bad_usage_and_other_keys_things(
    keyed_server: ServerProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINKER_BASE_URL", keyed_server.base_url)
    monkeypatch.setenv("TINKER_API_KEY", TENANT_KEYS["bob"])
    code, _, err = run_cli(capsys, "checkpoint", "info", "tinker://someone:train:0/sampler_weights/x")
    assert code == EXIT_FAILED and "unknown" in err
    code, _, err = run_cli(capsys, "checkpoint", "info", "/etc/passwd")
    assert code == EXIT_USAGE and "path: expected 'tinker://" in err
    with pytest.raises(SystemExit) as exited:
        main(["checkpoint"])
    assert exited.value.code == EXIT_USAGE


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TINKER_BASE_URL", "TINKER_API_KEY")}
    return {**env, **extra}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cli_as_a_command_on_the_embedded_default(tmp_path: Path) -> None:
    env = _subprocess_env(TINKER_DATA_DIR=str(tmp_path / "data"))
    listed = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "--json", "model", "list"], env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == EXIT_OK, listed.stderr
    assert TINY in {m["model_name"] for m in json.loads(listed.stdout)}
    sampled = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "sample", TINY, "hello", "--max-tokens", "3"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert sampled.returncode == EXIT_OK, sampled.stderr
    assert sampled.stdout.splitlines()[0].split() == ["INDEX", "STOP_REASON", "TOKENS", "TEXT"]
    refused = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "sample", "no-such/model", "hi"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert refused.returncode == EXIT_FAILED and "base_model" in refused.stderr
