"""Results over several seeds: mean ± std of every link and baseline, and paired gains.

A multi-seed experiment runs one chain per seed (``DIR/seed_<s>/results.json``);
`summarize` turns those ``results.json`` dicts into one JSON-serialisable summary:

* for every link and baseline, `metrics.mean_std` (``mean``, ``std`` with ddof=1, ``n``,
  ``values`` in seed order) of the test metrics in `METRICS`, of validation accuracy and of
  ``n_train`` / ``n_labelled`` (these can differ between seeds: splits depend on the seed);
* the gain of the last link over link 1 and over the baselines of `GAIN_BASELINES`
  (same-fraction supervised, one-step KD, union supervised) that ran, **paired by seed**
  (`metrics.paired_gain`: the per-seed difference ``last - other``, its mean ± std and ``wins``,
  the number of seeds where the last link is strictly higher). For ``ece`` lower is better, so a
  negative gain is an improvement there.

A metric that is undefined (``None``) in some seed (``macro_auc`` when a test split lacks a class)
is summarised as ``None`` with the seeds where it was missing listed in ``undefined_in``.
"""

from __future__ import annotations

from typing import Any

from weckd_jax import metrics

__all__ = ["GAIN_BASELINES", "METRICS", "summarize"]

# Test metrics summarised for every link and baseline (keys of `metrics.classification_metrics`).
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece")
# The baselines the last link's gain is measured against, besides link 1 (full supervision is
# an upper bound with more labels, not a comparison at the chain's budget).
GAIN_BASELINES = ("same_fraction", "one_step_kd", "union_supervised")
# The baselines as the reports name them, and the keys of the gains.
BASELINE_NAMES = {
    "same_fraction": "same-fraction supervised",
    "union_supervised": "union supervised",
    "full_supervised": "full supervised",
    "one_step_kd": "one-step KD",
}
GAIN_LABELS = {
    "last_minus_link_1": "over link 1",
    **{f"last_minus_{name}": f"over {BASELINE_NAMES[name]}" for name in GAIN_BASELINES},
}


def _stat(values: list[Any], seeds: list[int]) -> dict | None:
    missing = [s for s, v in zip(seeds, values, strict=True) if v is None]
    if missing:
        return {
            "mean": None,
            "std": None,
            "n": len(values),
            "values": values,
            "undefined_in": missing,
        }
    return metrics.mean_std(values)


def _paired(a: list[Any], b: list[Any], seeds: list[int]) -> dict:
    missing = [s for s, x, y in zip(seeds, a, b, strict=True) if x is None or y is None]
    if missing:
        return {"mean": None, "std": None, "n": len(a), "values": None, "undefined_in": missing}
    return metrics.paired_gain(a, b)


def _model_summary(records: list[dict], seeds: list[int]) -> dict:
    first = records[0]
    out = {
        "name": first["name"],
        "backbone": first["backbone"],
        "teachers": first.get("teachers", []),
        "n_train": _stat([r["n_train"] for r in records], seeds),
        "n_labelled": _stat([r["n_labelled"] for r in records], seeds),
        "val": {"accuracy": _stat([r["val"]["accuracy"] for r in records], seeds)},
        "test": {m: _stat([r["test"].get(m) for r in records], seeds) for m in METRICS},
    }
    if "link" in first:
        out = {"link": first["link"], **out}
    return out


def summarize(results_by_seed: dict[int, dict]) -> dict:
    """Mean ± std over seeds of every link and baseline, and the paired gains of the last link.

    Args:
      results_by_seed: ``{seed: results}``, each ``results`` as `weckd_jax.chain.run` returns
        (or ``results.json`` holds). Keys may be ints or strings of ints; they are sorted
        numerically and every list in the summary follows that order (``summary["seeds"]``).

    Returns:
      A JSON-serialisable dict::

        {"seeds": [0, 1, 2], "n_seeds": 3, "metrics": [...],
         "links": [{"link", "name", "backbone", "teachers", "n_train", "n_labelled",
                    "val": {"accuracy": stat}, "test": {metric: stat}}, ...],
         "baselines": {name: {same keys but "link"}},
         "gains": {"last_minus_link_1": {metric: gain},
                   "last_minus_<baseline>": {metric: gain}},  # each of GAIN_BASELINES that ran
         "data": the entries of results["data"] that every seed shares}

      where ``stat`` is `metrics.mean_std` and ``gain`` is `metrics.paired_gain` (the last link
      minus the other model, paired by seed, with ``wins``).

    Raises:
      ValueError: no seeds, or the seeds' runs differ in their links or baselines.
    """
    if not results_by_seed:
        raise ValueError("summarize needs the results of at least one seed")
    by_seed = sorted(((int(s), r) for s, r in results_by_seed.items()), key=lambda kv: kv[0])
    seeds = [s for s, _ in by_seed]
    runs = [r for _, r in by_seed]

    link_names = [[link["name"] for link in r["links"]] for r in runs]
    baseline_names = [sorted(r["baselines"]) for r in runs]
    for seed, links, baselines in zip(seeds, link_names, baseline_names, strict=True):
        if links != link_names[0] or baselines != baseline_names[0]:
            raise ValueError(
                f"the run of seed {seed} has links {links} and baselines {baselines}, but the run "
                f"of seed {seeds[0]} has {link_names[0]} and {baseline_names[0]}: summarise runs "
                "of one config that differ only in the seed"
            )
    if not link_names[0]:
        raise ValueError("the runs have no links")

    links = [
        _model_summary([r["links"][i] for r in runs], seeds) for i in range(len(link_names[0]))
    ]
    baselines = {
        name: _model_summary([r["baselines"][name] for r in runs], seeds)
        for name in runs[0]["baselines"]
    }

    def gains_over(other: list[dict]) -> dict:
        last = [r["links"][-1]["test"] for r in runs]
        return {
            m: _paired([o["test"].get(m) for o in other], [x.get(m) for x in last], seeds)
            for m in METRICS
        }

    gains = {"last_minus_link_1": gains_over([r["links"][0] for r in runs])}
    for name in GAIN_BASELINES:
        if name in baselines:
            gains[f"last_minus_{name}"] = gains_over([r["baselines"][name] for r in runs])

    return {
        "seeds": seeds,
        "n_seeds": len(seeds),
        "metrics": list(METRICS),
        "links": links,
        "baselines": baselines,
        "gains": gains,
        "data": _common(r.get("data", {}) for r in runs),
    }


def _common(records) -> dict:
    """The ``data`` entries equal in every seed's run (class counts may differ between seeds)."""
    records = list(records)
    return {k: v for k, v in records[0].items() if all(r.get(k) == v for r in records[1:])}
