"""APIFuture and the background loop: await, result, timeouts, and never blocking the caller."""

import asyncio
import threading
import time
import warnings

import pytest

from tinker.futures import APIFuture, BackgroundLoop


async def slow_value(value: int, delay: float) -> int:
    await asyncio.sleep(delay)
    return value


class Gate:
    """Work on the background loop that stays pending until the test calls ``open()``."""

    def __init__(self) -> None:
        self._opened = asyncio.Event()  # used on the background loop only

    async def value(self, value: int) -> int:
        await self._opened.wait()
        return value

    def open(self) -> None:
        BackgroundLoop.get().loop.call_soon_threadsafe(self._opened.set)


async def eventually(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not become true in time"
        await asyncio.sleep(0.001)


def test_result_from_sync_code():
    fut = BackgroundLoop.get().submit(slow_value(7, 0.01))
    assert fut.result(timeout=5) == 7
    assert fut.done()


def test_result_timeout():
    gate = Gate()
    fut = BackgroundLoop.get().submit(gate.value(1))
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.01)
    gate.open()
    assert fut.result(timeout=5) == 1  # a timed-out result() leaves the work running


async def test_await_does_not_block_the_running_loop():
    called_back = threading.Event()

    async def until_called_back() -> bool:
        return await asyncio.to_thread(called_back.wait, 10)

    fut = BackgroundLoop.get().submit(until_called_back())
    asyncio.get_running_loop().call_soon(called_back.set)  # runs only if `await fut` lets the loop run
    assert await fut  # False (after 10 s) had the caller's loop been blocked


async def test_result_async_timeout_cancels():
    fut = BackgroundLoop.get().submit(Gate().value(1))  # never opened
    with pytest.raises(TimeoutError):
        await fut.result_async(timeout=0.05)
    await eventually(fut.future().cancelled)


async def test_result_inside_a_running_loop_warns():
    gate = Gate()
    fut = BackgroundLoop.get().submit(gate.value(1))  # surely pending when result() is called
    with pytest.warns(RuntimeWarning, match="blocks the running event loop"), pytest.raises(TimeoutError):
        fut.result(timeout=0.01)
    gate.open()
    assert await fut == 1


def test_result_on_the_background_loop_refuses_to_deadlock():
    loop = BackgroundLoop.get()
    gate = Gate()
    inner = loop.submit(gate.value(1))  # surely pending when result() is called

    async def call_result() -> str:
        try:
            inner.result()
        except RuntimeError as e:
            return str(e)
        return "no error"

    assert "would deadlock" in loop.submit(call_result()).result(timeout=5)
    gate.open()
    assert inner.result(timeout=5) == 1


def test_map_and_gather():
    loop = BackgroundLoop.get()
    doubled = loop.submit(slow_value(4, 0.01)).map(lambda v: v * 2)
    assert doubled.result(timeout=5) == 8

    async def gather() -> list[int]:
        return await asyncio.gather(*(loop.submit(slow_value(i, 0.01)).coroutine() for i in range(5)))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert asyncio.run(gather()) == [0, 1, 2, 3, 4]


def test_errors_propagate():
    async def fail() -> None:
        raise ValueError("bad thing")

    with pytest.raises(ValueError, match="bad thing"):
        BackgroundLoop.get().submit(fail()).result(timeout=5)


def test_many_pending_futures_resolve():
    loop = BackgroundLoop.get()
    futures: list[APIFuture[int]] = [loop.submit(slow_value(i, 0.05)) for i in range(500)]
    assert [f.result(timeout=10) for f in futures] == list(range(500))
