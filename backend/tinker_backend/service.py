"""The backend: validates native requests and turns them into scheduled engine work.

``Backend.handle_encoded`` is the single entry point of both the embedded transport and the
server's WebSocket route, so the two answer identically. Everything here runs on one event
loop; compute goes to each base model's compute thread through its ``ModelScheduler``.
Bad input is rejected here, before it can join a shared clock cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgspec

from tinker import _wire
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
from tinker_backend import models
from tinker_backend.errors import ServiceError
from tinker_backend.scheduler import FwdBwdWork, ModelScheduler
from tinker_backend.store import CheckpointRecord, RunRecord, SamplerRecord, Store, now_iso

logger = logging.getLogger("tinker_backend")

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_KINDS = ("weights", "sampler_weights")
# Sample answers kept per backend for de-duplicating re-sent sample requests.
_SAMPLE_ANSWER_WINDOW = 16384


class _SeqProbe(msgspec.Struct):
    """Just enough of a training request to find its place in a run's order."""

    model_id: str | None = None
    seq_id: int | None = None


class Backend:
    """All sessions, runs and samplers of one data dir, and one scheduler per base model."""

    def __init__(self, data_dir: Path, *, max_lora_rank: int = 256) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.data_dir / "tinker.sqlite3")
        self.max_lora_rank = max_lora_rank
        self._schedulers: dict[str, ModelScheduler] = {}
        self._run_models: dict[str, str] = {}
        self._loaded_samplers: set[str] = set()
        self._sample_answers: OrderedDict[tuple[str, int], asyncio.Future[Any]] = OrderedDict()
        self._create_lock = asyncio.Lock()

    # --- entry point ----------------------------------------------------------------------------

    async def handle_encoded(self, data: bytes, owner: str) -> bytes | _wire.Failure:
        """Decode, validate and run one request; return the encoded response or a ``Failure``."""
        try:
            request = _wire.request_decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            error = ServiceError(400, f"invalid request: {e}")
            await self._fill_seq_slot(data, owner, error)
            return _wire.Failure(0, error.status, error.message, error.category)
        try:
            result = await self.handle(request, owner)
        except ServiceError as e:
            return _wire.Failure(0, e.status, e.message, e.category)
        except Exception as e:
            logger.exception("request %s failed", type(request).__name__)
            return _wire.Failure(0, 500, f"{type(e).__name__}: {e}", "server")
        return _wire.encoder.encode(result)

    async def _fill_seq_slot(self, data: bytes, owner: str, error: ServiceError) -> None:
        """An undecodable training request still takes its seq_id, so later ones are not stuck."""
        try:
            probe = msgspec.msgpack.decode(data, type=_SeqProbe)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        run = self.store.get_run(probe.model_id or "")
        if run is None or run.owner != owner or probe.seq_id is None or probe.seq_id < 1:
            return
        scheduler = self._schedulers.get(run.base_model)
        if scheduler is not None and scheduler.has_run(run.run_id):

            def work(engine: Any) -> Any:
                raise error

            with contextlib.suppress(ServiceError):
                scheduler.submit(run.run_id, probe.seq_id, work)

    async def handle(self, request: Any, owner: str) -> Any:
        match request:
            case _wire.CreateSession():
                session_id = str(uuid.uuid4())
                self.store.add_session(session_id, owner, request.user_metadata)
                return _wire.SessionCreated(session_id=session_id)
            case _wire.CreateModel():
                return await self._create_model(request, owner)
            case _wire.CreateModelFromState():
                return await self._create_model_from_state(request, owner)
            case _wire.GetInfo():
                return self._info(self._run(request.model_id, owner))
            case _wire.GetServerCapabilities():
                return GetServerCapabilitiesResponse(supported_models=models.list_models())
            case _wire.GetTokenizer():
                return _wire.TokenizerFiles(files=await asyncio.to_thread(self._tokenizer_files, request.base_model))
            case _wire.ForwardBackward() | _wire.OptimStep() | _wire.SaveState() | _wire.LoadState():
                return await self._training(request, owner)
            case _wire.SaveWeightsForSampler():
                return await self._training(request, owner)
            case _wire.CreateSamplingSession():
                return await self._create_sampling_session(request, owner)
            case _wire.Sample():
                return await self._sample(request, owner)
            case _wire.ListTrainingRuns():
                runs, total = self.store.list_runs(owner, request.limit, request.offset)
                return TrainingRunsResponse(
                    training_runs=[self._training_run(r) for r in runs],
                    cursor=Cursor(offset=request.offset, limit=request.limit, total_count=total),
                )
            case _wire.GetTrainingRun():
                return self._training_run(self._run(request.training_run_id, owner))
            case _wire.ListCheckpoints():
                run = self._run(request.training_run_id, owner)
                return CheckpointsListResponse(
                    checkpoints=[_checkpoint(c) for c in self.store.list_checkpoints(run.run_id)]
                )
            case _wire.ListUserCheckpoints():
                records, total = self.store.list_user_checkpoints(owner, request.limit, request.offset)
                return CheckpointsListResponse(
                    checkpoints=[_checkpoint(c) for c in records],
                    cursor=Cursor(offset=request.offset, limit=request.limit, total_count=total),
                )
            case _wire.DeleteCheckpoint():
                record = self._checkpoint(request.tinker_path, owner)
                self.store.delete_checkpoint(record.run_id, record.kind, record.name)
                await asyncio.to_thread(shutil.rmtree, record.directory, True)
                return _wire.Empty()
            case _wire.GetWeightsInfo():
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
        raise ServiceError(400, f"request: unsupported type {type(request).__name__}")

    # --- models and runs ------------------------------------------------------------------------

    def _scheduler(self, base_model: str) -> ModelScheduler:
        if base_model not in self._schedulers:
            try:
                path = models.resolve_model(base_model)
            except models.UnknownModelError as e:
                raise ServiceError(404, f"base_model: {e}") from e

            def load() -> Any:
                from tinker_backend.engine.model_engine import ModelEngine

                return ModelEngine(base_model, path)

            self._schedulers[base_model] = ModelScheduler(base_model, load)
        return self._schedulers[base_model]

    def _session(self, session_id: str, owner: str) -> None:
        if self.store.session_owner(session_id) != owner:
            raise ServiceError(404, f"session_id: unknown session {session_id!r}")

    def _run(self, run_id: str, owner: str) -> RunRecord:
        run = self.store.get_run(run_id)
        if run is None or run.owner != owner:
            raise ServiceError(404, f"model_id: unknown training run {run_id!r}")
        return run

    async def _create_model(self, request: _wire.CreateModel, owner: str) -> _wire.ModelCreated:
        self._session(request.session_id, owner)
        run_id = f"{request.session_id}:train:{request.model_seq_id}"
        if request.lora_config.rank > self.max_lora_rank:
            raise ServiceError(
                400, f"lora_config.rank: expected <= {self.max_lora_rank} (max_lora_rank), got {request.lora_config.rank}"
            )
        async with self._create_lock:
            existing = self.store.get_run(run_id)
            if existing is not None:  # a re-sent create: answer it again
                return _wire.ModelCreated(model_id=run_id, info=self._info(existing))
            scheduler = self._scheduler(request.base_model)
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
            scheduler.add_run(run_id)
            self._run_models[run_id] = request.base_model
        logger.info("created run %s on %s (rank %d)", run_id, request.base_model, config.rank)
        return _wire.ModelCreated(model_id=run_id, info=self._info(record))

    async def _create_model_from_state(self, request: _wire.CreateModelFromState, owner: str) -> _wire.ModelCreated:
        self._session(request.session_id, owner)
        source = self._checkpoint(request.path, owner, kind="weights")
        base_model = self._run(source.run_id, owner).base_model
        run_id = f"{request.session_id}:train:{request.model_seq_id}"
        async with self._create_lock:
            existing = self.store.get_run(run_id)
            if existing is not None:
                return _wire.ModelCreated(model_id=run_id, info=self._info(existing))
            scheduler = self._scheduler(base_model)
            directory = Path(source.directory)
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
            )
            self.store.add_run(record)
            scheduler.add_run(run_id)
            self._run_models[run_id] = base_model
        return _wire.ModelCreated(model_id=run_id, info=self._info(record))

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
        try:
            return models.tokenizer_files(base_model)
        except models.UnknownModelError as e:
            raise ServiceError(404, f"base_model: {e}") from e

    # --- training -------------------------------------------------------------------------------

    async def _training(self, request: Any, owner: str) -> Any:
        run = self._run(request.model_id, owner)
        scheduler = self._scheduler(run.base_model)
        if not scheduler.has_run(run.run_id):
            raise ServiceError(
                409,
                f"model_id: run {run.run_id!r} is not loaded (the server restarted); "
                "create a new training client from its last checkpoint",
            )
        if request.seq_id < 1:
            raise ServiceError(400, f"seq_id: expected an int >= 1, got {request.seq_id}")
        try:
            work = await self._training_work(request, run, owner, scheduler)
        except ServiceError as e:
            # The rejected request still takes its place in the run's order, so the requests
            # the client sent after it do not wait forever on a gap.
            def work(engine: Any, error: ServiceError = e) -> Any:
                raise error
        self.store.touch_run(run.run_id)
        return await scheduler.submit(run.run_id, request.seq_id, work)

    async def _training_work(self, request: Any, run: RunRecord, owner: str, scheduler: ModelScheduler) -> Any:
        """Validate an ordered request and return the work to queue for it."""
        work: FwdBwdWork | Any
        match request:
            case _wire.ForwardBackward():
                engine = await scheduler.engine()
                self._check_data(request, engine)
                work = FwdBwdWork(request.data, request.loss_fn, request.loss_fn_config, not request.forward_only)
            case _wire.OptimStep():
                params = request.adam_params
                work = lambda engine: OptimStepResponse(metrics=engine.optim_step(run.run_id, params))  # noqa: E731
            case _wire.SaveState():
                work = self._save_work(run, "weights", request.name, request.ttl_seconds)
            case _wire.LoadState():
                source = self._checkpoint(request.path, owner, kind="weights")
                directory, with_optimizer = Path(source.directory), request.with_optimizer

                def work(engine: Any) -> LoadWeightsResponse:
                    engine.load_state(run.run_id, directory, with_optimizer)
                    return LoadWeightsResponse(path=request.path)
            case _wire.SaveWeightsForSampler() if request.name is not None:
                work = self._save_work(run, "sampler_weights", request.name, request.ttl_seconds)
            case _wire.SaveWeightsForSampler():
                work = self._ephemeral_sampler_work(run, request.sampling_session_id, owner)
        return work

    def _check_data(self, request: _wire.ForwardBackward, engine: Any) -> None:
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

    def _save_work(self, run: RunRecord, kind: str, name: str, ttl_seconds: int | None) -> Any:
        if not _NAME.match(name):
            raise ServiceError(
                400, f"name: expected 1-128 characters of [A-Za-z0-9_.-] not starting with '.', got {name!r}"
            )
        directory = self.data_dir / "checkpoints" / run.run_id.replace(":", "_") / kind / name
        path = f"tinker://{run.run_id}/{kind}/{name}"

        def work(engine: Any) -> Any:
            if kind == "weights":
                engine.save_state(run.run_id, directory, include_optimizer=True)
            else:
                engine.save_sampler_weights(run.run_id, directory)
            size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
            self.store.put_checkpoint(
                CheckpointRecord(run.run_id, kind, name, run.owner, str(directory), now_iso(), size, None)
            )
            if kind == "weights":
                return SaveWeightsResponse(path=path)
            return SaveWeightsForSamplerResponse(path=path)

        return work

    def _ephemeral_sampler_work(self, run: RunRecord, sampler_id: str | None, owner: str) -> Any:
        if sampler_id is None or not sampler_id.startswith(f"{run.session_id}:sample:"):
            raise ServiceError(
                400, f"sampling_session_id: expected '{run.session_id}:sample:<n>', got {sampler_id!r}"
            )

        def work(engine: Any) -> SaveWeightsForSamplerResponse:
            if sampler_id not in self._loaded_samplers:
                engine.snapshot_sampler(run.run_id, sampler_id)
                self._loaded_samplers.add(sampler_id)
                self.store.add_sampler(
                    SamplerRecord(
                        sampler_id, run.session_id, owner, run.base_model, f"ephemeral://{run.run_id}", now_iso()
                    )
                )
            return SaveWeightsForSamplerResponse(sampling_session_id=sampler_id)

        return work

    # --- sampling -------------------------------------------------------------------------------

    async def _create_sampling_session(
        self, request: _wire.CreateSamplingSession, owner: str
    ) -> _wire.SamplingSessionCreated:
        sampler_id = request.sampling_session_id
        session_id = sampler_id.split(":sample:")[0]
        self._session(session_id, owner)
        existing = self.store.get_sampler(sampler_id)
        if existing is not None:
            return _wire.SamplingSessionCreated(sampler_id, existing.base_model, existing.model_path)
        if request.model_path is not None:
            source = self._checkpoint(request.model_path, owner)
            base_model = self._run(source.run_id, owner).base_model
            directory = Path(source.directory)
            await self._scheduler(base_model).compute(lambda engine: engine.load_sampler(sampler_id, directory))
            self._loaded_samplers.add(sampler_id)
        elif request.base_model is not None:
            base_model = request.base_model
            await self._scheduler(base_model).engine()
        else:
            raise ServiceError(400, "model_path, base_model: expected one of them, got neither")
        self.store.add_sampler(SamplerRecord(sampler_id, session_id, owner, base_model, request.model_path, now_iso()))
        return _wire.SamplingSessionCreated(sampler_id, base_model, request.model_path)

    async def _sample(self, request: _wire.Sample, owner: str) -> Any:
        key = (request.sampling_session_id, request.seq_id)
        if key in self._sample_answers:
            return await asyncio.shield(self._sample_answers[key])
        sampler = self.store.get_sampler(request.sampling_session_id)
        if sampler is None or sampler.owner != owner:
            raise ServiceError(404, f"sampling_session_id: unknown sampler {request.sampling_session_id!r}")
        adapter = None if sampler.model_path is None else sampler.sampler_id
        if adapter is not None and adapter not in self._loaded_samplers:
            raise ServiceError(
                409, f"sampling_session_id: sampler {adapter!r} is not loaded (the server restarted); create it again"
            )
        scheduler = self._scheduler(sampler.base_model)
        engine = await scheduler.engine()
        prompt = request.prompt.to_ints()
        _check_tokens("prompt", prompt, engine.vocab_size, engine.max_context_length - 1)
        if request.num_samples > 128:
            raise ServiceError(400, f"num_samples: expected <= 128, got {request.num_samples}")
        if request.topk_prompt_logprobs > 20:
            raise ServiceError(400, f"topk_prompt_logprobs: expected <= 20, got {request.topk_prompt_logprobs}")
        for i, stop in enumerate(request.sampling_params.stop_token_ids()):
            if stop >= engine.vocab_size:
                raise ServiceError(400, f"sampling_params.stop[{i}]: expected a token id < {engine.vocab_size}, got {stop}")
        future = asyncio.ensure_future(
            scheduler.compute(
                lambda engine: engine.sample(
                    adapter,
                    prompt,
                    request.num_samples,
                    request.sampling_params,
                    include_prompt_logprobs=request.include_prompt_logprobs,
                    topk_prompt_logprobs=request.topk_prompt_logprobs,
                )
            )
        )
        self._sample_answers[key] = future
        while len(self._sample_answers) > _SAMPLE_ANSWER_WINDOW:
            self._sample_answers.popitem(last=False)
        return await asyncio.shield(future)

    # --- checkpoints ----------------------------------------------------------------------------

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
        for scheduler in self._schedulers.values():
            scheduler.close()
        self.store.close()


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

