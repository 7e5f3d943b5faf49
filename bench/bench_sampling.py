"""Sampling throughput and latency: continuous batching vs one at a time vs transformers
``generate``, vLLM vs the torch sampler, and the time from publishing weights to a first token.

    python bench/bench_sampling.py                                  # torch sampler, tiny model
    python bench/bench_sampling.py --models HuggingFaceTB/SmolLM2-135M-Instruct --samplers torch vllm
                                                                    # vllm: run in the vllm venv

1. **Throughput** (engine level, so only the sampler is measured): ``--requests`` requests
   (default 32) spread over ``--adapters`` LoRA adapters (4), each a ``--prompt-len``-token
   prompt and exactly ``--max-tokens`` new tokens (``stop=[]``, temperature 1).
   * ``batched``: all submitted at once, the sampler serves them together;
   * ``one-at-a-time`` (the baseline): the same requests through the same sampler, each
     waiting for the previous one;
   * ``hf-generate``: plain transformers ``generate`` on the base model (no LoRA), the same
     prompts as one static batch, and one by one.
   Ratios are of tokens/s, against ``one-at-a-time`` of the same sampler in the same run
   (``--serial-requests N`` times the serial baselines on N requests, for slow models).
2. **Publish to first token**: through the client (embedded backend), the time from
   ``save_weights_and_get_sampling_client()`` to the answer of a ``max_tokens=1`` sample, per
   sampler (median and worst of ``--trials``).

Timings on shared machines are noisy: every figure is the best of ``--repeats`` runs, and the
machine's load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tinker
from tinker import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams


def random_tokens(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def make_engine(model: str, sampler: str):
    from tinker_backend.engine.model_engine import ModelEngine
    from tinker_backend.model_registry import resolve_model

    return ModelEngine(model, resolve_model(model), sampler=sampler, max_lora_rank=32)


def add_adapters(engine, count: int, rng: random.Random, rank: int = 8) -> list[str]:
    """``count`` published samplers, each one training step away from the base model."""
    ids = []
    for i in range(count):
        adapter = f"bench-{i}"
        engine.create_adapter(adapter, LoraConfig(rank=rank, seed=i, train_unembed=False))
        tokens = random_tokens(rng, engine.vocab_size, 33)
        datum = Datum(
            model_input=ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 32},
        )
        engine.forward_backward(adapter, [datum], "cross_entropy", None, True)
        engine.optim_step(adapter, AdamParams(learning_rate=1e-2))
        engine.snapshot_sampler(adapter, adapter)
        ids.append(adapter)
    return ids


def workload(engine, adapters: list[str], args: argparse.Namespace) -> list[tuple[str, list[int], SamplingParams]]:
    rng = random.Random(0)
    return [
        (
            adapters[i % len(adapters)],
            random_tokens(rng, engine.vocab_size, args.prompt_len),
            SamplingParams(max_tokens=args.max_tokens, seed=i, stop=[]),
        )
        for i in range(args.requests)
    ]


def run_batched(engine, requests) -> float:
    start = time.perf_counter()
    futures = [engine.submit_sample(sampler, prompt, 1, params) for sampler, prompt, params in requests]
    while not all(f.done() for f in futures) and engine.sampler.step():
        pass
    for future in futures:
        future.result(timeout=3600)
    return time.perf_counter() - start


def run_one_at_a_time(engine, requests) -> float:
    start = time.perf_counter()
    for sampler, prompt, params in requests:
        engine.sample(sampler, prompt, 1, params)
    return time.perf_counter() - start


def run_hf_generate(engine, requests, batched: bool) -> float:
    """transformers ``generate`` on the bare base model (no LoRA routing), left-padded."""
    from tinker_backend.engine.lora import Segment

    model = engine.model
    engine.routing.set([Segment(None, 0, 1, False)])  # no adapter: LoraLinear adds nothing
    prompts = [torch.tensor(prompt) for _, prompt, _ in requests]
    max_new = requests[0][2].max_tokens
    pad = engine.tokenizer.pad_token_id or 0
    groups = [prompts] if batched else [[p] for p in prompts]
    start = time.perf_counter()
    for group in groups:
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(group):
            ids[row, width - len(p) :] = p
            mask[row, width - len(p) :] = 1
        engine.routing.set([Segment(None, 0, len(group), False)])
        with torch.no_grad():
            model.generate(
                input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device), do_sample=True,
                max_new_tokens=max_new, min_new_tokens=max_new, top_k=0, pad_token_id=pad,
            )
    return time.perf_counter() - start


def fidelity(engine, requests) -> float:
    """Max |sampled logprob - trainer logprob| over the tokens of the first few requests."""
    futures = [engine.submit_sample(sampler, prompt, 1, params) for sampler, prompt, params in requests]
    while not all(f.done() for f in futures) and engine.sampler.step():
        pass
    gap = 0.0
    for (sampler, prompt, _), future in zip(requests, futures, strict=True):
        seq = future.result().sequences[0]
        tokens = prompt + seq.tokens
        datum = Datum(
            model_input=ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)},
        )
        out = engine.forward_backward(sampler, [datum], "cross_entropy", None, backward=False)
        trainer = out.loss_fn_outputs[0]["logprobs"].to_torch()[len(prompt) - 1 :]
        gap = max(gap, float((torch.tensor(seq.logprobs) - trainer).abs().max()))
    return gap


def best(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def throughput(model: str, sampler: str, args: argparse.Namespace) -> dict[str, float]:
    engine = make_engine(model, sampler)
    adapters = add_adapters(engine, args.adapters, random.Random(1))
    requests = workload(engine, adapters, args)
    run_batched(engine, requests[:4])  # warm up (vLLM: first requests build its kernels and caches)
    serial = requests[: args.serial_requests or None]  # serial tok/s does not depend on the count
    tok_s = {
        "batched": len(requests) * args.max_tokens / best(lambda: run_batched(engine, requests), args.repeats),
        "one-at-a-time": len(serial) * args.max_tokens / run_one_at_a_time(engine, serial),
    }
    if sampler == "torch":
        seconds = best(lambda: run_hf_generate(engine, requests, True), args.repeats)
        tok_s["hf-generate batch"] = len(requests) * args.max_tokens / seconds
        tok_s["hf-generate one-by-one"] = len(serial) * args.max_tokens / run_hf_generate(engine, serial, False)
    baseline = tok_s["one-at-a-time"]
    gap = fidelity(engine, requests[: args.adapters])
    print(f"\n{model} [{sampler} sampler] {args.requests} requests x {args.max_tokens} tokens over {args.adapters} adapters")
    print(f"  max |sampled - trainer logprob| over {args.adapters} sequences: {gap:.2e} ({engine.model.dtype})")
    for name, value in tok_s.items():
        print(f"  {name:24s} {value:8.1f} tok/s  x{value / baseline:5.2f} vs one-at-a-time")
    engine.close()
    return tok_s


def publish_to_first_token(model: str, sampler: str, trials: int) -> list[float]:
    os.environ["TINKER_SAMPLER"] = sampler
    service = tinker.ServiceClient(data_dir=Path(tempfile.mkdtemp(prefix=f"bench-sampling-{sampler}-")))
    tc = service.create_lora_training_client(model, rank=8, seed=0, train_unembed=False)
    datum = Datum(
        model_input=ModelInput.from_ints([5, 6, 7, 8]), loss_fn_inputs={"target_tokens": [6, 7, 8, 9], "weights": [1.0] * 4}
    )
    prompt = ModelInput.from_ints([5, 6, 7])
    latencies = []
    for _ in range(trials + 1):  # the first one also loads the model
        tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(AdamParams(learning_rate=1e-3)).result()
        start = time.perf_counter()
        sampling_client = tc.save_weights_and_get_sampling_client()
        sampling_client.sample(prompt, 1, SamplingParams(max_tokens=1)).result()
        latencies.append(time.perf_counter() - start)
    latencies = latencies[1:]
    print(
        f"\n{model} [{sampler} sampler] save_weights_and_get_sampling_client -> first token: "
        f"median {statistics.median(latencies) * 1000:.0f} ms, worst {max(latencies) * 1000:.0f} ms ({trials} trials)"
    )
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-llama"])
    parser.add_argument("--samplers", nargs="+", default=["torch"], choices=["torch", "vllm"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--serial-requests", type=int, default=0,
                        help="time the one-at-a-time baselines on the first N requests only (0: all)")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (1 is steadier on a loaded machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    results = {}
    for model in args.models:
        for sampler in args.samplers:
            results[model, sampler] = throughput(model, sampler, args)
        if len(args.samplers) > 1:
            ratio = results[model, args.samplers[1]]["batched"] / results[model, args.samplers[0]]["batched"]
            print(f"\n{model}: {args.samplers[1]} batched / {args.samplers[0]} batched = x{ratio:.2f}")
    if not args.skip_latency:
        for sampler in args.samplers:
            publish_to_first_token(args.models[0], sampler, args.trials)
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
