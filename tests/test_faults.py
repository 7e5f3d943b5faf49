"""Faults: kill -9 mid-save and restart, clients vanishing mid-request, a request that raises,
and sessions whose heartbeats stop. Real ``tinker-server`` processes unless said otherwise."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServerProcess
from native_wire import DATA, TINY, RawClient, datum, fb, loss, step

import tinker
from tinker import _holder, wire
from tinker.types import AdamParams, LoraConfig, ModelInput, SamplingParams
from tinker_backend.request_handler import RequestHandler

PROMPT = ModelInput.from_ints([1, 2, 3])
SAMPLING = SamplingParams(max_tokens=8, temperature=1.0, seed=3)


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Servers a test starts; any still running at the end (a failed test) are killed."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def train(tc: tinker.TrainingClient, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        out = tc.forward_backward(DATA, "cross_entropy")
        tc.optim_step(AdamParams(learning_rate=1e-2))
        losses.append(loss(out.result(timeout=120)))
    return losses


class KillDuringSave(threading.Thread):
    """Polls a run's checkpoint folder; the moment a save's temporary directory appears, kills
    the server with SIGKILL, then starts a new one on the same port and data dir."""

    def __init__(self, server: ServerProcess, data_dir: Path, folder: Path, servers: list[ServerProcess]) -> None:
        super().__init__(daemon=True)
        self.server, self.data_dir, self.folder, self.servers = server, data_dir, folder, servers
        self.killed = threading.Event()
        self.restarted: ServerProcess | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                saving = any(entry.name.endswith(".tmp") for entry in self.folder.iterdir())
            except FileNotFoundError:  # a directory vanished while we listed it
                saving = False
            if saving:
                self.server.proc.kill()
                self.killed.set()
                self.server.proc.wait()
                self.restarted = ServerProcess(self.data_dir, port=self.server.port)
                self.servers.append(self.restarted)
                return
            time.sleep(0.0005)


@pytest.mark.slow
@pytest.mark.timeout(180)  # two server starts: est. 30-60 s loaded
def test_kill_9_during_save_state_then_restart_resumes_exactly(tmp_path, servers):
    data_dir = tmp_path / "data"
    server = ServerProcess(data_dir)
    servers.append(server)
    service = tinker.ServiceClient(base_url=server.base_url)
    tc = service.create_lora_training_client(TINY, rank=8, seed=0).result(timeout=120)
    train(tc, 2)
    base = tc.save_state("base").result(timeout=60).path
    sampler_path = tc.save_weights_for_sampler("sw").result(timeout=60).path
    sampler = service.create_sampling_client(model_path=sampler_path)
    tokens = [s.tokens for s in sampler.sample(PROMPT, 2, SAMPLING).result(timeout=60).sequences]
    base_loss = loss(tc.forward(DATA, "cross_entropy").result(timeout=60))

    # Save again and again (no training in between, so every save holds the same state) until
    # the server is killed in the middle of one; it restarts on the same port.
    folder = next((data_dir / "checkpoints").glob("*/weights"))
    killer = KillDuringSave(server, data_dir, folder, servers)
    killer.start()
    answered = []
    for i in range(500):
        # The save in flight at the kill is re-sent by the client once the new server is up.
        answered.append(tc.save_state(f"n{i}").result(timeout=120).path)
        if killer.killed.is_set():
            break
    killer.stop.set()
    killer.join(timeout=120)
    assert killer.killed.is_set(), "no save was caught in the act"
    restarted = killer.restarted
    assert restarted is not None

    # Every run and checkpoint is listed again; nothing half-written is left.
    rest = service.create_rest_client()
    assert tc.model_id in {r.training_run_id for r in rest.list_training_runs().result(timeout=60).training_runs}
    listed = {c.tinker_path for c in rest.list_checkpoints(tc.model_id).result(timeout=60).checkpoints}
    assert {base, sampler_path, *answered} <= listed
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    # Checkpoints load with identical results, the one before the interrupted save included.
    loaded = {path: service.create_training_client_from_state_with_optimizer(path) for path in (base, answered[-1])}
    for client in loaded.values():
        assert loss(client.forward(DATA, "cross_entropy").result(timeout=60)) == pytest.approx(base_loss, abs=1e-6)
    again = [s.tokens for s in sampler.sample(PROMPT, 2, SAMPLING).result(timeout=60).sequences]
    assert again == tokens  # the named sampler came back from its checkpoint
    # The same training client carries on where it was: exactly as a run resumed from "base".
    assert train(tc, 2) == pytest.approx(train(loaded[base], 2), abs=1e-6)
    service.close().result(timeout=30)
    assert restarted.stop() == 0


async def test_a_client_vanishing_mid_request_does_not_wedge_the_engine(server):
    long = [datum(list(range(1, 1000))) for _ in range(3)]
    async with RawClient(server.base_url) as gone:
        _, run = await gone.new_run()
        await gone.send(fb(run, 1, data=long))
        await gone.send(step(run, 2))
    # The connection is closed before any answer. Another client is served at once...
    async with RawClient(server.base_url) as other:
        _, other_run = await other.new_run()
        assert loss(await other.call(fb(other_run, 1))) > 0
    # ...and the abandoned work completed: a reconnecting client gets its answers.
    async with RawClient(server.base_url) as back:
        first, stepped = await back.gather([fb(run, 1, data=long), step(run, 2)])
        assert loss(first) > 0 and isinstance(stepped, tinker.OptimStepResponse)
        assert loss(await back.call(fb(run, 3))) > 0


async def test_an_exception_inside_one_request_fails_only_that_request(tmp_path):
    """In-process (the fault is injected into the engine): a disk error in one run's save and
    a bug in one run's optimizer step, in the same clock cycles as another run's work."""
    backend = RequestHandler(tmp_path)

    async def call(request):
        outcome = await backend.handle_encoded(wire.encoder.encode(request), "local")
        return outcome if isinstance(outcome, wire.Failure) else wire.decode_response(type(request), outcome)

    async def new_run(seed):
        session = await call(wire.CreateSession())
        created = await call(wire.CreateModel(session_id=session.session_id, model_seq_id=0, base_model=TINY,
                                               lora_config=LoraConfig(rank=4, seed=seed)))
        return created.model_id

    faulty, healthy, solo = await new_run(0), await new_run(1), await new_run(1)
    saved = await call(wire.SaveState(model_id=faulty, seq_id=1, name="before"))
    engine = await (await backend.engines.scheduler(TINY)).engine()
    real_step, real_save = engine.optim_step, engine.save_state

    def optim_step(adapter_id, params):
        if adapter_id == faulty:
            raise RuntimeError("injected: the optimizer step of one run blew up")
        return real_step(adapter_id, params)

    def save_state(adapter_id, directory, include_optimizer=True):
        if adapter_id == faulty:
            directory.mkdir(parents=True)
            (directory / "adapter_model.safetensors").write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device (injected)")
        return real_save(adapter_id, directory, include_optimizer)

    engine.optim_step, engine.save_state = optim_step, save_state
    results = await asyncio.gather(
        call(fb(faulty, 2)), call(step(faulty, 3)), call(wire.SaveState(model_id=faulty, seq_id=4, name="before")),
        call(fb(healthy, 1)), call(step(healthy, 2)), call(fb(healthy, 3)),
    )
    engine.optim_step, engine.save_state = real_step, real_save
    broken_step, broken_save = results[1], results[2]
    assert isinstance(broken_step, wire.Failure) and broken_step.status == 500 and "injected" in broken_step.message
    assert isinstance(broken_save, wire.Failure) and broken_save.status == 500 and "No space" in broken_save.message
    # The other run, in the same cycles, got exactly what it gets alone.
    alone = [loss(await call(fb(solo, 1))), await call(step(solo, 2)), loss(await call(fb(solo, 3)))]
    assert [loss(results[3]), loss(results[5])] == [alone[0], alone[2]]
    # The failing run goes on, and its checkpoint of that name is the one saved before.
    assert loss(await call(fb(faulty, 5))) > 0
    loaded = await call(wire.LoadState(model_id=faulty, seq_id=6, path=saved.path))
    assert loaded.path == saved.path
    backend.close()


@pytest.mark.slow
@pytest.mark.timeout(120)  # 3 s + 4 s of waiting, a server start: est. 20-40 s loaded
async def test_missed_heartbeats_free_the_sessions_slots(tmp_path, monkeypatch, caplog, servers):
    key = "tml-heartbeat-test-kkkkkkkkkkkkkkkk"
    server = ServerProcess(tmp_path / "data", "--api-key", key, "--session-timeout", "3", "--max-runs-per-key", "1")
    servers.append(server)
    monkeypatch.setattr(_holder, "HEARTBEAT_INTERVAL_S", 0.3)
    caplog.set_level(logging.INFO, logger="tinker")
    async with RawClient(server.base_url, key) as silent:  # sends no heartbeats
        await silent.new_run()

    # The key's one run slot is taken: a client that heartbeats is refused with 429, waits,
    # and gets the slot once the silent session has expired.
    live = tinker.ServiceClient(base_url=server.base_url, api_key=key)
    tc = await live.create_lora_training_client(TINY, rank=4, seed=0)
    assert any("rate limited (runs:" in r.getMessage() for r in caplog.records)  # refused first
    # Its heartbeats keep its slot, past the session timeout (time must pass: nothing to wait on).
    await asyncio.sleep(4)
    async with RawClient(server.base_url, key) as late:
        session = await late.call(wire.CreateSession())
        refused = await late.call(wire.CreateModel(session_id=session.session_id, model_seq_id=0, base_model=TINY,
                                                    lora_config=LoraConfig(rank=4)))
        assert isinstance(refused, wire.Failure) and refused.status == 429
    assert loss(await tc.forward_backward(DATA, "cross_entropy")) > 0
    await live.close()
    assert server.stop() == 0
