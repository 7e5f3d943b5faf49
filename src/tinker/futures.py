"""``APIFuture``: the result of every primitive, awaitable and blockable.

Every client method starts its work at once on the client's background event loop and returns
an ``APIFuture``. Use it the way your code already runs:

Sync code and notebooks::

    fb = training_client.forward_backward(data, "cross_entropy")
    step = training_client.optim_step(tinker.AdamParams(learning_rate=1e-3))
    print(fb.result().metrics, step.result())

Async code (the caller's loop is never blocked while waiting)::

    fb = training_client.forward_backward(data, "cross_entropy")
    step = training_client.optim_step(tinker.AdamParams(learning_rate=1e-3))
    out = await fb
    await step
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import threading
import warnings
import weakref
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
U = TypeVar("U")

__all__ = ["APIFuture", "BackgroundLoop"]

# How long the resources registered with ``close_at_exit`` get to close at interpreter exit (a
# WebSocket close handshake takes a round trip); then whatever still runs is cancelled.
_CLOSE_AT_EXIT_S = 3.0


class _Closable(Protocol):
    async def aclose(self) -> None: ...


class BackgroundLoop:
    """One event loop on a daemon thread, shared by every client of this process."""

    _instance: BackgroundLoop | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tinker-loop", daemon=True)
        self._thread.start()
        self._to_close: weakref.WeakSet[_Closable] = weakref.WeakSet()
        atexit.register(self._shutdown)

    def close_at_exit(self, resource: _Closable) -> None:
        """Run ``await resource.aclose()`` on this loop at interpreter exit, unless ``resource``
        was garbage collected first: connections a script never closed then end cleanly,
        without aiohttp's "Unclosed client session" warning. Closing twice must be harmless."""
        self._to_close.add(resource)

    def _shutdown(self) -> None:
        """At interpreter exit: close the registered resources, cancel what is still running
        and stop the loop quietly."""

        async def cancel_all() -> None:
            closing = [resource.aclose() for resource in list(self._to_close)]
            if closing:
                with contextlib.suppress(Exception):  # a timeout included: exit goes on regardless
                    await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), _CLOSE_AT_EXIT_S)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(timeout=_CLOSE_AT_EXIT_S + 2)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)

    @classmethod
    def get(cls) -> BackgroundLoop:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def submit(self, coro: Coroutine[Any, Any, T]) -> APIFuture[T]:
        """Schedule ``coro`` on the background loop and return its future at once."""
        return APIFuture(asyncio.run_coroutine_threadsafe(coro, self.loop), self)


class APIFuture(Generic[T]):
    """The pending result of one operation.

    ``await fut`` waits without blocking the running loop; ``fut.result(timeout)`` blocks the
    calling thread; ``fut.future()`` is the underlying ``concurrent.futures.Future`` (cancelling
    it cancels the operation).
    """

    def __init__(self, future: concurrent.futures.Future[T], loop: BackgroundLoop) -> None:
        self._future = future
        self._loop = loop

    def result(self, timeout: float | None = None) -> T:
        """Block until the result is ready; raises ``TimeoutError`` after ``timeout`` seconds."""
        if not self._future.done():
            if self._loop.in_loop_thread():
                raise RuntimeError(
                    "APIFuture.result() called on the tinker background loop would deadlock; "
                    "use `await` instead"
                )
            if _running_loop() is not None:
                warnings.warn(
                    "APIFuture.result() blocks the running event loop; use `await fut` instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        """Await the result; after ``timeout`` seconds raise ``TimeoutError`` and cancel the work."""
        return await asyncio.wait_for(asyncio.wrap_future(self._future), timeout)

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self._future).__await__()

    async def coroutine(self) -> T:
        """The result as a coroutine, for ``asyncio.create_task`` and ``asyncio.gather``."""
        return await self

    def future(self) -> concurrent.futures.Future[T]:
        return self._future

    def done(self) -> bool:
        return self._future.done()

    def map(self, fn: Callable[[T], U]) -> APIFuture[U]:
        """A future of ``fn(result)``, computed on the background loop."""

        async def mapped() -> U:
            return fn(await asyncio.wrap_future(self._future))

        return self._loop.submit(mapped())


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
