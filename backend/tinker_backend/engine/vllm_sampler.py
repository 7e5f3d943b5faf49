"""The vLLM sampler: vLLM's async engine with multi-LoRA, behind the ``Sampler`` interface.

vLLM keeps its own copy of the base weights (read from the model's Hugging Face folder) and
reads adapters from PEFT directories. Publishing a sampler (``add_adapter``) writes the frozen
adapter to its own directory under ``directory`` and gives it a fresh integer id from a counter
owned here, so ids are unique by construction and never reused: a new snapshot can never be
served from an older one's cached weights or prefix-cache blocks (vLLM keys both by the id),
and no prefix-cache reset is needed. The directory lives as long as the sampler, so when vLLM's
LRU (``max_loras`` adapters in the batch slots, ``max_cpu_loras`` in host memory) has evicted
an adapter, the next request carrying it reloads it from disk: a live sampler is never "not
found".

The engine runs on a private event loop in a daemon thread (``submit`` is thread-safe). Its
engine core runs in a child process started with ``spawn``, so a program that embeds the
backend with this sampler needs an ``if __name__ == "__main__":`` guard.

vLLM wraps every linear layer except ``lm_head``: vLLM 0.32's CPU LoRA kernels index the
lm_head delta per sequence, which breaks prompt logprobs (it kills the engine core for every
user), and dropping the delta would silently sample from a different model than the one
trained. ``unsupported`` says so for an adapter with a LoRA on ``lm_head``
(``train_unembed=True``), and ``RoutedSampler`` serves such adapters with the torch sampler.

Settings (environment, read once at start): ``TINKER_VLLM_MAX_LORAS`` (8),
``TINKER_VLLM_MAX_CPU_LORAS`` (32), ``TINKER_VLLM_MAX_NUM_SEQS`` (64),
``TINKER_VLLM_GPU_MEMORY_UTILIZATION`` (0.4: the trainer shares the GPU) and, on CPU,
vLLM's own ``VLLM_CPU_KVCACHE_SPACE`` (GiB, default 2 here).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch

from tinker.types import SampledSequence, SampleResponse

from ..checkpoints import AdapterCheckpoint, write_checkpoint
from .torch_sampler import SampleRequest

__all__ = ["VllmSampler"]

logger = logging.getLogger("tinker_backend.sampler")

T = TypeVar("T")

# The ranks vLLM can size its LoRA buffers for (vllm.config.lora.MaxLoRARanks).
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}: expected a number, got {value!r}") from None


def _prepare_environment() -> None:
    """vLLM reads these at import time; each keeps a value the user already set."""
    # In-process executor inside the engine core process: one child process instead of two.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's default is far larger
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the server logs its own lines
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local folders: never ask the Hub


class VllmSampler:
    """vLLM's ``AsyncLLM`` with ``enable_lora`` (implements ``Sampler``).

    ``model_path`` is the base model's Hugging Face folder; ``target_modules`` the leaf names
    of the linear layers vLLM may apply LoRA to; ``unembed_paths`` the module paths of the
    output embedding (which it cannot serve, see the module docstring).
    """

    def __init__(
        self,
        model_path: Path,
        dtype: torch.dtype,
        max_lora_rank: int,
        target_modules: list[str],
        unembed_paths: list[str],
        directory: Path | None = None,
    ) -> None:
        _prepare_environment()
        self.max_lora_rank = max_lora_rank
        self._target_modules = target_modules
        self._unembed_paths = set(unembed_paths)
        # Adapters do not outlive the process (nor do the samplers that use them), so the
        # directory is emptied at start and removed at close.
        if directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="tinker-vllm-adapters-"))
        else:
            self._directory = Path(directory)
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory.mkdir(parents=True)
        self._ids = itertools.count(1)
        self._adapters: dict[str, Any] = {}  # sampler_id -> vllm LoRARequest
        self._in_flight: collections.Counter[int] = collections.Counter()  # lora id -> requests (loop thread)
        self._idle = asyncio.Condition()  # notified when a request ends (loop thread)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-sampler", daemon=True)
        self._thread.start()
        self._engine: Any = None
        try:
            self._engine = self._call(self._start(model_path, dtype))
        except BaseException:
            self._stop_loop()
            raise
        atexit.register(self.close)

    async def _start(self, model_path: Path, dtype: torch.dtype) -> Any:
        # Built on the loop thread so that vLLM's output handler runs on this loop.
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        rank = next((r for r in _VLLM_RANKS if r >= self.max_lora_rank), None)
        if rank is None:
            raise ValueError(f"max_lora_rank: the vllm sampler supports <= {_VLLM_RANKS[-1]}, got {self.max_lora_rank}")
        max_loras = int(_env_number("TINKER_VLLM_MAX_LORAS", 8))
        args = AsyncEngineArgs(
            model=str(model_path),
            dtype=_DTYPES.get(dtype, "auto"),
            enable_lora=True,
            max_lora_rank=rank,
            max_loras=max_loras,
            max_cpu_loras=max(max_loras, int(_env_number("TINKER_VLLM_MAX_CPU_LORAS", 32))),
            lora_target_modules=self._target_modules,
            max_num_seqs=int(_env_number("TINKER_VLLM_MAX_NUM_SEQS", 64)),
            gpu_memory_utilization=_env_number("TINKER_VLLM_GPU_MEMORY_UTILIZATION", 0.4),
            enforce_eager=not torch.cuda.is_available(),  # CUDA graphs help on GPU; CPU has none
            disable_log_stats=True,
        )
        return AsyncLLM.from_engine_args(args)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # -- adapters ---------------------------------------------------------------------------

    def unsupported(self, checkpoint: AdapterCheckpoint) -> str | None:
        """Why vLLM cannot serve ``checkpoint`` (a LoRA on the output embedding), or None."""
        unembed = sorted(self._unembed_paths & set(checkpoint.weights))
        if not unembed:
            return None
        return f"it has a LoRA on the output embedding ({', '.join(unembed)}), which vLLM cannot apply"

    def add_adapter(self, sampler_id: str, checkpoint: AdapterCheckpoint) -> None:
        from vllm.lora.request import LoRARequest

        reason = self.unsupported(checkpoint)
        if reason is not None:  # RoutedSampler never asks: it sends these to the torch sampler
            raise ValueError(f"sampler_id: vLLM cannot serve {sampler_id!r}: {reason}")
        if checkpoint.rank > self.max_lora_rank:
            raise ValueError(f"rank: the adapter's rank {checkpoint.rank} > max_lora_rank {self.max_lora_rank}")
        lora_id = next(self._ids)
        path = self._directory / str(lora_id)
        write_checkpoint(path, checkpoint)
        request = LoRARequest(lora_name=sampler_id, lora_int_id=lora_id, lora_path=str(path))
        try:
            # Loading now (not on the first sample) surfaces a bad adapter here and makes the
            # first sample fast; vLLM reloads it from ``path`` whenever its LRU evicted it.
            self._call(self._engine.add_lora(request))
        except Exception as e:
            shutil.rmtree(path, ignore_errors=True)
            raise RuntimeError(f"sampler_id: vLLM could not load the adapter of {sampler_id!r} from {path}") from e
        self._adapters[sampler_id] = request

    def remove_adapter(self, sampler_id: str) -> None:
        """Stop accepting requests for ``sampler_id``; its files and vLLM slot go once the
        requests already queued for it are answered (vLLM may reload it from disk until then)."""
        request = self._adapters.pop(sampler_id)
        asyncio.run_coroutine_threadsafe(self._remove_when_idle(request), self._loop)

    async def _remove_when_idle(self, request: Any) -> None:
        async with self._idle:
            await self._idle.wait_for(lambda: self._in_flight[request.lora_int_id] == 0)
        await self._engine.remove_lora(request.lora_int_id)
        shutil.rmtree(request.lora_path, ignore_errors=True)

    # -- requests ---------------------------------------------------------------------------

    def submit(self, request: SampleRequest) -> Future[SampleResponse]:
        lora = None if request.sampler_id is None else self._adapters[request.sampler_id]
        return asyncio.run_coroutine_threadsafe(self._generate(request, lora), self._loop)

    def has_work(self) -> bool:
        return False  # vLLM computes on its own process, never on the caller's thread

    def step(self) -> bool:
        return False

    async def _generate(self, request: SampleRequest, lora: Any) -> SampleResponse:
        lora_id = 0 if lora is None else lora.lora_int_id
        self._in_flight[lora_id] += 1
        try:
            return await self._generate_now(request, lora)
        finally:
            self._in_flight[lora_id] -= 1
            async with self._idle:
                self._idle.notify_all()

    async def _generate_now(self, request: SampleRequest, lora: Any) -> SampleResponse:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = request.params
        topk = request.topk_prompt_logprobs
        vllm_params = SamplingParams(
            n=request.num_samples,
            max_tokens=request.max_tokens,
            temperature=params.temperature,
            top_k=0 if params.top_k == -1 else params.top_k,  # vLLM: 0 disables
            top_p=params.top_p,
            seed=params.seed,  # vLLM gives sample i the seed ``seed + i``
            stop=request.stop.strings or None,
            # Our stop ids already hold EOS unless stop=[]; vLLM's own EOS handling is off so
            # that both samplers stop on exactly the same ids.
            stop_token_ids=sorted(request.stop.token_ids),
            ignore_eos=True,
            include_stop_str_in_output=True,
            skip_special_tokens=False,  # stop strings are matched on the same text as ours
            logprobs=0,  # the sampled token's own logprob, from the raw distribution
            prompt_logprobs=topk if request.wants_prompt_logprobs else None,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        generator = self._engine.generate(
            {"prompt_token_ids": request.prompt}, vllm_params, request_id=uuid.uuid4().hex, lora_request=lora
        )
        async for output in generator:
            final = output
        if final is None or len(final.outputs) != request.num_samples:
            raise RuntimeError("vLLM returned no complete answer for the request")
        sequences = []
        for completion in sorted(final.outputs, key=lambda c: c.index):
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM ended a sequence with {completion.finish_reason!r}")
            tokens = list(completion.token_ids)
            logprobs = [entry[token].logprob for entry, token in zip(completion.logprobs or [], tokens, strict=True)]
            sequences.append(SampledSequence(stop_reason=completion.finish_reason, tokens=tokens, logprobs=logprobs))
        values, pairs = _prompt_logprobs(request, final.prompt_logprobs)
        return SampleResponse(
            sequences=sequences,
            prompt_logprobs=values if request.include_prompt_logprobs else None,
            topk_prompt_logprobs=pairs if topk > 0 else None,
        )

    # -- shutdown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop vLLM's engine core and loop; idempotent, and run at exit if nobody called it
        (an embedded backend lives until the process ends)."""
        atexit.unregister(self.close)
        if self._engine is not None:
            if self._thread.is_alive():
                # On the loop thread: vLLM stops the engine core, then cancels its output handler;
                # from another thread the handler would first see the dead core and log an error.
                self._call(self._shutdown_engine())
            # Dropped now, while the interpreter is whole: AsyncLLM.__del__ shuts down again,
            # which fails during interpreter teardown.
            self._engine = None
        if self._thread.is_alive():
            self._stop_loop()
        shutil.rmtree(self._directory, ignore_errors=True)

    async def _shutdown_engine(self) -> None:
        self._engine.shutdown()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


def _prompt_logprobs(
    request: SampleRequest, entries: list[Any] | None
) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Our prompt logprobs from vLLM's: per position a dict token -> Logprob(logprob, rank),
    holding the top ``k`` and the prompt's own token (which may rank below them)."""
    values: list[float | None] = [None]
    pairs: list[list[tuple[int, float]] | None] = [None]
    if not request.wants_prompt_logprobs or entries is None:
        return values, pairs
    k = request.topk_prompt_logprobs
    for token, entry in zip(request.prompt[1:], entries[1:], strict=True):
        values.append(entry[token].logprob)
        top = sorted((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank <= k)
        pairs.append([(tok, logprob) for _, tok, logprob in top])
    return values, pairs
