"""The folders ``launch`` and ``tune`` write, told apart by their names in one place.

``launch`` writes a run (``jobs/``, ``checkpoints/``, ...) or, with several seeds, one run per
seed in ``seed_<s>/``; ``tune`` writes a search (`STUDY_FILE`, ``trials/``, ...). Each tool
refuses the other's folder as its ``--workdir``, since their files would mix. Standard library
only: the tools check a folder before they load anything heavy, and ``predict`` names these
folders in its messages.
"""

from __future__ import annotations

import os
import re

STUDY_FILE = "study.db"  # a search's Optuna study (SQLite): the mark of a search's folder
_SEED_NAME = re.compile(r"seed_(\d+)")


def study_path(workdir: str) -> str:
    """The study file of the search in ``workdir`` (whether or not it exists)."""
    return os.path.join(workdir, STUDY_FILE)


def seed_dir(workdir: str, seed: int) -> str:
    """The folder of seed ``seed``'s run in the multi-seed experiment ``workdir``."""
    return os.path.join(workdir, f"seed_{seed}")


def seed_names(workdir: str) -> list[str]:
    """The names of the ``seed_<s>/`` run folders in ``workdir``, by seed (``seed_2`` before
    ``seed_10``); empty when there are none or ``workdir`` is no folder."""
    if not os.path.isdir(workdir):
        return []
    with os.scandir(workdir) as entries:
        found = [
            (int(match[1]), e.name)
            for e in entries
            if (match := _SEED_NAME.fullmatch(e.name)) and e.is_dir()
        ]
    return [name for _, name in sorted(found)]


def launch_run_sign(workdir: str) -> str | None:
    """What shows that ``workdir`` holds a run of ``launch``, in words (``"a run of launch (its
    jobs/ folder)"``), or None. The signs: ``jobs/`` (made as a run binds its folder to its
    config and data, before its first link trains), ``checkpoints/``, and a ``seed_<s>/``
    folder (a multi-seed experiment, from the moment its first seed starts: the experiment's own
    ``config.json`` comes only once that seed has finished)."""
    for name in ("jobs", "checkpoints"):
        if os.path.isdir(os.path.join(workdir, name)):
            return f"a run of launch (its {name}/ folder)"
    if seeds := seed_names(workdir):
        return f"a multi-seed run of launch (its {seeds[0]}/ folder, one run per seed)"
    return None
