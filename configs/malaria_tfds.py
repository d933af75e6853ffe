"""NIH malaria cell images from TFDS (``malaria``): thin blood smear cells, parasitized vs
uninfected, 27,558 RGB images of about 100-150 px, read without TensorFlow.

Prepare once, on a machine with TensorFlow and network access (nothing is downloaded at train
time), then copy the folder to the training machine::

    tfds build malaria --data_dir ~/tensorflow_datasets --file_format array_record

and run ``python -m weckd_jax.launch --config configs/malaria_tfds.py
--config.data.data_dir=~/tensorflow_datasets``. The layout is TFDS's:
``DATA_DIR/malaria/1.0.0/malaria-train.array_record-*`` plus ``dataset_info.json`` and
``features.json``. ``malaria`` has a single ``train`` split; our own class-stratified
train/val/test split is made from it.

The records carry no patient ids (the cells come from 200 patients), so splits are image-level:
cells of one patient can be in train and test, which flatters the scores. Images are kept at 96 px
(cells are small; 27.5k images x 96^2 x 3 = 0.8 GB in memory), letterboxed to a square.
"""

from weckd_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "tfds"
    c.data.name = "malaria"
    c.data.data_dir = ""  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.tfds_split = "train"
    c.data.channels = 0  # as the dataset gives: RGB
    c.data.image_size = 96  # multiple of 32 (the ImageNet stem's last stride)
    c.model.stem = "imagenet"
    return c
