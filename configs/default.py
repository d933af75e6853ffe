"""The embedded default run: otoscopy-like synthetic images, 3 links x 10 % of the train pool,
ResNet-18 (width 32, ImageNet stem) at 64x64, with the union and full-supervision baselines."""

from weckd_jax.config import get_config  # noqa: F401
