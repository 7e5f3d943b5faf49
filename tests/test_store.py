"""Durability: the SQLite store, checkpoint TTLs and deletion, and runs that outlive the backend.

The backend tests run the real ``RequestHandler`` in-process (real engine, real SQLite). A restart is
a second ``RequestHandler`` on the same data dir; ``test_faults.py`` does it for real with kill -9.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import msgspec
import pytest
from native_wire import DATA, TINY, fb, loss, step

from tinker import wire
from tinker.types import LoraConfig
from tinker_backend.errors import ServiceError
from tinker_backend.request_handler import RequestHandler
from tinker_backend.store import CheckpointRecord, Store, iso_in, now_iso

OWNER = "local"

# The schema of the first release, before the columns that make runs resumable.
_OLD_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, owner TEXT NOT NULL,
    base_model TEXT NOT NULL, lora_config TEXT NOT NULL, created_at TEXT NOT NULL,
    last_request_time TEXT NOT NULL, user_metadata TEXT NOT NULL DEFAULT '{}');
CREATE TABLE checkpoints (run_id TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    owner TEXT NOT NULL, directory TEXT NOT NULL, created_at TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, expires_at TEXT, PRIMARY KEY (run_id, kind, name));
INSERT INTO runs VALUES ('s:train:0', 's', 'local', 'tiny-llama', '{"rank": 4}', 'then', 'then', '{}');
INSERT INTO checkpoints VALUES ('s:train:0', 'weights', 'a', 'local', '/x', 'then', 10, NULL);
"""


def test_an_old_data_dir_is_upgraded_in_place(tmp_path):
    path = tmp_path / "tinker.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(_OLD_SCHEMA)
    store = Store(path)
    run = store.get_run("s:train:0")
    assert run is not None and (run.last_seq, run.last_mutation_seq, run.origin_path) == (0, 0, None)
    assert store.get_checkpoint("s:train:0", "weights", "a").seq_id == 0
    store.record_answer("s:train:0", 3, mutating=True)
    store.record_answer("s:train:0", 5, mutating=False)
    store.record_answer("s:train:0", 4, mutating=False)  # answers may be recorded out of order
    run = store.get_run("s:train:0")
    assert (run.last_seq, run.last_mutation_seq) == (5, 3)


def test_expired_checkpoints_disappear_at_once_and_futures_die_with_the_process(tmp_path):
    store = Store(tmp_path / "db")
    live = CheckpointRecord("r", "weights", "live", "alice", "d1", now_iso(), 100, iso_in(3600), 1)
    gone = CheckpointRecord("r", "weights", "gone", "alice", "d2", now_iso(), 50, iso_in(-1), 2)
    for record in (live, gone):
        store.put_checkpoint(record)
    assert store.get_checkpoint("r", "weights", "gone") is None
    assert [c.name for c in store.list_checkpoints("r")] == ["live"]
    assert store.latest_weights("r").name == "live"  # the expired one had the higher seq_id
    assert [c.name for c in store.expired_checkpoints()] == ["gone"]
    assert store.storage_bytes("alice") == 150  # until the sweep deletes it
    store.add_future("req-1", "alice")
    store.add_future("req-2", "alice")
    store.finish_future("req-2")
    store.close()

    store = Store(tmp_path / "db")  # a restart
    assert store.mark_pending_futures_lost() == 1
    assert store.future_state("req-1", "alice") == "lost"
    assert store.future_state("req-2", "alice") == "done"
    assert store.future_state("req-1", "bob") is None


# --- the backend, in-process --------------------------------------------------------------------


async def new_run(backend: RequestHandler, seed: int = 0) -> str:
    session = await backend.handle(wire.CreateSession(), OWNER)
    created = await backend.handle(
        wire.CreateModel(
            session_id=session.session_id, model_seq_id=0, base_model=TINY, lora_config=LoraConfig(rank=4, seed=seed)
        ),
        OWNER,
    )
    return created.model_id


async def train(backend: RequestHandler, model_id: str, first_seq: int, steps: int) -> list[float]:
    """``steps`` forward_backward + optim_step pairs, each pair submitted together."""
    losses = []
    for i in range(steps):
        seq = first_seq + 2 * i
        out, _ = await asyncio.gather(backend.handle(fb(model_id, seq), OWNER), backend.handle(step(model_id, seq + 1), OWNER))
        losses.append(loss(out))
    return losses


async def test_a_restarted_backend_lists_everything_and_resumes_runs_exactly(tmp_path):
    first = RequestHandler(tmp_path)
    run = await new_run(first, seed=3)
    twin = await new_run(first, seed=3)
    await train(first, run, 1, steps=2)
    saved = await first.handle(wire.SaveState(model_id=run, seq_id=5, name="ckpt"), OWNER)
    await first.handle(fb(run, 6, forward_only=True), OWNER)  # answered, but changes nothing
    await train(first, twin, 1, steps=2)
    await first.handle(wire.SaveState(model_id=twin, seq_id=5, name="ckpt"), OWNER)
    await first.handle(fb(twin, 6, forward_only=True), OWNER)
    expected = await train(first, twin, 7, steps=2)
    first.close()

    second = RequestHandler(tmp_path)
    runs = await second.handle(wire.ListTrainingRuns(), OWNER)
    assert {r.training_run_id for r in runs.training_runs} == {run, twin}
    listed = await second.handle(wire.ListCheckpoints(training_run_id=run), OWNER)
    assert [c.tinker_path for c in listed.checkpoints] == [saved.path]
    # The run resumes after its last answered request, from its last save: exactly.
    assert await train(second, run, 7, steps=2) == expected
    # A re-sent save that ran before the restart gets its answer again; other lost answers are a 410.
    assert (await second.handle(wire.SaveState(model_id=run, seq_id=5, name="ckpt"), OWNER)).path == saved.path
    with pytest.raises(ServiceError, match="answer was lost") as lost:
        await second.handle(fb(run, 2), OWNER)
    assert lost.value.status == 410
    second.close()


async def test_a_run_whose_unsaved_work_was_answered_is_refused_clearly(tmp_path):
    first = RequestHandler(tmp_path)
    run = await new_run(first)
    await train(first, run, 1, steps=1)
    await first.handle(wire.SaveState(model_id=run, seq_id=3, name="ckpt"), OWNER)
    await train(first, run, 4, steps=1)  # changes the adapter after the save; answered
    first.close()

    second = RequestHandler(tmp_path)
    with pytest.raises(ServiceError, match=r"lost its unsaved state.*seq_id 5.*seq_id 3") as refused:
        await second.handle(fb(run, 6), OWNER)
    assert refused.value.status == 410
    # Its checkpoint still resumes it, in a new run.
    session = await second.handle(wire.CreateSession(), OWNER)
    path = f"tinker://{run}/weights/ckpt"
    resumed = await second.handle(
        wire.CreateModelFromState(session_id=session.session_id, model_seq_id=0, path=path, with_optimizer=True),
        OWNER,
    )
    assert loss(await second.handle(fb(resumed.model_id, 1), OWNER)) > 0
    second.close()


async def test_a_run_with_no_save_and_no_changes_comes_back_from_its_seed(tmp_path):
    first = RequestHandler(tmp_path)
    run = await new_run(first, seed=11)
    before = loss(await first.handle(fb(run, 1, forward_only=True), OWNER))
    first.close()

    second = RequestHandler(tmp_path)
    assert loss(await second.handle(fb(run, 2, forward_only=True), OWNER)) == pytest.approx(before, abs=1e-6)
    second.close()


async def test_checkpoint_ttl_expiry_and_deletion(tmp_path):
    backend = RequestHandler(tmp_path)
    run = await new_run(backend)
    with pytest.raises(ServiceError, match=r"ttl_seconds: expected None or 3600 to .*got 5"):
        await backend.handle(wire.SaveState(model_id=run, seq_id=1, name="short", ttl_seconds=5), OWNER)
    kept = await backend.handle(wire.SaveState(model_id=run, seq_id=2, name="kept"), OWNER)
    ttl = await backend.handle(wire.SaveState(model_id=run, seq_id=3, name="ttl", ttl_seconds=3600), OWNER)
    listed = {c.tinker_path: c for c in (await backend.handle(wire.ListCheckpoints(training_run_id=run), OWNER)).checkpoints}
    assert listed[kept.path].expires_at is None
    assert listed[ttl.path].expires_at is not None and listed[ttl.path].expires_at > now_iso()

    # An hour passes for the "ttl" checkpoint: it is gone at once, and the sweep frees its files.
    record = backend.store.get_checkpoint(run, "weights", "ttl")
    backend.store.put_checkpoint(msgspec.structs.replace(record, expires_at=iso_in(-1)))
    with pytest.raises(ServiceError, match="unknown checkpoint") as gone:
        await backend.handle(wire.LoadState(model_id=run, seq_id=4, path=ttl.path), OWNER)
    assert gone.value.status == 404
    files = tmp_path / record.directory
    assert files.is_dir()
    assert backend.checkpoints.delete_expired() == 1
    assert not files.exists()

    # Deletion: the row and the files, and the name can be saved again.
    kept_files = tmp_path / backend.store.get_checkpoint(run, "weights", "kept").directory
    await backend.handle(wire.DeleteCheckpoint(tinker_path=kept.path), OWNER)
    assert not kept_files.exists()
    assert (await backend.handle(wire.ListCheckpoints(training_run_id=run), OWNER)).checkpoints == []
    assert (await backend.handle(wire.SaveState(model_id=run, seq_id=5, name="kept"), OWNER)).path == kept.path
    backend.close()


async def test_saving_a_name_again_replaces_it_and_startup_removes_unfinished_saves(tmp_path):
    backend = RequestHandler(tmp_path)
    run = await new_run(backend)
    await backend.handle(wire.SaveState(model_id=run, seq_id=1, name="c"), OWNER)
    first_dir = tmp_path / backend.store.get_checkpoint(run, "weights", "c").directory
    await train(backend, run, 2, steps=1)
    await backend.handle(wire.SaveState(model_id=run, seq_id=4, name="c"), OWNER)
    second_dir = tmp_path / backend.store.get_checkpoint(run, "weights", "c").directory
    assert second_dir != first_dir and second_dir.is_dir() and not first_dir.exists()
    backend.close()

    # What a save killed half-way leaves: a temporary directory, or a complete one no row names.
    half_written = second_dir.parent / ".c.abc123.tmp"
    half_written.mkdir()
    (half_written / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    unindexed = second_dir.parent / "c.0123456789ab"
    unindexed.mkdir()
    restarted = RequestHandler(tmp_path)
    assert not half_written.exists() and not unindexed.exists()
    assert second_dir.is_dir()
    assert loss(await restarted.handle(fb(run, 5, data=DATA[:1]), OWNER)) > 0  # reloaded from "c"
    restarted.close()


async def test_an_expired_session_frees_its_runs_and_they_come_back_on_use(tmp_path):
    backend = RequestHandler(tmp_path)
    run = await new_run(backend, seed=5)
    before = loss(await backend.handle(fb(run, 1, forward_only=True), OWNER))
    engine = await (await backend.engines.scheduler(TINY)).engine()
    assert engine.has_adapter(run) and backend.ledger.loaded_runs(OWNER) == 1
    # The session falls silent for longer than the timeout (the server's sweep calls this).
    backend.ledger.session_timeout_s = 0.2
    deadline = time.monotonic() + 30
    while not (expired := await backend.expire_sessions()):
        assert time.monotonic() < deadline, "the silent session never expired"
        await asyncio.sleep(0.05)
    assert expired == [run.split(":")[0]]
    backend.ledger.session_timeout_s = None
    assert not engine.has_adapter(run) and backend.ledger.loaded_runs(OWNER) == 0
    # Nothing had changed it, so it comes back exactly, from its seed.
    assert loss(await backend.handle(fb(run, 2, forward_only=True), OWNER)) == pytest.approx(before, abs=1e-6)
    assert engine.has_adapter(run) and backend.ledger.loaded_runs(OWNER) == 1
    backend.close()
