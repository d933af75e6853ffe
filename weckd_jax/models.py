"""Backbones chosen by name: ResNet-10/18/34/50 (torchvision layout) and a MobileNetV2.

Every backbone is a Flax **Linen** module used through ``apply`` with explicit variables::

    model = create_model("resnet18", num_classes=3, width=32, stem="small")
    variables = model.init(rng, images, train=False)        # {"params", "batch_stats"}
    logits, features = model.apply(variables, images, train=False)
    (logits, features), updates = model.apply(
        variables, images, train=True, mutable=["batch_stats"])

Shapes (B = batch, H x W = image size, C = 1 or 3 input channels, K = ``num_classes``):

* ``images``: floating ``[B, H, W, C]`` (already normalised), with
  ``H, W >= min_image_size(name, stem)``.
* ``logits``: float32 ``[B, K]``.
* ``features``: a tuple of exactly 4 NHWC maps, the outputs of the 4 stages, with strides
  ``feature_strides(name, stem)`` -- ``(1, 2, 4, 8)`` for the ``"small"`` stem and
  ``(4, 8, 16, 32)`` for the ``"imagenet"`` stem, for *every* family -- so map ``i`` is
  ``[B, ceil(H / s_i), ceil(W / s_i), C_i]``. Two backbones with the same stem give maps of the
  same spatial size, which is what attention transfer between different architectures needs.
  They are float32 (BatchNorm runs in float32, see below).

Precision: parameters and BatchNorm statistics are always float32. ``dtype`` is the *compute* dtype
of the convolutions; BatchNorm normalises in float32 and returns float32, and the global pooling and
the Dense head run in float32, so the logits are float32 even with ``dtype=jnp.bfloat16``.

Initialisation follows torchvision: convolutions Kaiming-normal (fan-out, gain 2), BatchNorm
scale 1 / bias 0. In ResNets the **last BatchNorm scale of every residual block is
zero-initialised** (torchvision's ``zero_init_residual=True``, Goyal et al. 2017): at initialisation
each block computes ``relu(shortcut(x))``, so a deep ResNet starts as a shallow one, which trains
more stably on small data. The MobileNetV2 keeps torchvision's standard initialisation (no
zero-init).

Injection points (for a platform-specific fast implementation): ``conv`` is a Flax module class with
the constructor keywords and parameter tree of ``flax.linen.Conv`` (it receives ``features``,
``kernel_size``, ``strides``, ``padding`` as explicit ``((lo, hi), (lo, hi))`` pairs, ``use_bias``,
``feature_group_count``, ``dtype``, ``param_dtype``, ``kernel_init`` and ``name``); ``max_pool``
is a function ``(x, window_shape=..., strides=..., padding=...) -> y`` like
``flax.linen.max_pool``. Every submodule is named explicitly, so parameter names and shapes do not
depend on which implementation is used and checkpoints move across platforms.

Padding is explicit and symmetric as in torchvision (7x7: 3, 3x3: 1, 1x1: 0; the 3x3/2 max-pool: 1).
A stride-2 layer then maps a side ``n`` to ``ceil(n / 2)``, for every layer type, which is why the
feature-map sizes above are ``ceil(H / stride)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "BACKBONES",
    "STEMS",
    "BasicBlock",
    "Bottleneck",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "create_model",
    "feature_strides",
    "init_variables",
    "min_image_size",
]

# name -> (block type, blocks per stage)
_RESNETS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet10": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
BACKBONES: tuple[str, ...] = (*_RESNETS, "mobilenetv2")
STEMS: tuple[str, ...] = ("small", "imagenet")

# Stride of the first feature map (= of the stem, plus the max-pool / first strided stage).
_FIRST_STRIDE = {"small": 1, "imagenet": 4}

# MobileNetV2 inverted-residual settings (expand ratio t, channels c, repeats n, stride s), as in
# torchvision / Sandler et al. 2018; with the "small" stem, stage 1 (c=24) uses stride 1 instead.
_MBV2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Stages whose output is returned as a feature map: the last stage at each downsampling level
# (c = 24, 32, 96, 320), as timm's ``features_only`` does.
_MBV2_FEATURE_STAGES = (1, 2, 4, 6)
_MBV2_LAST_CHANNELS = 1280

_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torchvision's default nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_TORCH_LINEAR = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# --------------------------------------------------------------------------------------------------
# Names, strides, sizes.


def _check_name_and_stem(name: str, stem: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")


def feature_strides(name: str, stem: str) -> tuple[int, int, int, int]:
    """Strides (input pixels per feature-map pixel) of the 4 feature maps of ``name`` with ``stem``.

    ``(1, 2, 4, 8)`` for ``stem="small"`` and ``(4, 8, 16, 32)`` for ``stem="imagenet"``, for every
    backbone. Map ``i`` of an ``H x W`` image is ``ceil(H / s_i) x ceil(W / s_i)``.
    """
    _check_name_and_stem(name, stem)
    s = _FIRST_STRIDE[stem]
    return (s, 2 * s, 4 * s, 8 * s)


def min_image_size(name: str, stem: str) -> int:
    """Smallest image side for which the last feature map is at least 2 x 2.

    The last stage has stride ``S = feature_strides(name, stem)[-1]`` and a side ``n`` becomes
    ``ceil(n / S)``, so the minimum is ``S + 1``: 9 for the ``"small"`` stem, 33 for ``"imagenet"``.
    Below it the last map would be 1 x 1: its normalised spatial attention map is the constant 1
    (attention transfer learns nothing there) and global pooling degenerates to a copy. Sides that
    are multiples of ``S`` (>= 2 S) avoid the uneven border of ``ceil``.
    """
    return feature_strides(name, stem)[-1] + 1


def _check_images(images: jax.Array, arch: str, stem: str) -> None:
    if images.ndim != 4:
        raise ValueError(f"{arch}: images must be [B, H, W, C], got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"{arch}: images must be floating point (normalised), got {images.dtype}; "
            "convert and normalise them first (e.g. images.astype(jnp.float32) / 255)"
        )
    h, w = images.shape[1], images.shape[2]
    minimum = min_image_size(arch, stem)
    if min(h, w) < minimum:
        last = feature_strides(arch, stem)[-1]
        fix = f"resize the images to at least {minimum} x {minimum} (multiples of {last} are best)"
        if stem == "imagenet":
            fix += f", or use stem='small' (minimum {min_image_size(arch, 'small')})"
        raise ValueError(
            f"{arch} with stem={stem!r} needs images of at least {minimum} x {minimum} pixels so "
            f"that its last stage (stride {last}) is at least 2 x 2; got {h} x {w}. Fix: {fix}."
        )


# --------------------------------------------------------------------------------------------------
# Layers.


def _conv(
    conv: Any,
    features: int,
    kernel: int,
    stride: int,
    *,
    dtype: Any,
    name: str,
    groups: int = 1,
) -> nn.Module:
    """A bias-free ``kernel x kernel`` convolution with torchvision's symmetric padding."""
    pad = (kernel - 1) // 2
    return conv(
        features=features,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        feature_group_count=groups,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_KAIMING_FAN_OUT,
        name=name,
    )


def _bn(train: bool, name: str, *, zero_init: bool = False) -> nn.BatchNorm:
    """BatchNorm as torchvision's (momentum 0.1 there = 0.9 here), in float32."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
        name=name,
    )


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv3x3(relu(bn1(conv3x3/s(x))))) + shortcut(x))``.

    ``[B, H, W, Cin] -> [B, ceil(H/s), ceil(W/s), features]``. The shortcut is the identity, or a
    1x1/s convolution + BatchNorm when the stride or the channel count changes. ``bn2``'s scale is
    zero-initialised, so at initialisation the block returns ``relu(shortcut(x))``.
    """

    features: int
    strides: int = 1
    conv: Any = nn.Conv
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _conv(self.conv, self.features, 3, self.strides, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(_bn(train, "bn1")(y))
        y = _conv(self.conv, self.features, 3, 1, dtype=self.dtype, name="conv2")(y)
        y = _bn(train, "bn2", zero_init=True)(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = _conv(
                self.conv, self.features, 1, self.strides, dtype=self.dtype, name="downsample_conv"
            )(x)
            shortcut = _bn(train, "downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (torchvision "v1.5": the stride is on the 3x3 convolution).

    ``[B, H, W, Cin] -> [B, ceil(H/s), ceil(W/s), 4 * features]``: 1x1 (``features``), 3x3/s, 1x1
    (``4 * features``), each followed by BatchNorm; ReLU after the first two and after the sum with
    the shortcut (identity, or 1x1/s conv + BatchNorm). ``bn3``'s scale is zero-initialised.
    """

    features: int
    strides: int = 1
    conv: Any = nn.Conv
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out_features = self.features * self.expansion
        y = _conv(self.conv, self.features, 1, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(_bn(train, "bn1")(y))
        y = _conv(self.conv, self.features, 3, self.strides, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(_bn(train, "bn2")(y))
        y = _conv(self.conv, out_features, 1, 1, dtype=self.dtype, name="conv3")(y)
        y = _bn(train, "bn3", zero_init=True)(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = _conv(
                self.conv, out_features, 1, self.strides, dtype=self.dtype, name="downsample_conv"
            )(x)
            shortcut = _bn(train, "downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet in torchvision's layout, returning ``(logits, features)``.

    Stem ``"small"``: 3x3/1 conv (``width``) + BN + ReLU, for 32-64 px images. Stem ``"imagenet"``:
    7x7/2 conv + BN + ReLU + 3x3/2 max-pool, as torchvision, for 128 px and up. Then 4 stages of
    ``stage_sizes[i]`` blocks with ``width * 2**i`` base channels (x4 for bottlenecks), the first
    block of stages 2-4 with stride 2; global average pool; Dense head.

    Parameter names follow torchvision (``conv1``, ``bn1``, ``layer{i}_{j}/conv1`` ..., ``fc``).

    Call: ``images`` floating ``[B, H, W, C]`` -> ``logits`` float32 ``[B, num_classes]``,
    ``features`` = the 4 stage outputs (see the module docstring for their shapes).
    """

    arch: str
    block: str  # "basic" | "bottleneck"
    stage_sizes: Sequence[int]
    num_classes: int
    width: int = 64
    stem: str = "small"
    dtype: Any = jnp.float32
    conv: Any = nn.Conv
    max_pool: Callable[..., jax.Array] = nn.max_pool

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        _check_images(images, self.arch, self.stem)
        if self.stem == "imagenet":
            x = _conv(self.conv, self.width, 7, 2, dtype=self.dtype, name="conv1")(images)
            x = nn.relu(_bn(train, "bn1")(x))
            x = self.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = _conv(self.conv, self.width, 3, 1, dtype=self.dtype, name="conv1")(images)
            x = nn.relu(_bn(train, "bn1")(x))

        block_cls = Bottleneck if self.block == "bottleneck" else BasicBlock
        features = []
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = block_cls(
                    features=self.width * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    conv=self.conv,
                    dtype=self.dtype,
                    name=f"layer{i + 1}_{j}",
                )(x, train=train)
            features.append(x)

        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=_TORCH_LINEAR,
            name="fc",
        )(pooled)
        return logits, tuple(features)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of ``divisor``, >= divisor, >= 0.9 value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when ``expand_ratio == 1``) + BN + ReLU6, 3x3/s
    depthwise + BN + ReLU6, 1x1 linear projection + BN; plus ``x`` when the stride is 1 and the
    channel count is kept. ``[B, H, W, Cin] -> [B, ceil(H/s), ceil(W/s), features]``.
    """

    features: int
    strides: int
    expand_ratio: int
    conv: Any = nn.Conv
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        in_features = x.shape[-1]
        hidden = int(round(in_features * self.expand_ratio))
        y = x
        if self.expand_ratio != 1:
            y = _conv(self.conv, hidden, 1, 1, dtype=self.dtype, name="expand_conv")(y)
            y = nn.relu6(_bn(train, "expand_bn")(y))
        y = _conv(
            self.conv, hidden, 3, self.strides, groups=hidden, dtype=self.dtype, name="dw_conv"
        )(y)
        y = nn.relu6(_bn(train, "dw_bn")(y))
        y = _conv(self.conv, self.features, 1, 1, dtype=self.dtype, name="project_conv")(y)
        y = _bn(train, "project_bn")(y)
        if self.strides == 1 and in_features == self.features:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018, torchvision layout), returning ``(logits, features)``.

    ``width`` is the stem's channel count: 32 is the standard 1.0 multiplier, and every channel
    count (the 1280-channel last convolution included, unlike torchvision which never shrinks it)
    is scaled by ``width / 32`` and rounded to a multiple of 8 (at least 8).

    Stem ``"imagenet"``: 3x3/2 conv, as the paper (strides 2 ... 32). Stem ``"small"``: 3x3/1
    conv *and* stride 1 in the second stage (c = 24), as the usual CIFAR variant, so the total
    stride is 8 like the small-stem ResNets. ``features`` are the outputs of the last block at
    each of the 4 downsampling levels (stages with c = 24, 32, 96, 320; strides as
    ``feature_strides``). Then a 1x1 conv to ``1280 * width / 32`` channels + BN + ReLU6, global
    average pool and a Dense head. torchvision's dropout before the head is left out (it would need
    a dropout rng in ``apply``).
    """

    arch: str
    num_classes: int
    width: int = 32
    stem: str = "small"
    dtype: Any = jnp.float32
    conv: Any = nn.Conv
    max_pool: Callable[..., jax.Array] = nn.max_pool  # unused; kept for a uniform constructor

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        _check_images(images, self.arch, self.stem)
        multiplier = self.width / 32
        imagenet = self.stem == "imagenet"
        x = _conv(
            self.conv,
            _make_divisible(self.width),
            3,
            2 if imagenet else 1,
            dtype=self.dtype,
            name="stem_conv",
        )(images)
        x = nn.relu6(_bn(train, "stem_bn")(x))

        features = []
        index = 0
        for stage, (t, c, n, s) in enumerate(_MBV2_STAGES):
            stride = 1 if (stage == 1 and not imagenet) else s
            for j in range(n):
                index += 1
                x = InvertedResidual(
                    features=_make_divisible(c * multiplier),
                    strides=stride if j == 0 else 1,
                    expand_ratio=t,
                    conv=self.conv,
                    dtype=self.dtype,
                    name=f"block{index}",
                )(x, train=train)
            if stage in _MBV2_FEATURE_STAGES:
                features.append(x)

        x = _conv(
            self.conv,
            _make_divisible(_MBV2_LAST_CHANNELS * multiplier),
            1,
            1,
            dtype=self.dtype,
            name="head_conv",
        )(x)
        x = nn.relu6(_bn(train, "head_bn")(x))
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(0.01),
            name="fc",
        )(pooled)
        return logits, tuple(features)


# --------------------------------------------------------------------------------------------------
# Factory.


def create_model(
    name: str,
    *,
    num_classes: int,
    width: int = 64,
    stem: str = "small",
    dtype: Any = jnp.float32,
    conv: Any = None,
    max_pool: Callable[..., jax.Array] | None = None,
) -> nn.Module:
    """The backbone ``name`` (one of ``BACKBONES``) with a ``num_classes``-way head.

    Args:
      name: ``"resnet10" | "resnet18" | "resnet34" | "resnet50" | "mobilenetv2"``.
      num_classes: size of the head (>= 1).
      width: ResNets: first-stage channels (stages ``width, 2w, 4w, 8w``; 64 = torchvision).
        MobileNetV2: stem channels (32 = the 1.0 multiplier; note that the default 64 is a 2.0
        multiplier for it).
      stem: ``"small"`` (stride-1 stem, 32-64 px images) or ``"imagenet"`` (stride-4 stem, 128 px
        and up). See ``feature_strides`` and ``min_image_size``.
      dtype: compute dtype of the convolutions (e.g. ``jnp.bfloat16``); parameters, BatchNorm, the
        pooling and the head stay float32.
      conv: a module class with ``flax.linen.Conv``'s constructor keywords and parameter tree
        (default ``nn.Conv``).
      max_pool: ``(x, window_shape=, strides=, padding=) -> y`` like ``flax.linen.max_pool``
        (default ``nn.max_pool``); used by the ResNets' ImageNet stem only.

    Returns:
      An unbound Linen module; ``module.apply(variables, images, train=...)`` returns
      ``(logits [B, num_classes] float32, features: tuple of 4 [B, h_i, w_i, c_i])``.

    Raises:
      ValueError: for an unknown ``name`` or ``stem`` (listing the valid ones), ``num_classes < 1``
        or ``width < 1``.
    """
    _check_name_and_stem(name, stem)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    conv = nn.Conv if conv is None else conv
    max_pool = nn.max_pool if max_pool is None else max_pool
    common = dict(
        arch=name,
        num_classes=num_classes,
        width=width,
        stem=stem,
        dtype=dtype,
        conv=conv,
        max_pool=max_pool,
    )
    if name == "mobilenetv2":
        return MobileNetV2(**common)
    block, stage_sizes = _RESNETS[name]
    return ResNet(block=block, stage_sizes=stage_sizes, **common)


# XLA's CPU backend spends most of an ``init``'s compile time optimising the threefry random-number
# code with LLVM (measured here: resnet10 width 8, 40 s at the default level vs 5.6 s at level 0 on
# a loaded 2-core machine); ``init`` runs once, so its speed at run time does not matter.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def init_variables(model: nn.Module, rng: jax.Array, images: jax.Array) -> dict[str, Any]:
    """``model.init(rng, images, train=False)``, jit-compiled quickly.

    On CPU the initialiser is compiled at XLA backend optimisation level 0, several times faster to
    compile than the default for the same values (up to float rounding: the last bit of a few
    parameters may differ from an eager ``model.init``; the result is deterministic for a fixed
    ``rng``). On other backends this is a plain ``jax.jit(model.init)``. The compiled function is
    cached per model (and, by ``jit``, per image shape).

    Args:
      model: a module from ``create_model``.
      rng: a PRNG key.
      images: ``[B, H, W, C]`` floating images (only their shape and dtype matter).

    Returns:
      ``{"params": ..., "batch_stats": ...}``, all float32.
    """
    return _jitted_init(model)(rng, images)


@functools.lru_cache(maxsize=16)
def _jitted_init(model: nn.Module) -> Callable[..., dict[str, Any]]:
    # Cached per (hashable, immutable) module, so initialising the same architecture again -- a
    # new seed, the next link of a chain -- reuses the compiled initialiser.
    options = _FAST_COMPILE if jax.default_backend() == "cpu" else None
    return jax.jit(functools.partial(model.init, train=False), compiler_options=options)
