"""``SamplerPool``'s bookkeeping with recording fake workers (the real processes are tested in
test_sampler_workers.py): publishing, routing and in-flight counts, death and restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from tinker import SamplingParams
from tinker_backend.errors import ServiceError
from tinker_backend.workers.sampler_pool import SamplerPool
from tinker_backend.workers.sampler_worker import SamplerSpec

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


class FakeWorker:
    """Records commands; their futures stay pending until the test answers them."""

    pids = iter(range(1000, 2000))

    def __init__(self, spec: SamplerSpec, name: str, on_death: Callable[[Any, str], None]) -> None:
        self.name, self.on_death = name, on_death
        self.pid = next(self.pids)
        self.vocab_size, self.max_context_length = 100, 64
        self.stats = {"decode_steps": 3, "decoded_rows": 5}
        self.sent: list[tuple[str, tuple[Any, ...], Future[Any]]] = []
        self.is_alive = True

    def send(self, command: str, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        if command == "load":
            future.set_result(None)
        self.sent.append((command, args, future))
        return future

    def alive(self) -> bool:
        return self.is_alive

    def die(self) -> None:
        self.is_alive = False
        for *_, future in self.sent:
            if not future.done():
                future.set_exception(ServiceError(503, f"sampler worker {self.name} died"))
        self.on_death(self, "killed")

    def close(self) -> None:
        self.is_alive = False


@pytest.fixture
def pool(tmp_path: Path) -> Any:
    started: list[FakeWorker] = []
    restarts_fail = [False]
    restarts_go = threading.Event()  # a restart waits for it: the test sees the pool meanwhile

    def start(spec: SamplerSpec, name: str, on_death: Callable[[Any, str], None]) -> FakeWorker:
        if len(started) >= 2:
            restarts_go.wait(10)
            if restarts_fail[0]:
                raise RuntimeError("cannot start")
        started.append(FakeWorker(spec, name, on_death))
        return started[-1]

    pool = SamplerPool(SamplerSpec("m", tmp_path), 2, tmp_path / "published", max_in_flight=2, start=start)
    pool.started, pool.restarts_fail, pool.restarts_go = started, restarts_fail, restarts_go
    yield pool
    restarts_go.set()
    pool.close()


def test_publish_then_affinity_then_spill_over(pool: Any) -> None:
    first, second = pool.started
    pool.publish("s", pool.publish_dir / "s")
    assert [c for c, *_ in first.sent] == ["load"] and second.sent == []  # least loaded, lowest index
    futures = [pool.submit_sample("s", [1, 2], 1, GREEDY) for _ in range(3)]
    assert [c for c, *_ in first.sent].count("sample") == 2 and [c for c, *_ in second.sent] == ["sample"]
    health = pool.health()
    assert [r["in_flight"] for r in health] == [2, 1] and [r["loads"] for r in health] == [1, 1]
    assert health[1]["adapters"] == ["s"]
    for *_, future in first.sent[1:] + second.sent:
        future.set_result("answer")
    assert all(f.result() == "answer" for f in futures)
    assert [r["in_flight"] for r in pool.health()] == [0, 0]
    assert pool.stats() == {"decode_steps": 6, "decoded_rows": 10}


def test_bad_requests_fail_before_routing(pool: Any) -> None:
    with pytest.raises(KeyError, match="sampler_id: no sampler 'nope'"):
        pool.submit_sample("nope", [1], 1, GREEDY)
    with pytest.raises(ValueError, match=r"prompt: expected token ids in \[0, 100\), got 100"):
        pool.submit_sample(None, [1, 100], 1, GREEDY)  # vocab_size 100
    assert all(w.sent == [] for w in pool.started)


def test_a_dead_replica_fails_its_requests_and_comes_back_empty(pool: Any) -> None:
    first, second = pool.started
    pool.publish("s", pool.publish_dir / "s")
    running = pool.submit_sample("s", [1, 2], 1, GREEDY)
    first.die()
    with pytest.raises(ServiceError, match="died"):
        running.result(timeout=1)
    pool.submit_sample("s", [1, 2], 1, GREEDY)  # the other replica, which loads the version
    assert [c for c, *_ in second.sent] == ["sample"] and pool.health()[1]["loads"] == 1
    assert not pool.health()[0]["alive"]  # restarting
    pool.restarts_go.set()
    deadline = time.monotonic() + 10
    while not pool.health()[0]["alive"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    back = pool.health()[0]
    assert back["restarts"] == 1 and back["pid"] != first.pid and back["adapters"] == [] and back["in_flight"] == 0


def test_with_no_replica_alive_a_request_fails_at_once(pool: Any) -> None:
    pool.restarts_fail[0] = True  # they stay dead (the pool tries again every few seconds)
    pool.restarts_go.set()
    for worker in pool.started:
        worker.die()
    with pytest.raises(ServiceError, match="no sampler worker of 'm' is alive") as info:
        pool.submit_sample(None, [1], 1, GREEDY)
    assert info.value.status == 503 and all(not r["alive"] for r in pool.health())


def test_remove_unloads_everywhere_and_deletes_the_published_folder(pool: Any) -> None:
    folder = pool.publish_dir / "s"
    folder.mkdir()
    pool.publish("s", folder)
    pool.submit_sample("s", [1], 1, GREEDY)
    pool.submit_sample("s", [1], 1, GREEDY)
    pool.submit_sample("s", [1], 1, GREEDY)  # spilled: both hold it
    pool.remove_sampler("s")
    assert all(("remove", ("s",)) in [(c, a) for c, a, _ in w.sent] for w in pool.started)
    assert not folder.exists() and not pool.has_sampler("s")
    with pytest.raises(KeyError):
        pool.remove_sampler("s")
