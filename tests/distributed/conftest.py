"""Tests that spawn worker processes (``@pytest.mark.distributed``) take minutes: they run in
their own session, ``nox -s distributed``, which sets ``TINKER_DISTRIBUTED=1``; elsewhere they
are reported as skipped with that reason. The cheap tests here run everywhere."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY, ServerProcess

SKIP_REASON = "spawns worker processes: run by `nox -s distributed` (or with TINKER_DISTRIBUTED=1)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("TINKER_DISTRIBUTED") == "1":
        return
    for item in items:
        if item.get_closest_marker("distributed") is not None:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


# In-flight requests at which the replica holding an adapter counts as overloaded, in local_server
# and ray_server.
SAMPLER_MAX_IN_FLIGHT = 2
# What a clean stop never logs: a Python traceback, the stack trace of Ray's failure signal handler
# (or its abort), Ray's core worker ending the process because its local Ray died under it.
UNCLEAN = ("Traceback", "SIGTERM received", "RAW:", "Aborted", "Raylet is dead", "The program will terminate")


def stop_cleanly(proc: ServerProcess) -> None:
    """SIGTERM the server: it must exit 0 having logged "stopped", and log nothing unclean on the way."""
    before = len(proc.log.read_bytes())
    code = proc.stop()
    tail = proc.log.read_bytes()[before:].decode(errors="replace")
    assert code == 0, f"the server exited {code} on SIGTERM; its log after the signal:\n{tail[-4000:]}"
    assert '"msg": "stopped"' in tail, tail[-4000:]
    assert not [line for line in tail.splitlines() if any(word in line for word in UNCLEAN)], tail[-4000:]


def models_file(root: Path) -> Path:
    """tiny-llama on a 2-rank trainer group and 2 sampler workers."""
    models = root / "models.toml"
    models.write_text(f'[models."{TINY}"]\ntrainer_ranks = 2\nmax_adapter_slots = 4\nsampler_replicas = 2\n'
                      f"sampler_max_in_flight = {SAMPLER_MAX_IN_FLIGHT}\n")
    return models


@pytest.fixture(scope="session")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``--workers local``: tiny-llama on a 2-rank trainer group and 2 sampler workers, shared by
    the test files (starting workers is the slow part of this session)."""
    root = tmp_path_factory.mktemp("local-workers")
    proc = ServerProcess(root / "data", "--workers", "local", "--models", str(models_file(root)))
    yield proc
    stop_cleanly(proc)


@pytest.fixture(scope="session")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``--workers ray`` on a local Ray: the same models as ``local_server``, the ranks and the
    sampler workers as Ray actors. Its teardown is the clean-exit check after the kill -9 tests'
    actor restarts, and during one: exit 0 on SIGTERM, a clean log."""
    pytest.importorskip("ray", reason="needs the [ray] extra (nox -s distributed installs it)")
    root = tmp_path_factory.mktemp("ray-workers")
    # A local test cluster: no token file written to ~/.ray (Ray 2.60 turns auth on by default),
    # and no memory monitor (on a busy test machine it kills actors when the whole host is full).
    test_env = {"RAY_AUTH_MODE": "disabled", "RAY_memory_monitor_refresh_ms": "0"}
    os.environ.update(test_env)
    try:
        proc = ServerProcess(root / "data", "--workers", "ray", "--models", str(models_file(root)))
    finally:
        for key in test_env:
            del os.environ[key]
    yield proc
    # The stop also lands while a sampler actor restarts: one is killed, and once the server has
    # seen it die (its restart takes seconds), SIGTERM.
    try:
        os.kill(sampler_health(proc)["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while sampler_health(proc)["alive"]:
            assert time.monotonic() < deadline, "the killed sampler actor was not seen dead within 10 s"
            time.sleep(0.05)
    finally:
        stop_cleanly(proc)


def sampler_health(proc: ServerProcess) -> dict[str, Any]:
    """healthz's entry for tiny-llama's first sampler replica."""
    with urllib.request.urlopen(f"{proc.base_url}/api/v1/healthz", timeout=5) as response:
        replica: dict[str, Any] = json.loads(response.read())["workers"][TINY]["samplers"][0]
        return replica
