"""Classification metrics for medical-image classifiers, in plain NumPy.

Everything here runs on host arrays (``np.asarray`` accepts JAX arrays too) and returns
JSON-serialisable dicts: plain Python ``float``/``int``/``list``/``None``, never NumPy scalars and
never NaN, so results can be written with ``json.dumps(..., allow_nan=False)``.

Conventions (all computed in float64):

* Prediction = ``argmax`` of the probability row; ties go to the lowest class index.
* ``confusion_matrix[t][p]`` counts samples of true class ``t`` predicted as ``p``.
* Per class ``k`` (one-vs-rest), with ``tp, fp, fn, tn`` taken from the confusion matrix:

  - ``sensitivity = tp / (tp + fn)``; ``None`` if class ``k`` has no support.
  - ``specificity = tn / (tn + fp)``; ``None`` if every sample belongs to class ``k``.
  - ``precision = tp / (tp + fp)``; ``None`` if class ``k`` is never predicted.
  - ``f1 = 2 tp / (2 tp + fp + fn)``; ``None`` only if class ``k`` is absent from both labels and
    predictions. (A class with support but no predictions, or predictions but no support, has
    ``f1 = 0`` -- the same as scikit-learn.)
  - ``auc``: one-vs-rest ROC-AUC of ``probs[:, k]``, computed as the Mann-Whitney statistic with
    average ranks, i.e. tied scores count 1/2 -- identical to the trapezoidal ROC area.
    ``None`` if class ``k`` has no positives or no negatives.

* ``balanced_accuracy``: mean sensitivity over the classes present in ``labels`` (scikit-learn's
  ``balanced_accuracy_score``).
* ``macro_f1``: mean of per-class F1 over *all* ``K`` classes, an undefined (``None``) F1 counting
  as 0. This equals ``f1_score(labels, preds, labels=range(K), average="macro", zero_division=0)``.
* ``macro_auc``: mean of the defined per-class AUCs; ``None`` if no class has both positives and
  negatives. For ``K = 2`` the two one-vs-rest AUCs coincide when ``probs[:, 0] == 1 -
  probs[:, 1]``, so ``macro_auc`` is then the usual binary ROC-AUC of ``probs[:, 1]``.
* ``ece``: ``num_bins`` equal-width bins on ``[0, 1]`` of the top-1 confidence, right-closed:
  bin ``i`` is ``(e_i, e_{i+1}]`` with ``e = np.linspace(0, 1, B + 1)`` (so a confidence exactly on
  an edge, e.g. 0.5 with B = 2, goes to the lower bin) and the first bin also holds 0. ECE is
  ``sum_b (n_b / N) * |accuracy_b - mean_confidence_b|`` over non-empty bins.
* ``nll``: ``-mean(log(max(probs[i, labels[i]], 1e-12)))``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["classification_metrics", "mean_std", "paired_gain"]

NLL_CLIP = 1e-12
# Rows of `probs` must sum to 1 within this tolerance (catches logits passed by mistake).
ROW_SUM_ATOL = 1e-3


def _validate(probs: Any, labels: Any, num_bins: Any) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D [N, K], got shape {probs.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {labels.shape}")
    n, k = probs.shape
    if labels.shape[0] != n:
        raise ValueError(
            f"probs and labels disagree on N: probs has {n} rows, labels has {labels.shape[0]}"
        )
    if n == 0:
        raise ValueError("cannot compute metrics on an empty set (N = 0)")
    if k == 0:
        raise ValueError("probs must have at least one class column (K = 0)")
    if not (np.issubdtype(probs.dtype, np.floating) or np.issubdtype(probs.dtype, np.integer)):
        raise ValueError(f"probs must be a real numeric array, got dtype {probs.dtype}")
    probs = probs.astype(np.float64)
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains non-finite values (NaN or inf)")
    if np.any(probs < 0.0):
        raise ValueError(f"probs contains negative values (min {probs.min()!r})")
    row_err = np.abs(probs.sum(axis=1) - 1.0)
    if np.any(row_err > ROW_SUM_ATOL):
        i = int(np.argmax(row_err))
        raise ValueError(
            f"probs rows must sum to 1 (got {float(probs[i].sum())!r} at row {i}); "
            "pass probabilities (e.g. softmax of logits), not logits"
        )
    if np.issubdtype(labels.dtype, np.integer):
        labels = labels.astype(np.int64)
    elif np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise ValueError("labels must be integer class indices")
        labels = labels.astype(np.int64)
    else:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    bad = (labels < 0) | (labels >= k)
    if np.any(bad):
        raise ValueError(
            f"labels must lie in [0, {k}) for K = {k} classes; "
            f"got {int(labels[bad][0])} ({int(bad.sum())} out of range)"
        )
    if isinstance(num_bins, bool) or not isinstance(num_bins, int | np.integer) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    return probs, labels


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, tied values sharing the average of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _binary_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _ece(confidence: np.ndarray, correct: np.ndarray, num_bins: int) -> float:
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # side="left": edges[i] < c <= edges[i + 1] -> bin i; c == 0 lands in bin 0 via the clip.
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins).astype(np.float64)
    conf_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
    acc_sum = np.bincount(bins, weights=correct.astype(np.float64), minlength=num_bins)
    # sum_b (n_b/N) |acc_b - conf_b| == sum_b |acc_sum_b - conf_sum_b| / N (empty bins give 0).
    return float(np.abs(acc_sum - conf_sum).sum() / count.sum())


def classification_metrics(probs: np.ndarray, labels: np.ndarray, *, num_bins: int = 15) -> dict:
    """Accuracy, balanced accuracy, macro F1/AUC, per-class stats, confusion matrix, ECE and NLL.

    Args:
      probs: float ``[N, K]`` class probabilities; rows must sum to 1 (within 1e-3).
      labels: int ``[N]`` true classes in ``[0, K)``.
      num_bins: number of equal-width confidence bins for ECE.

    Returns:
      A JSON-serialisable dict; see the module docstring for every convention and for which
      entries can be ``None``. Keys: ``n``, ``num_classes``, ``accuracy``, ``balanced_accuracy``,
      ``macro_f1``, ``macro_auc``, ``per_class`` (``sensitivity``, ``specificity``,
      ``precision``, ``f1``, ``support``, ``auc``; lists of length K), ``confusion_matrix``,
      ``ece``, ``nll``.

    Raises:
      ValueError: on mismatched or malformed shapes, N = 0, non-finite / negative / unnormalised
        probabilities, non-integer or out-of-range labels, or a non-positive ``num_bins``.
    """
    probs, labels = _validate(probs, labels, num_bins)
    n, k = probs.shape
    preds = np.argmax(probs, axis=1)  # ties -> lowest index

    cm = np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.int64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    fn = support - tp
    fp = predicted - tp
    tn = n - tp - fn - fp

    sensitivity = [_ratio(tp[c], support[c]) for c in range(k)]
    specificity = [_ratio(tn[c], tn[c] + fp[c]) for c in range(k)]
    precision = [_ratio(tp[c], predicted[c]) for c in range(k)]
    f1 = [_ratio(2 * tp[c], 2 * tp[c] + fp[c] + fn[c]) for c in range(k)]
    auc = [_binary_auc(probs[:, c], labels == c) for c in range(k)]

    present_sens = [s for s in sensitivity if s is not None]  # non-empty since N > 0
    defined_auc = [a for a in auc if a is not None]

    confidence = probs[np.arange(n), preds]
    correct = preds == labels
    p_true = np.maximum(probs[np.arange(n), labels], NLL_CLIP)

    return {
        "n": int(n),
        "num_classes": int(k),
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(np.mean(present_sens)),
        "macro_f1": float(np.mean([0.0 if v is None else v for v in f1])),
        "macro_auc": float(np.mean(defined_auc)) if defined_auc else None,
        "per_class": {
            "sensitivity": sensitivity,
            "specificity": specificity,
            "precision": precision,
            "f1": f1,
            "support": [int(s) for s in support],
            "auc": auc,
        },
        "confusion_matrix": cm.astype(int).tolist(),
        "ece": _ece(confidence, correct, int(num_bins)),
        "nll": float(-np.mean(np.log(p_true))),
    }


def _as_float_list(values: Iterable[Any], name: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of real numbers (no None): {e}") from None
    if not out:
        raise ValueError(f"{name} must contain at least one value")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} contains non-finite values: {out}")
    return out


def _summary(vals: list[float]) -> dict:
    arr = np.asarray(vals, dtype=np.float64)
    std = float(np.std(arr, ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": int(arr.size), "values": vals}


def mean_std(values: Iterable[Any]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value) over e.g. seeds.

    Returns ``{"mean", "std", "n", "values"}`` with plain floats. Raises ValueError on an empty
    input or on None / NaN / inf entries.
    """
    return _summary(_as_float_list(values, "values"))


def paired_gain(a: Iterable[Any], b: Iterable[Any]) -> dict:
    """Per-seed paired difference ``b - a`` (e.g. student minus baseline, matched by seed).

    Returns ``mean_std`` of the differences plus ``wins``: the number of pairs with ``b > a``
    (ties are not wins). Raises ValueError if the sequences differ in length or are empty.
    """
    av = _as_float_list(a, "a")
    bv = _as_float_list(b, "b")
    if len(av) != len(bv):
        raise ValueError(f"paired_gain needs equal-length a and b, got {len(av)} and {len(bv)}")
    out = _summary([y - x for x, y in zip(av, bv, strict=True)])
    out["wins"] = int(sum(y > x for x, y in zip(av, bv, strict=True)))
    return out
