"""The in-memory image set every data source produces (synthetic, folder, TFDS)."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np


class DataError(ValueError):
    """The data a config names cannot be used as it is (the message names the files and the fix)."""


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Decoded images with their labels, held in host memory.

    Attributes:
      images: uint8 array ``[N, H, W, C]`` (C = 1 or 3), already resized to the run's image size.
      labels: int32 array ``[N]`` with values in ``[0, len(class_names))``.
      class_names: one name per class, index = label.
      groups: optional int64 array ``[N]``: a patient / ear / video id. When present, every split
        and every chain fraction is group-disjoint.
      split: optional array ``[N]`` of strings ``"train" | "val" | "test" | ""`` fixing a user's own
        split ("" = assign automatically).
      paths: optional array ``[N]`` of strings naming where each image came from (for messages).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    groups: np.ndarray | None = None
    split: np.ndarray | None = None
    paths: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}"
            )
        for name in ("labels", "groups", "split", "paths"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def take(self, index: np.ndarray) -> ImageSet:
        """The subset at ``index`` (an int array), with every per-image field sliced alike."""

        def pick(value):
            return None if value is None else value[index]

        return ImageSet(
            images=self.images[index],
            labels=self.labels[index],
            class_names=self.class_names,
            groups=pick(self.groups),
            split=pick(self.split),
            paths=pick(self.paths),
        )


def fingerprint(data: ImageSet) -> dict[str, str]:
    """SHA-256 digests of what a run reads from ``data``, in two parts:

    * ``examples``: class names, image count and shape, labels, groups and fixed splits -- all
      that the splits and chain fractions are computed from. Equal iff a run's splits are the
      same examples.
    * ``pixels``: the decoded images. These can differ by rounding for the same files or the same
      synthetic seed on another CPU, numpy or Pillow version.
    """
    examples = hashlib.sha256(repr((data.class_names, data.images.shape)).encode())
    for value in (data.labels, data.groups, data.split):
        if value is None:
            examples.update(b"none")
        elif value.dtype.kind in "OUS":  # strings: their text, not object pointers
            examples.update("\0".join(map(str, value)).encode())
        else:
            examples.update(np.ascontiguousarray(value).data)
    pixels = hashlib.sha256(np.ascontiguousarray(data.images).data)
    return {"examples": examples.hexdigest(), "pixels": pixels.hexdigest()}
