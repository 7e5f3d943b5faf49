"""The request handler: decode a native request, dispatch it to the module that owns its state, answer.

``RequestHandler.handle_encoded`` is the single entry point of both the embedded transport and
the server's WebSocket route, and ``handle`` that of the official ``/api/v1`` routes, so every
door answers identically. What the requests act on has one owner each:

* ``runs.Runs``: training runs, their ordered requests, loading, reloading and unloading;
* ``samplers.Samplers``: sampling sessions, snapshots, eviction, reload, sampling;
* ``checkpoint_index.CheckpointIndex``: saves, ``tinker://`` lookups, TTLs, recovery, sweeping;
* ``engines.EnginePool``: one scheduler and engine per base model;
* ``tenancy.Ledger``: per-key limits and session activity; ``store.Store``: SQLite.

Everything here runs on one event loop; compute goes to each base model's compute thread
through its ``ModelScheduler``. Input is checked with ``tinker.validation`` (the client's own
checks) before it can join a shared clock cycle; every lookup is scoped to the caller's owner
(anyone else's ids answer 404), and the ledger admits each request (429 over a limit). See
``docs/operations.md`` for restarts and session expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from tinker import wire
from tinker.types import (
    CheckpointsListResponse,
    Cursor,
    GetServerCapabilitiesResponse,
    GetSessionResponse,
    ListSessionsResponse,
    LoraConfig,
    TrainingRunsResponse,
    WeightsInfoResponse,
)
from tinker.validation import InvalidInput
from tinker_backend.checkpoint_index import CheckpointIndex, as_checkpoint
from tinker_backend.engines import EnginePool
from tinker_backend.errors import ServiceError, as_service_error
from tinker_backend.history import MAX_POINTS_PER_RUN, RunHistory
from tinker_backend.limits import Limits
from tinker_backend.metrics import ServerMetrics
from tinker_backend.runs import Runs
from tinker_backend.samplers import Samplers
from tinker_backend.scheduler import ModelScheduler, Work
from tinker_backend.state import Shared
from tinker_backend.store import RunRecord, Store, iso_in
from tinker_backend.tenancy import KeyLimits, Ledger, RateLimited
from tinker_backend.workers.config import Deployment
from tinker_backend.write_batch import WriteBatch

logger = logging.getLogger("tinker_backend")

# How often expired checkpoints and sessions are swept (at most; shorter session timeouts sweep
# more often). A checkpoint is invisible from its expiry on; the sweep only reclaims the disk.
_SWEEP_INTERVAL_S = 30.0
# Finished HTTP-protocol futures are remembered this long (to answer "lost" or "done" precisely).
_FUTURE_RECORD_S = 24 * 3600


class _SeqProbe(msgspec.Struct):
    """Just enough of a training request to find its place in a run's order."""

    model_id: str | None = None
    seq_id: int | None = None


class RequestHandler:
    """Answers the native requests of every client of one data dir."""

    def __init__(
        self,
        data_dir: Path,
        *,
        limits: Limits | None = None,
        key_limits: KeyLimits | None = None,
        session_timeout_s: float | None = None,
        allow_local_models: bool = True,
        sampler: str | None = None,
        deployment: Deployment | None = None,
    ) -> None:
        """``key_limits`` (per API key) and ``session_timeout_s`` default to none, as the embedded
        backend wants; ``allow_local_models=False`` refuses base models named by a local folder.
        ``sampler`` is ``"torch"`` or ``"vllm"`` (default: ``$TINKER_SAMPLER``, else torch);
        ``deployment``: where each base model runs (default: in this process)."""
        self.limits = limits or Limits()
        self.engines = EnginePool(
            Path(data_dir), self.limits, sampler=sampler, allow_local_models=allow_local_models, deployment=deployment
        )
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.data_dir / "tinker.sqlite3")
        self.ledger = Ledger(key_limits or KeyLimits(), session_timeout_s)
        self.checkpoints = CheckpointIndex(self.store, self.data_dir)
        self.writes = WriteBatch(self.store, MAX_POINTS_PER_RUN)
        self.history = RunHistory(self.store, write=self.writes.add_history)
        self.metrics = ServerMetrics()
        self.metrics.watch(self)
        shared = Shared(
            self.store, self.ledger, self.engines, self.checkpoints, self.limits, self.history, self.metrics,
            self.writes,
        )
        self._load_lock = shared.load_lock  # one run or sampler loads or unloads at a time
        self.runs = Runs(shared)
        self.samplers = Samplers(shared, self.runs)
        self._sweeper: asyncio.Task[None] | None = None
        self.checkpoints.recover()

    # --- entry points ---------------------------------------------------------------------------

    async def handle_encoded(self, data: bytes, owner: str) -> bytes | wire.Failure:
        """Decode, validate and run one request; return the encoded response or a ``Failure``."""
        try:
            request = wire.request_decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            error = ServiceError(400, f"invalid request: {e}")
            self._fill_seq_slot(data, owner, error)
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

    def _fill_seq_slot(self, data: bytes, owner: str, error: ServiceError) -> None:
        """An undecodable training request still takes its seq_id, so later ones are not stuck."""
        try:
            probe = msgspec.msgpack.decode(data, type=_SeqProbe)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        if probe.model_id is not None and probe.seq_id is not None:
            self.runs.reject_ordered(probe.model_id, probe.seq_id, owner, error)

    def reject_ordered(self, model_id: str, seq_id: int, owner: str, error: ServiceError) -> None:
        """Answer request ``seq_id`` of run ``model_id`` with ``error`` without running it (see
        ``Runs.reject_ordered``); for the official routes' requests that cannot be built."""
        self.runs.reject_ordered(model_id, seq_id, owner, error)

    async def handle(self, request: wire.Request, owner: str) -> Any:
        """Run one decoded request for ``owner``: admitted by the ledger (or 429), then dispatched.
        A validation error is a 400 with its message."""
        self._start_sweeper()
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            self.ledger.enter(owner, exempt=self._exempt(request))
        except RateLimited as e:
            self.metrics.request_done(request, started, e)
            raise
        try:
            return await self._dispatch(request, owner)
        except InvalidInput as e:
            error = as_service_error(e)
            raise error from e
        except BaseException as e:
            error = e
            raise
        finally:
            self.ledger.leave(owner)
            if not isinstance(error, asyncio.CancelledError):
                self.metrics.request_done(request, started, error)

    def check_admission(self, request: wire.Request, owner: str) -> None:
        """Raise ``RateLimited`` (a 429) if ``handle(request, owner)`` would be refused now.

        For the HTTP protocol, which accepts a request into its future table before running
        it: checking first makes a refusal an HTTP 429 the SDK retries, not a failed future.
        """
        self.ledger.check(owner, exempt=self._exempt(request))

    def _exempt(self, request: wire.Request) -> bool:
        """Heartbeats, and the request a run's queued requests wait for, are never refused."""
        if isinstance(request, wire.Heartbeat):
            return True
        return isinstance(request, wire.TrainingRequest) and self.ledger.fills_gap(request.model_id, request.seq_id)

    async def _dispatch(self, request: wire.Request, owner: str) -> Any:
        match request:
            case wire.Heartbeat():
                self._touch_session(request.session_id, owner)
                return wire.Empty()
            case wire.CreateSession():
                session_id = str(uuid.uuid4())
                self.store.add_session(session_id, owner, request.user_metadata)
                self.ledger.touch(session_id)
                return wire.SessionCreated(session_id=session_id)
            case wire.CreateModel():
                self._touch_session(request.session_id, owner)
                return await self.runs.create(request, owner)
            case wire.CreateModelFromState():
                self._touch_session(request.session_id, owner)
                return await self.runs.create_from_state(request, owner)
            case wire.CreateModelFromAdapter():
                self._touch_session(request.session_id, owner)
                return await self.runs.create_from_adapter(request, owner)
            case wire.GetInfo():
                return await self.runs.info(self.runs.get(request.model_id, owner))
            case wire.GetServerCapabilities():
                return GetServerCapabilitiesResponse(supported_models=self.engines.capabilities())
            case wire.GetTokenizer():
                files = await asyncio.to_thread(self.engines.tokenizer_files, request.base_model)
                return wire.TokenizerFiles(files=files)
            case wire.SaveWeightsForSampler() if request.name is None:
                result = await self.runs.run_ordered(request, owner, self.samplers.snapshot_work)
                await self.samplers.evict_snapshots(self.runs.get(request.model_id, owner))
                return result
            case wire.ForwardBackward() if request.loss_fn == "stable_reinforce":
                return await self.runs.run_ordered(request, owner, self._stable_reinforce_work)
            case wire.ForwardBackward() | wire.OptimStep() | wire.SaveState() | wire.LoadState():
                return await self.runs.run_ordered(request, owner, self.runs.training_work)
            case wire.SaveWeightsForSampler():
                return await self.runs.run_ordered(request, owner, self.runs.training_work)
            case wire.ReleaseSeq():
                return await self.runs.release(request, owner)
            case wire.CreateSamplingSession():
                return await self.samplers.create(request, owner)
            case wire.GetSampler():
                sampler = self.samplers.get(request.sampling_session_id, owner)
                return wire.SamplingSessionCreated(sampler.sampler_id, sampler.base_model, sampler.model_path)
            case wire.Sample():
                return await self.samplers.sample(request, owner)
            case _:
                return await self._dispatch_rest(request, owner)

    async def _dispatch_rest(self, request: wire.Request, owner: str) -> Any:
        """The REST-style requests: runs, checkpoints and sessions as records."""
        match request:
            case wire.SaveWeightsExternal():
                return await self.runs.run_ordered(request, owner, self._external_work)
            case wire.ListTrainingRuns():
                runs, total = self.store.list_runs(owner, request.limit, request.offset)
                return TrainingRunsResponse(
                    training_runs=[self.runs.training_run(r) for r in runs],
                    cursor=Cursor(offset=request.offset, limit=request.limit, total_count=total),
                )
            case wire.GetTrainingRun():
                return self.runs.training_run(self.runs.get(request.training_run_id, owner))
            case wire.ListCheckpoints():
                run = self.runs.get(request.training_run_id, owner)
                return CheckpointsListResponse(
                    checkpoints=[as_checkpoint(c) for c in self.store.list_checkpoints(run.run_id)]
                )
            case wire.ListUserCheckpoints():
                records, total = self.store.list_user_checkpoints(owner, request.limit, request.offset)
                return CheckpointsListResponse(
                    checkpoints=[as_checkpoint(c) for c in records],
                    cursor=Cursor(offset=request.offset, limit=request.limit, total_count=total),
                )
            case wire.ListSessions():
                return ListSessionsResponse(sessions=self.store.list_sessions(owner, request.limit, request.offset))
            case wire.GetSession():
                return self._session(request.session_id, owner)
        return await self._checkpoint_request(request, owner)

    async def _checkpoint_request(self, request: wire.Request, owner: str) -> Any:
        """Requests on one checkpoint, named by its ``tinker://`` path."""
        match request:
            case wire.DeleteCheckpoint():
                await self.checkpoints.delete(request.tinker_path, owner)
                return wire.Empty()
            case wire.SetCheckpointTtl():
                self.checkpoints.set_ttl(request.tinker_path, owner, request.ttl_seconds)
                return wire.Empty()
            case wire.PublishCheckpoint():
                self.checkpoints.set_published(request.tinker_path, owner, request.published)
                return wire.Empty()
            case wire.GetWeightsInfo():
                record = self.checkpoints.lookup(request.tinker_path, owner)
                run = self.store.get_run(record.run_id)
                if run is None:
                    raise ServiceError(404, f"tinker_path: the training run of {request.tinker_path!r} is gone")
                config = LoraConfig(**run.lora_config)
                return WeightsInfoResponse(
                    base_model=run.base_model,
                    lora_rank=config.rank,
                    train_mlp=config.train_mlp,
                    train_attn=config.train_attn,
                    train_unembed=config.train_unembed,
                )
            case wire.GetExternalWeightsUrls():
                record = self.checkpoints.lookup(request.tinker_path, owner)
                return self.checkpoints.signed_urls(record, request.base_url)
            case wire.DownloadCheckpoint():
                record = self.checkpoints.lookup(request.tinker_path, owner)
                return wire.CheckpointFiles(files=await asyncio.to_thread(self.checkpoints.read_files, record))
        raise ServiceError(400, f"request: unsupported type {type(request).__name__}")

    async def _stable_reinforce_work(
        self, request: wire.ForwardBackward, run: RunRecord, owner: str, scheduler: ModelScheduler
    ) -> Work:
        """The ``WorkBuilder`` of a ``stable_reinforce`` forward/backward: the provenance spans
        checked against the sampling records and turned into the loss's inputs first."""
        resolved = self.samplers.stability.resolve(request, owner)
        return await self.runs.training_work(resolved, run, owner, scheduler)

    async def _external_work(
        self, request: wire.SaveWeightsExternal, run: RunRecord, owner: str, scheduler: ModelScheduler
    ) -> Work:
        """The ``WorkBuilder`` of ``save_weights_external``: an ``external_weights`` checkpoint."""
        return self.checkpoints.save_work(run, "external_weights", request.name, request.ttl_seconds, request.seq_id)

    def _session(self, session_id: str, owner: str) -> GetSessionResponse:
        session = self.store.get_session(session_id)
        if session is None or session.owner != owner:
            raise ServiceError(404, f"session_id: unknown session {session_id!r}")
        run_ids, sampler_ids = self.store.session_members(session_id)
        return GetSessionResponse(
            training_run_ids=run_ids, sampler_ids=sampler_ids, user_metadata=session.user_metadata or None
        )

    def _touch_session(self, session_id: str, owner: str) -> None:
        """Check that ``session_id`` is the owner's, and count this request as its activity."""
        if self.store.session_owner(session_id) != owner:
            raise ServiceError(404, f"session_id: unknown session {session_id!r}")
        self.ledger.touch(session_id)

    # --- housekeeping ---------------------------------------------------------------------------

    async def expire_sessions(self) -> list[str]:
        """Unload the runs and samplers of every session idle for the session timeout."""
        expired = []
        for session_id in self.ledger.expired_sessions():
            async with self._load_lock:  # no run of it is being loaded meanwhile
                if not self.ledger.is_expired(session_id):  # it was used while we waited
                    continue
                self.ledger.forget(session_id)
                runs = self.runs.loaded_in_session(session_id)
                for run in runs:
                    await self.runs.unload(run)
                    self.samplers.forget_run(run.run_id)
                await self.samplers.unload_session(session_id)
            expired.append(session_id)
            if runs:
                logger.info("session %s expired: unloaded %d runs", session_id, len(runs))
        return expired

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
                self.checkpoints.delete_expired()
                self.store.prune_futures(iso_in(-_FUTURE_RECORD_S))
            except Exception:  # a sweep must never stop sweeping
                logger.exception("housekeeping sweep failed")

    def close(self) -> None:
        self.writes.flush()
        self.checkpoints.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.engines.close()
        self.store.close()
