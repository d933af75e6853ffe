"""Synthetic MRI-like grayscale brain slices (1 channel, 4 classes), 3 links x 10 %."""

from weckd_jax.config import base_config


def get_config():
    c = base_config()
    c.data.modality = "mri"
    return c
