"""Pure, per-example loss functions for (chained, weakly-supervised) knowledge distillation.

This module is a small library in the style of :mod:`optax.losses`. It depends only on ``jax``
and ``jax.numpy`` (no Flax, no Optax), so any JAX project can import it.

Conventions shared by every function:

* **Per-example outputs.** Losses return one value per example, shape ``[B]`` (more generally
  the batch shape: any number of leading batch dimensions is accepted, so ``jax.vmap`` over
  examples works). Reduce them yourself, e.g. with :func:`masked_mean`.
* **``where`` masks.** An optional boolean ``where`` of the batch shape selects the examples that
  count (a float or integer mask is an error, not a weighting: weigh the per-example values
  yourself before reducing). Masked-out examples give exactly ``0`` and a zero gradient, even
  when their inputs are ``inf``/``NaN`` (their inputs are replaced before any arithmetic, so
  nothing leaks into gradients).
* **Keyword-only hyper-parameters**, validated at trace time: shape checks cost nothing under
  ``jit``. Values (temperature, weights, ...) are checked when they are concrete Python/NumPy
  numbers; traced values (e.g. a temperature from a schedule inside ``jit``) cannot be checked.
* **Units.** Cross-entropy and KL divergence are in nats (natural logarithms); :func:`kd_kl`
  multiplies the KL by ``T^2``; attention transfer is a squared distance between unit vectors
  (dimensionless, in ``[0, 2]``).
* **Precision.** Inputs in a low-precision float (bf16/fp16) are computed in float32 (values
  come back float32, gradients in the input's dtype); float64 inputs stay float64.

Functions:

* :func:`cross_entropy` -- softmax cross-entropy with integer labels and label smoothing.
* :func:`kd_kl` -- Hinton distillation, ``T^2 KL(softmax(t/T) || softmax(s/T))``.
* :func:`kd_kl_multi` -- weighted sum of :func:`kd_kl` over several teachers (dense chain).
* :func:`attention_map` -- Zagoruyko-Komodakis spatial attention of an NHWC feature map.
* :func:`attention_transfer` -- squared L2 distance between normalised attention maps.
* :func:`attention_pool` -- a feature map reduced to the one channel attention transfer reads
  (to precompute and store a frozen teacher's maps).
* :func:`temperature_schedule` -- constant / linear / cosine temperature annealing.
* :func:`weckd_loss` -- the WeCKD objective: CE on labelled examples, KD (all examples) and AT.
* :func:`masked_mean` -- mean over the counted examples (0 for an all-masked batch).

Example::

  >>> import jax.numpy as jnp
  >>> from weckd_jax import losses
  >>> s = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
  >>> t = jnp.array([[3.0, 0.0, -2.0], [0.0, 0.0, 2.0]])
  >>> loss, parts = losses.weckd_loss(
  ...     s, jnp.array([0, -1]), label_mask=jnp.array([True, False]),
  ...     teacher_logits=t, alpha=0.5, temperature=2.0)
  >>> loss.shape, sorted(parts)
  ((2,), ['at', 'ce', 'kd'])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "attention_map",
    "attention_pool",
    "attention_transfer",
    "cross_entropy",
    "kd_kl",
    "kd_kl_multi",
    "masked_mean",
    "temperature_schedule",
    "weckd_loss",
]

ScalarLike = float | int | jax.Array
Schedule = Callable[[jax.typing.ArrayLike], jax.Array]

SCHEDULE_KINDS = ("constant", "linear", "cosine")


# --------------------------------------------------------------------------------------------
# Helpers (trace-time validation, dtype handling, masking)
# --------------------------------------------------------------------------------------------


def _shape(x: Any) -> tuple[int, ...]:
    if hasattr(x, "shape"):
        return tuple(x.shape)
    return () if isinstance(x, int | float | complex) else tuple(jnp.asarray(x).shape)


def _describe(x: Any) -> str:
    """What a bad argument is, for error messages: ``None``, an array's shape, or its type."""
    if x is None:
        return "None"
    if hasattr(x, "shape"):
        return f"an array of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _check_array(name: str, x: Any, expected: str) -> None:
    """`ValueError` naming ``name`` unless ``x`` is an array, a number or a nested list of them
    (a list's Python ints within int32).

    JAX's own errors for ``None``, a string, a ragged list or a list's int beyond int32 name no
    argument.
    """
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return
    if isinstance(x, int):  # Beyond int32 too: a number, range-checked where it is read.
        return
    try:
        jnp.asarray(x)
    except OverflowError:  # An int beyond int32 in a list: named below.
        pass
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {expected}, got {_describe(x)}.") from None
    # JAX reads a list's Python ints as int32 (even beside floats): an OverflowError naming no
    # argument for one beyond it.
    if any(type(v) is int and not -(2**31) <= v < 2**31 for v in jax.tree.leaves(x)):
        raise ValueError(
            f"{name} must be {expected}, got a {type(x).__name__} holding an integer beyond int32: "
            "write it as a float (e.g. 2.0**40), or pass a float array."
        )


def _concrete(x: Any) -> float | None:
    """``float(x)`` when ``x`` is a concrete scalar (``+-inf`` for a Python int beyond float's
    range, so that range checks name it), ``None`` when it is traced."""
    try:
        return float(x)
    except jax.errors.ConcretizationTypeError:
        return None
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _is_bool(x: Any) -> bool:
    """A Python bool, or a NumPy/JAX boolean scalar or array (``float()`` reads them as 0/1)."""
    return isinstance(x, bool) or getattr(x, "dtype", None) == jnp.bool_


def _is_real(dtype: Any) -> bool:
    """An integer or floating-point dtype: not bool (True/False are not numbers here), not
    complex."""
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)


def _float(x: jax.Array) -> jax.Array:
    """Cast to a float dtype of at least 32 bits (bf16/fp16/int -> f32, f64 stays f64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_scalar(name: str, value: Any) -> None:
    """A real number or a real scalar array (traced or not); not ``None``, a string or a bool."""
    dtype = getattr(value, "dtype", None)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number and (dtype is None or not jnp.issubdtype(dtype, jnp.number)):
        raise ValueError(
            f"{name} must be a number or a scalar array of numbers, got {value!r} "
            f"({type(value).__name__}). Pass e.g. {name}=1.0."
        )
    if _shape(value) != ():
        raise ValueError(f"{name} must be a scalar, got an array of shape {_shape(value)}.")


# The temperatures kd_kl is accurate for: below 1e-18, T^2 underflows float32 (the loss and its
# gradient come out 0 or NaN); above float32's largest number, T itself is inf.
TEMPERATURE_RANGE = (1e-18, float(jnp.finfo(jnp.float32).max))
# The range as error messages print it: "[1e-18, 3.4e+38]".
TEMPERATURE_RANGE_TEXT = "[{:g}, {:.3g}]".format(*TEMPERATURE_RANGE)


def _check_temperature(temperature: ScalarLike, name: str = "temperature") -> None:
    """A real scalar, in `TEMPERATURE_RANGE` when concrete (a traced one cannot be checked)."""
    _check_scalar(name, temperature)
    t = _concrete(temperature)
    low, high = TEMPERATURE_RANGE
    if t is not None and not low <= t <= high:
        raise ValueError(
            f"{name} must be a number in {TEMPERATURE_RANGE_TEXT} (where float32 computes the "
            f"distillation loss accurately), got {t:g}. Pass e.g. {name}=2.0 (1.0 = no "
            "softening; Hinton et al. use 2-20)."
        )


def _check_logits(name: str, logits: jax.Array) -> None:
    _check_array(name, logits, "an array of shape [B, K] (batch, classes)")
    if jnp.ndim(logits) < 1:
        raise ValueError(
            f"{name} must have shape [B, K] (batch, classes), got a scalar. Pass one row of "
            "class scores per example."
        )
    if _shape(logits)[-1] == 0:
        # Otherwise cross-entropy is NaN for every label and KD silently 0.
        raise ValueError(
            f"{name} has no classes: shape {_shape(logits)}, the last axis is empty. Pass one "
            "score per class (a classifier head with at least one output)."
        )


def _check_mask(name: str, mask: Any, batch_shape: tuple[int, ...]) -> None:
    """A boolean array (or nested list of bools) of ``batch_shape``."""
    _check_array(name, mask, f"a boolean mask of the batch shape {batch_shape}")
    if _shape(mask) != batch_shape:
        raise ValueError(
            f"{name} must be a boolean mask of the batch shape {batch_shape}, got shape "
            f"{_shape(mask)}. Pass one True/False per example."
        )
    dtype = mask.dtype if hasattr(mask, "dtype") else jnp.asarray(mask).dtype
    if dtype != jnp.bool_:
        # A float mask would otherwise count every non-zero entry (0.5, NaN) as True.
        raise ValueError(
            f"{name} must be a boolean mask, got dtype {dtype}. Pass {name}=mask > 0; to weigh "
            "examples, multiply the per-example losses by the weights before reducing."
        )


def _check_where(where: jax.Array | None, batch_shape: tuple[int, ...]) -> jax.Array | None:
    if where is not None:
        _check_mask("where", where, batch_shape)
    return where  # Converted inside the jitted cores (no eager op here).


def _as_bool(where: jax.Array | None) -> jax.Array | None:
    return None if where is None else jnp.asarray(where).astype(bool)


def _mask_rows(x: jax.Array, where: jax.Array | None) -> jax.Array:
    """Replace masked-out examples of ``x`` (shape ``batch + trailing``) by zeros.

    Done *before* any arithmetic so that ``inf``/``NaN`` in masked-out examples cannot turn the
    zero cotangent of the outer ``jnp.where`` into ``NaN`` (the "double where" trick).
    """
    if where is None:
        return x
    w = where.reshape(where.shape + (1,) * (x.ndim - where.ndim))
    return jnp.where(w, x, jnp.zeros((), x.dtype))


def _apply_where(values: jax.Array, where: jax.Array | None) -> jax.Array:
    if where is None:
        return values
    return jnp.where(where, values, jnp.zeros((), values.dtype))


def _check_static(name: str, value: Any) -> None:
    """`ValueError` when ``value`` is traced: ``name`` selects the compiled program.

    Otherwise the range checks below would report a traced value as out of range, e.g. after
    ``jax.jit(attention_map)(features, p=2)``, which traces every argument it is given.
    """
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} must be a concrete Python number, got a traced value ({value}): it selects "
            "the compiled program. Close over it, or mark it static, e.g. jax.jit(fn, "
            f"static_argnames='{name}')."
        )


def _label_smoothing(value: Any) -> float:
    """``value`` as a float, or `ValueError` unless it is a concrete number in ``[0, 1)`` (it
    selects the compiled program, so it cannot be traced)."""
    _check_static("label_smoothing", value)
    try:
        ls = None if _is_bool(value) or isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):  # None, a list, an array, an int > 1e308
        ls = None
    if ls is None or not 0.0 <= ls < 1.0:
        raise ValueError(
            f"label_smoothing must be a Python number in [0, 1), got {value!r}; 0.0 turns it off."
        )
    return ls


def _check_p(p: Any) -> None:
    _check_static("p", p)
    try:  # float() would also read True as 1 and "2" as 2.
        ok = not (_is_bool(p) or isinstance(p, str)) and float(p) >= 1 and math.isfinite(float(p))
    except (TypeError, OverflowError):  # None, a list, an array, an int > 1e308
        ok = False
    if not ok:
        raise ValueError(
            f"p must be a Python number >= 1, got {p!r}. p < 1 makes |F|^p non-differentiable at "
            "the zeros that ReLU features are full of (infinite gradient); Zagoruyko & Komodakis "
            "use p=2."
        )


# --------------------------------------------------------------------------------------------
# Cross-entropy
# --------------------------------------------------------------------------------------------


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    where: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    r"""Softmax cross-entropy with integer labels and optional label smoothing, per example.

    .. math::
        \mathrm{CE}_i = -\sum_k q_{ik} \log \mathrm{softmax}(z_i)_k, \qquad
        q_i = (1-\varepsilon)\,\mathrm{onehot}(y_i) + \varepsilon / K

    which equals ``optax.losses.softmax_cross_entropy(logits,
    optax.smooth_labels(one_hot(labels), eps))``.

    Args:
      logits: ``[B, K]`` unnormalised class scores (any leading batch shape ``[..., K]``).
      labels: ``[B]`` integer class indices in ``[0, K)``. Values at masked-out positions
        (``where`` False) are ignored and may be anything, e.g. ``-1``. An out-of-range label
        at a *counted* position gives ``NaN`` (loudly; an error cannot be raised inside ``jit``).
        Negative labels are never wrapped around.
      where: optional bool ``[B]``; masked-out examples give 0 and zero gradient.
      label_smoothing: ``eps`` in ``[0, 1)``.

    Returns:
      ``[B]`` per-example losses in nats. With label smoothing, a logit of ``-inf`` (a class
      ruled out) gives ``inf``: the smoothed target puts ``eps / K`` on that class.

    Example::

      >>> import jax.numpy as jnp
      >>> cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([1]))  # log 2
      Array([0.6931472], dtype=float32)
    """
    _check_logits("logits", logits)
    _check_labels(logits, labels)
    ls = _label_smoothing(label_smoothing)
    where = _check_where(where, _shape(logits)[:-1])
    return _cross_entropy_core(logits, labels, where, label_smoothing=ls)


def _check_labels(logits: jax.Array, labels: jax.Array) -> None:
    batch_shape = _shape(logits)[:-1]
    _check_array("labels", labels, f"integer class indices of shape {batch_shape}")
    if _shape(labels) != batch_shape:
        hint = ""
        if _shape(labels) == _shape(logits):
            hint = " They look one-hot: pass integer class indices, e.g. labels.argmax(-1)."
        raise ValueError(
            f"labels must have shape {batch_shape} (one integer per example of logits with shape "
            f"{_shape(logits)}), got {_shape(labels)}.{hint}"
        )
    dtype = labels.dtype if hasattr(labels, "dtype") else jnp.asarray(labels).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"labels must be integer class indices, got dtype {dtype}. "
            "Cast with labels.astype(jnp.int32)."
        )


# The numeric cores are jitted (validation stays outside, in Python): eager calls then compile
# once per shape instead of once per primitive, and under an outer jit they are simply inlined.
@functools.partial(jax.jit, static_argnames=("label_smoothing",))
def _cross_entropy_core(
    logits: jax.Array, labels: jax.Array, where: jax.Array | None, label_smoothing: float
) -> jax.Array:
    ls, labels = label_smoothing, jnp.asarray(labels)
    where = _as_bool(where)
    logits = _mask_rows(_float(logits), where)
    if where is not None:
        labels = jnp.where(where, labels, 0)
    valid = labels >= 0
    if logits.shape[-1] <= jnp.iinfo(labels.dtype).max:  # Else K wraps around in the comparison
        valid = valid & (labels < logits.shape[-1])  # (uint8 labels, 256 classes): all below.
    safe_labels = jnp.where(valid, labels, 0)

    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, safe_labels[..., None], axis=-1)[..., 0]
    # (1-eps) * NLL + eps * mean_k(-log p_k)  ==  -sum_k q_k log p_k.
    loss = (1.0 - ls) * nll - ls * jnp.mean(log_p, axis=-1) if ls > 0.0 else nll
    loss = jnp.where(valid, loss, jnp.full((), jnp.nan, loss.dtype))
    return _apply_where(loss, where)


# --------------------------------------------------------------------------------------------
# Knowledge distillation
# --------------------------------------------------------------------------------------------


def kd_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: ScalarLike,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Hinton knowledge-distillation loss, per example.

    .. math::
        \mathrm{KD}_i = T^2 \, \mathrm{KL}\big(\mathrm{softmax}(t_i/T) \,\|\,
        \mathrm{softmax}(s_i/T)\big)
        = T^2 \sum_k p^t_{ik} \big(\log p^t_{ik} - \log p^s_{ik}\big)

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton et al.,
    2015); as ``T -> inf`` the loss tends to logit matching, ``sum_k c_k^2 / 2K`` with ``c`` the
    difference ``s - t`` minus its mean. It stays finite for logits of magnitude ``1e4``, and it
    is exactly ``0``, with a zero gradient, when the student and teacher logits are equal.
    Classes the teacher rules out (logit ``-inf``) add nothing (``0 log 0 = 0``). The teacher is
    under ``stop_gradient``: gradients flow to the student only.

    Precision in float32 depends on whether ``T`` is at least every ``|c_k|``, with ``c = (s -
    t) - sum_k p_k (s_k - t_k)`` and ``p = softmax(t/T)`` (always so at high temperatures;
    measured against exact references, logits of scale 0.1 to 1000, 10 to 10 000 classes):

    * ``T >= max_k |c_k|``: the value and the gradient ``T (softmax(s/T) - softmax(t/T))`` are
      accurate to a few ``1e-6`` (relative; the gradient relative to its largest entry), even
      when the student and teacher nearly agree (measured: at most ``3e-6``). The loss is
      computed there as ``T^2 log sum_k p_k exp(c_k / T)``: the textbook difference of two
      log-softmaxes would cancel, and ``T^2`` would multiply its rounding.
    * ``T < max_k |c_k|``, and at any ``T`` for a row with a class that only the teacher rules
      out: that textbook form is used, and its error does not shrink with the loss. The value
      is off by up to about ``1e-6 T^2`` besides ``1e-6`` relative (measured: ``3e-7 T^2`` with
      10 classes, ``7e-7 T^2`` with 10 000; e.g. ``1.2533e-3`` for ``1.2541e-3`` at ``T = 4``),
      each entry of the gradient by up to about ``5e-7 T``.

    With a class that only the teacher rules out, the loss is ``inf`` (its gradient NaN) from
    ``T = 1.85e19`` on, where ``T^2`` exceeds float32's range. Results below ``1.2e-38``
    (float32's smallest normal number) flush to 0.

    Args:
      student_logits: ``[B, K]`` (any leading batch shape).
      teacher_logits: ``[B, K]``, same shape.
      temperature: scalar ``T`` in ``[1e-18, 3.4e38]`` (``TEMPERATURE_RANGE``; a concrete value
        outside is a `ValueError`); a Python float or a traced scalar (e.g. from
        :func:`temperature_schedule` inside ``jit``). A traced value cannot be checked: below
        ``1e-18`` the loss and its gradient come out 0 or NaN, a negative one gives meaningless
        numbers, and ``inf`` gives the ``T -> inf`` limit.
      where: optional bool ``[B]``; masked-out examples give 0 and zero gradient.

    Returns:
      ``[B]`` per-example losses in nats times ``T^2`` (>= 0 up to rounding).

    Example::

      >>> import jax.numpy as jnp
      >>> s = jnp.array([[1.0, 2.0, 3.0]])
      >>> float(kd_kl(s, s, temperature=4.0)[0])
      0.0
    """
    _check_kd_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    where = _check_where(where, _shape(student_logits)[:-1])
    return _kd_kl_core(student_logits, teacher_logits, temperature, where)


def _check_kd_pair(student_logits: jax.Array, teacher_logits: jax.Array) -> None:
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if _shape(student_logits) != _shape(teacher_logits):
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape [B, K], got "
            f"{_shape(student_logits)} and {_shape(teacher_logits)}. The teacher and student "
            "must see the same batch and predict the same classes."
        )


@jax.jit
def _kd_kl_core(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: ScalarLike,
    where: jax.Array | None,
) -> jax.Array:
    where = _as_bool(where)
    s = _mask_rows(_float(student_logits), where)
    t = _mask_rows(_float(jax.lax.stop_gradient(teacher_logits)), where)
    temp = jnp.asarray(temperature, s.dtype)
    zero, one = jnp.zeros((), s.dtype), jnp.ones((), s.dtype)
    # Each row shifted to a maximum of exactly 0 before dividing by T: log_softmax of z / T then
    # subtracts an exact 0. (Of large z / T, e.g. at T = 1e-10, XLA may compute the maximum and
    # the element with and without a fused multiply-add: a residual of ulp(z / T) would be
    # exponentiated.)
    s_0 = s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    t_0 = t - jnp.max(t, axis=-1, keepdims=True)
    log_pt = jax.nn.log_softmax(t_0 / temp, axis=-1)
    p_t = jnp.exp(log_pt)
    taught = p_t > 0  # A class the teacher rules out (logit -inf) adds nothing (0 log 0 = 0).

    # With d = s - t and c = d - sum_k p_t,k d_k (so sum_k p_t,k c_k = 0), exactly
    #   T^2 KL = T^2 log sum_k p_t,k exp(c_k / T) = T^2 log1p(u),  u = sum_k p_t,k f(c_k / T),
    # f(y) = e^y - 1 - y. Where |c_k| <= T for every class (at high temperatures) this "near"
    # form is used: it has none of the cancellation of two log-softmaxes, whose float32 rounding
    # T^2 would multiply. With f(y) = y^2 g(y), x = T^2 u = sum_k p_t,k c_k^2 g(c_k / T) never
    # forms T^2 or y^2, which under/overflow at extreme temperatures. A class the teacher rules
    # out has c = inf (the student gives it mass): such rows take the far form below, unless the
    # student rules it out too: then it adds to neither log-sum-exp, and d = 0 stands for the
    # NaN of -inf - -inf.
    d = jnp.where(taught | (s != t), s - t, zero)
    c = d - jnp.sum(jnp.where(taught, p_t * d, zero), axis=-1, keepdims=True)
    near = temp >= jax.lax.stop_gradient(jnp.max(jnp.abs(c), axis=-1))  # False for NaN or inf.
    c_near = jnp.where(near[..., None], c, zero)  # Zero where unused: finite in gradients.
    x = jnp.sum(p_t * jnp.square(c_near) * _expm1_minus_x_over_x2(c_near / temp), axis=-1)
    near_value = x * _log1p_over_x(x / (temp * temp))  # u <= e - 2; 0 where T^2 overflows.

    # Otherwise (T below the spread of c): the textbook T^2 sum_k p_t,k (log p_t,k - log p_s,k).
    # Selected before the product, so that 0 log 0 also has a finite gradient.
    log_ratio = jnp.where(taught, log_pt - jax.nn.log_softmax(s_0 / temp, axis=-1), zero)
    far_temp = jnp.where(near, one, temp)  # T^2 can overflow where unused: inf * 0 gradients.
    far_value = jnp.sum(p_t * log_ratio, axis=-1) * jnp.square(far_temp)
    return _apply_where(jnp.where(near, near_value, far_value), where)


def _expm1_minus_x_over_x2(y: jax.Array) -> jax.Array:
    """``(e^y - 1 - y) / y^2`` for ``|y| <= 1``, from its Taylor series ``sum_n y^n / (n+2)!``
    (17 terms: float64-accurate; ``expm1(y) - y`` would cancel for small ``y``)."""
    out = jnp.full_like(y, 1.0 / math.factorial(18))
    for n in range(15, -1, -1):
        out = out * y + 1.0 / math.factorial(n + 2)
    return out


def _log1p_over_x(u: jax.Array) -> jax.Array:
    """``log1p(u) / u`` for ``u >= 0`` (1 at 0), with a finite gradient: below ``1e-4`` from its
    series ``1 - u/2 + u^2/3 - u^3/4`` (float64-accurate there)."""
    small = u < 1e-4
    u_big = jnp.where(small, jnp.ones((), u.dtype), u)
    series = 1.0 - u * (1.0 / 2.0 - u * (1.0 / 3.0 - u / 4.0))
    return jnp.where(small, series, jnp.log1p(u_big) / u_big)


def _teacher_list(
    teacher_logits: jax.Array | Sequence[jax.Array], student_ndim: int, name: str
) -> list[jax.Array]:
    """A sequence of teacher logits, or a stacked ``[J, B, K]`` array, as a list of ``[B, K]``."""
    if isinstance(teacher_logits, list | tuple):
        teachers = list(teacher_logits)
    else:
        expected = "a sequence of [B, K] arrays or one stacked [J, B, K] array"
        _check_array(name, teacher_logits, expected)
        if jnp.ndim(teacher_logits) != student_ndim + 1:
            raise ValueError(
                f"{name} must be {expected}, got an array of shape {_shape(teacher_logits)}. "
                "Pass [t1, t2, ...]."
            )
        teachers = [teacher_logits[j] for j in range(_shape(teacher_logits)[0])]
    if not teachers:
        raise ValueError(f"{name} is empty: pass at least one teacher's logits.")
    return teachers


def _check_teacher_weights(weights: Any, num_teachers: int, name: str) -> jax.Array | None:
    """Validates ``weights`` (length J, real, >= 0, sum > 0; values only when concrete) and
    returns them as an array, normalised to sum 1 when concrete (``None`` stays ``None``:
    uniform). The cores normalise again (traced weights), which leaves these unchanged."""
    if weights is None:
        return None
    if _is_seq(weights):  # Python ints as floats (+-inf beyond float64's range, refused below):
        # JAX reads one beyond int32 as an OverflowError that names no argument.
        weights = [_concrete(w) if type(w) is int else w for w in weights]
    _check_array(name, weights, f"{num_teachers} non-negative weights, one per teacher")
    if _shape(weights) != (num_teachers,):
        raise ValueError(
            f"{name} must hold one weight per teacher: expected shape ({num_teachers},), got "
            f"{_shape(weights)}."
        )
    # Each element of a list: [1.0, True] is an array of floats.
    for dtype in map(jnp.result_type, weights if _is_seq(weights) else [weights]):
        if not _is_real(dtype):
            kind = "bool (True/False)" if dtype == jnp.bool_ else f"{dtype} number"
            raise ValueError(
                f"{name} must be real numbers, got a {kind}: pass e.g. {name}=[1.0, 0.0] (a "
                "teacher weighted 0.0 adds nothing; only the ratios of the weights matter)."
            )
    try:
        values = [float(x) for x in weights] if _is_seq(weights) else weights.tolist()
    except jax.errors.ConcretizationTypeError:
        return jnp.asarray(weights)  # Traced weights cannot be checked.
    if any(not (v >= 0 and math.isfinite(v)) for v in values) or sum(values) <= 0:
        raise ValueError(
            f"{name} must be finite, >= 0 and not all zero, got {values}. They are normalised "
            "to sum 1, so only their ratios matter."
        )
    # Normalised here, in float64 and scaled by the largest first: in float32 the sum of
    # weights such as [3e38, 3e38] overflows (every weight became 0), and 1e39 is inf.
    scaled = [v / max(values) for v in values]
    return jnp.asarray([v / sum(scaled) for v in scaled])


def _unless_unweighted(x: jax.Array, weight: jax.Array | None) -> jax.Array:
    """``x`` (a teacher's outputs), or zeros when the teacher's ``weight`` is 0: a teacher
    weighted 0 then adds exactly 0 even with inf/NaN outputs, in the value and the gradient.
    ``None`` (uniform weights) needs no select."""
    return x if weight is None else jnp.where(weight > 0, x, jnp.zeros((), x.dtype))


def _normalised_weights(weights: jax.Array | None, num_teachers: int, dtype) -> jax.Array:
    if weights is None:
        return jnp.full((num_teachers,), 1.0 / num_teachers, dtype)
    w = _float(weights).astype(dtype)
    return w / jnp.sum(w)


def kd_kl_multi(
    student_logits: jax.Array,
    teacher_logits_seq: Sequence[jax.Array] | jax.Array,
    *,
    temperature: ScalarLike,
    weights: Sequence[float] | jax.Array | None = None,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Distillation from several teachers (dense chain, DGKD-style), per example.

    .. math::
        \mathrm{KD}^{\text{multi}}_i = \sum_j w_j \, \mathrm{KD}_i(s, t^{(j)}), \qquad
        w_j = \frac{\tilde w_j}{\sum_l \tilde w_l}

    Args:
      student_logits: ``[B, K]``.
      teacher_logits_seq: a sequence of ``J`` arrays ``[B, K]``, or one stacked ``[J, B, K]``.
      temperature: scalar ``T`` in ``[1e-18, 3.4e38]`` (see :func:`kd_kl`).
      weights: optional ``J`` non-negative weights, normalised to sum 1; default uniform.
      where: optional bool ``[B]``; masked-out examples give 0 and zero gradient.

    Returns:
      ``[B]`` per-example losses, in the units of :func:`kd_kl`.

    Example::

      >>> import jax.numpy as jnp
      >>> s = jnp.array([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
      >>> t1 = jnp.array([[0.0, 2.0, 4.0], [2.0, 0.0, 0.0]])  # e.g. link k-1
      >>> t2 = jnp.array([[1.0, 1.0, 3.0], [0.0, 1.0, 0.0]])  # e.g. link k-2
      >>> kd_kl_multi(s, [t1, t2], temperature=2.0, weights=[3.0, 1.0]).shape
      (2,)
    """
    _check_logits("student_logits", student_logits)
    teachers = _teacher_list(teacher_logits_seq, jnp.ndim(student_logits), "teacher_logits_seq")
    for t in teachers:
        _check_kd_pair(student_logits, t)
    _check_temperature(temperature)
    weights = _check_teacher_weights(weights, len(teachers), "weights")
    where = _check_where(where, _shape(student_logits)[:-1])
    return _kd_kl_multi_core(student_logits, teachers, weights, temperature, where)


@jax.jit
def _kd_kl_multi_core(
    student_logits: jax.Array,
    teachers: list[jax.Array],
    weights: jax.Array | None,
    temperature: ScalarLike,
    where: jax.Array | None,
) -> jax.Array:
    student_logits = _float(student_logits)
    w = _normalised_weights(weights, len(teachers), student_logits.dtype)
    total = jnp.zeros(student_logits.shape[:-1], student_logits.dtype)
    for j, t in enumerate(teachers):
        t = _unless_unweighted(t, None if weights is None else w[j])
        total = total + w[j] * _kd_kl_core(student_logits, t, temperature, where)
    return total


# --------------------------------------------------------------------------------------------
# Attention transfer
# --------------------------------------------------------------------------------------------


def _check_features(name: str, features: jax.Array) -> None:
    _check_array(name, features, "an NHWC feature map [B, H, W, C]")
    if jnp.ndim(features) < 3:
        raise ValueError(
            f"{name} must be an NHWC feature map [B, H, W, C], got shape {_shape(features)}. "
            "Pass the convolutional map before global pooling."
        )
    if 0 in _shape(features)[-3:]:
        raise ValueError(
            f"{name} has an empty spatial or channel axis: shape {_shape(features)} (NHWC). Pass "
            "a stage whose map still has at least one pixel and one channel."
        )


def _attention_2d(features: jax.Array, p: float) -> tuple[jax.Array, jax.Array]:
    """``(mean_c |F/M|^p, M)``: ``[..., H, W, C] -> [..., H, W]`` (not normalised) and the
    per-example scale ``M = max |F|`` (``[..., 1, 1]``, 1 for an all-zero map).

    Dividing by ``M`` first keeps ``|F|^p`` from overflowing or underflowing at any feature
    scale; normalised maps do not depend on ``M``, so it is under ``stop_gradient``.
    """
    f = _float(features)
    m = jax.lax.stop_gradient(jnp.max(jnp.abs(f), axis=(-3, -2, -1), keepdims=True))
    m = jnp.where(m > 0, m, jnp.ones((), f.dtype))
    # An integer p uses integer_pow: exact, and its gradient at 0 is finite.
    exponent = int(p) if float(p) == int(p) else float(p)
    a = jnp.abs(f / m) ** exponent
    return jnp.mean(a, axis=-1), m[..., 0]


def _normalise(a: jax.Array) -> jax.Array:
    """L2-normalises the last axis of a non-negative ``a``; an all-zero row stays zero.

    The row is first divided by its (stop-gradient) maximum, which the result does not depend
    on; this keeps ``sum a^2`` away from underflow/overflow. All divisions are guarded with
    ``jnp.where`` so neither the value nor the gradient is ever NaN.
    """
    m = jax.lax.stop_gradient(jnp.max(a, axis=-1, keepdims=True))
    nonzero = m > 0
    b = a / jnp.where(nonzero, m, 1.0)
    sq = jnp.sum(b * b, axis=-1, keepdims=True)
    return b / jnp.sqrt(jnp.where(nonzero, sq, 1.0))


def attention_map(features: jax.Array, *, p: float = 2) -> jax.Array:
    r"""Spatial attention map of Zagoruyko & Komodakis (2017), flattened and L2-normalised.

    .. math::
        A(F) = \frac{\mathrm{vec}(a)}{\|\mathrm{vec}(a)\|_2}, \qquad
        a_{hw} = \frac{1}{C} \sum_{c} |F_{hwc}|^p

    (The paper sums over channels; after normalisation the mean gives the same map and avoids
    overflow for wide layers.) An all-zero map gives an all-zero attention, with no NaN in the
    value or the gradient.

    Args:
      features: NHWC feature map ``[B, H, W, C]`` (any leading batch shape ``[..., H, W, C]``).
      p: exponent, a Python number ``>= 1`` (default 2).

    Returns:
      ``[B, H*W]``, each row of unit L2 norm (or zero).

    Example::

      >>> import jax.numpy as jnp
      >>> attention_map(jnp.ones((1, 2, 2, 3)))
      Array([[0.5, 0.5, 0.5, 0.5]], dtype=float32)
    """
    _check_features("features", features)
    _check_p(p)
    return _attention_map_core(features, p=float(p))


@functools.partial(jax.jit, static_argnames=("p",))
def _attention_map_core(features: jax.Array, p: float) -> jax.Array:
    a, _ = _attention_2d(features, p)
    return _normalise(a.reshape(a.shape[:-2] + (a.shape[-2] * a.shape[-1],)))


def attention_pool(features: jax.Array, *, p: float = 2) -> jax.Array:
    r"""Reduces an NHWC feature map to the single channel that attention transfer depends on.

    .. math::
        P(F)_{hw} = \Big(\frac{1}{C} \sum_c |F_{hwc}|^p\Big)^{1/p}

    so that ``attention_map(attention_pool(F, p=p), p=p) == attention_map(F, p=p)`` and
    ``attention_transfer(F_s, attention_pool(F_t, p=p), p=p) == attention_transfer(F_s, F_t,
    p=p)`` up to float rounding. A frozen teacher's maps can therefore be computed once, stored
    at ``1/C`` of the feature size, and passed wherever teacher features are expected. It is
    meant for teachers (under ``stop_gradient``): the ``1/p`` root has no finite gradient where
    a whole pixel's activations are zero.

    Args:
      features: NHWC feature map ``[B, H, W, C]`` (any leading batch shape ``[..., H, W, C]``).
      p: exponent, a Python number ``>= 1`` (default 2); use the same ``p`` as the loss.

    Returns:
      ``[B, H, W, 1]``, non-negative, float32 for low-precision inputs.

    Example::

      >>> import jax.numpy as jnp
      >>> attention_pool(jnp.full((1, 2, 2, 3), -2.0)).squeeze(-1)
      Array([[[2., 2.],
              [2., 2.]]], dtype=float32)
    """
    _check_features("features", features)
    _check_p(p)
    return _attention_pool_core(features, p=float(p))


@functools.partial(jax.jit, static_argnames=("p",))
def _attention_pool_core(features: jax.Array, p: float) -> jax.Array:
    a, m = _attention_2d(features, p)
    root = jnp.sqrt(a) if p == 2 else a ** (1.0 / p)  # sqrt: correctly rounded
    return (m * root)[..., None]


def _resize_attention(a: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Shrinks a ``[..., H, W]`` attention map to ``size`` (each side <= the current one).

    Integer ratios on both axes: exact average pooling over ``(H/h) x (W/w)`` blocks.
    Otherwise: ``jax.image.resize(..., "linear")`` (antialiased, i.e. a triangle filter).
    """
    (h, w), (th, tw) = a.shape[-2:], size
    if (h, w) == (th, tw):
        return a
    lead = a.shape[:-2]
    if h % th == 0 and w % tw == 0:
        return a.reshape(lead + (th, h // th, tw, w // tw)).mean(axis=(-3, -1))
    return jax.image.resize(a, lead + (th, tw), method="linear")


def attention_transfer(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    p: float = 2,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Attention-transfer loss (Zagoruyko & Komodakis, 2017), per example.

    .. math::
        \mathrm{AT}_i = \big\| A(F^s_i) - A(F^t_i) \big\|_2^2 \in [0, 2]

    with :math:`A` the normalised attention of :func:`attention_map` (both maps are non-negative
    unit vectors, so the distance is at most 2, and ``2 - 2 cos``). The teacher is under
    ``stop_gradient``.

    Channel counts may differ (attention averages channels away). **Spatial sizes** may differ:
    both 2-D attention maps (before normalisation) are brought to the common size
    ``(min(Hs, Ht), min(Ws, Wt))``: a larger map whose sides are integer multiples of that size is
    average-pooled over blocks (e.g. 8x8 -> 4x4); otherwise it is resized with
    ``jax.image.resize(..., "linear")`` (antialiased; e.g. 6x6 -> 4x4). Maps are never upsampled.

    Args:
      student_features: NHWC ``[B, Hs, Ws, Cs]`` (any leading batch shape).
      teacher_features: NHWC ``[B, Ht, Wt, Ct]``, same leading batch shape.
      p: exponent, a Python number ``>= 1`` (default 2).
      where: optional bool ``[B]``; masked-out examples give 0 and zero gradient.

    Returns:
      ``[B]`` per-example squared distances, dimensionless, in ``[0, 2]``.

    Example::

      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> fs = rng.normal(size=(2, 8, 8, 16))  # student stage: 8x8, 16 channels
      >>> ft = rng.normal(size=(2, 4, 4, 64))  # teacher stage: 4x4, 64 channels
      >>> attention_transfer(fs, ft).shape
      (2,)
    """
    _check_p(p)
    _check_feature_pair(student_features, teacher_features)
    where = _check_where(where, _shape(student_features)[:-3])
    return _attention_transfer_core(student_features, teacher_features, where, p=float(p))


def _check_feature_pair(student_features: jax.Array, teacher_features: jax.Array) -> None:
    _check_features("student_features", student_features)
    _check_features("teacher_features", teacher_features)
    s_shape, t_shape = _shape(student_features), _shape(teacher_features)
    if s_shape[:-3] != t_shape[:-3]:
        raise ValueError(
            f"student_features and teacher_features must have the same batch shape, got "
            f"{s_shape} and {t_shape} (NHWC). Feed the teacher the same batch as the student."
        )


@functools.partial(jax.jit, static_argnames=("p",))
def _attention_transfer_core(
    student_features: jax.Array, teacher_features: jax.Array, where: jax.Array | None, p: float
) -> jax.Array:
    where = _as_bool(where)
    fs = _mask_rows(_float(student_features), where)
    ft = _mask_rows(_float(jax.lax.stop_gradient(teacher_features)), where)
    (a_s, _), (a_t, _) = _attention_2d(fs, p), _attention_2d(ft, p)
    s_shape, t_shape = fs.shape, ft.shape
    size = (min(s_shape[-3], t_shape[-3]), min(s_shape[-2], t_shape[-2]))
    a_s, a_t = _resize_attention(a_s, size), _resize_attention(a_t, size)
    flat = a_s.shape[:-2] + (size[0] * size[1],)
    q_s, q_t = _normalise(a_s.reshape(flat)), _normalise(a_t.reshape(flat))
    return _apply_where(jnp.sum(jnp.square(q_s - q_t), axis=-1), where)


# --------------------------------------------------------------------------------------------
# Temperature schedules
# --------------------------------------------------------------------------------------------


def temperature_schedule(kind: str, *, t_max: float, t_min: float, total_steps: int) -> Schedule:
    r"""Distillation-temperature annealing ``step -> T(step)``, pure and usable inside ``jit``.

    With :math:`r = \mathrm{clip}(\mathrm{step} / \mathrm{total\_steps}, 0, 1)`:

    * ``"constant"``: :math:`T = T_{max}`
    * ``"linear"``:   :math:`T = T_{max}\, w + T_{min} (1 - w)`, :math:`w = 1 - r`
    * ``"cosine"``:   the same with :math:`w = \tfrac12 (1 + \cos \pi r)`

    so ``T(0) = t_max`` and ``T(step) = t_min`` for ``step >= total_steps`` (clamped). Every value
    lies in ``[t_min, t_max]`` (exactly ``t_max`` throughout when ``t_min == t_max``), and the
    annealing schedules are non-increasing up to float32 rounding: over thousands of steps, a
    value may exceed the one before it by one ulp (a relative ``1.2e-7``).

    Args:
      kind: one of ``"constant"``, ``"linear"``, ``"cosine"``.
      t_max: starting temperature, ``>= t_min``.
      t_min: final temperature. Both in ``[1e-18, 3.4e38]``, the range of :func:`kd_kl`.
      total_steps: steps over which to anneal, an integer ``>= 1``.

      The three values may be Python numbers or scalar arrays, traced ones included (a trainer
      can keep them in its state so one compiled step serves every link); they are checked
      whenever they are concrete.

    Returns:
      A function of the step returning a float32 scalar. The step is an integer (a Python int
      of any size, a NumPy or JAX integer, traced or not; not a bool) or a float, read in
      float32 (beyond ``2**24``, rounded to float32's relative ``6e-8``).

    Raises:
      ValueError: for an unknown ``kind`` or invalid concrete values, eagerly (when building it).

    Example::

      >>> sched = temperature_schedule("cosine", t_max=4.0, t_min=1.0, total_steps=100)
      >>> float(sched(0)), float(sched(50)), float(sched(1000))
      (4.0, 2.5, 1.0)
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(
            f"Unknown temperature schedule kind {kind!r}: use one of {list(SCHEDULE_KINDS)}."
        )
    _check_temperature(t_max, "t_max")
    _check_temperature(t_min, "t_min")
    _check_scalar("total_steps", total_steps)
    t_max_c, t_min_c, steps_c = _concrete(t_max), _concrete(t_min), _concrete(total_steps)
    if t_max_c is not None and t_min_c is not None and t_max_c < t_min_c:
        raise ValueError(
            f"t_max must be >= t_min, got t_max={t_max!r} < t_min={t_min!r}: swap them (the "
            "schedule anneals from t_max down to t_min)."
        )
    if isinstance(total_steps, bool) or (
        steps_c is not None
        and (steps_c < 1 or not math.isfinite(steps_c) or steps_c != math.floor(steps_c))
    ):
        raise ValueError(
            f"total_steps must be an integer >= 1, got {total_steps!r}: pass the number of "
            "optimisation steps of the link (epochs * steps_per_epoch)."
        )

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        _check_array("step", step, "a Python int or a scalar array")
        if not _is_real(jnp.result_type(step)):
            raise ValueError(
                f"step must be a number (the optimisation step, e.g. state.step), got a "
                f"{jnp.result_type(step)}: {step!r}."
            )
        # Step and total_steps in float32 before the jitted core: as arguments of a jitted
        # function, a Python int >= 2**31 raises OverflowError and a NumPy int64 wraps around.
        try:
            step = jnp.asarray(step, jnp.float32)
        except OverflowError:  # A Python int beyond float64's range.
            raise ValueError(
                "step is too large (beyond float64's range): pass the optimisation step."
            ) from None
        return _temperature_at(kind, step, t_max, t_min, jnp.asarray(total_steps, jnp.float32))

    return schedule


@functools.partial(jax.jit, static_argnums=0)  # one compile per kind; inlined under an outer jit
def _temperature_at(kind, step, t_max, t_min, total_steps) -> jax.Array:
    t_max, t_min = jnp.float32(t_max), jnp.float32(t_min)
    r = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.float32(total_steps), 0.0, 1.0)
    if kind == "constant":
        return t_max + 0.0 * r
    w = 1.0 - r if kind == "linear" else 0.5 * (1.0 + jnp.cos(jnp.pi * r))  # t_max's share
    # Exactly t_max at w = 1 and t_min at w = 0. In between, the rounded blend can land one ulp
    # outside [t_min, t_max] (or, with t_max == t_min, off the constant): clipped back.
    return jnp.clip(t_max * w + t_min * (1.0 - w), t_min, t_max)


# --------------------------------------------------------------------------------------------
# Reduction
# --------------------------------------------------------------------------------------------


def masked_mean(values: jax.Array, where: jax.Array | None = None) -> jax.Array:
    r"""Mean of per-example values over the counted examples ("batchmean").

    .. math::
        \bar v = \frac{\sum_i [w_i]\, v_i}{\max(1, \sum_i [w_i])}

    An all-masked batch gives exactly ``0.0`` (not NaN) with a zero gradient, so padding-only
    batches (e.g. the tail of an epoch on some data-parallel shard) are harmless. Masked-out
    values may be ``inf``/``NaN``: they never reach the value or the gradient.

    Args:
      values: ``[B]`` per-example values (any batch shape).
      where: optional bool of the same shape; default: all counted.

    Returns:
      A scalar.

    Example::

      >>> import jax.numpy as jnp
      >>> float(masked_mean(jnp.array([1.0, 3.0, 100.0]), jnp.array([True, True, False])))
      2.0
    """
    _check_array("values", values, "an array of per-example values")
    where = _check_where(where, _shape(values))
    return _masked_mean_core(values, where)


@jax.jit
def _masked_mean_core(values: jax.Array, where: jax.Array | None) -> jax.Array:
    values, where = _float(values), _as_bool(where)
    if where is None:
        return jnp.mean(values) if values.size else jnp.zeros((), values.dtype)
    total = jnp.sum(jnp.where(where, values, jnp.zeros((), values.dtype)))
    count = jnp.sum(where.astype(values.dtype))
    return total / jnp.maximum(count, 1.0)


# --------------------------------------------------------------------------------------------
# The WeCKD objective
# --------------------------------------------------------------------------------------------


def _is_seq(x: Any) -> bool:
    return isinstance(x, list | tuple)


def _teacher_feature_lists(
    teacher_features: Any, num_teachers: int, num_stages: int
) -> list[list[jax.Array]]:
    """Normalises ``teacher_features`` to one list of stage maps per teacher."""
    if not _is_seq(teacher_features):
        raise ValueError(
            "teacher_features must be a sequence of NHWC maps (one teacher) or a sequence of "
            f"such sequences (one per teacher), got {_describe(teacher_features)}."
        )
    nested = len(teacher_features) > 0 and _is_seq(teacher_features[0])
    per_teacher = [list(f) for f in teacher_features] if nested else [list(teacher_features)]
    if len(per_teacher) != num_teachers:
        raise ValueError(
            f"teacher_features holds features for {len(per_teacher)} teacher(s) but "
            f"teacher_logits has {num_teachers}. With several teachers pass one sequence of "
            "stage maps per teacher: [[t1_stage1, ...], [t2_stage1, ...]]."
        )
    for j, stages in enumerate(per_teacher):
        if len(stages) != num_stages:
            raise ValueError(
                f"teacher {j} has {len(stages)} feature map(s) but student_features has "
                f"{num_stages}: pass one teacher map per student stage, in the same order."
            )
    return per_teacher


def weckd_loss(
    student_logits: jax.Array,
    labels: jax.Array,
    *,
    label_mask: jax.Array,
    teacher_logits: jax.Array | Sequence[jax.Array] | None = None,
    teacher_weights: Sequence[float] | jax.Array | None = None,
    student_features: Sequence[jax.Array] = (),
    teacher_features: Sequence[jax.Array] | Sequence[Sequence[jax.Array]] | None = None,
    alpha: ScalarLike = 0.5,
    beta: ScalarLike = 0.0,
    temperature: ScalarLike = 1.0,
    label_smoothing: float = 0.0,
    p: float = 2,
    where: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""The WeCKD per-example objective (one link of the chain).

    With a teacher, for example :math:`i` with label mask :math:`m_i \in \{0, 1\}`:

    .. math::
        L_i = m_i (1-\alpha)\, \mathrm{CE}(y_i, s_i)
            + \alpha_i\, T^2 \sum_j w_j \mathrm{KL}\big(\mathrm{softmax}(t^{(j)}_i/T) \,\|\,
              \mathrm{softmax}(s_i/T)\big)
            + \beta \sum_j w_j \frac{1}{S} \sum_{k=1}^{S} \mathrm{AT}(F^s_{ik}, F^{t(j)}_{ik})

    with :math:`\alpha_i = \alpha` for labelled examples and :math:`1` for unlabelled ones (an
    example without a label learns from the teacher only), and teacher weights :math:`w_j`
    normalised to sum 1.

    **Without a teacher** (``teacher_logits=None``, link 1 of the chain) the loss is plain
    cross-entropy on the labelled examples, :math:`L_i = m_i\,\mathrm{CE}_i`, *not* scaled by
    :math:`1-\alpha` (there is nothing to weigh it against; scaling would only shrink the
    effective learning rate). Unlabelled examples then contribute 0; ``alpha``, ``beta`` and
    ``temperature`` are validated but unused, and ``teacher_features`` or ``teacher_weights``
    without ``teacher_logits`` are an error.

    Args:
      student_logits: ``[B, K]``.
      labels: ``[B]`` integers in ``[0, K)``; values at unlabelled (``label_mask`` False) or
        masked-out positions are ignored (may be ``-1``).
      label_mask: bool ``[B]``, True where the label is known.
      teacher_logits: ``None`` (no teacher), one ``[B, K]`` array, or several teachers as a
        sequence of ``[B, K]`` arrays or a stacked ``[J, B, K]`` array (dense chain).
      teacher_weights: optional ``J`` non-negative weights, normalised to sum 1 (default
        uniform).
      student_features: sequence of ``S`` NHWC maps ``[B, H, W, C]``, one per stage.
      teacher_features: ``None`` or, for one teacher, a sequence of ``S`` NHWC maps; for ``J``
        teachers, a sequence of ``J`` such sequences. Channel counts and spatial sizes may differ
        from the student's (see :func:`attention_transfer`).
      alpha: distillation weight in ``[0, 1]``.
      beta: attention-transfer weight ``>= 0``. ``beta > 0`` with a teacher requires features.
      temperature: ``T`` in ``[1e-18, 3.4e38]``, a Python float or a traced scalar (e.g. from
        :func:`temperature_schedule`); see :func:`kd_kl`.
      label_smoothing: for the cross-entropy term, in ``[0, 1)``.
      p: attention exponent (``>= 1``).
      where: optional bool ``[B]`` masking whole examples (padding): they give 0 in every part
        and zero gradient.

    Returns:
      ``(loss, parts)``: ``loss`` is ``[B]``; ``parts`` maps ``"ce"``, ``"kd"``, ``"at"`` to the
      *weighted* ``[B]`` contributions, which sum to ``loss``. All three keys are always present
      (zeros for absent terms), so the pytree structure does not depend on the configuration.
      Reduce with :func:`masked_mean` (over ``where``) for a batch-mean.

    Example::

      >>> import jax.numpy as jnp
      >>> s = jnp.array([[2.0, 0.0], [0.0, 1.0]]); y = jnp.array([0, -1])
      >>> m = jnp.array([True, False])
      >>> loss, parts = weckd_loss(s, y, label_mask=m)  # link 1: CE on labelled only
      >>> float(parts["ce"][1]), float(parts["kd"][0])
      (0.0, 0.0)
    """
    _check_logits("student_logits", student_logits)
    batch_shape = _shape(student_logits)[:-1]
    _check_labels(student_logits, labels)
    _check_mask("label_mask", label_mask, batch_shape)
    where = _check_where(where, batch_shape)
    _check_scalar("alpha", alpha)
    _check_scalar("beta", beta)
    a = _concrete(alpha)
    if a is not None and not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {a}: it is the weight of the KD term.")
    b = _concrete(beta)
    if b is not None and not (b >= 0 and math.isfinite(b)):
        raise ValueError(f"beta must be a finite number >= 0, got {b}; use beta=0.0 to disable AT.")
    _check_temperature(temperature)

    ls = _label_smoothing(label_smoothing)
    _check_p(p)

    teachers: list[jax.Array] = []
    per_teacher: list[list[jax.Array]] = []
    if not _is_seq(student_features):
        # list() of one [B, H, W, C] array would split it into B "stages".
        raise ValueError(
            "student_features must be a sequence of NHWC maps, one per stage (() for none), got "
            f"{_describe(student_features)}: wrap a single map in a list, "
            "student_features=[features]."
        )
    student_features = list(student_features)
    if teacher_logits is None:
        teacher_only = {"teacher_features": teacher_features, "teacher_weights": teacher_weights}
        given = " and ".join(k for k, v in teacher_only.items() if v is not None)
        if given:
            raise ValueError(
                f"{given} were given but teacher_logits is None. Without a teacher (link 1) the "
                f"loss is cross-entropy only: drop {given}, or pass the teacher's logits too."
            )
    else:
        if not _is_seq(teacher_logits) and jnp.ndim(teacher_logits) == len(batch_shape) + 1:
            teachers = [teacher_logits]  # One teacher, [B, K].
        else:  # A sequence of [B, K] arrays, or a stacked [J, B, K] array.
            teachers = _teacher_list(teacher_logits, len(batch_shape) + 1, "teacher_logits")
        for t in teachers:
            _check_kd_pair(student_logits, t)
        teacher_weights = _check_teacher_weights(teacher_weights, len(teachers), "teacher_weights")
        if teacher_features is not None:
            per_teacher = _teacher_feature_lists(
                teacher_features, len(teachers), len(student_features)
            )
            for stages in per_teacher:
                for fs, ft in zip(student_features, stages, strict=True):
                    _check_feature_pair(fs, ft)
                    if _shape(fs)[:-3] != batch_shape:
                        raise ValueError(
                            f"feature maps must have the batch shape {batch_shape} of "
                            f"student_logits {_shape(student_logits)}, got a map of shape "
                            f"{_shape(fs)} (NHWC). Pass the features of the same batch."
                        )
        if not student_features or (b is not None and b == 0):
            per_teacher = []  # No stage (every teacher has as many as the student), or beta=0.
        if not per_teacher and b is not None and b > 0:
            missing = "is None" if teacher_features is None else "and student_features are empty"
            raise ValueError(
                f"beta={b} > 0 but teacher_features {missing}: pass student_features and "
                "teacher_features (one NHWC map per stage) or set beta=0.0."
            )
    return _weckd_core(
        student_logits,
        labels,
        label_mask,
        teachers,
        teacher_weights,
        student_features if per_teacher else [],
        per_teacher,
        alpha,
        beta,
        temperature,
        where,
        label_smoothing=ls,
        p=float(p),
    )


@functools.partial(jax.jit, static_argnames=("label_smoothing", "p"))
def _weckd_core(
    student_logits: jax.Array,
    labels: jax.Array,
    label_mask: jax.Array,
    teachers: list[jax.Array],
    teacher_weights: jax.Array | None,
    student_features: list[jax.Array],
    per_teacher: list[list[jax.Array]],
    alpha: ScalarLike,
    beta: ScalarLike,
    temperature: ScalarLike,
    where: jax.Array | None,
    label_smoothing: float,
    p: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The computation of :func:`weckd_loss`, after validation (no teacher: ``teachers == []``;
    no attention term: ``per_teacher == []``)."""
    student_logits = _float(student_logits)
    dtype = student_logits.dtype
    batch_shape = student_logits.shape[:-1]
    m, where = jnp.asarray(label_mask).astype(bool), _as_bool(where)
    counted = m if where is None else m & where
    safe_labels = jnp.where(counted, jnp.asarray(labels), 0)
    ce = _cross_entropy_core(student_logits, safe_labels, counted, label_smoothing=label_smoothing)
    zeros = jnp.zeros(batch_shape, dtype)
    if not teachers:  # Link 1: plain CE on the labelled examples, not scaled by (1 - alpha).
        return ce, {"ce": ce, "kd": zeros, "at": zeros}

    w = _normalised_weights(teacher_weights, len(teachers), dtype)
    alpha = jnp.asarray(alpha, dtype)
    alpha_i = jnp.where(m, alpha, jnp.ones((), dtype))

    kd = zeros
    given = teacher_weights is not None
    for j, t in enumerate(teachers):
        t = _unless_unweighted(t, w[j] if given else None)
        kd = kd + w[j] * _kd_kl_core(student_logits, t, temperature, where).astype(dtype)
    kd = alpha_i * kd
    ce = (1.0 - alpha) * ce

    at = zeros
    for j, stages in enumerate(per_teacher):
        at_j = zeros
        for fs, ft in zip(student_features, stages, strict=True):
            ft = _unless_unweighted(ft, w[j] if given else None)
            at_j = at_j + _attention_transfer_core(fs, ft, where, p=p).astype(dtype)
        at = at + w[j] * (at_j / len(stages))
    at = jnp.asarray(beta, dtype) * at

    return ce + kd + at, {"ce": ce, "kd": kd, "at": at}
