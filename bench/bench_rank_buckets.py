"""Rank groups and the flat AdamW, cycle by cycle in ONE process (engine called directly).

    PYTHONPATH=src:backend python bench/bench_rank_buckets.py [--runs 32] [--ranks mixed] [--cycles 20]

N runs of 2 sequences (40 and 20 tokens, as ``bench_small_tenants.py``), ranks all 8 or
4/8/16/32, one merged ``forward_backward_many`` + joint ``optim_step`` per cycle. The variants
take turns cycle by cycle, so that load from other processes hits all of them alike:

  one-group   one rank group per layer (every adapter zero-padded to the batch's largest rank)
  buckets     each rank bucket its own group (two bmm per bucket and layer)
  per-tensor  the default groups (by cost, ``LoraRouting.groups``) and AdamW per tensor
  default     the default groups and the flat AdamW (this code)
  one-run     ONE rank-8 run training all 2N sequences as one batch

It prints the median (and min) ms per cycle of each and ``variant / one-run`` of the medians,
by the wall clock and by this process's CPU time (with ``OMP_NUM_THREADS=1`` the work done,
which other processes on a shared machine inflate much less than the wall time), and the wall
time of the joint AdamW update alone.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from bench_small_tenants import batch, ranks_of

from tinker.types import AdamParams, LoraConfig
from tinker_backend.engine import model_engine, optimizer, trainer
from tinker_backend.engine.model_engine import ModelEngine
from tinker_backend.engine.protocol import FwdBwdItem
from tinker_backend.model_registry import resolve_model


@contextlib.contextmanager
def variant(engine: ModelEngine, group_cost_flops: float | None, flat: bool) -> Iterator[None]:
    """The code with the rank groups fixed and/or the flat AdamW switched off (for the block).

    The per-tensor AdamW updates the flat views in place and every tensor steps, so the flat
    buffers stay valid: they are kept for the next flat cycle instead of built again."""
    saved = optimizer._flat_state, trainer.flat_gradients
    flat_states = {} if flat else {adapter: adapter.flat_state for adapter in engine._adapters.resident()}
    engine.routing.group_cost_flops = group_cost_flops
    if not flat:
        optimizer._flat_state = lambda adapter, params: None
        trainer.flat_gradients = lambda adapter: None
    try:
        yield
    finally:
        engine.routing.group_cost_flops = None
        optimizer._flat_state, trainer.flat_gradients = saved
        for adapter, state in flat_states.items():
            adapter.flat_state = state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=32)
    parser.add_argument("--ranks", choices=["equal", "mixed"], default="mixed")
    parser.add_argument("--cycles", type=int, default=20)
    args = parser.parse_args()
    engine = ModelEngine("tiny-llama", resolve_model("tiny-llama"))
    names = [f"run{i}" for i in range(args.runs)]
    for i, (name, rank) in enumerate(zip(names, ranks_of(args.ranks, args.runs), strict=True)):
        engine.create_adapter(name, LoraConfig(rank=rank, seed=i))
    engine.create_adapter("one", LoraConfig(rank=8, seed=1000))
    data = {name: batch(i) for i, name in enumerate(names)}
    adam = AdamParams(learning_rate=1e-4)

    def cycle(items: list[FwdBwdItem]) -> None:
        engine.forward_backward_many(items)
        with engine.joint_optim_steps():
            for item in items:
                engine.optim_step(item.adapter_id, adam)

    merged = [FwdBwdItem(n, data[n], "cross_entropy", None, True) for n in names]
    one = [FwdBwdItem("one", [d for n in names for d in data[n]], "cross_entropy", None, True)]
    variants: dict[str, Callable[[], None]] = {}
    for label, group_cost_flops, flat in (
        ("one-group", math.inf, True), ("buckets", 0.0, True), ("per-tensor", None, False), ("default", None, True)
    ):
        variants[label] = functools.partial(_run, engine, group_cost_flops, flat, lambda: cycle(merged))
    variants["one-run"] = lambda: cycle(one)
    adamw_seconds = [0.0]
    adamw_steps = model_engine.adamw_steps

    def timed_adamw(*args: Any) -> None:
        start = time.perf_counter()
        adamw_steps(*args)
        adamw_seconds[0] += time.perf_counter() - start

    model_engine.adamw_steps = timed_adamw
    adamw: dict[str, list[float]] = {label: [] for label in variants}
    times: dict[str, list[float]] = {label: [] for label in variants}
    cpu: dict[str, list[float]] = {label: [] for label in variants}
    for run in variants.values():  # warm up (and the flat buffers built)
        run()
    for _ in range(args.cycles):
        for label, run in variants.items():
            start, start_cpu, adamw_seconds[0] = time.perf_counter(), time.process_time(), 0.0
            run()
            adamw[label].append(adamw_seconds[0])
            times[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    base, base_cpu = statistics.median(times["one-run"]), statistics.median(cpu["one-run"])
    print(f"{args.runs} runs, {args.ranks} ranks, {args.cycles} cycles each, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| variant | wall ms/cycle: median (min) | / one-run | CPU ms/cycle: median (min) | / one-run "
          "| AdamW ms/cycle: median (min) |\n|---|---|---|---|---|---|")
    for label, values in times.items():
        median, median_cpu = statistics.median(values), statistics.median(cpu[label])
        print(f"| {label} | {1000 * median:.1f} ({1000 * min(values):.1f}) | x{median / base:.2f} | "
              f"{1000 * median_cpu:.1f} ({1000 * min(cpu[label]):.1f}) | x{median_cpu / base_cpu:.2f} | "
              f"{1000 * statistics.median(adamw[label]):.1f} ({1000 * min(adamw[label]):.1f}) |")


def _run(engine: ModelEngine, group_cost_flops: float | None, flat: bool, fn: Callable[[], None]) -> None:
    with variant(engine, group_cost_flops, flat):
        fn()


if __name__ == "__main__":
    main()
