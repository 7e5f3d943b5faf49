"""Our client (native WebSocket protocol) against the official tinker SDK (HTTP protocol),
on the same ``tinker-server`` and the same workloads:

* train: 200 forward_backward + optim_step pairs on ``tiny-llama`` (4 datums of 32 tokens),
  pipelined one step ahead as the cookbook does; latency is submit -> optim_step done;
* sample: 500 small sample requests (8-token prompt, 8 new tokens) from 32 concurrent tasks.

Both clients run the very same workload code below (the APIs match), each in its own process
with its own interpreter, since both packages are named ``tinker``:

    /work/venv/bin/python bench/bench_sdk.py --sdk-python .nox/compat/bin/python

This interpreter runs the server and our client; ``--sdk-python`` is a venv with the official
SDK (``nox -s compat`` builds one). ``--rounds 2`` alternates the clients twice, to even out a
busy machine. Prints throughput, p50 / p99 latency and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
TRAIN_STEPS = 200
SAMPLE_REQUESTS = 500
SAMPLE_CONCURRENCY = 32


# --- the workloads (run in a worker process, with either client) -----------------------------


async def train_workload(tinker, types) -> list[float]:
    tc = await tinker.ServiceClient().create_lora_training_client(MODEL, rank=8, seed=0)
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(list(range(1 + i, 33 + i))),
            loss_fn_inputs={"target_tokens": list(range(2 + i, 34 + i)), "weights": [1.0] * 32},
        )
        for i in range(4)
    ]
    params = types.AdamParams(learning_rate=1e-4)
    await tc.forward_backward(data, "cross_entropy")  # warm-up
    latencies: list[float] = []
    inflight: collections.deque = collections.deque()

    async def finish() -> None:
        submitted, fb, step = inflight.popleft()
        await fb
        await step
        latencies.append(time.perf_counter() - submitted)

    for _ in range(TRAIN_STEPS):
        inflight.append(
            (time.perf_counter(), tc.forward_backward(data, "cross_entropy"), tc.optim_step(params))
        )
        if len(inflight) == 2:  # one step submitted ahead of the one being awaited
            await finish()
    while inflight:
        await finish()
    return latencies


async def sample_workload(tinker, types) -> list[float]:
    sampler = await tinker.ServiceClient().create_sampling_client(base_model=MODEL)
    params = types.SamplingParams(max_tokens=8, temperature=1.0, stop=[])
    await sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 1, params)  # warm-up
    latencies: list[float] = []
    requests = iter(range(SAMPLE_REQUESTS))  # shared: each request is taken by one task

    async def task() -> None:
        for i in requests:
            prompt = types.ModelInput.from_ints([1 + (i + j) % 1000 for j in range(8)])
            started = time.perf_counter()
            await sampler.sample(prompt, 1, params)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*[task() for _ in range(SAMPLE_CONCURRENCY)])
    return latencies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_workloads(server_pid: int) -> dict[str, dict[str, float]]:
    """Each workload's throughput and latency, and the CPU time it cost this client and the server."""
    import tinker
    from tinker import types

    results = {}
    workloads = (("train", train_workload, TRAIN_STEPS), ("sample", sample_workload, SAMPLE_REQUESTS))
    for name, workload, n in workloads:
        started, client_cpu, server_cpu = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
        latencies = sorted(await workload(tinker, types))
        elapsed = time.perf_counter() - started
        results[name] = {
            "per_s": n / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "client_cpu_ms": 1000 * (time.process_time() - client_cpu) / n,
            "server_cpu_ms": 1000 * (cpu_seconds(server_pid) - server_cpu) / n,
        }
    return results


# --- the driver --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(base_url: str, ours: bool, server_pid: int | None = None) -> dict[str, str]:
    env = {**os.environ, "TINKER_BASE_URL": base_url, "TINKER_API_KEY": "tml-bench"}
    if server_pid is not None:
        env["BENCH_SERVER_PID"] = str(server_pid)
    if ours:  # our packages first on the path, whatever else the interpreter has
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "backend")])
    return env


def _run_client(python: str, base_url: str, ours: bool, server_pid: int) -> dict[str, dict[str, float]]:
    env = _env(base_url, ours, server_pid)
    done = subprocess.run(
        [python, __file__, "--worker"], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{python} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sdk_python = str(REPO / ".nox/compat/bin/python")
    parser.add_argument("--sdk-python", default=sdk_python, help="python with the official SDK")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two clients this many times")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(run_workloads(int(os.environ["BENCH_SERVER_PID"])))))
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the server is stopped too
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data_dir:
        command = [sys.executable, "-m", "tinker_backend.cli", "--port", str(port), "--data-dir", data_dir]
        server = subprocess.Popen(command, env=_env(base_url, ours=True), stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(f"{base_url}/api/v1/healthz", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("tinker-server did not start") from None
                    time.sleep(0.1)
            runs: dict[str, list[dict[str, dict[str, float]]]] = {"ours": [], "sdk": []}
            for round_ in range(1, args.rounds + 1):
                for client, python in (("ours", sys.executable), ("sdk", args.sdk_python)):
                    runs[client].append(_run_client(python, base_url, client == "ours", server.pid))
                    print(f"round {round_}, {client}: {json.dumps(runs[client][-1])}", flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    report(runs)


def report(runs: dict[str, list[dict[str, dict[str, float]]]]) -> None:
    """Per workload and client: the median over rounds of each figure, then the ratios."""
    keys = ("per_s", "p50_ms", "p99_ms", "client_cpu_ms", "server_cpu_ms")
    header = ("workload", "client", "per s", "p50 ms", "p99 ms", "client CPU ms/op", "server CPU ms/op")
    print("{:<8} {:<13} {:>7} {:>8} {:>8} {:>17} {:>17}".format(*header))
    for workload in ("train", "sample"):
        figures = {
            client: {key: statistics.median(r[workload][key] for r in results) for key in keys}
            for client, results in runs.items()
        }
        for client, label in (("ours", "ours (native)"), ("sdk", "official SDK")):
            f = [figures[client][key] for key in keys]
            print("{:<8} {:<13} {:>7.1f} {:>8.0f} {:>8.0f} {:>17.1f} {:>17.1f}".format(workload, label, *f))
        ours, sdk = figures["ours"], figures["sdk"]
        ratios = [ours["per_s"] / sdk["per_s"]] + [sdk[key] / ours[key] for key in keys[1:]]
        print(
            "{:<8} {:<13} {:>6.2f}x {:>7.2f}x {:>7.2f}x {:>16.2f}x {:>16.2f}x".format(
                workload, "ratio", *ratios
            )
        )
    print("ratio: ours / sdk for throughput, sdk / ours for latency and CPU (above 1 favours ours)")


if __name__ == "__main__":
    main()
