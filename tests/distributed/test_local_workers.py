"""``tinker-server --workers local``: the model trains on a 2-rank group of supervised worker
processes and samples in sampler workers, through the real client, with the numbers of the
single-process server; a rank killed with ``kill -9`` while idle fails the next request at once
with a retryable error naming it, the group comes back on its own without restarting the
server, and the run resumes from its last ``save_state``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY, ServerProcess
from prometheus_client.parser import text_string_to_metric_families

import tinker
from tinker import AdamParams, Datum, ModelInput, SamplingParams
from tinker_backend.model_registry import resolve_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]

TEXT = "the quick brown fox jumps over the lazy dog"
RTOL = 1e-5


def healthz(server: ServerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.base_url}/api/v1/healthz", timeout=5) as response:
        return json.loads(response.read())


def datum_of(tokens: list[int]) -> Datum:
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                 loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def program(service: tinker.ServiceClient) -> dict[str, Any]:
    """Two tenants of different ranks train in the same cycles, then sample and score."""
    a = service.create_lora_training_client(TINY, rank=4, seed=1)
    b = service.create_lora_training_client(TINY, rank=8, seed=2, train_unembed=False)
    tokens = [a.get_tokenizer().bos_token_id, *a.get_tokenizer().encode(TEXT, add_special_tokens=False)]
    data = {"a": [datum_of(tokens)], "b": [datum_of(tokens[3:]), datum_of(tokens[:6])]}
    seen: dict[str, Any] = {"a": [], "b": []}
    for _ in range(3):
        pending = [(name, tc.forward_backward(data[name], "cross_entropy"), tc.optim_step(AdamParams(learning_rate=1e-2)))
                   for name, tc in (("a", a), ("b", b))]
        for name, fb, step in pending:
            seen[name].append(fb.result().metrics["loss:sum"])
            step.result()
    for name, tc in (("a", a), ("b", b)):  # sampled in the sampler worker under --workers local
        sampler = tc.save_weights_and_get_sampling_client()
        seen[f"logprobs_{name}"] = sampler.compute_logprobs(ModelInput.from_ints(tokens)).result()[1:]
        out = sampler.sample(ModelInput.from_ints(tokens[:2]), 1, SamplingParams(max_tokens=6, temperature=0.0)).result()
        seen[f"greedy_{name}"] = out.sequences[0].tokens
        seen[f"greedy_logprobs_{name}"] = out.sequences[0].logprobs
    return seen


def test_local_workers_give_the_single_process_numbers(server: ServerProcess, local_server: ServerProcess) -> None:
    health = healthz(local_server)
    assert health["status"] == "ok"
    results = []
    for base_url in (server.base_url, local_server.base_url):
        service = tinker.ServiceClient(base_url=base_url)
        try:
            results.append(program(service))
        finally:
            service.close().result(timeout=30)
    single, local = results
    for key in ("a", "b", "logprobs_a", "logprobs_b", "greedy_logprobs_a", "greedy_logprobs_b"):
        np.testing.assert_allclose(local[key], single[key], rtol=RTOL, err_msg=key)
    assert local["greedy_a"] == single["greedy_a"] and local["greedy_b"] == single["greedy_b"]
    assert local["greedy_a"] != local["greedy_b"]  # two tenants' adapters, told apart
    workers = healthz(local_server)["workers"][TINY]
    assert workers["placement"] == "local" and workers["trainer_ranks"] == 2 and workers["alive"]
    assert len(workers["pids"]) == 2 and all(pid != local_server.proc.pid for pid in workers["pids"])
    assert sum(r["requests"] for r in workers["samplers"]) == 4  # 2 samples + 2 logprobs, in the workers
    assert {r["pid"] for r in workers["samplers"]}.isdisjoint((local_server.proc.pid, *workers["pids"]))
    # /metrics counts the group's model too (GroupEngine.stats): the sampler worker decoded.
    with urllib.request.urlopen(f"{local_server.base_url}/metrics", timeout=5) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    rows = [s.value for s in families["tinker_sampler_decode_rows"].samples if s.labels.get("base_model") == TINY]
    assert rows and rows[0] >= 5, rows  # 6 tokens: the prefill gives the first, 5 decode steps the rest


def test_kill_9_of_a_rank_fails_fast_and_the_run_resumes_from_its_save(local_server: ServerProcess) -> None:
    service = tinker.ServiceClient(base_url=local_server.base_url)
    try:
        tc = service.create_lora_training_client(TINY, rank=4, seed=5)
        tokens = tc.get_tokenizer().encode(TEXT, add_special_tokens=False)
        data = [datum_of(tokens)]
        for _ in range(2):
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(AdamParams(learning_rate=1e-2)).result()
        tc.save_state("durable").result()
        saved_loss = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
        before = healthz(local_server)["workers"][TINY]

        os.kill(before["pids"][1], signal.SIGKILL)
        started = time.monotonic()
        while f"rank 1 (pid {before['pids'][1]}) died" not in local_server.log.read_text():
            assert time.monotonic() - started < 5, "the death of an idle rank was not logged within 5 s"
            time.sleep(0.05)
        assert not healthz(local_server)["workers"][TINY]["alive"]
        # The supervisor starts a new group at once, with no request made.
        while not (restarted := healthz(local_server)["workers"][TINY])["alive"]:
            assert time.monotonic() - started < 180, "the idle dead group was not started again within 180 s"
            time.sleep(0.2)
        assert restarted["restarts"] == before["restarts"] + 1 and set(restarted["pids"]).isdisjoint(before["pids"])
        started = time.monotonic()
        with pytest.raises(tinker.RequestFailedError) as info:  # the client's error for a 5xx
            tc.forward_backward(data, "cross_entropy").result(timeout=60)
        assert time.monotonic() - started < 10  # detected at once, never a hang
        assert f"rank 1 (pid {before['pids'][1]}) died" in str(info.value) and "retryable" in str(info.value)

        # The next request finds the new group and the run reloaded from its save: the same numbers.
        assert tc.forward(data, "cross_entropy").result(timeout=120).metrics["loss:sum"] == pytest.approx(
            saved_loss, rel=RTOL)
        after = healthz(local_server)["workers"][TINY]
        assert after["alive"] and after["restarts"] == before["restarts"] + 1
        assert set(after["pids"]).isdisjoint(before["pids"])
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(AdamParams(learning_rate=1e-2)).result()  # and it trains on
    finally:
        service.close().result(timeout=30)


def test_two_base_models_train_on_separate_groups(local_server: ServerProcess, tmp_path: Path) -> None:
    """A second base model (a copy of tiny-llama's folder, default placement: a 1-rank group)
    gets its own group beside tiny-llama's 2 ranks; the same seed and data give the same losses."""
    copy = tmp_path / "tiny-copy"
    shutil.copytree(resolve_model(TINY), copy)
    service = tinker.ServiceClient(base_url=local_server.base_url)
    try:
        clients = [service.create_lora_training_client(name, rank=4, seed=11) for name in (TINY, str(copy))]
        tokens = clients[0].get_tokenizer().encode(TEXT, add_special_tokens=False)
        losses: list[list[float]] = [[], []]
        for _ in range(2):
            pending = [(tc.forward_backward([datum_of(tokens)], "cross_entropy"),
                        tc.optim_step(AdamParams(learning_rate=1e-2))) for tc in clients]
            for i, (fb, step) in enumerate(pending):
                losses[i].append(fb.result().metrics["loss:sum"])
                step.result()
        np.testing.assert_allclose(losses[1], losses[0], rtol=RTOL)
        workers = healthz(local_server)["workers"]
        assert workers[TINY]["trainer_ranks"] == 2 and workers[str(copy)]["trainer_ranks"] == 1
        assert workers[str(copy)]["alive"] and set(workers[TINY]["pids"]).isdisjoint(workers[str(copy)]["pids"])
    finally:
        service.close().result(timeout=30)
