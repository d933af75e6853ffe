"""The figures of a run, written as PNG files under ``DIR/figures/``.

* ``chain_accuracy.png``: test accuracy link by link, the baselines as horizontal reference lines
  and chance (1/K) dotted; with a seeds summary, means with ± std error bars and bands.
* ``confusion_matrix.png``: the last link on the test split; counts in the cells, colour = share
  of the true class (row-normalised, so rare classes stay readable).
* ``reliability.png``: reliability diagram of the last link on the test split (accuracy per
  confidence bin against the diagonal, the gap shaded, counts per bin underneath), with the
  bins and the ECE of `weckd_jax.metrics`.

Rendering uses matplotlib's object API on an explicit Agg canvas: no display is needed, and the
pyplot backend of the calling process (a notebook, say) is left untouched. Every PNG is written
to a temporary name in the same folder, then renamed: a figure file is absent or complete.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from weckd_jax import files

__all__ = [
    "CHAIN_ACCURACY",
    "CONFUSION_MATRIX",
    "FIGURE_DIR",
    "RELIABILITY",
    "plot_chain_accuracy",
    "plot_confusion_matrix",
    "plot_reliability",
    "reliability_bins",
    "write_figures",
    "write_summary_figures",
]

FIGURE_DIR = "figures"
CHAIN_ACCURACY = "chain_accuracy.png"
CONFUSION_MATRIX = "confusion_matrix.png"
RELIABILITY = "reliability.png"
DPI = 120

_BASELINE_STYLE = {  # colour, line style; other baselines get the fallbacks in order
    "same_fraction": ("tab:olive", "--"),
    "union_supervised": ("tab:orange", "--"),
    "full_supervised": ("tab:green", "-."),
    "one_step_kd": ("tab:red", ":"),
}
_FALLBACK_STYLES = [("tab:purple", ":"), ("tab:brown", "--"), ("tab:pink", "-.")]
_BASELINE_LABEL = {
    "same_fraction": "same-fraction supervised (the last fraction, no teacher)",
    "union_supervised": "union supervised (same labels as the chain)",
    "full_supervised": "full supervision (whole train pool)",
    "one_step_kd": "one-step KD (link 1 teaches the last fraction)",
}


def _save(fig: Figure, path: str) -> str:
    """Renders ``fig`` with Agg and writes it to ``path`` atomically."""
    FigureCanvasAgg(fig)
    with files.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _synthetic_note(data: dict | None) -> str:
    return " (synthetic data)" if data and data.get("source") == "synthetic" else ""


def plot_chain_accuracy(
    path: str, *, results: dict | None = None, summary: dict | None = None
) -> str:
    """Test accuracy link by link, with the baselines as reference lines.

    Args:
      path: the PNG to write.
      results: one run's ``results.json`` dict; used when ``summary`` is None.
      summary: a `weckd_jax.seeds.summarize` dict: plots means with ± std error bars (links) and
        ± std bands (baselines), over its seeds.
    """
    if summary is None and results is None:
        raise ValueError("plot_chain_accuracy needs results or summary")
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    if summary is not None:
        data = summary.get("data")
        links = summary["links"]
        xs = [r["link"] for r in links]
        means = [r["test"]["accuracy"]["mean"] for r in links]
        stds = [r["test"]["accuracy"]["std"] for r in links]
        ax.errorbar(
            xs,
            means,
            yerr=stds,
            marker="o",
            color="tab:blue",
            capsize=4,
            lw=2,
            label=f"chain link (mean ± std, {summary['n_seeds']} seeds)",
        )
        baselines = {
            name: (b["test"]["accuracy"]["mean"], b["test"]["accuracy"]["std"])
            for name, b in summary["baselines"].items()
        }
    else:
        data = results.get("data")
        links = results["links"]
        xs = [r["link"] for r in links]
        means = [r["test"]["accuracy"] for r in links]
        ax.plot(xs, means, marker="o", color="tab:blue", lw=2, label="chain link")
        baselines = {n: (b["test"]["accuracy"], None) for n, b in results["baselines"].items()}
    for x, y in zip(xs, means, strict=True):
        ax.annotate(
            f"{y:.3f}",
            (x, y),
            textcoords="offset points",
            xytext=(8, 6),
            ha="left",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"},
        )
    fallbacks = iter(_FALLBACK_STYLES * 3)
    for name, (mean, std) in baselines.items():
        colour, style = _BASELINE_STYLE.get(name) or next(fallbacks)
        label = f"{_BASELINE_LABEL.get(name, name.replace('_', ' '))}: {mean:.3f}"
        ax.axhline(mean, color=colour, ls=style, lw=1.5, label=label)
        if std:
            ax.axhspan(mean - std, mean + std, color=colour, alpha=0.12, lw=0)
    class_names = (data or {}).get("class_names")
    if class_names:
        ax.axhline(
            1 / len(class_names), color="grey", ls=":", lw=1, label=f"chance (1/{len(class_names)})"
        )
    ax.set_xticks(xs, [f"link {x}" for x in xs])
    ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy along the chain" + _synthetic_note(data))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    return _save(fig, path)


def plot_confusion_matrix(
    path: str, matrix, class_names: list[str], *, title: str = "Confusion matrix"
) -> str:
    """``matrix[t][p]`` counts of true class ``t`` predicted as ``p``: counts written in the cells,
    colour = share of the true class."""
    cm = np.asarray(matrix, dtype=np.int64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {k} class names")
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
    side = max(4.8, 0.75 * k + 2.8)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    size = 10 if k <= 8 else 7
    for t in range(k):
        for p in range(k):
            ax.text(
                p,
                t,
                str(cm[t, p]),
                ha="center",
                va="center",
                fontsize=size,
                color="white" if share[t, p] > 0.5 else "black",
            )
    ax.set_xticks(range(k), class_names, rotation=35, ha="right", rotation_mode="anchor")
    ax.set_yticks(
        range(k), [f"{n} ({int(r)})" for n, r in zip(class_names, rows[:, 0], strict=True)]
    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (support)")
    ax.set_title(title)
    return _save(fig, path)


def reliability_bins(probs, labels, *, num_bins: int = 15) -> dict:
    """Per-bin confidence and accuracy of the top-1 prediction, binned as `metrics` bins for ECE.

    Equal-width bins on [0, 1], right-closed (``(e_i, e_{i+1}]``, the first bin also holds 0);
    prediction = argmax, ties to the lowest class.

    Args:
      probs: float ``[N, K]`` class probabilities.
      labels: int ``[N]`` true classes.
      num_bins: number of bins.

    Returns:
      ``{"edges": [B+1], "count": [B], "confidence": [B], "accuracy": [B], "ece": float}``:
      plain lists; ``confidence`` / ``accuracy`` are the bin means, ``None`` for an empty bin;
      ``ece`` equals `metrics.classification_metrics(...)["ece"]` for the same ``num_bins``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],) or probs.shape[0] == 0:
        raise ValueError(
            f"reliability_bins needs probs [N, K] and labels [N] with N > 0, got {probs.shape} "
            f"and {labels.shape}"
        )
    preds = np.argmax(probs, axis=1)
    confidence = probs[np.arange(len(probs)), preds]
    correct = (preds == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=num_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=num_bins)

    def means(sums):
        return [float(s / c) if c else None for s, c in zip(sums, count, strict=True)]

    return {
        "edges": edges.tolist(),
        "count": count.astype(int).tolist(),
        "confidence": means(conf_sum),
        "accuracy": means(acc_sum),
        "ece": float(np.abs(acc_sum - conf_sum).sum() / len(probs)),
    }


def plot_reliability(
    path: str, probs, labels, *, num_bins: int = 15, title: str = "Reliability diagram"
) -> str:
    """Accuracy per confidence bin against the diagonal, the gap to the mean confidence shaded,
    and the number of predictions per bin underneath."""
    bins = reliability_bins(probs, labels, num_bins=num_bins)
    edges = np.asarray(bins["edges"])
    width = edges[1] - edges[0]
    left = edges[:-1]
    filled = [i for i, c in enumerate(bins["count"]) if c]
    acc = np.array([bins["accuracy"][i] for i in filled])
    conf = np.array([bins["confidence"][i] for i in filled])

    fig = Figure(figsize=(5.6, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(
        left[filled],
        acc,
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        lw=0.6,
        label="accuracy in the bin",
    )
    top.bar(
        left[filled],
        conf - acc,
        bottom=acc,
        width=width,
        align="edge",
        facecolor="none",
        edgecolor="tab:red",
        hatch="///",
        lw=0.8,
        zorder=3,
        label="gap to the mean confidence",
    )
    top.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    n = len(np.asarray(labels))
    top.set_title(f"{title}\nECE = {bins['ece']:.3f}  (n = {n}, {num_bins} bins)")
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(
        left, bins["count"], width=width, align="edge", color="grey", edgecolor="black", lw=0.5
    )
    bottom.set_xlabel("confidence of the predicted class")
    bottom.set_ylabel("predictions")
    return _save(fig, path)


def write_figures(
    workdir: str,
    results: dict,
    *,
    summary: dict | None = None,
    probs=None,
    labels=None,
    num_bins: int = 15,
) -> list[str]:
    """Writes the figures of one run under ``workdir/figures/`` and returns their paths.

    Args:
      workdir: the run's folder.
      results: its ``results.json`` dict.
      summary: optional `weckd_jax.seeds.summarize` dict: the chain figure then shows means with
        ± std error bars over the seeds instead of this run's values.
      probs: optional float ``[N, K]`` test probabilities of the last link (the first value
        `weckd_jax.chain.evaluate` returns on the test split); with ``labels``, adds
        ``reliability.png``.
      labels: optional int ``[N]`` true test classes, in the order of ``probs``.
      num_bins: confidence bins of the reliability diagram (15, as the ECE in ``results``).

    Returns:
      Paths of the written PNGs: ``chain_accuracy.png``, ``confusion_matrix.png`` and, with
      ``probs`` and ``labels``, ``reliability.png``.
    """
    if (probs is None) != (labels is None):
        raise ValueError("write_figures needs both probs and labels for the reliability diagram")
    folder = os.path.join(workdir, FIGURE_DIR)
    last = results["links"][-1]
    names = results["data"]["class_names"]
    note = _synthetic_note(results.get("data"))
    paths = [
        plot_chain_accuracy(os.path.join(folder, CHAIN_ACCURACY), results=results, summary=summary),
        plot_confusion_matrix(
            os.path.join(folder, CONFUSION_MATRIX),
            last["test"]["confusion_matrix"],
            names,
            title=f"Link {last['link']} on the test split (n = {last['test']['n']}){note}",
        ),
    ]
    if probs is not None:
        probs = np.asarray(probs)
        if probs.ndim != 2 or probs.shape[1] != len(names):
            raise ValueError(
                f"probs must be [N, {len(names)}] (one column per class), got {probs.shape}"
            )
        paths.append(
            plot_reliability(
                os.path.join(folder, RELIABILITY),
                probs,
                labels,
                num_bins=num_bins,
                title=f"Reliability of link {last['link']} on the test split{note}",
            )
        )
    return paths


def write_summary_figures(workdir: str, summary: dict) -> list[str]:
    """``workdir/figures/chain_accuracy.png`` for a seeds summary (mean ± std per link)."""
    path = os.path.join(workdir, FIGURE_DIR, CHAIN_ACCURACY)
    return [plot_chain_accuracy(path, summary=summary)]
