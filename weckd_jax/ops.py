"""Convolution and max-pooling that XLA:CPU executes well; exactly Flax's everywhere else.

On GPU and TPU nothing here changes anything: `Conv` lowers to `lax.conv_general_dilated` exactly
as `flax.linen.Conv` does, and `max_pool` is `flax.linen.max_pool`. On XLA:CPU (jaxlib 0.10.2)
some convolutions fall off XLA's fast paths and run 10-100x slower than the same arithmetic
written differently:

* a 3x3 convolution on a 2x2 map, and the input gradient of a stride-2 one producing 2x2: XLA
  swaps the operands (kernel larger than image) and runs a generic loop;
* depthwise convolutions, forward and backward;
* 1x1 convolutions' kernel gradients, and the 3-channel 7x7/2 stem's forward pass (less so);
* max-pooling's gradient (`select_and_scatter_add`).

`Conv` therefore picks a lowering per pass (forward, input gradient, kernel gradient): XLA's
convolution, im2col + one matmul, space-to-depth, or shifted multiply-adds for depthwise, at trace
time from static shapes and the platform, through a `jax.custom_vjp`. `conv_plan` holds the rule
and the measurements behind it. Parameters ("kernel" [kh, kw, cin // groups, cout], "bias"
[cout]) are `nn.Conv`'s, so checkpoints move between `nn.Conv` and `Conv` and across platforms.

Usage::

    from weckd_jax import ops
    conv, max_pool = ops.cpu_ops()     # (ops.Conv, ops.max_pool) on CPU, Flax's own elsewhere
    model = create_model(..., conv=conv, max_pool=max_pool)

Forward-mode differentiation (`jax.jvp`, `jax.jacfwd`, `jax.linearize`) is not supported through
the CPU lowerings: JAX cannot differentiate a `custom_vjp` function in forward mode ("can't apply
forward-mode autodiff (jvp) to a custom_vjp function"). Reverse mode, gradients of gradients and
`jax.hessian` (forward over reverse) work. For forward mode use `Conv(..., lowering="xla")` and
`flax.linen.max_pool`, or Flax's pair from `cpu_ops(platform="gpu")`; layers whose plan is all XLA
(`conv_plan`) and off-CPU platforms support it anyway.

`configure_cpu_flags` sets XLA:CPU options at program start (YNNPACK off for convolutions, which
XLA's Eigen kernels run faster on CPU: about 1.5x on the default network's train step).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import jaxlib
from flax import linen as nn
from flax.linen.dtypes import promote_dtype
from jax import lax

__all__ = [
    "Conv",
    "ConvPlan",
    "XLA_PLAN",
    "MATMUL_PLAN",
    "DEPTHWISE_PLAN",
    "conv_plan",
    "max_pool",
    "cpu_ops",
    "configure_cpu_flags",
    "YNN_CONV_FLAG",
]

YNN_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

Lowering = Literal["xla", "matmul", "s2d", "depthwise"]
_LOWERING_NAMES = ("xla", "matmul", "s2d", "depthwise")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# Space-to-depth for strided convolutions whose rearranged input has at most this many channels.
_S2D_MAX_CHANNELS = 16
# Depthwise convolutions with fewer output channels than this keep XLA's kernel gradient.
_DEPTHWISE_XLA_KERNEL_GRAD_BELOW = 64


def _platform(platform: str | None) -> str:
    return platform if platform is not None else jax.default_backend()


# --------------------------------------------------------------------------------------------
# Lowering plan.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvPlan:
    """How each pass of a 2-D convolution is lowered.

    "xla": `lax.conv_general_dilated` and its autodiff transposes; "matmul": im2col (kh*kw strided
    slices concatenated) and one matmul; "s2d": space-to-depth, then a stride-1 XLA convolution;
    "depthwise" (depthwise convolutions only): kh*kw shifted multiply-adds. The backward passes
    are the autodiff transposes of the named forward lowering, recomputed from the operands.
    """

    forward: Lowering = "xla"
    input_grad: Lowering = "xla"
    kernel_grad: Lowering = "xla"

    def __post_init__(self):
        for lowering in (self.forward, self.input_grad, self.kernel_grad):
            if lowering not in _LOWERING_NAMES:
                raise ValueError(f"unknown lowering {lowering!r}; one of {_LOWERING_NAMES}")

    @property
    def all_xla(self) -> bool:
        return self.forward == self.input_grad == self.kernel_grad == "xla"

    @property
    def lowerings(self) -> set[str]:
        return {self.forward, self.input_grad, self.kernel_grad}


XLA_PLAN = ConvPlan()
MATMUL_PLAN = ConvPlan("matmul", "matmul", "matmul")
DEPTHWISE_PLAN = ConvPlan("depthwise", "depthwise", "depthwise")


def conv_plan(
    input_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    feature_group_count: int = 1,
    platform: str | None = None,
) -> ConvPlan:
    """The lowering `Conv` uses for an NHWC input, an HWIO kernel and explicit padding.

    Not XLA:CPU: `XLA_PLAN`, i.e. plain `lax.conv_general_dilated`, as `flax.linen.Conv`. On
    XLA:CPU (jaxlib 0.10.2; measured per pass at batch 32 on ResNet-18 / MobileNetV2 layers for a
    64x64 input, 2 contended Zen 4 cores; "XLA ms / ours ms"):

    * XLA's `ConvOperandSwapper` swaps input and kernel when the kernel's spatial product exceeds
      the input's, and the swapped convolution runs as a generic loop. That hits the forward pass
      when kh*kw > H*W (3x3 on 2x2: 70-1170 / 3-18 ms) and the input gradient, a convolution of
      the output gradient, when kh*kw > Ho*Wo (3x3 stride 2 onto 2x2: 26-330 / 1.5-9 ms). Such
      layers are matmuls in every pass (the kernel gradient is even either way).
    * 1x1 kernels: matmuls in every pass (kernel gradient 2x faster, the rest even or a little).
    * Strided convolutions on few channels (cin*sh*sw <= 16: RGB / grayscale stems) whose kernel
      is at least as large as the stride: the forward pass goes through space-to-depth (7x7/2 stem
      forward about 2x faster); gradients stay XLA.
    * Depthwise (groups == input channels): shifted multiply-adds for the forward pass (XLA's is
      8-45x slower, 3x3 to 7x7 kernels) and the input gradient (XLA's 11-120x slower); the kernel
      gradient too from 64 channels up (XLA's 1.1-6x slower), XLA's below (it is 2-3x faster at
      32 channels on a 32x32 map).
    * Everything else stays XLA, which beats im2col by 1.2-4x there (im2col materialises kh*kw
      copies of the input): 3x3 convolutions on maps >= 4x4, the stem's gradients, and the
      gradients of 3x3 stride-2 convolutions whose output is >= 3x3 (im2col's col2im measured even
      or better per layer, but not in a whole ResNet-18 train step).
    Other grouped convolutions stay XLA, and so do convolutions with an empty output (kernel
    larger than the padded input), which have nothing to speed up and no slices to take.
    """
    if _platform(platform) != "cpu":
        return XLA_PLAN
    _, h, w, cin = input_shape
    kh, kw = kernel_shape[:2]
    sh, sw = strides
    ho, wo = _output_hw(input_shape, kernel_shape[:2], strides, padding)
    if ho <= 0 or wo <= 0:
        return XLA_PLAN
    if feature_group_count != 1:
        if feature_group_count != cin:
            return XLA_PLAN
        # Depthwise. XLA's kernel gradient wins on few channels, ours on many.
        few_channels = kernel_shape[-1] < _DEPTHWISE_XLA_KERNEL_GRAD_BELOW
        return ConvPlan("depthwise", "depthwise", "xla" if few_channels else "depthwise")
    if (kh, kw) == (1, 1) or kh * kw > h * w:
        return MATMUL_PLAN
    strided = (sh, sw) != (1, 1)
    # A kernel smaller than its stride skips input rows/columns, which space-to-depth would
    # still multiply (by zero taps): an inf there would make NaN where nn.Conv stays finite.
    covers = kh >= sh and kw >= sw
    forward = "s2d" if strided and covers and cin * sh * sw <= _S2D_MAX_CHANNELS else "xla"
    input_grad = "matmul" if kh * kw > ho * wo else "xla"
    return ConvPlan(forward, input_grad, "xla")


def _output_hw(input_shape, window, strides, padding) -> tuple[int, int]:
    """Output height and width of a 2-D window op on an NHWC input; <= 0 when it is empty."""
    (lo_h, hi_h), (lo_w, hi_w) = padding
    h, w = input_shape[1:3]
    return (
        (h + lo_h + hi_h - window[0]) // strides[0] + 1,
        (w + lo_w + hi_w - window[1]) // strides[1] + 1,
    )


# --------------------------------------------------------------------------------------------
# Lowerings of a 2-D NHWC x HWIO convolution with explicit padding.
# --------------------------------------------------------------------------------------------

Pads = tuple[tuple[int, int], tuple[int, int]]


def _xla_conv(x, w, strides, pads: Pads, precision):
    return lax.conv_general_dilated(
        x,
        w,
        strides,
        pads,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=x.shape[-1] // w.shape[2],  # 1, or depthwise
        precision=precision,
    )


def _im2col_slices(x, kernel_hw, strides, pads: Pads, pad_value=0.0):
    """The kh*kw strided slices [N, Ho, Wo, C] of the padded input, one per tap, row-major."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    ho, wo = _output_hw(x.shape, kernel_hw, strides, pads)
    if any(p != 0 for pair in pads for p in pair):
        fill = jnp.array(pad_value, x.dtype)
        x = lax.pad(x, fill, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    n, _, _, c = x.shape
    return [
        lax.slice(
            x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _im2col(x, kernel_hw, strides, pads: Pads):
    """[N, H, W, C] -> [N, Ho, Wo, kh*kw*C], ordered (i, j, c) like an HWIO kernel's rows."""
    cols = _im2col_slices(x, kernel_hw, strides, pads)
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _matmul_conv(x, w, strides, pads: Pads, precision):
    kh, kw, cin, cout = w.shape
    cols = _im2col(x, (kh, kw), strides, pads)
    y = jnp.matmul(cols.reshape(-1, kh * kw * cin), w.reshape(-1, cout), precision=precision)
    return y.reshape(*cols.shape[:-1], cout)


def _s2d_conv(x, w, strides, pads: Pads, precision):
    """Space-to-depth: a stride-s convolution as a stride-1 XLA convolution on s*s*C channels.

    The padded input [N, s*A, s*B, C] becomes [N, A, B, s*s*C] and the kernel, zero-padded to a
    multiple of s taps, [ceil(kh/s), ceil(kw/s), s*s*C, O] (the ResNet stem trick). The input is
    first cropped to the rows and columns the strided convolution reads and the tail refilled with
    zeros: an inf or NaN that `nn.Conv` never reads would otherwise meet a zero tap and make NaN.
    (Rows it reads meet zero taps too, but a non-finite value there makes `nn.Conv`'s output
    non-finite as well. With a kernel smaller than the stride, rows between the windows are never
    read yet lie inside the crop, so `conv_plan` keeps such convolutions on XLA.)
    """
    kh, kw, cin, cout = w.shape
    n, h, wd, _ = x.shape
    (sh, sw), ((lo_h, _), (lo_w, _)) = strides, pads
    ho, wo = _output_hw(x.shape, (kh, kw), strides, pads)
    qh, qw = -(-kh // sh), -(-kw // sw)
    hs, ws = ho + qh - 1, wo + qw - 1  # rows / columns of the space-to-depth input
    # Input rows / columns read: padded rows [0, (ho - 1) * sh + kh) less the low padding.
    read_h = min(h, max(0, (ho - 1) * sh + kh - lo_h))
    read_w = min(wd, max(0, (wo - 1) * sw + kw - lo_w))
    # Crop to them, then zero-pad to exactly [sh*hs, sw*ws].
    zero = jnp.zeros((), x.dtype)
    x = lax.pad(
        x[:, :read_h, :read_w],
        zero,
        (
            (0, 0, 0),
            (lo_h, sh * hs - read_h - lo_h, 0),
            (lo_w, sw * ws - read_w - lo_w, 0),
            (0, 0, 0),
        ),
    )
    x = x.reshape(n, hs, sh, ws, sw, cin).transpose(0, 1, 3, 2, 4, 5).reshape(n, hs, ws, -1)
    w = jnp.pad(w, ((0, qh * sh - kh), (0, qw * sw - kw), (0, 0), (0, 0)))
    w = w.reshape(qh, sh, qw, sw, cin, cout).transpose(0, 2, 1, 3, 4, 5).reshape(qh, qw, -1, cout)
    return _xla_conv(x, w, (1, 1), ((0, 0), (0, 0)), precision)


def _depthwise_conv(x, w, strides, pads: Pads, precision):
    """Depthwise convolution (groups == input channels) as kh*kw shifted multiply-adds.

    Kernel [kh, kw, 1, C*m]: output channel c*m + j reads input channel c (lax's grouping).
    Elementwise, so XLA fuses it into one loop; its autodiff transpose (pads and a reduction) is
    what the backward pass runs. Low-precision floats accumulate in float32, as a convolution would.
    """
    del precision  # no matmul: products and sums are exact float32 operations
    kh, kw, _, cout = w.shape
    cin = x.shape[-1]
    if cout != cin:
        x = jnp.repeat(x, cout // cin, axis=-1)
    out_dtype = x.dtype
    acc = jnp.promote_types(out_dtype, jnp.float32)
    taps = _im2col_slices(x.astype(acc), (kh, kw), strides, pads)
    w = w.astype(acc)
    y = functools.reduce(jnp.add, (tap * w[k // kw, k % kw, 0] for k, tap in enumerate(taps)))
    return y.astype(out_dtype)


_LOWERINGS = {
    "xla": _xla_conv,
    "matmul": _matmul_conv,
    "s2d": _s2d_conv,
    "depthwise": _depthwise_conv,
}


def _conv_lowering(lowering: Lowering):
    return _LOWERINGS[lowering]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _planned_conv(x, w, strides, pads, precision, plan: ConvPlan):
    return _conv_lowering(plan.forward)(x, w, strides, pads, precision)


def _planned_conv_fwd(x, w, strides, pads, precision, plan):
    # Residuals are the operands, not the patches: im2col is recomputed in the backward pass
    # (cheap slices) instead of keeping kh*kw copies of every activation alive.
    return _conv_lowering(plan.forward)(x, w, strides, pads, precision), (x, w)


def _planned_conv_bwd(strides, pads, precision, plan, residuals, g):
    x, w = residuals
    impl_x = _conv_lowering(plan.input_grad)
    impl_w = _conv_lowering(plan.kernel_grad)
    if impl_x is impl_w:
        _, vjp = jax.vjp(lambda x_, w_: impl_x(x_, w_, strides, pads, precision), x, w)
        return vjp(g)
    _, vjp_x = jax.vjp(lambda x_: impl_x(x_, w, strides, pads, precision), x)
    _, vjp_w = jax.vjp(lambda w_: impl_w(x, w_, strides, pads, precision), w)
    return vjp_x(g)[0], vjp_w(g)[0]


_planned_conv.defvjp(_planned_conv_fwd, _planned_conv_bwd)


# --------------------------------------------------------------------------------------------
# Conv module.
# --------------------------------------------------------------------------------------------


def _canonicalize_padding(padding, rank: int):
    """Like flax.linen.linear.canonicalize_padding: a string, or a list of (lo, hi) pairs."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return [(padding, padding)] * rank
    if isinstance(padding, Sequence) and len(padding) == rank:
        pairs = []
        for p in padding:
            if isinstance(p, int):
                pairs.append((p, p))
            elif isinstance(p, Sequence) and len(p) == 2:
                pairs.append((int(p[0]), int(p[1])))
            else:
                break
        if len(pairs) == rank:
            return pairs
    raise ValueError(
        f"Invalid padding format: {padding}, should be str, int, or a sequence of len {rank} "
        "where each element is an int or pair of ints."
    )


class Conv(nn.Module):
    """Drop-in for `flax.linen.Conv` that lowers well on XLA:CPU (see the module docstring).

    Same attributes as `nn.Conv` (all but the deprecated `conv_general_dilated*` hooks and
    `promote_dtype`), same parameters ("kernel" [*kernel_size, cin // groups, features], "bias"
    [features]) and the same results up to float rounding. Two extra attributes, for tests and
    benchmarks:

    lowering: "auto" (default: `conv_plan` for the platform and static shapes), "xla" (always
        `lax.conv_general_dilated`: the same jaxpr as `nn.Conv`), or a `ConvPlan` to force, e.g.
        `MATMUL_PLAN` (ungrouped) or `DEPTHWISE_PLAN` (groups == input channels); a layer with
        an empty output (kernel larger than the padded input) stays XLA even then.
    platform: the platform `conv_plan` decides for; default `jax.default_backend()` at trace time.

    Only 2-D, undilated, ungrouped or depthwise convolutions leave XLA; all others (1-D, 3-D,
    dilated, grouped) are exactly `nn.Conv`'s on every platform.

    Forward-mode autodiff (`jax.jvp`, `jax.jacfwd`, `jax.linearize`) raises a TypeError on a
    layer whose plan leaves XLA (a `custom_vjp`); use `lowering="xla"` (or `nn.Conv`) for it.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: None | int | Sequence[int] = 1
    padding: str | int | Sequence[int | tuple[int, int]] = "SAME"
    input_dilation: None | int | Sequence[int] = 1
    kernel_dilation: None | int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    mask: jax.Array | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    lowering: str | ConvPlan = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not isinstance(self.lowering, ConvPlan) and self.lowering not in ("auto", "xla"):
            raise ValueError(f"unknown lowering {self.lowering!r}: 'auto', 'xla' or a ConvPlan")
        kernel_size = (
            (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        )
        rank = len(kernel_size)

        def broadcast(v) -> tuple[int, ...]:
            if v is None:
                v = 1
            return (v,) * rank if isinstance(v, int) else tuple(v)

        num_batch_dims = inputs.ndim - (rank + 1)
        if num_batch_dims != 1:
            batch_shape = inputs.shape[:num_batch_dims]
            inputs = jnp.reshape(inputs, (-1, *inputs.shape[num_batch_dims:]))

        strides = broadcast(self.strides)
        input_dilation = broadcast(self.input_dilation)
        kernel_dilation = broadcast(self.kernel_dilation)
        padding = _canonicalize_padding(self.padding, rank)
        if padding in ("CIRCULAR", "REFLECT"):
            dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
            pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
            mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
            inputs = jnp.pad(inputs, pads, mode=mode)
            padding = "VALID"
        elif padding == "CAUSAL":
            if rank != 1:
                raise ValueError("Causal padding is only implemented for 1D convolutions.")
            inputs = jnp.pad(
                inputs, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)]
            )
            padding = "VALID"

        in_features = inputs.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"input features {in_features} not divisible by "
                f"feature_group_count {self.feature_group_count}"
            )
        if self.features % self.feature_group_count:
            raise ValueError(
                f"features {self.features} not divisible by feature_group_count "
                f"{self.feature_group_count}: features must be a multiple of feature_group_count"
            )
        kernel_shape = (*kernel_size, in_features // self.feature_group_count, self.features)
        if self.mask is not None and self.mask.shape != kernel_shape:
            raise ValueError(
                "Mask needs to have the same shape as weights. "
                f"Shapes are: {self.mask.shape}, {kernel_shape}"
            )
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        if self.mask is not None:
            kernel *= self.mask
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)

        plan = XLA_PLAN
        pads = None
        if self._fast_path_applies(inputs.shape, input_dilation, kernel_dilation):
            explicit = padding
            if isinstance(padding, str):
                explicit = lax.padtype_to_pads(inputs.shape[1:-1], kernel_size, strides, padding)
            pads = tuple((int(lo), int(hi)) for lo, hi in explicit)
            plan = self._plan(inputs.shape, kernel.shape, strides, pads)
        if plan.all_xla:
            # Exactly what nn.Conv does.
            y = lax.conv_general_dilated(
                inputs,
                kernel,
                strides,
                padding,
                lhs_dilation=input_dilation,
                rhs_dilation=kernel_dilation,
                dimension_numbers=_nd_dimension_numbers(inputs.ndim),
                feature_group_count=self.feature_group_count,
                precision=self.precision,
            )
        else:
            y = _planned_conv(inputs, kernel, strides, pads, self.precision, plan)

        if bias is not None:
            y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
        if num_batch_dims != 1:
            y = jnp.reshape(y, (*batch_shape, *y.shape[1:]))
        return y

    def _fast_path_applies(self, input_shape, input_dilation, kernel_dilation) -> bool:
        return (
            self.lowering != "xla"
            and len(input_shape) == 4
            and self.feature_group_count in (1, input_shape[-1])
            and set(input_dilation) == {1}
            and set(kernel_dilation) == {1}
        )

    def _plan(self, input_shape, kernel_shape, strides, pads) -> ConvPlan:
        if not isinstance(self.lowering, ConvPlan):
            return conv_plan(
                input_shape, kernel_shape, strides, pads, self.feature_group_count, self.platform
            )
        depthwise = self.feature_group_count > 1
        allowed = {"xla", "depthwise"} if depthwise else {"xla", "matmul", "s2d"}
        if not self.lowering.lowerings <= allowed:
            kind = "depthwise" if depthwise else "ungrouped"
            raise ValueError(f"{self.lowering} does not apply to a {kind} convolution")
        if min(_output_hw(input_shape, kernel_shape[:2], strides, pads)) <= 0:
            return XLA_PLAN  # an empty output has no slices to take, nor anything to speed up
        return self.lowering


def _nd_dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    """NH..WC / HW..IO / NH..WC, as flax.linen.linear._conv_dimension_numbers."""
    lhs = (0, ndim - 1, *range(1, ndim - 1))
    rhs = (ndim - 1, ndim - 2, *range(0, ndim - 2))
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


# --------------------------------------------------------------------------------------------
# Max-pooling.
# --------------------------------------------------------------------------------------------


def _pool_windows(x, window, strides, pads):
    """The window's strided slices of the (-inf) padded input, one per offset, row-major."""
    return _im2col_slices(x, window, strides, pads, pad_value=-jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _slice_max_pool(x, window, strides, pads):
    return functools.reduce(jnp.maximum, _pool_windows(x, window, strides, pads))


def _slice_max_pool_fwd(x, window, strides, pads):
    y = functools.reduce(jnp.maximum, _pool_windows(x, window, strides, pads))
    return y, (x, y)


def _slice_max_pool_bwd(window, strides, pads, residuals, g):
    # Each window's gradient goes to its first maximum in row-major order, as XLA's
    # select_and_scatter (the gradient of reduce_window max) does.
    x, y = residuals
    windows, vjp = jax.vjp(lambda x_: _pool_windows(x_, window, strides, pads), x)
    taken = jnp.zeros(y.shape, bool)
    cotangents = []
    zero = jnp.zeros((), g.dtype)
    for win in windows:
        first = (win == y) & ~taken
        taken = taken | first
        cotangents.append(jnp.where(first, g, zero))
    return vjp(cotangents)


_slice_max_pool.defvjp(_slice_max_pool_fwd, _slice_max_pool_bwd)


def max_pool(
    inputs: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
    *,
    platform: str | None = None,
    force_slices: bool = False,
) -> jax.Array:
    """`flax.linen.max_pool` (same signature and semantics) that is fast on XLA:CPU.

    On CPU the ResNet stem's 3x3 / stride 2 / pad 1 pool of a [N, H, W, C] floating input is a
    max over 9 strided slices with a custom VJP (gradient to each window's first maximum, as
    `nn.max_pool`'s); on other platforms and for other configurations, `nn.max_pool`.
    `platform` overrides `jax.default_backend()`; `force_slices` takes the slice path wherever it
    applies (2-D window, 4-D floating input, non-empty output), for tests.

    The slice path is a `custom_vjp`: forward-mode autodiff (`jax.jvp`, `jax.jacfwd`,
    `jax.linearize`) raises a TypeError through it; use `nn.max_pool` for that.
    """
    window = tuple(window_shape)
    stride = tuple(strides) if strides is not None else (1,) * len(window)
    applicable = (
        len(window) == 2 and inputs.ndim == 4 and jnp.issubdtype(inputs.dtype, jnp.floating)
    )
    if applicable:
        if isinstance(padding, str):
            pads = lax.padtype_to_pads(inputs.shape[1:3], window, stride, padding)
        else:
            pads = padding
        pads = tuple((int(lo), int(hi)) for lo, hi in pads)
        stem_pool = window == (3, 3) and stride == (2, 2) and pads == ((1, 1), (1, 1))
        empty = min(_output_hw(inputs.shape, window, stride, pads)) <= 0
        if not empty and (force_slices or (stem_pool and _platform(platform) == "cpu")):
            return _slice_max_pool(inputs, window, stride, pads)
    return nn.max_pool(inputs, window, strides, padding)


# --------------------------------------------------------------------------------------------
# Platform helpers.
# --------------------------------------------------------------------------------------------


def cpu_ops(platform: str | None = None) -> tuple[type[nn.Module], Callable[..., jax.Array]]:
    """(conv_cls, max_pool_fn) for `create_model(..., conv=..., max_pool=...)`.

    `(Conv, max_pool)` from this module on CPU, `(flax.linen.Conv, flax.linen.max_pool)`
    elsewhere. Either pair has the same parameters, so checkpoints are interchangeable.
    `platform` defaults to `jax.default_backend()` (this initialises the backend).
    """
    if _platform(platform) == "cpu":
        return Conv, max_pool
    return nn.Conv, nn.max_pool


def configure_cpu_flags(
    *, ynn_convolutions: bool = False, environ: dict[str, str] | None = None
) -> str | None:
    """Set XLA:CPU options in XLA_FLAGS; call at program start, before JAX initialises a backend.

    The entry points (`python -m weckd_jax.launch`, `bench`, `tune`, `evaluate`, `predict`) call
    it first thing; a program that imports this package calls it itself, if it wants it.

    XLA reads XLA_FLAGS once, when the first backend is created: a call after that changes the
    environment (for subprocesses) but not the running process, and warns. The options are CPU-only
    and harmless on GPU/TPU hosts. An option the user already set in XLA_FLAGS is never touched.

    ynn_convolutions: jaxlib 0.10 to 0.12 run convolutions through YNNPACK by default. False (the
        default) appends `YNN_CONV_FLAG`, an *experimental* XLA option: YNNPACK keeps matmuls
        and reductions, convolutions go to XLA's Eigen kernels. With this module's `Conv` and
        `max_pool`, on 2 idle Zen 4 cores (ResNet-18, widths 32-256, 64x64, batch 32, images/s):
        supervised step 231 -> 339, KD + AT 226 -> 269, eval 588 -> 1421 on jaxlib 0.10.2;
        on 0.12.0.1 (medians of 5 alternating runs) supervised 393 -> 370, KD 300 -> 313,
        KD + AT 268 -> 312, cached-teacher KD + AT 361 -> 411, eval 1443 -> 1584. XLA aborts on an
        unknown flag, so it is only set for the jaxlib versions it was checked on
        (`_YNN_FLAG_JAXLIB`); elsewhere nothing changes.
    environ: the mapping to edit (default `os.environ`), for tests.

    Returns the flags appended (a string), or None when nothing was changed.
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    wanted = [] if ynn_convolutions or not _ynn_flag_known() else [YNN_CONV_FLAG]
    added = [f for f in wanted if f.split("=", 1)[0] not in flags]
    if not added:
        return None
    env["XLA_FLAGS"] = " ".join([flags.strip(), *added]).strip()
    if environ is None and _backends_initialized():
        import warnings

        warnings.warn(
            "configure_cpu_flags() called after JAX initialised its backends: XLA_FLAGS was "
            "updated but only new processes will see it.",
            stacklevel=2,
        )
    return " ".join(added)


# jaxlib versions [low, high) known to accept YNN_CONV_FLAG (checked: 0.10.2, 0.11.0, 0.12.0.1;
# tests/test_ops.py checks the installed one); widen after checking a new release. On 0.12.0.1
# the flag is still worth setting, less than on 0.10.2 (README, "Performance").
_YNN_FLAG_JAXLIB = ((0, 10, 2), (0, 13, 0))


def _ynn_flag_known() -> bool:
    try:
        version = tuple(int(part) for part in jaxlib.__version__.split(".")[:3])
    except ValueError:  # a development build: do not guess
        return False
    low, high = _YNN_FLAG_JAXLIB
    return low <= version < high


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False
