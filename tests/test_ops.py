"""weckd_jax.ops: CPU-friendly Conv / max_pool agree with flax.linen's, and are flax's off CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from weckd_jax import ops


# Forward, input gradient and kernel gradient through every lowering: "auto" mixes them per pass
# through the custom VJP; the uniform plans check each lowering's own three passes.
def _forced_lowerings(strides, groups):
    if groups > 1:
        return {"auto": "auto", "depthwise": ops.DEPTHWISE_PLAN}
    forced = {"auto": "auto", "matmul": ops.MATMUL_PLAN}
    if strides > 1:  # space-to-depth with stride 1 is the XLA convolution itself
        forced["s2d"] = ops.ConvPlan("s2d", "s2d", "s2d")
    return forced


# (kernel, stride, padding, (H, W), cin, cout, groups, bias)
P1, P3 = ((1, 1), (1, 1)), ((3, 3), (3, 3))
CONV_CASES = [
    (1, 1, "SAME", (5, 7), 3, 4, 1, True),
    (1, 2, "VALID", (9, 9), 8, 6, 1, False),
    (1, 2, ((0, 0), (0, 0)), (2, 2), 16, 8, 1, False),
    (3, 1, P1, (2, 2), 8, 8, 1, False),  # tiny map: XLA would swap operands
    (3, 1, P1, (1, 1), 4, 4, 1, True),
    (3, 2, P1, (4, 4), 8, 16, 1, False),  # stride 2 onto 2x2
    (3, 2, P1, (3, 5), 1, 4, 1, True),
    (3, 2, "SAME", (8, 8), 3, 8, 1, False),  # SAME, stride 2: asymmetric (0, 1) padding
    (3, 2, "SAME", (7, 9), 3, 5, 1, True),
    (3, 1, "SAME", (9, 11), 1, 4, 1, True),
    (3, 1, ((2, 0), (1, 2)), (5, 6), 3, 4, 1, True),  # uneven explicit padding
    (3, 2, ((1, 1), (1, 1)), (16, 16), 8, 8, 1, False),
    (7, 2, P3, (16, 16), 3, 8, 1, False),  # ImageNet stem
    (7, 2, P3, (15, 13), 1, 4, 1, True),  # grayscale stem, odd sizes
    (7, 1, "SAME", (9, 9), 3, 4, 1, False),
    (2, 2, "VALID", (7, 7), 3, 4, 1, True),  # space-to-depth drops the never-read last row
    (3, 1, P1, (8, 8), 8, 8, 8, False),  # depthwise
    (3, 2, P1, (7, 7), 6, 6, 6, True),  # depthwise, strided
    (3, 1, P1, (2, 2), 64, 64, 64, False),  # depthwise, 64 channels: every pass off XLA
    (5, 2, "SAME", (9, 8), 4, 8, 4, True),  # depthwise, channel multiplier 2
    (3, 1, "SAME", (4, 4), 6, 12, 3, False),  # grouped, not depthwise: XLA
]


def _case_id(case):
    k, s, pad, hw, cin, cout, groups, bias = case
    pad = pad if isinstance(pad, str) else "x".join(f"{lo}{hi}" for lo, hi in pad)
    return f"k{k}s{s}-{pad}-{hw[0]}x{hw[1]}-c{cin}to{cout}-g{groups}-{'b' if bias else 'nb'}"


def _outputs_and_grads(modules, params, x):
    """For each module: output, and gradients of a weighted sum of the output w.r.t. its
    parameters and input. All modules in one jit (one compilation per test case)."""

    def run(params, x):
        results = {}
        for name, module in modules.items():

            def loss(params, x, module=module):
                y = module.apply({"params": params}, x)
                weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
                return jnp.sum(y * weights), y

            (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
            results[name] = (y, *grads)
        return results

    return jax.jit(run)(params, x)


def _assert_close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=2e-5 * scale, err_msg=what)


@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv_matches_flax_conv(case):
    k, s, pad, (h, w), cin, cout, groups, bias = case
    kwargs = dict(
        features=cout,
        kernel_size=(k, k),
        strides=(s, s),
        padding=pad,
        feature_group_count=groups,
        use_bias=bias,
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, h, w, cin), np.float32)
    params = {"kernel": rng.standard_normal((k, k, cin // groups, cout), np.float32)}
    if bias:
        params["bias"] = rng.standard_normal((cout,), np.float32)
    # nn.Conv's own parameter tree has exactly these shapes, and so has ops.Conv's.
    flax_tree = jax.eval_shape(nn.Conv(**kwargs).init, jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, flax_tree) == {"params": jax.tree.map(np.shape, params)}

    modules = {"flax": nn.Conv(**kwargs)}
    for name, lowering in _forced_lowerings(s, groups).items():
        module = ops.Conv(**kwargs, lowering=lowering, platform="cpu")
        own_tree = jax.eval_shape(module.init, jax.random.key(0), x)
        assert jax.tree.map(jnp.shape, own_tree) == jax.tree.map(jnp.shape, flax_tree)
        modules[name] = module

    results = _outputs_and_grads(modules, params, x)
    y_ref, g_params_ref, g_x_ref = results.pop("flax")
    assert y_ref.size > 0
    for name, (y, g_params, g_x) in results.items():
        _assert_close(y, y_ref, f"{name}: output")
        _assert_close(g_x, g_x_ref, f"{name}: d/dx")
        _assert_close(g_params["kernel"], g_params_ref["kernel"], f"{name}: d/dkernel")
        if bias:
            _assert_close(g_params["bias"], g_params_ref["bias"], f"{name}: d/dbias")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(features=8, kernel_size=(3, 3)),
        dict(features=8, kernel_size=(7, 7), strides=2, use_bias=False),
        dict(features=6, kernel_size=(1, 1), param_dtype=jnp.bfloat16),
        dict(features=6, kernel_size=(3, 3), feature_group_count=6),
        dict(features=4, kernel_size=3, padding=1),
    ],
)
def test_param_tree_identical_to_flax(kwargs):
    x = jnp.ones((2, 4, 4, 6))

    def structure(module):
        tree = jax.eval_shape(module.init, jax.random.key(3), x)
        return jax.tree.map(lambda a: (a.shape, a.dtype), tree)

    assert structure(ops.Conv(**kwargs)) == structure(nn.Conv(**kwargs))


def test_same_initial_parameters_as_flax():
    # Same names and RNG stream: the same parameters from the same initialisers. (The defaults
    # are flax's too: lecun_normal and zeros; plain normal here keeps the compile cheap.)
    x = jnp.ones((2, 4, 4, 6))
    normal = nn.initializers.normal(1.0)
    kwargs = dict(features=8, kernel_size=(3, 3), kernel_init=normal, bias_init=normal)
    init = jax.jit(lambda key: (ops.Conv(**kwargs).init(key, x), nn.Conv(**kwargs).init(key, x)))
    ours, theirs = init(jax.random.key(3))
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("hw", [(2, 2), (16, 16)])
def test_non_cpu_is_exactly_lax_conv(platform, hw):
    kwargs = dict(features=8, kernel_size=(3, 3), strides=2, padding=((1, 1), (1, 1)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *hw, 4), np.float32)
    variables = {
        "params": {
            "kernel": rng.standard_normal((3, 3, 4, 8), np.float32),
            "bias": rng.standard_normal((8,), np.float32),
        }
    }

    def jaxprs(module):
        def loss(v, x):
            return jnp.sum(module.apply(v, x) ** 2)

        return str(jax.make_jaxpr(module.apply)(variables, x)), str(
            jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(variables, x)
        )

    ours = ops.Conv(**kwargs, platform=platform)
    assert ops.conv_plan((2, *hw, 4), (3, 3, 4, 8), (2, 2), ((1, 1),) * 2, 1, platform).all_xla
    assert jaxprs(ours) == jaxprs(nn.Conv(**kwargs))
    assert "custom_vjp" not in jaxprs(ours)[1]
    apply_both = jax.jit(lambda v, x: (ours.apply(v, x), nn.Conv(**kwargs).apply(v, x)))
    np.testing.assert_array_equal(*apply_both(variables, x))
    # lowering="xla" is the same thing on any platform.
    assert jaxprs(ops.Conv(**kwargs, lowering="xla")) == jaxprs(nn.Conv(**kwargs))


def test_cpu_plan_for_resnet18_layers():
    plan = ops.conv_plan
    p1, p3, p0 = ((1, 1),) * 2, ((3, 3),) * 2, ((0, 0),) * 2
    # 7x7/2 stem on RGB: space-to-depth forward; XLA for its gradients.
    assert plan((32, 64, 64, 3), (7, 7, 3, 32), (2, 2), p3, 1, "cpu") == ops.ConvPlan(
        "s2d", "xla", "xla"
    )
    # 3x3 stride 1 on 16x16 and 4x4: XLA.
    assert plan((32, 16, 16, 32), (3, 3, 32, 32), (1, 1), p1, 1, "cpu") == ops.XLA_PLAN
    assert plan((32, 4, 4, 128), (3, 3, 128, 128), (1, 1), p1, 1, "cpu") == ops.XLA_PLAN
    # 3x3 stride 2: XLA, but the input gradient onto a 2x2 output (XLA would swap operands).
    assert plan((32, 16, 16, 32), (3, 3, 32, 64), (2, 2), p1, 1, "cpu") == ops.XLA_PLAN
    assert plan((32, 4, 4, 128), (3, 3, 128, 256), (2, 2), p1, 1, "cpu") == ops.ConvPlan(
        "xla", "matmul", "xla"
    )
    # 3x3 on 2x2 (XLA would swap operands) and 1x1: all matmul.
    assert plan((32, 2, 2, 256), (3, 3, 256, 256), (1, 1), p1, 1, "cpu") == ops.MATMUL_PLAN
    assert plan((32, 8, 8, 64), (1, 1, 64, 128), (2, 2), p0, 1, "cpu") == ops.MATMUL_PLAN
    # Depthwise: multiply-adds; XLA's kernel gradient below 64 channels. Other groups: XLA.
    assert plan((32, 8, 8, 192), (3, 3, 1, 192), (1, 1), p1, 192, "cpu") == ops.DEPTHWISE_PLAN
    assert plan((32, 32, 32, 32), (3, 3, 1, 32), (1, 1), p1, 32, "cpu") == ops.ConvPlan(
        "depthwise", "depthwise", "xla"
    )
    assert plan((32, 8, 8, 64), (3, 3, 32, 64), (1, 1), p1, 2, "cpu") == ops.XLA_PLAN
    # Every non-CPU platform: XLA.
    for platform in ("gpu", "tpu", "cuda", "rocm"):
        assert plan((32, 2, 2, 256), (3, 3, 256, 256), (1, 1), p1, 1, platform) == ops.XLA_PLAN
        assert plan((32, 8, 8, 192), (3, 3, 1, 192), (1, 1), p1, 192, platform) == ops.XLA_PLAN


def test_auto_on_cpu_takes_the_planned_path():
    x = jnp.ones((2, 2, 2, 8))
    module = ops.Conv(8, (3, 3), padding=((1, 1), (1, 1)), platform="cpu")
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(module.apply)(variables, x))
    assert "custom_vjp" in jaxpr and "dot_general" in jaxpr and "conv_general" not in jaxpr


@pytest.mark.parametrize(
    "plan,forward,forward_and_backward",
    [
        (ops.ConvPlan("xla", "matmul", "xla"), "conv", {"conv", "dot"}),
        (ops.ConvPlan("matmul", "xla", "matmul"), "dot", {"conv", "dot"}),
        (ops.ConvPlan("xla", "xla", "xla"), "conv", {"conv"}),
        (ops.ConvPlan("matmul", "matmul", "matmul"), "dot", {"dot"}),
    ],
)
def test_each_pass_uses_its_lowering(plan, forward, forward_and_backward):
    x = jnp.ones((2, 8, 8, 4))
    module = ops.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), lowering=plan)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    primitives = {"conv": "conv_general_dilated", "dot": "dot_general"}

    def kinds(f, *args):
        jaxpr = str(jax.make_jaxpr(f)(*args))
        return {kind for kind, prim in primitives.items() if prim in jaxpr}

    assert kinds(module.apply, variables, x) == {forward}
    g = jnp.ones((2, 4, 4, 8))
    assert kinds(lambda v, x, g: jax.vjp(module.apply, v, x)[1](g), variables, x, g) == (
        forward_and_backward
    )


def test_conv_batch_dims_like_flax():
    kwargs = dict(features=4, kernel_size=(3, 3), padding="SAME")
    rng = np.random.default_rng(0)
    variables = {
        "params": {
            "kernel": rng.standard_normal((3, 3, 2, 4), np.float32),
            "bias": rng.standard_normal((4,), np.float32),
        }
    }
    ours, theirs = ops.Conv(**kwargs, platform="cpu"), nn.Conv(**kwargs)
    for shape in [(3, 3, 2), (2, 3, 3, 3, 2)]:  # no batch dim; two batch dims
        x = rng.standard_normal(shape, np.float32)
        both = jax.jit(lambda v, x: (ours.apply(v, x), theirs.apply(v, x)))(variables, x)
        _assert_close(*both, str(shape))


@pytest.mark.parametrize("groups,hw", [(1, (2, 2)), (8, (5, 5))])
def test_conv_bfloat16_compute_like_flax(groups, hw):
    kwargs = dict(features=8, kernel_size=(3, 3), feature_group_count=groups, dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *hw, 8), np.float32)
    variables = {
        "params": {
            "kernel": rng.standard_normal((3, 3, 8 // groups, 8), np.float32),
            "bias": rng.standard_normal((8,), np.float32),
        }
    }
    ours, theirs = ops.Conv(**kwargs, platform="cpu"), nn.Conv(**kwargs)
    y, y_ref = jax.jit(lambda v, x: (ours.apply(v, x), theirs.apply(v, x)))(variables, x)
    assert y.dtype == y_ref.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=2e-2, atol=5e-2)


def test_conv_rejects_unknown_or_inapplicable_lowering():
    x = jnp.ones((1, 4, 4, 2))
    with pytest.raises(ValueError, match="lowering"):
        jax.eval_shape(ops.Conv(4, (3, 3), lowering="fast").init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="lowering"):
        ops.ConvPlan("xla", "im2col", "xla")
    with pytest.raises(ValueError, match="depthwise"):
        depthwise = ops.Conv(2, (3, 3), feature_group_count=2, lowering=ops.MATMUL_PLAN)
        jax.eval_shape(depthwise.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="ungrouped"):
        ungrouped = ops.Conv(2, (3, 3), lowering=ops.DEPTHWISE_PLAN)
        jax.eval_shape(ungrouped.init, jax.random.key(0), x)


def _conv_kwargs_and_params(k, s, pad, cin, cout, groups):
    kwargs = dict(
        features=cout, kernel_size=(k, k), strides=s, padding=pad, feature_group_count=groups
    )
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.standard_normal((k, k, cin // groups, cout), np.float32),
        "bias": rng.standard_normal((cout,), np.float32),
    }
    return kwargs, params


# (kernel, stride, padding, (H, W), cin, cout, groups): kernel larger than the padded input.
EMPTY_OUTPUT_CASES = [
    (3, 2, "VALID", (2, 3), 1, 4, 1),  # output 0x1
    (3, 1, "VALID", (1, 1), 2, 4, 1),  # output 0x0
    (3, 2, "VALID", (2, 3), 4, 4, 4),  # depthwise
    (3, 1, "VALID", (1, 1), 4, 8, 4),  # depthwise, channel multiplier 2
]


@pytest.mark.parametrize("k,s,pad,hw,cin,cout,groups", EMPTY_OUTPUT_CASES)
def test_empty_output_like_flax(k, s, pad, hw, cin, cout, groups):
    # nn.Conv returns a zero-size output (and zero gradients); the CPU lowerings' slices would
    # have negative sizes, so such layers stay XLA.
    kwargs, params = _conv_kwargs_and_params(k, s, pad, cin, cout, groups)
    pads = ((0, 0), (0, 0))
    plan = ops.conv_plan((2, *hw, cin), (k, k, cin // groups, cout), (s, s), pads, groups, "cpu")
    assert plan == ops.XLA_PLAN
    x = np.random.default_rng(1).standard_normal((2, *hw, cin), np.float32)
    # A plan forced by hand falls back to XLA too (its slices would fail the same way).
    forced = ops.DEPTHWISE_PLAN if groups > 1 else ops.MATMUL_PLAN
    modules = {
        "flax": nn.Conv(**kwargs),
        "auto": ops.Conv(**kwargs, platform="cpu"),
        "forced": ops.Conv(**kwargs, platform="cpu", lowering=forced),
    }
    results = _outputs_and_grads(modules, params, x)
    y_ref, g_params_ref, g_x_ref = results["flax"]
    assert y_ref.size == 0
    for name in ("auto", "forced"):
        y, g_params, g_x = results[name]
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(g_x, g_x_ref)
        jax.tree.map(np.testing.assert_array_equal, g_params, g_params_ref)


@pytest.mark.parametrize(
    "k,pad,hw",
    [
        (3, "VALID", (8, 8)),  # reads rows / columns 0..6; space-to-depth has 8 with a zero tap
        (5, ((2, 0), (2, 0)), (10, 10)),  # low padding; reads 0..8
        (2, "VALID", (7, 7)),  # kernel a multiple of the stride: no zero taps; reads 0..5
    ],
)
def test_space_to_depth_ignores_unread_inputs(k, pad, hw):
    # Space-to-depth pads the kernel with zero taps; an input the strided convolution never reads
    # must not meet them (0 * inf = NaN): the output stays finite, as nn.Conv's does.
    kwargs, params = _conv_kwargs_and_params(k, 2, pad, 3, 4, 1)
    y_shape = jax.eval_shape(
        lambda x: nn.Conv(**kwargs).apply({"params": params}, x), jnp.ones((2, *hw, 3))
    ).shape
    x = np.random.default_rng(1).standard_normal((2, *hw, 3)).astype(np.float32)
    lo = 0 if pad == "VALID" else pad[0][0]
    read = (y_shape[1] - 1) * 2 + k - lo  # input rows (and columns) the convolution reads
    assert read < min(hw)
    x[:, read:, :, :] = np.inf
    x[:, :, read:, :] = np.inf
    plan = ops.conv_plan(x.shape, (k, k, 3, 4), (2, 2), ((lo, 0), (lo, 0)), 1, "cpu")
    assert plan.forward == "s2d"
    modules = {
        "flax": nn.Conv(**kwargs),
        "auto": ops.Conv(**kwargs, platform="cpu"),
        "s2d": ops.Conv(**kwargs, lowering=ops.ConvPlan("s2d", "s2d", "s2d")),
    }
    results = _outputs_and_grads(modules, params, x)
    y_ref, g_params_ref, _ = results.pop("flax")
    assert np.isfinite(y_ref).all()
    for name, (y, g_params, _) in results.items():
        assert np.isfinite(y).all(), name
        _assert_close(y, y_ref, f"{name}: output")
        _assert_close(g_params["kernel"], g_params_ref["kernel"], f"{name}: d/dkernel")


@pytest.mark.parametrize("kernel,stride,cin", [((2, 2), 3, 1), ((1, 3), 2, 3)])
def test_kernel_smaller_than_its_stride_stays_finite_like_flax(kernel, stride, cin):
    # Rows / columns between the windows are never read; space-to-depth would multiply them by
    # zero taps, so such convolutions keep XLA's forward pass.
    kwargs = dict(features=4, kernel_size=kernel, strides=stride, padding="VALID")
    x = np.random.default_rng(1).standard_normal((2, 8, 8, cin)).astype(np.float32)
    x[:, kernel[0], :, :] = np.inf  # the first row after the first window: never read
    plan = ops.conv_plan(x.shape, (*kernel, cin, 4), (stride, stride), ((0, 0), (0, 0)), 1, "cpu")
    assert plan.forward == "xla"
    variables = nn.Conv(**kwargs).init(jax.random.key(0), x)
    y_ref = nn.Conv(**kwargs).apply(variables, x)
    y = ops.Conv(**kwargs, platform="cpu").apply(variables, x)
    assert np.isfinite(y_ref).all()
    np.testing.assert_array_equal(y, y_ref)


@pytest.mark.parametrize(
    "cin,features,groups",
    [(4, 6, 4), (4, 2, 4), (8, 6, 4)],  # depthwise x2, grouped
)
def test_features_not_a_multiple_of_groups(cin, features, groups):
    module = ops.Conv(features, (3, 3), feature_group_count=groups, platform="cpu")
    message = (
        f"features {features} .*feature_group_count {groups}.*"
        "features must be a multiple of feature_group_count"
    )
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 5, 5, cin)))


def test_forward_mode_autodiff_needs_xla_lowering():
    # Documented limitation: the CPU lowerings are custom VJPs, which JAX cannot differentiate in
    # forward mode. The documented workaround, lowering="xla", is nn.Conv's jvp.
    kwargs = dict(features=4, kernel_size=(7, 7), strides=2, padding=3)  # stem: s2d on CPU
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    t = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    variables = nn.Conv(**kwargs).init(jax.random.key(0), x)

    def jvp(module):
        return jax.jvp(lambda x: module.apply(variables, x), (x,), (t,))

    (y, dy), (y_ref, dy_ref) = jvp(ops.Conv(**kwargs, lowering="xla")), jvp(nn.Conv(**kwargs))
    _assert_close(y, y_ref, "output")
    _assert_close(dy, dy_ref, "tangent")
    with pytest.raises(TypeError, match="forward-mode"):
        jvp(ops.Conv(**kwargs, platform="cpu"))
    stem_pool = dict(window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: ops.max_pool(x, **stem_pool, platform="cpu"), (x,), (t,))
    jax.jvp(lambda x: nn.max_pool(x, **stem_pool), (x,), (t,))


# ------------------------------------------------------------------------------------------
# max_pool
# ------------------------------------------------------------------------------------------

POOL_CASES = [
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (8, 8)),  # ResNet stem pool
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (7, 9)),
    ((3, 3), (2, 2), "SAME", (8, 8)),
    ((3, 3), (1, 1), "SAME", (5, 5)),
    ((2, 2), (2, 2), "VALID", (6, 7)),
    ((3, 3), (2, 2), "VALID", (9, 9)),
]


def _pool_and_grads(x, g, **kw):
    """(ours with the slice path forced, flax's): outputs and input gradients of sum(pool * g)."""

    def both(x, g):
        ours = lambda x: ops.max_pool(x, **kw, force_slices=True)  # noqa: E731
        results = []
        for pool in (ours, lambda x: nn.max_pool(x, **kw)):
            y, vjp = jax.vjp(pool, x)
            results.append((y, vjp(g)[0]))
        return results

    return jax.jit(both)(x, g)


@pytest.mark.parametrize("window,strides,padding,hw", POOL_CASES)
def test_max_pool_matches_flax_without_ties(window, strides, padding, hw):
    # A permutation: no two inputs are equal, so the gradient is unambiguous; half are negative,
    # so padding must be -inf, not 0.
    rng = np.random.default_rng(0)
    n = 2 * hw[0] * hw[1] * 3
    x = (rng.permutation(n) - n // 2).astype(np.float32).reshape(2, *hw, 3)
    kw = dict(window_shape=window, strides=strides, padding=padding)
    y_shape = jax.eval_shape(lambda x: nn.max_pool(x, **kw), x).shape
    g = rng.standard_normal(y_shape, np.float32)
    (y, grad), (y_ref, grad_ref) = _pool_and_grads(x, g, **kw)
    assert y_ref.size > 0
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "window,strides,padding,hw",
    [((3, 3), (2, 2), "VALID", (2, 5)), ((3, 3), (1, 1), ((0, 0), (1, 1)), (1, 1))],
)
def test_max_pool_empty_output_like_flax(window, strides, padding, hw):
    # A window larger than the padded input: flax returns a zero-size output; the slice path
    # (forced here) would take negative-size slices, so it falls back to flax's pool.
    x = np.random.default_rng(0).standard_normal((2, *hw, 3), np.float32)
    kw = dict(window_shape=window, strides=strides, padding=padding)
    y_shape = jax.eval_shape(lambda x: nn.max_pool(x, **kw), x).shape
    g = np.zeros(y_shape, np.float32)
    (y, grad), (y_ref, grad_ref) = _pool_and_grads(x, g, **kw)
    assert y_ref.size == 0
    assert y.shape == y_ref.shape
    np.testing.assert_array_equal(grad, grad_ref)


def _first_max_grad_reference(x, g, window, strides, pads):
    """Numpy: each window's cotangent to its first maximum in row-major order."""
    x, g = np.asarray(x), np.asarray(g)
    (kh, kw), (sh, sw) = window, strides
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=-np.inf)
    dxp = np.zeros_like(xp)
    n, ho, wo, c = g.shape
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for ch in range(c):
                    win = xp[b, i * sh : i * sh + kh, j * sw : j * sw + kw, ch]
                    a, bb = np.unravel_index(np.argmax(win), win.shape)  # first max
                    dxp[b, i * sh + a, j * sw + bb, ch] += g[b, i, j, ch]
    (lo_h, _), (lo_w, _) = pads
    return dxp[:, lo_h : lo_h + x.shape[1], lo_w : lo_w + x.shape[2]]


@pytest.mark.parametrize("hw", [(8, 8), (5, 7)])
def test_max_pool_ties_go_to_first_max(hw):
    window, strides, pads = (3, 3), (2, 2), ((1, 1), (1, 1))
    # Values in {-1, 0, 1}: many windows hold several equal maxima; plus an all-equal channel.
    rng = np.random.default_rng(0)
    x = rng.integers(-1, 2, (2, *hw, 3)).astype(np.float32)
    x[..., 2] = -1.0
    y_shape = jax.eval_shape(lambda x: nn.max_pool(x, window, strides, pads), x).shape
    g = rng.standard_normal(y_shape, np.float32)
    kw = dict(window_shape=window, strides=strides, padding=pads)
    (_, grad), (_, flax_grad) = _pool_and_grads(x, g, **kw)
    expected = _first_max_grad_reference(x, g, window, strides, pads)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)
    # ... which is also what flax's (XLA select_and_scatter) gradient does.
    np.testing.assert_allclose(grad, flax_grad, rtol=1e-6, atol=1e-6)


def test_max_pool_dispatch():
    x = jnp.ones((2, 8, 8, 3))
    stem = dict(window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    def prims(f):
        return str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(f(x))))(x))

    flax_jaxpr = prims(lambda x: nn.max_pool(x, **stem))
    assert "select_and_scatter_add" in flax_jaxpr
    cpu_jaxpr = prims(lambda x: ops.max_pool(x, **stem, platform="cpu"))
    assert "select_and_scatter_add" not in cpu_jaxpr and "reduce_window" not in cpu_jaxpr
    for platform in ("gpu", "tpu"):
        assert prims(lambda x, p=platform: ops.max_pool(x, **stem, platform=p)) == flax_jaxpr
    # Other configurations: flax's, on CPU too.
    other = dict(window_shape=(2, 2), strides=(2, 2), padding="VALID")
    assert prims(lambda x: ops.max_pool(x, **other, platform="cpu")) == prims(
        lambda x: nn.max_pool(x, **other)
    )


def test_cpu_ops():
    assert ops.cpu_ops("cpu") == (ops.Conv, ops.max_pool)
    assert ops.cpu_ops("gpu") == (nn.Conv, nn.max_pool)
    assert ops.cpu_ops("tpu") == (nn.Conv, nn.max_pool)


# ------------------------------------------------------------------------------------------
# XLA flag
# ------------------------------------------------------------------------------------------


def test_configure_cpu_flags_environment(monkeypatch):
    low, high = ops._YNN_FLAG_JAXLIB
    monkeypatch.setattr(ops.jaxlib, "__version__", ".".join(map(str, low)))  # one it was checked on
    env = {}
    assert ops.configure_cpu_flags(environ=env) == ops.YNN_CONV_FLAG
    assert env["XLA_FLAGS"] == ops.YNN_CONV_FLAG
    assert ops.configure_cpu_flags(environ=env) is None  # idempotent
    assert env["XLA_FLAGS"] == ops.YNN_CONV_FLAG

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    ops.configure_cpu_flags(environ=env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {ops.YNN_CONV_FLAG}"

    user = "--xla_cpu_experimental_ynn_fusion_type=default"
    env = {"XLA_FLAGS": user}
    assert ops.configure_cpu_flags(environ=env) is None  # the user's setting wins
    assert env["XLA_FLAGS"] == user

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert ops.configure_cpu_flags(ynn_convolutions=True, environ=env) is None  # opt out
    assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

    # A jaxlib the flag was not checked on: XLA would abort on an unknown flag, so none is set.
    for version in (".".join(map(str, high)), "0.10.1", "0.13.0.dev20270101"):
        monkeypatch.setattr(ops.jaxlib, "__version__", version)
        env = {}
        assert ops.configure_cpu_flags(environ=env) is None and env == {}


def test_command_line_tools_set_the_flag_before_jax_starts(tmp_path):
    """`launch` configures XLA first thing: its subprocess sees the flag in XLA_FLAGS."""
    code = textwrap.dedent(
        """
        import os, sys
        from weckd_jax import launch
        ops = launch.ops
        configure = ops.configure_cpu_flags
        ops.configure_cpu_flags = lambda: print(
            "configured", configure(), "backend started:", ops._backends_initialized()
        )
        sys.argv = ["launch", "--config", sys.argv[1], "--config.chain.length=0"]
        from absl import app
        app.run(launch.main, flags_parser=launch.cli.parse_flags)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    config = os.path.join(root, "configs", "smoke.py")
    proc = subprocess.run(
        [sys.executable, "-c", code, config], env=env, capture_output=True, text=True, timeout=120
    )
    flag = ops.YNN_CONV_FLAG if ops._ynn_flag_known() else None  # None on an unchecked jaxlib
    assert f"configured {flag} backend started: False" in proc.stdout
    assert "chain.length=0 must be >= 1" in proc.stderr


def test_xla_flag_is_accepted_by_this_jaxlib():
    """XLA aborts on unknown XLA_FLAGS: on a jaxlib of `ops._YNN_FLAG_JAXLIB` the experimental
    flag must exist, and the lowerings compute right under it."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp
        from weckd_jax import ops
        x = jnp.ones((2, 8, 8, 3)); w = jnp.ones((3, 3, 3, 4))
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        assert float(y[0, 4, 4, 0]) == 27.0, y[0, 4, 4, 0]
        conv = ops.Conv(4, (3, 3), strides=2)  # 4x4 -> 2x2: input gradient by im2col
        v = {"params": {"kernel": jnp.ones((3, 3, 3, 4)), "bias": jnp.zeros(4)}}
        g = jax.jit(jax.grad(lambda x: conv.apply(v, x).sum()))(jnp.ones((2, 4, 4, 3)))
        assert float(g[0, 1, 1, 0]) == 4.0, g[0, 1, 1, 0]
        print("ok", jax.default_backend())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = ops.YNN_CONV_FLAG if ops._ynn_flag_known() else ""  # as the tools set it
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok cpu" in proc.stdout
