"""Otoscopy images from a folder: RGB eardrum photographs / video frames, one folder per class.

Layout (``--config.data.root=DIR``; class names are the sorted folder names, so any classes work)::

    DIR/
      normal/                 ear012_left_f03.jpg, ...
      acute_otitis_media/     ...
      chronic_otitis_media/   ...
      earwax/                 ...          (nested folders under a class are fine)
      manifest.csv            optional: path,label[,group][,split]

PNG, JPEG, BMP and TIFF of any size are read; each is letterboxed to 128 x 128 (the longer side
resized, the shorter padded with black: the dark surround of an otoscope frame) and cached
decoded under ``~/.cache/weckd_jax``.

Patient / ear ids matter most here: frames of one ear or one video look nearly identical, and
frame-level splits inflate accuracy from ~83 % to ~99 % (arXiv 2511.04872). Give them either as a
``group`` column in ``DIR/manifest.csv`` (``path,label,group``, e.g.
``normal/ear012_left_f03.jpg,normal,ear012_left``) or with a regular expression on the path, e.g.
``--config.data.group_regex='(ear\\d+_(?:left|right))'``. Without them splits are image-level and
the run says so. A ``split`` column (train/val/test/empty) keeps your own split.

Run: ``python -m weckd_jax.launch --config configs/otoscopy_folder.py
--config.data.root=/data/otoscopy``.
"""

from weckd_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "folder"
    c.data.root = "data/otoscopy"  # override: --config.data.root=DIR
    c.data.group_regex = ""  # e.g. r"(ear\d+_(?:left|right))" when ids are in the file names
    c.data.channels = 3
    c.data.image_size = 128
    c.model.stem = "imagenet"
    return c
