"""Training throughput through the client (embedded backend): tokens/s of pipelined
forward_backward + optim_step, on the tiny model and on SmolLM2-135M.

    python bench/bench_training.py [--models tiny-llama HuggingFaceTB/SmolLM2-135M-Instruct]

The baseline in the same run is the engine called directly (no client, no scheduler), so the
ratio shows what the futures, the wire encoding and the scheduler cost.
"""

from __future__ import annotations

import argparse
import random
import time

from _common import temp_data_dir

import tinker
from tinker import AdamParams, Datum, ModelInput


def batch(vocab: int, rows: int, length: int, seed: int = 0) -> list[Datum]:
    rng = random.Random(seed)
    data = []
    for _ in range(rows):
        tokens = [rng.randrange(3, vocab) for _ in range(length + 1)]
        data.append(
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
            )
        )
    return data


def through_client(service: tinker.ServiceClient, model: str, data: list[Datum], steps: int) -> float:
    tc = service.create_lora_training_client(model, rank=8, seed=0)
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(AdamParams()).result()
    start = time.perf_counter()
    pending = []
    for _ in range(steps):
        pending.append((tc.forward_backward(data, "cross_entropy"), tc.optim_step(AdamParams())))
        if len(pending) > 2:  # keep two steps in flight, as the cookbook's loops do
            fb, op = pending.pop(0)
            fb.result()
            op.result()
    for fb, op in pending:
        fb.result()
        op.result()
    tokens = steps * sum(d.model_input.length for d in data)
    return tokens / (time.perf_counter() - start)


def engine_direct(model: str, data: list[Datum], steps: int) -> float:
    from tinker_backend.engine.model_engine import ModelEngine
    from tinker_backend.model_registry import resolve_model

    engine = ModelEngine(model, resolve_model(model))
    engine.create_adapter("bench", tinker.LoraConfig(rank=8, seed=0))
    engine.forward_backward("bench", data, "cross_entropy", None, True)
    engine.optim_step("bench", AdamParams())
    start = time.perf_counter()
    for _ in range(steps):
        engine.forward_backward("bench", data, "cross_entropy", None, True)
        engine.optim_step("bench", AdamParams())
    tokens = steps * sum(d.model_input.length for d in data)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "HuggingFaceTB/SmolLM2-135M-Instruct"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    service = tinker.ServiceClient(data_dir=temp_data_dir())
    for model in args.models:
        small = "tiny" in model
        steps = 20 if small else 3
        vocab = 2048 if small else 49152
        data = batch(vocab, args.rows, args.length)
        direct = engine_direct(model, data, steps)
        client = through_client(service, model, data, steps)
        print(
            f"{model:40s} B={args.rows} T={args.length}: engine {direct:8.0f} tok/s | "
            f"client (embedded) {client:8.0f} tok/s | ratio {client / direct:.2f}"
        )


if __name__ == "__main__":
    main()
