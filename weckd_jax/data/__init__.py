"""Data sources, splits and input pipelines."""

from __future__ import annotations

from weckd_jax.data.types import ImageSet

SOURCES = ("synthetic",)


def load(data_config, *, seed: int) -> ImageSet:
    """Decodes the images a config names into host memory.

    ``data.source`` picks the source: ``"synthetic"`` (the embedded generator,
    `synthetic.generate`).
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
    raise ValueError(f"unknown data.source {data_config.source!r}; valid: {', '.join(SOURCES)}")
