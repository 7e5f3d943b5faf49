"""Tinker's built-in losses, computed per datum.

Every loss is applied per token and **summed**, never averaged: normalization is the
client's job (e.g. weights that sum to 1), exactly as in Tinker. The engine uses this module
in two steps:

1. ``tinker.validation.check_loss_inputs`` on each datum, with shapes only, before any
   compute, so a bad datum is rejected before it joins a shared batch;
   ``tinker.validation.resolve_loss_config`` once per request for the config's defaults.
2. :func:`datum_loss` on each datum, given the learner's per-token target logprobs.

Notation used in the docstrings: ``logp`` is the learner's log p_theta(target) per token,
``q`` the sampler's ``logprobs``, ``A`` the ``advantages``, ``r = exp(logp - q)`` the
importance ratio, ``clip(x) = min(max(x, low), high)`` with ``low``/``high`` the
``clip_low_threshold``/``clip_high_threshold`` config values, and ``sg[.]`` stop-gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from tinker.validation import LOSS_FNS, InvalidInput

_LOW, _HIGH = "clip_low_threshold", "clip_high_threshold"

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


def _stable_reinforce(logp: torch.Tensor, inputs: _Inputs, config: _Config) -> torch.Tensor:
    """REINFORCE with truncated, masked importance weights against the recorded sampler.

    ``q`` here is what the sampler computed for the sampled tokens, recorded at sampling time
    (``record_stability_info``) and put into ``logprobs`` by the server from the datum's
    provenance spans; ``m_t`` (``sampled_mask``) is 1 on positions whose target is a sampled
    token and 0 elsewhere (prompt positions get no policy gradient). With ``c`` the config's
    ``ratio_cap``, ``[lo, hi]`` its ``mask_low``/``mask_high`` and ``beta`` its ``kl_coeff``:

    * ``keep_t = m_t * [lo <= r_t <= hi]``: a token the sampler and learner disagree on that
      much is dropped (IcePop-style masking), not just down-weighted;
    * ``L = -sum_t keep_t * A_t * min(r_t, c)`` in value, computed as
      ``keep_t * A_t * sg[min(r_t, c) / r_t] * r_t`` so that the gradient with respect to
      ``logp_t`` is ``-keep_t * A_t * min(r_t, c)``: REINFORCE with a truncated IS weight
      (TIS); on-policy (``r = 1``) it is plain REINFORCE;
    * ``+ beta / 2 * sum_t m_t * (logp_t - q_t)^2``: an optional pull toward the sampler,
      gradient ``beta * m_t * (logp_t - q_t)``.
    """
    advantages = inputs["advantages"]
    mask = inputs.get("sampled_mask", torch.ones_like(logp)) != 0
    zeros = torch.zeros_like(logp)
    log_ratio = torch.where(mask, logp - inputs["logprobs"], zeros)  # a dummy q stays out of exp
    detached_ratio = torch.exp(log_ratio.detach())
    keep = mask & (detached_ratio >= config["mask_low"]) & (detached_ratio <= config["mask_high"])
    kept_log_ratio = torch.where(keep, log_ratio, zeros)  # dropped tokens: no inf * 0 in backward
    ratio = torch.exp(kept_log_ratio)
    # sg[min(r, c) / r] = exp(min(0, log c - log r)).
    weight = torch.exp(torch.clamp(math.log(config["ratio_cap"]) - kept_log_ratio.detach(), max=0.0))
    surrogate = (torch.where(keep, advantages, zeros) * weight * ratio).sum()
    penalty = 0.5 * config["kl_coeff"] * (log_ratio**2).sum()
    return -surrogate + penalty


_LOSSES: dict[str, Callable[[torch.Tensor, _Inputs, _Config], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "importance_sampling": _importance_sampling,
    "ppo": _ppo,
    "cispo": _cispo,
    "dro": _dro,
    "gspo": _gspo,
    "stable_reinforce": _stable_reinforce,
}
assert tuple(_LOSSES) == LOSS_FNS, "every loss the client may name has an implementation"


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
    ``tinker.validation.check_loss_inputs``; ``config`` is the output of
    ``tinker.validation.resolve_loss_config``. The
    semantics of each loss are in the docstrings of ``_cross_entropy``, ``_importance_sampling``,
    ``_ppo``, ``_cispo``, ``_dro``, ``_gspo`` and ``_stable_reinforce``.

    Half-precision logprobs are computed in float32 (exp and squares lose too much in
    bf16); float32 and float64 keep their dtype. The result has the compute dtype.
    """
    if loss_fn not in _LOSSES:
        raise InvalidInput("loss_fn", "one of " + ", ".join(repr(name) for name in LOSS_FNS), loss_fn)
    dtype = torch.float64 if target_logprobs.dtype == torch.float64 else torch.float32
    logp = target_logprobs.to(dtype)
    # target_tokens are ints and unused here (they chose which logprobs the engine gathered).
    float_inputs = {key: value.to(dtype) for key, value in inputs.items() if key != "target_tokens"}
    return _LOSSES[loss_fn](logp, float_inputs, config)
