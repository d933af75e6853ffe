"""The config a run or a search recorded in its folder (``DIR/config.json``):

    python -m weckd_jax.launch --config configs/from_run.py:DIR --workdir DIR   # resume or reload
    python -m weckd_jax.launch --config configs/from_run.py:DIR --config.seed=1  # another seed
    python -m weckd_jax.evaluate --workdir DIR --config configs/from_run.py:DIR \\
        --config.data.root=OTHER_HOSPITAL --split all   # a run on a folder of images

DIR is a run of ``launch``, a multi-seed experiment or one of its ``seed_<s>/`` runs, or a search
of ``tune``; ``--config.KEY=VALUE`` overrides apply as to any config. See
`weckd_jax.config.from_run`.
"""

from weckd_jax.config import from_run


def get_config(folder: str = ""):
    return from_run(folder)
