"""Stability records: what a sampler computed for each sequence, kept for ``stable_reinforce``.

A sample request with ``record_stability_info`` records, per sampled sequence, its prompt, its
sampled tokens and the sampler's logprob of each (``sequence_id`` ``<sampler>/<seq_id>/<i>``).
A ``stable_reinforce`` request names them with provenance spans on each ``Datum``;
:meth:`StabilityRecords.resolve` checks the spans against the records and turns them into the
loss's ``logprobs`` (the recorded ones) and ``sampled_mask`` (1 where the target is a sampled
token).

The records live in memory only: a server restart loses them (the training request naming one
then gets a 400 that says so; sample again). They belong to the API key that sampled them
(another key's request sees "unknown sequence"), expire after ``ttl_s`` (a day) without use,
each training request that uses one restarting its day, and are bounded: past
``max_tokens`` recorded tokens (prompt and sampled tokens, a prompt shared by the sequences of
one request counted once per sequence), the least recently used records go first. Operators set
both with ``tinker-server --stability-ttl-s`` and ``--stability-max-tokens``
(``limits.Limits``). A request naming a record that expired or was dropped is told which and why.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tinker import wire
from tinker.types import Datum, PromptProvenanceSpan, ProvenanceSpan, SampleResponse, TensorData
from tinker_backend.errors import ServiceError

# A day, as the Tinker docs say: "can be trained on for one day after sampling".
DEFAULT_TTL_S = 24 * 3600.0
# About 8 bytes per token (an int32 token, a float32 logprob): 16M tokens is about 128 MB.
DEFAULT_MAX_TOKENS = 16_000_000
# How many removed sequence ids are remembered, to say why one is gone (about 100 bytes each).
_GONE_KEPT = 65536


@dataclass
class _Record:
    owner: str
    prompt: np.ndarray  # int32, shared by the sequences of one request
    tokens: np.ndarray  # int32
    logprobs: np.ndarray  # float32
    last_used: float

    @property
    def size(self) -> int:
        return len(self.prompt) + len(self.tokens)


class StabilityRecords:
    """The records of one server, by ``sequence_id``, least recently used first."""

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.max_tokens, self._clock = ttl_s, max_tokens, clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()  # sequence id -> (owner, why)
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._records)

    @property
    def recorded_tokens(self) -> int:
        return self._tokens

    def record(self, owner: str, sampler_id: str, seq_id: int, prompt: Sequence[int], response: SampleResponse) -> None:
        """Record every sequence of ``response`` (sequence ids ``<sampler_id>/<seq_id>/<i>``)."""
        now = self._clock()
        shared_prompt = np.asarray(prompt, dtype=np.int32)
        for i, sequence in enumerate(response.sequences):
            if sequence.logprobs is None:  # both samplers always return them
                raise ServiceError(500, "record_stability_info: the sampler returned no logprobs")
            sequence_id = f"{sampler_id}/{seq_id}/{i}"
            old = self._records.pop(sequence_id, None)
            if old is not None:  # a re-sent request: same sequence, recorded once
                self._tokens -= old.size
            entry = _Record(
                owner,
                shared_prompt,
                np.asarray(sequence.tokens, dtype=np.int32),
                np.asarray(sequence.logprobs, dtype=np.float32),
                now,
            )
            self._records[sequence_id] = entry
            self._tokens += entry.size
        self._evict(now)

    def _evict(self, now: float) -> None:
        while self._records:
            oldest = next(iter(self._records.values()))
            expired = now - oldest.last_used > self.ttl_s
            if self._tokens <= self.max_tokens and not expired:
                return
            sequence_id, entry = self._records.popitem(last=False)
            self._tokens -= entry.size
            self._forget(sequence_id, entry.owner, self._expired_why() if expired else self._dropped_why())

    def _expired_why(self) -> str:
        return f"expired: unused for more than {self.ttl_s:g} s (tinker-server --stability-ttl-s)"

    def _dropped_why(self) -> str:
        return (
            f"was dropped: this server keeps at most {self.max_tokens} recorded tokens, the least recently "
            "used go first (tinker-server --stability-max-tokens)"
        )

    def _forget(self, sequence_id: str, owner: str, why: str) -> None:
        self._gone[sequence_id] = (owner, why)
        while len(self._gone) > _GONE_KEPT:
            self._gone.popitem(last=False)

    def _use(self, sequence_id: str, owner: str, field: str) -> _Record:
        """The live record (``resolve`` has evicted the expired ones), or a 400 saying why not."""
        entry = self._records.get(sequence_id)
        if entry is not None and entry.owner == owner:
            return entry
        gone = self._gone.get(sequence_id)
        if gone is not None and gone[0] == owner:
            raise ServiceError(400, f"{field}: sequence_id {sequence_id!r} {gone[1]}; sample it again")
        raise ServiceError(
            400,
            f"{field}: unknown sequence_id {sequence_id!r}: it must come from a sampler of this API key "
            f"created with record_stability_info=True, on this server process (records are kept in memory)",
        )

    def resolve(self, request: wire.ForwardBackward, owner: str) -> wire.ForwardBackward:
        """``request`` with each datum's ``logprobs`` and ``sampled_mask`` taken from the records.

        Raises a 400 naming the datum and span for missing or bad provenance. Every record the
        request uses restarts its day, and moves to the back of the eviction order.
        """
        now = self._clock()
        self._evict(now)
        used: dict[str, _Record] = {}
        data = [self._resolve_datum(datum, i, owner, used) for i, datum in enumerate(request.data)]
        for sequence_id, entry in used.items():
            entry.last_used = now
            self._records.move_to_end(sequence_id)
        return wire.ForwardBackward(
            model_id=request.model_id,
            seq_id=request.seq_id,
            data=data,
            loss_fn=request.loss_fn,
            loss_fn_config=request.loss_fn_config,
            forward_only=request.forward_only,
        )

    def _resolve_datum(self, datum: Datum, i: int, owner: str, used: dict[str, _Record]) -> Datum:
        if datum.model_input_spans is None or datum.loss_fn_input_spans is None:
            raise ServiceError(
                400,
                f"data[{i}].loss_fn_input_spans: expected provenance spans (stable_reinforce needs them; "
                "attach them with Datum.with_provenance), got none",
            )
        targets = datum.loss_fn_inputs.get("target_tokens")
        if targets is None or targets.shape not in (None, [targets.numel]):
            raise ServiceError(400, f"data[{i}].loss_fn_inputs['target_tokens']: expected a 1-D tensor for stable_reinforce")

        def lookup(sequence_id: str, field: str) -> _Record:
            entry = used.get(sequence_id) or self._use(sequence_id, owner, field)
            used[sequence_id] = entry
            return entry

        model_input = datum.model_input.to_ints()
        self._walk(model_input, datum.model_input_spans, f"data[{i}].model_input_spans", lookup, None)
        n = len(model_input)
        q, mask = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
        target_list = [int(t) for t in targets.data]
        self._walk(target_list, datum.loss_fn_input_spans, f"data[{i}].loss_fn_input_spans", lookup, (q, mask))
        inputs = dict(datum.loss_fn_inputs)
        inputs["logprobs"] = TensorData(data=q.tolist(), dtype="float32", shape=[n])
        inputs["sampled_mask"] = TensorData(data=mask.tolist(), dtype="float32", shape=[n])
        return Datum(
            model_input=datum.model_input,
            loss_fn_inputs=inputs,
            model_input_spans=datum.model_input_spans,
            loss_fn_input_spans=datum.loss_fn_input_spans,
        )

    @staticmethod
    def _walk(
        tokens: list[int],
        spans: list[ProvenanceSpan],
        field: str,
        lookup: Callable[[str, str], _Record],
        out: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        """Check that ``spans`` tile ``tokens`` and that each names tokens equal to the datum's.

        Prompt positions among the targets are not compared: the cookbook's ``rl_loop`` puts
        dummy targets (0) there, where the loss has nothing to train. ``out`` (the targets'
        walk) receives the recorded logprob and a 1 at each sampled position.
        """
        total = sum(span.length for span in spans)
        if total != len(tokens):
            raise ServiceError(
                400, f"{field}: expected spans that tile the field's {len(tokens)} positions, got lengths summing to {total}"
            )
        position = 0
        for j, span in enumerate(spans):
            where = f"{field}[{j}]"
            entry = lookup(span.sequence_id, f"{where}.sequence_id")
            prompt = isinstance(span, PromptProvenanceSpan)
            source = entry.prompt if prompt else entry.tokens
            kind = "prompt" if prompt else "sampled tokens"
            if span.offset + span.length > len(source):
                raise ServiceError(
                    400,
                    f"{where}: expected offset + length <= {len(source)} (the {kind} of {span.sequence_id!r}), "
                    f"got {span.offset} + {span.length}",
                )
            window = slice(span.offset, span.offset + span.length)
            if not (prompt and out is not None):
                claimed = source[window]
                actual = np.asarray(tokens[position : position + span.length], dtype=np.int32)
                if not np.array_equal(claimed, actual):
                    k = int(np.argmax(claimed != actual))
                    raise ServiceError(
                        400,
                        f"{where}: expected the datum's tokens to equal the {kind} of {span.sequence_id!r} at "
                        f"{span.offset}..{span.offset + span.length - 1}; position {position + k} is "
                        f"{int(actual[k])}, the record has {int(claimed[k])} (at {span.offset + k})",
                    )
            if out is not None and not prompt:
                q, mask = out
                q[position : position + span.length] = entry.logprobs[window]
                mask[position : position + span.length] = 1.0
            position += span.length
