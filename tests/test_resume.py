"""Kill a real run with SIGKILL at several moments, resume it, and get exactly the results of an
uninterrupted run; a changed config is refused; bad configs fail fast and plainly."""

import glob
import json
import os
import shutil
import signal

from tests.conftest import REPO, run_python, signal_when

SMOKE = os.path.join(REPO, "configs", "smoke.py")
OVERRIDES = ["--config.train.epochs=3"]


def _args(workdir, *extra):
    return ["-m", "weckd_jax.launch", "--config", SMOKE, *OVERRIDES, *extra, f"--workdir={workdir}"]


def _run(workdir, *extra):
    return run_python(*_args(workdir, *extra), timeout=900)


def _kill_when(workdir, condition, what):
    """Starts the run and SIGKILLs it as soon as ``condition()`` holds."""
    signal_when(_args(workdir), condition, signal.SIGKILL, what)


def _results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    del results["runtime"]
    return results


def _metric_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    for line in lines:
        del line["images_per_s"]
    return lines


def test_killed_run_resumes_to_identical_results(tmp_path):
    reference = tmp_path / "reference"
    out = _run(reference)
    assert out.returncode == 0, out.stderr[-3000:]

    work = tmp_path / "killed"
    ckpt = work / "checkpoints"

    def between_links():
        return (work / "jobs" / "link_1.json").exists()

    def mid_link_2():
        return len(glob.glob(str(ckpt / "link_2" / "train" / "[0-9]*"))) >= 2

    def during_save():
        return bool(glob.glob(str(ckpt / "union_supervised" / "train" / "*tmp*")))

    _kill_when(work, between_links, "the end of link 1")
    assert not (work / "results.json").exists()
    _kill_when(work, mid_link_2, "link 2's second checkpoint")
    assert not (work / "jobs" / "link_2.json").exists()
    _kill_when(work, during_save, "a checkpoint write of the union baseline")
    out = _run(work)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "link_1: finished earlier, results reloaded" in out.stdout

    assert _results(work) == _results(reference)
    assert _metric_lines(work) == _metric_lines(reference)


def test_rerun_of_a_finished_run_trains_nothing_and_changed_config_is_refused(tmp_path):
    work = tmp_path / "run"
    assert _run(work).returncode == 0
    before = _results(work)
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(str(work / "checkpoints" / "*" / "final"))}
    written = {name: (work / name).read_text() for name in ("results.json", "report.md")}
    # The README says in-training checkpoints of finished jobs may be deleted to save space.
    for train_dir in glob.glob(str(work / "checkpoints" / "*" / "train")):
        shutil.rmtree(train_dir)
    again = _run(work)
    assert again.returncode == 0
    assert again.stdout.count("finished earlier, results reloaded") == 4
    # Nothing ran: the record of the run that trained (its runtime too) is kept as it was.
    assert {name: (work / name).read_text() for name in written} == written
    assert mtimes == {p: os.path.getmtime(p) for p in mtimes}

    changed = _run(work, "--config.distill.alpha=0.3")
    assert changed.returncode == 2
    assert "distill.alpha: 0.5 -> 0.3" in changed.stderr
    assert "Traceback" not in changed.stderr
    assert _results(work) == before
