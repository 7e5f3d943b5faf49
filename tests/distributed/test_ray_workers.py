"""``tinker-server --workers ray`` on a local Ray: the model trains on two Ray actors with the
single-process server's numbers, and an actor killed with ``kill -9`` fails its request at once
with a retryable error naming it, while the run resumes from its last ``save_state``. Sampling
runs in a sampler worker: the same greedy tokens as the single-process server, and the
same fault promise when it is killed (a local process: see docs/scaling.md)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from conftest import TINY, ServerProcess

import tinker
from tinker import AdamParams, ModelInput, SamplingParams

from .test_local_workers import TEXT, datum_of, healthz

pytest.importorskip("ray", reason="needs the [ray] extra (nox -s distributed installs it)")
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(400)]

RTOL = 1e-5


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("ray-workers")
    models = root / "models.toml"
    models.write_text(f'[models."{TINY}"]\ntrainer_ranks = 2\n')
    # A local test cluster: no token file written to ~/.ray (Ray 2.60 turns auth on by default),
    # and no memory monitor (on a busy test machine it kills actors when the whole host is full).
    test_env = {"RAY_AUTH_MODE": "disabled", "RAY_memory_monitor_refresh_ms": "0"}
    os.environ.update(test_env)
    try:
        proc = ServerProcess(root / "data", "--workers", "ray", "--models", str(models))
    finally:
        for key in test_env:
            del os.environ[key]
    yield proc
    assert proc.stop() == 0


def train(service: tinker.ServiceClient) -> tuple[tinker.TrainingClient, list[float]]:
    tc = service.create_lora_training_client(TINY, rank=4, seed=7)
    data = [datum_of(tc.get_tokenizer().encode(TEXT, add_special_tokens=False))]
    losses = []
    for _ in range(2):
        fb = tc.forward_backward(data, "cross_entropy")
        step = tc.optim_step(AdamParams(learning_rate=1e-2))
        losses.append(fb.result().metrics["loss:sum"])
        step.result()
    return tc, losses


def test_ray_workers_match_and_survive_kill_9(server: ServerProcess, ray_server: ServerProcess) -> None:
    single_service = tinker.ServiceClient(base_url=server.base_url)
    service = tinker.ServiceClient(base_url=ray_server.base_url)
    try:
        _, expected = train(single_service)
        tc, losses = train(service)
        assert losses == pytest.approx(expected, rel=RTOL)
        workers = healthz(ray_server)["workers"][TINY]
        assert workers["placement"] == "ray" and workers["alive"] and len(workers["pids"]) == 2

        data = [datum_of(tc.get_tokenizer().encode(TEXT, add_special_tokens=False))]
        tc.save_state("durable").result()
        saved_loss = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
        os.kill(workers["pids"][1], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(tinker.RequestFailedError) as info:
            tc.forward_backward(data, "cross_entropy").result(timeout=60)
        assert time.monotonic() - started < 10
        assert f"rank 1 (pid {workers['pids'][1]}) died" in str(info.value) and "retryable" in str(info.value)
        assert tc.forward(data, "cross_entropy").result(timeout=200).metrics["loss:sum"] == pytest.approx(
            saved_loss, rel=RTOL)
        after = healthz(ray_server)["workers"][TINY]
        assert after["alive"] and after["restarts"] == workers["restarts"] + 1
    finally:
        for s in (single_service, service):
            s.close().result(timeout=30)


def test_the_sampler_worker_of_a_ray_server_samples_and_survives_kill_9(server: ServerProcess, ray_server: ServerProcess) -> None:
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    prompt = ModelInput.from_ints([0, 7, 9])
    single_service = tinker.ServiceClient(base_url=server.base_url)
    service = tinker.ServiceClient(base_url=ray_server.base_url)
    try:
        expected = train(single_service)[0].save_weights_and_get_sampling_client().sample(prompt, 1, greedy).result()
        sampler = train(service)[0].save_weights_and_get_sampling_client()
        assert sampler.sample(prompt, 1, greedy).result().sequences[0].tokens == expected.sequences[0].tokens
        [worker] = healthz(ray_server)["workers"][TINY]["samplers"]  # one local process
        assert worker["alive"] and worker["pid"] not in (ray_server.proc.pid, *healthz(ray_server)["workers"][TINY]["pids"])

        running = sampler.sample(prompt, 1, SamplingParams(max_tokens=1900, stop=[], seed=2))
        started = time.monotonic()
        while healthz(ray_server)["workers"][TINY]["samplers"][0]["in_flight"] == 0:
            assert time.monotonic() - started < 30, "the request never reached the sampler worker"
            time.sleep(0.02)
        os.kill(worker["pid"], signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(tinker.RequestFailedError) as info:
            running.result(timeout=60)
        assert time.monotonic() - killed < 10
        assert f"sampler worker {worker['name']} (pid {worker['pid']}) died" in str(info.value)
        assert "retryable" in str(info.value)
        while not (back := healthz(ray_server)["workers"][TINY]["samplers"][0])["alive"]:
            assert time.monotonic() - killed < 200, "the sampler worker did not come back within 200 s"
            time.sleep(0.2)
        assert back["restarts"] == 1 and back["pid"] != worker["pid"]
        # The new process loads the version again from its folder: the same tokens.
        assert sampler.sample(prompt, 1, greedy).result().sequences[0].tokens == expected.sequences[0].tokens
    finally:
        for s in (single_service, service):
            s.close().result(timeout=30)
