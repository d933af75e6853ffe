"""Hyper-parameter search on the validation split: ``python -m weckd_jax.tune``.

    python -m weckd_jax.tune --config CFG --workdir DIR --trials N [--config.key=value ...]

Optuna (TPE, seeded from ``config.seed``; MedianPruner) searches the space declared in
``config.tune.space`` (``"key:low:high[:log],..."``, any numeric config key). Each trial trains the
chain with the sampled values in ``DIR/trials/<number>/`` with the baselines off and
``use_test=False``: the test split is never evaluated during the search. The objective is the
validation accuracy (of the model kept for it: its best validation epoch) of the last link
(``tune.objective="last_link"``) or of link ``tune.link`` (``"link"``; the trial stops after that
link, with the chain's full config, so link k sees exactly the data it sees in the full chain).

The study lives in ``DIR/study.db`` (SQLite): rerunning the command continues it, ``N`` is the total
number of finished (complete or pruned) trials, and several processes may share it. At the end the
best trial's config is written as ``DIR/best_config.py`` (a config file ``launch`` accepts), and,
unless ``--evaluate_best=false``, trained once more in ``DIR/best/trial_<number>/`` and evaluated on
the test split, once: ``DIR/best_results.json``.

Pruning: after every validation epoch of link ``l`` (epoch ``e`` of ``E``), a trial reports its
validation accuracy at step ``(l - 1) * E + e``, so steps grow across the links of a trial and a
given step means the same link and epoch in every trial. MedianPruner stops a trial when the best
accuracy it has reported so far is below the median of what the completed trials reported at that
step (after ``tune.prune_after_trials`` completed trials and from step ``tune.prune_warmup_steps``).
A trial whose loss diverges (NaN/Inf) is recorded as pruned (user attribute ``diverged``).

Ctrl-C stops the search with one line and exit code 130: the interrupted trial is marked failed
(not counted), and rerunning the same command continues the search.
"""

from __future__ import annotations

from weckd_jax import startup  # noqa: F401 - first: a Ctrl-C while JAX loads ends in one line

# isort: split
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import pprint
import socket
import time
import warnings

# `chain` (orbax, grain, matplotlib) and `optuna` are imported where used: `config.validate`
# imports this module, and a mistake on the command line is reported before they load.
from weckd_jax import config as config_lib
from weckd_jax import files, ops, parallel, workdirs
from weckd_jax.progress import Progress

ConfigError = config_lib.ConfigError

OBJECTIVES = ("last_link", "link")
# Keys a search may not change: they move the validation or test split, the data, or the
# pruner's steps (every trial must be scored on the same images, at the same steps).
FORBIDDEN_PREFIXES = ("seed", "data.", "chain.length", "train.epochs", "train.eval_every", "tune.")

# Integer keys whose valid values are not an interval (they must divide over the devices).
BATCH_SIZE_KEYS = ("train.batch_size", "train.eval_batch_size")

HEARTBEAT_SECONDS = 60  # a running trial writes a heartbeat to the study this often
STALE_SECONDS = 600  # a RUNNING trial without a heartbeat for this long is failed (other hosts)


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One entry of ``tune.space``: ``key`` sampled in ``[low, high]``, log-uniformly if ``log``;
    ``integer`` when the config key holds an int."""

    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False


class ObjectiveLinkDone(Exception):
    """Raised from ``on_epoch`` after the last epoch of the scored link: the rest is not needed."""


# ----------------------------------------------------------------------------------------------
# The search space and the checks on ``config.tune``


def _config_value(config, key: str):
    """The value at a dotted ``key``; `ConfigError` when the key is not a value of the config."""
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise ConfigError(
                f"tune.space names {key!r}, which is not a config key. All keys are listed in "
                "weckd_jax/config.py (e.g. train.learning_rate, distill.alpha)."
            )
        node = node[part]
    if hasattr(node, "keys"):
        raise ConfigError(f"tune.space names {key!r}, a config section; name one of its keys")
    return node


def parse_space(text: str, config) -> tuple[Dimension, ...]:
    """Parses ``"key:low:high[:log],..."`` against ``config`` (keys must exist and be numeric).

    Raises:
      ConfigError: naming the entry and what is wrong with it.
    """
    entries = [e.strip() for e in str(text).split(",") if e.strip()]
    if not entries:
        raise ConfigError(
            "tune.space is empty; give key:low:high[:log] entries, e.g. "
            "--config.tune.space='train.learning_rate:1e-4:1e-2:log,distill.alpha:0.1:0.9'"
        )
    dims, seen = [], set()
    for entry in entries:
        parts = [p.strip() for p in entry.split(":")]
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "log"):
            raise ConfigError(
                f"tune.space entry {entry!r} is not key:low:high or key:low:high:log "
                "(e.g. train.learning_rate:1e-4:1e-2:log)"
            )
        key, log = parts[0], len(parts) == 4
        if key in seen:
            raise ConfigError(f"tune.space names {key!r} twice")
        seen.add(key)
        if any(key == p or key.startswith(p) for p in FORBIDDEN_PREFIXES):
            raise ConfigError(
                f"tune.space may not tune {key!r}: seed, data.*, chain.length, train.epochs, "
                "train.eval_every and tune.* are fixed for a search (every trial must be scored "
                "on the same validation images, at the same pruning steps)"
            )
        value = _config_value(config, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"tune.space names {key!r}, which holds {value!r}: only numeric keys can be tuned"
            )
        try:
            low, high = float(parts[1]), float(parts[2])
        except ValueError:
            raise ConfigError(f"tune.space entry {entry!r}: low and high must be numbers") from None
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ConfigError(f"tune.space entry {entry!r}: low and high must be finite")
        if low >= high:
            raise ConfigError(f"tune.space entry {entry!r}: low={low:g} must be < high={high:g}")
        if log and low <= 0:
            raise ConfigError(
                f"tune.space entry {entry!r}: a log range needs low > 0 (got low={low:g}); "
                "drop ':log' or raise low"
            )
        integer = isinstance(value, int)
        if integer and not (low.is_integer() and high.is_integer()):
            raise ConfigError(
                f"tune.space entry {entry!r}: {key} holds an integer, so low and high must be "
                "integers"
            )
        dims.append(Dimension(key, low, high, log, integer))
    return tuple(dims)


def check_section(config) -> None:
    """The checks on ``config.tune`` (called at the end of `config.validate`)."""
    t = config.tune
    if t.objective not in OBJECTIVES:
        raise ConfigError(
            f"tune.objective={t.objective!r} is unknown; valid: {', '.join(OBJECTIVES)}"
        )
    # A chain.length below 1 has no links; `config.validate` names it.
    length = config.chain.length
    if t.objective == "link" and length >= 1 and not 1 <= t.link <= length:
        raise ConfigError(
            f"tune.link={t.link} must be a link of the chain, 1..{length}, with "
            "tune.objective='link'"
        )
    for key in ("random_trials", "prune_after_trials", "prune_warmup_steps"):
        if t[key] < 0:
            raise ConfigError(f"tune.{key}={t[key]} must be >= 0")
    parse_space(t.space, config)


def objective_link(config) -> int:
    """The link whose validation accuracy a trial is scored by."""
    return config.tune.link if config.tune.objective == "link" else config.chain.length


def apply_params(config, params: dict, *, baselines: bool):
    """A copy of ``config`` with the tuned ``params`` (``{"train.learning_rate": 1e-3, ...}``) set.

    ``distill.t_min`` is capped at ``distill.t_max`` (the temperature anneals from t_max down to
    t_min), so every trial is valid; without ``baselines`` all baselines are switched off.
    """
    c = copy.deepcopy(config)
    with c.unlocked():
        for key, value in params.items():
            *path, name = key.split(".")
            node = c
            for part in path:
                node = node[part]
            node[name] = int(value) if isinstance(node[name], int) else float(value)
        c.distill.t_min = min(c.distill.t_min, c.distill.t_max)
        if not baselines:
            for name in c.baselines:
                c.baselines[name] = False
    return c


def check_search(config, trials: int, workdir: str | None = None) -> tuple[Dimension, ...]:
    """Everything checked before a search starts; returns the parsed space."""
    if trials is None or trials < 1:
        raise ConfigError(f"--trials={trials} must be >= 1 (the total number of trials)")
    config_lib.validate(config, workdir)
    if config_lib.seed_list(config):
        raise ConfigError(
            f"seeds={config.seeds!r}: a search tunes on one seed (seed={config.seed}); unset "
            "seeds (--config.seeds='') and run the best config over several seeds with launch"
        )
    dims = parse_space(config.tune.space, config)
    # Both ends of every range must give a valid run (e.g. distill.alpha within [0, 1]): the
    # valid values of every numeric key form an interval, but for the batch sizes, which must
    # also divide over the devices: each of their values is checked.
    for dim in dims:
        if dim.key in BATCH_SIZE_KEYS:
            for value in range(int(dim.low), int(dim.high) + 1):
                try:
                    parallel.check_batch_size(value, dim.key)
                except ValueError as e:
                    raise ConfigError(
                        f"tune.space: {dim.key}={value}, inside its range, gives an invalid "
                        f"config ({e}), and a search samples every integer of the range; leave "
                        f"{dim.key} out of tune.space on this machine"
                    ) from None
        for end, value in (("low", dim.low), ("high", dim.high)):
            try:
                config_lib.validate(apply_params(config, {dim.key: value}, baselines=False))
            except ConfigError as e:
                raise ConfigError(
                    f"tune.space: {dim.key}={value:g} (the {end} end of its range) gives an "
                    f"invalid config: {e}"
                ) from None
    return dims


# ----------------------------------------------------------------------------------------------
# The study


def study_name(config) -> str:
    """``weckd-<objective>-<digest>``: the digest covers the whole config, harmless keys aside,
    and keys added since a search may have started (`config.ADDED_KEYS`) when they hold the value
    of the searches before them: those keep their study's name."""
    flat = config_lib.as_json(config)
    dropped = [key for key in config_lib.HARMLESS_KEYS if not key.startswith("tune.")]
    # (the search's own keys, tune.*, always name another study)
    dropped += [key for key, value in config_lib.ADDED_KEYS.items() if config[key] == value]
    for key in dropped:
        section, name = key.split(".")
        flat.get(section, {}).pop(name, None)
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:10]
    label = "last_link" if config.tune.objective == "last_link" else f"link_{config.tune.link}"
    return f"weckd-{label}-{digest}"


def check_study_dir(config, workdir: str) -> None:
    """Refuses to continue a search in ``workdir`` with another config or search space, and to
    start one in the folder of a launch run (`workdirs.launch_run_sign`: finished, stopped in its
    first link, or a multi-seed experiment at any stage) or in a folder of images."""
    from weckd_jax.data.folder import image_folder_sign  # loads PIL: here, as `chain` is

    study_file = workdirs.study_path(workdir)
    run_sign = workdirs.launch_run_sign(workdir)
    if run_sign and not os.path.exists(study_file):
        raise ConfigError(
            f"{workdir} holds {run_sign}, not a search: a search there would mix its files with "
            "the run's. Use a new --workdir for the search."
        )
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) and (images := image_folder_sign(workdir)):
        raise ConfigError(
            f"{workdir} holds images ({images}), not a search: the search's files written there "
            "would be read as a class folder by a later run on these images. Choose a new "
            "--workdir (data.root names the images to search on)"
        )
    current = config_lib.as_json(config)
    fix = "restore it from a backup, or use a new --workdir for the search"
    if (saved := files.load_json(path, ConfigError, fix)) is not None:
        saved = config_lib.with_added_keys(saved)
        keys = config_lib.differing_keys(saved, current)
        # The search's own keys always count, even if `differing_keys` ever treats them as
        # harmless.
        old, new = saved.get("tune", {}), current.get("tune", {})
        for key in sorted(old.keys() | new.keys()):
            if old.get(key) != new.get(key) and f"tune.{key}" not in keys:
                keys.append(f"tune.{key}")
        if keys:
            raise ConfigError(
                f"{workdir} holds a search with another config or search space; continuing it "
                "would mix two studies. Differences (saved -> now):\n  "
                + "\n  ".join(config_lib.differences(saved, current, keys))
                + "\nUse a new --workdir for the new search, or continue this one with its "
                f"saved values (in {path}) by adding: "
                + config_lib.restoring_overrides(saved, keys)
            )
    elif os.path.exists(study_file):
        raise ConfigError(
            f"{study_file} exists but {path} does not: the study's config is unknown. Use a new "
            "--workdir."
        )


def open_study(config, workdir: str):
    """The study of ``config`` in ``DIR/study.db`` (created, or loaded to be continued)."""
    import optuna

    study_file = workdirs.study_path(workdir)
    url = f"sqlite:///{os.path.abspath(study_file)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": 120}},  # wait for other writers
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=STALE_SECONDS,
        )
    name = study_name(config)
    others = [n for n in optuna.get_all_study_names(storage) if n != name]
    if others:
        raise ConfigError(
            f"{study_file} holds another study ({', '.join(others)}), made with another config; "
            "use a new --workdir"
        )
    t = config.tune
    pruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=t.prune_after_trials, n_warmup_steps=t.prune_warmup_steps
        )
        if t.prune
        else optuna.pruners.NopPruner()
    )
    return optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize",
        sampler=_trial_seeded_tpe(config.seed, t.random_trials),
        pruner=pruner,
        load_if_exists=True,
    )


def _trial_seeded_tpe(seed: int, random_trials: int):
    """TPE whose randomness is a function of ``(seed, trial number)``, not of the process.

    A plain seeded ``TPESampler`` restarts its random stream in every process, so a resumed search
    would draw trial 0's values again for its first new trial. Here trial n draws from a TPE
    seeded with ``(seed, n)``: a search run in one go and one resumed give the same trials.
    """
    import numpy as np
    import optuna

    class TrialSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self):
            self._number, self._tpe = None, None

        def _for(self, trial):
            if trial.number != self._number:
                trial_seed = int(np.random.SeedSequence([seed, trial.number]).generate_state(1)[0])
                self._number = trial.number
                self._tpe = optuna.samplers.TPESampler(
                    seed=trial_seed, n_startup_trials=random_trials
                )
            return self._tpe

        def infer_relative_search_space(self, study, trial):
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial):
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values):
            self._for(trial).after_trial(study, trial, state, values)

    return TrialSeededTPE()


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():
        return False  # our own pid: we run no trial now, so it was a dead process's (pid reused)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_abandoned(study, say) -> list[int]:
    """Marks FAIL the RUNNING trials whose process is gone; returns their numbers.

    A trial started on this host by a process that no longer exists (killed, crashed) is failed at
    once; one from another host is failed by Optuna's heartbeat once it has been silent for
    `STALE_SECONDS` (as is one killed before it recorded its process). RUNNING trials of live
    processes (a concurrent search) are left alone.
    """
    import optuna
    from optuna.trial import TrialState

    host, failed = socket.gethostname(), []
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if "pid" in attrs:
            dead = attrs.get("host") == host and not _alive(attrs["pid"])
            why = f"process {attrs['pid']}, which has ended (killed?)"
        else:  # killed between its creation and its first line: no process recorded
            age = (now - trial.datetime_start).total_seconds() if trial.datetime_start else 0
            dead = age > STALE_SECONDS
            why = "a process that never recorded itself"
        if dead:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(trial.number)
            say(f"trial {trial.number}: left RUNNING by {why}; marked FAIL, not counted")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return failed


def counts(study) -> dict[str, int]:
    """Trials by state: ``complete``, ``pruned``, ``running``, ``fail``, ``waiting``."""
    result = dict.fromkeys(("complete", "pruned", "running", "fail", "waiting"), 0)
    for trial in study.get_trials(deepcopy=False):
        result[trial.state.name.lower()] += 1
    return result


# ----------------------------------------------------------------------------------------------
# One trial


def _format_params(params: dict) -> str:
    return "  ".join(f"{k.split('.')[-1]}={v:.4g}" for k, v in params.items())


def make_objective(config, dims: tuple[Dimension, ...], workdir: str, say):
    """The Optuna objective: one chain run on the validation split per trial."""
    import optuna

    from weckd_jax import chain

    link_k = objective_link(config)
    epochs = config.train.epochs

    def objective(trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {}
        for d in dims:
            if d.integer:
                params[d.key] = trial.suggest_int(d.key, int(d.low), int(d.high), log=d.log)
            else:
                params[d.key] = trial.suggest_float(d.key, d.low, d.high, log=d.log)
        trial_config = apply_params(config, params, baselines=False)
        trial_dir = os.path.join(workdir, "trials", str(trial.number))
        trial.set_user_attr("workdir", trial_dir)
        if trial_config.distill.t_min != params.get("distill.t_min", config.distill.t_min):
            trial.set_user_attr("distill.t_min_capped_to", trial_config.distill.t_min)
        say(f"trial {trial.number}: {_format_params(params)}")
        best = {}  # link -> best validation accuracy so far

        def on_epoch(job_name: str, epoch: int, record: dict) -> None:
            if not job_name.startswith("link_"):
                return
            link = int(job_name.removeprefix("link_"))
            accuracy = record.get("val_accuracy")
            if accuracy is not None:
                best[link] = max(best.get(link, -1.0), accuracy)
                step = (link - 1) * epochs + epoch
                trial.report(accuracy, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(
                        f"link {link}, epoch {epoch}: validation accuracy {accuracy:.3f}, below "
                        "the median of the completed trials"
                    )
            if epoch == epochs:
                say(f"  link {link}: validation accuracy {best[link]:.4f}")
                if link == link_k < trial_config.chain.length:
                    raise ObjectiveLinkDone  # the later links do not change the objective

        start = time.perf_counter()
        try:
            results = chain.run(
                trial_config, trial_dir, Progress(enabled=False), use_test=False, on_epoch=on_epoch
            )
            value = results["links"][link_k - 1]["val"]["accuracy"]
        except ObjectiveLinkDone:
            value = best[link_k]
        except optuna.TrialPruned as e:
            say(f"  pruned at {e}")
            raise
        except chain.DivergenceError as e:
            trial.set_user_attr("diverged", str(e))
            say(f"  diverged: {str(e).split('. ')[0]}; recorded as pruned")
            raise optuna.TrialPruned(f"diverged: {e}") from None
        trial.set_user_attr("val_accuracy_per_link", {str(k): v for k, v in sorted(best.items())})
        say(
            f"  -> validation accuracy of link {link_k}: {value:.4f}  "
            f"({time.perf_counter() - start:.0f} s)"
        )
        return value

    return objective


# ----------------------------------------------------------------------------------------------
# The search


def write_best_config(config, study, workdir: str) -> tuple[str, object]:
    """Writes ``DIR/best_config.py``, a config file with the best trial's values.

    Returns:
      ``(path, best config)``.
    """
    best = study.best_trial
    best_config = apply_params(config, best.params, baselines=True)
    values = config_lib.as_json(best_config)
    link_k = objective_link(config)
    tuned = "\n".join(f"  {k} = {best_config_value(best_config, k)!r}" for k in best.params)
    text = f'''"""The best config of the search in {os.path.abspath(workdir)}.

Written by `python -m weckd_jax.tune` (rerunning the search rewrites it); use it as any config:

    python -m weckd_jax.launch --config {os.path.join(workdir, "best_config.py")}

Study {study.study_name!r}, trial {best.number}: validation accuracy of link {link_k}
{best.value!r}.
Tuned values:
{tuned}
"""

import ml_collections

from weckd_jax import config as config_lib

CONFIG = {pprint.pformat(values, width=100, sort_dicts=False)}


def get_config() -> ml_collections.ConfigDict:
    # Keys added to weckd_jax after this file was written get the value that gives what this
    # search computed (config.ADDED_KEYS).
    return ml_collections.ConfigDict(config_lib.with_added_keys(CONFIG))
'''
    path = os.path.join(workdir, "best_config.py")
    files.write_text(path, text)
    return path, best_config


def best_config_value(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def run(
    config,
    workdir: str,
    trials: int,
    *,
    evaluate_best: bool = True,
    say=print,
    progress: Progress | None = None,
) -> dict:
    """Runs (or continues) the search in ``workdir`` until it holds ``trials`` finished trials.

    Returns:
      ``{"study", "counts", "best_trial", "best_value", "best_params", "best_config"}``, plus
      ``"best_results"`` (the path of ``DIR/best_results.json``) when ``evaluate_best``.
    """
    dims = check_search(config, trials, workdir)
    import optuna

    from weckd_jax import chain

    check_study_dir(config, workdir)
    # The study is bound to its config and its data (config.json, data.json) as a run is, once
    # the data and the teacher caches' sizes have passed their checks: every trial then trains on
    # the same examples. Each trial plans its own caches (and prints their notes).
    warning = chain.prepare(config, workdir, writer=True).warning
    if warning:
        say(warning)
    # Our own lines report trials; a failing trial's error is raised (and reported) by us.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = open_study(config, workdir)
    objective = make_objective(config, dims, workdir, say)
    say(f"study {study.study_name!r} in {workdirs.study_path(workdir)}")

    ran = 0
    while True:
        fail_abandoned(study, say)
        n = counts(study)
        finished = n["complete"] + n["pruned"]
        if finished >= trials:
            break
        if finished + n["running"] >= trials:
            say(
                f"{n['running']} trial(s) still running in other processes would complete the "
                f"{trials}; not starting another"
            )
            break
        with warnings.catch_warnings():  # older Optuna warns about its own heartbeat check
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=1)
        ran += 1
    n = counts(study)
    say(
        f"{ran} trial(s) run now; the study holds {n['complete']} complete, {n['pruned']} "
        f"pruned, {n['fail']} failed, {n['running']} running"
    )
    if n["complete"] == 0:
        raise ConfigError(
            "no trial completed (all were pruned or diverged), so there is no best config; "
            "narrow tune.space (e.g. lower the high end of train.learning_rate)"
        )
    best = study.best_trial
    path, best_config = write_best_config(config, study, workdir)
    link_k = objective_link(config)
    say(
        f"best: trial {best.number}, validation accuracy of link {link_k} {best.value:.4f}: "
        f"{_format_params(best.params)}"
    )
    say(f"best config: {path}")
    out = {
        "study": study.study_name,
        "counts": n,
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": dict(best.params),
        "best_config": path,
    }
    if evaluate_best:
        out["best_results"] = evaluate_best_trial(
            best_config, study, workdir, say, progress or Progress()
        )
    return out


def best_run_dir(workdir: str, trial: int) -> str:
    """The folder in which the search in ``workdir`` trains its best config (trial number
    ``trial``) once more and evaluates it on the test split."""
    return os.path.join(workdir, "best", f"trial_{trial}")


def evaluate_best_trial(best_config, study, workdir: str, say, progress: Progress) -> str:
    """Trains the best config once more (baselines as configured) and evaluates it on the test
    split, once; writes ``DIR/best_results.json`` and returns its path."""
    from weckd_jax import chain

    best = study.best_trial
    link_k = objective_link(best_config)
    run_dir = best_run_dir(workdir, best.number)
    say(f"evaluating the best config on the test split: {run_dir}")
    results = chain.run(best_config, run_dir, progress, use_test=True)
    record = results["links"][link_k - 1]
    summary = {
        "study": study.study_name,
        "trial": best.number,
        "objective": best_config.tune.objective,
        "link": link_k,
        "params": dict(best.params),
        "config": os.path.join(workdir, "best_config.py"),
        "val_accuracy": best.value,
        "val_accuracy_final_run": record["val"]["accuracy"],
        "test_accuracy": record["test"]["accuracy"],
        "test": record["test"],
        "last_link_test_accuracy": results["links"][-1]["test"]["accuracy"],
        "workdir": run_dir,
        "results": os.path.join(run_dir, "results.json"),
    }
    path = os.path.join(workdir, "best_results.json")
    files.write_json(path, summary)
    if summary["val_accuracy_final_run"] != best.value:
        say(
            f"warning: the final run's validation accuracy "
            f"({summary['val_accuracy_final_run']:.4f}) differs from the trial's "
            f"({best.value:.4f}): training is not bit-reproducible here (e.g. GPU kernels)"
        )
    say(f"test accuracy of link {link_k}: {summary['test_accuracy']:.4f}  ({path})")
    return path


# ----------------------------------------------------------------------------------------------
# Command line


def main_cli() -> None:
    """``python -m weckd_jax.tune``: flags are defined here, not at import (launch and
    `config.validate` import this module)."""
    from absl import app, flags, logging

    from weckd_jax import checkpoints, cli
    from weckd_jax.data import DataError
    from weckd_jax.data.splits import SplitError

    config_flag = cli.define_config_file(config_lib.__file__)
    workdir_flag = flags.DEFINE_string(
        "workdir", None, f"Folder of the study ({workdirs.STUDY_FILE}, trials/)."
    )
    trials_flag = flags.DEFINE_integer(
        "trials", None, "Total number of finished trials the study should hold."
    )
    evaluate_flag = flags.DEFINE_bool(
        "evaluate_best", True, "Train the best config once more and evaluate it on test."
    )

    def main(argv: list[str]) -> None:
        ops.configure_cpu_flags()  # before JAX starts a backend
        cli.keep_interrupts()
        if len(argv) > 1:
            cli.fail(cli.unexpected_arguments(argv[1:]))
        if not workdir_flag.value:
            cli.fail(f"--workdir DIR is required: the study lives in DIR/{workdirs.STUDY_FILE}")
        if trials_flag.value is None:
            cli.fail("--trials N is required: the total number of trials the study should hold")
        if problem := cli.workdir_problem(workdir_flag.value):
            cli.fail(problem)
        logging.set_verbosity(logging.WARNING)
        try:
            run(
                config_flag.value,
                workdir_flag.value,
                trials_flag.value,
                evaluate_best=evaluate_flag.value,
                say=lambda text: print(text, flush=True),
            )
        except (
            ConfigError,
            DataError,
            SplitError,
            checkpoints.CheckpointError,
            files.BusyError,
        ) as e:
            cli.fail(str(e))
        except KeyboardInterrupt:
            cli.interrupted(
                f"the finished trials are kept in {workdirs.study_path(workdir_flag.value)} "
                "(the interrupted one is not counted), and so are the finished links and the last "
                "in-training checkpoint of the best config's run; rerun the same command to resume"
            )

    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    from weckd_jax import tune as _tune  # the package module, so validate() shares its classes

    _tune.main_cli()
