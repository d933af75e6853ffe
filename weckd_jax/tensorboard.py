"""TensorBoard logging of the per-epoch records a run writes to ``metrics.jsonl``.

``TensorBoardWriter(logdir).write(record)`` logs every numeric entry of a record as the scalar
``<run>/<key>`` at ``record["step"]`` (the job's optimizer step), e.g. ``link_2/loss``,
``link_2/temperature``, ``union_supervised/val_accuracy``. ``run``, ``step`` and ``epoch`` are
not logged as scalars; ``None``, booleans, strings and non-finite values are skipped. View with
``tensorboard --logdir DIR/tensorboard``.

Written with tensorboardX's event-file writer (no TensorFlow, no PyTorch needed), synchronously.
Call it on process 0 only, next to the ``metrics.jsonl`` writer.
"""

from __future__ import annotations

import glob
import itertools
import math
import numbers
import os
import time

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary

__all__ = ["EXCLUDED_KEYS", "TensorBoardWriter", "scalars"]

# Record keys that index a scalar rather than being one.
EXCLUDED_KEYS = frozenset({"run", "step", "epoch"})
EVENT_GLOB = "events.out.tfevents.*"
_SERIAL = itertools.count()  # event file names have 1 s resolution: keep two writers apart


def scalars(record: dict) -> dict[str, float]:
    """``{"<run>/<key>": value}`` for every loggable entry of a ``metrics.jsonl`` record."""
    run = record["run"]
    out = {}
    for key, value in record.items():
        if key in EXCLUDED_KEYS or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        value = float(value)
        if math.isfinite(value):
            out[f"{run}/{key}"] = value
    return out


class TensorBoardWriter:
    """Logs ``metrics.jsonl`` records as TensorBoard scalars ``<run>/<key>`` by step.

    Writes synchronously (one event per record, flushed at once: a record is on disk when
    `write` returns; no background thread or queue). The event file is opened by the first
    record, so a writer that logs nothing (a rerun that only reloads finished jobs) leaves no
    empty file. Usable as a context manager.
    """

    def __init__(self, logdir: str):
        self.logdir = logdir
        self._writer: EventsWriter | None = None

    def _events(self) -> EventsWriter:
        if self._writer is None:
            os.makedirs(self.logdir, exist_ok=True)
            suffix = f".{os.getpid()}.{next(_SERIAL)}"
            self._writer = EventsWriter(os.path.join(self.logdir, "events"), suffix)
        return self._writer

    def write(self, record: dict) -> None:
        """Logs one record: a dict with ``run`` and ``step``, other keys as in ``metrics.jsonl``."""
        values = [Summary.Value(tag=t, simple_value=v) for t, v in scalars(record).items()]
        if not values:
            return
        event = Event(
            wall_time=time.time(), step=int(record["step"]), summary=Summary(value=values)
        )
        self._events().write_event(event)
        self._writer.flush()

    def rewrite(self, records: list[dict]) -> None:
        """Replaces this logdir's event files with ``records`` (those of ``metrics.jsonl``).

        After a resumed job has dropped its ``metrics.jsonl`` lines past its last checkpoint, the
        old event files still hold those steps, and TensorBoard would draw them twice; this
        makes the logs equal to ``metrics.jsonl`` again.
        """
        self.close()
        for path in glob.glob(os.path.join(self.logdir, EVENT_GLOB)):
            os.remove(path)
        for record in records:
            self.write(record)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
