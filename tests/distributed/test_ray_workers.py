"""``tinker-server --workers ray`` on a local Ray: the model trains on two Ray actors with the
single-process server's numbers, and an actor killed with ``kill -9`` fails its request at once
with a retryable error naming it, while the run resumes from its last ``save_state``. Sampling
runs in sampler worker actors with the single-process server's greedy tokens and logprobs (their
kill -9 test is ``test_sampler_workers.py``, run in both placements). The server (``ray_server``,
shared) must exit 0 with a clean log on SIGTERM after those restarts: its fixture checks it."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import TINY, ServerProcess

import tinker
from tinker import AdamParams, ModelInput, SamplingParams

from .test_local_workers import TEXT, datum_of, healthz

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(400)]

RTOL = 1e-5


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


def test_ray_sampler_actors_give_the_single_process_tokens(server: ServerProcess, ray_server: ServerProcess) -> None:
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    prompt = ModelInput.from_ints([0, 7, 9])
    single_service = tinker.ServiceClient(base_url=server.base_url)
    service = tinker.ServiceClient(base_url=ray_server.base_url)
    try:
        expected = train(single_service)[0].save_weights_and_get_sampling_client().sample(prompt, 1, greedy).result()
        sampler = train(service)[0].save_weights_and_get_sampling_client()
        got = sampler.sample(prompt, 1, greedy).result()
        assert got.sequences[0].tokens == expected.sequences[0].tokens
        assert got.sequences[0].logprobs == pytest.approx(expected.sequences[0].logprobs, rel=RTOL)
        workers = healthz(ray_server)["workers"][TINY]
        actors = workers["samplers"]  # Ray actors: processes of their own, neither the server nor a rank
        assert len(actors) == 2 and all(a["alive"] for a in actors)
        assert {a["pid"] for a in actors}.isdisjoint((ray_server.proc.pid, *workers["pids"]))
        assert sum(a["requests"] for a in actors) >= 1
    finally:
        for s in (single_service, service):
            s.close().result(timeout=30)
