"""The chain end to end on the smoke config: files, schema, teachers from disk, no test leakage,
determinism."""

import copy
import dataclasses
import glob
import io
import json
import os
import pathlib
import shlex
import shutil

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from tests.conftest import REPO, run_python, smoke_config
from weckd_jax import chain, checkpoints, parallel, report
from weckd_jax.data import pipeline
from weckd_jax.data.synthetic import generate
from weckd_jax.data.types import DataError
from weckd_jax.progress import Progress, Timer

METRIC_KEYS = {"accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "confusion_matrix", "ece"}


def _without_timings(results):
    return {k: v for k, v in results.items() if k != "runtime"}


def test_results_schema_and_files(smoke_run):
    config, workdir, results = smoke_run
    for name in ("config.json", "data.json", "metrics.jsonl", "results.json"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, "results.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(results))
    assert [r["link"] for r in results["links"]] == [1, 2]
    for record in results["links"] + list(results["baselines"].values()):
        assert set(record["test"]) >= METRIC_KEYS and set(record["val"]) >= METRIC_KEYS
        assert 0.0 <= record["test"]["accuracy"] <= 1.0
        assert record["n_labelled"] <= record["n_train"]
        assert record["backbone"] == "resnet10"
    assert set(results["baselines"]) == {"union_supervised", "full_supervised"}
    links = results["links"]
    union = results["baselines"]["union_supervised"]
    assert union["n_train"] == sum(r["n_train"] for r in links)
    assert results["gains"]["last_minus_link_1"] == (
        links[-1]["test"]["accuracy"] - links[0]["test"]["accuracy"]
    )
    assert results["data"]["split_by"] == "group"
    assert results["data"]["source"] == "synthetic"
    assert results["devices"] == jax.device_count() and results["processes"] == 1
    assert results["seed"] == config.seed
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    runs = {line["run"] for line in lines}
    assert runs == {"link_1", "link_2", "union_supervised", "full_supervised"}
    assert len(lines) == len(runs) * config.train.epochs
    for name in runs:
        assert checkpoints.has_final(workdir, name)


def test_teacher_of_link_2_is_link_1_checkpoint_on_disk(smoke_run):
    _, workdir, results = smoke_run
    link1, link2 = results["links"]
    assert link1["teacher_fingerprints"] == [] and link2["teachers"] == ["link_1"]
    spec, restored = chain.restore_finished(
        workdir, "link_1", chain.parallel.data_mesh(), (32, 32, 3)
    )
    assert spec.backbone == "resnet10"
    assert checkpoints.fingerprint(restored) == link1["fingerprint"]
    assert link2["teacher_fingerprints"] == [link1["fingerprint"]]
    assert link2["fingerprint"] != link1["fingerprint"]


def test_fractions_disjoint_and_test_split_never_trained_on(tmp_path, monkeypatch):
    config = smoke_config()
    config.baselines.full_supervised = False
    trained_on = []
    original = pipeline.train_pipeline

    def recording(data, index, *args, **kwargs):
        trained_on.append(np.array(index))
        return original(data, index, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_pipeline", recording)
    chain.run(config, str(tmp_path), Progress(enabled=False))
    from weckd_jax import data as data_lib

    data = data_lib.load(config.data, seed=config.seed)
    splits = chain.make_run_splits(config, data)
    link1, link2, union = trained_on
    assert not set(link1.tolist()) & set(link2.tolist())
    np.testing.assert_array_equal(np.sort(union), np.sort(np.concatenate([link1, link2])))
    for index in trained_on:
        assert not set(index.tolist()) & set(splits.test.tolist())
        assert not set(index.tolist()) & set(splits.val.tolist())
        assert not set(data.groups[index].tolist()) & set(data.groups[splits.test].tolist())


def test_same_seed_gives_identical_results(smoke_run, tmp_path):
    config, _, first = smoke_run
    second = chain.run(config, str(tmp_path), Progress(enabled=False))
    assert _without_timings(second) == _without_timings(json.loads(json.dumps(first)))


def test_launch_command_line_with_overrides(tmp_path):
    workdir = tmp_path / "run"
    out = run_python(
        "-m",
        "weckd_jax.launch",
        "--config",
        os.path.join(REPO, "configs", "smoke.py"),
        "--config.train.epochs=1",
        f"--workdir={workdir}",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert len(results["links"]) == 2
    assert list(results["baselines"]) == ["union_supervised", "full_supervised"]
    # One program per distinct architecture and shape for the whole run: the supervised step
    # (link 1 and both baselines), the distillation step (link 2), and evaluation (every split,
    # the last partial batch padded).
    assert results["runtime"]["compiles"] == 3
    assert "gain of the last link over link 1" in out.stdout
    assert "test acc" in out.stdout


def test_one_step_kd_is_the_last_link_taught_by_link_1(tmp_path, monkeypatch):
    config = smoke_config()
    with config.unlocked():
        config.chain.length, config.chain.fraction, config.train.epochs = 3, 0.2, 1
        config.baselines.union_supervised = config.baselines.full_supervised = False
        config.baselines.one_step_kd = True
    fed = {}
    original = pipeline.train_pipeline

    def recording(data, index, label_mask, **kwargs):
        fed[len(fed)] = (np.array(index), np.array(label_mask), kwargs["seed"])
        return original(data, index, label_mask, **kwargs)

    monkeypatch.setattr(pipeline, "train_pipeline", recording)
    stream = io.StringIO()
    results = chain.run(config, str(tmp_path), Progress(stream=stream))
    link1, _, link3 = results["links"]
    assert list(results["baselines"]) == ["one_step_kd"]
    one_step = results["baselines"]["one_step_kd"]
    assert one_step["teachers"] == ["link_1"] and link3["teachers"] == ["link_2"]
    assert one_step["teacher_fingerprints"] == [link1["fingerprint"]]
    assert one_step["fingerprint"] != link3["fingerprint"]
    # The same images, labels, initialisation and data order as link 3: only the teacher differs.
    assert (one_step["n_train"], one_step["n_labelled"]) == (link3["n_train"], link3["n_labelled"])
    (index3, mask3, seed3), (index_kd, mask_kd, seed_kd) = fed[2], fed[3]
    np.testing.assert_array_equal(index_kd, index3)
    np.testing.assert_array_equal(mask_kd, mask3)
    assert seed_kd == seed3
    gain = link3["test"]["accuracy"] - one_step["test"]["accuracy"]
    assert results["gains"]["last_minus_one_step_kd"] == gain
    assert f"over one-step KD: {100 * gain:+.1f} points" in stream.getvalue()
    report = (tmp_path / "report.md").read_text()
    assert "minus one-step KD (the same student and images, taught by link 1 directly)" in report
    assert "| one-step KD | resnet10 | link 1 |" in report


def test_same_fraction_is_the_last_link_without_teacher_and_moves_no_other_job():
    config = smoke_config()
    with config.unlocked():
        config.chain.length, config.chain.fraction = 3, 0.2
        config.baselines.one_step_kd = True
    from weckd_jax import data as data_lib

    data = data_lib.load(config.data, seed=config.seed)
    splits = chain.make_run_splits(config, data)
    without = {job.name: job for job in chain.plan_jobs(config, splits, data.num_classes)}
    config.baselines.same_fraction = True
    jobs = chain.plan_jobs(config, splits, data.num_classes)
    names = [job.name for job in jobs]
    assert names == [
        "link_1",
        "link_2",
        "link_3",
        "same_fraction",
        "union_supervised",
        "full_supervised",
        "one_step_kd",
    ]
    # Every other job keeps its index (initialisation and data order), images and teachers.
    for job in jobs:
        if job.name != "same_fraction":
            assert _job_fields(job) == _job_fields(without[job.name])
    link3, same = jobs[2], jobs[3]
    assert link3.init_from == "link_2" and link3.teachers == ("link_2",)
    # Link 3's images, labels, initialisation key and data order; no teacher, random init.
    assert same.teachers == () and same.init_from is None
    unchanged = dataclasses.replace(same, name="link_3", teachers=("link_2",), init_from="link_2")
    assert _job_fields(unchanged) == _job_fields(link3)


def _job_fields(job: chain.Job) -> dict:
    """A job's fields, arrays as lists (comparable with ==)."""
    return {
        k: v.tolist() if isinstance(v, np.ndarray) else v
        for k, v in dataclasses.asdict(job).items()
    }


def test_same_fraction_run_records_and_gains(smoke_run, same_fraction_run):
    _, _, plain = smoke_run
    _, workdir, results = same_fraction_run
    plain = json.loads(json.dumps(plain))
    assert list(results["baselines"]) == ["same_fraction", "union_supervised", "full_supervised"]
    # Turning the baseline on changes no number of the other jobs.
    assert results["links"] == plain["links"]
    for name, record in plain["baselines"].items():
        assert results["baselines"][name] == record
    assert {k: v for k, v in results["gains"].items() if k != "last_minus_same_fraction"} == (
        plain["gains"]
    )
    same, link2 = results["baselines"]["same_fraction"], results["links"][-1]
    assert same["teachers"] == [] and same["teacher_fingerprints"] == []
    assert (same["n_train"], same["n_labelled"]) == (link2["n_train"], link2["n_labelled"])
    assert same["fingerprint"] not in (link2["fingerprint"], results["links"][0]["fingerprint"])
    gain = link2["test"]["accuracy"] - same["test"]["accuracy"]
    assert results["gains"]["last_minus_same_fraction"] == gain
    assert list(results["gains"]) == [
        "last_minus_link_1",
        "last_minus_same_fraction",
        "last_minus_union_supervised",
    ]
    stream = io.StringIO()
    report.print_results(Progress(stream=stream), results)
    assert f"; over same-fraction supervised: {100 * gain:+.1f} points; over union" in (
        stream.getvalue()
    )
    with open(os.path.join(workdir, "report.md")) as f:
        text = f.read()
    assert "minus the same-fraction baseline (its backbone on its own images and labels, " in text
    assert "| same-fraction supervised | resnet10 | – |" in text
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert sum(json.loads(line)["run"] == "same_fraction" for line in f) == 2


def test_timer_counts_a_nested_phase_for_itself_alone(monkeypatch):
    from weckd_jax import progress

    clock = iter([0.0, 1.0, 3.0, 10.0])  # eval starts, compile starts, compile ends, eval ends
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    timer = Timer()
    with timer("eval"), timer("compile"):
        pass
    assert timer.as_dict() == {"compile": 2.0, "eval": 8.0}


def test_timed_call_counts_the_compiling_call_as_compile_and_later_calls_as_the_phase():
    fn = jax.jit(lambda x: x * 2)
    timer = Timer()
    assert chain._timed_call(timer, "train", fn, np.float32(3)) == 6
    assert set(timer.as_dict()) == {"compile"} and timer.total("compile") > 0
    compiled = timer.total("compile")
    assert chain._timed_call(timer, "train", fn, np.float32(4)) == 8
    assert timer.total("compile") == compiled and timer.total("train") > 0
    assert chain._timed_call(timer, None, fn, np.float32(5)) == 10  # untimed: nothing added
    assert set(timer.as_dict()) == {"compile", "train"} and timer.total("eval") == 0.0


def test_padded_map_times_the_compiling_call_as_compile():
    data = generate("otoscopy", num_images=10, image_size=32, seed=0)
    mesh = parallel.data_mesh()
    fn = jax.jit(lambda variables, images: images.astype(np.float32).mean(axis=(1, 2, 3)))
    timer = Timer()
    with timer("eval"):
        first = chain._padded_map(fn, None, data.images, np.arange(10), batch_size=4, mesh=mesh,
                                  timer=timer)  # fmt: skip
    compiled = timer.as_dict()["compile"]
    assert compiled > 0 and fn._cache_size() == 1
    again = chain._padded_map(fn, None, data.images, np.arange(10), batch_size=4, mesh=mesh,
                              timer=timer)  # fmt: skip
    assert timer.as_dict()["compile"] == compiled  # compiled once: later calls are not compile
    np.testing.assert_allclose(
        first, data.images.astype(np.float32).mean(axis=(1, 2, 3)), rtol=1e-6
    )
    np.testing.assert_array_equal(first, again)


def test_padded_map_holds_its_output_once():
    import tracemalloc

    images = np.zeros((64, 4, 4, 3), np.uint8)
    mesh = parallel.data_mesh()

    def fn(variables, x):  # host outputs, so that tracemalloc sees every batch's
        return {"wide": np.ones((x.shape[0], 4096), np.float32)}

    tracemalloc.start()
    out = chain._padded_map(fn, None, images, np.arange(64), batch_size=8, mesh=mesh)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = out["wide"].nbytes  # 1 MiB; concatenating the batches at the end peaks at twice it
    assert out["wide"].shape == (64, 4096)
    assert peak < 1.5 * size, (peak, size)


def test_data_fingerprint_sees_pixels_labels_groups_and_classes():
    from weckd_jax.data.types import fingerprint

    data = generate("otoscopy", num_images=40, image_size=16, seed=0, images_per_group=2)
    same = generate("otoscopy", num_images=40, image_size=16, seed=0, images_per_group=2)
    assert fingerprint(data) == fingerprint(same)
    images = data.images.copy()
    images[3, 2, 1, 0] ^= 1
    repixelled = fingerprint(dataclasses.replace(data, images=images))
    assert repixelled["examples"] == fingerprint(data)["examples"]
    assert repixelled["pixels"] != fingerprint(data)["pixels"]
    labels = data.labels.copy()
    labels[0] = (labels[0] + 1) % data.num_classes
    groups = data.groups.copy()
    groups[0] = groups.max() + 1
    names = ("x",) + data.class_names[1:]
    changed = [
        dataclasses.replace(data, labels=labels),
        dataclasses.replace(data, groups=groups),
        dataclasses.replace(data, class_names=names),
        data.take(np.arange(39)),
    ]
    prints = {fingerprint(d)["examples"] for d in changed}
    assert len(prints) == len(changed) and fingerprint(data)["examples"] not in prints


def _bound_copy(smoke_run, tmp_path):
    """A workdir bound to the smoke run's config, data and splits, as after a crash in link 1."""
    config, workdir, _ = smoke_run
    for name in ("config.json", "data.json"):
        shutil.copy(os.path.join(workdir, name), tmp_path / name)
    from weckd_jax import data as data_lib

    data = data_lib.load(config.data, seed=config.seed)
    return config, data, chain.make_run_splits(config, data)


def test_resuming_on_other_data_is_refused(smoke_run, tmp_path, monkeypatch):
    config, original, splits = _bound_copy(smoke_run, tmp_path)
    labels = original.labels.copy()
    labels[0] = (labels[0] + 1) % original.num_classes  # one image relabelled
    monkeypatch.setattr(
        chain.data_lib, "load", lambda *a, **k: dataclasses.replace(original, labels=labels)
    )
    with pytest.raises(DataError, match="holds a run on other data: the same number of images"):
        chain.run(config, str(tmp_path), Progress(enabled=False))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "data.json"]  # nothing trained
    fewer = original.take(np.arange(len(original) - 1))
    with pytest.raises(DataError, match=f"started on {len(original)} images, the data has"):
        chain.bind_workdir(config, str(tmp_path), fewer, splits, writer=True)
    # The same data is accepted without a word.
    assert chain.bind_workdir(config, str(tmp_path), original, splits, writer=True) is None


def test_a_workdir_of_an_older_version_is_refused_with_the_fix_that_works(tmp_path):
    from weckd_jax import config as config_lib

    config = smoke_config()
    saved = config_lib.as_json(config)
    del saved["baselines"]["one_step_kd"]  # a key this version added
    del saved["train"]["checkpoint_every"]  # harmless: never named
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(config_lib.ConfigError) as error:
        chain.check_workdir(config, str(tmp_path))
    message = str(error.value)
    assert "baselines.one_step_kd: '(absent)' -> False" in message
    assert message.endswith(
        "The run was started by an older weckd_jax, without baselines.one_step_kd: finish it "
        "with the version that started it, or use a new --workdir."
    )
    saved = config_lib.as_json(config)
    # The user's own changes: the saved values are the fix, given as overrides to add.
    saved["distill"]["alpha"] = 0.3
    saved["model"]["backbone"] = "resnet10,resnet18"
    saved["train"]["augment"] = False
    saved["data"]["group_regex"] = r"(P\d+) scan"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(config_lib.ConfigError) as error:
        chain.check_workdir(config, str(tmp_path))
    message = str(error.value)
    assert message.endswith(
        f"resume this run with its saved values (in {tmp_path / 'config.json'}) by adding: "
        "'--config.data.group_regex=(P\\d+) scan' --config.distill.alpha=0.3 "
        "--config.model.backbone=resnet10,resnet18 --config.train.augment=False"
    )
    # Parsed as the command line parses them, they give the saved config back.
    argv = ["launch", *shlex.split(message.rsplit("by adding: ", 1)[1])]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    assert config_lib.as_json(flag_values.config) == saved
    chain.check_workdir(flag_values.config, str(tmp_path))


def test_a_folder_of_images_or_a_search_is_refused_as_a_workdir(tmp_path):
    from weckd_jax import config as config_lib

    config = smoke_config()
    (tmp_path / "normal").mkdir()
    (tmp_path / "normal" / "ear_01.PNG").write_bytes(b"")
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(config_lib.ConfigError, match=r"holds images \(.*ear_01.PNG\), not a run"):
        chain.run(config, str(tmp_path), Progress(enabled=False))
    assert sorted(os.listdir(tmp_path)) == listing  # nothing written into the user's images
    (tmp_path / "normal" / "ear_01.PNG").unlink()
    (tmp_path / "manifest.csv").write_text("path,label\n")
    with pytest.raises(config_lib.ConfigError, match="manifest.csv"):
        chain.check_workdir(config, str(tmp_path))
    (tmp_path / "manifest.csv").unlink()
    chain.check_workdir(config, str(tmp_path))  # folders without images: a fresh run may start

    (tmp_path / "study.db").write_bytes(b"")
    with pytest.raises(config_lib.ConfigError, match="is the folder of a hyper-parameter search"):
        chain.check_workdir(config, str(tmp_path))


def test_a_multi_seed_run_in_a_search_folder_is_refused(tmp_path):
    from weckd_jax import config as config_lib

    search = smoke_config()
    search.tune.space = "distill.alpha:0.2:0.8"
    (tmp_path / "config.json").write_text(json.dumps(config_lib.as_json(search)))
    (tmp_path / "study.db").write_bytes(b"")
    (tmp_path / "trials" / "0").mkdir(parents=True)
    listing = sorted(tmp_path.rglob("*"))
    config = smoke_config()
    with config.unlocked():
        config.seeds = "0,1"
    with pytest.raises(config_lib.ConfigError, match="is the folder of a hyper-parameter search"):
        chain.run_seeds(config, str(tmp_path), Progress(enabled=False))
    assert sorted(tmp_path.rglob("*")) == listing  # no seed_0/ begun


def test_a_single_run_in_a_multi_seed_experiment_folder_is_refused(tmp_path):
    from weckd_jax import config as config_lib

    # A multi-seed experiment stopped in its first seed: the experiment's own config.json comes
    # only once that seed has finished, so seed_0/ is all that marks the folder.
    (tmp_path / "seed_0" / "checkpoints" / "link_1" / "train").mkdir(parents=True)
    listing = sorted(tmp_path.rglob("*"))
    config = smoke_config()
    with pytest.raises(config_lib.ConfigError) as error:
        chain.run(config, str(tmp_path), Progress(enabled=False))
    assert str(error.value) == (
        f"{tmp_path} holds a multi-seed run of launch (its seed_0/ folder, one run per seed); a "
        "single run there would mix its files with the experiment's. Continue the experiment "
        "with its own --config.seeds, or choose a new --workdir for the single run"
    )
    assert sorted(tmp_path.rglob("*")) == listing
    with config.unlocked():
        config.seeds = "0,1"
    chain.check_workdir(config, str(tmp_path))  # the experiment itself continues there


def test_a_finished_run_passes_the_workdir_check(smoke_run):
    # Its figures (PNG) lie in DIR/figures/: a run's own folder is no folder of images.
    config, workdir, _ = smoke_run
    assert any(name.endswith(".png") for name in os.listdir(os.path.join(workdir, "figures")))
    chain.check_workdir(config, workdir)


def test_resuming_on_splits_cut_otherwise_is_refused(smoke_run, tmp_path):
    # E.g. a newer version whose splitting code rounds differently, on the same data.
    config, data, splits = _bound_copy(smoke_run, tmp_path)
    first, second = splits.fractions
    swapped = dataclasses.replace(splits, fractions=(second, first))
    with pytest.raises(DataError, match="holds a run on the same data but other splits"):
        chain.bind_workdir(config, str(tmp_path), data, swapped, writer=True)
    masks = tuple(~m for m in splits.label_masks)
    with pytest.raises(DataError, match="other splits"):
        chain.bind_workdir(
            config, str(tmp_path), data, dataclasses.replace(splits, label_masks=masks), True
        )
    assert chain.bind_workdir(config, str(tmp_path), data, splits, writer=True) is None


def test_resuming_on_the_same_examples_with_other_pixels_warns(smoke_run, tmp_path):
    # E.g. a preempted job resumed on another CPU type, whose numpy rounds the synthetic
    # images differently: the same examples and splits, so the run goes on.
    config, original, splits = _bound_copy(smoke_run, tmp_path)
    images = original.images.copy()
    images[0, 0, 0, 0] ^= 1
    warning = chain.bind_workdir(
        config, str(tmp_path), dataclasses.replace(original, images=images), splits, writer=True
    )
    assert warning.startswith("warning: the images decode to other pixels")


def _one_seed_experiment(smoke_run, folder: pathlib.Path):
    """A multi-seed experiment (``seeds = "0"``) in ``folder`` whose seed 0 is the finished
    smoke run, copied, run once by `chain.run_seeds`: it reloads the seed and binds the
    experiment (its config.json and summary). Returns the config and the summary."""
    base, workdir, _ = smoke_run
    shutil.copytree(workdir, folder / "seed_0")
    config = copy.deepcopy(base)
    with config.unlocked():
        config.seeds = "0"
    return config, chain.run_seeds(config, str(folder), Progress(enabled=False))


def test_a_multi_seed_experiment_reloads_its_seeds_and_may_gain_one(smoke_run, tmp_path):
    from weckd_jax import config as config_lib

    config, one = _one_seed_experiment(smoke_run, tmp_path)
    last = smoke_run[2]["links"][-1]["test"]["accuracy"]
    assert one["seeds"] == [0] and one["links"][-1]["test"]["accuracy"]["values"] == [last]
    first_summary = (tmp_path / "summary.json").read_text()

    with config.unlocked():
        config.seeds = "0,1"
    out = io.StringIO()
    two = chain.run_seeds(config, str(tmp_path), Progress(stream=out))
    assert "note: the seeds were [0] and are now [0, 1]: finished seeds are reloaded" in (
        out.getvalue()
    )
    assert out.getvalue().count("finished earlier, results reloaded") == 4  # seed 0 only
    seed_1 = json.loads((tmp_path / "seed_1" / "results.json").read_text())
    assert two["seeds"] == [0, 1] and two["n_seeds"] == 2
    assert two["links"][-1]["test"]["accuracy"]["values"] == [
        last,
        seed_1["links"][-1]["test"]["accuracy"],
    ]
    assert json.loads((tmp_path / "config.json").read_text())["seeds"] == "0,1"
    assert json.loads((tmp_path / "summary.json").read_text())["seeds"] == [0, 1]

    # The seeds given before give their summary back, training nothing.
    with config.unlocked():
        config.seeds = "0"
    out = io.StringIO()
    chain.run_seeds(config, str(tmp_path), Progress(stream=out))
    assert "epoch" not in out.getvalue()
    assert (tmp_path / "summary.json").read_text() == first_summary
    # A single run in the experiment's folder is still refused.
    with config.unlocked():
        config.seeds = ""
    with pytest.raises(config_lib.ConfigError, match="seeds: '0' -> ''"):
        chain.run(config, str(tmp_path), Progress(enabled=False))


def test_a_run_stopped_by_bad_data_leaves_the_workdir_unbound(tmp_path, monkeypatch):
    def bad_data(*args, **kwargs):
        raise DataError("no images")

    monkeypatch.setattr(chain.data_lib, "load", bad_data)
    config = smoke_config()
    for run in (chain.run, chain.run_seeds):
        workdir = tmp_path / run.__name__
        if run is chain.run_seeds:
            with config.unlocked():
                config.seeds = "0,1"
        with pytest.raises(DataError, match="no images"):
            run(config, str(workdir), Progress(enabled=False))
        # No config.json: the corrected command may use the same --workdir.
        assert not glob.glob(str(workdir / "**" / "*.json"), recursive=True)


def test_a_damaged_final_checkpoint_is_named_with_the_fix(smoke_run, tmp_path):
    _, workdir, _ = smoke_run
    shutil.copytree(
        os.path.join(workdir, "checkpoints", "link_1"), tmp_path / "checkpoints" / "link_1"
    )
    shutil.rmtree(tmp_path / "checkpoints" / "link_1" / "final" / "0" / "params")
    with pytest.raises(checkpoints.CheckpointError, match="final checkpoint of link_1") as error:
        chain.restore_finished(str(tmp_path), "link_1", parallel.data_mesh(), (32, 32, 3))
    assert "move that folder" in str(error.value)
    assert os.path.join(str(tmp_path), "jobs", "link_1.json") in str(error.value)


def test_a_damaged_in_training_checkpoint_is_named_with_the_fix_that_resumes(tmp_path):
    config = smoke_config()
    config.train.checkpoint_every = 1
    config.baselines.union_supervised = False
    config.baselines.full_supervised = False
    workdir = str(tmp_path)

    class Stop(Exception):
        pass

    def stop(name, epoch, record):
        raise Stop  # after the first epoch of link 1: its steps 1 and 2 are saved

    with pytest.raises(Stop):
        chain.run(config, workdir, Progress(enabled=False), on_epoch=stop)
    assert checkpoints.TrainCheckpoints(workdir, "link_1").latest_step() == 2
    newest = os.path.join(checkpoints.train_dir(workdir, "link_1"), "2")
    # The iterator state as a run on 2 processes writes it, cut short (e.g. by a full disk).
    own = pathlib.Path(newest, "data_iter", "process_0-of-1.json")
    state = own.read_bytes()
    other = own.with_name("process_0-of-2.json")
    other.write_bytes(state[: len(state) // 2])
    own.unlink()
    with pytest.raises(checkpoints.CheckpointError) as e:
        chain.run(config, workdir, Progress(enabled=False))
    assert str(e.value).startswith(
        f"the in-training checkpoint {newest} of link_1 cannot be read (JSONDecodeError: "
    )
    assert other.read_bytes() == state[: len(state) // 2]
    other.unlink()
    own.write_bytes(state)
    shutil.rmtree(os.path.join(newest, "arrays"))  # e.g. a copy of the workdir that stopped short
    with pytest.raises(checkpoints.CheckpointError) as e:
        chain.run(config, workdir, Progress(enabled=False))
    assert str(e.value).startswith(
        f"the in-training checkpoint {newest} of link_1 cannot be read (KeyError: "
    )
    assert str(e.value).endswith(
        "it was damaged or partly deleted. Fix: delete that folder and rerun the same command, "
        "which resumes link_1 from its checkpoint before (or trains it again from its start when "
        "there is none)."
    )
    shutil.rmtree(newest)  # the fix
    out = io.StringIO()
    results = chain.run(config, workdir, Progress(stream=out))
    assert "link_1: resuming from step 1 of 4" in out.getvalue()
    assert [link["name"] for link in results["links"]] == ["link_1", "link_2"]


def _cut(text: bytes) -> bytes:
    """A file cut short, as by a full disk or an interrupted copy."""
    return text[:100]


_RECORD_FIX = (
    "restore it from a backup, or move it aside and rerun the same command, which evaluates "
    "link_2 again from its final checkpoint and writes the record anew"
)


@pytest.mark.parametrize(
    ("damaged", "content", "problem", "fix"),
    [
        (
            "config.json",
            _cut,
            "cannot be read as JSON",
            "restore it from a backup, or use a new --workdir (the run cannot resume without "
            "it: it records the config and data the run started with)",
        ),
        (
            "data.json",
            lambda _: b"[]",
            "holds a JSON array, not the JSON object weckd_jax wrote: it was edited",
            "restore it from a backup, or use a new --workdir (the run cannot resume without "
            "it: it records the config and data the run started with)",
        ),
        (
            os.path.join("jobs", "link_2.json"),
            _cut,
            "cannot be read as JSON",
            _RECORD_FIX,
        ),
        (
            # Edited, or written by an older version: named, not a KeyError where results read it.
            os.path.join("jobs", "link_2.json"),
            lambda text: json.dumps(
                {k: v for k, v in json.loads(text).items() if k != "val"}
            ).encode(),
            "lacks 'val', which weckd_jax reads from it: it was edited, or written by another "
            "version of weckd_jax",
            _RECORD_FIX,
        ),
    ],
    ids=["config", "data", "record", "record-without-a-key"],
)
def test_a_damaged_file_of_a_run_is_named_with_the_fix_and_kept(
    smoke_run, tmp_path, damaged, content, problem, fix
):
    # A rerun of a finished run whose file was cut short (a full disk, an interrupted copy) or
    # edited. Its JSON files are enough to reach each check: config.json is read before the data
    # is loaded, data.json and the finished links' records after.
    _, workdir, _ = smoke_run
    for name in ("config.json", "data.json"):
        shutil.copy(os.path.join(workdir, name), tmp_path)
    shutil.copytree(os.path.join(workdir, "jobs"), tmp_path / "jobs")
    path = tmp_path / damaged
    path.write_bytes(content(path.read_bytes()))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    smoke = os.path.join(REPO, "configs", "smoke.py")
    out = run_python("-m", "weckd_jax.launch", "--config", smoke, f"--workdir={tmp_path}")
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.startswith(f"error: {path} {problem}"), out.stderr
    assert out.stderr.endswith(f"; {fix}\n") and out.stderr.count("\n") == 1, out.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_baseline_switched_on_in_a_finished_run_trains_alone(
    smoke_run, same_fraction_run, tmp_path
):
    from weckd_jax import config as config_lib

    base, workdir, _ = smoke_run
    _, fresh_dir, fresh = same_fraction_run
    run_dir = tmp_path / "run"
    shutil.copytree(workdir, run_dir)
    finished = glob.glob(str(run_dir / "jobs" / "*.json"))
    finished += glob.glob(str(run_dir / "checkpoints" / "*" / "final" / "**"), recursive=True)
    kept = {p: pathlib.Path(p).read_bytes() for p in finished if os.path.isfile(p)}
    saved = json.loads((run_dir / "config.json").read_text())
    config = copy.deepcopy(base)
    config.baselines.same_fraction = True
    out = io.StringIO()
    results = chain.run(config, str(run_dir), Progress(stream=out))
    assert out.getvalue().count("finished earlier, results reloaded") == 4
    assert "same_fraction " in out.getvalue()  # its epochs: only it trained
    # What a run with the baseline from the start gives, and nothing written before is changed.
    assert _without_timings(results) == _without_timings(json.loads(json.dumps(fresh)))
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    assert {p: pathlib.Path(p).read_bytes() for p in kept} == kept
    assert "same-fraction supervised" in (run_dir / "report.md").read_text()

    def same_fraction_lines(folder):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        return [{**x, "images_per_s": None} for x in lines if x["run"] == "same_fraction"]

    assert same_fraction_lines(run_dir) == same_fraction_lines(fresh_dir)
    # The record of the run now has the baseline on, every other key as it was.
    saved["baselines"]["same_fraction"] = True
    assert json.loads((run_dir / "config.json").read_text()) == saved
    # Switching it off would drop it from the results: refused with the fix.
    config.baselines.same_fraction = False
    with pytest.raises(config_lib.ConfigError, match=r"baselines\.same_fraction: True -> False"):
        chain.run(config, str(run_dir), Progress(enabled=False))
    config.baselines.same_fraction = True
    written = (run_dir / "results.json").read_text()
    out = io.StringIO()
    chain.run(config, str(run_dir), Progress(stream=out))
    assert out.getvalue().count("finished earlier, results reloaded") == 5
    assert (run_dir / "results.json").read_text() == written


def test_a_multi_seed_experiment_may_gain_a_baseline(smoke_run, tmp_path):
    config, _ = _one_seed_experiment(smoke_run, tmp_path)
    config.baselines.same_fraction = True
    summary = chain.run_seeds(config, str(tmp_path), Progress(enabled=False))
    assert list(summary["baselines"]) == ["same_fraction", "union_supervised", "full_supervised"]
    assert "last_minus_same_fraction" in summary["gains"]
    assert "over same-fraction supervised" in (tmp_path / "summary.md").read_text()
    for folder in (tmp_path, tmp_path / "seed_0"):
        assert json.loads((folder / "config.json").read_text())["baselines"]["same_fraction"]


class _Stop(Exception):
    """Stops a run at a chosen point, as a Ctrl-C would."""


def test_a_baseline_stopped_before_it_finished_may_be_switched_off_and_on_again(
    smoke_run, same_fraction_run, tmp_path
):
    from weckd_jax import config as config_lib

    base, workdir, before = smoke_run
    run_dir = tmp_path / "run"
    shutil.copytree(workdir, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    config = copy.deepcopy(base)
    config.baselines.same_fraction = True

    def stop(name, epoch, record):
        if name == "same_fraction":
            raise _Stop  # after its first epoch, which is saved

    with pytest.raises(_Stop):
        chain.run(config, str(run_dir), Progress(enabled=False), on_epoch=stop)
    step = checkpoints.TrainCheckpoints(str(run_dir), "same_fraction").latest_step()
    assert step > 0
    # No results reported it: switched off, the run is the one before, its record too.
    config.baselines.same_fraction = False
    out = io.StringIO()
    results = chain.run(config, str(run_dir), Progress(stream=out))
    assert (
        f"note: baselines.same_fraction is switched off: it never finished in {run_dir}, so no "
        "results lose it; its in-training checkpoints, if any, are kept, and switching it on "
        "again resumes it"
    ) in out.getvalue()
    assert json.loads(json.dumps(results)) == json.loads(json.dumps(before))
    assert json.loads((run_dir / "config.json").read_text()) == config_lib.with_added_keys(saved)
    # Switched on again, it resumes where it stopped: the run with the baseline from the start.
    config.baselines.same_fraction = True
    out = io.StringIO()
    results = chain.run(config, str(run_dir), Progress(stream=out))
    assert f"same_fraction: resuming from step {step} of" in out.getvalue()
    assert _without_timings(results) == _without_timings(
        json.loads(json.dumps(same_fraction_run[2]))
    )


def test_a_baseline_finished_in_any_seed_may_not_be_switched_off(tmp_path):
    from weckd_jax import config as config_lib

    config = smoke_config()
    with config.unlocked():
        config.seeds = "0,1"
    config.baselines.same_fraction = True
    (tmp_path / "config.json").write_text(json.dumps(config_lib.as_json(config)))
    # Seed 1 trained it and stopped before writing its record.
    final = tmp_path / "seed_1" / "checkpoints" / "same_fraction" / "final" / "0"
    final.mkdir(parents=True)
    config.baselines.same_fraction = False
    with pytest.raises(config_lib.ConfigError) as error:
        chain.check_workdir(config, str(tmp_path))
    assert (
        f"baselines.same_fraction: True -> False (finished in {tmp_path / 'seed_1'}: the "
        "results would lose it)\n"
    ) in str(error.value)
    assert str(error.value).endswith("--config.baselines.same_fraction=True")
    final.rmdir()  # only its in-training checkpoints: it may be switched off
    assert chain.check_workdir(config, str(tmp_path)) == [
        f"note: baselines.same_fraction is switched off: it never finished in {tmp_path} or any "
        "of its seeds, so no results lose it; its in-training checkpoints, if any, are kept, and "
        "switching it on again resumes it"
    ]


@pytest.mark.parametrize("stop_in", ["data", "baseline"])
def test_a_multi_seed_experiment_records_a_gained_baseline_wherever_the_run_stops(
    stop_in, smoke_run, tmp_path, monkeypatch
):
    # A baseline switched on, the run stopped as seed 0 loads its data (before seed 0 records
    # anything) or as seed 0 trains the baseline: the experiment's record already has it, and
    # from_run.py:DIR continues the run as it was started. Switched off again, every record is
    # the one before.
    from weckd_jax import config as config_lib

    config, _ = _one_seed_experiment(smoke_run, tmp_path)
    folders = (tmp_path, tmp_path / "seed_0")
    before = [json.loads((folder / "config.json").read_text()) for folder in folders]

    def stopping(name, function):
        def stopped(*args, **kwargs):
            if name is None or args[0].name == name:
                raise _Stop
            return function(*args, **kwargs)

        return stopped

    with monkeypatch.context() as patch:
        if stop_in == "data":
            patch.setattr(chain, "load_checked", stopping(None, chain.load_checked))
        else:
            patch.setattr(chain, "train_job", stopping("same_fraction", chain.train_job))
        config.baselines.same_fraction = True
        with pytest.raises(_Stop):
            chain.run_seeds(config, str(tmp_path), Progress(enabled=False))
    recorded = [
        json.loads((folder / "config.json").read_text())["baselines"]["same_fraction"]
        for folder in folders
    ]
    assert recorded == [True, stop_in == "baseline"]
    assert config_lib.from_run(str(tmp_path)).baselines.same_fraction is True

    config.baselines.same_fraction = False
    out = io.StringIO()
    chain.run_seeds(config, str(tmp_path), Progress(stream=out))
    assert out.getvalue().count("note: baselines.same_fraction is switched off") == sum(recorded)
    assert [json.loads((folder / "config.json").read_text()) for folder in folders] == before


def test_a_batch_larger_than_the_link_data_is_warned_about(tmp_path):
    config = smoke_config()
    with config.unlocked():
        config.chain.length, config.train.epochs, config.train.batch_size = 1, 1, 64
        config.baselines.union_supervised = config.baselines.full_supervised = False
        config.baselines.one_step_kd = True  # asked for, but a chain of 1 has none
        config.baselines.same_fraction = True  # the same: link 1 is that model
    stream = io.StringIO()
    results = chain.run(config, str(tmp_path), Progress(stream=stream))
    n_train = results["links"][0]["n_train"]
    assert n_train < 64
    assert chain.small_link_warning("link_1", n_train, 64, 1) in stream.getvalue()
    assert "note: no one-step KD baseline with chain.length < 3" in stream.getvalue()
    assert "note: no same-fraction baseline with chain.length 1" in stream.getvalue()
    assert results["baselines"] == {}
    # Following the notes' advice in the run's folder: nothing trains either way, so no config
    # change is refused (a baseline the chain trains cannot be switched off, see above).
    config.baselines.one_step_kd = config.baselines.same_fraction = False
    stream = io.StringIO()
    again = chain.run(config, str(tmp_path), Progress(stream=stream))
    assert "note:" not in stream.getvalue() and "finished earlier" in stream.getvalue()
    assert again["links"] == json.loads(json.dumps(results["links"]))


@pytest.mark.parametrize(
    "images, batch_size, devices, advice",
    [
        (13, 64, 1, "Set train.batch_size to at most 13, or give the link more data."),
        (13, 64, 8, "Set train.batch_size to at most 8, or give the link more data."),
        (5, 64, 8, "Give the link more data."),
        (64, 64, 8, None),
    ],
)
def test_the_small_link_warning_suggests_a_batch_size_that_divides_over_the_devices(
    images, batch_size, devices, advice
):
    warning = chain.small_link_warning("link_2", images, batch_size, devices)
    if advice is None:
        assert warning is None
    else:
        assert warning.startswith(f"warning: link_2 trains on {images} images, fewer than ")
        assert warning.endswith(advice)


def test_epoch_accuracy_counts_labelled_examples_not_steps():
    # With chain.label_ratio < 1 batches hold different numbers of labels, some none at all.
    job = chain.Job("link_2", 2, None, np.arange(8), np.ones(8, bool), teachers=("link_1",))
    steps = [
        {"loss": 1.0, "accuracy": 0.0, "labelled": 0.0, "temperature": 3.0},
        {"loss": 2.0, "accuracy": 0.5, "labelled": 4.0, "temperature": 2.5},
        {"loss": 3.0, "accuracy": 1.0, "labelled": 1.0, "temperature": 2.0},
    ]
    record = chain._epoch_record(job, 1, 3, steps, throughput=10.0)
    assert record["accuracy"] == pytest.approx(3 / 5)  # 2 + 1 correct of 5 labelled
    assert record["loss"] == pytest.approx(2.0) and record["temperature"] == 2.0
    assert "labelled" not in record
