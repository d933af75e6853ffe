"""The per-epoch log of a run: ``metrics.jsonl`` (always) and TensorBoard events beside it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from weckd_jax import files
from weckd_jax.tensorboard import TensorBoardWriter


class MetricsLog:
    """Appends one record per epoch per job to ``DIR/metrics.jsonl`` and ``DIR/tensorboard/``.

    Only the writing process (process 0) logs; on the others every method does nothing. A line
    that holds no record (damaged, or edited by hand) is kept as it is, and left out of
    TensorBoard; the piece of a record whose write was cut short, at the end, is dropped.
    ``say`` prints the warnings that say so.
    """

    def __init__(self, workdir: str, say: Callable[[str], None], enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._say = say
        logdir = os.path.join(workdir, "tensorboard")
        self._tensorboard = TensorBoardWriter(logdir) if enabled else None
        if enabled:
            self._end_last_line()

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
        with open(self.path, "rb") as f:
            lines = [(line, _record(line)) for line in f if line.strip()]
        kept = [(line, r) for line, r in lines if not (r and r["run"] == name and r["step"] > step)]
        with files.atomic_file(self.path, "wb") as f:
            f.write(b"".join(line for line, _ in kept))
        self._tensorboard.rewrite([r for _, r in kept if r is not None])
        if damaged := [str(n) for n, (_, r) in enumerate(kept, 1) if r is None]:
            self._say(
                f"warning: {self.path} holds no metrics record on line(s) {', '.join(damaged)} "
                "(damaged or edited): kept as they are, and left out of TensorBoard; restore "
                "them from a backup, or delete them, to silence this"
            )

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()

    def _end_last_line(self) -> None:
        """Ends ``metrics.jsonl`` with a newline, as every record does, when a write was cut
        short there (by a full disk, or in an interrupted copy of the run's folder): the next
        record would otherwise be appended to the piece it left. A line that is whole JSON (a
        record, or a line edited by hand) only gets its newline; one that is no JSON is the piece
        of a record (no piece of a JSON object is JSON) and is dropped, with a warning (its epoch
        is logged again only if the job resumes before that epoch)."""
        try:
            with open(self.path, "rb") as f:
                text = f.read()
        except FileNotFoundError:
            return
        if not text or text.endswith(b"\n"):
            return
        last = text[text.rfind(b"\n") + 1 :]
        if _is_json(last):
            with open(self.path, "ab") as f:
                f.write(b"\n")
            return
        with files.atomic_file(self.path, "wb") as f:
            f.write(text[: len(text) - len(last)])
        self._say(
            f"warning: the last line of {self.path} was the piece of a record whose write was cut "
            "short (a full disk, or an interrupted copy of the run's folder): dropped "
            f"({len(last)} bytes)"
        )


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _record(line: bytes) -> dict | None:
    """The record on one line of ``metrics.jsonl``, or None when it holds none: no JSON, or no
    JSON object with a ``run`` name and an integer ``step``."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    is_record = isinstance(record, dict) and isinstance(record.get("run"), str)
    return record if is_record and isinstance(record.get("step"), int) else None
