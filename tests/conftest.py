"""Shared fixtures: one smoke-config chain run per test session, reused by the chain tests."""

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

# One persistent compilation cache for the session, inherited by the subprocesses the tests start:
# every run of the same programs after the first loads them instead of compiling (results are
# unchanged; compiling dominates the suite's time on CPU). Removed when the session ends, unless
# the caller chose its own with JAX_COMPILATION_CACHE_DIR.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="weckd-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The XLA:CPU options the command-line tools set, for this process and its subprocesses.
from weckd_jax import ops  # noqa: E402

ops.configure_cpu_flags()

# Child processes get SIGINT as a command typed in a terminal has it. pytest started in the
# background (``cmd &``, nohup) inherits SIGINT ignored and would pass that on (Python then
# raises no KeyboardInterrupt, and the Ctrl-C tests fail); a handled signal is reset to the
# default in a child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_python(
    *args: str, timeout: int = 600, devices: int | None = None
) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh process run in the repository, its output captured as text;
    with ``devices``, the process sees that many simulated CPU devices."""
    env = None
    if devices is not None:
        env = dict(os.environ)
        flag = f" --xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + flag
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def signal_when(args, ready, sig, what: str, timeout: int = 900) -> tuple[int, str]:
    """Starts ``python *args`` in the repository and sends it ``sig`` as soon as ``ready()``
    holds; returns its exit status and stderr. Fails the test if it ends before (``what`` names
    the awaited moment)."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=timeout)
            return proc.returncode, stderr
        time.sleep(0.002)
    proc.kill()
    stderr = proc.communicate()[1]
    pytest.fail(f"the process ended before {what} (rc={proc.returncode}): {stderr[-2000:]}")


def smoke_config():
    from configs import smoke

    return smoke.get_config()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """``(config, workdir, results)`` of one smoke chain run."""
    from weckd_jax import chain
    from weckd_jax.progress import Progress

    config = smoke_config()
    workdir = str(tmp_path_factory.mktemp("smoke"))
    results = chain.run(config, workdir, Progress(enabled=False))
    return config, workdir, results


@pytest.fixture(scope="session")
def same_fraction_run(tmp_path_factory):
    """``(config, workdir, results)`` of the smoke run with the same-fraction baseline on."""
    from weckd_jax import chain
    from weckd_jax.progress import Progress

    config = smoke_config()
    config.baselines.same_fraction = True
    workdir = str(tmp_path_factory.mktemp("smoke_same_fraction"))
    results = chain.run(config, workdir, Progress(enabled=False))
    return config, workdir, results
