"""The torch sampler: continuous batching over many requests and many LoRA adapters.

Design (the simplest correct one with Hugging Face's ``DynamicCache``):

* **One running batch.** Every sequence being generated, from any request and any adapter, is
  one row of ONE ``DynamicCache``. Rows are LEFT-padded to a common length; a boolean mask
  marks their real columns and each row carries its own position. Padded keys get attention
  weight exactly 0 and RoPE sees true positions, so a row's logits are those it would get alone
  (up to float rounding from different matmul blocking).
* **Per-row adapters.** Rows are kept grouped by adapter, so the LoRA routing of a decode step is
  one contiguous ``Segment`` per adapter and every adapter's delta is one matmul.
* **Joining.** A new request is prefilled on its own (with its own cache), in chunks of at most
  ``prefill_chunk`` tokens per step, so a long prompt never stalls the rows that are decoding.
  When its prompt is done, each sample's first token is drawn from the last logits, the cache
  is repeated once per sample and spliced into the running batch (the shorter side left-padded).
* **Leaving.** A row that stops is dropped before the next step; columns that became padding
  in every remaining row are trimmed.
* **Stepping.** ``step()`` spends the prefill budget on waiting requests (FIFO), then runs ONE
  decode step for all running rows. The scheduler calls it on the compute thread between
  training clock cycles, so sampling and training take turns.

Not done: prefill fused into the decode pass (needs variable-length attention), paged KV memory,
prefix sharing between requests.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import torch
from torch.nn import functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from tinker.types import SampledSequence, SampleResponse

from ..checkpoints import AdapterCheckpoint
from .lora import LoraLinear, LoraRouting, LoraWeights, Segment
from .torch_sampler import SampleRequest, choose_tokens, row_generators, target_logprobs

__all__ = ["SamplingBatcher"]

logger = logging.getLogger("tinker_backend.sampler")


def _routing_key(sampler_id: str) -> str:
    """Samplers live in the LoRA layers next to the training adapters (``train:<id>``)."""
    return f"sample:{sampler_id}"


@functools.cache
def _cache_kwarg(forward: Callable[..., Any]) -> str:
    # transformers >= 5.2x names the KV-cache argument ``cache``; earlier ones ``past_key_values``.
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


@dataclass(eq=False)  # identity semantics: jobs key dicts
class _Job:
    """A request in flight: its prefill progress, then its rows."""

    request: SampleRequest
    future: Future[SampleResponse]
    key: str | None
    generators: list[torch.Generator]
    prefilled: int = 0
    cache: DynamicCache | None = None
    last_logits: torch.Tensor | None = None
    prompt_values: list[float | None] = field(default_factory=lambda: [None])
    prompt_pairs: list[list[tuple[int, float]] | None] = field(default_factory=lambda: [None])
    sequences: list[SampledSequence | None] = field(default_factory=list)


@dataclass(eq=False)
class _Row:
    """One sample being generated: the token it feeds next and the position it is fed at."""

    job: _Job
    index: int
    next_token: int
    position: int
    tokens: list[int]
    logprobs: list[float]


class SamplingBatcher:
    """The continuous-batching torch sampler (implements ``Sampler``).

    ``max_rows`` caps the running batch (a request waits until its samples fit);
    ``prefill_chunk`` is the number of prompt tokens prefilled per step.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        routing: LoraRouting,
        layers: dict[str, LoraLinear],
        *,
        max_rows: int = 256,
        prefill_chunk: int = 512,
    ) -> None:
        self.model = model
        self.routing = routing
        self.layers = layers
        self.max_rows = max_rows
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        self._cache_kwarg = _cache_kwarg(type(model).forward)
        self._inbox: collections.deque[_Job] = collections.deque()  # appended from any thread
        self._waiting: collections.deque[_Job] = collections.deque()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # [rows, columns], True: real
        self._keys: set[str] = set()  # routing keys of the published adapters
        self._retiring: set[str] = set()  # routing keys to drop once no request uses them
        self.decode_steps = 0  # for metrics: decoded_rows / decode_steps is the mean batch size
        self.decoded_rows = 0

    # -- adapters ---------------------------------------------------------------------------

    def add_adapter(self, sampler_id: str, checkpoint: AdapterCheckpoint) -> None:
        key = _routing_key(sampler_id)
        for path, (A, B) in checkpoint.weights.items():
            # Copies: the training adapter the weights come from keeps changing in place.
            A = A.detach().to(self.device, copy=True)
            B = B.detach().to(self.device, copy=True)
            self.layers[path].adapters[key] = LoraWeights(A, B, checkpoint.scaling)
        self._keys.add(key)

    def remove_adapter(self, sampler_id: str) -> None:
        """Drop the adapter once the requests already queued for it are answered."""
        self._retiring.add(_routing_key(sampler_id))
        self._retire()

    def _retire(self) -> None:
        in_use = {job.key for job in (*self._inbox, *self._waiting, *(row.job for row in self._rows))}
        for key in self._retiring - in_use:
            for layer in self.layers.values():
                layer.adapters.pop(key, None)
            self._keys.discard(key)
        self._retiring &= in_use

    # -- requests ---------------------------------------------------------------------------

    def submit(self, request: SampleRequest) -> Future[SampleResponse]:
        if request.num_samples > self.max_rows:
            raise ValueError(
                f"num_samples: expected <= {self.max_rows} (the torch sampler's max_rows), got {request.num_samples}"
            )
        future: Future[SampleResponse] = Future()
        generators = row_generators(request.params.seed, request.num_samples, self.device)
        key = None if request.sampler_id is None else _routing_key(request.sampler_id)
        self._inbox.append(_Job(request, future, key, generators))
        return future

    def has_work(self) -> bool:
        return bool(self._inbox or self._waiting or self._rows)

    @torch.no_grad()
    def step(self) -> bool:
        try:
            while self._inbox:
                self._waiting.append(self._inbox.popleft())
            self._prefill()
            if self._rows:
                self._decode()
        except Exception as e:  # a bug here must fail the requests, not hang them
            logger.exception("sampling step failed; failing every request in flight")
            for job in {*self._waiting, *(r.job for r in self._rows)}:
                _fail(job, e)
            self._waiting.clear()
            self._drop_batch()
        if self._retiring:
            self._retire()
        return self.has_work()

    def close(self) -> None:
        """Fail every request in flight. Called at shutdown, possibly while a step is running on
        the compute thread, so it only touches the futures (which are thread-safe)."""
        error = RuntimeError("the sampler was closed")
        for job in {*self._inbox, *self._waiting, *(r.job for r in self._rows)}:
            _fail(job, error)

    # -- prefill ----------------------------------------------------------------------------

    def _prefill(self) -> None:
        """Spend up to ``prefill_chunk`` prompt tokens on the waiting requests, in FIFO order.

        New requests whose prompts fit the remaining budget are prefilled together in ONE
        left-padded forward pass (on CPU a forward costs about the same for 1 or 32 rows);
        a prompt longer than the budget is prefilled alone, a chunk per step.
        """
        budget = self.prefill_chunk
        room = self.max_rows - len(self._rows)
        while budget > 0 and self._waiting:
            head = self._waiting[0]
            if head.prefilled == 0 and head.request.num_samples > room:
                return  # FIFO: wait until the head request's samples fit
            group = self._fresh_group(budget, room)
            jobs = group or [head]
            try:
                if group:
                    budget -= len(group) * max(len(job.request.prompt) for job in group)
                    self._prefill_together(group)
                else:
                    budget -= self._prefill_chunk(head, budget)
                    if head.prefilled == len(head.request.prompt):
                        self._waiting.popleft()
                        assert head.cache is not None and head.last_logits is not None
                        length = head.cache.get_seq_length()
                        mask = torch.ones(1, length, dtype=torch.bool, device=self.device)
                        kv = [(layer.keys, layer.values) for layer in _layers(head.cache)]
                        head.cache = None
                        self._start_rows(head, head.last_logits, kv, mask)
            except Exception as e:  # these requests alone fail (e.g. an adapter that went away)
                logger.exception("prefill failed")
                for job in jobs:
                    if job in self._waiting:
                        self._waiting.remove(job)
                    _fail(job, e)
            room = self.max_rows - len(self._rows)

    def _fresh_group(self, budget: int, room: int) -> list[_Job]:
        """Pop the longest FIFO prefix of new requests that fits ``budget`` padded tokens and
        ``room`` rows; empty if the head is not new or its prompt alone exceeds the budget."""
        group: list[_Job] = []
        width = 0
        for job in self._waiting:
            width_with = max(width, len(job.request.prompt))
            rows = sum(j.request.num_samples for j in group) + job.request.num_samples
            if job.prefilled or (len(group) + 1) * width_with > budget or rows > room:
                break
            group.append(job)
            width = width_with
        for _ in group:
            self._waiting.popleft()
        return group

    def _check_adapter(self, job: _Job) -> None:
        if job.key is not None and job.key not in self._keys:
            # Removed between the engine's check and this step: never sample without it.
            raise KeyError(f"sampler_id: sampler {job.request.sampler_id!r} was removed")

    def _prefill_together(self, group: list[_Job]) -> None:
        """One forward over the whole prompts of ``group``, left-padded, rows grouped by adapter."""
        group.sort(key=lambda job: (job.key is not None, job.key or ""))  # stable: FIFO within an adapter
        for job in list(group):
            try:
                self._check_adapter(job)
            except KeyError as e:
                group.remove(job)
                _fail(job, e)
        if not group:
            return
        width = max(len(job.request.prompt) for job in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.bool)
        for row, job in enumerate(group):
            prompt = job.request.prompt
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        segments: list[Segment] = []
        for row, job in enumerate(group):
            if segments and segments[-1].adapter == job.key:
                segments[-1] = segments[-1]._replace(stop=row + 1)
            else:
                segments.append(Segment(job.key, row, row + 1, False))
        self.routing.set(segments)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask.long(),
            position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),  # true positions under the padding
            use_cache=True,
            logits_to_keep=0 if any(job.request.wants_prompt_logprobs for job in group) else 1,
            **{self._cache_kwarg: cache},
        )
        _check_plain_cache(cache)
        layers = _layers(cache)
        for row, job in enumerate(group):
            prompt = job.request.prompt
            if job.request.wants_prompt_logprobs:
                # Position i predicts prompt[i + 1]: the row's real positions are its last len(prompt).
                values, pairs = target_logprobs(out.logits[row, width - len(prompt) :], prompt[1:], job.request.topk_prompt_logprobs)
                job.prompt_values.extend(values)
                if pairs is not None:
                    job.prompt_pairs.extend(pairs)
            kv = [(layer.keys[row : row + 1], layer.values[row : row + 1]) for layer in layers]
            self._start_rows(job, out.logits[row, -1], kv, mask[row : row + 1])

    def _prefill_chunk(self, job: _Job, budget: int) -> int:
        """Prefill the next chunk (at most ``budget`` tokens) of one long prompt, in its own cache."""
        prompt = job.request.prompt
        start, stop = job.prefilled, min(len(prompt), job.prefilled + budget)
        if job.cache is None:
            self._check_adapter(job)
            job.cache = DynamicCache(config=self.model.config)
        self.routing.set([Segment(job.key, 0, 1, False)])
        out = self.model(
            input_ids=torch.tensor([prompt[start:stop]], device=self.device),
            use_cache=True,
            logits_to_keep=0 if job.request.wants_prompt_logprobs else 1,
            **{self._cache_kwarg: job.cache},
        )
        _check_plain_cache(job.cache)
        logits = out.logits[0]
        if job.request.wants_prompt_logprobs:
            # Position i predicts prompt[i + 1]; the last position predicts the first sample.
            values, pairs = target_logprobs(logits, prompt[start + 1 : stop + 1], job.request.topk_prompt_logprobs)
            job.prompt_values.extend(values)
            if pairs is not None:
                job.prompt_pairs.extend(pairs)
        job.last_logits = logits[-1]
        job.prefilled = stop
        return stop - start

    def _start_rows(
        self, job: _Job, last_logits: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor
    ) -> None:
        """Draw each sample's first token from ``last_logits``, then splice the samples that
        go on into the batch with the prompt's cache ``kv`` (one row per layer) and ``mask``."""
        request = job.request
        logits = last_logits.expand(request.num_samples, -1)
        tokens, logprobs = choose_tokens(logits, request.params, job.generators)
        job.sequences = [None] * request.num_samples
        rows = []
        for i, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs.tolist(), strict=True)):
            row = _Row(job, i, token, len(request.prompt), [token], [logprob])
            if not self._finish_if_done(row):
                rows.append(row)
        job.last_logits = None
        if rows:
            n = len(rows)
            self._insert(rows, [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv], mask.expand(n, -1))

    # -- the running batch ------------------------------------------------------------------

    def _insert(self, rows: list[_Row], kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Splice ``rows`` (all of one adapter), their per-layer (keys, values) and their mask
        into the batch, after the rows of the same adapter so that each adapter's rows stay
        contiguous. The shorter side is left-padded."""
        if self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
            for i, (keys, values) in enumerate(kv):
                self._cache.update(keys.contiguous(), values.contiguous(), i)
            self._mask, self._rows = mask.clone(), rows
            self._trim()
            return
        key = rows[0].job.key
        at = next((i + 1 for i in range(len(self._rows) - 1, -1, -1) if self._rows[i].job.key == key), len(self._rows))
        length = max(self._mask.shape[1], mask.shape[1])
        old_pad, new_pad = length - self._mask.shape[1], length - mask.shape[1]
        for layer, (keys, values) in zip(_layers(self._cache), kv, strict=True):
            old_keys, old_values = _left_pad(layer.keys, old_pad), _left_pad(layer.values, old_pad)
            layer.keys = torch.cat([old_keys[:at], _left_pad(keys, new_pad), old_keys[at:]])
            layer.values = torch.cat([old_values[:at], _left_pad(values, new_pad), old_values[at:]])
        old_mask = F.pad(self._mask, (old_pad, 0), value=False)
        self._mask = torch.cat([old_mask[:at], F.pad(mask, (new_pad, 0), value=False), old_mask[at:]])
        self._rows[at:at] = rows
        self._trim()

    def _keep(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep``."""
        if not keep:
            self._drop_batch()
            return
        assert self._cache is not None
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        for layer in _layers(self._cache):
            layer.keys = layer.keys[index]
            layer.values = layer.values[index]
        self._rows = [self._rows[i] for i in keep]
        self._trim()

    def _trim(self) -> None:
        """Drop the leading columns that are padding in every row."""
        first = int(self._mask.any(0).int().argmax())
        if first:
            assert self._cache is not None
            self._mask = self._mask[:, first:]
            for layer in _layers(self._cache):
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def _drop_batch(self) -> None:
        self._rows, self._cache = [], None
        self._mask = self._mask[:0, :0]

    def _segments(self) -> list[Segment]:
        segments: list[Segment] = []
        for i, row in enumerate(self._rows):
            if segments and segments[-1].adapter == row.job.key:
                segments[-1] = segments[-1]._replace(stop=i + 1)
            else:
                segments.append(Segment(row.job.key, i, i + 1, False))
        return segments

    # -- decode -----------------------------------------------------------------------------

    def _decode(self) -> None:
        """One decode step for every running row."""
        rows = self._rows
        self.decode_steps += 1
        self.decoded_rows += len(rows)
        self._mask = F.pad(self._mask, (0, 1), value=True)
        self.routing.set(self._segments())
        try:
            out = self.model(
                input_ids=torch.tensor([[r.next_token] for r in rows], device=self.device),
                attention_mask=self._mask.long(),
                position_ids=torch.tensor([[r.position] for r in rows], device=self.device),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: self._cache},
            )
        except Exception as e:  # the shared pass failed (e.g. out of memory): all its requests fail
            logger.exception("decode step failed")
            for job in {r.job for r in rows}:
                _fail(job, e)
            self._drop_batch()
            return
        logits = out.logits[:, -1]
        keep = []
        for indices in _by_sampling(rows):
            params = rows[indices[0]].job.request.params
            generators = [rows[i].job.generators[rows[i].index] for i in indices]
            tokens, logprobs = choose_tokens(logits[torch.tensor(indices, device=self.device)], params, generators)
            for i, token, logprob in zip(indices, tokens.tolist(), logprobs.tolist(), strict=True):
                row = rows[i]
                row.position += 1
                row.next_token = token
                row.tokens.append(token)
                row.logprobs.append(logprob)
                if not self._finish_if_done(row):
                    keep.append(i)
        if len(keep) < len(rows):
            self._keep(keep)

    def _finish_if_done(self, row: _Row) -> bool:
        """Record ``row``'s sequence if its last token ends it; answer the request when it was the last."""
        request = row.job.request
        reason: Literal["stop", "length"]
        if request.stop.is_done(row.tokens):
            reason = "stop"
        elif len(row.tokens) >= request.max_tokens:
            reason = "length"
        else:
            return False
        job = row.job
        job.sequences[row.index] = SampledSequence(stop_reason=reason, tokens=row.tokens, logprobs=row.logprobs)
        if all(s is not None for s in job.sequences):
            _answer(job)
        return True


def _by_sampling(rows: list[_Row]) -> list[list[int]]:
    """Row indices grouped by how they sample (temperature, top_k, top_p): one batched draw each."""
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, row in enumerate(rows):
        params = row.job.request.params
        groups.setdefault((params.temperature, params.top_k, params.top_p), []).append(i)
    return list(groups.values())


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad ``t`` [rows, heads, length, dim] with ``n`` zero columns on the left of ``length``."""
    return F.pad(t, (0, 0, n, 0)) if n else t


def _check_plain_cache(cache: DynamicCache) -> None:
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise NotImplementedError(
            f"the torch sampler splices full-attention KV caches only; this model uses {sorted(kinds)} "
            "(sliding-window or hybrid attention): use --sampler vllm"
        )


class _KV(Protocol):
    keys: torch.Tensor
    values: torch.Tensor


def _layers(cache: DynamicCache) -> list[_KV]:
    """The cache's layers, as ``_check_plain_cache`` found them: plain [rows, heads, length, dim]."""
    return cast(list[_KV], cache.layers)


def _answer(job: _Job) -> None:
    request = job.request
    response = SampleResponse(
        sequences=[s for s in job.sequences if s is not None],
        prompt_logprobs=job.prompt_values if request.include_prompt_logprobs else None,
        topk_prompt_logprobs=job.prompt_pairs if request.topk_prompt_logprobs > 0 else None,
    )
    # A future can already be settled: cancelled by its caller, or failed by ``close``.
    with contextlib.suppress(InvalidStateError):
        job.future.set_result(response)


def _fail(job: _Job, error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        job.future.set_exception(error)
