"""Public data types of the Tinker API, as msgspec Structs.

The names and behaviour follow the public Tinker SDK, so code written for Tinker runs with at
most an import change. Because every type is a ``msgspec.Struct``, the same objects travel on
the native wire (msgpack) without conversion.

Schema-evolution rules (they keep old clients and servers talking):
  * a new field always gets a default and goes at the end of its Struct;
  * fields are never reordered, renamed or retyped;
  * request Structs that a client sends are strict (``forbid_unknown_fields``); responses are
    lenient, so a newer server may add fields.

Validation happens in ``__post_init__``, which msgspec also runs when decoding, so a bad value
fails in the same way on the client (before sending) and on the server (on receipt), naming the
field, what was expected and what was received.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

import msgspec
import numpy as np

__all__ = [
    "AdamParams",
    "Checkpoint",
    "CheckpointsListResponse",
    "Cursor",
    "Datum",
    "EncodedTextChunk",
    "ExternalWeightsUrlsResponse",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "GetServerCapabilitiesResponse",
    "GetSessionResponse",
    "ListSessionsResponse",
    "LoadWeightsResponse",
    "LoraConfig",
    "LossFnType",
    "ModelData",
    "ModelInput",
    "ModelInputChunk",
    "OptimStepResponse",
    "PromptProvenanceSpan",
    "ProvenanceSpan",
    "SampleResponse",
    "SampledProvenanceSpan",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsExternalResponse",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "StopReason",
    "SupportedModel",
    "TensorData",
    "TrainingRun",
    "TrainingRunsResponse",
    "WeightsInfoResponse",
]

LossFnType: TypeAlias = Literal[
    "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"
]
StopReason: TypeAlias = Literal["length", "stop"]
DType: TypeAlias = Literal["int64", "float32"]

# loss_fn_inputs keys whose plain-list values have a known dtype (as in the Tinker SDK).
_INT_KEYS = frozenset({"target_tokens"})
_FLOAT_KEYS = frozenset(
    {
        "weights",
        "advantages",
        "logprobs",
        "clip_low_threshold",
        "clip_high_threshold",
        "sequence_ratio_mask",
    }
)


def _fail(field: str, expected: str, got: object) -> ValueError:
    shown = repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ValueError(f"{field}: expected {expected}, got {shown}")


class _Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base for Structs a client sends: unknown fields are rejected."""


class _Lenient(msgspec.Struct, omit_defaults=True):
    """Base for Structs a server sends: unknown fields are ignored."""


# ---------------------------------------------------------------------------------------------
# Model input


class EncodedTextChunk(_Strict, tag_field="type", tag="encoded_text"):
    """A run of token ids."""

    tokens: list[int]

    def __post_init__(self) -> None:
        for i, tok in enumerate(self.tokens):
            if type(tok) is not int or tok < 0:
                raise _fail(f"tokens[{i}]", "a non-negative int token id", tok)

    @property
    def length(self) -> int:
        return len(self.tokens)


ModelInputChunk: TypeAlias = EncodedTextChunk


class ModelInput(_Strict):
    """A prompt or training sequence: a list of chunks (only token chunks on this server).

    >>> ModelInput.from_ints([1, 2, 3]).length
    3
    """

    chunks: list[ModelInputChunk]

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        return [tok for chunk in self.chunks for tok in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[int(token)]))


# ---------------------------------------------------------------------------------------------
# Tensors and training data


class TensorData(_Strict):
    """A dense tensor on the wire: flattened ``data``, a ``dtype`` and an optional ``shape``."""

    data: list[int | float]
    dtype: DType
    shape: list[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.data)
        if self.shape is not None:
            if any(type(d) is not int or d < 0 for d in self.shape):
                raise _fail("shape", "a list of non-negative ints", self.shape)
            if math.prod(self.shape) != n:
                raise _fail("shape", f"dims whose product is len(data)={n}", self.shape)
        if n == 0:
            return
        array = np.asarray(self.data)
        if self.dtype == "int64":
            if array.dtype.kind not in "iu":
                bad = next(i for i, v in enumerate(self.data) if type(v) is not int)
                raise _fail(f"data[{bad}]", "an int (dtype int64)", self.data[bad])
        else:
            if array.dtype.kind not in "iuf":
                raise _fail("data", "floats (dtype float32)", self.data)
            finite = np.isfinite(array.astype(np.float64))
            if not finite.all():
                bad = int(np.argmin(finite))
                raise _fail(f"data[{bad}]", "a finite float (dtype float32)", self.data[bad])

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        """Floats become float32 and integers int64, as in the Tinker SDK."""
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
            dtype: DType = "float32"
        elif np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
            array = array.astype(np.int64)
            dtype = "int64"
        else:
            raise _fail("array.dtype", "an integer or floating dtype", str(array.dtype))
        return cls(data=array.reshape(-1).tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        """bf16 and other floats are widened or narrowed to float32."""
        import torch

        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        return cls.from_numpy(tensor.numpy())

    def to_numpy(self) -> np.ndarray:
        dtype = np.int64 if self.dtype == "int64" else np.float32
        array = np.asarray(self.data, dtype=dtype)
        return array.reshape(self.shape) if self.shape is not None else array

    def to_torch(self) -> Any:
        import torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list[Any]:
        return self.to_numpy().tolist()

    @property
    def numel(self) -> int:
        return len(self.data)


def _coerce_tensor(key: str, value: object) -> TensorData:
    if isinstance(value, TensorData):
        return value
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if type(value).__module__.startswith("torch"):
        return TensorData.from_torch(value)
    if isinstance(value, (list, tuple)):
        if key in _INT_KEYS:
            dtype: type = np.int64
        elif key in _FLOAT_KEYS:
            dtype = np.float32
        else:
            raise KeyError(
                f"loss_fn_inputs[{key!r}]: a plain list is accepted only for the known keys "
                f"{sorted(_INT_KEYS | _FLOAT_KEYS)}; pass numpy, torch or TensorData for custom keys"
            )
        try:
            array: np.ndarray = np.asarray(value, dtype=dtype)
        except (ValueError, TypeError, OverflowError) as e:
            raise _fail(f"loss_fn_inputs[{key!r}]", f"a rectangular list of {dtype.__name__}", value) from e
        return TensorData.from_numpy(array)
    raise _fail(f"loss_fn_inputs[{key!r}]", "a list, numpy array, torch tensor or TensorData", value)


class _Span(_Strict, kw_only=True):
    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.sequence_id, str) or not self.sequence_id:
            raise _fail(f"{name}.sequence_id", "a non-empty string", self.sequence_id)
        if type(self.offset) is not int or self.offset < 0:
            raise _fail(f"{name}.offset", "an int >= 0", self.offset)
        if type(self.length) is not int or self.length < 0:
            raise _fail(f"{name}.length", "an int >= 0", self.length)


class PromptProvenanceSpan(_Span, tag_field="type", tag="prompt"):
    """A run of datum positions that are positions ``[offset, offset + length)`` of the prompt
    of the sample request that produced sequence ``sequence_id``."""


class SampledProvenanceSpan(_Span, tag_field="type", tag="sampled"):
    """A run of datum positions that are positions ``[offset, offset + length)`` of the tokens
    sampled for sequence ``sequence_id``."""


ProvenanceSpan: TypeAlias = PromptProvenanceSpan | SampledProvenanceSpan


def _check_tiling(field: str, spans: list[ProvenanceSpan], length: int) -> None:
    total = sum(span.length for span in spans)
    if total != length:
        raise _fail(field, f"spans whose lengths sum to the field's length {length} (they tile it)", total)


class Datum(_Strict):
    """One training example: the model input and the per-token inputs of the loss.

    Position ``i`` of ``model_input`` predicts ``target_tokens[i]`` (the next token), so per-token
    inputs have length ``model_input.length``. Values of ``loss_fn_inputs`` may be lists, numpy
    arrays, torch tensors or ``TensorData``; they are coerced by key as in the Tinker SDK.

    ``model_input_spans`` and ``loss_fn_input_spans`` (both or neither; attach them with
    :meth:`with_provenance`) say which sampled sequence each position came from, as in the
    Tinker SDK; the ``stable_reinforce`` loss needs them (docs/compat.md).
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = {}
    model_input_spans: list[ProvenanceSpan] | None = None
    loss_fn_input_spans: list[ProvenanceSpan] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.loss_fn_inputs, Mapping):
            raise _fail("loss_fn_inputs", "a dict of tensors", self.loss_fn_inputs)
        self.loss_fn_inputs = {
            str(key): _coerce_tensor(str(key), value) for key, value in self.loss_fn_inputs.items()
        }
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise _fail(
                "model_input_spans, loss_fn_input_spans",
                "both span lists or neither (provenance comes as a pair)",
                "only one",
            )
        for field in ("model_input_spans", "loss_fn_input_spans"):
            for i, span in enumerate(getattr(self, field) or []):
                if not isinstance(span, _Span):
                    raise _fail(f"{field}[{i}]", "a PromptProvenanceSpan or SampledProvenanceSpan", span)

    def with_provenance(
        self, model_input: Sequence[ProvenanceSpan], loss_fn_inputs: Sequence[ProvenanceSpan]
    ) -> Datum:
        """A copy carrying provenance: ``model_input`` spans tile the input tokens,
        ``loss_fn_inputs`` spans tile ``loss_fn_inputs["target_tokens"]`` (checked here)."""
        _check_tiling("model_input spans", list(model_input), self.model_input.length)
        targets = self.loss_fn_inputs.get("target_tokens")
        if targets is not None and targets.shape is not None and len(targets.shape) == 1:
            _check_tiling("loss_fn_inputs spans", list(loss_fn_inputs), targets.shape[0])
        return Datum(
            model_input=self.model_input,
            loss_fn_inputs=self.loss_fn_inputs,
            model_input_spans=list(model_input),
            loss_fn_input_spans=list(loss_fn_inputs),
        )


# ---------------------------------------------------------------------------------------------
# Training


class LoraConfig(_Strict):
    """What a LoRA run trains: the rank, the init seed and which layer families get adapters."""

    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True

    def __post_init__(self) -> None:
        if type(self.rank) is not int or not 1 <= self.rank <= 1024:
            raise _fail("rank", "an int in [1, 1024]", self.rank)
        if self.seed is not None and (type(self.seed) is not int or self.seed < 0):
            raise _fail("seed", "None or a non-negative int", self.seed)
        if not (self.train_unembed or self.train_mlp or self.train_attn):
            raise ValueError(
                "train_mlp, train_attn, train_unembed: expected at least one True, got all False"
            )


class AdamParams(_Strict):
    """AdamW hyper-parameters for one ``optim_step`` (decoupled weight decay, as torch.optim.AdamW).

    ``grad_clip_norm=0`` turns clipping off.
    """

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "learning_rate": self.learning_rate >= 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "eps": self.eps > 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip_norm": self.grad_clip_norm >= 0,
        }
        expected = {
            "learning_rate": "a finite float >= 0",
            "beta1": "a float in [0, 1)",
            "beta2": "a float in [0, 1)",
            "eps": "a float > 0",
            "weight_decay": "a float >= 0",
            "grad_clip_norm": "a float >= 0 (0 = off)",
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or not math.isfinite(value):
                raise _fail(name, expected[name], value)


class ForwardBackwardOutput(_Lenient):
    """Per-datum loss outputs (at least ``logprobs`` of the targets) and ``name:reduction`` metrics."""

    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]


class OptimStepResponse(_Lenient):
    metrics: dict[str, float] | None = None


class SaveWeightsResponse(_Lenient):
    """``path`` is ``tinker://<run_id>/weights/<name>``."""

    path: str


class SaveWeightsForSamplerResponse(_Lenient):
    """A named save has ``path`` (``tinker://<run_id>/sampler_weights/<name>``); an ephemeral one
    has only ``sampling_session_id``."""

    path: str | None = None
    sampling_session_id: str | None = None


class LoadWeightsResponse(_Lenient):
    path: str | None = None


class ModelData(_Lenient):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(_Lenient):
    model_id: str
    model_data: ModelData
    is_lora: bool = True
    lora_rank: int | None = None
    model_name: str | None = None
    lora_config: LoraConfig | None = None


# ---------------------------------------------------------------------------------------------
# Sampling


class SamplingParams(_Strict):
    """How to sample.

    ``stop=None`` stops at the tokenizer's EOS; a list of strings or token ids stops at those
    (EOS still stops); ``stop=[]`` disables every stop, EOS included. ``temperature=0`` is
    greedy. ``top_k=-1`` and ``top_p=1`` mean no truncation.
    """

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str | int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (type(self.max_tokens) is not int or self.max_tokens < 1):
            raise _fail("max_tokens", "None or an int >= 1", self.max_tokens)
        if self.seed is not None and type(self.seed) is not int:
            raise _fail("seed", "None or an int", self.seed)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise _fail("temperature", "a finite float >= 0", self.temperature)
        if type(self.top_k) is not int or (self.top_k < 1 and self.top_k != -1):
            raise _fail("top_k", "-1 (off) or an int >= 1", self.top_k)
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise _fail("top_p", "a float in (0, 1]", self.top_p)
        if isinstance(self.stop, list):
            for i, item in enumerate(self.stop):
                if isinstance(item, str) and item == "":
                    raise _fail(f"stop[{i}]", "a non-empty string or a token id", item)
                if isinstance(item, int) and item < 0:
                    raise _fail(f"stop[{i}]", "a non-negative token id", item)
        elif isinstance(self.stop, str) and self.stop == "":
            raise _fail("stop", "a non-empty string", self.stop)

    def stop_strings(self) -> list[str]:
        if isinstance(self.stop, str):
            return [self.stop]
        return [s for s in self.stop or [] if isinstance(s, str)]

    def stop_token_ids(self) -> list[int]:
        if isinstance(self.stop, str):
            return []
        return [s for s in self.stop or [] if isinstance(s, int)]


class SampledSequence(_Lenient):
    """One sampled continuation. ``logprobs[i]`` is the log-probability of ``tokens[i]`` under
    the model's distribution (temperature 1, before top-k / top-p)."""

    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    # Names this sequence in later requests (provenance spans of a Datum); set by the server.
    sequence_id: str | None = None


class SampleResponse(_Lenient):
    """``prompt_logprobs[0]`` is None (the first token has no context); ``topk_prompt_logprobs``
    holds, per prompt position, the ``k`` most likely ``(token, logprob)`` pairs."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


# ---------------------------------------------------------------------------------------------
# Models, runs and checkpoints (REST)


class SupportedModel(_Lenient):
    model_name: str
    max_context_length: int | None = None
    trainable: bool = True
    sampleable: bool = True


class GetServerCapabilitiesResponse(_Lenient):
    supported_models: list[SupportedModel]


class Cursor(_Lenient):
    offset: int
    limit: int
    total_count: int


class Checkpoint(_Lenient):
    checkpoint_id: str
    checkpoint_type: Literal["training", "sampler", "external"]
    time: str
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    expires_at: str | None = None


class CheckpointsListResponse(_Lenient):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(_Lenient):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool = True
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: str | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(_Lenient):
    training_runs: list[TrainingRun]
    cursor: Cursor


class WeightsInfoResponse(_Lenient):
    base_model: str
    is_lora: bool = True
    lora_rank: int | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None
    train_unembed: bool | None = None


class SaveWeightsExternalResponse(_Lenient):
    """``path``: ``tinker://<run_id>/external_weights/<name>``, the adapter in PEFT format."""

    path: str
    size_bytes: int | None = None


class ExternalWeightsUrlsResponse(_Lenient):
    """One signed download URL per file (keyed by its path in the checkpoint), valid until ``expires``."""

    urls: dict[str, str]
    expires: str


class GetSessionResponse(_Lenient):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


class ListSessionsResponse(_Lenient):
    sessions: list[str]
