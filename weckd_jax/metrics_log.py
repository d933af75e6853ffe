"""The per-epoch log of a run: ``metrics.jsonl`` (always) and TensorBoard events beside it."""

from __future__ import annotations

import json
import os

from weckd_jax import files
from weckd_jax.tensorboard import TensorBoardWriter


class MetricsLog:
    """Appends one record per epoch per job to ``DIR/metrics.jsonl`` and ``DIR/tensorboard/``.

    Only the writing process (process 0) logs; on the others every method does nothing.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        logdir = os.path.join(workdir, "tensorboard")
        self._tensorboard = TensorBoardWriter(logdir) if enabled else None

    def write(self, record: dict) -> None:
        if self._tensorboard is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._tensorboard.write(record)
        self._tensorboard.flush()

    def drop_after(self, name: str, step: int) -> None:
        """Removes ``name``'s records past ``step``: a resumed job logged them before it was
        killed and rolled back to its checkpoint at ``step``, and will log them again."""
        if self._tensorboard is None or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        kept = [r for r in records if not (r["run"] == name and r["step"] > step)]
        files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._tensorboard.rewrite_from(self.path)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
