"""``ray_driver.connect``: a local Ray started from a thread that then ends keeps running.

Ray starts a local Ray's GCS and raylet with ``PR_SET_PDEATHSIG``, which fires when the *thread*
that forked them ends. The server used to call ``ray.init`` on a model's engine thread and stop
that thread first on shutdown, which killed the GCS and raylet under the live driver: exit
status 1 instead of 0 (docs/scaling.md, "Shutdown"). With ``ray.init`` on the calling thread,
this script hangs on ``ray.nodes()`` until Ray gives up on its GCS and exits 1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("ray", reason="needs the [ray] extra (nox -s distributed installs it)")
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(240)]

SCRIPT = """
import threading, time
from tinker_backend.workers import ray_driver
ray_driver.prepare_environment()
import ray
caller = threading.Thread(target=ray_driver.connect, args=(None, 1))
caller.start()
caller.join()
time.sleep(3)  # a GCS tied to the ended thread is SIGKILLed at once
print(len(ray.nodes()), ray.cluster_resources()["CPU"], flush=True)
ray_driver.disconnect()
print("disconnected", flush=True)
"""


def test_a_local_ray_outlives_the_thread_that_connected() -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_memory_monitor_refresh_ms": "0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["1", "1.0", "disconnected"], done.stderr[-4000:]
