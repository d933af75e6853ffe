"""The run configuration: every key with its default, and the checks a config must pass.

`configs/*.py` files expose ``get_config()`` returning `base_config()` with some keys changed; any
key can be overridden on the command line (``--config.chain.length=4``).
"""

from __future__ import annotations

import copy
import difflib
import importlib.machinery
import importlib.util
import json
import math
import os
import re
import shlex
import sys
import traceback

import ml_collections

from weckd_jax import data as data_lib
from weckd_jax import files, losses, models, parallel, workdirs
from weckd_jax.data import synthetic


def base_config() -> ml_collections.ConfigDict:
    """All keys of a run with their defaults (the embedded otoscopy-like default run)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.seeds = ""  # "0,1,2": one chain per seed in DIR/seed_<s>/ plus a summary (overrides seed)

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # "synthetic" (embedded generator) | "folder" | "tfds"
    c.data.modality = "otoscopy"  # synthetic: "otoscopy" | "microscopy" | "mri"
    c.data.num_images = 2500  # synthetic: images generated
    c.data.difficulty = 1.0  # synthetic: nuisance strength / class overlap (>= 0; 0 = clean)
    c.data.images_per_group = 4  # synthetic: images per synthetic patient (>= 1)
    c.data.image_size = 64  # side in pixels the images are resized to
    c.data.channels = 0  # 1 or 3; 0 = as the source gives (synthetic: the modality's; folder: 3)
    c.data.root = ""  # folder: DIR/<class>/<image> (nested folders allowed)
    c.data.manifest = ""  # folder: CSV path,label[,group][,split]; default DIR/manifest.csv
    c.data.group_regex = ""  # folder: regex whose first group in the file path is the patient id
    c.data.name = ""  # tfds: registered dataset name, e.g. "malaria"
    c.data.data_dir = ""  # tfds: where the dataset was prepared (nothing is downloaded)
    c.data.tfds_split = "train"  # tfds: split(s) pooled before our own train/val/test split
    c.data.cache_dir = ""  # decoded-image cache; "" = ~/.cache/weckd_jax, "none" = off
    c.data.val_fraction = 0.15  # share of all images held out for model selection
    c.data.test_fraction = 0.2  # share of all images held out for the final test

    c.chain = ml_collections.ConfigDict()
    c.chain.length = 3  # number of links N
    c.chain.fraction = 0.1  # share of the train pool each link trains on
    c.chain.label_ratio = 1.0  # share of each fraction that keeps its labels
    c.chain.dense = False  # link k learns from all earlier links, not only k-1
    c.chain.init_from_teacher = True  # warm-start link k from link k-1 when architectures match

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "resnet18"  # a name, or one per link: "resnet18,mobilenetv2,resnet18"
    c.model.width = 32  # first-stage channels (ResNet) / stem channels (MobileNetV2)
    c.model.stem = "imagenet"  # "small" (3x3/1, 32-64 px) | "imagenet" (7x7/2 + max-pool)
    c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (params stay float32)

    c.distill = ml_collections.ConfigDict()
    c.distill.alpha = 0.5  # weight of the KD term on labelled examples (1 on unlabelled)
    c.distill.attention_weight = 1.0  # beta, weight of attention transfer (0 = off)
    c.distill.attention_p = 2  # exponent p of the attention maps sum_c |F_c|^p
    c.distill.t_max = 6.0  # temperature at the start of a link
    c.distill.t_min = 2.0  # temperature at the end of a link
    c.distill.schedule = "cosine"  # "constant" (t_max) | "linear" | "cosine"
    # Teacher outputs computed once per example instead of in every step: "auto" (when
    # train.augment is off, the only case where it is exact) | "on" (requires augment off) | "off"
    c.distill.teacher_cache = "auto"
    # Host memory (GB = 1e9 bytes, per process) a link's teacher cache may take: over it, "auto"
    # runs the teacher in the step instead and "on" is refused. A fixed size, not a share of this
    # machine's memory, so that one config makes the same choice on every host and every rerun.
    c.distill.teacher_cache_max_gb = 4.0

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 20  # epochs per link and baseline
    c.train.batch_size = 32  # global batch size (over all devices)
    c.train.eval_batch_size = 256  # examples per evaluation batch (divides over the devices)
    c.train.optimizer = "adamw"  # "adamw" | "sgd" (Nesterov momentum)
    c.train.learning_rate = 1e-3
    c.train.momentum = 0.9  # sgd only; in [0, 1)
    c.train.weight_decay = 0.05
    c.train.warmup_epochs = 1
    c.train.label_smoothing = 0.0
    c.train.augment = True  # random flip, shift and intensity jitter, on the device
    c.train.flip = True
    c.train.max_shift = 4  # pixels
    c.train.intensity = 0.1  # brightness offset and contrast factor 1 +- this; in [0, 1)
    c.train.eval_every = 2  # validate every this many epochs (the best one is kept)
    c.train.checkpoint_every = 200  # steps between checkpoints (and at every epoch end)

    c.baselines = ml_collections.ConfigDict()
    # The last link's backbone, fraction and labels, supervised, with no teacher and a random
    # initialisation: the chain's gain over it compares two models on the same images (link 1
    # trained on another fraction). Needs chain.length >= 2 (with 1 it is link 1 itself). Off by
    # default: it costs one more link's training.
    c.baselines.same_fraction = False
    c.baselines.union_supervised = True  # one backbone on the union of the fractions
    c.baselines.full_supervised = True  # one backbone on the whole train pool (upper bound)
    # The last link's student, fraction and loss, taught by link 1 directly instead of through the
    # chain: what the intermediate links add. Needs chain.length >= 3 (with 2 it is link 2 itself).
    # Off by default: it costs one more link's training (~8 % of the default run, which is kept
    # under 5 minutes on 2 cores).
    c.baselines.one_step_kd = False

    # Hyper-parameter search (`python -m weckd_jax.tune`); ignored by `launch`. Trials are scored
    # on the validation split only; the test split is evaluated once, for the best trial.
    c.tune = ml_collections.ConfigDict()
    # "key:low:high[:log]" entries, comma-separated; key = any numeric config key (int keys get
    # integer values). distill.t_min is capped at the trial's distill.t_max.
    c.tune.space = (
        "train.learning_rate:1e-4:1e-2:log,train.weight_decay:1e-4:0.1:log,"
        "distill.alpha:0.1:0.9,distill.t_max:2:8,distill.t_min:0.5:2,"
        "distill.attention_weight:0:2"
    )
    c.tune.objective = "last_link"  # "last_link" | "link" (validation accuracy of link tune.link)
    c.tune.link = 0  # objective "link": the link k scored (1..chain.length); trials stop after it
    c.tune.random_trials = 10  # TPE samples at random until this many trials have finished
    c.tune.prune = True  # MedianPruner on each validation epoch of links 1..k
    c.tune.prune_after_trials = 5  # no pruning until this many trials have completed
    c.tune.prune_warmup_steps = 0  # no pruning before this step ((link - 1) * epochs + epoch)
    return c


def _backbone_names(config) -> list[str]:
    """The names ``model.backbone`` gives (one name, a tuple or a comma list), as written."""
    value = config.model.backbone
    return [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]


def backbones(config) -> tuple[str, ...]:
    """One backbone name per link (``model.backbone`` may be one name, a tuple or a comma list)."""
    names = _backbone_names(config)
    if len(names) == 1:
        names = names * config.chain.length
    return tuple(names)


def get_config() -> ml_collections.ConfigDict:
    """Makes this module a config file itself: the embedded default run."""
    return base_config()


def load_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file, as ``--config PATH`` loads it (``FILE:ARG`` passes
    ``ARG`` to ``get_config``).

    Raises:
      ConfigError: the file is missing, does not run, defines no ``get_config()``, or that does
        not return an ``ml_collections.ConfigDict``; the message names the file and the fix.
    """
    file, *args = str(path).split(":", 1)
    fix = "e.g. --config configs/smoke.py (a Python file that defines get_config())"
    if not os.path.isfile(file):
        what = "is a folder, not a file" if os.path.isdir(file) else "does not exist"
        raise ConfigError(f"config file {file} {what}; give a config file, {fix}")
    if file.lower().endswith(".json"):
        # Run as Python, a run's config.json would fail on its first `false` or `null`.
        folder = "DIR"
        if os.path.basename(file) == "config.json":
            folder = os.path.dirname(file) or "."
        raise ConfigError(
            f"config file {file} is JSON (a run's config.json records the config, it is not a "
            "config file); to use the config a run or search recorded, give its folder: "
            f"--config configs/from_run.py:{folder}"
        )

    def failed(what: str, e: BaseException) -> ConfigError:
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if _same_file(f, file)]
        where = f" (line {lines[-1]})" if lines else ""
        text = " ".join(str(e).split())
        return ConfigError(
            f"config file {file}: {what}{where}: {type(e).__name__}: {text}{_type_fix(e)}"
        )

    name = "weckd_config_" + re.sub(r"\W", "_", os.path.abspath(file))
    loader = importlib.machinery.SourceFileLoader(name, file)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    # Registered while it runs, as ml_collections' loader does: dataclasses and other code that
    # looks itself up in sys.modules fail otherwise.
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(
            f"config file {file} has a syntax error at line {e.lineno}: {e.msg}; fix the file"
        ) from None
    except Exception as e:
        raise failed("running it failed", e) from None
    finally:
        sys.modules.pop(name, None)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(
            f"config file {file} defines no get_config(); a config file must define get_config() "
            "returning an ml_collections.ConfigDict, e.g. weckd_jax.config.base_config() with "
            "some keys changed (see configs/smoke.py)"
        )
    try:
        config = module.get_config(*args)
    except ConfigError:  # already one line naming the problem and the fix (e.g. `from_run`)
        raise
    except Exception as e:
        raise failed("get_config() failed", e) from None
    check_loaded(config, file)
    return config


def check_loaded(config, file: str) -> None:
    """What `load_file` checks of the value ``get_config()`` of ``file`` returned: an
    ``ml_collections.ConfigDict`` that lacks no key added to weckd_jax since a file weckd_jax
    wrote was written (`validate` names any other missing key).

    Raises:
      ConfigError: naming the file, the problem and the fix.
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"config file {file}: get_config() returned a {type(config).__name__}, not an "
            "ml_collections.ConfigDict; return weckd_jax.config.base_config() with some keys "
            "changed (see configs/smoke.py)"
        )
    missing = _missing_keys(config)
    if missing and all(key in ADDED_KEYS for key in missing):
        # Written before these keys existed (a search's best_config.py, say): `validate`'s
        # advice to build on base_config() does not fit a file weckd_jax wrote itself.
        values = " and ".join(f"{key} = {ADDED_KEYS[key]!r}" for key in missing)
        raise ConfigError(
            f"config file {file} lacks {', '.join(missing)}, added to weckd_jax since it was "
            "written (e.g. a search's best_config.py): rerun that search's command, which "
            f"writes its best_config.py anew, or set {values} in it (what its version did)"
        )


def _type_fix(error: BaseException) -> str:
    """The fix for a value of the wrong type set in a config file (ml_collections keeps each
    key's type), or ""."""
    found = re.search(r"Could not override field '(\w+)'", str(error))
    if not isinstance(error, TypeError) or not found:
        return ""
    per_link = (
        " (one backbone per link is one comma-separated string, e.g. "
        "'resnet18,mobilenetv2,resnet18')"
        if found[1] == "backbone"
        else ""
    )
    return f"; give {found[1]} a value of its default's type{per_link}, see weckd_jax/config.py"


def _same_file(frame: traceback.FrameSummary, file: str) -> bool:
    return os.path.abspath(frame.filename) == os.path.abspath(file)


def as_json(config) -> dict:
    """The config as nested JSON values (what ``config.json`` holds and what is compared)."""
    return json.loads(config.to_json_best_effort())


def seed_list(config) -> list[int]:
    """The seeds of a multi-seed run (``seeds = "0,1,2"``), or [] for a single run; ``config``
    is a ConfigDict or its JSON dict (a saved ``config.json``)."""
    return [int(v) for v in str(config["seeds"]).split(",") if v.strip()]


class ConfigError(ValueError):
    """A config value is out of range or names something that does not exist."""


def _leaves(tree, prefix: str = ""):
    """``(dotted key, value)`` of every value of a config (or a nested dict), sections unfolded."""
    for key, value in tree.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _missing_keys(config) -> list[str]:
    """The keys of `base_config` that ``config`` lacks, ``tune.*`` aside."""
    present = dict(_leaves(config))
    return [k for k, _ in _leaves(base_config()) if k not in present and not k.startswith("tune.")]


def _check_keys_and_numbers(config) -> None:
    """Every key of `base_config` is there (``tune.*`` aside), no other key is, and every float
    is finite."""
    defaults = dict(_leaves(base_config()))
    present = dict(_leaves(config))
    unknown = [k for k in present if k not in defaults]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(defaults), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"the config sets {unknown[0]}, a key no run reads{hint} A misspelt key would "
            "otherwise be ignored silently: rename or remove it (all keys are listed in "
            "weckd_jax/config.py)"
        )
    missing = _missing_keys(config)
    if missing:
        raise ConfigError(
            f"the config lacks {len(missing)} key(s) a run needs: {', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}; build the config from "
            "weckd_jax.config.base_config(), which has every key with its default"
        )
    for key, value in present.items():
        values = value if isinstance(value, list | tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(
                f"{key}={value} is not a finite number; give a finite value (default "
                f"{defaults[key]})"
            )


def validate(config, workdir: str | None = None, *, trains: bool = True) -> None:
    """Checks every key a run depends on, before any data is loaded or anything compiled.

    Args:
      workdir: the run's folder, when known: it must not lie inside the data folder.
      trains: whether the config is to train on the devices of this process, whose count
        ``train.batch_size`` and ``train.eval_batch_size`` must then divide over; an
        evaluation of trained models (`weckd_jax.evaluate`) rounds its batch up instead.

    Raises:
      ConfigError: naming the key, the bad value and the fix; several problems are listed
        together, one per line (a key missing or misspelt, or a number that is not finite, is
        reported alone: the other checks would read the wrong keys).
    """
    problems = []

    def need(ok: bool, message: str) -> bool:
        if not ok:
            problems.append(message)
        return ok

    c = config
    if not isinstance(c, ml_collections.ConfigDict):
        raise ConfigError(
            f"the config is a {type(c).__name__}, not an ml_collections.ConfigDict; get_config() "
            "must return one, e.g. weckd_jax.config.base_config() with some keys changed"
        )
    _check_keys_and_numbers(c)
    need(c.seed >= 0, f"seed={c.seed} must be >= 0")
    try:
        seeds = seed_list(c)
    except ValueError:
        need(False, f"seeds={c.seeds!r} must be comma-separated integers, e.g. 0,1,2")
        seeds = []
    need(all(s >= 0 for s in seeds), f"seeds={c.seeds!r} must be >= 0")
    need(len(set(seeds)) == len(seeds), f"seeds={c.seeds!r} repeats a seed")
    need(
        c.data.source in data_lib.SOURCES,
        f"data.source={c.data.source!r} is unknown; valid: {', '.join(data_lib.SOURCES)}",
    )
    need(c.data.channels in (0, 1, 3), f"data.channels={c.data.channels} must be 0 (auto), 1 or 3")
    need(
        c.data.source != "folder" or bool(c.data.root or c.data.manifest),
        "data.source='folder' needs data.root=DIR (DIR/<class>/<image>) or data.manifest=CSV",
    )
    need(
        c.data.source != "tfds" or bool(c.data.name),
        "data.source='tfds' needs data.name, e.g. --config.data.name=malaria",
    )
    if c.data.source == "synthetic":
        if need(
            c.data.modality in synthetic.MODALITIES,
            f"data.modality={c.data.modality!r} is unknown; valid: "
            f"{', '.join(synthetic.MODALITIES)}",
        ):
            num_classes = len(synthetic.MODALITIES[c.data.modality])
            need(
                c.data.num_images >= num_classes,
                f"data.num_images={c.data.num_images} is too small: the {c.data.modality!r} "
                f"modality has {num_classes} classes; use data.num_images >= {num_classes} "
                "(default 2500)",
            )
        need(
            c.data.images_per_group >= 1,
            f"data.images_per_group={c.data.images_per_group} must be >= 1 (images per "
            "synthetic patient; default 4)",
        )
        need(
            c.data.difficulty >= 0,
            f"data.difficulty={c.data.difficulty} must be >= 0 (0 = clean images, 1 = default)",
        )
    if workdir is not None and c.data.source == "folder" and c.data.root:
        root = os.path.realpath(os.path.expanduser(c.data.root.strip()))
        inside = os.path.realpath(os.path.expanduser(workdir))
        need(
            os.path.commonpath([root, inside]) != root,
            f"--workdir {workdir} is inside data.root={c.data.root}: the run's files would be "
            "read as data (a class folder) by this and later runs; put the workdir outside the "
            "data folder",
        )
    if need(
        0 <= c.data.val_fraction < 1 and 0 <= c.data.test_fraction < 1,
        "data.val_fraction and data.test_fraction must be in [0, 1)",
    ):
        need(
            c.data.val_fraction > 0,
            "data.val_fraction must be > 0: the best epoch of each link is chosen on validation",
        )
        need(
            c.data.test_fraction > 0,
            "data.test_fraction must be > 0: results are reported on the test split",
        )
        need(
            c.data.val_fraction + c.data.test_fraction < 1,
            f"data.val_fraction + data.test_fraction = "
            f"{c.data.val_fraction + c.data.test_fraction:g} leaves no train pool; keep it "
            "below 1",
        )
    length_ok = need(c.chain.length >= 1, f"chain.length={c.chain.length} must be >= 1")
    fraction_ok = need(
        0 < c.chain.fraction <= 1,
        f"chain.fraction={c.chain.fraction} must be in (0, 1] (share of the train pool per link)",
    )
    if length_ok and fraction_ok:
        need(
            c.chain.length * c.chain.fraction <= 1 + 1e-9,
            f"chain.length x chain.fraction = {c.chain.length} x {c.chain.fraction} = "
            f"{c.chain.length * c.chain.fraction:g} > 1: the fractions must be disjoint; "
            f"use chain.fraction <= {1 / c.chain.length:.4g}",
        )
    need(
        0 < c.chain.label_ratio <= 1,
        f"chain.label_ratio={c.chain.label_ratio} must be in (0, 1]",
    )
    if length_ok:
        count = len(backbones(c))
        need(
            count == c.chain.length,
            f"model.backbone names {count} backbones for chain.length={c.chain.length}; "
            "give one name, or exactly one per link",
        )
    known = [
        name
        for name in dict.fromkeys(_backbone_names(c))  # checked whatever chain.length is
        if need(
            name in models.BACKBONES,
            f"model.backbone {name!r} is unknown; valid: {', '.join(models.BACKBONES)}",
        )
    ]
    stem_known = need(
        c.model.stem in models.STEMS,
        f"model.stem={c.model.stem!r} is unknown; valid: {', '.join(models.STEMS)}",
    )
    other_stem = " or use model.stem='small'" if c.model.stem != "small" else ""
    for name in known if stem_known else ():
        smallest = models.min_image_size(name, c.model.stem)
        need(
            c.data.image_size >= smallest,
            f"data.image_size={c.data.image_size} is too small for {name} with the "
            f"{c.model.stem!r} stem (needs >= {smallest}); raise data.image_size{other_stem}",
        )
    need(c.model.width >= 1, f"model.width={c.model.width} must be >= 1")
    need(
        c.model.dtype in ("float32", "bfloat16"),
        f"model.dtype={c.model.dtype!r} is unknown; valid: float32, bfloat16",
    )
    need(0 <= c.distill.alpha <= 1, f"distill.alpha={c.distill.alpha} must be in [0, 1]")
    need(
        c.distill.attention_weight >= 0,
        f"distill.attention_weight={c.distill.attention_weight} must be >= 0 (0 turns it off)",
    )
    need(c.distill.attention_p > 0, f"distill.attention_p={c.distill.attention_p} must be > 0")
    low, high = losses.TEMPERATURE_RANGE  # the loss sees a traced temperature: checked here
    for key in ("t_min", "t_max"):
        value = c.distill[key]
        need(
            low <= value <= high,
            f"distill.{key}={value} must be in {losses.TEMPERATURE_RANGE_TEXT} (a temperature; "
            "typical values are 1 to 20)",
        )
    need(
        c.distill.t_max >= c.distill.t_min,
        f"distill.t_max={c.distill.t_max} must be >= distill.t_min={c.distill.t_min} "
        "(the temperature anneals from t_max down to t_min)",
    )
    kinds = losses.SCHEDULE_KINDS
    need(
        c.distill.schedule in kinds,
        f"distill.schedule={c.distill.schedule!r} is unknown; valid: {', '.join(kinds)}",
    )
    need(
        c.distill.teacher_cache in ("auto", "on", "off"),
        f"distill.teacher_cache={c.distill.teacher_cache!r} is unknown; valid: auto, on, off",
    )
    need(
        not (c.distill.teacher_cache == "on" and c.train.augment),
        "distill.teacher_cache='on' needs train.augment=False: with random augmentation the "
        "teacher must see each step's augmented view. Set --config.train.augment=False, or "
        "distill.teacher_cache=auto (caches only when augmentation is off)",
    )
    need(
        c.distill.teacher_cache_max_gb > 0,
        f"distill.teacher_cache_max_gb={c.distill.teacher_cache_max_gb} must be > 0 (GB of host "
        "memory a link's teacher cache may take; default 4)",
    )
    need(c.train.epochs >= 1, f"train.epochs={c.train.epochs} must be >= 1")
    need(c.train.batch_size >= 1, f"train.batch_size={c.train.batch_size} must be >= 1")
    need(
        c.train.eval_batch_size >= 1,
        f"train.eval_batch_size={c.train.eval_batch_size} must be >= 1 (default 256)",
    )
    need(c.train.learning_rate > 0, f"train.learning_rate={c.train.learning_rate} must be > 0")
    need(c.train.weight_decay >= 0, f"train.weight_decay={c.train.weight_decay} must be >= 0")
    need(c.train.warmup_epochs >= 0, f"train.warmup_epochs={c.train.warmup_epochs} must be >= 0")
    need(
        c.train.optimizer in ("adamw", "sgd"),
        f"train.optimizer={c.train.optimizer!r} is unknown; valid: adamw, sgd",
    )
    need(c.train.eval_every >= 1, f"train.eval_every={c.train.eval_every} must be >= 1")
    need(
        c.train.checkpoint_every >= 1,
        f"train.checkpoint_every={c.train.checkpoint_every} must be >= 1",
    )
    need(
        0 <= c.train.momentum < 1,
        f"train.momentum={c.train.momentum} must be in [0, 1) (Nesterov momentum of sgd)",
    )
    need(c.train.max_shift >= 0, f"train.max_shift={c.train.max_shift} must be >= 0")
    need(
        0 <= c.train.intensity < 1,
        f"train.intensity={c.train.intensity} must be in [0, 1) (brightness offset and contrast "
        "factor 1 +- intensity; 0 = no intensity jitter)",
    )
    need(
        0 <= c.train.label_smoothing < 1,
        f"train.label_smoothing={c.train.label_smoothing} must be in [0, 1)",
    )
    for key in ("batch_size", "eval_batch_size") if trains else ():
        try:
            parallel.check_batch_size(c.train[key], f"train.{key}")
        except ValueError as e:
            need(False, str(e))
    if "tune" in c:
        from weckd_jax import tune  # here, not at the top: tune imports this module

        try:
            tune.check_section(c)
        except ConfigError as e:
            need(False, str(e))
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(
            f"the config has {len(problems)} problems, fix each:\n  " + "\n  ".join(problems)
        )


# Keys that change nothing a run computes, so a workdir may be resumed with other values
# (`tune.*` steers only `python -m weckd_jax.tune`, which checks its own section).
# distill.teacher_cache_max_gb picks only where the teacher runs (before the link or in every
# step, which train the same): a run may be resumed with a limit that fits the host it runs on
# now, and a run started before the key existed resumes. The cache of decoded images
# (data.cache_dir) holds exactly what decoding gives, and data.json checks the pixels anyway.
HARMLESS_KEYS = frozenset(
    {"train.checkpoint_every", "distill.teacher_cache_max_gb", "data.cache_dir"}
)
HARMLESS_PREFIXES = ("tune.",)


# Keys added to the config after runs were recorded without them, each with the value that
# gives what those runs computed: a record lacking one is read as holding that value, so runs,
# searches and evaluations written before the key existed are resumed, compared and reused.
ADDED_KEYS = {"baselines.same_fraction": False}  # the baseline did not exist: it did not run


def with_added_keys(record: dict) -> dict:
    """``record`` (a recorded config, as `as_json` gives) with every one of `ADDED_KEYS` it
    lacks set to that key's value; a copy, ``record`` is left as it is."""
    record = copy.deepcopy(record)
    for key, value in ADDED_KEYS.items():
        section, name = key.split(".")
        if isinstance(record.get(section), dict):
            record[section].setdefault(name, value)
    return record


def _counts(key: str) -> bool:
    return key not in HARMLESS_KEYS and not key.startswith(HARMLESS_PREFIXES)


def matching_key(name: str) -> str | None:
    """The dotted config key ``name`` stands for: the key itself (``chain.length``) or the last
    part of exactly one key (``epochs`` for ``train.epochs``); None when there is none."""
    keys = [key for key, _ in _leaves(base_config())]
    if name in keys:
        return name
    found = [key for key in keys if key.rsplit(".", 1)[-1] == name]
    return found[0] if len(found) == 1 else None


def differing_keys(saved: dict, current: dict) -> list[str]:
    """The dotted keys whose values differ between two configs (harmless keys excepted)."""
    old, new = dict(_leaves(saved)), dict(_leaves(current))
    missing = object()
    return [
        key
        for key in sorted(old.keys() | new.keys())
        if _counts(key) and old.get(key, missing) != new.get(key, missing)
    ]


def added_baselines(saved: dict, current: dict) -> list[str]:
    """The ``baselines.*`` keys off in ``saved`` (a ``config.json``) and on in ``current``. A run
    may gain a baseline: each job's seeds follow from its own index, not from which baselines
    run (`weckd_jax.chain.plan_jobs`), so the new baseline trains alone and every finished job
    stays valid. Switching one off is not among them (the run's results would lose it)."""
    old, new = saved.get("baselines", {}), current.get("baselines", {})
    return [f"baselines.{key}" for key in sorted(new) if old.get(key) is False and new[key] is True]


def dropped_baselines(saved: dict, current: dict) -> list[str]:
    """The ``baselines.*`` keys on in ``saved`` (a ``config.json``) and off in ``current``: what
    `added_baselines` allows, undone. A run lets only a baseline that never finished be switched
    off (`weckd_jax.chain.check_workdir`): its results never reported it."""
    return added_baselines(current, saved)


def differences(saved: dict, current: dict, keys: list[str] | None = None) -> list[str]:
    """``key: saved -> current`` for each of ``keys`` (default: `differing_keys`)."""
    old, new = dict(_leaves(saved)), dict(_leaves(current))
    keys = differing_keys(saved, current) if keys is None else keys
    return [f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}" for key in keys]


def restoring_overrides(saved: dict, keys: list[str]) -> str:
    """The command-line overrides (``--config.KEY=VALUE``, shell-quoted) that give ``keys``
    their values in ``saved`` (a ``config.json``) again: added to a command refused for a
    changed config, they make its config the saved one. Keys ``saved`` lacks are left out."""
    old = dict(_leaves(saved))
    return " ".join(shlex.quote(f"--config.{key}={old[key]}") for key in keys if key in old)


def newer_keys(saved: dict, current: dict) -> list[str]:
    """The keys of ``current`` that ``saved`` lacks (harmless keys excepted): keys the package
    gained after ``saved`` was written, since `validate` refuses any key it does not know."""
    old = dict(_leaves(saved))
    return sorted(key for key, _ in _leaves(current) if key not in old and _counts(key))


def from_run(folder: str) -> ml_collections.ConfigDict:
    """The config recorded in ``folder/config.json``: that of a run of ``launch``, of a
    multi-seed experiment or one of its ``seed_<s>/`` runs, or of a search of ``tune``
    (``--config configs/from_run.py:DIR``).

    Built on `base_config`, so every value keeps its key's type and ``--config.KEY=VALUE``
    overrides work as on any config file's. Keys that change nothing a run computes
    (`HARMLESS_KEYS`, ``tune.*``) and that the record lacks get their defaults, as a resumed run
    accepts them, and keys added since it was recorded (`ADDED_KEYS`) the value that gives what
    it computed. Any other key the record lacks (or has and this version does not) is refused:
    the record was written by another version of weckd_jax, and filling in this version's
    default would give a config that claims to be the run's but need not give its numbers.

    Raises:
      ConfigError: no folder given, the folder or its ``config.json`` missing, a record that
        cannot be read as JSON or is no JSON object, or one written by another version (keys or
        types that differ).
    """
    fix = "give the folder of a run or a search, e.g. --config configs/from_run.py:runs/NAME"
    folder = os.path.expanduser(folder)  # the shell leaves ~ after the colon as typed
    if not folder:
        raise ConfigError(f"configs/from_run.py needs the folder whose config to use; {fix}")
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        if os.path.basename(os.path.normpath(folder)) == "config.json":
            fix = f"give its folder: --config configs/from_run.py:{os.path.dirname(folder) or '.'}"
        raise ConfigError(f"configs/from_run.py:{folder}: {folder} {what}; {fix}")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        if seeds := workdirs.seed_names(folder):
            why = (
                "it is a multi-seed experiment whose first seed has not finished (its config.json "
                f"is written then); use a seed's run, e.g. {os.path.join(folder, seeds[0])}"
            )
        else:
            why = (
                "it is no folder of a run or search, or one stopped before its config and data "
                f"passed their checks (config.json is written then); {fix}"
            )
        raise ConfigError(f"{folder} holds no config.json: {why}")
    record = files.load_json(
        path,
        ConfigError,
        "restore it from a backup, or give the config file and overrides that started the run",
    )
    other_version = "it was written by another version of weckd_jax; use that version"
    config = base_config()
    saved, defaults = dict(_leaves(with_added_keys(record))), dict(_leaves(config))
    if unknown := [key for key in saved if key not in defaults]:
        raise ConfigError(
            f"{path} sets {', '.join(unknown)}, which this version's config does not have: "
            f"{other_version}"
        )
    if missing := [key for key in defaults if key not in saved and _counts(key)]:
        raise ConfigError(
            f"{path} lacks {', '.join(missing)}: it was written by an older version of "
            "weckd_jax, and this version's defaults for them need not give that run's numbers; "
            "use the version that wrote it"
        )
    try:
        config.update_from_flattened_dict(saved)
    except TypeError as e:
        raise ConfigError(f"{path}: {' '.join(str(e).split())}: {other_version}") from None
    return config
