"""What the command-line tools share: plain user errors, and absl flag parsing that reports an
unknown ``--config.key`` override without a traceback. Defines no flags itself."""

from __future__ import annotations

import re
import sys

from absl import flags


def fail(message: str) -> None:
    """Prints a user error without a traceback and exits with status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing (for ``app.run(main, flags_parser=parse_flags)``), with ml_collections'
    errors for an override naming no key of the config turned into a plain message."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        key = str(e).strip("\"'")
        bad = [a for a in argv if a.startswith("--config.") and re.search(rf"\b{key}\b", a)]
        fail(
            f"unknown config key in {' '.join(bad) or key!r}: the config has no such key. "
            "All keys and their defaults are listed in weckd_jax/config.py."
        )
    except flags.Error as e:
        fail(f"{e}\nRun with --helpfull to list the flags.")
