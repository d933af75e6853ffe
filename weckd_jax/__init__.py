"""weckd_jax: weakly-supervised chained knowledge distillation (WeCKD) in JAX/Flax.

`weckd_jax.losses` is a dependency-light library of pure loss functions; the rest of the package
(models, data, training, the chain) is imported on demand so that importing the losses stays cheap.
"""

__version__ = "0.1.0"
