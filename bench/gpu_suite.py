"""The GPU suite: one script, one JSON, for a CUDA machine with torch and nothing else reachable.

    PYTHONPATH=src:backend python bench/gpu_suite.py [--out gpu_suite.json] [--peak-tflops 989]
    PYTHONPATH=src:backend python bench/gpu_suite.py --smoke    # a seconds-long check of the script on CPU

Builds a randomly initialised Llama-architecture model of about 1.2B parameters (Llama-3.2-1B
shapes, tiny-llama's tokenizer: the token ids are random anyway) and measures, in bf16:

1. LoRA SFT throughput (rank 32, batch 8 x 512, forward_backward + optim_step): tokens/s and
   MFU. FLOP convention: 6 N per token (N = base parameters, attention's own FLOPs left out),
   the usual training convention; the 4 N LoRA convention (no weight gradients of the frozen
   base) is given too.
2. Merged multi-tenant cycles: 8 adapters x 2 rows x 512 tokens in one ``forward_backward_many``
   vs the same 8 requests one at a time vs one adapter with all 16 rows.
3. The torch sampler at 64 concurrent requests over 8 adapters (prompt 128, 128 new tokens):
   generated tokens/s.
4. The bf16-vs-fp32 loss gap: the same batch and adapter in both dtypes, before and after 5 steps.
5. Rank groups: 8 adapters of ranks 4/8/16/32 merged, one padded group vs a group per rank
   bucket vs the default by cost, at 2 x 40 and 2 x 512 tokens (calibrates ``GROUP_COST_FLOPS``).
6. Activation checkpointing: the SFT step keeping vs recomputing activations, time and peak memory.
7. Many small tenants (``bench_small_tenants.py``'s case, tiny-llama through the embedded
   client): 8 and 32 runs of 2 short sequences, equal and mixed ranks, merged / one-run and
   serial / merged (medians of 3 repeats).

Runs in well under 8 minutes on an H100/H200. Writes the JSON and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tinker.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams
from tinker_backend.engine.model_engine import ModelEngine
from tinker_backend.engine.protocol import FwdBwdItem
from tinker_backend.model_registry import resolve_model

SHAPES = {  # Llama-3.2-1B's shapes with a 32k vocabulary (about 1.1B parameters), and a smoke size
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 32000},
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512},
}


def build_model(folder: Path, size: str) -> Path:
    config = LlamaConfig(**SHAPES[size], max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    for f in resolve_model("tiny-llama").glob("*token*"):  # any tokenizer serves random ids
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def batch(vocab: int, rows: int, length: int, seed: int) -> list[Datum]:
    rng = random.Random(seed)
    data = []
    for _ in range(rows):
        tokens = [rng.randrange(3, vocab) for _ in range(length + 1)]
        data.append(Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                          loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length}))
    return data


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def sft(engine: ModelEngine, args: argparse.Namespace, peak_tflops: float) -> dict[str, float]:
    params = sum(p.numel() for p in engine.model.parameters())
    engine.create_adapter("sft", LoraConfig(rank=32, seed=0))
    data = batch(engine.vocab_size, args.rows, args.length, 0)

    def step() -> None:
        engine.forward_backward("sft", data, "cross_entropy", None, True)
        engine.optim_step("sft", AdamParams(learning_rate=1e-4))

    seconds = timed(step, engine.device, args.repeats)
    tokens_s = args.rows * args.length / seconds
    return {"params": params, "tokens_per_s": tokens_s, "mfu_6n": 6 * params * tokens_s / (peak_tflops * 1e12),
            "mfu_4n": 4 * params * tokens_s / (peak_tflops * 1e12)}


def merging(engine: ModelEngine, args: argparse.Namespace) -> dict[str, float]:
    names = [f"t{i}" for i in range(8)]
    for i, name in enumerate(names):
        engine.create_adapter(name, LoraConfig(rank=16, seed=i))
    data = {name: batch(engine.vocab_size, 2, args.length, i) for i, name in enumerate(names)}
    everything = [d for name in names for d in data[name]]
    merged = timed(lambda: engine.forward_backward_many([FwdBwdItem(n, data[n], "cross_entropy") for n in names]),
                   engine.device, args.repeats)
    one_by_one = timed(lambda: [engine.forward_backward(n, data[n], "cross_entropy", None, True) for n in names],
                       engine.device, args.repeats)
    one_run = timed(lambda: engine.forward_backward("t0", everything, "cross_entropy", None, True),
                    engine.device, args.repeats)
    return {"merged_s": merged, "one_at_a_time_s": one_by_one, "one_run_whole_batch_s": one_run,
            "merged_speedup_vs_one_at_a_time": one_by_one / merged}


def rank_groups(engine: ModelEngine, args: argparse.Namespace) -> dict[str, float]:
    """8 adapters of ranks 4/8/16/32 in one merged fb at short (2 x 40) and long (2 x length)
    rows: seconds with one rank group, a group per rank bucket, and the default by cost
    (``GROUP_COST_FLOPS``), to calibrate its CUDA entry."""
    names = [f"g{i}" for i in range(8)]
    for i, name in enumerate(names):
        engine.create_adapter(name, LoraConfig(rank=(4, 8, 16, 32)[i % 4], seed=i))
    results = {}
    for length in (40, args.length):
        data = {name: batch(engine.vocab_size, 2, length, i) for i, name in enumerate(names)}
        items = [FwdBwdItem(n, data[n], "cross_entropy") for n in names]
        for label, cost in (("one_group", float("inf")), ("bucket_groups", 0.0), ("default", None)):
            engine.routing.group_cost_flops = cost
            results[f"len{length}_{label}_s"] = timed(functools.partial(engine.forward_backward_many, items),
                                                      engine.device, args.repeats)
    engine.routing.group_cost_flops = None
    for name in names:
        engine.remove_adapter(name)
    return results


def checkpointing(engine: ModelEngine, args: argparse.Namespace) -> dict[str, float]:
    """The SFT step (rank 32, rows x length) keeping activations vs recomputing them: seconds
    and peak GPU memory of each."""
    data = batch(engine.vocab_size, args.rows, args.length, 0)
    results = {}
    for label, tokens in (("kept", None), ("recomputed", 1)):
        engine.checkpoint_tokens = tokens
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        results[f"{label}_s"] = timed(lambda: engine.forward_backward("sft", data, "cross_entropy", None, True),
                                      engine.device, args.repeats)
        if engine.device.type == "cuda":
            results[f"{label}_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    engine.checkpoint_tokens = None
    return results


def sampling(engine: ModelEngine, args: argparse.Namespace) -> dict[str, float]:
    for i in range(8):
        engine.snapshot_sampler(f"t{i}", f"s{i}")
    rng = random.Random(1)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=0)
    start = time.perf_counter()
    futures = [engine.submit_sample(f"s{i % 8}", [rng.randrange(3, engine.vocab_size) for _ in range(128)], 1, params)
               for i in range(64)]
    while not all(f.done() for f in futures) and engine.sampler.step():
        pass
    seconds = time.perf_counter() - start
    generated = sum(len(s.tokens) for f in futures for s in f.result().sequences)
    return {"requests": 64, "adapters": 8, "generated_tokens": generated, "tokens_per_s": generated / seconds}


def dtype_gap(path: Path, device: str, args: argparse.Namespace) -> dict[str, float]:
    losses: dict[str, list[float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = ModelEngine("suite", path, device, dtype)
        engine.create_adapter("gap", LoraConfig(rank=32, seed=3))
        data = batch(engine.vocab_size, 4, args.length, 5)
        run = []
        for _ in range(6):
            run.append(engine.forward_backward("gap", data, "cross_entropy", None, True).metrics["loss:sum"])
            engine.optim_step("gap", AdamParams(learning_rate=1e-3))
        losses[str(dtype)] = [run[0], run[-1]]
        del engine
    fp32, bf16 = losses["torch.float32"], losses["torch.bfloat16"]
    return {"fp32_loss_start": fp32[0], "bf16_loss_start": bf16[0], "rel_gap_start": abs(bf16[0] - fp32[0]) / fp32[0],
            "fp32_loss_after_5": fp32[1], "bf16_loss_after_5": bf16[1], "rel_gap_after_5": abs(bf16[1] - fp32[1]) / fp32[1]}


def small_tenants(args: argparse.Namespace) -> dict[str, float]:
    """``bench_small_tenants.py`` on this machine's device (the embedded backend picks CUDA)."""
    import statistics

    import bench_small_tenants as small

    import tinker

    results = {}
    for runs in (8, 32):
        for kind in ("equal", "mixed"):
            service = tinker.ServiceClient(data_dir=small.temp_data_dir())
            t = small.measure(service, "tiny-llama", runs, kind, args.small_steps, args.small_repeat, True)
            service.close().result()
            results[f"{runs}_{kind}_merged_over_one_run"] = statistics.median(
                m / o for m, o in zip(t["merged"], t["one"], strict=True))
            results[f"{runs}_{kind}_serial_over_merged"] = statistics.median(
                s / m for s, m in zip(t["serial"], t["merged"], strict=True))
            results[f"{runs}_{kind}_merged_ms_per_step"] = 1000 * statistics.median(t["merged"]) / args.small_steps
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_suite.json"))
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU: checks the script, measures nothing")
    args = parser.parse_args()
    size, device = ("smoke", "cpu") if args.smoke else ("1b", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    args.rows, args.length, args.repeats, args.new_tokens = (2, 16, 1, 8) if args.smoke else (8, 512, 5, 128)
    args.small_steps, args.small_repeat = (2, 1) if args.smoke else (24, 3)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp), size)
        engine = ModelEngine("suite", path, device, torch.bfloat16, checkpoint_tokens=None)
        results: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
            "torch": torch.__version__,
            "flop_convention": "MFU = k * N * tokens/s / peak, N = base parameters, k = 6 (and 4: LoRA, frozen base)",
            "sft_bf16": sft(engine, args, args.peak_tflops),
            "merging_bf16": merging(engine, args),
            "rank_groups_bf16": rank_groups(engine, args),
            "checkpointing_bf16": checkpointing(engine, args),
            "sampling_bf16": sampling(engine, args),
        }
        del engine
        results["dtype_gap"] = dtype_gap(path, device, args)
    results["small_tenants"] = small_tenants(args)
    results["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=2))
    for section, values in results.items():
        if isinstance(values, dict):
            for key, value in values.items():
                print(f"{section:14s} {key:34s} {value:.4g}" if isinstance(value, float) else
                      f"{section:14s} {key:34s} {value}")
        else:
            print(f"{section:14s} {values}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
