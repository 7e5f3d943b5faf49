"""Scheduler logic with a recording fake engine: seq_id order, gaps, de-duplication, cycles."""

import asyncio

import pytest

from tinker.types import Datum, ForwardBackwardOutput, ModelInput
from tinker_backend.engine.protocol import FwdBwdItem
from tinker_backend.errors import ServiceError
from tinker_backend.scheduler import ModelScheduler


class RecordingEngine:
    """Records what ran, in which cycle; answers forward_backward with the data length."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def forward_backward_many(self, items):
        self.calls.append(("fb", *sorted(f"{i.adapter_id}" for i in items)))
        return [
            ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[], metrics={"n:sum": len(i.data)})
            for i in items
        ]


def fb_work(run_id: str) -> FwdBwdItem:
    datum = Datum(model_input=ModelInput.from_ints([1]), loss_fn_inputs={"target_tokens": [1], "weights": [1.0]})
    return FwdBwdItem(run_id, [datum], "cross_entropy", None, True)


def barrier(engine: RecordingEngine, name: str) -> object:
    def work(e):
        e.calls.append(("barrier", name))
        return name

    return work


@pytest.fixture
def engine_and_scheduler():
    engine = RecordingEngine()
    scheduler = ModelScheduler("fake", lambda: engine)
    yield engine, scheduler
    scheduler.close()


async def test_waits_on_gaps_and_runs_in_seq_order(engine_and_scheduler):
    engine, scheduler = engine_and_scheduler
    scheduler.add_run("r")
    scheduler.add_run("other")
    second = scheduler.submit("r", 2, barrier(engine, "optim"))
    # Another run's request, submitted after it, completes: the scheduler has run a cycle.
    assert await scheduler.submit("other", 1, barrier(engine, "other")) == "other"
    assert engine.calls == [("barrier", "other")] and not second.done()  # seq 1 missing: r may not run
    first = scheduler.submit("r", 1, fb_work("r"))
    assert await second == "optim"
    assert (await first).metrics["n:sum"] == 1
    assert engine.calls == [("barrier", "other"), ("fb", "r"), ("barrier", "optim")]


async def test_merges_runs_into_one_cycle_and_barriers_are_per_run(engine_and_scheduler):
    engine, scheduler = engine_and_scheduler
    for run in ("a", "b", "c"):
        scheduler.add_run(run)
    futures = [
        scheduler.submit("a", 1, fb_work("a")),
        scheduler.submit("a", 2, barrier(engine, "a-optim")),
        scheduler.submit("a", 3, fb_work("a")),
        scheduler.submit("b", 1, fb_work("b")),
        scheduler.submit("b", 2, fb_work("b")),
        scheduler.submit("c", 1, barrier(engine, "c-save")),
    ]
    await asyncio.gather(*futures)
    # One merged pass for a, b, b; then barriers; a's work after its optim_step comes next cycle.
    assert engine.calls[0] == ("fb", "a", "b", "b")
    assert set(engine.calls[1:3]) == {("barrier", "a-optim"), ("barrier", "c-save")}
    assert engine.calls[3] == ("fb", "a")
    assert futures[0].result().metrics["cycle_runs:max"] == 3


async def test_repeated_seq_id_answered_once(engine_and_scheduler):
    engine, scheduler = engine_and_scheduler
    scheduler.add_run("r")
    first = scheduler.submit("r", 1, barrier(engine, "once"))
    again = scheduler.submit("r", 1, barrier(engine, "twice"))
    assert again is first
    assert await first == "once"
    assert scheduler.submit("r", 1, barrier(engine, "thrice")) is first
    assert engine.calls == [("barrier", "once")]


async def test_failure_fails_only_its_request(engine_and_scheduler):
    engine, scheduler = engine_and_scheduler
    scheduler.add_run("r")

    def boom(e):
        raise RuntimeError("boom")

    bad = scheduler.submit("r", 1, boom)
    good = scheduler.submit("r", 2, barrier(engine, "fine"))
    with pytest.raises(RuntimeError, match="boom"):
        await bad
    assert await good == "fine"


async def test_engine_load_failure_is_a_clear_error():
    def fail():
        raise OSError("no such folder")

    scheduler = ModelScheduler("broken", fail)
    scheduler.add_run("r")
    with pytest.raises(ServiceError, match="cannot load 'broken'"):
        await scheduler.submit("r", 1, fb_work("r"))
    scheduler.close()


async def test_cycle_limits_runs_and_tokens_and_nothing_starves():
    engine = RecordingEngine()
    scheduler = ModelScheduler("fake", lambda: engine, max_runs_per_cycle=2, max_tokens_per_cycle=2)
    for run in ("a", "b", "c"):
        scheduler.add_run(run)
    futures = [scheduler.submit(run, seq, fb_work(run)) for run in ("a", "b", "c") for seq in (1, 2)]
    await asyncio.gather(*futures)
    passes = [call for call in engine.calls if call[0] == "fb"]
    assert all(len(p) - 1 <= 2 for p in passes)  # never more than 2 runs or 2 tokens in a cycle
    assert sorted(run for p in passes for run in p[1:]) == ["a", "a", "b", "b", "c", "c"]
    scheduler.close()


async def test_add_run_at_a_later_seq_id_starts_there(engine_and_scheduler):
    engine, scheduler = engine_and_scheduler
    scheduler.add_run("r", next_seq=5)  # a run reloaded after answering seq_ids 1 to 4
    assert await scheduler.submit("r", 5, barrier(engine, "resumed")) == "resumed"
    with pytest.raises(ServiceError, match="already ran") as late:
        scheduler.submit("r", 4, barrier(engine, "old"))
    assert late.value.status == 409
    scheduler.add_run("r", next_seq=1)  # a run that has a queue keeps it
    assert scheduler.submit("r", 5, barrier(engine, "again")).result() == "resumed"
    assert engine.calls == [("barrier", "resumed")]


async def test_remove_run_fails_its_waiting_requests(engine_and_scheduler):
    engine, scheduler = engine_and_scheduler
    scheduler.add_run("r")
    waiting = scheduler.submit("r", 2, barrier(engine, "never"))  # waits on the gap at seq_id 1
    scheduler.remove_run("r", ServiceError(410, "model_id: gone"))
    with pytest.raises(ServiceError, match="model_id: gone"):
        await waiting
    assert not scheduler.has_run("r") and scheduler.run_count() == 0
    scheduler.remove_run("r", ServiceError(410, "twice"))  # an unknown run: nothing to do
    assert engine.calls == []


async def test_a_loaded_engine_is_frozen_out_of_the_cyclic_gc_until_close():
    import gc

    scheduler = ModelScheduler("fake", RecordingEngine)
    await scheduler.engine()
    assert gc.get_freeze_count() > 0  # full collections no longer traverse what the load left
    scheduler.close()
    assert gc.get_freeze_count() == 0  # a dropped engine's cycles can be collected again
