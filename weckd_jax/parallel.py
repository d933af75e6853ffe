"""Data parallelism with pmap's semantics on today's JAX API.

Parameters, optimizer state and teachers are replicated (``NamedSharding(mesh, P())``); every batch
is split along its first axis over the ``"data"`` axis of a mesh spanning all devices of all
processes (``P("data")``). Under ``jax.jit`` XLA then all-reduces gradients and BatchNorm statistics
itself, so the train step is written as if for one device.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def data_mesh() -> Mesh:
    """A 1-D mesh named ``"data"`` over every device of every process."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicate(tree, mesh: Mesh):
    """Places a pytree of host or device arrays on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def global_batch(local_batch, mesh: Mesh):
    """Assembles this process's rows of a batch (a pytree of arrays) into global arrays sharded
    on ``"data"``.

    Each process passes its own ``[global_batch / process_count, ...]`` rows; the result has the
    global leading dimension.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda value: jax.make_array_from_process_local_data(sharding, value), local_batch
    )


def process_rows(global_rows: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch (all of it with one process)."""
    count, index = jax.process_count(), jax.process_index()
    share = len(global_rows) // count
    return global_rows[index * share : (index + 1) * share]


def device_multiple(size: int) -> int:
    """``size`` rounded up to a multiple of the device count, so that every device gets as many
    rows of a batch (for evaluation, whose padded rows are dropped)."""
    devices = jax.device_count()
    return math.ceil(size / devices) * devices


def check_batch_size(batch_size: int, what: str = "train.batch_size") -> None:
    """Raises ValueError unless ``batch_size`` divides evenly over all devices and processes."""
    devices, processes = jax.device_count(), jax.process_count()
    if batch_size % devices or batch_size % processes:
        raise ValueError(
            f"{what}={batch_size} does not divide over {devices} devices in {processes} "
            f"process(es); use a multiple of {devices}, e.g. --config.{what}="
            f"{max(devices, batch_size // devices * devices)}"
        )
