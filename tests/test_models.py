"""Tests for weckd_jax.models: shapes, strides, parameter counts, BatchNorm modes, initialisation,
precision, errors and the conv / max-pool injection points.

Speed (2 shared CPU cores): shape, dtype and parameter-count checks only trace (``jax.eval_shape``,
no compute, no compilation). Numeric checks use a width-8 ResNet-10 on 4 images of 32 x 32, jitted
once per mode at XLA optimisation level 0 (XLA's default level spends tens of seconds optimising the
initialisers' random-number code); the MobileNetV2 numeric check uses variables filled by numpy.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weckd_jax import models
from weckd_jax.models import (
    BACKBONES,
    STEMS,
    BasicBlock,
    Bottleneck,
    create_model,
    feature_strides,
    init_variables,
    min_image_size,
)

RNG = jax.random.key(0)
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _num_params(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _abstract(model, images_shape, *, channels_dtype=jnp.float32):
    """(variables, (logits, features)) of ``model.init_with_output``, traced only."""
    images = jax.ShapeDtypeStruct(images_shape, channels_dtype)
    out, variables = jax.eval_shape(
        functools.partial(model.init_with_output, train=False), RNG, images
    )
    return variables, out


def _shapes(tree):
    return jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree)


def _expected_channels(name: str, width: int) -> tuple[int, ...]:
    if name == "mobilenetv2":
        m = width / 32
        return tuple(models._make_divisible(c * m) for c in (24, 32, 96, 320))
    expansion = 4 if name == "resnet50" else 1
    return tuple(width * 2**i * expansion for i in range(4))


# --------------------------------------------------------------------------------------------------
# Shapes and strides (tracing only).


def test_public_constants():
    assert BACKBONES == ("resnet10", "resnet18", "resnet34", "resnet50", "mobilenetv2")
    assert STEMS == ("small", "imagenet")


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("name", BACKBONES)
def test_output_shapes(name, stem):
    # Every backbone with both stems, with 1 (grayscale) and 3 (RGB) input channels, on non-square
    # sizes that are multiples of no stride: every stride-2 layer must map n -> ceil(n / 2) (as
    # torchvision's padding does), so that all families with the same stem give maps of one size.
    width, batch, classes = 16, 2, 5
    (h, w), channels = ((19, 13), 1) if stem == "small" else ((45, 37), 3)
    model = create_model(name, num_classes=classes, width=width, stem=stem)
    variables, (logits, features) = _abstract(model, (batch, h, w, channels))
    assert set(variables) == {"params", "batch_stats"}
    assert logits.shape == (batch, classes)
    assert logits.dtype == jnp.float32
    assert isinstance(features, tuple) and len(features) == 4
    got = [f.shape for f in features]
    want = [
        (batch, math.ceil(h / s), math.ceil(w / s), c)
        for s, c in zip(feature_strides(name, stem), _expected_channels(name, width), strict=True)
    ]
    assert got == want
    # The first convolution infers the input channels.
    first = "stem_conv" if name == "mobilenetv2" else "conv1"
    assert variables["params"][first]["kernel"].shape[2] == channels


def test_feature_strides_table():
    for name in BACKBONES:
        assert feature_strides(name, "small") == (1, 2, 4, 8)
        assert feature_strides(name, "imagenet") == (4, 8, 16, 32)


def test_mobilenet_width_scaling_rounds_to_multiples_of_8():
    assert _expected_channels("mobilenetv2", 32) == (24, 32, 96, 320)
    assert _expected_channels("mobilenetv2", 16) == (16, 16, 48, 160)
    assert _expected_channels("mobilenetv2", 8) == (8, 8, 24, 80)
    model = create_model("mobilenetv2", num_classes=2, width=8, stem="small")
    params = _abstract(model, (1, 16, 16, 3))[0]["params"]
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 8)
    # Last 1x1 conv: 1280 * 8 / 32 = 320 channels (scaled too, unlike torchvision).
    assert params["head_conv"]["kernel"].shape == (1, 1, 80, 320)
    assert params["fc"]["kernel"].shape == (320, 2)
    # Depthwise convs: one input channel per group; the first block has no expansion conv.
    assert params["block2"]["dw_conv"]["kernel"].shape == (3, 3, 1, 48)
    assert "expand_conv" not in params["block1"]


# --------------------------------------------------------------------------------------------------
# Parameter counts against torchvision (weights + BN affine + head; not BN running statistics).


@pytest.mark.parametrize(
    "name,width,expected",
    [
        ("resnet18", 64, 11_689_512),
        ("resnet34", 64, 21_797_672),
        ("resnet50", 64, 25_557_032),
        ("mobilenetv2", 32, 3_504_872),
    ],
)
def test_param_counts_match_torchvision(name, width, expected):
    model = create_model(name, num_classes=1000, width=width, stem="imagenet")
    variables, _ = _abstract(model, (1, 64, 64, 3))
    assert _num_params(variables["params"]) == expected
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))


def test_param_names_follow_torchvision_layout():
    model = create_model("resnet18", num_classes=10, width=8, stem="imagenet")
    params = _abstract(model, (1, 64, 64, 3))[0]["params"]
    assert set(params) == {
        "conv1",
        "bn1",
        *(f"layer{i}_{j}" for i in range(1, 5) for j in range(2)),
        "fc",
    }
    assert "downsample_conv" not in params["layer1_0"]
    assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 8, 16)
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 8)
    assert "bias" not in params["conv1"]


# --------------------------------------------------------------------------------------------------
# Minimum image sizes and errors.


def test_min_image_size_values():
    for name in BACKBONES:
        assert min_image_size(name, "small") == 9
        assert min_image_size(name, "imagenet") == 33


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("name", ["resnet10", "mobilenetv2"])
def test_min_image_size_is_tight(name, stem):
    model = create_model(name, num_classes=2, width=8, stem=stem)
    minimum = min_image_size(name, stem)
    _, (_, features) = _abstract(model, (1, minimum, minimum, 3))
    assert features[-1].shape[1:3] == (2, 2)
    with pytest.raises(ValueError, match=rf"at least {minimum} x {minimum}") as info:
        _abstract(model, (1, minimum, minimum - 1, 3))
    message = str(info.value)
    assert "resize" in message and f"got {minimum} x {minimum - 1}" in message
    if stem == "imagenet":
        assert "stem='small'" in message


def test_unknown_name_and_stem_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown backbone 'resnet101'") as info:
        create_model("resnet101", num_classes=2)
    assert all(name in str(info.value) for name in BACKBONES)
    with pytest.raises(ValueError, match="unknown stem 'cifar'") as info:
        create_model("resnet18", num_classes=2, stem="cifar")
    assert all(stem in str(info.value) for stem in STEMS)
    with pytest.raises(ValueError, match="unknown backbone"):
        min_image_size("vgg16", "small")
    with pytest.raises(ValueError, match="unknown stem"):
        feature_strides("resnet18", "large")


def test_invalid_num_classes_width_and_images():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="width"):
        create_model("resnet18", num_classes=2, width=0)
    model = create_model("resnet10", num_classes=2, width=8)
    with pytest.raises(ValueError, match="floating point"):
        _abstract(model, (1, 32, 32, 3), channels_dtype=jnp.uint8)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        jax.eval_shape(
            functools.partial(model.init, train=False),
            RNG,
            jax.ShapeDtypeStruct((32, 32, 3), jnp.float32),
        )


# --------------------------------------------------------------------------------------------------
# Numerics on a tiny ResNet-10 (compiled once per mode).


@functools.cache
def _tiny():
    """Width-8 ResNet-10, 4 RGB 32 x 32 images, its variables, init and jitted train / eval.

    ``train`` and ``evaluate`` also capture every submodule's output (``intermediates``).
    """
    model = create_model("resnet10", num_classes=3, width=8)
    images = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)
    init = functools.partial(init_variables, model)
    variables = init(RNG, images)
    train = _jit(
        functools.partial(
            model.apply,
            train=True,
            capture_intermediates=True,
            mutable=["batch_stats", "intermediates"],
        )
    )
    evaluate = _jit(
        functools.partial(
            model.apply,
            train=False,
            capture_intermediates=True,
            mutable=["batch_stats", "intermediates"],
        )
    )
    return model, images, variables, init, train, evaluate


def test_train_mode_updates_batch_stats_and_eval_mode_does_not():
    _, images, variables, _, train, evaluate = _tiny()
    (logits_train, _), state = train(variables, images)
    old = jax.tree_util.tree_leaves(variables["batch_stats"])
    new = jax.tree_util.tree_leaves(state["batch_stats"])
    assert len(old) == len(new) == 2 * 12  # mean and var of 12 BatchNorms
    # Every running statistic moved (momentum 0.9 towards the batch statistics) ...
    assert all(not np.allclose(a, b) for a, b in zip(old, new, strict=True))
    # ... exactly: running mean = 0.9 * 0 + 0.1 * batch mean of the stem BatchNorm's input, and
    # running var = 0.9 * 1 + 0.1 * batch variance.
    conv_out = state["intermediates"]["conv1"]["__call__"][0]
    stem_stats = state["batch_stats"]["bn1"]
    np.testing.assert_allclose(stem_stats["mean"], 0.1 * conv_out.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(
        stem_stats["var"], 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-5
    )

    (logits_eval, _), state = evaluate(variables, images)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"]
    )
    # Batch statistics vs running statistics give different outputs.
    assert not np.allclose(logits_train, logits_eval, atol=1e-3)


def test_init_is_deterministic_for_a_fixed_rng():
    _, images, variables, init, _, evaluate = _tiny()
    again = init(RNG, images)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, again)
    other = init(jax.random.key(7), images)
    for layer in ("conv1", "fc"):
        kernel = variables["params"][layer]["kernel"]
        assert not np.allclose(kernel, other["params"][layer]["kernel"])
    np.testing.assert_array_equal(evaluate(variables, images)[0][0], evaluate(again, images)[0][0])


def test_init_variables_has_the_tree_of_model_init():
    model, images, variables, _, _, _ = _tiny()
    abstract = jax.eval_shape(functools.partial(model.init, train=False), RNG, images)
    assert _shapes(variables) == _shapes(abstract)
    # The compiled initialiser is reused for an equal model (e.g. the next link of a chain).
    twin = create_model("resnet10", num_classes=3, width=8)
    assert models._jitted_init(twin) is models._jitted_init(model)


def test_initial_weights_have_torchvision_scales():
    _, _, variables, _, _, _ = _tiny()
    params = variables["params"]
    # Kaiming normal, fan-out: std = sqrt(2 / (k * k * out)).
    kernel = np.asarray(params["layer4_0"]["conv1"]["kernel"])  # 3 x 3 x 32 x 64
    assert kernel.std() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.1)
    # Head: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), zero bias.
    fc = np.asarray(params["fc"]["kernel"])
    assert np.abs(fc).max() <= 1 / math.sqrt(64)
    assert not np.any(params["fc"]["bias"])


def test_logits_and_features_are_finite_and_depend_on_the_input():
    _, images, variables, _, _, evaluate = _tiny()
    (logits, features), _ = evaluate(variables, images)
    assert np.isfinite(logits).all()
    assert all(np.isfinite(f).all() and np.any(f) for f in features)
    assert not np.allclose(logits[0], logits[1])


def _numpy_variables(model, images_shape, seed=0):
    """Variables with init's tree, filled by numpy (Kaiming-like kernels): nothing to compile."""
    abstract, _ = _abstract(model, images_shape)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = path[-1].key
        if key == "kernel":
            std = math.sqrt(2 / math.prod(leaf.shape[:-1]))
            return rng.normal(0.0, std, leaf.shape).astype(np.float32)
        if key in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        return np.zeros(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def test_mobilenet_forward_and_batch_stats():
    model = create_model("mobilenetv2", num_classes=3, width=8)
    images = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
    variables = _numpy_variables(model, images.shape)
    train = _jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    (logits, features), state = train(variables, images)
    assert logits.shape == (2, 3) and np.isfinite(logits).all()
    assert all(np.isfinite(f).all() and np.any(f) for f in features)
    # Every running variance moved. (Some running means legitimately stay 0: a 1x1 conv of a
    # train-mode BatchNorm output, e.g. the head conv after the last projection, has zero mean.)
    old = jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
    new = jax.tree_util.tree_leaves(state["batch_stats"])
    moved = {
        jax.tree_util.keystr(path): not np.allclose(a, b)
        for (path, a), b in zip(old, new, strict=True)
    }
    assert len(moved) == 2 * (2 + 3 * 17 - 1)  # mean, var of every BatchNorm
    assert all(v for k, v in moved.items() if k.endswith("['var']"))
    assert moved["['stem_bn']['mean']"] and moved["['block1']['dw_bn']['mean']"]


# --------------------------------------------------------------------------------------------------
# Zero-initialised residual branches.


def test_resnet_stage1_is_the_stem_output_at_init():
    # Whole-model view: ResNet-10's layer1_0 has an identity shortcut, so at initialisation the
    # first feature map equals the stem's output (the block's residual branch contributes 0).
    _, images, variables, _, _, evaluate = _tiny()
    assert not np.any(variables["params"]["layer1_0"]["bn2"]["scale"])
    assert np.all(variables["params"]["layer1_0"]["bn1"]["scale"] == 1)
    (_, features), state = evaluate(variables, images)
    stem = np.maximum(state["intermediates"]["bn1"]["__call__"][0], 0)
    np.testing.assert_array_equal(features[0], stem)
    # The residual branch itself is not trivial: its first conv produces non-zero output.
    assert np.any(state["intermediates"]["layer1_0"]["conv1"]["__call__"][0])


@functools.cache
def _blocks_at_init():
    """Identity- and projection-shortcut blocks of both kinds at init, in both modes: one compile.

    Returns ``(x, {"<Block>/<shortcut>/<mode>": (variables, y, intermediates)})``.
    """
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 8)).astype(np.float32)

    def run(rng, x):
        out = {}
        for block_cls, features in ((BasicBlock, 8), (Bottleneck, 2)):
            expansion = 4 if block_cls is Bottleneck else 1
            for kind, block in (
                # 8 -> 8 channels, stride 1: identity shortcut.
                ("identity", block_cls(features=features)),
                # stride 2 and 8 -> 16 channels: 1x1/2 conv + BatchNorm shortcut.
                ("projection", block_cls(features=16 // expansion, strides=2)),
            ):
                variables = block.init(rng, x)
                for mode in ("eval", "train"):
                    y, state = block.apply(
                        variables,
                        x,
                        train=mode == "train",
                        capture_intermediates=True,
                        mutable=["intermediates", "batch_stats"],
                    )
                    out[f"{block_cls.__name__}/{kind}/{mode}"] = (
                        variables,
                        y,
                        state["intermediates"],
                    )
        return out

    return x, _jit(run)(RNG, x)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("block_name", ["BasicBlock", "Bottleneck"])
def test_residual_block_is_identity_on_its_shortcut_at_init(block_name, mode):
    x, outputs = _blocks_at_init()
    zero_bn = "bn3" if block_name == "Bottleneck" else "bn2"

    # Identity shortcut: the block returns relu(x) exactly ...
    variables, y, inter = outputs[f"{block_name}/identity/{mode}"]
    assert not np.any(variables["params"][zero_bn]["scale"])
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    # ... although its residual branch is not trivial before the zero-initialised BatchNorm.
    assert np.any(inter[zero_bn.replace("bn", "conv")]["__call__"][0])

    # Projection shortcut: the block returns relu(downsample_bn(conv1x1/2(x))).
    variables, y, inter = outputs[f"{block_name}/projection/{mode}"]
    assert not np.any(variables["params"][zero_bn]["scale"])
    assert y.shape == (2, 3, 3, 16)
    np.testing.assert_array_equal(y, np.maximum(inter["downsample_bn"]["__call__"][0], 0))


# --------------------------------------------------------------------------------------------------
# Precision.


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model32, images, variables, _, _, evaluate32 = _tiny()
    model16 = create_model("resnet10", num_classes=3, width=8, dtype=jnp.bfloat16)
    # Same variable tree, all float32, whatever the compute dtype.
    abstract16, (logits16, features16) = _abstract(model16, images.shape)
    assert _shapes(abstract16) == _shapes(variables)
    assert logits16.dtype == jnp.float32
    assert all(f.dtype == jnp.float32 for f in features16)

    # The convolutions run in bfloat16; BatchNorm, pooling and head in float32.
    (_, _), state = jax.eval_shape(
        functools.partial(
            model16.apply,
            train=True,
            capture_intermediates=True,
            mutable=["intermediates", "batch_stats"],
        ),
        variables,
        images,
    )
    inter = state["intermediates"]
    assert inter["conv1"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["layer2_0"]["downsample_conv"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["layer2_0"]["bn1"]["__call__"][0].dtype == jnp.float32
    assert inter["fc"]["__call__"][0].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state["batch_stats"]))
    grads = jax.eval_shape(
        jax.grad(lambda p: model16.apply({**variables, "params": p}, images)[0].sum()),
        variables["params"],
    )
    assert _shapes(grads) == _shapes(variables["params"])

    # Really computed in bf16 (not bit-identical), and close to the float32 result.
    logits16, _ = _jit(functools.partial(model16.apply, train=False))(variables, images)
    (logits32, _), _ = evaluate32(variables, images)
    assert logits16.dtype == jnp.float32
    assert not np.array_equal(logits16, logits32)
    np.testing.assert_allclose(logits16, logits32, rtol=0.1, atol=0.05)


# --------------------------------------------------------------------------------------------------
# Injection points.

_CONV_CALLS: list[str] = []


class CountingConv(nn.Conv):
    """nn.Conv that records each call: stands in for a platform-specific implementation."""

    def __call__(self, inputs):
        _CONV_CALLS.append(self.name)
        return super().__call__(inputs)


def _num_convs(name: str) -> int:
    if name == "mobilenetv2":
        blocks = sum(n for _, _, n, _ in models._MBV2_STAGES)
        # stem + head + 3 per block, except the first block (no expansion conv); no shortcut convs.
        return 2 + 3 * blocks - 1
    block, stages = models._RESNETS[name]
    per_block = 3 if block == "bottleneck" else 2
    downsamples = 4 if block == "bottleneck" else 3  # bottleneck layer1_0 changes channels
    return 1 + per_block * sum(stages) + downsamples


@pytest.mark.parametrize(
    "name,stem", [("resnet18", "imagenet"), ("resnet50", "small"), ("mobilenetv2", "imagenet")]
)
def test_custom_conv_and_max_pool_are_used_with_the_same_params_tree(name, stem):
    pool_calls = []

    def counting_max_pool(x, window_shape, strides, padding):
        pool_calls.append((window_shape, strides, padding))
        return nn.max_pool(x, window_shape, strides, padding)

    size = 64 if stem == "imagenet" else 32
    default = create_model(name, num_classes=4, width=8, stem=stem)
    custom = create_model(
        name, num_classes=4, width=8, stem=stem, conv=CountingConv, max_pool=counting_max_pool
    )
    _CONV_CALLS.clear()
    custom_vars, (custom_logits, custom_features) = _abstract(custom, (2, size, size, 3))
    assert len(_CONV_CALLS) == _num_convs(name)
    uses_pool = stem == "imagenet" and name != "mobilenetv2"
    assert pool_calls == [((3, 3), (2, 2), ((1, 1), (1, 1)))] * uses_pool

    default_vars, (default_logits, default_features) = _abstract(default, (2, size, size, 3))
    assert jax.tree_util.tree_structure(custom_vars) == jax.tree_util.tree_structure(default_vars)
    assert _shapes(custom_vars) == _shapes(default_vars)
    assert _shapes((custom_logits, custom_features)) == _shapes((default_logits, default_features))


def test_custom_conv_gives_the_same_values():
    _, images, variables, _, _, evaluate = _tiny()
    custom = create_model("resnet10", num_classes=3, width=8, conv=CountingConv)
    _CONV_CALLS.clear()
    logits, features = _jit(functools.partial(custom.apply, train=False))(variables, images)
    assert len(_CONV_CALLS) == _num_convs("resnet10")  # traced once
    (reference_logits, reference_features), _ = evaluate(variables, images)
    np.testing.assert_allclose(logits, reference_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features[-1], reference_features[-1], rtol=1e-5, atol=1e-6)
