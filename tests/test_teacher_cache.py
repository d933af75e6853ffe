"""Teacher-output caching: computed once per example, it trains exactly as the teacher run in
every step does, and it is used only where that is exact (no random augmentation) and its size
fits distill.teacher_cache_max_gb."""

import dataclasses
import io
import json
import os

import jax
import numpy as np
import pytest

from tests.conftest import smoke_config
from weckd_jax import chain, parallel, train
from weckd_jax import config as config_lib
from weckd_jax.data import pipeline
from weckd_jax.data.synthetic import generate
from weckd_jax.progress import Progress

SPEC = train.ModelSpec(backbone="resnet10", num_classes=3, width=8, stem="small")
SHAPE = (32, 32, 3)


def _setup(step_cfg, num_teachers):
    mesh = parallel.data_mesh()
    hp = {
        "learning_rate": 1e-2,
        "weight_decay": 1e-4,
        "warmup_steps": 0,
        "total_steps": 10,
        "alpha": 0.5,
        "beta": 1.0,
        "t_max": 4.0,
        "t_min": 1.0,
    }
    if num_teachers > 1:
        hp["teacher_weights"] = np.full(num_teachers, 1.0 / num_teachers)
    state = train.init_state(SPEC, step_cfg, jax.random.key(0), SHAPE, hp)
    teacher_vars = tuple(
        train.init_state(SPEC, step_cfg, jax.random.key(10 + j), SHAPE, hp).variables
        for j in range(num_teachers)
    )
    data = generate("otoscopy", num_images=48, image_size=32, seed=0)
    labels = np.random.default_rng(0).integers(0, 3, 48).astype(np.int32)
    return mesh, state, parallel.replicate(teacher_vars, mesh), data, labels


@pytest.mark.parametrize("num_teachers, attention", [(2, True), (1, False)])
def test_cached_step_matches_teacher_in_the_step(num_teachers, attention):
    step_cfg = train.StepConfig(augment=False, use_attention=attention)
    mesh, state, teacher_vars, data, labels = _setup(step_cfg, num_teachers)
    images = data.images
    teachers = (SPEC,) * num_teachers
    cache = chain.teacher_cache(
        teachers, teacher_vars, step_cfg, data, np.arange(48), batch_size=20, mesh=mesh
    )
    assert cache["teacher_logits"][0].shape == (48, 3)
    expected_features = 4 if attention else 0
    assert len(cache["teacher_features"][num_teachers - 1]) == expected_features
    if attention:
        assert cache["teacher_features"][0][0].shape == (48, 32, 32, 1)
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
    assert size == 48 * train.teacher_output_bytes(teachers, step_cfg, SHAPE)

    live = train.make_train_step(SPEC, teachers, step_cfg, mesh)
    cached_cfg = dataclasses.replace(step_cfg, cached_teacher=True)
    cached = train.make_train_step(SPEC, teachers, cached_cfg, mesh)
    host_state = jax.device_get(state)  # each step donates its own copy
    states = {k: parallel.replicate(host_state, mesh) for k in ("live", "cached")}
    for step in range(3):
        rows = np.arange(16 * step, 16 * step + 16)
        batch = {
            "image": images[rows],
            "label": labels[rows],
            "label_mask": np.ones(16, np.float32),
        }
        extras = jax.tree.map(lambda a, r=rows: a[r], cache)
        key = jax.random.key(step)
        states["live"], m_live = live(
            states["live"], teacher_vars, parallel.global_batch(batch, mesh), key
        )
        states["cached"], m_cached = cached(
            states["cached"], (), parallel.global_batch({**batch, **extras}, mesh), key
        )
        for name in ("loss", "kd", "at", "ce"):
            np.testing.assert_allclose(m_cached[name], m_live[name], rtol=2e-5, atol=1e-6)
        assert float(m_live["kd"]) > 0 and (float(m_live["at"]) > 0) == attention
    for a, b in zip(
        jax.tree.leaves(states["cached"].params),
        jax.tree.leaves(states["live"].params),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cached_step_refuses_random_augmentation():
    with pytest.raises(ValueError, match="exact only without random augmentation"):
        train.make_train_step(
            SPEC, (SPEC,), train.StepConfig(augment=True, cached_teacher=True), parallel.data_mesh()
        )


def test_pipeline_batches_extras_with_their_examples():
    data = generate("otoscopy", num_images=40, image_size=32, seed=0)
    index = np.arange(3, 35)
    extras = {"teacher_logits": (index.astype(np.float32)[:, None] * [1.0, -1.0],)}
    ds = pipeline.train_pipeline(
        data, index, np.ones(32, bool), batch_size=8, total_steps=6, seed=1, extras=extras
    )
    for batch in ds:
        rows = batch["teacher_logits"][0][:, 0].astype(int)
        np.testing.assert_array_equal(batch["image"], data.images[rows])
        np.testing.assert_array_equal(batch["teacher_logits"][0][:, 1], -rows)
    with pytest.raises(ValueError, match="one row per index entry"):
        pipeline.train_pipeline(
            data,
            index,
            np.ones(32, bool),
            batch_size=8,
            total_steps=1,
            seed=1,
            extras={"x": np.zeros(5)},
        )


@pytest.mark.parametrize(
    "mode, augment, expected", [("auto", False, True), ("auto", True, False), ("off", False, False)]
)
def test_caches_teacher_follows_the_config(mode, augment, expected):
    config = smoke_config()
    config.distill.teacher_cache = mode
    config.train.augment = augment
    assert chain.caches_teacher(config) is expected


def test_chain_with_cache_equals_chain_without(tmp_path, monkeypatch):
    calls = []
    original = chain.teacher_cache

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(chain, "teacher_cache", counting)
    results, printed = {}, {}
    # "over": caching as "auto" would, but over distill.teacher_cache_max_gb (~1 KB here).
    for mode in ("on", "off", "over"):
        config = smoke_config()
        config.train.augment = False
        config.distill.teacher_cache = "auto" if mode == "over" else mode
        if mode == "over":
            config.distill.teacher_cache_max_gb = 1e-6
        config.baselines.union_supervised = False
        config.baselines.full_supervised = False
        out = io.StringIO()
        results[mode] = chain.run(config, str(tmp_path / mode), Progress(stream=out))
        printed[mode] = out.getvalue()
    assert len(calls) == 1  # link 2 of the "on" run; link 1 has no teacher
    # Over the limit, "auto" says so and runs the teacher in the step: the "off" run, bit for bit.
    note = [line for line in printed["over"].splitlines() if "teacher cache" in line]
    assert len(note) == 1 and note[0].startswith("note: link_2's teacher cache would take ")
    assert "more than distill.teacher_cache_max_gb=1e-06" in note[0]
    assert "raise distill.teacher_cache_max_gb to cache it" in note[0]
    assert "teacher cache" not in printed["on"] + printed["off"]
    for over, off in zip(results["over"]["links"], results["off"]["links"], strict=True):
        assert over["fingerprint"] == off["fingerprint"]
    on, off = results["on"]["links"], results["off"]["links"]
    assert on[0]["fingerprint"] == off[0]["fingerprint"]  # link 1 is untouched
    for key in ("accuracy", "nll"):
        np.testing.assert_allclose(on[1]["test"][key], off[1]["test"][key], rtol=1e-3, atol=1e-3)
    assert on[1]["val"]["accuracy"] == pytest.approx(off[1]["val"]["accuracy"], abs=1e-6)
    # Epoch by epoch, the distillation terms agree: each example met its own teacher outputs.
    epochs = {mode: _link_epochs(tmp_path / mode, "link_2") for mode in ("on", "off")}
    assert len(epochs["on"]) == len(epochs["off"]) == 2
    for e_on, e_off in zip(epochs["on"], epochs["off"], strict=True):
        for key in ("loss", "kd", "at"):
            np.testing.assert_allclose(e_on[key], e_off[key], rtol=1e-4)
        assert e_on["kd"] > 0 and e_on["at"] > 0


def _link_epochs(workdir, name: str) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["run"] == name]


def test_teacher_output_bytes_match_a_hand_count():
    # Per teacher, float32: K logits plus one value per pixel of each of the 4 stage maps.
    small = (3 + 32 * 32 + 16 * 16 + 8 * 8 + 4 * 4) * 4  # small stem: stages at 32, 16, 8, 4 px
    with_at = train.StepConfig(augment=False, use_attention=True)
    assert train.teacher_output_bytes((SPEC,), with_at, SHAPE) == small == 5452
    assert train.teacher_output_bytes((SPEC, SPEC), with_at, SHAPE) == 2 * small
    assert train.teacher_output_bytes((SPEC,), train.StepConfig(), SHAPE) == 3 * 4  # logits only
    # ResNet-18 at 224 px (ImageNet stem: stages at 56, 28, 14, 7 px): 4165 map values.
    resnet18 = train.ModelSpec(backbone="resnet18", num_classes=5, width=32, stem="imagenet")
    expected = (5 + 56 * 56 + 28 * 28 + 14 * 14 + 7 * 7) * 4
    assert train.teacher_output_bytes((resnet18,), with_at, (224, 224, 3)) == expected == 16680


def _jobs(config):
    """The run's jobs, its image shape, and the bytes of link 2's teacher cache per image."""
    data, splits = chain.load_checked(config)
    per_image = (data.num_classes + 32 * 32 + 16 * 16 + 8 * 8 + 4 * 4) * 4  # as hand-counted above
    return chain.plan_jobs(config, splits, data.num_classes), data.images.shape[1:], per_image


def _over_limit_config(mode: str):
    config = smoke_config()
    config.train.augment = False
    config.distill.teacher_cache = mode
    config.distill.teacher_cache_max_gb = 1e-6  # 1 KB: below any link's cache
    return config


def test_the_cache_plan_follows_the_size_limit():
    config = _over_limit_config("auto")
    jobs, shape, per_image = _jobs(config)
    images = len(jobs[1].train_index)
    assert chain.plan_teacher_caches(config, jobs, shape) == (
        frozenset(),
        [
            f"note: link_2's teacher cache would take {images * per_image / 1000:.3g} KB of host "
            f"memory ({images} images x {per_image / 1000:.3g} KB), more than "
            "distill.teacher_cache_max_gb=1e-06: "
            "its teacher runs inside every step instead (the same training, slower); raise "
            "distill.teacher_cache_max_gb to cache it"
        ],
    )
    config.distill.teacher_cache_max_gb = images * per_image / 1e9  # exactly the cache's size
    assert chain.plan_teacher_caches(config, jobs, shape) == (frozenset({"link_2"}), [])
    config.train.augment = True  # "auto" does not cache at all: no size, no note
    assert chain.plan_teacher_caches(config, jobs, shape) == (frozenset(), [])


def test_forced_caching_over_the_limit_is_refused_before_anything_is_written(tmp_path):
    config = _over_limit_config("on")
    jobs, shape, per_image = _jobs(config)
    images = len(jobs[1].train_index)
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError) as error:
        chain.run(config, str(workdir), Progress(enabled=False))
    message = str(error.value)
    assert message == (
        f"link_2's teacher cache would take {images * per_image / 1000:.3g} KB of host memory "
        f"({images} images x {per_image / 1000:.3g} KB), more than "
        "distill.teacher_cache_max_gb=1e-06. Raise "
        "distill.teacher_cache_max_gb to 0.1 or more if this host has the memory (each process "
        "holds its own cache), or start the run with distill.teacher_cache=auto, which then "
        "runs the teacher inside every step (the same training, slower)"
    )
    assert not workdir.exists() or os.listdir(workdir) == []  # not bound: fix it and rerun
    # A finished link is not trained again, so its cache is not checked.
    assert chain.plan_teacher_caches(config, jobs, shape, done=frozenset({"link_2"})) == (
        frozenset(),
        [],
    )


def test_a_run_started_before_the_limit_existed_resumes(tmp_path):
    config = smoke_config()
    saved = config_lib.as_json(config)
    del saved["distill"]["teacher_cache_max_gb"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    chain.check_workdir(config, str(tmp_path))  # no error
    config.distill.teacher_cache_max_gb = 64.0  # and a host with another memory may resume it
    chain.check_workdir(config, str(tmp_path))
