"""GPU check for the multi-tenant trainer (prepared for a CUDA machine; not part of CI).

    python bench/gpu_training.py [--peak-tflops 989]

1. Equivalence in bf16: a merged pass over 3 adapters (different ranks, seeds, lengths) gives
   each the loss, per-token logprobs and gradients of running it alone (max differences printed).
2. Training throughput at batch 8 x 512 (forward_backward + optim_step, one adapter, rank 32)
   for SmolLM2-135M and a randomly initialised Llama-3.2-1B-shaped model, with MFU under the
   4N FLOPs-per-token convention for LoRA (N = base parameters).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tinker.types import AdamParams, Datum, LoraConfig, ModelInput
from tinker_backend.engine.model_engine import FwdBwdItem, ModelEngine
from tinker_backend.model_registry import SMOLLM2, resolve_model


def batch(vocab: int, rows: int, length: int, seed: int) -> list[Datum]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        tokens = [rng.randrange(3, vocab) for _ in range(length + 1)]
        out.append(Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                         loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length}))
    return out


def grads(engine: ModelEngine, adapter_id: str) -> torch.Tensor:
    adapter = engine._adapters.get(adapter_id)
    return torch.cat([p.grad.float().flatten() for p in adapter.parameters() if p.grad is not None])


def equivalence(path: Path) -> None:
    engine = ModelEngine("smollm2", path, device="cuda", dtype=torch.bfloat16)
    specs = [("a", 8, 0, 37), ("b", 32, 1, 90), ("c", 16, 2, 200)]
    for name, rank, seed, _ in specs:
        engine.create_adapter(name, LoraConfig(rank=rank, seed=seed))
        engine.create_adapter(name + "-solo", LoraConfig(rank=rank, seed=seed))
    data = {name: batch(engine.vocab_size, 2, length, seed) for name, _, seed, length in specs}
    merged = engine.forward_backward_many([FwdBwdItem(n, data[n], "cross_entropy") for n, *_ in specs])
    for (name, *_), out in zip(specs, merged, strict=True):
        solo = engine.forward_backward(name + "-solo", data[name], "cross_entropy", None, True)
        lp_m = torch.cat([o["logprobs"].to_torch() for o in out.loss_fn_outputs])
        lp_s = torch.cat([o["logprobs"].to_torch() for o in solo.loss_fn_outputs])
        g_m, g_s = grads(engine, name), grads(engine, name + "-solo")
        print(
            f"equivalence {name}: loss {out.metrics['loss:sum']:.4f} vs {solo.metrics['loss:sum']:.4f}; "
            f"max |dlogprob| {float((lp_m - lp_s).abs().max()):.2e}; "
            f"grad rel diff {float((g_m - g_s).norm() / g_s.norm()):.2e}"
        )


def throughput(name: str, path: Path, peak_tflops: float, rows: int = 8, length: int = 512, steps: int = 10) -> None:
    engine = ModelEngine(name, path, device="cuda", dtype=torch.bfloat16)
    params = sum(p.numel() for p in engine.model.parameters())
    engine.create_adapter("bench", LoraConfig(rank=32, seed=0))
    data = batch(engine.vocab_size, rows, length, 0)
    for _ in range(2):
        engine.forward_backward("bench", data, "cross_entropy", None, True)
        engine.optim_step("bench", AdamParams())
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.forward_backward("bench", data, "cross_entropy", None, True)
        engine.optim_step("bench", AdamParams())
    torch.cuda.synchronize()
    tok_s = steps * rows * length / (time.perf_counter() - start)
    mfu = 4 * params * tok_s / (peak_tflops * 1e12)
    print(f"{name}: {params / 1e6:.0f}M params, batch {rows}x{length}: {tok_s:,.0f} tok/s, MFU {100 * mfu:.1f}% (4N)")
    del engine
    torch.cuda.empty_cache()


def llama_1b(folder: Path) -> Path:
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    resolve_model("tiny-llama")  # any tokenizer works for random token ids: reuse the tiny one's files
    for f in resolve_model("tiny-llama").glob("tokenizer*"):
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this script needs a CUDA GPU"
    print(torch.cuda.get_device_name())
    smollm2 = resolve_model(SMOLLM2)
    equivalence(smollm2)
    throughput("SmolLM2-135M", smollm2, args.peak_tflops)
    with tempfile.TemporaryDirectory() as tmp:
        throughput("Llama-1B (random)", llama_1b(Path(tmp)), args.peak_tflops)


if __name__ == "__main__":
    main()
