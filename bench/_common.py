"""Shared helpers for the benchmarks: a server subprocess, percentiles, a results table."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Server:
    """A ``tinker-server`` on a free loopback port, stopped on exit; ``flags`` are added to its
    command line (placement, ``--models``, ...); ``thread_names()`` works when it was started
    with ``named_threads=True``."""

    def __init__(self, *flags: str, named_threads: bool = False, start_timeout_s: float = 60) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory()
        self._names = Path(self._dir.name) / "thread-names.txt"
        entry = [str(Path(__file__).with_name("_server_threads.py")), str(self._names)] if named_threads else [
            "-m", "tinker_backend.cli"]
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "--port", str(self.port), "--data-dir", str(Path(self._dir.name) / "data"),
             "--log-level", "warning", *flags],
        )
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.base_url}/api/v1/healthz", timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("tinker-server did not start") from None
                time.sleep(0.1)

    def healthz(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base_url}/api/v1/healthz", timeout=5) as response:
            return json.loads(response.read())

    def thread_names(self) -> dict[int, str]:
        """Native thread id -> Python thread name of each thread of the server, now."""
        self._names.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not self._names.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("tinker-server did not write its thread names (named_threads=True?)")
            time.sleep(0.05)
        pairs = (line.split("\t", 1) for line in self._names.read_text().splitlines())
        return {int(tid): name for tid, name in pairs}

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        self._dir.cleanup()


def temp_data_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tinker-bench-"))
