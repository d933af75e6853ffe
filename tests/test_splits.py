"""Splits, chain fractions and label masks: stratified, disjoint, group-whole, deterministic."""

import dataclasses

import numpy as np
import pytest

from weckd_jax.data.splits import (
    SplitError,
    Splits,
    check_disjoint,
    digest,
    label_mask,
    make_splits,
    partition,
)


def _labels(n_per_class=100, k=5):
    return np.repeat(np.arange(k), n_per_class)


def _make(labels, groups=None, **kw):
    args = dict(
        val_fraction=0.15,
        test_fraction=0.2,
        num_fractions=3,
        fraction=0.1,
        label_ratio=1.0,
        seed=0,
    )
    args.update(kw)
    return make_splits(labels, groups, **args)


def test_partition_hits_the_proportions_per_class_at_image_level():
    labels = _labels(100, 4)
    bins = partition(labels, None, (0.5, 0.3, 0.2), seed=3)
    for c in range(4):
        counts = np.bincount(bins[labels == c], minlength=3)
        np.testing.assert_array_equal(counts, [50, 30, 20])


def test_partition_keeps_groups_whole():
    labels = _labels(60, 3)
    groups = np.arange(len(labels)) // 6  # 6 images per patient, one class each
    bins = partition(labels, groups, (0.6, 0.2, 0.2), seed=1)
    for g in np.unique(groups):
        assert len(np.unique(bins[groups == g])) == 1
    # 10 patients per class: 6 / 2 / 2 patients, i.e. 36 / 12 / 12 images.
    for c in range(3):
        np.testing.assert_array_equal(np.bincount(bins[labels == c], minlength=3), [36, 12, 12])


@pytest.mark.parametrize("grouped", [False, True])
def test_splits_are_disjoint_stratified_and_sized(grouped):
    labels = _labels(400, 5)
    groups = np.arange(len(labels)) // 4 if grouped else None
    s = _make(labels, groups)
    assert len(s.train) + len(s.val) + len(s.test) == len(labels)
    all_idx = np.concatenate([s.train, s.val, s.test])
    assert len(np.unique(all_idx)) == len(labels)
    assert len(s.test) == 400 and len(s.val) == 300
    for f in s.fractions:
        assert np.isin(f, s.train).all()
        # 10 % of each class's 260 train images, to within one whole group (4 images).
        counts = np.bincount(labels[f], minlength=5)
        assert np.abs(counts - 26).max() <= (4 if grouped else 0)
    union = s.union
    assert len(np.unique(union)) == len(union) == sum(len(f) for f in s.fractions)
    assert s.split_by == ("group" if grouped else "image")
    if grouped:
        owners = [set(groups[i]) for i in (s.val, s.test, *s.fractions)]
        owners.append(set(groups[s.train]) - set().union(*[set(groups[f]) for f in s.fractions]))
        for i in range(len(owners)):
            for j in range(i + 1, len(owners)):
                assert not owners[i] & owners[j]
        assert not set(groups[s.train]) & set(groups[s.test])


@pytest.mark.parametrize("grouped", [False, True])
def test_rounding_does_not_favour_the_first_fraction_in_every_class(grouped):
    # 5 classes of 20 images: 13 train images per class, 1.3 per fraction. Ties used to go to
    # fraction 1 in every class (10 / 5 / 5 images: link 1 had twice the data of links 2 and 3).
    labels = _labels(20, 5)
    groups = np.arange(len(labels)) if grouped else None
    s = _make(labels, groups)
    sizes = [len(f) for f in s.fractions]
    assert max(sizes) - min(sizes) <= 1, sizes
    for f in s.fractions:
        assert np.abs(np.bincount(labels[f], minlength=5) - 1.3).max() < 1
    # The same for val and test: 1.5 images each per class of 10 (9 / 9 in all, not 12 / 6).
    s = _make(_labels(10, 6), val_fraction=0.15, test_fraction=0.15, num_fractions=1)
    assert len(s.val) == len(s.test) == 9, (len(s.val), len(s.test))


def test_label_masks_keep_the_requested_share_per_class():
    labels = _labels(400, 5)
    s = _make(labels, label_ratio=0.4)
    for f, m in zip(s.fractions, s.label_masks, strict=True):
        assert m.dtype == bool and len(m) == len(f)
        kept = np.bincount(labels[f][m], minlength=5)
        total = np.bincount(labels[f], minlength=5)
        np.testing.assert_allclose(kept, np.round(0.4 * total), atol=1)


def test_label_masks_keep_the_requested_share_of_a_small_fraction():
    # 5 classes of 100: 33 / 33 / 32 images per fraction. At 0.05 each class's share is 0.33
    # images, which per-class rounding made 0: no label anywhere, so link 1 learned nothing.
    labels = _labels(100, 5)
    for ratio in (0.05, 0.1, 0.3):
        s = _make(labels, label_ratio=ratio)
        for f, m in zip(s.fractions, s.label_masks, strict=True):
            assert m.sum() == np.floor(ratio * len(f) + 0.5), (ratio, len(f), m.sum())
            kept = np.bincount(labels[f][m], minlength=5)
            assert np.abs(kept - ratio * np.bincount(labels[f], minlength=5)).max() < 1


def test_label_mask_is_seeded_and_exact_on_whole_shares():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    a, b = label_mask(labels, 0.5, seed=4), label_mask(labels, 0.5, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.bincount(labels[a]), [5, 10, 15])
    assert not np.array_equal(a, label_mask(labels, 0.5, seed=5))
    assert label_mask(labels, 1.0, seed=0).all() and len(label_mask(labels[:0], 0.5, seed=0)) == 0


def test_same_seed_same_splits_and_other_seed_differs():
    labels = _labels(200, 4)
    a, b, c = _make(labels), _make(labels), _make(labels, seed=1)
    for x, y in zip(
        (a.train, a.val, a.test, *a.fractions), (b.train, b.val, b.test, *b.fractions), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.test, c.test)


def test_fixed_split_column_is_honoured():
    labels = _labels(100, 2)
    fixed = np.array([""] * len(labels), dtype=object)
    fixed[:10] = "test"
    fixed[100:110] = "test"
    s = _make(labels, fixed_split=fixed)
    # A test set the manifest gives is the test set: no other image is added to it.
    assert sorted(s.test.tolist()) == list(range(10)) + list(range(100, 110))
    assert not set(range(10)) & set(s.train.tolist())
    # Validation is still drawn from the other images (15 % of them), stratified.
    assert len(s.val) == round(0.15 * 180) and len(s.train) == 180 - len(s.val)
    # Without a fixed test split, the free images are topped up to test_fraction as before.
    fixed[fixed == "test"] = "val"
    s = _make(labels, fixed_split=fixed)
    assert set(range(10)) | set(range(100, 110)) <= set(s.val.tolist())
    assert len(s.test) == round(0.2 * 180) and len(s.val) == 20


def test_check_disjoint_catches_leakage():
    labels = _labels(50, 2)
    groups = np.arange(len(labels)) // 5
    s = _make(labels, groups)
    leaked_image = Splits(
        train=s.train,
        val=np.concatenate([s.val, s.test[:1]]),
        test=s.test,
        fractions=s.fractions,
        label_masks=s.label_masks,
        split_by="group",
    )
    with pytest.raises(SplitError, match="leakage: image"):
        check_disjoint(leaked_image, groups)
    # Move one image of a test patient into the train split: the patient leaks.
    moved = s.test[0]
    leaked_group = Splits(
        train=np.append(s.train, moved),
        val=s.val,
        test=s.test[1:],
        fractions=s.fractions,
        label_masks=s.label_masks,
        split_by="group",
    )
    with pytest.raises(SplitError, match="leakage: group"):
        check_disjoint(leaked_group, groups)
    outside = Splits(
        train=s.train,
        val=s.val,
        test=s.test,
        fractions=(s.fractions[0], s.val[:2]),
        label_masks=s.label_masks,
        split_by="group",
    )
    with pytest.raises(SplitError, match="outside the train split"):
        check_disjoint(outside, groups)


def test_bad_proportions_raise():
    with pytest.raises(SplitError, match="non-negative"):
        partition(np.zeros(4, int), None, (-1.0, 2.0), seed=0)


def test_digest_sees_every_index_and_mask():
    splits = _make(_labels(20), num_fractions=3, fraction=0.2, label_ratio=0.5)
    assert digest(splits) == digest(
        _make(_labels(20), num_fractions=3, fraction=0.2, label_ratio=0.5)
    )
    f1, f2, f3 = splits.fractions
    m1, m2, m3 = splits.label_masks
    changed = [
        dataclasses.replace(splits, val=splits.val[::-1]),
        dataclasses.replace(splits, test=splits.test[:-1]),
        dataclasses.replace(splits, fractions=(f2, f1, f3)),
        dataclasses.replace(splits, label_masks=(m1, m2, ~m3)),
        dataclasses.replace(splits, train=np.append(splits.train[1:], splits.train[0])),
    ]
    digests = {digest(s) for s in changed}
    assert len(digests) == len(changed) and digest(splits) not in digests
