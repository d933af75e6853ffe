"""Atomic writes: a file is either absent, or complete (write to a temporary name, then rename).

Files are created with the mode a plain ``open(path, "w")`` gives (0666 less the umask), so on a
shared machine results are as readable as the checkpoints next to them. `output_problem` is the
check the command-line tools make before writing a file the user named.
"""

from __future__ import annotations

import json
import os
import secrets


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically, replacing any file there."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)[:100]  # the temporary name stays within NAME_MAX
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}-{name}")
    # Not mkstemp: it creates 0600 whatever the umask. O_EXCL: never reuse someone else's file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, value) -> None:
    """Writes ``value`` as indented JSON (no NaN or Inf) to ``path`` atomically."""
    write_text(path, json.dumps(value, indent=2, allow_nan=False) + "\n")


def nearest_existing(path: str) -> str:
    """The absolute ``path``, or its nearest ancestor that exists (a broken link counts)."""
    folder = os.path.abspath(path)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    return folder


def output_problem(path: str, flag: str, *, overwrite: bool = False) -> str | None:
    """Why a tool should not write its output to ``path`` (given as ``flag``), or None.

    Refuses a folder, a file that exists (unless ``overwrite``) and a place that cannot be
    written. Missing folders are fine: `write_text` creates them.
    """
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        return f"{flag} {path} is a folder; name a file in it instead"
    if os.path.lexists(path) and not overwrite:
        return (
            f"{flag} {path} already exists; choose another path, or add --overwrite to replace it"
        )
    folder = nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag} {path} cannot be written: {folder} is not a writable folder; choose another"
    return None
