"""Train/val/test splits, chain fractions and label masks: stratified by class, disjoint by group.

Every function here is a pure function of its arguments and a seed. When images carry a group id
(patient, ear, video) every partition keeps each group whole, so no patient appears in two splits or
two fractions; without groups each image is its own group and the partitions are image-level.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np


class SplitError(ValueError):
    """A split or fraction cannot be made from the data as configured."""


def partition(
    labels: np.ndarray,
    groups: np.ndarray | None,
    proportions: tuple[float, ...],
    *,
    seed: int,
) -> np.ndarray:
    """Assigns every image to one of ``len(proportions)`` bins, class-stratified and group-whole.

    Groups are taken by their majority class. Within each class, groups are visited from the largest
    to the smallest (ties in a seeded random order) and each goes to the bin furthest below its
    target ``proportion * images_of_that_class``, so bins come as close to the proportions as whole
    groups allow (exactly, up to rounding, at image level). Ties go to the bin furthest below its
    target summed over the classes placed so far, so rounding is spread over equal bins instead
    of always favouring the first (whose totals would otherwise grow by one image per class).

    Args:
      labels: int ``[N]`` class of each image.
      groups: optional ``[N]`` group id of each image; ``None`` = every image is its own group.
      proportions: non-negative bin shares; they are normalised to sum to 1.
      seed: seeds the order in which equal-sized groups are placed.

    Returns:
      int ``[N]`` bin index of each image.
    """
    labels = np.asarray(labels)
    props = np.asarray(proportions, np.float64)
    if props.ndim != 1 or len(props) == 0 or (props < 0).any() or props.sum() <= 0:
        raise SplitError(f"proportions must be non-negative with a positive sum, got {proportions}")
    props = props / props.sum()
    if groups is None:
        group_index = np.arange(len(labels))
    else:
        _, group_index = np.unique(np.asarray(groups), return_inverse=True)
    num_groups = group_index.max() + 1 if len(labels) else 0
    sizes = np.bincount(group_index, minlength=num_groups)
    # Majority class of each group (ties to the smaller class index).
    counts = np.zeros((num_groups, labels.max() + 1 if len(labels) else 1), np.int64)
    np.add.at(counts, (group_index, labels), 1)
    group_class = counts.argmax(axis=1)

    rng = np.random.default_rng(seed)
    order = rng.permutation(num_groups)
    order = order[np.argsort(-sizes[order], kind="stable")]
    group_bin = np.zeros(num_groups, np.int64)
    # Bins tied within a class go to the one furthest below its target over all classes so far,
    # so that rounding does not favour the first bins in every class (3 equal chain fractions of
    # a class with 13 images are 2/1/1 images: the extra image rotates between the fractions).
    total_target, total_filled = np.zeros(len(props)), np.zeros(len(props))
    for cls in np.unique(group_class):
        members = order[group_class[order] == cls]
        target = props * sizes[members].sum()
        total_target += target
        filled = np.zeros(len(props))
        for g in members:
            deficit = target - filled
            deficit[props == 0] = -np.inf
            tied = deficit >= deficit.max() - 1e-9 * max(1.0, target.sum())
            b = int(np.argmax(np.where(tied, total_target - total_filled, -np.inf)))
            group_bin[g] = b
            filled[b] += sizes[g]
            total_filled[b] += sizes[g]
    return group_bin[group_index]


@dataclasses.dataclass(frozen=True)
class Splits:
    """Index arrays into an image set; ``fractions[k]`` feeds link k+1 and ``label_masks[k]`` says
    which of its images keep their labels."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    fractions: tuple[np.ndarray, ...]
    label_masks: tuple[np.ndarray, ...]
    split_by: str  # "group" or "image"

    @property
    def union(self) -> np.ndarray:
        """All images of all fractions (the union baseline's training set)."""
        return np.concatenate(self.fractions)


def make_splits(
    labels: np.ndarray,
    groups: np.ndarray | None,
    *,
    val_fraction: float,
    test_fraction: float,
    num_fractions: int,
    fraction: float,
    label_ratio: float,
    seed: int,
    fixed_split: np.ndarray | None = None,
) -> Splits:
    """Cuts a labelled pool into train/val/test, then the train pool into chain fractions.

    Args:
      labels: int ``[N]``.
      groups: optional ``[N]`` group ids (patients); all partitions are then group-disjoint.
      val_fraction, test_fraction: shares of the whole set for validation and test.
      num_fractions: chain length N (one disjoint fraction per link).
      fraction: share of the *train pool* each link gets (``num_fractions * fraction <= 1``).
      label_ratio: share of each fraction that keeps its labels (the rest is unlabelled):
        ``label_ratio * len(fraction)`` images rounded half up, spread over the classes
        (`label_mask`).
      seed: seeds every random choice.
      fixed_split: optional ``[N]`` strings ``"train"/"val"/"test"/""`` from a manifest; images with
        a non-empty value keep it and only the others are assigned. A split that some images fix
        (e.g. an official test set) is taken as given: the others get no share of it, and its
        ``*_fraction`` goes to train.

    Returns:
      `Splits`; disjointness is checked by `check_disjoint` before returning.
    """
    labels = np.asarray(labels)
    n = len(labels)
    assigned = np.full(n, -1)
    if fixed_split is not None:
        fixed = np.asarray(fixed_split).astype(str)
        for b, name in enumerate(("train", "val", "test")):
            assigned[fixed == name] = b
    free = np.flatnonzero(assigned < 0)
    if len(free):
        props = [1.0 - val_fraction - test_fraction, val_fraction, test_fraction]
        for b in (1, 2):  # a val or test split given by the manifest is not topped up
            if (assigned == b).any():
                props[0], props[b] = props[0] + props[b], 0.0
        free_groups = None if groups is None else np.asarray(groups)[free]
        assigned[free] = partition(labels[free], free_groups, props, seed=seed)
    train, val, test = (np.flatnonzero(assigned == b) for b in range(3))

    rest = max(0.0, 1.0 - num_fractions * fraction)
    train_groups = None if groups is None else np.asarray(groups)[train]
    bins = partition(
        labels[train], train_groups, (fraction,) * num_fractions + (rest,), seed=seed + 1
    )
    fractions = tuple(train[bins == k] for k in range(num_fractions))

    masks = tuple(
        label_mask(labels[idx], label_ratio, seed=seed + 2 + k) for k, idx in enumerate(fractions)
    )
    splits = Splits(
        train=train,
        val=val,
        test=test,
        fractions=fractions,
        label_masks=masks,
        split_by="image" if groups is None else "group",
    )
    check_disjoint(splits, groups)
    return splits


def label_mask(labels: np.ndarray, label_ratio: float, *, seed: int) -> np.ndarray:
    """Which images of one chain fraction keep their labels, class-stratified.

    ``label_ratio * n`` images in all, rounded half up: each class keeps
    ``floor(label_ratio * n_c)``, and the rest of the total goes one each to the classes with the
    largest remainders (ties in a seeded random order), so per-class rounding cannot add up to no
    label at all (5 classes of 6 images at 0.05 keep 2 images, not 0). Within a class the images
    are chosen at random.

    Args:
      labels: int ``[n]`` class of each image of the fraction.
      label_ratio: share in ``(0, 1]``; 1 keeps every label.
      seed: seeds the choice of classes and images.

    Returns:
      bool ``[n]``, True = labelled.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if label_ratio >= 1.0:
        return np.ones(n, bool)
    classes, counts = np.unique(labels, return_counts=True)
    quota = label_ratio * counts
    keep = np.floor(quota + 1e-9).astype(np.int64)
    extra = int(np.clip(np.floor(label_ratio * n + 0.5) - keep.sum(), 0, len(classes)))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(classes))
    order = order[np.argsort(-(quota - keep)[order], kind="stable")]
    keep[order[:extra]] += 1
    mask = np.zeros(n, bool)
    for cls, k in zip(classes, keep, strict=True):
        mask[rng.permutation(np.flatnonzero(labels == cls))[:k]] = True
    return mask


def digest(splits: Splits) -> str:
    """SHA-256 of every index and label mask of ``splits``, in order: equal iff the same splits.
    A run keeps it in ``data.json``, so that a version of the package that cuts the same data
    differently cannot resume or evaluate the run on other splits unnoticed."""
    h = hashlib.sha256()
    for part in (splits.train, splits.val, splits.test, *splits.fractions, *splits.label_masks):
        h.update(np.asarray(part, np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def check_disjoint(splits: Splits, groups: np.ndarray | None) -> None:
    """Raises `SplitError` when train/val/test share an image or a group, when two fractions do,
    or when a fraction holds anything outside the train split."""
    for k, idx in enumerate(splits.fractions):
        if not np.isin(idx, splits.train).all():
            raise SplitError(f"fraction {k + 1} holds images outside the train split")
    everything = (splits.train, splits.val, splits.test)
    keys = {"image": np.arange(1 + max(int(idx.max(initial=-1)) for idx in everything))}
    if groups is not None:
        keys["group"] = np.asarray(groups)
    for kind, ids in keys.items():
        _assert_disjoint({"train": splits.train, "val": splits.val, "test": splits.test}, ids, kind)
        _assert_disjoint(
            {f"fraction {k + 1}": idx for k, idx in enumerate(splits.fractions)}, ids, kind
        )


def _assert_disjoint(named: dict[str, np.ndarray], ids: np.ndarray, kind: str) -> None:
    owner: dict = {}
    for name, idx in named.items():
        for item in np.unique(ids[idx]).tolist():
            if item in owner:
                raise SplitError(f"leakage: {kind} {item!r} is in both {owner[item]} and {name}")
            owner[item] = name


def class_counts(labels: np.ndarray, index: np.ndarray, num_classes: int) -> list[int]:
    """Images per class among ``labels[index]``."""
    return np.bincount(np.asarray(labels)[index], minlength=num_classes).tolist()
