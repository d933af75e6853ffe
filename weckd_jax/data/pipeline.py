"""grain pipelines: one per chain fraction, deterministic for a seed, reshuffled every epoch.

The images of a run are decoded once into host memory (`ImageSet`); a pipeline shuffles the indices
of its fraction, cuts them into batches and gathers the uint8 rows of *this process's* share of each
global batch. Augmentation happens later, on the device (`weckd_jax.data.augment`).
"""

from __future__ import annotations

import math

import grain
import jax
import numpy as np

from weckd_jax.data.types import ImageSet


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Whole global batches per epoch (at least one: a tiny fraction still trains)."""
    return max(1, num_examples // batch_size)


def train_pipeline(
    data: ImageSet,
    index: np.ndarray,
    label_mask: np.ndarray,
    *,
    batch_size: int,
    total_steps: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    extras: dict | None = None,
) -> grain.MapDataset:
    """Batches of one fraction for ``total_steps`` steps: this process's rows of each global batch.

    Args:
      data: the decoded images of the run.
      index: ``[n]`` indices into ``data`` of the fraction.
      label_mask: bool ``[n]``; unlabelled examples get ``label = -1`` and ``label_mask = 0``.
      batch_size: the global batch size (over all processes).
      total_steps: number of batches to produce.
      seed: shuffling seed; the order changes every epoch and is the same on every run.
      process_index, process_count: default to ``jax.process_index()`` / ``jax.process_count()``.
      extras: optional per-example values to batch with the images, a dict of pytrees of arrays
        ``[n, ...]`` aligned with ``index`` (e.g. cached teacher outputs).

    Returns:
      A `grain.MapDataset` of ``total_steps`` dicts with ``image`` uint8 ``[b, H, W, C]``,
      ``label`` int32 ``[b]``, ``label_mask`` float32 ``[b]`` and the rows of ``extras``,
      ``b = batch_size / process_count``. Global batch ``s`` is the concatenation of every
      process's batch ``s``.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local = batch_size // process_count
    n = len(index)
    epochs = math.ceil(total_steps * batch_size / n)
    labels = np.where(label_mask, data.labels[index], -1).astype(np.int32)
    masks = np.asarray(label_mask, np.float32)
    extras = extras or {}
    for leaf in jax.tree.leaves(extras):
        if len(leaf) != n:
            raise ValueError(f"extras must have one row per index entry ({n}), got {len(leaf)}")

    def gather(positions: np.ndarray) -> dict:
        return {
            "image": data.images[index[positions]],
            "label": labels[positions],
            "label_mask": masks[positions],
            **jax.tree.map(lambda a: a[positions], extras),
        }

    return (
        grain.MapDataset.range(n)
        .seed(seed)
        .shuffle()
        .repeat(epochs)
        .batch(local, drop_remainder=True)
        .slice(slice(process_index, total_steps * process_count, process_count))
        .map(gather)
    )


def eval_batches(images: np.ndarray, index: np.ndarray, *, batch_size: int):
    """Fixed-size batches of ``images[index]`` in order, the last one padded by repeating row 0.

    Yields ``(images uint8 [batch_size, H, W, C], valid)`` where ``valid`` is how many leading
    rows are real. Padding keeps one compiled eval program for every split size.
    """
    for start in range(0, len(index), batch_size):
        rows = index[start : start + batch_size]
        valid = len(rows)
        if valid < batch_size:
            rows = np.concatenate([rows, np.full(batch_size - valid, rows[0])])
        yield images[rows], valid
