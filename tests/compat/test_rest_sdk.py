"""The official SDK's ``RestClient`` (0.38.0) and its ``tinker`` CLI, unchanged, against
``tinker-server``: sessions, publishing, TTLs, external weights with signed URLs, and
``tinker checkpoint list / download`` (a training checkpoint is exported through a temporary
``external_weights`` checkpoint, downloaded by signed URLs, then deleted)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import tinker
from tinker import types

from .conftest import TINY, CompatServer


@pytest.fixture
def service() -> Iterator[tinker.ServiceClient]:
    with tinker.ServiceClient() as service:  # base URL and API key come from the environment
        yield service


def trained(service: tinker.ServiceClient, seed: int) -> tinker.TrainingClient:
    tc = service.create_lora_training_client(TINY, rank=4, seed=seed).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 5, 9, 13]),
        loss_fn_inputs={"target_tokens": [5, 9, 13, 2], "weights": [1.0] * 4},
    )
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return tc


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tinker.cli", "--format", "json", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_sessions_publish_and_ttl(service: tinker.ServiceClient) -> None:
    tc = trained(service, seed=11)
    session_id = tc.model_id.split(":train:")[0]
    path = tc.save_weights_for_sampler("published").result().path
    sampler = service.create_sampling_client(model_path=path).result()
    rest = tinker.RestClient()

    assert session_id in rest.list_sessions(limit=100).result().sessions
    session = rest.get_session(session_id).result()
    assert session.training_run_ids == [tc.model_id]
    assert len(session.sampler_ids) == 1 and session.sampler_ids[0].startswith(f"{session_id}:sample:")

    def public() -> bool:
        (checkpoint,) = [c for c in rest.list_checkpoints(tc.model_id).result().checkpoints if c.tinker_path == path]
        return checkpoint.public

    rest.publish_checkpoint_from_tinker_path(path).result()
    assert public()
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    assert not public()
    rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result()
    rest.set_checkpoint_ttl_from_tinker_path(path, None).result()
    (checkpoint,) = [c for c in rest.list_user_checkpoints(limit=1000).result().checkpoints if c.tinker_path == path]
    assert checkpoint.expires_at is None

    rest.delete_checkpoint_from_tinker_path(path).result()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    with pytest.raises(Exception, match="was deleted, has expired or was unpublished"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result(timeout=60)


def test_external_weights_by_signed_urls(service: tinker.ServiceClient, compat_server: CompatServer) -> None:
    tc = trained(service, seed=12)
    saved = tc.save_weights_external("export", ttl_seconds=3600).result()
    assert saved.path == f"tinker://{tc.model_id}/external_weights/export"
    rest = tinker.RestClient()
    (listed,) = [c for c in rest.list_checkpoints(tc.model_id).result().checkpoints if c.tinker_path == saved.path]
    assert listed.checkpoint_type == "external"

    answer = rest.get_external_weights_urls(saved.path).result()
    assert sorted(answer.urls) == ["adapter_config.json", "adapter_model.safetensors"]
    downloaded = {}
    for name, url in answer.urls.items():
        assert url.startswith(compat_server.base_url)
        with urllib.request.urlopen(url, timeout=30) as reply:
            downloaded[name] = reply.read()
    assert json.loads(downloaded["adapter_config.json"])["r"] == 4

    with pytest.raises(urllib.error.HTTPError) as tampered:
        urllib.request.urlopen(answer.urls["adapter_config.json"].replace("signature=", "signature=0"), timeout=30)
    assert tampered.value.code == 403
    rest.delete_checkpoint_from_tinker_path(saved.path).result()
    with pytest.raises(urllib.error.HTTPError) as gone:
        urllib.request.urlopen(answer.urls["adapter_config.json"], timeout=30)
    assert gone.value.code == 410


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_cli_lists_and_downloads_checkpoints(service: tinker.ServiceClient, tmp_path: Path) -> None:
    tc = trained(service, seed=13)
    state = tc.save_state("for-cli").result().path
    external = tc.save_weights_external("for-cli").result().path

    listed = cli("checkpoint", "list", "--run-id", tc.model_id)
    assert listed.returncode == 0, listed.stderr
    assert {state, external} <= {c["tinker_path"] for c in json.loads(listed.stdout)["checkpoints"]}

    for path in (external, state):  # the training checkpoint goes through a temporary export
        done = cli("checkpoint", "download", path, "--output", str(tmp_path))
        assert done.returncode == 0, done.stderr
        folder = tmp_path / path.removeprefix("tinker://").replace("/", "_")
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    exported = (tmp_path / external.removeprefix("tinker://").replace("/", "_") / "adapter_model.safetensors")
    via_state = (tmp_path / state.removeprefix("tinker://").replace("/", "_") / "adapter_model.safetensors")
    assert exported.read_bytes() == via_state.read_bytes()  # the same weights, whichever way
    left = [c.checkpoint_id for c in tinker.RestClient().list_user_checkpoints(limit=1000).result().checkpoints]
    assert "external_weights/download" not in left  # the CLI deleted its temporary export
