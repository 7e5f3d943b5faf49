"""The server as a Ray driver: joining a cluster (or starting a local Ray) and leaving it cleanly.

Two things make a Ray driver that is also an aiohttp server exit badly on SIGTERM; this module
owns both fixes (docs/scaling.md, "Shutdown"):

* **The thread that starts a local Ray must outlive it.** ``ray.init`` without an address starts
  the GCS and the raylet with Linux's ``PR_SET_PDEATHSIG`` (Ray's kernel fate sharing), which
  fires when the *thread* that forked them exits, not the process. The first model's engine
  thread used to start Ray; the server stops that thread before it stops Ray, so the GCS and the
  raylet were killed under a live driver, whose core worker then ended the server with exit
  status 1 ("the local Raylet is dead"), or crashed racing ``ray.shutdown`` (SIGSEGV). So
  ``connect`` runs ``ray.init`` on a thread of its own that waits until ``disconnect`` has shut
  Ray down.
* **Ray's failure signal handler.** Each core worker, the driver's too, installs abseil's
  failure signal handler for SIGTERM, which prints a stack trace, arms an abort 3 s ahead
  (ray-project/ray#64830) and then chains to the server's own handler. ``prepare_environment``
  (called by ``cli.main`` before Ray is imported) sets ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER=1``,
  Ray's documented switch, so SIGTERM reaches aiohttp's graceful shutdown untouched;
  ``cancel_abort_alarm`` still disarms the abort when an operator turned the handler back on.

It also turns off Ray's auto-connect: a Ray call made after ``disconnect`` (a sampler actor's
restart racing the shutdown) would otherwise start a new local Ray.

Ray itself does not install its Python SIGTERM handler here: it only does so when ``ray.init``
runs on the main thread.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import Future

# What the server sets before Ray is imported (Ray reads both at import), unless already set.
DRIVER_ENV = {
    "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",  # SIGTERM straight to the server's shutdown
    "RAY_ENABLE_AUTO_CONNECT": "0",  # no Ray call may start a local Ray behind connect's back
}

_lock = threading.Lock()  # two models' engine threads may connect at once
_release = threading.Event()  # set by disconnect: the driver thread may end


def prepare_environment() -> None:
    """Set ``DRIVER_ENV`` in this process; call it before anything imports Ray."""
    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at ``address``, or start a local Ray (no dashboard) when None; the
    ``ray.init`` runs on a daemon thread that lives until ``disconnect``."""
    import ray

    with _lock:
        if ray.is_initialized():
            return
        started: Future[None] = Future()
        _release.clear()
        threading.Thread(target=_drive, args=(address, num_cpus, started), name="ray-driver", daemon=True).start()
        started.result()


def _drive(address: str | None, num_cpus: int | None, started: Future[None]) -> None:
    import ray

    try:
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except BaseException as e:
        started.set_exception(e)
        return
    started.set_result(None)
    _release.wait()  # the local Ray's processes die with this thread


def cancel_abort_alarm() -> None:
    """Disarm the abort that Ray's failure signal handler arms 3 s after a SIGTERM, if it is
    installed (``RAY_DISABLE_FAILURE_SIGNAL_HANDLER=0``): stopping the workers takes longer."""
    signal.alarm(0)


def disconnect() -> None:
    """Leave Ray, stopping the local Ray that ``connect`` started, if it did; then let the
    driver thread end."""
    import ray

    with _lock:
        if ray.is_initialized():
            ray.shutdown()
        _release.set()
