"""Class probabilities of new images from a trained run.

    python -m weckd_jax.predict --workdir DIR --images PATH [--link N|NAME] [--output FILE.csv
        [--overwrite]]

``PATH`` is one image or a folder searched recursively for image files (the extensions of
`weckd_jax.data.folder.IMAGE_EXTENSIONS`, case-insensitive; symbolic links followed; hidden files
and folders skipped), as training reads a class folder; each file passed over is named in a warning
on stderr. A path flag's value may start with ``~``
(the home folder, as in ``data.root``), also as ``--images=~/scans``, which the shell leaves as is.
Each image is decoded and resized exactly as in training (`weckd_jax.data.folder.decode_image`
with the run's ``image_size`` and ``channels`` from ``DIR/results.json``), then classified by the
chosen model restored from its final checkpoint ``DIR/checkpoints/<name>/final``: ``--link N``
picks link N (default: the last), ``--link NAME`` any link or baseline by its name in
``results.json`` (``link_2``, ``same_fraction``, ``union_supervised``, ...).

Output: a short table on stdout and, with ``--output``, a CSV with the columns ``path``,
``predicted`` (a class name) and one probability column per class, headed by the class name, in
the run's class order. Probabilities are written with six decimals. An existing ``--output`` file
is refused (before anything is classified) unless ``--overwrite`` is given; one that appears
while the images are classified is kept, and the CSV goes to ``<stem>-1.csv`` instead (with a
warning).

An image that cannot be decoded is **skipped** with a warning naming it on stderr, and is absent
from the CSV; the exit status is then still 0 (the warning says how many were skipped). Exit
status 2, with one message and no traceback, when: DIR has no ``results.json`` (for a multi-seed
experiment the message names its ``DIR/seed_<s>`` runs), the link has no final checkpoint, it
cannot be read or its weights are not those ``results.json`` reports (their SHA-256
``fingerprint``: a checkpoint copied from another run, or altered), the checkpoint's number of
classes differs from the run's class names, ``--link`` names a model the run does not have, no
image is found under PATH, no image could be decoded, or ``--output`` is a folder (or a name ending
in ``/``) or an existing file (without ``--overwrite``). Runs as a single process (any number of
local devices).
"""

from __future__ import annotations

from weckd_jax import startup  # noqa: F401 - first: a Ctrl-C while JAX loads ends in one line

# isort: split
import argparse
import csv
import dataclasses
import io
import json
import os
import sys

import jax
import numpy as np

from weckd_jax import chain, checkpoints, files, ops, parallel, tune, workdirs
from weckd_jax.data import folder
from weckd_jax.data.folder import IMAGE_EXTENSIONS
from weckd_jax.data.types import DataError

__all__ = [
    "Prediction",
    "PredictError",
    "csv_text",
    "find_images",
    "load_results",
    "main",
    "predict",
]

DEFAULT_BATCH_SIZE = 256
TABLE_ROWS = 20


class PredictError(Exception):
    """A user error: the message names the problem and the fix (exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What `predict` returns.

    Attributes:
      paths: the decoded images, in order.
      probs: float32 ``[len(paths), K]`` class probabilities.
      class_names: the run's classes, index = column of ``probs``.
      model: the checkpoint name used (``link_<N>`` or a baseline's name).
      skipped: ``(path, reason)`` of every image that could not be decoded.
    """

    paths: list[str]
    probs: np.ndarray
    class_names: list[str]
    model: str
    skipped: list[tuple[str, str]]

    @property
    def predicted(self) -> list[str]:
        """The predicted class name per image (argmax; ties go to the lowest class index)."""
        return [self.class_names[i] for i in np.argmax(self.probs, axis=1)]


def load_results(workdir: str) -> dict:
    """``DIR/results.json`` of a finished run; `PredictError` when it is missing or unreadable."""
    path = os.path.join(workdir, "results.json")
    if not os.path.isdir(workdir):
        raise PredictError(f"workdir {workdir} does not exist")
    if not os.path.isfile(path):
        if seeds := workdirs.seed_names(workdir):
            raise PredictError(
                f"{workdir} holds a multi-seed experiment ({', '.join(seeds)}), one run per seed: "
                f"point --workdir at one of them, e.g. --workdir {os.path.join(workdir, seeds[0])}"
            )
        if os.path.isfile(workdirs.study_path(workdir)):
            # Not its "workdir": that path is relative to the folder the search was started in.
            best = files.read_json(os.path.join(workdir, "best_results.json")) or {}
            fix = (
                "point --workdir at its best config's run, --workdir "
                f"{tune.best_run_dir(workdir, best['trial'])}"
                if "trial" in best
                else "its best config has no run yet: rerun the search without "
                "--evaluate_best=false to train and test it"
            )
            raise PredictError(f"{workdir} holds a hyper-parameter search, not a run: {fix}")
        if os.path.isfile(os.path.join(workdir, "config.json")):
            raise PredictError(
                f"{workdir} holds a run that has not finished (no results.json yet): rerun the "
                f"launch command that started it (same --config, --workdir {workdir}) to finish "
                "it, then point --workdir at it again"
            )
        raise PredictError(
            f"{workdir} has no results.json: it is not a finished weckd_jax run. Point --workdir "
            "at the folder `python -m weckd_jax.launch --workdir DIR` wrote, after it finished."
        )
    fix = (
        "restore it from a backup, or move it aside and rerun the launch command that made the "
        f"run (e.g. --config configs/from_run.py:{workdir} --workdir {workdir}), which writes it "
        "anew from the finished links' records"
    )
    results = files.load_json(path, PredictError, fix, required=("links", "data"))
    data = results["data"]
    if missing := [k for k in ("class_names", "image_size", "channels") if k not in data]:
        raise PredictError(
            f"{path} lacks {', '.join(f'data.{k}' for k in missing)}, which weckd_jax reads from "
            f"it: it was edited, or written by another version of weckd_jax; {fix}"
        )
    return results


def model_record(workdir: str, results: dict, link: int | str | None) -> dict:
    """The ``results.json`` entry of ``link``: a link number (default: the last link), or the name
    of a link or baseline (``"link_2"``, ``"same_fraction"``); a string of digits is a number."""

    links = results["links"]
    if not links:
        raise PredictError(f"{workdir}/results.json lists no links")
    if link is None:
        return links[-1]
    if isinstance(link, str) and link.isdigit():
        link = int(link)
    baselines = results.get("baselines", {})
    if isinstance(link, int):
        found = next((r for r in links if int(r["link"]) == link), None)
    else:
        found = {r["name"]: r for r in links}.get(link) or baselines.get(link)
    if found is None:
        numbers = ", ".join(str(r["link"]) for r in links)
        others = f" and baselines {', '.join(baselines)}" if baselines else ""
        raise PredictError(
            f"--link {link} does not exist: the run in {workdir} has links {numbers}{others}; "
            "give a link's number or a name from results.json"
        )
    return found


def find_images(path: str, passed_over: list[tuple[str, str]] | None = None) -> list[str]:
    """``path`` itself if it is a file, else the image files under it, sorted, found as the
    folder source finds a class's images (`weckd_jax.data.folder.image_files`: recursive,
    symbolic links followed, hidden files skipped); ``(path, reason)`` of each hidden or
    non-image file passed over is appended to ``passed_over``, sorted."""

    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise PredictError(f"--images {path} does not exist")
    skipped: list[tuple[str, str]] = []
    found = sorted(folder.image_files(path, skipped))
    skipped.sort()
    if not found:
        other = ""
        if skipped:  # e.g. DICOM files (their reason says how to convert them) before hidden ones
            first, reason = ([s for s in skipped if not s[1].startswith("hidden")] or skipped)[0]
            other = f"; {len(skipped)} other file(s) passed over, e.g. {first}: {reason}"
        raise PredictError(
            f"no images found under {path} (searched recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}){other}"
        )
    if passed_over is not None:
        passed_over += skipped
    return found


def _decoder():
    """`weckd_jax.data.folder.decode_image`: the decoding and resizing of the folder source."""

    return folder.decode_image


def _reason(path: str, error: Exception) -> str:
    """Why ``path`` could not be decoded, on one line: a `DataError`'s line for that file, without
    the fix it ends with (that fix is about training data; predicting just skips the file)."""
    lines = [line.strip() for line in str(error).splitlines()]
    detail = next((line for line in lines if line.startswith(f"{path}: ")), None)
    if isinstance(error, DataError) and detail:
        return detail[len(path) + 2 :]
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _restore(
    workdir: str, record: dict, mesh, image_shape: tuple[int, ...], class_names: list[str]
):
    """`chain.restore_recorded`, with a missing or damaged checkpoint, one that is not the
    reported model, or one of a run with other classes, as a `PredictError`."""

    try:
        return chain.restore_recorded(workdir, record, mesh, image_shape, class_names)
    except checkpoints.CheckpointError as e:
        raise PredictError(f"{e} Or pick another --link.") from None


def _batch_size(workdir: str, requested: int | None) -> int:

    size = requested
    if size is None:
        try:
            with open(os.path.join(workdir, "config.json")) as f:
                size = int(json.load(f)["train"]["eval_batch_size"])
        except (OSError, ValueError, KeyError, TypeError):
            size = DEFAULT_BATCH_SIZE
    if size < 1:
        raise PredictError(f"--batch_size={size} must be >= 1")
    return parallel.device_multiple(size)


def predict(
    workdir: str,
    paths: list[str],
    *,
    link: int | str | None = None,
    batch_size: int | None = None,
) -> Prediction:
    """Classifies the images at ``paths`` with the model ``link`` (default: the last link) of
    ``workdir``.

    Args:
      workdir: a finished run's folder (``results.json`` and ``checkpoints/``).
      paths: image files.
      link: the link number, 1-based, or the name of a link or baseline (see `model_record`).
      batch_size: images per evaluation batch (default: the run's ``train.eval_batch_size``),
        rounded up to a multiple of the device count.

    Raises:
      PredictError: see the module docstring.
    """

    if jax.process_count() > 1:
        raise PredictError("predict runs as a single process; start it without a coordinator")
    results = load_results(workdir)
    data = results["data"]
    class_names = list(data["class_names"])
    size, channels = int(data["image_size"]), int(data["channels"])
    record = model_record(workdir, results, link)
    mesh = parallel.data_mesh()
    spec, variables = _restore(workdir, record, mesh, (size, size, channels), class_names)
    batch = _batch_size(workdir, batch_size)
    decode = _decoder()

    kept, skipped, probs = [], [], []
    for start in range(0, len(paths), batch):
        images = []
        for path in paths[start : start + batch]:
            try:
                image = np.asarray(decode(path, image_size=size, channels=channels))
            except Exception as e:  # a corrupt or unsupported file: skip it, say which
                reason = _reason(path, e)
                skipped.append((path, reason))
                continue
            if image.shape != (size, size, channels) or image.dtype != np.uint8:
                raise RuntimeError(
                    f"decode_image returned {image.dtype} {image.shape} for {path}, expected "
                    f"uint8 {(size, size, channels)}"
                )
            images.append(image)
            kept.append(path)
        if images:
            probs.append(
                chain.probabilities(
                    spec,
                    variables,
                    np.stack(images),
                    np.arange(len(images)),
                    batch_size=batch,
                    mesh=mesh,
                )
            )
    if not kept:
        raise PredictError(
            f"none of the {len(paths)} image(s) could be decoded (first: {skipped[0][0]}: "
            f"{skipped[0][1]}); point --images at PNG, JPEG, BMP or TIFF files"
        )
    return Prediction(kept, np.concatenate(probs), class_names, record["name"], skipped)


def csv_text(prediction: Prediction) -> str:
    """The CSV: ``path``, ``predicted``, then one probability column per class name."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "predicted", *prediction.class_names])
    for path, label, row in zip(
        prediction.paths, prediction.predicted, prediction.probs, strict=True
    ):
        writer.writerow([path, label, *[f"{p:.6f}" for p in row]])
    return out.getvalue()


def table(prediction: Prediction, rows: int = TABLE_ROWS) -> str:
    """The first ``rows`` predictions (path, class, confidence) and the count per class."""
    confidence = prediction.probs.max(axis=1)
    width = min(60, max(len("image"), *(len(p) for p in prediction.paths[:rows])))
    lines = [f"{'image':<{width}}  {'predicted':<24}{'confidence':>10}"]
    for path, label, conf in list(
        zip(prediction.paths, prediction.predicted, confidence, strict=True)
    )[:rows]:
        shown = path if len(path) <= width else "..." + path[-(width - 3) :]
        lines.append(f"{shown:<{width}}  {label:<24}{conf:>10.3f}")
    if len(prediction.paths) > rows:
        lines.append(f"... and {len(prediction.paths) - rows} more")
    predicted = prediction.predicted
    counts = ", ".join(f"{n} {predicted.count(n)}" for n in prediction.class_names)
    lines.append(f"{len(predicted)} image(s) by {prediction.model}: {counts}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m weckd_jax.predict",
        description="Class probabilities of images from a trained weckd_jax run.",
    )
    # A shell expands ~ only at the start of a word: --images=~/x arrives as typed.
    path = os.path.expanduser
    parser.add_argument(
        "--workdir", required=True, type=path, help="the run's folder (with results.json)"
    )
    parser.add_argument(
        "--images", required=True, type=path, help="an image, or a folder (recursive)"
    )
    parser.add_argument(
        "--link",
        default=None,
        help="link number (default: the last), or a link's or baseline's name (e.g. same_fraction)",
    )
    parser.add_argument(
        "--output",
        default=None,
        type=path,
        help="CSV to write (path, predicted, one column per class)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the --output file if it exists"
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="images per batch (default: the run's train.eval_batch_size)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2 and one message on a user error)."""
    from absl import logging

    from weckd_jax import cli

    ops.configure_cpu_flags()  # before JAX starts a backend
    cli.keep_interrupts()
    args = _parser().parse_args(argv)
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO

    try:
        if args.output and (  # before classifying anything
            problem := files.output_problem(args.output, "--output", overwrite=args.overwrite)
        ):
            raise PredictError(problem)
        passed_over: list[tuple[str, str]] = []
        paths = find_images(args.images, passed_over)
        prediction = predict(args.workdir, paths, link=args.link, batch_size=args.batch_size)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        cli.interrupted("nothing was written")
    # As training does for a class folder: no file under --images is left out unsaid.
    for path, reason in passed_over:
        print(f"warning: not classified: {path} ({reason})", file=sys.stderr)
    # The skipped images are named once all are read: when none could be, the error says it once.
    for path, reason in prediction.skipped:
        print(f"warning: skipped {path}, it cannot be decoded ({reason})", file=sys.stderr)
    print(table(prediction))
    if prediction.skipped:
        print(
            f"warning: {len(prediction.skipped)} of {len(paths)} image(s) could not be decoded "
            "and were skipped (named above)",
            file=sys.stderr,
        )
    if args.output:
        try:
            written = files.write_output(
                args.output, csv_text(prediction), "--output", args.overwrite
            )
        except files.OutputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
