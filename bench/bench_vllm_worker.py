"""A new adapter version on a sampler worker: vLLM against the torch sampler (``--workers local``).

For each sampler kind, one ``tinker-server --workers local`` (one trainer rank, one sampler
worker with ``sampler = "torch"`` or ``"vllm"``) and one run (LoRA rank 8, no LoRA on lm_head so
that vLLM serves it). Per version, ``--versions`` times: one training step, then

* **publish**: ``save_weights_and_get_sampling_client`` (the group writes the PEFT folder; the
  worker loads it, vLLM under a new name, id and folder, possibly after the call returned);
* **first sample**: the first request of that version (``--tokens`` greedy tokens, ``--batch``
  sequences); **publish and first**: both, the latency a new version costs its first sample;
  **next sample**: the same request again.

Prints the medians (and min-max) per kind as a table and writes them to ``--out`` as JSON. Run
it in the venv that has vllm (``nox -s vllm``'s):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=src:backend python bench/bench_vllm_worker.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import Server

import tinker
from tinker import AdamParams, Datum, ModelInput, SamplingParams


def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-vllm-worker-{kind}-") as root:
        models = Path(root) / "models.toml"
        models.write_text(f'[models."{args.model}"]\nsampler = "{kind}"\nsampler_replicas = 1\n')
        server = Server("--workers", "local", "--models", str(models), start_timeout_s=120)
        service = tinker.ServiceClient(base_url=server.base_url)
        try:
            started = time.perf_counter()
            tc = service.create_lora_training_client(args.model, rank=8, seed=0, train_unembed=False)
            tokens = tc.get_tokenizer().encode("the quick brown fox jumps over the lazy dog")
            datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                          loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
            prompt, params = ModelInput.from_ints(tokens[:4]), SamplingParams(max_tokens=args.tokens, temperature=0.0)
            tc.forward_backward([datum], "cross_entropy").result()
            tc.save_weights_and_get_sampling_client().sample(prompt, args.batch, params).result()  # warm-up
            start_s = time.perf_counter() - started
            rows: list[dict[str, float]] = []
            for _ in range(args.versions):
                tc.forward_backward([datum], "cross_entropy")
                tc.optim_step(AdamParams(learning_rate=1e-3)).result()
                t0 = time.perf_counter()
                sampler = tc.save_weights_and_get_sampling_client()
                t1 = time.perf_counter()
                sampler.sample(prompt, args.batch, params).result()
                t2 = time.perf_counter()
                sampler.sample(prompt, args.batch, params).result()
                t3 = time.perf_counter()
                rows.append({"publish_s": t1 - t0, "first_sample_s": t2 - t1, "publish_and_first_s": t2 - t0,
                             "next_sample_s": t3 - t2})
        finally:
            service.close().result(timeout=30)
            server.stop()
    summary: dict[str, Any] = {"kind": kind, "start_to_first_sample_s": start_s}
    for key in rows[0]:
        values = [row[key] for row in rows]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--kinds", default="torch,vllm", help="comma-separated sampler kinds, measured in turn")
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench_vllm_worker.json"))
    args = parser.parse_args()
    results = [measure(kind, args) for kind in args.kinds.split(",")]
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"| sampler | start to first sample s | publish s | first sample s | publish and first s | next sample s |   ({args.versions} "
          f"versions, {args.batch} x {args.tokens} greedy tokens, median (min-max))")
    for r in results:
        cells = [f"{r[k]['median']:.3f} ({r[k]['min']:.3f}-{r[k]['max']:.3f})"
                 for k in ("publish_s", "first_sample_s", "publish_and_first_s", "next_sample_s")]
        print(f"| {r['kind']} | {r['start_to_first_sample_s']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
