"""Markdown reports: ``DIR/report.md`` for one run, ``DIR/summary.md`` for a seeds summary.

Both are plain GitHub-flavoured Markdown (tables, relative image links to ``figures/*.png``),
written atomically. Accuracies and other rates are printed with three decimals, gains in
percentage points with one (as the console table does); an undefined value shows as ``n/a``.
"""

from __future__ import annotations

import os

from weckd_jax import files
from weckd_jax.figures import CHAIN_ACCURACY, CONFUSION_MATRIX, FIGURE_DIR, RELIABILITY
from weckd_jax.seeds import BASELINE_NAMES, GAIN_BASELINES, GAIN_LABELS

__all__ = ["render_report", "render_summary", "write_report", "write_summary"]

REPORT = "report.md"
SUMMARY = "summary.md"
METRIC_COLUMNS = (  # (results key, column title)
    ("accuracy", "test acc"),
    ("balanced_accuracy", "bal acc"),
    ("macro_f1", "macro-F1"),
    ("macro_auc", "macro-AUC"),
    ("ece", "ECE"),
)
_FIGURES = (
    (CHAIN_ACCURACY, "Test accuracy along the chain"),
    (CONFUSION_MATRIX, "Confusion matrix of the last link on the test split"),
    (RELIABILITY, "Reliability diagram of the last link on the test split"),
)
_SPLIT_TITLES = {"train": "train pool", "val": "validation", "test": "test"}
# What each of `GAIN_BASELINES` is, in the sentence of the last link's gains.
_GAIN_BASELINE_WHAT = {
    "same_fraction": "the same-fraction baseline (its backbone on its own images and labels, "
    "no teacher)",
    "one_step_kd": "one-step KD (the same student and images, taught by link 1 directly)",
    "union_supervised": "the union baseline (one backbone on the same labelled images)",
}


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _points(value) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _model_label(name: str, record: dict) -> str:
    if "link" in record:
        return f"link {record['link']}"
    return BASELINE_NAMES.get(name, name.replace("_", " "))


def _synthetic_note(data: dict) -> list[str]:
    if data.get("source") != "synthetic":
        return []
    modality = f" {data['modality']}-like" if data.get("modality") else ""
    return [
        f"> **The data is synthetic**: procedurally drawn{modality} images "
        "(`weckd_jax/data/synthetic.py`). These numbers test the method and the code; they "
        "support no clinical conclusion.",
        "",
    ]


def _figures(workdir: str) -> list[str]:
    lines = []
    for filename, caption in _FIGURES:
        if os.path.exists(os.path.join(workdir, FIGURE_DIR, filename)):
            lines += [f"![{caption}]({FIGURE_DIR}/{filename})", ""]
    return ["## Figures", "", *lines] if lines else []


def _data_section(data: dict) -> list[str]:
    names = list(data.get("class_names", []))
    source = data.get("source", "?")
    if data.get("modality"):
        source += f" ({data['modality']}-like)"
    if data.get("split_by") == "group":
        level = "group-disjoint: no group (patient) is in two splits or two fractions"
        if "n_groups" in data:
            level += f" ({data['n_groups']} groups)"
    else:
        level = "image-level: no group ids, so images of one patient may fall in different splits"
    rows = [
        ["source", source],
        [
            "images",
            f"{data.get('n_images')}: {data.get('n_train')} train pool, {data.get('n_val')} "
            f"validation, {data.get('n_test')} test",
        ],
        [
            "image size",
            f"{data.get('image_size')} × {data.get('image_size')} × {data.get('channels')}",
        ],
        ["split level", level],
        ["classes", f"{len(names)}: " + ", ".join(names)],
    ]
    lines = ["## Data", "", *_table(["", ""], rows, ["---", "---"]), ""]
    counts = data.get("class_counts", {})
    if counts and names:
        order = [k for k in ("train", "val", "test") if k in counts]
        order += sorted(
            (k for k in counts if k.startswith("fraction_")), key=lambda k: int(k.split("_")[1])
        )
        order += [k for k in counts if k not in order]
        table_rows = []
        for key in order:
            title = _SPLIT_TITLES.get(key, key.replace("_", " "))
            table_rows.append([title, *counts[key], sum(counts[key])])
        lines += [
            "Images per class:",
            "",
            *_table(["split", *names, "total"], table_rows),
            "",
        ]
    return lines


def render_report(results: dict, workdir: str = "") -> str:
    """The Markdown text of `write_report` (figures are linked when they exist in ``workdir``)."""
    data = results.get("data", {})
    links = results["links"]
    baselines = results.get("baselines", {})
    last = links[-1]
    lines = ["# WeCKD run report", ""]
    lines += _synthetic_note(data)

    runtime = results.get("runtime", {})
    facts = [f"seed {results.get('seed')}"]
    if "devices" in results:
        facts.append(f"{results['devices']} device(s), {results.get('processes', 1)} process(es)")
    if "wall_seconds" in runtime:
        facts.append(f"wall time {runtime['wall_seconds']:.0f} s")
    lines += [
        ", ".join(facts) + ". The full config is in `config.json`.",
        "",
        "Each model is the epoch with the best **validation** accuracy; the test split was "
        "evaluated once per model, after training, and never used for any choice.",
        "",
    ]

    lines += ["## Results on the test split", ""]
    header = ["model", "backbone", "teachers", "n_train", "labelled", "best epoch", "val acc"]
    header += [title for _, title in METRIC_COLUMNS]
    rows = []
    for name, record in [(r["name"], r) for r in links] + list(baselines.items()):
        rows.append(
            [
                _model_label(name, record),
                record.get("backbone", ""),
                ", ".join(t.replace("_", " ") for t in record.get("teachers", [])) or "–",
                record["n_train"],
                record["n_labelled"],
                record.get("best_epoch", ""),
                _num(record["val"]["accuracy"]),
                *[_num(record["test"].get(key)) for key, _ in METRIC_COLUMNS],
            ]
        )
    lines += _table(header, rows, ["---", "---", "---"] + ["---:"] * (len(header) - 3)) + [""]

    lines += ["## Gains of the last link", ""]
    gains = results.get("gains", {})
    sentence = f"Test accuracy of link {last['link']} minus link 1: "
    sentence += f"**{_points(gains.get('last_minus_link_1'))} points**"
    for name in GAIN_BASELINES:
        if (key := f"last_minus_{name}") in gains:
            sentence += f"; minus {_GAIN_BASELINE_WHAT[name]}: **{_points(gains[key])} points**"
    lines += [sentence + ".", ""]
    others = [(f"over link {links[0]['link']}", links[0])]
    others += [(f"over {_model_label(n, b)}", b) for n, b in baselines.items()]
    gain_rows = []
    for label, other in others:
        row = [label]
        for key, _ in METRIC_COLUMNS:
            a, b = other["test"].get(key), last["test"].get(key)
            row.append(_points(None if a is None or b is None else b - a))
        gain_rows.append(row)
    lines += [
        f"Link {last['link']} minus each model, in percentage points (for ECE lower is better, "
        "so a negative gain is an improvement):",
        "",
        *_table(["", *[title for _, title in METRIC_COLUMNS]], gain_rows),
        "",
    ]

    test = last["test"]
    per_class = test.get("per_class", {})
    names = data.get("class_names") or [f"class {i}" for i in range(test.get("num_classes", 0))]
    if per_class:
        lines += [f"## Per class: link {last['link']} on the test split", ""]
        keys = ("support", "sensitivity", "specificity", "precision", "f1", "auc")
        class_rows = []
        for i, name in enumerate(names):
            values = [per_class[k][i] if k in per_class else None for k in keys]
            class_rows.append([name, values[0], *[_num(v) for v in values[1:]]])
        lines += _table(
            ["class", "support", "sensitivity", "specificity", "precision", "F1", "AUC"],
            class_rows,
        )
        lines += [""]

    lines += _data_section(data)
    lines += _figures(workdir) if workdir else []
    return "\n".join(lines).rstrip() + "\n"


def write_report(workdir: str, results: dict) -> str:
    """Writes ``workdir/report.md`` for one run's ``results`` and returns its path.

    Tables: every link and baseline (n_train, labelled, best epoch, validation accuracy, test
    accuracy, balanced accuracy, macro-F1, macro-AUC, ECE); the gains of the last link over link 1
    and every baseline; per-class sensitivity, specificity, precision, F1 and AUC of the last link
    on test; the data (source, split level, class counts per split and fraction). A note opens the
    report when the data is synthetic. The figures of `weckd_jax.figures.write_figures` are
    embedded when they exist, so write them first.
    """
    path = os.path.join(workdir, REPORT)
    files.write_text(path, render_report(results, workdir))
    return path


def _stat(stat: dict | None, digits: int = 3) -> str:
    if stat is None or stat.get("mean") is None:
        return "n/a"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _count(stat: dict) -> str:
    if stat["std"] == 0:
        return f"{stat['mean']:.0f}"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def _gain(stat: dict | None) -> str:
    if stat is None or stat.get("mean") is None:
        return "n/a"
    text = f"{100 * stat['mean']:+.1f}"
    return text if stat["n"] == 1 else f"{text} ± {100 * stat['std']:.1f}"


def render_summary(summary: dict, workdir: str = "") -> str:
    """The Markdown text of `write_summary`."""
    seeds = summary["seeds"]
    data = summary.get("data", {})
    links = summary["links"]
    baselines = summary.get("baselines", {})
    lines = [f"# WeCKD over {len(seeds)} seeds ({', '.join(str(s) for s in seeds)})", ""]
    lines += _synthetic_note(data)
    lines += [
        "Mean ± sample standard deviation (ddof = 1) over the seeds; each seed is one complete "
        "run in `seed_<s>/` (its own data split, initialisation and data order).",
        "",
        "## Test metrics",
        "",
    ]
    header = ["model", "backbone", "n_train", "labelled", "val acc"]
    header += [title for _, title in METRIC_COLUMNS]
    rows = []
    for name, record in [(r["name"], r) for r in links] + list(baselines.items()):
        rows.append(
            [
                _model_label(name, record),
                record.get("backbone", ""),
                _count(record["n_train"]),
                _count(record["n_labelled"]),
                _stat(record["val"]["accuracy"]),
                *[_stat(record["test"].get(key)) for key, _ in METRIC_COLUMNS],
            ]
        )
    lines += _table(header, rows, ["---", "---"] + ["---:"] * (len(header) - 2)) + [""]

    gains = summary.get("gains", {})
    if gains:
        last = links[-1]["link"]
        header = ["metric"]
        for key in gains:
            header += [GAIN_LABELS.get(key, key), "wins"]
        gain_rows = []
        for metric, title in METRIC_COLUMNS:
            row = [title]
            for key in gains:
                stat = gains[key].get(metric)
                wins = "n/a" if not stat or stat.get("mean") is None else stat["wins"]
                row += [_gain(stat), f"{wins}/{len(seeds)}"]
            gain_rows.append(row)
        lines += [
            "## Gains of the last link, paired by seed",
            "",
            f"Link {last} minus the other model in the same seed, in percentage points "
            "(mean ± std of the per-seed differences); *wins* counts the seeds where link "
            f"{last} is strictly higher. For ECE lower is better: a negative gain and few wins "
            "are good.",
            "",
            *_table(header, gain_rows),
            "",
        ]

    lines += ["## Test accuracy per seed", ""]
    seed_rows = []
    for name, record in [(r["name"], r) for r in links] + list(baselines.items()):
        values = record["test"]["accuracy"]["values"]
        seed_rows.append([_model_label(name, record), *[_num(v) for v in values]])
    lines += _table(["model", *[f"seed {s}" for s in seeds]], seed_rows) + [""]

    if data:
        facts = [f"source {data.get('source', '?')}"]
        if data.get("split_by"):
            facts.append(f"{data['split_by']}-level splits")
        if data.get("class_names"):
            facts.append(f"classes: {', '.join(data['class_names'])}")
        lines += ["## Data", "", "; ".join(facts) + ".", ""]
    lines += _figures(workdir) if workdir else []
    return "\n".join(lines).rstrip() + "\n"


def write_summary(workdir: str, summary: dict) -> str:
    """Writes ``workdir/summary.md`` for a `weckd_jax.seeds.summarize` dict; returns its path.

    Tables: mean ± std of every link and baseline; the gains of the last link over link 1 and
    over the same-fraction, one-step KD and union baselines, paired by seed, with wins; test
    accuracy per seed.
    Embeds ``figures/chain_accuracy.png`` when it exists
    (`weckd_jax.figures.write_summary_figures`).
    """
    path = os.path.join(workdir, SUMMARY)
    files.write_text(path, render_summary(summary, workdir))
    return path
