"""How long samplers live, and that clients end cleanly.

Each training run keeps only its newest ``ephemeral_samplers_per_run`` in-memory samplers (from
``save_weights_and_get_sampling_client``); an older one answers 410 and leaves the engine, while
named samplers (from a ``sampler_weights`` checkpoint) are never evicted. Checked through the
embedded backend and a real ``tinker-server``. Last, a script that never closes its
``ServiceClient`` exits without aiohttp's "Unclosed client session" warning.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY, ServerProcess

import tinker
from tinker import ModelInput, SamplingParams
from tinker_backend.limits import Limits

KEEP = 2  # the cap every test here runs with
PROMPT = ModelInput.from_ints([1, 2, 3])
PARAMS = SamplingParams(max_tokens=2, seed=0)


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("capped-server"), "--ephemeral-samplers-per-run", str(KEEP))
    yield proc
    proc.stop()


def make_snapshots(service: tinker.ServiceClient) -> tuple[list[tinker.SamplingClient], tinker.SamplingClient]:
    """Three in-memory samplers of one run (the oldest is evicted), and a named one."""
    tc = service.create_lora_training_client(TINY, rank=4, seed=0)
    path = tc.save_weights_for_sampler("kept").result(timeout=120).path
    named = service.create_sampling_client(model_path=path).result(timeout=120)
    snapshots = [tc.save_weights_and_get_sampling_client() for _ in range(KEEP + 1)]
    for snapshot in snapshots:
        snapshot.result(timeout=120)
    return snapshots, named


def check_eviction(snapshots: list[tinker.SamplingClient], named: tinker.SamplingClient) -> None:
    oldest, *newest = snapshots
    for sampler in [*newest, named]:
        assert len(sampler.sample(PROMPT, 1, PARAMS).result(timeout=120).sequences) == 1
    for call in (lambda: oldest.sample(PROMPT, 1, PARAMS), lambda: oldest.compute_logprobs(PROMPT)):
        with pytest.raises(tinker.APIStatusError) as gone:
            call().result(timeout=120)
        assert type(gone.value) is tinker.APIStatusError and gone.value.status_code == 410
        message = str(gone.value)
        assert f"sampler {oldest.sampling_session_id!r} was evicted" in message
        assert f"keeps only its newest {KEEP} in-memory snapshots" in message
        assert "save_weights_for_sampler(name)" in message
    # Named samplers are not capped: still usable after the evictions.
    assert len(named.sample(PROMPT, 1, PARAMS).result(timeout=120).sequences) == 1


def test_a_run_keeps_its_newest_snapshots_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINKER_BASE_URL", raising=False)
    service = tinker.ServiceClient(data_dir=tmp_path)
    backend = service.holder.transport.backend  # type: ignore[attr-defined]
    backend.samplers.limits = Limits(ephemeral_samplers_per_run=KEEP)  # the snapshot cap is the samplers'
    snapshots, named = make_snapshots(service)
    check_eviction(snapshots, named)

    engine = service.holder.submit(_engine(backend)).result(timeout=60)
    ids = [s.sampling_session_id for s in snapshots]
    assert not engine.has_sampler(ids[0])
    assert all(engine.has_sampler(i) for i in ids[1:]) and engine.has_sampler(named.sampling_session_id)
    service.close().result(timeout=30)


def test_a_run_keeps_its_newest_snapshots_on_a_server(capped_server: ServerProcess) -> None:
    service = tinker.ServiceClient(base_url=capped_server.base_url)
    check_eviction(*make_snapshots(service))
    service.close().result(timeout=30)


def test_a_script_that_never_closes_its_client_exits_cleanly(capped_server: ServerProcess) -> None:
    script = textwrap.dedent(
        f"""
        import tinker
        service = tinker.ServiceClient(base_url={capped_server.base_url!r})
        tc = service.create_lora_training_client({TINY!r}, rank=4).result(timeout=120)
        datum = tinker.Datum(model_input=tinker.ModelInput.from_ints([1, 2]),
                             loss_fn_inputs={{"target_tokens": [2, 3], "weights": [1.0, 1.0]}})
        tc.forward_backward([datum], "cross_entropy")  # left unanswered: failed at exit
        print("done")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
    assert "Unclosed" not in result.stderr and "Traceback" not in result.stderr, result.stderr


async def _engine(backend):
    return await (await backend.engines.scheduler(TINY)).engine()
