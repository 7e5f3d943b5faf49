"""GPU check for the samplers (prepared for a CUDA machine; not part of CI).

    python bench/gpu_sampling.py                      # torch sampler; add --samplers torch vllm
    python bench/gpu_sampling.py --device cpu --models tiny-llama --sequences 8 --max-tokens 16
                                                      # a quick run of the same code on CPU

For SmolLM2-135M and a randomly initialised Llama-3.2-1B-shaped model (SmolLM2's tokenizer and
vocabulary, so vLLM can detokenize), in bf16, per sampler:

1. throughput at ``--sequences`` concurrent sequences (64), spread over 4 LoRA adapters
   (rank 32, attention + MLP), ``--prompt-len`` prompt tokens and exactly ``--max-tokens`` new
   tokens each; and the same for the first 8 requests served one at a time (the ratio);
2. the max gap between sampled logprobs and the trainer's logprobs of the same tokens;
3. the time from publishing a snapshot (``snapshot_sampler``) to a first sampled token.

vLLM needs ``pip install vllm`` (the CUDA build) in the same venv; it shares the GPU with the
trainer (``TINKER_VLLM_GPU_MEMORY_UTILIZATION``, default 0.4). Record the printed table in
docs/sampling.md.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_sampling import add_adapters, fidelity, run_batched, run_one_at_a_time
from transformers import LlamaConfig, LlamaForCausalLM

from tinker import SamplingParams
from tinker_backend.engine.model_engine import ModelEngine
from tinker_backend.model_registry import SMOLLM2, resolve_model

LLAMA_1B = "random-llama-1b"


def llama_1b_folder() -> Path:
    """A Llama-3.2-1B-shaped model with random weights (seed 0) and SmolLM2's tokenizer."""
    folder = Path(tempfile.mkdtemp(prefix="llama-1b-"))
    tokenizer_source = resolve_model(SMOLLM2)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (tokenizer_source / name).exists() and not (folder / name).exists():
            shutil.copy(tokenizer_source / name, folder / name)
    return folder


def workload(engine: ModelEngine, adapters: list[str], args: argparse.Namespace) -> list[tuple[str, list[int], SamplingParams]]:
    rng = random.Random(0)
    return [
        (
            adapters[i % len(adapters)],
            [rng.randrange(3, engine.vocab_size) for _ in range(args.prompt_len)],
            SamplingParams(max_tokens=args.max_tokens, seed=i, stop=[]),
        )
        for i in range(args.sequences)
    ]


def publish_latency(engine: ModelEngine, trials: int = 5) -> list[float]:
    latencies = []
    for i in range(trials):
        start = time.perf_counter()
        engine.snapshot_sampler("bench-0", f"latency-{i}")
        engine.sample(f"latency-{i}", [5, 6, 7], 1, SamplingParams(max_tokens=1))
        latencies.append(time.perf_counter() - start)
    return latencies


def measure(name: str, path: Path, sampler: str, args: argparse.Namespace) -> None:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    engine = ModelEngine(name, path, device=args.device, dtype=dtype, sampler=sampler, max_lora_rank=32)
    adapters = add_adapters(engine, 4, random.Random(1), rank=32)
    requests = workload(engine, adapters, args)
    run_batched(engine, requests[:8])  # warm-up: kernels, allocator, vLLM's caches
    batched = run_batched(engine, requests)
    alone = run_one_at_a_time(engine, requests[:8])
    batched_tok_s = len(requests) * args.max_tokens / batched
    alone_tok_s = 8 * args.max_tokens / alone
    gap = fidelity(engine, requests[:4])
    latency = publish_latency(engine)
    print(
        f"| {name} | {sampler} | {len(requests)} | {batched_tok_s:,.0f} | {alone_tok_s:,.0f} | "
        f"x{batched_tok_s / alone_tok_s:.1f} | {gap:.1e} | {statistics.median(latency) * 1000:.0f} ms |",
        flush=True,
    )
    engine.close()
    del engine
    if args.device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[SMOLLM2, LLAMA_1B])
    parser.add_argument("--samplers", nargs="+", default=["torch"], choices=["torch", "vllm"])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| model | sampler | sequences | batched tok/s | one-at-a-time tok/s | ratio | max logprob gap | publish -> 1st token |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        path = llama_1b_folder() if name == LLAMA_1B else resolve_model(name)
        for sampler in args.samplers:
            measure(name, path, sampler, args)


if __name__ == "__main__":
    main()
