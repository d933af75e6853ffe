"""Console progress for a run: one line per job updated in place, and a wall-time split."""

from __future__ import annotations

import collections
import contextlib
import sys
import time


class Timer:
    """Accumulates wall seconds per phase: ``with timer("train"): ...``. A phase entered inside
    another counts for itself alone: its seconds are taken out of the enclosing phase's."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._nested: list[float] = []  # per open phase, seconds spent in phases inside it

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[phase] += elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed

    def total(self, phase: str) -> float:
        """Seconds counted as ``phase`` so far (0.0 before it is first entered)."""
        return self.seconds.get(phase, 0.0)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in sorted(self.seconds.items())}


class Progress:
    """Prints ``name  epoch e/E  loss  val  T  images/s  ETA``; rewrites the line in place on a
    terminal, prints one line per update otherwise (logs, CI). Silent when ``enabled`` is False
    (every process but the first)."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.in_place = self.stream.isatty()
        self._name, self._epochs, self._start = "", 0, 0.0

    def print(self, text: str = "") -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def start(self, name: str, epochs: int) -> None:
        self._name, self._epochs, self._start = name, epochs, time.perf_counter()

    def update(self, record: dict, epoch: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._start
        eta = elapsed / epoch * (self._epochs - epoch)
        val = record.get("val_accuracy")
        temp = record.get("temperature")
        line = (
            f"{self._name:<18} epoch {epoch:>3}/{self._epochs}  loss {record['loss']:.3f}  "
            f"val {'  -  ' if val is None else f'{val:.3f}'}  "
            f"T {'  -  ' if temp is None else f'{temp:5.2f}'}  "
            f"{record['images_per_s']:7.0f} img/s  ETA {_clock(eta)}"
        )
        if self.in_place:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        else:
            print(line, file=self.stream, flush=True)

    def finish(self) -> None:
        if self.enabled and self.in_place:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
