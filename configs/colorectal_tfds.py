"""Colorectal cancer histology from TFDS (``colorectal_histology``, Kather et al. 2016): 5,000
H&E tissue tiles of 150 x 150 px in 8 classes (tumour, stroma, complex, lympho, debris, mucosa,
adipose, empty), read without TensorFlow.

Prepare once, on a machine with TensorFlow and network access (nothing is downloaded at train
time), then copy the folder to the training machine::

    tfds build colorectal_histology --data_dir ~/tensorflow_datasets --file_format array_record

and run ``python -m weckd_jax.launch --config configs/colorectal_tfds.py
--config.data.data_dir=~/tensorflow_datasets``. The layout is TFDS's:
``DATA_DIR/colorectal_histology/2.0.0/colorectal_histology-train.array_record-*`` plus
``dataset_info.json`` and ``features.json``. The dataset has a single ``train`` split; our own
class-stratified train/val/test split is made from it.

The tiles carry no patient / slide ids, so splits are image-level (tiles of one slide can be in
train and test). Tiles are resized from 150 to 128 px (square, so nothing is padded).
"""

from weckd_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds"
    c.data.name = "colorectal_histology"
    c.data.data_dir = ""  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.tfds_split = "train"
    c.data.channels = 0  # as the dataset gives: RGB
    c.data.image_size = 128
    c.model.stem = "imagenet"
    return c
