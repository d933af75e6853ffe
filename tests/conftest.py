"""Shared fixtures: one smoke-config chain run per test session, reused by the chain tests."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


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
