"""API keys, tenant isolation and per-key limits, against real ``tinker-server`` processes.

``keyed_server`` (conftest) knows the keys of ``TENANT_KEYS`` through a keys file; each test
uses its own tenants, so their per-key limits do not interfere.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import aiohttp
import pytest
from conftest import KEYED_LIMITS, TENANT_KEYS, ServerProcess, free_port
from native_wire import DATA, TINY, RawClient, fb, loss

import tinker
from tinker import wire
from tinker.types import LoraConfig, ModelInput, SamplingParams, TrainingRunsResponse
from tinker_backend import model_registry


def keys_cli(data_dir, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tinker_backend.cli", "keys", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )


async def http(server, method: str, path: str, key: str | None = None, **kwargs) -> tuple[int, dict]:
    headers = {"X-API-Key": key} if key else {}
    async with aiohttp.ClientSession() as session, session.request(
        method, server.base_url + path, headers=headers, **kwargs
    ) as reply:
        return reply.status, await reply.json(content_type=None)


async def test_every_route_but_health_needs_a_valid_key_on_both_protocols(keyed_server):
    assert await http(keyed_server, "GET", "/api/v1/healthz") == (200, {"status": "ok"})
    for key, problem in ((None, "got none"), ("tml-not-a-key-of-this-server", "unknown or revoked")):
        status, body = await http(keyed_server, "POST", "/api/v1/create_session", key, json={})
        assert status == 401 and body["error"].startswith("X-API-Key: expected") and problem in body["error"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with RawClient(keyed_server.base_url, key):
                pass
        assert refused.value.status == 401
    status, body = await http(keyed_server, "GET", "/api/v1/training_runs", TENANT_KEYS["alice"])
    assert status == 200, body

    bad = tinker.ServiceClient(base_url=keyed_server.base_url, api_key="tml-wrong")
    with pytest.raises(tinker.AuthenticationError, match=r"refused the connection with 401 .*API key"):
        await bad.get_server_capabilities()
    await bad.close()


async def test_keys_are_created_listed_and_revoked_without_a_restart(keyed_server):
    data_dir = keyed_server.log.parent / "data"
    created = keys_cli(data_dir, "create", "--owner", "gina")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("tml-") and len(key) > 40
    listed = keys_cli(data_dir, "list")
    [line] = [line for line in listed.stdout.splitlines() if " gina " in line]
    key_id = line.split()[0]
    assert line.endswith("active")

    async with RawClient(keyed_server.base_url, key) as gina:
        assert isinstance(await gina.call(wire.ListTrainingRuns()), TrainingRunsResponse)
        revoked = keys_cli(data_dir, "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        failure = await gina.call(wire.ListTrainingRuns())  # the open connection is cut too
        assert isinstance(failure, wire.Failure) and failure.status == 401 and "revoked" in failure.message
    with pytest.raises(aiohttp.WSServerHandshakeError):
        async with RawClient(keyed_server.base_url, key):
            pass
    assert "revoked" in keys_cli(data_dir, "list").stdout
    assert keys_cli(data_dir, "revoke", key_id).returncode == 1  # not active any more

    # The keys file is re-read when it changes: a line added works at once, a line removed is revoked.
    keys_file = keyed_server.keys_file
    original = keys_file.read_text()
    keys_file.write_text(original + "tml-hank-kkkkkkkkkkkkkkkkkkkkkkkk hank\n")
    assert (await http(keyed_server, "GET", "/api/v1/training_runs", "tml-hank-kkkkkkkkkkkkkkkkkkkkkkkk"))[0] == 200
    keys_file.write_text(original)
    assert (await http(keyed_server, "GET", "/api/v1/training_runs", "tml-hank-kkkkkkkkkkkkkkkkkkkkkkkk"))[0] == 401


def test_a_non_loopback_address_without_keys_is_refused_unless_allowed(tmp_path):
    command = [sys.executable, "-m", "tinker_backend.cli", "--host", "0.0.0.0", "--port", str(free_port())]
    refused = subprocess.run([*command, "--data-dir", str(tmp_path / "a")], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "refusing to serve 0.0.0.0" in refused.stderr
    allowed = ServerProcess(tmp_path / "b", "--host", "0.0.0.0", "--allow-no-auth")
    assert allowed.stop() == 0


async def test_a_key_sees_and_touches_only_its_own_work(keyed_server):
    alice = tinker.ServiceClient(base_url=keyed_server.base_url, api_key=TENANT_KEYS["alice"])
    tc = await alice.create_lora_training_client(TINY, rank=4, seed=0)
    tc.forward_backward(DATA, "cross_entropy")
    tc.optim_step(tinker.AdamParams(learning_rate=1e-2))
    state = (await tc.save_state("a1")).path
    sampler_path = (await tc.save_weights_for_sampler("s1")).path
    sampler = await alice.create_sampling_client(model_path=sampler_path)
    alice_sample = await sampler.sample(ModelInput.from_ints([1, 2, 3]), 1, SamplingParams(max_tokens=4, seed=1))
    alice_session = tc.model_id.split(":")[0]

    bob = tinker.ServiceClient(base_url=keyed_server.base_url, api_key=TENANT_KEYS["bob"])
    rest = bob.create_rest_client()
    assert tc.model_id not in [r.training_run_id for r in (await rest.list_training_runs(limit=100)).training_runs]
    assert state not in [c.tinker_path for c in (await rest.list_user_checkpoints()).checkpoints]
    for future in (
        rest.get_training_run(tc.model_id),
        rest.list_checkpoints(tc.model_id),
        rest.get_weights_info_by_tinker_path(state),
        rest.delete_checkpoint_from_tinker_path(state),
        bob.create_training_client_from_state(state),
        bob.create_sampling_client(model_path=sampler_path),
    ):
        with pytest.raises(tinker.NotFoundError):
            await future
    async with RawClient(keyed_server.base_url, TENANT_KEYS["bob"]) as raw:
        for request in (
            fb(tc.model_id, 99),
            wire.GetInfo(model_id=tc.model_id),
            wire.Heartbeat(session_id=alice_session),
            wire.CreateModel(session_id=alice_session, model_seq_id=7, base_model=TINY, lora_config=LoraConfig(rank=4)),
            wire.CreateSamplingSession(sampling_session_id=f"{alice_session}:sample:9", base_model=TINY),
            wire.GetSampler(sampling_session_id=sampler.sampling_session_id),
            # The very (sampler, seq_id) alice asked: her answer is cached, and still not bob's.
            wire.Sample(sampling_session_id=sampler.sampling_session_id, seq_id=1,
                         prompt=ModelInput.from_ints([1, 2, 3]), num_samples=1, sampling_params=SamplingParams(max_tokens=4, seed=1)),
        ):
            failure = await raw.call(request)
            assert isinstance(failure, wire.Failure) and failure.status == 404, (request, failure)
    status, _ = await http(keyed_server, "GET", f"/api/v1/training_runs/{tc.model_id}", TENANT_KEYS["bob"])
    assert status == 404
    status, body = await http(keyed_server, "GET", "/api/v1/training_runs", TENANT_KEYS["bob"])
    assert tc.model_id not in str(body)

    # Names and paths cannot leave the data dir; local folders are not models here.
    bob_tc = await bob.create_lora_training_client(TINY, rank=4, seed=0)
    async with RawClient(keyed_server.base_url, TENANT_KEYS["bob"]) as raw:
        for request, field in (
            (wire.SaveState(model_id=bob_tc.model_id, seq_id=1, name="../../escape"), "name:"),
            (wire.SaveState(model_id=bob_tc.model_id, seq_id=2, name=".hidden"), "name:"),
            (wire.LoadState(model_id=bob_tc.model_id, seq_id=3, path="tinker://../../etc/weights/passwd"), "path:"),
            (wire.LoadState(model_id=bob_tc.model_id, seq_id=4, path="tinker://x/weights/a/../../b"), "path:"),
            (wire.GetTokenizer(base_model=str(model_registry.resolve_model(TINY))), "base_model:"),
            (wire.GetTokenizer(base_model="../../../../etc"), "base_model:"),
        ):
            failure = await raw.call(request)
            assert isinstance(failure, wire.Failure) and 400 <= failure.status < 500, (request, failure)
            assert failure.message.startswith(field), failure.message

    # Alice's work is all still there and hers.
    assert (await alice.create_rest_client().get_training_run(tc.model_id)).model_owner == "alice"
    again = await sampler.sample(ModelInput.from_ints([1, 2, 3]), 1, SamplingParams(max_tokens=4, seed=1))
    assert again.sequences[0].tokens == alice_sample.sequences[0].tokens
    for service in (alice, bob):
        await service.close()


async def test_per_key_limits_answer_429_and_our_client_waits_and_retries(keyed_server, caplog):
    # Runs: the key's limit is reached; a refusal says which limit and when to retry.
    async with RawClient(keyed_server.base_url, TENANT_KEYS["dave"]) as dave:
        for _ in range(KEYED_LIMITS["runs"]):
            await dave.new_run()
        session = await dave.call(wire.CreateSession())
        refused = await dave.call(
            wire.CreateModel(session_id=session.session_id, model_seq_id=0, base_model=TINY, lora_config=LoraConfig(rank=4))
        )
        assert isinstance(refused, wire.Failure) and refused.status == 429 and refused.retry_after == 5.0
        assert refused.message.startswith(f"runs: expected at most {KEYED_LIMITS['runs']}")

    # Storage: saves are refused once the key's checkpoints reach the limit, until some are deleted.
    async with RawClient(keyed_server.base_url, TENANT_KEYS["carol"]) as carol:
        _, run = await carol.new_run()
        paths, seq = [], 1
        while True:
            saved = await carol.call(wire.SaveWeightsForSampler(model_id=run, seq_id=seq, name=f"s{seq}"))
            if isinstance(saved, wire.Failure):
                break
            paths.append(saved.path)
            seq += 1
        assert saved.status == 429 and saved.retry_after == 30.0 and saved.message.startswith("storage:")
        assert 2 <= len(paths) <= 10
        await carol.call(wire.DeleteCheckpoint(tinker_path=paths[0]))
        again = await carol.call(wire.SaveWeightsForSampler(model_id=run, seq_id=seq, name="after-delete"))
        assert again.path.endswith("/after-delete")  # the refused seq_id did not take a place in the order

    # Pending requests: 24 pipelined requests against a limit of 6. Our client waits on each
    # 429 and sends it again; the run's order holds, and the results equal a run one by one.
    caplog.set_level(logging.INFO, logger="tinker")
    eve = tinker.ServiceClient(base_url=keyed_server.base_url, api_key=TENANT_KEYS["eve"])
    piped, alone = await eve.create_lora_training_client(TINY, rank=4, seed=9), await eve.create_lora_training_client(TINY, rank=4, seed=9)
    futures = []
    for _ in range(12):
        futures.append(piped.forward_backward(DATA, "cross_entropy"))
        piped.optim_step(tinker.AdamParams(learning_rate=1e-2))
    piped_losses = [loss(out) for out in await asyncio.gather(*(f.coroutine() for f in futures))]
    alone_losses = []
    for _ in range(12):
        alone_losses.append(loss(await alone.forward_backward(DATA, "cross_entropy")))
        await alone.optim_step(tinker.AdamParams(learning_rate=1e-2))
    assert piped_losses == alone_losses
    assert any("rate limited (pending:" in r.getMessage() for r in caplog.records)
    await eve.close()
