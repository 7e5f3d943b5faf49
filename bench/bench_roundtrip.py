"""Client round trips, embedded vs server: latency of a trivial call, pipelined throughput,
and how fast many outstanding futures complete over the one persistent connection.

    python bench/bench_roundtrip.py [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _common import Server, percentile, temp_data_dir

import tinker
from tinker import Datum, ModelInput


def trivial_latency(service: tinker.ServiceClient, calls: int) -> list[float]:
    """Sequential ``get_server_capabilities`` calls: pure protocol overhead, no compute."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        service.get_server_capabilities().result()
        times.append(time.perf_counter() - start)
    return times


def pipelined_forwards(tc: tinker.TrainingClient, calls: int) -> float:
    """Submit ``calls`` tiny ``forward`` requests before awaiting any; return requests/s."""
    datum = Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]})
    tc.forward([datum], "cross_entropy").result()
    start = time.perf_counter()
    futures = [tc.forward([datum], "cross_entropy") for _ in range(calls)]
    for f in futures:
        f.result()
    return calls / (time.perf_counter() - start)


async def outstanding_futures(service: tinker.ServiceClient, n: int) -> float:
    """``n`` concurrent trivial calls awaited together; return seconds until all completed."""
    start = time.perf_counter()
    await asyncio.gather(*(service.get_server_capabilities() for _ in range(n)))
    return time.perf_counter() - start


def measure(name: str, service: tinker.ServiceClient, calls: int) -> dict[str, float]:
    trivial_latency(service, 20)  # warm up
    lat = trivial_latency(service, calls)
    tc = service.create_lora_training_client("tiny-llama", rank=8, seed=0)
    rate = pipelined_forwards(tc, calls)
    burst = asyncio.run(outstanding_futures(service, 1000))
    row = {
        "p50_ms": 1000 * percentile(lat, 50),
        "p99_ms": 1000 * percentile(lat, 99),
        "pipelined_req_s": rate,
        "burst_1000_s": burst,
    }
    print(
        f"{name:9s} trivial call p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms | "
        f"pipelined forward {rate:7.1f} req/s | 1000 concurrent calls in {burst:5.2f} s"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    embedded = measure("embedded", tinker.ServiceClient(data_dir=temp_data_dir()), args.calls)
    with Server() as server:
        remote = measure("server", tinker.ServiceClient(base_url=server.base_url), args.calls)
    print(
        f"server / embedded: p50 x{remote['p50_ms'] / embedded['p50_ms']:.2f}, "
        f"pipelined throughput x{remote['pipelined_req_s'] / embedded['pipelined_req_s']:.2f}"
    )


if __name__ == "__main__":
    main()
