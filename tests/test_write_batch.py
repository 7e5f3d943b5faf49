"""``WriteBatch``: the answers of one event-loop turn commit together, and none returns before
its record is committed; on a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3

from tinker_backend.store import HistoryPoint, RunRecord, Store, now_iso
from tinker_backend.write_batch import WriteBatch


class CountingStore(Store):
    """A real store that counts its batched writes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[tuple[int, int]] = []

    def write_answers(self, answers, points, max_points) -> None:
        self.batches.append((len(answers), len(points)))
        super().write_answers(answers, points, max_points)


def add_run(store: Store, run_id: str) -> None:
    store.add_run(RunRecord(run_id, "s", "owner", "tiny-llama", {"rank": 4}, now_iso(), now_iso(), {}))


def point(run_id: str, step: int) -> HistoryPoint:
    return HistoryPoint(run_id, step, float(step), 1.0, 1.0, 10, 10 * step, 1e-3, 0.5, 0.1, 0.05, 0)


async def test_one_turns_answers_and_history_rows_commit_as_one_batch(tmp_path):
    store = CountingStore(tmp_path / "db.sqlite3")
    runs = [f"r{i}" for i in range(5)]
    for run_id in runs:
        add_run(store, run_id)
    writes = WriteBatch(store, max_points=100)

    async def answer(run_id: str, seq_id: int, mutating: bool) -> int:  # as Runs.run_ordered does
        writes.add_history(point(run_id, 1))
        await writes.record_answer(run_id, seq_id, mutating)
        record = store.get_run(run_id)  # committed before the answer may leave
        assert record is not None
        return record.last_seq

    seen = await asyncio.gather(*(answer(run_id, 3, i % 2 == 0) for i, run_id in enumerate(runs)))
    assert seen == [3] * 5
    assert store.batches == [(5, 5)]
    assert [(r.last_seq, r.last_mutation_seq) for r in map(store.get_run, runs)] == [
        (3, 3), (3, 0), (3, 3), (3, 0), (3, 3)
    ]
    assert {run_id: store.history(run_id)[0].step for run_id in runs} == dict.fromkeys(runs, 1)

    await writes.record_answer("r0", 2, True)  # a later turn: a batch of its own; MAX keeps 3
    assert store.batches == [(5, 5), (1, 0)]
    assert (store.get_run("r0").last_seq, store.get_run("r0").last_mutation_seq) == (3, 3)


async def test_a_cancelled_waiter_does_not_cancel_the_others_commit(tmp_path):
    store = CountingStore(tmp_path / "db.sqlite3")
    add_run(store, "a")
    add_run(store, "b")
    writes = WriteBatch(store, max_points=100)
    cancelled = asyncio.ensure_future(writes.record_answer("a", 1, True))
    other = asyncio.ensure_future(writes.record_answer("b", 1, True))
    await asyncio.sleep(0)  # both queued, the flush scheduled
    cancelled.cancel()
    await other
    assert store.batches == [(2, 0)]
    assert store.get_run("b").last_seq == 1 and store.get_run("a").last_seq == 1


async def test_a_failed_commit_fails_its_turns_answers_and_changes_nothing(tmp_path):
    store = CountingStore(tmp_path / "db.sqlite3")
    add_run(store, "a")
    writes = WriteBatch(store, max_points=100)
    with sqlite3.connect(tmp_path / "db.sqlite3") as db:  # a trigger that refuses a's update to seq 2
        db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON runs WHEN NEW.run_id = 'a' AND NEW.last_seq = 2"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    results = await asyncio.gather(
        writes.record_answer("a", 1, True), writes.record_answer("a", 2, True), return_exceptions=True
    )
    assert all(isinstance(r, sqlite3.IntegrityError) for r in results)
    assert store.get_run("a").last_seq == 0  # rolled back: the first update is not half-applied
    await writes.record_answer("a", 1, False)  # the next turn commits normally
    assert store.get_run("a").last_seq == 1


async def test_flush_commits_what_is_queued_at_once_and_the_turn_then_has_nothing_left(tmp_path):
    store = CountingStore(tmp_path / "db.sqlite3")
    writes = WriteBatch(store, max_points=100)
    writes.flush()  # nothing queued: no transaction
    writes.add_history(point("r", 1))
    writes.flush()  # as the request handler's close() does, before the loop's turn
    assert store.batches == [(0, 1)] and [p.step for p in store.history("r")] == [1]
    await asyncio.sleep(0)  # the scheduled flush finds nothing
    assert store.batches == [(0, 1)]
