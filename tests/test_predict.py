"""``python -m weckd_jax.predict`` and ``python -m weckd_jax.evaluate`` on the smoke run."""

import csv
import json
import os
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO
from weckd_jax import chain, checkpoints, evaluate, parallel, predict
from weckd_jax import data as data_lib

SMOKE = os.path.join(REPO, "configs", "smoke.py")
N_IMAGES = 12


@pytest.fixture(scope="module")
def images(smoke_run, tmp_path_factory):
    """PNGs of the smoke run's first test images in nested folders, and the probabilities
    `chain.evaluate` gives on the same images for each link: ``(folder, paths, {link: probs})``.
    """
    config, workdir, results = smoke_run
    data = data_lib.load(config.data, seed=config.seed)
    splits = chain.make_run_splits(config, data)
    index = splits.test[:N_IMAGES]
    folder = tmp_path_factory.mktemp("predict_images")
    paths = []
    for i, row in enumerate(index):
        sub = folder / ("a" if i < N_IMAGES // 2 else "b/c")  # sorted order = index order
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{i:03d}.png"
        Image.fromarray(data.images[row]).save(path)
        paths.append(str(path))
    (folder / "notes.txt").write_text("not an image")  # passed over: not an image extension
    (folder / ".hidden.png").write_bytes(b"")  # passed over: hidden
    mesh = parallel.data_mesh()
    shape = data.images.shape[1:]
    reference = {}
    for link in results["links"]:
        spec, variables = chain.restore_finished(workdir, link["name"], mesh, shape)
        probs, _ = chain.evaluate(spec, variables, data, index, batch_size=64, mesh=mesh)
        reference[link["link"]] = probs
    return str(folder), paths, reference


def _run(argv, capsys):
    code = predict.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_probabilities_equal_chain_evaluate(smoke_run, images):
    _, workdir, results = smoke_run
    folder, paths, reference = images
    found = predict.find_images(folder)
    assert found == paths
    out = predict.predict(workdir, found, batch_size=5)  # 12 images: 3 batches, the last padded
    assert out.model == "link_2" and out.skipped == []
    assert out.class_names == results["data"]["class_names"]
    assert out.probs.shape == (N_IMAGES, len(out.class_names))
    np.testing.assert_allclose(out.probs, reference[2], atol=1e-5)
    assert out.predicted == [out.class_names[i] for i in reference[2].argmax(1)]


def test_cli_csv_schema_and_table(smoke_run, images, tmp_path, capsys):
    _, workdir, results = smoke_run
    folder, paths, reference = images
    output = str(tmp_path / "out" / "predictions.csv")
    code, out, err = _run(["--workdir", workdir, "--images", folder, "--output", output], capsys)
    assert code == 0, err
    names = results["data"]["class_names"]
    with open(output, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "predicted", *names]
    assert [r[0] for r in rows[1:]] == paths
    probs = np.array([[float(v) for v in r[2:]] for r in rows[1:]])
    np.testing.assert_allclose(probs, reference[2], atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [r[1] for r in rows[1:]] == [names[i] for i in reference[2].argmax(1)]
    assert f"{N_IMAGES} image(s) by link_2" in out
    assert os.path.basename(paths[0]) in out and f"wrote {output}" in out
    assert err.splitlines() == [
        f"warning: not classified: {folder}/.hidden.png (hidden or system file)",
        f"warning: not classified: {folder}/notes.txt (not a PNG, JPEG, BMP or TIFF file)",
    ]


def test_link_selection_and_single_image(smoke_run, images, tmp_path, capsys):
    _, workdir, _ = smoke_run
    _, paths, reference = images
    output = str(tmp_path / "one.csv")
    code, out, err = _run(
        ["--workdir", workdir, "--images", paths[3], "--link", "1", "--output", output], capsys
    )
    assert code == 0, err
    with open(output, newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 2 and rows[1][0] == paths[3]
    np.testing.assert_allclose([float(v) for v in rows[1][2:]], reference[1][3], atol=1e-5)
    assert "1 image(s) by link_1" in out
    assert not np.allclose(reference[1], reference[2], atol=1e-4)  # the links do differ


def test_a_model_is_chosen_by_its_name(smoke_run, same_fraction_run, images, capsys):
    _, workdir, _ = same_fraction_run
    _, paths, reference = images
    data_config, _, _ = smoke_run  # the same data and splits
    data = data_lib.load(data_config.data, seed=data_config.seed)
    index = chain.make_run_splits(data_config, data).test[:N_IMAGES]
    mesh = parallel.data_mesh()
    spec, variables = chain.restore_finished(workdir, "same_fraction", mesh, data.images.shape[1:])
    expected, _ = chain.evaluate(spec, variables, data, index, batch_size=64, mesh=mesh)
    out = predict.predict(workdir, paths, link="same_fraction")
    assert out.model == "same_fraction"
    np.testing.assert_allclose(out.probs, expected, atol=1e-5)
    assert not np.allclose(expected, reference[2], atol=1e-4)  # not the last link's outputs
    np.testing.assert_allclose(
        predict.predict(workdir, paths, link="link_1").probs, reference[1], atol=1e-5
    )
    code, out, err = _run(["--workdir", workdir, "--images", paths[0], "--link", "full"], capsys)
    assert (code, out) == (2, "")
    assert err == (
        f"error: --link full does not exist: the run in {workdir} has links 1, 2 and baselines "
        "same_fraction, union_supervised, full_supervised; give a link's number or a name from "
        "results.json\n"
    )


def test_unreadable_image_is_skipped_with_a_warning(smoke_run, images, tmp_path, capsys):
    _, workdir, _ = smoke_run
    _, paths, reference = images
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = folder / "good.png"
    with open(paths[0], "rb") as f:
        good.write_bytes(f.read())
    (folder / "broken.png").write_bytes(b"\x89PNG but truncated")
    output = str(tmp_path / "mixed.csv")
    code, out, err = _run(
        ["--workdir", workdir, "--images", str(folder), "--output", output], capsys
    )
    assert code == 0
    assert f"warning: skipped {folder / 'broken.png'}" in err
    assert "Fix:" not in err and "train" not in err  # the folder source's advice for training
    assert "1 of 2 image(s) could not be decoded" in err
    with open(output, newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == [str(good)]
    np.testing.assert_allclose([float(v) for v in rows[1][2:]], reference[2][0], atol=1e-5)


def test_files_passed_over_are_named_as_training_names_them(smoke_run, images, tmp_path, capsys):
    _, workdir, _ = smoke_run
    _, paths, _ = images
    scans = tmp_path / "scans"
    (scans / ".trash").mkdir(parents=True)
    shutil.copy(paths[0], scans / "good.png")
    shutil.copy(paths[1], scans / ".trash" / "old.png")  # a hidden folder's image
    (scans / "scan.dcm").write_bytes(b"\0" * 128 + b"DICM")
    code, out, err = _run(["--workdir", workdir, "--images", str(scans)], capsys)
    assert code == 0 and "1 image(s) by link_2" in out
    assert err.splitlines() == [
        f"warning: not classified: {scans / '.trash'}/ (hidden folder)",
        f"warning: not classified: {scans / 'scan.dcm'} (DICOM is not supported: convert it to "
        "PNG or TIFF (16-bit grayscale is kept))",
    ]
    (scans / "good.png").unlink()
    code, out, err = _run(["--workdir", workdir, "--images", str(scans)], capsys)
    assert code == 2 and f"2 other file(s) passed over, e.g. {scans / 'scan.dcm'}: DICOM" in err


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_results", "has no results.json"),
        ("missing_workdir", "does not exist"),
        ("bad_link", "--link 7 does not exist: the run in"),
        ("no_images", "no images found under"),
        ("missing_images", "--images"),
        ("all_unreadable", "none of the 1 image(s) could be decoded"),
        ("no_checkpoint", "has no final checkpoint for link_2"),
    ],
)
def test_user_errors_exit_2_with_one_message(case, message, smoke_run, images, tmp_path, capsys):
    _, workdir, results = smoke_run
    _, paths, _ = images
    args = {"workdir": workdir, "images": paths[0]}
    if case == "no_results":
        args["workdir"] = str(tmp_path)
    elif case == "missing_workdir":
        args["workdir"] = str(tmp_path / "nowhere")
    elif case == "bad_link":
        args["link"] = "7"
    elif case == "no_images":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
        args["images"] = str(tmp_path / "empty")
    elif case == "missing_images":
        args["images"] = str(tmp_path / "nothing.png")
    elif case == "all_unreadable":
        (tmp_path / "bad.jpg").write_bytes(b"nope")
        args["images"] = str(tmp_path / "bad.jpg")
    elif case == "no_checkpoint":
        fake = tmp_path / "run"
        fake.mkdir()
        (fake / "results.json").write_text(json.dumps(results))
        args["workdir"] = str(fake)
    argv = [f"--{k}={v}" for k, v in args.items()]
    code, out, err = _run(argv, capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, err
    assert "Traceback" not in err and out == ""


def test_existing_output_is_kept_unless_overwrite(smoke_run, images, tmp_path, capsys):
    _, workdir, results = smoke_run
    _, paths, _ = images
    output = tmp_path / "results.json"  # e.g. a run's results, named by mistake
    output.write_text('{"keep": 1}')
    argv = ["--workdir", workdir, "--images", paths[0], "--output", str(output)]
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert err == (
        f"error: --output {output} already exists; choose another path, or add --overwrite to "
        "replace it\n"
    )
    assert output.read_text() == '{"keep": 1}'
    code, out, err = _run(argv + ["--overwrite"], capsys)
    assert code == 0, err
    with open(output, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "predicted", *results["data"]["class_names"]] and len(rows) == 2
    code, out, err = _run(
        ["--workdir", workdir, "--images", paths[0], "--output", str(tmp_path)], capsys
    )
    assert code == 2 and f"error: --output {tmp_path} is a folder" in err


def test_an_output_that_appears_while_classifying_is_kept(
    smoke_run, images, tmp_path, capsys, monkeypatch
):
    _, workdir, _ = smoke_run
    _, paths, _ = images
    output = tmp_path / "p.csv"
    classify = predict.predict

    def someone_writes_the_output_meanwhile(*args, **kwargs):
        output.write_text("theirs")
        return classify(*args, **kwargs)

    monkeypatch.setattr(predict, "predict", someone_writes_the_output_meanwhile)
    code, out, err = _run(
        ["--workdir", workdir, "--images", paths[0], "--output", str(output)], capsys
    )
    assert code == 0, err
    assert output.read_text() == "theirs"
    ours = tmp_path / "p-1.csv"
    assert f"warning: --output {output} appeared while this ran and was kept; wrote {ours}" in err
    assert out.endswith(f"wrote {ours}\n")
    assert (
        ours.read_text().startswith("path,predicted,") and len(ours.read_text().splitlines()) == 2
    )


def _copy_run(workdir: str, results: dict, to) -> str:
    """A copy of the smoke run's results.json and link_2 checkpoint (``results`` as given)."""
    to.mkdir()
    (to / "results.json").write_text(json.dumps(results))
    shutil.copytree(os.path.join(workdir, "checkpoints", "link_2"), to / "checkpoints" / "link_2")
    return str(to)


@pytest.mark.parametrize("more", [False, True], ids=["fewer-names", "more-names"])
def test_checkpoint_with_other_classes_is_refused_alike_by_predict_and_evaluate(
    more, smoke_run, images, tmp_path, capsys
):
    # results.json naming other classes than the models output: with more names, evaluate used
    # to write metrics under the wrong names.
    _, workdir, results = smoke_run
    _, paths, _ = images
    names = results["data"]["class_names"]
    other = json.loads(json.dumps(results))
    other["data"]["class_names"] = [*names, "extra"] if more else names[:3]
    fake = tmp_path / "run"
    shutil.copytree(workdir, fake, ignore=shutil.ignore_patterns("evaluations"))
    (fake / "results.json").write_text(json.dumps(other))
    final = fake / "checkpoints" / "link_1" / "final"  # evaluate restores link 1 first
    message = (
        f"the checkpoint {final} outputs {len(names)} classes but {fake / 'results.json'} names "
        f"{len(other['data']['class_names'])} ({', '.join(other['data']['class_names'])}): they "
        "are from different runs. Fix: point --workdir at the folder launch wrote, with its "
        "results.json and checkpoints unchanged."
    )
    assert evaluate.main(["evaluate", "--workdir", str(fake), "--config", SMOKE]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (fake / "evaluations").exists()
    code, out, err = _run(["--workdir", str(fake), "--images", paths[0], "--link", "1"], capsys)
    assert (code, out, err) == (2, "", f"error: {message} Or pick another --link.\n")


@pytest.mark.parametrize("tamper", ["damaged", "swapped"])
def test_a_checkpoint_that_cannot_serve_as_the_reported_model_is_named_with_the_fix(
    tamper, smoke_run, images, tmp_path, capsys
):
    # Link 2's checkpoint with its params deleted, or link 1's weights put where link 2's were
    # (same architecture and classes: the predictions would pass for link 2's).
    _, workdir, results = smoke_run
    _, paths, _ = images
    fake = _copy_run(workdir, results, tmp_path / "run")
    final = os.path.join(fake, "checkpoints", "link_2", "final")
    if tamper == "damaged":
        shutil.rmtree(os.path.join(final, "0", "params"))
    else:
        shutil.rmtree(final)
        shutil.copytree(os.path.join(workdir, "checkpoints", "link_1", "final"), final)
    code, out, err = _run(["--workdir", fake, "--images", paths[0]], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.endswith("Or pick another --link.\n")
    if tamper == "damaged":
        assert err.startswith(f"error: the final checkpoint of link_2 ({final}) cannot be read (")
        assert "params" in err and "move that folder and" in err
        assert os.path.join(fake, "jobs", "link_2.json") in err
    else:
        found, reported = results["links"][0]["fingerprint"], results["links"][1]["fingerprint"]
        assert err.startswith(
            f"error: the final checkpoint of link_2 ({final}) holds other weights than the "
            f"link_2 that {os.path.join(fake, 'results.json')} reports (fingerprint "
            f"{found[:12]}, reported {reported[:12]}): it was replaced or altered after the run "
            "finished."
        )


def test_a_missing_checkpoint_is_reported_alike_by_predict_and_evaluate(
    smoke_run, images, tmp_path, capsys
):
    # The copy holds link_2's checkpoint only: link_1's is missing for both tools.
    _, workdir, results = smoke_run
    _, paths, _ = images
    fake = _copy_run(workdir, results, tmp_path / "run")
    final = os.path.join(fake, "checkpoints", "link_1", "final")
    message = (
        f"{fake} has no final checkpoint for link_1 ({final}), which its results.json reports: "
        "the checkpoints were moved or deleted. Fix: put the run's own checkpoints/link_1 back, "
        "or point --workdir at the run folder that holds them."
    )
    size, channels = results["data"]["image_size"], results["data"]["channels"]
    shape = (size, size, channels)
    with pytest.raises(checkpoints.CheckpointError) as e:
        chain.restore_recorded(
            fake, results["links"][0], parallel.data_mesh(), shape, results["data"]["class_names"]
        )
    assert str(e.value) == message
    code, out, err = _run(["--workdir", fake, "--images", paths[0], "--link", "1"], capsys)
    assert (code, out, err) == (2, "", f"error: {message} Or pick another --link.\n")
    assert evaluate.main(["evaluate", "--workdir", fake, "--config", SMOKE]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_multi_seed_workdir_names_its_seed_runs(images, tmp_path, capsys):
    _, paths, _ = images
    for seed in (0, 1, 10):
        (tmp_path / f"seed_{seed}").mkdir()
    code, out, err = _run(["--workdir", str(tmp_path), "--images", paths[0]], capsys)
    assert code == 2 and out == ""
    assert err == (
        f"error: {tmp_path} holds a multi-seed experiment (seed_0, seed_1, seed_10), one run per "
        f"seed: point --workdir at one of them, e.g. --workdir {tmp_path / 'seed_0'}\n"
    )


def test_an_unfinished_run_or_a_search_names_the_fix(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # launch began, and stopped before the end
    with pytest.raises(predict.PredictError) as e:
        predict.load_results(str(run))
    assert str(e.value) == (
        f"{run} holds a run that has not finished (no results.json yet): rerun the launch "
        f"command that started it (same --config, --workdir {run}) to finish it, then point "
        "--workdir at it again"
    )
    search = tmp_path / "search"
    search.mkdir()
    (search / "study.db").write_bytes(b"")
    (search / "config.json").write_text("{}")
    with pytest.raises(predict.PredictError, match="its best config has no run yet: rerun the"):
        predict.load_results(str(search))
    best = search / "best" / "trial_3"
    # As a search started with --workdir search from another folder writes it.
    written = {"trial": 3, "workdir": os.path.join("search", "best", "trial_3")}
    (search / "best_results.json").write_text(json.dumps(written))
    with pytest.raises(predict.PredictError) as e:
        predict.load_results(str(search))
    assert str(e.value) == (
        f"{search} holds a hyper-parameter search, not a run: point --workdir at its best "
        f"config's run, --workdir {best}"
    )


def test_a_results_file_without_the_keys_read_from_it_names_them_with_the_fix(tmp_path):
    # Edited by hand, or written by another version: one line, not a KeyError where it is read.
    fix = (
        "restore it from a backup, or move it aside and rerun the launch command that made the "
        f"run (e.g. --config configs/from_run.py:{tmp_path} --workdir {tmp_path}), which writes "
        "it anew from the finished links' records"
    )
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"links": []}))
    with pytest.raises(predict.PredictError) as e:
        predict.load_results(str(tmp_path))
    assert str(e.value) == (
        f"{path} lacks 'data', which weckd_jax reads from it: it was edited, or written by "
        f"another version of weckd_jax; {fix}"
    )
    path.write_text(json.dumps({"links": [], "data": {"class_names": ["a"]}}))
    with pytest.raises(predict.PredictError) as e:
        predict.load_results(str(tmp_path))
    assert str(e.value) == (
        f"{path} lacks data.image_size, data.channels, which weckd_jax reads from it: it was "
        f"edited, or written by another version of weckd_jax; {fix}"
    )


def test_images_in_linked_folders_are_found_as_training_finds_them(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    scans = tmp_path / "scans"
    (scans / "own").mkdir(parents=True)
    for path in (elsewhere / "1.png", elsewhere / "2.PNG", scans / "own" / "0.png"):
        path.write_bytes(b"")  # found by name; decoding comes later
    (scans / "linked").symlink_to(elsewhere)  # e.g. a folder of scans linked from a share
    (scans / "own" / "loop").symlink_to(scans)  # read once, not forever
    expected = [scans / "linked" / "1.png", scans / "linked" / "2.PNG", scans / "own" / "0.png"]
    assert predict.find_images(str(scans)) == [str(p) for p in expected]


def test_a_file_that_is_no_image_is_reported_once_for_predicting(smoke_run, tmp_path, capsys):
    _, workdir, _ = smoke_run
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    code, out, err = _run(["--workdir", workdir, "--images", str(text)], capsys)
    assert code == 2 and out == ""
    assert err == (
        f"error: none of the 1 image(s) could be decoded (first: {text}: not a PNG, JPEG, BMP "
        "or TIFF image Pillow can identify); point --images at PNG, JPEG, BMP or TIFF files\n"
    )


def test_paths_starting_with_a_tilde_are_expanded_by_predict_and_evaluate(
    smoke_run, images, tmp_path, monkeypatch, capsys
):
    # In --flag=~/x the shell leaves ~ as typed (it expands it only at the start of a word).
    _, workdir, _ = smoke_run
    _, paths, _ = images
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(workdir, tmp_path / "run", ignore=shutil.ignore_patterns("evaluations"))
    (tmp_path / "scans").mkdir()
    shutil.copy(paths[0], tmp_path / "scans" / "0.png")
    shutil.copy(SMOKE, tmp_path / "site.py")
    argv = ["--workdir=~/run", "--images=~/scans", "--output=~/out.csv"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    with open(tmp_path / "out.csv", newline="") as f:
        assert [r[0] for r in csv.reader(f)][1:] == [str(tmp_path / "scans" / "0.png")]
    assert evaluate.main(["evaluate", "--workdir=~/run", "--config", "~/site.py"]) == 0, (
        capsys.readouterr().err
    )
    assert (tmp_path / "run" / "evaluations" / "site-test.json").is_file()


def test_module_entry_point_reports_errors_plainly(smoke_run, images):
    _, workdir, _ = smoke_run
    _, paths, _ = images
    cmd = [sys.executable, "-m", "weckd_jax.predict", "--workdir", workdir, "--images", paths[0]]
    out = subprocess.run(cmd + ["--link", "9"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "error: --link 9 does not exist: the run in" in out.stderr
    assert "Traceback" not in out.stderr
    usage = subprocess.run(cmd[:3], capture_output=True, text=True, cwd=REPO)  # no --workdir
    assert usage.returncode == 2 and "required" in usage.stderr


# ------------------------------------------------------------------------------------- evaluate


def _approx_metrics(actual, expected):
    """Metric dicts equal, floats to 1e-9."""
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if isinstance(value, dict):
            _approx_metrics(actual[key], value)
        elif isinstance(value, float) or (
            isinstance(value, list) and any(isinstance(v, float) for v in value)
        ):
            assert actual[key] == pytest.approx(value, abs=1e-9), key
        else:
            assert actual[key] == value, key


def test_evaluate_cli_reproduces_the_run_test_metrics(smoke_run, capsys):
    _, workdir, results = smoke_run
    code = evaluate.main(["evaluate", "--workdir", workdir, "--config", SMOKE, "--split", "test"])
    out = capsys.readouterr()
    assert code == 0, out.err
    path = os.path.join(workdir, "evaluations", "smoke-test.json")
    with open(path) as f:
        evaluation = json.load(f)
    assert evaluation["split"] == "test" and evaluation["name"] == "smoke"
    assert evaluation["data"]["n"] == results["data"]["n_test"]
    assert evaluation["data"]["class_counts"] == results["data"]["class_counts"]["test"]
    assert evaluation["data"]["same_data_as_run"] is True
    assert [r["link"] for r in evaluation["links"]] == [r["link"] for r in results["links"]]
    for mine, theirs in zip(evaluation["links"], results["links"], strict=True):
        _approx_metrics(mine["metrics"], theirs["test"])
    assert set(evaluation["baselines"]) == set(results["baselines"])
    for name, record in results["baselines"].items():
        _approx_metrics(evaluation["baselines"][name]["metrics"], record["test"])
    # The table: one row per model with the accuracy on this data and the run's test accuracy.
    acc = results["links"][-1]["test"]["accuracy"]
    assert any(line.startswith("link 2") and f"{acc:.3f}" in line for line in out.out.splitlines())
    assert "synthetic" in out.out and f"wrote {path}" in out.out


def test_evaluate_covers_the_same_fraction_baseline(same_fraction_run):
    config, workdir, results = same_fraction_run
    evaluation = evaluate.evaluate_workdir(workdir, config, split="test", name="run")
    assert list(evaluation["baselines"]) == list(results["baselines"])
    _approx_metrics(
        evaluation["baselines"]["same_fraction"]["metrics"],
        results["baselines"]["same_fraction"]["test"],
    )


def test_evaluate_val_and_all_splits(smoke_run):
    config, workdir, results = smoke_run
    val = evaluate.evaluate_workdir(workdir, config, split="val", name="same")
    # The validation metrics of the chosen epoch, recomputed from the weights on disk.
    for mine, theirs in zip(val["links"], results["links"], strict=True):
        _approx_metrics(mine["metrics"], theirs["val"])
    assert any("optimistic" in note for note in val["notes"])
    everything = evaluate.evaluate_workdir(workdir, config, split="all", name="same")
    assert everything["data"]["n"] == results["data"]["n_images"]
    assert everything["data"]["split_by"] is None
    assert any("trained on" in note for note in everything["notes"])
    assert os.path.isfile(os.path.join(workdir, "evaluations", "same-all.json"))


def test_evaluate_refuses_other_classes_and_unknown_flags(smoke_run, capsys):
    _, workdir, _ = smoke_run
    base = ["evaluate", "--workdir", workdir, "--config", SMOKE]
    # Its own --name: an existing smoke-test.json of another config is refused before the data
    # is read, so before its classes are.
    assert evaluate.main(base + ["--config.data.modality=microscopy", "--name=microscopy"]) == 2
    err = capsys.readouterr().err
    assert "classes the models were not trained on" in err and "Trained classes: normal" in err
    assert evaluate.main(base + ["--split", "holdout"]) == 2
    assert "--split" in capsys.readouterr().err
    assert evaluate.main(base + ["--config.data.nope=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert evaluate.main(["evaluate", "--workdir", workdir]) == 2
    assert "required" in capsys.readouterr().err


def test_label_map_by_name():
    trained = ["a", "b", "c"]
    np.testing.assert_array_equal(evaluate._label_map(trained, ("c", "a"), "x"), [2, 0])
    # A class folder named on macOS (NFD) is the class trained from a folder named elsewhere.
    accented = [unicodedata.normalize("NFC", "méningiome"), "normal"]
    new = (unicodedata.normalize("NFD", "méningiome"),)
    np.testing.assert_array_equal(evaluate._label_map(accented, new, "x"), [0])
    with pytest.raises(evaluate.EvaluateError, match="not trained on: d"):
        evaluate._label_map(trained, ("a", "d"), "x")
