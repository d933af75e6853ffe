"""Image folders: ``DIR/<class>/<image>``, an optional manifest with patient ids and a fixed split.

Layout (``data.source = "folder"``, ``data.root = DIR``)::

    DIR/
      glioma/       P001_slice07.png, P001_slice08.png, sub/folders/are/fine.tif, ...
      meningioma/   ...
      manifest.csv  (optional)

* Class names are the sorted names of the folders directly under ``DIR``; labels index them.
  Folders nested under a class folder belong to that class.
* Images: PNG, JPEG, BMP, TIFF (``.png .jpg .jpeg .bmp .tif .tiff``, any case); RGB, RGBA,
  palette, 1-bit, grayscale, 16-bit grayscale and 16-bit-per-channel RGB/RGBA (PNG, TIFF); any
  size. Decoded with Pillow.
* Optional manifest: ``DIR/manifest.csv`` or ``data.manifest`` (a CSV file anywhere), with a header
  naming the columns ``path,label[,group][,split]``:

  - ``path``: the image, relative to ``DIR`` (to the manifest's folder when ``data.root`` is
    empty) or absolute (see `_listed_file` for backslashes and Unicode forms). With a manifest,
    the manifest alone says which images are used and what their labels are (the class names are
    its sorted labels); folders do not matter.
  - ``group``: a patient / ear / video id. Every split and chain fraction keeps a group whole.
  - ``split``: ``train``, ``val``, ``test`` or empty, fixing a user's own split; empty rows are
    split automatically. A group whose rows name one split and leave others empty has the empty
    ones set to that split (with a warning), so a patient never straddles two splits.

* ``data.group_regex`` (instead of a ``group`` column): a regular expression searched in each
  image's path relative to ``DIR`` (to the manifest's folder when ``data.root`` is empty;
  ``/``-separated); its first capture group is the patient id,
  e.g. ``r"(P\\d+)_"`` for ``glioma/P001_slice07.png``, or ``r"^[^/]+/([^/]+)/"`` for one folder
  per patient (``glioma/P001/slice07.png``).

Preprocessing (`decode_image`, the one function training, TFDS and prediction all use):

1. Decode with Pillow (first frame of a multi-page file, with a warning); apply the EXIF
   orientation. A large JPEG is decoded at a reduced DCT scale (Pillow's ``draft``: 1/2, 1/4 or
   1/8, never below twice the final size), which is several times faster.
2. Intensities: 16-bit (and 32-bit/float) grayscale is scaled linearly from the image's own
   minimum..maximum to 0..255 (nothing is clipped; a constant image becomes 0); so is 16-bit
   colour, with one minimum..maximum for all its channels (hues are kept), decoded at full
   precision (Pillow alone keeps the top 8 bits); transparency is composited over black; then RGB
   (``channels=3``, grayscale replicated) or grayscale (``channels=1``, ITU-R 601-2 luma for
   colour images).
3. Aspect ratio is kept: the longer side is resized to ``image_size`` (bicubic, antialiased) and
   the shorter side is padded with black, centred ("letterbox"). Nothing is cropped away (a lesion
   at the border of a frame stays in the image) and nothing is stretched. Square images are only
   resized.

What happens to bad input -- nothing is dropped silently: every skipped file is named in an
``absl.logging`` warning, and every fatal problem is a `DataError` naming the file(s) and the fix,
raised before anything trains:

====================================================  =================================
input                                                 outcome
====================================================  =================================
``data.root`` missing / not a folder / empty          fatal
images directly in ``DIR`` (as in one class's         fatal with no class folder or a
  folder: ``data.root`` one level too deep)           single one, else left out and
                                                      warned naming the classes; both
                                                      say to point ``data.root`` at
                                                      the folder holding the classes
a class folder with no images                         fatal
a single class                                        fatal
one class name in two Unicode forms (folders or       fatal (it would be two classes that
  labels: "é" as one letter and as "e" + accent)      print the same)
an image that cannot be decoded (damaged, truncated,  fatal, all such files listed at once
  empty, a broken symbolic link, not really an
  image, unsupported mode, over 8 bits per channel
  in a layout Pillow cuts to 8 bits: 16-bit gray +
  alpha, CMYK, planar TIFF)
a broken symbolic link under ``DIR`` whatever its     fatal (what it pointed to, e.g. a
  name (a class folder, a folder in one)              class, would be left out)
an image over Pillow's decompression-bomb limit       fatal (the limit stays on)
the same content in two classes (by SHA-256)          fatal (conflicting labels)
the same content twice in one class                   later copies skipped, warned
a manifest naming missing files / DICOM or NIfTI      fatal (DICOM/NIfTI with a conversion
  files / the same path twice / empty path or         hint)
  label / a bad split value
a manifest without ``path`` and ``label`` columns     fatal
``group_regex`` invalid / without a capture group /   fatal
  not matching an image's path
a group split between two fixed splits                fatal
a group with images in two or more classes (two       warned, each named with its count
  ears, or a wrong label or id)                       per class
a ``group`` column and ``data.group_regex`` together  fatal
an empty ``group`` cell                               fatal
too few images/groups of a class for val, test and    fatal, in `check_enough`
  every chain fraction
``chain.label_ratio`` leaving fraction 1 unlabelled   fatal, in `check_enough`
non-image files (other extensions, e.g. ``.txt``,     skipped, warned (DICOM/NIfTI
  ``.dcm``), hidden files and folders, other files    files with a conversion hint)
  directly in ``DIR``
images under ``DIR`` that the manifest does not list  skipped, warned
manifest columns other than path/label/group/split    ignored, warned
====================================================  =================================

Decoded images are cached on disk (`weckd_jax.data.cache`) keyed by content hash and
preprocessing settings, so later runs read the cache instead of decoding; decoding runs in a
thread pool (Pillow releases the GIL) and the output order is the sorted path order. A scan that
takes more than a second prints ``scanning DIR: 2500/10000 images`` to stderr at most once a second.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import math
import os
import pathlib
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging
from PIL import Image

from weckd_jax.data import cache as cache_lib
from weckd_jax.data.splits import Splits, class_counts
from weckd_jax.data.types import DataError, ImageSet

__all__ = [
    "IMAGE_EXTENSIONS",
    "PREPROCESS_VERSION",
    "check_enough",
    "decode_bytes",
    "decode_image",
    "load",
    "preprocess",
]

# Raise whenever `preprocess` changes what it returns: it is part of every cache key.
PREPROCESS_VERSION = 2
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MANIFEST_NAME = "manifest.csv"
SPLIT_VALUES = ("train", "val", "test")
_UNSUPPORTED_HINTS = {
    ".dcm": "DICOM",
    ".dicom": "DICOM",
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
    ".nrrd": "NRRD",
}
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Raw modes of 16-bit-per-channel colour that `_full_depth_colour` decodes at full precision (Pillow
# keeps only the top 8 bits of each sample), and the opposite byte order of each (N: native).
_FULL_DEPTH_RAWMODE = re.compile(r"(RGB|RGBA|RGBX);16[BLN]")
_OTHER_BYTE_ORDER = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_LIST_LIMIT = 20

# Fixes named in error messages.
_FIX_DAMAGED = (
    "re-copy or re-export these files, or delete them (with a manifest: leave them out of it) "
    "to go on without them"
)
# For each `_BadImage` kind: what is wrong with the images, and the fix.
_BAD_IMAGE_FIXES = {
    "damaged": ("cannot be decoded", _FIX_DAMAGED),
    "empty": (
        "are empty files (0 bytes)",
        "re-copy or re-export them (an interrupted copy, download or export leaves empty files), "
        "or delete them (with a manifest: leave them out of it) to go on without them",
    ),
    "link": (
        "are broken symbolic links (what they point to does not exist)",
        "point the links at existing files (e.g. mount the drive or restore the folder they point "
        "into), or delete the links (with a manifest: leave them out of it) to go on without "
        "them",
    ),
    "depth": (
        "have more than 8 bits per channel in a layout Pillow cannot decode at full precision (at "
        "best it keeps the top 8 bits: 12-bit data comes out nearly black)",
        "convert them to 8 bits per channel, stretched to the full 0..255 range (12-bit data "
        "divided by 257 comes out nearly black), or to 16-bit RGB/RGBA PNG or TIFF (one plane, "
        "not CMYK), or to 16-bit grayscale without alpha",
    ),
    "bomb": (
        "are too large to decode safely",
        "downscale or tile them below Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS = {limit} "
        "pixels); the limit guards against decompression bombs and stays on",
    ),
}


# --------------------------------------------------------------------------- preprocessing


class _BadImage(Exception):
    """An image that cannot be used; ``kind`` picks the fix (a key of `_BAD_IMAGE_FIXES`)."""

    def __init__(self, reason: str, kind: str = "damaged"):
        super().__init__(reason)
        self.kind = kind


def resolve_channels(channels: int, default: int = 3) -> int:
    """``data.channels`` as 1 or 3 (0 = ``default``); anything else is a `DataError`."""
    channels = int(channels)
    if channels == 0:
        return default
    if channels not in (1, 3):
        raise DataError(
            f"data.channels={channels} is not supported; use 1 (grayscale), 3 (RGB) or 0 (as the "
            "source gives: 3 for folders)"
        )
    return channels


def _check_size(image_size) -> int:
    if int(image_size) != image_size or image_size < 1:
        raise DataError(f"data.image_size={image_size!r} must be a positive whole number")
    return int(image_size)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """``values`` (any shape, real dtype) scaled linearly from their own min..max to uint8 0..255.

    One scale for the whole array (colour channels keep their ratios); NaN counts as 0; nothing is
    clipped; a constant array becomes 0.
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float64))
    lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.rint(scaled).astype(np.uint8)


def _rawmode(tile) -> str:
    """The raw mode of a Pillow tile: its args, or their first item ("" when that is no text)."""
    args = tile[3]
    if isinstance(args, tuple) and args:
        args = args[0]
    return args if isinstance(args, str) else ""


def _deep_colour(image: Image.Image) -> bool:
    """Whether an unloaded image has over 8 bits per channel that Pillow would cut to 8 bits.

    True for 16-bit-per-channel RGB/RGBA PNG and TIFF (raw modes like ``RGB;16B``), which
    `_full_depth_colour` decodes. Raises `_BadImage` ("depth") for other such layouts (16-bit gray
    with alpha, CMYK, planar TIFF, over 16 bits): Pillow cannot give their full precision.
    Grayscale modes that keep the precision (``I;16``, ``I``, ``F``) are False.
    """
    if image.mode in _HIGH_DEPTH_MODES:
        return False
    rawmodes = sorted({_rawmode(tile) for tile in image.tile})
    bits = tuple(getattr(image, "tag_v2", {}).get(258, ()))  # TIFF BitsPerSample
    wide = any(r.endswith((";16B", ";16L", ";16N")) for r in rawmodes)
    if not wide and max(bits, default=8) <= 8:
        return False
    if (
        bits in ((), (16, 16, 16), (16, 16, 16, 16))
        and rawmodes
        and all(_FULL_DEPTH_RAWMODE.fullmatch(r) for r in rawmodes)
    ):
        return True
    depth = "/".join(map(str, bits)) if bits else "16"
    raise _BadImage(
        f"{depth} bits per channel ({image.mode}, Pillow raw mode {', '.join(rawmodes) or 'none'})",
        kind="depth",
    )


def _other_byte_order(tile):
    """The same Pillow tile with its 16-bit raw mode in the other byte order (``;16B``/``;16L``)."""
    rawmode = _rawmode(tile)
    swapped = rawmode[:-1] + _OTHER_BYTE_ORDER[rawmode[-1]]
    args = swapped if isinstance(tile[3], str) else (swapped, *tile[3][1:])
    return tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args)


def _full_depth_colour(source: bytes, image: Image.Image) -> Image.Image:
    """A 16-bit-per-channel RGB/RGBA image as 8-bit RGB/RGBA, scaled like 16-bit grayscale.

    ``image``: ``source`` opened and loaded by Pillow, which keeps each sample's most significant
    byte. Decompression and PNG un-filtering work on bytes before Pillow unpacks samples, so
    decoding ``source`` again with the opposite byte order gives the least significant bytes, and
    ``high * 256 + low`` is each exact 16-bit sample. The colour channels are scaled together from
    the image's own minimum..maximum to 0..255 (`_scale_to_uint8`: 12-bit data fills the range,
    hues are kept); alpha is scaled 0..65535 to 0..255.
    """
    high = np.asarray(image, dtype=np.uint16)
    with Image.open(io.BytesIO(source)) as swapped:
        swapped.tile = [_other_byte_order(tile) for tile in swapped.tile]
        swapped.load()
        low = np.asarray(swapped, dtype=np.uint16)
    samples = high << 8 | low
    pixels = _scale_to_uint8(samples[:, :, :3])
    if samples.shape[2] == 4:
        alpha = np.rint(samples[:, :, 3:] / 257.0).astype(np.uint8)
        pixels = np.concatenate([pixels, alpha], axis=2)
    return Image.fromarray(pixels)


def preprocess(image: Image.Image, *, image_size: int, channels: int) -> np.ndarray:
    """A decoded Pillow image as uint8 ``[S, S, C]``: intensity scaling, channels, letterbox.

    Steps 2 and 3 of the module docstring (EXIF orientation and frame choice are done by the
    decoder). ``channels`` is 1 or 3.
    """
    if image.mode in _HIGH_DEPTH_MODES:
        image = Image.fromarray(_scale_to_uint8(np.asarray(image)), "L")
    elif image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    target = "L" if channels == 1 else "RGB"
    if image.mode != target:
        image = image.convert(target)

    width, height = image.size
    scale = image_size / max(width, height)
    new_w = min(image_size, max(1, int(width * scale + 0.5)))
    new_h = min(image_size, max(1, int(height * scale + 0.5)))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if (new_w, new_h) != (image_size, image_size):
        canvas = Image.new(target, (image_size, image_size), 0)
        canvas.paste(image, ((image_size - new_w) // 2, (image_size - new_h) // 2))
        image = canvas
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array)


def _open_and_preprocess(source: bytes, *, image_size: int, channels: int, name: str) -> np.ndarray:
    """Decodes encoded bytes and preprocesses them; raises `_BadImage` (``name``: for warnings)."""
    if not source:
        raise _BadImage("empty file (0 bytes)", kind="empty")
    try:
        with Image.open(io.BytesIO(source)) as image:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and image.width * image.height > limit:
                raise _BadImage(
                    f"{image.width} x {image.height} pixels is over Pillow's decompression-bomb "
                    f"limit of {limit} pixels",
                    kind="bomb",
                )
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                logging.warning("%s has %d frames (pages); only the first is used", name, frames)
            deep = _deep_colour(image)  # reads the tile: before loading
            if image.format == "JPEG":  # DCT-domain downscale while >= 2x the letterboxed size
                longest = max(image.width, image.height)
                image.draft(
                    image.mode,
                    (
                        math.ceil(2 * image_size * image.width / longest),
                        math.ceil(2 * image_size * image.height / longest),
                    ),
                )
            image.load()
            transpose = _EXIF_TRANSPOSE.get(image.getexif().get(0x0112, 1))
            if deep:
                image = _full_depth_colour(source, image)
            if transpose is not None:
                image = image.transpose(transpose)
            return preprocess(image, image_size=image_size, channels=channels)
    except _BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # (the warning is raised as an exception under a "warnings as errors" filter)
        raise _BadImage(str(e), kind="bomb") from None
    except Image.UnidentifiedImageError:
        raise _BadImage("not a PNG, JPEG, BMP or TIFF image Pillow can identify") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, zlib errors, ...
        reason = str(e) or type(e).__name__
        if "truncated" in reason:
            reason = f"truncated ({reason})"
        raise _BadImage(f"damaged or unsupported image: {reason}") from None


def _bad_image_error(failures: Sequence[tuple[str, _BadImage]], where: str) -> DataError:
    """One `DataError` listing every image that could not be used, with the fix for each kind."""
    parts = []
    for kind, (problem, fix) in _BAD_IMAGE_FIXES.items():
        listed = [f"{n}: {e}" for n, e in failures if e.kind == kind]
        if listed:
            parts.append(
                f"{len(listed)} image(s) {where} {problem}:\n{_listing(listed)}\n"
                f"Fix: {fix.format(limit=Image.MAX_IMAGE_PIXELS)}."
            )
    return DataError("\n".join(parts))


def _broken_link(path: str) -> str | None:
    """What ``path`` points to when it is a symbolic link to nothing (as written, then resolved)."""
    if not os.path.islink(path) or os.path.exists(path):
        return None
    target, resolved = os.readlink(path), os.path.realpath(path)
    return target if target == resolved else f"{target} (= {resolved})"


def _unreadable(error: OSError) -> _BadImage:
    """`_BadImage` for a file that ``open`` could not read; a broken symbolic link says so."""
    target = _broken_link(error.filename) if isinstance(error.filename, str) else None
    if target is not None:
        return _BadImage(f"broken symbolic link to {target}", kind="link")
    return _BadImage(f"cannot read: {error.strerror or error}")


def decode_bytes(data: bytes, *, image_size: int, channels: int, name: str = "image") -> np.ndarray:
    """Encoded image bytes (PNG/JPEG/BMP/TIFF) as uint8 ``[S, S, C]``, exactly as `decode_image`.

    Raises:
      DataError: the bytes are not a usable image (the message names ``name`` and the fix).
    """
    image_size = _check_size(image_size)
    channels = resolve_channels(channels)
    try:
        return _open_and_preprocess(
            bytes(data), image_size=image_size, channels=channels, name=name
        )
    except _BadImage as e:
        raise _bad_image_error([(name, e)], "given") from None


def decode_image(path: str | os.PathLike, *, image_size: int, channels: int) -> np.ndarray:
    """THE preprocessing of training: an image file as uint8 ``[image_size, image_size, C]``.

    Pillow decode (first frame, EXIF orientation), 16-bit grayscale (and 16-bit colour, all
    channels together) scaled min..max to 0..255,
    transparency over black, RGB (``channels`` 3, or 0 as for folders) or grayscale (1), then the
    longer side resized to ``image_size`` and the shorter side padded with black, centred.

    Raises:
      DataError: the file is missing, unreadable, damaged or over the decompression-bomb limit;
        the message names the file and the fix.
    """
    path = os.fspath(path)
    image_size = _check_size(image_size)
    channels = resolve_channels(channels)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        failure = _unreadable(e)
        if failure.kind == "link":
            raise _bad_image_error([(path, failure)], "given") from None
        raise DataError(f"cannot read {path}: {e.strerror or e}; check the path") from None
    try:
        return _open_and_preprocess(data, image_size=image_size, channels=channels, name=path)
    except _BadImage as e:
        raise _bad_image_error([(path, e)], "given") from None


def _array_image(array: np.ndarray) -> Image.Image:
    """A decoded pixel array as a Pillow image; `_BadImage` for a shape/dtype it cannot be."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.dtype == np.uint8:
        return Image.fromarray(array, "RGB" if array.shape[-1] == 3 else "RGBA")
    if array.ndim == 2 and array.dtype == np.uint8:
        return Image.fromarray(array, "L")
    if array.ndim == 2 and array.dtype.kind in "uif" and array.size:
        return Image.fromarray(array.astype(np.float32), "F")
    raise _BadImage(f"cannot use a pixel array of shape {array.shape} and dtype {array.dtype}")


def preprocess_array(
    array: np.ndarray, *, image_size: int, channels: int, name: str = "image"
) -> np.ndarray:
    """An already-decoded ``[H, W]`` / ``[H, W, 1|3|4]`` array, preprocessed like `decode_image`.

    For sources that hand out decoded pixels (TFDS without TensorFlow can); 2-D uint16 / int /
    float arrays take the 16-bit path (min..max scaling).
    """
    image_size = _check_size(image_size)
    channels = resolve_channels(channels)
    try:
        return preprocess(_array_image(array), image_size=image_size, channels=channels)
    except _BadImage as e:
        raise _bad_image_error([(name, e)], "given") from None


# --------------------------------------------------------------------------- decoding many


def _workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))


class _ProgressLine:
    """``label: done/total images`` on stderr, at most once a second, only for slow scans."""

    interval_s = 1.0

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.printed = False
        try:
            self.in_place = self.stream.isatty()
        except (AttributeError, ValueError):
            self.in_place = False

    def _emit(self, text: str, final: bool = False) -> None:
        if self.in_place:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.printed = True

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self._emit(f"{self.label}: {done}/{self.total} images")

    def close(self, note: str = "") -> None:
        if self.printed:
            seconds = time.monotonic() - self.start
            self._emit(
                f"{self.label}: {self.total}/{self.total} images{note} in {seconds:.0f} s", True
            )


@dataclasses.dataclass
class _Decoded:
    images: np.ndarray  # uint8 [N, S, S, C]
    digests: list[str]
    failures: list[tuple[int, _BadImage]]


def _digest_array(array: np.ndarray) -> str:
    h = hashlib.sha256(f"array:{array.dtype.str}:{array.shape}:".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def decode_many(
    count: int,
    fetch: Callable[[int], bytes | np.ndarray],
    names: Callable[[int], str],
    *,
    image_size: int,
    channels: int,
    cache_dir: str,
    label: str,
) -> _Decoded:
    """Fetches, hashes, and decodes (or reads from the cache) items ``0..count-1`` in threads.

    ``fetch(i)`` returns encoded bytes (decoded like `decode_image`) or a decoded array (like
    `preprocess_array`); an ``OSError`` from it counts as an unreadable image. Results keep the
    index order. Failures are returned, not raised, so that all of them can be listed at once.
    """
    cache = cache_lib.ImageCache(
        cache_lib.cache_root(cache_dir),
        image_size=image_size,
        channels=channels,
        version=PREPROCESS_VERSION,
    )
    images = np.zeros((count, image_size, image_size, channels), np.uint8)
    digests = [""] * count

    def work(i: int):
        try:
            source = fetch(i)
        except OSError as e:
            return i, None, "", _unreadable(e)
        if isinstance(source, np.ndarray):
            digest = _digest_array(source)
        else:
            digest = hashlib.sha256(source).hexdigest()
        image = cache.get(digest)
        if image is None:
            try:
                if isinstance(source, np.ndarray):
                    image = preprocess(
                        _array_image(source), image_size=image_size, channels=channels
                    )
                else:
                    image = _open_and_preprocess(
                        source, image_size=image_size, channels=channels, name=names(i)
                    )
            except _BadImage as e:
                return i, None, digest, e
            cache.put(digest, image)
        return i, image, digest, None

    failures = []
    progress = _ProgressLine(label, count)
    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
        for done, (i, image, digest, error) in enumerate(pool.map(work, range(count)), start=1):
            digests[i] = digest
            if error is None:
                images[i] = image
            else:
                failures.append((i, error))
            progress.update(done)
    progress.close(f" ({cache.misses} decoded, {cache.hits} from the cache)")
    return _Decoded(images=images, digests=digests, failures=failures)


def find_duplicates(
    digests: Sequence[str], labels: Sequence[int]
) -> tuple[list[list[int]], list[list[int]]]:
    """Indices sharing one content hash: ``(conflicting, repeated)``.

    ``conflicting``: groups whose items carry two or more labels; ``repeated``: groups with one
    label (the first index of each is the one to keep). Each group is sorted.
    """
    by_digest: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        if d:
            by_digest.setdefault(d, []).append(i)
    conflicting, repeated = [], []
    for members in by_digest.values():
        if len(members) > 1:
            if len({labels[i] for i in members}) > 1:
                conflicting.append(members)
            else:
                repeated.append(members)
    return conflicting, repeated


# --------------------------------------------------------------------------- folder scan


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: str  # absolute
    rel: str  # "/"-separated, relative to the root or manifest folder (absolute outside it)
    label: str
    group: str | None = None
    split: str = ""


def _listing(items: Sequence[str], limit: int = _LIST_LIMIT) -> str:
    items = list(items)
    lines = [f"  {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)


def _extension(name: str) -> str:
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return ".nii.gz"
    return os.path.splitext(lower)[1]


def _is_image_name(name: str) -> bool:
    return _extension(name) in IMAGE_EXTENSIONS


def _skip_reason(name: str) -> str:
    kind = _UNSUPPORTED_HINTS.get(_extension(name))
    if kind:
        return f"{kind} is not supported: convert it to PNG or TIFF (16-bit grayscale is kept)"
    return "not a PNG, JPEG, BMP or TIFF file"


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in ("__MACOSX", "Thumbs.db", "desktop.ini")


def _rel(path: str, root: str | None) -> str:
    if root:
        rel = os.path.relpath(path, root)
        if not rel.startswith(".." + os.sep) and rel != "..":
            return rel.replace(os.sep, "/")
    return path


def image_files(folder: str, skipped: list[tuple[str, str]] | None = None) -> list[str]:
    """Image files under ``folder`` (recursively, symbolic links followed, each real folder
    read once), unsorted, as a class folder is read for training; ``(path, reason)`` of the
    hidden and non-image files passed over is appended to ``skipped``."""
    skipped = [] if skipped is None else skipped
    found = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        for d in list(dirnames):
            if _hidden(d):
                skipped.append((os.path.join(dirpath, d) + os.sep, "hidden folder"))
                dirnames.remove(d)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if _hidden(name):
                skipped.append((path, "hidden or system file"))
            elif _is_image_name(name) or _broken_link(path) is not None:
                # A broken link whatever its name (it may have pointed to a folder of images):
                # reading it fails and names the link, instead of passing over what it held.
                found.append(path)
            else:
                skipped.append((path, _skip_reason(name)))
    return found


def image_folder_sign(path: str) -> str | None:
    """A path showing that ``path`` is a folder of images (a manifest, or an image in it or in
    a folder inside it, as in ``DIR/<class>/<image>``), or None."""
    if not os.path.isdir(path):
        return None
    manifest = os.path.join(path, MANIFEST_NAME)
    if os.path.exists(manifest):
        return manifest
    folders = [path]
    with os.scandir(path) as entries:
        folders += sorted(e.path for e in entries if e.is_dir())
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                if _is_image_name(entry.name) and entry.is_file():
                    return entry.path
    return None


def _scan_folders(root: str) -> list[_Entry]:
    """Entries of ``root/<class>/**/<image>``; raises `DataError` for a layout that cannot work."""
    skipped: list[tuple[str, str]] = []
    class_dirs, stray_images, broken = [], [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if _hidden(entry.name):
            skipped.append((entry.path, "hidden or system file"))
        elif (target := _broken_link(entry.path)) is not None:
            broken.append(f"{entry.path}: broken symbolic link to {target}")
        elif entry.is_dir():
            class_dirs.append(entry.name)
        elif entry.name == MANIFEST_NAME:
            continue
        elif _is_image_name(entry.name):
            stray_images.append(entry.path)
        else:
            skipped.append((entry.path, "not in a class folder"))
    if broken:
        raise DataError(
            f"{len(broken)} symbolic link(s) in {root} point to nothing (a class folder linked "
            "from a drive that is not mounted would be left out, and with it its class):\n"
            f"{_listing(broken)}\nFix: point the links at existing folders (e.g. mount the drive "
            "or restore the folder they point into), or delete them."
        )
    layout = f"expected {root}/<class>/<image> (one folder per class, e.g. {root}/normal/img1.png)"
    # Images directly in the root are what a class's own folder holds: data.root one level too
    # deep (DATA/glioma for DATA) would take its sub folders as the classes.
    one_class = (
        f"{root} is one class's folder, set data.root to the folder holding all the class "
        f"folders (e.g. {os.path.dirname(root)})"
    )
    if not class_dirs:
        if stray_images:
            raise DataError(
                f"{root} holds images but no class folders:\n{_listing(stray_images)}\n"
                f"Fix: if {one_class}; otherwise put the images in one folder per class "
                f"({root}/<class>/<image>), or list images and labels in "
                f"{root}/{MANIFEST_NAME} (columns path,label[,group][,split])."
            )
        raise DataError(f"data.root={root} has no class folders and no images. Fix: {layout}.")

    entries, empty = [], []
    for name in class_dirs:
        before = len(skipped)
        paths = image_files(os.path.join(root, name), skipped)
        if not paths:
            others = [p for p, _ in skipped[before:]]
            what = f"; it holds only:\n{_listing(others)}" if others else " (it is empty)"
            empty.append(f"{os.path.join(root, name)}{what}")
        entries += [_Entry(path=p, rel=_rel(p, root), label=name) for p in paths]
    if empty:
        raise DataError(
            "class folder(s) with no PNG, JPEG, BMP or TIFF images:\n"
            + "\n".join(f"  {e}" for e in empty)
            + "\nFix: add images to these folders, or remove the folders (every folder under "
            f"{root} is a class)."
        )
    if len(class_dirs) == 1:
        if stray_images:
            raise DataError(
                f"{root} has a single class folder ({class_dirs[0]!r}) and {len(stray_images)} "
                f"image(s) directly in it (e.g. {stray_images[0]}), as a class's own folder has. "
                f"Fix: if {one_class}; otherwise move these images into their class's folder, "
                "and add another class (a classifier needs at least 2)."
            )
        raise DataError(
            f"{root} has a single class folder ({class_dirs[0]!r}); a classifier needs at least "
            f"2. Fix: {layout}."
        )
    if stray_images:
        shown = ", ".join(class_dirs[:10]) + (", ..." if len(class_dirs) > 10 else "")
        logging.warning(
            "%d image(s) directly in %s are in no class folder and are left out:\n%s\nThe "
            "classes are its %d folders: %s. If %s; if the images belong to a class, move them "
            "into its folder.",
            len(stray_images),
            root,
            _listing(stray_images),
            len(class_dirs),
            shown,
            one_class,
        )
    _warn_skipped(skipped, root)
    return entries


def _warn_skipped(skipped: list[tuple[str, str]], root: str) -> None:
    # Said as it holds for every command that loads a folder: training, and evaluate.
    if skipped:
        logging.warning(
            "%d file(s) under %s are skipped (left out of the data):\n%s",
            len(skipped),
            root,
            "\n".join(f"  {path}: {reason}" for path, reason in skipped),
        )


# --------------------------------------------------------------------------- manifest


def _manifest_path(data_config, root: str) -> str | None:
    given = str(getattr(data_config, "manifest", "") or "").strip()
    if given:
        path = os.path.abspath(os.path.expanduser(given))
        if not os.path.isfile(path):
            raise DataError(
                f"data.manifest={given} does not exist (looked for {path}). Fix: point "
                "data.manifest at a CSV file with a header path,label[,group][,split], or set it "
                f"to '' to use {os.path.join(root or '<data.root>', MANIFEST_NAME)} or the "
                "class folders."
            )
        return path
    if root:
        path = os.path.join(root, MANIFEST_NAME)
        if os.path.isfile(path):
            return path
    return None


def _in_any_form(path: str, listings: dict[str, dict[str, list[str]]]) -> str | None:
    """``path`` (absolute, normalised) with each name that does not exist as spelt replaced by the
    one entry of its folder that is the same name in another Unicode form (macOS names a file "é"
    as "e" + an accent, NFD; a spreadsheet types it as one letter, NFC; one path may mix both, a
    folder made elsewhere holding files named on a Mac). None when a name has no such entry, or
    two. ``listings`` caches each folder read: its entries by their NFC form."""
    found, *names = pathlib.PurePath(path).parts  # found: "/" (or a drive, "C:\\")
    for name in names:
        candidate = os.path.join(found, name)
        if not os.path.lexists(candidate):
            if found not in listings:
                try:
                    entries = os.listdir(found)
                except OSError:  # a file, or a folder that cannot be read: reported as missing
                    entries = []
                listings[found] = {}
                for entry in entries:
                    key = unicodedata.normalize("NFC", entry)
                    listings[found].setdefault(key, []).append(entry)
            same = listings[found].get(unicodedata.normalize("NFC", name), [])
            if len(same) != 1:
                return None
            candidate = os.path.join(found, same[0])
        found = candidate
    return found


def _listed_file(base: str, raw: str, listings: dict[str, dict[str, list[str]]]) -> str:
    """The file a manifest's path ``raw`` (relative to ``base``, or absolute) names: as written,
    else with backslashes (written on Windows) as separators, each also with its names in another
    Unicode form than the file system's (`_in_any_form`). The path as written when none is a
    file."""
    written = os.path.normpath(os.path.join(base, os.path.expanduser(raw)))
    if os.path.isfile(written):
        return written
    for spelling in dict.fromkeys((raw, raw.replace("\\", "/"))):
        path = os.path.normpath(os.path.join(base, os.path.expanduser(spelling)))
        path = _in_any_form(path, listings)
        if path is not None and os.path.isfile(path):
            return path
    return written


def _read_manifest(path: str, root: str) -> tuple[list[_Entry], bool]:
    """Entries of a manifest, and whether it has a ``group`` column."""
    base = root or os.path.dirname(path)
    fix_header = (
        f"Fix: the first line of {path} must name the columns, e.g. path,label,group,split "
        "(group and split are optional)."
    )
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise DataError(
            f"the manifest {path} is not UTF-8 text ({e}). Fix: save it as UTF-8 (e.g. 'CSV UTF-8' "
            "in a spreadsheet program)."
        ) from None
    except (OSError, csv.Error) as e:
        raise DataError(f"cannot read the manifest {path}: {e}. {fix_header}") from None
    rows = [(n, row) for n, row in enumerate(rows, start=1) if any(c.strip() for c in row)]
    if not rows:
        raise DataError(f"the manifest {path} is empty. {fix_header}")
    header = [c.strip().lower() for c in rows[0][1]]
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        other = [d for d in (";", "\t") if d in ",".join(rows[0][1])]
        hint = f" Columns must be separated by commas, not {other[0]!r}." if other else ""
        raise DataError(
            f"the manifest {path} has no {' and no '.join(missing)} column (header: "
            f"{','.join(rows[0][1])}). {fix_header}{hint}"
        )
    extra = [c for c in header if c not in ("path", "label", "group", "split")]
    if extra:
        logging.warning("manifest %s: columns %s are ignored", path, ", ".join(extra))
    col = {
        name: header.index(name) for name in ("path", "label", "group", "split") if name in header
    }
    has_group = "group" in col

    def cell(row, name):
        i = col.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    entries, blank, bad_split, missing_files, empty_group, unsupported = [], [], [], [], [], []
    seen: dict[str, int] = {}
    repeated = []
    listings: dict[str, dict[str, list[str]]] = {}  # for `_in_any_form`
    for line, row in rows[1:]:
        raw, label = cell(row, "path"), cell(row, "label")
        if not raw or not label:
            blank.append(f"line {line}: {','.join(row)}")
            continue
        split = cell(row, "split").lower()
        if split not in ("", *SPLIT_VALUES):
            bad_split.append(f"line {line}: split {cell(row, 'split')!r} ({raw})")
            continue
        if _extension(raw) in _UNSUPPORTED_HINTS:
            unsupported.append(f"line {line}: {raw}: {_skip_reason(raw)}")
            continue
        group = cell(row, "group") if has_group else None
        if has_group and not group:
            empty_group.append(f"line {line}: {raw}")
        full = _listed_file(base, raw, listings)
        if not os.path.isfile(full):
            target = _broken_link(full)
            link = f" (a broken symbolic link to {target})" if target is not None else ""
            missing_files.append(f"line {line}: {full}{link}")
            continue
        key = os.path.realpath(full)
        if key in seen:
            repeated.append(f"lines {seen[key]} and {line}: {full}")
            continue
        seen[key] = line
        entries.append(
            _Entry(path=full, rel=_rel(full, base), label=label, group=group, split=split)
        )
    problems = []
    if blank:
        problems.append(f"rows with an empty path or label:\n{_listing(blank)}")
    if bad_split:
        problems.append(
            f"rows whose split is not train, val, test or empty:\n{_listing(bad_split)}"
        )
    if unsupported:
        problems.append(f"rows naming files of an unsupported format:\n{_listing(unsupported)}")
    if missing_files:
        problems.append(
            f"{len(missing_files)} listed file(s) do not exist (relative paths are resolved "
            f"against {base}):\n{_listing(missing_files)}"
        )
    if repeated:
        problems.append(f"files listed more than once:\n{_listing(repeated)}")
    if empty_group:
        problems.append(
            "rows with an empty group (the group column must name every image's patient; use "
            f"the file name for a patient with one image):\n{_listing(empty_group)}"
        )
    if problems:
        raise DataError(
            f"the manifest {path} cannot be used:\n"
            + "\n".join(problems)
            + f"\nFix: correct these rows in {path} (or delete them to leave those images out)."
        )
    if not entries:
        raise DataError(f"the manifest {path} lists no images. {fix_header}")
    if root:
        # The images a folder scan would find (hidden files are none, linked folders are read).
        unlisted = sorted(p for p in image_files(root) if os.path.realpath(p) not in seen)
        if unlisted:
            logging.warning(
                "%d image(s) under %s are not in the manifest %s and are not used:\n%s",
                len(unlisted),
                root,
                path,
                "\n".join(f"  {p}" for p in unlisted),
            )
    labels = sorted({e.label for e in entries})
    if len(labels) < 2:
        raise DataError(
            f"the manifest {path} names a single label ({labels[0]!r}); a classifier needs at "
            "least 2. Fix: add images of the other classes to the manifest."
        )
    return entries, has_group


def _refuse_unicode_twins(class_names: Sequence[str], where: str) -> None:
    """`DataError` when two class names are one name in two Unicode forms ("é" typed as one
    letter, NFC, and named by macOS as "e" + an accent, NFD): they print the same, and would
    split one class in two."""
    forms: dict[str, list[str]] = {}
    for name in class_names:
        forms.setdefault(unicodedata.normalize("NFC", name), []).append(name)
    twins = [name for name, spelled in forms.items() if len(spelled) > 1]
    if twins:
        raise DataError(
            f"the class name(s) {', '.join(map(repr, twins))} {where} are each spelled in "
            "more than one Unicode form (an accent typed with its letter, and as a letter plus "
            "an accent, as macOS names files), which would be separate classes. Fix: spell each "
            "class one way (retype the labels, or rename and merge the folders)."
        )


def _regex_groups(entries: list[_Entry], pattern: str, root: str) -> list[_Entry]:
    # The messages show the pattern as typed: repr would double its backslashes, unlike the
    # examples of the fixes.
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise DataError(
            f"data.group_regex='{pattern}' is not a valid regular expression ({e}). Fix: e.g. "
            r"'(P\d+)_' takes 'P001' from 'glioma/P001_slice07.png'."
        ) from None
    if regex.groups < 1:
        raise DataError(
            f"data.group_regex='{pattern}' has no capture group; its first group (...) is the "
            r"patient id. Fix: e.g. '(P\d+)_' or '^[^/]+/([^/]+)/' (one folder per patient)."
        )
    out, unmatched = [], []
    for e in entries:
        m = regex.search(e.rel)
        if m is None or not m.group(1):
            unmatched.append(e.rel)
        else:
            out.append(dataclasses.replace(e, group=m.group(1)))
    if unmatched:
        raise DataError(
            f"data.group_regex='{pattern}' finds no patient id in {len(unmatched)} image "
            f"path(s) (matched against the path relative to {root}):\n"
            f"{_listing(sorted(unmatched))}\n"
            "Fix: change the expression so that its first capture group matches every path, or "
            "give the ids in a manifest group column (data evaluated whole, as by evaluate "
            "--split all, needs no ids: --config.data.group_regex='')."
        )
    return out


def _fill_group_splits(entries: list[_Entry]) -> list[_Entry]:
    """Makes every group's fixed split consistent (fatal if it names two, filled if partial)."""
    by_group: dict[str, set[str]] = {}
    for e in entries:
        if e.group is not None and e.split:
            by_group.setdefault(e.group, set()).add(e.split)
    conflicts = {g: s for g, s in by_group.items() if len(s) > 1}
    if conflicts:
        lines = [
            f"group {g!r}: "
            + "; ".join(
                f"{s}: {', '.join(e.rel for e in entries if e.group == g and e.split == s)}"
                for s in sorted(splits)
            )
            for g, splits in sorted(conflicts.items())
        ]
        raise DataError(
            "the manifest's split column puts one patient (group) in two splits, which leaks "
            f"that patient between them:\n{_listing(lines)}\nFix: give all rows of a group the "
            "same split (or leave the split empty to have it assigned)."
        )
    filled, out = [], []
    for e in entries:
        if e.group is not None and not e.split and e.group in by_group:
            (split,) = by_group[e.group]
            e = dataclasses.replace(e, split=split)
            filled.append(f"{e.rel} -> {split}")
        out.append(e)
    if filled:
        logging.warning(
            "%d image(s) with an empty split belong to a group with a fixed split and get it:\n%s",
            len(filled),
            "\n".join(f"  {f}" for f in filled),
        )
    return out


def _warn_groups_across_classes(entries: list[_Entry], pattern: str) -> None:
    """Warns of every group (patient) with images in two or more classes, with its count per class.

    Not an error: a patient may rightly have images of two classes (two ears, slices with and
    without a finding), but it may also be a wrong label, or ids that merge patients.
    """
    by_group: dict[str, dict[str, int]] = {}
    for e in entries:
        if e.group is not None:
            counts = by_group.setdefault(e.group, {})
            counts[e.label] = counts.get(e.label, 0) + 1
    spanning = [
        f"{group!r}: {', '.join(f'{n} in {label}' for label, n in sorted(counts.items()))}"
        for group, counts in sorted(by_group.items())
        if len(counts) > 1
    ]
    if spanning:
        regex = f" (a data.group_regex='{pattern}' that takes too little of a path merges patients)"
        logging.warning(
            "%d patient(s) (group ids) have images in more than one class; each is kept whole "
            "(one split, one chain fraction) and placed as a patient of its most frequent "
            "class:\n%s\nNothing is wrong if a patient can have images of two classes (e.g. two "
            "ears, or slices with and without a finding). Otherwise fix the labels, or the group "
            "ids%s.",
            len(spanning),
            _listing(spanning),
            regex if pattern else "",
        )


# --------------------------------------------------------------------------- load


def load(data_config) -> ImageSet:
    """Decodes ``data.root`` (and its manifest) into an `ImageSet`; see the module docstring.

    Uses ``data.root``, ``data.manifest``, ``data.group_regex``, ``data.image_size``,
    ``data.channels`` (0 = 3) and ``data.cache_dir``.

    Raises:
      DataError: naming the file(s) and the fix (the fatal rows of the table above).
    """
    image_size = _check_size(data_config.image_size)
    channels = resolve_channels(data_config.channels, default=3)
    given_root = str(data_config.root or "").strip()
    root = os.path.abspath(os.path.expanduser(given_root)) if given_root else ""
    layout = "a folder laid out as DIR/<class>/<image>"
    if root and not os.path.exists(root):
        raise DataError(
            f"data.root={given_root} does not exist (looked for {root}). Fix: set "
            f"--config.data.root to {layout}."
        )
    if root and not os.path.isdir(root):
        raise DataError(f"data.root={given_root} is a file, not a folder. Fix: set it to {layout}.")
    manifest = _manifest_path(data_config, root)
    if not root and manifest is None:
        raise DataError(
            f"data.root is empty. Fix: set --config.data.root to {layout} (or data.manifest to a "
            "CSV file with columns path,label[,group][,split])."
        )
    pattern = str(getattr(data_config, "group_regex", "") or "")

    if manifest is not None:
        entries, has_group = _read_manifest(manifest, root)
        if has_group and pattern:
            raise DataError(
                f"both the manifest {manifest} (group column) and data.group_regex='{pattern}' "
                "give patient ids. Fix: use one of them (set --config.data.group_regex='' to use "
                "the manifest's groups)."
            )
        where = f"listed in {manifest}"
    else:
        if not os.listdir(root):
            raise DataError(f"data.root={given_root} is empty. Fix: fill it as {layout}.")
        entries = _scan_folders(root)
        where = f"under {root}"
    if pattern:
        entries = _regex_groups(entries, pattern, root or os.path.dirname(manifest))
    entries.sort(key=lambda e: e.path)
    if any(e.split for e in entries) and any(e.group is not None for e in entries):
        entries = _fill_group_splits(entries)

    class_names = tuple(sorted({e.label for e in entries}))
    _refuse_unicode_twins(class_names, where)
    class_index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([class_index[e.label] for e in entries], np.int32)

    def fetch(i: int) -> bytes:
        with open(entries[i].path, "rb") as f:
            return f.read()

    decoded = decode_many(
        len(entries),
        fetch,
        lambda i: entries[i].path,
        image_size=image_size,
        channels=channels,
        cache_dir=str(data_config.cache_dir or ""),
        label=f"scanning {root or manifest}",
    )
    if decoded.failures:
        raise _bad_image_error([(entries[i].path, e) for i, e in decoded.failures], where)

    conflicting, repeated = find_duplicates(decoded.digests, labels.tolist())
    if conflicting:
        lines = [
            " = ".join(f"{entries[i].path} [{entries[i].label}]" for i in members)
            for members in conflicting
        ]
        raise DataError(
            f"{len(conflicting)} image(s) appear with identical content in two or more classes "
            "(the label is ambiguous, and the copies could land in train and test):\n"
            f"{_listing(lines)}"
            "\nFix: delete the copy in the wrong class (or fix its label in the manifest)."
        )
    keep = np.ones(len(entries), bool)
    if repeated:
        for members in repeated:
            keep[members[1:]] = False
        logging.warning(
            "%d duplicate image(s) (identical content in the same class) are skipped, so no "
            "image can be in two splits; kept -> skipped:\n%s",
            int((~keep).sum()),
            "\n".join(
                f"  {entries[m[0]].path} -> {', '.join(entries[i].path for i in m[1:])}"
                for m in repeated
            ),
        )
    index = np.flatnonzero(keep)
    kept = [entries[i] for i in index]
    _warn_groups_across_classes(kept, pattern)
    images = decoded.images if keep.all() else decoded.images[index]  # no copy when all are kept

    groups = None
    if any(e.group is not None for e in kept):
        _, groups = np.unique(np.array([e.group for e in kept], dtype=str), return_inverse=True)
        groups = groups.astype(np.int64)
    split = None
    if any(e.split for e in kept):
        split = np.array([e.split for e in kept], dtype="<U5")
    return ImageSet(
        images=images,
        labels=labels[index],
        class_names=class_names,
        groups=groups,
        split=split,
        paths=np.array([e.path for e in kept], dtype=str),
    )


# --------------------------------------------------------------------------- enough data


def check_enough(
    data: ImageSet,
    splits: Splits,
    *,
    val_fraction: float,
    test_fraction: float,
    fraction: float,
) -> None:
    """Raises `DataError` unless every class has >= 1 image in val, test and every chain fraction.

    ``splits`` is the run's own split of ``data`` (`weckd_jax.chain.make_run_splits`), so the
    answer is exact for the run's seed; ``val_fraction``, ``test_fraction`` and ``fraction`` (the
    settings that made it) only serve the message, which names the short classes, how many images
    (and groups) they have, the parts they miss, about how many per class the settings need, and
    the fixes. Also raises when fraction 1 keeps no label (``chain.label_ratio`` too small for
    its size): link 1 has no teacher and would learn nothing. Call it before training (cheap: no
    images are touched).
    """
    first = len(splits.fractions[0]) if splits.fractions else 0
    if first and not np.any(splits.label_masks[0]):
        raise DataError(
            f"fraction 1 ({first} images) keeps no label with this chain.label_ratio, so link 1 "
            "(no teacher: it learns from labels only) would learn nothing. Fix: raise "
            f"chain.label_ratio to at least {1 / first:.3g}, or raise chain.fraction."
        )
    num_fractions = len(splits.fractions)
    k = data.num_classes
    parts = [("val", splits.val), ("test", splits.test)]
    parts += [(f"fraction {i}", f) for i, f in enumerate(splits.fractions, start=1)]
    counts = {name: class_counts(data.labels, index, k) for name, index in parts}
    short = {
        c: [name for name, _ in parts if counts[name][c] == 0]
        for c in range(k)
        if any(counts[name][c] == 0 for name, _ in parts)
    }
    if not short:
        return

    smallest = min(val_fraction, test_fraction, (1 - val_fraction - test_fraction) * fraction)
    need = math.ceil(1 / smallest - 1e-9) if smallest > 0 else float("inf")
    unit = "images" if data.groups is None else "patients (groups)"
    per_class = np.bincount(data.labels, minlength=k)
    lines = []
    for c, missing in short.items():
        n = per_class[c]
        have = f"{n} image{'' if n == 1 else 's'}"
        if data.groups is not None:
            g = len(np.unique(data.groups[data.labels == c]))
            have += f" of {g} group{'' if g == 1 else 's'}"
        lines.append(f"{data.class_names[c]!r} ({have}): none in {', '.join(missing)}")
    fixed = ""
    if data.split is not None and any(str(s) for s in data.split):
        fixed = (
            " A fixed split from the manifest's split column may put no image of a class in val "
            "or test: check that column."
        )
    # Only the settings of the parts that lack images: raising a held-out share would take
    # images away from the fractions.
    lacking = {name for missing in short.values() for name in missing}
    fixes = ["add images of these classes", "remove the classes"]
    if lacking - {"val", "test"}:
        fixes.append("raise chain.fraction / lower chain.length")
    if held_out := [f"data.{name}_fraction" for name in ("val", "test") if name in lacking]:
        fixes.append(f"raise {' / '.join(held_out)}")
    fix = f"{', '.join(fixes[:-1])}, or {fixes[-1]}"
    raise DataError(
        "too few images for the requested split: with data.val_fraction="
        f"{val_fraction:g}, data.test_fraction={test_fraction:g} and chain.length={num_fractions} "
        f"fractions of chain.fraction={fraction:g} of the train pool, these classes get no image "
        f"in some parts:\n{_listing(lines)}\nEvery class needs about {need} {unit} or more with "
        f"these settings (more when groups are uneven).{fixed}\nFix: {fix}."
    )
