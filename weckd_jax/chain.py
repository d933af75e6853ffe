"""The WeCKD chain: links trained one after another, each taught by its predecessor(s) restored
from disk, plus the baselines that measure what the chain gains.

Side effects (checkpoints, ``metrics.jsonl``, progress lines) happen here, at the edge; the maths
lives in `weckd_jax.train` and `weckd_jax.losses`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from weckd_jax import checkpoints, files, metrics, parallel, report, train
from weckd_jax import data as data_lib
from weckd_jax.config import backbones as cfg_backbones
from weckd_jax.data import pipeline
from weckd_jax.data.splits import Splits, make_splits
from weckd_jax.data.types import ImageSet
from weckd_jax.progress import Progress, Timer

PyTree = Any


class DivergenceError(RuntimeError):
    """The loss or the gradients became NaN/Inf."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One network to train: a chain link or a baseline.

    Attributes:
      name: ``link_1`` ... or a baseline name; names the checkpoint folder.
      index: position in the run (seeds the job's initialisation and data order).
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
) -> tuple[np.ndarray, dict]:
    """Class probabilities ``[len(index), K]`` and `metrics.classification_metrics` on ``index``."""
    eval_step = train.make_eval_step(spec, mesh)
    probs = []
    for images, valid in pipeline.eval_batches(data, index, batch_size=batch_size):
        out = eval_step(variables, parallel.global_batch({"image": images}, mesh)["image"])
        probs.append(np.asarray(jax.device_get(out))[:valid])
    probs = np.concatenate(probs) if probs else np.zeros((0, data.num_classes), np.float32)
    return probs, metrics.classification_metrics(probs, data.labels[index])


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
    metrics_log,
) -> dict:
    """Trains ``job``, keeps the epoch with the best validation accuracy, saves it and returns its
    result record (validation metrics of the chosen epoch and the training history)."""
    cfg_train, cfg_distill = config.train, config.distill
    base_key = jax.random.fold_in(jax.random.key(config.seed), job.index)
    init_key, step_key = jax.random.split(base_key)
    batch_size = cfg_train.batch_size
    epoch_steps = pipeline.steps_per_epoch(len(job.train_index), batch_size)
    total_steps = epoch_steps * cfg_train.epochs
    image_shape = data.images.shape[1:]

    with timer("checkpoint"):
        teacher_specs, teacher_vars = [], []
        for name in job.teachers:
            spec, variables = _restore_finished(workdir, name, mesh, image_shape)
            teacher_specs.append(spec)
            teacher_vars.append(variables)
        init_variables = None
        if job.init_from is not None:
            _, init_variables = _restore_finished(workdir, job.init_from, mesh, image_shape)

    hparams = {
        "learning_rate": cfg_train.learning_rate,
        "weight_decay": cfg_train.weight_decay,
        "warmup_steps": cfg_train.warmup_epochs * epoch_steps,
        "total_steps": total_steps,
        "alpha": cfg_distill.alpha,
        "beta": cfg_distill.attention_weight,
        "t_max": cfg_distill.t_max,
        "t_min": cfg_distill.t_min,
    }
    if len(job.teachers) > 1:
        hparams["teacher_weights"] = np.full(len(job.teachers), 1.0 / len(job.teachers))
    step_cfg = step_config(config)
    with timer("compile"):
        state = train.init_state(job.spec, step_cfg, init_key, image_shape, hparams, init_variables)
    state = parallel.replicate(state, mesh)
    teacher_vars = parallel.replicate(tuple(teacher_vars), mesh)
    step_fn = train.make_train_step(job.spec, tuple(teacher_specs), step_cfg, mesh)

    dataset = pipeline.train_pipeline(
        data,
        job.train_index,
        job.label_mask,
        batch_size=batch_size,
        total_steps=total_steps,
        seed=config.seed * 1009 + job.index,
    )
    batches = iter(dataset.to_iter_dataset())

    best = {"accuracy": -1.0, "nll": np.inf, "epoch": 0, "variables": None, "val": None}
    history = []
    eval_kw = {"batch_size": config.train.eval_batch_size, "mesh": mesh}
    progress.start(job.name, cfg_train.epochs)
    for epoch in range(1, cfg_train.epochs + 1):
        epoch_start = time.perf_counter()
        step_metrics = []
        for _ in range(epoch_steps):
            with timer("data"):
                batch = parallel.global_batch(next(batches), mesh)
            if step_fn._cache_size() == 0:
                with timer("compile"):
                    compile_start = time.perf_counter()
                    state, m = step_fn(state, teacher_vars, batch, step_key)
                    jax.block_until_ready(state)
                    epoch_start += time.perf_counter() - compile_start
            else:
                with timer("train"):
                    state, m = step_fn(state, teacher_vars, batch, step_key)
            step_metrics.append(m)
        with timer("train"):
            step_metrics = jax.device_get(step_metrics)
        train_time = time.perf_counter() - epoch_start
        _check_finite(job.name, epoch, epoch_steps, step_metrics)
        summary = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
        if job.teachers:
            summary["temperature"] = float(step_metrics[-1]["temperature"])
        else:  # no teacher, no distillation temperature
            del summary["temperature"], summary["kd"], summary["at"]
        record = {"run": job.name, "epoch": epoch, "step": int(epoch * epoch_steps), **summary}
        record["images_per_s"] = epoch_steps * batch_size / max(train_time, 1e-9)
        if epoch % cfg_train.eval_every == 0 or epoch == cfg_train.epochs:
            with timer("eval"):
                _, val = evaluate(job.spec, state.variables, data, splits.val, **eval_kw)
            record["val_accuracy"] = val["accuracy"]
            record["val_nll"] = val["nll"]
            if (val["accuracy"], -val["nll"]) > (best["accuracy"], -best["nll"]):
                best.update(
                    accuracy=val["accuracy"],
                    nll=val["nll"],
                    epoch=epoch,
                    variables=jax.tree.map(lambda x: x.copy(), state.variables),
                    val=val,
                )
        history.append(record)
        metrics_log.write(json.dumps(record) + "\n")
        metrics_log.flush()
        progress.update(record, epoch)
    progress.finish()

    meta = {"name": job.name, "spec": dataclasses.asdict(job.spec), "best_epoch": best["epoch"]}
    with timer("checkpoint"):
        checkpoints.save_final(workdir, job.name, best["variables"], meta)
    return {
        "best_epoch": best["epoch"],
        "val": best["val"],
        "variables": best["variables"],
        "fingerprint": checkpoints.fingerprint(best["variables"]),
        "teacher_fingerprints": [checkpoints.fingerprint(v) for v in teacher_vars],
    }


def _check_finite(name: str, epoch: int, epoch_steps: int, step_metrics: list[dict]) -> None:
    for i, m in enumerate(step_metrics):
        if m["nonfinite"] > 0:
            step = (epoch - 1) * epoch_steps + i + 1
            raise DivergenceError(
                f"{name}: the loss or the gradients became NaN/Inf at epoch {epoch}, step {step} "
                f"(loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}). The update was "
                "skipped and the last checkpoint is intact; lower train.learning_rate or "
                "distill.t_min / raise train.warmup_epochs and start a new workdir."
            )


def _restore_finished(
    workdir: str, name: str, mesh: jax.sharding.Mesh, image_shape: tuple[int, ...]
) -> tuple[train.ModelSpec, dict[str, PyTree]]:
    """A finished job's architecture and weights, read from its final checkpoint on disk."""
    spec = train.ModelSpec(**checkpoints.read_final_meta(workdir, name)["spec"])
    dummy = np.zeros((1, *image_shape), np.float32)
    shapes = jax.eval_shape(lambda: spec.build().init(jax.random.key(0), dummy, train=False))
    variables, _ = checkpoints.restore_final(workdir, name, checkpoints.abstract_like(shapes, mesh))
    return spec, variables


def plan_jobs(config, splits: Splits, num_classes: int) -> list[Job]:
    """The links of the chain, then the enabled baselines, in training order."""
    names = cfg_backbones(config)
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
    last = specs[-1]
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
    return jobs


def run(config, workdir: str, progress: Progress) -> dict:
    """Runs the chain and its baselines in ``workdir``; returns (and writes) ``results.json``."""
    start = time.perf_counter()
    timer = Timer()
    writer = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if writer:
        files.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

    with timer("data"):
        data = data_lib.load(config.data, seed=config.seed)
        splits = make_splits(
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
    report.print_data_summary(progress, data, splits)
    mesh = parallel.data_mesh()
    jobs = plan_jobs(config, splits, data.num_classes)
    eval_kw = {"batch_size": config.train.eval_batch_size, "mesh": mesh}

    records = {}
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as metrics_log:
        for job in jobs:
            out = train_job(
                job,
                config=config,
                data=data,
                splits=splits,
                mesh=mesh,
                workdir=workdir,
                progress=progress,
                timer=timer,
                metrics_log=metrics_log,
            )
            with timer("eval"):
                _, test = evaluate(job.spec, out["variables"], data, splits.test, **eval_kw)
            records[job.name] = {
                "name": job.name,
                "backbone": job.spec.backbone,
                "n_train": int(len(job.train_index)),
                "n_labelled": int(job.label_mask.sum()),
                "teachers": list(job.teachers),
                "best_epoch": out["best_epoch"],
                "fingerprint": out["fingerprint"],
                "teacher_fingerprints": out["teacher_fingerprints"],
                "val": out["val"],
                "test": test,
            }

    links = [
        {"link": job.index, "fraction": config.chain.fraction, **records[job.name]}
        for job in jobs
        if job.name.startswith("link_")
    ]
    results = {
        "links": links,
        "baselines": {
            name: records[name]
            for name in ("union_supervised", "full_supervised")
            if name in records
        },
        "gains": report.gains(links, records.get("union_supervised")),
        "data": report.data_record(config, data, splits),
        "seed": config.seed,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "compiles": train.compile_count(),
        "time_split": timer.as_dict(),
        "wall_seconds": round(time.perf_counter() - start, 3),
    }
    if writer:
        files.write_json(os.path.join(workdir, "results.json"), results)
    report.print_results(progress, results)
    return results
