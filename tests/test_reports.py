"""Seeds summaries, Markdown reports, figures and TensorBoard logs: values checked by hand."""

import glob
import io
import json
import math
import os
import stat
import struct

import numpy as np
import pytest
from PIL import Image

from weckd_jax import figures, metrics, report, report_md, seeds
from weckd_jax.metrics_log import MetricsLog
from weckd_jax.progress import Progress
from weckd_jax.tensorboard import TensorBoardWriter

# ---------------------------------------------------------------------------------------------
# Hand-made results of 3 seeds (a 3-link chain and two baselines), test metrics per seed:
#
#   model      accuracy            balanced_accuracy    macro_auc
#   link 1     0.50  0.60  0.70    0.40  0.50  0.60     0.70  0.80  0.90
#   link 2     0.55  0.60  0.80    0.45  0.50  0.70     ...
#   link 3     0.60  0.60  0.90    0.50  0.50  0.80
#   union      0.55  0.65  0.80    0.45  0.55  0.70
#   full       0.80  0.85  0.90    ...
#
# link 1 accuracy: mean 0.6, std sqrt(((-.1)^2 + 0 + .1^2) / 2) = 0.1
# link 3 - link 1 (accuracy): 0.1, 0.0, 0.2 -> mean 0.1, std 0.1, wins 2 (a tie is no win)
# link 3 - union (accuracy): 0.05, -0.05, 0.1 -> mean 1/30, std sqrt((0.035/3) / 2) = 0.0763763
# ---------------------------------------------------------------------------------------------
ACC = {
    "link_1": (0.50, 0.60, 0.70),
    "link_2": (0.55, 0.60, 0.80),
    "link_3": (0.60, 0.60, 0.90),
    "union_supervised": (0.55, 0.65, 0.80),
    "full_supervised": (0.80, 0.85, 0.90),
    "same_fraction": (0.45, 0.65, 0.85),  # link 3 minus it: 0.15, -0.05, 0.05
}


def _record(name, seed_pos, **extra):
    acc = ACC[name][seed_pos]
    return {
        "name": name,
        "backbone": "resnet18",
        "n_train": 100 + seed_pos,  # differs between seeds: 100, 101, 102
        "n_labelled": 100,
        "teachers": [],
        "val": {"accuracy": acc + 0.05},
        "test": {
            "accuracy": acc,
            "balanced_accuracy": acc - 0.1,
            "macro_f1": acc - 0.2,
            "macro_auc": min(1.0, acc + 0.2),
            "ece": 0.1 + 0.01 * seed_pos,
        },
        **extra,
    }


def _seed_results(seed_pos, seed):
    links = [_record(f"link_{k}", seed_pos, link=k) for k in (1, 2, 3)]
    return {
        "links": links,
        "baselines": {n: _record(n, seed_pos) for n in ("union_supervised", "full_supervised")},
        "gains": {},
        "data": {
            "source": "synthetic",
            "split_by": "group",
            "class_names": ["a", "b"],
            "class_counts": {"test": [seed, 10]},  # differs between seeds
        },
        "seed": seed,
    }


@pytest.fixture(scope="module")
def summary():
    # Keys as JSON gives them (strings) and out of order: sorted numerically.
    return seeds.summarize(
        {"11": _seed_results(2, 11), "3": _seed_results(1, 3), "0": _seed_results(0, 0)}
    )


def test_summary_means_stds_and_per_seed_values(summary):
    assert summary["seeds"] == [0, 3, 11] and summary["n_seeds"] == 3
    assert [r["link"] for r in summary["links"]] == [1, 2, 3]
    acc1 = summary["links"][0]["test"]["accuracy"]
    assert acc1["values"] == [0.5, 0.6, 0.7]
    assert acc1["mean"] == pytest.approx(0.6) and acc1["std"] == pytest.approx(0.1)
    assert acc1["n"] == 3
    bal3 = summary["links"][2]["test"]["balanced_accuracy"]
    assert bal3["mean"] == pytest.approx(0.6) and bal3["std"] == pytest.approx(math.sqrt(0.03))
    full = summary["baselines"]["full_supervised"]["test"]["accuracy"]
    assert full["mean"] == pytest.approx(0.85) and full["std"] == pytest.approx(0.05)
    ece = summary["links"][0]["test"]["ece"]
    assert ece["mean"] == pytest.approx(0.11) and ece["std"] == pytest.approx(0.01)
    assert summary["links"][0]["n_train"]["values"] == [100, 101, 102]
    assert summary["links"][0]["val"]["accuracy"]["mean"] == pytest.approx(0.65)
    assert set(summary["links"][0]["test"]) == set(seeds.METRICS)
    # Only what every seed shares is kept from the data records.
    assert summary["data"] == {
        "source": "synthetic",
        "split_by": "group",
        "class_names": ["a", "b"],
    }
    json.dumps(summary, allow_nan=False)


def test_summary_gains_are_paired_by_seed(summary):
    over1 = summary["gains"]["last_minus_link_1"]["accuracy"]
    assert over1["values"] == pytest.approx([0.1, 0.0, 0.2])
    assert over1["mean"] == pytest.approx(0.1) and over1["std"] == pytest.approx(0.1)
    assert over1["wins"] == 2
    union = summary["gains"]["last_minus_union_supervised"]["accuracy"]
    assert union["values"] == pytest.approx([0.05, -0.05, 0.1])
    assert union["mean"] == pytest.approx(0.1 / 3)
    assert union["std"] == pytest.approx(math.sqrt(0.035 / 6))
    assert union["wins"] == 2
    assert set(summary["gains"]["last_minus_link_1"]) == set(seeds.METRICS)


def test_summary_pairs_the_gain_over_the_same_fraction_baseline():
    runs = {}
    for pos, seed in enumerate((0, 3, 11)):
        runs[seed] = _seed_results(pos, seed)
        runs[seed]["baselines"] = {
            "same_fraction": _record("same_fraction", pos),
            **runs[seed]["baselines"],
        }
    out = seeds.summarize(runs)
    assert list(out["gains"]) == [
        "last_minus_link_1",
        "last_minus_same_fraction",
        "last_minus_union_supervised",
    ]
    same = out["gains"]["last_minus_same_fraction"]["accuracy"]
    assert same["values"] == pytest.approx([0.15, -0.05, 0.05])
    assert same["mean"] == pytest.approx(0.05) and same["std"] == pytest.approx(0.1)
    assert same["wins"] == 2
    text = report_md.render_summary(out)
    assert (
        "| metric | over link 1 | wins | over same-fraction supervised | wins | "
        "over union supervised | wins |"
    ) in text
    assert "| test acc | +10.0 ± 10.0 | 2/3 | +5.0 ± 10.0 | 2/3 | +3.3 ± 7.6 | 2/3 |" in text
    assert "| same-fraction supervised | resnet18 |" in text
    stream = io.StringIO()
    report.print_summary(Progress(stream=stream), out)
    lines = stream.getvalue().splitlines()
    assert "  last link over same-fraction supervised  +5.0 ± 10.0 points, better in 2/3 seeds" in (
        lines
    )
    assert (
        "  last link over link 1                    +10.0 ± 10.0 points, better in 2/3 seeds"
        in (lines)
    )


def test_summary_undefined_metric_and_mismatched_runs():
    runs = {0: _seed_results(0, 0), 1: _seed_results(1, 1)}
    runs[1]["links"][2]["test"]["macro_auc"] = None
    out = seeds.summarize(runs)
    assert out["links"][2]["test"]["macro_auc"]["mean"] is None
    assert out["links"][2]["test"]["macro_auc"]["undefined_in"] == [1]
    assert out["gains"]["last_minus_link_1"]["macro_auc"]["undefined_in"] == [1]
    assert out["links"][0]["test"]["macro_auc"]["mean"] == pytest.approx(0.75)
    json.dumps(out, allow_nan=False)

    single = seeds.summarize({5: _seed_results(0, 5)})
    assert single["links"][0]["test"]["accuracy"]["std"] == 0.0

    shorter = _seed_results(1, 1)
    shorter["links"] = shorter["links"][:2]
    with pytest.raises(ValueError, match="seed 1"):
        seeds.summarize({0: _seed_results(0, 0), 1: shorter})
    with pytest.raises(ValueError, match="at least one seed"):
        seeds.summarize({})


def test_summary_markdown_and_figure(summary, tmp_path):
    workdir = str(tmp_path)
    [png] = figures.write_summary_figures(workdir, summary)
    _check_png(png)
    path = report_md.write_summary(workdir, summary)
    text = _read(path)
    assert path == os.path.join(workdir, "summary.md")
    assert "# WeCKD over 3 seeds (0, 3, 11)" in text
    assert "The data is synthetic" in text
    # link 1: accuracy 0.600 ± 0.100, balanced 0.500 ± 0.100; n_train 101.0 ± 1.0
    assert "| link 1 | resnet18 | 101.0 ± 1.0 | 100 | 0.650 ± 0.100 | 0.600 ± 0.100 |" in text
    assert "| full supervised | resnet18 |" in text and "0.850 ± 0.050" in text
    # gains in points: +10.0 ± 10.0 over link 1 (2 wins of 3), +3.3 ± 7.6 over the union
    assert "| test acc | +10.0 ± 10.0 | 2/3 | +3.3 ± 7.6 | 2/3 |" in text
    assert "| link 3 | 0.600 | 0.600 | 0.900 |" in text  # per-seed test accuracy
    assert "![Test accuracy along the chain](figures/chain_accuracy.png)" in text


# ------------------------------------------------------------------------------------ report.md


def _read(path):
    with open(path) as f:
        return f.read()


def _check_png(path, min_size=(300, 250)):
    assert os.path.isfile(path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        assert image.size[0] <= 3000 and image.size[1] <= 3000, image.size
        pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 5  # not blank
    leftovers = glob.glob(os.path.join(os.path.dirname(path), ".tmp-*"))
    assert not leftovers


def _hand_results(source="folder"):
    """A 2-link run whose test metrics come from hand-made probabilities."""
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    good = np.eye(3)[labels] * 0.7 + 0.1  # every prediction right, confidence 0.8
    bad = good.copy()
    bad[[1, 3]] = [[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]  # two mistakes
    m_good = metrics.classification_metrics(good, labels)
    m_bad = metrics.classification_metrics(bad, labels)

    def rec(name, m, **extra):
        return {
            "name": name,
            "backbone": "resnet18",
            "n_train": 30,
            "n_labelled": 24,
            "teachers": extra.pop("teachers", []),
            "best_epoch": 4,
            "val": {"accuracy": 0.625},
            "test": m,
            **extra,
        }

    links = [rec("link_1", m_bad, link=1), rec("link_2", m_good, link=2, teachers=["link_1"])]
    return {
        "links": links,
        "baselines": {"union_supervised": rec("union_supervised", m_bad)},
        "gains": {"last_minus_link_1": 0.25, "last_minus_union_supervised": 0.25},
        "data": {
            "source": source,
            "split_by": "image",
            "image_size": 64,
            "channels": 1,
            "class_names": ["benign", "malignant|x", "normal"],
            "n_images": 40,
            "n_train": 24,
            "n_val": 8,
            "n_test": 8,
            "class_counts": {
                "train": [8, 8, 8],
                "val": [2, 2, 4],
                "test": [2, 2, 4],
                "fraction_1": [5, 5, 5],
                "fraction_2": [5, 5, 5],
            },
        },
        "seed": 7,
        "devices": 1,
        "processes": 1,
        "runtime": {"wall_seconds": 12.3},
    }, (good, bad, labels)


def test_report_markdown_numbers(tmp_path):
    results, _ = _hand_results()
    path = report_md.write_report(str(tmp_path), results)
    text = _read(path)
    assert path == os.path.join(str(tmp_path), "report.md")
    assert "synthetic" not in text.lower()
    assert "seed 7, 1 device(s), 1 process(es), wall time 12 s" in text
    # link 1: 6/8 right -> accuracy 0.750; per class sensitivities 0.5, 0.5, 1 -> balanced 0.667
    # link 2: all right, confidence 0.8 -> ECE 0.2; macro-F1 1, macro-AUC 1
    assert "| link 1 | resnet18 | – | 30 | 24 | 4 | 0.625 | 0.750 | 0.667 |" in text
    link2 = "| link 2 | resnet18 | link 1 | 30 | 24 | 4 | 0.625 | 1.000 | 1.000 | 1.000 | 1.000 |"
    assert link2 + " 0.200 |" in text
    assert "| union supervised | resnet18 | – | 30 | 24 | 4 |" in text
    assert "minus link 1: **+25.0 points**" in text
    assert "the same labelled images): **+25.0 points**" in text
    # Per class of the last link; the "|" in a class name is escaped.
    assert "| malignant\\|x | 2 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in text
    assert "| normal | 4 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in text
    # Data: split level and class counts with totals.
    assert "image-level: no group ids" in text
    assert "| test | 2 | 2 | 4 | 8 |" in text
    assert "| fraction 2 | 5 | 5 | 5 | 15 |" in text
    assert "64 × 64 × 1" in text
    assert "## Figures" not in text  # none written yet

    # ECE gain of link 2 over link 1 in points, computed from the two metric dicts.
    ece_gain = 100 * (results["links"][1]["test"]["ece"] - results["links"][0]["test"]["ece"])
    assert "| over link 1 | +25.0 | +33.3 |" in text
    assert f"{ece_gain:+.1f} |" in text


def test_report_synthetic_note_and_embedded_figures(tmp_path):
    results, (good, _, labels) = _hand_results(source="synthetic")
    results["data"]["modality"] = "mri"
    paths = figures.write_figures(str(tmp_path), results, probs=good, labels=labels)
    text = _read(report_md.write_report(str(tmp_path), results))
    assert text.startswith("# WeCKD run report\n\n> **The data is synthetic**: procedurally")
    assert "drawn mri-like images" in text
    for path in paths:
        name = os.path.basename(path)
        assert f"(figures/{name})" in text


def test_report_of_a_real_run(smoke_run, tmp_path):
    _, _, results = smoke_run
    text = _read(report_md.write_report(str(tmp_path), results))
    assert "The data is synthetic" in text
    for record in results["links"] + list(results["baselines"].values()):
        t = record["test"]
        row = (
            f"| {record['n_train']} | {record['n_labelled']} | {record['best_epoch']} | "
            f"{record['val']['accuracy']:.3f} | {t['accuracy']:.3f} | "
            f"{t['balanced_accuracy']:.3f} | {t['macro_f1']:.3f} | {t['macro_auc']:.3f} | "
            f"{t['ece']:.3f} |"
        )
        assert row in text, row
    gain = 100 * results["gains"]["last_minus_link_1"]
    assert f"**{gain:+.1f} points**" in text
    counts = results["data"]["class_counts"]["test"]
    assert "| test | " + " | ".join(str(c) for c in counts) + f" | {sum(counts)} |" in text


# -------------------------------------------------------------------------------------- figures


def test_figures_are_readable_pngs(smoke_run, tmp_path):
    _, _, results = smoke_run
    k = len(results["data"]["class_names"])
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, k)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, k, 50)
    paths = figures.write_figures(str(tmp_path), results, probs=probs, labels=labels)
    assert [os.path.basename(p) for p in paths] == [
        "chain_accuracy.png",
        "confusion_matrix.png",
        "reliability.png",
    ]
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        assert os.path.dirname(path) == os.path.join(str(tmp_path), "figures")
        _check_png(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # as open() gives, not 0600
    # Without probabilities there is no reliability diagram; a rewrite replaces the files.
    again = figures.write_figures(str(tmp_path), results)
    assert [os.path.basename(p) for p in again] == ["chain_accuracy.png", "confusion_matrix.png"]
    with pytest.raises(ValueError, match="one column per class"):
        figures.write_figures(str(tmp_path), results, probs=probs[:, :2], labels=labels)
    with pytest.raises(ValueError, match="both"):
        figures.write_figures(str(tmp_path), results, probs=probs)


def test_reliability_bins_match_the_ece_of_metrics():
    # conf 0.9 (right), 0.9 (wrong), 0.6 (right), 0.5 (right; 0.5 is an edge: lower bin with B=2)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 0])
    bins = figures.reliability_bins(probs, labels, num_bins=2)
    assert bins["count"] == [1, 3]
    assert bins["accuracy"] == pytest.approx([1.0, 2 / 3])
    assert bins["confidence"] == pytest.approx([0.5, 0.8])
    # |1 - 0.5| * 1/4 + |2/3 - 0.8| * 3/4 = 0.125 + 0.1 = 0.225
    assert bins["ece"] == pytest.approx(0.225)
    assert bins["ece"] == pytest.approx(
        metrics.classification_metrics(probs, labels, num_bins=2)["ece"]
    )
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), size=300)
    y = rng.integers(0, 4, 300)
    b = figures.reliability_bins(p, y)
    assert sum(b["count"]) == 300 and len(b["edges"]) == 16
    assert b["ece"] == pytest.approx(metrics.classification_metrics(p, y)["ece"], abs=1e-12)


# ---------------------------------------------------------------------------------- TensorBoard


def read_scalars(logdir):
    """``{tag: [(step, value), ...]}`` from every event file under ``logdir``, parsed from the
    TFRecord framing (u64 length, u32 masked CRC, payload, u32 masked CRC), CRCs checked."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            assert header_crc == masked_crc32c(header)
            payload = data[pos + 12 : pos + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            assert payload_crc == masked_crc32c(payload)
            pos += 16 + length
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_scalars_by_run_and_step(tmp_path):
    logdir = str(tmp_path / "tb")
    with TensorBoardWriter(logdir) as writer:
        writer.write({"run": "link_1", "epoch": 1, "step": 4, "loss": 1.5, "accuracy": 0.25})
        writer.write(
            {
                "run": "link_2",
                "epoch": 1,
                "step": 4,
                "loss": 0.75,
                "kd": 0.125,
                "temperature": 5.5,
                "val_accuracy": None,  # absent values are skipped
                "flag": True,
                "note": "text",
                "nan": float("nan"),
            }
        )
        writer.write({"run": "link_2", "epoch": 2, "step": 8, "loss": 0.5, "temperature": 2.0})
    scalars = read_scalars(logdir)
    assert scalars == {
        "link_1/loss": [(4, 1.5)],
        "link_1/accuracy": [(4, 0.25)],
        "link_2/loss": [(4, 0.75), (8, 0.5)],
        "link_2/kd": [(4, 0.125)],
        "link_2/temperature": [(4, 5.5), (8, 2.0)],
    }


def test_a_tensorboard_writer_that_logs_nothing_leaves_no_file(tmp_path):
    logdir = str(tmp_path / "tb")
    with TensorBoardWriter(logdir) as writer:
        writer.write({"run": "link_1", "epoch": 1, "step": 4, "skipped": True})  # no scalar
        writer.flush()
    assert not os.path.exists(logdir)
    with TensorBoardWriter(logdir) as writer:
        writer.write({"run": "link_1", "epoch": 1, "step": 4, "loss": 0.5})
    assert read_scalars(logdir) == {"link_1/loss": [(4, 0.5)]}


def test_tensorboard_from_a_real_metrics_file_and_rewrite(smoke_run, tmp_path):
    _, workdir, _ = smoke_run
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    logdir = str(tmp_path / "tb")
    writer = TensorBoardWriter(logdir)
    for record in records:
        writer.write(record)
    writer.write({"run": "link_1", "epoch": 99, "step": 999, "loss": 9.0})  # a stale line
    writer.flush()
    scalars = read_scalars(logdir)
    assert scalars["link_1/loss"][-1] == (999, 9.0)
    writer.rewrite(records)
    writer.close()
    scalars = read_scalars(logdir)
    expected_tags = {
        f"{r['run']}/{k}" for r in records for k in r if k not in ("run", "epoch", "step")
    }
    assert set(scalars) == expected_tags
    assert {"link_2/kd", "link_2/at", "link_2/temperature", "link_1/val_accuracy"} <= expected_tags
    for record in records:
        for key in ("loss", "accuracy", "val_accuracy"):
            if key not in record:  # validation runs every train.eval_every epochs
                continue
            tag = f"{record['run']}/{key}"
            assert (record["step"], pytest.approx(record[key], rel=1e-6)) in scalars[tag]
    assert all(step != 999 for step, _ in scalars["link_1/loss"])


def test_a_metrics_log_cut_short_is_ended_and_its_damaged_lines_are_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"run": "link_1", "epoch": e, "step": 4 * e, "loss": 1.0 / e} for e in (1, 2, 3)]
    lines = [json.dumps(r) + "\n" for r in records]
    said = []
    # A write cut short (a full disk, an interrupted copy of the run's folder): the next record
    # would be appended to the piece it left, which is dropped, with a warning.
    path.write_text(lines[0] + lines[1][:20])
    log = MetricsLog(str(tmp_path), said.append)
    assert path.read_text() == lines[0]
    assert said == [
        f"warning: the last line of {path} was the piece of a record whose write was cut short "
        "(a full disk, or an interrupted copy of the run's folder): dropped (20 bytes)"
    ]
    log.write(records[1])
    log.close()
    assert path.read_text() == lines[0] + lines[1]
    # A whole record without its newline only gets one; so does a last line that is JSON but no
    # record (edited by hand): only a line that is no JSON at all is a write cut short.
    said.clear()
    for last in (lines[1], '{"note": "edited"}\n', "[2]\n"):
        path.write_text(lines[0] + last.rstrip("\n"))
        MetricsLog(str(tmp_path), said.append).close()
        assert (path.read_text(), said) == (lines[0] + last, [])
    # A line edited by hand (or damaged) is kept as it is, and left out of TensorBoard, when a
    # resumed job drops its records past its checkpoint.
    path.write_text(lines[0] + "not a record\n" + lines[1] + "[2]\n" + lines[2])
    log = MetricsLog(str(tmp_path), said.append)
    log.drop_after("link_1", 4)
    log.close()
    assert path.read_text() == lines[0] + "not a record\n" + "[2]\n"
    assert said == [
        f"warning: {path} holds no metrics record on line(s) 2, 3 (damaged or edited): kept as "
        "they are, and left out of TensorBoard; restore them from a backup, or delete them, to "
        "silence this"
    ]
    assert read_scalars(str(tmp_path / "tensorboard")) == {"link_1/loss": [(4, 1.0)]}
