"""The run configuration: every key with its default, and the checks a config must pass.

`configs/*.py` files expose ``get_config()`` returning `base_config()` with some keys changed; any
key can be overridden on the command line (``--config.chain.length=4``).
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """All keys of a run with their defaults (the embedded otoscopy-like default run)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # "synthetic" (embedded generator)
    c.data.modality = "otoscopy"  # synthetic: "otoscopy" | "microscopy" | "mri"
    c.data.num_images = 3000  # synthetic: images generated
    c.data.difficulty = 1.0  # synthetic: nuisance strength / class overlap
    c.data.images_per_group = 4  # synthetic: images per synthetic patient
    c.data.image_size = 64  # side in pixels the images are resized to
    c.data.val_fraction = 0.15  # share of all images held out for model selection
    c.data.test_fraction = 0.2  # share of all images held out for the final test

    c.chain = ml_collections.ConfigDict()
    c.chain.length = 3  # number of links N
    c.chain.fraction = 0.1  # share of the train pool each link trains on
    c.chain.label_ratio = 1.0  # share of each fraction that keeps its labels
    c.chain.dense = False  # link k learns from all earlier links, not only k-1
    c.chain.init_from_teacher = False  # warm-start link k from link k-1 when architectures match

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "resnet18"  # a name, or one per link: "resnet18,mobilenetv2,resnet18"
    c.model.width = 32  # first-stage channels (ResNet) / stem channels (MobileNetV2)
    c.model.stem = "imagenet"  # "small" (3x3/1, 32-64 px) | "imagenet" (7x7/2 + max-pool)
    c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (params stay float32)

    c.distill = ml_collections.ConfigDict()
    c.distill.alpha = 0.7  # weight of the KD term on labelled examples (1 on unlabelled)
    c.distill.attention_weight = 1.0  # beta, weight of attention transfer (0 = off)
    c.distill.attention_p = 2  # exponent p of the attention maps sum_c |F_c|^p
    c.distill.t_max = 6.0  # temperature at the start of a link
    c.distill.t_min = 2.0  # temperature at the end of a link
    c.distill.schedule = "cosine"  # "constant" (t_max) | "linear" | "cosine"

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 30  # epochs per link and baseline
    c.train.batch_size = 32  # global batch size (over all devices)
    c.train.eval_batch_size = 256
    c.train.optimizer = "adamw"  # "adamw" | "sgd" (Nesterov momentum)
    c.train.learning_rate = 2e-3
    c.train.momentum = 0.9  # sgd only
    c.train.weight_decay = 0.05
    c.train.warmup_epochs = 1
    c.train.label_smoothing = 0.0
    c.train.augment = True  # random flip, shift and intensity jitter, on the device
    c.train.flip = True
    c.train.max_shift = 4  # pixels
    c.train.intensity = 0.1
    c.train.eval_every = 1  # validate every this many epochs (the best one is kept)

    c.baselines = ml_collections.ConfigDict()
    c.baselines.union_supervised = True  # one backbone on the union of the fractions
    c.baselines.full_supervised = True  # one backbone on the whole train pool (upper bound)
    return c


def backbones(config) -> tuple[str, ...]:
    """One backbone name per link (``model.backbone`` may be one name, a tuple or a comma list)."""
    value = config.model.backbone
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names]
    if len(names) == 1:
        names = names * config.chain.length
    return tuple(names)


def get_config() -> ml_collections.ConfigDict:
    """Makes this module a config file itself: the embedded default run."""
    return base_config()
