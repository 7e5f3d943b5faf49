"""The native wire protocol: one msgspec Struct per message, msgpack-encoded.

Public and shared: the ``tinker`` client encodes these requests and the server
(``tinker_backend.request_handler``, whose dispatch is typed with :data:`Request`) decodes the
very same Structs, so the two can never drift apart. Other programs may speak it too
(``tests/native_wire.py`` does, raw); the schema-evolution rules below keep them working.

A client holds one WebSocket to ``/native/v1/ws``. It sends ``Submit`` frames, each with a
call id of its choosing and one request; the server answers each call with exactly one
``Result`` or ``Failure`` frame as soon as the work is done, in any order. Completions are
pushed over that one persistent connection, so there is no HTTP poll per outstanding future.
The embedded backend runs the very same encode / decode path without a socket.

Training requests carry the client's ``seq_id``; the server runs a run's requests in
``seq_id`` order and answers a repeated ``(model_id, seq_id)`` with the first answer, so a
client that reconnects may safely re-send everything it has not heard back about. Model ids
(``{session_id}:train:{n}``) and sampling-session ids (``{session_id}:sample:{n}``) are
built from client counters for the same reason.

Schema-evolution rules: as in ``tinker.types`` (new fields get defaults and go last; nothing
is reordered or retyped; requests forbid unknown fields, responses ignore them).
"""

from __future__ import annotations

from typing import Any, TypeAlias

import msgspec

from tinker.types import (
    AdamParams,
    CheckpointsListResponse,
    Datum,
    ExternalWeightsUrlsResponse,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    GetSessionResponse,
    ListSessionsResponse,
    LoadWeightsResponse,
    LoraConfig,
    ModelInput,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
)


class _Request(msgspec.Struct, tag=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every client-to-server request; the tag is the class name."""


class _Reply(msgspec.Struct, omit_defaults=True):
    """Base of replies that are not public types."""


# --- sessions, models -------------------------------------------------------------------------


class CreateSession(_Request):
    user_metadata: dict[str, str] = {}


class SessionCreated(_Reply):
    session_id: str


class CreateModel(_Request):
    session_id: str
    model_seq_id: int
    base_model: str
    lora_config: LoraConfig
    user_metadata: dict[str, str] = {}


class CreateModelFromState(_Request):
    session_id: str
    model_seq_id: int
    path: str
    with_optimizer: bool = False


class ModelCreated(_Reply):
    model_id: str
    info: GetInfoResponse


class GetInfo(_Request):
    model_id: str


class GetServerCapabilities(_Request):
    pass


class GetTokenizer(_Request):
    base_model: str


class TokenizerFiles(_Reply):
    files: dict[str, bytes]


# --- training (ordered by seq_id within a model) ----------------------------------------------


class ForwardBackward(_Request):
    model_id: str
    seq_id: int
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float] | None = None
    forward_only: bool = False


class OptimStep(_Request):
    model_id: str
    seq_id: int
    adam_params: AdamParams


class SaveState(_Request):
    model_id: str
    seq_id: int
    name: str
    ttl_seconds: int | None = None


class LoadState(_Request):
    model_id: str
    seq_id: int
    path: str
    with_optimizer: bool = True


class SaveWeightsForSampler(_Request):
    """A named save writes ``sampler_weights/<name>``; ``name=None`` makes an ephemeral sampler
    whose id is ``sampling_session_id`` (chosen by the client for idempotence)."""

    model_id: str
    seq_id: int
    name: str | None = None
    sampling_session_id: str | None = None
    ttl_seconds: int | None = None


class SaveWeightsExternal(_Request):
    """Writes ``external_weights/<name>``: the adapter in PEFT format (the files a download gets)."""

    model_id: str
    seq_id: int
    name: str
    ttl_seconds: int | None = None


class ReleaseSeq(_Request):
    """Skip ``seq_id`` of a run: the client reserved it but will never send its request (a custom
    loss raised, the call failed or was cancelled before it was sent). The server gives it its
    place in the run's order without running anything, so the requests after it do not wait on a
    gap. A ``seq_id`` whose request already arrived keeps that request and its answer."""

    model_id: str
    seq_id: int


# Requests that take a place in a run's seq_id order.
TrainingRequest: TypeAlias = (
    ForwardBackward | OptimStep | SaveState | LoadState | SaveWeightsForSampler | SaveWeightsExternal | ReleaseSeq
)


# --- sampling ---------------------------------------------------------------------------------


class CreateSamplingSession(_Request):
    sampling_session_id: str
    model_path: str | None = None
    base_model: str | None = None


class SamplingSessionCreated(_Reply):
    sampling_session_id: str
    base_model: str
    model_path: str | None = None


class GetSampler(_Request):
    sampling_session_id: str


class Sample(_Request):
    sampling_session_id: str
    seq_id: int
    prompt: ModelInput
    num_samples: int
    sampling_params: SamplingParams
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    # Record each sampled sequence's tokens and logprobs for stable_reinforce (docs/compat.md).
    record_stability_info: bool = False


# --- REST-style -------------------------------------------------------------------------------


class ListTrainingRuns(_Request):
    limit: int = 20
    offset: int = 0


class GetTrainingRun(_Request):
    training_run_id: str


class ListCheckpoints(_Request):
    training_run_id: str


class ListUserCheckpoints(_Request):
    limit: int = 100
    offset: int = 0


class DeleteCheckpoint(_Request):
    tinker_path: str


class GetWeightsInfo(_Request):
    tinker_path: str


class SetCheckpointTtl(_Request):
    """``ttl_seconds=None`` removes the expiry."""

    tinker_path: str
    ttl_seconds: int | None = None


class PublishCheckpoint(_Request):
    """Publish (any API key may then load or sample it) or unpublish; only its owner may."""

    tinker_path: str
    published: bool = True


class GetExternalWeightsUrls(_Request):
    """Signed download URLs of a checkpoint's files (any kind the caller may read). ``base_url``
    (``http(s)://host:port``) makes them absolute; without it they are paths on the server."""

    tinker_path: str
    base_url: str | None = None


class DownloadCheckpoint(_Request):
    """A checkpoint's files, whole, in the answer (any kind the caller may read)."""

    tinker_path: str


class CheckpointFiles(_Reply):
    """File paths relative to the checkpoint's folder, with their bytes."""

    files: dict[str, bytes]


class ListSessions(_Request):
    limit: int = 20
    offset: int = 0


class GetSession(_Request):
    session_id: str


class Empty(_Reply):
    pass


# --- sessions (kept alive by the client's heartbeat) --------------------------------------------


class Heartbeat(_Request):
    """Sent every few seconds while a client is open; a session that stops sending it (and makes
    no other request) for the server's session timeout is expired and its runs are unloaded."""

    session_id: str


# --- importing (appended: new requests go last) -------------------------------------------------


class CreateModelFromAdapter(_Request):
    """A new run on ``base_model`` from the PEFT LoRA adapter in ``adapter_dir``, a folder on the
    server's machine (served only where it allows local models); rank and targets come from it."""

    session_id: str
    model_seq_id: int
    base_model: str
    adapter_dir: str
    user_metadata: dict[str, str] = {}


Request: TypeAlias = (
    CreateSession
    | CreateModel
    | CreateModelFromState
    | GetInfo
    | GetServerCapabilities
    | GetTokenizer
    | ForwardBackward
    | OptimStep
    | SaveState
    | LoadState
    | SaveWeightsForSampler
    | CreateSamplingSession
    | GetSampler
    | Sample
    | ListTrainingRuns
    | GetTrainingRun
    | ListCheckpoints
    | ListUserCheckpoints
    | DeleteCheckpoint
    | GetWeightsInfo
    | SetCheckpointTtl
    | SaveWeightsExternal
    | PublishCheckpoint
    | GetExternalWeightsUrls
    | DownloadCheckpoint
    | ListSessions
    | GetSession
    | Heartbeat
    | ReleaseSeq
    | CreateModelFromAdapter
)

RESPONSE_TYPES: dict[type, type] = {
    CreateSession: SessionCreated,
    CreateModel: ModelCreated,
    CreateModelFromState: ModelCreated,
    GetInfo: GetInfoResponse,
    GetServerCapabilities: GetServerCapabilitiesResponse,
    GetTokenizer: TokenizerFiles,
    ForwardBackward: ForwardBackwardOutput,
    OptimStep: OptimStepResponse,
    SaveState: SaveWeightsResponse,
    LoadState: LoadWeightsResponse,
    SaveWeightsForSampler: SaveWeightsForSamplerResponse,
    CreateSamplingSession: SamplingSessionCreated,
    GetSampler: SamplingSessionCreated,
    Sample: SampleResponse,
    ListTrainingRuns: TrainingRunsResponse,
    GetTrainingRun: TrainingRun,
    ListCheckpoints: CheckpointsListResponse,
    ListUserCheckpoints: CheckpointsListResponse,
    DeleteCheckpoint: Empty,
    GetWeightsInfo: WeightsInfoResponse,
    SetCheckpointTtl: Empty,
    SaveWeightsExternal: SaveWeightsExternalResponse,
    PublishCheckpoint: Empty,
    GetExternalWeightsUrls: ExternalWeightsUrlsResponse,
    DownloadCheckpoint: CheckpointFiles,
    ListSessions: ListSessionsResponse,
    GetSession: GetSessionResponse,
    Heartbeat: Empty,
    ReleaseSeq: Empty,
    CreateModelFromAdapter: ModelCreated,
}


# --- frames -----------------------------------------------------------------------------------


class Submit(msgspec.Struct, tag=True, array_like=True):
    """Client to server: run ``request`` (still encoded, so a bad request fails only its call)."""

    call_id: int
    request: msgspec.Raw


class Result(msgspec.Struct, tag=True, array_like=True):
    """Server to client: the encoded response of call ``call_id``."""

    call_id: int
    payload: msgspec.Raw


class Failure(msgspec.Struct, tag=True, array_like=True):
    """Server to client: call ``call_id`` failed with an HTTP-style ``status``."""

    call_id: int
    status: int
    message: str
    category: str = "unknown"
    retry_after: float | None = None  # for a 429: send the call again after this many seconds


ServerFrame: TypeAlias = Result | Failure

encoder = msgspec.msgpack.Encoder()
request_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Request)
submit_decoder = msgspec.msgpack.Decoder(Submit)
server_frame_decoder = msgspec.msgpack.Decoder(ServerFrame)
_response_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {
    t: msgspec.msgpack.Decoder(t) for t in set(RESPONSE_TYPES.values())
}


def decode_response(request_type: type, payload: bytes) -> Any:
    """Decode the payload of a ``Result`` for a request of ``request_type``."""
    return _response_decoders[RESPONSE_TYPES[request_type]].decode(payload)
