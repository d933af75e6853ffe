"""Every config mistake is caught before any data is loaded or anything compiled, with a message
naming the key and the fix; divergence stops a link with link, epoch and step named."""

import os
import re
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from tests.conftest import REPO, run_python, signal_when, smoke_config
from weckd_jax import chain, checkpoints, cli, files, parallel, train
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
        ("distill.t_min", 0.0, r"distill.t_min=0.0 must be in \[1e-18, 3.4e\+38\]"),
        ("distill.t_min", 1e-20, r"distill.t_min=1e-20 must be in \[1e-18"),
        ("distill.t_max", 1e39, r"distill.t_max=1e\+39 must be in \[1e-18, 3.4e\+38\]"),
        ("distill.t_max", 1.0, "distill.t_max=1.0 must be >= distill.t_min=2.0"),
        ("distill.schedule", "exp", "distill.schedule='exp' is unknown; valid: constant"),
        ("distill.teacher_cache", "yes", "distill.teacher_cache='yes' is unknown; valid: auto"),
        ("distill.teacher_cache", "on", "teacher_cache='on' needs train.augment=False"),
        ("distill.teacher_cache_max_gb", 0.0, "distill.teacher_cache_max_gb=0.0 must be > 0"),
        ("model.backbone", "vgg16", "model.backbone 'vgg16' is unknown; valid: resnet10"),
        ("model.backbone", "resnet18,resnet10", "names 2 backbones for chain.length=3"),
        ("model.stem", "huge", "model.stem='huge' is unknown"),
        ("data.image_size", 24, r"'imagenet' stem \(needs >= 33\); raise data.image_size or use"),
        ("data.source", "s3", "data.source='s3' is unknown; valid: synthetic, folder, tfds"),
        ("data.modality", "xray", "data.modality='xray' is unknown; valid: otoscopy"),
        ("data.val_fraction", 0.0, "data.val_fraction must be > 0"),
        ("data.test_fraction", 0.9, "leaves no train pool"),
        ("train.epochs", 0, "train.epochs=0 must be >= 1"),
        ("train.learning_rate", 0.0, "train.learning_rate=0.0 must be > 0"),
        ("train.optimizer", "lamb", "train.optimizer='lamb' is unknown"),
        ("train.batch_size", 0, "train.batch_size=0 must be >= 1"),
        ("model.dtype", "float16", "model.dtype='float16' is unknown"),
        ("train.learning_rate", float("inf"), "train.learning_rate=inf is not a finite number"),
        ("distill.t_max", float("inf"), "distill.t_max=inf is not a finite number"),
        ("distill.attention_weight", float("inf"), "attention_weight=inf is not a finite"),
        ("train.weight_decay", float("inf"), "train.weight_decay=inf is not a finite number"),
        ("train.intensity", float("nan"), "train.intensity=nan is not a finite number"),
        ("train.momentum", float("-inf"), "train.momentum=-inf is not a finite number"),
        ("train.eval_batch_size", 0, "train.eval_batch_size=0 must be >= 1"),
        ("data.num_images", 0, "data.num_images=0 is too small.*data.num_images >= 5"),
        ("data.num_images", -5, "data.num_images=-5 is too small"),
        ("data.images_per_group", 0, "data.images_per_group=0 must be >= 1"),
        ("data.difficulty", -1.0, "data.difficulty=-1.0 must be >= 0"),
        ("train.intensity", -1.0, r"train.intensity=-1.0 must be in \[0, 1\)"),
        ("train.intensity", 1.0, r"train.intensity=1.0 must be in \[0, 1\)"),
        ("train.momentum", -1.0, r"train.momentum=-1.0 must be in \[0, 1\)"),
        ("train.momentum", 1.0, r"train.momentum=1.0 must be in \[0, 1\)"),
    ],
)
def test_each_bad_value_is_named(key, value, match):
    config = base_config()
    _set(config, key, value)
    with pytest.raises(ConfigError, match=match):
        validate(config)


def test_an_image_size_too_small_for_the_small_stem_asks_only_for_larger_images():
    config = base_config()
    config.model.stem = "small"
    config.data.image_size = 0
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert str(e.value) == (
        "data.image_size=0 is too small for resnet18 with the 'small' stem (needs >= 9); raise "
        "data.image_size"
    )


def test_every_problem_of_a_config_is_named_at_once():
    # A check that reads another key (image size for a backbone and stem) waits for that key.
    config = base_config()
    config.seeds = "0,x"
    config.data.modality = "xray"
    config.model.backbone = "vgg16"
    config.model.stem = "huge"
    config.data.image_size = 4
    config.train.learning_rate = -1.0
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert str(e.value).split("\n") == [
        "the config has 5 problems, fix each:",
        "  seeds='0,x' must be comma-separated integers, e.g. 0,1,2",
        "  data.modality='xray' is unknown; valid: otoscopy, microscopy, mri",
        "  model.backbone 'vgg16' is unknown; valid: resnet10, resnet18, resnet34, resnet50, "
        "mobilenetv2",
        "  model.stem='huge' is unknown; valid: small, imagenet",
        "  train.learning_rate=-1.0 must be > 0",
    ]
    config.model.backbone, config.model.stem = "resnet18", "small"  # now the size is checked
    with pytest.raises(ConfigError, match="4 problems(.|\n)*data.image_size=4 is too small"):
        validate(config)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # A chain.length below 1 leaves no links to count backbones for, but the names and the
        # image size they need are checked all the same.
        (
            {"chain.length": 0, "model.backbone": "resnet18,vgg16", "data.image_size": 4},
            [
                "chain.length=0 must be >= 1",
                "model.backbone 'vgg16' is unknown",
                "data.image_size=4 is too small for resnet18",
            ],
        ),
        ({"chain.fraction": 1.5}, ["chain.fraction=1.5 must be in (0, 1]"]),
        ({"data.val_fraction": -0.1}, ["data.val_fraction and data.test_fraction must be in"]),
        ({"data.val_fraction": 1.5}, ["data.val_fraction and data.test_fraction must be in"]),
        (
            {"chain.length": 0, "tune.objective": "link"},
            ["chain.length=0 must be >= 1"],
        ),
    ],
)
def test_a_bad_value_is_named_once_and_hides_no_other_problem(overrides, expected):
    # Each problem of the config is named, and no check adds a second line about a key that an
    # earlier line already names as invalid.
    config = base_config()
    for key, value in overrides.items():
        _set(config, key, value)
    with pytest.raises(ConfigError) as e:
        validate(config)
    lines = [line.strip() for line in str(e.value).split("\n")]
    lines = lines[1:] if len(lines) > 1 else lines
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), (line, start)


def test_a_config_lacking_keys_or_not_a_configdict_is_named():
    with pytest.raises(ConfigError, match="is a dict, not an ml_collections.ConfigDict"):
        validate(base_config().to_dict())
    config = base_config()
    del config.train["epochs"]
    del config["tune"]  # optional: a config written before the section existed
    with pytest.raises(ConfigError, match=r"lacks 1 key\(s\) a run needs: train.epochs;"):
        validate(config)


def test_a_key_no_run_reads_is_named_with_its_close_match():
    # In a config file, `c.train.epoch = 5` adds a key instead of failing like an override.
    config = base_config()
    config.train.epoch = 5
    with pytest.raises(ConfigError, match="sets train.epoch, a key no run reads; did you mean"):
        validate(config)


def test_a_workdir_inside_the_data_folder_is_refused(tmp_path):
    config = base_config()
    config.data.source = "folder"
    config.data.root = str(tmp_path / "data")
    validate(config, str(tmp_path / "runs" / "run1"))  # beside the data: fine
    validate(config, str(tmp_path / "data2"))  # a name that merely starts like it
    for workdir in (tmp_path / "data", tmp_path / "data" / "run1", tmp_path / "data" / "a" / "b"):
        with pytest.raises(ConfigError, match="is inside data.root=.*outside the data folder"):
            validate(config, str(workdir))
    config.data.source = "synthetic"  # data.root is not read
    validate(config, str(tmp_path / "data" / "run1"))


BAD_CONFIG_FILES = {
    "syntax.py": ("def get_config(:\n", "has a syntax error at line 1: "),
    "no_get.py": ("x = 1\n", "defines no get_config(); a config file must define get_config()"),
    "a_dict.py": (
        "def get_config():\n    return {'seed': 0}\n",
        "get_config() returned a dict, not an ml_collections.ConfigDict",
    ),
    "raises.py": (
        "def get_config():\n    return undefined_name\n",
        "get_config() failed (line 2): NameError: name 'undefined_name' is not defined",
    ),
    "import_fails.py": ("import no_such_module_x\n", "running it failed (line 1): Module"),
    "config.json": (  # a run's record of its config
        '{"chain": {"dense": false}, "seed": 0}\n',
        "is JSON (a run's config.json records the config, it is not a config file); to use "
        "the config a run or search recorded, give its folder: --config configs/from_run.py:",
    ),
    "backbone_tuple.py": (
        "from weckd_jax.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.model.backbone = ('resnet18', 'mobilenetv2', 'resnet18')\n"
        "    return c\n",
        "(line 4): TypeError: Could not override field 'backbone' (reference). ('resnet18', "
        "'mobilenetv2', 'resnet18') is of original type <class 'tuple'> and cannot be casted to "
        "type <class 'str'>; give backbone a value of its default's type (one backbone per link "
        "is one comma-separated string, e.g. 'resnet18,mobilenetv2,resnet18'), see "
        "weckd_jax/config.py",
    ),
    "epochs_float.py": (
        "from weckd_jax.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.train.epochs = 2.5\n"
        "    return c\n",
        "cannot be casted to type <class 'int'>; give epochs a value of its default's type, see "
        "weckd_jax/config.py",
    ),
}


def test_bad_config_files_are_named_in_one_line(tmp_path):
    for name, (text, message) in BAD_CONFIG_FILES.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as e:
            cli.load_config_arg(["prog", f"--config={tmp_path / name}", "--config.seed=1"])
        assert str(e.value).startswith(f"config file {tmp_path / name}"), str(e.value)
        assert message in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    # A run's record names the config file that reads it, with the run's folder.
    for name, folder in (("config.json", str(tmp_path)), ("saved.json", "DIR")):
        (tmp_path / name).write_text("{}")
        with pytest.raises(ConfigError) as e:
            cli.load_config_arg(["prog", "--config", str(tmp_path / name)])
        assert str(e.value).endswith(f"give its folder: --config configs/from_run.py:{folder}")
    with pytest.raises(ConfigError, match=r"nonexist.py does not exist; give a config file, e.g."):
        cli.load_config_arg(["prog", "--config", str(tmp_path / "nonexist.py")])
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        cli.load_config_arg(["prog", "--config", str(tmp_path)])
    assert cli.load_config_arg(["prog", "--config.seed=1"]) is None  # no --config: the default
    config = cli.load_config_arg(["prog", "-config", "configs/smoke.py", "--", "--config=x.py"])
    assert config.chain.length == 2  # configs/smoke.py, as loaded by --config


def test_each_tool_runs_the_config_file_once(tmp_path):
    # A config file that does work (reads a table, prints) must not do it twice per command.
    counter = tmp_path / "runs.txt"
    config_file = tmp_path / "counted.py"
    config_file.write_text(
        textwrap.dedent(f"""
            from weckd_jax.config import base_config
            def get_config():
                with open({str(counter)!r}, "a") as f:
                    f.write("ran\\n")
                return base_config()
        """)
    )
    # launch parses its flags, then refuses the config: no training, the file ran once.
    out = run_python("-m", "weckd_jax.launch", f"--config={config_file}", "--config.chain.length=0")
    assert out.returncode == 2 and "chain.length=0 must be >= 1" in out.stderr, out.stderr
    assert counter.read_text() == "ran\n"
    counter.unlink()
    from weckd_jax import evaluate

    assert evaluate.main(["prog", "--config", str(config_file), "--config.seed=3"]) == 2
    assert counter.read_text() == "ran\n"


def test_a_config_given_twice_is_refused_before_either_file_runs(tmp_path):
    counter = tmp_path / "runs.txt"
    argv = ["prog"]
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text(
            textwrap.dedent(f"""
                from weckd_jax.config import base_config
                def get_config():
                    with open({str(counter)!r}, "a") as f:
                        f.write({name!r} + "\\n")
                    return base_config()
            """)
        )
        argv.append(f"--config={tmp_path / name}")
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    with pytest.raises(ConfigError, match=r"^--config is given 2 times \(.*a\.py, .*b\.py\)"):
        cli.parse_config_flags(values, argv)
    assert not counter.exists()


def test_an_override_naming_no_key_is_named_with_its_close_match():
    config = base_config()
    problem = cli.override_problem(config, ["prog", "--config.trian.epochs=1"])
    assert problem == (
        "unknown config key in --config.trian.epochs=1: the config has no key 'trian'; did you "
        "mean 'train'? All keys and their defaults are listed in weckd_jax/config.py."
    )
    problem = cli.override_problem(config, ["prog", "--config.seed=1", "--noconfig.train.augmnt"])
    assert problem.startswith(
        "unknown config key in --noconfig.train.augmnt: the section 'train' has no key 'augmnt'; "
        "did you mean 'train.augment'?"
    )
    problem = cli.override_problem(config, ["prog", "--config.train.epochs.x=1"])
    assert problem == (
        "unknown config key in --config.train.epochs.x=1: train.epochs holds a value (20), not a "
        "section, so it has no key 'x'; override it as --config.train.epochs=VALUE"
    )
    assert "has no key 'zzz'. All keys" in cli.override_problem(config, ["p", "--config.zzz=1"])
    good = ["prog", "--config.train.epochs", "3", "--noconfig.train.augment", "--workdir=config.x"]
    assert cli.override_problem(config, good) is None


def test_an_unusable_workdir_is_named_and_nothing_is_left_behind(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    assert cli.workdir_problem(str(a_file)) == (
        f"--workdir {a_file} is a file or a broken link, not a folder; choose another"
    )
    assert f"cannot be made: {a_file} is not a folder" in cli.workdir_problem(str(a_file / "run"))
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "gone")
    assert "a broken link" in cli.workdir_problem(str(broken))
    assert f"{broken} is not a folder" in cli.workdir_problem(str(broken / "run"))
    broken.unlink()
    if os.path.isdir("/proc/self"):  # no folder can be made in /proc, even by root
        assert "no folder can be created in /proc" in cli.workdir_problem("/proc/weckd")
    assert cli.workdir_problem(str(tmp_path / "new" / "run")) is None
    assert cli.workdir_problem(str(tmp_path)) is None
    for url in ("gs://bucket/runs/r1", "s3://bucket/r1"):  # not a folder named gs: here
        assert cli.workdir_problem(url).startswith(f"--workdir {url} is a URL; runs are written")
    assert cli.workdir_problem(str(tmp_path / "a:b")) is None
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # the probe folders are gone


def test_default_and_shipped_configs_validate():
    import importlib

    for name in ("default", "smoke", "microscopy", "mri"):
        validate(importlib.import_module(f"configs.{name}").get_config())


def test_differences_ignore_harmless_keys():
    a = base_config().to_dict()
    b = base_config().to_dict()
    b["train"]["checkpoint_every"] = 7
    b["data"]["cache_dir"] = "none"  # e.g. a resumed job on a node with another cache
    assert differences(a, b) == []
    b["seed"] = 4
    assert differences(a, b) == ["seed: 0 -> 4"]


def _launch_smoke(workdir, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m weckd_jax.launch`` on the smoke config with ``overrides``, in ``workdir``."""
    return run_python(
        "-m",
        "weckd_jax.launch",
        "--config",
        "configs/smoke.py",
        *overrides,
        f"--workdir={workdir}",
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.nosuchkey=1", "error: unknown config key in --config.nosuchkey=1: the config"),
        ("--config.train.learning_rate=inf", "error: train.learning_rate=inf is not a finite"),
        ("--config.chain.length=0", "error: chain.length=0 must be >= 1"),
        ("--config.train.batch_size=abc", "invalid literal for int()"),
    ],
)
def test_launch_reports_user_errors_without_traceback(tmp_path, override, message):
    out = _launch_smoke(tmp_path / "w", override)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "w").exists()  # nothing was written


def test_every_tool_reports_a_bad_config_file_or_key_in_one_line(tmp_path):
    (tmp_path / "no_get.py").write_text("x = 1\n")
    (tmp_path / "a_file").write_text("")
    workdir = f"--workdir={tmp_path / 'w'}"
    cases = [  # (arguments, message)
        (["weckd_jax.launch", f"--config={tmp_path / 'no_get.py'}", workdir], "no_get.py defines"),
        (["weckd_jax.evaluate", "--config", str(tmp_path / "nonexist.py"), workdir], "not exist"),
        (["weckd_jax.tune", "--config=configs/nonexist.py", workdir, "--trials=1"], "not exist"),
        (["weckd_jax.bench", f"--config={tmp_path / 'no_get.py'}"], "no_get.py defines"),
        # Without --config, ml_collections applies the overrides while defining the flag.
        (["weckd_jax.launch", "--config.trian.epochs=1", workdir], "did you mean 'train'?"),
        (["weckd_jax.tune", "--config.train.epoch=1", workdir, "--trials=1"], "'train.epochs'?"),
        (["weckd_jax.launch", "--config=configs/smoke.py", f"--workdir={tmp_path / 'a_file'}"],
         "a_file is a file or a broken link, not a folder"),
        # A config key or file given without --config is named with the --config form.
        (["weckd_jax.launch", "--seed=1", workdir],
         "Unknown command line flag 'seed'; did you mean --config.seed=VALUE? (config keys are "
         "set with --config)"),
        (["weckd_jax.evaluate", "--config=configs/smoke.py", workdir, "--epochs=2"],
         "did you mean --config.train.epochs=VALUE?"),
        (["weckd_jax.tune", "configs/smoke.py", workdir, "--trials=1"],
         "unexpected arguments: configs/smoke.py; give a config file with --config: --config "
         "configs/smoke.py"),
        (["weckd_jax.bench", "--nosuchflag"],
         "Unknown command line flag 'nosuchflag' (run with --helpfull to list the flags)"),
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )
        for args, _ in cases
    ]  # fmt: skip
    for proc, (args, message) in zip(procs, cases, strict=True):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, stderr[-3000:])
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert message in stderr, (args, stderr)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "no_get.py"]  # nothing was written


HELP_FLAGS = {  # every flag each tool takes
    "launch": ["config", "workdir", "coordinator", "num_processes", "process_id", "multihost"],
    "tune": ["config", "workdir", "trials", "evaluate_best"],
    "bench": ["config", "json", "overwrite", "repeats", "steps"],
    "evaluate": ["config", "workdir", "split", "name"],
    "predict": ["workdir", "images", "link", "output", "overwrite", "batch_size"],
}


def test_help_lists_every_flag_of_each_tool_with_a_description():
    # absl's --help lists only the flags of the module run as the program: not --config
    # (defined in weckd_jax.cli), nor tune's (defined in weckd_jax.tune from its __main__).
    procs = {
        tool: subprocess.Popen(
            [sys.executable, "-m", f"weckd_jax.{tool}", "--help"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for tool in HELP_FLAGS
    }
    for tool, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, (tool, out)  # asking for help is no error
        # The listing after the usage text (which names some flags too): absl's, or argparse's.
        out = re.split(r"(?m)^(?:flags|options):$", out)[-1]
        for name in HELP_FLAGS[tool]:
            # absl: "  --name: text" (booleans "--[no]name"); argparse: "  --name NAME  text".
            listed = rf"(?m)^  --(\[no\])?{name}(: | [A-Z_]+\s+|\s+)[a-zA-Z(<]"
            assert re.search(listed, out), (tool, name, out)


def test_a_launch_in_a_workdir_another_process_runs_in_stops_in_one_line(tmp_path):
    workdir = tmp_path / "w"
    with files.exclusive_folder(str(workdir)):  # as a launch running there holds it
        out = _launch_smoke(workdir)
        assert os.listdir(workdir) == []  # nothing was written
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr == (
        f"error: {workdir} is in use by another process running there now (a launch, or a "
        "search's final run): two runs in one folder would overwrite each other's checkpoints "
        "and results. Wait for it to end, or choose another --workdir\n"
    )


def test_ctrl_c_stops_launch_in_one_line_and_keeps_the_workdir(tmp_path):
    workdir = tmp_path / "w"
    args = ["-m", "weckd_jax.launch", "--config", "configs/smoke.py", f"--workdir={workdir}"]
    ready = (workdir / "config.json").exists  # the run has begun
    returncode, stderr = signal_when(args, ready, signal.SIGINT, "the run began")
    assert returncode == 130, stderr[-3000:]
    assert stderr == (
        f"interrupted: the finished links and the last in-training checkpoint are kept in "
        f"{workdir}; rerun the same command to resume\n"
    )
    assert (workdir / "config.json").exists()


STARTING_TOOLS = {  # each tool's arguments, enough to start it
    "launch": ["--config", "configs/smoke.py", "--workdir", "w"],
    "tune": ["--config", "configs/smoke.py", "--workdir", "w", "--trials=1"],
    "evaluate": ["--config", "configs/smoke.py", "--workdir", "w"],
    "predict": ["--workdir", "w", "--images", "README.md"],
    "bench": ["--config", "configs/smoke.py"],
}


@pytest.mark.parametrize("tool", sorted(STARTING_TOOLS))
def test_ctrl_c_while_a_tool_loads_jax_exits_with_one_line(tool, tmp_path):
    # The tool run as `python -m`, with a Ctrl-C the moment it imports JAX (a second or two
    # after it starts): Python's default printed a traceback, or lost the interrupt inside a
    # garbage-collection callback of JAX and went on.
    code = textwrap.dedent(f"""
        import os, runpy, signal, sys

        class CtrlCOnJax:
            def find_spec(self, name, path=None, target=None):
                if name == "jax":
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, CtrlCOnJax())
        sys.argv = ["{tool}", *{STARTING_TOOLS[tool]!r}]
        os.chdir({str(tmp_path)!r})
        runpy.run_module("weckd_jax.{tool}", run_name="__main__", alter_sys=True)
    """)
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert (out.returncode, out.stderr) == (130, "interrupted: nothing was written\n")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_an_xla_compilation_exits_with_130_at_once(tmp_path):
    # The compiler goes on in its own thread after the KeyboardInterrupt: an interpreter teardown
    # under it waited for the compilation to end, then crashed (SIGSEGV/SIGABRT, not 130).
    marker = tmp_path / "compiling"
    code = textwrap.dedent(f"""
        import threading
        import jax
        import jax.numpy as jnp
        from weckd_jax import cli

        jax.config.update("jax_enable_compilation_cache", False)  # a compilation, not a load

        def slow_to_compile(x):
            for i in range(700):
                x = jnp.sin(x @ x.T + i) @ x
            return x

        lowered = jax.jit(slow_to_compile).lower(jnp.ones((8, 8)))
        threading.Timer(1.0, open, [{str(marker)!r}, "w"]).start()  # 1 s into the compilation
        try:
            lowered.compile()
        except KeyboardInterrupt:
            cli.interrupted("stopped while compiling")
    """)
    returncode, stderr = signal_when(["-c", code], marker.exists, signal.SIGINT, "compiling")
    assert (returncode, stderr) == (130, "interrupted: stopped while compiling\n")


CTRL_C = {  # a tool whose work is stopped by Ctrl-C, as python -c code
    "predict": "from weckd_jax import predict\npredict.predict = ctrl_c\n"
    "sys.exit(predict.main(['--workdir', 'w', '--images', 'README.md']))",
    "evaluate": "from weckd_jax import evaluate\nevaluate.evaluate_workdir = ctrl_c\n"
    "sys.exit(evaluate.main(['evaluate', '--workdir', 'w', '--config', 'configs/smoke.py']))",
    "bench": "sys.argv = ['bench', '--config', 'configs/smoke.py']\nfrom absl import app\n"
    "from weckd_jax import bench, cli\nbench.run = ctrl_c\n"
    "app.run(bench.main, flags_parser=cli.parse_flags)",
}


def test_ctrl_c_stops_predict_evaluate_and_bench_in_one_line():
    start = "import sys\ndef ctrl_c(*args, **kwargs):\n    raise KeyboardInterrupt\n"
    procs = {
        tool: subprocess.Popen(
            [sys.executable, "-c", start + code], cwd=REPO, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )
        for tool, code in CTRL_C.items()
    }  # fmt: skip
    for tool, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert (tool, proc.returncode, stderr) == (tool, 130, "interrupted: nothing was written\n")


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


def test_a_step_whose_batchnorm_statistics_overflow_is_nonfinite():
    # Huge stem weights: the running variance overflows to inf, while BatchNorm in train mode
    # keeps the loss and the gradients finite. Nothing but the new state shows the divergence.
    spec = train.ModelSpec("resnet10", num_classes=3, width=8, stem="small")
    cfg = train.StepConfig(augment=False)
    hp = dict(learning_rate=1e-3, weight_decay=0.0, warmup_steps=0, total_steps=10, alpha=0.5,
              beta=0.0, t_max=4.0, t_min=1.0)  # fmt: skip
    state = train.init_state(spec, cfg, jax.random.key(0), (32, 32, 3), hp)
    params = jax.tree.map(lambda x: x, state.params)
    params["conv1"]["kernel"] = params["conv1"]["kernel"] * 3e19
    mesh = parallel.data_mesh()
    state = parallel.replicate(state.replace(params=params), mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 3, 16).astype(np.int32),
        "label_mask": np.ones(16, np.float32),
    }
    step = train.make_train_step(spec, (), cfg, mesh)
    new, metrics = step(state, (), parallel.global_batch(batch, mesh), jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not all(np.isfinite(v).all() for v in jax.tree.leaves(new.batch_stats))
    assert float(metrics["nonfinite"]) == 1.0


def test_nonfinite_validation_predictions_stop_the_link(tmp_path, monkeypatch):
    config = smoke_config()
    config.baselines.union_supervised = False
    config.baselines.full_supervised = False
    real = chain.probabilities

    def probabilities(spec, variables, images, index, **kw):
        probs = real(spec, variables, images, index, **kw)
        return np.full_like(probs, np.nan)  # as eval-mode logits that overflowed

    monkeypatch.setattr(chain, "probabilities", probabilities)
    with pytest.raises(chain.DivergenceError, match=r"link_1: the validation predictions"):
        chain.run(config, str(tmp_path), Progress(enabled=False))
    assert not checkpoints.has_final(str(tmp_path), "link_1")


STOP_WHILE_WRITING = textwrap.dedent(
    """
    import sys
    from tests.conftest import smoke_config
    from weckd_jax import chain
    from weckd_jax.progress import Progress

    config = smoke_config()
    config.train.checkpoint_every = 1
    config.baselines.union_supervised = False
    config.baselines.full_supervised = False
    real, calls = chain._check_finite, []

    def check(*args):
        real(*args)
        calls.append(args)
        if len(calls) == 2:  # one step after the first checkpoint's write began
            raise chain.DivergenceError("stopped while a checkpoint was being written")

    chain._check_finite = check
    chain.run(config, sys.argv[1], Progress(enabled=False))  # the error ends the process
    """
)


def test_a_link_stopped_by_an_error_finishes_the_checkpoint_being_written(tmp_path):
    # In a fresh process, so that the error ends it: a write still in flight then would be
    # abandoned at exit, leaving a temporary folder instead of checkpoint 1.
    workdir = tmp_path / "w"
    out = run_python("-c", STOP_WHILE_WRITING, str(workdir), timeout=600)
    assert out.returncode != 0 and "stopped while a checkpoint was being written" in out.stderr
    assert checkpoints.TrainCheckpoints(str(workdir), "link_1").latest_step() == 1
    train_dir = checkpoints.train_dir(str(workdir), "link_1")
    assert not [name for name in os.listdir(train_dir) if "tmp" in name]


def test_an_error_while_training_is_not_masked_by_a_failed_checkpoint_write(monkeypatch, tmp_path):
    saver = checkpoints.TrainCheckpoints(str(tmp_path), "link_1")

    def failed_write():
        raise OSError("disk full")

    monkeypatch.setattr(saver, "wait", failed_write)
    with pytest.raises(chain.DivergenceError, match="the error to report"), saver:
        raise chain.DivergenceError("the error to report")
    with pytest.raises(OSError, match="disk full"), saver:  # and reported when alone
        pass


def test_launch_reports_divergence_without_traceback(tmp_path):
    out = _launch_smoke(
        tmp_path / "w",
        "--config.train.learning_rate=1e30",
        "--config.train.warmup_epochs=0",
        timeout=600,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "error: link_1: " in out.stderr and "NaN/Inf at epoch 1, step 2" in out.stderr
    assert "Traceback" not in out.stderr


def test_tune_section_is_harmless_for_a_launch_workdir():
    a = base_config().to_dict()
    b = base_config().to_dict()
    b["tune"]["space"] = "distill.alpha:0.2:0.8"
    del a["tune"]  # a workdir written before the section existed
    assert differences(a, b) == []


def test_a_ctrl_c_lost_in_a_gc_callback_is_delivered_again():
    # Python drops an exception raised in a gc callback (JAX registers one): without
    # keep_interrupts, a Ctrl-C landing there would be lost and the run would go on.
    code = (
        "import gc, sys\n"
        "from weckd_jax import cli\n"
        "cli.keep_interrupts()\n"
        "hook = sys.unraisablehook\n"
        "cli.keep_interrupts()\n"  # as predict.main called twice in one process does
        "print('one hook' if sys.unraisablehook is hook else 'hooks chained')\n"
        "def raise_once(phase, info):\n"
        "    if phase == 'start' and not getattr(raise_once, 'done', False):\n"
        "        raise_once.done = True\n"
        "        raise KeyboardInterrupt\n"
        "gc.callbacks.append(raise_once)\n"
        "try:\n"
        "    gc.collect()\n"
        "    for _ in range(10**8):\n"
        "        pass\n"
        "    print('lost')\n"
        "except KeyboardInterrupt:\n"
        "    print('delivered')\n"
    )
    out = run_python("-c", code, timeout=300)
    assert out.stdout.split() == ["one", "hook", "delivered"], out.stderr[-2000:]


def test_launch_tune_and_bench_expand_a_leading_tilde_in_their_path_flags(tmp_path, monkeypatch):
    # In --flag=~/x (and after the colon of FILE:ARG) the shell leaves ~ as typed.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "afile").write_text("")
    home = str(tmp_path)
    cases = [
        (["launch", "--config", "configs/smoke.py", "--workdir=~/afile"],
         f"error: --workdir {home}/afile is a file or a broken link, not a folder"),
        (["bench", "--config", "configs/smoke.py", "--json=~/afile"],
         f"error: --json {home}/afile already exists"),
        (["tune", "--config=~/missing.py", "--workdir=~/t", "--trials=1"],
         f"error: config file {home}/missing.py does not exist"),
        (["launch", "--config", "configs/from_run.py:~/gone"],
         f"error: configs/from_run.py:{home}/gone: {home}/gone does not exist"),
    ]  # fmt: skip
    for (tool, *args), start in cases:
        out = run_python("-m", f"weckd_jax.{tool}", *args)
        assert out.returncode == 2 and out.stderr.startswith(start), (tool, out.stderr)
    assert not os.path.exists(os.path.join(REPO, "~"))  # no folder named ~ made where it ran
