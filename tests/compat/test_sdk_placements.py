"""The official SDK (0.38.0) against ``tinker-server --workers local`` (a 2-rank trainer group of
supervised worker processes, sharded with FSDP2 over gloo) gives the numbers of the
single-process server: the same losses (rtol 1e-5), prompt logprobs and greedy tokens.

The single-process server is the session's ``compat_server``; the local one is started once
for this module with the same settings, so only the placement differs. A group starts in
25-40 s on a loaded 2-core machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tinker
from tinker import types

from .conftest import API_KEY, MAIN_SERVER_SETTINGS, TINY, CompatServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TEXT = "the quick brown fox jumps over the lazy dog"
RTOL = 1e-5


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompatServer]:
    root = tmp_path_factory.mktemp("sdk-local-workers")
    models = root / "models.toml"
    models.write_text(f'[models."{TINY}"]\ntrainer_ranks = 2\nmax_adapter_slots = 4\n')
    server = CompatServer(root / "data", "--workers", "local", "--models", str(models), **MAIN_SERVER_SETTINGS)
    yield server
    assert server.stop() == 0, Path(server.log).read_text()[-4000:]


def datum_of(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def program(base_url: str) -> dict[str, Any]:
    """Two tenants of different ranks train in the same cycles (pipelined), then one samples
    greedily and scores a prompt; returns every number the SDK handed back."""
    seen: dict[str, Any] = {"a": [], "b": []}
    with tinker.ServiceClient(base_url=base_url, api_key=API_KEY) as service:
        a = service.create_lora_training_client(TINY, rank=4, seed=1).result()
        b = service.create_lora_training_client(TINY, rank=8, seed=2, train_unembed=False).result()
        tokenizer = a.get_tokenizer()
        tokens = [tokenizer.bos_token_id, *tokenizer.encode(TEXT, add_special_tokens=False)]
        data = {"a": [datum_of(tokens)], "b": [datum_of(tokens[3:]), datum_of(tokens[:6])]}
        for _ in range(3):
            pending = [
                (name, tc.forward_backward(data[name], "cross_entropy"), tc.optim_step(types.AdamParams(learning_rate=1e-2)))
                for name, tc in (("a", a), ("b", b))
            ]
            for name, fb, step in pending:
                seen[name].append(fb.result().metrics["loss:sum"])
                step.result()
        sampler = a.save_weights_and_get_sampling_client().result()
        seen["logprobs"] = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:]
        greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
        seen["greedy"] = sampler.sample(types.ModelInput.from_ints(tokens[:2]), 1, greedy).result().sequences[0].tokens
    return seen


def test_sdk_gets_the_single_process_numbers_from_local_workers(
    compat_server: CompatServer, local_server: CompatServer
) -> None:
    single, local = program(compat_server.base_url), program(local_server.base_url)
    assert single["a"][-1] < single["a"][0], single["a"]  # it trained
    for key in ("a", "b", "logprobs"):
        np.testing.assert_allclose(local[key], single[key], rtol=RTOL, err_msg=key)
    assert local["greedy"] == single["greedy"] and len(single["greedy"]) == 6
