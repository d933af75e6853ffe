"""TFDS datasets by name, read without TensorFlow through ``tfds.data_source`` (array_record).

``data.source = "tfds"``, ``data.name`` (e.g. ``"malaria"``, ``"colorectal_histology"``),
``data.data_dir`` (where the dataset was prepared; ``""`` = TFDS's default, ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``) and ``data.tfds_split`` (``"train"``, ``"train+test"``,
``"train[:50%]"``...: the records pooled before our own group-/class-stratified train/val/test
split).

Nothing is downloaded at train time: ``tfds.data_source(..., download=False)``. The dataset must
have been prepared in the **array_record** format (random access; TFRecord needs TensorFlow), e.g.
on a machine with TensorFlow and network access::

    tfds build malaria --data_dir DIR --file_format array_record

or ``tfds.builder("malaria", data_dir=DIR, file_format="array_record").download_and_prepare()``,
then copy ``DIR`` here and set ``data.data_dir=DIR``. A dataset prepared by a builder that is not
registered in this TFDS version (a custom dataset) is read from its files in ``DIR`` as well.

What a data source returns without TensorFlow (tfds 4.9.10): each record is a dict of NumPy values;
an ``Image`` feature is decoded by TFDS with Pillow (OpenCV when installed) into a uint8
``[H, W, C]`` array, a ``ClassLabel`` is an ``int``. We ask for the **encoded bytes** instead
(``decoders={image: tfds.decode.SkipDecoding()}``, which works without TensorFlow on real
array_record files), so that every image goes through exactly `folder.decode_image`'s
preprocessing (16-bit handling, letterbox resize) and the on-disk cache is keyed by the encoded
content, which spares later runs all decoding. Sources that cannot hand out bytes -- notably
``tfds.testing.mock_data``, whose fake records must be encoded with TensorFlow for that -- fall
back to TFDS's decoded arrays, preprocessed by `folder.preprocess_array` (same steps from the
pixels on).

* Images and labels: the builder's ``supervised_keys`` (else the features ``image`` and
  ``label``); class names: ``info.features[label].names``; ``data.channels`` 0 = the image
  feature's channels (3 when unknown).
* TFDS records carry no patient ids: splits are image-level (a patient's images may fall into two
  splits). Use a folder with a manifest to split by patient.
* Bad input: records that cannot be decoded are fatal (listed); records with identical content are
  deduplicated with a warning (same label: later copies skipped; different labels: all copies
  skipped, the label being ambiguous).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import numpy as np
from absl import logging

from weckd_jax.data import folder
from weckd_jax.data.types import DataError, ImageSet

__all__ = ["load"]


def _prepare_hint(name: str, data_dir: str) -> str:
    target = data_dir or "~/tensorflow_datasets"
    return (
        "Nothing is downloaded at train time. Fix: on a machine with TensorFlow and network "
        f"access run\n  tfds build {name} --data_dir {target} --file_format array_record\n"
        f"(or in Python: tfds.builder({name!r}, data_dir={target!r}, "
        "file_format='array_record').download_and_prepare()),\nthen copy that folder here and "
        f"set --config.data.data_dir to it (now: {data_dir or '(TFDS default)'})."
    )


def _keys(info, name: str) -> tuple[str, str]:
    keys = info.supervised_keys
    if isinstance(keys, tuple | list) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        return keys[0], keys[1]
    features = info.features
    if "image" in features and "label" in features:
        return "image", "label"
    raise DataError(
        f"TFDS dataset {name!r} has no (image, label) supervised keys and no 'image' and 'label' "
        f"features (features: {', '.join(features.keys())}). Fix: use an image classification "
        "dataset, or export the images to a folder (data.source='folder')."
    )


@contextlib.contextmanager
def _scratch_tempdir():
    """Points `tempfile` at a fresh folder (made in the temporary directory, ``$TMPDIR``) for the
    block and removes it afterwards.

    TFDS makes an empty folder in the temporary directory for every builder of a registered
    dataset that is not prepared in its ``data_dir`` (``DatasetInfo.initialize_from_bucket``,
    whose download from GCS is disabled) and never removes it: opening an unprepared dataset, or
    any dataset under ``tfds.testing.mock_data``, would leave them behind. Process-wide while it
    lasts: meant for opening a dataset, before other threads make temporary files."""
    scratch = tempfile.mkdtemp(prefix="weckd-tfds-")
    saved, tempfile.tempdir = tempfile.tempdir, scratch
    try:
        yield
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(scratch, ignore_errors=True)


def _open(tfds, name: str, split: str, data_dir: str):
    """``(data_source, info, image_key, label_key, encoded)``; `DataError` when unusable."""
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # DatasetNotFoundError, or a malformed name / config
        first = str(e).strip().split("\n")[0]
        raise DataError(
            f"data.name={name!r} is not a TFDS dataset this installation knows ({first}), and "
            f"nothing is prepared under it in data.data_dir={data_dir or '(TFDS default)'}. Fix: "
            "check the name in the TFDS catalogue (https://www.tensorflow.org/datasets/catalog/"
            "overview), or set data.data_dir to where the dataset was prepared."
        ) from None
    image_key, label_key = _keys(builder.info, name)

    def source(decoders):
        return tfds.data_source(
            name, split=split, data_dir=data_dir or None, download=False, decoders=decoders
        )

    try:
        ds = source({image_key: tfds.decode.SkipDecoding()})
    except Exception as e:
        message = str(e).strip()
        if isinstance(e, ValueError) and "split" in message.lower():
            available = ", ".join(builder.info.splits.keys()) or "(none prepared)"
            raise DataError(
                f"data.tfds_split={split!r} does not exist in TFDS dataset {name!r} "
                f"({message.split(chr(10))[0]}). Available splits: {available}. Fix: set "
                "data.tfds_split to one of them, a sum ('train+test') or a slice ('train[:80%]')."
            ) from None
        if not builder.is_prepared():
            raise DataError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. "
                + _prepare_hint(name, data_dir)
            ) from None
        file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
        if str(file_format) != "array_record":
            raise DataError(
                f"TFDS dataset {name!r} in {builder.data_dir} was prepared as {file_format}, "
                "which needs TensorFlow to read; random access without TensorFlow needs "
                "array_record. " + _prepare_hint(name, data_dir)
            ) from None
        raise DataError(
            f"cannot read TFDS dataset {name!r} from {builder.data_dir}: {message}"
        ) from None
    info = getattr(ds, "dataset_info", None) or builder.info
    encoded = True
    if len(ds):
        try:
            ds[0]
        except ImportError:  # the source can only encode its records with TensorFlow (mock_data)
            logging.info("%s: the source cannot hand out encoded images; using its pixels", name)
            ds, encoded = source(None), False
    return ds, info, image_key, label_key, encoded


def load(data_config) -> ImageSet:
    """The records of ``data.tfds_split`` of TFDS dataset ``data.name`` as an `ImageSet`.

    Raises:
      DataError: the dataset is unknown, not prepared (nothing is downloaded; the message says how
        to prepare it), prepared in a format that needs TensorFlow, has no such split, no
        image/label features, or records that cannot be decoded.
    """
    name = str(data_config.name or "").strip()
    if not name:
        raise DataError(
            "data.name is empty. Fix: set --config.data.name to a TFDS dataset, e.g. 'malaria' "
            "or 'colorectal_histology'."
        )
    data_dir = str(data_config.data_dir or "").strip()
    data_dir = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else ""
    split = str(data_config.tfds_split or "train").strip()
    image_size = folder._check_size(data_config.image_size)

    import tensorflow_datasets as tfds  # deferred: ~0.5 s to import, only this source needs it

    with _scratch_tempdir():
        ds, info, image_key, label_key, encoded = _open(tfds, name, split, data_dir)
    label_feature = info.features[label_key]
    class_names = tuple(getattr(label_feature, "names", None) or ())
    if len(class_names) < 2:
        raise DataError(
            f"TFDS dataset {name!r}: feature {label_key!r} is not a class label with >= 2 names "
            f"({label_feature!r}). Fix: use an image classification dataset."
        )
    image_shape = getattr(info.features[image_key], "shape", None) or (None, None, None)
    native = image_shape[-1] if image_shape and image_shape[-1] in (1, 3) else 3
    channels = folder.resolve_channels(data_config.channels, default=native)
    count = len(ds)
    if count == 0:
        raise DataError(
            f"TFDS dataset {name!r} split {split!r} has no records. Fix: set data.tfds_split to a "
            "split with data."
        )

    labels = np.zeros(count, np.int32)

    def fetch(i: int):
        record = ds[i]
        labels[i] = int(record[label_key])
        value = record[image_key]
        if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.size == 1:
            value = value.item()
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        return np.asarray(value)

    def describe(i: int) -> str:
        return f"{name}:{split}[{i}]"

    decoded = folder.decode_many(
        count,
        fetch,
        describe,
        image_size=image_size,
        channels=channels,
        cache_dir=str(data_config.cache_dir or ""),
        label=f"reading {name}:{split}",
    )
    if decoded.failures:
        raise DataError(
            f"{len(decoded.failures)} record(s) of TFDS dataset {name!r} ({split}) cannot be "
            "decoded:\n"
            + folder._listing([f"{describe(i)}: {e}" for i, e in decoded.failures])
            + f"\nFix: the prepared files are damaged; prepare {name!r} again. "
            + _prepare_hint(name, data_dir)
        )
    if not encoded:
        logging.info("%s: %d records read as decoded pixels", name, count)

    keep = np.ones(count, bool)
    conflicting, repeated = folder.find_duplicates(decoded.digests, labels.tolist())
    for members in repeated:
        keep[members[1:]] = False
    for members in conflicting:
        keep[members] = False
    if repeated or conflicting:
        lines = [
            f"  {describe(m[0])} kept; identical: {', '.join(describe(i) for i in m[1:])}"
            for m in repeated
        ]
        lines += [
            "  all skipped, identical content with labels "
            + ", ".join(f"{describe(i)}={class_names[labels[i]]}" for i in m)
            for m in conflicting
        ]
        logging.warning(
            "TFDS dataset %s: %d record(s) with duplicate content are skipped, so no image is in "
            "two splits:\n%s",
            name,
            int((~keep).sum()),
            "\n".join(lines),
        )
    index = np.flatnonzero(keep)
    return ImageSet(
        images=decoded.images if keep.all() else decoded.images[index],
        labels=labels[index],
        class_names=class_names,
        groups=None,
        split=None,
        paths=np.array([describe(i) for i in index], dtype=str),
    )
