"""Class probabilities of new images from a trained run.

    python -m weckd_jax.predict --workdir DIR --images PATH [--link N] [--output FILE.csv]

``PATH`` is one image or a folder searched recursively for image files (the extensions of
`weckd_jax.data.folder.IMAGE_EXTENSIONS`, case-insensitive; hidden files and folders skipped).
Each image is decoded and resized exactly as in training (`weckd_jax.data.folder.decode_image`
with the run's ``image_size`` and ``channels`` from ``DIR/results.json``), then classified by the
chosen link (default: the last) restored from its final checkpoint
``DIR/checkpoints/link_<N>/final``.

Output: a short table on stdout and, with ``--output``, a CSV with the columns ``path``,
``predicted`` (a class name) and one probability column per class, headed by the class name, in
the run's class order. Probabilities are written with six decimals.

An image that cannot be decoded is **skipped** with a warning naming it on stderr, and is absent
from the CSV; the exit status is then still 0 (the warning says how many were skipped). Exit
status 2, with one message and no traceback, when: DIR has no ``results.json`` or the link has no
final checkpoint, ``--link`` names a link the run does not have, no image is found under PATH, or
no image could be decoded. Runs as a single process (any number of local devices).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys

import jax
import numpy as np

from weckd_jax import chain, checkpoints, files, ops, parallel
from weckd_jax.data import folder
from weckd_jax.data.folder import IMAGE_EXTENSIONS

__all__ = [
    "Prediction",
    "PredictError",
    "find_images",
    "load_results",
    "main",
    "predict",
    "write_csv",
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
      model: the checkpoint name used (``link_<N>``).
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
        raise PredictError(
            f"{workdir} has no results.json: it is not a finished weckd_jax run. Point --workdir "
            "at the folder `python -m weckd_jax.launch --workdir DIR` wrote, after it finished."
        )
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise PredictError(f"{path} cannot be read as JSON ({e})") from None
    data = results.get("data", {}) if isinstance(results, dict) else {}
    missing = [k for k in ("class_names", "image_size", "channels") if k not in data]
    if not isinstance(results, dict) or "links" not in results or missing:
        raise PredictError(f"{path} is not a weckd_jax results file (no links or data entries)")
    return results


def link_name(workdir: str, results: dict, link: int | None) -> str:
    """The checkpoint name of link ``link`` (default: the last); checks that it finished."""

    numbers = [int(r["link"]) for r in results["links"]]
    if not numbers:
        raise PredictError(f"{workdir}/results.json lists no links")
    if link is None:
        link = numbers[-1]
    if link not in numbers:
        raise PredictError(
            f"--link {link} does not exist: the run in {workdir} has links "
            f"{', '.join(str(n) for n in numbers)}"
        )
    name = next(r["name"] for r in results["links"] if int(r["link"]) == link)
    if not checkpoints.has_final(workdir, name):
        raise PredictError(
            f"{workdir} has no final checkpoint for {name} "
            f"({checkpoints.final_dir(workdir, name)}): were the checkpoints moved or deleted?"
        )
    return name


def find_images(path: str) -> list[str]:
    """``path`` itself if it is a file, else the image files under it (recursive, sorted), with
    the extensions the folder source reads (`weckd_jax.data.folder.IMAGE_EXTENSIONS`)."""

    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise PredictError(f"--images {path} does not exist")
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            os.path.join(root, n)
            for n in sorted(names)
            if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
        ]
    if not found:
        raise PredictError(
            f"no images found under {path} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return found


def _decoder():
    """`weckd_jax.data.folder.decode_image`: the decoding and resizing of the folder source."""

    return folder.decode_image


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
    devices = jax.device_count()
    return math.ceil(size / devices) * devices  # every device gets the same number of rows


def predict(
    workdir: str,
    paths: list[str],
    *,
    link: int | None = None,
    batch_size: int | None = None,
    warn=None,
) -> Prediction:
    """Classifies the images at ``paths`` with link ``link`` (default: the last) of ``workdir``.

    Args:
      workdir: a finished run's folder (``results.json`` and ``checkpoints/``).
      paths: image files.
      link: the link number, 1-based.
      batch_size: images per evaluation batch (default: the run's ``train.eval_batch_size``),
        rounded up to a multiple of the device count.
      warn: ``warn(path, reason)`` called for each image that cannot be decoded (skipped).

    Raises:
      PredictError: see the module docstring.
    """

    if jax.process_count() > 1:
        raise PredictError("predict runs as a single process; start it without a coordinator")
    results = load_results(workdir)
    data = results["data"]
    class_names = list(data["class_names"])
    size, channels = int(data["image_size"]), int(data["channels"])
    name = link_name(workdir, results, link)
    mesh = parallel.data_mesh()
    spec, variables = chain.restore_finished(workdir, name, mesh, (size, size, channels))
    batch = _batch_size(workdir, batch_size)
    decode = _decoder()

    kept, skipped, probs = [], [], []
    for start in range(0, len(paths), batch):
        images = []
        for path in paths[start : start + batch]:
            try:
                image = np.asarray(decode(path, image_size=size, channels=channels))
            except Exception as e:  # a corrupt or unsupported file: skip it, say which
                reason = f"{type(e).__name__}: {' '.join(str(e).split())}"
                skipped.append((path, reason))
                if warn is not None:
                    warn(path, reason)
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
            f"{skipped[0][1]})"
        )
    return Prediction(kept, np.concatenate(probs), class_names, name, skipped)


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


def write_csv(path: str, prediction: Prediction) -> None:
    """Writes `csv_text` to ``path`` atomically."""
    files.write_text(path, csv_text(prediction))


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
    parser.add_argument("--workdir", required=True, help="the run's folder (with results.json)")
    parser.add_argument("--images", required=True, help="an image, or a folder (recursive)")
    parser.add_argument("--link", type=int, default=None, help="link number (default: the last)")
    parser.add_argument(
        "--output", default=None, help="CSV to write (path, predicted, one column per class)"
    )
    parser.add_argument(
        "--batch_size", type=int, default=None, help="default: the run's train.eval_batch_size"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2 and one message on a user error)."""
    from absl import logging

    ops.configure_cpu_flags()  # before JAX starts a backend
    args = _parser().parse_args(argv)
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO

    def warn(path: str, reason: str) -> None:
        print(f"warning: skipped {path}, it cannot be decoded ({reason})", file=sys.stderr)

    try:
        paths = find_images(args.images)
        prediction = predict(
            args.workdir, paths, link=args.link, batch_size=args.batch_size, warn=warn
        )
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(prediction))
    if prediction.skipped:
        print(
            f"warning: {len(prediction.skipped)} of {len(paths)} image(s) could not be decoded "
            "and were skipped (named above)",
            file=sys.stderr,
        )
    if args.output:
        write_csv(args.output, prediction)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
