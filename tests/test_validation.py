"""Every config mistake is caught before any data is loaded or anything compiled, with a message
naming the key and the fix; divergence stops a link with link, epoch and step named."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, smoke_config
from weckd_jax import chain, checkpoints
from weckd_jax.config import ConfigError, base_config, differences, validate
from weckd_jax.progress import Progress


def _set(config, key, value):
    section, name = key.rsplit(".", 1) if "." in key else (None, key)
    target = config if section is None else config[section]
    target[name] = value


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("chain.length", 0, "chain.length=0 must be >= 1"),
        ("chain.fraction", 0.0, r"chain.fraction=0.0 must be in \(0, 1\]"),
        ("chain.fraction", 1.5, r"chain.fraction=1.5 must be in \(0, 1\]"),
        ("chain.fraction", 0.4, r"3 x 0.4 = 1.2 > 1.*chain.fraction <= 0.3333"),
        ("chain.label_ratio", 0.0, r"chain.label_ratio=0.0 must be in \(0, 1\]"),
        ("distill.alpha", 1.2, r"distill.alpha=1.2 must be in \[0, 1\]"),
        ("distill.attention_weight", -1.0, "distill.attention_weight=-1.0 must be >= 0"),
        ("distill.t_min", 0.0, "distill.t_min=0.0 must be > 0"),
        ("distill.t_max", 1.0, "distill.t_max=1.0 must be >= distill.t_min=2.0"),
        ("distill.schedule", "exp", "distill.schedule='exp' is unknown; valid: constant"),
        ("distill.teacher_cache", "yes", "distill.teacher_cache='yes' is unknown; valid: auto"),
        ("distill.teacher_cache", "on", "teacher_cache='on' needs train.augment=False"),
        ("model.backbone", "vgg16", "model.backbone 'vgg16' is unknown; valid: resnet10"),
        ("model.backbone", "resnet18,resnet10", "names 2 backbones for chain.length=3"),
        ("model.stem", "huge", "model.stem='huge' is unknown"),
        ("data.image_size", 24, r"too small for resnet18 with the 'imagenet' stem \(needs >= 33\)"),
        ("data.source", "s3", "data.source='s3' is unknown; valid: synthetic, folder, tfds"),
        ("data.modality", "xray", "data.modality='xray' is unknown; valid: otoscopy"),
        ("data.val_fraction", 0.0, "data.val_fraction must be > 0"),
        ("data.test_fraction", 0.9, "leaves no train pool"),
        ("train.epochs", 0, "train.epochs=0 must be >= 1"),
        ("train.learning_rate", 0.0, "train.learning_rate=0.0 must be > 0"),
        ("train.optimizer", "lamb", "train.optimizer='lamb' is unknown"),
        ("train.batch_size", 0, "train.batch_size=0 must be >= 1"),
        ("model.dtype", "float16", "model.dtype='float16' is unknown"),
    ],
)
def test_each_bad_value_is_named(key, value, match):
    config = base_config()
    _set(config, key, value)
    with pytest.raises(ConfigError, match=match):
        validate(config)


def test_default_and_shipped_configs_validate():
    import importlib

    for name in ("default", "smoke", "microscopy", "mri"):
        validate(importlib.import_module(f"configs.{name}").get_config())


def test_differences_ignore_harmless_keys():
    a = base_config().to_dict()
    b = base_config().to_dict()
    b["train"]["checkpoint_every"] = 7
    assert differences(a, b) == []
    b["seed"] = 4
    assert differences(a, b) == ["seed: 0 -> 4"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.nosuchkey=1", "unknown config key in '--config.nosuchkey=1'"),
        ("--config.chain.length=0", "error: chain.length=0 must be >= 1"),
        ("--config.train.batch_size=abc", "invalid literal for int()"),
    ],
)
def test_launch_reports_user_errors_without_traceback(tmp_path, override, message):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "weckd_jax.launch",
            "--config",
            "configs/smoke.py",
            override,
            f"--workdir={tmp_path / 'w'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists()  # nothing was written


def test_divergence_names_link_epoch_and_step_and_keeps_last_checkpoint(tmp_path):
    config = smoke_config()
    config.train.learning_rate = 1e30  # the first update sends the weights to inf
    config.train.warmup_epochs = 0
    config.baselines.union_supervised = False
    config.baselines.full_supervised = False
    with pytest.raises(chain.DivergenceError, match=r"link_1: .*NaN/Inf at epoch 1, step 2"):
        chain.run(config, str(tmp_path), Progress(enabled=False))
    assert not checkpoints.has_final(str(tmp_path), "link_1")
    assert not os.path.exists(tmp_path / "results.json")
    # The diverged state was never written: no train checkpoint holds it.
    assert checkpoints.TrainCheckpoints(str(tmp_path), "link_1").latest_step() is None


def test_tune_section_is_harmless_for_a_launch_workdir():
    a = base_config().to_dict()
    b = base_config().to_dict()
    b["tune"]["space"] = "distill.alpha:0.2:0.8"
    del a["tune"]  # a workdir written before the section existed
    assert differences(a, b) == []
