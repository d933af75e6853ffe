"""On-disk cache of decoded, resized images, so a dataset is decoded once, not once per run.

An entry is one ``.npy`` file holding the uint8 ``[S, S, C]`` image exactly as the preprocessing
returned it. It is keyed by

* the SHA-256 of the **encoded file content** (not its path: renaming or moving a file, or the same
  image in two datasets, still hits the cache; editing a file in place misses it), and
* the preprocessing settings: image side ``S``, channels ``C`` and the preprocessing version
  (`weckd_jax.data.folder.PREPROCESS_VERSION`, raised whenever the decoding or resizing changes),

laid out as ``<root>/images-v<version>-<S>px-<C>ch/<first 2 hex digits>/<sha256>.npy``.

``data.cache_dir`` picks the root: ``""`` = ``$XDG_CACHE_HOME/weckd_jax`` (``~/.cache/weckd_jax``
when ``XDG_CACHE_HOME`` is unset), ``"none"`` = no disk cache, anything else = that folder.

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so concurrent runs and
killed runs never leave a partial entry under a final name. An entry that cannot be read back (a
damaged disk, a foreign file) is a cache miss and is rewritten. A cache folder that cannot be
written to is reported once and the run goes on without writing to it.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from absl import logging

from weckd_jax import files

__all__ = ["ImageCache", "cache_root"]


def cache_root(cache_dir: str) -> str | None:
    """The cache folder ``data.cache_dir`` names, or None when caching is off (``"none"``)."""
    value = (cache_dir or "").strip()
    if value.lower() == "none":
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "weckd_jax")


class ImageCache:
    """Decoded images of one preprocessing setting, keyed by the SHA-256 of the encoded bytes.

    Thread-safe: entries are written atomically, and ``get``/``put`` may run in many threads.
    ``root=None`` is a cache that never hits and never writes.
    """

    def __init__(self, root: str | None, *, image_size: int, channels: int, version: int):
        self.shape = (image_size, image_size, channels)
        self.folder = (
            None
            if root is None
            else os.path.join(root, f"images-v{version}-{image_size}px-{channels}ch")
        )
        self.hits = 0
        self.misses = 0
        self._writable = self.folder is not None
        self._lock = threading.Lock()

    def _path(self, digest: str) -> str:
        return os.path.join(self.folder, digest[:2], f"{digest}.npy")

    def get(self, digest: str) -> np.ndarray | None:
        """The cached image for ``digest``, or None (a miss)."""
        if self.folder is None:
            with self._lock:
                self.misses += 1
            return None
        path = self._path(digest)
        try:
            image = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            image = None
        except (OSError, ValueError, EOFError):
            logging.warning("image cache: unreadable entry %s is ignored and rewritten", path)
            image = None
        if image is not None and (image.dtype != np.uint8 or image.shape != self.shape):
            logging.warning("image cache: entry %s has the wrong shape; rewritten", path)
            image = None
        with self._lock:
            if image is None:
                self.misses += 1
            else:
                self.hits += 1
        return image

    def put(self, digest: str, image: np.ndarray) -> None:
        """Stores ``image`` under ``digest`` atomically; never raises for a cache problem."""
        if not self._writable:
            return
        try:
            # No fsync: a cache entry lost in a crash is decoded again.
            with files.atomic_file(self._path(digest), "wb", sync=False) as f:
                np.save(f, np.ascontiguousarray(image, np.uint8), allow_pickle=False)
        except OSError as e:
            with self._lock:
                if self._writable:
                    self._writable = False
                    logging.warning(
                        "image cache: cannot write to %s (%s); going on without writing decoded "
                        "images there. Set data.cache_dir to a writable folder, or to 'none'.",
                        self.folder,
                        e,
                    )
