"""Input checks shared by the client, the server's two protocols and the engine.

One function per kind of input and one message per mistake, always worded
``<field>: expected <what>, got <what>``, so a user sees the same sentence whether the client
refused a call before sending it, the native protocol or the official ``/api/v1`` routes refused
it on arrival, or the engine refused a datum before it joined a shared batch.

Torch-free: the client imports it, and the server validates before any compute. Checks that need
facts of the base model (its vocabulary size and context length) take them as arguments; the
request handler passes the engine's.

* Model-free: :func:`check_forward_backward`, :func:`check_loss_inputs`,
  :func:`resolve_loss_config`, :func:`check_sample`, :func:`check_checkpoint_name`,
  :func:`parse_tinker_path`, :func:`check_ttl`, :func:`check_lora_rank`.
* Model facts: :func:`check_token_ids`, :func:`check_data_for_model`,
  :func:`check_sample_for_model`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tinker.types import Datum, SamplingParams

__all__ = [
    "CHECKPOINT_KINDS",
    "LOSS_FNS",
    "MAX_NUM_SAMPLES",
    "MAX_TOPK_PROMPT_LOGPROBS",
    "InvalidInput",
    "check_checkpoint_name",
    "check_data_for_model",
    "check_forward_backward",
    "check_lora_rank",
    "check_loss_inputs",
    "check_num_samples",
    "check_sample",
    "check_sample_for_model",
    "check_token_ids",
    "check_ttl",
    "parse_tinker_path",
    "resolve_loss_config",
]

LOSS_FNS: tuple[str, ...] = (
    "cross_entropy",
    "importance_sampling",
    "ppo",
    "cispo",
    "dro",
    "gspo",
    "stable_reinforce",
)
CHECKPOINT_KINDS = ("weights", "sampler_weights", "external_weights")
MAX_NUM_SAMPLES = 128
MAX_TOPK_PROMPT_LOGPROBS = 20
# Checkpoint TTLs, as in Tinker: 1 hour to 10 years.
MIN_TTL_S, MAX_TTL_S = 3600, 10 * 365 * 24 * 3600

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": _RL_INPUTS,
    "ppo": _RL_INPUTS,
    "cispo": _RL_INPUTS,
    "dro": _RL_INPUTS,
    "gspo": _RL_INPUTS,
    # The sampler's logprobs come from the server's records, named by provenance spans.
    "stable_reinforce": ("target_tokens", "advantages"),
}
# Inputs a loss uses when present. Any other key in loss_fn_inputs is ignored (the cookbook
# keeps local-only keys such as "mask" around; ignoring them is harmless).
_OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {
    "gspo": ("sequence_ratio_mask",),
    # Set by the server from the provenance spans (a client's own values are replaced).
    "stable_reinforce": ("logprobs", "sampled_mask"),
}

_LOW, _HIGH = "clip_low_threshold", "clip_high_threshold"
LOSS_CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    # eps = 0.2, Tinker's documented default.
    "ppo": {_LOW: 0.8, _HIGH: 1.2},
    # One-sided: only large ratios are capped (Tinker's default, cookbook tutorial 202).
    "cispo": {_LOW: 0.0, _HIGH: 4.0},
    # The value of Tinker's docs example; Tinker does not publish a default.
    "dro": {"beta": 0.05},
    # The GSPO paper's clipping ranges (eps_low 3e-4, eps_high 4e-4); Tinker does not
    # publish a default. Sequence ratios stay near 1, so PPO's 0.2 would never clip.
    "gspo": {_LOW: 1.0 - 3e-4, _HIGH: 1.0 + 4e-4},
    # Not published by Tinker; ours (docs/compat.md): truncated IS weights capped at 2 (TIS,
    # Yao et al. 2025), tokens whose ratio leaves [0.5, 5] masked (IcePop), no KL term.
    "stable_reinforce": {"ratio_cap": 2.0, "mask_low": 0.5, "mask_high": 5.0, "kl_coeff": 0.0},
}


class InvalidInput(ValueError):
    """A request field is invalid: ``str(e)`` is ``"<field>: expected <what>, got <what>"``.

    ``field`` is kept for callers that map errors to protocol fields. Picklable.
    """

    def __init__(self, field: str, expected: str, got: object) -> None:
        self.field, self.expected, self.got = field, expected, got
        super().__init__(f"{field}: expected {expected}, got {_show(got)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.expected, self.got))


class _Shown:
    """A ``got`` value that is already a description (not to be ``repr``-ed)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def described(text: str) -> object:
    """``got`` for :class:`InvalidInput` when the value is described in words ("nothing", "[3, 4]")."""
    return _Shown(text)


def _show(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _shape(shape: Sequence[int]) -> object:
    return described("[" + ", ".join(str(d) for d in shape) + "]")


# --- training -----------------------------------------------------------------------------------


def resolve_loss_config(loss_fn: str, loss_fn_config: Mapping[str, Any] | None) -> dict[str, float]:
    """Validate ``loss_fn_config`` and return it with every default filled in, as floats.

    Defaults (a key the client leaves out takes its default; the others keep theirs):

    * ``ppo``: ``clip_low_threshold=0.8``, ``clip_high_threshold=1.2`` (Tinker's, eps = 0.2).
    * ``cispo``: ``clip_low_threshold=0.0``, ``clip_high_threshold=4.0`` (Tinker's).
    * ``dro``: ``beta=0.05``, the value of Tinker's docs example (no default is published).
    * ``gspo``: ``clip_low_threshold=1 - 3e-4``, ``clip_high_threshold=1 + 4e-4``, the
      clipping ranges of the GSPO paper (Zheng et al., 2025); no default is published.
    * ``cross_entropy`` and ``importance_sampling`` take no config.
    * ``stable_reinforce``: ``ratio_cap=2.0``, ``mask_low=0.5``, ``mask_high=5.0``,
      ``kl_coeff=0.0`` (ours; Tinker does not publish its objective, see docs/compat.md).

    Raises :class:`InvalidInput` for an unknown loss, a key the loss does not take, a value that
    is not a finite number, ``clip_low_threshold < 0``, ``clip_low_threshold >
    clip_high_threshold``, or ``beta < 0`` (which would reward drifting away from the sampler).
    """
    if loss_fn not in LOSS_FNS:
        raise InvalidInput("loss_fn", "one of " + ", ".join(repr(name) for name in LOSS_FNS), loss_fn)
    defaults = LOSS_CONFIG_DEFAULTS[loss_fn]
    config = dict(defaults)
    for key, value in (loss_fn_config or {}).items():
        field = f"loss_fn_config[{key!r}]"
        if key not in defaults:
            allowed = ", ".join(repr(k) for k in sorted(defaults)) or "none"
            raise InvalidInput(field, f"a parameter of {loss_fn!r} (allowed keys: {allowed})", described(repr(key)))
        # bool is a Real too, but True as a threshold is a client bug, not a number.
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise InvalidInput(field, "a finite number", value)
        config[key] = float(value)
    if _LOW in config:
        low, high = config[_LOW], config[_HIGH]
        if low < 0:
            raise InvalidInput(f"loss_fn_config[{_LOW!r}]", ">= 0", low)
        if low > high:
            raise InvalidInput(
                "loss_fn_config", f"{_LOW} <= {_HIGH}", described(f"{_LOW}={low!r} > {_HIGH}={high!r}")
            )
    if config.get("beta", 0.0) < 0:
        raise InvalidInput("loss_fn_config['beta']", ">= 0", config["beta"])
    if loss_fn == "stable_reinforce":
        for key in ("ratio_cap", "mask_high"):
            if config[key] <= 0:
                raise InvalidInput(f"loss_fn_config[{key!r}]", "> 0", config[key])
        if not 0 <= config["mask_low"] < config["mask_high"]:
            got = f"mask_low={config['mask_low']!r}, mask_high={config['mask_high']!r}"
            raise InvalidInput("loss_fn_config", "0 <= mask_low < mask_high", described(got))
        if config["kl_coeff"] < 0:
            raise InvalidInput("loss_fn_config['kl_coeff']", ">= 0", config["kl_coeff"])
    return config


def check_loss_inputs(
    loss_fn: str,
    loss_fn_config: Mapping[str, Any] | None,
    input_shapes: Mapping[str, Sequence[int]],
    n_tokens: int,
    datum_index: int,
) -> None:
    """Check one datum's ``loss_fn_inputs`` shapes (and the request's loss and config).

    Needs only shapes, so a bad datum is rejected before any compute, and before it joins a
    batch shared with other requests. ``n_tokens`` is the datum's ``model_input`` length. Rules:

    * ``loss_fn`` must be one of :data:`LOSS_FNS`; ``loss_fn_config`` must pass
      :func:`resolve_loss_config`.
    * Every required input must be present: ``target_tokens`` and ``weights`` for
      ``cross_entropy``; ``target_tokens``, ``logprobs`` and ``advantages`` for the others.
    * Per-token inputs have shape ``[n_tokens]``. For ``cross_entropy`` ``target_tokens``
      may instead be ``[n_tokens, K]`` (top-K soft targets, K >= 1) and ``weights`` must
      then have the same shape. ``gspo``'s optional ``sequence_ratio_mask`` is
      ``[n_tokens]``. Keys the loss does not use are ignored, except ``clip_low_threshold``
      and ``clip_high_threshold``, which are refused (they belong in ``loss_fn_config``).

    Raises :class:`InvalidInput` whose field starts with ``data[<datum_index>]``.
    """
    resolve_loss_config(loss_fn, loss_fn_config)
    prefix = f"data[{datum_index}].loss_fn_inputs"
    for key in (_LOW, _HIGH):  # the Tinker SDK knows them as inputs; silently ignoring them would mislead
        if key in input_shapes:
            raise InvalidInput(
                f"{prefix}[{key!r}]",
                "no per-token clip thresholds (this server takes them in loss_fn_config)",
                described("a tensor"),
            )
    for key in _REQUIRED_INPUTS[loss_fn]:
        if key not in input_shapes:
            raise InvalidInput(f"{prefix}[{key!r}]", f"a tensor (required by {loss_fn!r})", described("nothing"))
    per_token = (n_tokens,)
    for key in _REQUIRED_INPUTS[loss_fn] + _OPTIONAL_INPUTS.get(loss_fn, ()):
        if key not in input_shapes:
            continue
        shape = tuple(input_shapes[key])
        field = f"{prefix}[{key!r}]"
        if loss_fn == "cross_entropy":
            if key == "target_tokens" and not (
                shape == per_token or (len(shape) == 2 and shape[0] == n_tokens and shape[1] >= 1)
            ):
                expected = f"shape [{n_tokens}] or [{n_tokens}, K] with K >= 1 (one row per model_input token)"
                raise InvalidInput(field, expected, _shape(shape))
            target_shape = tuple(input_shapes["target_tokens"])
            if key == "weights" and shape != target_shape:
                raise InvalidInput(field, f"the shape of target_tokens, {_shape(target_shape)!r}", _shape(shape))
        elif shape != per_token:
            raise InvalidInput(field, f"shape [{n_tokens}] (one value per model_input token)", _shape(shape))


def check_forward_backward(data: Any, loss_fn: str, loss_fn_config: Mapping[str, Any] | None) -> None:
    """Everything about a ``forward`` / ``forward_backward`` request that needs no model.

    ``data`` must be a non-empty list of ``Datum``, each with at least one ``model_input``
    token and ``int64`` ``target_tokens``; the loss inputs must fit the loss
    (:func:`check_loss_inputs`). Raises :class:`InvalidInput`, or ``TypeError`` (same wording)
    for a value of the wrong Python type.
    """
    from tinker.types import Datum

    resolve_loss_config(loss_fn, loss_fn_config)
    if isinstance(data, str | bytes) or not isinstance(data, Sequence):
        raise TypeError(f"data: expected a list of tinker.Datum, got {type(data).__name__}")
    if not data:
        raise InvalidInput("data", "at least one Datum", described("an empty list"))
    for i, datum in enumerate(data):
        if not isinstance(datum, Datum):
            raise TypeError(f"data[{i}]: expected tinker.Datum, got {type(datum).__name__}")
        n = datum.model_input.length
        if n == 0:
            raise InvalidInput(f"data[{i}].model_input", "at least one token", described("0"))
        targets = datum.loss_fn_inputs.get("target_tokens")
        if targets is not None and targets.dtype != "int64":
            raise InvalidInput(f"data[{i}].loss_fn_inputs['target_tokens']", "int64 token ids", targets.dtype)
        shapes = {key: tensor.shape or [tensor.numel] for key, tensor in datum.loss_fn_inputs.items()}
        check_loss_inputs(loss_fn, loss_fn_config, shapes, n, i)
        if loss_fn == "stable_reinforce" and datum.loss_fn_input_spans is None:
            raise InvalidInput(
                f"data[{i}].loss_fn_input_spans",
                "provenance spans naming sampled sequences (required by 'stable_reinforce'; see Datum.with_provenance)",
                described("none"),
            )


def check_token_ids(field: str, ids: Sequence[int], vocab_size: int) -> None:
    """Every id in ``[0, vocab_size)``; the message shows the first bad one."""
    if not ids or (0 <= min(ids) and max(ids) < vocab_size):
        return
    bad = next(t for t in ids if not 0 <= t < vocab_size)
    raise InvalidInput(field, f"token ids in [0, {vocab_size})", bad)


def check_data_for_model(data: Sequence[Datum], vocab_size: int, context_length: int) -> None:
    """The checks of a forward/backward request that need the model: lengths and token ids."""
    for i, datum in enumerate(data):
        ids = datum.model_input.to_ints()
        if len(ids) > context_length:
            raise InvalidInput(
                f"data[{i}].model_input", f"at most {context_length} tokens (context length)", described(str(len(ids)))
            )
        check_token_ids(f"data[{i}].model_input", ids, vocab_size)
        targets = datum.loss_fn_inputs.get("target_tokens")
        if targets is not None:
            check_token_ids(f"data[{i}].loss_fn_inputs['target_tokens']", [int(t) for t in targets.data], vocab_size)


def check_lora_rank(rank: int, max_lora_rank: int) -> None:
    if rank > max_lora_rank:
        raise InvalidInput("lora_config.rank", f"<= {max_lora_rank} (max_lora_rank)", rank)


# --- sampling -----------------------------------------------------------------------------------


def check_sample(prompt_length: int, num_samples: Any, topk_prompt_logprobs: Any) -> None:
    """The model-free checks of a ``sample`` request."""
    if prompt_length < 1:
        raise InvalidInput("prompt", "at least one token", described("0"))
    check_num_samples(num_samples)
    if type(topk_prompt_logprobs) is not int or not 0 <= topk_prompt_logprobs <= MAX_TOPK_PROMPT_LOGPROBS:
        raise InvalidInput("topk_prompt_logprobs", f"0 to {MAX_TOPK_PROMPT_LOGPROBS}", topk_prompt_logprobs)


def check_num_samples(num_samples: Any) -> None:
    if type(num_samples) is not int or not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise InvalidInput("num_samples", f"1 to {MAX_NUM_SAMPLES}", num_samples)


def check_sample_for_model(
    prompt: Sequence[int], params: SamplingParams, vocab_size: int, context_length: int
) -> None:
    """The checks of a ``sample`` request that need the model: room to generate, token ids."""
    if len(prompt) > context_length - 1:
        raise InvalidInput(
            "prompt",
            f"at most {context_length - 1} tokens (context length {context_length}, minus one to generate)",
            described(str(len(prompt))),
        )
    check_token_ids("prompt", prompt, vocab_size)
    max_tokens = params.max_tokens
    if max_tokens is not None and len(prompt) + max_tokens > context_length:
        raise InvalidInput(
            "sampling_params.max_tokens",
            f"at most {context_length - len(prompt)} (context length {context_length} minus "
            f"{len(prompt)} prompt tokens)",
            max_tokens,
        )
    for i, stop in enumerate(params.stop_token_ids()):
        if stop >= vocab_size:
            raise InvalidInput(f"sampling_params.stop[{i}]", f"a token id < {vocab_size}", stop)


# --- checkpoints --------------------------------------------------------------------------------


def check_checkpoint_name(name: Any) -> None:
    """1-128 characters of ``[A-Za-z0-9_.-]``, not starting with '.' (a folder name on the server)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput("name", "1-128 characters of [A-Za-z0-9_.-] not starting with '.'", name)


def parse_tinker_path(path: Any, kind: str | None = None, field: str = "path") -> tuple[str, str, str]:
    """``tinker://<run_id>/<kind>/<name>`` as ``(run_id, kind, name)``; ``kind`` demands one kind."""
    shape = f"'tinker://<run_id>/{kind or '|'.join(CHECKPOINT_KINDS)}/<name>'"
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise InvalidInput(field, shape, path)
    parts = path.removeprefix("tinker://").split("/")
    if len(parts) != 3 or parts[1] not in CHECKPOINT_KINDS or not all(parts):
        raise InvalidInput(field, shape, path)
    if kind is not None and parts[1] != kind:
        raise InvalidInput(field, f"a {kind!r} checkpoint, {shape}", path)
    return parts[0], parts[1], parts[2]


def check_ttl(ttl_seconds: Any) -> None:
    if ttl_seconds is not None and (type(ttl_seconds) is not int or not MIN_TTL_S <= ttl_seconds <= MAX_TTL_S):
        raise InvalidInput("ttl_seconds", f"None or {MIN_TTL_S} to {MAX_TTL_S} (1 hour to 10 years)", ttl_seconds)
