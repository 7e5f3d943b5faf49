"""``RestClient`` through our client against a real ``tinker-server`` with two API keys (one
per owner): runs, checkpoints (paged), sessions, sharing by publishing, TTLs, deletion while a
sampler uses the checkpoint, ``save_weights_external`` with signed URLs, ``download_checkpoint``.
Also the embedded backend's download, and the native routes of what the official routes serve.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from conftest import ServerProcess
from native_wire import DATA, TINY

import tinker
from tinker.types import ModelInput, SamplingParams
from tinker_backend.checkpoint_index import CheckpointIndex
from tinker_backend.errors import ServiceError
from tinker_backend.files_api import UrlSigner
from tinker_backend.store import Store, iso_in, now_iso

KEYS = {"ann": "tml-ann-" + "a" * 24, "ben": "tml-ben-" + "b" * 24}
PROMPT = ModelInput.from_ints([1, 2, 3])
PARAMS = SamplingParams(max_tokens=4, seed=1)


@pytest.fixture(scope="module")
def two_key_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("rest-server")
    keys_file = root / "keys"
    keys_file.write_text("".join(f"{key} {owner}\n" for owner, key in KEYS.items()))
    proc = ServerProcess(root / "data", "--keys-file", str(keys_file))
    proc.data_dir = root / "data"  # type: ignore[attr-defined]
    yield proc
    proc.stop()


@pytest.fixture
async def clients(two_key_server: ServerProcess) -> AsyncIterator[dict[str, tinker.ServiceClient]]:
    services = {name: tinker.ServiceClient(base_url=two_key_server.base_url, api_key=key) for name, key in KEYS.items()}
    yield services
    for service in services.values():
        await service.close()


async def trained(service: tinker.ServiceClient) -> tinker.TrainingClient:
    tc = await service.create_lora_training_client(TINY, rank=4, seed=0)
    tc.forward_backward(DATA, "cross_entropy")
    tc.optim_step(tinker.AdamParams(learning_rate=1e-2))
    return tc


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def checkpoint_folder(server: ServerProcess, run_id: str, kind: str, name: str) -> Path:
    (folder,) = (server.data_dir / "checkpoints" / run_id.replace(":", "_") / kind).glob(f"{name}.*")  # type: ignore[attr-defined]
    return folder


async def test_runs_checkpoints_and_sessions_are_listed_paged_and_got(clients):
    ann = clients["ann"]
    rest = ann.create_rest_client()
    tc = await trained(ann)
    paths = [(await tc.save_state(f"w{i}")).path for i in range(3)]
    sampler_path = (await tc.save_weights_for_sampler("s0")).path
    sampler = await ann.create_sampling_client(model_path=sampler_path)

    run = await rest.get_training_run(tc.model_id)
    assert run.model_owner == "ann" and run.lora_rank == 4 and run.last_checkpoint.tinker_path == paths[-1]
    assert (await rest.get_training_run_by_tinker_path(paths[0])).training_run_id == tc.model_id
    assert tc.model_id in [r.training_run_id for r in (await rest.list_training_runs(limit=100)).training_runs]

    listed = await rest.list_checkpoints(tc.model_id)
    assert [c.tinker_path for c in listed.checkpoints] == [*paths, sampler_path]
    assert [c.checkpoint_type for c in listed.checkpoints] == ["training"] * 3 + ["sampler"]
    pages = [await rest.list_user_checkpoints(limit=2, offset=offset) for offset in (0, 2)]
    assert pages[0].cursor.total_count == 4 and [len(p.checkpoints) for p in pages] == [2, 2]
    newest_first = [c.tinker_path for p in pages for c in p.checkpoints]
    assert newest_first == [sampler_path, *reversed(paths)]

    info = await rest.get_weights_info_by_tinker_path(paths[0])
    assert (info.base_model, info.lora_rank) == (TINY, 4)

    session_id = tc.model_id.split(":train:")[0]
    assert session_id in (await rest.list_sessions(limit=100)).sessions
    session = await rest.get_session(session_id)
    assert session.training_run_ids == [tc.model_id] and session.sampler_ids == [sampler.sampling_session_id]
    with pytest.raises(tinker.NotFoundError, match="session_id: unknown session"):
        await clients["ben"].create_rest_client().get_session(session_id)

    await rest.delete_checkpoint(tc.model_id, "weights/w0")
    await rest.delete_checkpoint_from_tinker_path(paths[1])
    remaining = [c.tinker_path for c in (await rest.list_checkpoints(tc.model_id)).checkpoints]
    assert remaining == [paths[2], sampler_path]
    with pytest.raises(tinker.NotFoundError, match="path: unknown checkpoint"):
        await rest.delete_checkpoint_from_tinker_path(paths[1])


async def test_a_published_checkpoint_is_loadable_by_any_key_until_unpublished(clients):
    ann, ben = clients["ann"], clients["ben"]
    tc = await trained(ann)
    state = (await tc.save_state("shared")).path
    sampler_path = (await tc.save_weights_for_sampler("shared")).path
    ann_rest, ben_rest = ann.create_rest_client(), ben.create_rest_client()
    with pytest.raises(tinker.NotFoundError):
        await ben.create_sampling_client(model_path=sampler_path)

    for path in (state, sampler_path):
        await ann_rest.publish_checkpoint_from_tinker_path(path)
    assert all(c.public for c in (await ann_rest.list_checkpoints(tc.model_id)).checkpoints)
    expected = await (await ann.create_sampling_client(model_path=sampler_path)).sample(PROMPT, 1, PARAMS)
    ben_sampler = await ben.create_sampling_client(model_path=sampler_path)
    assert (await ben_sampler.sample(PROMPT, 1, PARAMS)).sequences[0].tokens == expected.sequences[0].tokens
    ben_tc = await ben.create_training_client_from_state(state)
    assert (await ben_rest.get_training_run(ben_tc.model_id)).model_owner == "ben"
    assert (await ben_rest.get_weights_info_by_tinker_path(state)).lora_rank == 4
    # Reading is shared; changing is the owner's alone.
    for future in (
        ben_rest.delete_checkpoint_from_tinker_path(state),
        ben_rest.unpublish_checkpoint_from_tinker_path(state),
        ben_rest.set_checkpoint_ttl_from_tinker_path(state, 3600),
    ):
        with pytest.raises(tinker.NotFoundError):
            await future

    await ann_rest.unpublish_checkpoint_from_tinker_path(sampler_path)
    with pytest.raises(tinker.NotFoundError):
        await ben.create_sampling_client(model_path=sampler_path)
    with pytest.raises(tinker.APIStatusError, match="was deleted, has expired or was unpublished") as gone:
        await ben_sampler.sample(PROMPT, 1, PARAMS)
    assert gone.value.status_code == 410
    assert (await (await ann.create_sampling_client(model_path=sampler_path)).sample(PROMPT, 1, PARAMS)).sequences


async def test_ttl_is_set_and_removed_and_a_deleted_checkpoint_answers_410_to_its_sampler(clients):
    ann = clients["ann"]
    rest = ann.create_rest_client()
    tc = await trained(ann)
    path = (await tc.save_weights_for_sampler("ttl")).path
    await rest.set_checkpoint_ttl_from_tinker_path(path, 7200)
    (checkpoint,) = [c for c in (await rest.list_checkpoints(tc.model_id)).checkpoints if c.tinker_path == path]
    assert checkpoint.expires_at is not None
    await rest.set_checkpoint_ttl_from_tinker_path(path, None)
    (checkpoint,) = [c for c in (await rest.list_checkpoints(tc.model_id)).checkpoints if c.tinker_path == path]
    assert checkpoint.expires_at is None
    with pytest.raises(ValueError, match="ttl_seconds: expected None or 3600"):
        rest.set_checkpoint_ttl_from_tinker_path(path, 5)

    sampler = await ann.create_sampling_client(model_path=path)
    assert (await sampler.sample(PROMPT, 1, PARAMS)).sequences
    await rest.delete_checkpoint_from_tinker_path(path)
    with pytest.raises(tinker.APIStatusError, match=r"sampling_session_id: sampler .* was deleted") as gone:
        await sampler.sample(PROMPT, 1, PARAMS)
    assert gone.value.status_code == 410


async def test_external_weights_are_served_by_signed_urls_that_expire_and_resist_tampering(
    clients, two_key_server, tmp_path
):
    ann = clients["ann"]
    rest = ann.create_rest_client()
    tc = await trained(ann)
    saved = await tc.save_weights_external("export", ttl_seconds=3600)
    assert saved.path == f"tinker://{tc.model_id}/external_weights/export" and saved.size_bytes > 0
    (listed,) = [c for c in (await rest.list_checkpoints(tc.model_id)).checkpoints if c.tinker_path == saved.path]
    assert listed.checkpoint_type == "external" and listed.expires_at is not None

    answer = await rest.get_external_weights_urls(saved.path)
    on_disk = folder_files(checkpoint_folder(two_key_server, tc.model_id, "external_weights", "export"))
    assert set(answer.urls) == set(on_disk) == {"adapter_config.json", "adapter_model.safetensors"}
    for name, url in answer.urls.items():
        assert url.startswith(two_key_server.base_url + "/api/v1/checkpoint_file?")
        with urllib.request.urlopen(url, timeout=30) as reply:  # no API key: the signature is the permission
            assert reply.read() == on_disk[name]

    url = answer.urls["adapter_config.json"]
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    tampered = url.replace("adapter_config.json", "adapter_model.safetensors")
    signer = UrlSigner(two_key_server.data_dir)
    past = int(time.time()) - 1
    expired = signer.url(query["path"], query["file"], past, two_key_server.base_url)
    for bad_url, status in ((tampered, 403), (expired, 410)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad_url, timeout=30)
        assert refused.value.code == status
    with pytest.raises(ValueError, match="tinker_path: expected a 'external_weights' checkpoint"):
        rest.get_external_weights_urls(f"tinker://{tc.model_id}/weights/x")

    await rest.delete_checkpoint_from_tinker_path(saved.path)
    with pytest.raises(urllib.error.HTTPError) as gone:
        urllib.request.urlopen(url, timeout=30)
    assert gone.value.code == 410


async def test_download_checkpoint_writes_the_checkpoints_files(clients, two_key_server, tmp_path):
    ann, ben = clients["ann"], clients["ben"]
    tc = await trained(ann)
    state = (await tc.save_state("dl")).path
    sampler_path = (await tc.save_weights_for_sampler("dl")).path
    for path, kind in ((state, "weights"), (sampler_path, "sampler_weights")):
        out = await ann.create_rest_client().download_checkpoint(path, tmp_path / kind)
        assert out == tmp_path / kind
        assert folder_files(out) == folder_files(checkpoint_folder(two_key_server, tc.model_id, kind, "dl"))
    with pytest.raises(tinker.NotFoundError):
        await ben.create_rest_client().download_checkpoint(state, tmp_path / "ben")
    await ann.create_rest_client().publish_checkpoint_from_tinker_path(state)
    out = await ben.create_rest_client().download_checkpoint(state, tmp_path / "ben")
    assert folder_files(out) == folder_files(tmp_path / "weights")


async def test_the_embedded_backend_serves_the_same_rest_client(tmp_path):
    service = tinker.ServiceClient(data_dir=tmp_path / "data")
    try:
        rest = service.create_rest_client()
        tc = await trained(service)
        exported = (await tc.save_weights_external("e")).path
        out = await rest.download_checkpoint(exported, tmp_path / "out")
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        await rest.publish_checkpoint_from_tinker_path(exported)
        assert [c.public for c in (await rest.list_user_checkpoints()).checkpoints] == [True]
        session_id = tc.model_id.split(":train:")[0]
        assert (await rest.get_session(session_id)).training_run_ids == [tc.model_id]
        urls = (await rest.get_external_weights_urls(exported)).urls
        assert all(url.startswith("/api/v1/checkpoint_file?") for url in urls.values())  # no HTTP server here
    finally:
        await service.close()


def test_an_older_store_gains_the_published_column_and_expiry_reads_as_gone(tmp_path):
    old = sqlite3.connect(tmp_path / "old.sqlite3")
    old.execute(
        "CREATE TABLE checkpoints (run_id TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL,"
        " directory TEXT NOT NULL, created_at TEXT NOT NULL, size_bytes INTEGER NOT NULL, expires_at TEXT,"
        " PRIMARY KEY (run_id, kind, name))"
    )
    old.execute("INSERT INTO checkpoints VALUES ('r', 'weights', 'a', 'ann', 'd', ?, 1, NULL)", (now_iso(),))
    old.commit()
    old.close()
    store = Store(tmp_path / "old.sqlite3")
    assert store.get_checkpoint("r", "weights", "a").published is False
    index = CheckpointIndex(store, tmp_path)
    with pytest.raises(ServiceError, match="path: unknown checkpoint") as hidden:
        index.lookup("tinker://r/weights/a", "ben")
    assert hidden.value.status == 404
    index.set_published("tinker://r/weights/a", "ann", True)
    assert index.lookup("tinker://r/weights/a", "ben").published
    with pytest.raises(ServiceError):
        index.set_published("tinker://r/weights/a", "ben", False)  # reading is shared, changing is not

    record = store.get_checkpoint("r", "weights", "a")
    store.put_checkpoint(msgspec.structs.replace(record, expires_at=iso_in(-1)))
    with pytest.raises(ServiceError, match="has expired") as expired:
        index.check_still_readable("tinker://r/weights/a", "ben", "sampling_session_id: sampler 's'")
    assert expired.value.status == 410
    index.close()
    store.close()

