"""Tests that spawn worker processes (``@pytest.mark.distributed``) take minutes: they run in
their own session, ``nox -s distributed``, which sets ``TINKER_DISTRIBUTED=1``; elsewhere they
are reported as skipped with that reason. The cheap tests here run everywhere."""

from __future__ import annotations

import os

import pytest

SKIP_REASON = "spawns worker processes: run by `nox -s distributed` (or with TINKER_DISTRIBUTED=1)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("TINKER_DISTRIBUTED") == "1":
        return
    for item in items:
        if item.get_closest_marker("distributed") is not None:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
