"""The hyper-parameter search: resumable, scored on validation only (the test split is never
evaluated during it), pruned by MedianPruner, and its best config reproduces its best trial."""

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from optuna.trial import TrialState

from tests.conftest import REPO, run_python, signal_when, smoke_config
from weckd_jax import chain, tune
from weckd_jax import config as config_lib
from weckd_jax import data as data_lib
from weckd_jax import seeds as seeds_lib
from weckd_jax.progress import Progress

SMOKE = os.path.join(REPO, "configs", "smoke.py")
SPACE = "train.learning_rate:1e-3:1e-2:log,distill.alpha:0.2:0.8"


def search_config(space=SPACE):
    c = smoke_config()
    c.tune.space = space
    return c


def _tune_args(workdir, *extra, space=SPACE):
    """The arguments of ``python`` that run the tune command line on the smoke search."""
    return [
        "-m",
        "weckd_jax.tune",
        "--config",
        SMOKE,
        f"--config.tune.space={space}",
        f"--workdir={workdir}",
        *extra,
    ]


def _bind(config, workdir):
    """Binds ``workdir`` to ``config`` and its data as `tune.run` binds a new study, so that
    trials can be queued in the study before it runs."""
    chain.bind_workdir(config, str(workdir), *chain.load_checked(config), writer=True)


def _trials(workdir, config):
    study = tune.open_study(config, str(workdir))
    return {t.number: t for t in study.get_trials()}


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """A search run in four goes: 2 trials, continued to 3 (both in this process, with every
    evaluation recorded), to 4 by the CLI killed inside trial 3, and rerun by the CLI to 4."""
    workdir = tmp_path_factory.mktemp("search")
    config = search_config()
    evaluated, lines = [], []
    real_probabilities = chain.probabilities  # every evaluation, validation or test, calls it

    def recording_probabilities(spec, variables, images, index, **kw):
        evaluated.append(np.asarray(index).copy())
        return real_probabilities(spec, variables, images, index, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chain, "probabilities", recording_probabilities)
        first = tune.run(config, str(workdir), 2, evaluate_best=False, say=lines.append)
        after_two = _trials(workdir, config)
        second = tune.run(config, str(workdir), 3, evaluate_best=False, say=lines.append)
    after_three = _trials(workdir, config)

    # The CLI continues the study to 4 trials; it is killed as soon as trial 3 has started.
    args = _tune_args(workdir, "--trials=4", "--evaluate_best=false")
    ready = (workdir / "trials" / "3" / "config.json").exists
    signal_when(args, ready, signal.SIGKILL, "trial 3 started")
    killed = _trials(workdir, config)
    # ... and evaluates the best config on test, once
    rerun = run_python(*_tune_args(workdir, "--trials=4"), timeout=600)
    return {
        "config": config,
        "workdir": workdir,
        "evaluated": evaluated,
        "first": first,
        "second": second,
        "after_two": after_two,
        "after_three": after_three,
        "killed": killed,
        "rerun": rerun,
        "final": _trials(workdir, config),
    }


def test_rerun_continues_the_study(search):
    two, three = search["after_two"], search["after_three"]
    assert sorted(two) == [0, 1]
    assert sorted(three) == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in three.values())
    for n in (0, 1):  # the first trials are kept as they were, not re-run
        assert three[n].params == two[n].params
        assert three[n].value == two[n].value
        assert three[n].datetime_start == two[n].datetime_start
    # Trial 2 is a new draw, not trial 0's draw again (the sampler is seeded per trial number).
    assert three[2].params != three[0].params
    assert search["second"]["counts"]["complete"] == 3
    # Every value lies in its declared range.
    for t in three.values():
        assert 1e-3 <= t.params["train.learning_rate"] <= 1e-2
        assert 0.2 <= t.params["distill.alpha"] <= 0.8
        with open(os.path.join(t.user_attrs["workdir"], "config.json")) as f:
            used = json.load(f)
        assert used["train"]["learning_rate"] == t.params["train.learning_rate"]
        assert set(used["baselines"]) == {
            "same_fraction",
            "union_supervised",
            "full_supervised",
            "one_step_kd",
        }
        assert not any(used["baselines"].values())  # every baseline off


def test_killed_trial_is_failed_and_not_counted(search):
    killed, final, rerun = search["killed"], search["final"], search["rerun"]
    assert killed[3].state == TrialState.RUNNING  # what a SIGKILL leaves in the database
    assert killed[3].user_attrs["host"] == socket.gethostname()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "trial 3: left RUNNING by process" in rerun.stdout
    assert "1 trial(s) run now" in rerun.stdout
    assert sorted(final) == [0, 1, 2, 3, 4]
    assert final[3].state == TrialState.FAIL
    assert [final[n].state for n in (0, 1, 2, 4)] == [TrialState.COMPLETE] * 4
    # Rerunning with the same total runs nothing.
    config = search["config"]
    again = tune.run(config, str(search["workdir"]), 4, evaluate_best=False, say=lambda _: None)
    assert again["counts"] == {"complete": 4, "pruned": 0, "running": 0, "fail": 1, "waiting": 0}


def test_test_split_is_never_evaluated_during_the_search(search):
    config = search["config"]
    data = data_lib.load(config.data, seed=config.seed)
    splits = chain.make_run_splits(config, data)
    evaluated = search["evaluated"]
    assert len(evaluated) == 3 * 2  # 3 trials x 2 links x 1 validation epoch (epochs=2)
    for index in evaluated:
        assert np.array_equal(index, splits.val)
        assert not np.isin(index, splits.test).any()
    for trial in search["final"].values():  # the CLI's trials too
        path = os.path.join(trial.user_attrs["workdir"], "results.json")
        if trial.state != TrialState.COMPLETE:
            continue
        with open(path) as f:
            results = json.load(f)
        assert results["test_evaluated"] is False
        assert results["baselines"] == {}
        assert all("test" not in link for link in results["links"])


def test_best_config_reproduces_the_best_trial(search, tmp_path):
    config, workdir = search["config"], search["workdir"]
    study = tune.open_study(config, str(workdir))
    best = study.best_trial
    assert best.value == max(t.value for t in study.get_trials(states=(TrialState.COMPLETE,)))
    best_config = config_lib.load_file(str(workdir / "best_config.py"))
    assert best_config.train.learning_rate == best.params["train.learning_rate"]
    assert best_config.distill.alpha == best.params["distill.alpha"]
    assert best_config.baselines.union_supervised is True  # as the search's config says
    best_config.baselines.union_supervised = False  # not needed to compare the links
    best_config.baselines.full_supervised = False
    rerun = chain.run(best_config, str(tmp_path / "run"), Progress(enabled=False), use_test=False)
    with open(os.path.join(best.user_attrs["workdir"], "results.json")) as f:
        trial = json.load(f)
    assert rerun["links"][-1]["val"]["accuracy"] == best.value  # exactly
    assert rerun["links"][-1]["val"] == trial["links"][-1]["val"]
    assert [x["fingerprint"] for x in rerun["links"]] == [x["fingerprint"] for x in trial["links"]]


def test_a_best_config_lacking_a_key_added_since_is_read_or_named_with_its_fix(
    tmp_path, monkeypatch
):
    import types

    config = search_config()
    trial = types.SimpleNamespace(number=3, value=0.5, params={"distill.alpha": 0.25})
    study = types.SimpleNamespace(study_name="weckd-last_link-0", best_trial=trial)

    as_json = config_lib.as_json

    def before_the_key(c):  # the record of a version without baselines.same_fraction
        recorded = as_json(c)
        del recorded["baselines"]["same_fraction"]
        return recorded

    with monkeypatch.context() as m:
        m.setattr(tune.config_lib, "as_json", before_the_key)
        path, _ = tune.write_best_config(config, study, str(tmp_path))
    with open(path) as f:
        assert "same_fraction" not in f.read()
    # Read as the search that wrote it ran: without the baseline.
    loaded = config_lib.load_file(path)
    assert loaded.baselines.same_fraction is False and loaded.distill.alpha == 0.25
    config_lib.validate(loaded)
    # A file written before best_config.py filled them in: refused with the fix.
    with open(path) as f:
        text = f.read()
    text = text.replace("config_lib.with_added_keys(CONFIG)", "copy.deepcopy(CONFIG)")
    old = tmp_path / "old_best_config.py"
    old.write_text("import copy\n" + text)
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.load_file(str(old))
    assert str(error.value) == (
        f"config file {old} lacks baselines.same_fraction, added to weckd_jax since it was "
        "written (e.g. a search's best_config.py): rerun that search's command, which writes "
        "its best_config.py anew, or set baselines.same_fraction = False in it (what its "
        "version did)"
    )


def test_final_evaluation_on_test_once(search):
    config, workdir = search["config"], search["workdir"]
    assert "test accuracy of link 2: " in search["rerun"].stdout
    with open(workdir / "best_results.json") as f:
        summary = json.load(f)
    study = tune.open_study(config, str(workdir))
    best = study.best_trial
    assert summary["trial"] == best.number
    assert summary["params"] == best.params
    assert summary["val_accuracy"] == best.value
    assert summary["val_accuracy_final_run"] == best.value  # the final run reproduces the trial
    assert summary["workdir"] == str(workdir / "best" / f"trial_{best.number}")
    with open(summary["results"]) as f:
        results = json.load(f)
    assert results["test_evaluated"] is True
    assert summary["test_accuracy"] == results["links"][-1]["test"]["accuracy"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert set(results["baselines"]) == {"union_supervised", "full_supervised"}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_running_trial_of_a_live_process_is_left_alone_and_counted(search):
    config, workdir = search["config"], search["workdir"]
    study = tune.open_study(config, str(workdir))
    live = study.ask()  # as another process's trial in progress: its process is alive
    live.set_user_attr("host", socket.gethostname())
    live.set_user_attr("pid", os.getppid())
    lines = []
    out = tune.run(config, str(workdir), 5, evaluate_best=False, say=lines.append)
    assert any("still running in other processes" in line for line in lines), lines
    assert out["counts"]["running"] == 1 and out["counts"]["complete"] == 4
    assert _trials(workdir, config)[live.number].state == TrialState.RUNNING
    study.tell(live.number, state=TrialState.FAIL)


def test_link_objective_stops_after_the_link_and_matches_the_full_chain(search, tmp_path):
    """Per-link tuning trains the chain's full config up to link k: link 1 of a link-1 trial is
    link 1 of the full chain with the same values, to the last bit."""
    reference = search["final"][0]
    config = search_config()
    config.tune.objective = "link"
    config.tune.link = 1
    _bind(config, tmp_path)
    tune.open_study(config, str(tmp_path)).enqueue_trial(reference.params)
    out = tune.run(config, str(tmp_path), 1, evaluate_best=False, say=lambda _: None)
    assert out["best_value"] == reference.user_attrs["val_accuracy_per_link"]["1"]
    trial_dir = tmp_path / "trials" / "0"
    with open(trial_dir / "metrics.jsonl") as f:
        runs = {json.loads(line)["run"] for line in f}
    assert runs == {"link_1"}  # link 2 was never trained
    trial = _trials(tmp_path, config)[0]
    assert sorted(trial.intermediate_values) == [2]  # eval_every=2, epochs=2: one report


def _fake_chain_run(calls):
    """A stand-in for `chain.run`: validation accuracy 0.5 + 40 lr (lr >= 5e-3) or 0.2, rising by
    0.01 per epoch; lr >= 9e-3 diverges in link 2."""

    def run(config, workdir, progress, *, use_test=True, on_epoch=None):
        assert use_test is False
        lr = config.train.learning_rate
        calls.append(lr)
        links = []
        for link in range(1, config.chain.length + 1):
            best = 0.0
            for epoch in range(1, config.train.epochs + 1):
                if lr >= 9e-3 and link == 2:
                    raise chain.DivergenceError("link_2: the loss became NaN/Inf. Lower it.")
                accuracy = (0.5 + 40 * lr if lr >= 5e-3 else 0.2) + 0.01 * epoch
                best = max(best, accuracy)
                on_epoch(f"link_{link}", epoch, {"val_accuracy": accuracy})
            links.append({"val": {"accuracy": best}})
        return {"links": links}

    return run


def test_median_pruner_steps_across_links(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(chain, "run", _fake_chain_run(calls))
    config = search_config("train.learning_rate:1e-3:1e-2:log")
    config.train.epochs = 3
    config.train.eval_every = 1
    config.tune.prune_after_trials = 1
    _bind(config, tmp_path)
    study = tune.open_study(config, str(tmp_path))
    for lr in (6e-3, 2e-3, 9.5e-3, 7e-3):
        study.enqueue_trial({"train.learning_rate": lr})
    out = tune.run(config, str(tmp_path), 4, evaluate_best=False, say=lambda _: None)
    trials = _trials(tmp_path, config)
    # Trial 0 completes and reports at (link - 1) * epochs + epoch: steps 1..6.
    assert trials[0].state == TrialState.COMPLETE
    assert trials[0].intermediate_values == pytest.approx(
        {1: 0.75, 2: 0.76, 3: 0.77, 4: 0.75, 5: 0.76, 6: 0.77}
    )
    # Trial 1 is clearly worse: pruned at its first report, link 1 epoch 1.
    assert trials[1].state == TrialState.PRUNED
    assert trials[1].intermediate_values == pytest.approx({1: 0.21})
    # Trial 2 diverges in link 2: recorded as pruned, with the reason.
    assert trials[2].state == TrialState.PRUNED
    assert "NaN/Inf" in trials[2].user_attrs["diverged"]
    assert trials[3].state == TrialState.COMPLETE
    assert out["counts"]["complete"] == 2 and out["counts"]["pruned"] == 2
    assert out["best_trial"] == 3 and out["best_value"] == pytest.approx(0.78 + 0.03)
    assert calls == [6e-3, 2e-3, 9.5e-3, 7e-3]


def test_space_syntax_and_checks():
    c = search_config("train.learning_rate:1e-4:1e-2:log, model.width:4:16 ,distill.alpha:0:1")
    dims = tune.parse_space(c.tune.space, c)
    assert dims == (
        tune.Dimension("train.learning_rate", 1e-4, 1e-2, log=True),
        tune.Dimension("model.width", 4.0, 16.0, integer=True),
        tune.Dimension("distill.alpha", 0.0, 1.0),
    )
    config_lib.validate(c)
    bad = {
        "train.nosuch:1:2": "not a config key",
        "train:1:2": "a config section",
        "model.backbone:1:2": "only numeric keys",
        "distill.alpha:0.5:0.5": "low=0.5 must be < high=0.5",
        "train.learning_rate:0:1e-2:log": "a log range needs low > 0",
        "distill.alpha:0.1:0.9:lin": "is not key:low:high",
        "distill.alpha:0.1": "is not key:low:high",
        "distill.alpha:a:b": "must be numbers",
        "distill.alpha:0.1:0.2,distill.alpha:0.3:0.4": "names 'distill.alpha' twice",
        "model.width:4:16.5": "must be integers",
        "data.num_images:10:100": "may not tune 'data.num_images'",
        "seed:0:4": "may not tune 'seed'",
        "": "tune.space is empty",
    }
    for space, message in bad.items():
        with pytest.raises(config_lib.ConfigError) as e:
            config_lib.validate(search_config(space))
        assert message in str(e.value), (space, str(e.value))
    c = search_config()
    c.tune.objective = "link"
    with pytest.raises(config_lib.ConfigError, match=r"tune.link=0 must be a link"):
        config_lib.validate(c)
    # An end of a range that makes an invalid run is refused before any trial.
    with pytest.raises(config_lib.ConfigError, match=r"distill.alpha=1.5 \(the high end"):
        tune.check_search(search_config("distill.alpha:0.5:1.5"), 3)
    with pytest.raises(config_lib.ConfigError, match=r"eval_batch_size=0 \(the low end"):
        tune.check_search(search_config("train.eval_batch_size:0:8"), 3)
    for space, value in (("train.intensity:0:1.5", "1.5"), ("train.momentum:-0.5:0.9", "-0.5")):
        with pytest.raises(config_lib.ConfigError, match=rf"train\.\w+={value} \(the"):
            tune.check_search(search_config(space), 3)
    # t_min is capped at the trial's t_max, so every trial anneals downwards.
    with_same_fraction = search_config()
    with_same_fraction.baselines.same_fraction = True
    capped = tune.apply_params(
        with_same_fraction, {"distill.t_max": 3.0, "distill.t_min": 4.5}, baselines=False
    )
    assert (capped.distill.t_max, capped.distill.t_min) == (3.0, 3.0)
    assert capped.baselines.union_supervised is False
    assert capped.baselines.same_fraction is False  # trials train the links only
    kept = tune.apply_params(with_same_fraction, {"distill.t_min": 1.5}, baselines=True)
    assert (kept.distill.t_max, kept.distill.t_min) == (6.0, 1.5)
    assert kept.baselines.full_supervised is True
    assert kept.baselines.same_fraction is True  # the best config's run trains it


def test_every_batch_size_of_a_range_must_divide_over_the_devices(monkeypatch):
    # On 4 devices, 8 and 12 divide but 9 does not: checking the ends alone would let TPE sample
    # a batch size that stops its trial.
    with monkeypatch.context() as m:
        m.setattr(jax, "device_count", lambda: 1)
        tune.check_search(search_config("train.batch_size:8:12"), 3)  # every value divides
    monkeypatch.setattr(jax, "device_count", lambda: 4)
    with pytest.raises(config_lib.ConfigError) as e:
        tune.check_search(search_config("train.batch_size:8:12"), 3)
    assert str(e.value).startswith(
        "tune.space: train.batch_size=9, inside its range, gives an invalid config "
        "(train.batch_size=9 does not divide over 4 devices"
    )


def test_a_search_inside_the_data_folder_is_refused(tmp_path):
    config = search_config()
    config.data.source = "folder"
    config.data.root = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match="is inside data.root="):
        tune.run(config, str(tmp_path / "search"), 1, evaluate_best=False, say=print)
    assert os.listdir(tmp_path) == []


def test_a_search_in_a_run_folder_is_refused(smoke_run):
    _, workdir, _ = smoke_run
    listing = sorted(os.listdir(workdir))
    with pytest.raises(config_lib.ConfigError, match=r"holds a run of launch \(its jobs/ folder\)"):
        tune.run(search_config(), workdir, 1, evaluate_best=False, say=print)
    assert sorted(os.listdir(workdir)) == listing


def test_a_search_in_a_run_stopped_in_its_first_link_is_refused(tmp_path):
    (tmp_path / "checkpoints" / "link_1" / "train").mkdir(parents=True)  # no jobs/ yet
    with pytest.raises(config_lib.ConfigError, match=r"holds a run of launch \(its checkpoints/"):
        tune.run(search_config(), str(tmp_path), 1, evaluate_best=False, say=print)
    assert os.listdir(tmp_path) == ["checkpoints"]


def _multi_seed_experiment(smoke_run, workdir, stage):
    """Fills ``workdir`` as launch with ``seeds="0,1"`` leaves it at ``stage``, seed 0 being the
    smoke run: ``"seed_0 running"`` (in its first link, nothing of the experiment's own yet),
    ``"seed_0 finished"`` (the experiment's config.json written, seed_1 begun) or ``"summary
    written"`` (both seeds finished)."""
    config, run, results = smoke_run
    seed_0 = workdir / "seed_0"
    if stage == "seed_0 running":
        (seed_0 / "checkpoints" / "link_1" / "train").mkdir(parents=True)
        for name in ("config.json", "data.json"):
            shutil.copy(os.path.join(run, name), seed_0)
        return
    shutil.copytree(run, seed_0)
    experiment = copy.deepcopy(config)
    with experiment.unlocked():
        experiment.seeds = "0,1"
    (workdir / "config.json").write_text(json.dumps(config_lib.as_json(experiment)))
    if stage == "seed_0 finished":
        (workdir / "seed_1").mkdir()  # its lock taken, nothing written yet
        return
    shutil.copytree(run, workdir / "seed_1")
    summary = seeds_lib.summarize({0: results, 1: results})
    (workdir / "summary.json").write_text(json.dumps(summary))
    (workdir / "summary.md").write_text("")
    (workdir / "figures").mkdir()
    (workdir / "figures" / "chain_accuracy.png").write_bytes(b"")


@pytest.mark.parametrize("stage", ["seed_0 running", "seed_0 finished", "summary written"])
def test_a_search_in_a_multi_seed_run_folder_is_refused(smoke_run, tmp_path, stage):
    _multi_seed_experiment(smoke_run, tmp_path, stage)
    listing = sorted(tmp_path.rglob("*"))
    with pytest.raises(config_lib.ConfigError) as e:
        tune.run(search_config(), str(tmp_path), 1, evaluate_best=False, say=print)
    assert str(e.value) == (
        f"{tmp_path} holds a multi-seed run of launch (its seed_0/ folder, one run per seed), not "
        "a search: a search there would mix its files with the run's. Use a new --workdir for "
        "the search."
    )
    assert sorted(tmp_path.rglob("*")) == listing


def test_a_forced_teacher_cache_over_its_limit_is_refused_before_the_study_is_bound(tmp_path):
    config = search_config()
    config.train.augment = False
    config.distill.teacher_cache = "on"
    config.distill.teacher_cache_max_gb = 1e-6  # 1 KB: below link 2's cache
    workdir = tmp_path / "search"
    with pytest.raises(config_lib.ConfigError, match="^link_2's teacher cache would take "):
        tune.run(config, str(workdir), 1, evaluate_best=False, say=print)
    # Nothing bound: the config can be corrected (e.g. to teacher_cache=auto) in this folder.
    assert not workdir.exists() or os.listdir(workdir) == []


def test_a_search_in_the_folder_of_a_run_stopped_before_its_first_checkpoint_is_refused(
    tmp_path, monkeypatch
):
    # The run bound the folder (config.json, data.json), then stopped before any checkpoint.
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chain, "train_job", stop)
    with pytest.raises(KeyboardInterrupt):
        chain.run(search_config(), str(tmp_path), Progress(enabled=False))
    assert {"config.json", "data.json"} <= set(os.listdir(tmp_path))
    with pytest.raises(config_lib.ConfigError, match=r"holds a run of launch \(its jobs/ folder"):
        tune.check_study_dir(search_config(), str(tmp_path))


def test_a_search_in_a_folder_of_images_is_refused(tmp_path):
    images = tmp_path / "images"
    (images / "normal").mkdir(parents=True)
    (images / "normal" / "ear_01.png").write_bytes(b"")
    with pytest.raises(
        config_lib.ConfigError, match=r"holds images \(.*ear_01.png\), not a search"
    ):
        tune.run(search_config(), str(images), 1, evaluate_best=False, say=print)
    assert sorted(os.listdir(images)) == ["normal"]


def test_a_damaged_search_config_is_named_with_the_fix_and_kept(tmp_path):
    text = json.dumps(config_lib.as_json(search_config()))[:100]  # cut short, e.g. a full disk
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(config_lib.ConfigError) as error:
        tune.check_study_dir(search_config(), str(tmp_path))
    assert str(error.value).startswith(f"{tmp_path / 'config.json'} cannot be read as JSON (")
    assert str(error.value).endswith(
        "; restore it from a backup, or use a new --workdir for the search"
    )
    assert (tmp_path / "config.json").read_text() == text


def test_a_changed_search_config_is_refused_with_the_overrides_that_restore_it(tmp_path):
    config = search_config()
    saved = config_lib.as_json(config)
    saved["tune"]["space"] = "distill.alpha:0.2:0.8"
    saved["distill"]["t_max"] = 4.0
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(config_lib.ConfigError) as error:
        tune.check_study_dir(config, str(tmp_path))
    assert str(error.value).endswith(
        f"continue this one with its saved values (in {tmp_path / 'config.json'}) by adding: "
        "--config.distill.t_max=4.0 --config.tune.space=distill.alpha:0.2:0.8"
    )
    config.distill.t_max, config.tune.space = 4.0, "distill.alpha:0.2:0.8"
    tune.check_study_dir(config, str(tmp_path))


def test_ctrl_c_stops_a_search_in_one_line_and_fails_the_running_trial(tmp_path):
    args = _tune_args(tmp_path, "--trials=1", "--evaluate_best=false")
    ready = (tmp_path / "trials" / "0" / "config.json").exists  # trial 0 is running
    returncode, stderr = signal_when(args, ready, signal.SIGINT, "trial 0 started")
    assert returncode == 130, stderr[-3000:]
    assert stderr.startswith(
        f"interrupted: the finished trials are kept in {tmp_path / 'study.db'} (the interrupted "
        "one is not counted)"
    )
    assert stderr.endswith("rerun the same command to resume\n") and stderr.count("\n") == 1
    trials = _trials(tmp_path, search_config())
    assert [t.state for t in trials.values()] == [TrialState.FAIL]


def test_cli_user_errors_exit_2_without_traceback(search, tmp_path):
    before = len(_trials(search["workdir"], search["config"]))
    cases = [  # (space, flags, message)
        (SPACE, ["--trials=0"], "--trials=0 must be >= 1"),
        ("train.nosuch:1:2", ["--trials=2"], "'train.nosuch', which is not a config key"),
        ("distill.alpha:0.9:0.1", ["--trials=2"], "low=0.9 must be < high=0.1"),
        ("train.learning_rate:0:1:log", ["--trials=2"], "a log range needs low > 0"),
    ]
    procs = []
    for i, (space, extra, message) in enumerate(cases):
        cmd = [sys.executable, *_tune_args(tmp_path / f"w{i}", *extra, space=space)]
        procs.append((cmd, message, tmp_path / f"w{i}"))
    # The study of `search` with another space: refused, naming the difference.
    other_space = "distill.alpha:0.2:0.8"
    procs.append(
        (
            [sys.executable, *_tune_args(search["workdir"], "--trials=9", space=other_space)],
            f"tune.space: {SPACE!r} -> 'distill.alpha:0.2:0.8'",
            None,
        )
    )
    # launch accepts DIR/best_config.py: it loads it, applies the override and validates it.
    procs.append(
        (
            [
                *(sys.executable, "-m", "weckd_jax.launch"),
                *("--config", str(search["workdir"] / "best_config.py")),
                *("--config.chain.length=0", f"--workdir={tmp_path / 'launch'}"),
            ],
            "error: chain.length=0 must be >= 1",
            tmp_path / "launch",
        )
    )
    running = [
        (
            subprocess.Popen(
                cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
            message,
            workdir,
        )
        for cmd, message, workdir in procs
    ]
    for proc, message, workdir in running:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr
        assert stderr.startswith("error: ") and message in stderr, stderr
        assert "Traceback" not in stderr
        if workdir is not None:
            assert not workdir.exists()  # nothing was written
    assert len(_trials(search["workdir"], search["config"])) == before  # the study is untouched


def test_a_search_is_bound_to_its_data(search, monkeypatch):
    import dataclasses

    config, workdir = search["config"], search["workdir"]
    assert (workdir / "data.json").is_file()
    original = data_lib.load(config.data, seed=config.seed)
    labels = original.labels.copy()
    labels[0] = (labels[0] + 1) % original.num_classes  # one image relabelled since
    monkeypatch.setattr(
        chain.data_lib, "load", lambda *a, **k: dataclasses.replace(original, labels=labels)
    )
    before = _trials(workdir, config)
    with pytest.raises(data_lib.DataError, match="holds a run on other data"):
        tune.run(config, str(workdir), len(before) + 1, evaluate_best=False, say=lambda _: None)
    assert sorted(_trials(workdir, config)) == sorted(before)  # no trial on the new data


def test_a_search_stopped_by_bad_data_leaves_its_folder_unbound(tmp_path, monkeypatch):
    def bad_data(*args, **kwargs):
        raise data_lib.DataError("no images")

    monkeypatch.setattr(chain.data_lib, "load", bad_data)
    with pytest.raises(data_lib.DataError, match="no images"):
        tune.run(search_config(), str(tmp_path / "s"), 1, evaluate_best=False, say=print)
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("study.db"))
