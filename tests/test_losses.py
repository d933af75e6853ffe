"""Tests for weckd_jax.losses: values against hand computations, optax and NumPy float64
references, masking, gradients, transformations, numerical edge cases and every validation error.

Kept fast on a 2-core CPU by reusing a few shapes (the library's jitted cores are then compiled
once for many tests), jitting reference functions and gradients, and computing references in
NumPy.
"""

from __future__ import annotations

import decimal
import doctest
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from tests.conftest import REPO, run_python
from weckd_jax import losses
from weckd_jax.losses import (
    attention_map,
    attention_pool,
    attention_transfer,
    cross_entropy,
    kd_kl,
    kd_kl_multi,
    masked_mean,
    temperature_schedule,
    weckd_loss,
)

B, K = 5, 4
MASK = np.array([True, False, True, True, False])  # label_mask: examples 1 and 4 unlabelled.
WHERE = np.array([True, True, False, True, False])  # where: examples 2 and 4 are padding.
FEAT_S, FEAT_T, FEAT_BIG = (B, 4, 4, 3), (B, 4, 4, 6), (B, 8, 8, 6)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _logits(seed: int = 0, scale: float = 2.0) -> np.ndarray:
    return (scale * _rng(seed).standard_normal((B, K))).astype(np.float32)


def _labels(seed: int = 0) -> np.ndarray:
    return _rng(seed + 100).integers(0, K, size=B).astype(np.int32)


def _feat(seed: int, shape) -> np.ndarray:
    return _rng(seed).standard_normal(shape).astype(np.float32)


def _jit_grad(fn, argnums=0):
    """jit(grad(sum of fn)): one compile instead of one per eager primitive."""
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=argnums))


# ------------------------------------------------------------------------------------------------
# NumPy float64 references
# ------------------------------------------------------------------------------------------------


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_ce(logits: np.ndarray, labels: np.ndarray, eps: float = 0.0) -> np.ndarray:
    q = (1 - eps) * np.eye(logits.shape[-1])[labels] + eps / logits.shape[-1]
    return -(q * _np_log_softmax(logits)).sum(-1)


def _np_kd(s: np.ndarray, t: np.ndarray, temp: float) -> np.ndarray:
    """Textbook: T^2 * sum_k p_t (log p_t - log p_s), p = softmax(z / T)."""
    pt = np.exp(_np_log_softmax(t / temp))
    return temp**2 * (pt * (np.log(pt) - _np_log_softmax(s / temp))).sum(-1)


def _np_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased linear (triangle-kernel) downsampling n_in -> n_out, half-pixel centres."""
    scale = n_out / n_in
    centres = (np.arange(n_out) + 0.5) / scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) * scale)
    return w / w.sum(1, keepdims=True)


def _np_attention(f: np.ndarray, p: float = 2, pool_to=None) -> np.ndarray:
    a = (np.abs(f.astype(np.float64)) ** p).sum(-1)  # Sum over channels, as in the paper.
    if pool_to is not None:
        n, h, w = a.shape
        th, tw = pool_to
        if h % th == 0 and w % tw == 0:  # Block average pooling (integer ratio).
            a = a.reshape(n, th, h // th, tw, w // tw).mean(axis=(2, 4))
        else:
            a = np.einsum("ih,nhw,jw->nij", _np_resize_matrix(h, th), a, _np_resize_matrix(w, tw))
    a = a.reshape(a.shape[0], -1)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _np_at(fs, ft, p=2, pool_student_to=None, pool_teacher_to=None) -> np.ndarray:
    qs, qt = _np_attention(fs, p, pool_student_to), _np_attention(ft, p, pool_teacher_to)
    return ((qs - qt) ** 2).sum(-1)


@jax.jit
def _optax_ce(logits, labels, eps):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), eps)
    return optax.losses.softmax_cross_entropy(logits, targets)


@jax.jit
def _optax_kd(s, t, temp):
    return temp**2 * optax.losses.kl_divergence(
        jax.nn.log_softmax(s / temp), jax.nn.softmax(t / temp)
    )


# ------------------------------------------------------------------------------------------------
# cross_entropy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "logits, label, expected",
    [
        ([0.0, 0.0, 0.0], 1, math.log(3.0)),
        ([1.0, 2.0, 3.0], 2, math.log(1.0 + math.exp(-1.0) + math.exp(-2.0))),
        ([1.0, 2.0, 3.0], 0, 2.0 + math.log(1.0 + math.exp(-1.0) + math.exp(-2.0))),
    ],
)
def test_cross_entropy_hand_values(logits, label, expected):
    out = np.asarray(cross_entropy(np.array([logits], np.float32), np.array([label])))
    assert out.shape == (1,)
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_cross_entropy_label_smoothing_hand_value():
    # [0, log 3] -> p = [1/4, 3/4]; eps = 0.1, label 0 -> q = [0.95, 0.05].
    out = cross_entropy(np.array([[0.0, math.log(3.0)]]), np.array([0]), label_smoothing=0.1)
    expected = -(0.95 * math.log(0.25) + 0.05 * math.log(0.75))
    np.testing.assert_allclose(out, [expected], rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_cross_entropy_matches_optax_and_numpy(eps):
    for seed in (0, 1):
        logits, labels = _logits(seed), _labels(seed)
        ours = cross_entropy(logits, labels, label_smoothing=eps)
        np.testing.assert_allclose(ours, _optax_ce(logits, labels, eps), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours, _np_ce(logits, labels, eps), rtol=1e-5, atol=1e-6)
    if eps == 0.0:
        ref = jax.jit(optax.losses.softmax_cross_entropy_with_integer_labels)(logits, labels)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_cross_entropy_out_of_range_label_is_nan_not_wrapped():
    labels = np.array([-1, K, 1, 0, 2], np.int32)
    out = np.asarray(cross_entropy(_logits(0), labels))
    assert np.isnan(out[0]) and np.isnan(out[1]) and np.all(np.isfinite(out[2:]))
    # ... but ignored where masked out.
    where = np.array([False, False, True, True, True])
    out = cross_entropy(_logits(0), labels, where=where)
    np.testing.assert_allclose(out, np.where(where, _np_ce(_logits(0), labels % K), 0), rtol=1e-5)


@pytest.mark.parametrize("dtype, num_classes", [(np.uint8, 256), (np.int8, 200)])
def test_narrow_integer_labels_with_more_classes_than_their_range(dtype, num_classes):
    # K does not fit the labels' dtype (uint8 labels of 256 classes): every label is in range,
    # none is NaN for "label >= K" with K wrapped around in the labels' dtype.
    logits = _rng(3).standard_normal((3, num_classes)).astype(np.float32)
    labels = np.array([0, 5, np.iinfo(dtype).max], dtype)
    expected = _np_ce(logits, labels.astype(np.int64))
    np.testing.assert_allclose(cross_entropy(logits, labels), expected, rtol=1e-5)
    loss, _ = weckd_loss(logits, labels, label_mask=np.ones(3, bool))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert np.isnan(cross_entropy(logits, labels.astype(np.int32) - 1)[0])  # -1: still NaN.


# Huge logits: near float16's largest value; for bfloat16 (float32's range) 1e8: under jit,
# XLA:CPU's fused log-softmax of logits / T overflows from about 1e9 * T on, in float32 too.
_HUGE = {jnp.float16: 6e4, jnp.bfloat16: 1e8}


def _low_precision_cases(dtype):
    """The losses at edge cases: huge logits, high temperature, logits of -inf (ruled-out
    classes), 1x1 and all-zero maps; the first argument is the one differentiated."""
    t = np.array([[-1, 1, 0, 0], [0, -np.inf, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, -1]])
    t = jnp.asarray(t * _HUGE[dtype], dtype)
    y = jnp.array([0, 1, 2, 3, 0])
    ft = jnp.zeros(FEAT_S, dtype).at[:2].set(1.0)  # Examples 2-4: all-zero teacher maps.
    return {
        "ce": lambda a: cross_entropy(a, y, label_smoothing=0.1),
        "kd T=1": lambda a: kd_kl(a, t, temperature=1.0),
        "kd T=100": lambda a: kd_kl(a, t, temperature=100.0),
        "weckd": lambda a: weckd_loss(a, y, label_mask=MASK, teacher_logits=t, temperature=4.0)[0],
        "at": lambda f: attention_transfer(f, ft),
        "at 1x1": lambda f: attention_transfer(f[:, :1, :1], ft),
        "mean": lambda a: masked_mean(a[:, 0], WHERE),
    }


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_inputs_give_the_float32_results(dtype):
    # bf16/fp16 inputs are upcast before any arithmetic: the values equal float32 on the same
    # (rounded) inputs, finite where float32 is, and the gradients are float32's, rounded.
    x = np.array(_logits(0) * _HUGE[dtype] / 8, np.float32)
    x[1, 1] = -np.inf  # A class the student rules out, where the teacher does too.
    fs = _feat(0, FEAT_S)
    fs[3] = 0.0  # An all-zero student map.
    low = [jnp.asarray(a, dtype) for a in (x, fs)]
    high = [a.astype(jnp.float32) for a in low]

    @jax.jit
    def values_and_grads(x, fs):
        out = {}
        for name, fn in _low_precision_cases(dtype).items():
            arg = fs if name.startswith("at") else x
            out[name] = (fn(arg), jax.grad(lambda a, fn=fn: fn(a).sum())(arg))
        return out

    ours, ref = values_and_grads(*low), values_and_grads(*high)
    for name, (value, grad) in ours.items():
        ref_value, ref_grad = ref[name]
        assert value.dtype == jnp.float32 and grad.dtype == dtype, name
        np.testing.assert_array_equal(value, ref_value, err_msg=name)
        assert np.all(np.isfinite(np.asarray(grad, np.float32))), name
        np.testing.assert_array_equal(grad, ref_grad.astype(dtype), err_msg=name)
    # The cases are edge cases indeed: huge finite KD; on 1x1 maps, AT is 0 between non-zero
    # maps and 1 against an all-zero one (the student's example 3 is all-zero too).
    assert np.all(np.isfinite(ours["kd T=1"][0])) and float(ours["kd T=1"][0][0]) > 1e4
    np.testing.assert_array_equal(ours["at 1x1"][0], [0.0, 0.0, 1.0, 0.0, 1.0])


# ------------------------------------------------------------------------------------------------
# kd_kl
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temp", [1.0, 2.5, 7.0])
def test_kd_kl_matches_numpy_float64_and_optax(temp):
    for seed in (0, 3):
        s, t = _logits(seed), _logits(seed + 10, scale=4.0)
        ours = kd_kl(s, t, temperature=temp)
        np.testing.assert_allclose(ours, _np_kd(s, t, temp), rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(ours, _optax_kd(s, t, temp), rtol=1e-4, atol=1e-6)
        assert np.all(np.asarray(ours) > 0)


def test_kd_kl_hand_value():
    # T = 1: teacher p = [1/2, 1/2]; student p = [1/4, 3/4]  (logits [0, log 3]).
    out = kd_kl(np.array([[0.0, math.log(3.0)]]), np.zeros((1, 2)), temperature=1.0)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    np.testing.assert_allclose(out, [expected], rtol=1e-6)


@pytest.mark.parametrize("temp", [2.0, 5.0])
def test_kd_kl_t_squared_scaling(temp):
    # softmax((T z) / T) = softmax(z): the only difference is the T^2 factor.
    s, t = _logits(1), _logits(2)
    scaled = kd_kl(temp * s, temp * t, temperature=temp)
    np.testing.assert_allclose(scaled, temp**2 * kd_kl(s, t, temperature=1.0), rtol=1e-5)


@pytest.mark.parametrize("shift", [-30.0, 7.5, 1e3])
def test_invariance_to_constant_logit_shift(shift):
    s, t, y = _logits(0), _logits(1), _labels(0)
    np.testing.assert_allclose(
        kd_kl(s + shift, t - shift, temperature=3.0), kd_kl(s, t, temperature=3.0), atol=2e-4
    )
    np.testing.assert_allclose(
        cross_entropy(s + shift, y, label_smoothing=0.1),
        cross_entropy(s, y, label_smoothing=0.1),
        atol=2e-4,
    )


_KD_GRAD = _jit_grad(lambda s, t, temp: kd_kl(s, t, temperature=temp), argnums=(0, 1))


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_kl_zero_value_and_gradient_when_equal(temp):
    s = _logits(4)
    np.testing.assert_array_equal(kd_kl(s, s, temperature=temp), np.zeros(B))  # Exactly zero.
    np.testing.assert_allclose(_KD_GRAD(s, s, temp)[0], 0.0, atol=1e-6)


def test_kd_kl_gradient_flows_to_student_only():
    s, t = _logits(0), _logits(1)
    gs, gt = _KD_GRAD(s, t, 2.0)
    np.testing.assert_array_equal(gt, np.zeros_like(t))
    # Analytic gradient: T * (softmax(s/T) - softmax(t/T)).
    ps, pt = np.exp(_np_log_softmax(s / 2.0)), np.exp(_np_log_softmax(t / 2.0))
    np.testing.assert_allclose(gs, 2.0 * (ps - pt), rtol=1e-4, atol=1e-6)


_BIG_S = np.array([[1e4, -1e4, 0, 0], [-1e4, 1e4, 3, 0], [1e4, 1e4, -1e4, 0]] * 2, np.float32)[:B]
_BIG_T = np.array([[-1e4, 1e4, 0, 0], [-1e4, 1e4, 3, 0], [0, 0, 0, 0]] * 2, np.float32)[:B]


@jax.jit
def _big_values_and_grads(a, temp):
    y = np.array([1, 0, 2, 1, 0], np.int32)
    fns = (
        lambda x: kd_kl(x, _BIG_T, temperature=temp),
        lambda x: cross_entropy(x, y, label_smoothing=0.1),
        lambda x: weckd_loss(x, y, label_mask=MASK, teacher_logits=_BIG_T, temperature=temp)[0],
    )
    return [(f(a), jax.grad(lambda x, f=f: f(x).sum())(a)) for f in fns]


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_large_logits_stay_finite(temp):
    s, t = _BIG_S, _BIG_T
    for value, grad in _big_values_and_grads(s, temp):
        assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
    kd = np.asarray(kd_kl(s, t, temperature=temp))
    # Opposite certain predictions: T^2 * KL = T^2 * (2e4 / T); identical rows: exactly 0.
    np.testing.assert_allclose(kd[0], temp * 2e4, rtol=1e-5)
    assert float(kd[1]) == 0.0


def test_kd_kl_classes_the_teacher_rules_out_add_nothing():
    # A teacher logit of -inf (a class ruled out): 0 log 0 = 0, not the NaN of -inf - -inf.
    t = np.array([[1.0, 2.0, -np.inf], [0.5, -np.inf, -1.0]], np.float32)
    s = np.array([[0.3, -1.0, 2.0], [1.0, 0.0, 0.5]], np.float32)
    temp = 2.0
    np.testing.assert_array_equal(kd_kl(t, t, temperature=temp), 0.0)
    pt = np.exp(_np_log_softmax(t / temp))
    terms = np.where(pt > 0, pt * (np.log(np.maximum(pt, 1e-300)) - _np_log_softmax(s / temp)), 0)
    np.testing.assert_allclose(kd_kl(s, t, temperature=temp), temp**2 * terms.sum(-1), rtol=1e-5)
    grad = jax.grad(lambda x: kd_kl(x, t, temperature=temp).sum())(s)
    ps = np.exp(_np_log_softmax(s / temp))
    np.testing.assert_allclose(grad, temp * (ps - pt), rtol=1e-5, atol=1e-7)


def _exact_kd(s: np.ndarray, t: np.ndarray, temp: float) -> tuple[np.ndarray, np.ndarray]:
    """kd_kl and its gradient in ``s``, ``T (softmax(s/T) - softmax(t/T))``, by the textbook
    formulas in 120-digit decimal arithmetic: exact to float64 at any temperature (float64
    itself would lose digits to the same cancellation as float32 at high T). A teacher logit of
    ``-inf`` adds nothing (0 log 0 = 0)."""
    with decimal.localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = 120, decimal.MAX_EMAX, decimal.MIN_EMIN
        temp_d = decimal.Decimal(float(temp))

        def log_softmax(row):
            z = [decimal.Decimal(float(x)) / temp_d for x in row]
            lse = max(z) + sum((x - max(z)).exp() for x in z).ln()
            return [x - lse for x in z]

        values, grads = [], []
        for s_row, t_row in zip(s, t, strict=True):
            pairs = list(zip(log_softmax(s_row), log_softmax(t_row), strict=True))
            kl = sum(b.exp() * (b - a) for a, b in pairs if b.is_finite())
            values.append(float(temp_d**2 * kl))
            grads.append([float(temp_d * (a.exp() - b.exp())) for a, b in pairs])
    return np.array(values), np.array(grads)


_KD = jax.jit(lambda s, t, temp: kd_kl(s, t, temperature=temp))


@pytest.mark.parametrize("temp", [1e-18, 1e-3, 1.0, 30.0, 1e3, 1e4, 1e8, 1e20, 3.4e38])
def test_kd_kl_value_and_gradient_are_accurate_at_any_temperature(temp):
    # The documented bound, over the whole accepted range of T. Computed from two log-softmaxes,
    # T^2 multiplied their float32 rounding: the value was off by 2e-2 at T = 1e3 (by 50% at
    # T = 1 for nearly equal rows), the gradient by 3e-4 at T = 1e4 and by 100% at 1e8, and both
    # were NaN above 1.8e19.
    t = _logits(2)
    s = _logits(1)
    s[:2] = t[:2] + 1e-3 * _logits(3)[:2]  # Two nearly equal rows: a tiny, cancelling KL.
    value, grad = _exact_kd(s, t, temp)
    np.testing.assert_allclose(_KD(s, t, temp), value, rtol=2e-6, atol=1e-30)
    atol = 1e-6 * np.abs(grad).max()
    np.testing.assert_allclose(_KD_GRAD(s, t, temp)[0], grad, rtol=2e-6, atol=atol)


@pytest.mark.parametrize("temp", [1.0, 20.0, 1e3, 1e8])
def test_kd_kl_is_as_accurate_with_a_class_both_rule_out(temp):
    # A class ruled out by the student and the teacher alike (logit -inf in both) adds nothing:
    # the loss is that of the other classes, to the same precision. Its difference, -inf - -inf,
    # was NaN, which sent the row to the textbook form: nearly equal rows were off by 90% at
    # T = 20 and by 3000% at T = 100.
    t = _logits(2)
    s = _logits(1)
    s[:2] = t[:2] + 1e-3 * _logits(3)[:2]
    value, grad = _exact_kd(s[:, 1:], t[:, 1:], temp)
    s[:, 0] = t[:, 0] = -np.inf
    np.testing.assert_allclose(_KD(s, t, temp), value, rtol=2e-6, atol=1e-30)
    got = _KD_GRAD(s, t, temp)[0]
    np.testing.assert_array_equal(got[:, 0], 0.0)
    np.testing.assert_allclose(got[:, 1:], grad, rtol=2e-6, atol=1e-6 * np.abs(grad).max())


# One row whose spread max_k |c_k| (c = s - t minus its teacher-weighted mean) is 25 at T = 4
# and equals T at T = 22.15473: there kd_kl switches from the textbook form to the near form.
_SPREAD_S = np.array([[4, 33, -12, 2, -63, 69, 8, -43, -22, -53]], np.float32)
_SPREAD_T = np.array([[8, 23, -22, -12, -51, 56, -2, -42, -13, -45]], np.float32)
_SWITCH_T = 22.15473


def _assert_kd_within_the_documented_bound(s, t, temp, near):
    """kd_kl's value and gradient against `_exact_kd`, to the bounds its docstring gives: a few
    1e-6 relative where ``near`` (T >= max_k |c_k|), else 1e-6 relative + 1e-6 T^2 for the value
    and 5e-7 T for each gradient entry."""
    temp = float(np.float32(temp))  # The temperature kd_kl computes with.
    value, grad = _exact_kd(s, t, temp)
    got, got_grad = np.asarray(_KD(s, t, temp)), np.asarray(_KD_GRAD(s, t, temp)[0])
    if near:
        np.testing.assert_allclose(got, value, rtol=2e-6)
        np.testing.assert_allclose(got_grad, grad, rtol=2e-6, atol=2e-6 * np.abs(grad).max())
    else:
        np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-6 * temp**2)
        np.testing.assert_allclose(got_grad, grad, rtol=0, atol=5e-7 * temp)


@pytest.mark.parametrize("near", [True, False])
def test_kd_kl_precision_on_either_side_of_the_switch(near):
    temp = _SWITCH_T * (1.0 + 1e-4 if near else 1.0 - 1e-4)
    _assert_kd_within_the_documented_bound(_SPREAD_S, _SPREAD_T, temp, near)


def test_kd_kl_error_below_the_spread_is_absolute():
    # Below the spread, and at any T with a class only the teacher rules out, the error is up
    # to about 1e-6 T^2 however small the loss: 6e-4 relative for a loss of 1.25e-3 at T = 4,
    # 3% for one of 5.1 at T = 1e3 (the student gives the ruled-out class a mass of 5e-6).
    ruled_out_t, low_s = _SPREAD_T.copy(), _SPREAD_T.copy()
    ruled_out_t[0, 0], low_s[0, 0] = -np.inf, -1e4
    for s, t, temp in [(_SPREAD_S, _SPREAD_T, 4.0), (low_s, ruled_out_t, 1e3)]:
        _assert_kd_within_the_documented_bound(s, t, temp, near=False)


def test_kd_kl_overflows_from_1_85e19_with_a_class_only_the_teacher_rules_out():
    t = _SPREAD_T.copy()
    t[0, 0] = -np.inf
    # T^2 overflows float32 from T = 1.85e19 on, whatever the loss.
    assert np.isfinite(_KD(_SPREAD_S, t, 1.8e19)).all()
    assert np.isinf(_KD(_SPREAD_S, t, 1.85e19)).all()
    assert np.isnan(_KD_GRAD(_SPREAD_S, t, 1.85e19)[0]).any()


def test_kd_kl_multi_is_weighted_sum():
    s, t1, t2, t3 = (_logits(i) for i in range(4))
    w = np.array([1.0, 2.0, 5.0])
    expected = sum(wi / w.sum() * _np_kd(s, t, 2.0) for wi, t in zip(w, (t1, t2, t3), strict=True))
    out_list = kd_kl_multi(s, [t1, t2, t3], temperature=2.0, weights=list(w))
    out_stacked = kd_kl_multi(s, np.stack([t1, t2, t3]), temperature=2.0, weights=jnp.array(w))
    np.testing.assert_allclose(out_list, expected, rtol=1e-5)
    np.testing.assert_allclose(out_stacked, expected, rtol=1e-5)
    uniform = kd_kl_multi(s, (t1, t2), temperature=2.0)
    np.testing.assert_allclose(uniform, 0.5 * (_np_kd(s, t1, 2.0) + _np_kd(s, t2, 2.0)), rtol=1e-5)


def test_huge_teacher_weights_are_normalised_without_overflow():
    # Only their ratios matter. In float32 the sum of [3e38, 3e38] overflowed to inf (both
    # weights became 0: no KD term), and 1e39 itself was inf (NaN). Python ints beyond int32
    # were an OverflowError naming no argument.
    s, t1, t2 = _logits(0), _logits(1), _logits(2)
    uniform = kd_kl_multi(s, [t1, t2], temperature=2.0)
    for huge in ([3e38, 3e38], np.array([1e39, 1e39]), [2**40, 2**40], [10**30, 10**30]):
        np.testing.assert_allclose(kd_kl_multi(s, [t1, t2], temperature=2.0, weights=huge), uniform)
    loss, _ = weckd_loss(
        s, _labels(0), label_mask=MASK, teacher_logits=[t1, t2], teacher_weights=[3e38, 1e38]
    )
    expected, _ = weckd_loss(
        s, _labels(0), label_mask=MASK, teacher_logits=[t1, t2], teacher_weights=[3.0, 1.0]
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_nested_lists_holding_ints_beyond_int32_are_named_with_the_fix():
    # JAX raised an OverflowError naming no argument.
    with pytest.raises(ValueError) as e:
        kd_kl([[2**40, 1.0]], [[0.0, 1.0]], temperature=2.0)
    assert str(e.value) == (
        "student_logits must be an array of shape [B, K] (batch, classes), got a list holding an "
        "integer beyond int32: write it as a float (e.g. 2.0**40), or pass a float array."
    )
    s, t1, t2 = _logits(0), _logits(1), _logits(2)
    with pytest.raises(ValueError, match=r"^weights must be 2 non-negative weights, one per "):
        kd_kl_multi(s, [t1, t2], temperature=2.0, weights=[[2**40], [1]])


def test_a_teacher_weighted_zero_adds_exactly_nothing_even_when_broken():
    s, t = _logits(0), _logits(1)
    broken_logits = np.full_like(t, np.inf)
    broken_map = np.full(FEAT_T, np.nan, np.float32)
    multi = kd_kl_multi(s, [t, broken_logits], temperature=2.0, weights=[1.0, 0.0])
    np.testing.assert_array_equal(multi, kd_kl(s, t, temperature=2.0))
    grad = jax.grad(
        lambda x: kd_kl_multi(x, [t, broken_logits], temperature=2.0, weights=[1.0, 0.0]).sum()
    )(s)
    np.testing.assert_allclose(grad, jax.grad(lambda x: kd_kl(x, t, temperature=2.0).sum())(s))
    fs, ft = _feat(1, FEAT_S), _feat(2, FEAT_T)

    def loss(x, teachers, features, weights):
        return weckd_loss(
            x, _labels(0), label_mask=MASK, teacher_logits=teachers, teacher_weights=weights,
            student_features=[fs], teacher_features=features, beta=0.5, temperature=2.0,
        )[0]  # fmt: skip

    def with_broken(x):
        return loss(x, [t, broken_logits], [[ft], [broken_map]], [1.0, 0.0])

    np.testing.assert_allclose(with_broken(s), loss(s, t, [ft], None), rtol=1e-6)
    grad = jax.grad(lambda x: with_broken(x).sum())(s)
    np.testing.assert_allclose(grad, jax.grad(lambda x: loss(x, t, [ft], None).sum())(s), rtol=1e-5)


def test_temperature_may_be_traced():
    s, t = _logits(0), _logits(1)
    sched = temperature_schedule("linear", t_max=4.0, t_min=1.0, total_steps=10)
    f = jax.jit(lambda step: kd_kl(s, t, temperature=sched(step)))
    np.testing.assert_allclose(f(5), _np_kd(s, t, 2.5), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# masking, gradients, transformations
# ------------------------------------------------------------------------------------------------

# name -> (fn(x, where), x): x (the first argument) is the one differentiated.
LOSSES = {
    "cross_entropy": (lambda x, w=None: cross_entropy(x, _labels(0), where=w), _logits(0)),
    "cross_entropy_ls": (
        lambda x, w=None: cross_entropy(x, _labels(0), where=w, label_smoothing=0.2),
        _logits(0),
    ),
    "kd_kl": (lambda x, w=None: kd_kl(x, _logits(1), temperature=2.0, where=w), _logits(0)),
    "kd_kl_multi": (
        lambda x, w=None: kd_kl_multi(
            x, [_logits(1), _logits(2)], temperature=3.0, weights=[1.0, 3.0], where=w
        ),
        _logits(0),
    ),
    "attention_transfer": (
        lambda x, w=None: attention_transfer(x, _feat(1, FEAT_T), where=w),
        _feat(0, FEAT_S),
    ),
    "weckd_loss": (
        lambda x, w=None: weckd_loss(
            x,
            np.where(MASK, _labels(0), -1),
            label_mask=MASK,
            teacher_logits=_logits(1),
            alpha=0.3,
            temperature=2.0,
            where=w,
        )[0],
        _logits(0),
    ),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_where_masks_value_and_gradient(name):
    fn, x = LOSSES[name]
    full, masked = np.asarray(fn(x)), np.asarray(fn(x, WHERE))
    assert masked.shape == (B,)
    np.testing.assert_allclose(masked[WHERE], full[WHERE], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(masked[~WHERE], 0.0)
    # Poison the masked-out examples: still 0 there, and no NaN leaks into the gradient.
    poisoned = np.array(x)
    poisoned[~WHERE] = np.nan
    poisoned[np.flatnonzero(~WHERE)[0]] = np.inf
    np.testing.assert_allclose(fn(poisoned, WHERE), masked, rtol=1e-6, atol=1e-7)
    g = np.asarray(_jit_grad(fn)(poisoned, WHERE))
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[~WHERE], 0.0)
    assert np.abs(g[WHERE]).max() > 0


def test_where_equals_evaluating_the_slice():
    s, t, y = _logits(0), _logits(1), _labels(0)
    fs, ft = _feat(0, FEAT_S), _feat(1, FEAT_T)
    w = WHERE
    pairs = [
        (cross_entropy(s, y, where=w), cross_entropy(s[w], y[w])),
        (kd_kl(s, t, temperature=2.0, where=w), kd_kl(s[w], t[w], temperature=2.0)),
        (attention_transfer(fs, ft, where=w), attention_transfer(fs[w], ft[w])),
    ]
    for masked, sliced in pairs:
        np.testing.assert_allclose(np.asarray(masked)[w], sliced, rtol=1e-5, atol=1e-7)
    # The batch-mean over counted examples equals the mean of the slice.
    np.testing.assert_allclose(
        masked_mean(kd_kl(s, t, temperature=2.0, where=w), w),
        np.mean(kd_kl(s[w], t[w], temperature=2.0)),
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", ["kd_kl", "attention_transfer", "weckd_loss"])
def test_jit_vmap_grad(name):
    fn, x = LOSSES[name]

    @jax.jit
    def everything(x):
        # vmap over an outer axis (e.g. an ensemble of students) and grad of the batch-mean.
        vm = jax.vmap(fn, in_axes=(0, None))(jnp.stack([x, 0.5 * x]), WHERE)
        g = jax.grad(lambda a: masked_mean(fn(a, WHERE), WHERE))(x)
        return fn(x, WHERE), vm, g

    jitted, vm, g = everything(x)
    eager = np.asarray(fn(x, WHERE))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(vm[0], eager, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(vm[1], fn(0.5 * x, WHERE), rtol=1e-5, atol=1e-7)
    assert g.shape == x.shape and np.all(np.isfinite(g)) and np.abs(np.asarray(g)).max() > 0
    np.testing.assert_array_equal(np.asarray(g)[~WHERE], 0.0)


def test_vmap_over_examples_matches_batched_call():
    s, t, y = _logits(0), _logits(1), _labels(0)
    fs, ft = _feat(0, FEAT_S), _feat(1, FEAT_BIG)

    @jax.jit
    def per_example(a, b, c, f, g):
        return kd_kl(a, b, temperature=2.0) + cross_entropy(a, c) + attention_transfer(f, g)

    np.testing.assert_allclose(
        jax.vmap(per_example)(s, t, y, fs, ft),
        _np_kd(s, t, 2.0) + _np_ce(s, y) + _np_at(fs, ft, pool_teacher_to=(4, 4)),
        rtol=1e-5,
    )


_GRAD_CASES = {
    # name -> (fn(x, t, f, g), index of the differentiated argument).
    "cross_entropy": (
        lambda x, t, f, g: cross_entropy(x, np.array([0, 2, 1]), label_smoothing=0.1),
        0,
    ),
    # Only student inputs are differentiated: stop_gradient on the teacher makes AD differ from
    # finite differences there, on purpose.
    "kd_kl+masked_mean": (
        lambda x, t, f, g: masked_mean(kd_kl(x, t, temperature=2.0), np.array([1, 0, 1], bool)),
        0,
    ),
    # Same size; and 3x3 student vs 4x4 teacher (linear resize), with p = 3.
    "attention_transfer": (
        lambda x, t, f, g: attention_transfer(f, g) + attention_transfer(f[:, :3, :3], g, p=3),
        2,
    ),
    # The whole objective (labelled/unlabelled weights, smoothing, AT on a 2x2 student stage),
    # batch-averaged, by the student's logits and by its features.
    "weckd_loss/logits": (lambda *a: _weckd_mean(*a), 0),
    "weckd_loss/features": (lambda *a: _weckd_mean(*a), 2),
}


def _weckd_mean(x, t, f, g):
    loss, _ = weckd_loss(
        x, np.array([0, 2, -1]), label_mask=np.array([True, True, False]), teacher_logits=t,
        student_features=[f[:, ::2, ::2]], teacher_features=[g], alpha=0.3, beta=0.5,
        temperature=2.0, label_smoothing=0.1,
    )  # fmt: skip
    return masked_mean(loss)


@pytest.mark.parametrize("name", sorted(_GRAD_CASES))
def test_check_grads_float64(name):
    fn, arg = _GRAD_CASES[name]
    rng = _rng(7)
    x, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    f, g = rng.standard_normal((3, 4, 4, 2)) + 0.5, rng.standard_normal((3, 4, 4, 2))
    with jax.enable_x64(True):
        args = [np.asarray(a, np.float64) for a in (x, t, f, g)]

        @jax.jit
        def h(a):
            return fn(*args[:arg], a, *args[arg + 1 :])

        # (Forward mode is slow to compile for attention maps; training uses reverse mode.)
        modes = ("rev",) if arg == 2 else ("rev", "fwd")
        check_grads(h, (args[arg],), order=1, modes=modes)


def test_masked_mean_values_and_all_masked_batch():
    v = np.array([1.0, 3.0, np.nan, 100.0, np.inf], np.float32)
    w = np.array([True, True, False, False, False])
    assert float(masked_mean(v, w)) == 2.0
    assert float(masked_mean(np.array([1.0, 2.0, 6.0, 0.0, 1.0]))) == 2.0
    none = np.zeros(B, bool)
    assert float(masked_mean(v, none)) == 0.0
    np.testing.assert_array_equal(_jit_grad(masked_mean)(v, none), np.zeros(B))
    np.testing.assert_array_equal(_jit_grad(masked_mean)(v, w), [0.5, 0.5, 0, 0, 0])


def test_all_masked_batch_gives_zero_loss_and_gradient():
    t, ft = _logits(1), _feat(1, FEAT_T)
    none = np.zeros(B, bool)

    @jax.jit
    @jax.value_and_grad
    def objective(params):
        a, f = params
        loss, _ = weckd_loss(
            a,
            np.full(B, -1, np.int32),
            label_mask=none,
            teacher_logits=t,
            student_features=[f],
            teacher_features=[ft],
            beta=1.0,
            temperature=3.0,
            where=none,
        )
        return masked_mean(loss, none)

    value, grads = objective((_logits(0), _feat(0, FEAT_S)))
    assert float(value) == 0.0
    for g in grads:
        np.testing.assert_array_equal(g, np.zeros_like(g))


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------


def test_attention_map_hand_values():
    f = np.zeros((1, 2, 2, 2), np.float32)
    f[0, 0, 0] = [3.0, 4.0]  # mean |F|^2 = 12.5
    f[0, 1, 1] = [0.0, 5.0]  # 12.5
    np.testing.assert_allclose(attention_map(f), [[1 / math.sqrt(2), 0, 0, 1 / math.sqrt(2)]])
    # p = 1: mean |F| = [3.5, 0, 0, 2.5] -> normalised.
    expected = np.array([3.5, 0, 0, 2.5]) / math.hypot(3.5, 2.5)
    np.testing.assert_allclose(attention_map(f, p=1)[0], expected, rtol=1e-6)


@pytest.mark.parametrize("p", [1.5, 2, 4])
def test_attention_map_against_numpy_unit_norm(p):
    f = _feat(3, FEAT_S)
    a = attention_map(f, p=p)
    assert a.shape == (B, 16)
    np.testing.assert_allclose(a, _np_attention(f, p), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, rtol=1e-6)


_AT_MAP_GRAD = _jit_grad(lambda x: attention_map(x) * jnp.arange(16.0))


@pytest.mark.parametrize("scale", [0.0, 1e-15, 1e15])  # a^2 underflows / overflows in float32.
def test_attention_map_is_safe_for_zero_tiny_and_huge_maps(scale):
    f = (scale * _feat(1, FEAT_S)).astype(np.float32)
    a, g = attention_map(f), _AT_MAP_GRAD(f)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(g))
    if scale == 0.0:
        np.testing.assert_array_equal(a, 0.0)
        np.testing.assert_array_equal(g, 0.0)
        # An all-zero student against a real teacher: AT = |0 - unit|^2 = 1.
        np.testing.assert_allclose(attention_transfer(f, _feat(2, FEAT_T)), 1.0, rtol=1e-6)
    else:
        np.testing.assert_allclose(a, _np_attention(_feat(1, FEAT_S)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("p", [2, 3])
@pytest.mark.parametrize("scale", [1e-30, 1e30])  # |F|^p alone under/overflows float32.
def test_attention_is_scale_invariant_at_any_feature_scale(p, scale):
    fs, ft = _feat(1, FEAT_S), _feat(2, FEAT_T)
    scaled = (scale * fs.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(
        attention_transfer(scaled, ft, p=p), attention_transfer(fs, ft, p=p), rtol=1e-5
    )
    grad = jax.grad(lambda f: attention_transfer(f, ft, p=p).sum())
    np.testing.assert_allclose(
        np.asarray(grad(scaled), np.float64) * scale, grad(fs), rtol=1e-4, atol=1e-7
    )
    pooled = np.asarray(attention_pool(scaled, p=p), np.float64) / scale
    np.testing.assert_allclose(pooled, attention_pool(fs, p=p), rtol=1e-5)


@pytest.mark.parametrize(
    "s_shape, t_shape, pool_s, pool_t",
    [
        (FEAT_S, FEAT_T, None, None),  # Different channel counts only.
        (FEAT_BIG, FEAT_S, (4, 4), None),  # Student 8x8, teacher 4x4: pooled 2x2.
        (FEAT_S, FEAT_BIG, None, (4, 4)),  # Teacher larger.
        ((B, 4, 6, 1), (B, 2, 2, 3), (2, 2), None),  # Non-square, ratios 2 and 3.
    ],
)
def test_attention_transfer_against_numpy(s_shape, t_shape, pool_s, pool_t):
    fs, ft = _feat(0, s_shape), _feat(1, t_shape)
    out = np.asarray(attention_transfer(fs, ft))
    assert out.shape == (B,)
    np.testing.assert_allclose(out, _np_at(fs, ft, 2, pool_s, pool_t), rtol=1e-5, atol=1e-7)
    assert np.all((out >= 0) & (out <= 2))


def test_attention_transfer_hand_value():
    # Student attention on pixel 0 only; teacher spread evenly over the 4 pixels:
    # |e0 - [1/2]*4|^2 = (1/2)^2 + 3 * (1/2)^2 = 1. Disjoint supports: orthogonal -> 2 (max).
    fs = np.zeros((2, 2, 2, 1), np.float32)
    fs[:, 0, 0, 0] = 2.0
    ft = np.ones((2, 2, 2, 1), np.float32)
    ft[1] = 0.0
    ft[1, 1, 1, 0] = -1.0
    np.testing.assert_allclose(attention_transfer(fs, ft), [1.0, 2.0], rtol=1e-6)


def test_attention_transfer_zero_for_nearest_upsampled_teacher():
    # An 8x8 teacher that is the 4x4 student repeated 2x2 (scaled, channels duplicated):
    # block-average pooling recovers the student's attention exactly.
    fs = _feat(0, FEAT_S)
    ft = 5.0 * np.repeat(np.repeat(fs, 2, axis=1), 2, axis=2)
    ft = np.concatenate([ft, ft], axis=-1)
    np.testing.assert_allclose(attention_transfer(fs, ft), 0.0, atol=1e-6)
    np.testing.assert_allclose(attention_transfer(ft, fs), 0.0, atol=1e-6)


@pytest.mark.parametrize("s_hw, t_hw", [((6, 6), (4, 4)), ((4, 4), (5, 7))])
def test_attention_transfer_non_integer_ratio_uses_linear_resize(s_hw, t_hw):
    fs, ft = _feat(0, (B, *s_hw, 3)), _feat(1, (B, *t_hw, 6))
    size = (min(s_hw[0], t_hw[0]), min(s_hw[1], t_hw[1]))
    expected = ((_np_attention(fs, 2, size) - _np_attention(ft, 2, size)) ** 2).sum(-1)
    out = np.asarray(attention_transfer(fs, ft))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)
    assert np.all((out >= 0) & (out <= 2))


def test_attention_transfer_resize_is_symmetric_and_keeps_constants():
    fs, ft = _feat(0, (B, 6, 6, 3)), _feat(1, FEAT_T)
    np.testing.assert_allclose(attention_transfer(ft, fs), attention_transfer(fs, ft), rtol=1e-6)
    const = attention_transfer(np.ones((B, 6, 6, 3), np.float32), np.ones(FEAT_T, np.float32))
    np.testing.assert_allclose(const, 0.0, atol=1e-6)


def test_attention_transfer_teacher_gets_no_gradient():
    fs, ft = _feat(0, FEAT_S), _feat(1, FEAT_BIG)
    gs, gt = _jit_grad(attention_transfer, argnums=(0, 1))(fs, ft)
    np.testing.assert_array_equal(gt, 0.0)
    assert np.abs(np.asarray(gs)).max() > 0
    np.testing.assert_allclose(attention_transfer(fs, fs), 0.0, atol=1e-7)


@pytest.mark.parametrize("p", [1, 1.5, 2, 3])
@pytest.mark.parametrize(
    "s_shape, t_shape", [(FEAT_S, FEAT_T), (FEAT_S, FEAT_BIG), ((B, 6, 6, 3), FEAT_T)]
)
def test_attention_pool_is_a_lossless_stand_in_for_teacher_features(p, s_shape, t_shape):
    fs, ft = _feat(0, s_shape), _feat(1, t_shape)
    pooled = attention_pool(ft, p=p)
    assert pooled.shape == (*t_shape[:-1], 1)
    np.testing.assert_allclose(attention_map(pooled, p=p), attention_map(ft, p=p), rtol=1e-5)
    np.testing.assert_allclose(
        attention_transfer(fs, pooled, p=p), attention_transfer(fs, ft, p=p), rtol=1e-5, atol=1e-7
    )


def test_labels_and_masks_may_be_python_lists():
    s = _logits(0)
    y, m = _labels(0), [True, False, True, True, False]
    np.testing.assert_array_equal(cross_entropy(s, y.tolist()), cross_entropy(s, y))
    np.testing.assert_array_equal(
        cross_entropy(s, y.tolist(), where=m), cross_entropy(s, y, where=np.array(m))
    )
    loss, _ = weckd_loss(s, y.tolist(), label_mask=m, teacher_logits=_logits(1), temperature=2.0)
    np.testing.assert_array_equal(
        loss,
        weckd_loss(s, y, label_mask=np.array(m), teacher_logits=_logits(1), temperature=2.0)[0],
    )


def test_attention_pool_hand_values_and_errors():
    f = np.zeros((1, 1, 2, 2), np.float32)
    f[0, 0, 0] = [3.0, -4.0]  # mean |F|^2 = 12.5, mean |F| = 3.5
    np.testing.assert_allclose(attention_pool(f)[0, 0, :, 0], [math.sqrt(12.5), 0.0])
    np.testing.assert_allclose(attention_pool(f, p=1)[0, 0, :, 0], [3.5, 0.0])
    assert attention_pool(f.astype(jnp.bfloat16)).dtype == jnp.float32
    with pytest.raises(ValueError, match="NHWC feature map"):
        attention_pool(np.ones((2, 3)))
    with pytest.raises(ValueError, match="p"):
        attention_pool(f, p=0.5)


# ------------------------------------------------------------------------------------------------
# temperature schedules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("t_max, t_min, total", [(8.0, 0.5, 37), (2.0, 2.0, 1)])
def test_schedule_endpoints_and_monotonicity(kind, t_max, t_min, total):
    sched = temperature_schedule(kind, t_max=t_max, t_min=t_min, total_steps=total)
    values = np.asarray(jax.vmap(sched)(np.arange(-2, total + 5)))
    end = t_max if kind == "constant" else t_min
    np.testing.assert_allclose(values[2], t_max, rtol=1e-6)  # step 0
    np.testing.assert_allclose(values[2 + total], end, rtol=1e-6)  # step total_steps
    np.testing.assert_allclose(values[:3], t_max, rtol=1e-6)  # Clamped before 0.
    np.testing.assert_allclose(values[-5:], end, rtol=1e-6)  # Clamped after total_steps.
    assert np.all(np.diff(values) <= 1e-6)
    if kind != "constant" and t_max > t_min:
        assert np.all(np.diff(values[2 : 3 + total]) < 0)  # Strictly annealing in between.
    assert np.all(values >= t_min - 1e-6) and np.all(values <= t_max + 1e-6)


def test_schedules_end_exactly_at_t_max_and_t_min():
    rng = _rng(7)
    for _ in range(50):
        t_min = float(rng.uniform(0.1, 2.0))
        t_max, total = t_min + float(rng.uniform(0.0, 10.0)), int(rng.integers(1, 5000))
        for kind in ("linear", "cosine"):
            sched = temperature_schedule(kind, t_max=t_max, t_min=t_min, total_steps=total)
            assert float(sched(0)) == float(np.float32(t_max))
            assert float(sched(total)) == float(np.float32(t_min))


@pytest.mark.parametrize(
    "t_max, t_min, total",
    [
        (2.6079259610312584, 2.6079259610312584, 15103),  # Equal bounds: a constant.
        (4.9056122790260694, 4.9056122790260694, 14982),
        (1.8662651294245791, 1.6516263666526654, 11476),  # Blend rounded one ulp below t_min.
    ],
)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_never_leaves_its_bounds(kind, t_max, t_min, total):
    sched = temperature_schedule(kind, t_max=t_max, t_min=t_min, total_steps=total)
    values = np.asarray(jax.jit(jax.vmap(sched))(np.arange(total + 1)))
    assert values.min() >= np.float32(t_min) and values.max() <= np.float32(t_max)
    if t_max == t_min:
        np.testing.assert_array_equal(values, np.float32(t_min))


def test_schedule_midpoints():
    lin = temperature_schedule("linear", t_max=5.0, t_min=1.0, total_steps=8)
    cos = temperature_schedule("cosine", t_max=5.0, t_min=1.0, total_steps=8)
    np.testing.assert_allclose([float(lin(2)), float(lin(4))], [4.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(float(cos(4)), 3.0, rtol=1e-6)
    np.testing.assert_allclose(float(cos(2)), 1.0 + 2.0 * (1 + math.cos(math.pi / 4)), rtol=1e-6)
    assert cos(3).dtype == jnp.float32 and cos(3).shape == ()
    assert cos(jnp.int32(3)) == cos(3)  # Python or array steps alike.


@pytest.mark.parametrize(
    "kind, kwargs, match",
    [
        ("exponential", dict(t_max=4.0, t_min=1.0, total_steps=10), "constant.*linear.*cosine"),
        ("cosine", dict(t_max=4.0, t_min=0.0, total_steps=10), "t_min must be"),
        ("cosine", dict(t_max=4.0, t_min=-1.0, total_steps=10), "t_min must be"),
        ("linear", dict(t_max=1.0, t_min=4.0, total_steps=10), "swap"),
        ("linear", dict(t_max=4.0, t_min=1.0, total_steps=0), "total_steps"),
        ("linear", dict(t_max=4.0, t_min=1.0, total_steps=2.5), "total_steps"),
        # Outside kd_kl's range the schedule would hand it a temperature it cannot use (traced,
        # so unchecked there): 0 / NaN losses below 1e-18, inf above float32's largest number.
        ("cosine", dict(t_max=4.0, t_min=1e-20, total_steps=10), r"t_min must be .*\[1e-18, "),
        ("cosine", dict(t_max=1e39, t_min=1.0, total_steps=10), r"t_max must be .*got 1e\+39"),
    ],
)
def test_schedule_errors(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        temperature_schedule(kind, **kwargs)


def test_schedule_steps_beyond_int32_are_exact():
    # A Python int >= 2**31 raised JAX's OverflowError naming no argument; a NumPy int64 wrapped
    # around silently (step 2**32 + 3 read as step 3, 2**31 as -2**31, i.e. t_max).
    sched = temperature_schedule("linear", t_max=4.0, t_min=1.0, total_steps=10)
    for step in (2**31, 2**40, np.int64(2**32 + 3), np.array(2**31), np.array([2**31, 5])):
        np.testing.assert_array_equal(sched(step), np.where(np.asarray(step) >= 10, 1.0, 2.5))
    long = temperature_schedule("linear", t_max=4.0, t_min=1.0, total_steps=2**32)
    assert [float(long(2**31)), float(long(np.int64(2**32)))] == [2.5, 1.0]
    wrapped = temperature_schedule("linear", t_max=4.0, t_min=1.0, total_steps=np.int64(2**32 + 8))
    assert float(wrapped(8)) == 4.0  # Not t_min: total_steps is not 8.


def test_the_ends_of_the_temperature_range_are_accepted():
    low, high = 1e-18, float(np.finfo(np.float32).max)
    s, t = _logits(1), _logits(2)
    for temp in (low, high):
        assert np.all(np.isfinite(kd_kl(s, t, temperature=temp)))
    sched = temperature_schedule("linear", t_max=high, t_min=low, total_steps=2)
    assert [float(sched(0)), float(sched(2))] == [float(np.float32(high)), float(np.float32(low))]


# ------------------------------------------------------------------------------------------------
# weckd_loss
# ------------------------------------------------------------------------------------------------


def _check_parts(loss, parts):
    assert set(parts) == {"ce", "kd", "at"}
    for v in parts.values():
        assert v.shape == loss.shape
    total = np.asarray(parts["ce"]) + np.asarray(parts["kd"]) + np.asarray(parts["at"])
    np.testing.assert_allclose(total, loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.0, 0.9])
def test_link1_without_teacher_is_masked_cross_entropy(alpha):
    s, y = _logits(0), np.where(MASK, _labels(0), -1)
    loss, parts = weckd_loss(s, y, label_mask=MASK, alpha=alpha, beta=1.0, label_smoothing=0.1)
    expected = np.where(MASK, _np_ce(s, np.where(MASK, y, 0), 0.1), 0.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)  # NOT scaled by (1 - alpha).
    _check_parts(loss, parts)
    np.testing.assert_array_equal(parts["kd"], 0.0)
    np.testing.assert_array_equal(parts["at"], 0.0)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_labelled_and_unlabelled_weights(alpha):
    s, t = _logits(0), _logits(1)
    y = np.where(MASK, _labels(0), -1)
    fs, ft = [_feat(0, FEAT_S), _feat(2, FEAT_BIG)], [_feat(1, FEAT_T), _feat(3, FEAT_T)]
    temp, beta = 2.0, 0.7
    loss, parts = weckd_loss(
        s,
        y,
        label_mask=MASK,
        teacher_logits=t,
        student_features=fs,
        teacher_features=ft,
        alpha=alpha,
        beta=beta,
        temperature=temp,
    )
    _check_parts(loss, parts)
    ce, kd = _np_ce(s, np.where(MASK, y, 0)), _np_kd(s, t, temp)
    at = beta * 0.5 * (_np_at(fs[0], ft[0]) + _np_at(fs[1], ft[1], pool_student_to=(4, 4)))
    np.testing.assert_allclose(parts["ce"], np.where(MASK, (1 - alpha) * ce, 0.0), rtol=1e-5)
    np.testing.assert_allclose(parts["kd"], np.where(MASK, alpha, 1.0) * kd, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(parts["at"], at, rtol=1e-4, atol=1e-7)
    # Unlabelled examples: KD (weight 1, whatever alpha) + AT only.
    np.testing.assert_array_equal(np.asarray(parts["ce"])[~MASK], 0.0)
    np.testing.assert_allclose(np.asarray(loss)[~MASK], (kd + at)[~MASK], rtol=1e-4)


def test_unlabelled_labels_are_ignored():
    s, t, base = _logits(0), _logits(1), _labels(0)
    outs = [
        weckd_loss(s, np.where(MASK, base, fill), label_mask=MASK, teacher_logits=t)[0]
        for fill in (-1, 0, 3, 10**6)
    ]
    for out in outs:
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out, outs[0])


def test_dense_chain_weighted_sum():
    s, y = _logits(0), np.where(MASK, _labels(0), -1)
    ts = [_logits(1), _logits(2), _logits(3)]
    fs = [_feat(0, FEAT_S)]
    fts = [[_feat(10 + j, FEAT_T)] for j in range(3)]
    w = [1.0, 1.0, 2.0]
    kw = dict(label_mask=MASK, alpha=0.4, beta=0.5, temperature=3.0)
    loss, parts = weckd_loss(
        s, y, teacher_logits=ts, teacher_weights=w, student_features=fs, teacher_features=fts, **kw
    )
    _check_parts(loss, parts)
    wn = np.array(w) / sum(w)
    kd = sum(wj * _np_kd(s, t, 3.0) for wj, t in zip(wn, ts, strict=True))
    at = sum(wj * _np_at(fs[0], ft[0]) for wj, ft in zip(wn, fts, strict=True))
    np.testing.assert_allclose(parts["kd"], np.where(MASK, 0.4, 1.0) * kd, rtol=1e-4)
    np.testing.assert_allclose(parts["at"], 0.5 * at, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(parts["ce"], np.where(MASK, 0.6 * _np_ce(s, y % K), 0), rtol=1e-5)
    # Same with the teachers stacked into one [J, B, K] array and the weights as an array.
    stacked = weckd_loss(
        s,
        y,
        teacher_logits=np.stack(ts),
        teacher_weights=jnp.array(w),
        student_features=fs,
        teacher_features=fts,
        **kw,
    )[0]
    np.testing.assert_allclose(stacked, loss, rtol=1e-6)
    # One teacher given flat equals the same teacher given nested.
    flat = weckd_loss(
        s, y, teacher_logits=ts[0], student_features=fs, teacher_features=fts[0], **kw
    )
    nested = weckd_loss(
        s, y, teacher_logits=ts[:1], student_features=fs, teacher_features=fts[:1], **kw
    )
    np.testing.assert_allclose(flat[0], nested[0], rtol=1e-6)


def test_empty_feature_lists_mean_no_attention_term():
    # A model without intermediate stages passes [] for both (S = 0): no AT term, as with no
    # features at all; with beta > 0 the error says the lists are empty.
    s, t, y = _logits(0), _logits(1), np.where(MASK, _labels(0), -1)
    kw = dict(label_mask=MASK, temperature=2.0)
    plain = weckd_loss(s, y, teacher_logits=t, **kw)[0]
    empty = weckd_loss(s, y, teacher_logits=t, student_features=[], teacher_features=[], **kw)
    np.testing.assert_array_equal(empty[0], plain)
    np.testing.assert_array_equal(empty[1]["at"], 0.0)
    dense = weckd_loss(
        s, y, teacher_logits=[t, t], student_features=(), teacher_features=[[], []], **kw
    )[0]
    np.testing.assert_allclose(dense, plain, rtol=1e-6)
    # Traced beta (unchecked): still no AT term, not 0/0 stages.
    traced = jax.jit(
        lambda b: weckd_loss(
            s, y, teacher_logits=t, student_features=[], teacher_features=[], beta=b, **kw
        )[0]
    )(0.5)
    np.testing.assert_allclose(traced, plain, rtol=1e-6)
    with pytest.raises(ValueError, match="beta=1.0 > 0 but teacher_features and student_feat"):
        weckd_loss(s, y, teacher_logits=t, student_features=[], teacher_features=[], beta=1.0, **kw)


def test_weckd_where_masks_whole_examples_and_teacher_gets_no_gradient():
    s, t, y = _logits(0), _logits(1), np.where(MASK, _labels(0), -1)
    fs, ft = _feat(0, FEAT_S), _feat(1, FEAT_T)

    def f(a, b, c, d, w=None):
        return weckd_loss(
            a,
            y,
            label_mask=MASK,
            teacher_logits=b,
            student_features=[c],
            teacher_features=[d],
            beta=2.0,
            temperature=2.0,
            where=w,
        )

    loss, parts = f(s, t, fs, ft, WHERE)
    full, _ = f(s, t, fs, ft)
    for v in (loss, *parts.values()):
        np.testing.assert_array_equal(np.asarray(v)[~WHERE], 0.0)
    np.testing.assert_allclose(np.asarray(loss)[WHERE], np.asarray(full)[WHERE], rtol=1e-6)
    grads = _jit_grad(lambda *a: masked_mean(f(*a, WHERE)[0], WHERE), argnums=(0, 1, 2, 3))(
        s, t, fs, ft
    )
    np.testing.assert_array_equal(grads[1], 0.0)  # Teacher logits.
    np.testing.assert_array_equal(grads[3], 0.0)  # Teacher features.
    for g in (grads[0], grads[2]):
        np.testing.assert_array_equal(np.asarray(g)[~WHERE], 0.0)
        assert np.abs(np.asarray(g)[WHERE]).max() > 0


def test_weckd_loss_under_jit_with_traced_hyperparameters():
    s, t, y = _logits(0), _logits(1), np.where(MASK, _labels(0), -1)
    sched = temperature_schedule("cosine", t_max=4.0, t_min=1.0, total_steps=100)

    @jax.jit
    def step(step, alpha):
        loss, _ = weckd_loss(
            s, y, label_mask=MASK, teacher_logits=t, alpha=alpha, temperature=sched(step)
        )
        return masked_mean(loss)

    expected = np.where(MASK, 0.75 * _np_ce(s, y % K), 0) + np.where(MASK, 0.25, 1) * _np_kd(
        s, t, 2.5
    )
    np.testing.assert_allclose(step(50, 0.25), expected.mean(), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

S2, T2 = np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32)
Y2, M2 = np.zeros(2, np.int32), np.ones(2, bool)
F2 = np.zeros((2, 4, 4, 3), np.float32)


def _w(**kw):
    return lambda: weckd_loss(S2, Y2, label_mask=M2, **kw)


def _schedule(step):
    return temperature_schedule("linear", t_max=2.0, t_min=1.0, total_steps=4)(step)


ERRORS = [
    (
        "ce batch",
        lambda: cross_entropy(S2, np.zeros(3, np.int32)),
        r"labels must have shape \(2,\)",
    ),
    ("ce one-hot", lambda: cross_entropy(S2, np.eye(2, 3)), "one-hot"),
    ("ce float labels", lambda: cross_entropy(S2, np.zeros(2)), "integer"),
    ("ce scalar logits", lambda: cross_entropy(np.float32(1.0), Y2), r"\[B, K\]"),
    ("ce smoothing", lambda: cross_entropy(S2, Y2, label_smoothing=1.0), r"\[0, 1\)"),
    ("ce where shape", lambda: cross_entropy(S2, Y2, where=np.ones(3, bool)), "where"),
    ("kd shape", lambda: kd_kl(S2, np.zeros((2, 4)), temperature=1.0), r"\(2, 3\) and \(2, 4\)"),
    ("kd batch", lambda: kd_kl(S2, np.zeros((3, 3)), temperature=1.0), "same shape"),
    ("kd rank", lambda: kd_kl(np.float32(0), np.float32(0), temperature=1.0), r"\[B, K\]"),
    ("ce no classes", lambda: cross_entropy(np.zeros((2, 0)), Y2), "logits has no classes"),
    ("kd no classes", lambda: kd_kl(S2[:, :0], T2[:, :0], temperature=1.0), "no classes"),
    ("kd temp 0", lambda: kd_kl(S2, T2, temperature=0.0), "temperature"),
    ("kd temp neg", lambda: kd_kl(S2, T2, temperature=np.float32(-2.0)), "temperature"),
    ("kd temp inf", lambda: kd_kl(S2, T2, temperature=math.inf), "temperature"),
    ("kd temp vector", lambda: kd_kl(S2, T2, temperature=np.ones(2)), "scalar"),
    # Below 1e-18, T^2 underflows float32 (0 or NaN losses); above 3.4e38, T overflows.
    (
        "kd temp tiny",
        lambda: kd_kl(S2, T2, temperature=1e-19),
        r"temperature must be a number in \[1e-18, 3.4e\+38\].*got 1e-19",
    ),
    ("kd temp huge", lambda: kd_kl(S2, T2, temperature=1e39), r"\[1e-18, 3.4e\+38\].*1e\+39"),
    ("multi temp tiny", lambda: kd_kl_multi(S2, [T2], temperature=1e-30), r"\[1e-18, "),
    ("w temp tiny", _w(teacher_logits=T2, temperature=1e-20), r"temperature must be .*\[1e-18, "),
    ("multi empty", lambda: kd_kl_multi(S2, [], temperature=1.0), "empty"),
    ("multi w len", lambda: kd_kl_multi(S2, [T2], temperature=1.0, weights=[1, 2]), r"\(1,\)"),
    ("multi w neg", lambda: kd_kl_multi(S2, [T2] * 2, temperature=1.0, weights=[1, -1]), ">= 0"),
    ("multi w zero", lambda: kd_kl_multi(S2, [T2] * 2, temperature=1.0, weights=[0, 0]), "zero"),
    ("multi rank", lambda: kd_kl_multi(S2, np.zeros((2, 3, 3, 3)), temperature=1.0), "stacked"),
    # True/False are not weights (they used to count as 1/0), nor are complex numbers or nested
    # lists (both used to raise float()'s TypeError, naming no argument).
    (
        "multi w bools",
        lambda: kd_kl_multi(S2, [T2] * 2, temperature=1.0, weights=[True, False]),
        r"weights must be real numbers, got a bool .*weights=\[1.0, 0.0\]",
    ),
    (
        "multi w bool array",
        lambda: kd_kl_multi(S2, [T2] * 2, temperature=1.0, weights=np.array([True, True])),
        "weights must be real numbers, got a bool",
    ),
    (
        "multi w one bool",
        lambda: kd_kl_multi(S2, [T2] * 2, temperature=1.0, weights=[1.0, np.True_]),
        "weights must be real numbers, got a bool",
    ),
    (
        "w teacher weights bools",
        _w(teacher_logits=[T2, T2], teacher_weights=[True, False]),
        "teacher_weights must be real numbers, got a bool",
    ),
    (
        "multi w complex",
        lambda: kd_kl_multi(S2, [T2] * 2, temperature=1.0, weights=[1j, 1.0]),
        "weights must be real numbers, got a complex",
    ),
    (
        "multi w nested",
        lambda: kd_kl_multi(S2, [T2] * 2, temperature=1.0, weights=[[1, 2], [3, 4]]),
        r"expected shape \(2,\), got \(2, 2\)",
    ),
    ("multi temp", lambda: kd_kl_multi(S2, [T2], temperature=-1.0), "temperature"),
    ("map rank", lambda: attention_map(np.zeros((2, 8))), "NHWC"),
    ("map p", lambda: attention_map(F2, p=0.5), "p must be"),
    ("map p bool", lambda: attention_map(F2, p=True), "p must be a Python number"),
    ("at p str", lambda: attention_transfer(F2, F2, p="2"), "p must be a Python number"),
    # NumPy booleans, like Python ones, are not numbers (they used to be read as 0 / 1).
    ("map p numpy bool", lambda: attention_map(F2, p=np.True_), "p must be a Python number"),
    ("w p bool array", _w(p=np.array(True)), "p must be a Python number"),
    (
        "ce smoothing numpy bool",
        lambda: cross_entropy(S2, Y2, label_smoothing=np.False_),
        "label_smoothing must be a Python number",
    ),
    ("at batch", lambda: attention_transfer(F2, np.zeros((3, 4, 4, 3))), "batch shape"),
    ("at rank", lambda: attention_transfer(F2, np.zeros((2, 16))), "NHWC"),
    ("at where", lambda: attention_transfer(F2, F2, where=np.ones(3, bool)), "where"),
    ("mean where", lambda: masked_mean(np.zeros(2), np.ones(3, bool)), "where"),
    ("mean float where", lambda: masked_mean(np.zeros(3), np.array([0.5, 0, 1])), "boolean"),
    ("mean int where", lambda: masked_mean(np.zeros(2), [1, 0]), "dtype int"),
    ("ce float where", lambda: cross_entropy(S2, Y2, where=np.ones(2, np.float32)), "boolean"),
    ("kd temp None", lambda: kd_kl(S2, T2, temperature=None), "number"),
    ("kd temp str", lambda: kd_kl(S2, T2, temperature="2"), "number"),
    ("kd temp bool", lambda: kd_kl(S2, T2, temperature=True), "number"),
    ("ce smoothing None", lambda: cross_entropy(S2, Y2, label_smoothing=None), "label_smoothing"),
    ("map empty", lambda: attention_map(np.zeros((2, 0, 0, 3))), "empty spatial"),
    ("at empty", lambda: attention_transfer(F2, np.zeros((2, 4, 4, 0))), "empty spatial"),
    ("w alpha", _w(teacher_logits=T2, alpha=1.5), "alpha"),
    ("w alpha neg", _w(alpha=-0.1), "alpha"),
    ("w beta", _w(beta=-1.0), "beta"),
    ("w temp", _w(teacher_logits=T2, temperature=0), "temperature"),
    ("w smoothing", _w(label_smoothing=-0.1), "label_smoothing"),
    ("w labels", lambda: weckd_loss(S2, np.zeros(3, np.int32), label_mask=M2), "labels"),
    ("w mask", lambda: weckd_loss(S2, Y2, label_mask=np.ones(3, bool)), "label_mask"),
    ("w float mask", lambda: weckd_loss(S2, Y2, label_mask=np.ones(2)), "label_mask=mask > 0"),
    ("w alpha None", _w(alpha=None), "alpha must be a number"),
    ("w where", _w(where=np.ones((2, 1), bool)), "where"),
    ("w teacher shape", _w(teacher_logits=S2.T), "same shape"),
    ("w teacher weights", _w(teacher_logits=[T2, T2], teacher_weights=[1.0]), "one weight per"),
    ("w feats, no teacher", _w(student_features=[F2], teacher_features=[F2]), "teacher_logits is"),
    (
        "w weights, no teacher",
        _w(teacher_weights=[1.0]),
        "teacher_weights were given but teacher_logits is None",
    ),
    ("w beta, no features", _w(teacher_logits=T2, beta=1.0), "teacher_features"),
    (
        "w stage count",
        _w(teacher_logits=T2, student_features=[F2, F2], teacher_features=[F2], beta=1.0),
        "one teacher map per student stage",
    ),
    (
        "w teacher count",
        _w(teacher_logits=[T2, T2], student_features=[F2], teacher_features=[F2], beta=1.0),
        "one sequence of stage maps per teacher",
    ),
    (
        "w feature batch",
        _w(teacher_logits=T2, student_features=[F2], teacher_features=[F2[:1]], beta=1.0),
        "batch shape",
    ),
    (
        "w feature vs logits batch",
        _w(teacher_logits=T2, student_features=[F2[:1]], teacher_features=[F2[:1]], beta=1.0),
        "batch shape",
    ),
    (
        "w student features not a sequence",
        _w(teacher_logits=T2, student_features=F2, teacher_features=[F2], beta=1.0),
        r"student_features must be a sequence .* student_features=\[features\]",
    ),
    (
        "w feature rank",
        _w(teacher_logits=T2, student_features=[F2[..., 0]], teacher_features=[F2], beta=1.0),
        "NHWC",
    ),
    # Not arrays at all (None, a string, a ragged list): the argument is named, not JAX's
    # "None is not a valid value for jnp.array".
    ("ce logits None", lambda: cross_entropy(None, Y2), r"logits must be an array .*got None"),
    ("ce labels None", lambda: cross_entropy(S2, None), r"labels must be .* \(2,\), got None"),
    ("ce labels ragged", lambda: cross_entropy(S2, [0, [1]]), "labels must be .* got a list"),
    ("kd teacher str", lambda: kd_kl(S2, "t", temperature=1.0), "teacher_logits .* got a str"),
    ("multi None", lambda: kd_kl_multi(S2, None, temperature=1.0), "teacher_logits_seq must"),
    ("multi teacher None", lambda: kd_kl_multi(S2, [T2, None], temperature=1.0), "got None"),
    (
        "multi w None",
        lambda: kd_kl_multi(S2, [T2] * 2, temperature=1.0, weights=[1.0, None]),
        "weights must be 2 non-negative weights",
    ),
    ("map None", lambda: attention_map(None), "features must be an NHWC .*got None"),
    ("pool None", lambda: attention_pool(None), "features must be an NHWC .*got None"),
    ("at None", lambda: attention_transfer(F2, None), "teacher_features must be .*got None"),
    ("mean None", lambda: masked_mean(None), "values must be .*got None"),
    ("mean where str", lambda: masked_mean(np.zeros(2), "ab"), "where must be .*got a str"),
    (
        "w mask None",
        lambda: weckd_loss(S2, Y2, label_mask=None),
        r"label_mask must be a boolean mask of the batch shape \(2,\), got None",
    ),
    (
        "w student features None",
        _w(teacher_logits=T2, student_features=None, teacher_features=[F2], beta=1.0),
        r"student_features must be a sequence .*got None",
    ),
    (
        "w teacher stage None",
        _w(teacher_logits=T2, student_features=[F2], teacher_features=[None], beta=1.0),
        "teacher_features must be an NHWC .*got None",
    ),
    ("schedule step bool", lambda: _schedule(True), r"step must be .*got a bool"),
    ("schedule step complex", lambda: _schedule(1j), r"step must be .*got a complex"),
    ("schedule step too large", lambda: _schedule(10**400), r"step is too large"),
    # Python ints beyond float64's range: float()'s OverflowError named no argument.
    ("kd temp huge int", lambda: kd_kl(S2, T2, temperature=10**400), r"temperature must be .*inf"),
    (
        "schedule total huge int",
        lambda: temperature_schedule("linear", t_max=2.0, t_min=1.0, total_steps=10**400),
        "total_steps must be an integer",
    ),
    ("w alpha huge int", _w(alpha=10**400), r"alpha must be in \[0, 1\], got inf"),
    ("ce smoothing huge int", lambda: cross_entropy(S2, Y2, label_smoothing=10**400), r"\[0, 1\)"),
    ("map p huge int", lambda: attention_map(F2, p=10**400), "p must be"),
    (
        "multi w huge int",
        lambda: kd_kl_multi(S2, [T2] * 2, temperature=1.0, weights=[10**400, 1]),
        r"weights must be finite, >= 0 and not all zero, got \[inf, 1.0\]",
    ),
    (
        "w teacher weights huge negative int",
        _w(teacher_logits=[T2, T2], teacher_weights=[1, -(10**400)]),
        r"teacher_weights must be finite, >= 0 and not all zero, got \[1.0, -inf\]",
    ),
    (
        "schedule step None",
        lambda: temperature_schedule("linear", t_max=2.0, t_min=1.0, total_steps=4)(None),
        "step must be a Python int or a scalar array, got None",
    ),
]


@pytest.mark.parametrize("name, fn, match", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name, fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_errors_are_raised_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="same shape"):
        jax.jit(lambda a, b: kd_kl(a, b, temperature=2.0))(S2, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="alpha"):
        jax.jit(lambda a: weckd_loss(a, Y2, label_mask=M2, teacher_logits=T2, alpha=2.0))(S2)


def _ce_smoothed(eps):
    return cross_entropy(S2, Y2, label_smoothing=eps).sum()


@pytest.mark.parametrize(
    "name, call",
    [
        ("p", lambda: jax.jit(attention_transfer)(F2, F2, p=2)),
        ("p", lambda: jax.jit(attention_map)(F2, p=2)),
        ("label_smoothing", lambda: jax.jit(cross_entropy)(S2, Y2, label_smoothing=0.1)),
        ("label_smoothing", lambda: jax.grad(_ce_smoothed)(0.1)),
    ],
    ids=["attention_transfer", "attention_map", "jit cross_entropy", "grad cross_entropy"],
)
def test_traced_static_hyper_parameters_are_named_as_traced(name, call):
    # jax.jit(fn) traces every argument it is given: the error says so and how to keep a
    # hyper-parameter that selects the program static, instead of calling p=2 "p < 1".
    with pytest.raises(ValueError, match=rf"{name} must be a concrete .*static_argnames='{name}'"):
        call()


# ------------------------------------------------------------------------------------------------
# packaging
# ------------------------------------------------------------------------------------------------


# Third-party modules the rest of the package needs and the losses must not import.
HEAVY_MODULES = (
    "absl", "chex", "flax", "grain", "matplotlib", "ml_collections", "optax", "optuna", "orbax",
    "PIL", "tensorboard", "tensorflow", "tensorflow_datasets",
)  # fmt: skip


def _heavy_modules_imported_by(statement: str) -> list[str]:
    """The heavy modules (`HEAVY_MODULES`, and any ``weckd_jax`` module but the losses) that
    ``statement`` imports in a fresh interpreter started in this repository."""
    code = (
        "import json, sys\n"
        f"{statement}\n"
        "print(json.dumps([sys.modules['weckd_jax.losses'].__file__, sorted(sys.modules)]))\n"
    )
    out = run_python("-c", code, timeout=120)
    assert out.returncode == 0, out.stderr
    path, modules = json.loads(out.stdout.splitlines()[-1])
    assert path == os.path.join(REPO, "weckd_jax", "losses.py")  # This checkout's losses.
    package = {m for m in modules if m.startswith("weckd_jax.")} - {"weckd_jax.losses"}
    return sorted(package | {m.split(".")[0] for m in modules} & set(HEAVY_MODULES))


def test_import_does_not_pull_heavy_dependencies():
    assert _heavy_modules_imported_by("import weckd_jax.losses") == []


def test_heavy_import_check_sees_package_and_third_party_modules():
    # The check above can fail: a module of the package that imports ml_collections is seen.
    found = _heavy_modules_imported_by("import weckd_jax.losses, weckd_jax.config")
    assert {"weckd_jax.config", "ml_collections"} <= set(found)


def _settings_changed_by(statement: str) -> list[str]:
    """The environment variables (``$NAME``) and JAX options that ``statement`` changes in a fresh
    interpreter started in this repository, after ``import jax`` (which sets a few of its own)."""
    code = (
        "import json, os, jax\n"
        "def settings():\n"
        "    env = {'$' + k: v for k, v in os.environ.items()}\n"
        "    return env | {k: repr(v) for k, v in jax.config.values.items()}\n"
        "before = settings()\n"
        f"{statement}\n"
        "after = settings()\n"
        "print(json.dumps(sorted(k for k in before | after if before.get(k) != after.get(k))))\n"
    )
    out = run_python("-c", code, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_import_changes_no_jax_option_or_environment_variable():
    # A library must not set XLA_FLAGS or JAX options behind the importing program's back.
    assert _settings_changed_by("import weckd_jax.losses") == []
    # The check can fail: it sees both kinds of change.
    changes = "jax.config.update('jax_enable_x64', True); os.environ['XLA_FLAGS'] = '-x'"
    assert _settings_changed_by(changes) == ["$XLA_FLAGS", "jax_enable_x64"]


def test_public_api_and_docstring_examples():
    assert set(losses.__all__) == {
        "attention_map",
        "attention_pool",
        "attention_transfer",
        "cross_entropy",
        "kd_kl",
        "kd_kl_multi",
        "masked_mean",
        "temperature_schedule",
        "weckd_loss",
    }
    for name in losses.__all__:
        assert name in losses.__doc__ and "Example" in getattr(losses, name).__doc__
    result = doctest.testmod(losses, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 10 and result.failed == 0


def test_schedule_accepts_traced_hyper_parameters_inside_jit():
    @jax.jit
    def at(step, t_max, t_min, total):
        return temperature_schedule("cosine", t_max=t_max, t_min=t_min, total_steps=total)(step)

    eager = temperature_schedule("cosine", t_max=6.0, t_min=2.0, total_steps=40)
    for step in (0, 10, 20, 40, 80):
        np.testing.assert_allclose(at(step, 6.0, 2.0, 40.0), eager(step), rtol=1e-6)
    np.testing.assert_allclose(at(20, 6.0, 2.0, 40.0), 4.0, rtol=1e-6)
