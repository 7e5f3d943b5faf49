"""Shared helpers for the benchmarks: a server subprocess, percentiles, a results table."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Server:
    """A ``tinker-server`` on a free loopback port, stopped on exit."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tinker_backend.cli", "--port", str(self.port), "--data-dir", self._dir.name,
             "--log-level", "warning"],
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.base_url}/api/v1/healthz", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("tinker-server did not start")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._dir.cleanup()


def temp_data_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tinker-bench-"))
