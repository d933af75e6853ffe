"""Data parallelism: 8 simulated devices and 2 real processes give what 1 device gives."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

from tests.conftest import REPO, run_python, signal_when
from weckd_jax import chain, checkpoints, distributed, parallel

SMOKE = os.path.join(REPO, "configs", "smoke.py")


STEPS_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import Mesh
    from weckd_jax import parallel, train
    from weckd_jax.data.synthetic import generate

    assert jax.device_count() == 8, jax.devices()
    spec = train.ModelSpec("resnet10", num_classes=5, width=8, stem="small")
    cfg = train.StepConfig(use_attention=True)
    hp = dict(learning_rate=1e-2, weight_decay=1e-4, warmup_steps=0, total_steps=3, alpha=0.5,
              beta=1.0, t_max=4.0, t_min=2.0)
    data = generate("otoscopy", num_images=48, image_size=32, seed=0)
    teacher = train.init_state(spec, cfg, jax.random.key(9), (32, 32, 3), hp).variables
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
        mesh = Mesh(np.asarray(devices), ("data",))
        state = parallel.replicate(
            train.init_state(spec, cfg, jax.random.key(0), (32, 32, 3), hp), mesh)
        step = train.make_train_step(spec, (spec,), cfg, mesh)
        losses = []
        for s in range(3):
            rows = slice(16 * s, 16 * s + 16)
            batch = parallel.global_batch({
                "image": data.images[rows], "label": data.labels[rows],
                "label_mask": np.ones(16, np.float32)}, mesh)
            state, m = step(state, parallel.replicate((teacher,), mesh), batch, jax.random.key(1))
            losses.append(float(m["loss"]))
        leaves = jax.tree.leaves(jax.device_get(state.variables))
        out[name] = (losses, leaves)
    np.testing.assert_allclose(out["one"][0], out["eight"][0], rtol=1e-5)
    for a, b in zip(out["one"][1], out["eight"][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    print("MATCH", out["one"][0])
    """
)


def test_eight_devices_match_one_device_step_by_step(tmp_path):
    out = run_python("-c", STEPS_SCRIPT, timeout=900, devices=8)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MATCH" in out.stdout


def _accuracies(results):
    rows = results["links"] + list(results["baselines"].values())
    return [(r["name"], r["test"]["accuracy"], r["val"]["accuracy"]) for r in rows]


def test_smoke_chain_on_eight_devices_matches_and_restores_on_one(smoke_run, tmp_path):
    _, _, single = smoke_run
    workdir = tmp_path / "eight"
    out = run_python(
        "-m", "weckd_jax.launch", "--config", SMOKE, f"--workdir={workdir}", timeout=900, devices=8
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["devices"] == 8
    assert _accuracies(results) == _accuracies(single)
    # A checkpoint written by 8 devices restores on this 1-device process, bit for bit.
    link1 = results["links"][0]
    _, restored = chain.restore_finished(str(workdir), "link_1", parallel.data_mesh(), (32, 32, 3))
    assert checkpoints.fingerprint(restored) == link1["fingerprint"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outputs(procs: list[subprocess.Popen], timeout: int = 240) -> list[tuple[str, str]]:
    """``(stdout, stderr)`` of each process once it has ended; all are killed on the way out, so
    a failed or timed-out wait leaves none running."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()


def _launch_two_processes(workdir):
    """Processes 0 and 1 of one launch of the smoke config, coordinated on localhost."""
    port = _free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weckd_jax.launch",
                "--config",
                SMOKE,
                f"--workdir={workdir}",
                f"--coordinator=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def test_two_processes_on_localhost_match_one_process(smoke_run, tmp_path):
    _, _, single = smoke_run
    workdir = tmp_path / "two"
    procs = _launch_two_processes(workdir)
    outs = _outputs(procs, timeout=900)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # Only process 0 reports (process 1's stdout holds at most the collectives' own banner).
    assert "test acc" in outs[0][0] and "test acc" not in outs[1][0] and "epoch" not in outs[1][0]
    results = json.loads((workdir / "results.json").read_text())
    assert results["processes"] == 2 and results["devices"] == 2
    assert _accuracies(results) == _accuracies(single)
    with open(workdir / "metrics.jsonl") as f:
        two = [json.loads(line) for line in f]
    one_losses = [r["loss"] for r in _metrics(smoke_run[1])]
    np.testing.assert_allclose([r["loss"] for r in two], one_losses, rtol=1e-4)


def test_a_busy_workdir_stops_every_process_of_a_multi_process_run(tmp_path):
    # Process 0 holds the lock; the other processes must stop too instead of waiting alone at
    # their first collective.
    from weckd_jax import files

    workdir = tmp_path / "busy"
    with files.exclusive_folder(str(workdir)):  # another run works there
        procs = _launch_two_processes(workdir)
        outs = _outputs(procs)
        assert os.listdir(workdir) == []
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 2, err[-3000:]
        assert "is in use by another" in err and "Traceback" not in err


def _two_processes(script: str) -> list[subprocess.Popen]:
    """Processes 0 and 1 of ``python -c script PORT I``, coordinated on a free localhost port."""
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-c", script, str(port), str(i)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


DEFAULT_WORKDIR_SCRIPT = textwrap.dedent(
    """
    import datetime, sys
    from weckd_jax import distributed, launch

    port, i = sys.argv[1], int(sys.argv[2])

    class Clock(datetime.datetime):  # process 1's clock is one second ahead, past midnight
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 1, 1, 23, 59, 59) + datetime.timedelta(seconds=i)

    launch.datetime.datetime = Clock
    assert distributed.initialize(f"127.0.0.1:{port}", 2, i)
    print("WORKDIR", launch.default_workdir("configs/smoke.py"))
    """
)


def test_processes_whose_clocks_differ_agree_on_the_default_workdir():
    procs = _two_processes(DEFAULT_WORKDIR_SCRIPT)
    outs = _outputs(procs)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    named = [re.findall(r"^WORKDIR (.*)$", out, re.M) for out, _ in outs]
    assert named == [[os.path.join("runs", "20260101-235959-smoke")]] * 2


def test_ctrl_c_on_a_multi_process_run_is_reported_by_process_0_alone(tmp_path):
    # Every process of the run gets the Ctrl-C (as from a terminal or srun) and exits with 130;
    # one line says what is kept, not one line per process.
    workdir = tmp_path / "w"
    procs = _launch_two_processes(workdir)
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "config.json").exists():  # both processes have joined the run
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.01)
        for p in procs:
            p.send_signal(signal.SIGINT)
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [130, 130], errs
    assert errs[0] == (
        f"interrupted: the finished links and the last in-training checkpoint are kept in "
        f"{workdir}; rerun the same command to resume\n"
    )
    assert errs[1] == ""


EXIT_ORDER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import jax
    from weckd_jax import cli, distributed

    port, i = sys.argv[1], int(sys.argv[2])
    assert distributed.initialize(f"127.0.0.1:{port}", 2, i)
    assert len(jax.devices()) == 2  # the backends join, as a run's do before any Ctrl-C
    if i == 1:
        time.sleep(3)  # still unwinding its Ctrl-C when process 0 is done with its own
    cli.interrupted("kept")
    """
)


def test_after_ctrl_c_process_0_exits_after_the_others():
    # Process 0 hosts JAX's coordination service: a process still running when it is gone may
    # be terminated with a fatal "leader task died" error on its stderr instead of exiting
    # silently with 130.
    procs = _two_processes(EXIT_ORDER_SCRIPT)
    try:
        exited, deadline = [], time.monotonic() + 240
        while len(exited) < 2 and time.monotonic() < deadline:
            exited += [i for i in (1, 0) if i not in exited and procs[i].poll() is not None]
            time.sleep(0.01)
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert exited == [1, 0], errs
    assert [p.returncode for p in procs] == [130, 130], errs
    assert errs == ["interrupted: kept\n", ""]


UNANSWERED_LEAVE_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import jax
    from weckd_jax import cli, distributed

    port, i = sys.argv[1], int(sys.argv[2])
    assert distributed.initialize(f"127.0.0.1:{port}", 2, i)
    assert len(jax.devices()) == 2
    client = distributed._jax_state().client
    if i == 0:
        client.key_value_set("pid", str(os.getpid()))
        time.sleep(600)
    pid = int(client.blocking_key_value_get("pid", 60_000))
    os.kill(pid, signal.SIGSTOP)  # process 0 no longer answers, as on a lost or frozen host
    while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.01)
    print("LEAVING", time.monotonic(), flush=True)
    cli.interrupted("kept")
    """
)


def test_after_ctrl_c_a_process_leaves_promptly_when_process_0_no_longer_answers():
    # Telling process 0 "leaving" blocked until JAX's heartbeat timeout (100 s), which then
    # aborted the process with a fatal error instead of the exit status 130.
    procs = _two_processes(UNANSWERED_LEAVE_SCRIPT)
    try:
        out, err = procs[1].communicate(timeout=90)
        ended = time.monotonic()
    finally:
        for p in procs:
            p.kill()  # process 0, stopped
    assert procs[1].returncode == 130, err[-3000:]
    assert err == ""
    (leaving,) = re.findall(r"^LEAVING (\S+)$", out, re.M)
    assert ended - float(leaving) < distributed._TELLING_S + 5  # not JAX's 100 s


def _launch_alone(workdir, port: int, process_id: int) -> list[str]:
    """The arguments of process ``process_id`` of a 2-process launch of the smoke config that
    joins the coordinator on localhost ``port``."""
    return [
        "-m", "weckd_jax.launch", "--config", SMOKE, f"--workdir={workdir}",
        f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={process_id}",
    ]  # fmt: skip


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_ctrl_c_while_process_0_waits_for_the_others_exits_with_one_line(tmp_path):
    # Only process 0 of 2 started: JAX waits for process 1 in one call during which Python runs
    # no signal handler, so a Ctrl-C did nothing for 5 minutes, then JAX aborted with a fatal
    # error and stack traces (status 134).
    workdir, port = tmp_path / "w", _free_port()
    returncode, err = signal_when(
        _launch_alone(workdir, port, 0),
        lambda: _accepts(port),  # its coordination service is up: it waits for process 1
        signal.SIGINT,
        "process 0 waited for process 1",
    )
    assert returncode == 130, err[-3000:]
    assert err == (
        "interrupted: nothing was written; this process was still waiting for the run's other "
        "processes to join\n"
    )
    assert not workdir.exists()


def test_ctrl_c_while_another_process_waits_for_process_0_exits_silently(tmp_path):
    # As every process of a run gets the Ctrl-C, only process 0 says so.
    workdir = tmp_path / "w"
    with socket.socket() as coordinator:  # stands in for process 0, which never answers
        coordinator.bind(("127.0.0.1", 0))
        coordinator.listen()
        coordinator.settimeout(240)
        port = coordinator.getsockname()[1]
        accepted = []

        def joining() -> bool:  # process 1 has connected: it waits for process 0 to answer
            accepted.append(coordinator.accept()[0])
            return True

        returncode, err = signal_when(
            _launch_alone(workdir, port, 1), joining, signal.SIGINT, "process 1 connected"
        )
        for connection in accepted:
            connection.close()
    assert (returncode, err) == (130, "")
    assert not workdir.exists()


SLURM_SCRIPT = textwrap.dedent(
    """
    import jax
    from weckd_jax import distributed

    assert distributed.initialize()  # SLURM detected, no flags given
    print("VISIBLE", jax.process_index(), jax.config.values["jax_cuda_visible_devices"])
    """
)


def test_slurm_script_starts_one_process_per_gpu():
    # jax.distributed.initialize gives each process of a SLURM job one GPU, number SLURM_LOCALID
    # of its node (checked on two simulated tasks of one node): one task per node would train on
    # its first GPU alone.
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SLURM_SCRIPT],
            cwd=REPO,
            env=dict(
                os.environ,
                SLURM_JOB_ID="1",
                SLURM_STEP_NODELIST="localhost",
                SLURM_NTASKS="2",
                SLURM_PROCID=str(i),
                SLURM_LOCALID=str(i),
                JAX_COORDINATOR_PORT=str(port),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = _outputs(procs)
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err[-3000:]
        assert f"VISIBLE {i} {i}" in out
    with open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")) as f:
        directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", f.read(), re.MULTILINE))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_multihost_leaves_finding_the_processes_to_jax(monkeypatch):
    # A Cloud TPU VM pod slice sets no environment variable naming its workers: only JAX's query
    # of the metadata server finds them, so launch/tpu_pod.sh asks for it with --multihost.
    from weckd_jax import distributed

    calls = []
    monkeypatch.setattr(distributed.jax.config, "update", lambda *args: None)
    monkeypatch.setattr(
        distributed.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs)
    )
    for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.initialize() and calls == []  # one process: nothing to join
    assert distributed.initialize(multihost=True)
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None)]


def test_multihost_where_jax_finds_no_job_is_named_with_the_fix(tmp_path):
    workdir = tmp_path / "run"
    out = run_python(
        "-m", "weckd_jax.launch", "--config", "configs/smoke.py", "--workdir", str(workdir),
        "--multihost",
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith(
        "error: --multihost: JAX found no multi-host job here (coordinator_address should be "
        "defined). Run it on every worker of a Cloud TPU VM pod slice (launch/tpu_pod.sh)"
    )
    assert out.stderr.count("\n") == 1 and "leave --multihost out" in out.stderr
    assert not workdir.exists()


def test_tpu_pod_script_runs_launch_multihost_with_its_arguments_as_given(tmp_path):
    # A stand-in gcloud keeps the command the workers' shell would run.
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(
        '#!/usr/bin/env bash\nfor a in "$@"; do last="$a"; done\necho "$last" > "$OUT"\n'
    )
    gcloud.chmod(0o755)
    out = tmp_path / "remote.sh"
    args = ["configs/my cfg.py", "/mnt/runs/it's", "--config.data.root=/mnt/a b"]
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", TPU="t", ZONE="z", OUT=str(out))
    subprocess.run(["bash", "launch/tpu_pod.sh", *args], cwd=REPO, env=env, check=True)
    launch = out.read_text().split("python -m weckd_jax.launch", 1)[1].splitlines()[0]
    split = subprocess.run(
        ["bash", "-c", f'for a in {launch}; do echo "$a"; done'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert split.stdout.splitlines() == [
        "--multihost",
        "--config",
        *args[:1],
        "--workdir",
        *args[1:],
    ]
