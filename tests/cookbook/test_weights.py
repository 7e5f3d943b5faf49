"""Weights out of tinker: a trained run's checkpoint as a PEFT adapter and as a merged HF model.

The merged model is held to two independent references, in fp32: the training engine's own
forward pass through the real client (the run's target logprobs), and peft's unmerged adapter
on the base model (base + x @ A.T @ B.T * alpha / r at each adapted layer).
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import pytest
import torch

import tinker
from tinker.types import AdamParams
from tinker_backend.model_registry import resolve_model
from tinker_cookbook import weights
from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.supervised.data import datum_from_tokens_weights

from .conftest import SMOLLM2, TINY

TOKENS = [5, 17, 42, 99, 3, 250, 7, 88, 1000, 12, 640, 31, 9, 77, 500, 64]


def trained_checkpoint(data_dir: Path, base_model: str, steps: int) -> tuple[Path, list[float]]:
    """Train a run (LoRA on attention, MLP and lm_head) on the embedded backend in ``data_dir``;
    returns its saved checkpoint's folder and the run's target logprobs of ``TOKENS`` after it."""
    datum = datum_from_tokens_weights(TOKENS, [1.0] * len(TOKENS))
    with tinker.ServiceClient(data_dir=data_dir) as service:
        tc = service.create_lora_training_client(base_model, rank=4, seed=0)
        for _ in range(steps):
            tc.forward_backward([datum], "cross_entropy")
            tc.optim_step(AdamParams(learning_rate=5e-3))
        path = tc.save_state("final").result(timeout=120).path
        output = tc.forward([datum], "cross_entropy").result(timeout=120)
    assert path.endswith("/weights/final")
    [folder] = (data_dir / "checkpoints").glob("*/weights/final.*")  # the embedded backend's files
    return folder, output.loss_fn_outputs[0]["logprobs"].tolist()


def logits_of(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def target_logprobs(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def check_merged_equals_base_plus_adapter(tmp_path: Path, base_model: str, steps: int) -> dict[str, float]:
    """Export a trained run and compare; returns the measured max differences."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, run_logprobs = trained_checkpoint(tmp_path / "data", base_model, steps)
    base_folder = resolve_model(base_model)  # the very weights the engine trained on
    adapter = weights.build_lora_adapter(checkpoint, tmp_path / "adapter", base_model=str(base_folder))
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    merged_dir = weights.build_hf_model(base_folder, adapter, tmp_path / "merged", dtype="float32")

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    base_logits = logits_of(base, TOKENS)
    unmerged = PeftModel.from_pretrained(base, str(adapter))  # peft loads our folder as it is
    reference = logits_of(unmerged, TOKENS)
    got = logits_of(merged, TOKENS)
    measured = {
        "adapter_effect": (reference - base_logits).abs().max().item(),
        "vs_peft_logits": (got - reference).abs().max().item(),
        "vs_engine_logprobs": (target_logprobs(got, TOKENS) - torch.tensor(run_logprobs)).abs().max().item(),
    }
    print(base_model, measured)
    assert measured["adapter_effect"] > 1e-2  # the adapter changes the model: the checks below mean something
    assert measured["vs_peft_logits"] < 1e-4
    assert measured["vs_engine_logprobs"] < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template  # the chat template came along
    assert tokenizer.encode("hello world") == AutoTokenizer.from_pretrained(base_folder).encode("hello world")
    assert list(merged_dir.glob("*.safetensors"))
    return measured


@pytest.mark.timeout(180)
def test_tiny_llama_merged_model_equals_base_plus_adapter(tmp_path: Path):
    check_merged_equals_base_plus_adapter(tmp_path, TINY, steps=3)


@pytest.mark.smollm2
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_merged_model_equals_base_plus_adapter(tmp_path: Path):
    """SmolLM2 ties lm_head to the embedding: the merge must untie it."""
    check_merged_equals_base_plus_adapter(tmp_path, SMOLLM2, steps=2)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False


@pytest.mark.timeout(180)
def test_bfloat16_export_is_bf16_and_close(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    checkpoint, _ = trained_checkpoint(tmp_path / "data", TINY, steps=1)
    base_folder = resolve_model(TINY)
    out32 = weights.build_hf_model(base_folder, checkpoint, tmp_path / "m32")  # a checkpoint folder will do
    out16 = weights.build_hf_model(base_folder, checkpoint, tmp_path / "m16", dtype="bfloat16")
    m16 = AutoModelForCausalLM.from_pretrained(out16)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    m32 = AutoModelForCausalLM.from_pretrained(out32, dtype=torch.float32)
    # bf16 keeps 8 bits of mantissa: logits of this size move by a few hundredths.
    assert (logits_of(m16.float(), TOKENS) - logits_of(m32, TOKENS)).abs().max().item() < 0.1


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
Q = "base_model.model.model.layers.0.self_attn.q_proj"
GOOD = {f"{Q}.lora_A.weight": torch.zeros(2, 128), f"{Q}.lora_B.weight": torch.zeros(128, 2)}


def test_build_lora_adapter_refuses_what_peft_or_vllm_cannot_load(tmp_path: Path):
    with pytest.raises(ConfigurationError, match=r"adapter_dir: expected a PEFT LoRA folder with adapter_config\.json"):
        weights.build_lora_adapter(tmp_path, tmp_path / "out")
    ia3 = write_adapter(tmp_path / "ia3", {**LORA, "peft_type": "IA3"}, GOOD)
    with pytest.raises(ConfigurationError, match="expected peft_type 'LORA', got 'IA3'"):
        weights.build_lora_adapter(ia3, tmp_path / "out")
    bad_rank = write_adapter(tmp_path / "rank", {**LORA, "r": 3}, GOOD)
    with pytest.raises(ConfigurationError, match=r"q_proj: expected lora_A \[3, in\] and lora_B \[out, 3\], got \[2, 128\]"):
        weights.build_lora_adapter(bad_rank, tmp_path / "out")
    half = write_adapter(tmp_path / "half", LORA, {f"{Q}.lora_A.weight": torch.zeros(2, 128)})
    with pytest.raises(ConfigurationError, match="expected lora_A and lora_B for every module"):
        weights.build_lora_adapter(half, tmp_path / "out")
    head = {"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 128),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(2048, 2)}
    with_head = write_adapter(tmp_path / "head", LORA, {**GOOD, **head})
    with pytest.raises(ConfigurationError, match=r"vllm=True\), got LoRA on \['lm_head'\]"):
        weights.build_lora_adapter(with_head, tmp_path / "out", vllm=True)
    assert weights.build_lora_adapter(with_head, tmp_path / "out").is_dir()  # peft serves lm_head


def test_build_hf_model_refuses_an_unknown_base_a_bad_dtype_and_a_misfit(tmp_path: Path):
    adapter = write_adapter(tmp_path / "a", LORA, GOOD)
    with pytest.raises(ConfigurationError, match="dtype: expected one of"):
        weights.build_hf_model(resolve_model(TINY), adapter, tmp_path / "o", dtype="int8")
    with pytest.raises(ConfigurationError, match="base_model: expected a local Hugging Face model folder"):
        weights.build_hf_model(tmp_path / "nowhere", adapter, tmp_path / "o")
    wide = {f"{Q}.lora_A.weight": torch.zeros(2, 96), f"{Q}.lora_B.weight": torch.zeros(96, 2)}
    misfit = write_adapter(tmp_path / "wide", LORA, wide)
    with pytest.raises(ConfigurationError, match="adapter_dir: expected an adapter that fits"):
        weights.build_hf_model(resolve_model(TINY), misfit, tmp_path / "o")


class RecordingRestClient:
    """Stands in for ``tinker.RestClient``: records ``download_checkpoint`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def download_checkpoint(self, tinker_path: str, out_dir: str) -> concurrent.futures.Future[Path]:
        self.calls.append((tinker_path, str(out_dir)))
        done: concurrent.futures.Future[Path] = concurrent.futures.Future()
        done.set_result(Path(out_dir))
        return done


def test_download_is_the_rest_clients_download(tmp_path: Path):
    rest = RecordingRestClient()
    got = weights.download("tinker://run/weights/final", tmp_path, rest_client=rest)  # type: ignore[arg-type]
    assert got == tmp_path and rest.calls == [("tinker://run/weights/final", str(tmp_path))]
    with pytest.raises(ConfigurationError, match="tinker_path: expected 'tinker://"):
        weights.download("run/weights/final", tmp_path, rest_client=rest)  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_an_adapter_made_with_peft_merges_too(tmp_path: Path):
    """peft's own folder (it also saves lm_head's base weight) merges to the same function."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_folder = resolve_model(TINY)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32),
        LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "up_proj", "lm_head"]),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(tmp_path / "adapter")
    merged_dir = weights.build_hf_model(base_folder, tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    reference = logits_of(PeftModel.from_pretrained(base, str(tmp_path / "adapter")), TOKENS)
    assert (logits_of(merged, TOKENS) - reference).abs().max().item() < 1e-4
