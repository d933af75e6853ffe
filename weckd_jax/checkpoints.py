"""orbax checkpoints of a link: its final (chosen-epoch) weights, and its in-training state.

Layout under ``DIR/checkpoints/<name>/``:

* ``final/0/`` — items ``params``, ``batch_stats`` (the weights of the epoch chosen on
  validation) and ``meta`` (JSON). The next link restores **only** ``params`` and
  ``batch_stats`` from here as its teacher; the directory appears atomically once the link has
  finished.
* ``train/<step>/`` — items ``params``, ``batch_stats``, ``opt_state``, ``best`` (weights of the
  best epoch so far), ``meta`` (step, epoch, history) and ``data_iter`` (the grain iterator), so an
  interrupted link resumes exactly.

Restoring takes an abstract tree whose leaves carry the target sharding, so a checkpoint written on
N devices restores on any other device count; an in-training one also resumes in another number of
processes (hosts).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.flatten_util import ravel_pytree

from weckd_jax import parallel

PyTree = Any


def final_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, "checkpoints", name, "final")


def train_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, "checkpoints", name, "train")


def fingerprint(variables: PyTree) -> str:
    """SHA-256 of every leaf's bytes in tree order: equal iff the weights are bit-identical."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]:
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def _manager(directory: str, **options) -> ocp.CheckpointManager:
    options.setdefault("create", True)
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(**options)
    )


def has_final(workdir: str, name: str) -> bool:
    """Whether link/baseline ``name`` has finished: orbax renames the step folder ``final/0`` into
    place only once every item is written. (A plain file check, not an orbax manager: the
    managers synchronise all processes, and this may be asked by one process alone.)"""
    return os.path.isdir(os.path.join(final_dir(workdir, name), "0"))


def save_final(workdir: str, name: str, variables: dict[str, PyTree], meta: dict) -> None:
    """Writes the finished weights of ``name``; never overwrites a finished checkpoint."""
    if has_final(workdir, name):
        raise FileExistsError(f"{final_dir(workdir, name)} already holds a finished checkpoint")
    with _manager(final_dir(workdir, name), enable_async_checkpointing=False) as manager:
        manager.save(
            0,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(variables["params"]),
                batch_stats=ocp.args.StandardSave(variables["batch_stats"]),
                meta=ocp.args.JsonSave(meta),
            ),
        )
        manager.wait_until_finished()


def abstract_like(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """Shape/dtype structs of ``tree`` carrying the replicated sharding of ``mesh``."""
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class CheckpointError(Exception):
    """A finished link's checkpoint cannot be read; the message names it and the fix."""


def _reason(error: Exception) -> str:
    """Why orbax could not read a checkpoint, on one short line."""
    text = " ".join(str(error).split())
    return type(error).__name__ + (f": {text[:160]}" if text else "")


def _unreadable(workdir: str, name: str, error: Exception) -> CheckpointError:
    reason = _reason(error)
    return CheckpointError(
        f"the final checkpoint of {name} ({final_dir(workdir, name)}) cannot be read ({reason}): "
        "it was damaged or partly deleted. Fix: move that folder and "
        f"{os.path.join(workdir, 'jobs', name + '.json')} aside and rerun the same launch "
        f"command, which trains {name} again (or resumes it from its in-training checkpoint). "
        "The links after it learnt from the damaged one: move theirs aside too, or start a new "
        "--workdir, to keep the chain consistent."
    )


def read_final_meta(workdir: str, name: str) -> dict:
    """The JSON meta of a finished link (architecture, chosen epoch), without reading weights.

    Raises:
      CheckpointError: the checkpoint cannot be read.
    """
    try:
        with _manager(final_dir(workdir, name), create=False) as manager:
            restored = manager.restore(0, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises KeyError, FileNotFoundError, ValueError, RuntimeError
        raise _unreadable(workdir, name, e) from e
    return restored.meta


def restore_final(
    workdir: str, name: str, abstract_variables: dict[str, PyTree]
) -> tuple[dict[str, PyTree], dict]:
    """Reads ``params`` and ``batch_stats`` (and the JSON meta) of a finished link from disk.

    Raises:
      CheckpointError: the checkpoint cannot be read.
    """
    try:
        with _manager(final_dir(workdir, name), create=False) as manager:
            restored = manager.restore(
                0,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_variables["params"]),
                    batch_stats=ocp.args.StandardRestore(abstract_variables["batch_stats"]),
                    meta=ocp.args.JsonRestore(),
                ),
            )
    except Exception as e:
        raise _unreadable(workdir, name, e) from e
    return {"params": restored.params, "batch_stats": restored.batch_stats}, restored.meta


class TrainCheckpoints:
    """In-training checkpoints of one link (async writes, the newest ``keep`` kept).

    The state's arrays and the best weights so far travel as **one** flat float32 vector (item
    ``arrays``): orbax pays a fixed cost per array, and a ResNet's ~230 arrays made each save
    about 4x slower than one vector of the same bytes. These checkpoints only serve resuming; the
    finished weights (`save_final`) keep the usual tree of named items.
    """

    def __init__(self, workdir: str, name: str, keep: int = 2):
        self._name, self._directory = name, train_dir(workdir, name)
        self._manager = _manager(self._directory, max_to_keep=keep)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        state: PyTree,
        best: dict[str, PyTree],
        meta: dict,
        data_iter: grain.DatasetIterator,
    ) -> None:
        """Starts writing ``step`` in the background (the previous write is finished first).

        The flat vector is a new array, so the train step may donate the state's buffers while
        the write runs.
        """
        flat, _ = ravel_pytree(_resumable(state, best))
        self._manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave({"flat": flat}),
                meta=ocp.args.JsonSave(meta),
                data_iter=grain.checkpoint.CheckpointSave(data_iter),
            ),
        )

    def restore(
        self,
        step: int,
        state: PyTree,
        best: dict[str, PyTree],
        data_iter: grain.DatasetIterator,
    ) -> tuple[dict[str, PyTree], dict[str, PyTree], dict]:
        """Reads checkpoint ``step`` into trees shaped like ``state`` and ``best`` (any values):
        returns the state's ``params``/``batch_stats``/``opt_state``, the best weights and the
        meta; the grain iterator ``data_iter`` is moved to where it was.

        Raises:
          CheckpointError: the checkpoint cannot be read (damaged or partly deleted).
        """
        template, unravel = ravel_pytree(_resumable(state, best))
        flat = jax.ShapeDtypeStruct(template.shape, template.dtype, sharding=template.sharding)
        folder = os.path.join(self._directory, str(step))
        items = {"arrays": ocp.args.StandardRestore({"flat": flat}), "meta": ocp.args.JsonRestore()}
        try:
            iterator_state = _iterator_state_of_other_processes(os.path.join(folder, "data_iter"))
            if iterator_state is None:
                items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            if iterator_state is not None:
                data_iter.set_state(iterator_state)
        except Exception as e:  # orbax: KeyError, FileNotFoundError, ValueError, ...; json too
            raise CheckpointError(
                f"the in-training checkpoint {folder} of {self._name} cannot be read "
                f"({_reason(e)}): it was damaged or partly deleted. Fix: delete that folder and "
                f"rerun the same command, which resumes {self._name} from its checkpoint before "
                "(or trains it again from its start when there is none)."
            ) from e
        arrays, best = unravel(restored.arrays["flat"])
        return arrays, best, restored.meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> TrainCheckpoints:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Also when training stops on an error: the write in flight finishes, so the newest
        # checkpoint on disk is whole, not an abandoned temporary folder.
        try:
            self.wait()
        except Exception:
            if exc_type is None:
                raise
            # Training already failed: its error is the one to report, not this write's.
        finally:
            self.close()


def _iterator_state_of_other_processes(folder: str) -> dict | None:
    """The grain iterator state a checkpoint's ``data_iter`` ``folder`` holds when it was written
    by another number of processes than this run has (None when this process's own file,
    ``process_<i>-of-<n>.json``, is there, or no file is).

    Any process's state serves: every process stands at the same batch of its own share of the
    global batches (`weckd_jax.data.pipeline.train_pipeline`), whatever their number, so a run
    may resume on another number of hosts.
    """
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.isdir(folder) or own in os.listdir(folder):
        return None
    written = sorted(name for name in os.listdir(folder) if name.startswith("process_0-of-"))
    if not written:
        return None
    with open(os.path.join(folder, written[0])) as f:
        return json.load(f)


def _resumable(state: PyTree, best: dict[str, PyTree]) -> tuple[dict[str, PyTree], dict]:
    """What a resumed link needs besides its meta: the state's arrays and the best weights."""
    arrays = {
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }
    return arrays, best
