"""``weckd_jax.evaluate`` on the smoke run: which evaluated images the run trained or selected on,
evaluations that are never silently replaced, and the trained architecture over the evaluation
config's own model keys."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, run_python
from weckd_jax import chain, checkpoints, evaluate
from weckd_jax import config as config_lib
from weckd_jax import data as data_lib
from weckd_jax.config import base_config


def test_overlap_with_the_run_is_counted_from_its_own_splits(smoke_run):
    config, workdir, results = smoke_run
    test = evaluate.evaluate_workdir(workdir, config, split="test", name="overlap")
    assert test["data"]["same_data_as_run"] is True
    assert (test["data"]["in_run_train_pool"], test["data"]["in_run_val"]) == (0, 0)
    assert not any("optimistic" in note for note in test["notes"])

    # Another test fraction names other images "test": most of them are the run's training and
    # validation images, which the config alone would not reveal.
    other = config.copy_and_resolve_references()
    with other.unlocked():
        other.data.test_fraction = 0.5
    moved = evaluate.evaluate_workdir(workdir, other, split="test", name="overlap-half")
    data = data_lib.load(config.data, seed=config.seed)
    run_splits = chain.make_run_splits(config, data)
    index, _ = evaluate.select(other, data, "test")
    assert moved["data"]["in_run_train_pool"] == len(set(index) & set(run_splits.train)) > 0
    assert moved["data"]["in_run_val"] == len(set(index) & set(run_splits.val))
    n_train = moved["data"]["in_run_train_pool"]
    assert any(note.startswith(f"{n_train} of the {len(index)} images") for note in moved["notes"])


def test_an_evaluation_with_another_config_is_not_overwritten(smoke_run):
    config, workdir, _ = smoke_run
    first = evaluate.evaluate_workdir(workdir, config, split="all", name="hospital")
    with open(first["path"]) as f:
        saved = f.read()
    other = config.copy_and_resolve_references()
    with other.unlocked():
        other.data.difficulty = 0.5  # other images, same classes
    with pytest.raises(evaluate.EvaluateError, match="data.difficulty: 1.0 -> 0.5.*--name"):
        evaluate.evaluate_workdir(workdir, other, split="all", name="hospital")
    with open(first["path"]) as f:
        assert f.read() == saved
    # The same config on data that changed since (one image relabelled): refused as well.
    original = data_lib.load(config.data, seed=config.seed)
    labels = original.labels.copy()
    labels[0] = (labels[0] + 1) % original.num_classes
    changed = dataclasses.replace(original, labels=labels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate.data_lib, "load", lambda *a, **k: changed)
        with pytest.raises(evaluate.EvaluateError, match="images, labels or groups of the data"):
            evaluate.evaluate_workdir(workdir, config, split="all", name="hospital")
    with open(first["path"]) as f:
        assert f.read() == saved
    # The same evaluation again replaces the file with the same content; another name keeps both.
    again = evaluate.evaluate_workdir(workdir, config, split="all", name="hospital")
    assert again["links"] == first["links"]
    kept = evaluate.evaluate_workdir(workdir, other, split="all", name="hospital-b")
    assert kept["data"]["same_data_as_run"] is False and kept["data"]["in_run_train_pool"] is None
    assert os.path.isfile(first["path"]) and os.path.isfile(kept["path"])


def test_the_runs_own_config_evaluates_it_again_once_its_baselines_changed(smoke_run, tmp_path):
    # evaluate --config configs/from_run.py:DIR, a baseline switched on in DIR (its config.json
    # records it), then the same command; then again once it is switched off before it finished:
    # each new evaluation holds every model of the first (those results.json reports).
    _, workdir, _ = smoke_run
    run_dir = tmp_path / "run"
    shutil.copytree(workdir, run_dir)
    first = evaluate.evaluate_workdir(str(run_dir), config_lib.from_run(str(run_dir)), name="own")
    for on in (True, False):
        changed = config_lib.from_run(str(run_dir))
        changed.baselines.same_fraction = on
        chain._write_config(str(run_dir / "config.json"), changed)  # as the rerun does
        own = config_lib.from_run(str(run_dir))
        again = evaluate.evaluate_workdir(str(run_dir), own, name="own")
        assert again["links"] == first["links"] and again["baselines"] == first["baselines"]
        with open(again["path"]) as f:
            assert json.load(f)["config"]["baselines"]["same_fraction"] is on


def test_split_fractions_may_change_over_an_evaluation_of_all_images_only(smoke_run):
    # --split all evaluates every image whatever the split fractions; another split's images
    # depend on them.
    config, workdir, _ = smoke_run
    other = config.copy_and_resolve_references()
    with other.unlocked():
        other.data.val_fraction, other.data.test_fraction = 0.25, 0.3
    first = evaluate.evaluate_workdir(workdir, config, split="all", name="fractions")
    evaluate.evaluate_workdir(workdir, config, split="test", name="fractions")
    again = evaluate.evaluate_workdir(workdir, other, split="all", name="fractions")
    assert again["links"] == first["links"] and again["data"] == first["data"]
    with open(again["path"]) as f:
        assert json.load(f)["config"]["data"]["test_fraction"] == 0.3
    with pytest.raises(evaluate.EvaluateError, match=r"data.test_fraction: 0.2 -> 0.3.*--name"):
        evaluate.evaluate_workdir(workdir, other, split="test", name="fractions")


@pytest.mark.parametrize("source", ["folder", "synthetic"])
def test_the_seed_may_change_over_an_evaluation_of_all_images_unless_it_makes_them(
    source, tmp_path
):
    # Folder (and TFDS) images are the same whatever the seed; synthetic ones are generated
    # from it.
    config = base_config()
    config.data.source = source
    saved = config_lib.as_json(config)
    path = tmp_path / "site-all.json"
    path.write_text(json.dumps({"config": saved}))
    with config.unlocked():
        config.seed = 1
    now = config_lib.as_json(config)
    for split in ("all", "test"):
        if split == "all" and source == "folder":
            evaluate._refuse_overwrite(str(path), now, split)
        else:
            with pytest.raises(evaluate.EvaluateError, match=r"seed: 0 -> 1"):
                evaluate._refuse_overwrite(str(path), now, split)


@pytest.mark.parametrize("name", ["../outside", "sub/name", "..", ""])
def test_a_name_that_would_write_outside_the_evaluations_folder_is_refused(smoke_run, name):
    config, workdir, _ = smoke_run
    before = sorted(os.listdir(os.path.dirname(workdir)))
    with pytest.raises(evaluate.EvaluateError, match=r"is no file name: give a name without '/'"):
        evaluate.evaluate_workdir(workdir, config, split="test", name=name)
    assert sorted(os.listdir(os.path.dirname(workdir))) == before


def test_the_trained_architecture_is_used_not_the_evaluation_configs(smoke_run):
    config, workdir, results = smoke_run
    other = config.copy_and_resolve_references()
    with other.unlocked():
        # At the smoke run's 32 px this stem would fail validation; the models are resnet10s
        # with the small stem, read from the checkpoints.
        other.model.backbone, other.model.stem = "resnet18", "imagenet"
    out = evaluate.evaluate_workdir(workdir, other, split="test", name="arch")
    with open(out["path"]) as f:
        written = json.load(f)
    assert written["config"]["model"]["stem"] == "small"
    assert [r["metrics"]["accuracy"] for r in out["links"]] == [
        r["test"]["accuracy"] for r in results["links"]
    ]


def test_images_are_read_at_the_trained_size_with_a_note_saying_so(smoke_run):
    import io

    from weckd_jax.progress import Progress

    config, workdir, results = smoke_run
    other = config.copy_and_resolve_references()
    with other.unlocked():
        other.data.image_size = 48
    stream = io.StringIO()
    out = evaluate.evaluate_workdir(
        workdir, other, split="test", name="size", progress=Progress(stream=stream)
    )
    size, channels = results["data"]["image_size"], results["data"]["channels"]
    assert stream.getvalue().splitlines()[0] == (
        f"note: the models were trained at {size}x{size}x{channels}, so the images "
        f"are read at that size (data.image_size 48 -> {size})"
    )
    assert [r["metrics"]["accuracy"] for r in out["links"]] == [
        r["test"]["accuracy"] for r in results["links"]
    ]


def test_a_run_is_evaluated_on_a_device_count_its_batch_sizes_do_not_divide_over(smoke_run):
    # Trained on one device with train.batch_size=16 and eval_batch_size=64, evaluated on 3: the
    # train batch is no concern of an evaluation, and its batches are rounded up (as predict's).
    _, workdir, results = smoke_run
    smoke = os.path.join(REPO, "configs", "smoke.py")
    args = ["--workdir", workdir, "--config", smoke, "--name", "three_devices"]
    out = run_python("-m", "weckd_jax.evaluate", *args, timeout=600, devices=3)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(workdir, "evaluations", "three_devices-test.json")) as f:
        evaluation = json.load(f)
    assert evaluation["devices"] == 3
    for evaluated, trained in zip(evaluation["links"], results["links"], strict=True):
        assert evaluated["metrics"]["accuracy"] == trained["test"]["accuracy"]
        np.testing.assert_allclose(evaluated["metrics"]["nll"], trained["test"]["nll"], rtol=1e-5)


def test_a_mistyped_override_is_named_with_its_close_match(smoke_run, capsys):
    _, workdir, _ = smoke_run
    smoke = os.path.join(REPO, "configs", "smoke.py")
    argv = ["evaluate", "--workdir", workdir, "--config", smoke, "--config.trian.epochs=1"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "--config.trian.epochs=1" in err and "did you mean 'train'?" in err
    assert len(err.strip().splitlines()) == 1


# The fix for a damaged config.json or data.json of the run.
_LOST_RECORD = (
    "restore it from a backup, or move it aside to evaluate the run as one that predates it "
    "(whether the evaluated images overlap its training images is then unknown)"
)


@pytest.mark.parametrize(
    ("damaged", "fix"),
    [
        (
            "results.json",
            "restore it from a backup, or move it aside and rerun the launch command that made "
            "the run (e.g. --config configs/from_run.py:{run} --workdir {run}), which writes it "
            "anew from the finished links' records",
        ),
        ("config.json", _LOST_RECORD),
        ("data.json", _LOST_RECORD),
        (
            os.path.join("evaluations", "site-test.json"),
            "pass --name NAME to keep it and write this evaluation beside it, or move it aside",
        ),
    ],
    ids=["results", "config", "data", "evaluation"],
)
def test_a_damaged_file_of_the_run_is_named_with_the_fix_and_kept(
    smoke_run, tmp_path, capsys, damaged, fix
):
    # Cut short, e.g. by a full disk or an interrupted copy of the run's folder: named before
    # the (possibly long) data load.
    run = tmp_path / "run"
    text = _evaluate_with(smoke_run, run, damaged, lambda: (run / "results.json").read_text()[:100])
    path = run / damaged
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} cannot be read as JSON ("), err
    assert err.endswith(f"; {fix.format(run=run)}\n") and err.count("\n") == 1, err
    assert path.read_text() == text


def _not_loaded(*_, **__):
    raise AssertionError("the data was loaded before the run's files were checked")


def _evaluate_with(smoke_run, run, name: str, new_text) -> str:
    """Copies the smoke run to ``run``, writes ``new_text()`` to its file ``name``, evaluates it
    (with the data load failing if reached) and checks the exit status 2; returns the text."""
    _, workdir, _ = smoke_run
    shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("evaluations"))
    (run / name).parent.mkdir(exist_ok=True)
    text = new_text()
    (run / name).write_text(text)
    smoke = os.path.join(REPO, "configs", "smoke.py")
    argv = ["evaluate", "--workdir", str(run), "--config", smoke, "--name=site"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate.data_lib, "load", _not_loaded)
        assert evaluate.main(argv) == 2
    return text


@pytest.mark.parametrize(
    "damaged, key", [("config.json", "model"), ("data.json", "pixels")], ids=["config", "data"]
)
def test_a_record_of_the_run_without_a_key_read_from_it_is_named_with_the_fix_and_kept(
    smoke_run, tmp_path, capsys, damaged, key
):
    # Edited by hand, or written by another version: one line, not a KeyError where it is read,
    # and before the data load.
    run, path = tmp_path / "run", tmp_path / "run" / damaged

    def without_key() -> str:
        record = json.loads(path.read_text())
        del record[key]
        return json.dumps(record)

    text = _evaluate_with(smoke_run, run, damaged, without_key)
    assert capsys.readouterr().err == (
        f"error: {path} lacks {key!r}, which weckd_jax reads from it: it was edited, or written "
        f"by another version of weckd_jax; {_LOST_RECORD}\n"
    )
    assert path.read_text() == text


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_prints_the_usage(flag, capsys):
    assert evaluate.main(["evaluate", flag]) == 0
    out = capsys.readouterr()
    assert "python -m weckd_jax.evaluate --workdir DIR --config CFG" in out.out and not out.err


def test_changed_data_under_the_run_config_is_flagged_not_counted(smoke_run):
    config, workdir, _ = smoke_run
    with open(os.path.join(workdir, "config.json")) as f:
        run_config = json.load(f)
    data = data_lib.load(config.data, seed=config.seed)
    index = np.arange(len(data))
    grown = data.take(np.concatenate([index, index[:1]]))  # an image added to the folder
    record, note = evaluate._overlap(
        evaluate._run_data(workdir), run_config, run_config, grown, index, chain.data_record(grown)
    )
    assert record == {"same_data_as_run": False, "in_run_train_pool": None, "in_run_val": None}
    assert "changed since the run" in note
    # The run's own images, decoded with other rounding (another CPU or Pillow): still counted.
    images = data.images.copy()
    images[0, 0, 0, 0] ^= 1
    repixelled = dataclasses.replace(data, images=images)
    record, note = evaluate._overlap(
        evaluate._run_data(workdir),
        run_config,
        run_config,
        repixelled,
        index,
        chain.data_record(repixelled),
    )
    splits = chain.make_run_splits(config, data)
    assert record == {
        "same_data_as_run": True,
        "in_run_train_pool": len(splits.train),
        "in_run_val": len(splits.val),
    }
    assert note is None


@pytest.mark.parametrize(
    "source, override, splits, note_says",
    [
        # Another split of the run's images: the same images, which the run's own splits count.
        ("synthetic", {"data.test_fraction": 0.5}, "run", None),
        # A folder's images are the same whatever the seed (the smoke run's images stand in).
        ("folder", {"seed": 1}, "run", None),
        # As if an older version had cut the same data into other splits.
        (
            "synthetic",
            {},
            "0" * 64,
            "cuts the run's data into other splits than the version that trained it",
        ),
        # data.json of a version before the digest: older rounding may have cut its splits.
        ("synthetic", {}, None, "predates the record of its splits"),
    ],
    ids=["fraction", "seed-of-a-folder", "other-splits", "no-digest"],
)
def test_the_overlap_with_the_run_is_counted_on_its_own_splits_or_left_unknown(
    source, override, splits, note_says, smoke_run, tmp_path
):
    # The run's images decoded with other rounding (another CPU or Pillow), evaluated with the
    # keys of `override` changed: counted on the run's splits as its data.json records them, or
    # unknown (with a note) when that record cannot be recomputed.
    config, workdir, _ = smoke_run
    with open(os.path.join(workdir, "config.json")) as f:
        run_config = json.load(f)
    run_config["data"]["source"] = source
    other = json.loads(json.dumps(run_config))
    for key, value in override.items():
        *section, name = key.split(".")
        (other[section[0]] if section else other)[name] = value
    with open(os.path.join(workdir, "data.json")) as f:
        saved = json.load(f)
    data = data_lib.load(config.data, seed=config.seed)
    run_splits = chain.make_run_splits(config, data)
    assert saved.pop("splits") == chain.splits_digest(run_splits)
    if splits is not None:
        saved["splits"] = chain.splits_digest(run_splits) if splits == "run" else splits
    (tmp_path / "data.json").write_text(json.dumps(saved))
    images = data.images.copy()
    images[0, 0, 0, 0] ^= 1
    repixelled = dataclasses.replace(data, images=images)
    index = np.arange(len(data))
    record, note = evaluate._overlap(
        evaluate._run_data(str(tmp_path)),
        run_config,
        other,
        repixelled,
        index,
        chain.data_record(repixelled),
    )
    if note_says is None:
        assert record == {
            "same_data_as_run": True,
            "in_run_train_pool": len(run_splits.train),
            "in_run_val": len(run_splits.val),
        }
        assert note is None
    else:
        assert record == {"same_data_as_run": True, "in_run_train_pool": None, "in_run_val": None}
        assert note_says in note


def test_a_checkpoint_that_is_not_the_reported_model_is_refused(smoke_run, tmp_path):
    config, workdir, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    final = copy / "checkpoints" / "union_supervised" / "final"
    shutil.rmtree(final)
    shutil.copytree(copy / "checkpoints" / "link_1" / "final", final)  # same architecture
    with pytest.raises(checkpoints.CheckpointError, match="holds other weights than the union"):
        evaluate.evaluate_workdir(str(copy), config, split="test", name="swapped")
    assert not (copy / "evaluations" / "swapped-test.json").exists()


def test_the_run_is_checked_before_the_data_is_loaded(smoke_run, tmp_path, monkeypatch):
    # Loading another hospital's images can take long: what the workdir alone refuses (a model
    # that is not the reported one, an evaluation of another config under the same name) is
    # refused before any image is read.
    config, workdir, _ = smoke_run
    copy = tmp_path / "run"
    # Without the evaluations other tests write in the smoke run.
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("evaluations"))
    final = copy / "checkpoints" / "union_supervised" / "final"
    shutil.rmtree(final)
    shutil.copytree(copy / "checkpoints" / "link_1" / "final", final)

    def load(*args, **kwargs):
        raise AssertionError("the data was loaded before the run's checks")

    monkeypatch.setattr(evaluate.data_lib, "load", load)
    with pytest.raises(checkpoints.CheckpointError, match="holds other weights than the union"):
        evaluate.evaluate_workdir(str(copy), config, split="all", name="hospital")
    # An evaluation written with another config: its config is compared before the data's turn.
    with open(copy / "config.json") as f:
        other = json.load(f)
    other["data"]["difficulty"] = 0.5
    (copy / "evaluations").mkdir()
    saved = json.dumps({"config": other})
    (copy / "evaluations" / "hospital-all.json").write_text(saved)
    with pytest.raises(evaluate.EvaluateError, match="data.difficulty: 0.5 -> 1.0.*--name"):
        evaluate.evaluate_workdir(str(copy), config, split="all", name="hospital")
    assert (copy / "evaluations" / "hospital-all.json").read_text() == saved


def test_the_runs_manifest_is_not_read_against_another_hospitals_folder(smoke_run, tmp_path):
    # from_run.py:DIR --config.data.root=OTHER keeps the run's data.manifest: its labels, listed
    # for the run's folder, would be given to OTHER's files of the same paths.
    _, workdir, results = smoke_run
    names = results["data"]["class_names"]
    run_dir = tmp_path / "run"
    shutil.copytree(workdir, run_dir, ignore=shutil.ignore_patterns("evaluations"))
    for site in ("a", "b"):
        for i, name in enumerate(names):
            (tmp_path / site / name).mkdir(parents=True)
            pixels = np.full((8, 8, 3), 40 * i + (site == "b"), np.uint8)
            Image.fromarray(pixels).save(tmp_path / site / name / "1.png")
    listing = tmp_path / "a.csv"  # site a's labels, the wrong way round for site b's files
    listing.write_text(
        "path,label\n" + "".join(f"{n}/1.png,{names[-1 - i]}\n" for i, n in enumerate(names))
    )
    run_config = json.loads((run_dir / "config.json").read_text())
    run_config["data"].update(source="folder", root=str(tmp_path / "a"), manifest=str(listing))
    (run_dir / "config.json").write_text(json.dumps(run_config))
    config = config_lib.from_run(str(run_dir))
    config.data.root = str(tmp_path / "b")
    with pytest.raises(evaluate.EvaluateError) as e:
        evaluate.evaluate_workdir(str(run_dir), config, split="all", name="b")
    assert f"data.manifest={listing} is the run's manifest" in str(e.value)
    assert "Fix: --config.data.manifest=''" in str(e.value)
    config.data.manifest = ""  # site b's class folders: their own labels
    evaluation = evaluate.evaluate_workdir(str(run_dir), config, split="all", name="b")
    assert evaluation["data"]["class_counts"] == [1] * len(names)


def test_the_runs_folder_and_manifest_are_compared_as_folders_not_as_spellings(
    tmp_path, monkeypatch
):
    # The run's root spelt otherwise (trailing slash, relative, through a link, or the manifest's
    # own folder for none) is its folder; the run's manifest spelt otherwise still lists its
    # folder's images, and is refused against another folder.
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    (tmp_path / "list.csv").write_text("path,label\n")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    (tmp_path / "list_link.csv").symlink_to(tmp_path / "list.csv")
    monkeypatch.chdir(tmp_path)
    run_config = {"data": {"root": str(tmp_path / "a"), "manifest": str(tmp_path / "list.csv")}}

    def refused(root, manifest, run_root=None):
        config = base_config()
        config.data.root, config.data.manifest = root, manifest
        run = {"data": {**run_config["data"], **({} if run_root is None else {"root": run_root})}}
        try:
            evaluate._refuse_run_manifest_elsewhere(run, config)
        except evaluate.EvaluateError:
            return True
        return False

    listing = str(tmp_path / "list.csv")
    for root in (f"{tmp_path / 'a'}/", "a", "./link", str(tmp_path / "b" / ".." / "a")):
        assert not refused(root, listing), root
    assert not refused(str(tmp_path), listing, run_root="")
    for manifest in ("list.csv", "list_link.csv", str(tmp_path / "list_link.csv")):
        assert refused("b", manifest), manifest
    assert not refused("b", str(tmp_path / "b.csv"))  # another manifest: its own labels
    # A folder that does not exist (yet) is compared by its normalised path.
    assert refused(str(tmp_path / "c"), listing) and not refused("c/", listing, run_root="c")


def test_the_runs_folder_spelt_otherwise_is_still_the_runs_data_source(smoke_run, tmp_path):
    # Data changed since the run under its own folder, named with a trailing slash: the note says
    # the overlap cannot be counted, as for the folder named as the run named it.
    config, workdir, _ = smoke_run
    with open(os.path.join(workdir, "config.json")) as f:
        run_config = json.load(f)
    run_config["data"]["root"] = str(tmp_path)
    now = json.loads(json.dumps(run_config))
    now["data"]["root"] = f"{tmp_path}/"
    data = data_lib.load(config.data, seed=config.seed)
    index = np.arange(len(data))
    grown = data.take(np.concatenate([index, index[:1]]))
    _, note = evaluate._overlap(
        evaluate._run_data(workdir), run_config, now, grown, index, chain.data_record(grown)
    )
    assert "changed since the run" in note
