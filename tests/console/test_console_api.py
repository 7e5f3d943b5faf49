"""The console's JSON (``/console/api/``) on a real server while the real client trains: the
history it serves equals what the client was answered, and every answer is scoped to the key."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest
import yarl
from conftest import ServerProcess

import tinker
from tinker import AdamParams, Datum, ModelInput, SamplingParams

KEYS = {"ann": "tml-ann-console-api-key-0000000000", "ben": "tml-ben-console-api-key-0000000000",
        "ops": "tml-ops-console-api-key-0000000000"}
TINY = "tiny-llama"
DATA = [
    Datum(
        model_input=ModelInput.from_ints([5, 17, 99, 3, 42, 7]),
        loss_fn_inputs={"target_tokens": [17, 99, 3, 42, 7, 250], "weights": [0.0, 1.0, 1.0, 1.0, 1.0, 0.5]},
    ),
    Datum(model_input=ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0] * 3}),
]


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("console-api")
    keys_file = root / "keys"
    keys_file.write_text("".join(f"{key} {owner}\n" for owner, key in KEYS.items()))
    proc = ServerProcess(root / "data", "--keys-file", str(keys_file), "--admin-owner", "ops")
    yield proc
    proc.stop()


async def get(server: ServerProcess, path: str, key: str | None, **kwargs) -> tuple[int, dict]:
    headers = {"X-API-Key": key} if key else {}
    async with aiohttp.ClientSession() as session, session.request(
        kwargs.pop("method", "GET"), server.base_url + "/console/api/" + path, headers=headers, **kwargs
    ) as reply:
        return reply.status, await reply.json(content_type=None)


@pytest.mark.timeout(120)
async def test_history_equals_the_answers_and_is_scoped_to_the_key(api_server):
    service = tinker.ServiceClient(base_url=api_server.base_url, api_key=KEYS["ann"])
    tc = await service.create_lora_training_client_async(TINY, rank=4, seed=5)
    lrs = [1e-2, 5e-3, 2e-3]
    answers, sampled = [], 0
    for step, lr in enumerate(lrs):
        fb = await tc.forward_backward(DATA, "cross_entropy")
        optim = await tc.optim_step(AdamParams(learning_rate=lr, grad_clip_norm=1e-3))
        answers.append((fb.metrics["loss:sum"], optim.metrics))
        if step == 1:  # counted in the next step
            sampler = await tc.save_weights_and_get_sampling_client()
            response = await sampler.sample(ModelInput.from_ints([1, 2]), 3, SamplingParams(max_tokens=4, seed=0))
            sampled = sum(len(s.tokens) for s in response.sequences)
    path = (await tc.save_state("api-ckpt")).path

    status, detail = await get(api_server, f"runs/{tc.model_id}", KEYS["ann"])
    assert status == 200, detail
    history = detail["history"]
    assert [p["step"] for p in history] == [1, 2, 3]
    weight_sum = 4.5 + 3.0  # the weights of DATA
    for point, (loss_sum, optim_metrics), lr in zip(history, answers, lrs, strict=True):
        assert point["loss_sum"] == loss_sum and point["weight_sum"] == weight_sum
        assert point["learning_rate"] == lr
        assert point["grad_norm"] == optim_metrics["grad_norm:max"] > 1e-3  # before clipping
        assert point["tokens"] == 9
    assert [p["sampled_tokens"] for p in history] == [0, 0, sampled] and sampled > 0
    run = detail["run"]
    assert (run["steps"], run["tokens"], run["state"], run["rank"]) == (3, 27, "loaded", 4)
    assert run["last_loss"] == pytest.approx(answers[-1][0] / weight_sum)
    assert [c["path"] for c in detail["checkpoints"]] == [path]

    status, drawn = await get(api_server, f"runs/{tc.model_id}/charts", KEYS["ann"])
    assert status == 200 and drawn["points"] == 3
    assert all('data-points="3"' in svg for svg in drawn["charts"].values())

    # Another key sees none of it, even by id; only an admin key sees the server.
    status, listed = await get(api_server, "runs", KEYS["ben"])
    assert status == 200 and listed == {"runs": [], "total": 0}
    for what in (f"runs/{tc.model_id}", f"runs/{tc.model_id}/charts", f"checkpoints/archive?path={path}"):
        status, body = await get(api_server, what, KEYS["ben"])
        assert status == 404 and "unknown" in body["error"], (what, body)
    status, body = await get(api_server, "checkpoints/delete", KEYS["ben"], method="POST", json={"path": path})
    assert status == 404
    assert (await get(api_server, "server", KEYS["ann"]))[0] == 403
    status, server = await get(api_server, "server", KEYS["ops"])
    assert status == 200 and [m["base_model"] for m in server["models"]] == [TINY]
    assert server["models"][0]["tiers"]["slots"] >= 1 and server["memory"]["rss_bytes"] > 0
    assert (await get(api_server, "me", KEYS["ops"]))[1] == {"owner": "ops", "admin": True}
    assert (await get(api_server, "runs", "tml-wrong-key-000000000000000000"))[0] == 401
    assert (await get(api_server, "runs", None))[0] == 401

    status, body = await get(api_server, "checkpoints/publish", KEYS["ann"], method="POST", json={"path": path})
    assert status == 400 and "published" in body["error"]
    status, _ = await get(api_server, "checkpoints/publish", KEYS["ann"], method="POST",
                          json={"path": path, "published": True})
    assert status == 200
    status, listed = await get(api_server, "checkpoints", KEYS["ann"])
    assert [(c["path"], c["published"]) for c in listed["checkpoints"]] == [(path, True)]
    await service.close()


async def test_the_pages_need_no_key_but_their_data_does(api_server):
    async with aiohttp.ClientSession() as session:
        for page in ("/console", "/console/static/console.js", "/console/static/console.css"):
            async with session.get(api_server.base_url + page) as reply:
                assert reply.status == 200, page
        # A path that climbs out of the static folder (sent as is, not normalised by the client).
        escape = yarl.URL(api_server.base_url + "/console/static/%2e%2e/console.py", encoded=True)
        async with session.get(escape) as reply:
            assert reply.status in (403, 404)
            assert "STATIC_DIR" not in await reply.text()
