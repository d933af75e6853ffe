"""What a run tells its user: the data summary, the gains, and the final results table."""

from __future__ import annotations

from weckd_jax.data.splits import Splits, class_counts
from weckd_jax.data.types import ImageSet
from weckd_jax.seeds import GAIN_BASELINES, GAIN_LABELS


def data_record(config, data: ImageSet, splits: Splits) -> dict:
    """The ``data`` section of ``results.json``: source, split level and class counts per split."""
    k = data.num_classes
    counts = {
        "train": class_counts(data.labels, splits.train, k),
        "val": class_counts(data.labels, splits.val, k),
        "test": class_counts(data.labels, splits.test, k),
    }
    for i, fraction in enumerate(splits.fractions, start=1):
        counts[f"fraction_{i}"] = class_counts(data.labels, fraction, k)
    record = {
        "source": config.data.source,
        "split_by": splits.split_by,
        "image_size": int(data.images.shape[1]),
        "channels": int(data.images.shape[3]),
        "class_names": list(data.class_names),
        "n_images": len(data),
        "n_train": int(len(splits.train)),
        "n_val": int(len(splits.val)),
        "n_test": int(len(splits.test)),
        "class_counts": counts,
    }
    if config.data.source == "synthetic":
        record["modality"] = config.data.modality
    if data.groups is not None:
        record["n_groups"] = int(len(set(data.groups.tolist())))
    return record


def gains(links: list[dict], baselines: dict[str, dict]) -> dict:
    """Test-accuracy gain of the last link over link 1 and over each baseline of
    `seeds.GAIN_BASELINES` that ran: ``{"last_minus_link_1": .., "last_minus_<name>": ..}``."""
    last = links[-1]["test"]["accuracy"]
    out = {"last_minus_link_1": last - links[0]["test"]["accuracy"]}
    for name in GAIN_BASELINES:
        if name in baselines:
            out[f"last_minus_{name}"] = last - baselines[name]["test"]["accuracy"]
    return out


def print_data_summary(progress, data: ImageSet, splits: Splits) -> None:
    k = data.num_classes
    level = (
        "group-disjoint (no group is in two splits or fractions)"
        if splits.split_by == "group"
        else "image-level (no group ids: images of one patient may fall in different splits)"
    )
    progress.print(f"data: {len(data)} images, {k} classes, splits are {level}")
    progress.print(f"  {'':<12}" + "".join(f"{name[:10]:>11}" for name in data.class_names))
    rows = [("train", splits.train), ("val", splits.val), ("test", splits.test)]
    rows += [(f"fraction {i}", f) for i, f in enumerate(splits.fractions, start=1)]
    for name, index in rows:
        progress.print(
            f"  {name:<12}" + "".join(f"{c:>11}" for c in class_counts(data.labels, index, k))
        )


def print_results(progress, results: dict) -> None:
    """The final table: validation accuracy and (unless a search kept the test split untouched)
    test accuracy / balanced accuracy / macro-F1 of every link and baseline."""
    rows = [(f"link {r['link']}", r) for r in results["links"]]
    rows += list(results["baselines"].items())
    progress.print()
    progress.print(
        f"{'':<18}{'backbone':<13}{'n_train':>8}{'labelled':>9}{'val acc':>9}"
        f"{'test acc':>10}{'bal acc':>9}{'macro-F1':>10}"
    )
    for name, r in rows:
        line = (
            f"{name:<18}{r['backbone']:<13}{r['n_train']:>8}{r['n_labelled']:>9}"
            f"{r['val']['accuracy']:>9.3f}"
        )
        if "test" in r:
            test = r["test"]
            line += (
                f"{test['accuracy']:>10.3f}{test['balanced_accuracy']:>9.3f}"
                f"{test['macro_f1']:>10.3f}"
            )
        progress.print(line)
    if "gains" in results:
        g = results["gains"]
        progress.print(
            "gain of the last link "
            + "; ".join(f"{GAIN_LABELS[key]}: {100 * g[key]:+.1f} points" for key in g)
        )
    else:
        progress.print("the test split was not evaluated")
    runtime = results["runtime"]
    split = ", ".join(f"{k} {v:.1f}" for k, v in runtime["time_split"].items())
    progress.print(f"wall time {runtime['wall_seconds']:.0f} s ({split})")


def print_summary(progress, summary: dict) -> None:
    """Test accuracy mean ± std over seeds per link and baseline, and the paired gains."""
    progress.print()
    progress.print(f"over seeds {summary['seeds']}: test accuracy, mean ± std (per seed)")
    rows = [(f"link {r['link']}", r) for r in summary["links"]]
    rows += list(summary["baselines"].items())
    for name, r in rows:
        acc = r["test"]["accuracy"]
        values = ", ".join(f"{v:.3f}" for v in acc["values"])
        progress.print(f"  {name:<18}{acc['mean']:.3f} ± {acc['std']:.3f}   ({values})")
    labels = {key: "last link " + GAIN_LABELS[key] for key in summary["gains"]}
    width = max(34, *(len(label) + 2 for label in labels.values()))
    for key, gain in summary["gains"].items():
        progress.print(
            f"  {labels[key]:<{width}}{100 * gain['accuracy']['mean']:+.1f} ± "
            f"{100 * gain['accuracy']['std']:.1f} points, better in "
            f"{gain['accuracy']['wins']}/{gain['accuracy']['n']} seeds"
        )
