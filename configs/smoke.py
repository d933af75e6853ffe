"""A run of a few seconds for tests: tiny images, a tiny network, 2 links, few steps."""

from weckd_jax.config import base_config


def get_config():
    c = base_config()
    c.data.num_images = 240
    c.data.image_size = 32
    c.data.val_fraction = 0.2
    c.data.test_fraction = 0.2
    c.chain.length = 2
    c.chain.fraction = 0.3
    c.model.backbone = "resnet10"
    c.model.width = 8
    c.model.stem = "small"
    c.train.epochs = 2
    c.train.batch_size = 16
    c.train.eval_batch_size = 64
    return c
