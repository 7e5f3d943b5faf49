"""Samplers: sampling sessions, in-memory snapshots of runs, their eviction and reload, sampling.

A sampler is a frozen adapter that ``sample`` can use (``{session_id}:sample:{n}``): a named
``sampler_weights`` checkpoint, an in-memory snapshot of a run (from
``save_weights_and_get_sampling_client``), or the base model alone. Snapshots are capped per run
(``ephemeral_samplers_per_run``): making one more unloads the run's oldest, which then answers
410. A checkpoint sampler unloaded with its session is loaded again on first use; a snapshot
cannot come back. A re-sent ``(sampler, seq_id)`` gets the first answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import OrderedDict
from typing import Any

import msgspec

from tinker import wire
from tinker.types import SampleResponse, SaveWeightsForSamplerResponse
from tinker.validation import check_sample, check_sample_for_model
from tinker_backend.engine.protocol import Engine
from tinker_backend.errors import ServiceError
from tinker_backend.runs import Runs
from tinker_backend.scheduler import ModelScheduler, Work
from tinker_backend.stability import StabilityRecords
from tinker_backend.state import Shared
from tinker_backend.store import RunRecord, SamplerRecord, now_iso

logger = logging.getLogger("tinker_backend")

# Sample answers kept for de-duplicating re-sent sample requests.
_SAMPLE_ANSWER_WINDOW = 16384


class Samplers:
    """Every sampler of the data dir: records in the store, loaded ones in engines."""

    def __init__(self, shared: Shared, runs: Runs) -> None:
        self.store, self.ledger, self.engines = shared.store, shared.ledger, shared.engines
        self.checkpoints, self.limits = shared.checkpoints, shared.limits
        self.history, self.metrics = shared.history, shared.metrics
        self._load_lock = shared.load_lock
        self.runs = runs
        self._loaded: set[str] = set()  # sampler ids with an adapter in an engine
        self._by_session: dict[str, set[str]] = {}  # session id -> its loaded sampler ids
        self._snapshots: dict[str, list[str]] = {}  # run id -> its loaded snapshots, oldest first
        self._evicted: dict[str, set[str]] = {}  # session id -> its snapshots unloaded by the cap
        self._answers: OrderedDict[tuple[str, int], asyncio.Future[SampleResponse]] = OrderedDict()
        self._history_run: dict[str, str | None] = {}  # sampler id -> the run whose history counts its tokens
        # What stable_reinforce needs from sampling.
        self.stability = StabilityRecords(self.limits.stability_ttl_s, self.limits.stability_max_tokens)

    def is_loaded(self, sampler_id: str) -> bool:
        """Whether the sampler's adapter is in an engine now (for the console)."""
        return sampler_id in self._loaded

    def _add_loaded(self, sampler_id: str, session_id: str) -> None:
        self._loaded.add(sampler_id)
        self._by_session.setdefault(session_id, set()).add(sampler_id)

    # --- sessions ---------------------------------------------------------------------------------

    async def create(self, request: wire.CreateSamplingSession, owner: str) -> wire.SamplingSessionCreated:
        sampler_id = request.sampling_session_id
        session_id, _, number = sampler_id.partition(":sample:")
        if not number.isdigit():
            raise ServiceError(400, f"sampling_session_id: expected '<session_id>:sample:<n>', got {sampler_id!r}")
        if self.store.session_owner(session_id) != owner:
            raise ServiceError(404, f"session_id: unknown session {session_id!r}")
        self.ledger.touch(session_id)
        existing = self.store.get_sampler(sampler_id)
        if existing is not None:
            return wire.SamplingSessionCreated(sampler_id, existing.base_model, existing.model_path)
        if request.model_path is not None:
            source = self.checkpoints.lookup(request.model_path, owner)  # the owner's or a published one
            base_model = self.checkpoints.base_model(source)
            directory = self.checkpoints.directory(source)
            try:
                await (await self.engines.scheduler(base_model)).compute(lambda e: e.load_sampler(sampler_id, directory))
            except ValueError as e:  # the adapter does not fit, or the sampler cannot serve it
                raise ServiceError(400, str(e)) from e
            self._add_loaded(sampler_id, session_id)
        elif request.base_model is not None:
            base_model = request.base_model
            await (await self.engines.scheduler(base_model)).engine()
        else:
            raise ServiceError(400, "model_path, base_model: expected one of them, got neither")
        self.store.add_sampler(SamplerRecord(sampler_id, session_id, owner, base_model, request.model_path, now_iso()))
        return wire.SamplingSessionCreated(sampler_id, base_model, request.model_path)

    def get(self, sampler_id: str, owner: str) -> SamplerRecord:
        sampler = self.store.get_sampler(sampler_id)
        if sampler is None or sampler.owner != owner:
            raise ServiceError(404, f"sampling_session_id: unknown sampler {sampler_id!r}")
        return sampler

    # --- snapshots of runs ------------------------------------------------------------------------

    async def snapshot_work(self, request: Any, run: RunRecord, owner: str, scheduler: ModelScheduler) -> Work:
        """The ``WorkBuilder`` of an unnamed ``save_weights_for_sampler``: snapshot the run's
        adapter into the in-memory sampler ``request.sampling_session_id`` (chosen by the client)."""
        sampler_id = request.sampling_session_id
        if sampler_id is None or not sampler_id.startswith(f"{run.session_id}:sample:"):
            raise ServiceError(400, f"sampling_session_id: expected '{run.session_id}:sample:<n>', got {sampler_id!r}")

        def work(engine: Engine) -> SaveWeightsForSamplerResponse:
            if sampler_id not in self._loaded:
                try:
                    engine.snapshot_sampler(run.run_id, sampler_id)
                except ValueError as e:  # the sampler cannot serve this adapter
                    raise ServiceError(400, str(e)) from e
                self._add_loaded(sampler_id, run.session_id)
                self._snapshots.setdefault(run.run_id, []).append(sampler_id)
                record = SamplerRecord(
                    sampler_id, run.session_id, owner, run.base_model, f"ephemeral://{run.run_id}", now_iso()
                )
                self.store.add_sampler(record)
            return SaveWeightsForSamplerResponse(sampling_session_id=sampler_id)

        return work

    async def evict_snapshots(self, run: RunRecord) -> None:
        """Unload the run's oldest snapshots beyond ``ephemeral_samplers_per_run``.

        An RL loop makes one per step; without the cap a long run would hold every one of them
        until its session expires. Requests to an evicted one answer 410 (``_evicted_error``).
        """
        snapshots = self._snapshots.get(run.run_id, [])
        while len(snapshots) > self.limits.ephemeral_samplers_per_run:
            oldest = snapshots.pop(0)
            self._evicted.setdefault(run.session_id, set()).add(oldest)
            self._by_session.get(run.session_id, set()).discard(oldest)
            try:
                await self._unload(oldest)
            except Exception:  # the snapshot just made is fine: its answer must not fail for this
                logger.exception("unloading the evicted sampler %s failed", oldest)

    def _evicted_error(self, sampler: SamplerRecord) -> ServiceError | None:
        """The 410 for a sampler that ``evict_snapshots`` unloaded, or None for any other."""
        if sampler.sampler_id not in self._evicted.get(sampler.session_id, ()):
            return None
        keep = self.limits.ephemeral_samplers_per_run
        return ServiceError(
            410,
            f"sampling_session_id: sampler {sampler.sampler_id!r} was evicted: each training run keeps only "
            f"its newest {keep} in-memory snapshots from save_weights_and_get_sampling_client "
            "(tinker-server --ephemeral-samplers-per-run). For a sampler that lasts, call "
            "save_weights_for_sampler(name) and create_sampling_client(model_path=path)",
        )

    # --- sampling ---------------------------------------------------------------------------------

    async def sample(self, request: wire.Sample, owner: str) -> SampleResponse:
        sampler = self.get(request.sampling_session_id, owner)
        self.ledger.touch(sampler.session_id)
        key = (request.sampling_session_id, request.seq_id)
        if key in self._answers:
            return await asyncio.shield(self._answers[key])
        if (sampler.model_path or "").startswith("tinker://"):  # its checkpoint still readable, or 410
            what = f"sampling_session_id: sampler {sampler.sampler_id!r}"
            self.checkpoints.check_still_readable(sampler.model_path or "", owner, what)
        prompt = request.prompt.to_ints()
        check_sample(len(prompt), request.num_samples, request.topk_prompt_logprobs)
        adapter = None if sampler.model_path is None else sampler.sampler_id
        if adapter is not None and adapter not in self._loaded:
            await self._reload(sampler, owner)
        scheduler = await self.engines.scheduler(sampler.base_model)
        engine = await scheduler.engine()
        check_sample_for_model(prompt, request.sampling_params, engine.vocab_size, engine.max_context_length)

        def submit(engine: Engine) -> concurrent.futures.Future[SampleResponse]:
            evicted = self._evicted_error(sampler)  # evicted since the check above
            if evicted is not None:
                raise evicted
            try:
                return engine.submit_sample(
                    adapter,
                    prompt,
                    request.num_samples,
                    request.sampling_params,
                    include_prompt_logprobs=request.include_prompt_logprobs,
                    topk_prompt_logprobs=request.topk_prompt_logprobs,
                )
            except (ValueError, KeyError) as e:  # the engine's checks name the field
                raise ServiceError(400, str(e.args[0]) if e.args else repr(e)) from e

        async def sample_and_record() -> SampleResponse:
            response = with_sequence_ids(await scheduler.sample(submit), request.sampling_session_id, request.seq_id)
            if request.record_stability_info:
                self.stability.record(owner, request.sampling_session_id, request.seq_id, prompt, response)
            return response

        future = asyncio.ensure_future(sample_and_record())
        self._answers[key] = future
        while len(self._answers) > _SAMPLE_ANSWER_WINDOW:
            self._answers.popitem(last=False)
        response = await asyncio.shield(future)
        self._count_sampled(sampler, response)
        return response

    def _count_sampled(self, sampler: SamplerRecord, response: SampleResponse) -> None:
        """Metrics, and the history of the run the sampler came from when it is the caller's."""
        self.metrics.sampled(sampler.base_model, response)
        if sampler.sampler_id not in self._history_run:  # a sampler's weights never change: look once
            scheme, _, rest = (sampler.model_path or "").partition("://")
            run = self.store.get_run(rest.partition("/")[0]) if scheme in ("ephemeral", "tinker") else None
            self._history_run[sampler.sampler_id] = run.run_id if run is not None and run.owner == sampler.owner else None
        run_id = self._history_run[sampler.sampler_id]
        if run_id is not None:
            self.history.sampled(run_id, sum(len(s.tokens) for s in response.sequences))

    # --- reload and unload ------------------------------------------------------------------------

    async def _reload(self, sampler: SamplerRecord, owner: str) -> None:
        """Load a named sampler again from its checkpoint; in-memory snapshots cannot come back."""
        evicted = self._evicted_error(sampler)
        if evicted is not None:
            raise evicted
        path = sampler.model_path or ""
        lost = (
            f"sampling_session_id: sampler {sampler.sampler_id!r} was lost when the server restarted or its "
            "session expired"
        )
        if not path.startswith("tinker://"):
            raise ServiceError(410, f"{lost}: it was an in-memory snapshot; call save_weights_and_get_sampling_client again")
        try:
            source = self.checkpoints.lookup(path, owner)
        except ServiceError as e:
            raise ServiceError(410, f"{lost}, and its checkpoint {path!r} is gone") from e
        directory = self.checkpoints.directory(source)
        async with self._load_lock:
            if sampler.sampler_id in self._loaded:
                return

            def load(engine: Engine) -> None:
                if engine.has_sampler(sampler.sampler_id):
                    engine.remove_sampler(sampler.sampler_id)
                engine.load_sampler(sampler.sampler_id, directory)

            await (await self.engines.scheduler(sampler.base_model)).compute(load)
            self._add_loaded(sampler.sampler_id, sampler.session_id)

    async def unload_session(self, session_id: str) -> None:
        """Unload every sampler of an expired session (named ones load again on use)."""
        self._evicted.pop(session_id, None)
        for sampler_id in self._by_session.pop(session_id, set()):
            await self._unload(sampler_id)

    def forget_run(self, run_id: str) -> None:
        """The run was unloaded: its snapshots go with its session, not with a cap."""
        self._snapshots.pop(run_id, None)

    async def _unload(self, sampler_id: str) -> None:
        self._loaded.discard(sampler_id)
        self._history_run.pop(sampler_id, None)
        self._answers = OrderedDict((k, v) for k, v in self._answers.items() if k[0] != sampler_id)
        record = self.store.get_sampler(sampler_id)
        scheduler = None if record is None else self.engines.loaded(record.base_model)
        if scheduler is None:
            return

        def unload(engine: Engine) -> None:
            if engine.has_sampler(sampler_id):
                engine.remove_sampler(sampler_id)

        await scheduler.compute(unload)


def with_sequence_ids(response: SampleResponse, sampler_id: str, seq_id: int) -> SampleResponse:
    """``response`` with each sequence named ``<sampler_id>/<seq_id>/<i>``, the ``sequence_id``
    that provenance spans use (the ``/api/v1`` protocol sends the same ids as ``sample_sequence_ids``)."""
    sequences = [
        msgspec.structs.replace(sequence, sequence_id=f"{sampler_id}/{seq_id}/{i}")
        for i, sequence in enumerate(response.sequences)
    ]
    return msgspec.structs.replace(response, sequences=sequences)
