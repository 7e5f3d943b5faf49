"""``TrainingClient``: one LoRA run on the backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from tinker import wire
from tinker._holder import Holder, wrap
from tinker.errors import TinkerError
from tinker.futures import APIFuture
from tinker.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    OptimStepResponse,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    TensorData,
)
from tinker.validation import (
    InvalidInput,
    check_checkpoint_name,
    check_forward_backward,
    check_ttl,
    parse_tinker_path,
)

if TYPE_CHECKING:
    from tinker.sampling_client import SamplingClient

CustomLossFn = Callable[[list[Datum], list[Any]], tuple[Any, dict[str, float]]]

logger = logging.getLogger("tinker")
T = TypeVar("T")

# Sends and releases that outlive the call that started them (the loop keeps only weak references).
_BACKGROUND: set[asyncio.Task[Any]] = set()


def _keep(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


class TrainingClient:
    """A LoRA run. Every method returns an ``APIFuture`` at once.

    Calls are numbered (``seq_id``) in the order they are made, and the backend runs them in
    that order, so submitting ``forward_backward`` and then ``optim_step`` before awaiting
    either is safe and lands both in the same clock cycle.

    The client itself is awaitable (``tc = await service.create_lora_training_client(...)``),
    and ``tc.result()`` waits for the run to exist; methods may be called before that.
    """

    def __init__(self, holder: Holder, created: APIFuture[wire.ModelCreated]) -> None:
        self._holder = holder
        self._created = created
        self._seq_lock = threading.Lock()
        self._next_seq = 1

    # --- the client as a future of itself -----------------------------------------------------

    def __await__(self) -> Generator[Any, None, TrainingClient]:
        yield from self._created.__await__()
        return self

    def result(self, timeout: float | None = None) -> TrainingClient:
        self._created.result(timeout)
        return self

    @property
    def model_id(self) -> str:
        """The run id, ``{session_id}:train:{n}`` (blocks until the run exists)."""
        return self._created.future().result().model_id

    def get_info(self) -> GetInfoResponse:
        return self._created.future().result().info

    def get_tokenizer(self) -> Any:
        """The base model's tokenizer (a ``transformers`` tokenizer, loaded offline)."""
        return self._holder.get_tokenizer(self._base_model())

    def _base_model(self) -> str:
        info = self.get_info()
        return info.model_data.model_name or info.model_name or ""

    # --- ordered submission -------------------------------------------------------------------

    def _ordered(self, n: int, body: Callable[[_Reserved], Coroutine[Any, Any, T]]) -> APIFuture[T]:
        """Reserve the next ``n`` seq_ids (now, so calls keep the order they were made in) and
        run ``body``, which sends their requests. Once its future is done (answered, failed, or
        cancelled, even before ``body`` started) every seq_id it did not send is released."""
        with self._seq_lock:
            reserved = _Reserved(self, list(range(self._next_seq, self._next_seq + n)))
            self._next_seq += n
        future = self._holder.submit(body(reserved))
        loop = self._holder.loop.loop

        def done(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting
                loop.call_soon_threadsafe(reserved.close)

        future.future().add_done_callback(done)
        return future

    def _submit(self, build: Callable[[str, int], Any]) -> APIFuture[Any]:
        async def run(reserved: _Reserved) -> Any:
            model_id = (await wrap(self._created)).model_id
            return await reserved.send(build(model_id, reserved.seq_ids[0]))

        return self._ordered(1, run)

    async def _release(self, seq_id: int) -> None:
        """Tell the server to skip ``seq_id``: its request will never be sent (see ``_Reserved``)."""
        try:
            model_id = (await wrap(self._created)).model_id
        except BaseException:  # no run, so nothing waits on the gap (every call fails alike)
            return
        try:
            await self._holder.call(wire.ReleaseSeq(model_id=model_id, seq_id=seq_id))
        except TinkerError as e:  # the run is gone, or the connection: nothing left waits on it
            logger.debug("releasing seq_id %d of %s failed: %s", seq_id, model_id, e)

    # --- primitives ---------------------------------------------------------------------------

    def forward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        """Compute the loss and per-token logprobs without accumulating gradients."""
        return self._forward_backward(data, loss_fn, loss_fn_config, forward_only=True)

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        """Compute the loss (summed over tokens) and accumulate its gradient until ``optim_step``."""
        return self._forward_backward(data, loss_fn, loss_fn_config, forward_only=False)

    def _forward_backward(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None, forward_only: bool
    ) -> APIFuture[ForwardBackwardOutput]:
        data = _check_data(data, loss_fn, loss_fn_config)
        config = None if loss_fn_config is None else {str(k): float(v) for k, v in loss_fn_config.items()}
        return self._submit(
            lambda model_id, seq_id: wire.ForwardBackward(
                model_id=model_id,
                seq_id=seq_id,
                data=data,
                loss_fn=loss_fn,
                loss_fn_config=config,
                forward_only=forward_only,
            )
        )

    def forward_backward_custom(
        self, data: Sequence[Datum], loss_fn: CustomLossFn
    ) -> APIFuture[ForwardBackwardOutput]:
        """Train on any differentiable function of the per-token logprobs.

        ``loss_fn(data, logprobs) -> (loss, metrics)`` gets one torch tensor of target logprobs
        per datum. The backend runs a forward pass for the logprobs, then a ``cross_entropy``
        backward with weights ``-dloss/dlogprobs``, whose parameter gradient equals the custom
        loss's. Costs one forward plus one forward-backward.
        """
        checked = _check_data(_zero_weights_where_missing(data), "cross_entropy")
        data = list(data)
        surrogate_inputs = [
            Datum(
                model_input=d.model_input,
                loss_fn_inputs={key: d.loss_fn_inputs[key] for key in ("target_tokens", "weights")},
            )
            for d in checked
        ]

        async def run(reserved: _Reserved) -> ForwardBackwardOutput:
            first_seq = reserved.seq_ids[0]
            model_id = (await wrap(self._created)).model_id
            forward = await reserved.send(
                wire.ForwardBackward(
                    model_id=model_id, seq_id=first_seq, data=surrogate_inputs,
                    loss_fn="cross_entropy", forward_only=True,
                )
            )
            logprobs = [out["logprobs"].to_torch().requires_grad_(True) for out in forward.loss_fn_outputs]
            loss, metrics = loss_fn(list(data), logprobs)  # if it raises, the backward's seq_id is released
            loss.backward()
            weighted = _gradient_weighted(surrogate_inputs, logprobs)
            await asyncio.sleep(0)  # a cancel that came while loss_fn ran lands here: nothing more is sent
            backward = await reserved.send(
                wire.ForwardBackward(
                    model_id=model_id, seq_id=first_seq + 1, data=weighted, loss_fn="cross_entropy"
                )
            )
            return _custom_output(backward, float(loss.detach()), metrics)

        return self._ordered(2, run)

    def optim_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        """Apply the accumulated gradients with AdamW and zero them."""
        params = adam_params if adam_params is not None else AdamParams()
        if not isinstance(params, AdamParams):
            raise TypeError(f"adam_params: expected tinker.AdamParams, got {type(params).__name__}")
        return self._submit(
            lambda model_id, seq_id: wire.OptimStep(model_id=model_id, seq_id=seq_id, adam_params=params)
        )

    def save_state(self, name: str, ttl_seconds: int | None = None) -> APIFuture[SaveWeightsResponse]:
        """Save adapter and optimizer state as ``tinker://<run>/weights/<name>`` (for resuming)."""
        check_checkpoint_name(name)
        check_ttl(ttl_seconds)
        return self._submit(
            lambda model_id, seq_id: wire.SaveState(
                model_id=model_id, seq_id=seq_id, name=name, ttl_seconds=ttl_seconds
            )
        )

    def load_state(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Load the adapter weights of a ``weights`` checkpoint; the optimizer starts fresh."""
        return self._load(path, with_optimizer=False)

    def load_state_with_optimizer(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Load adapter weights and optimizer state, to resume training exactly."""
        return self._load(path, with_optimizer=True)

    def _load(self, path: str, with_optimizer: bool) -> APIFuture[LoadWeightsResponse]:
        parse_tinker_path(path, kind="weights")
        return self._submit(
            lambda model_id, seq_id: wire.LoadState(
                model_id=model_id, seq_id=seq_id, path=path, with_optimizer=with_optimizer
            )
        )

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Save the adapter alone as ``tinker://<run>/sampler_weights/<name>`` (PEFT format)."""
        check_checkpoint_name(name)
        check_ttl(ttl_seconds)
        return self._submit(
            lambda model_id, seq_id: wire.SaveWeightsForSampler(
                model_id=model_id, seq_id=seq_id, name=name, ttl_seconds=ttl_seconds
            )
        )

    def save_weights_external(
        self, name: str, ttl_seconds: int | None = None, age_encryption_recipients: list[str] | None = None
    ) -> APIFuture[SaveWeightsExternalResponse]:
        """Export the adapter as ``tinker://<run>/external_weights/<name>`` in PEFT format
        (``adapter_model.safetensors`` + ``adapter_config.json``), to download with
        ``RestClient.get_external_weights_urls`` or ``RestClient.download_checkpoint``.
        Encryption (``age_encryption_recipients``) is not supported here."""
        check_checkpoint_name(name)
        check_ttl(ttl_seconds)
        if age_encryption_recipients:
            raise InvalidInput(
                "age_encryption_recipients", "none (this server does not encrypt exports)", age_encryption_recipients
            )
        return self._submit(
            lambda model_id, seq_id: wire.SaveWeightsExternal(
                model_id=model_id, seq_id=seq_id, name=name, ttl_seconds=ttl_seconds
            )
        )

    def save_weights_and_get_sampling_client(
        self, name: str | None = None, *, record_stability_info: bool = False
    ) -> SamplingClient:
        """Snapshot the current weights into a new sampler (no file is kept) and return its client.

        ``name`` is accepted for compatibility and ignored, as in the Tinker SDK. With
        ``record_stability_info`` every sample is recorded for ``stable_reinforce`` (each
        sequence's ``sequence_id`` names it in a ``Datum``'s provenance spans).
        """
        from tinker.sampling_client import SamplingClient

        sampler_seq = self._holder.next_sampler_seq()

        async def run(reserved: _Reserved) -> wire.SamplingSessionCreated:
            model_id = (await wrap(self._created)).model_id
            session_id = await wrap(self._holder.session_id())
            sampling_session_id = f"{session_id}:sample:{sampler_seq}"
            await reserved.send(
                wire.SaveWeightsForSampler(
                    model_id=model_id, seq_id=reserved.seq_ids[0], sampling_session_id=sampling_session_id
                )
            )
            return wire.SamplingSessionCreated(
                sampling_session_id=sampling_session_id, base_model=self._base_model()
            )

        return SamplingClient(self._holder, self._ordered(1, run), record_stability_info=record_stability_info)

    def create_sampling_client(self, model_path: str, *, record_stability_info: bool = False) -> SamplingClient:
        """A sampler for a saved ``sampler_weights`` checkpoint (``record_stability_info``: as in
        :meth:`save_weights_and_get_sampling_client`)."""
        from tinker.sampling_client import SamplingClient

        return SamplingClient.create(self._holder, model_path=model_path, record_stability_info=record_stability_info)

    # Deprecated *_async twins of the Tinker SDK: the plain methods already return futures.
    async def forward_backward_async(self, *args: Any, **kwargs: Any) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward(*args, **kwargs)

    async def forward_async(self, *args: Any, **kwargs: Any) -> APIFuture[ForwardBackwardOutput]:
        return self.forward(*args, **kwargs)

    async def optim_step_async(self, *args: Any, **kwargs: Any) -> APIFuture[OptimStepResponse]:
        return self.optim_step(*args, **kwargs)


class _Reserved:
    """The ``seq_id``s one call reserved. Each must reach the server: the backend runs a run's
    requests strictly in ``seq_id`` order, so one never sent would hold up every later call of
    the client forever.

    ``send`` hands a request to a background task, so once started it completes even if the
    caller is cancelled. ``close`` (when the call's future is done) releases (``wire.ReleaseSeq``)
    each ``seq_id`` not sent: a custom loss raised, a request before it failed, the call was
    cancelled. A send that fails releases its own too (harmless if the server had it: the
    first of a ``seq_id``'s requests is the one that counts). Runs on the background loop only.
    """

    def __init__(self, client: TrainingClient, seq_ids: list[int]) -> None:
        self.seq_ids = seq_ids
        self._client = client
        self._unsent = set(seq_ids)

    async def send(self, request: Any) -> Any:
        if request.seq_id not in self._unsent:  # closed: the call is over and its seq_ids released
            raise asyncio.CancelledError
        self._unsent.remove(request.seq_id)
        task = _keep(self._client._holder.call(request))
        task.add_done_callback(lambda done: self._release_if_failed(done, request.seq_id))
        return await asyncio.shield(task)

    def close(self) -> None:
        for seq_id in sorted(self._unsent):
            _keep(self._client._release(seq_id))
        self._unsent.clear()

    def _release_if_failed(self, task: asyncio.Task[Any], seq_id: int) -> None:
        if not task.cancelled() and task.exception() is not None:  # cancelled: the loop is stopping
            _keep(self._client._release(seq_id))


# --- client-side checks: tinker.validation, as the backend runs them ---------------------------


def _check_data(data: Sequence[Datum], loss_fn: str, config: dict[str, float] | None = None) -> list[Datum]:
    check_forward_backward(data, loss_fn, config)
    return list(data)


def _zero_weights_where_missing(data: Sequence[Datum]) -> Sequence[Datum]:
    """``forward_backward_custom`` takes data without ``weights``: the surrogate's are its own."""
    if isinstance(data, str | bytes) or not isinstance(data, Sequence):
        return data  # _check_data names the mistake
    out = []
    for datum in data:
        inputs = datum.loss_fn_inputs if isinstance(datum, Datum) else {}
        targets = inputs.get("target_tokens")
        if targets is not None and "weights" not in inputs:
            zeros = TensorData(data=[0.0] * targets.numel, dtype="float32", shape=targets.shape)
            datum = Datum(model_input=datum.model_input, loss_fn_inputs={**inputs, "weights": zeros})
        out.append(datum)
    return out


def _gradient_weighted(surrogate: list[Datum], logprobs: list[Any]) -> list[Datum]:
    """The backward half of ``forward_backward_custom``: ``cross_entropy`` weighted by
    ``-dloss/dlogprobs``, whose parameter gradient equals the custom loss's."""
    import torch

    return [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "weights": TensorData.from_torch(-(lp.grad if lp.grad is not None else torch.zeros_like(lp))),
            },
        )
        for d, lp in zip(surrogate, logprobs, strict=True)
    ]


def _custom_output(backward: ForwardBackwardOutput, loss: float, metrics: dict[str, Any]) -> ForwardBackwardOutput:
    """The backward's outputs, with the custom loss as ``loss:sum`` (the surrogate's kept aside)."""
    out_metrics = dict(backward.metrics)
    out_metrics["surrogate_loss:sum"] = out_metrics.pop("loss:sum", 0.0)
    out_metrics["loss:sum"] = loss
    out_metrics.update({k: float(v) for k, v in metrics.items()})
    return ForwardBackwardOutput(
        loss_fn_output_type=backward.loss_fn_output_type, loss_fn_outputs=backward.loss_fn_outputs, metrics=out_metrics
    )
