"""``SamplingClient``: sample from a base model or a frozen snapshot of a LoRA adapter."""

from __future__ import annotations

import threading
from collections.abc import Generator
from typing import Any

from tinker import wire
from tinker._holder import Holder, wrap
from tinker.futures import APIFuture
from tinker.types import ModelInput, SampleResponse, SamplingParams
from tinker.validation import check_sample, parse_tinker_path


class SamplingClient:
    """Samples and scores tokens. Every method returns an ``APIFuture`` at once.

    Each sampled sequence has a ``sequence_id``; a client made with ``record_stability_info``
    has the server record its samples, for training with ``stable_reinforce``.

    A sampler never changes: weights saved later need a new sampler (so a stale client can
    never silently serve old weights, and a live one never changes under you). The client is
    awaitable, like ``TrainingClient``, and safe to share between tasks and threads.
    """

    def __init__(
        self, holder: Holder, created: APIFuture[wire.SamplingSessionCreated], *, record_stability_info: bool = False
    ) -> None:
        self._holder = holder
        self._record_stability_info = bool(record_stability_info)
        self._created = created
        self._seq_lock = threading.Lock()
        self._next_seq = 1

    @classmethod
    def create(
        cls,
        holder: Holder,
        *,
        model_path: str | None = None,
        base_model: str | None = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        if model_path is None and base_model is None:
            raise ValueError("model_path, base_model: expected one of them, got neither")
        if model_path is not None:
            parse_tinker_path(model_path, field="model_path")
        sampler_seq = holder.next_sampler_seq()

        async def run() -> wire.SamplingSessionCreated:
            session_id = await wrap(holder.session_id())
            return await holder.call(
                wire.CreateSamplingSession(
                    sampling_session_id=f"{session_id}:sample:{sampler_seq}",
                    model_path=model_path,
                    base_model=base_model,
                )
            )

        return cls(holder, holder.submit(run()), record_stability_info=record_stability_info)

    def __await__(self) -> Generator[Any, None, SamplingClient]:
        yield from self._created.__await__()
        return self

    def result(self, timeout: float | None = None) -> SamplingClient:
        self._created.result(timeout)
        return self

    @property
    def sampling_session_id(self) -> str:
        return self._created.future().result().sampling_session_id

    def get_base_model(self) -> str:
        return self._created.future().result().base_model

    def get_tokenizer(self) -> Any:
        return self._holder.get_tokenizer(self.get_base_model())

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> APIFuture[SampleResponse]:
        """Draw ``num_samples`` continuations of ``prompt``."""
        if not isinstance(prompt, ModelInput):
            raise TypeError(f"prompt: expected tinker.ModelInput, got {type(prompt).__name__}")
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params: expected tinker.SamplingParams, got {type(sampling_params).__name__}")
        check_sample(prompt.length, num_samples, topk_prompt_logprobs)
        with self._seq_lock:
            seq_id = self._next_seq
            self._next_seq += 1

        async def run() -> SampleResponse:
            created = await wrap(self._created)
            return await self._holder.call(
                wire.Sample(
                    sampling_session_id=created.sampling_session_id,
                    seq_id=seq_id,
                    prompt=prompt,
                    num_samples=num_samples,
                    sampling_params=sampling_params,
                    include_prompt_logprobs=include_prompt_logprobs or topk_prompt_logprobs > 0,
                    topk_prompt_logprobs=topk_prompt_logprobs,
                    record_stability_info=self._record_stability_info,
                )
            )

        return self._holder.submit(run())

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """Log-probability of each prompt token given the ones before it (``None`` for the first)."""
        response = self.sample(prompt, 1, SamplingParams(max_tokens=1), include_prompt_logprobs=True)
        return response.map(lambda r: list(r.prompt_logprobs or []))

    async def sample_async(self, *args: Any, **kwargs: Any) -> APIFuture[SampleResponse]:
        """Deprecated twin kept for Tinker compatibility; ``sample`` already returns a future."""
        return self.sample(*args, **kwargs)

    async def compute_logprobs_async(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        return self.compute_logprobs(prompt)
