"""What the server asks of an engine, without importing torch.

The request handler, the scheduler and the run and sampler modules type their engine as
:class:`Engine`; ``engine.model_engine.ModelEngine`` is the implementation (one base model on
one device). :class:`FwdBwdItem` is the one work type of a ``forward`` / ``forward_backward``
request, from the scheduler's queue to the engine's merged pass.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import NamedTuple, Protocol

from tinker.types import AdamParams, Datum, ForwardBackwardOutput, LoraConfig, SampleResponse, SamplingParams


class FwdBwdItem(NamedTuple):
    """One forward(_backward) request of one adapter; ``backward=False`` is a pure forward."""

    adapter_id: str
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float] | None = None
    backward: bool = True


class CheckedFwdBwdItem(FwdBwdItem):
    """A ``FwdBwdItem`` whose data already passed ``check_forward_backward`` and
    ``check_data_for_model`` against the engine's model (the request handler checks every
    request before it joins a clock cycle), so the engine does not check it again on the
    compute thread."""

    __slots__ = ()


class StepSampler(Protocol):
    """The engine's sampler as the scheduler drives it: stepped between clock cycles."""

    def has_work(self) -> bool: ...

    def step(self) -> bool:
        """Do one unit of work on the calling thread; return ``has_work()`` after it."""
        ...

    def close(self) -> None: ...


class Engine(Protocol):
    """One base model serving many LoRA adapters; every method runs on its compute thread,
    but ``submit_sample``, which is thread-safe and returns at once."""

    vocab_size: int
    max_context_length: int

    @property
    def sampler(self) -> StepSampler: ...

    def has_adapter(self, adapter_id: str) -> bool: ...

    def create_adapter(self, adapter_id: str, config: LoraConfig) -> LoraConfig: ...

    def remove_adapter(self, adapter_id: str) -> None: ...

    def forward_backward_many(self, items: list[FwdBwdItem]) -> list[ForwardBackwardOutput | Exception]: ...

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]: ...

    def save_state(self, adapter_id: str, directory: Path, include_optimizer: bool = True) -> None: ...

    def save_sampler_weights(self, adapter_id: str, directory: Path) -> None: ...

    def load_state(self, adapter_id: str, directory: Path, include_optimizer: bool) -> LoraConfig: ...

    def snapshot_sampler(self, adapter_id: str, sampler_id: str) -> None: ...

    def load_sampler(self, sampler_id: str, directory: Path) -> None: ...

    def has_sampler(self, sampler_id: str) -> bool: ...

    def remove_sampler(self, sampler_id: str) -> None: ...

    def submit_sample(
        self,
        sampler_id: str | None,
        prompt: list[int],
        num_samples: int,
        params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> Future[SampleResponse]: ...

    def close(self) -> None: ...
