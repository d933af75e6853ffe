"""Train state, the jitted train and eval steps, and learning-rate / temperature schedules.

A train step is one pure function ``step(state, teacher_vars, batch, rng) -> (state, metrics)``:
the frozen teachers run in eval mode under ``stop_gradient`` inside it, the student's BatchNorm in
train mode, and every schedule is read from ``state.step`` and ``state.hparams`` so that links and
baselines of one architecture share a single compiled program.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from weckd_jax import losses, models, ops, parallel
from weckd_jax.data import augment as augment_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes a network's architecture (hashable: a compile-cache key)."""

    backbone: str
    num_classes: int
    width: int
    stem: str
    dtype: str = "float32"

    def build(self):
        """The Flax module; on CPU with the convolution and pooling lowerings XLA:CPU runs well
        (`weckd_jax.ops`), elsewhere Flax's own (same parameters either way)."""
        conv, max_pool = ops.cpu_ops()
        return models.create_model(
            self.backbone,
            num_classes=self.num_classes,
            width=self.width,
            stem=self.stem,
            dtype=jnp.dtype(self.dtype),
            conv=conv,
            max_pool=max_pool,
        )


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static choices of a train step (hashable: part of the compile-cache key)."""

    optimizer: str = "adamw"
    momentum: float = 0.9
    label_smoothing: float = 0.0
    temperature_schedule: str = "cosine"
    attention_p: int = 2
    use_attention: bool = False
    flip: bool = True
    max_shift: int = 4
    intensity: float = 0.1
    augment: bool = True
    cached_teacher: bool = False  # teacher outputs come in the batch (`make_teacher_step`)


@flax.struct.dataclass
class TrainState:
    """The student being trained.

    ``hparams`` holds float32 scalars read by the step: ``learning_rate``, ``weight_decay``,
    ``warmup_steps``, ``total_steps``, ``alpha``, ``beta``, ``t_max``, ``t_min`` and, for several
    teachers, ``teacher_weights`` ``[num_teachers]``.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    hparams: dict[str, jax.Array]

    @property
    def variables(self) -> dict[str, PyTree]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def make_optimizer(config: StepConfig) -> optax.GradientTransformation:
    """The optimizer, with learning rate and weight decay injected so the step can set them."""
    if config.optimizer == "adamw":
        return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.0)
    if config.optimizer == "sgd":

        def sgd(learning_rate, weight_decay):
            return optax.chain(
                optax.add_decayed_weights(weight_decay),
                optax.sgd(learning_rate, momentum=config.momentum, nesterov=True),
            )

        return optax.inject_hyperparams(sgd)(learning_rate=0.0, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; use 'adamw' or 'sgd'")


def learning_rate(step: jax.Array, hparams: dict[str, jax.Array]) -> jax.Array:
    """Linear warm-up to ``hparams['learning_rate']`` over ``warmup_steps``, then cosine decay to 0
    at ``total_steps``."""
    step = step.astype(jnp.float32)
    warmup = hparams["warmup_steps"]
    total = hparams["total_steps"]
    ramp = jnp.minimum(1.0, (step + 1.0) / jnp.maximum(warmup, 1.0))
    progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    return hparams["learning_rate"] * ramp * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def temperature(step: jax.Array, hparams: dict[str, jax.Array], kind: str) -> jax.Array:
    """The distillation temperature at ``step`` (see `weckd_jax.losses.temperature_schedule`)."""
    schedule = losses.temperature_schedule(
        kind, t_max=hparams["t_max"], t_min=hparams["t_min"], total_steps=hparams["total_steps"]
    )
    return schedule(step)


def init_state(
    spec: ModelSpec,
    config: StepConfig,
    rng: jax.Array,
    image_shape: tuple[int, int, int],
    hparams: dict[str, float],
    init_variables: dict[str, PyTree] | None = None,
) -> TrainState:
    """A fresh student: random weights (or ``init_variables``), zero step, empty optimizer state."""
    if init_variables is None:
        dummy = jnp.zeros((1, *image_shape), jnp.float32)
        init_variables = models.init_variables(spec.build(), rng, dummy)
    params = init_variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=init_variables.get("batch_stats", {}),
        opt_state=make_optimizer(config).init(params),
        hparams={k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()},
    )


def make_train_step(
    student: ModelSpec,
    teachers: tuple[ModelSpec, ...],
    config: StepConfig,
    mesh: jax.sharding.Mesh,
) -> Callable:
    """The jitted ``step(state, teacher_vars, batch, rng) -> (state, metrics)``.

    ``teacher_vars`` is a tuple of ``{"params", "batch_stats"}`` dicts, one per entry of
    ``teachers`` (empty for a link with no teacher). ``batch`` holds ``image`` uint8
    ``[B, H, W, C]``, ``label`` int32 ``[B]`` (-1 where unlabelled) and ``label_mask`` float32
    ``[B]``. With ``config.cached_teacher`` the teachers do not run in the step: ``teacher_vars``
    is empty and ``batch`` also carries their outputs, computed once by `make_teacher_step`
    (exact only without random augmentation, which the step then refuses). ``metrics`` are
    batch means: ``loss``, ``ce``, ``kd``, ``at``, ``accuracy`` (labelled examples),
    ``labelled`` (their count), ``learning_rate``, ``temperature``, ``grad_norm`` and
    ``nonfinite`` (1 when the loss, the gradients or the new weights or BatchNorm statistics hold
    a NaN/Inf; the state is then not usable and the caller stops, as `chain` does).

    Cached: one compile per distinct (student, teachers, config, mesh).
    """
    return _cached(
        ("train", student, teachers, config, mesh),
        lambda: _build_train_step(student, teachers, config, mesh),
    )


def teacher_outputs(
    models: tuple,
    teacher_vars: tuple,
    images: jax.Array,
    *,
    use_attention: bool,
    attention_p: int,
) -> dict[str, tuple]:
    """The frozen teachers on float ``images``, in eval mode, under ``stop_gradient``.

    Returns ``{"teacher_logits": ([B, K], ...), "teacher_features": (([B, H, W, 1], ...), ...)}``,
    one entry per teacher; the features are `losses.attention_pool` (exponent ``attention_p``)
    of each stage, all attention transfer needs, or empty tuples without ``use_attention``.
    """
    logits_out, features_out = [], []
    for model, variables in zip(models, teacher_vars, strict=True):
        logits, features = model.apply(variables, images, train=False)
        logits_out.append(jax.lax.stop_gradient(logits))
        pooled = ()
        if use_attention:
            pooled = tuple(
                jax.lax.stop_gradient(losses.attention_pool(f, p=attention_p)) for f in features
            )
        features_out.append(pooled)
    return {"teacher_logits": tuple(logits_out), "teacher_features": tuple(features_out)}


def teacher_output_bytes(
    teachers: tuple[ModelSpec, ...], config: StepConfig, image_shape: tuple[int, int, int]
) -> int:
    """Bytes of `teacher_outputs` per image of ``image_shape`` ``[H, W, C]``: one row of every
    teacher's logits and, with ``config.use_attention``, of its one-channel stage maps (what a
    teacher cache holds per example). From shapes alone (`jax.eval_shape`): no teacher runs."""
    models = tuple(t.build() for t in teachers)

    def outputs(images):
        variables = tuple(m.init(jax.random.key(0), images, train=False) for m in models)
        return teacher_outputs(
            models,
            variables,
            images,
            use_attention=config.use_attention,
            attention_p=config.attention_p,
        )

    shapes = jax.eval_shape(outputs, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    return sum(math.prod(s.shape[1:]) * s.dtype.itemsize for s in jax.tree.leaves(shapes))


def make_teacher_step(
    teachers: tuple[ModelSpec, ...], config: StepConfig, mesh: jax.sharding.Mesh
) -> Callable:
    """The jitted ``teacher_step(teacher_vars, images_uint8) -> teacher_outputs(...)``, replicated.

    What a ``cached_teacher`` train step reads from its batch: run it once per example before a
    link (no augmentation, so every epoch would compute the same values).
    """
    attention = {"use_attention": config.use_attention, "attention_p": config.attention_p}

    def build():
        models = tuple(t.build() for t in teachers)

        def teacher_step(teacher_vars, images):
            return teacher_outputs(models, teacher_vars, augment_lib.to_float(images), **attention)

        return jax.jit(teacher_step, out_shardings=parallel.replicated(mesh))

    return _cached(("teacher", teachers, *attention.values(), mesh), build)


def _build_train_step(student, teachers, config, mesh) -> Callable:
    if config.cached_teacher and config.augment:
        raise ValueError(
            "cached teacher outputs are exact only without random augmentation: set "
            "augment=False, or let the teachers run inside the step (cached_teacher=False)"
        )
    student_model = student.build()
    teacher_models = tuple(t.build() for t in teachers)
    tx = make_optimizer(config)

    def step(state: TrainState, teacher_vars, batch, rng):
        images = augment_lib.to_float(batch["image"])
        if config.augment:
            images = augment_lib.augment(
                images,
                jax.random.fold_in(rng, state.step),
                flip=config.flip,
                max_shift=config.max_shift,
                intensity=config.intensity,
            )
        if config.cached_teacher:
            teacher = {k: batch[k] for k in ("teacher_logits", "teacher_features")}
        else:
            teacher = teacher_outputs(
                teacher_models,
                teacher_vars,
                images,
                use_attention=config.use_attention,
                attention_p=config.attention_p,
            )
        attention = config.use_attention and bool(teachers)
        temp = temperature(state.step, state.hparams, config.temperature_schedule)
        labelled = batch["label_mask"] > 0

        def loss_fn(params):
            (logits, features), updates = student_model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            per_example, parts = losses.weckd_loss(
                logits,
                batch["label"],
                label_mask=labelled,
                teacher_logits=list(teacher["teacher_logits"]) or None,
                teacher_weights=state.hparams.get("teacher_weights"),
                student_features=features if attention else (),
                teacher_features=list(teacher["teacher_features"]) if attention else None,
                alpha=state.hparams["alpha"],
                beta=state.hparams["beta"],
                temperature=temp,
                label_smoothing=config.label_smoothing,
                p=config.attention_p,
            )
            loss = losses.masked_mean(per_example)
            return loss, (updates["batch_stats"], parts, logits)

        (loss, (batch_stats, parts, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        lr = learning_rate(state.step, state.hparams)
        opt_state = state.opt_state
        opt_state.hyperparams["learning_rate"] = lr
        opt_state.hyperparams["weight_decay"] = state.hparams["weight_decay"]
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        # No select back to the old state on a non-finite step: the loop stops at the first
        # `nonfinite` step before saving anything, and the per-leaf selects cost XLA:CPU about
        # 10 % of the supervised step (they keep the optimizer from updating in place). The new
        # weights and BatchNorm statistics are checked too: either can overflow (a running
        # variance of huge activations) while the loss and the gradients stay finite.
        finite = (
            jnp.isfinite(loss)
            & jnp.isfinite(grad_norm)
            & _all_finite(params)
            & _all_finite(batch_stats)
        )
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        correct = (logits.argmax(-1) == batch["label"]) & labelled
        metrics = {
            "loss": loss,
            "ce": losses.masked_mean(parts["ce"]),
            "kd": losses.masked_mean(parts["kd"]),
            "at": losses.masked_mean(parts["at"]),
            "accuracy": correct.sum() / jnp.maximum(labelled.sum(), 1),
            "labelled": labelled.sum().astype(jnp.float32),
            "learning_rate": lr,
            "temperature": temp,
            "grad_norm": grad_norm,
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        return new_state, metrics

    replicated = parallel.replicated(mesh)
    return jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))


def _all_finite(tree) -> jax.Array:
    """True when no leaf of ``tree`` holds a NaN or an Inf (a scalar bool)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.bool_(True)
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in leaves]))


def make_eval_step(spec: ModelSpec, mesh: jax.sharding.Mesh) -> Callable:
    """The jitted ``eval_step(variables, images_uint8) -> probabilities`` float32 ``[B, K]``."""

    def build():
        model = spec.build()

        def eval_step(variables, images):
            logits, _ = model.apply(variables, augment_lib.to_float(images), train=False)
            return jax.nn.softmax(logits.astype(jnp.float32))

        return jax.jit(eval_step, out_shardings=parallel.replicated(mesh))

    return _cached(("eval", spec, mesh), build)


def compile_count() -> int:
    """How many train and eval programs this process has compiled (a program per distinct
    architecture and input shape is the target)."""
    return sum(fn._cache_size() for fn in _JITTED.values())


_JITTED: dict[tuple, Callable] = {}


def _cached(key: tuple, build: Callable[[], Callable]) -> Callable:
    """One jitted function per key, so links and baselines of one architecture share programs."""
    if key not in _JITTED:
        _JITTED[key] = build()
    return _JITTED[key]
