"""Sampler workers (``sampler_replicas = 2``) in both worker placements, local processes (the
shared ``local_server``) and Ray actors (``ray_server``), through the real client: requests stay
on the replica holding their adapter version until it is overloaded, then spill over to the
other, which loads the version from its folder; a replica killed with ``kill -9`` fails its
requests in flight at once with a retryable error naming it, the other replica serves the next
request with the same numbers, and the dead one comes back without a server restart. Counted
via healthz."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import TINY, ServerProcess

import tinker
from tinker import AdamParams, Datum, ModelInput, SamplingParams

from .conftest import SAMPLER_MAX_IN_FLIGHT

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module", params=["local_server", "ray_server"])
def placed(request: pytest.FixtureRequest) -> ServerProcess:
    """The server of one placement (module-scoped: each placement's tests run together)."""
    server: ServerProcess = request.getfixturevalue(request.param)
    return server


@pytest.fixture(scope="module")
def service(placed: ServerProcess) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=placed.base_url)
    yield client
    client.close().result(timeout=30)


def samplers(server: ServerProcess) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{server.base_url}/api/v1/healthz", timeout=5) as response:
        return json.loads(response.read())["workers"][TINY]["samplers"]


def trained_sampler(service: tinker.ServiceClient, server: ServerProcess, seed: int) -> tuple[Any, str, int]:
    """A sampler of a run trained one step, its id and the replica that loaded it when published."""
    tc = service.create_lora_training_client(TINY, rank=4, seed=seed)
    tokens = [0, *range(5, 25)]
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(AdamParams(learning_rate=1e-2)).result()
    before = {r["name"]: set(r["adapters"]) for r in samplers(server)}
    sampler = tc.save_weights_and_get_sampling_client()  # published in the background: wait for it
    started = time.monotonic()
    while not (new := [(i, a) for i, r in enumerate(samplers(server)) for a in set(r["adapters"]) - before[r["name"]]]):
        assert time.monotonic() - started < 30, "the snapshot was not loaded by a replica within 30 s"
        time.sleep(0.05)
    [(index, sampler_id)] = new
    return sampler, sampler_id, index


def test_affinity_then_spill_over_under_load(service: tinker.ServiceClient, placed: ServerProcess) -> None:
    sampler, sampler_id, holder = trained_sampler(service, placed, seed=3)
    other = 1 - holder
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    start = samplers(placed)
    for _ in range(5):  # one at a time: never overloaded, always the replica holding the version
        sampler.sample(ModelInput.from_ints([0, 7, 9]), 1, greedy).result()
    after = samplers(placed)
    assert after[holder]["requests"] - start[holder]["requests"] == 5
    assert after[other]["requests"] == start[other]["requests"] and sampler_id not in after[other]["adapters"]

    # Eight at once, long enough that the holder has SAMPLER_MAX_IN_FLIGHT in flight: the rest spill over
    # to the other replica, which loads the version once.
    long = SamplingParams(max_tokens=200, temperature=1.0, seed=1, stop=[])
    futures = [sampler.sample(ModelInput.from_ints([0, 7, 9]), 1, long) for _ in range(8)]
    assert all(len(f.result(timeout=120).sequences[0].tokens) == 200 for f in futures)
    spilled = samplers(placed)
    assert spilled[holder]["requests"] - after[holder]["requests"] >= SAMPLER_MAX_IN_FLIGHT
    assert spilled[other]["requests"] - after[other]["requests"] >= 1
    assert spilled[other]["loads"] - after[other]["loads"] == 1 and sampler_id in spilled[other]["adapters"]
    assert sum(r["requests"] for r in spilled) - sum(r["requests"] for r in after) == 8
    assert all(r["in_flight"] == 0 for r in spilled)


def test_kill_9_of_a_sampler_worker_fails_fast_and_it_comes_back(
    service: tinker.ServiceClient, placed: ServerProcess
) -> None:
    sampler, sampler_id, holder = trained_sampler(service, placed, seed=4)
    other = 1 - holder
    victim = samplers(placed)[holder]
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    expected = sampler.sample(ModelInput.from_ints([0, 7, 9]), 1, greedy).result().sequences[0].tokens
    # Long enough to be in flight when the kill lands (EOS disabled by stop=[]).
    running = sampler.sample(ModelInput.from_ints([0, 7, 9]), 1, SamplingParams(max_tokens=1900, stop=[], seed=2))
    started = time.monotonic()
    while samplers(placed)[holder]["in_flight"] == 0:
        assert time.monotonic() - started < 30, "the request never reached its replica"
        time.sleep(0.02)
    assert not running.done()

    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(tinker.RequestFailedError) as info:  # the client's error for a 5xx
        running.result(timeout=60)
    assert time.monotonic() - killed < 10  # detected at once, never a hang
    # "sampler worker NAME (pid P) died", or "(Ray actor, pid P)" for an actor
    named = re.escape(f"sampler worker {victim['name']} (") + r"(Ray actor, )?" + re.escape(f"pid {victim['pid']}) died")
    assert re.search(named, str(info.value)) and "retryable" in str(info.value)
    assert re.search(named, placed.log.read_text())

    # The next request goes to the other replica, which loads the version from its folder.
    loads = samplers(placed)[other]["loads"]
    out = sampler.sample(ModelInput.from_ints([0, 7, 9]), 1, greedy).result()
    assert out.sequences[0].tokens == expected  # the same version, from its folder
    now = samplers(placed)
    assert now[other]["loads"] == loads + 1 and sampler_id in now[other]["adapters"]

    # The dead replica restarts on its own (no request needed), under a new pid, holding nothing.
    while not (back := samplers(placed)[holder])["alive"]:
        assert time.monotonic() - killed < 120, "the sampler worker did not come back within 120 s"
        time.sleep(0.2)
    assert back["restarts"] == victim["restarts"] + 1 and back["pid"] != victim["pid"]
    assert back["adapters"] == [] and back["in_flight"] == 0
