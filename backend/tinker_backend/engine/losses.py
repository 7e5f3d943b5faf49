"""Tinker's built-in losses, computed per datum.

Every loss is applied per token and **summed**, never averaged: normalization is the
client's job (e.g. weights that sum to 1), exactly as in Tinker. The engine uses this module
in two steps:

1. :func:`validate_loss_inputs` on each datum, with shapes only, before any compute, so a
   bad datum is rejected before it joins a shared batch; :func:`resolve_config` once per
   request to fill in the ``loss_fn_config`` defaults.
2. :func:`datum_loss` on each datum, given the learner's per-token target logprobs.

Notation used in the docstrings: ``logp`` is the learner's log p_theta(target) per token,
``q`` the sampler's ``logprobs``, ``A`` the ``advantages``, ``r = exp(logp - q)`` the
importance ratio, ``clip(x) = min(max(x, low), high)`` with ``low``/``high`` the
``clip_low_threshold``/``clip_high_threshold`` config values, and ``sg[.]`` stop-gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real

import torch

LOSS_FNS: tuple[str, ...] = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo")

_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": _RL_INPUTS,
    "ppo": _RL_INPUTS,
    "cispo": _RL_INPUTS,
    "dro": _RL_INPUTS,
    "gspo": _RL_INPUTS,
}
# Inputs a loss uses when present. Any other key in loss_fn_inputs is ignored (the cookbook
# keeps local-only keys such as "mask" around; ignoring them is harmless).
_OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {"gspo": ("sequence_ratio_mask",)}

_LOW, _HIGH = "clip_low_threshold", "clip_high_threshold"
_DEFAULTS: dict[str, dict[str, float]] = {
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
}


class LossInputError(ValueError):
    """A request's loss function, ``loss_fn_config`` or a datum's ``loss_fn_inputs`` is invalid.

    The message names the datum (for per-datum problems), the field, what was expected and
    what was received. ``field`` and ``datum_index`` (``None`` for request-level problems:
    the loss function or its config) are kept as attributes for the caller.
    """

    def __init__(self, field: str, problem: str, *, datum_index: int | None = None) -> None:
        prefix = "" if datum_index is None else f"datum {datum_index}: "
        super().__init__(f"{prefix}{field}: {problem}")
        self.field = field
        self.datum_index = datum_index


def _check_loss_fn(loss_fn: str) -> None:
    if loss_fn not in LOSS_FNS:
        known = ", ".join(repr(name) for name in LOSS_FNS)
        raise LossInputError("loss_fn", f"expected one of {known}, got {loss_fn!r}")


def resolve_config(loss_fn: str, loss_fn_config: Mapping[str, float] | None) -> dict[str, float]:
    """Validate ``loss_fn_config`` and return it with every default filled in, as floats.

    Defaults (a key the client leaves out takes its default; the others keep theirs):

    * ``ppo``: ``clip_low_threshold=0.8``, ``clip_high_threshold=1.2`` (Tinker's, eps = 0.2).
    * ``cispo``: ``clip_low_threshold=0.0``, ``clip_high_threshold=4.0`` (Tinker's).
    * ``dro``: ``beta=0.05``, the value of Tinker's docs example (no default is published).
    * ``gspo``: ``clip_low_threshold=1 - 3e-4``, ``clip_high_threshold=1 + 4e-4``, the
      clipping ranges of the GSPO paper (Zheng et al., 2025); no default is published.
    * ``cross_entropy`` and ``importance_sampling`` take no config.

    Raises :class:`LossInputError` for an unknown loss, a key the loss does not take, a
    value that is not a finite number, ``clip_low_threshold < 0``, ``clip_low_threshold >
    clip_high_threshold``, or ``beta < 0`` (which would reward drifting away from the sampler).
    """
    _check_loss_fn(loss_fn)
    defaults = _DEFAULTS[loss_fn]
    config = dict(defaults)
    for key, value in (loss_fn_config or {}).items():
        field = f"loss_fn_config[{key!r}]"
        if key not in defaults:
            allowed = ", ".join(repr(k) for k in sorted(defaults)) or "none"
            raise LossInputError(field, f"not a parameter of {loss_fn!r}; allowed keys: {allowed}")
        # bool is a Real too, but True as a threshold is a client bug, not a number.
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise LossInputError(field, f"expected a finite number, got {value!r}")
        config[key] = float(value)
    if _LOW in config:
        low, high = config[_LOW], config[_HIGH]
        if low < 0:
            raise LossInputError(f"loss_fn_config[{_LOW!r}]", f"expected >= 0, got {low!r}")
        if low > high:
            raise LossInputError(
                "loss_fn_config",
                f"expected {_LOW} <= {_HIGH}, got {_LOW}={low!r} > {_HIGH}={high!r}",
            )
    if config.get("beta", 0.0) < 0:
        raise LossInputError("loss_fn_config['beta']", f"expected >= 0, got {config['beta']!r}")
    return config


def _show(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def validate_loss_inputs(
    loss_fn: str,
    loss_fn_config: Mapping[str, float] | None,
    input_shapes: Mapping[str, tuple[int, ...]],
    n_tokens: int,
    datum_index: int,
) -> None:
    """Check one datum's ``loss_fn_inputs`` shapes (and the request's loss and config).

    Needs only shapes, so the engine can reject a bad datum before any compute, and before
    it joins a batch shared with other requests. ``n_tokens`` is the datum's
    ``model_input`` length. Rules:

    * ``loss_fn`` must be one of :data:`LOSS_FNS`; ``loss_fn_config`` must pass
      :func:`resolve_config`.
    * Every required input must be present: ``target_tokens`` and ``weights`` for
      ``cross_entropy``; ``target_tokens``, ``logprobs`` and ``advantages`` for the others.
    * Per-token inputs have shape ``[n_tokens]``. For ``cross_entropy`` ``target_tokens``
      may instead be ``[n_tokens, K]`` (top-K soft targets, K >= 1) and ``weights`` must
      then have the same shape. ``gspo``'s optional ``sequence_ratio_mask`` is
      ``[n_tokens]``. Keys the loss does not use are ignored.

    Raises :class:`LossInputError`; per-datum messages start with ``datum <index>:``.
    """
    resolve_config(loss_fn, loss_fn_config)

    def fail(key: str, problem: str) -> LossInputError:
        return LossInputError(f"loss_fn_inputs[{key!r}]", problem, datum_index=datum_index)

    for key in _REQUIRED_INPUTS[loss_fn]:
        if key not in input_shapes:
            raise fail(key, f"required by {loss_fn!r}, but the datum has no such key")
    per_token = (n_tokens,)
    for key in _REQUIRED_INPUTS[loss_fn] + _OPTIONAL_INPUTS.get(loss_fn, ()):
        if key not in input_shapes:
            continue
        shape = tuple(input_shapes[key])
        if loss_fn == "cross_entropy":
            if key == "target_tokens" and not (
                shape == per_token or (len(shape) == 2 and shape[0] == n_tokens and shape[1] >= 1)
            ):
                raise fail(
                    key,
                    f"expected shape [{n_tokens}] or [{n_tokens}, K] with K >= 1 (one row per "
                    f"model_input token), got {_show(shape)}",
                )
            if key == "weights" and shape != tuple(input_shapes["target_tokens"]):
                expected = _show(tuple(input_shapes["target_tokens"]))
                raise fail(key, f"expected the shape of target_tokens, {expected}, got {_show(shape)}")
        elif shape != per_token:
            raise fail(
                key, f"expected shape [{n_tokens}] (one value per model_input token), got {_show(shape)}"
            )


# ---------------------------------------------------------------------------------------------
# The losses. Each takes float tensors of one datum (logp requires grad) and returns the
# summed loss as a scalar.

_Inputs = Mapping[str, torch.Tensor]
_Config = Mapping[str, float]


def _masked_log_ratio(logp: torch.Tensor, q: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """``logp - q``, set to 0 where ``A == 0``.

    Such tokens contribute exactly 0 anyway; zeroing keeps a dummy ``q`` (e.g. -inf on a
    prompt position) from overflowing ``exp`` and turning the value and gradient into NaN.
    """
    return torch.where(advantages != 0, logp - q, torch.zeros_like(logp))


def _cross_entropy(logp: torch.Tensor, inputs: _Inputs, config: _Config) -> torch.Tensor:
    """``L = -sum_t w_t * logp_t``; with ``[N, K]`` targets, every (t, k) cell is one term.

    Gradient with respect to ``logp``: ``-w``.
    """
    return -(inputs["weights"] * logp).sum()


def _importance_sampling(logp: torch.Tensor, inputs: _Inputs, config: _Config) -> torch.Tensor:
    """``L = -sum_t r_t * A_t`` with ``r_t = exp(logp_t - q_t)``: REINFORCE with an IS correction.

    Gradient with respect to ``logp_t``: ``-A_t * r_t``.
    """
    advantages = inputs["advantages"]
    ratio = torch.exp(_masked_log_ratio(logp, inputs["logprobs"], advantages))
    return -(ratio * advantages).sum()


def _ppo(logp: torch.Tensor, inputs: _Inputs, config: _Config) -> torch.Tensor:
    """``L = -sum_t min(r_t * A_t, clip(r_t) * A_t)``, the PPO clipped surrogate.

    Gradient with respect to ``logp_t``: ``-A_t * r_t`` where the unclipped term is the
    minimum (``r_t`` inside ``[low, high]``, or the clip would raise the objective), else 0.
    """
    advantages = inputs["advantages"]
    ratio = torch.exp(_masked_log_ratio(logp, inputs["logprobs"], advantages))
    clipped = ratio.clamp(config[_LOW], config[_HIGH])
    return -torch.minimum(ratio * advantages, clipped * advantages).sum()


def _cispo(logp: torch.Tensor, inputs: _Inputs, config: _Config) -> torch.Tensor:
    """``L = -sum_t sg[clip(r_t)] * logp_t * A_t``: the clipped ratio is a detached weight.

    Unlike PPO no token's gradient is dropped; a large ratio only caps its weight. Gradient
    with respect to ``logp_t``: ``-clip(r_t) * A_t``.
    """
    coefficient = torch.exp(logp.detach() - inputs["logprobs"]).clamp(config[_LOW], config[_HIGH])
    return -(coefficient * logp * inputs["advantages"]).sum()


def _dro(logp: torch.Tensor, inputs: _Inputs, config: _Config) -> torch.Tensor:
    """``L = -sum_t [logp_t * A_t - beta / 2 * (logp_t - q_t)^2]``.

    The advantages are expected in the "soft" form the client builds. The quadratic penalty
    applies on every token, so positions with ``A = 0`` are still pulled toward ``q``: a
    client should send ``q`` equal to the learner's logprob where it wants no pull. Gradient
    with respect to ``logp_t``: ``-(A_t - beta * (logp_t - q_t))``.
    """
    penalty = 0.5 * config["beta"] * (logp - inputs["logprobs"]) ** 2
    return -(logp * inputs["advantages"] - penalty).sum()


def _gspo(logp: torch.Tensor, inputs: _Inputs, config: _Config) -> torch.Tensor:
    """GSPO-token: the PPO surrogate on a sequence-level ratio, with per-token gradients.

    * ``s = exp(mean_{t in M} (logp_t - q_t))``, where ``M`` is the set of tokens whose
      ``sequence_ratio_mask`` is nonzero (all tokens when no mask is given); ``s = 1`` when
      ``M`` is empty.
    * ``s_t = sg[s] * exp(logp_t - sg[logp_t])``: equal to ``s`` in value, with gradient
      ``s`` with respect to ``logp_t``.
    * ``L = -sum_t min(s_t * A_t, clip(s_t) * A_t)`` over **all** tokens: the mask only
      selects the tokens that form ``s``. (The cookbook sets the mask to 1 on sampled tokens
      and ``A = 0`` elsewhere, so the other tokens contribute nothing there.)

    Gradient with respect to ``logp_t``: ``-A_t * s`` where the unclipped term is the
    minimum, else 0.
    """
    advantages = inputs["advantages"]
    mask = inputs.get("sequence_ratio_mask")
    in_ratio = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask != 0
    # where, not a product, so a dummy q outside M (e.g. -inf) cannot leak into the mean.
    log_ratio = torch.where(in_ratio, logp.detach() - inputs["logprobs"], torch.zeros_like(logp))
    n_in_ratio = in_ratio.sum()
    mean_log_ratio = log_ratio.sum() / n_in_ratio.clamp(min=1)  # empty M: mean 0, s = 1
    token_ratio = torch.exp(mean_log_ratio) * torch.exp(logp - logp.detach())
    clipped = token_ratio.clamp(config[_LOW], config[_HIGH])
    return -torch.minimum(token_ratio * advantages, clipped * advantages).sum()


_LOSSES: dict[str, Callable[[torch.Tensor, _Inputs, _Config], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "importance_sampling": _importance_sampling,
    "ppo": _ppo,
    "cispo": _cispo,
    "dro": _dro,
    "gspo": _gspo,
}


def datum_loss(
    loss_fn: str,
    target_logprobs: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float],
) -> torch.Tensor:
    """The loss of one datum, summed over its tokens (no averaging), as a differentiable scalar.

    ``target_logprobs`` is the learner's log p_theta(target) per token, shape ``[N]`` (or
    ``[N, K]`` for top-K ``cross_entropy``), and requires grad. ``inputs`` are the datum's
    ``loss_fn_inputs`` as tensors on the same device, already checked by
    :func:`validate_loss_inputs`; ``config`` is the output of :func:`resolve_config`. The
    semantics of each loss are in the docstrings of ``_cross_entropy``, ``_importance_sampling``,
    ``_ppo``, ``_cispo``, ``_dro`` and ``_gspo``.

    Half-precision logprobs are computed in float32 (exp and squares lose too much in
    bf16); float32 and float64 keep their dtype. The result has the compute dtype.
    """
    _check_loss_fn(loss_fn)
    dtype = torch.float64 if target_logprobs.dtype == torch.float64 else torch.float32
    logp = target_logprobs.to(dtype)
    # target_tokens are ints and unused here (they chose which logprobs the engine gathered).
    float_inputs = {key: value.to(dtype) for key, value in inputs.items() if key != "target_tokens"}
    return _LOSSES[loss_fn](logp, float_inputs, config)
