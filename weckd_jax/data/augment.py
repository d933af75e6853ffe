"""Image preprocessing and light augmentation as pure JAX functions, run inside the train step.

Augmenting on the device keeps the host pipeline to gathering uint8 rows, and lets the frozen
teacher see exactly the augmented view the student sees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_float(images: jax.Array) -> jax.Array:
    """uint8 ``[B, H, W, C]`` in 0..255 -> float32 in about [-2, 2] (mean 0.5, scale 0.25)."""
    return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.25


def augment(
    images: jax.Array,
    rng: jax.Array,
    *,
    flip: bool = True,
    max_shift: int = 4,
    intensity: float = 0.1,
) -> jax.Array:
    """Random horizontal flip, shift (reflect-padded crop) and brightness/contrast jitter.

    Args:
      images: float32 ``[B, H, W, C]`` as returned by `to_float`.
      rng: a PRNG key; each example draws its own transform from it.
      flip: flip left-right with probability 1/2.
      max_shift: largest shift in pixels along each axis (0 = none).
      intensity: brightness offset and contrast factor are drawn from ``±intensity``
        (in units of the normalised scale; 0 = none).

    Returns:
      float32 ``[B, H, W, C]``, same shape.
    """
    b, h, w, _ = images.shape
    k_flip, k_shift, k_bright, k_contrast = jax.random.split(rng, 4)
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
        images = jnp.where(do_flip, images[:, :, ::-1, :], images)
    if max_shift > 0:
        pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
        padded = jnp.pad(images, pad, mode="reflect")
        offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * max_shift + 1)

        def crop(image, offset):
            return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

        images = jax.vmap(crop)(padded, offsets)
    if intensity > 0:
        shape = (b, 1, 1, 1)
        brightness = jax.random.uniform(k_bright, shape, minval=-intensity, maxval=intensity)
        contrast = 1.0 + jax.random.uniform(k_contrast, shape, minval=-intensity, maxval=intensity)
        mean = images.mean(axis=(1, 2, 3), keepdims=True)
        images = (images - mean) * contrast + mean + brightness
    return images
