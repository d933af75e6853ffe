"""Tests for weckd_jax.metrics: hand-worked examples, scikit-learn agreement, errors, JSON."""

import json
import math
import warnings

import numpy as np
import pytest

from weckd_jax.metrics import classification_metrics, mean_std, paired_gain

# ---------------------------------------------------------------------------------------------
# A hand-worked K = 3, N = 7 example.
#
#   row  probs                 label  pred  conf  correct
#   0    [0.70, 0.20, 0.10]    0      0     0.70  yes
#   1    [0.20, 0.60, 0.20]    0      1     0.60  no
#   2    [0.10, 0.80, 0.10]    1      1     0.80  yes
#   3    [0.30, 0.30, 0.40]    1      2     0.40  no
#   4    [0.10, 0.10, 0.80]    2      2     0.80  yes
#   5    [0.25, 0.50, 0.25]    2      1     0.50  no
#   6    [0.10, 0.70, 0.20]    1      1     0.70  yes
# ---------------------------------------------------------------------------------------------
HAND_PROBS = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.20, 0.60, 0.20],
        [0.10, 0.80, 0.10],
        [0.30, 0.30, 0.40],
        [0.10, 0.10, 0.80],
        [0.25, 0.50, 0.25],
        [0.10, 0.70, 0.20],
    ]
)
HAND_LABELS = np.array([0, 0, 1, 1, 2, 2, 1])


def _close(got, want, tol=1e-12):
    """Elementwise comparison of (possibly nested) lists with None entries."""
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (got, want)
        for g, w in zip(got, want, strict=True):
            _close(g, w, tol)
    elif want is None:
        assert got is None, (got, want)
    else:
        assert got is not None and math.isclose(got, want, rel_tol=0, abs_tol=tol), (got, want)


def _nan_to_none(arr):
    return [None if np.isnan(v) else float(v) for v in np.asarray(arr, dtype=np.float64)]


def _assert_plain_json(obj):
    """Only dict/list/str/int/float/None, floats finite -- no NumPy types anywhere."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert type(key) is str
            _assert_plain_json(value)
    elif isinstance(obj, list):
        for value in obj:
            _assert_plain_json(value)
    elif obj is not None:
        assert type(obj) in (int, float), (obj, type(obj))
        if type(obj) is float:
            assert math.isfinite(obj)


def test_hand_worked_confusion_and_per_class():
    m = classification_metrics(HAND_PROBS, HAND_LABELS)
    # rows = true, cols = predicted: true 0 -> {0, 1}; true 1 -> {1, 2, 1}; true 2 -> {2, 1}
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 1], [0, 1, 1]]
    assert m["n"] == 7
    assert m["num_classes"] == 3
    pc = m["per_class"]
    assert pc["support"] == [2, 3, 2]
    # tp = [1, 2, 1]; predicted counts (column sums) = [1, 4, 2]
    _close(m["accuracy"], 4 / 7)  # trace 4 of 7
    _close(pc["sensitivity"], [1 / 2, 2 / 3, 1 / 2])  # tp / support
    # negatives = 7 - support = [5, 4, 5]; fp = [0, 2, 1]; tn = negatives - fp = [5, 2, 4]
    _close(pc["specificity"], [5 / 5, 2 / 4, 4 / 5])
    _close(pc["precision"], [1 / 1, 2 / 4, 1 / 2])  # tp / predicted
    # f1 = 2tp / (2tp + fp + fn): fn = [1, 1, 1] -> 2/3, 4/(4+2+1)=4/7, 2/(2+1+1)=1/2
    _close(pc["f1"], [2 / 3, 4 / 7, 1 / 2])
    _close(m["balanced_accuracy"], (1 / 2 + 2 / 3 + 1 / 2) / 3)  # = 5/9
    _close(m["macro_f1"], (2 / 3 + 4 / 7 + 1 / 2) / 3)  # = 73/126
    # AUC class 0: positives {0.7, 0.2} vs negatives {0.1, 0.3, 0.1, 0.25, 0.1}:
    #   0.7 beats 5, 0.2 beats the three 0.1s -> 8 / (2*5) = 0.8
    # AUC class 1: positives {0.8, 0.3, 0.7} vs negatives {0.2, 0.6, 0.1, 0.5}:
    #   0.8 -> 4, 0.3 -> 2 (0.2, 0.1), 0.7 -> 4 -> 10 / (3*4) = 5/6
    # AUC class 2: positives {0.8, 0.25} vs negatives {0.1, 0.2, 0.1, 0.4, 0.2}:
    #   0.8 -> 5, 0.25 -> 4 (all but 0.4) -> 9 / (2*5) = 0.9
    _close(pc["auc"], [0.8, 5 / 6, 0.9])
    _close(m["macro_auc"], (0.8 + 5 / 6 + 0.9) / 3)


def test_hand_worked_ece_two_bins_and_nll():
    m = classification_metrics(HAND_PROBS, HAND_LABELS, num_bins=2)
    # Bins (0, 0.5] and (0.5, 1]; confidence 0.5 (row 5) is on the edge -> lower bin.
    #   low : conf {0.4, 0.5}, correct {no, no}  -> |0 - 0.45| = 0.45, weight 2/7
    #   high: conf {0.7, 0.6, 0.8, 0.8, 0.7}, 4/5 correct -> |0.8 - 0.72| = 0.08, weight 5/7
    #   ece = (2*0.45 + 5*0.08) / 7 = 1.3 / 7
    _close(m["ece"], 1.3 / 7)
    # NLL: mean of -log p[true] with p[true] = 0.7, 0.2, 0.8, 0.3, 0.8, 0.25, 0.7
    p_true = [0.7, 0.2, 0.8, 0.3, 0.8, 0.25, 0.7]
    _close(m["nll"], -sum(math.log(p) for p in p_true) / 7)


@pytest.mark.parametrize(
    ("confidences", "correct", "num_bins", "expected"),
    [
        # All-confident-correct -> 0.
        ([1.0, 1.0, 1.0], [True, True, True], 15, 0.0),
        # One bin: |mean acc - mean conf| = |2/4 - 0.8| = 0.3.
        ([0.8, 0.8, 0.8, 0.8], [True, True, False, False], 1, 0.3),
        # 2 bins: {0.5 wrong} -> |0 - 0.5| * 1/3; {0.9, 0.9 right} -> |1 - 0.9| * 2/3 => 0.5/3+0.2/3
        ([0.5, 0.9, 0.9], [False, True, True], 2, 0.7 / 3),
        # 10 bins: 0.6 -> (0.5, 0.6] right: 0.4*1/2; 0.65 -> (0.6, 0.7] wrong: 0.65*1/2
        ([0.6, 0.65], [True, False], 10, (0.4 + 0.65) / 2),
    ],
)
def test_ece_hand_worked_binary(confidences, correct, num_bins, expected):
    # Build K = 2 probabilities whose top-1 confidence and correctness are as given: class 1
    # gets prob c (for c = 0.5 the argmax tie predicts class 0); label = pred iff correct.
    c = np.asarray(confidences)
    probs = np.stack([1.0 - c, c], axis=1)
    pred = probs.argmax(axis=1)
    labels = np.where(correct, pred, 1 - pred)
    m = classification_metrics(probs, labels, num_bins=num_bins)
    _close(m["ece"], expected)


def _reference_ece(probs, labels, num_bins):
    """Loop-based ECE with explicit (lower, upper] comparisons."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    total = 0.0
    for i in range(num_bins):
        in_bin = (conf > edges[i]) & (conf <= edges[i + 1])
        if i == 0:
            in_bin |= conf == 0.0
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


@pytest.mark.parametrize("num_bins", [1, 5, 15])
@pytest.mark.parametrize("seed", [0, 1])
def test_ece_matches_reference_loop(seed, num_bins):
    probs, labels = _random_problem(np.random.default_rng(seed), 200, 4, ties=True)
    m = classification_metrics(probs, labels, num_bins=num_bins)
    _close(m["ece"], _reference_ece(probs, labels, num_bins), tol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_perfect_classifier(k):
    labels = np.arange(4 * k) % k
    probs = np.eye(k)[labels]
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == 1.0
    assert m["balanced_accuracy"] == 1.0
    assert m["macro_f1"] == 1.0
    assert m["macro_auc"] == 1.0
    assert m["per_class"]["auc"] == [1.0] * k
    assert m["ece"] == 0.0
    assert m["nll"] == 0.0
    assert m["confusion_matrix"] == (4 * np.eye(k, dtype=int)).tolist()
    # Confident but not certain: ece = 1 - 0.98 (everything in the top bin, all correct).
    soft = 0.98 * probs + 0.02 * (1 - probs) / (k - 1)
    ms = classification_metrics(soft, labels)
    assert ms["accuracy"] == 1.0 and ms["macro_auc"] == 1.0
    _close(ms["ece"], 0.02, tol=1e-9)
    _close(ms["nll"], -math.log(0.98), tol=1e-9)


def test_binary_auc_with_ties_hand_worked():
    # p1 = [0.2, 0.6, 0.6, 0.9], labels [0, 0, 1, 1]:
    #   positives {0.6, 0.9} vs negatives {0.2, 0.6}: 0.6 -> 1 + 0.5 (tie); 0.9 -> 2 => 3.5/4
    # class 0 uses p0 = 1 - p1 = {0.8, 0.4 | 0.4, 0.1}: 0.8 -> 2; 0.4 -> 0.5 + 1 => 3.5/4
    p1 = np.array([0.2, 0.6, 0.6, 0.9])
    m = classification_metrics(np.stack([1 - p1, p1], 1), np.array([0, 0, 1, 1]))
    _close(m["per_class"]["auc"], [0.875, 0.875])
    _close(m["macro_auc"], 0.875)
    # All scores tied -> 0.5.
    m = classification_metrics(np.full((4, 2), 0.5), np.array([0, 1, 1, 0]))
    _close(m["per_class"]["auc"], [0.5, 0.5])


def test_argmax_ties_go_to_lowest_index():
    probs = np.array([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]])
    m = classification_metrics(probs, np.array([1, 2, 0]))
    # predictions 0, 1, 0 -> true 0 -> pred 0; true 1 -> pred 0; true 2 -> pred 1
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 1, 0]]


def test_undefined_values_are_none():
    # K = 4; class 2 is only predicted (no support), class 3 never appears anywhere.
    probs = np.array(
        [
            [0.9, 0.05, 0.05, 0.0],
            [0.1, 0.8, 0.1, 0.0],
            [0.1, 0.1, 0.8, 0.0],
        ]
    )
    labels = np.array([0, 1, 1])
    m = classification_metrics(probs, labels)
    pc = m["per_class"]
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert pc["support"] == [1, 2, 0, 0]
    _close(pc["sensitivity"], [1.0, 0.5, None, None])  # no support -> None
    _close(pc["specificity"], [1.0, 1.0, 2 / 3, 1.0])  # every class has negatives
    _close(pc["precision"], [1.0, 1.0, 0.0, None])  # never predicted -> None
    # class 2: 2*0/(0+1+0) = 0 (predicted, no support); class 3: 0/0 -> None
    _close(pc["f1"], [1.0, 2 / 3, 0.0, None])
    _close(pc["auc"], [1.0, 1.0, None, None])  # no positives -> None
    _close(m["balanced_accuracy"], (1.0 + 0.5) / 2)  # over classes present in labels
    _close(m["macro_f1"], (1.0 + 2 / 3 + 0.0 + 0.0) / 4)  # None counts as 0, over all K
    _close(m["macro_auc"], 1.0)
    # A single class in labels: its specificity and all AUCs are undefined.
    m = classification_metrics(np.array([[0.7, 0.3], [0.4, 0.6]]), np.array([0, 0]))
    assert m["per_class"]["specificity"][0] is None
    assert m["per_class"]["auc"] == [None, None]
    assert m["macro_auc"] is None
    json.dumps(m, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Agreement with scikit-learn on random data.
# ---------------------------------------------------------------------------------------------


def _random_problem(rng, n, k, *, ties, missing="none"):
    """Random probabilities + labels.

    ties=True draws integer scores 1..4 per class before normalising, which produces many tied
    probabilities (both within columns, for AUC, and within rows, for argmax).
    missing: "none"; "label" -> class k-1 never occurs in labels; "both" -> class k-1 occurs in
    neither labels nor predictions.
    """
    if ties:
        scores = rng.integers(1, 5, size=(n, k)).astype(np.float64)
    else:
        scores = rng.gamma(1.0, size=(n, k)) + 1e-3
    if missing == "both":
        scores[:, k - 1] = 0.5 * scores[:, : k - 1].min(axis=1)  # never the argmax
    probs = scores / scores.sum(axis=1, keepdims=True)
    n_label_classes = k - 1 if missing in ("label", "both") else k
    labels = rng.integers(0, n_label_classes, size=n)
    # Make labels informative so metrics are not all ~chance.
    informative = rng.random(n) < 0.5
    labels = np.where(informative, probs.argmax(axis=1) % n_label_classes, labels)
    return probs, labels


CASES = [
    (k, seed, ties, missing)
    for k in (2, 3, 5)
    for seed in (0, 1, 2)
    for ties in (False, True)
    for missing in ("none", "label", "both")
]


@pytest.mark.parametrize(("k", "seed", "ties", "missing"), CASES)
def test_agrees_with_sklearn(k, seed, ties, missing):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1000 * k + seed)
    n = int(rng.integers(20, 80))
    probs, labels = _random_problem(rng, n, k, ties=ties, missing=missing)
    preds = probs.argmax(axis=1)
    classes = list(range(k))
    m = classification_metrics(probs, labels)
    pc = m["per_class"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about classes absent from y_true
        _close(m["accuracy"], sk.accuracy_score(labels, preds))
        _close(m["balanced_accuracy"], sk.balanced_accuracy_score(labels, preds))
        _close(
            m["macro_f1"],
            sk.f1_score(labels, preds, labels=classes, average="macro", zero_division=0),
        )
        assert m["confusion_matrix"] == sk.confusion_matrix(labels, preds, labels=classes).tolist()
        kw = {"labels": classes, "average": None, "zero_division": np.nan}
        _close(pc["sensitivity"], _nan_to_none(sk.recall_score(labels, preds, **kw)))
        _close(pc["precision"], _nan_to_none(sk.precision_score(labels, preds, **kw)))
        _close(pc["f1"], _nan_to_none(sk.f1_score(labels, preds, **kw)))
        spec = [sk.recall_score(labels != c, preds != c, zero_division=np.nan) for c in classes]
        _close(pc["specificity"], _nan_to_none(spec))

        # Per-class one-vs-rest AUC where defined.
        for c in classes:
            pos = labels == c
            if 0 < pos.sum() < n:
                _close(pc["auc"][c], sk.roc_auc_score(pos, probs[:, c]))
            else:
                assert pc["auc"][c] is None
        present = np.unique(labels)
        if k == 2:
            if present.size == 2:
                _close(m["macro_auc"], sk.roc_auc_score(labels, probs[:, 1]))
            else:
                assert m["macro_auc"] is None
        elif present.size == k:
            _close(m["macro_auc"], sk.roc_auc_score(labels, probs, multi_class="ovr"))
        else:
            # sklearn's multiclass OvR needs every class in y_true; average its per-class AUCs.
            ref = np.mean([sk.roc_auc_score(labels == c, probs[:, c]) for c in present])
            _close(m["macro_auc"], ref)

    assert pc["support"] == np.bincount(labels, minlength=k).tolist()
    if missing == "both":
        assert pc["f1"][k - 1] is None and pc["precision"][k - 1] is None
    if missing != "none":
        assert pc["sensitivity"][k - 1] is None and pc["auc"][k - 1] is None
    _assert_plain_json(m)


@pytest.mark.parametrize("seed", [0, 1])
def test_nll_matches_sklearn_log_loss(seed):
    sk = pytest.importorskip("sklearn.metrics")
    probs, labels = _random_problem(np.random.default_rng(seed), 50, 3, ties=False)
    m = classification_metrics(probs, labels)
    _close(m["nll"], sk.log_loss(labels, probs, labels=[0, 1, 2]), tol=1e-9)


def test_nll_is_clipped():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    m = classification_metrics(probs, np.array([1, 0]))
    _close(m["nll"], (-math.log(1e-12) - math.log(0.5)) / 2)


# ---------------------------------------------------------------------------------------------
# JSON, input types, errors.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["none", "both"])
def test_json_round_trip(missing):
    probs, labels = _random_problem(np.random.default_rng(7), 30, 5, ties=True, missing=missing)
    m = classification_metrics(probs.astype(np.float32), labels.astype(np.int32))
    _assert_plain_json(m)
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_accepts_lists_and_integral_float_labels():
    m_list = classification_metrics(HAND_PROBS.tolist(), HAND_LABELS.tolist())
    m_float = classification_metrics(HAND_PROBS, HAND_LABELS.astype(np.float64))
    assert m_list == m_float == classification_metrics(HAND_PROBS, HAND_LABELS)


@pytest.mark.parametrize(
    ("probs", "labels", "kwargs", "match"),
    [
        (np.full(3, 1 / 3), [0], {}, "probs must be 2-D"),
        (np.full((2, 2), 0.5), [[0], [1]], {}, "labels must be 1-D"),
        (np.full((3, 2), 0.5), [0, 1], {}, "disagree on N"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), {}, r"N = 0"),
        (np.zeros((2, 0)), [0, 0], {}, r"K = 0"),
        (np.array([[0.5, np.nan], [0.5, 0.5]]), [0, 1], {}, "non-finite"),
        (np.array([[0.5, np.inf], [0.5, 0.5]]), [0, 1], {}, "non-finite"),
        (np.array([[1.5, -0.5], [0.5, 0.5]]), [0, 1], {}, "negative"),
        (np.array([[2.0, 1.0], [0.5, 0.5]]), [0, 1], {}, "sum to 1"),
        (np.full((2, 2), 0.5), [0, 2], {}, r"\[0, 2\)"),
        (np.full((2, 2), 0.5), [-1, 0], {}, r"\[0, 2\)"),
        (np.full((2, 2), 0.5), [0.5, 1.0], {}, "integer class indices"),
        (np.full((2, 2), 0.5), ["a", "b"], {}, "integer class indices"),
        (np.full((2, 2), 0.5), [0, 1], {"num_bins": 0}, "num_bins"),
        (np.full((2, 2), 0.5), [0, 1], {"num_bins": 2.5}, "num_bins"),
    ],
)
def test_errors(probs, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(probs, labels, **kwargs)


# ---------------------------------------------------------------------------------------------
# Seed summaries.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "mean", "std"),
    [
        ([0.5], 0.5, 0.0),
        # mean 2; squared deviations 1 + 0 + 1 = 2; / (n - 1) = 1 -> std 1
        ([1, 2, 3], 2.0, 1.0),
        # mean 0.8; deviations -0.1, 0.1 -> 0.02 / 1 -> std sqrt(0.02)
        (np.array([0.7, 0.9]), 0.8, math.sqrt(0.02)),
    ],
)
def test_mean_std(values, mean, std):
    out = mean_std(values)
    _close(out["mean"], mean)
    _close(out["std"], std)
    assert out["n"] == len(values)
    _close(out["values"], [float(v) for v in values])
    _assert_plain_json(out)


def test_paired_gain():
    a = [0.70, 0.80, 0.75, 0.60]
    b = [0.72, 0.78, 0.80, 0.60]
    out = paired_gain(a, b)
    # b - a = [0.02, -0.02, 0.05, 0.0]; mean 0.0125; wins = 2 (a tie is not a win)
    _close(out["values"], [0.02, -0.02, 0.05, 0.0], tol=1e-12)
    _close(out["mean"], 0.0125, tol=1e-12)
    # sample std: deviations 0.0075, -0.0325, 0.0375, -0.0125
    ss = 0.0075**2 + 0.0325**2 + 0.0375**2 + 0.0125**2
    _close(out["std"], math.sqrt(ss / 3), tol=1e-12)
    assert out["n"] == 4
    assert out["wins"] == 2
    _assert_plain_json(out)
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize(
    ("fn", "args", "match"),
    [
        (mean_std, ([],), "at least one"),
        (mean_std, ([0.1, None],), "real numbers"),
        (mean_std, ([0.1, float("nan")],), "non-finite"),
        (paired_gain, ([0.1, 0.2], [0.3]), "equal-length"),
        (paired_gain, ([], []), "at least one"),
    ],
)
def test_summary_errors(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)
