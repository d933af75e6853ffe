"""Brain tumour MRI slices from a folder, grayscale (1 channel), 4 classes.

Layout (``--config.data.root=DIR``; class names are the sorted folder names)::

    DIR/
      glioma/       Tr-gl_0010.jpg, ...        (nested folders under a class are fine)
      meningioma/   ...
      no_tumor/     ...
      pituitary/    ...
      manifest.csv  optional: path,label[,group][,split]

The Kaggle "Brain Tumor MRI Dataset" ships ``Training/<class>`` and ``Testing/<class>`` with a
``notumor`` folder: move the class folders of both into ``DIR`` (renaming ``notumor`` to
``no_tumor`` if you want that name), or keep them where they are and write a manifest with
``path,label,split`` rows (``Testing/glioma/Te-gl_0010.jpg,glioma,test``) to keep its test split.
Exact duplicates are found by content hash: the same image in two classes stops the run, the
same image twice in one class is used once (that dataset has such copies).

Images (8- or 16-bit grayscale, or RGB renderings, any size) are converted to one channel
(16-bit scaled min..max to 0..255), letterboxed to 128 x 128 with black padding and cached
decoded under ``~/.cache/weckd_jax``. Without patient ids (a ``group`` column, or
``--config.data.group_regex`` such as ``'(sub-\\d+)'``) slices of one patient can fall into train
and test; the run reports the split level.

Run: ``python -m weckd_jax.launch --config configs/brain_mri_folder.py
--config.data.root=/data/brain_mri``.
"""

from weckd_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "folder"
    c.data.root = "data/brain_mri"  # override: --config.data.root=DIR
    c.data.channels = 1  # grayscale
    c.data.image_size = 128
    c.model.stem = "imagenet"
    return c
