"""Load: many concurrent clients mixing training and sampling against one ``tinker-server``.

    python bench/bench_load.py [--clients 32] [--seconds 60] [--keys 4] [--max-pending-per-key 8]

Half the clients train (pipelined forward_backward + optim_step; every 8 steps a sampler of
their weights and one sample from it), half sample (the base model, or the last sampler a
trainer made). Clients share ``--keys`` API keys, and the per-key ``--max-pending-per-key`` is
small on purpose, so that back-pressure engages: the server answers 429 and the clients wait
and send again. Reported: errors (must be 0), 429s waited out, latency percentiles per
operation, and the server's memory (RSS) after warm-up, every 10 s, and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from _common import percentile

import tinker
from tinker import AdamParams, Datum, ModelInput, SamplingParams

TINY = "tiny-llama"


class CountRetries(logging.Handler):
    """Counts the client's "rate limited ... sending again" lines: each is one 429 waited out."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("rate limited"):
            self.count += 1


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(data_dir: Path, keys: list[str], max_pending: int) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys_file = data_dir / "keys"
    keys_file.write_text("".join(f"{key} tenant{i}\n" for i, key in enumerate(keys)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinker_backend.cli", "--port", str(port), "--data-dir", str(data_dir / "data"),
         "--keys-file", str(keys_file), "--max-pending-per-key", str(max_pending), "--log-level", "warning"],
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base_url}/api/v1/healthz", timeout=1).close()
            return proc, base_url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("tinker-server did not start")


def data(rng: random.Random, rows: int = 2, length: int = 64) -> list[Datum]:
    out = []
    for _ in range(rows):
        tokens = [rng.randrange(3, 2000) for _ in range(length + 1)]
        out.append(Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                         loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length}))
    return out


class Load:
    def __init__(self, base_url: str, keys: list[str], seconds: float) -> None:
        self.base_url, self.keys, self.seconds = base_url, keys, seconds
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.samplers: list[tinker.SamplingClient] = []

    async def timed(self, kind: str, future: object) -> object:
        started = time.perf_counter()
        try:
            result = await future  # type: ignore[misc]
        except Exception as e:
            self.errors.append(f"{kind}: {type(e).__name__}: {e}")
            return None
        self.latencies[kind].append(time.perf_counter() - started)
        return result

    async def trainer(self, i: int, until: float) -> None:
        rng = random.Random(i)
        service = tinker.ServiceClient(base_url=self.base_url, api_key=self.keys[i % len(self.keys)])
        tc = await self.timed("create_run", service.create_lora_training_client(TINY, rank=8, seed=i))
        steps = 0
        while tc is not None and time.monotonic() < until:
            fb = tc.forward_backward(data(rng), "cross_entropy")
            op = tc.optim_step(AdamParams(learning_rate=1e-3))
            await self.timed("forward_backward", fb)
            await self.timed("optim_step", op)
            steps += 1
            if steps % 8 == 0:
                sampler = await self.timed("save_for_sampler", tc.save_weights_and_get_sampling_client())
                if sampler is not None:
                    self.samplers.append(sampler)  # type: ignore[arg-type]
                    await self.timed("sample", sampler.sample(ModelInput.from_ints([1, 2, 3]), 2, SamplingParams(max_tokens=16)))  # type: ignore[attr-defined]
        await service.close()

    async def sampler(self, i: int, until: float) -> None:
        rng = random.Random(i)
        service = tinker.ServiceClient(base_url=self.base_url, api_key=self.keys[i % len(self.keys)])
        base = service.create_sampling_client(base_model=TINY)
        while time.monotonic() < until:
            client = rng.choice(self.samplers[-8:]) if self.samplers and rng.random() < 0.5 else base
            prompt = ModelInput.from_ints([rng.randrange(3, 2000) for _ in range(rng.randrange(4, 64))])
            await self.timed("sample", client.sample(prompt, 2, SamplingParams(max_tokens=24, temperature=1.0)))
        await service.close()

    async def run(self, clients: int) -> None:
        until = time.monotonic() + self.seconds
        tasks = [self.trainer(i, until) if i % 2 == 0 else self.sampler(i, until) for i in range(clients)]
        await asyncio.gather(*tasks)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--keys", type=int, default=4, help="API keys the clients share (tenants)")
    parser.add_argument("--max-pending-per-key", type=int, default=8)
    args = parser.parse_args()

    retries = CountRetries()
    logging.getLogger("tinker").addHandler(retries)
    logging.getLogger("tinker").setLevel(logging.INFO)
    keys = [f"tml-bench-{i}-{'k' * 24}" for i in range(args.keys)]
    with tempfile.TemporaryDirectory() as tmp:
        proc, base_url = start_server(Path(tmp), keys, args.max_pending_per_key)
        try:
            warm = tinker.ServiceClient(base_url=base_url, api_key=keys[0])  # loads the engine
            await warm.create_sampling_client(base_model=TINY).sample(ModelInput.from_ints([1]), 1, SamplingParams(max_tokens=1))
            await warm.close()
            memory = [("after warm-up", rss_mib(proc.pid))]
            load = Load(base_url, keys, args.seconds)
            started = time.monotonic()
            run = asyncio.create_task(load.run(args.clients))
            while not run.done():
                await asyncio.wait([run], timeout=10)
                memory.append((f"t={time.monotonic() - started:.0f}s", rss_mib(proc.pid)))
            await run
            elapsed = time.monotonic() - started
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    print(f"{args.clients} clients ({args.clients // 2} training, {args.clients - args.clients // 2} sampling), "
          f"{args.keys} keys, max {args.max_pending_per_key} pending per key, {elapsed:.0f} s")
    print(f"errors: {len(load.errors)}   429s waited out: {retries.count}")
    for error in load.errors[:10]:
        print("  ", error)
    print(f"{'operation':<18}{'count':>7}{'p50 s':>9}{'p90 s':>9}{'p99 s':>9}{'max s':>9}")
    for kind, values in sorted(load.latencies.items()):
        print(f"{kind:<18}{len(values):>7}{percentile(values, 50):>9.3f}{percentile(values, 90):>9.3f}"
              f"{percentile(values, 99):>9.3f}{max(values):>9.3f}")
    print("server RSS (MiB): " + ", ".join(f"{label} {value:.0f}" for label, value in memory))
    summary = {
        "clients": args.clients, "seconds": round(elapsed, 1), "errors": len(load.errors), "retried_429": retries.count,
        "p99_s": {k: round(percentile(v, 99), 3) for k, v in load.latencies.items()},
        "ops": {k: len(v) for k, v in load.latencies.items()},
        "rss_mib": {label: round(value) for label, value in memory},
    }
    print(json.dumps(summary))
    sys.exit(1 if load.errors else 0)


if __name__ == "__main__":
    asyncio.run(main())
