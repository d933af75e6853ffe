"""Runs a WeCKD chain and its baselines: ``python -m weckd_jax.launch --config configs/X.py``.

Flags:
  --config       a config file exposing ``get_config()`` (default: the embedded default run);
                 any key can be overridden: ``--config.chain.length=4 --config.seed=1``.
  --workdir      where checkpoints, ``metrics.jsonl``, ``results.json`` go
                 (default: a new folder under ``runs/``).
"""

from __future__ import annotations

import datetime
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from weckd_jax import chain
from weckd_jax import config as config_lib
from weckd_jax.progress import Progress

_CONFIG = config_flags.DEFINE_config_file(
    "config", config_lib.__file__, "Config file with get_config().", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: a new one under runs/).")


def default_workdir(config_path: str) -> str:
    stem = os.path.splitext(os.path.basename(config_path))[0]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{stem}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(
        config_flags.get_config_filename(flags.FLAGS["config"])
    )
    progress = Progress()
    progress.print(f"workdir: {workdir}")
    chain.run(config, workdir, progress)


if __name__ == "__main__":
    sys.exit(app.run(main))
