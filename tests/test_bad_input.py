"""The bad-input battery: every malformed request is a 4xx that names the field, and harms no one.

The requests are built with ``tinker.wire`` (or as raw msgpack, for what no struct can hold)
and sent over a raw WebSocket, since the ``tinker`` client refuses most of them before
sending. While one tenant sends them, another trains in the same clock cycles; its losses
must equal a run of its own afterwards. The HTTP protocol gets the cases that are its own.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from typing import Any

import aiohttp
import msgspec
import pytest
from conftest import KEYED_LIMITS, TENANT_KEYS
from native_wire import DATA, TINY, RawClient, datum, fb, loss, step

import tinker
from tinker import wire
from tinker.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams, TensorData

VOCAB, CONTEXT = 2048, 2048  # the tiny model's


def raw(type_name: str, **fields: Any) -> bytes:
    """A request as msgpack, unchecked: what a buggy or hostile client could send."""
    return msgspec.msgpack.encode({"type": type_name, **fields})


def plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


def battery(run: str, session: str, sampler: str, seqs: Any) -> list[tuple[str, Any, str]]:
    """(case, request, text the error must contain). ``seqs`` numbers the run's ordered requests
    (each case that has a readable seq_id takes one); ``other`` numbers everything else."""
    other = itertools.count(1000)
    good = plain(DATA[0])
    n = DATA[0].model_input.length

    def with_inputs(**inputs: Any) -> dict[str, Any]:
        return {**good, "loss_fn_inputs": {**good["loss_fn_inputs"], **inputs}}

    def sample(**params: Any) -> wire.Sample | bytes:
        fields = {"sampling_session_id": sampler, "seq_id": next(other), "num_samples": 1,
                  "prompt": plain(ModelInput.from_ints([1, 2, 3])), "sampling_params": {"max_tokens": 4, **params}}
        return raw("Sample", **fields)

    def create(**lora: Any) -> bytes:
        return raw("CreateModel", session_id=session, model_seq_id=next(other), base_model=TINY, lora_config=lora)

    big = [1] * (CONTEXT + 10)
    return [
        # token ids outside the vocabulary
        ("input token >= vocab", fb(run, next(seqs), [datum([1, VOCAB + 5, 3])]), f"data[0].model_input: expected token ids in [0, {VOCAB})"),
        ("target token >= vocab", fb(run, next(seqs), [datum([1, 2, VOCAB])]), "loss_fn_inputs['target_tokens']: expected token ids in"),
        ("negative token", raw("ForwardBackward", model_id=run, seq_id=next(seqs), loss_fn="cross_entropy",
                               data=[{**good, "model_input": {"chunks": [{"type": "encoded_text", "tokens": [-1, 2]}]}}]), "tokens[0]"),
        # shapes and lengths
        ("weights too short", fb(run, next(seqs), [Datum(model_input=DATA[0].model_input, loss_fn_inputs={
            "target_tokens": DATA[0].loss_fn_inputs["target_tokens"], "weights": TensorData(data=[1.0], dtype="float32")})]),
         "loss_fn_inputs['weights']: expected the shape of target_tokens"),
        ("shape disagrees with data", raw("ForwardBackward", model_id=run, seq_id=next(seqs), loss_fn="cross_entropy",
                                          data=[with_inputs(weights={"data": [1.0] * n, "dtype": "float32", "shape": [n + 3]})]), "shape"),
        ("empty data", fb(run, next(seqs), []), "data: expected at least one Datum"),
        # dtypes
        ("float target tokens", fb(run, next(seqs), [Datum(model_input=DATA[0].model_input, loss_fn_inputs={
            "target_tokens": TensorData(data=[1.0] * n, dtype="float32"), "weights": DATA[0].loss_fn_inputs["weights"]})]),
         "loss_fn_inputs['target_tokens']: expected int64"),
        ("unknown dtype", raw("ForwardBackward", model_id=run, seq_id=next(seqs), loss_fn="cross_entropy",
                              data=[with_inputs(weights={"data": [1.0] * n, "dtype": "float64"})]), "dtype"),
        ("strings as data", raw("ForwardBackward", model_id=run, seq_id=next(seqs), loss_fn="cross_entropy",
                                data=[with_inputs(weights={"data": ["x"] * n, "dtype": "float32"})]),
         "loss_fn_inputs[...].data[0]"),  # msgspec's error paths elide dict keys
        ("seq_id of the wrong type", raw("OptimStep", model_id=run, seq_id="seven", adam_params={}), "$.seq_id"),
        ("seq_id 0", step(run, 0), "seq_id: expected an int >= 1"),
        # NaN and infinity
        ("NaN weight", raw("ForwardBackward", model_id=run, seq_id=next(seqs), loss_fn="cross_entropy",
                           data=[with_inputs(weights={"data": [math.nan] * n, "dtype": "float32"})]), "a finite float"),
        ("infinite learning rate", raw("OptimStep", model_id=run, seq_id=next(seqs), adam_params={"learning_rate": math.inf}), "learning_rate"),
        ("NaN loss config", raw("ForwardBackward", model_id=run, seq_id=next(seqs), loss_fn="dro", loss_fn_config={"beta": math.nan},
             data=[with_inputs(logprobs={"data": [0.0] * n, "dtype": "float32"}, advantages={"data": [0.0] * n, "dtype": "float32"})]),
         "loss_fn_config['beta']: expected a finite number"),
        # losses
        ("unknown loss", wire.ForwardBackward(model_id=run, seq_id=next(seqs), data=DATA, loss_fn="nope"), "loss_fn: expected one of"),
        ("missing loss input", wire.ForwardBackward(model_id=run, seq_id=next(seqs), data=DATA, loss_fn="ppo"),
         "loss_fn_inputs['logprobs']: expected a tensor (required by 'ppo')"),
        ("unknown loss config key", wire.ForwardBackward(model_id=run, seq_id=next(seqs), data=DATA, loss_fn="ppo",
                                                          loss_fn_config={"nope": 1.0}), "loss_fn_config['nope']"),
        # context length
        ("sequence over the context", fb(run, next(seqs), [datum(big)]), f"expected at most {CONTEXT} tokens (context length)"),
        # ranks and models
        ("absurd rank", create(rank=10**9), "rank: expected an int in [1, 1024]"),
        ("zero rank", create(rank=0), "rank"),
        ("rank over the server's max", create(rank=512), "lora_config.rank: expected <= 256"),
        ("unknown model", wire.CreateModel(session_id=session, model_seq_id=500, base_model="no-such/model",
                                            lora_config=LoraConfig(rank=4)), "base_model: unknown base model"),
        ("unknown sampler model", wire.CreateSamplingSession(sampling_session_id=f"{session}:sample:77",
                                                              base_model="no-such/model"), "base_model"),
        # malformed requests
        ("not msgpack (breaks the frame)", b"\xc1\xc1 garbage", "invalid frame: MessagePack data is malformed"),
        ("not a request object", msgspec.msgpack.encode([1, 2, 3]), "invalid request: Expected `object`"),
        ("unknown request type", raw("DropAllTables"), "DropAllTables"),
        ("unknown field", raw("GetInfo", model_id=run, admin=True), "admin"),
        ("missing field", raw("SaveState", model_id=run, seq_id=next(seqs)), "name"),
        # checkpoint names and paths
        ("name with a slash", wire.SaveState(model_id=run, seq_id=next(seqs), name="../escape"), "name: expected"),
        ("hidden name", wire.SaveState(model_id=run, seq_id=next(seqs), name=".x"), "name: expected"),
        ("empty name", wire.SaveState(model_id=run, seq_id=next(seqs), name=""), "name: expected"),
        ("long name", wire.SaveState(model_id=run, seq_id=next(seqs), name="n" * 300), "name: expected"),
        ("negative ttl", wire.SaveState(model_id=run, seq_id=next(seqs), name="t", ttl_seconds=-5), "ttl_seconds: expected"),
        ("not a tinker path", wire.LoadState(model_id=run, seq_id=next(seqs), path="/etc/passwd"), "path: expected 'tinker://"),
        ("unknown checkpoint", wire.LoadState(model_id=run, seq_id=next(seqs), path=f"tinker://{run}/weights/none"), "path: unknown checkpoint"),
        ("sampler path as state", wire.LoadState(model_id=run, seq_id=next(seqs), path=f"tinker://{run}/sampler_weights/x"),
         "path: expected a 'weights' checkpoint"),
        # sampling parameters
        ("negative temperature", sample(temperature=-1.0), "temperature"),
        ("top_p 0", sample(top_p=0.0), "top_p"),
        ("top_k 0", sample(top_k=0), "top_k"),
        ("max_tokens 0", sample(max_tokens=0), "max_tokens"),
        ("max_tokens over the context", sample(max_tokens=10**6), "sampling_params.max_tokens: expected at most"),
        ("stop token >= vocab", sample(stop=[VOCAB + 1]), "sampling_params.stop[0]"),
        ("no samples", raw("Sample", sampling_session_id=sampler, seq_id=next(other), num_samples=0,
                           prompt=plain(ModelInput.from_ints([1])), sampling_params={}), "num_samples: expected 1 to 128"),
        ("negative samples", raw("Sample", sampling_session_id=sampler, seq_id=next(other), num_samples=-3,
                                 prompt=plain(ModelInput.from_ints([1])), sampling_params={}), "num_samples: expected 1 to 128, got -3"),
        ("samples as a float", raw("Sample", sampling_session_id=sampler, seq_id=next(other), num_samples=1.5,
                                   prompt=plain(ModelInput.from_ints([1])), sampling_params={}), "$.num_samples"),
        ("negative max_tokens", sample(max_tokens=-2), "max_tokens: expected None or an int >= 1, got -2"),
        ("seed of the wrong type", sample(seed="x"), "$.sampling_params.seed"),
        ("negative stop token", sample(stop=[-1]), "stop[0]: expected a non-negative token id"),
        ("negative top-k logprobs", raw("Sample", sampling_session_id=sampler, seq_id=next(other), num_samples=1,
                                        prompt=plain(ModelInput.from_ints([1])), sampling_params={}, topk_prompt_logprobs=-1),
         "topk_prompt_logprobs: expected 0 to 20, got -1"),
        ("too many samples", raw("Sample", sampling_session_id=sampler, seq_id=next(other), num_samples=10**6,
                                 prompt=plain(ModelInput.from_ints([1])), sampling_params={}), "num_samples: expected 1 to 128"),
        ("empty prompt", raw("Sample", sampling_session_id=sampler, seq_id=next(other), num_samples=1,
                             prompt={"chunks": []}, sampling_params={}), "prompt: expected at least one token"),
        ("prompt over the context", raw("Sample", sampling_session_id=sampler, seq_id=next(other), num_samples=1,
                                        prompt=plain(ModelInput.from_ints(big)), sampling_params={}), "prompt: expected at most"),
        ("sampler of no one", wire.Sample(sampling_session_id=f"{session}:sample:999", seq_id=1, num_samples=1,
                                           prompt=ModelInput.from_ints([1]), sampling_params=SamplingParams()), "sampling_session_id: unknown"),
    ]


async def train(client: RawClient, run: str, first_seq: int, steps: int) -> list[float]:
    losses = []
    for i in range(steps):
        out, _ = await client.gather([fb(run, first_seq + 2 * i), step(run, first_seq + 2 * i + 1)])
        losses.append(loss(out))
    return losses


async def test_bad_native_requests_are_named_4xx_and_harm_no_one(keyed_server):
    async with RawClient(keyed_server.base_url, TENANT_KEYS["mallory"]) as mallory, \
            RawClient(keyed_server.base_url, TENANT_KEYS["frank"]) as frank:
        session, run = await mallory.new_run()
        kept = await mallory.call(wire.SaveState(model_id=run, seq_id=1, name="kept"))
        sampler = f"{session}:sample:0"
        await mallory.call(wire.CreateSamplingSession(sampling_session_id=sampler, base_model=TINY))
        _, victim = await frank.new_run(seed=1)
        _, solo = await frank.new_run(seed=1)

        # Frank trains while mallory's bad requests go through the same scheduler and cycles.
        frank_training = asyncio.create_task(train(frank, victim, 1, steps=6))
        seqs = iter(range(2, 10**6))
        for case, request, expected in battery(run, session, sampler, seqs):
            failure = await mallory.call(request)
            assert isinstance(failure, wire.Failure), (case, failure)
            assert 400 <= failure.status < 500 and failure.category == "user", (case, failure)
            assert expected in failure.message, (case, failure.message)
        shared = await frank_training

        assert await train(frank, solo, 1, steps=6) == shared  # unaffected: equal to a run alone
        # Mallory's run is fine too, and what she had stored is intact.
        next_seq = next(seqs)
        assert loss(await mallory.call(fb(run, next_seq))) > 0
        loaded = await mallory.call(wire.LoadState(model_id=run, seq_id=next_seq + 1, path=kept.path))
        assert loaded.path == kept.path
    async with aiohttp.ClientSession() as http, http.get(keyed_server.base_url + "/api/v1/healthz") as reply:
        assert reply.status == 200


async def test_an_oversized_request_is_refused_and_the_client_carries_on(keyed_server):
    service = tinker.ServiceClient(base_url=keyed_server.base_url, api_key=TENANT_KEYS["mallory"])
    tc = await service.create_lora_training_client(TINY, rank=4, seed=0)
    # ~9 MB encoded (8 MB allowed): the server closes the connection with 1009, message too big.
    huge = [datum(list(range(1, 1000))) for _ in range(700)]
    with pytest.raises(tinker.APIStatusError, match=r"request: expected an encoded request within") as refused:
        await tc.forward_backward(huge, "cross_entropy")
    assert refused.value.status_code == 413
    # The server never read it, yet its seq_id took its place in the run's order: the run carries on.
    assert loss(await tc.forward_backward(DATA, "cross_entropy")) > 0
    await service.close()

    async with aiohttp.ClientSession() as http:
        headers = {"X-API-Key": TENANT_KEYS["mallory"]}
        body = b"{" + b" " * KEYED_LIMITS["request_bytes"] + b"}"
        async with http.post(keyed_server.base_url + "/api/v1/create_session", data=body, headers=headers) as reply:
            assert reply.status == 413


async def test_bad_http_requests_are_named_4xx(keyed_server):
    headers = {"X-API-Key": TENANT_KEYS["mallory"]}
    base = keyed_server.base_url + "/api/v1/"

    async with aiohttp.ClientSession(headers=headers) as http:

        async def post(route: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
            async with http.post(base + route, **kwargs) as reply:
                return reply.status, await reply.json(content_type=None)

        status, body = await post("create_session", data=b"{not json")
        assert status == 400 and body["error"].startswith("body:")
        session = (await post("create_session", json={}))[1]["session_id"]
        cases = [
            ("create_model", {"session_id": session, "model_seq_id": 0, "base_model": TINY, "lora_config": {"rank": 10**9}}, "rank"),
            ("create_model", {"session_id": session, "model_seq_id": 0, "base_model": TINY}, "lora_config"),
            ("create_model", {"session_id": session, "model_seq_id": "zero", "base_model": TINY}, "model_seq_id"),
            ("optim_step", {"model_id": "x", "seq_id": 1, "adam_params": {"learning_rate": -1}}, "learning_rate"),
            ("create_sampling_session", {"session_id": session, "sampling_session_seq_id": 0, "base_model": "no/such"}, "base_model"),
            ("save_weights", {"model_id": f"{session}:train:0", "seq_id": 1, "path": "x"}, "model_id: unknown training run"),
        ]
        for route, payload, field in cases:
            status, body = await post(route, json=payload)
            if status == 200 and "request_id" in body:  # accepted into a future: the error comes from it
                status, body = await post("retrieve_future", json={"request_id": body["request_id"]})
                assert "error" in body and body["category"] == "user", (route, body)
            else:
                assert 400 <= status < 500, (route, status, body)
            assert field in body["error"], (route, body)
        status, body = await post("forward_backward", data=b"\xff\xfe not protobuf",
                                  headers={"Content-Type": "application/x-protobuf"})
        assert status == 400 and body["error"].startswith("body: expected a protobuf")
        await post("create_sampling_session", json={"session_id": session, "sampling_session_seq_id": 1, "base_model": TINY})
        status, body = await post("asample", json={
            "sampling_session_id": f"{session}:sample:1", "seq_id": 0, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
            "sampling_params": {"temperature": -1.0, "max_tokens": 2},
        })
        assert status == 400 and "temperature" in body["error"], body
        async with http.get(base + "healthz") as reply:
            assert reply.status == 200


@pytest.mark.parametrize("adam", [{"learning_rate": math.nan}, {"beta1": 2.0}, {"eps": -1.0}])
def test_adam_params_out_of_range_never_leave_the_client(adam):
    with pytest.raises(ValueError):
        AdamParams(**adam)
