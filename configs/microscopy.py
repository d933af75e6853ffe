"""Synthetic microscopy-like RGB images (stained blood-cell morphologies), 3 links x 10 %."""

from weckd_jax.config import base_config


def get_config():
    c = base_config()
    c.data.modality = "microscopy"
    return c
