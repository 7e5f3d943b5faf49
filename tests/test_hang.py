"""No hang, ever: every ``seq_id`` a ``TrainingClient`` reserves reaches the server or is released.

The backend runs a run's requests strictly in ``seq_id`` order and waits on gaps, so a reserved
``seq_id`` whose request is never sent would hold up every later call of the client. These tests
make one in each way we know (a custom loss that raises, a forward the server refuses, a call
cancelled in the middle or before it was sent, a client process killed between the two halves
of ``forward_backward_custom``) and check that the next calls complete. Each wait has a deadline,
so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess
from native_wire import DATA, TINY, RawClient, datum, fb, loss, step

import tinker
from tinker import _holder, wire
from tinker.futures import BackgroundLoop
from tinker.types import AdamParams, Datum, ModelInput

TIMEOUT = 60.0  # seconds any one call may take here before the test counts it as hung
ADAM = AdamParams(learning_rate=1e-2)


def nll(data: list[Datum], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
    return -sum(lp.sum() for lp in logprobs), {}


def raising(data: list[Datum], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
    raise ValueError("the custom loss blew up")


class BlockingLoss:
    """A custom loss that signals ``entered`` and then waits for ``go`` (it holds the client's
    background loop meanwhile, so nothing else the client does moves)."""

    def __init__(self) -> None:
        self.entered, self.go = threading.Event(), threading.Event()

    def __call__(self, data: list[Datum], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
        self.entered.set()
        assert self.go.wait(TIMEOUT)
        return nll(data, logprobs)


def new_run(make_service: Any) -> tinker.TrainingClient:
    return make_service().create_lora_training_client(TINY, rank=4, seed=0).result(timeout=120)


def carries_on(tc: tinker.TrainingClient, *pending: tinker.APIFuture[Any]) -> None:
    """The calls made after the gap complete, and so do new ones."""
    for future in pending:
        future.result(timeout=TIMEOUT)
    assert loss(tc.forward(DATA, "cross_entropy").result(timeout=TIMEOUT)) > 0
    tc.optim_step(ADAM).result(timeout=TIMEOUT)


def test_a_custom_loss_that_raises(make_service):
    tc = new_run(make_service)
    failed = tc.forward_backward_custom(DATA, raising)
    after = tc.optim_step(ADAM)  # pipelined behind the backward that will never be sent
    with pytest.raises(ValueError, match="blew up"):
        failed.result(timeout=TIMEOUT)
    carries_on(tc, after)


def test_a_custom_forward_the_server_rejects(make_service):
    tc = new_run(make_service)
    out_of_vocab = Datum(model_input=ModelInput.from_ints([1, 10**6]), loss_fn_inputs={"target_tokens": [2, 3]})
    called = threading.Event()

    def never(data: list[Datum], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
        called.set()
        return nll(data, logprobs)

    failed = tc.forward_backward_custom([out_of_vocab], never)
    after = tc.forward_backward(DATA, "cross_entropy")
    with pytest.raises(tinker.BadRequestError, match=r"expected token ids in \[0, \d+\), got 1000000"):
        failed.result(timeout=TIMEOUT)
    assert not called.is_set()
    carries_on(tc, after)


def test_cancelling_a_custom_call_while_its_loss_runs(make_service):
    tc = new_run(make_service)
    blocking = BlockingLoss()
    custom = tc.forward_backward_custom(DATA, blocking)
    after = tc.optim_step(ADAM)
    assert blocking.entered.wait(TIMEOUT)
    assert custom.future().cancel()
    blocking.go.set()
    carries_on(tc, after)


def test_cancelling_a_custom_call_while_its_forward_is_in_flight(make_service):
    tc = new_run(make_service)
    blocking = BlockingLoss()
    first = tc.forward_backward_custom(DATA, blocking)
    # Its forward waits on the server for the first call's backward, which waits for ``go``.
    second = tc.forward_backward_custom(DATA, nll)
    after = tc.optim_step(ADAM)
    assert blocking.entered.wait(TIMEOUT)
    assert second.future().cancel()
    blocking.go.set()
    carries_on(tc, first, after)


async def test_cancelling_the_task_that_awaits_a_custom_call(make_service):
    tc = await asyncio.to_thread(new_run, make_service)
    blocking = BlockingLoss()
    first = tc.forward_backward_custom(DATA, blocking)
    waiter = asyncio.create_task(tc.forward_backward_custom(DATA, nll).coroutine())
    after = tc.optim_step(ADAM)
    assert await asyncio.to_thread(blocking.entered.wait, TIMEOUT)
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    assert waiter.cancelled()
    blocking.go.set()
    for future in (first, after):
        await asyncio.wait_for(future.coroutine(), TIMEOUT)
    out = await asyncio.wait_for(tc.forward(DATA, "cross_entropy").coroutine(), TIMEOUT)
    assert loss(out) > 0


def test_a_call_cancelled_before_it_was_sent(make_service):
    """A call cancelled before its coroutine ever ran (the client's loop was busy) never sends
    its request: its seq_id is released all the same."""
    tc = new_run(make_service)
    blocking = BlockingLoss()
    held = tc.forward_backward_custom(DATA, blocking)  # holds the client's loop while its loss runs
    assert blocking.entered.wait(TIMEOUT)
    cancelled = [tc.forward_backward(DATA, "cross_entropy"), tc.save_state("never")]
    for future in cancelled:
        assert future.future().cancel()
    sampler = tc.save_weights_and_get_sampling_client()
    blocking.go.set()
    carries_on(tc, held)
    assert sampler.sample(ModelInput.from_ints([1, 2]), 1, tinker.SamplingParams(max_tokens=2)).result(timeout=TIMEOUT)


def test_a_run_that_never_existed_fails_every_call_without_hanging(make_service):
    service = make_service()
    tc = service.create_lora_training_client("no-such-model/anywhere")
    custom = tc.forward_backward_custom(DATA, nll)
    plain = tc.forward_backward(DATA, "cross_entropy")
    for future in (custom, plain):
        with pytest.raises(tinker.NotFoundError):
            future.result(timeout=TIMEOUT)


async def test_cancelling_a_call_that_waits_for_the_run_leaves_the_run_being_created():
    """Calls made before the run exists wait on its creation; cancelling one of them must not
    cancel the creation that every other call waits on too (it used to: ``wrap`` chained the cancel)."""
    creation: concurrent.futures.Future[int] = concurrent.futures.Future()
    waiter = asyncio.create_task(_holder.wrap(tinker.APIFuture(creation, BackgroundLoop.get())))
    await asyncio.sleep(0)
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    assert waiter.cancelled() and not creation.cancelled()
    creation.set_result(1)
    assert await _holder.wrap(tinker.APIFuture(creation, BackgroundLoop.get())) == 1


# --- a client process killed between the two halves of forward_backward_custom --------------

API_KEY = "tml-hang-test-kkkkkkkkkkkkkkkkkkkkkk"
SESSION_TIMEOUT_S = 4.0

CHILD = """
import os, signal, sys, time
import torch  # now: imported on the client's loop by the custom call, it would stall the heartbeats
import tinker
from tinker import _holder
from native_wire import DATA, TINY

_holder.HEARTBEAT_INTERVAL_S = 0.5  # the server's session timeout is a few seconds
tc = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2]).create_lora_training_client(TINY, rank=4, seed=0)
tc.forward_backward(DATA, "cross_entropy")                 # seq_id 1
tc.optim_step(tinker.AdamParams(learning_rate=1e-2))        # 2
tc.save_state("before").result()                            # 3
print(tc.model_id, flush=True)

def die(data, logprobs):
    os.kill(os.getpid(), signal.SIGKILL)

tc.forward_backward_custom(DATA, die)                       # 4 (forward) and 5 (backward, never sent)
tc.optim_step(tinker.AdamParams(learning_rate=1e-2))        # 6: sent, waits on 5
time.sleep(120)
"""


@pytest.fixture
def expiring_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path / "data", "--api-key", API_KEY, "--session-timeout", str(SESSION_TIMEOUT_S)
    )
    yield server
    server.stop()


async def test_a_client_killed_between_the_two_halves(expiring_server):
    """The server releases the gap when the dead client's session expires: the run reloads from
    its save_state and the next calls on it complete."""
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), *sys.path])}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, expiring_server.base_url, API_KEY,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(child.communicate(), 180)
    assert child.returncode == -9, err.decode()
    model_id = out.decode().split()[0]
    log_at_death = len(expiring_server.log.read_text())

    # The optim_step queued behind the gap fails with 410 when the session expires; it changed
    # nothing, so the run can still be reloaded from its save_state.
    deadline = time.monotonic() + 10 * SESSION_TIMEOUT_S + 30
    while "expired: unloaded 1 runs" not in expiring_server.log.read_text()[log_at_death:]:
        assert time.monotonic() < deadline, expiring_server.log.read_text()
        await asyncio.sleep(0.2)

    async with RawClient(expiring_server.base_url, API_KEY) as client, keeping_alive(expiring_server, model_id):
        forward = await asyncio.wait_for(client.call(fb(model_id, 7)), TIMEOUT)
        assert loss(forward) > 0
        stepped = await asyncio.wait_for(client.call(step(model_id, 8)), TIMEOUT)
        assert not isinstance(stepped, wire.Failure), stepped
        again = await asyncio.wait_for(client.call(fb(model_id, 9, data=[datum([1, 2, 3])], forward_only=True)), TIMEOUT)
        assert loss(again) > 0
    assert f"reloaded run {model_id} at seq_id 7" in expiring_server.log.read_text()


@contextlib.asynccontextmanager
async def keeping_alive(server: ServerProcess, model_id: str) -> AsyncIterator[None]:
    """Heartbeats for the run's session, as a client continuing it would send (a reload and a
    clock cycle on a busy machine can take longer than the short session timeout)."""
    session_id = model_id.split(":")[0]

    async def beat(client: RawClient) -> None:
        while True:
            assert not isinstance(await client.call(wire.Heartbeat(session_id=session_id)), wire.Failure)
            await asyncio.sleep(SESSION_TIMEOUT_S / 6)

    async with RawClient(server.base_url, API_KEY) as client:
        task = asyncio.create_task(beat(client))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --- ReleaseSeq on the wire -------------------------------------------------------------------


async def test_release_seq_fills_a_gap_and_is_harmless_otherwise(server):
    async with RawClient(server.base_url) as client:
        _, run = await client.new_run()
        assert loss(await client.call(fb(run, 1))) > 0
        # 3 waits on the gap at 2 until 2 is released; the release is answered in order.
        trained, released = await asyncio.wait_for(
            client.gather([step(run, 3), wire.ReleaseSeq(model_id=run, seq_id=2)]), TIMEOUT
        )
        assert not isinstance(trained, wire.Failure) and released == wire.Empty()
        # Releasing what ran, or what was released, changes nothing.
        for seq_id in (1, 2, 3):
            assert await client.call(wire.ReleaseSeq(model_id=run, seq_id=seq_id)) == wire.Empty()
        # A request that arrives after its seq_id was released does not run.
        assert await client.call(wire.ReleaseSeq(model_id=run, seq_id=4)) == wire.Empty()
        late = await client.call(step(run, 4))
        assert isinstance(late, wire.Failure) and late.status == 409 and "released" in late.message
        assert loss(await asyncio.wait_for(client.call(fb(run, 5)), TIMEOUT)) > 0
        unknown = await client.call(wire.ReleaseSeq(model_id=run + "0", seq_id=1))
        assert isinstance(unknown, wire.Failure) and unknown.status == 404
