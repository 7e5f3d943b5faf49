"""Open Tinker: a futures-first client for LoRA training and sampling.

``tinker.ServiceClient()`` runs an embedded backend in this process; with ``base_url=`` or
``$TINKER_BASE_URL`` it talks to a ``tinker-server`` instead. Same code, same results.
"""

from tinker import types
from tinker.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestFailedError,
    TinkerError,
    UnprocessableEntityError,
)
from tinker.futures import APIFuture
from tinker.rest_client import RestClient
from tinker.sampling_client import SamplingClient
from tinker.service_client import ServiceClient
from tinker.training_client import TrainingClient
from tinker.types import (
    AdamParams,
    Checkpoint,
    CheckpointsListResponse,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoraConfig,
    LossFnType,
    ModelInput,
    ModelInputChunk,
    OptimStepResponse,
    PromptProvenanceSpan,
    SampledProvenanceSpan,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    StopReason,
    SupportedModel,
    TensorData,
    TrainingRun,
    WeightsInfoResponse,
)

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIFuture",
    "APIStatusError",
    "APITimeoutError",
    "AdamParams",
    "AuthenticationError",
    "BadRequestError",
    "Checkpoint",
    "CheckpointsListResponse",
    "ConflictError",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "GetServerCapabilitiesResponse",
    "InternalServerError",
    "LoraConfig",
    "LossFnType",
    "ModelInput",
    "ModelInputChunk",
    "NotFoundError",
    "OptimStepResponse",
    "PermissionDeniedError",
    "PromptProvenanceSpan",
    "RateLimitError",
    "RequestFailedError",
    "RestClient",
    "SampleResponse",
    "SampledProvenanceSpan",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "ServiceClient",
    "StopReason",
    "SupportedModel",
    "TensorData",
    "TinkerError",
    "TrainingClient",
    "TrainingRun",
    "UnprocessableEntityError",
    "WeightsInfoResponse",
    "types",
]
