"""Tests that spawn worker processes (``@pytest.mark.distributed``) take minutes: they run in
their own session, ``nox -s distributed``, which sets ``TINKER_DISTRIBUTED=1``; elsewhere they
are reported as skipped with that reason. The cheap tests here run everywhere."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from conftest import TINY, ServerProcess

SKIP_REASON = "spawns worker processes: run by `nox -s distributed` (or with TINKER_DISTRIBUTED=1)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("TINKER_DISTRIBUTED") == "1":
        return
    for item in items:
        if item.get_closest_marker("distributed") is not None:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


# In-flight requests at which the replica holding an adapter counts as overloaded, in local_server.
LOCAL_MAX_IN_FLIGHT = 2


@pytest.fixture(scope="session")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``--workers local``: tiny-llama on a 2-rank trainer group and 2 sampler workers, shared by
    the test files (starting workers is the slow part of this session)."""
    root = tmp_path_factory.mktemp("local-workers")
    models = root / "models.toml"
    models.write_text(f'[models."{TINY}"]\ntrainer_ranks = 2\nmax_adapter_slots = 4\nsampler_replicas = 2\n'
                      f"sampler_max_in_flight = {LOCAL_MAX_IN_FLIGHT}\n")
    proc = ServerProcess(root / "data", "--workers", "local", "--models", str(models))
    yield proc
    assert proc.stop() == 0
