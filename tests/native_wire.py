"""Helpers for tests that speak the native protocol directly: raw WebSocket calls and
in-process ``RequestHandler`` calls, so a test can send what the ``tinker`` client would refuse."""

from __future__ import annotations

import itertools
from typing import Any

import aiohttp
import msgspec

from tinker import wire
from tinker.types import AdamParams, Datum, LoraConfig, ModelInput

TINY = "tiny-llama"


def datum(tokens: list[int]) -> Datum:
    """A next-token datum over ``tokens`` (every position weighted 1)."""
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


DATA = [datum([5, 17, 99, 3, 42, 7, 250, 11]), datum([1, 2, 3, 4, 5, 6])]


class RawClient:
    """One native WebSocket. ``call`` returns the decoded response or the ``Failure`` frame."""

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.url = base_url + "/native/v1/ws"
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self._ids = itertools.count(1)

    async def __aenter__(self) -> RawClient:
        self._session = aiohttp.ClientSession()
        try:
            self.ws = await self._session.ws_connect(self.url, headers=self.headers, max_msg_size=0)
        except BaseException:
            await self._session.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self._session.close()

    async def send(self, request: Any) -> int:
        """Send one request (a ``wire`` struct, or raw bytes as the request) without waiting."""
        payload = request if isinstance(request, bytes) else wire.encoder.encode(request)
        call_id = next(self._ids)
        await self.ws.send_bytes(wire.encoder.encode(wire.Submit(call_id, msgspec.Raw(payload))))
        return call_id

    async def receive(self) -> wire.Result | wire.Failure:
        return wire.server_frame_decoder.decode((await self.ws.receive(timeout=120)).data)

    async def call(self, request: Any) -> Any:
        """The decoded response, or the ``Failure`` (or ``Result`` of a raw request) frame."""
        await self.send(request)
        return _decoded(request, await self.receive())

    async def gather(self, requests: list[Any]) -> list[Any]:
        """Send all of ``requests`` at once; their answers in request order."""
        ids = [await self.send(r) for r in requests]
        answers: dict[int, Any] = {}
        while len(answers) < len(ids):
            frame = await self.receive()
            answers[frame.call_id] = frame
        return [_decoded(request, answers[call_id]) for call_id, request in zip(ids, requests, strict=True)]

    async def new_run(self, seed: int = 0, rank: int = 4) -> tuple[str, str]:
        """A new session and a run in it: (session_id, model_id)."""
        session = await self.call(wire.CreateSession())
        model = await self.call(
            wire.CreateModel(
                session_id=session.session_id, model_seq_id=0, base_model=TINY,
                lora_config=LoraConfig(rank=rank, seed=seed),
            )
        )
        assert isinstance(model, wire.ModelCreated), model
        return session.session_id, model.model_id


def _decoded(request: Any, frame: wire.Result | wire.Failure) -> Any:
    if isinstance(frame, wire.Result) and not isinstance(request, bytes):
        return wire.decode_response(type(request), frame.payload)
    return frame


def fb(model_id: str, seq_id: int, data: list[Datum] = DATA, **fields: Any) -> wire.ForwardBackward:
    return wire.ForwardBackward(model_id=model_id, seq_id=seq_id, data=data, loss_fn="cross_entropy", **fields)


def step(model_id: str, seq_id: int, lr: float = 1e-2) -> wire.OptimStep:
    return wire.OptimStep(model_id=model_id, seq_id=seq_id, adam_params=AdamParams(learning_rate=lr))


def loss(output: Any) -> float:
    assert not isinstance(output, wire.Failure), output
    return float(output.metrics["loss:sum"])
