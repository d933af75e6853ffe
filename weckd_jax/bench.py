"""Throughput of the train steps, evaluation and input pipeline for a config's network.

    python -m weckd_jax.bench --config CFG [--config.key=value ...] [--json PATH [--overwrite]]
        [--repeats N]

For the config's first backbone it times, on every local device: the supervised step (link 1 and
the baselines), the KD step (a frozen teacher of the same architecture), the KD + attention
transfer step, the same with the teacher's outputs cached (``distill.teacher_cache``, used when
augmentation is off), the eval step, and the grain pipeline with the batch placement. Each
figure is the median of ``--repeats`` timed windows of ``--steps`` steps, after a warm-up;
compile seconds are measured separately, and achieved GFLOP/s come from XLA's cost analysis of
the compiled step. ``--json`` refuses a file that exists (checked before the timing) unless
``--overwrite`` is given; one that appears while timing is kept, and the results go to
``<stem>-1.json`` instead.
Example, the ResNet-18 used to compare frameworks:

    python -m weckd_jax.bench --config configs/default.py --config.model.backbone=resnet18 \\
        --config.model.width=32 --config.model.stem=imagenet --config.data.image_size=64 \\
        --config.train.batch_size=32
"""

from __future__ import annotations

from weckd_jax import startup  # noqa: F401 - first: a Ctrl-C while JAX loads ends in one line

# isort: split
import dataclasses
import resource
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from weckd_jax import chain, cli, files, ops, parallel, train
from weckd_jax import config as config_lib
from weckd_jax.data import pipeline
from weckd_jax.data.synthetic import generate

_CONFIG = cli.define_config_file(config_lib.__file__)
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False, "Replace the --json file if it exists (refused otherwise)."
)
_REPEATS = flags.DEFINE_integer(
    "repeats", 5, "Timed windows per figure (the median is kept).", lower_bound=1
)
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed window.", lower_bound=1)


def _median_rate(run_window, images_per_window: int, repeats: int) -> float:
    """Median images/s over ``repeats`` calls of ``run_window`` (each blocks until done)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_window()
        rates.append(images_per_window / (time.perf_counter() - start))
    return statistics.median(rates)


def _train_rate(step, state, teacher_vars, batch, key, steps: int, repeats: int) -> float:
    """Median images/s of ``step`` after a warm-up of 3 steps."""
    holder = {"state": state}

    def window(n=steps):
        for _ in range(n):
            holder["state"], _ = step(holder["state"], teacher_vars, batch, key)
        jax.block_until_ready(holder["state"])

    window(3)  # the jit cache, allocations, caches
    return _median_rate(window, steps * batch["image"].shape[0], repeats)


def step_flops(compiled, mesh: jax.sharding.Mesh) -> float | None:
    """FLOPs of one global step of a compiled data-parallel program, or None when XLA gives no
    estimate. XLA's cost analysis counts one device's share of the partitioned program."""
    flops = (compiled.cost_analysis() or {}).get("flops")
    return flops * mesh.devices.size if flops else None


def bench_steps(config, *, repeats: int, steps: int) -> dict:
    """Images/s, compile seconds and GFLOP/s of the supervised, KD, KD + AT and cached-teacher
    KD + AT train steps and of the eval step."""
    mesh = parallel.data_mesh()
    size, batch = config.data.image_size, config.train.batch_size
    channels = config.data.channels or 3
    spec = train.ModelSpec(
        backbone=config_lib.backbones(config)[0],
        num_classes=5,
        width=config.model.width,
        stem=config.model.stem,
        dtype=config.model.dtype,
    )
    image_shape = (size, size, channels)
    rng = np.random.default_rng(0)
    host_batch = {
        "image": rng.integers(0, 256, (batch, *image_shape), dtype=np.uint8),
        "label": rng.integers(0, 5, batch).astype(np.int32),
        "label_mask": np.ones(batch, np.float32),
    }
    device_batch = parallel.global_batch(host_batch, mesh)
    hparams = chain.hparams(config, 1, steps_per_epoch=100)
    teacher = parallel.replicate(
        train.init_state(
            spec, train.StepConfig(), jax.random.key(1), image_shape, hparams
        ).variables,
        mesh,
    )
    out: dict = {"train_step": {}, "compile_seconds": {}, "gflops_per_s": {}}
    # KD without and with attention transfer; then KD + AT reading the teacher's outputs from
    # the batch (what `distill.teacher_cache` does when augmentation is off).
    kd_cfg = dataclasses.replace(chain.step_config(config), use_attention=False)
    at_cfg = dataclasses.replace(kd_cfg, use_attention=True)
    cached_cfg = dataclasses.replace(at_cfg, augment=False, cached_teacher=True)
    outputs = train.make_teacher_step((spec,), cached_cfg, mesh)((teacher,), device_batch["image"])
    cached_batch = parallel.global_batch({**host_batch, **jax.device_get(outputs)}, mesh)
    variants = {
        "supervised": ((), (), kd_cfg, device_batch),
        "kd": ((spec,), (teacher,), kd_cfg, device_batch),
        "kd_at": ((spec,), (teacher,), at_cfg, device_batch),
        "kd_at_cached": ((spec,), (), cached_cfg, cached_batch),
    }
    for name, (teacher_specs, teacher_vars, step_cfg, step_batch) in variants.items():
        state = parallel.replicate(
            train.init_state(spec, step_cfg, jax.random.key(0), image_shape, hparams), mesh
        )
        step = train.make_train_step(spec, teacher_specs, step_cfg, mesh)
        key = jax.random.key(2)
        start = time.perf_counter()
        compiled = step.lower(state, teacher_vars, step_batch, key).compile()
        out["compile_seconds"][name] = time.perf_counter() - start
        flops = step_flops(compiled, mesh)
        rate = _train_rate(compiled, state, teacher_vars, step_batch, key, steps, repeats)
        out["train_step"][name] = {"images_per_s": rate, "step_ms": 1000 * batch / rate}
        if flops:
            out["gflops_per_s"][name] = flops * rate / batch / 1e9

    eval_step = train.make_eval_step(spec, mesh)
    eval_batch = parallel.global_batch(
        {"image": np.resize(host_batch["image"], (config.train.eval_batch_size, *image_shape))},
        mesh,
    )["image"]
    start = time.perf_counter()
    jax.block_until_ready(eval_step(teacher, eval_batch))
    out["compile_seconds"]["eval"] = time.perf_counter() - start

    def eval_window():
        for _ in range(steps):
            probs = eval_step(teacher, eval_batch)
        jax.block_until_ready(probs)

    out["eval"] = {
        "images_per_s": _median_rate(eval_window, steps * config.train.eval_batch_size, repeats)
    }
    return out


def bench_pipeline(config, *, repeats: int, steps: int) -> dict:
    """Images/s the grain pipeline delivers as global device batches for one chain fraction."""
    mesh = parallel.data_mesh()
    data = generate("otoscopy", num_images=512, image_size=config.data.image_size, seed=0)
    batch = config.train.batch_size
    total = (repeats + 1) * steps
    dataset = pipeline.train_pipeline(
        data,
        np.arange(len(data)),
        np.ones(len(data), bool),
        batch_size=batch,
        total_steps=total,
        seed=0,
    )
    batches = iter(dataset.to_iter_dataset())

    def window():
        for _ in range(steps):
            jax.block_until_ready(parallel.global_batch(next(batches), mesh))

    window()
    return {"images_per_s": _median_rate(window, steps * batch, repeats)}


def run(config, *, repeats: int, steps: int) -> dict:
    result = bench_steps(config, repeats=repeats, steps=steps)
    result["pipeline"] = bench_pipeline(config, repeats=repeats, steps=steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device = jax.devices()[0]
    result["device"] = f"{jax.device_count()} x {device.platform}:{device.device_kind}"
    supervised = result["train_step"]["supervised"]["step_ms"]
    result["ratios"] = {
        "kd_over_supervised": result["train_step"]["kd"]["step_ms"] / supervised,
        "kd_at_over_supervised": result["train_step"]["kd_at"]["step_ms"] / supervised,
        "kd_at_cached_over_supervised": result["train_step"]["kd_at_cached"]["step_ms"]
        / supervised,
        "pipeline_over_kd_at": result["pipeline"]["images_per_s"]
        / result["train_step"]["kd_at"]["images_per_s"],
    }
    return result


def print_table(result: dict) -> None:
    print(f"device: {result['device']}")
    print(f"{'':<22}{'images/s':>10}{'ms/step':>10}{'GFLOP/s':>10}{'compile s':>11}")
    for name, row in result["train_step"].items():
        print(
            f"{'train ' + name:<22}{row['images_per_s']:>10.0f}{row['step_ms']:>10.1f}"
            f"{result['gflops_per_s'].get(name, float('nan')):>10.1f}"
            f"{result['compile_seconds'][name]:>11.1f}"
        )
    print(
        f"{'eval':<22}{result['eval']['images_per_s']:>10.0f}{'':>20}"
        f"{result['compile_seconds']['eval']:>11.1f}"
    )
    print(f"{'input pipeline':<22}{result['pipeline']['images_per_s']:>10.0f}")
    r = result["ratios"]
    print(
        f"KD / supervised step time {r['kd_over_supervised']:.2f}, KD+AT / supervised "
        f"{r['kd_at_over_supervised']:.2f} (cached teacher {r['kd_at_cached_over_supervised']:.2f})"
        f", pipeline / KD+AT throughput "
        f"{r['pipeline_over_kd_at']:.1f}; peak RSS {result['peak_rss_mb']:.0f} MB"
    )


def main(argv: list[str]) -> None:
    ops.configure_cpu_flags()  # before JAX starts a backend
    cli.keep_interrupts()
    if len(argv) > 1:
        cli.fail(cli.unexpected_arguments(argv[1:]))
    logging.set_verbosity(logging.WARNING)
    if _JSON.value and (  # before minutes of timing
        problem := files.output_problem(_JSON.value, "--json", overwrite=_OVERWRITE.value)
    ):
        cli.fail(problem)
    config = _CONFIG.value
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        cli.fail(str(e))
    try:
        result = run(config, repeats=_REPEATS.value, steps=_STEPS.value)
    except KeyboardInterrupt:
        cli.interrupted("nothing was written")
    print_table(result)
    if _JSON.value:
        try:
            files.write_output(_JSON.value, files.json_text(result), "--json", _OVERWRITE.value)
        except files.OutputError as e:
            cli.fail(f"{e} (the table above holds the results)")


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cli.parse_flags))
