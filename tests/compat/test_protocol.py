"""The wire protocol where the SDK hides it: long polls, expiry, re-sent submits, errors, bodies.

Requests are bare HTTP; protobuf bodies are built and read with the official SDK's own
converters, so both sides of the wire are the SDK's.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

try:
    from compression import zstd  # Python >= 3.14
except ImportError:
    from backports import zstd

import httpx
import pytest
from google.protobuf import descriptor_pb2

from tinker import types
from tinker.proto import tinker_public_pb2
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output

from .conftest import API_KEY, TINY, CompatServer, server_env, server_python

DATUM = types.Datum(
    model_input=types.ModelInput.from_ints([5, 6, 7, 8, 9]),
    loss_fn_inputs={"target_tokens": [6, 7, 8, 9, 10], "weights": [1.0] * 5},
)


class Raw:
    """Bare HTTP calls to the server."""

    def __init__(self, base_url: str, api_key: str | None = API_KEY) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=60)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return self.http.post(f"/api/v1/{path}", json=body, **kwargs)

    def session(self) -> str:
        return self.post(
            "create_session", {"tags": [], "user_metadata": None, "sdk_version": "0.38.0"}
        ).json()["session_id"]

    def create_model(self, session_id: str, model_seq_id: int = 0, seed: int = 0) -> str:
        reply = self.post(
            "create_model",
            {
                "session_id": session_id,
                "model_seq_id": model_seq_id,
                "base_model": TINY,
                "lora_config": {"rank": 4, "seed": seed},
            },
        ).json()
        return self.result(reply["request_id"])["model_id"]

    def forward_backward(
        self, model_id: str, seq_id: int, forward_only: bool = False, **headers: str
    ) -> httpx.Response:
        return self.http.post(
            "/api/v1/forward_backward",
            content=fb_body(model_id, seq_id, [DATUM], forward_only=forward_only),
            headers={"Content-Type": "application/x-protobuf", **headers},
        )

    def optim_step(self, model_id: str, seq_id: int, learning_rate: float = 1e-2) -> httpx.Response:
        params = {"learning_rate": learning_rate}
        return self.post("optim_step", {"model_id": model_id, "seq_id": seq_id, "adam_params": params})

    def poll(
        self, request_id: str, protobuf: bool = False, allow_metadata_only: bool = False
    ) -> httpx.Response:
        headers = {"Accept": "application/x-protobuf"} if protobuf else {}
        body = {"request_id": request_id, "allow_metadata_only": allow_metadata_only}
        return self.post("retrieve_future", body, headers=headers)

    def result(self, request_id: str, protobuf: bool = False) -> Any:
        """Poll until the answer is there: JSON as a dict, protobuf as raw bytes."""
        while True:
            reply = self.poll(request_id, protobuf)
            assert reply.status_code == 200, reply.text
            if "protobuf" in reply.headers["content-type"]:
                return reply.content
            if reply.json().get("type") != "try_again":
                return reply.json()

    def loss(self, model_id: str, seq_id: int) -> float:
        """The loss of DATUM under the run's current weights (a forward pass as ``seq_id``)."""
        reply = self.forward_backward(model_id, seq_id, forward_only=True).json()
        return deserialize_forward_backward_output(self.result(reply["request_id"], protobuf=True)).metrics[
            "loss:sum"
        ]


def fb_body(model_id: str, seq_id: int, data: list[types.Datum], forward_only: bool = False) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=seq_id,
    )
    message = forward_backward_request_to_proto(request)
    message.forward_only = forward_only
    return message.SerializeToString()


@pytest.fixture
def raw(compat_server: CompatServer) -> Raw:
    return Raw(compat_server.base_url)


def test_requests_need_the_api_key(compat_server: CompatServer) -> None:
    for key, problem in (
        (None, "expected an API key, got none"),
        ("tml-wrong", "expected a valid API key, got an unknown or revoked key"),
    ):
        reply = Raw(compat_server.base_url, api_key=key).post("create_session", {})
        assert reply.status_code == 401
        assert reply.json()["category"] == "user"
        assert reply.json()["error"].startswith(f"X-API-Key: {problem}")


def test_client_config_asks_for_small_zstd_chunks(raw: Raw) -> None:
    assert raw.post("client/config", {"sdk_version": "0.38.0"}).json() == {
        "fwdbwd_max_chunk_len": 4,
        "proto_compress_fwdbwd": True,
    }


@pytest.mark.slow
@pytest.mark.timeout(90)  # 31 s measured (loaded)
def test_long_poll_holds_then_says_try_again_until_the_gap_is_filled(raw: Raw) -> None:
    model_id = raw.create_model(raw.session())
    step = raw.optim_step(model_id, seq_id=2).json()  # seq 1 has not been sent: it must wait
    assert step == {"request_id": f"{model_id}/2", "model_id": model_id}
    started = time.monotonic()
    reply = raw.poll(step["request_id"]).json()
    assert reply == {"type": "try_again", "request_id": step["request_id"], "queue_state": "active"}
    assert time.monotonic() - started >= 0.9  # held for the long poll (1 s on this server)

    fb = raw.forward_backward(model_id, seq_id=1).json()
    output = deserialize_forward_backward_output(raw.result(fb["request_id"], protobuf=True))
    assert output.metrics["loss:sum"] > 0
    assert isinstance(raw.result(step["request_id"])["metrics"], dict)


def test_unknown_request_id_is_410(raw: Raw) -> None:
    reply = raw.poll("no-such-request")
    assert reply.status_code == 410
    assert "request_id: unknown request 'no-such-request'" in reply.json()["error"]


def test_a_resent_submit_is_applied_once(raw: Raw) -> None:
    session = raw.session()
    twice, once = raw.create_model(session, 0, seed=3), raw.create_model(session, 1, seed=3)
    initial = raw.loss(once, 1)
    ids = [raw.forward_backward(twice, 1).json()["request_id"] for _ in range(2)]
    ids += [raw.optim_step(twice, 2).json()["request_id"] for _ in range(2)]
    assert ids == [f"{twice}/1", f"{twice}/1", f"{twice}/2", f"{twice}/2"]
    raw.forward_backward(once, 2)
    raw.optim_step(once, 3)
    assert raw.loss(twice, 3) == pytest.approx(raw.loss(once, 4), rel=1e-5)
    assert raw.loss(once, 5) < initial

    # An unnamed save_weights_for_sampler re-sent by the SDK takes a new sampler number under
    # the same seq_id: it is still one save, answered with the first sampler.
    first, again = (
        raw.post(
            "save_weights_for_sampler",
            {"model_id": twice, "seq_id": 4, "sampling_session_seq_id": n, "kind": "snapshot"},
        ).json()
        for n in (0, 1)
    )
    assert first == again
    assert raw.result(first["request_id"])["sampling_session_id"] == f"{session}:sample:0"
    assert raw.http.get(f"/api/v1/samplers/{session}:sample:1").status_code == 404


def test_bad_requests_are_400_naming_the_field_and_keep_the_order(raw: Raw) -> None:
    model_id = raw.create_model(raw.session())
    reply = raw.http.post("/api/v1/forward_backward", content=b"\xff\xff not protobuf")
    assert reply.status_code == 400
    assert reply.json()["error"].startswith("body: expected a protobuf ForwardBackwardRequest")

    reply = raw.post("optim_step", {"model_id": model_id, "seq_id": "one", "adam_params": {}})
    assert reply.status_code == 400
    assert reply.json() == {"error": "body: Expected `int`, got `str` - at `$.seq_id`", "category": "user"}

    image = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4)]
        ),
        loss_fn_inputs={"target_tokens": [1, 2, 3, 4], "weights": [1.0] * 4},
    )
    reply = raw.http.post("/api/v1/forward_backward", content=fb_body(model_id, 1, [image]))
    assert reply.status_code == 400
    assert reply.json()["error"].startswith("data[0].model_input.chunks[0]: expected an encoded_text chunk")

    reply = raw.optim_step(model_id, seq_id=2, learning_rate=-1.0)
    assert reply.status_code == 400
    assert "learning_rate: expected a finite float >= 0, got -1.0" in reply.json()["error"]

    # Rejected requests still took seq_ids 1 and 2: seq 3 runs at once.
    fb = raw.forward_backward(model_id, seq_id=3).json()
    assert (
        deserialize_forward_backward_output(raw.result(fb["request_id"], protobuf=True)).metrics["loss:sum"]
        > 0
    )


def test_errors_found_while_running_come_back_as_error_payloads(raw: Raw) -> None:
    session = raw.session()
    reply = raw.post(
        "create_model",
        {"session_id": session, "model_seq_id": 0, "base_model": "no-such/model", "lora_config": {"rank": 4}},
    ).json()
    error = raw.result(reply["request_id"])
    assert error["category"] == "user"
    assert error["error"].startswith("base_model: unknown base model 'no-such/model'")


def test_zstd_and_plain_protobuf_bodies(raw: Raw) -> None:
    model_id = raw.create_model(raw.session())
    compressed = zstd.compress(fb_body(model_id, 1, [DATUM]))
    headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"}
    first = raw.http.post("/api/v1/forward_backward", content=compressed, headers=headers).json()
    second = raw.forward_backward(model_id, seq_id=2).json()
    losses = [
        deserialize_forward_backward_output(raw.result(r["request_id"], protobuf=True)).metrics["loss:sum"]
        for r in (first, second)
    ]
    assert losses[0] == pytest.approx(losses[1])


def test_large_results_are_announced_with_complete_metadata(raw: Raw) -> None:
    model_id = raw.create_model(raw.session())
    data = [DATUM] * 60  # 60 x 5 float32 logprobs: over the server's 1024-byte inline limit
    fb = raw.http.post(
        "/api/v1/forward_backward", content=fb_body(model_id, 1, data, forward_only=True)
    ).json()
    raw.result(fb["request_id"])  # wait for it (as JSON, which has no size announcement)
    announced = raw.poll(fb["request_id"], protobuf=True, allow_metadata_only=True).json()
    assert announced["status"] == "complete_metadata"
    payload = raw.poll(fb["request_id"], protobuf=True).content
    assert announced["response_payload_size"] == len(payload)
    assert len(deserialize_forward_backward_output(payload).loss_fn_outputs) == 60


def test_unsupported_routes_say_so(raw: Raw) -> None:
    reply = raw.post("copy_weights", {"source_path": "tinker://x/weights/y"})
    assert reply.status_code == 404
    assert (
        reply.json()["error"]
        == "POST /api/v1/copy_weights: not supported by this server (see docs/compat.md)"
    )


def test_heartbeats_stop_when_the_session_finishes(raw: Raw) -> None:
    session = raw.session()
    assert raw.post("session_heartbeat", {"session_id": session}).json() == {"type": "session_heartbeat"}
    assert (
        raw.post(f"sessions/{session}/finish", {"reason": {"type": "success"}, "detail": None}).status_code
        == 200
    )
    assert raw.post("session_heartbeat", {"session_id": session}).status_code == 410
    assert raw.post("session_heartbeat", {"session_id": "no-such-session"}).status_code == 404


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Raw]:
    """A server that keeps answers for 0.5 s and lets a key have one request in progress."""
    server = CompatServer(
        tmp_path_factory.mktemp("limited"), "--max-pending-per-key", "1", TINKER_COMPAT_RESULT_TTL_S="0.5"
    )
    yield Raw(server.base_url)
    assert server.stop() == 0, server.log.read_text()


def test_answers_expire_after_their_ttl(limited: Raw) -> None:
    body = {
        "session_id": "no-such-session",
        "model_seq_id": 0,
        "base_model": TINY,
        "lora_config": {"rank": 4},
    }
    reply = limited.post("create_model", body).json()
    assert "unknown session" in limited.result(reply["request_id"])["error"]
    time.sleep(0.5)  # the TTL passes; then the answer goes, when the server next looks
    deadline = time.monotonic() + 30
    while (expired := limited.poll(reply["request_id"])).status_code == 200:
        assert time.monotonic() < deadline, "the answer was kept past its TTL"
        time.sleep(0.1)
    assert expired.status_code == 410
    assert "has expired (answers are kept 0.5 s)" in expired.json()["error"]


def test_over_a_per_key_limit_a_submit_is_a_429_to_retry(limited: Raw) -> None:
    model_id = limited.create_model(limited.session())
    waiting = limited.optim_step(model_id, seq_id=2).json()  # in progress: it waits for seq 1
    refused = limited.optim_step(model_id, seq_id=3)
    assert refused.status_code == 429
    assert refused.headers["Retry-After-Ms"] == "1000"
    assert refused.json()["error"].startswith("pending: expected at most 1 requests in progress per API key")
    # The request the waiting one needs is let in, and both complete.
    fb = limited.forward_backward(model_id, seq_id=1).json()
    assert (
        deserialize_forward_backward_output(limited.result(fb["request_id"], protobuf=True)).metrics[
            "loss:sum"
        ]
        > 0
    )
    assert "metrics" in limited.result(waiting["request_id"])
    assert limited.optim_step(model_id, seq_id=3).status_code == 200  # sent again, now accepted


def test_our_proto_schema_is_the_sdks() -> None:
    """The .proto we wrote from the documented field numbers, against the SDK's embedded one."""
    dump = (
        "import sys; from google.protobuf import descriptor_pb2; from tinker_backend.compat import proto; "
        "fd = descriptor_pb2.FileDescriptorProto(); proto.SCHEMA.FindFileByName('tinker_public.proto').CopyToProto(fd); "
        "sys.stdout.buffer.write(fd.SerializeToString())"
    )
    ours = descriptor_pb2.FileDescriptorProto.FromString(
        subprocess.run(
            [server_python(), "-c", dump], env=server_env(), check=True, capture_output=True
        ).stdout
    )
    sdk = descriptor_pb2.FileDescriptorProto()
    tinker_public_pb2.DESCRIPTOR.CopyToProto(sdk)

    def shape(messages: Any) -> dict[str, Any]:
        return {
            m.name: (
                sorted(
                    (f.number, f.name, f.label, f.type, f.type_name.split(".")[-1], f.proto3_optional)
                    for f in m.field
                ),
                [o.name for o in m.oneof_decl],
                shape(m.nested_type),
            )
            for m in messages
        }

    sdk_messages = shape(sdk.message_type)
    # SamplingParams, StopStrings and StopTokens are in the SDK's file but unused (asample is JSON).
    assert shape(ours.message_type) == {name: sdk_messages[name] for name in shape(ours.message_type)}
    assert set(sdk_messages) - set(shape(ours.message_type)) == {
        "SamplingParams",
        "StopStrings",
        "StopTokens",
    }
    assert json.dumps(
        [(e.name, [(v.name, v.number) for v in e.value]) for e in ours.enum_type]
    ) == json.dumps([(e.name, [(v.name, v.number) for v in e.value]) for e in sdk.enum_type])
