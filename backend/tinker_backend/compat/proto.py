"""The public Tinker protobuf messages, and their conversion to and from this server's types.

``tinker_public.proto`` (next to this file) is the schema. :func:`_load_schema` reads it at
import time and builds the message classes with ``google.protobuf``'s descriptor API, so
neither ``protoc`` nor generated code is needed anywhere. Three conversions use them:

* :func:`forward_backward_fields`: a ``ForwardBackwardRequest`` -> the fields of a native
  ``ForwardBackward`` request as plain values (the caller validates them with msgspec);
* :func:`encode_forward_backward_output` and :func:`encode_sample_response`: results -> bytes.

Tensors travel as raw little-endian bytes; tokens are int32.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from tinker.types import ForwardBackwardOutput, SampleResponse, TensorData
from tinker_backend.errors import ServiceError

_Field = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _Field.TYPE_DOUBLE,
    "float": _Field.TYPE_FLOAT,
    "int32": _Field.TYPE_INT32,
    "int64": _Field.TYPE_INT64,
    "uint32": _Field.TYPE_UINT32,
    "uint64": _Field.TYPE_UINT64,
    "bool": _Field.TYPE_BOOL,
    "string": _Field.TYPE_STRING,
    "bytes": _Field.TYPE_BYTES,
}


def _load_schema(path: Path) -> descriptor_pool.DescriptorPool:
    """Parse the proto3 subset described at the top of ``path`` into a private descriptor pool."""
    text = re.sub(r"//[^\n]*", "", path.read_text())
    tokens = deque(re.findall(r'"[^"]*"|\w+|[{}<>=;,]', text))
    enums = set(re.findall(r"\benum\s+(\w+)", text))
    file = descriptor_pb2.FileDescriptorProto(name=path.name, syntax="proto3")

    def take(expected: str | None = None) -> str:
        token = tokens.popleft()
        if expected is not None and token != expected:
            raise ValueError(f"{path.name}: expected {expected!r}, got {token!r}")
        return token

    def set_type(field: Any, type_name: str) -> None:
        if type_name in _SCALARS:
            field.type = _SCALARS[type_name]
        else:
            field.type = _Field.TYPE_ENUM if type_name in enums else _Field.TYPE_MESSAGE
            field.type_name = f".{file.package}.{type_name}"

    def parse_field(message: Any, first: str, oneof_index: int | None) -> Any:
        field = message.field.add(label=_Field.LABEL_OPTIONAL)
        if first == "repeated":
            field.label, first = _Field.LABEL_REPEATED, take()
        elif first == "optional":
            field.proto3_optional, first = True, take()
        if first == "map":  # map<K, V> is a repeated nested "<Name>Entry" message
            take("<")
            key, _, value, _ = take(), take(","), take(), take(">")
            field.name = take()
            entry = message.nested_type.add(name=field.name.title().replace("_", "") + "Entry")
            entry.options.map_entry = True
            set_type(entry.field.add(name="key", number=1, label=_Field.LABEL_OPTIONAL), key)
            set_type(entry.field.add(name="value", number=2, label=_Field.LABEL_OPTIONAL), value)
            field.label, field.type = _Field.LABEL_REPEATED, _Field.TYPE_MESSAGE
            field.type_name = f".{file.package}.{message.name}.{entry.name}"
        else:
            set_type(field, first)
            field.name = take()
        take("=")
        field.number = int(take())
        take(";")
        if oneof_index is not None:
            field.oneof_index = oneof_index
        return field

    while tokens:
        keyword = take()
        if keyword == "syntax":
            take("=")
            take('"proto3"')
            take(";")
        elif keyword == "package":
            file.package = take()
            take(";")
        elif keyword == "enum":
            enum = file.enum_type.add(name=take())
            take("{")
            while (name := take()) != "}":
                take("=")
                enum.value.add(name=name, number=int(take()))
                take(";")
        elif keyword == "message":
            message = file.message_type.add(name=take())
            take("{")
            optional_fields = []
            while (first := take()) != "}":
                if first == "oneof":
                    index = len(message.oneof_decl)
                    message.oneof_decl.add(name=take())
                    take("{")
                    while (inner := take()) != "}":
                        parse_field(message, inner, index)
                    continue
                field = parse_field(message, first, None)
                if field.proto3_optional:
                    optional_fields.append(field)
            # proto3 `optional` is a one-field "synthetic" oneof, declared after the real ones.
            for field in optional_fields:
                field.oneof_index = len(message.oneof_decl)
                message.oneof_decl.add(name=f"_{field.name}")
        else:
            raise ValueError(f"{path.name}: unexpected {keyword!r}")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool


# The schema as a descriptor pool of its own (apart from any other tinker_public copy in the process).
SCHEMA = _load_schema(Path(__file__).with_name("tinker_public.proto"))


def _message(name: str) -> type[Message]:
    return message_factory.GetMessageClass(SCHEMA.FindMessageTypeByName(f"tinker_public.{name}"))


def _enum(name: str) -> dict[str, int]:
    return {value.name: value.number for value in SCHEMA.FindEnumTypeByName(f"tinker_public.{name}").values}


ForwardBackwardRequest = _message("ForwardBackwardRequest")
ForwardBackwardOutputMessage = _message("ForwardBackwardOutput")
SampleResponseMessage = _message("SampleResponse")

_DTYPES = _enum("DType")
_STOP_REASONS = _enum("StopReason")
# Public tensors are float32 or int64 only, as in the SDK.
_NUMPY = {_DTYPES["DTYPE_FLOAT32"]: ("float32", "<f4"), _DTYPES["DTYPE_INT64"]: ("int64", "<i8")}
_PROTO_DTYPE = {"float32": _DTYPES["DTYPE_FLOAT32"], "int64": _DTYPES["DTYPE_INT64"]}
_MASK_LOGPROB = -99999.0  # the SDK's marker for an empty top-k slot


# --- forward_backward request -> native fields ---------------------------------------------


def parse_forward_backward(body: bytes) -> Any:
    """Decode a ``ForwardBackwardRequest``; undecodable bytes are a 400."""
    message = ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except DecodeError as e:
        raise ServiceError(
            400, f"body: expected a protobuf ForwardBackwardRequest, got undecodable bytes ({e})"
        ) from e
    return message


def forward_backward_fields(message: Any) -> dict[str, Any]:
    """The fields of a native ``ForwardBackward`` (besides its ids) as plain values.

    Provenance spans become the native ``Datum``'s spans (only ``stable_reinforce`` reads
    them). ``loss_fn_config_v2`` wins over ``loss_fn_config``.
    """
    return {
        "data": [_datum(datum, i) for i, datum in enumerate(message.data)],
        "loss_fn": message.loss_fn,
        "loss_fn_config": _loss_fn_config(message),
        "forward_only": message.forward_only,
    }


def _loss_fn_config(message: Any) -> dict[str, float] | None:
    if not message.loss_fn_config_v2:
        return dict(message.loss_fn_config) or None
    config = {}
    for key, value in message.loss_fn_config_v2.items():
        if value.WhichOneof("value") != "number":
            raise ServiceError(
                400,
                f"loss_fn_config_v2[{key!r}]: expected a number (no loss here takes text), got {value.text!r}",
            )
        config[key] = value.number
    return config


def _datum(message: Any, i: int) -> dict[str, Any]:
    chunks = []
    for j, chunk in enumerate(message.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise ServiceError(
                400,
                f"data[{i}].model_input.chunks[{j}]: expected an encoded_text chunk (this server "
                f"takes tokens only), got {kind or 'an empty chunk'}",
            )
        tokens = _array(chunk.encoded_text.tokens, "<i4", f"data[{i}].model_input.chunks[{j}].tokens")
        chunks.append({"type": "encoded_text", "tokens": tokens.tolist()})
    inputs = {
        key: _tensor(tensor, f"data[{i}].loss_fn_inputs[{key!r}]")
        for key, tensor in message.loss_fn_inputs.items()
    }
    datum: dict[str, Any] = {"model_input": {"chunks": chunks}, "loss_fn_inputs": inputs}
    if message.model_input_spans or message.loss_fn_input_spans:
        datum["model_input_spans"] = _spans(message.model_input_spans, f"data[{i}].model_input_spans")
        datum["loss_fn_input_spans"] = _spans(message.loss_fn_input_spans, f"data[{i}].loss_fn_input_spans")
    return datum


def _spans(messages: Any, field: str) -> list[dict[str, Any]]:
    """``ProvenanceSpan``s as the fields of the native spans (tagged ``prompt`` / ``sampled``)."""
    spans = []
    for j, message in enumerate(messages):
        kind = message.WhichOneof("span")
        if kind is None:
            raise ServiceError(400, f"{field}[{j}]: expected prompt_tokens or sampled_tokens, got an empty span")
        arm = getattr(message, kind)
        tag = "prompt" if kind == "prompt_tokens" else "sampled"
        spans.append({"type": tag, "sequence_id": arm.sequence_id, "offset": arm.offset, "length": arm.length})
    return spans


def _array(data: bytes, dtype: str, field: str) -> np.ndarray:
    try:
        return np.frombuffer(data, dtype=dtype)
    except ValueError as e:
        raise ServiceError(
            400, f"{field}: expected whole {np.dtype(dtype).name} values, got {len(data)} bytes"
        ) from e


def _tensor(message: Any, field: str) -> dict[str, Any]:
    """A ``Tensor`` as the fields of a dense ``TensorData``; sparse CSR is densified (padding 0)."""
    if message.dtype not in _NUMPY:
        got = SCHEMA.FindEnumTypeByName("tinker_public.DType").values_by_number[message.dtype].name
        raise ServiceError(400, f"{field}.dtype: expected DTYPE_FLOAT32 or DTYPE_INT64, got {got}")
    dtype, wire_dtype = _NUMPY[message.dtype]
    shape = list(message.shape)
    if message.WhichOneof("encoding") != "sparse_csr":
        values = _array(message.dense, wire_dtype, f"{field}.dense")
        return {"data": values.tolist(), "dtype": dtype, "shape": shape or None}
    csr = message.sparse_csr
    values = _array(csr.values, wire_dtype, f"{field}.sparse_csr.values")
    crow = _array(csr.crow_indices, "<i8", f"{field}.sparse_csr.crow_indices")
    col = _array(csr.col_indices, "<i8", f"{field}.sparse_csr.col_indices")
    try:
        if len(shape) != 2 or len(crow) != shape[0] + 1 or crow[-1] != len(values) or len(col) != len(values):
            raise ValueError("inconsistent sizes")
        dense = np.zeros(shape, dtype=wire_dtype)
        dense[np.repeat(np.arange(shape[0]), np.diff(crow)), col] = values
    except (ValueError, IndexError) as e:
        raise ServiceError(
            400,
            f"{field}.sparse_csr: expected a valid CSR matrix of shape {shape} ({e}), got "
            f"{len(crow)} row pointers, {len(col)} column indices and {len(values)} values",
        ) from e
    return {"data": dense.reshape(-1).tolist(), "dtype": dtype, "shape": shape}


# --- results -> bytes ----------------------------------------------------------------------


def encode_forward_backward_output(output: ForwardBackwardOutput) -> bytes:
    """One ``ArrayRecord`` per run of datums whose outputs share dtypes and trailing shapes."""
    message = ForwardBackwardOutputMessage(
        loss_fn_output_type=output.loss_fn_output_type, metrics=output.metrics
    )
    for _, group in itertools.groupby(output.loss_fn_outputs, key=_signature):
        datums = list(group)
        record = message.loss_fn_outputs.add(type_tag=output.loss_fn_output_type, num_datums=len(datums))
        for name, first in datums[0].items():
            chunks = [_bytes(datum[name]) for datum in datums]
            batched = record.fields[name]
            batched.dtype = _PROTO_DTYPE[first.dtype]
            batched.trailing_shape.extend((first.shape or [first.numel])[1:])
            batched.data = b"".join(chunks)
            batched.offsets = np.cumsum([0, *map(len, chunks)], dtype="<i8").tobytes()
    return message.SerializeToString()


def _signature(datum: dict[str, TensorData]) -> tuple[Any, ...]:
    return tuple((name, t.dtype, tuple((t.shape or [t.numel])[1:])) for name, t in datum.items())


def _bytes(tensor: TensorData) -> bytes:
    return np.asarray(tensor.data, dtype="<f4" if tensor.dtype == "float32" else "<i8").tobytes()


def encode_sample_response(response: SampleResponse) -> bytes:
    message = SampleResponseMessage()
    for sequence in response.sequences:
        encoded = message.sequences.add(
            stop_reason=_STOP_REASONS[f"STOP_REASON_{sequence.stop_reason.upper()}"],
            tokens=np.asarray(sequence.tokens, dtype="<i4").tobytes(),
        )
        if sequence.logprobs is not None:
            encoded.logprobs = np.asarray(sequence.logprobs, dtype="<f4").tobytes()
    if response.prompt_logprobs is not None:
        values = [np.nan if lp is None else lp for lp in response.prompt_logprobs]
        message.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    if response.topk_prompt_logprobs is not None:
        rows = response.topk_prompt_logprobs
        k = max((len(row) for row in rows if row), default=0)
        token_ids = np.zeros((len(rows), k), dtype="<i4")
        logprobs = np.full((len(rows), k), _MASK_LOGPROB, dtype="<f4")
        for i, row in enumerate(rows):
            for j, (token, logprob) in enumerate(row or []):
                token_ids[i, j], logprobs[i, j] = token, logprob
        topk = message.topk_prompt_logprobs
        topk.token_ids, topk.logprobs = token_ids.tobytes(), logprobs.tobytes()
        topk.k, topk.length = k, len(rows)
    return message.SerializeToString()
