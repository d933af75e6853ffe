"""What the command-line tools share: plain user errors, the ``--config`` flag and absl flag
parsing that report a bad config file or a ``--config.key`` override naming no key in one line,
the check of ``--workdir``, and the message for Ctrl-C."""

from __future__ import annotations

import _thread
import difflib
import os
import re
import sys
import tempfile
import threading

from absl import flags
from ml_collections import ConfigDict, config_flags

from weckd_jax import config as config_lib
from weckd_jax import distributed, files, startup
from weckd_jax.startup import INTERRUPTED


def fail(message: str) -> None:
    """Prints a user error without a traceback and exits with status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def keep_interrupts() -> None:
    """Makes sure a Ctrl-C reaches the command: Python drops an exception raised inside a
    garbage-collection callback (JAX registers one), so a KeyboardInterrupt that lands there would
    be lost and the run go on; it is delivered to the main thread again instead. Calling it
    again (e.g. `weckd_jax.predict.main` called in one process several times) changes nothing.
    Also ends `weckd_jax.startup`'s handling of a Ctrl-C while the command started."""
    startup.restore()
    default = sys.unraisablehook
    if getattr(default, "keeps_interrupts", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # From another thread: raised in the main thread once this hook has returned.
            threading.Timer(0.01, _thread.interrupt_main).start()
        else:
            default(unraisable)

    hook.keeps_interrupts = True
    sys.unraisablehook = hook


def interrupted(message: str) -> None:
    """Prints one line for a Ctrl-C (``message``: what is kept, how to resume), exits with 130.
    In a multi-process run only process 0 prints (every process gets the Ctrl-C); the others
    exit silently, with the same status.

    Called once the interrupt has unwound the command (checkpoints being written are finished,
    logs flushed), it ends the process at once, without the interpreter's teardown: a Ctrl-C
    that lands in an XLA compilation leaves the compiler running in its own thread, and tearing
    the runtime down under it waits for the compilation to end and then crashes (SIGSEGV or
    SIGABRT instead of 130)."""
    if distributed.is_process_zero():
        if sys.stdout.isatty():
            print(file=sys.stdout, flush=True)  # ends a progress line being rewritten in place
        print(f"interrupted: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    distributed.leave()  # process 0 last: the others need its coordination service to the end
    os._exit(INTERRUPTED)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _args(argv: list[str]) -> list[str]:
    """The arguments absl reads as flags: all after the program name, up to ``--``."""
    args = argv[1:]
    return args[: args.index("--")] if "--" in args else args


def _flag_values(argv: list[str], name: str) -> list[tuple[int, str, str]]:
    """``(index in argv, text before the value, value)`` of every value given to the flag
    ``name`` in ``argv``: ``--NAME VALUE`` (index of VALUE, no text before) or ``--NAME=VALUE``
    (one dash as well), as absl reads them."""
    found, args = [], _args(argv)
    for i, arg in enumerate(args, start=1):
        for flag in (f"--{name}", f"-{name}"):
            if arg == flag and i < len(args):
                found.append((i + 1, "", argv[i + 1]))
            elif arg.startswith(flag + "="):
                found.append((i, flag + "=", arg[len(flag) + 1 :]))
    return found


PATH_FLAGS = ("config", "workdir", "json")  # the path flags of launch, tune and bench


def expand_home(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` with a leading ``~`` of the values of the path flags ``names`` expanded
    (`os.path.expanduser`, as ``data.root`` is): a shell expands ``~`` only at the start of a
    word, so ``--workdir=~/runs/x`` arrives as typed."""
    argv = list(argv)
    for name in names:
        for i, before, value in _flag_values(argv, name):
            argv[i] = before + os.path.expanduser(value)
    return argv


def config_path(argv: list[str], name: str = "config") -> str | None:
    """The value of ``--config FILE`` / ``--config=FILE`` in ``argv``, or None; a second
    ``--config`` is a `ConfigError` (overrides would apply to both files)."""
    paths = [value for _, _, value in _flag_values(argv, name)]
    if len(paths) > 1:
        raise config_lib.ConfigError(
            f"--{name} is given {len(paths)} times ({', '.join(paths)}); give it once"
        )
    return paths[0] if paths else None


def config_name(path: str) -> str:
    """The name of the config file ``--config PATH`` gives, without its folder, ``.py`` and a
    ``:ARG`` (``configs/from_run.py:runs/x/`` -> ``from_run``): what names a run's default folder
    and an evaluation's output."""
    return os.path.splitext(os.path.basename(path.split(":", 1)[0]))[0]


def load_config_arg(argv: list[str], name: str = "config"):
    """The config file ``--config`` names in ``argv``, loaded and checked as
    `weckd_jax.config.load_file` does (`ConfigError` on any problem); None without the flag."""
    path = config_path(argv, name)
    return None if path is None else config_lib.load_file(path)


def _overrides(argv: list[str], name: str = "config") -> list[tuple[str, str]]:
    """``(argument, KEY)`` of every ``--config.KEY[=VALUE]`` and ``--noconfig.KEY`` of ``argv``."""
    found = []
    for arg in (a for a in _args(argv) if a.startswith("-")):
        flag = arg.split("=", 1)[0].lstrip("-")
        for prefix in (f"{name}.", f"no{name}."):
            if flag.startswith(prefix):
                found.append((arg, flag[len(prefix) :]))
    return found


def override_problem(config, argv: list[str], name: str = "config") -> str | None:
    """What is wrong with the first ``--config.KEY[=VALUE]`` (or ``--noconfig.KEY``) of ``argv``
    whose KEY is no value of ``config``, naming the override, the bad key and a close match."""
    for arg, key in _overrides(argv, name):
        node, done = config, []
        for part in key.split("."):
            if "[" in part:  # an index into a sequence: left to ml_collections
                break
            if not hasattr(node, "keys"):
                return (
                    f"unknown config key in {arg}: {'.'.join(done)} holds a value ({node!r}), not "
                    f"a section, so it has no key {part!r}; override it as "
                    f"--{name}.{'.'.join(done)}=VALUE"
                )
            if part not in node:
                close = difflib.get_close_matches(part, [str(k) for k in node], n=1)
                where = f"the section {'.'.join(done)!r}" if done else "the config"
                hint = f"; did you mean {'.'.join([*done, close[0]])!r}?" if close else "."
                return (
                    f"unknown config key in {arg}: {where} has no key {part!r}{hint} All keys and "
                    "their defaults are listed in weckd_jax/config.py."
                )
            node = node[part]
            done.append(part)
    return None


def define_config_file(default: str):
    """``--config FILE`` (a config file with ``get_config()``; ``default`` without the flag), for
    `parse_flags` to read. Without ``--config`` on the command line, ml_collections loads the
    default and applies the ``--config.KEY`` overrides while the flag is defined, so they are
    checked here first."""
    try:
        given = config_path(sys.argv)
        if given is None and _overrides(sys.argv):
            problem = override_problem(config_lib.load_file(default), sys.argv)
            if problem:
                fail(problem)
    except config_lib.ConfigError as e:
        fail(str(e))
    return config_flags.DEFINE_config_file(
        "config",
        default,
        "Config file with get_config(); override keys as --config.KEY=VALUE.",
        lock_config=True,
    )


def _list_own_flags_in_help() -> None:
    """Makes ``--help`` list every flag a weckd_jax module defined: absl lists only the flags of
    the module run as the program, which leaves out ``--config`` (defined here) and the flags
    `weckd_jax.tune` defines when its ``__main__`` calls it."""
    for module, defined in flags.FLAGS.flags_by_module_dict().items():
        if module.startswith("weckd_jax."):
            for flag in defined:
                flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def parse_config_flags(values: flags.FlagValues, argv: list[str]) -> list[str]:
    """``values(argv)``: absl parses the flags, and ml_collections runs the ``--config`` file once
    and applies the ``--config.KEY`` overrides; the config is then checked as
    `weckd_jax.config.load_file` checks it. If parsing fails, the config file and the overrides
    are checked on their own first (the file then runs again), so that a broken file or an
    override naming no key is reported in one line rather than as the error absl or
    ml_collections raised; any other failure is raised as it came.

    Returns:
      The arguments left after the flags (``argv[0]`` first).

    Raises:
      ConfigError: the config file or an override, naming the problem and the fix; ``--config``
        given twice, before either file runs.
    """
    path = config_path(argv)  # Before absl parses: a second --config would run both files.
    try:
        rest = values(argv)
    except Exception:
        _raise_config_problem(values, argv)
        raise
    if path is not None:
        config = values["config"].value
        if not isinstance(config, ConfigDict):
            # ml_collections keeps a config file's error in the value, until it is read.
            _raise_config_problem(values, argv)
        config_lib.check_loaded(config, path.split(":", 1)[0])
    return rest


def _raise_config_problem(values: flags.FlagValues, argv: list[str]) -> None:
    """Raises `ConfigError` for the ``--config`` file of ``argv`` (run anew by
    `weckd_jax.config.load_file`) or its first override naming no key; returns if both are fine
    or ``values`` has no ``config`` flag."""
    if "config" not in values:
        return
    config = load_config_arg(argv)
    if config is None:  # the flag's default, loaded when it was defined
        config = values["config"].value
    if isinstance(config, ConfigDict) and (problem := override_problem(config, argv)):
        raise config_lib.ConfigError(problem)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing (for ``app.run(main, flags_parser=parse_flags)``) by
    `parse_config_flags`, with a bad config file or an override naming no key of the config
    reported in one line; ``--help`` lists every flag of the tool and exits with 0; a leading
    ``~`` of a path flag is expanded."""
    _list_own_flags_in_help()
    argv = expand_home(argv, PATH_FLAGS)
    try:
        return parse_config_flags(flags.FLAGS, argv)
    except config_lib.ConfigError as e:
        fail(str(e))
    except SystemExit as e:
        # absl's --help, --helpfull and --helpxml print what was asked for and exit with status
        # 1; asking for help is no error (evaluate and predict, on argparse, exit with 0).
        if e.code == 1 and _asks_for_help(argv):
            sys.exit(0)
        raise
    except (AttributeError, KeyError) as e:  # what the checks above did not foresee
        fail(f"unknown config key in a --config.KEY override: {_one_line(e)}")
    except flags.Error as e:
        fail(flag_error(e))


_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def _asks_for_help(argv: list[str]) -> bool:
    """Whether ``argv`` holds one of absl's help flags (``--help``, ``-?``, ``--helpfull``, ...)."""
    names = (arg.lstrip("-").split("=")[0] for arg in _args(argv) if arg.startswith("-"))
    return any(name in _HELP_FLAGS for name in names)


def flag_error(error: flags.Error) -> str:
    """One line for a command-line flag absl refuses; a config key given as a flag of its own
    (``--seed=1``, ``--chain.length=4``) is named with the ``--config.KEY`` override to use."""
    name = getattr(error, "flagname", None)
    if isinstance(error, flags.UnrecognizedFlagError) and (key := config_lib.matching_key(name)):
        override = f"--config.{key}=VALUE"
        return f"{_one_line(error)}; did you mean {override}? (config keys are set with --config)"
    return f"{_one_line(error)} (run with --helpfull to list the flags)"


def unexpected_arguments(args: list[str]) -> str:
    """The message for arguments that are no flag (no tool takes any); a config file given
    without ``--config`` is named with the flag."""
    config_files = [arg for arg in args if arg.endswith(".py") and os.path.isfile(arg)]
    fix = f"; give a config file with --config: --config {config_files[0]}" if config_files else ""
    return f"unexpected arguments: {' '.join(args)}{fix}"


def workdir_problem(path: str) -> str | None:
    """Why ``path`` cannot be a run's folder (a URL; a file; a place where no folder can be
    made), or None. Leaves nothing behind: a folder made to test the place is removed at once."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path):
        # Read as a local path, gs://bucket/x is the folder gs:/bucket/x under the current one.
        return (
            f"--workdir {path} is a URL; runs are written to a filesystem: mount the bucket "
            "(e.g. gcsfuse, or a shared filesystem every host sees) and give the mounted folder"
        )
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"--workdir {path} is a file or a broken link, not a folder; choose another"
    folder = files.nearest_existing(path)
    if not os.path.isdir(folder):
        return f"--workdir {path} cannot be made: {folder} is not a folder; choose another"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".weckd-probe-", dir=folder))
    except OSError as e:
        where = "is not writable" if folder == os.path.abspath(path) else "cannot be made"
        return (
            f"--workdir {path} {where}: no folder can be created in {folder} ({e.strerror}); "
            "choose another --workdir"
        )
    return None
