"""Atomic writes: a file is either absent, or complete (write to a temporary name, then rename).

Files are created with the mode a plain ``open(path, "w")`` gives (0666 less the umask), so on a
shared machine results are as readable as the checkpoints next to them. `output_problem` is the
check the command-line tools make before writing a file the user named; `exclusive_folder` keeps
two processes from working in one run folder at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import sys
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_file(
    path: str, mode: str = "w", *, replace: bool = True, sync: bool = True
) -> Iterator[IO]:
    """A file opened (``mode`` ``"w"`` or ``"wb"``) under a temporary name next to ``path``, named
    ``path`` when the block ends without an exception (deleted otherwise), replacing any file
    there. The folders are created.

    With ``replace=False`` a file at ``path`` is never replaced, even one that appears while this
    writes: raises FileExistsError instead. ``sync`` flushes the data to the disk before the
    rename, so that a crash leaves the old file or the new one, never an empty one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)[:100]  # the temporary name stays within NAME_MAX
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}-{name}")
    # Not mkstemp: it creates 0600 whatever the umask. O_EXCL: never reuse someone else's file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if sync:
                os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str, *, replace: bool = True) -> None:
    """Writes ``text`` to ``path`` atomically (`atomic_file`), replacing any file there unless
    ``replace=False`` (then FileExistsError)."""
    with atomic_file(path, "w", replace=replace) as f:
        f.write(text)


def _link_new(tmp: str, path: str) -> None:
    """Gives the complete file ``tmp`` the name ``path`` unless something has that name."""
    try:
        os.link(tmp, path)  # atomic, and fails on an existing name
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "file exists", path) from None
        os.replace(tmp, path)


def write_text_beside(path: str, text: str) -> str:
    """Writes ``text`` to ``path``, or, when a file is there, to the first free name
    ``<stem>-1<suffix>``, ``<stem>-2<suffix>``, ...; never replaces a file. Returns the path
    written. For finished work whose chosen name was taken while it ran."""
    stem, suffix = os.path.splitext(path)
    candidate, n = path, 0
    while True:
        try:
            write_text(candidate, text, replace=False)
            return candidate
        except FileExistsError:
            if not os.path.lexists(candidate):  # not the name: e.g. the folder is now a file
                raise
            n += 1
            candidate = f"{stem}-{n}{suffix}"


def json_text(value) -> str:
    """``value`` as indented JSON (no NaN or Inf), ending in a newline."""
    return json.dumps(value, indent=2, allow_nan=False) + "\n"


def write_json(path: str, value, *, replace: bool = True) -> None:
    """Writes `json_text` of ``value`` to ``path`` atomically (see `write_text`)."""
    write_text(path, json_text(value), replace=replace)


def read_json(path: str):
    """The JSON value in ``path``, or None when it is missing or cannot be read as JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_json(
    path: str, error: type[Exception], fix: str, required: tuple[str, ...] = ()
) -> dict | None:
    """The JSON object in ``path``, a file weckd_jax wrote (a run's ``config.json``, a finished
    link's record, ...), or None when there is no file. Unlike `read_json`, a damaged file is an
    error, never taken for a missing one (which could have it overwritten).

    Raises:
      error: ``path`` cannot be read, holds no JSON (e.g. cut short by a full disk or an
        interrupted copy), a JSON value that is no object (e.g. edited by hand), or an object
        that lacks one of the top-level keys ``required`` (see `require_keys`); the one-line
        message names the file and the problem, then ``fix`` (which should keep the file).
    """
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        return None
    except OSError as e:
        problem = f"cannot be read ({e.strerror or e})"
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        problem = (
            f"cannot be read as JSON ({' '.join(str(e).split())}): it was cut short (e.g. by a "
            "full disk or an interrupted copy) or edited"
        )
    else:
        if isinstance(value, dict):
            return require_keys(value, path, required, error, fix)
        problem = (
            f"holds {_JSON_KINDS[type(value)]}, not the JSON object weckd_jax wrote: it was edited"
        )
    raise error(f"{path} {problem}; {fix}")


def require_keys(
    record: dict, path: str, required: tuple[str, ...], error: type[Exception], fix: str
) -> dict:
    """``record``, the JSON object read from ``path``, once it has every top-level key of
    ``required`` (which its reader reads unconditionally).

    Raises:
      error: a key is missing (the file was edited, or written by a version of weckd_jax that
        did not record it); the one-line message names the file and the keys, then ``fix``.
    """
    if missing := [key for key in required if key not in record]:
        raise error(
            f"{path} lacks {', '.join(repr(key) for key in missing)}, which weckd_jax reads from "
            f"it: it was edited, or written by another version of weckd_jax; {fix}"
        )
    return record


# What each value `json.load` gives besides a dict is, in JSON's words.
_JSON_KINDS = {
    list: "a JSON array",
    str: "a JSON string",
    int: "a JSON number",
    float: "a JSON number",
    bool: "JSON true or false",
    type(None): "JSON null",
}


def nearest_existing(path: str) -> str:
    """The absolute ``path``, or its nearest ancestor that exists (a broken link counts)."""
    folder = os.path.abspath(path)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    return folder


def output_problem(path: str, flag: str, *, overwrite: bool = False) -> str | None:
    """Why a tool should not write its output to ``path`` (given as ``flag``), or None.

    Refuses a folder, a name ending in a separator, a file that exists (unless ``overwrite``)
    and a place that cannot be written. Missing folders are fine: `write_text` creates them.
    """
    if os.path.isdir(path):
        return f"{flag} {path} is a folder; name a file in it instead"
    if path.endswith(("/", os.sep)):
        return (
            f"{flag} {path} ends in {path[-1]!r}, so it names a folder, not a file; give a file "
            f"name: drop the trailing {path[-1]!r}, or add a file name after it"
        )
    if os.path.lexists(path) and not overwrite:
        return (
            f"{flag} {path} already exists; choose another path, or add --overwrite to replace it"
        )
    folder = nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag} {path} cannot be written: {folder} is not a writable folder; choose another"
    return None


class OutputError(OSError):
    """A tool's output file cannot be written; the message names it and the fix."""


def write_output(path: str, text: str, flag: str, overwrite: bool) -> str:
    """Writes a tool's finished output to the file the user named with ``flag``; returns the
    path written. Replaces a file there only with ``overwrite``. Without it, a file that appeared
    at ``path`` while the tool ran is kept, and the output goes to `write_text_beside`'s free
    name, with a warning on stderr (the check before the work, `output_problem`, saw no file).
    Raises `OutputError` when the file cannot be written (e.g. the folder became unwritable)."""
    try:
        if overwrite:
            write_text(path, text)
            return path
        written = write_text_beside(path, text)
    except OSError as e:
        raise OutputError(
            f"{flag} {path} cannot be written ({e.strerror or e}); choose another path and run "
            "again"
        ) from e
    if written != path:
        print(
            f"warning: {flag} {path} appeared while this ran and was kept; wrote {written}",
            file=sys.stderr,
        )
    return written


class BusyError(OSError):
    """Another process works in a folder; the message names the folder and the fix."""


@contextlib.contextmanager
def exclusive_folder(path: str) -> Iterator[None]:
    """Holds an exclusive lock on the folder ``path`` for the block; raises `BusyError` at once
    when another process holds it (two runs in one folder would overwrite each other's
    checkpoints and results).

    The lock is the kernel's (``flock`` on the folder itself): it ends with the process, even a
    killed one, so nothing stale is left behind. A folder this makes is removed again when it is
    still empty at the end. Where the file system has no such locks (some network file systems)
    the block runs unlocked.
    """
    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(
                f"{path} is in use by another process running there now (a launch, or a "
                "search's final run): two runs in one folder would overwrite each other's "
                "checkpoints and results. Wait for it to end, or choose another --workdir",
            ) from None
        except OSError:
            pass  # no locks on this file system
        yield
    finally:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # only an empty folder can be removed
                os.rmdir(path)
