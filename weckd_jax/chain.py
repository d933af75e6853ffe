"""The WeCKD chain: links trained one after another, each taught by its predecessor(s) restored
from disk, plus the baselines that measure what the chain gains.

Side effects (checkpoints, ``metrics.jsonl``, progress lines) happen here, at the edge; the maths
lives in `weckd_jax.train` and `weckd_jax.losses`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from weckd_jax import checkpoints, figures, files, metrics, parallel, report, report_md, train
from weckd_jax import config as config_lib
from weckd_jax import data as data_lib
from weckd_jax import seeds as seeds_lib
from weckd_jax.data import pipeline
from weckd_jax.data import types as data_types
from weckd_jax.data.folder import check_enough, image_folder_sign
from weckd_jax.data.splits import Splits, make_splits
from weckd_jax.data.splits import digest as splits_digest
from weckd_jax.data.types import DataError, ImageSet
from weckd_jax.metrics_log import MetricsLog
from weckd_jax.progress import Progress, Timer
from weckd_jax.workdirs import STUDY_FILE, launch_run_sign, seed_dir, seed_names, study_path

PyTree = Any


class DivergenceError(RuntimeError):
    """Training diverged: a step or the validation predictions became NaN/Inf."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One network to train: a chain link or a baseline.

    Attributes:
      name: ``link_1`` ... or a baseline name; names the checkpoint folder.
      index: seeds the job's initialisation and data order; a link's number. The one-step KD
        and same-fraction baselines share the last link's, so that only their teachers (and,
        with ``chain.init_from_teacher``, the link they start from) differ.
      spec: the student's architecture.
      train_index: indices of its training images.
      label_mask: bool, one per training image: which keep their labels.
      teachers: names of the finished jobs whose weights teach it (restored from disk).
      init_from: name of a finished job whose weights initialise it, or None.
    """

    name: str
    index: int
    spec: train.ModelSpec
    train_index: np.ndarray
    label_mask: np.ndarray
    teachers: tuple[str, ...] = ()
    init_from: str | None = None


def step_config(config) -> train.StepConfig:
    return train.StepConfig(
        optimizer=config.train.optimizer,
        momentum=config.train.momentum,
        label_smoothing=config.train.label_smoothing,
        temperature_schedule=config.distill.schedule,
        attention_p=config.distill.attention_p,
        use_attention=config.distill.attention_weight > 0,
        augment=config.train.augment,
        flip=config.train.flip,
        max_shift=config.train.max_shift,
        intensity=config.train.intensity,
    )


def evaluate(
    spec: train.ModelSpec,
    variables: dict[str, PyTree],
    data: ImageSet,
    index: np.ndarray,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    timer: Timer | None = None,
) -> tuple[np.ndarray, dict]:
    """Class probabilities ``[len(index), K]`` and `metrics.classification_metrics` on ``index``."""
    probs = probabilities(
        spec, variables, data.images, index, batch_size=batch_size, mesh=mesh, timer=timer
    )
    return probs, metrics.classification_metrics(probs, data.labels[index])


def probabilities(
    spec: train.ModelSpec,
    variables: dict[str, PyTree],
    images: np.ndarray,
    index: np.ndarray,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    timer: Timer | None = None,
) -> np.ndarray:
    """Class probabilities ``[len(index), K]`` of the uint8 ``images[index]``."""
    if len(index) == 0:
        return np.zeros((0, spec.num_classes), np.float32)
    eval_step = train.make_eval_step(spec, mesh)
    return _padded_map(
        eval_step, variables, images, index, batch_size=batch_size, mesh=mesh, timer=timer
    )


def _timed_call(timer: Timer | None, phase: str | None, fn: Callable, *args) -> PyTree:
    """``fn(*args)`` for a jitted ``fn``, its seconds counted as ``phase`` (untimed when None or
    without a ``timer``). The call that compiles ``fn`` (its first) is waited for and counted as
    "compile" instead: every step, evaluation and teacher-cache program is timed here."""
    if timer is None:
        return fn(*args)
    if fn._cache_size() == 0:
        with timer("compile"):
            return jax.block_until_ready(fn(*args))
    with timer(phase) if phase is not None else contextlib.nullcontext():
        return fn(*args)


def _padded_map(fn, variables, images, index, *, batch_size: int, mesh, timer=None) -> PyTree:
    """``fn(variables, images[index])`` (a pytree of ``[len(index), ...]`` host arrays), run in
    fixed-size padded batches (one compiled program for any number of images), each process
    feeding its rows of every batch; ``fn`` (jitted) returns replicated arrays. ``index`` is not
    empty (the output shapes come from the first batch). With a ``timer``, the call that compiles
    ``fn`` is timed as "compile"."""
    result, start = None, 0
    for batch, valid in pipeline.eval_batches(images, index, batch_size=batch_size):
        local = parallel.process_rows(batch)
        images_in = parallel.global_batch({"image": local}, mesh)["image"]
        out = jax.device_get(_timed_call(timer, None, fn, variables, images_in))
        if result is None:
            # Filled batch by batch: concatenating at the end would hold every output twice (a
            # teacher cache can take gigabytes).
            result = jax.tree.map(lambda a: np.empty((len(index), *a.shape[1:]), a.dtype), out)
        for rows, part in zip(jax.tree.leaves(result), jax.tree.leaves(out), strict=True):
            rows[start : start + valid] = part[:valid]
        start += valid
    return result


def caches_teacher(config) -> bool:
    """Whether links compute their teachers' outputs once per example (``distill.teacher_cache``:
    "on", or "auto" when augmentation is off) instead of in every step."""
    mode = config.distill.teacher_cache
    return mode == "on" or (mode == "auto" and not config.train.augment)


def plan_teacher_caches(
    config, jobs: list[Job], image_shape: tuple[int, int, int], done: frozenset[str] = frozenset()
) -> tuple[frozenset[str], list[str]]:
    """The names of the ``jobs`` that cache their teachers' outputs, and a note for each job that
    `caches_teacher` would cache for but whose cache would take more host memory than
    ``distill.teacher_cache_max_gb``: under "auto" its teachers run inside the step instead.

    Sizes come from shapes (`train.teacher_output_bytes`): no teacher runs. Jobs named in
    ``done`` (finished: they will not train) are left out.

    Raises:
      config_lib.ConfigError: ``distill.teacher_cache`` is "on" and a job's cache would exceed
        the limit (naming its size, the limit and the fix).
    """
    if not caches_teacher(config):
        return frozenset(), []
    specs = {job.name: job.spec for job in jobs}
    step_cfg = step_config(config)
    limit_gb = config.distill.teacher_cache_max_gb
    cached, notes, sizes = set(), [], {}
    for job in jobs:
        if not job.teachers or job.name in done:
            continue
        teachers = tuple(specs[name] for name in job.teachers)
        if teachers not in sizes:  # traced once per set of teachers (links share theirs' shapes)
            sizes[teachers] = train.teacher_output_bytes(teachers, step_cfg, image_shape)
        per_image = sizes[teachers]
        size = per_image * len(job.train_index)
        if size <= limit_gb * 1e9:
            cached.add(job.name)
            continue
        what = (
            f"{job.name}'s teacher cache would take {_bytes_text(size)} of host memory "
            f"({len(job.train_index)} images x {_bytes_text(per_image)}), more than "
            f"distill.teacher_cache_max_gb={limit_gb:g}"
        )
        if config.distill.teacher_cache == "on":
            raise config_lib.ConfigError(
                f"{what}. Raise distill.teacher_cache_max_gb to {math.ceil(size / 1e8) / 10:g} "
                "or more if this host has the memory (each process holds its own cache), or "
                "start the run with distill.teacher_cache=auto, which then runs the teacher "
                "inside every step (the same training, slower)"
            )
        notes.append(
            f"note: {what}: its teacher runs inside every step instead (the same training, "
            "slower); raise distill.teacher_cache_max_gb to cache it"
        )
    return frozenset(cached), notes


def _bytes_text(n: float) -> str:
    """``n`` bytes in decimal units, three significant digits: "5.45 KB", "1.73 GB"."""
    for unit in ("B", "KB", "MB"):
        if n < 999.5:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} GB" if n < 999.5 else f"{n:.0f} GB"


def teacher_cache(
    specs: tuple[train.ModelSpec, ...],
    teacher_vars: tuple,
    step_cfg: train.StepConfig,
    data: ImageSet,
    index: np.ndarray,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    timer: Timer | None = None,
) -> dict:
    """The teachers' outputs on ``data.images[index]`` (see `train.teacher_outputs`), as host
    arrays with one row per entry of ``index``: what a ``cached_teacher`` step reads."""
    teacher_step = train.make_teacher_step(specs, step_cfg, mesh)
    return _padded_map(
        teacher_step,
        teacher_vars,
        data.images,
        index,
        batch_size=batch_size,
        mesh=mesh,
        timer=timer,
    )


def small_link_warning(name: str, images: int, batch_size: int, devices: int) -> str | None:
    """The warning for a job with fewer train images than one batch, or None."""
    if images >= batch_size:
        return None
    # The suggested size must itself divide over the devices (`parallel.check_batch_size`).
    fitting = images // devices * devices
    advice = f"Set train.batch_size to at most {fitting}, or give" if fitting else "Give"
    return (
        f"warning: {name} trains on {images} images, fewer than train.batch_size={batch_size}: "
        f"every step repeats images and an epoch is one step. {advice} the link more data."
    )


def train_job(
    job: Job,
    *,
    config,
    data: ImageSet,
    splits: Splits,
    mesh: jax.sharding.Mesh,
    workdir: str,
    progress: Progress,
    timer: Timer,
    metrics_log: MetricsLog,
    cache_teacher: bool = False,
    on_epoch: Callable[[str, int, dict], None] | None = None,
) -> None:
    """Trains ``job`` and saves the epoch with the best validation accuracy as its final checkpoint.

    Checkpoints every ``train.checkpoint_every`` steps and at each epoch end; when the job's train
    checkpoints already exist (an interrupted run), it continues from the newest one exactly.
    With ``cache_teacher`` (see `plan_teacher_caches`), its teachers' outputs are computed once
    per example before it trains instead of in every step.
    """
    cfg_train = config.train
    base_key = jax.random.fold_in(jax.random.key(config.seed), job.index)
    init_key, step_key = jax.random.split(base_key)
    batch_size = cfg_train.batch_size
    epoch_steps = pipeline.steps_per_epoch(len(job.train_index), batch_size)
    total_steps = epoch_steps * cfg_train.epochs
    image_shape = data.images.shape[1:]
    if warning := small_link_warning(job.name, len(job.train_index), batch_size, mesh.size):
        progress.print(warning)

    with timer("checkpoint"):
        teachers = [restore_finished(workdir, name, mesh, image_shape) for name in job.teachers]
        init_variables = None
        if job.init_from is not None:
            _, init_variables = restore_finished(workdir, job.init_from, mesh, image_shape)
    teacher_specs = tuple(spec for spec, _ in teachers)
    teacher_vars = parallel.replicate(tuple(v for _, v in teachers), mesh)

    step_cfg = step_config(config)
    extras = None
    if cache_teacher:
        with timer("train"):
            extras = teacher_cache(
                teacher_specs,
                teacher_vars,
                step_cfg,
                data,
                job.train_index,
                batch_size=cfg_train.eval_batch_size,
                mesh=mesh,
                timer=timer,
            )
        step_cfg = dataclasses.replace(step_cfg, cached_teacher=True)
    with timer("compile"):
        state = train.init_state(
            job.spec,
            step_cfg,
            init_key,
            image_shape,
            hparams(config, len(job.teachers), epoch_steps),
            init_variables,
        )
    state = parallel.replicate(state, mesh)
    step_fn = train.make_train_step(job.spec, teacher_specs, step_cfg, mesh)
    step_teacher_vars = () if step_cfg.cached_teacher else teacher_vars
    dataset = pipeline.train_pipeline(
        data,
        job.train_index,
        job.label_mask,
        batch_size=batch_size,
        total_steps=total_steps,
        seed=config.seed * 1009 + job.index,
        extras=extras,
    )
    batches = iter(dataset.to_iter_dataset())

    # Host-side loop state, saved with every checkpoint (JSON) next to the arrays.
    loop = {
        "best_epoch": 0,
        "best_accuracy": -1.0,
        "best_nll": None,
        "best_val": None,
        "epoch_metrics": [],
    }
    best_variables = jax.tree.map(lambda x: x.copy(), state.variables)  # the step donates state
    with checkpoints.TrainCheckpoints(workdir, job.name) as saver:
        start = saver.latest_step()
        if start is not None:
            with timer("checkpoint"):
                arrays, best_variables, loop = saver.restore(start, state, state.variables, batches)
            state = state.replace(step=parallel.replicate(np.int32(start), mesh), **arrays)
            metrics_log.drop_after(job.name, start)
            progress.print(f"{job.name}: resuming from step {start} of {total_steps}")

        eval_kw = {"batch_size": cfg_train.eval_batch_size, "mesh": mesh, "timer": timer}
        progress.start(job.name, cfg_train.epochs)
        # images/s of a window of steps: its wall seconds less those the timer counted as compile
        pending, window = [], (time.perf_counter(), timer.total("compile"))
        for step in range(start or 0, total_steps):
            with timer("data"):
                batch = parallel.global_batch(next(batches), mesh)
            state, m = _timed_call(
                timer, "train", step_fn, state, step_teacher_vars, batch, step_key
            )
            pending.append(m)
            done = step + 1
            epoch_end = done % epoch_steps == 0
            if not (epoch_end or done % cfg_train.checkpoint_every == 0):
                continue
            with timer("train"):
                fetched = jax.device_get(pending)
            _check_finite(job.name, epoch_steps, done - len(fetched), fetched)
            loop["epoch_metrics"] += [{k: float(v) for k, v in f.items()} for f in fetched]
            seconds = time.perf_counter() - window[0] - (timer.total("compile") - window[1])
            throughput = len(pending) * batch_size / max(seconds, 1e-9)
            pending = []
            if epoch_end:
                epoch = done // epoch_steps
                record = _epoch_record(job, epoch, done, loop["epoch_metrics"], throughput)
                loop["epoch_metrics"] = []
                if epoch % cfg_train.eval_every == 0 or epoch == cfg_train.epochs:
                    with timer("eval"):
                        probs = probabilities(
                            job.spec, state.variables, data.images, splits.val, **eval_kw
                        )
                    _check_predictions(job.name, epoch, probs)
                    val = metrics.classification_metrics(probs, data.labels[splits.val])
                    record["val_accuracy"], record["val_nll"] = val["accuracy"], val["nll"]
                    if _better(val, loop):
                        loop.update(
                            best_epoch=epoch,
                            best_accuracy=val["accuracy"],
                            best_nll=val["nll"],
                            best_val=val,
                        )
                        best_variables = jax.tree.map(lambda x: x.copy(), state.variables)
            with timer("checkpoint"):
                saver.save(done, state, best_variables, loop, batches)
            if epoch_end:
                metrics_log.write(record)
                progress.update(record, epoch)
                if on_epoch is not None:
                    on_epoch(job.name, epoch, record)
            window = (time.perf_counter(), timer.total("compile"))
        progress.finish()
        with timer("checkpoint"):
            saver.wait()

    meta = {
        "name": job.name,
        "spec": dataclasses.asdict(job.spec),
        "best_epoch": loop["best_epoch"],
        "val": loop["best_val"],
        "teacher_fingerprints": [checkpoints.fingerprint(v) for v in teacher_vars],
    }
    with timer("checkpoint"):
        checkpoints.save_final(workdir, job.name, best_variables, meta)


def hparams(config, num_teachers: int, steps_per_epoch: int) -> dict:
    """The float hyper-parameters the train step reads from its state."""
    values = {
        "learning_rate": config.train.learning_rate,
        "weight_decay": config.train.weight_decay,
        "warmup_steps": config.train.warmup_epochs * steps_per_epoch,
        "total_steps": config.train.epochs * steps_per_epoch,
        "alpha": config.distill.alpha,
        "beta": config.distill.attention_weight,
        "t_max": config.distill.t_max,
        "t_min": config.distill.t_min,
    }
    if num_teachers > 1:
        values["teacher_weights"] = np.full(num_teachers, 1.0 / num_teachers)
    return values


def _better(val: dict, loop: dict) -> bool:
    """Higher validation accuracy wins; equal accuracy is broken by lower NLL."""
    if loop["best_nll"] is None:
        return True
    return (val["accuracy"], -val["nll"]) > (loop["best_accuracy"], -loop["best_nll"])


def _epoch_record(job: Job, epoch: int, step: int, step_metrics: list[dict], throughput) -> dict:
    """The ``metrics.jsonl`` line of one epoch: means of the step metrics; ``accuracy`` over the
    epoch's labelled examples (steps weighted by their count, so a batch without labels, possible
    with ``chain.label_ratio`` < 1, does not count as 0)."""
    labelled = np.array([m["labelled"] for m in step_metrics])
    summary = {
        k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0] if k != "labelled"
    }
    correct = sum(m["accuracy"] * n for m, n in zip(step_metrics, labelled, strict=True))
    summary["accuracy"] = float(correct / max(labelled.sum(), 1.0))
    if job.teachers:
        summary["temperature"] = step_metrics[-1]["temperature"]
    else:  # no teacher, no distillation terms
        for key in ("temperature", "kd", "at"):
            del summary[key]
    return {"run": job.name, "epoch": epoch, "step": step, **summary, "images_per_s": throughput}


def _check_finite(name: str, epoch_steps: int, first_step: int, step_metrics: list) -> None:
    """Stops the job at the first step whose loss, gradients or new state held a NaN/Inf."""
    for i, m in enumerate(step_metrics):
        if m["nonfinite"] > 0:
            step = first_step + i + 1
            epoch = (step - 1) // epoch_steps + 1
            raise DivergenceError(
                f"{name}: the loss, the gradients, the weights or the BatchNorm statistics became "
                f"NaN/Inf at epoch {epoch}, step {step} (loss={float(m['loss'])}, "
                f"grad_norm={float(m['grad_norm'])}). Nothing from that "
                "step on was saved and the last checkpoint is intact; lower train.learning_rate or "
                "raise distill.t_min or train.warmup_epochs, and start a new workdir."
            )


def _check_predictions(name: str, epoch: int, probs: np.ndarray) -> None:
    """Stops the job when its validation predictions are NaN/Inf while its training steps were
    finite (eval-mode logits overflow on weights grown too large)."""
    if not np.isfinite(probs).all():
        raise DivergenceError(
            f"{name}: the validation predictions became NaN/Inf after epoch {epoch}, although "
            "every training step was finite: the weights grew too large. That epoch was not "
            "saved and the last checkpoint is intact; lower train.learning_rate or raise "
            "train.weight_decay, and start a new workdir."
        )


def restore_finished(
    workdir: str, name: str, mesh: jax.sharding.Mesh, image_shape: tuple[int, ...]
) -> tuple[train.ModelSpec, dict[str, PyTree]]:
    """A finished job's architecture and weights, read from its final checkpoint on disk."""
    spec = train.ModelSpec(**checkpoints.read_final_meta(workdir, name)["spec"])
    dummy = np.zeros((1, *image_shape), np.float32)
    shapes = jax.eval_shape(lambda: spec.build().init(jax.random.key(0), dummy, train=False))
    variables, _ = checkpoints.restore_final(workdir, name, checkpoints.abstract_like(shapes, mesh))
    return spec, variables


def restore_recorded(
    workdir: str,
    record: dict,
    mesh: jax.sharding.Mesh,
    image_shape: tuple[int, ...],
    class_names: Sequence[str],
) -> tuple[train.ModelSpec, dict[str, PyTree]]:
    """`restore_finished` for the model a ``results.json`` entry (``record``) reports, checked to
    be that model: its final checkpoint must exist, output one score per class of
    ``class_names`` (``results.json``'s ``data.class_names``) and its weights must have the
    record's ``fingerprint`` (when it has one). The one check of a finished run's models, for
    every tool that reads them (`weckd_jax.predict`, `weckd_jax.evaluate`).

    Raises:
      checkpoints.CheckpointError: the checkpoint is missing, cannot be read, has another number
        of classes, or holds other weights (copied from another run, or altered since), whose
        outputs would pass for the reported model's.
    """
    name = record["name"]
    final = checkpoints.final_dir(workdir, name)
    if not checkpoints.has_final(workdir, name):
        raise checkpoints.CheckpointError(
            f"{workdir} has no final checkpoint for {name} ({final}), which its results.json "
            "reports: the checkpoints were moved or deleted. Fix: put the run's own "
            f"checkpoints/{name} back, or point --workdir at the run folder that holds them."
        )
    spec, variables = restore_finished(workdir, name, mesh, image_shape)
    if spec.num_classes != len(class_names):
        # Column k of the outputs would be read as class_names[k]: every name would be wrong.
        raise checkpoints.CheckpointError(
            f"the checkpoint {final} outputs {spec.num_classes} classes but "
            f"{os.path.join(workdir, 'results.json')} names {len(class_names)} "
            f"({', '.join(class_names)}): they are from different runs. Fix: point --workdir at "
            "the folder launch wrote, with its results.json and checkpoints unchanged."
        )
    expected, found = record.get("fingerprint"), checkpoints.fingerprint(variables)
    if expected is not None and found != expected:
        raise checkpoints.CheckpointError(
            f"the final checkpoint of {name} ({final}) holds other weights than the {name} "
            f"that {os.path.join(workdir, 'results.json')} reports "
            f"(fingerprint {found[:12]}, reported {expected[:12]}): it was replaced or altered "
            f"after the run finished. Fix: put the run's own checkpoints/{name} back, or point "
            "--workdir at the run these checkpoints come from."
        )
    return spec, variables


def load_checked(config) -> tuple[ImageSet, Splits]:
    """The data ``config`` names and the run's splits of it, checked to be enough for every
    split and fraction (`DataError` / `SplitError` otherwise)."""
    data = data_lib.load(config.data, seed=config.seed)
    splits = make_run_splits(config, data)
    check_enough(
        data,
        splits,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        fraction=config.chain.fraction,
    )
    return data, splits


def make_run_splits(config, data: ImageSet) -> Splits:
    """The train/val/test split and chain fractions a run with ``config`` uses on ``data``."""
    return make_splits(
        data.labels,
        data.groups,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        num_fractions=config.chain.length,
        fraction=config.chain.fraction,
        label_ratio=config.chain.label_ratio,
        seed=config.seed,
        fixed_split=data.split,
    )


def plan_jobs(config, splits: Splits, num_classes: int) -> list[Job]:
    """The links of the chain, then the enabled baselines, in training order.

    Baselines: ``same_fraction`` (the last link's job with no teacher and a random
    initialisation), ``union_supervised`` (the last link's backbone, supervised on the union of
    the fractions with the chain's labels), ``full_supervised`` (on the whole train pool) and
    ``one_step_kd`` (the last link's job with link 1 as its only teacher). A job's ``index`` does
    not depend on which baselines are enabled: turning one on changes no other job."""
    names = config_lib.backbones(config)
    specs = [
        train.ModelSpec(
            backbone=name,
            num_classes=num_classes,
            width=config.model.width,
            stem=config.model.stem,
            dtype=config.model.dtype,
        )
        for name in names
    ]
    jobs = []
    for k in range(1, config.chain.length + 1):
        if k == 1:
            teachers = ()
        elif config.chain.dense:
            teachers = tuple(f"link_{j}" for j in range(1, k))
        else:
            teachers = (f"link_{k - 1}",)
        warm = config.chain.init_from_teacher and k > 1 and specs[k - 1] == specs[k - 2]
        jobs.append(
            Job(
                name=f"link_{k}",
                index=k,
                spec=specs[k - 1],
                train_index=splits.fractions[k - 1],
                label_mask=splits.label_masks[k - 1],
                teachers=teachers,
                init_from=f"link_{k - 1}" if warm else None,
            )
        )
    last, last_link = specs[-1], jobs[-1]
    if runs_baseline(config, "same_fraction"):
        jobs.append(
            dataclasses.replace(last_link, name="same_fraction", teachers=(), init_from=None)
        )
    if config.baselines.union_supervised:
        jobs.append(
            Job(
                name="union_supervised",
                index=config.chain.length + 1,
                spec=last,
                train_index=splits.union,
                label_mask=np.concatenate(splits.label_masks),
            )
        )
    if config.baselines.full_supervised:
        jobs.append(
            Job(
                name="full_supervised",
                index=config.chain.length + 2,
                spec=last,
                train_index=splits.train,
                label_mask=np.ones(len(splits.train), bool),
            )
        )
    if runs_baseline(config, "one_step_kd"):
        warm = config.chain.init_from_teacher and specs[0] == last
        jobs.append(
            dataclasses.replace(
                last_link,
                name="one_step_kd",
                teachers=("link_1",),
                init_from="link_1" if warm else None,
            )
        )
    return jobs


# The baselines that need a chain of at least this many links: with fewer, a link is that model
# (with 1 link, link 1 is the same-fraction baseline bit for bit; with 2, link 2 is link 1
# distilled in one step).
MIN_LINKS = {"same_fraction": 2, "one_step_kd": 3}
# What a run asked for such a baseline says when its chain is too short.
_TOO_SHORT_NOTES = {
    "one_step_kd": (
        "note: no one-step KD baseline with chain.length < 3 (link 2 is link 1 distilled in "
        "one step already); set baselines.one_step_kd=False to silence this"
    ),
    "same_fraction": (
        "note: no same-fraction baseline with chain.length 1 (link 1 is the last link's "
        "backbone on its fraction without a teacher already); set "
        "baselines.same_fraction=False to silence this"
    ),
}


def runs_baseline(config, name: str) -> bool:
    """Whether the run trains baseline ``name`` (``baselines.<name>``): asked for, and a chain
    long enough for it (`MIN_LINKS`)."""
    return config.baselines[name] and config.chain.length >= MIN_LINKS.get(name, 1)


def _idle_baselines(saved: dict, config) -> list[str]:
    """The ``baselines.*`` keys of the baselines that neither ``config`` nor the ``saved`` run
    (a ``config.json`` with the same ``chain.length``) trains, its chain being too short
    (`MIN_LINKS`): on or off, they change nothing, as the run's note says. (A key the record
    lacks is no such change: the run was started by another version.)"""
    if saved.get("chain", {}).get("length") != config.chain.length:
        return []
    recorded = saved.get("baselines", {})
    return [
        f"baselines.{name}"
        for name, links in MIN_LINKS.items()
        if config.chain.length < links and name in recorded
    ]


def _unfinished_drops(
    saved: dict, now: dict, workdir: str, seeds: list[str]
) -> tuple[list[str], dict[str, str]]:
    """The `config.dropped_baselines` (on in ``saved``, the record of ``workdir``; off ``now``)
    that have not finished in ``workdir`` nor in any of its ``seeds`` (its ``seed_<s>/`` runs):
    no results reported them, so they may be switched off (their jobs change no other). Also,
    for each one that has finished, why switching it off is refused."""
    folders = [workdir] + [os.path.join(workdir, name) for name in seeds]
    unfinished, finished = [], {}
    for key in config_lib.dropped_baselines(saved, now):
        done = [f for f in folders if _finished(f, key.split(".", 1)[1])]
        if done:
            finished[key] = f"finished in {', '.join(done)}: the results would lose it"
        else:
            unfinished.append(key)
    return unfinished, finished


def data_record(data: ImageSet, splits: Splits | None = None) -> dict:
    """What ``data.json`` holds: the data's fingerprint (`data.types.fingerprint`: ``examples``
    and ``pixels`` digests), image count and classes; with ``splits``, also their digest
    (``splits``, `data.splits.digest`)."""
    record = {
        **data_types.fingerprint(data),
        "images": len(data),
        "class_names": list(data.class_names),
    }
    if splits is not None:
        record["splits"] = splits_digest(splits)
    return record


def _write_new(path: str, value) -> None:
    """Writes ``value`` as JSON to ``path`` unless a file is there already (never replaced)."""
    with contextlib.suppress(FileExistsError):
        files.write_json(path, value, replace=False)


def _write_config(path: str, config) -> None:
    """Writes ``config`` to the ``config.json`` at ``path`` when none is there. Over the record of
    a run (or of a multi-seed experiment) that ``config`` has passed `check_workdir` against,
    sets the baselines, and an experiment's seeds, as ``config`` has them (the changes
    `check_workdir` allows besides keys that change nothing) and changes nothing else: the record
    then refuses switching off a baseline once it has finished, which would drop it from the
    run's results."""
    now = config_lib.as_json(config)
    _write_new(path, now)
    saved = config_lib.with_added_keys(files.read_json(path))
    updated = {**saved, "baselines": now["baselines"], "seeds": now["seeds"]}
    if updated != saved:
        files.write_json(path, updated)


# The fix for a damaged config.json or data.json of a run or an experiment (weckd_jax never
# rewrites it: a resumed run is checked against it).
_LOST_RECORD = (
    "restore it from a backup, or use a new --workdir (the run cannot resume without it: it "
    "records the config and data the run started with)"
)


def check_workdir(config, workdir: str) -> list[str]:
    """Refuses a workdir that holds a run with another config (``config.json``; switching a
    baseline on is allowed, see `config.added_baselines`, and so is switching one off that has
    not finished, `_unfinished_drops`, or any change of a baseline the chain is too short to
    train, `_idle_baselines`): resuming it would mix two experiments; one that is no run's
    folder: a search's (``study.db``) or a folder of images; and, for a single run, a multi-seed
    experiment's folder. Cheap: called before any data is loaded.

    Returns:
      The notes to print: one per baseline switched off before it finished.
    """
    if os.path.exists(study_path(workdir)):
        raise config_lib.ConfigError(
            f"{workdir} is the folder of a hyper-parameter search (it holds {STUDY_FILE}); a run "
            "there would mix its files with the search's. The search's best config trained "
            f"once more is in {os.path.join(workdir, 'best')}; choose a new --workdir for a run"
        )
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        # An experiment writes its own config.json only once its first seed has finished.
        if not config_lib.seed_list(config) and seed_names(workdir):
            raise config_lib.ConfigError(
                f"{workdir} holds {launch_run_sign(workdir)}; a single run there would mix its "
                "files with the experiment's. Continue the experiment with its own "
                "--config.seeds, or choose a new --workdir for the single run"
            )
        if images := image_folder_sign(workdir):
            raise config_lib.ConfigError(
                f"{workdir} holds images ({images}), not a run: checkpoints and results "
                "written there would be read as a class folder by a later run on these "
                "images. Choose a new --workdir (data.root names the images to train on)"
            )
        return []
    saved = config_lib.with_added_keys(files.load_json(path, config_lib.ConfigError, _LOST_RECORD))
    now = config_lib.as_json(config)
    idle = _idle_baselines(saved, config)
    seeds = seed_names(workdir)
    dropped, finished = _unfinished_drops(saved, now, workdir, seeds)
    allowed = config_lib.added_baselines(saved, now) + idle + dropped
    keys = [key for key in config_lib.differing_keys(saved, now) if key not in allowed]
    if saved.get("seeds") and config_lib.seed_list(config):
        # A multi-seed experiment may gain or drop seeds: each seed_<s>/ is checked on its own.
        keys = [key for key in keys if key != "seeds"]
    if not keys:
        where = f"{workdir} or any of its seeds" if seeds else workdir
        return [
            f"note: {key} is switched off: it never finished in {where}, so no results lose "
            "it; its in-training checkpoints, if any, are kept, and switching it on again "
            "resumes it"
            for key in dropped
            if key not in idle
        ]
    if newer := config_lib.newer_keys(saved, now):
        fix = (
            f"The run was started by an older weckd_jax, without {', '.join(newer)}: finish it "
            "with the version that started it, or use a new --workdir."
        )
    else:
        fix = (
            "Use a new --workdir for the new config, or resume this run with its saved values "
            f"(in {path}) by adding: {config_lib.restoring_overrides(saved, keys)}"
        )
    changed = [
        line + (f" ({finished[key]})" if key in finished else "")
        for key, line in zip(keys, config_lib.differences(saved, now, keys), strict=True)
    ]
    raise config_lib.ConfigError(
        f"{workdir} holds a run with another config; resuming it would mix two "
        "experiments. Differences (saved -> now):\n  " + "\n  ".join(changed) + "\n" + fix
    )


def bind_workdir(config, workdir: str, data: ImageSet, splits: Splits, writer: bool) -> str | None:
    """Binds ``workdir`` to ``data`` and its ``splits`` as well as ``config`` (whose
    `check_workdir` has passed): refuses a workdir whose ``data.json`` names other examples or
    other splits, then writes ``config.json`` and ``data.json`` where they are missing (and
    records ``config``'s baselines in ``config.json``, `_write_config`). Returns a
    warning when only the decoded pixels differ (same examples, so the same splits). Called once
    the data has passed its checks, so a run that stops on a config or data error leaves the
    workdir free for the corrected command."""
    record = data_record(data, splits)
    path = os.path.join(workdir, "data.json")
    warning = None
    saved = files.load_json(path, DataError, _LOST_RECORD)
    if saved is not None:
        if saved.get("examples", record["examples"]) != record["examples"]:
            raise DataError(
                f"{workdir} holds a run on other data: {_what_differs(saved, record)}. Resuming "
                "would mix two experiments (a finished link could even have trained on what is "
                "now test data). Use a new --workdir for the new data, or restore the data the "
                "run started on."
            )
        if saved.get("splits", record["splits"]) != record["splits"]:
            raise DataError(
                f"{workdir} holds a run on the same data but other splits: this version of "
                "weckd_jax cuts the train/val/test splits, fractions or label masks differently "
                "from the version that started the run. Resuming would mix two experiments. "
                "Finish the run with the version that started it, or use a new --workdir."
            )
        if saved.get("pixels", record["pixels"]) != record["pixels"]:
            warning = (
                f"warning: the images decode to other pixels than when the run in {workdir} "
                "started (same images, labels and groups, so the same splits): another CPU, "
                "numpy or Pillow version rounds differently, or images were edited in place. "
                "Resuming."
            )
    if writer:
        os.makedirs(workdir, exist_ok=True)
        _write_config(os.path.join(workdir, "config.json"), config)
        _write_new(path, record)
    return warning


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What `prepare` gives a run or a search: its checked data and splits, its jobs, the names
    of the jobs that cache their teachers' outputs (and a note per job whose cache is too big),
    and `bind_workdir`'s warning, if any."""

    data: ImageSet
    splits: Splits
    jobs: list[Job]
    cached: frozenset[str]
    cache_notes: list[str]
    warning: str | None


def prepare(config, workdir: str, writer: bool) -> Prepared:
    """Loads and checks the data, plans the jobs and their teacher caches, then binds
    ``workdir``: a config, data or cache size refused before the binding leaves the workdir free
    for the corrected command. Jobs already finished in ``workdir`` need no cache."""
    data, splits = load_checked(config)
    jobs = plan_jobs(config, splits, data.num_classes)
    done = frozenset(job.name for job in jobs if _finished(workdir, job.name))
    cached, notes = plan_teacher_caches(config, jobs, data.images.shape[1:], done)
    warning = bind_workdir(config, workdir, data, splits, writer)
    return Prepared(data, splits, jobs, cached, notes, warning)


def _what_differs(saved: dict, now: dict) -> str:
    """How two `data_record`s with different examples differ, for a message."""
    if saved.get("images") != now["images"]:
        return f"it started on {saved.get('images')} images, the data has {now['images']} now"
    if saved.get("class_names") != now["class_names"]:
        return (
            f"its classes were {', '.join(saved.get('class_names', []))}, they are "
            f"{', '.join(now['class_names'])} now"
        )
    return "the same number of images now carries other labels, groups or fixed splits"


def run(
    config,
    workdir: str,
    progress: Progress,
    *,
    use_test: bool = True,
    on_epoch: Callable[[str, int, dict], None] | None = None,
) -> dict:
    """Runs the chain and its baselines in ``workdir``; returns (and writes) ``results.json``.

    Args:
      use_test: evaluate every model on the test split (and write figures and ``report.md``).
        ``False`` never touches the test split: hyper-parameter searches run this way, and their
        results hold validation metrics only (``"test_evaluated": false``).
      on_epoch: called as ``on_epoch(job_name, epoch, record)`` after every epoch of every job
        with its ``metrics.jsonl`` record (``val_accuracy`` on validation epochs); an exception
        it raises (e.g. a pruned trial) stops the run.

    Raises:
      files.BusyError: another process runs in ``workdir`` now.
    """
    with _exclusive(workdir):
        return _run(config, workdir, progress, use_test=use_test, on_epoch=on_epoch)


@contextlib.contextmanager
def _exclusive(workdir: str):
    """The lock on ``workdir`` that keeps a second run out of it, held by the writing process
    (process 0). When it is taken, every process raises `files.BusyError`: the others would
    otherwise go on alone and stall at their first collective."""
    with contextlib.ExitStack() as lock:
        busy = None
        if jax.process_index() == 0:
            try:
                lock.enter_context(files.exclusive_folder(workdir))
            except files.BusyError as e:
                busy = e
        if jax.process_count() > 1:
            taken = multihost_utils.broadcast_one_to_all(np.int32(busy is not None))
            if taken and busy is None:
                busy = files.BusyError(
                    f"{workdir} is in use by another run (process 0 found it locked); wait for "
                    "it to end, or choose another --workdir"
                )
        if busy is not None:
            raise busy
        yield


def _run(config, workdir: str, progress: Progress, *, use_test: bool, on_epoch) -> dict:
    """`run`, in a ``workdir`` this process has to itself."""
    start = time.perf_counter()
    timer = Timer()
    writer = jax.process_index() == 0
    for note in check_workdir(config, workdir):  # before loading any data
        progress.print(note)

    with timer("data"):
        prepared = prepare(config, workdir, writer)
    if writer:  # marks the folder as a run's from its binding on (workdirs.launch_run_sign)
        os.makedirs(_jobs_dir(workdir), exist_ok=True)
    data, splits, jobs = prepared.data, prepared.splits, prepared.jobs
    if prepared.warning:
        progress.print(prepared.warning)
    report.print_data_summary(progress, data, splits)
    for note in prepared.cache_notes:
        progress.print(note)
    mesh = parallel.data_mesh()
    for name, note in _TOO_SHORT_NOTES.items():
        if config.baselines[name] and not runs_baseline(config, name):
            progress.print(note)
    eval_kw = {"batch_size": config.train.eval_batch_size, "mesh": mesh, "timer": timer}

    records, test_probs = {}, {}
    metrics_log = MetricsLog(workdir, progress.print, enabled=writer)
    reloaded_all = True
    # The keys of a finished job's record that the results, the report and the tables read.
    required = ("name", "backbone", "n_train", "n_labelled", "val", *(["test"] if use_test else []))
    for job in jobs:
        record_path = _record_path(workdir, job.name)
        fix = (
            "restore it from a backup, or move it aside and rerun the same command, which "
            f"evaluates {job.name} again from its final checkpoint and writes the record anew"
        )
        record = files.load_json(record_path, checkpoints.CheckpointError, fix, required)
        if record is not None:
            records[job.name] = record
            progress.print(f"{job.name}: finished earlier, results reloaded")
            continue
        reloaded_all = False
        if not checkpoints.has_final(workdir, job.name):
            train_job(
                job,
                config=config,
                data=data,
                splits=splits,
                mesh=mesh,
                workdir=workdir,
                progress=progress,
                timer=timer,
                metrics_log=metrics_log,
                cache_teacher=job.name in prepared.cached,
                on_epoch=on_epoch,
            )
        # The test split is touched once per model, on the weights as saved on disk.
        with timer("checkpoint"):
            _, variables = restore_finished(workdir, job.name, mesh, data.images.shape[1:])
            meta = checkpoints.read_final_meta(workdir, job.name)
        if use_test:
            with timer("eval"):
                test_probs[job.name], test = evaluate(
                    job.spec, variables, data, splits.test, **eval_kw
                )
        records[job.name] = {
            "name": job.name,
            "backbone": job.spec.backbone,
            "n_train": int(len(job.train_index)),
            "n_labelled": int(job.label_mask.sum()),
            "teachers": list(job.teachers),
            "best_epoch": meta["best_epoch"],
            "fingerprint": checkpoints.fingerprint(variables),
            "teacher_fingerprints": meta["teacher_fingerprints"],
            "val": meta["val"],
        }
        if use_test:
            records[job.name]["test"] = test
        if writer:
            files.write_json(record_path, records[job.name])

    link_jobs = [job for job in jobs if job.name.startswith("link_")]
    links = [
        {"link": job.index, "fraction": config.chain.fraction, **records[job.name]}
        for job in link_jobs
    ]
    results = {
        "links": links,
        "baselines": {
            job.name: records[job.name] for job in jobs if not job.name.startswith("link_")
        },
        "test_evaluated": use_test,
        "data": report.data_record(config, data, splits),
        "seed": config.seed,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "runtime": {  # differs between an interrupted and an uninterrupted run
            "wall_seconds": round(time.perf_counter() - start, 3),
            "time_split": timer.as_dict(),
            "compiles": train.compile_count(),
        },
    }
    metrics_log.close()
    if reloaded_all:
        results.update(_how_it_ran(workdir))
    if not use_test:
        if writer:
            files.write_json(os.path.join(workdir, "results.json"), results)
        report.print_results(progress, results)
        return results
    results["gains"] = report.gains(links, results["baselines"])
    last = link_jobs[-1]
    if last.name not in test_probs:  # reloaded from an earlier run: the figures need its outputs
        _, variables = restore_finished(workdir, last.name, mesh, data.images.shape[1:])
        test_probs[last.name], _ = evaluate(last.spec, variables, data, splits.test, **eval_kw)
    if writer:
        files.write_json(os.path.join(workdir, "results.json"), results)
        figures.write_figures(
            workdir, results, probs=test_probs[last.name], labels=data.labels[splits.test]
        )
        report_md.write_report(workdir, results)
    report.print_results(progress, results)
    return results


def _jobs_dir(workdir: str) -> str:
    """``jobs/``: the finished jobs' records; made as the run binds its folder."""
    return os.path.join(workdir, "jobs")


def _record_path(workdir: str, name: str) -> str:
    """``jobs/<name>.json``: the record of a finished job, reloaded by a rerun."""
    return os.path.join(_jobs_dir(workdir), f"{name}.json")


def _finished(workdir: str, name: str) -> bool:
    """Whether job ``name`` has trained (its record or its final checkpoint is there): a rerun
    does not train it again."""
    return os.path.exists(_record_path(workdir, name)) or checkpoints.has_final(workdir, name)


def _how_it_ran(workdir: str) -> dict:
    """``devices``, ``processes`` and ``runtime`` of the run's ``results.json``, if it has one: a
    rerun that only reloads the finished jobs keeps the record of the run that trained them
    (instead of the few seconds it took to reload them)."""
    saved = files.read_json(os.path.join(workdir, "results.json"))
    keys = ("devices", "processes", "runtime")
    return {key: saved[key] for key in keys if key in saved} if isinstance(saved, dict) else {}


def run_seeds(config, workdir: str, progress: Progress) -> dict:
    """One chain per seed of ``config.seeds`` in ``workdir/seed_<s>/``, then ``summary.json``,
    ``summary.md`` and the summary figures in ``workdir``: mean ± std over seeds, and the gains
    of the last link paired across seeds."""
    with _exclusive(workdir):
        return _run_seeds(config, workdir, progress)


def _run_seeds(config, workdir: str, progress: Progress) -> dict:
    for note in check_workdir(config, workdir):
        progress.print(note)
    writer = jax.process_index() == 0
    config_path = os.path.join(workdir, "config.json")
    saved = files.read_json(config_path)
    seeds = config_lib.seed_list(config)
    reseeded = saved is not None and config_lib.seed_list(saved) != seeds
    if reseeded:
        progress.print(
            f"note: the seeds were {config_lib.seed_list(saved)} and are now {seeds}: finished "
            "seeds are reloaded, and summary.json, summary.md and the summary figures are "
            "written anew over the seeds now given (rerun with the old seeds to get the old "
            "summary back)"
        )
    if writer and saved is not None:
        # A bound experiment's record follows this run from its start (a baseline switched on
        # or off, other seeds), before any seed's own record does: whenever the run stops, the
        # experiment's config.json is the one to continue it with (from_run.py:DIR).
        _write_config(config_path, config)
    results = {}
    for seed in seeds:
        progress.print(f"== seed {seed}")
        seed_config = copy.deepcopy(config)
        with seed_config.unlocked():
            seed_config.seed = seed
            seed_config.seeds = ""
        results[seed] = run(seed_config, seed_dir(workdir, seed), progress)
        if writer and saved is None:
            # A new experiment is bound once a seed has run, so a config or data error leaves
            # no binding behind; each seed_<s>/ holds its own config.json and data.json meanwhile.
            _write_config(config_path, config)
    summary = seeds_lib.summarize(results)
    if writer:
        files.write_json(os.path.join(workdir, "summary.json"), summary)
        figures.write_summary_figures(workdir, summary)
        report_md.write_summary(workdir, summary)
    report.print_summary(progress, summary)
    return summary
