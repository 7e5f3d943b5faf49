"""Shared fixtures: a real ``tinker-server`` on a loopback port, and clients for both backends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tinker

# Tests never reach the Hugging Face Hub: names like "no-such/model" must fail fast, offline
# (tests of the Hub download path serve a fake Hub on loopback and unset this themselves).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = "tiny-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A ``tinker-server`` subprocess; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(self, data_dir: Path, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"server-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tinker_backend.cli", "--port", str(self.port), "--data-dir", str(data_dir), *extra],
            stdout=subprocess.DEVNULL,
            stderr=(log_file := self.log.open("wb")),
        )
        log_file.close()  # the child has its own descriptor
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.base_url}/api/v1/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tinker-server did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("server-data"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded-data")


@pytest.fixture(params=["embedded", "server"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_service(
    backend_kind: str, request: pytest.FixtureRequest, embedded_dir: Path
) -> Iterator[Callable[[], tinker.ServiceClient]]:
    """A factory of ``ServiceClient``s for the parametrised backend (embedded or a real server)."""
    created: list[tinker.ServiceClient] = []
    if backend_kind == "server":
        server: ServerProcess = request.getfixturevalue("server")
        kwargs: dict[str, object] = {"base_url": server.base_url}
    else:
        os.environ.pop("TINKER_BASE_URL", None)
        kwargs = {"data_dir": embedded_dir}

    def make() -> tinker.ServiceClient:
        service = tinker.ServiceClient(**kwargs)  # type: ignore[arg-type]
        created.append(service)
        return service

    yield make
    for service in created:
        service.close().result(timeout=30)


# Tenants of ``keyed_server``: owner -> API key (its keys file maps each key to its owner).
TENANT_KEYS = {name: f"tml-{name}-{'k' * 24}" for name in ("alice", "bob", "carol", "dave", "eve", "frank", "mallory", "olga")}
# Its per-key limits, small enough for tests to reach.
KEYED_LIMITS = {"runs": 3, "pending": 6, "storage": 600_000, "request_bytes": 8 * 2**20}


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with API keys (``TENANT_KEYS``) and per-key limits (``KEYED_LIMITS``)."""
    root = tmp_path_factory.mktemp("keyed-server")
    keys_file = root / "keys"
    keys_file.write_text("".join(f"{key} {owner}\n" for owner, key in TENANT_KEYS.items()))
    proc = ServerProcess(
        root / "data",
        "--keys-file", str(keys_file),
        "--max-runs-per-key", str(KEYED_LIMITS["runs"]),
        "--max-pending-per-key", str(KEYED_LIMITS["pending"]),
        "--max-storage-per-key", str(KEYED_LIMITS["storage"]),
        "--max-request-bytes", str(KEYED_LIMITS["request_bytes"]),
    )
    proc.keys_file = keys_file  # type: ignore[attr-defined]
    yield proc
    proc.stop()
