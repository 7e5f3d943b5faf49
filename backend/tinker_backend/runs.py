"""Training runs: creating them, their ordered requests, and loading, reloading and unloading them.

A run is *loaded* when its adapter is in an engine and its queue in a scheduler. It is unloaded
when its session expires, and everything is unloaded by a restart; its first request after that
loads it again from its last ``save_state`` when that reproduces its state exactly (no request
that changed the adapter was answered after the save), else every request answers 410. Ordered
requests (``seq_id``) always take their place in the run's order, even when rejected, so the
requests after them never wait on a gap (see ``docs/operations.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from tinker import wire
from tinker.types import (
    GetInfoResponse,
    LoadWeightsResponse,
    LoraConfig,
    ModelData,
    OptimStepResponse,
    TrainingRun,
)
from tinker.validation import InvalidInput, check_data_for_model, check_forward_backward, check_lora_rank
from tinker_backend.checkpoint_index import as_checkpoint, save_answer
from tinker_backend.engine.protocol import CheckedFwdBwdItem, Engine
from tinker_backend.errors import ServiceError, as_service_error
from tinker_backend.scheduler import ModelScheduler, Work
from tinker_backend.state import Shared
from tinker_backend.store import RunRecord, now_iso

logger = logging.getLogger("tinker_backend")

# Builds the work of an ordered request for a loaded run (validating it first).
WorkBuilder = Callable[[Any, RunRecord, str, ModelScheduler], Awaitable[Work]]


class Runs:
    """Every training run of the data dir: records in the store, loaded ones in engines."""

    def __init__(self, shared: Shared) -> None:
        self.store, self.ledger, self.engines = shared.store, shared.ledger, shared.engines
        self.checkpoints, self.limits = shared.checkpoints, shared.limits
        self.history, self.metrics, self.writes = shared.history, shared.metrics, shared.writes
        self._load_lock = shared.load_lock  # one load, unload or create at a time (with samplers)
        self._loaded: dict[str, RunRecord] = {}  # run id -> record, for runs in an engine
        self._restored_floor: dict[str, int] = {}  # run id -> its seq_ids up to this ran before a reload

    # --- lookups ----------------------------------------------------------------------------------

    def get(self, run_id: str, owner: str) -> RunRecord:
        """The owner's run (404 for anyone else's); counts as activity of its session."""
        run = self.store.get_run(run_id)
        if run is None or run.owner != owner:
            raise ServiceError(404, f"model_id: unknown training run {run_id!r}")
        self.ledger.touch(run.session_id)
        return run

    def loaded_in_session(self, session_id: str) -> list[RunRecord]:
        return [run for run in self._loaded.values() if run.session_id == session_id]

    async def info(self, run: RunRecord) -> GetInfoResponse:
        config = LoraConfig(**run.lora_config)
        return GetInfoResponse(
            model_id=run.run_id,
            model_data=ModelData(
                arch=await self.engines.architecture(run.base_model),
                model_name=run.base_model,
                tokenizer_id=run.base_model,
            ),
            lora_rank=config.rank,
            model_name=run.base_model,
            lora_config=config,
        )

    def training_run(self, run: RunRecord) -> TrainingRun:
        checkpoints = self.store.list_checkpoints(run.run_id)
        weights = [c for c in checkpoints if c.kind == "weights"]
        sampler_weights = [c for c in checkpoints if c.kind == "sampler_weights"]
        return TrainingRun(
            training_run_id=run.run_id,
            base_model=run.base_model,
            model_owner=run.owner,
            lora_rank=run.lora_config.get("rank"),
            last_request_time=run.last_request_time,
            last_checkpoint=as_checkpoint(weights[-1]) if weights else None,
            last_sampler_checkpoint=as_checkpoint(sampler_weights[-1]) if sampler_weights else None,
            user_metadata=run.user_metadata or None,
        )

    # --- creating runs ----------------------------------------------------------------------------

    async def create(self, request: wire.CreateModel, owner: str) -> wire.ModelCreated:
        check_lora_rank(request.lora_config.rank, self.limits.max_lora_rank)
        run_id = _run_id(request)
        return await self._new_run(
            request, owner, request.base_model, lambda engine: engine.create_adapter(run_id, request.lora_config),
            request.user_metadata,
        )

    async def create_from_state(self, request: wire.CreateModelFromState, owner: str) -> wire.ModelCreated:
        source = self.checkpoints.lookup(request.path, owner, kind="weights")  # the owner's or a published one
        directory, run_id = self.checkpoints.directory(source), _run_id(request)

        async def remember_origin(record: RunRecord, scheduler: ModelScheduler) -> None:
            record.origin_path, record.origin_with_optimizer = source.tinker_path, request.with_optimizer

        return await self._new_run(
            request, owner, self.checkpoints.base_model(source),
            lambda engine: engine.load_state(run_id, directory, request.with_optimizer), {}, remember_origin,
        )

    async def create_from_adapter(self, request: wire.CreateModelFromAdapter, owner: str) -> wire.ModelCreated:
        """A new run from the PEFT LoRA adapter in ``adapter_dir``, a folder of this machine: only
        where local models are allowed (403 otherwise). The adapter is saved at once as the run's
        ``weights/imported`` checkpoint, from which the run reloads after a restart."""
        if not self.engines.allow_local_models:
            raise ServiceError(
                403,
                f"adapter_dir: expected a checkpoint of this server, got the local folder {request.adapter_dir!r} "
                "(tinker-server --allow-local-models reads those)",
            )
        directory = Path(request.adapter_dir)
        if not directory.is_absolute():
            raise ServiceError(400, f"adapter_dir: expected an absolute path, got {request.adapter_dir!r}")
        self.ledger.check_storage(owner, self.store.storage_bytes(owner))

        async def save_imported(record: RunRecord, scheduler: ModelScheduler) -> None:
            try:
                await scheduler.compute(self.checkpoints.save_work(record, "weights", "imported", None, 0))
            except BaseException:
                await scheduler.compute(lambda engine: engine.remove_adapter(record.run_id))
                raise

        return await self._new_run(
            request, owner, request.base_model, _importer(_run_id(request), directory, self.limits.max_lora_rank),
            request.user_metadata, save_imported,
        )

    async def _new_run(
        self,
        request: wire.CreateModel | wire.CreateModelFromState | wire.CreateModelFromAdapter,
        owner: str,
        base_model: str,
        load: Callable[[Engine], LoraConfig],
        metadata: dict[str, str],
        finish: Callable[[RunRecord, ModelScheduler], Awaitable[None]] | None = None,
    ) -> wire.ModelCreated:
        """Create run ``{session_id}:train:{model_seq_id}``: ``load`` puts its adapter in the engine
        (and returns its config), ``finish`` completes its record before it is stored. A re-sent
        create is answered again; a base model at ``max_runs`` answers 429."""
        run_id = _run_id(request)
        async with self._load_lock:
            existing = self.store.get_run(run_id)
            if existing is not None:  # a re-sent create: answer it again
                return wire.ModelCreated(model_id=run_id, info=await self.info(existing))
            scheduler = await self.engines.scheduler(base_model)
            if scheduler.run_count() >= self.limits.max_runs:
                raise ServiceError(
                    429,
                    f"base_model: {scheduler.base_model} already has {scheduler.run_count()} runs "
                    f"(max_runs {self.limits.max_runs})",
                )
            with self._claiming(owner, run_id):
                config = await scheduler.compute(load)
                record = self._record(run_id, request.session_id, owner, base_model, config, metadata)
                if finish is not None:
                    await finish(record, scheduler)
            self.store.add_run(record)
            self._mark_loaded(record, scheduler, next_seq=1)
        logger.info("created run %s on %s (rank %d)", run_id, base_model, config.rank)
        return wire.ModelCreated(model_id=run_id, info=await self.info(record))

    @staticmethod
    def _record(
        run_id: str, session_id: str, owner: str, base_model: str, config: LoraConfig, metadata: dict[str, str]
    ) -> RunRecord:
        return RunRecord(
            run_id=run_id,
            session_id=session_id,
            owner=owner,
            base_model=base_model,
            lora_config=msgspec.to_builtins(config),
            created_at=now_iso(),
            last_request_time=now_iso(),
            user_metadata=metadata,
        )

    @contextlib.contextmanager
    def _claiming(self, owner: str, run_id: str) -> Iterator[None]:
        """Count ``run_id`` against the owner's ``max_runs`` while it is being loaded (429 if full)."""
        self.ledger.claim_run(owner, run_id)
        try:
            yield
        except BaseException:
            self.ledger.release_run(owner, run_id)
            raise

    def _mark_loaded(self, run: RunRecord, scheduler: ModelScheduler, next_seq: int) -> None:
        """Bookkeeping once ``run``'s adapter is in the engine: its queue expects ``next_seq``."""
        scheduler.add_run(run.run_id, next_seq=next_seq)
        self.ledger.start_order(run.run_id, next_seq)
        self._loaded[run.run_id] = run
        self.ledger.touch(run.session_id)

    # --- ordered requests -------------------------------------------------------------------------

    async def run_ordered(self, request: wire.TrainingRequest, owner: str, build: WorkBuilder) -> Any:
        """Run request ``seq_id`` of its run in order: ``build`` validates it and makes its work.

        A request ``build`` rejects still takes its place in the order (and answers its error),
        so the requests the client sent after it do not wait forever on a gap.
        """
        arrived = time.time()
        run, scheduler, ran_before_reload = await self._order_of(request, owner)
        if ran_before_reload:
            return self._answer_from_before_reload(request, run)
        if isinstance(request, wire.SaveState | wire.SaveWeightsForSampler) and request.name is not None:
            self.ledger.check_storage(owner, self.store.storage_bytes(owner))  # 429: not started
        try:
            work = await build(request, run, owner, scheduler)
            mutating = _mutates(request)
        except (ServiceError, InvalidInput) as e:
            work, mutating = _failing(as_service_error(e)), False
        future = scheduler.submit(run.run_id, request.seq_id, work)
        self.ledger.accept_seq(run.run_id, request.seq_id)
        try:
            result = await future
        except asyncio.CancelledError:  # the server is stopping: no answer leaves
            raise
        except BaseException as e:
            # A ServiceError means it changed nothing: refused, or failed before it ran (its
            # session expired while it waited, say), so a reload must not refuse the run for it.
            await self._answered(run, request.seq_id, mutating and not isinstance(e, ServiceError))
            raise
        self.history.answered(run.run_id, request, result, arrived)  # its row commits with the answer
        await self._answered(run, request.seq_id, mutating)
        self.metrics.answered(run.base_model, request, result)
        return result

    async def release(self, request: wire.ReleaseSeq, owner: str) -> wire.Empty:
        """Skip ``seq_id``: its client reserved it and will never send it (a custom loss raised,
        a call was cancelled). It takes its place in the order without running anything, and is
        recorded when the run reaches it, so a restart cannot skip an earlier request in flight.
        A request that arrives after its release answers 409; one that came first is unaffected."""
        run, scheduler, ran_before_reload = await self._order_of(request, owner)
        if ran_before_reload:
            return wire.Empty()
        released = ServiceError(409, f"seq_id: {request.seq_id} of run {run.run_id!r} was released by its client")
        try:
            future = scheduler.submit(run.run_id, request.seq_id, _failing(released))
        except ServiceError:  # 409: it ran long ago
            return wire.Empty()
        self.ledger.accept_seq(run.run_id, request.seq_id)
        with contextlib.suppress(Exception):  # its own failure, or that of the request that came first
            await asyncio.shield(future)
        await self._answered(run, request.seq_id, mutating=False)
        return wire.Empty()

    async def _order_of(self, request: wire.TrainingRequest, owner: str) -> tuple[RunRecord, ModelScheduler, bool]:
        """The request's run, loaded, and its scheduler; and whether its ``seq_id`` ran before
        the run was last reloaded (its answer is gone, but for a save's)."""
        run = self._loaded.get(request.model_id)  # a loaded run's record: no store read per request
        if run is None or run.owner != owner:
            run = self.get(request.model_id, owner)
        else:
            self.ledger.touch(run.session_id)
        if request.seq_id < 1:
            raise ServiceError(400, f"seq_id: expected an int >= 1, got {request.seq_id}")
        scheduler = await self.engines.scheduler(run.base_model)
        await self._ensure_loaded(run, scheduler)
        return run, scheduler, request.seq_id <= self._restored_floor.get(run.run_id, 0)

    async def _answered(self, run: RunRecord, seq_id: int, mutating: bool) -> None:
        """Record, before the answer leaves, what a reload must not lose (see the store's doc);
        committed with the other answers of this event-loop turn (``WriteBatch``)."""
        await self.writes.record_answer(run.run_id, seq_id, mutating)
        self.ledger.touch(run.session_id)  # a session busy with long work is not idle

    async def training_work(self, request: Any, run: RunRecord, owner: str, scheduler: ModelScheduler) -> Work:
        """The ``WorkBuilder`` of forward/backward, optim_step, save_state, load_state and
        named save_weights_for_sampler requests."""
        match request:
            case wire.ForwardBackward():
                check_forward_backward(request.data, request.loss_fn, request.loss_fn_config)
                engine = await scheduler.engine()
                check_data_for_model(request.data, engine.vocab_size, engine.max_context_length)
                return CheckedFwdBwdItem(
                    run.run_id, request.data, request.loss_fn, request.loss_fn_config, not request.forward_only
                )
            case wire.OptimStep():
                params = request.adam_params
                return lambda engine: OptimStepResponse(metrics=engine.optim_step(run.run_id, params))
            case wire.SaveState():
                return self.checkpoints.save_work(run, "weights", request.name, request.ttl_seconds, request.seq_id)
            case wire.LoadState():
                return self._load_work(run, request, owner)
            case wire.SaveWeightsForSampler() if request.name is not None:
                return self.checkpoints.save_work(
                    run, "sampler_weights", request.name, request.ttl_seconds, request.seq_id
                )
        raise ServiceError(400, f"request: {type(request).__name__} is not a training request here")

    def _load_work(self, run: RunRecord, request: wire.LoadState, owner: str) -> Work:
        source = self.checkpoints.lookup(request.path, owner, kind="weights")
        directory, with_optimizer = self.checkpoints.directory(source), request.with_optimizer

        def work(engine: Engine) -> LoadWeightsResponse:
            engine.load_state(run.run_id, directory, with_optimizer)
            return LoadWeightsResponse(path=request.path)

        return work

    def reject_ordered(self, model_id: str, seq_id: int, owner: str, error: ServiceError) -> None:
        """Answer request ``seq_id`` of run ``model_id`` with ``error``, without running it.

        For requests rejected before they could be built (undecodable ones, say): they still
        take their place in the run's order, so the requests after them do not wait on a gap.
        Unknown runs and invalid seq_ids are ignored.
        """
        run = self.store.get_run(model_id)
        if run is None or run.owner != owner or seq_id < 1:
            return
        # Answered: a reload after a restart does not wait for it (see _ensure_loaded).
        self.store.record_answer(run.run_id, seq_id, mutating=False)
        scheduler = self.engines.loaded(run.base_model)
        if scheduler is not None and scheduler.has_run(run.run_id):
            with contextlib.suppress(ServiceError):
                scheduler.submit(run.run_id, seq_id, _failing(error))
                self.ledger.accept_seq(run.run_id, seq_id)

    # --- loading, reloading, unloading ------------------------------------------------------------

    async def _ensure_loaded(self, run: RunRecord, scheduler: ModelScheduler) -> None:
        """Load a run that is not loaded, exactly as it was after the last answer it gave.

        Its state is rebuilt from its latest ``save_state`` (or, with none, from how it started:
        its seed, or the checkpoint it was created from). That is exact when no request that
        changed the adapter was answered after that save; then its queue resumes after the
        last answered ``seq_id``, so the client's re-sent and new requests run correctly.
        Otherwise the unsaved state is gone and every request of the run answers 410.
        """
        if scheduler.has_run(run.run_id):
            return
        async with self._load_lock:
            if scheduler.has_run(run.run_id):
                return
            run = self.store.get_run(run.run_id) or run
            base_seq, source, with_optimizer = self._resume_point(run)
            if run.last_mutation_seq > base_seq:
                saved = f"its last save_state is seq_id {base_seq}" if base_seq else "it has no save_state"
                raise ServiceError(
                    410,
                    f"model_id: run {run.run_id!r} lost its unsaved state when the server restarted or its session "
                    f"expired: requests up to seq_id {run.last_mutation_seq} had changed it and {saved}. "
                    "Continue from a checkpoint with create_training_client_from_state_with_optimizer(path)",
                )
            config = LoraConfig(**run.lora_config)

            def load(engine: Engine) -> None:
                if engine.has_adapter(run.run_id):
                    engine.remove_adapter(run.run_id)
                if source is None:
                    engine.create_adapter(run.run_id, config)  # the stored config has the seed
                else:
                    engine.load_state(run.run_id, source, with_optimizer)

            with self._claiming(run.owner, run.run_id):
                await scheduler.compute(load)
            next_seq = max(base_seq, run.last_seq) + 1
            self._mark_loaded(run, scheduler, next_seq)
            self._restored_floor[run.run_id] = next_seq - 1
        logger.info("reloaded run %s at seq_id %d (from %s)", run.run_id, next_seq, source or "its seed")

    def _resume_point(self, run: RunRecord) -> tuple[int, Path | None, bool]:
        """(seq_id of the state, checkpoint directory or None for a fresh adapter, with optimizer)."""
        latest = self.store.latest_weights(run.run_id)
        if latest is not None:
            return latest.seq_id, self.checkpoints.directory(latest), True
        if run.origin_path is None:
            return 0, None, False
        run_id, _, rest = run.origin_path.removeprefix("tinker://").partition("/")
        kind, _, name = rest.partition("/")
        origin = self.store.get_checkpoint(run_id, kind, name)
        if origin is None:
            raise ServiceError(
                410,
                f"model_id: run {run.run_id!r} cannot be reloaded: the checkpoint it started from, "
                f"{run.origin_path!r}, was deleted or expired, and it has no save_state of its own",
            )
        return 0, self.checkpoints.directory(origin), run.origin_with_optimizer

    def _answer_from_before_reload(self, request: wire.TrainingRequest, run: RunRecord) -> Any:
        """A request that ran before the run was reloaded: only a save's answer can be given again."""
        saved = self.store.checkpoint_by_seq(run.run_id, request.seq_id)
        answer = None if saved is None else save_answer(saved, request)
        if answer is not None:
            return answer
        raise ServiceError(
            410,
            f"seq_id: request {request.seq_id} of run {run.run_id!r} ran before the server restarted (or its "
            "session expired) and its answer was lost",
        )

    async def unload(self, run: RunRecord) -> None:
        """Take the run out of its engine; its queued requests answer 410."""
        scheduler = await self.engines.scheduler(run.base_model)
        expired = ServiceError(410, f"model_id: the session of run {run.run_id!r} expired while this request waited")
        scheduler.remove_run(run.run_id, expired)

        def unload(engine: Engine) -> None:
            if engine.has_adapter(run.run_id):
                engine.remove_adapter(run.run_id)

        await scheduler.compute(unload)
        self._loaded.pop(run.run_id, None)
        self._restored_floor.pop(run.run_id, None)
        self.history.forget(run.run_id)
        self.ledger.release_run(run.owner, run.run_id)


def _run_id(request: wire.CreateModel | wire.CreateModelFromState | wire.CreateModelFromAdapter) -> str:
    return f"{request.session_id}:train:{request.model_seq_id}"


def _mutates(request: wire.TrainingRequest) -> bool:
    """Whether a training request changes the adapter (or its accumulated gradients)."""
    if isinstance(request, wire.ForwardBackward):
        return not request.forward_only
    return isinstance(request, wire.OptimStep | wire.LoadState)


def _importer(run_id: str, directory: Path, max_lora_rank: int) -> Callable[[Engine], LoraConfig]:
    """Compute-thread work: load the adapter in ``directory`` as ``run_id``'s (fresh optimizer);
    an adapter that cannot be used is a 400 that says why."""

    def work(engine: Engine) -> LoraConfig:
        try:
            config = engine.load_state(run_id, directory, include_optimizer=False)
        except (ValueError, OSError) as e:  # unreadable, unsupported, or does not fit the model
            raise ServiceError(400, f"adapter_dir: {e}") from e
        if config.rank > max_lora_rank:
            engine.remove_adapter(run_id)
            raise ServiceError(400, f"adapter_dir: expected a LoRA rank <= {max_lora_rank} (max_lora_rank), got {config.rank}")
        return config

    return work


def _failing(error: ServiceError) -> Work:
    """Work that answers ``error`` in the request's place in the order."""

    def work(engine: Engine) -> Any:
        raise error

    return work
