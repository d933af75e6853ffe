"""Evaluates every trained link and baseline of a run on the data another config names.

    python -m weckd_jax.evaluate --workdir DIR --config CFG [--split test|val|train|all]
                                 [--name NAME] [--config.key=value ...]

Typical uses: external validation on another hospital's images (a ``folder`` config, with
``--split all``), or another split of the training data. The images are loaded as the config says
(``data.*``), but always at the trained ``image_size`` and ``channels``; ``--split`` picks the
images: ``all`` of them, or the ``train`` pool / ``val`` / ``test`` split that
`weckd_jax.data.splits.make_splits` computes from the config, exactly as a run with this config
would (same seed and fractions: the same split). With the run's own config and ``--split test``
the metrics equal the ``test`` entries of ``DIR/results.json``. ``--workdir`` and ``--config``
may start with ``~`` (the home folder), also as ``--workdir=~/runs/x``.

Batches of ``train.eval_batch_size`` images are rounded up to a multiple of the device count (the
run may have trained on another one); ``train.batch_size`` is not used.

Every class of the new data must be a class the models were trained on (matched by name; the new
data may hold fewer classes, in any order); otherwise the command stops with exit status 2.
Writes ``DIR/evaluations/<NAME>-<split>.json`` (``NAME``: the config file's name without ``.py`` and
``:ARG``) with one `weckd_jax.metrics.classification_metrics` dict per model under ``metrics``, and
prints a table next to each model's test accuracy in the run. An existing file written with another
config is never replaced (exit status 2: pass another ``--name``); for ``--split all`` the keys
that only choose the splits (``data.val_fraction``, ``data.test_fraction``, and ``seed`` unless
the data is synthetic) may differ, as they change no image evaluated, and for any split the
``baselines.*`` keys, as they choose no model (those evaluated are the ones ``results.json``
reports). The config's ``model`` and ``chain`` keys are replaced by the run's: the models
come from its checkpoints, each checked to hold the weights ``results.json`` reports (their
``fingerprint``) and to output one score per class it
names; these checks, and that of an existing output file's config, come before the data is loaded.
The run's own ``data.manifest`` read against another ``data.root`` (``from_run.py:DIR`` with a new
root keeps it) is refused unless it gives the run's own images: its labels would go to the other
folder's files of the same paths (folders and manifests are compared as files: the run's spelt
otherwise, relative or through a link, are the run's). When the data is the run's own (see
`chain.data_record`), the output counts the evaluated images the run trained on or selected epochs
on, and a note warns that such metrics are optimistic.
"""

from __future__ import annotations

from weckd_jax import startup  # noqa: F401 - first: a Ctrl-C while JAX loads ends in one line

# isort: split
import os
import sys
import unicodedata

import jax
import ml_collections
import numpy as np

from weckd_jax import chain, checkpoints, files, ops, parallel, predict
from weckd_jax import config as config_lib
from weckd_jax import data as data_lib
from weckd_jax.data import DataError
from weckd_jax.data.splits import SplitError
from weckd_jax.progress import Progress

__all__ = ["SPLITS", "EvaluateError", "evaluate_workdir", "main", "select"]

SPLITS = ("test", "val", "train", "all")


class EvaluateError(Exception):
    """A user error: the message names the problem and the fix (exit status 2)."""


# The fix for a run's damaged config.json or data.json: evaluate can do without them, as for a
# run that predates them.
_LOST_RECORD = (
    "restore it from a backup, or move it aside to evaluate the run as one that predates it "
    "(whether the evaluated images overlap its training images is then unknown)"
)


def _load_run(workdir: str) -> dict:

    try:
        return predict.load_results(workdir)
    except predict.PredictError as e:
        raise EvaluateError(str(e)) from None


def _models(results: dict) -> list[tuple[str, dict]]:
    """``(name, record)`` of every link, then every baseline."""
    return [(r["name"], r) for r in results["links"]] + list(results.get("baselines", {}).items())


def select(config, data, split: str):
    """Indices of ``split`` in ``data`` (as a run with ``config`` splits it) and the split level.

    Returns ``(index, split_by)``; ``split_by`` is ``None`` for ``all``.
    """
    if split == "all":
        return np.arange(len(data)), None
    splits = chain.make_run_splits(config, data)
    return getattr(splits, split), splits.split_by


def _label_map(trained: list[str], new: tuple[str, ...], source: str) -> np.ndarray:
    """``map[new_label] = trained_label``; every new class must be a trained one. Names match in
    any Unicode form (a class folder named on macOS spells "é" as "e" + an accent)."""
    trained = [unicodedata.normalize("NFC", n) for n in trained]
    new = tuple(unicodedata.normalize("NFC", n) for n in new)
    unknown = [n for n in new if n not in trained]
    if unknown:
        raise EvaluateError(
            f"the data of {source} has classes the models were not trained on: "
            f"{', '.join(unknown)}. Trained classes: {', '.join(trained)}. Rename the class "
            "folders (or manifest labels) to the trained names, or leave those images out."
        )
    return np.array([trained.index(n) for n in new], np.int64)


def _split_keys(config_json: dict) -> set[str]:
    """The keys of ``config_json`` (`weckd_jax.config.as_json`) that choose which images each
    split holds, not which images the data has: the split fractions, and the seed unless it
    generates the images (synthetic data)."""
    keys = {"data.val_fraction", "data.test_fraction"}
    return keys if config_json["data"]["source"] == "synthetic" else keys | {"seed"}


def _same_path(a: str, b: str) -> bool:
    """Whether two paths as a config gives them (``~``, relative to the current folder, ``""``
    for none) name the same file or folder: `os.path.samefile` where both exist (another
    spelling, a symbolic link, a case-insensitive disk), else the same normalised real path."""
    a, b = (os.path.expanduser(str(p or "").strip()) for p in (a, b))
    if not a or not b:
        return a == b
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _run_data(workdir: str) -> dict | None:
    """The ``data.json`` of the run in ``workdir`` (`chain.data_record`), read before the data is
    loaded so that a damaged one stops the command first; None when the run predates it (no file,
    or one written before its ``examples`` digest, which came with ``pixels``)."""
    path = os.path.join(workdir, "data.json")
    saved = files.load_json(path, EvaluateError, _LOST_RECORD)
    if saved is None or "examples" not in saved:
        return None
    return files.require_keys(saved, path, ("pixels",), EvaluateError, _LOST_RECORD)


def _overlap(
    saved: dict | None,
    run_config: dict | None,
    config_json: dict,
    data,
    index: np.ndarray,
    digests: dict,
):
    """What the run did with ``data.images[index]``, and a note when that is unknown.

    Returns ``(overlap, note)``: ``overlap`` holds ``same_data_as_run`` and the counts
    ``in_run_train_pool`` and ``in_run_val`` (evaluated images the run trained on, or chose its
    epochs on; ``None`` when unknown). The data is the run's own when its ``digests`` (
    `chain.data_record`) equal those in ``saved``, the run's ``data.json`` (`_run_data`) -- or,
    if only the pixels differ (another CPU, numpy or Pillow version), when this config names the
    same source. The run's splits are then recomputed from ``run_config``, its saved config, so
    another split, seed or fraction in the evaluation config cannot hide an overlap. Other data
    that shares some images with the run's is not detected.
    """
    unknown = {"same_data_as_run": None, "in_run_train_pool": None, "in_run_val": None}
    if saved is None or run_config is None:
        return unknown, (
            "this run keeps no record of its data (config.json or data.json is missing: it "
            "predates them), so whether these images overlap its training and validation images "
            "is unknown"
        )

    paths = ("root", "manifest")

    def source(c: dict) -> dict:
        # Not the keys evaluate sets or that change nothing, nor those that only choose splits:
        # the run's own splits are counted; the paths are compared as files, not as spelt.
        ignored = {"data.image_size", "data.channels", "data.cache_dir", *_split_keys(c)}
        ignored |= {f"data.{k}" for k in paths}
        keys = {"seed": c["seed"], **{f"data.{k}": v for k, v in c["data"].items()}}
        return {k: v for k, v in keys.items() if k not in ignored}

    same_source = source(run_config) == source(config_json) and all(
        _same_path(run_config["data"].get(k), config_json["data"].get(k)) for k in paths
    )
    other = {**unknown, "same_data_as_run": False}
    if saved["examples"] != digests["examples"]:
        if same_source:
            return other, (
                "this config names the run's data, but it changed since the run (other images, "
                "labels or groups): which of these images the run trained on cannot be counted, "
                "and these metrics may be optimistic"
            )
        return other, None
    if saved["pixels"] != digests["pixels"] and not same_source:
        return other, None  # e.g. synthetic images of another difficulty: other images
    # The run's data, but its splits may not be recomputable: then the counts are unknown.
    same_splits_unknown = {**unknown, "same_data_as_run": True}
    if "splits" not in saved:  # written before data.json kept it; the splitting changed since
        return same_splits_unknown, (
            "this run's data.json predates the record of its splits, and weckd_jax has cut data "
            "into splits differently since, so which of these images the run trained on cannot "
            "be counted; evaluate with the version that trained the run to count them"
        )
    splits = chain.make_run_splits(ml_collections.ConfigDict(run_config), data)
    if saved["splits"] != chain.splits_digest(splits):
        return same_splits_unknown, (
            "this version of weckd_jax cuts the run's data into other splits than the version "
            "that trained it, so which of these images the run trained on cannot be counted; "
            "evaluate with the version that trained the run to count them"
        )
    return {
        "same_data_as_run": True,
        "in_run_train_pool": int(np.isin(index, splits.train).sum()),
        "in_run_val": int(np.isin(index, splits.val).sum()),
    }, None


def _refuse_overwrite(
    path: str, config_json: dict, split: str, examples: str | None = None
) -> None:
    """Refuses to replace an evaluation of ``split`` made with another config (e.g. another
    hospital's data under the same config file name) or on other examples (the folder changed
    since); with ``examples=None`` (the data not loaded yet) only the config is compared. For
    ``all``, the `_split_keys` may differ: every image is evaluated whatever the splits; and the
    ``baselines.*`` keys may differ for any split."""
    fix = "pass --name NAME to keep it and write this evaluation beside it, or move it aside"
    existing = files.load_json(path, EvaluateError, fix)
    if existing is None:
        return
    saved = config_lib.with_added_keys(existing.get("config", {}))
    # They choose no model: those evaluated are the ones results.json reports, which a run never
    # loses. (The run's own config gains a baseline switched on, and loses one switched off
    # before it finished.)
    keys = [
        k for k in config_lib.differing_keys(saved, config_json) if not k.startswith("baselines.")
    ]
    if split == "all":
        keys = [k for k in keys if k not in _split_keys(config_json)]
    changed = config_lib.differences(saved, config_json, keys)
    if examples is not None and existing.get("data", {}).get("examples", examples) != examples:
        changed.append("the images, labels or groups of the data")
    if changed:
        raise EvaluateError(
            f"{path} holds an evaluation with another config (saved -> now: "
            f"{'; '.join(changed)}). Pass --name NAME to keep both, or delete the file to "
            "replace it."
        )


def _refuse_run_manifest_elsewhere(run_config: dict | None, config) -> None:
    """Refuses the run's own ``data.manifest`` read against another ``data.root`` (e.g.
    ``from_run.py:DIR --config.data.root=OTHER`` keeps the run's manifest), when that gives other
    images than the run's: the manifest's labels, listed for the run's folder, would be given to
    the files of the same paths under the other folder (a moved copy of the run's own images is
    its data, and not refused). Paths are compared as files and folders (`_same_path`), and an
    empty ``data.root`` is the manifest's folder, against which its paths are then read."""
    if run_config is None:
        return
    run_data = run_config["data"]
    manifest = str(run_data.get("manifest") or "")

    def base(root) -> str:
        given = str(root or "").strip()
        return given or os.path.dirname(os.path.abspath(os.path.expanduser(manifest.strip())))

    if (
        manifest
        and _same_path(config.data.manifest, manifest)
        and not _same_path(base(config.data.root), base(run_data["root"]))
    ):
        raise EvaluateError(
            f"data.manifest={manifest} is the run's manifest, listing the images and labels of "
            f"data.root={run_data['root'] or '(none)'}, but "
            f"data.root={config.data.root or '(none)'} now: the files of the same paths there "
            "would be evaluated with its labels. Fix: "
            "--config.data.manifest='' to read the class folders (or manifest.csv) of "
            f"{config.data.root}, or --config.data.manifest=CSV listing its images."
        )


def evaluate_workdir(
    workdir: str, config, *, split: str = "test", name: str = "eval", progress=None
) -> dict:
    """Evaluates every link and baseline of ``workdir`` on ``split`` of the data ``config`` names.

    Args:
      workdir: a finished run (``results.json``, ``checkpoints/``).
      config: a run config (`weckd_jax.config.base_config` layout); its ``data.image_size`` and
        ``data.channels`` are replaced by the trained ones.
      split: one of `SPLITS`.
      name: names the output file ``workdir/evaluations/<name>-<split>.json``.
      progress: optional `weckd_jax.progress.Progress` for the notes and the table.

    Returns:
      The dict written to the output file (also under the key ``path``, not written).

    Raises:
      EvaluateError, weckd_jax.config.ConfigError, weckd_jax.data.DataError,
      weckd_jax.data.splits.SplitError, weckd_jax.checkpoints.CheckpointError: with a message
        naming the problem.
    """

    if split not in SPLITS:
        raise EvaluateError(f"--split={split} is unknown; valid: {', '.join(SPLITS)}")
    if name in ("", ".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        # The output must stay inside workdir/evaluations/.
        raise EvaluateError(
            f"--name={name!r} is no file name: give a name without {os.sep!r}, e.g. "
            "--name=site_b (the output is evaluations/<name>-<split>.json in the run's folder)"
        )
    say = progress.print if progress is not None else (lambda *_: None)
    results = _load_run(workdir)
    models = _models(results)
    trained = results["data"]
    trained_names = list(trained["class_names"])
    size, channels = int(trained["image_size"]), int(trained["channels"])

    # The keys read from the run's config: its model, and its data and splits for the overlap.
    run_config = files.load_json(
        os.path.join(workdir, "config.json"),
        EvaluateError,
        _LOST_RECORD,
        required=("seed", "data", "model", "chain"),
    )
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if run_config is not None:
            # The models come from the checkpoints: check the data against the trained
            # architecture, not the evaluation config's own model keys.
            config.model.update(run_config["model"])
            config.chain.update(run_config["chain"])
        changed = [
            f"data.{key} {config.data[key]} -> {value}"
            for key, value in (("image_size", size), ("channels", channels))
            if config.data[key] != value and not (key == "channels" and config.data[key] == 0)
        ]
        config.data.image_size = size
        if config.data.source != "synthetic":
            config.data.channels = channels
    if changed:
        say(
            f"note: the models were trained at {size}x{size}x{channels}, so the images are read "
            f"at that size ({'; '.join(changed)})"
        )
    config_lib.validate(config, trains=False)
    path = os.path.join(workdir, "evaluations", f"{name}-{split}.json")
    config_json = config_lib.as_json(config)
    # Everything the workdir alone can refuse is checked before the (possibly long) data load.
    _refuse_overwrite(path, config_json, split)
    run_data = _run_data(workdir)
    mesh = parallel.data_mesh()
    shape = (size, size, channels)
    restored = [
        (model_name, record, *chain.restore_recorded(workdir, record, mesh, shape, trained_names))
        for model_name, record in models
    ]

    data = data_lib.load(config.data, seed=config.seed)
    if data.images.shape[1:] != (size, size, channels):
        raise EvaluateError(
            f"the data of {name} decodes to images of shape {data.images.shape[1:]}, but the "
            f"models were trained on {(size, size, channels)} (the synthetic modalities fix "
            "their channels: 1 for mri, 3 otherwise)"
        )
    data_names = list(data.class_names)
    label_map = _label_map(trained_names, data.class_names, name)
    index, split_by = select(config, data, split)
    if len(index) == 0:
        raise EvaluateError(f"the {split} split of {name} is empty")
    digests = chain.data_record(data)
    _refuse_overwrite(path, config_json, split, digests["examples"])
    overlap, overlap_note = _overlap(run_data, run_config, config_json, data, index, digests)
    if overlap["same_data_as_run"] is False:
        _refuse_run_manifest_elsewhere(run_config, config)
    # The new data in the trained class order: probabilities column k = trained class k.
    labels = label_map[data.labels]
    data = data_lib.ImageSet(images=data.images, labels=labels, class_names=tuple(trained_names))

    notes = []
    n_train, n_val = overlap["in_run_train_pool"], overlap["in_run_val"]
    if n_train:
        notes.append(
            f"{n_train} of the {len(index)} images are in this run's train pool: the models "
            "were trained on them (the links, one-step KD and the same-fraction baseline on "
            "their fractions, the other baselines on more), so these metrics are optimistic"
        )
    if n_val:
        notes.append(
            f"{n_val} of the {len(index)} images are in this run's val split, which chose each "
            "model's epoch: these metrics are optimistic; report test"
        )
    if overlap_note:
        notes.append(overlap_note)
    if config.data.source == "synthetic":
        notes.append("the data is synthetic: no clinical conclusion can be drawn")
    for note in notes:
        say(f"note: {note}")

    batch_size = parallel.device_multiple(config.train.eval_batch_size)
    out_models = {}
    for model_name, record, spec, variables in restored:
        _, m = chain.evaluate(spec, variables, data, index, batch_size=batch_size, mesh=mesh)
        out_models[model_name] = {
            **({"link": record["link"]} if "link" in record else {}),
            "name": model_name,
            "backbone": record.get("backbone", spec.backbone),
            "metrics": m,
            "run_test_accuracy": record.get("test", {}).get("accuracy"),
        }

    evaluation = {
        "workdir": os.path.abspath(workdir),
        "name": name,
        "split": split,
        "config": config_json,
        "data": {
            "source": config.data.source,
            "split_by": split_by,
            "n": int(len(index)),
            "class_names": trained_names,
            "data_class_names": data_names,
            "class_counts": np.bincount(labels[index], minlength=len(trained_names)).tolist(),
            "examples": digests["examples"],
            **overlap,
        },
        "notes": notes,
        "links": [v for v in out_models.values() if "link" in v],
        "baselines": {k: v for k, v in out_models.items() if "link" not in v},
        "devices": jax.device_count(),
    }
    if jax.process_index() == 0:
        files.write_json(path, evaluation)
    if progress is not None:
        print_table(progress, evaluation)
        progress.print(f"wrote {path}")
    return {**evaluation, "path": path}


def print_table(progress, evaluation: dict) -> None:
    """One row per model: metrics on the evaluated data next to the run's own test accuracy."""

    def num(v):
        return f"{v:>10.3f}" if v is not None else f"{'n/a':>10}"

    data = evaluation["data"]
    progress.print(
        f"{evaluation['name']} / {evaluation['split']}: {data['n']} images, per class "
        + ", ".join(
            f"{n} {c}" for n, c in zip(data["class_names"], data["class_counts"], strict=True)
        )
    )
    progress.print(
        f"{'':<18}{'backbone':<13}{'accuracy':>10}{'bal acc':>10}{'macro-F1':>10}"
        f"{'macro-AUC':>10}{'ECE':>10}{'run test':>10}"
    )
    rows = [(f"link {r['link']}", r) for r in evaluation["links"]]
    rows += list(evaluation["baselines"].items())
    for label, r in rows:
        m = r["metrics"]
        progress.print(
            f"{label:<18}{r['backbone']:<13}{num(m['accuracy'])}{num(m['balanced_accuracy'])}"
            f"{num(m['macro_f1'])}{num(m['macro_auc'])}{num(m['ece'])}"
            f"{num(r['run_test_accuracy'])}"
        )


HELP_FLAGS = frozenset({"-h", "-help", "--help", "--helpshort", "--helpfull", "-?"})


def _flags(argv: list[str]):
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file naming the data to evaluate on (required).",
        flag_values=values,
        lock_config=True,
        sys_argv=argv,  # the overrides are found in argv (sys.argv when run in-process otherwise)
    )
    flags.DEFINE_string("workdir", None, "The trained run's folder (required).", flag_values=values)
    flags.DEFINE_enum(
        "split", "test", list(SPLITS), "Which images of the data.", flag_values=values
    )
    flags.DEFINE_string(
        "name", None, "Output name (default: the config file's name).", flag_values=values
    )
    return values


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2 and one message on a user error)."""
    from absl import flags, logging
    from ml_collections import config_flags

    from weckd_jax import cli

    ops.configure_cpu_flags()  # before JAX starts a backend
    cli.keep_interrupts()
    argv = cli.expand_home(sys.argv if argv is None else argv, ("config", "workdir"))
    values = _flags(argv)
    if HELP_FLAGS & set(argv[1:]):  # as launch, tune and bench answer them (absl's app.run)
        print(f"{__doc__}\nflags:\n{values.get_help(include_special_flags=False)}")
        return 0

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        extra = cli.parse_config_flags(values, argv)
    except config_lib.ConfigError as e:
        return fail(str(e))
    except (AttributeError, KeyError) as e:  # what override_problem did not foresee
        return fail(f"unknown config key in a --config.KEY override: {' '.join(str(e).split())}")
    except flags.Error as e:
        return fail(cli.flag_error(e))
    if len(extra) > 1:
        return fail(cli.unexpected_arguments(extra[1:]))
    if values["workdir"].value is None or values["config"].value is None:
        return fail("--workdir and --config are required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    config_path = config_flags.get_config_filename(values["config"])
    name = values["name"].value or cli.config_name(config_path)
    try:
        evaluate_workdir(
            values["workdir"].value,
            values["config"].value,
            split=values["split"].value,
            name=name,
            progress=Progress(),
        )
    except (
        EvaluateError,
        config_lib.ConfigError,
        DataError,
        SplitError,
        checkpoints.CheckpointError,
    ) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        cli.interrupted("nothing was written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
