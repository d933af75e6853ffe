"""Runs a WeCKD chain and its baselines: ``python -m weckd_jax.launch --config configs/X.py``.

Flags:
  --config       a config file exposing ``get_config()`` (default: the embedded default run);
                 any key can be overridden: ``--config.chain.length=4 --config.seed=1``.
  --workdir      where checkpoints, ``metrics.jsonl``, ``results.json`` go
                 (default: a new folder under ``runs/``).
  --coordinator, --num_processes, --process_id
                 join a multi-process run explicitly (SLURM and Cloud TPU pods are detected).

A mistake in the config or the data stops the run before anything is compiled, with one message
naming the problem and the fix (every problem of the config at once), and exit code 2. Ctrl-C
stops it with one line and exit code 130; the finished links and the last in-training checkpoint
are kept, and rerunning the same command resumes.
"""

from __future__ import annotations

from weckd_jax import startup  # noqa: F401 - first: a Ctrl-C while JAX loads ends in one line

# isort: split
import datetime
import os

from absl import app, flags, logging
from ml_collections import config_flags

from weckd_jax import chain, checkpoints, cli, distributed, files, ops
from weckd_jax import config as config_lib
from weckd_jax.data import DataError
from weckd_jax.data.splits import SplitError
from weckd_jax.progress import Progress

_CONFIG = cli.define_config_file(config_lib.__file__)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: a new one under runs/).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "Join the processes of a multi-host job that JAX finds itself (a Cloud TPU VM pod slice, "
    "SLURM, Open MPI); SLURM and TPU pods on GKE are joined without it.",
)

USER_ERRORS = (
    config_lib.ConfigError,
    DataError,
    SplitError,
    chain.DivergenceError,
    checkpoints.CheckpointError,
    files.BusyError,
)


def default_workdir(config_path: str) -> str:
    """``runs/<local time of process 0>-<config name>``: the same folder on every process of a
    multi-process run (call it after `distributed.initialize`), whose clocks may disagree."""
    stamp = distributed.process_zero_text(datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return os.path.join("runs", f"{stamp}-{cli.config_name(config_path)}")


def main(argv: list[str]) -> None:
    ops.configure_cpu_flags()  # before JAX starts a backend
    cli.keep_interrupts()
    if len(argv) > 1:
        cli.fail(cli.unexpected_arguments(argv[1:]))
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    config = _CONFIG.value
    try:
        distributed.initialize(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            multihost=_MULTIHOST.value,
        )
        # Inside: with several processes, naming the default folder waits for process 0's clock.
        workdir = _WORKDIR.value or default_workdir(
            config_flags.get_config_filename(flags.FLAGS["config"])
        )
    except ValueError as e:
        cli.fail(str(e))
    except KeyboardInterrupt:
        cli.interrupted(
            "nothing was written; this process was still waiting for the run's other processes "
            "to join"
        )
    if problem := cli.workdir_problem(workdir):
        cli.fail(problem)
    try:
        config_lib.validate(config, workdir)
        progress = Progress(enabled=distributed.is_process_zero())
        progress.print(f"workdir: {workdir}")
        if config_lib.seed_list(config):
            chain.run_seeds(config, workdir, progress)
        else:
            chain.run(config, workdir, progress)
    except USER_ERRORS as e:
        cli.fail(str(e))
    except KeyboardInterrupt:
        cli.interrupted(
            f"the finished links and the last in-training checkpoint are kept in {workdir}; "
            "rerun the same command to resume"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
