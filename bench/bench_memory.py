"""Peak memory and time of one training pass, with and without activation checkpointing.

    PYTHONPATH=src:backend python bench/bench_memory.py [--model smollm2] [--sizes 8x256 8x512 16x512]
        [--steps 2]

For each size (rows x tokens of random tokens, ``cross_entropy``, a rank-16 LoRA on every
linear layer including ``lm_head``) and each setting (``kept``: activations kept for the
backward, ``recomputed``: ``checkpoint_tokens=1``), a fresh process builds the engine, runs
``--steps`` ``forward_backward`` + ``optim_step`` and reports its peak RSS (the process's high
water mark, so the model's own memory is included) and the median seconds per step. The
processes run one after another, so each peak is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODELS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "tiny": "tiny-llama"}


def one(model: str, rows: int, tokens: int, checkpoint: bool, steps: int) -> dict[str, float]:
    """Run in a child process: peak RSS (GB) and median seconds per step."""
    from gpu_suite import batch

    from tinker.types import AdamParams, LoraConfig
    from tinker_backend.engine.model_engine import ModelEngine
    from tinker_backend.model_registry import resolve_model

    engine = ModelEngine(model, resolve_model(model), checkpoint_tokens=1 if checkpoint else None)
    engine.create_adapter("run", LoraConfig(rank=16, seed=0))
    data = batch(engine.vocab_size, rows, tokens, 0)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.forward_backward("run", data, "cross_entropy", None, backward=True)
        engine.optim_step("run", AdamParams(learning_rate=1e-4))
        seconds.append(time.perf_counter() - start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_gb": peak_kb / 1e6, "seconds": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--sizes", nargs="+", default=["8x256", "8x512", "16x512"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", nargs=4, metavar=("ROWS", "TOKENS", "CHECKPOINT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = MODELS[args.model]
    if args.child:
        rows, tokens, checkpoint, steps = (int(v) for v in args.child)
        print(json.dumps(one(model, rows, tokens, bool(checkpoint), steps)))
        return
    print(f"{model}, {os.environ.get('OMP_NUM_THREADS', 'default')} torch threads, {args.steps} steps per process")
    print("| rows x tokens | kept: peak RSS | recomputed: peak RSS | kept: s/step | recomputed: s/step | time ratio |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        rows, tokens = (int(v) for v in size.split("x"))
        got = {}
        for checkpoint in (0, 1):
            out = subprocess.run(
                [sys.executable, __file__, "--model", args.model, "--child", str(rows), str(tokens), str(checkpoint),
                 str(args.steps)],
                capture_output=True, text=True, check=False,
            )
            if out.returncode != 0:
                got[checkpoint] = None
                print(f"{size} checkpoint={checkpoint}: exit {out.returncode}: {out.stderr.strip()[-300:]}",
                      file=sys.stderr)
                continue
            got[checkpoint] = json.loads(out.stdout.strip().splitlines()[-1])
        kept, recomputed = got[0], got[1]

        def cell(result: dict[str, float] | None, key: str, unit: str) -> str:
            return "failed" if result is None else f"{result[key]:.1f} {unit}"

        ratio = f"x{recomputed['seconds'] / kept['seconds']:.2f}" if kept and recomputed else "-"
        print(f"| {size} | {cell(kept, 'peak_gb', 'GB')} | {cell(recomputed, 'peak_gb', 'GB')} | "
              f"{cell(kept, 'seconds', 's')} | {cell(recomputed, 'seconds', 's')} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
