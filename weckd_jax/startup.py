"""A Ctrl-C while a command starts ends it with one line and exit status 130.

Each command's module (``python -m weckd_jax.launch``, ``tune``, ``evaluate``, ``predict``,
``bench``) imports this module first, before JAX loads (a second or two). A Ctrl-C in those
seconds would otherwise print a traceback, or be lost inside a garbage-collection callback that
JAX registers, and the command carry on. `weckd_jax.cli.keep_interrupts`, called first in each
command's ``main``, gives Ctrl-C back to Python's own handler (a ``KeyboardInterrupt``, which the
commands catch). Only a weckd_jax module run as the program installs the handler: importing one
elsewhere (tests, other programs) changes nothing. Standard library only, so that it is quick.
"""

import os
import signal
import sys

INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), as shells report it


def _leave(signum, frame) -> None:
    # Nothing has started yet: no checkpoint or result to finish, so the process may end here.
    sys.stderr.write("interrupted: nothing was written\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED)


def restore() -> None:
    """Gives Ctrl-C back to Python's ``KeyboardInterrupt`` if this module took it."""
    if signal.getsignal(signal.SIGINT) is _leave:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
if (
    getattr(_main_spec, "name", "").startswith("weckd_jax.")
    # Left alone where Ctrl-C is ignored (a job started in the background) or already handled.
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
):
    signal.signal(signal.SIGINT, _leave)
