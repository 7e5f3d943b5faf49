"""``--workers`` and ``--models FILE``: the placement config is checked, naming the key, before
anything loads; without a file the defaults hold."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, ServerProcess, free_port

import tinker
from tinker import Datum, LoraConfig, ModelInput
from tinker_backend.engine.model_engine import ModelEngine
from tinker_backend.model_registry import resolve_model
from tinker_backend.workers import config
from tinker_backend.workers.config import (
    Deployment,
    ModelPlacement,
    PlacementError,
    load_deployment,
    parse_models,
)

GOOD = """
[models."tiny-llama"]
trainer_ranks = 2
sampler = "torch"
sampler_replicas = 1
devices = ["cpu", "cpu"]
dtype = "float32"
max_adapter_slots = 8

[models."HuggingFaceTB/SmolLM2-135M-Instruct"]
dtype = "bfloat16"
"""


def test_a_full_file_parses(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(GOOD)
    deployment = load_deployment("local", path)
    assert deployment.placement("tiny-llama") == ModelPlacement(
        trainer_ranks=2, sampler="torch", devices=("cpu", "cpu"), dtype="float32", max_adapter_slots=8
    )
    assert deployment.placement("HuggingFaceTB/SmolLM2-135M-Instruct").dtype == "bfloat16"
    assert deployment.placement("another") == ModelPlacement()  # not in the file: the defaults


def test_no_file_means_todays_defaults() -> None:
    deployment = load_deployment("inprocess", None)
    assert deployment == Deployment("inprocess", {})
    assert deployment.placement("tiny-llama") == ModelPlacement(trainer_ranks=1, sampler=None, sampler_replicas=1)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"model": {}}, "model: unknown key"),
        ({"models": {"m": {"trainer_rank": 2}}}, 'models."m".trainer_rank: unknown key'),
        ({"models": {"m": {"trainer_ranks": "2"}}}, "models.\"m\".trainer_ranks: expected an int >= 1, got '2'"),
        ({"models": {"m": {"trainer_ranks": 0}}}, 'models."m".trainer_ranks: expected an int >= 1, got 0'),
        ({"models": {"m": {"max_adapter_slots": True}}}, 'models."m".max_adapter_slots: expected an int >= 1, got True'),
        ({"models": {"m": {"sampler": "tgi"}}}, "models.\"m\".sampler: expected one of ['torch', 'vllm'], got 'tgi'"),
        ({"models": {"m": {"dtype": "fp8"}}}, 'models."m".dtype: expected one of'),
        ({"models": {"m": {"devices": "cuda:0"}}}, 'models."m".devices: expected a list of device names'),
        ({"models": {"m": {"devices": ["gpu0"]}}}, 'models."m".devices[0]: expected "cpu", "cuda" or "cuda:N"'),
        ({"models": {"m": {"trainer_ranks": 2, "devices": ["cpu"]}}},
         'models."m".devices: expected one device per trainer rank (2), got 1'),
        ({"models": {"m": {"trainer_ranks": 2, "devices": ["cpu", "cuda:0"]}}}, "on one kind of device"),
        ({"models": {"m": {"sampler_replicas": 0}}}, 'models."m".sampler_replicas: expected an int >= 1, got 0'),
        ({"models": {"m": {"sampler_max_in_flight": 1.5}}}, 'models."m".sampler_max_in_flight: expected an int >= 1'),
        ({"models": {"m": {"tensor_parallel_size": 2}}}, 'models."m".tensor_parallel_size: expected 1'),
        ({"models": {"m": 3}}, 'models."m": expected a table, got int 3'),
        ({"models": [1]}, "models: expected a table of base models"),
    ],
)
def test_mistakes_name_the_key(document: dict, message: str) -> None:
    with pytest.raises(PlacementError) as info:
        parse_models(document)
    assert message in str(info.value)


def test_ranks_need_worker_processes() -> None:
    with pytest.raises(PlacementError, match=r'models\."m"\.trainer_ranks: 2 ranks need worker processes'):
        Deployment("inprocess", {"m": ModelPlacement(trainer_ranks=2)})
    Deployment("local", {"m": ModelPlacement(trainer_ranks=2)})


def test_vllm_runs_in_every_placement_but_needs_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM runs in the server or in sampler workers; without the vllm package the key is named."""
    for workers in ("inprocess", "local", "ray"):
        Deployment(workers, {"m": ModelPlacement(sampler="vllm")})  # type: ignore[arg-type]
    monkeypatch.setattr(config, "_installed", lambda package: package != "vllm")
    with pytest.raises(PlacementError, match=r"models\.\"m\"\.sampler: 'vllm' needs the vllm package"):
        Deployment("local", {"m": ModelPlacement(sampler="vllm")}).check_sampler("torch")
    with pytest.raises(PlacementError, match=r"^sampler: 'vllm' needs the vllm package"):
        Deployment("ray").check_sampler("vllm")
    Deployment("local", {"m": ModelPlacement(sampler="torch")}).check_sampler("torch")
    assert parse_models({"models": {"m": {"sampler_replicas": 3}}})["m"].sampler_replicas == 3


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models."m"\ntrainer_ranks = 2\n')
    with pytest.raises(PlacementError, match="is not valid TOML"):
        load_deployment("local", path)
    with pytest.raises(PlacementError, match="cannot read"):
        load_deployment("local", tmp_path / "nope.toml")


def test_server_refuses_a_bad_file_before_loading_anything(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models."tiny-llama"]\ntrainer_ranks = 2\nsampler = "tgi"\n')
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tinker_backend.cli", "--port", str(free_port()), "--data-dir", str(tmp_path / "d"),
         "--workers", "local", "--models", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "models.\\\"tiny-llama\\\".sampler: expected one of ['torch', 'vllm'], got 'tgi'" in result.stderr
    assert not (tmp_path / "d").exists()  # nothing was made, let alone loaded
    assert time.monotonic() - started < 30


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_inprocess_server_applies_a_models_placement(tmp_path: Path) -> None:
    """A model's ``max_adapter_slots`` bounds its clock cycles (four runs pipelined together run
    one per cycle; by default they share cycles) and its ``dtype`` is the one it computes in."""
    path = tmp_path / "models.toml"
    path.write_text(f'[models."{TINY}"]\nmax_adapter_slots = 1\ndtype = "bfloat16"\n')
    data = [Datum(model_input=ModelInput.from_ints([1, 2, 3, 4, 5]),
                  loss_fn_inputs={"target_tokens": [2, 3, 4, 5, 6], "weights": [1.0] * 5})]
    reference = ModelEngine(TINY, resolve_model(TINY))  # fp32, the default on CPU
    reference.create_adapter("r", LoraConfig(rank=4, seed=0))
    fp32_loss = reference.forward_backward("r", data, "cross_entropy", None, False).metrics["loss:sum"]
    server = ServerProcess(tmp_path / "data", "--models", str(path))
    service = tinker.ServiceClient(base_url=server.base_url)
    try:
        clients = [service.create_lora_training_client(TINY, rank=4, seed=i) for i in range(4)]
        for _ in range(2):
            futures = [tc.forward_backward(data, "cross_entropy") for tc in clients]
            outputs = [f.result() for f in futures]
            assert [out.metrics["cycle_runs:max"] for out in outputs] == [1.0] * 4
        bf16_loss = clients[0].forward(data, "cross_entropy").result().metrics["loss:sum"]
        assert bf16_loss != fp32_loss and bf16_loss == pytest.approx(fp32_loss, rel=5e-2)
    finally:
        service.close().result(timeout=30)
        assert server.stop() == 0
