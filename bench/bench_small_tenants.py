"""Many small tenants: N runs of 2 short sequences each, merged clock cycles vs one big run.

    python bench/bench_small_tenants.py [--runs 8 32] [--ranks equal mixed rank32] [--repeat 3]
        [--transports embedded server] [--steps 24] [--no-serial] [--clock wall|process]
        [--device cpu|cuda] [--profile [--no-stages]] [--profile-only]

Each run trains 2 sequences (40 and 20 tokens) with ``--steps`` pipelined ``forward_backward``
+ ``optim_step`` (step k+1 of every run is submitted before step k is awaited). Ranks are all
8 (``equal``), 4/8/16/32 in turn (``mixed``), or all 32 (``rank32``: the work of ``mixed``
padded to its largest rank, as one rank group computes it). Three ways to do the same work, in one process,
each after one warm-up step:

  merged    the N runs at once: the scheduler's clock cycles merge them
  one-run   ONE rank-8 run training the same 2N sequences as one batch (the target)
  serial    the same N runs one at a time (each run's steps done before the next starts)

and it prints ``merged / one-run`` (lower is better; target <= 1.15 for 8 runs, <= 1.3 for 32)
and ``serial / merged`` (the speed-up of merging; target >= 1.5). ``--repeat K`` measures the
three modes K times in turn with the same clients (merged, one-run, serial, merged, ...), so
that load from other processes hits all of them, and prints the median ratio with its min and
max over the K repeats; the ms/step columns are medians. ``--no-serial`` leaves the (slow)
serial mode out. ``--clock process`` (embedded only) times each mode by the CPU time of this
process instead of the wall clock: with one torch thread (``OMP_NUM_THREADS=1``) that is the
work done, which other processes on a shared machine inflate much less than the wall time.
``embedded`` is the in-process backend, ``server`` a ``tinker-server`` on loopback.

``--profile`` adds two profiles. First, for each transport, the CPU time per step of each
group of threads (the backend's compute thread, the event loop, the benchmark's own thread,
other Python threads, native threads such as torch's workers), merged vs one-run, medians over
``--repeat`` (``_thread_cpu.py``: ``/proc`` schedstat, so other processes' load inflates it much
less than the wall clock); through a server, of the server process, plus the client process
as a whole. Second (embedded only; ``--no-stages`` skips it), where a merged cycle's wall time
goes, per stage, in ms per cycle, timed with ``perf_counter`` around the stages in this
process (on CUDA each timed stage ends with a ``synchronize``). The backend's compute thread
runs alongside the client's loop, so stages need not add up to the wall time.

``--device cuda`` runs the backend (embedded or server) on the GPU, ``--device cpu`` hides any
GPU (``CUDA_VISIBLE_DEVICES=``); the default uses what the backend picks.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import _thread_cpu
from _common import Server, temp_data_dir

if TYPE_CHECKING:
    import tinker

LENGTHS = (40, 20)  # tokens of each run's two sequences
MIXED_RANKS = (4, 8, 16, 32)
ONE_RUN_RANK = 8
VOCAB = 2048  # tiny-llama's
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
clock = time.perf_counter  # what ``pipelined`` times with (``--clock``)


def batch(seed: int) -> list[Any]:
    from tinker import Datum, ModelInput

    rng = random.Random(seed)
    data = []
    for length in LENGTHS:
        tokens = [rng.randrange(3, VOCAB) for _ in range(length + 1)]
        data.append(Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                          loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length}))
    return data


def pipelined(clients: list[tinker.TrainingClient], batches: list[list[Any]], steps: int) -> float:
    """``steps`` fb + optim of every client, step k+1 submitted before step k is awaited."""
    from tinker import AdamParams

    adam = AdamParams(learning_rate=1e-4)
    start = clock()
    previous: list[Any] = []
    for _ in range(steps):
        current = [f for tc, b in zip(clients, batches, strict=True)
                   for f in (tc.forward_backward(b, "cross_entropy"), tc.optim_step(adam))]
        for f in previous:
            f.result()
        previous = current
    for f in previous:
        f.result()
    return clock() - start


def serial(clients: list[tinker.TrainingClient], batches: list[list[Any]], steps: int) -> float:
    return sum(pipelined([tc], [b], steps) for tc, b in zip(clients, batches, strict=True))


def ranks_of(kind: str, runs: int) -> list[int]:
    if kind == "rank32":
        return [32] * runs
    return [8] * runs if kind == "equal" else [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(runs)]


def measure(
    service: tinker.ServiceClient, model: str, runs: int, kind: str, steps: int, repeat: int, with_serial: bool
) -> dict[str, list[float]]:
    """Seconds of each mode, ``repeat`` times, the modes taking turns."""
    ranks = ranks_of(kind, runs)
    clients = [service.create_lora_training_client(model, rank=r, seed=i) for i, r in enumerate(ranks)]
    batches = [batch(i) for i in range(runs)]
    big = service.create_lora_training_client(model, rank=ONE_RUN_RANK, seed=1000)
    big_batch = [d for b in batches for d in b]
    modes: dict[str, Callable[[int], float]] = {
        "merged": lambda n: pipelined(clients, batches, n),
        "one": lambda n: pipelined([big], [big_batch], n),
    }
    if with_serial:
        modes["serial"] = lambda n: serial(clients, batches, n)
    for run in modes.values():  # warm up
        run(1)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(repeat):
        for mode, run in modes.items():
            times[mode].append(run(steps))
    return times


def _spread(values: list[float]) -> str:
    """``xMEDIAN`` and, over several values, ``(min-max)``."""
    text = f"**x{statistics.median(values):.2f}**"
    return text if len(values) == 1 else f"{text} ({min(values):.2f}-{max(values):.2f})"


def report(transport: str, runs: int, kind: str, steps: int, t: dict[str, list[float]]) -> str:
    """One table row: median ms/step of each mode, then the ratios (median, min-max) per repeat."""
    tokens = steps * runs * sum(LENGTHS)
    ms = {mode: f"{1000 * statistics.median(v) / steps:.1f}" for mode, v in t.items()}
    merged_over_one = [m / o for m, o in zip(t["merged"], t["one"], strict=True)]
    serial_over_merged = [s / m for s, m in zip(t.get("serial", []), t["merged"], strict=False)]
    row = (
        f"| {transport} | {runs} | {kind} | {ms['merged']} | {ms['one']} | {ms.get('serial', '-')} | "
        f"{tokens / statistics.median(t['merged']):.0f} | {_spread(merged_over_one)} | "
        f"{_spread(serial_over_merged) if serial_over_merged else '-'} |"
    )
    print(row, flush=True)
    return row


# -- profile ---------------------------------------------------------------------------------


class Stages:
    """Accumulated seconds per stage, from wrappers installed with ``patch``."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync
        self._active: set[str] = set()
        self.order: list[str] = []  # stages in the order they were wrapped

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        if stage in self._active:  # re-entrant call (e.g. the model's own forward): count once
            yield
            return
        self._active.add(stage)
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[stage] += time.perf_counter() - start
            self._active.discard(stage)

    def wrap(self, owner: Any, name: str, stage: str) -> Callable[[], None]:
        """Time every call of ``owner.name`` as ``stage``; returns the undo (a no-op if absent)."""
        original = getattr(owner, name, None)
        if original is None:
            return lambda: None
        if stage not in self.order:
            self.order.append(stage)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.timed(stage):
                return original(*args, **kwargs)

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


class _TimedCodec:
    """A stand-in for a msgspec encoder or decoder that times each call."""

    def __init__(self, inner: Any, stages: Stages, stage: str) -> None:
        self._inner, self._stages, self._stage = inner, stages, stage

    def encode(self, obj: Any) -> bytes:
        with self._stages.timed(self._stage):
            return self._inner.encode(obj)  # type: ignore[no-any-return]

    def decode(self, data: bytes) -> Any:
        with self._stages.timed(self._stage):
            return self._inner.decode(data)


def profile(model: str, runs: int, kind: str, steps: int) -> None:
    """Stage times of merged cycles of ``runs`` embedded runs, ms per cycle."""
    import torch

    import tinker
    from tinker import wire
    from tinker._transport import EmbeddedTransport
    from tinker_backend import scheduler
    from tinker_backend.engine import lora, model_engine, trainer

    service = tinker.ServiceClient(data_dir=temp_data_dir())
    ranks = ranks_of(kind, runs)
    clients = [service.create_lora_training_client(model, rank=r, seed=i) for i, r in enumerate(ranks)]
    batches = [batch(i) for i in range(runs)]
    pipelined(clients, batches, 2)  # warm up
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    stages = Stages(sync)
    undo = [
        stages.wrap(scheduler.ModelScheduler, "_collect", "scheduler: collect"),
        stages.wrap(scheduler, "_run_cycle", "compute thread: whole cycle"),
        stages.wrap(model_engine.ModelEngine, "forward_backward_many", "engine: forward_backward_many"),
        stages.wrap(model_engine, "prepare_item", "  prepare items (validate, to tensors)"),
        stages.wrap(trainer, "_layout", "  batch assembly: layout"),
        stages.wrap(trainer, "_right_padded", "  batch assembly: padding"),
        stages.wrap(lora.LoraRouting, "set", "  LoRA routing: set"),
        stages.wrap(lora.LoraRouting, "_make_plan", "  LoRA routing: plans"),
        stages.wrap(lora.LoraLinear, "_batched", "  forward: LoRA deltas (in forward)"),
        stages.wrap(lora.LoraLinear, "_looped", "  forward: LoRA deltas (in forward)"),
        stages.wrap(trainer, "_target_logprobs", "  loss: target logprobs"),
        stages.wrap(trainer, "_item_loss", "  loss: per-item losses"),
        stages.wrap(torch.Tensor, "backward", "  backward"),
        stages.wrap(trainer.TensorData, "from_torch", "  results: logprobs to TensorData"),
        stages.wrap(model_engine.ModelEngine, "optim_step", "engine: optim_step (all runs)"),
        stages.wrap(model_engine, "adamw_steps", "engine: joint AdamW update (after the change)"),
        stages.wrap(wire, "decode_response", "client: decode responses"),
    ]
    # The model's forward, found through the embedded backend's loaded engine.
    handler = list(EmbeddedTransport._shared.values())[-1].backend
    for eng in [s._engine.result() for s in handler.engines._schedulers.values() if s._engine is not None]:
        undo.append(stages.wrap(eng.model, "forward", "  forward: model (base + LoRA)"))
    encoder, request_decoder = wire.encoder, wire.request_decoder
    wire.encoder = _TimedCodec(encoder, stages, "client+server: msgpack encode")  # type: ignore[assignment]
    wire.request_decoder = _TimedCodec(request_decoder, stages, "server: decode requests")  # type: ignore[assignment]
    try:
        wall = pipelined(clients, batches, steps)
    finally:
        wire.encoder, wire.request_decoder = encoder, request_decoder
        for u in reversed(undo):
            u()
    print(f"\nprofile: {runs} runs, {kind} ranks, {steps} merged cycles, wall {1000 * wall / steps:.1f} ms per cycle")
    print("| stage | ms per cycle |\n|---|---|")
    for stage in [*stages.order, *(s for s in stages.seconds if s not in stages.order)]:
        print(f"| {stage} | {1000 * stages.seconds[stage] / steps:.2f} |")
    compute = stages.seconds.get("compute thread: whole cycle", 0.0)
    print(f"| (wall - compute thread: client, transport, event loop, thread hand-off) | {1000 * (wall - compute) / steps:.2f} |")


# -- CPU time per thread ---------------------------------------------------------------------


def thread_profile(
    service: tinker.ServiceClient, server: Server | None, model: str, runs: int, kind: str, steps: int, repeat: int
) -> dict[str, list[dict[str, float]]]:
    """CPU ms per step of each thread group, merged vs one-run, ``repeat`` times in turn.

    Embedded: the groups of this process. Server: those of the server process, and this
    (client) process as a whole under ``client process (all threads)``.
    """
    import threading

    ranks = ranks_of(kind, runs)
    clients = [service.create_lora_training_client(model, rank=r, seed=i) for i, r in enumerate(ranks)]
    batches = [batch(i) for i in range(runs)]
    big = service.create_lora_training_client(model, rank=ONE_RUN_RANK, seed=1000)
    modes: dict[str, Callable[[int], float]] = {
        "merged": lambda n: pipelined(clients, batches, n),
        "one": lambda n: pipelined([big], [[d for b in batches for d in b]], n),
    }
    pid = os.getpid() if server is None else server.proc.pid
    out: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for run in modes.values():  # warm up
        run(1)
    for _ in range(repeat):
        for mode, run in modes.items():
            before, client_before = _thread_cpu.thread_cpu_ns(pid), time.process_time()
            wall = time.perf_counter()
            run(steps)
            wall = time.perf_counter() - wall
            after, client_cpu = _thread_cpu.thread_cpu_ns(pid), time.process_time() - client_before
            if server is None:
                names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
            else:
                names = {tid: "server:MainThread" if name == "MainThread" else name
                         for tid, name in server.thread_names().items()}
            row = _thread_cpu.grouped_ms(before, after, names, steps)
            row["total (this process)" if server is None else "total (server process)"] = sum(row.values())
            if server is not None:
                row["client process (all threads)"] = 1000 * client_cpu / steps
            row["wall"] = 1000 * wall / steps
            out[mode].append(row)
    return out


def report_threads(transport: str, runs: int, kind: str, t: dict[str, list[dict[str, float]]]) -> None:
    """One table row per mode: median CPU ms per step of each thread group, and the wall time."""
    groups = [g for g in t["merged"][0] if g != "wall"]
    print(f"\nCPU ms per step by thread ({transport}, {runs} runs, {kind} ranks; medians of {len(t['merged'])}; "
          f"load average {os.getloadavg()[0]:.2f})")
    print(f"| mode | wall ms/step | {' | '.join(groups)} |\n|---|---|{'---|' * len(groups)}")
    for mode, rows in t.items():
        cells = [f"{statistics.median(r[g] for r in rows):.1f}" for g in groups]
        print(f"| {mode} | {statistics.median(r['wall'] for r in rows):.1f} | {' | '.join(cells)} |", flush=True)


def threads(args: argparse.Namespace) -> None:
    """``--profile``'s CPU time per thread group, for each transport, run count and ranks."""
    import tinker

    for transport in args.transports:
        for runs in args.runs:
            for kind in args.ranks:
                if transport == "embedded":
                    service = tinker.ServiceClient(data_dir=temp_data_dir())
                    t = thread_profile(service, None, args.model, runs, kind, args.steps, args.repeat)
                else:
                    with Server(named_threads=True) as server:
                        service = tinker.ServiceClient(base_url=server.base_url)
                        t = thread_profile(service, server, args.model, runs, kind, args.steps, args.repeat)
                        service.close().result()
                report_threads(transport, runs, kind, t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--runs", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--ranks", nargs="+", choices=["equal", "mixed", "rank32"], default=["equal", "mixed"])
    parser.add_argument("--transports", nargs="+", choices=["embedded", "server"], default=["embedded", "server"])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3, help="measure each mode this many times, in turn")
    parser.add_argument("--serial", action=argparse.BooleanOptionalAction, default=True,
                        help="also the runs one at a time (slow)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall clock, or this process's CPU time (embedded only)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--profile", action="store_true", help="also the per-stage profile (embedded)")
    parser.add_argument("--profile-only", action="store_true", help="only the profiles")
    parser.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True,
                        help="with --profile: also the per-stage wall times (embedded)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat: expected >= 1, got {args.repeat}")
    if args.clock == "process" and args.transports != ["embedded"]:
        parser.error("--clock process: expected --transports embedded (a server computes in another process)")
    global clock
    clock = CLOCKS[args.clock]
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported, here and in a server
    import torch

    import tinker

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{args.model} on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}, {args.steps} steps, sequences of {LENGTHS} tokens per run, "
          f"{args.clock} clock")
    if not args.profile_only:
        print("| transport | runs | ranks | merged ms/step | one-run ms/step | serial ms/step | merged tok/s "
              "| merged / one-run | serial / merged |\n|---|---|---|---|---|---|---|---|---|")
        for transport in args.transports:
            for runs in args.runs:
                for kind in args.ranks:
                    if transport == "embedded":
                        service = tinker.ServiceClient(data_dir=temp_data_dir())
                        t = measure(service, args.model, runs, kind, args.steps, args.repeat, args.serial)
                    else:
                        with Server() as server:
                            service = tinker.ServiceClient(base_url=server.base_url)
                            t = measure(service, args.model, runs, kind, args.steps, args.repeat, args.serial)
                            service.close().result()
                    report(transport, runs, kind, args.steps, t)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.profile or args.profile_only:
        threads(args)
    if (args.profile or args.profile_only) and args.stages and "embedded" in args.transports:
        for runs in args.runs:
            for kind in args.ranks:
                profile(args.model, runs, kind, args.steps)


if __name__ == "__main__":
    main()
