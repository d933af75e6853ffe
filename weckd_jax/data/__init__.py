"""Data sources, splits and input pipelines."""

from __future__ import annotations

from weckd_jax.data.types import DataError, ImageSet

SOURCES = ("synthetic", "folder", "tfds")

__all__ = ["SOURCES", "DataError", "ImageSet", "load"]


def load(data_config, *, seed: int) -> ImageSet:
    """Decodes the images a config names into host memory.

    ``data.source`` picks the source: ``"synthetic"`` (the embedded generator,
    `synthetic.generate`), ``"folder"`` (`folder.load`: ``DIR/<class>/<image>`` with an optional
    manifest) or ``"tfds"`` (`tfds_data.load`: a prepared TFDS dataset, read without TensorFlow).

    Raises:
      DataError: the data cannot be used; the message names the files and the fix.
    """
    if data_config.source == "synthetic":
        from weckd_jax.data import synthetic

        return synthetic.generate(
            data_config.modality,
            num_images=data_config.num_images,
            image_size=data_config.image_size,
            seed=seed,
            difficulty=data_config.difficulty,
            images_per_group=data_config.images_per_group,
        )
    if data_config.source == "folder":
        from weckd_jax.data import folder

        return folder.load(data_config)
    if data_config.source == "tfds":
        from weckd_jax.data import tfds_data

        return tfds_data.load(data_config)
    raise DataError(f"unknown data.source {data_config.source!r}; valid: {', '.join(SOURCES)}")
