"""Conformance tests: the OFFICIAL ``tinker`` SDK (0.38.0) and ``tinker-cookbook`` (0.6.1)
against a real ``tinker-server`` on loopback. Run them with ``nox -s compat``.

Our client package is also called ``tinker``, so the two never share a process:

* this test process imports the official SDK, which is installed in the compat venv;
* the server runs as a subprocess with ``PYTHONPATH=<repo>/src:<repo>/backend``, so that
  there ``tinker`` is ours. Its interpreter is ``$TINKER_COMPAT_SERVER_PYTHON`` (a venv with
  this repo installed, e.g. ``/work/venv/bin/python``), by default this one: the compat venv
  also holds the server's dependencies (``pip install -e .``).

In any other environment (``import tinker`` is our client) each test module is collected and
reported as skipped, with the reason (``SKIP_REASON``), without being imported.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SDK_VERSION = "0.38.0"
TINY = "tiny-llama"
API_KEY = "tml-compat-tests"


def _official_sdk_installed() -> bool:
    try:
        return importlib.metadata.version("tinker") == SDK_VERSION
    except importlib.metadata.PackageNotFoundError:
        return False


SKIP_REASON = f"official tinker SDK {SDK_VERSION} not installed: run `nox -s compat`"


class _NotImported(pytest.Item):
    """A test of a module that is not imported here (it imports the official SDK): it is skipped."""

    def __init__(self, *, lineno: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lineno = lineno
        self.add_marker(pytest.mark.skip(reason=SKIP_REASON))

    def runtest(self) -> None:
        raise AssertionError("unreachable: the item is marked skip")

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, self.lineno - 1, self.name


class _SkippedModule(pytest.Module):
    """Lists the module's test functions from its source, without importing it."""

    def collect(self) -> list[pytest.Item]:
        tree = ast.parse(self.path.read_text(), filename=str(self.path))
        return [
            _NotImported.from_parent(self, name=node.name, lineno=node.lineno)
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
        ]


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if _official_sdk_installed():
        return None  # pytest's own Module
    return _SkippedModule.from_parent(parent, path=module_path)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Here ``tinker`` and ``tinker_cookbook`` are the official packages, not ours: the root
    configuration's rule that their warnings are errors is for our code, so it is relaxed."""
    for item in items:
        if item.path.is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.filterwarnings(r"default::Warning:tinker(_cookbook)?(\.|$)"))

# The main server: small limits, so that cheap tests reach chunking, long-poll timeouts,
# "complete_metadata" answers and zstd bodies.
MAIN_SERVER_SETTINGS = {
    "TINKER_COMPAT_LONG_POLL_S": "1",
    "TINKER_COMPAT_FWDBWD_MAX_CHUNK_LEN": "4",
    "TINKER_COMPAT_INLINE_RESULT_BYTES": "1024",
    "TINKER_COMPAT_COMPRESS_FWDBWD": "1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_python() -> str:
    return os.environ.get("TINKER_COMPAT_SERVER_PYTHON", sys.executable)


def server_env(**settings: str) -> dict[str, str]:
    """The environment of a server subprocess: our packages first on the path, then ``settings``."""
    path = os.pathsep.join([str(REPO / "src"), str(REPO / "backend")])
    return {**os.environ, "PYTHONPATH": path, **settings}


class CompatServer:
    """A ``tinker-server`` subprocess on a free loopback port, which accepts the key ``API_KEY``."""

    def __init__(self, data_dir: Path, *flags: str, **settings: str) -> None:
        """``flags`` go on the command line, ``settings`` (``TINKER_COMPAT_*``) in the environment."""
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"server-{self.port}.log"
        command = [server_python(), "-m", "tinker_backend.cli", "--port", str(self.port)]
        command += ["--data-dir", str(data_dir), "--api-key", API_KEY, *flags]
        self.proc = subprocess.Popen(
            command, env=server_env(**settings), stdout=subprocess.DEVNULL, stderr=self.log.open("wb")
        )
        deadline = time.monotonic() + 90
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

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def compat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompatServer]:
    server = CompatServer(tmp_path_factory.mktemp("compat-server"), **MAIN_SERVER_SETTINGS)
    yield server
    assert server.stop() == 0, server.log.read_text()


@pytest.fixture(scope="session", autouse=True)
def sdk_env(compat_server: CompatServer) -> Iterator[None]:
    """Point every official client (including the cookbook's) at the server."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_BASE_URL", compat_server.base_url)
        env.setenv("TINKER_API_KEY", API_KEY)
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer(sdk_env: None) -> None:
    """Register ``tiny-llama``'s tokenizer with the cookbook, from the folder the server names
    in ``get_info`` (the Hub is never asked)."""
    from transformers import AutoTokenizer

    import tinker
    from tinker_cookbook.tokenizer_utils import register_tokenizer

    with tinker.ServiceClient() as service:
        folder = service.create_lora_training_client(TINY, rank=1).result().get_info().model_data.tokenizer_id
    register_tokenizer(TINY, lambda: AutoTokenizer.from_pretrained(folder))
