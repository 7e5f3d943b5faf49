"""The cookbook's async RL loop against ``--workers inprocess`` and ``--workers local``: does
sampling overlap training when the sampler runs in its own worker process?

Workload: ``tinker_cookbook.rl.train`` in async mode (``max_steps_off_policy=1``) on the
arithmetic environment (``MathDatasetBuilder("arithmetic")``), seed 0, ``--steps`` steps of
``--batch`` groups of ``--group`` samples, ``--max-tokens`` new tokens each. Each placement gets
its own ``tinker-server`` subprocess (``local``: one trainer rank and one sampler worker).
Every group is trained on (``remove_constant_reward_groups=False``): the tiny model's rewards
are mostly constant, and this measures where the compute runs, not learning.

Reported per placement (after a one-step warm-up run that loads the model and the workers):
wall time per step (median and mean over the steps after the first), the loop's own ``time/train`` and ``time/wait_for_groups``
means, and the **overlap**: with ``local``, the share of the time the trainer rank was computing
during which the sampler worker computed too. Both are read every 50 ms from ``/proc``: a
process computes in a tick where one of its threads is running or waiting for a core (state R),
which does not depend on how many cores other programs leave it.
With ``inprocess`` one compute thread runs both training and sampling, so their overlap is 0
by construction and not measured.

    PYTHONPATH=src:backend python bench/bench_async_rl_overlap.py            # tiny-llama, 10 steps
    PYTHONPATH=src:backend python bench/bench_async_rl_overlap.py --model HuggingFaceTB/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import Server

from tinker_cookbook.recipes.math_rl.envs import MathDatasetBuilder
from tinker_cookbook.rl import train

TICK_S = 0.05


def running(pid: int) -> bool:
    """Whether a thread of the process is running or waiting for a core (state R in /proc)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R":
                return True
        except OSError:
            continue
    return False


class BusyProbe:
    """Samples, every ``TICK_S`` in a thread, whether the trainer's and the sampler's processes
    are computing."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.ticks: list[dict[str, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            self.ticks.append({name: any(running(p) for p in pids) for name, pids in self.groups.items()})

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        trainer = sum(t["trainer"] for t in self.ticks)
        sampler = sum(t["sampler"] for t in self.ticks)
        both = sum(t["trainer"] and t["sampler"] for t in self.ticks)
        return {"trainer_busy_s": trainer * TICK_S, "sampler_busy_s": sampler * TICK_S, "both_busy_s": both * TICK_S,
                "overlap_of_training": both / trainer if trainer else 0.0}


def config(args: argparse.Namespace, base_url: str, log_path: Path) -> train.Config:
    return train.Config(
        log_path=str(log_path), model_name=args.model, base_url=base_url, seed=0,
        dataset_builder=MathDatasetBuilder("arithmetic", args.batch, args.group, n_batches=args.steps),
        learning_rate=4e-4, max_tokens=args.max_tokens, lora_rank=16, max_steps=args.steps, save_every=0,
        eval_every=0, remove_constant_reward_groups=False, async_config=train.AsyncConfig(max_steps_off_policy=1),
    )


def run(args: argparse.Namespace, placement: str, root: Path) -> dict[str, Any]:
    flags = ["--workers", placement]
    if placement != "inprocess":
        models = root / "models.toml"
        models.write_text(f'[models."{args.model}"]\ntrainer_ranks = 1\nsampler_replicas = 1\n')
        flags += ["--models", str(models)]
    server = Server(*flags, start_timeout_s=120)
    probe: BusyProbe | None = None
    try:
        # One step first: the model (and the workers) load on first use, outside the measurement.
        asyncio.run(train.main(dataclasses.replace(config(args, server.base_url, root / "warm"), max_steps=1)))
        if placement != "inprocess":
            workers = server.healthz()["workers"][args.model]
            probe = BusyProbe({"trainer": workers["pids"], "sampler": [s["pid"] for s in workers["samplers"]]})
        started = time.perf_counter()
        asyncio.run(train.main(config(args, server.base_url, root / "log")))
        wall = time.perf_counter() - started
    finally:
        overlap = probe.stop() if probe is not None else {}
        server.stop()
    rows = [json.loads(line) for line in (root / "log" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "time/step" in row]
    later = [row["time/step"] for row in steps[1:]]
    return {
        "placement": placement, "steps": len(steps), "wall_s": wall,
        "step_s_median": statistics.median(later), "step_s_mean": statistics.mean(later),
        "train_s_mean": statistics.mean(row["time/train"] for row in steps[1:]),
        "wait_for_groups_s_mean": statistics.mean(row["time/wait_for_groups"] for row in steps[1:]),
        "reward_last": steps[-1].get("reward/total"), **overlap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--placements", default="inprocess,local")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    results = []
    for placement in args.placements.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-overlap-{placement}-") as root:
            results.append(run(args, placement, Path(root)))
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{args.model}, {args.steps} async steps of {args.batch}x{args.group} samples, {args.max_tokens} tokens")
    print(f"{'placement':<10} {'step s (median)':>16} {'step s (mean)':>14} {'train s':>8} {'wait s':>8} "
          f"{'overlap':>8} {'wall s':>7}")
    for r in results:
        overlap = f"{r['overlap_of_training']:.0%}" if "overlap_of_training" in r else "0 (1 thread)"
        print(f"{r['placement']:<10} {r['step_s_median']:>16.2f} {r['step_s_mean']:>14.2f} {r['train_s_mean']:>8.2f} "
              f"{r['wait_for_groups_s_mean']:>8.2f} {overlap:>8} {r['wall_s']:>7.1f}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
