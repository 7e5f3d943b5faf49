"""The built-in losses against independent per-token references written with plain Python loops.

Each reference returns the summed loss and its analytic gradient with respect to the
learner's target logprobs; the module's value and autograd gradient must match both.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from tinker.validation import LOSS_FNS, InvalidInput, check_loss_inputs, resolve_loss_config
from tinker_backend.engine.losses import datum_loss

SEEDS = range(8)

# ---------------------------------------------------------------------------------------------
# References: lists of floats in, (value, gradient list) out.


def _clip(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def ref_cross_entropy(logp, weights):
    if isinstance(logp[0], list):  # [N, K]: every cell is one weighted term
        value = -sum(
            w * lp
            for row_l, row_w in zip(logp, weights, strict=True)
            for lp, w in zip(row_l, row_w, strict=True)
        )
        return value, [[-w for w in row] for row in weights]
    return -sum(w * lp for lp, w in zip(logp, weights, strict=True)), [-w for w in weights]


def ref_importance_sampling(logp, q, adv):
    value, grad = 0.0, []
    for lp, lq, a in zip(logp, q, adv, strict=True):
        r = math.exp(lp - lq)
        value -= r * a
        grad.append(-a * r)
    return value, grad


def ref_ppo(logp, q, adv, low, high):
    value, grad = 0.0, []
    for lp, lq, a in zip(logp, q, adv, strict=True):
        r = math.exp(lp - lq)
        unclipped, clipped = r * a, _clip(r, low, high) * a
        value -= min(unclipped, clipped)
        # The gradient flows only through the unclipped term, and only when it is the minimum.
        grad.append(-a * r if unclipped <= clipped else 0.0)
    return value, grad


def ref_cispo(logp, q, adv, low, high):
    value, grad = 0.0, []
    for lp, lq, a in zip(logp, q, adv, strict=True):
        c = _clip(math.exp(lp - lq), low, high)
        value -= c * lp * a
        grad.append(-c * a)
    return value, grad


def ref_dro(logp, q, adv, beta):
    value, grad = 0.0, []
    for lp, lq, a in zip(logp, q, adv, strict=True):
        value -= lp * a - beta / 2 * (lp - lq) ** 2
        grad.append(-(a - beta * (lp - lq)))
    return value, grad


def ref_gspo(logp, q, adv, low, high, mask=None):
    members = [i for i in range(len(logp)) if mask is None or mask[i] != 0]
    s = math.exp(sum(logp[i] - q[i] for i in members) / len(members)) if members else 1.0
    value, grad = 0.0, []
    for a in adv:  # every token has s_t = s in value and d s_t / d logp_t = s
        unclipped, clipped = s * a, _clip(s, low, high) * a
        value -= min(unclipped, clipped)
        grad.append(-a * s if unclipped <= clipped else 0.0)
    return value, grad


def ref_stable_reinforce(logp, q, adv, mask, ratio_cap, mask_low, mask_high, kl_coeff):
    """Per token: dropped unless sampled and r in [mask_low, mask_high]; the kept ones count
    -A * min(r, c) with gradient -A * min(r, c); every sampled one adds kl/2 * (logp - q)^2."""
    value, grad = 0.0, []
    for lp, lq, a, m in zip(logp, q, adv, mask, strict=True):
        g = 0.0
        if m:
            r = math.exp(lp - lq)
            if mask_low <= r <= mask_high:
                value -= a * min(r, ratio_cap)
                g -= a * min(r, ratio_cap)
            value += kl_coeff / 2 * (lp - lq) ** 2
            g += kl_coeff * (lp - lq)
        grad.append(g)
    return value, grad


# ---------------------------------------------------------------------------------------------
# Random datums and the module under test.


def random_rl_datum(seed: int, ratio_spread: float = 0.3):
    """logp, q, advantages (a fifth of them 0) and a 0/1 mask, of a random length."""
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    logp = [-abs(rng.gauss(1.5, 1.0)) for _ in range(n)]
    q = [lp + rng.gauss(0.0, ratio_spread) for lp in logp]  # ratios on both sides of the clips
    adv = [0.0 if rng.random() < 0.2 else rng.gauss(0.0, 1.0) for _ in range(n)]
    mask = [float(rng.random() < 0.7) for _ in range(n)]
    return logp, q, adv, mask


def run_module(loss_fn, logp, inputs, config, dtype=torch.float64):
    """(value, gradient) of datum_loss, with the inputs as tensors of ``dtype``."""
    leaf = torch.tensor(logp, dtype=dtype, requires_grad=True)
    tensors = {key: torch.tensor(value, dtype=dtype) for key, value in inputs.items()}
    n = leaf.shape[0]
    tensors["target_tokens"] = torch.zeros(
        leaf.shape if loss_fn == "cross_entropy" else (n,), dtype=torch.int64
    )
    loss = datum_loss(loss_fn, leaf, tensors, config)
    assert loss.shape == ()
    loss.backward()
    return loss.item(), leaf.grad.tolist()


def assert_matches(got, want, rtol=1e-9, atol=1e-12):
    got_value, got_grad = got
    want_value, want_grad = want
    assert got_value == pytest.approx(want_value, rel=rtol, abs=atol)
    assert torch.allclose(
        torch.tensor(got_grad, dtype=torch.float64),
        torch.tensor(want_grad, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
    ), (got_grad, want_grad)


# ---------------------------------------------------------------------------------------------
# Values and gradients.


@pytest.mark.parametrize("seed", SEEDS)
def test_cross_entropy(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    logp = [-abs(rng.gauss(2.0, 1.0)) for _ in range(n)]
    weights = [rng.choice([0.0, 1.0, rng.random()]) for _ in range(n)]
    config = resolve_loss_config("cross_entropy", None)
    got = run_module("cross_entropy", logp, {"weights": weights}, config)
    assert_matches(got, ref_cross_entropy(logp, weights))


@pytest.mark.parametrize("seed", SEEDS)
def test_cross_entropy_top_k(seed):
    rng = random.Random(seed)
    n, k = rng.randint(1, 20), rng.randint(1, 5)
    logp = [[-abs(rng.gauss(2.0, 1.0)) for _ in range(k)] for _ in range(n)]
    weights = [[rng.random() for _ in range(k)] for _ in range(n)]
    got = run_module("cross_entropy", logp, {"weights": weights}, {})
    assert_matches(got, ref_cross_entropy(logp, weights))


@pytest.mark.parametrize("seed", SEEDS)
def test_importance_sampling(seed):
    logp, q, adv, _ = random_rl_datum(seed)
    got = run_module("importance_sampling", logp, {"logprobs": q, "advantages": adv}, {})
    assert_matches(got, ref_importance_sampling(logp, q, adv))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("config", [None, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.28}])
def test_ppo(seed, config):
    logp, q, adv, _ = random_rl_datum(seed)
    resolved = resolve_loss_config("ppo", config)
    got = run_module("ppo", logp, {"logprobs": q, "advantages": adv}, resolved)
    assert_matches(
        got, ref_ppo(logp, q, adv, resolved["clip_low_threshold"], resolved["clip_high_threshold"])
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("config", [None, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.1}])
def test_cispo(seed, config):
    logp, q, adv, _ = random_rl_datum(seed, ratio_spread=1.0)  # some ratios above the default cap 4
    resolved = resolve_loss_config("cispo", config)
    got = run_module("cispo", logp, {"logprobs": q, "advantages": adv}, resolved)
    assert_matches(
        got, ref_cispo(logp, q, adv, resolved["clip_low_threshold"], resolved["clip_high_threshold"])
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("config", [None, {"beta": 0.5}])
def test_dro(seed, config):
    logp, q, adv, _ = random_rl_datum(seed)
    resolved = resolve_loss_config("dro", config)
    got = run_module("dro", logp, {"logprobs": q, "advantages": adv}, resolved)
    assert_matches(got, ref_dro(logp, q, adv, resolved["beta"]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize(
    ("config", "ratio_spread"),
    [
        (None, 1e-4),  # the default (tight) clips, with ratios near them
        ({"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, 0.3),
    ],
)
def test_gspo(seed, use_mask, config, ratio_spread):
    logp, q, adv, mask = random_rl_datum(seed, ratio_spread)
    resolved = resolve_loss_config("gspo", config)
    inputs = {"logprobs": q, "advantages": adv}
    if use_mask:
        inputs["sequence_ratio_mask"] = mask
    got = run_module("gspo", logp, inputs, resolved)
    low, high = resolved["clip_low_threshold"], resolved["clip_high_threshold"]
    assert_matches(got, ref_gspo(logp, q, adv, low, high, mask if use_mask else None))


def test_gspo_empty_mask_uses_ratio_one():
    logp, q, adv = [-1.0, -2.0, -0.5], [-3.0, -9.0, -0.1], [1.0, -2.0, 0.5]
    inputs = {"logprobs": q, "advantages": adv, "sequence_ratio_mask": [0.0, 0.0, 0.0]}
    got = run_module("gspo", logp, inputs, resolve_loss_config("gspo", None))
    assert_matches(got, (-sum(adv), [-a for a in adv]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "config",
    [None, {"ratio_cap": 1.2, "mask_low": 0.3, "mask_high": 2.5, "kl_coeff": 0.1}, {"mask_low": 0.0}],
)
def test_stable_reinforce(seed, config):
    logp, q, adv, mask = random_rl_datum(seed, ratio_spread=1.0)  # ratios beyond cap and mask band
    resolved = resolve_loss_config("stable_reinforce", config)
    inputs = {"logprobs": q, "advantages": adv, "sampled_mask": mask}
    got = run_module("stable_reinforce", logp, inputs, resolved)
    want = ref_stable_reinforce(
        logp, q, adv, mask, resolved["ratio_cap"], resolved["mask_low"], resolved["mask_high"], resolved["kl_coeff"]
    )
    assert_matches(got, want)


def test_stable_reinforce_on_policy_is_reinforce_and_ignores_dummy_q():
    """r = 1 on sampled tokens: value -sum A, gradient -A; a -inf-like q off the mask is inert."""
    logp, adv, mask = [-1.0, -2.0, -0.5, -3.0], [0.7, 0.7, -1.5, 2.0], [1.0, 1.0, 1.0, 0.0]
    q = [-1.0, -2.0, -0.5, -1e30]
    inputs = {"logprobs": q, "advantages": adv, "sampled_mask": mask}
    got = run_module("stable_reinforce", logp, inputs, resolve_loss_config("stable_reinforce", None))
    assert_matches(got, (-(0.7 + 0.7 - 1.5), [-0.7, -0.7, 1.5, 0.0]))


@pytest.mark.parametrize(
    ("loss_fn", "reference"),
    [
        ("cross_entropy", lambda lp, q, a: ref_cross_entropy(lp, a)),
        ("importance_sampling", ref_importance_sampling),
        ("ppo", lambda lp, q, a: ref_ppo(lp, q, a, 0.8, 1.2)),
        ("dro", lambda lp, q, a: ref_dro(lp, q, a, 0.05)),
    ],
)
def test_reference_gradients_match_finite_differences(loss_fn, reference):
    """The analytic reference gradients are right (for the losses without stop-gradients)."""
    logp, q, adv, _ = random_rl_datum(seed=123)
    _, grad = reference(logp, q, adv)
    h = 1e-6
    for i in range(len(logp)):
        up, down = list(logp), list(logp)
        up[i] += h
        down[i] -= h
        numeric = (reference(up, q, adv)[0] - reference(down, q, adv)[0]) / (2 * h)
        assert numeric == pytest.approx(grad[i], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("loss_fn", LOSS_FNS)
def test_float32_and_bfloat16(loss_fn):
    """float32 matches the float64 result; bf16 logprobs are computed (and returned) in float32."""
    logp, q, adv, mask = random_rl_datum(seed=7)
    inputs = {
        "logprobs": q,
        "advantages": adv,
        "weights": mask,
        "sequence_ratio_mask": mask,
        "sampled_mask": mask,
    }
    config = resolve_loss_config(
        loss_fn, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1} if loss_fn == "gspo" else None
    )
    assert_matches(
        run_module(loss_fn, logp, inputs, config, torch.float32),
        run_module(loss_fn, logp, inputs, config, torch.float64),
        rtol=1e-5,
        atol=1e-5,
    )
    leaf = torch.tensor(logp, dtype=torch.bfloat16, requires_grad=True)
    tensors = {key: torch.tensor(value) for key, value in inputs.items()}
    loss = datum_loss(loss_fn, leaf, tensors, config)
    assert loss.dtype == torch.float32
    loss.backward()
    assert leaf.grad is not None and leaf.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "gspo", "stable_reinforce"])
def test_dummy_logprobs_with_zero_advantage_stay_finite(loss_fn):
    """A position with A = 0 contributes exactly 0 even if exp(logp - q) overflows."""
    logp, q, adv = [-0.5, -1.0, -2.0], [-0.4, -float("inf"), -1000.0], [1.5, 0.0, 0.0]
    inputs = {"logprobs": q, "advantages": adv}
    if loss_fn == "gspo":
        inputs["sequence_ratio_mask"] = [1.0, 0.0, 0.0]
    if loss_fn == "stable_reinforce":
        inputs["sampled_mask"] = [1.0, 0.0, 0.0]
    value, grad = run_module(loss_fn, logp, inputs, resolve_loss_config(loss_fn, None))
    # Only the first token counts; its ratio exp(-0.1) is unclipped for all three losses.
    want_value, want_grad = ref_importance_sampling(logp[:1], q[:1], adv[:1])
    assert_matches((value, grad), (want_value, [*want_grad, 0.0, 0.0]))


def test_datum_loss_rejects_unknown_loss():
    with pytest.raises(InvalidInput, match="stable_reinforce"):
        datum_loss("custom", torch.zeros(2, requires_grad=True), {}, {})


# ---------------------------------------------------------------------------------------------
# Validation (shapes only) and config defaults.


def _rl_shapes(n: int) -> dict[str, tuple[int, ...]]:
    return {"target_tokens": (n,), "logprobs": (n,), "advantages": (n,)}


@pytest.mark.parametrize("loss_fn", LOSS_FNS)
def test_valid_inputs_pass(loss_fn):
    shapes = {"target_tokens": (12,), "weights": (12,)} if loss_fn == "cross_entropy" else _rl_shapes(12)
    shapes["mask"] = (12,)  # keys a loss does not use are ignored
    check_loss_inputs(loss_fn, None, shapes, n_tokens=12, datum_index=0)


def test_valid_top_k_targets_and_sequence_ratio_mask_pass():
    top_k = {"target_tokens": (12, 4), "weights": (12, 4)}
    check_loss_inputs("cross_entropy", {}, top_k, n_tokens=12, datum_index=0)
    with_mask = {**_rl_shapes(12), "sequence_ratio_mask": (12,)}
    check_loss_inputs("gspo", None, with_mask, n_tokens=12, datum_index=0)


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(InvalidInput) as err:
        check_loss_inputs("custom", None, {}, n_tokens=3, datum_index=0)
    assert isinstance(err.value, ValueError)
    for name in LOSS_FNS:
        assert repr(name) in str(err.value)
    assert "'custom'" in str(err.value)


def test_missing_input_is_named():
    shapes = _rl_shapes(5)
    del shapes["advantages"]
    with pytest.raises(InvalidInput) as err:
        check_loss_inputs("ppo", None, shapes, n_tokens=5, datum_index=3)
    assert str(err.value).startswith("data[3].loss_fn_inputs['advantages']: expected a tensor")
    assert "required by 'ppo'" in str(err.value)
    assert err.value.field == "data[3].loss_fn_inputs['advantages']"
    with pytest.raises(
        InvalidInput, match=r"data\[0\]\.loss_fn_inputs\['weights'\]: expected a tensor \(required by 'cross_entropy'\), got nothing"
    ):
        check_loss_inputs("cross_entropy", None, {"target_tokens": (5,)}, n_tokens=5, datum_index=0)


@pytest.mark.parametrize(
    ("loss_fn", "key", "bad_shape"),
    [
        ("importance_sampling", "advantages", (11,)),
        ("dro", "logprobs", (12, 1)),
        ("cispo", "target_tokens", (12, 3)),  # top-K targets only for cross_entropy
        ("gspo", "sequence_ratio_mask", (13,)),
        ("cross_entropy", "target_tokens", (11,)),
        ("cross_entropy", "target_tokens", (12, 0)),
        ("cross_entropy", "target_tokens", (12, 2, 2)),
    ],
)
def test_shape_mismatch_is_named(loss_fn, key, bad_shape):
    shapes = {"target_tokens": (12,), "weights": (12,)} if loss_fn == "cross_entropy" else _rl_shapes(12)
    shapes[key] = bad_shape
    if loss_fn == "cross_entropy":
        shapes["weights"] = bad_shape  # so that target_tokens, checked first, is the culprit
    with pytest.raises(InvalidInput) as err:
        check_loss_inputs(loss_fn, None, shapes, n_tokens=12, datum_index=2)
    message = str(err.value)
    assert message.startswith(f"data[2].loss_fn_inputs[{key!r}]: expected shape")
    assert "[12]" in message and "[" + ", ".join(map(str, bad_shape)) + "]" in message


def test_cross_entropy_weights_must_match_top_k_targets():
    shapes = {"target_tokens": (6, 4), "weights": (6, 3)}
    with pytest.raises(InvalidInput, match=r"data\[1\]\.loss_fn_inputs\['weights'\].*\[6, 4\].*\[6, 3\]"):
        check_loss_inputs("cross_entropy", None, shapes, n_tokens=6, datum_index=1)


@pytest.mark.parametrize(
    ("loss_fn", "config", "pattern"),
    [
        (
            "ppo",
            {"clip_low": 0.9},
            r"loss_fn_config\['clip_low'\].*'clip_high_threshold', 'clip_low_threshold'",
        ),
        ("dro", {"clip_low_threshold": 0.9}, r"'clip_low_threshold'.*allowed keys: 'beta'"),
        ("cross_entropy", {"beta": 0.1}, r"loss_fn_config\['beta'\].*allowed keys: none"),
        ("importance_sampling", {"clip_high_threshold": 1.2}, r"allowed keys: none"),
        ("ppo", {"clip_high_threshold": float("nan")}, r"clip_high_threshold.*finite number, got nan"),
        ("cispo", {"clip_high_threshold": float("inf")}, r"finite number, got inf"),
        ("dro", {"beta": "0.1"}, r"loss_fn_config\['beta'\]: expected a finite number, got '0.1'"),
        ("gspo", {"clip_low_threshold": True}, r"finite number, got True"),
        ("ppo", {"clip_low_threshold": 1.3}, r"clip_low_threshold <= clip_high_threshold.*1.3.*1.2"),
        ("cispo", {"clip_low_threshold": -0.1}, r"clip_low_threshold'\]: expected >= 0, got -0.1"),
        ("dro", {"beta": -0.05}, r"beta'\]: expected >= 0, got -0.05"),
        ("stable_reinforce", {"ratio_cap": 0.0}, r"ratio_cap'\]: expected > 0, got 0.0"),
        ("stable_reinforce", {"mask_low": 6.0}, r"0 <= mask_low < mask_high, got mask_low=6.0, mask_high=5.0"),
        ("stable_reinforce", {"kl_coeff": -1}, r"kl_coeff'\]: expected >= 0, got -1.0"),
        ("stable_reinforce", {"clip_low_threshold": 0.8}, r"allowed keys: 'kl_coeff', 'mask_high', 'mask_low', 'ratio_cap'"),
    ],
)
def test_bad_config_is_named(loss_fn, config, pattern):
    with pytest.raises(InvalidInput, match=pattern):
        resolve_loss_config(loss_fn, config)
    shapes = {"target_tokens": (4,), "weights": (4,)} if loss_fn == "cross_entropy" else _rl_shapes(4)
    with pytest.raises(InvalidInput, match=pattern):
        check_loss_inputs(loss_fn, config, shapes, n_tokens=4, datum_index=0)


def test_resolve_config_defaults():
    assert resolve_loss_config("cross_entropy", None) == {}
    assert resolve_loss_config("importance_sampling", {}) == {}
    assert resolve_loss_config("ppo", None) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert resolve_loss_config("cispo", None) == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    assert resolve_loss_config("dro", None) == {"beta": 0.05}
    assert resolve_loss_config("stable_reinforce", None) == {
        "ratio_cap": 2.0, "mask_low": 0.5, "mask_high": 5.0, "kl_coeff": 0.0
    }
    gspo = resolve_loss_config("gspo", None)
    assert gspo["clip_low_threshold"] == pytest.approx(1 - 3e-4)
    assert gspo["clip_high_threshold"] == pytest.approx(1 + 4e-4)


def test_resolve_config_overrides_one_key_and_returns_floats():
    config = resolve_loss_config("ppo", {"clip_high_threshold": 2})
    assert config == {"clip_low_threshold": 0.8, "clip_high_threshold": 2.0}
    assert type(config["clip_high_threshold"]) is float


@pytest.mark.parametrize("key", ["clip_low_threshold", "clip_high_threshold"])
def test_per_token_clip_thresholds_are_refused_not_ignored(key):
    shapes = {**_rl_shapes(4), key: (4,)}
    with pytest.raises(InvalidInput, match=rf"data\[1\]\.loss_fn_inputs\['{key}'\]: expected no per-token clip thresholds"):
        check_loss_inputs("ppo", None, shapes, n_tokens=4, datum_index=1)


def test_stable_reinforce_needs_provenance_spans():
    from tinker.types import Datum, ModelInput
    from tinker.validation import check_forward_backward

    datum = Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3], "advantages": [1.0, 1.0]})
    with pytest.raises(InvalidInput, match=r"data\[0\]\.loss_fn_input_spans: expected provenance spans"):
        check_forward_backward([datum], "stable_reinforce", None)
