"""Multi-tenant training: 8 runs with small batches on one base model.

    python bench/bench_multitenant.py [--models tiny-llama HuggingFaceTB/SmolLM2-135M-Instruct]

Three ways to do the same work, in one run (embedded backend, real client):
  merged    8 training clients submit fb + optim concurrently; clock cycles merge them
  serial    the same requests, one run at a time (each run's step awaited before the next)
  one-run   a single run with the same total batch (8 x 2 sequences)
Prints tokens/s and the ratios, then resident memory with 1 and 16 runs (base model loaded once),
measured in a fresh process (``--memory-only``) so that the engines above do not count.
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import time

from _common import temp_data_dir

import tinker
from tinker import AdamParams, Datum, ModelInput

RUNS, ROWS, LENGTH = 8, 2, 64


def batch(vocab: int, rows: int, seed: int) -> list[Datum]:
    rng = random.Random(seed)
    data = []
    for _ in range(rows):
        tokens = [rng.randrange(3, vocab) for _ in range(LENGTH + 1)]
        data.append(Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                          loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * LENGTH}))
    return data


def merged(clients, batches, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        futures = [(tc.forward_backward(b, "cross_entropy"), tc.optim_step(AdamParams())) for tc, b in zip(clients, batches, strict=True)]
        for fb, op in futures:
            fb.result()
            op.result()
    return time.perf_counter() - start


def serial(clients, batches, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        for tc, b in zip(clients, batches, strict=True):
            fb, op = tc.forward_backward(b, "cross_entropy"), tc.optim_step(AdamParams())
            fb.result()
            op.result()
    return time.perf_counter() - start


def one_run(tc, big_batch, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fb, op = tc.forward_backward(big_batch, "cross_entropy"), tc.optim_step(AdamParams())
        fb.result()
        op.result()
    return time.perf_counter() - start


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(models: list[str]) -> None:
    service = tinker.ServiceClient(data_dir=temp_data_dir())
    for model in models:
        small = "tiny" in model
        steps = 5 if small else 2
        vocab = 2048 if small else 49152
        clients = [service.create_lora_training_client(model, rank=8, seed=i) for i in range(RUNS)]
        batches = [batch(vocab, ROWS, i) for i in range(RUNS)]
        big = service.create_lora_training_client(model, rank=8, seed=99)
        big_batch = [d for b in batches for d in b]
        merged(clients, batches, 1), serial(clients, batches, 1), one_run(big, big_batch, 1)  # warm up
        tokens = steps * RUNS * ROWS * LENGTH
        t_merged, t_serial, t_one = merged(clients, batches, steps), serial(clients, batches, steps), one_run(big, big_batch, steps)
        print(
            f"{model}: merged {tokens / t_merged:7.0f} tok/s | serial {tokens / t_serial:7.0f} tok/s | "
            f"one run same batch {tokens / t_one:7.0f} tok/s | merged/serial x{t_serial / t_merged:.2f} | "
            f"merged/one-run x{t_one / t_merged:.2f}"
        )


def memory(model: str) -> None:
    service = tinker.ServiceClient(data_dir=temp_data_dir())
    clients = [service.create_lora_training_client(model, rank=8, seed=0)]
    probe = batch(2048, 1, 0)
    clients[0].forward_backward(probe, "cross_entropy").result()
    one = rss_mb()
    clients += [service.create_lora_training_client(model, rank=8, seed=i) for i in range(1, 16)]
    for tc in clients:
        tc.forward_backward(probe, "cross_entropy").result()
    sixteen = rss_mb()
    print(f"{model}: resident memory with 1 run {one:.0f} MB, with 16 runs {sixteen:.0f} MB (+{sixteen - one:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "HuggingFaceTB/SmolLM2-135M-Instruct"])
    parser.add_argument("--memory-model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--memory-only", action="store_true", help="only the memory part, in this process")
    args = parser.parse_args()
    if args.memory_only:
        memory(args.memory_model)
        return
    throughput(args.models)
    sys.stdout.flush()
    command = [sys.executable, __file__, "--memory-only", "--memory-model", args.memory_model]
    subprocess.run(command, check=True)  # a fresh process: RSS without the engines above


if __name__ == "__main__":
    main()
