"""TFDS by name without TensorFlow (weckd_jax.data.tfds_data): a real array_record dataset written
here by a tiny builder (no download), ``tfds.testing.mock_data`` for catalogue datasets, the
errors, and the TFDS configs."""

import importlib
import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tests.conftest import REPO
from weckd_jax import config as config_lib
from weckd_jax.data import folder, tfds_data
from weckd_jax.data.types import DataError

S = 24
NAME = "weckd_test_scans"


def data_config(**overrides):
    c = config_lib.base_config().data
    c.source = "tfds"
    c.image_size = S
    c.cache_dir = "none"
    for key, value in overrides.items():
        c[key] = value
    return c


def _encoded(i: int) -> bytes:
    """Record i: RGB noise of a size that varies, PNG or JPEG."""
    rng = np.random.default_rng(i)
    array = rng.integers(0, 256, (10 + 3 * (i % 5), 30 - 2 * (i % 4), 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG" if i % 3 == 0 else "PNG")
    return buffer.getvalue()


# train: 10 distinct records + a same-label copy of record 0 + a relabelled copy of record 1.
TRAIN = [(_encoded(i), i % 2) for i in range(10)] + [(_encoded(0), 0), (_encoded(1), 0)]
TEST = [(_encoded(100 + i), i % 2) for i in range(4)]


with tfds.core.registered.skip_registration():  # read back from its files, like a custom dataset

    class WeckdTestScans(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(names=["parasitized", "uninfected"]),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(TRAIN), "test": self._generate_examples(TEST)}

        def _generate_examples(self, records):
            for i, (data, label) in enumerate(records):
                yield i, {"image": data, "label": label}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data_dir holding WeckdTestScans as array_record, written without TensorFlow."""
    data_dir = tmp_path_factory.mktemp("tfds")
    with tfds_data._scratch_tempdir():  # the builder's empty folder from GCS lookup goes with it
        WeckdTestScans(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


def test_array_record_images_get_the_folder_preprocessing(prepared, caplog, monkeypatch):
    def no_pixels(*args, **kwargs):
        raise AssertionError("real array_record records must be read as encoded bytes")

    monkeypatch.setattr(folder, "_array_image", no_pixels)
    with caplog.at_level(logging.WARNING):
        data = tfds_data.load(data_config(name=NAME, data_dir=prepared))
    assert data.class_names == ("parasitized", "uninfected")
    assert data.images.shape == (9, S, S, 3) and data.images.dtype == np.uint8
    assert data.groups is None and data.split is None
    assert all(p.startswith(f"{NAME}:train[") for p in data.paths)
    # Exactly the bytes-to-array preprocessing of folders (and of decode_image on a file).
    expected = {i: folder.decode_bytes(TRAIN[i][0], image_size=S, channels=3) for i in range(2, 10)}
    expected[0] = folder.decode_bytes(TRAIN[0][0], image_size=S, channels=3)
    for image, label in zip(data.images, data.labels, strict=True):
        matches = [i for i, e in expected.items() if (e == image).all()]
        assert len(matches) == 1 and label == TRAIN[matches[0]][1]
    # Record 0 twice with one label: one copy kept; record 1 with two labels: both dropped.
    assert "duplicate content are skipped" in caplog.text
    assert "all skipped" in caplog.text and "parasitized" in caplog.text


def test_pooled_splits_channels_and_cache_hit(prepared, tmp_path, monkeypatch):
    cache_dir = str(tmp_path / "cache")
    config = data_config(name=NAME, data_dir=prepared, tfds_split="train+test", cache_dir=cache_dir)
    first = tfds_data.load(config)
    assert len(first) == 9 + 4
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 14  # distinct contents

    def fail(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder, "_open_and_preprocess", fail)
    second = tfds_data.load(config)
    assert (second.images == first.images).all() and (second.labels == first.labels).all()
    monkeypatch.undo()
    gray = tfds_data.load(data_config(name=NAME, data_dir=prepared, channels=1))
    assert gray.images.shape == (9, S, S, 1)


def test_mock_data_catalogue_dataset_without_tensorflow():
    with tfds.testing.mock_data(num_examples=7):
        data = tfds_data.load(data_config(name="malaria"))
    assert data.class_names == ("parasitized", "uninfected")
    assert data.images.shape == (7, S, S, 3) and set(data.labels.tolist()) <= {0, 1}


def test_not_prepared_says_how_to_prepare_and_downloads_nothing(tmp_path):
    with pytest.raises(DataError) as e:
        tfds_data.load(data_config(name="malaria", data_dir=str(tmp_path)))
    message = str(e.value)
    assert "not prepared" in message and "Nothing is downloaded" in message
    assert f"tfds build malaria --data_dir {tmp_path} --file_format array_record" in message
    assert "download_and_prepare()" in message
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


LEAVES_NOTHING = """
import sys
import tensorflow_datasets as tfds
from tests.test_tfds_data import data_config
from weckd_jax.data import tfds_data
from weckd_jax.data.types import DataError

prepared, unprepared = sys.argv[1:]
assert len(tfds_data.load(data_config(name="weckd_test_scans", data_dir=prepared))) == 9
with tfds.testing.mock_data(num_examples=3):
    assert len(tfds_data.load(data_config(name="malaria"))) == 3
try:
    tfds_data.load(data_config(name="malaria", data_dir=unprepared))
except DataError as e:
    assert "not prepared" in str(e), e
else:
    raise AssertionError("an unprepared dataset was read")
"""


def test_reading_leaves_nothing_in_the_temporary_directory(prepared, tmp_path):
    # TFDS makes an empty folder in $TMPDIR for each builder of a registered dataset that is not
    # prepared (an unprepared one, or any under mock_data), and never removes it.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", LEAVES_NOTHING, prepared, str(tmp_path / "unprepared")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(scratch)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.listdir(scratch) == []


@pytest.mark.parametrize(
    "overrides,needles",
    [
        ({"name": "no_such_dataset_xyz"}, ["not a TFDS dataset", "catalogue"]),
        ({"name": ""}, ["data.name is empty", "malaria"]),
        ({"name": NAME, "tfds_split": "validation"}, ["'validation'", "Available splits", "train"]),
        ({"name": NAME, "channels": 2}, ["data.channels=2"]),
    ],
)
def test_bad_config_is_a_data_error(prepared, tmp_path, overrides, needles):
    overrides.setdefault("data_dir", prepared if overrides.get("name") == NAME else str(tmp_path))
    with pytest.raises(DataError) as e:
        tfds_data.load(data_config(**overrides))
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


@pytest.mark.parametrize(
    "module,name,classes",
    [
        ("configs.malaria_tfds", "malaria", 2),
        ("configs.colorectal_tfds", "colorectal_histology", 8),
    ],
)
def test_tfds_configs_validate_and_load(module, name, classes):
    config = importlib.import_module(module).get_config()
    config_lib.validate(config)
    assert config.data.source == "tfds" and config.data.name == name
    config.data.cache_dir = "none"
    with tfds.testing.mock_data(num_examples=3):
        data = tfds_data.load(config.data)
    size = config.data.image_size
    assert data.images.shape == (3, size, size, 3) and data.num_classes == classes
