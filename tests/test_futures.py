"""APIFuture and the background loop: await, result, timeouts, and never blocking the caller."""

import asyncio
import warnings

import pytest

from tinker.futures import APIFuture, BackgroundLoop


async def slow_value(value: int, delay: float) -> int:
    await asyncio.sleep(delay)
    return value


def test_result_from_sync_code():
    fut = BackgroundLoop.get().submit(slow_value(7, 0.01))
    assert fut.result(timeout=5) == 7
    assert fut.done()


def test_result_timeout():
    fut = BackgroundLoop.get().submit(slow_value(1, 1.0))
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.01)


async def test_await_does_not_block_the_running_loop():
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    assert await BackgroundLoop.get().submit(slow_value(3, 0.2)) == 3
    task.cancel()
    assert ticks >= 10  # the caller's loop kept running while we waited


async def test_result_async_timeout_cancels():
    fut = BackgroundLoop.get().submit(slow_value(1, 5.0))
    with pytest.raises(TimeoutError):
        await fut.result_async(timeout=0.05)
    await asyncio.sleep(0.05)
    assert fut.future().cancelled()


async def test_result_inside_a_running_loop_warns():
    fut = BackgroundLoop.get().submit(slow_value(1, 0.01))
    with pytest.warns(RuntimeWarning, match="blocks the running event loop"):
        fut.result()


def test_result_on_the_background_loop_refuses_to_deadlock():
    loop = BackgroundLoop.get()
    inner = loop.submit(slow_value(1, 0.5))

    async def call_result() -> str:
        try:
            inner.result()
        except RuntimeError as e:
            return str(e)
        return "no error"

    assert "would deadlock" in loop.submit(call_result()).result(timeout=5)


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
