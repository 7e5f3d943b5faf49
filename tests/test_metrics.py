"""``GET /metrics``: scraped from a real ``tinker-server`` while the real client trains and samples."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import aiohttp
import pytest
from conftest import TENANT_KEYS
from native_wire import DATA, TINY
from prometheus_client.parser import text_string_to_metric_families

import tinker
from tinker import AdamParams, ModelInput, SamplingParams
from tinker_backend.metrics import ServerMetrics


async def scrape(base_url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of the scrape: name -> sorted labels -> value."""
    async with aiohttp.ClientSession() as session, session.get(base_url + "/metrics") as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = await reply.text()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for key, value in samples.get(name, {}).items() if wanted <= set(key))


async def test_metrics_move_while_real_work_runs(server):
    before = await scrape(server.base_url)
    service = tinker.ServiceClient(base_url=server.base_url)
    tc = await service.create_lora_training_client_async(TINY, rank=4, seed=3)
    tokens_per_step = sum(d.model_input.length for d in DATA)
    steps = 3
    futures = []
    for _ in range(steps):  # pipelined, so the scrape below can land while work is queued or running
        futures += [tc.forward_backward(DATA, "cross_entropy"), tc.optim_step(AdamParams(learning_rate=1e-3))]
    during = await scrape(server.base_url)
    await asyncio.gather(*futures)
    sampler = await tc.save_weights_and_get_sampling_client()
    response = await sampler.sample(ModelInput.from_ints([1, 2, 3]), 2, SamplingParams(max_tokens=5, seed=1))
    sampled = sum(len(s.tokens) for s in response.sequences)
    with pytest.raises(tinker.NotFoundError):  # a user error the server answers (the client cannot check it)
        await service.create_sampling_client(model_path=f"tinker://{tc.model_id}/sampler_weights/none")
    after = await scrape(server.base_url)
    await service.close()

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("tinker_trained_tokens_total", base_model=TINY) == steps * tokens_per_step
    assert moved("tinker_optim_steps_total", base_model=TINY) == steps
    assert moved("tinker_sampled_tokens_total", base_model=TINY) == sampled > 0
    assert moved("tinker_request_duration_seconds_count", type="ForwardBackward", outcome="ok") == steps
    assert moved("tinker_request_duration_seconds_count", type="Sample", outcome="ok") == 1
    assert moved("tinker_errors_total", kind="user", status="404") == 1
    assert 1 <= moved("tinker_clock_cycle_seconds_count", base_model=TINY) <= steps
    assert moved("tinker_clock_cycle_seconds_sum", base_model=TINY) > 0
    assert moved("tinker_sampler_decode_steps_total", base_model=TINY) >= 1
    assert moved("tinker_sampler_decode_rows_total", base_model=TINY) >= 2
    assert moved("tinker_adapter_slot_total", base_model=TINY, event="hit") >= 1
    assert total(after, "tinker_adapters", base_model=TINY, tier="slots") >= 1
    assert total(after, "tinker_runs_loaded", base_model=TINY) >= 1
    assert total(after, "tinker_sessions_live") >= 1
    assert ("tinker_queue_depth" in during) and total(after, "tinker_queue_depth", base_model=TINY) == 0
    # The scrapes themselves are counted, by route pattern and status.
    assert moved("tinker_http_request_duration_seconds_count", route="/metrics", method="GET", status="200") >= 2


async def test_metrics_need_a_key_where_keys_are_required(keyed_server):
    url = keyed_server.base_url + "/metrics"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as reply:
            assert reply.status == 401
        # Prometheus sends the key as a bearer token (docs/operations.md).
        async with session.get(url, headers={"Authorization": f"Bearer {TENANT_KEYS['olga']}"}) as reply:
            assert reply.status == 200 and "tinker_sessions_live" in await reply.text()


def test_each_server_has_its_own_registry():
    first, second = ServerMetrics(), ServerMetrics()
    first.optim_steps.labels(TINY).inc()
    assert first.registry.get_sample_value("tinker_optim_steps_total", {"base_model": TINY}) == 1
    assert second.registry.get_sample_value("tinker_optim_steps_total", {"base_model": TINY}) is None
