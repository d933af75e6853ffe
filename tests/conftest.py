"""Shared fixtures: one smoke-config chain run per test session, reused by the chain tests."""

import os
import subprocess
import sys
import tempfile

import pytest

# One persistent compilation cache for the session, inherited by the subprocesses the tests start:
# every run of the same programs after the first loads them instead of compiling (results are
# unchanged; compiling dominates the suite's time on CPU).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="weckd-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The XLA:CPU options the command-line tools set, for this process and its subprocesses.
from weckd_jax import ops  # noqa: E402

ops.configure_cpu_flags()


def run_on_eight_devices(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh process, run in the repository, that sees 8 simulated CPU
    devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=900
    )


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
