"""Joining the processes of a multi-host run (TPU pod slices, multi-node GPU, several CPU hosts).

Every process runs the same command; `initialize` must be called before anything touches a JAX
device. Afterwards `jax.devices()` lists the devices of all processes, the data mesh spans them,
each process feeds only its rows of every global batch, and only process 0 prints and writes
reports (checkpoints are written collectively by orbax).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


def cluster_detected(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment variables show a multi-process job JAX can join by itself (SLURM
    with several tasks, or a TPU pod slice on GKE with several workers). A Cloud TPU VM pod slice
    shows itself only to a query of its metadata server, which JAX makes: ``multihost=True`` in
    `initialize` (``launch --multihost``) joins it."""
    env = os.environ if environ is None else environ
    slurm_tasks = int(env.get("SLURM_NTASKS", "1") or 1)
    tpu_workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return slurm_tasks > 1 or len(tpu_workers) > 1


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    multihost: bool = False,
) -> bool:
    """Calls `jax.distributed.initialize` when this is a multi-process run; returns whether it did.

    Explicit ``coordinator`` (``host:port`` of process 0), ``num_processes`` and ``process_id``
    win; ``multihost`` leaves finding the job's processes to JAX (Cloud TPU VM pod slices, SLURM,
    Open MPI, GKE); otherwise SLURM and TPU pods on GKE are detected from their environment
    variables (`cluster_detected`). A single process (the default) initialises nothing.

    Raises:
      ValueError: the flags are given in part, or ``multihost`` finds no job to join (naming
        the fix).
    """
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError(
            "--coordinator, --num_processes and --process_id go together: give all three "
            "(e.g. --coordinator=10.0.0.1:1234 --num_processes=2 --process_id=0) or none"
        )
    if coordinator is None and not multihost and not cluster_detected():
        return False
    # CPU hosts need a collectives backend for cross-process all-reduces; GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        _join(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    except ValueError as e:
        if coordinator is not None or not multihost:
            raise
        # JAX's own words ("coordinator_address should be defined.") name no flag and no fix.
        raise ValueError(
            f"--multihost: JAX found no multi-host job here ({str(e).rstrip('.')}). Run it on "
            "every worker of a Cloud TPU VM pod slice (launch/tpu_pod.sh) or in a SLURM, Open "
            "MPI or GKE job, give --coordinator, --num_processes and --process_id instead, or "
            "leave --multihost out to train in this one process"
        ) from None
    return True


# Set when a Ctrl-C ended `initialize`'s wait for the other processes: JAX counts itself
# initialized from then on, but no backend can start and the others depend on this process for
# nothing (`is_process_zero`, `leave`).
_JOIN_INTERRUPTED = threading.Event()


def _join(**kwargs) -> None:
    """`jax.distributed.initialize` (``kwargs``), in a thread of its own that this (main) thread
    waits for, so that a Ctrl-C ends the wait for the other processes: JAX waits for every
    process inside one call during which Python runs no signal handler, so a Ctrl-C did nothing
    until its timeout (5 minutes), which then aborted the process with a fatal error.

    Raises what `jax.distributed.initialize` raises, or KeyboardInterrupt (the call is left
    running; the process is to exit, `weckd_jax.cli.interrupted`).
    """
    failed = []

    def call() -> None:
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as e:  # raised again in the main thread, which reports it
            failed.append(e)

    thread = threading.Thread(target=call, name="jax.distributed.initialize", daemon=True)
    try:
        thread.start()  # a Ctrl-C may land here too: the call runs before `start` returns
        # In steps: a Ctrl-C that Linux hands to another thread (its handler always runs in the
        # main thread) does not wake a join without a timeout.
        while thread.is_alive():
            thread.join(0.1)
    except KeyboardInterrupt:
        _JOIN_INTERRUPTED.set()
        raise
    if failed:
        raise failed[0]


def _jax_state():
    """JAX's record of this process's place in the run (``process_id``, ``num_processes``) and
    its coordination ``client``: no public API has them."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state


def is_process_zero() -> bool:
    """Whether this process speaks for the run (prints, writes reports): process 0 of a joined
    multi-process run, or a process that joined none (no JAX backend is started to find out).
    A process whose wait for the others was interrupted is process 0 by the id it was given (its
    backend would wait for the others to start)."""
    if not jax.distributed.is_initialized():
        return True
    if _JOIN_INTERRUPTED.is_set():
        return _jax_state().process_id == 0
    return jax.process_index() == 0


def process_zero_text(text: str) -> str:
    """Process 0's `text` on every process of a joined multi-process run (``text`` itself in a
    single process), e.g. a name made from the local clock, which may differ across hosts.
    Every process must pass a text of the same length in UTF-8 bytes."""
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return text
    data = np.frombuffer(text.encode(), np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(data))).decode()


# How long process 0 stays after the last other process said it is leaving (see `leave`).
_LEAVING_GRACE_S = 0.5
# How long another process waits for its word to process 0 to go through (see `leave`): a
# service that answers takes milliseconds.
_TELLING_S = 2.0


def leave(timeout_s: float = 10.0) -> None:
    """Orders the ends of a joined run's processes that exit without shutting JAX down
    (``os._exit`` after Ctrl-C): each other process tells process 0 it is leaving, and process 0
    waits for all of them (at most ``timeout_s``). Process 0 hosts JAX's coordination service;
    a process still running once it is gone is terminated with a fatal "the leader task died"
    error on its stderr. Nothing to do in a single process or one still waiting for the others
    to join; a process that never says it is leaving (stuck, or gone already) costs process 0 at
    most ``timeout_s``, and process 0 leaves `_LEAVING_GRACE_S` after the last one said so.
    Another process waits at most `_TELLING_S` for its word to go through (`_tell_leaving`)."""
    if not jax.distributed.is_initialized() or _JOIN_INTERRUPTED.is_set():
        return
    state = _jax_state()
    client = getattr(state, "client", None)
    if client is None:
        return
    if state.process_id != 0:
        _tell_leaving(client, f"weckd_jax/leaving/{state.process_id}")
        return
    try:
        deadline = time.monotonic() + timeout_s
        for other in range(1, state.num_processes):
            left_ms = int((deadline - time.monotonic()) * 1000)
            client.blocking_key_value_get(f"weckd_jax/leaving/{other}", max(left_ms, 1))
    except Exception:  # noqa: BLE001 - a timeout or a service gone: leave all the same
        return
    # A process that has said it is leaving exits at once, but its threads watch the service
    # until it is gone: give them that moment (seen: a fatal error in about 1 Ctrl-C in 15).
    time.sleep(_LEAVING_GRACE_S)


def _tell_leaving(client, key: str) -> None:
    """Sets ``key`` in the coordination service through ``client``, waiting at most
    `_TELLING_S`. Once process 0's host no longer answers (lost, frozen, cut off) the call
    blocks until JAX's heartbeat timeout (100 s), which then aborts this process with a fatal
    error instead of its exit status; it is left running in its thread, which the exit ends."""

    def tell() -> None:
        # Raises once process 0 is gone, which then waits for nobody: nothing left to tell.
        with contextlib.suppress(Exception):
            client.key_value_set(key, "1")

    thread = threading.Thread(target=tell, name="weckd_jax leaving", daemon=True)
    thread.start()
    thread.join(_TELLING_S)
