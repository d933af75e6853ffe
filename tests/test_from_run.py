"""``--config configs/from_run.py:DIR``: the config a run or search recorded in ``DIR/config.json``,
given back as a config file's, for resuming, rerunning and evaluating without retyping it."""

import json
import os
import re
import shutil

import pytest
from absl import flags
from ml_collections import config_flags

from tests.conftest import REPO, run_python, smoke_config
from weckd_jax import chain, cli, evaluate, tune
from weckd_jax.config import ConfigError, as_json, base_config, from_run, seed_list

FROM_RUN = os.path.join(REPO, "configs", "from_run.py")


def _record(folder, config) -> dict:
    """Writes ``config`` as ``folder/config.json`` (what a run records); returns the JSON."""
    os.makedirs(folder, exist_ok=True)
    record = as_json(config)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(record, f)
    return record


def _flag_config(argv: list[str]):
    """The config the tools' ``--config`` flag gives for ``argv`` (overrides applied)."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    return values["config"].value


def test_the_recorded_config_round_trips_and_takes_overrides(smoke_run):
    config, workdir, _ = smoke_run
    with open(os.path.join(workdir, "config.json")) as f:
        record = json.load(f)
    loaded = cli.load_config_arg(["prog", "--config", f"{FROM_RUN}:{workdir}"])
    assert as_json(loaded) == record == as_json(config)
    assert loaded.chain.length == 2 and loaded.model.backbone == "resnet10"  # not the defaults

    argv = ["prog", f"--config={FROM_RUN}:{workdir}/", "--config.data.difficulty=0.5"]
    argv += ["--config.distill.t_max=5", "--config.train.epochs=3"]
    overridden = _flag_config(argv)
    assert overridden.data.difficulty == 0.5 and overridden.train.epochs == 3
    assert overridden.distill.t_max == 5.0 and isinstance(overridden.distill.t_max, float)
    changed = {"data": {"difficulty": 0.5}, "distill": {"t_max": 5.0}, "train": {"epochs": 3}}
    expected = {
        k: {**v, **changed.get(k, {})} if isinstance(v, dict) else v for k, v in record.items()
    }
    assert as_json(overridden) == expected


def test_an_experiment_and_a_search_give_their_configs_back(tmp_path):
    experiment = smoke_config()
    experiment.seeds = "0,1,2"
    _record(tmp_path / "experiment", experiment)
    assert seed_list(from_run(str(tmp_path / "experiment"))) == [0, 1, 2]

    # A search continued with its recorded config is the same study (same config, same name).
    search = smoke_config()
    search.tune.space = "train.learning_rate:1e-4:1e-2:log,distill.alpha:0.1:0.9"
    search.tune.prune = False
    folder = str(tmp_path / "search")
    _record(folder, search)
    again = from_run(folder)
    tune.check_study_dir(again, folder)
    assert tune.study_name(again) == tune.study_name(search)
    assert again.tune.space == search.tune.space and again.tune.prune is False


def test_keys_that_change_nothing_computed_get_their_defaults(tmp_path):
    # An older version recorded neither: a run started then resumes with them (check_workdir).
    record = _record(tmp_path, smoke_config())
    del record["distill"]["teacher_cache_max_gb"], record["tune"]
    (tmp_path / "config.json").write_text(json.dumps(record))
    config = from_run(str(tmp_path))
    assert config.distill.teacher_cache_max_gb == base_config().distill.teacher_cache_max_gb
    assert config.tune.to_dict() == base_config().tune.to_dict()
    assert config.chain.length == 2
    chain.check_workdir(config, str(tmp_path))


def test_records_from_before_an_added_key_read_it_as_the_behaviour_they_had(tmp_path, monkeypatch):
    # Written before baselines.same_fraction existed: the baseline did not run.
    config = smoke_config()
    record = _record(tmp_path, config)
    del record["baselines"]["same_fraction"]
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert from_run(str(tmp_path)).baselines.same_fraction is False
    chain.check_workdir(config, str(tmp_path))  # resumed, not refused for a key it lacks
    config.tune.space = "distill.alpha:0.1:0.9"
    search = tmp_path / "search"
    search.mkdir()
    searched = as_json(config)
    del searched["baselines"]["same_fraction"]
    (search / "config.json").write_text(json.dumps(searched))
    tune.check_study_dir(config, str(search))
    # ... and the search keeps its study's name, which the older version derived without it.
    name = tune.study_name(config)

    def older_as_json(c):
        recorded = as_json(c)
        del recorded["baselines"]["same_fraction"]
        return recorded

    monkeypatch.setattr(tune.config_lib, "as_json", older_as_json)
    assert tune.study_name(config) == name
    monkeypatch.undo()
    config.baselines.same_fraction = True  # on, it is another search
    assert tune.study_name(config) != name
    # Switched on in the older run, the record gains it as on (off again is then refused).
    chain._write_config(str(tmp_path / "config.json"), config)
    assert json.loads((tmp_path / "config.json").read_text())["baselines"]["same_fraction"]


def _without(key):
    def edit(record):
        section, name = key.split(".")
        del record[section][name]

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _without("train.label_smoothing"),
            "config.json lacks train.label_smoothing: it was written by an older version of "
            "weckd_jax, and this version's defaults for them need not give that run's numbers; "
            "use the version that wrote it",
        ),
        (
            lambda r: r["chain"].update(mixup=True),
            "config.json sets chain.mixup, which this version's config does not have: it was "
            "written by another version of weckd_jax; use that version",
        ),
        (
            lambda r: r["train"].update(epochs="2"),
            "config.json: Could not override field 'epochs' (reference). 2 is of original type "
            "<class 'str'> and cannot be casted to type <class 'int'>: it was written by another "
            "version of weckd_jax; use that version",
        ),
    ],
)
def test_a_record_of_another_version_is_refused(tmp_path, edit, message):
    record = _record(tmp_path, smoke_config())
    edit(record)
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError) as e:
        from_run(str(tmp_path))
    assert str(e.value) == f"{tmp_path / 'config.json'}{message.removeprefix('config.json')}"


def test_each_mistake_is_named_in_one_line(tmp_path):
    fix = "give the folder of a run or a search, e.g. --config configs/from_run.py:runs/NAME"
    (tmp_path / "empty").mkdir()
    (tmp_path / "experiment" / "seed_0").mkdir(parents=True)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"seed": 0,')
    (tmp_path / "a_list").mkdir()
    (tmp_path / "a_list" / "config.json").write_text("[1, 2]")
    _record(tmp_path / "run", smoke_config())
    run_json = tmp_path / "run" / "config.json"
    cases = [
        (FROM_RUN, f"configs/from_run.py needs the folder whose config to use; {fix}"),
        (f"{FROM_RUN}:", f"configs/from_run.py needs the folder whose config to use; {fix}"),
        (
            f"{FROM_RUN}:{tmp_path / 'nowhere'}",
            f"configs/from_run.py:{tmp_path / 'nowhere'}: {tmp_path / 'nowhere'} does not exist; "
            f"{fix}",
        ),
        (
            f"{FROM_RUN}:{run_json}",
            f"configs/from_run.py:{run_json}: {run_json} is a file, not a folder; give its "
            f"folder: --config configs/from_run.py:{tmp_path / 'run'}",
        ),
        (
            f"{FROM_RUN}:{tmp_path / 'empty'}",
            f"{tmp_path / 'empty'} holds no config.json: it is no folder of a run or search, or "
            "one stopped before its config and data passed their checks (config.json is "
            f"written then); {fix}",
        ),
        (
            f"{FROM_RUN}:{tmp_path / 'experiment'}",
            f"{tmp_path / 'experiment'} holds no config.json: it is a multi-seed experiment "
            "whose first seed has not finished (its config.json is written then); use a seed's "
            f"run, e.g. {tmp_path / 'experiment' / 'seed_0'}",
        ),
        (
            f"{FROM_RUN}:{tmp_path / 'broken'}",
            f"{tmp_path / 'broken' / 'config.json'} cannot be read as JSON (Expecting "
            "property name enclosed in double quotes: line 1 column 12 (char 11)): it was cut "
            "short (e.g. by a full disk or an interrupted copy) or edited; restore it from a "
            "backup, or give the config file and overrides that started the run",
        ),
        (
            f"{FROM_RUN}:{tmp_path / 'a_list'}",
            f"{tmp_path / 'a_list' / 'config.json'} holds a JSON array, not the JSON object "
            "weckd_jax wrote: it was edited; restore it from a backup, or give the config file "
            "and overrides that started the run",
        ),
    ]
    for arg, message in cases:
        with pytest.raises(ConfigError) as e:
            cli.load_config_arg(["prog", "--config", arg, "--config.seed=1"])
        assert str(e.value) == message


def test_a_finished_run_reloads_and_evaluates_from_its_recorded_config(smoke_run, tmp_path, capsys):
    _, workdir, results = smoke_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("evaluations"))

    def snapshot() -> dict:
        found = {}
        for folder, _, names in os.walk(copy):
            for name in names:
                with open(os.path.join(folder, name), "rb") as f:
                    found[os.path.relpath(os.path.join(folder, name), copy)] = f.read()
        return found

    before = snapshot()
    out = run_python(
        "-m", "weckd_jax.launch", "--config", f"configs/from_run.py:{copy}", f"--workdir={copy}"
    )
    assert out.returncode == 0, out.stderr
    assert "link 2" in out.stdout and "gain of the last link" in out.stdout
    assert "epoch" not in out.stdout  # nothing trained: every job reloaded from jobs/
    assert snapshot() == before

    # Named after the config file, not its argument (a folder, here with a trailing slash).
    argv = ["evaluate", "--workdir", copy, "--config", f"{FROM_RUN}:{copy}/", "--split", "test"]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    with open(os.path.join(copy, "evaluations", "from_run-test.json")) as f:
        own = json.load(f)
    assert [r["metrics"]["accuracy"] for r in own["links"]] == [
        r["test"]["accuracy"] for r in results["links"]
    ]
    argv += ["--name", "harder", "--config.data.difficulty=2.0"]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    with open(os.path.join(copy, "evaluations", "harder-test.json")) as f:
        harder = json.load(f)
    assert harder["config"] == {
        **own["config"],
        "data": {**own["config"]["data"], "difficulty": 2.0},
    }
    assert harder["data"]["same_data_as_run"] is False


def test_a_config_files_argument_is_left_out_of_default_names():
    assert cli.config_name("configs/from_run.py:runs/a/") == "from_run"
    assert cli.config_name("/x/best_config.py") == "best_config"
    code = "from weckd_jax import launch; print(launch.default_workdir('c/from_run.py:runs/a/'))"
    out = run_python("-c", code)
    assert re.fullmatch(r"runs/\d{8}-\d{6}-from_run\n", out.stdout), out
