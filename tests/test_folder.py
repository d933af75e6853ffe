"""Image folders (weckd_jax.data.folder): decoding of every mode, manifests and patient ids,
group-disjoint splits, every bad-input error, the on-disk cache, progress, and a 1-channel chain."""

import importlib
import logging
import os
import shutil
import stat
import struct
import unicodedata
import zlib

import numpy as np
import pytest
from PIL import Image, features

from tests.conftest import smoke_config
from weckd_jax import chain, checkpoints
from weckd_jax import config as config_lib
from weckd_jax.data import cache as cache_lib
from weckd_jax.data import folder
from weckd_jax.data.splits import make_splits
from weckd_jax.data.types import DataError
from weckd_jax.progress import Progress

S = 16


def data_config(root, **overrides):
    c = config_lib.base_config().data
    c.source = "folder"
    c.root = str(root)
    c.image_size = S
    c.cache_dir = "none"
    for key, value in overrides.items():
        c[key] = value
    return c


def noise(seed, shape, dtype=np.uint8, high=256):
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def save(path, array, mode=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **kwargs)
    return path


def save_any(path, seed):
    """An image whose format and mode follow the extension and the seed (all distinct content)."""
    ext = path.suffix.lower()
    h, w = 12 + seed % 7, 14 + seed % 5
    if ext == ".tif":
        return save(path, noise(seed, (h, w), np.uint16, 60000))  # 16-bit grayscale
    if ext == ".jpg":
        return save(path, noise(seed, (h, w)))  # 8-bit grayscale JPEG
    if ext == ".bmp":
        return save(path, noise(seed, (h, w, 3)))
    if seed % 2:
        return save(path, noise(seed, (h, w, 4)))  # RGBA PNG
    return save(path, noise(seed, (h, w, 3)))


def png16(path, array):
    """A 16-bit-per-sample PNG of uint16 ``[H, W, C]``: C = 2 gray+alpha, 3 RGB, 4 RGBA."""
    h, w, c = array.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", w, h, 16, {2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def tiff16(path, array, order="<", deflate=False, planar=False):
    """A one-strip 16-bit-per-sample RGB(A) TIFF of uint16 ``[H, W, C]`` (deflate: via libtiff)."""
    h, w, c = array.shape
    pixels = np.moveaxis(array, 2, 0) if planar else array
    data = np.ascontiguousarray(pixels).astype(order + "u2").tobytes()
    data = zlib.compress(data) if deflate else data
    # (tag, type 3 = SHORT / 4 = LONG, count, value); 258 and 273 point past the tags.
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, c, None), (259, 3, 1, 8 if deflate else 1)]
    tags += [(262, 3, 1, 2), (273, 4, 1, None), (277, 3, 1, c), (278, 4, 1, h)]
    tags += [(279, 4, 1, len(data)), (284, 3, 1, 2 if planar else 1)]
    tags += [(338, 3, 1, 2)] if c == 4 else []
    bits_at = 8 + 2 + 12 * len(tags) + 4
    out = (b"II" if order == "<" else b"MM") + struct.pack(order + "HIH", 42, 8, len(tags))
    for tag, kind, count, value in tags:
        value = {258: bits_at, 273: bits_at + 2 * c}.get(tag, value)
        if kind == 3 and count == 1:  # a SHORT value fills the first 2 of 4 bytes
            out += struct.pack(order + "HHIHH", tag, kind, count, value, 0)
        else:
            out += struct.pack(order + "HHII", tag, kind, count, value)
    path.write_bytes(out + struct.pack(order + f"I{c}H", 0, *[16] * c) + data)
    return path


EXTENSIONS = (".png", ".jpg", ".bmp", ".tif")


def patient_folder(root, classes=("benign", "malignant"), patients=6, per_patient=3, nested=True):
    """``root/<class>/[sub/]P<k>_<j>.<ext>`` with mixed formats and sizes; k is the patient."""
    seed = 0
    for c, name in enumerate(classes):
        for p in range(patients):
            pid = f"P{c}{p:02d}"
            for j in range(per_patient):
                sub = f"visit{j}/" if nested and j == 2 else ""
                ext = EXTENSIONS[seed % len(EXTENSIONS)]
                save_any(root / name / f"{sub}{pid}_{j}{ext}", seed)
                seed += 1
    return root


def assert_group_disjoint(data, splits):
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    for a in parts:
        for b in parts:
            if a < b:
                assert not set(data.groups[parts[a]]) & set(data.groups[parts[b]]), (a, b)
    for i, fa in enumerate(splits.fractions):
        for fb in splits.fractions[i + 1 :]:
            assert not set(data.groups[fa]) & set(data.groups[fb])


# ----------------------------------------------------------------------------- decode_image


def test_decode_rgb_keeps_colour_and_gives_gray_luma(tmp_path):
    path = save(tmp_path / "c.png", np.full((20, 20, 3), (10, 200, 30), np.uint8))
    rgb = folder.decode_image(path, image_size=S, channels=3)
    assert rgb.shape == (S, S, 3) and rgb.dtype == np.uint8
    assert (rgb == np.array([10, 200, 30], np.uint8)).all()
    gray = folder.decode_image(path, image_size=S, channels=1)
    assert gray.shape == (S, S, 1)
    assert abs(int(gray[0, 0, 0]) - round(0.299 * 10 + 0.587 * 200 + 0.114 * 30)) <= 1
    assert (folder.decode_image(path, image_size=S, channels=0) == rgb).all()  # 0 = 3 (folders)


def test_decode_letterboxes_non_square_images(tmp_path):
    tall = save(tmp_path / "tall.bmp", np.full((20, 10, 3), 200, np.uint8))
    out = folder.decode_image(tall, image_size=S, channels=3)
    # 10 x 20 -> 8 x 16, centred: 4 black columns each side, nothing cropped or stretched.
    assert (out[:, :4] == 0).all() and (out[:, 12:] == 0).all()
    assert (out[:, 4:12] == 200).all()
    wide = save(tmp_path / "wide.png", np.full((10, 40), 90, np.uint8))
    out = folder.decode_image(wide, image_size=S, channels=1)
    # 40 x 10 -> 16 x 4, rows 6..9.
    assert (out[:6] == 0).all() and (out[10:] == 0).all() and (out[6:10] == 90).all()


def test_decode_rgba_composites_over_black(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # opaque red
    rgba[:, 8:] = (255, 255, 255, 0)  # transparent white
    out = folder.decode_image(save(tmp_path / "a.png", rgba), image_size=S, channels=3)
    assert (out[:, :7] == (255, 0, 0)).all()
    assert (out[:, 9:] == 0).all()


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_decode_16bit_scales_min_max_without_clipping(tmp_path, ext):
    ramp = np.linspace(1000, 31000, 16 * 16).reshape(16, 16).astype(np.uint16)
    path = save(tmp_path / f"r{ext}", ramp)
    assert Image.open(path).mode.startswith("I")
    out = folder.decode_image(path, image_size=S, channels=1)[..., 0].astype(int)
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 200  # a ramp, not saturated / clipped to a few values
    assert (np.diff(out.ravel()) >= 0).all()
    # 12-bit data stored as 16-bit (0..4095) still fills the range (not divided by 257).
    twelve = save(tmp_path / f"t{ext}", (ramp // 8).astype(np.uint16))
    assert folder.decode_image(twelve, image_size=S, channels=3).max() == 255


TWELVE_BIT_RGB = noise(7, (S, S, 3), np.uint16, 4096)  # 12-bit colour stored in 16 bits


def scaled(values):
    """The expected 0..255 scaling of 16-bit samples: one min..max for all channels."""
    lo, hi = values.min(), values.max()
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: png16(p / "c.png", TWELVE_BIT_RGB),
        lambda p: tiff16(p / "le.tif", TWELVE_BIT_RGB, "<"),
        lambda p: tiff16(p / "be.tif", TWELVE_BIT_RGB, ">"),
        pytest.param(
            lambda p: tiff16(p / "deflate.tif", TWELVE_BIT_RGB, ">", deflate=True),
            marks=pytest.mark.skipif(not features.check("libtiff"), reason="no libtiff"),
        ),
    ],
    ids=["png", "tiff-le", "tiff-be", "tiff-deflate"],
)
def test_decode_16bit_colour_at_full_precision_scaled_like_16bit_gray(tmp_path, make):
    path = make(tmp_path)
    assert Image.open(path).mode == "RGB"  # Pillow alone keeps the top 8 bits: 0..15 here
    out = folder.decode_image(path, image_size=S, channels=3)
    np.testing.assert_array_equal(out, scaled(TWELVE_BIT_RGB))


def test_decode_16bit_rgba_composites_over_black_and_refuses_what_it_cannot_decode(tmp_path):
    alpha = np.zeros((S, S, 1), np.uint16)
    alpha[:, : S // 2] = 65535
    path = png16(tmp_path / "a.png", np.concatenate([TWELVE_BIT_RGB, alpha], axis=2))
    out = folder.decode_image(path, image_size=S, channels=3)
    np.testing.assert_array_equal(out[:, : S // 2], scaled(TWELVE_BIT_RGB)[:, : S // 2])
    assert (out[:, S // 2 :] == 0).all()
    # 16-bit gray + alpha, and planar 16-bit RGB: Pillow cannot give their full precision.
    gray_alpha = png16(tmp_path / "la.png", np.concatenate([TWELVE_BIT_RGB[:, :, :1], alpha], 2))
    planar = tiff16(tmp_path / "planar.tif", TWELVE_BIT_RGB, planar=True)
    for path in (gray_alpha, planar):
        with pytest.raises(DataError) as e:
            folder.decode_image(path, image_size=S, channels=3)
        message = str(e.value)
        assert path.name in message and "16 bits per channel" in message, message
        assert "Fix: convert them to 8 bits per channel" in message, message


@pytest.mark.parametrize(
    "name,array,mode,kwargs",
    [
        ("l.jpg", np.full((20, 24), 120, np.uint8), None, {"quality": 95}),
        ("rgb.jpg", np.full((24, 24, 3), (40, 80, 160), np.uint8), None, {"quality": 95}),
        ("rgb.tiff", np.full((16, 16, 3), 77, np.uint8), None, {}),
        ("gray.bmp", np.full((16, 16), 33, np.uint8), None, {}),
    ],
)
def test_decode_other_formats_and_modes(tmp_path, name, array, mode, kwargs):
    path = save(tmp_path / name, array, mode, **kwargs)
    for channels in (1, 3):
        out = folder.decode_image(path, image_size=S, channels=channels)
        assert out.shape == (S, S, channels) and out.dtype == np.uint8
    centre = folder.decode_image(path, image_size=S, channels=3)[8, 8].astype(int)
    expected = np.broadcast_to(array[0, 0], (3,)).astype(int)
    assert np.abs(centre - expected).max() <= 3


def test_decode_palette_and_exif_orientation(tmp_path):
    rgb = Image.fromarray(np.full((16, 16, 3), (0, 128, 255), np.uint8))
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    Image.new("1", (16, 16), 1).save(tmp_path / "bits.png")
    bits = folder.decode_image(tmp_path / "bits.png", image_size=S, channels=1)
    assert (bits == 255).all()
    out = folder.decode_image(tmp_path / "p.png", image_size=S, channels=3)
    assert (out[4, 4] == (0, 128, 255)).all(), out[4, 4]
    # 40 wide x 10 high, stored with "rotate 90" (EXIF 6): shown 10 wide x 40 high -> side bars.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((10, 40, 3), 250, np.uint8)).save(tmp_path / "o.jpg", exif=exif)
    out = folder.decode_image(tmp_path / "o.jpg", image_size=S, channels=1)
    assert out[:, 0].max() < 20 and out[:, -1].max() < 20 and out[:, 8].min() > 200


def test_decode_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="cannot read .*missing.png"):
        folder.decode_image(tmp_path / "missing.png", image_size=S, channels=3)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match=r"(?s)text.png.*not a PNG.*Fix: re-copy or re-export"):
        folder.decode_image(tmp_path / "text.png", image_size=S, channels=3)
    with pytest.raises(DataError, match="data.channels=2"):
        folder.decode_image(tmp_path / "text.png", image_size=S, channels=2)
    (tmp_path / "link.png").symlink_to("gone/original.png")
    with pytest.raises(DataError) as e:
        folder.decode_image(tmp_path / "link.png", image_size=S, channels=3)
    target = f"gone/original.png (= {tmp_path / 'gone' / 'original.png'})"
    assert f"link.png: broken symbolic link to {target}" in str(e.value), str(e.value)
    assert "Fix: point the links at existing files" in str(e.value), str(e.value)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"(?s)empty.png: empty file \(0 bytes\).*Fix: re-copy"):
        folder.decode_image(tmp_path / "empty.png", image_size=S, channels=3)


# ----------------------------------------------------------------------------- loading


def test_load_mixed_folder_sorted_with_skips_warned(tmp_path, caplog):
    root = patient_folder(tmp_path / "d", patients=2)
    (root / "benign" / "notes.txt").write_text("x")
    (root / "benign" / "scan.dcm").write_bytes(b"DICM")
    (root / "README.md").write_text("x")
    with caplog.at_level(logging.WARNING):
        data = folder.load(data_config(root))
    assert data.class_names == ("benign", "malignant")
    assert data.images.shape == (12, S, S, 3) and data.images.dtype == np.uint8
    assert list(data.paths) == sorted(data.paths)
    assert data.groups is None and data.split is None
    assert data.labels.dtype == np.int32
    assert (data.labels == [0 if "/benign/" in p else 1 for p in data.paths]).all()
    text = caplog.text
    assert "notes.txt" in text and "README.md" in text and "not in a class folder" in text
    assert "scan.dcm" in text and "DICOM is not supported" in text
    # Every file is either loaded or named in a warning.
    gray = folder.load(data_config(root, channels=1))
    assert gray.images.shape == (12, S, S, 1)


def test_data_root_set_to_one_class_folder_is_named_with_the_fix(tmp_path, caplog):
    # data.root=DATA/glioma instead of DATA: its images lie directly in it, and its sub folders
    # would be taken as the classes.
    root = tmp_path / "data" / "glioma"
    for i in range(2):
        save_any(root / f"s{i}.png", i)
    fix = f"set data.root to the folder holding all the class folders (e.g. {root.parent})"
    with pytest.raises(DataError) as e:
        folder.load(data_config(root))
    assert f"Fix: if {root} is one class's folder, {fix}; otherwise put" in str(e.value)
    save_any(root / "more" / "t0.png", 10)
    with pytest.raises(DataError) as e:
        folder.load(data_config(root))
    assert str(e.value) == (
        f"{root} has a single class folder ('more') and 2 image(s) directly in it (e.g. "
        f"{root / 's0.png'}), as a class's own folder has. Fix: if {root} is one class's "
        f"folder, {fix}; otherwise move these images into their class's folder, and add another "
        "class (a classifier needs at least 2)."
    )
    save_any(root / "extra" / "t1.png", 11)
    with caplog.at_level(logging.WARNING):
        data = folder.load(data_config(root))
    assert data.class_names == ("extra", "more")
    assert [r.getMessage() for r in caplog.records] == [
        f"2 image(s) directly in {root} are in no class folder and are left out:\n"
        f"  {root / 's0.png'}\n  {root / 's1.png'}\n"
        f"The classes are its 2 folders: extra, more. If {root} is one class's folder, {fix}; "
        "if the images belong to a class, move them into its folder."
    ]


def test_what_load_says_of_skipped_and_damaged_files_holds_for_evaluate_too(tmp_path, caplog):
    # evaluate reads folders through the same load: "not used for training", or "to train
    # without them", would be wrong there.
    root = _truncated(tmp_path / "root")
    (root / "b" / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as e:
        folder.load(data_config(root))
    assert [r.getMessage() for r in caplog.records] == [
        f"1 file(s) under {root} are skipped (left out of the data):\n"
        f"  {root / 'b' / 'notes.txt'}: not a PNG, JPEG, BMP or TIFF file"
    ]
    assert str(e.value).endswith("leave them out of it) to go on without them.")


def test_group_regex_gives_patient_ids_and_group_disjoint_splits(tmp_path):
    root = patient_folder(tmp_path / "d", patients=8)
    data = folder.load(data_config(root, group_regex=r"(P\d+)_"))
    assert data.groups.dtype == np.int64 and len(np.unique(data.groups)) == 16
    patient = np.array([os.path.basename(p).split("_")[0] for p in data.paths])
    for g in np.unique(data.groups):
        assert len(set(patient[data.groups == g])) == 1
    for seed in range(3):
        splits = make_splits(
            data.labels,
            data.groups,
            val_fraction=0.2,
            test_fraction=0.2,
            num_fractions=2,
            fraction=0.4,
            label_ratio=1.0,
            seed=seed,
        )
        assert splits.split_by == "group"
        assert_group_disjoint(data, splits)
        folder.check_enough(data, splits, val_fraction=0.2, test_fraction=0.2, fraction=0.4)


def test_a_patient_with_images_in_two_classes_is_named_in_a_warning(tmp_path, caplog):
    # Right for two ears or slices with and without a finding, a mistake otherwise: said, not
    # refused.
    root = tmp_path / "d"
    for seed, name in enumerate(["a/P1_1.png", "a/P1_2.png", "b/P1_3.png", "a/P2_1.png"]):
        save_any(root / name, seed)
    save_any(root / "b" / "P3_1.png", 9)
    with caplog.at_level(logging.WARNING):
        data = folder.load(data_config(root, group_regex=r"(P\d+)_"))
    assert len(np.unique(data.groups)) == 3
    assert [r.getMessage() for r in caplog.records] == [
        "1 patient(s) (group ids) have images in more than one class; each is kept whole (one "
        "split, one chain fraction) and placed as a patient of its most frequent class:\n"
        "  'P1': 2 in a, 1 in b\n"
        "Nothing is wrong if a patient can have images of two classes (e.g. two ears, or slices "
        "with and without a finding). Otherwise fix the labels, or the group ids (a "
        r"data.group_regex='(P\d+)_' that takes too little of a path merges patients)."
    ]
    caplog.clear()
    (root / "manifest.csv").write_text(
        "path,label,group\na/P1_1.png,a,x\nb/P1_3.png,b,x\na/P2_1.png,a,y\nb/P3_1.png,b,z\n"
    )
    with caplog.at_level(logging.WARNING):
        folder.load(data_config(root))
    (spans,) = [r.getMessage() for r in caplog.records if "one class;" in r.getMessage()]
    assert "\n  'x': 1 in a, 1 in b\n" in spans and spans.endswith("labels, or the group ids.")


def test_manifest_groups_fixed_split_and_unlisted_images(tmp_path, caplog):
    root = tmp_path / "m"
    rows = ["path,label,group,split,age"]
    for i in range(24):
        save_any(root / "flat" / f"img{i:02d}.png", 100 + i)
        patient = f"ear{i // 2}"
        split = "test" if i // 2 in (0, 1) else ""
        if i == 5:  # the second image of ear2 names a split, the first leaves it empty
            split = "val"
        rows.append(
            f"flat/img{i:02d}.png,{'otitis' if i % 4 < 2 else 'normal'},{patient},{split},7"
        )
    save_any(root / "flat" / "extra.png", 999)
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        data = folder.load(data_config(root))
    assert data.class_names == ("normal", "otitis")
    assert len(data) == 24 and len(np.unique(data.groups)) == 12
    assert "extra.png" in caplog.text and "not in the manifest" in caplog.text
    assert "age" in caplog.text and "img04.png -> val" in caplog.text
    split = dict(zip([os.path.basename(p) for p in data.paths], data.split, strict=True))
    assert split["img00.png"] == split["img03.png"] == "test"
    assert split["img04.png"] == split["img05.png"] == "val"
    splits = make_splits(
        data.labels,
        data.groups,
        val_fraction=0.2,
        test_fraction=0.2,
        num_fractions=2,
        fraction=0.4,
        label_ratio=1.0,
        seed=0,
        fixed_split=data.split,
    )
    assert set(splits.test) >= set(np.flatnonzero(data.split == "test"))
    assert_group_disjoint(data, splits)
    # data.manifest elsewhere, paths relative to the manifest's folder, no data.root.
    other = tmp_path / "lists" / "mine.csv"
    other.parent.mkdir()
    other.write_text("path,label\n../m/flat/img00.png,a\n../m/flat/img01.png,b\n")
    mine = folder.load(data_config("", manifest=str(other)))
    assert mine.class_names == ("a", "b") and mine.groups is None and mine.split is None


def test_images_the_manifest_leaves_out_are_those_a_folder_scan_finds(tmp_path, caplog):
    root = tmp_path / "m"
    save_any(root / "a" / "1.png", 1)
    save_any(root / "b" / "2.png", 2)
    (root / "a" / "._1.png").write_bytes(b"\0\5\26\7")  # macOS metadata, not an image
    save_any(tmp_path / "share" / "3.png", 3)
    (root / "b" / "linked").symlink_to(tmp_path / "share")
    (root / "manifest.csv").write_text("path,label\na/1.png,a\nb/2.png,b\n")
    with caplog.at_level(logging.WARNING):
        folder.load(data_config(root))
    unlisted = [r.getMessage() for r in caplog.records if "not in the manifest" in r.getMessage()]
    assert len(unlisted) == 1
    assert unlisted[0].splitlines()[1:] == [f"  {root / 'b' / 'linked' / '3.png'}"]


def test_manifest_paths_find_files_named_in_another_unicode_form_or_with_backslashes(tmp_path):
    root = tmp_path / "m"
    decomposed = unicodedata.normalize("NFD", "méningiome")  # as macOS names files
    save_any(root / "a" / f"{decomposed}.png", 1)
    save_any(root / "b" / "sub" / "2.png", 2)
    composed = unicodedata.normalize("NFC", "méningiome")  # as a spreadsheet types it
    (root / "manifest.csv").write_text(f"path,label\na/{composed}.png,a\nb\\sub\\2.png,b\n")
    data = folder.load(data_config(root))
    assert list(data.paths) == [str(root / "a" / f"{decomposed}.png"), str(root / "b/sub/2.png")]


def test_manifest_paths_find_files_whose_names_mix_unicode_forms(tmp_path):
    # A folder made on one system (NFC) holding files named on macOS (NFD), listed by a
    # spreadsheet in the opposite forms: each name is matched on its own.
    nfc, nfd = (unicodedata.normalize(form, "Café") for form in ("NFC", "NFD"))
    root = tmp_path / "m"
    on_disk = save_any(root / nfc / "scans" / f"{nfd}.png", 1)
    save_any(root / "b" / "2.png", 2)
    listed = f"{nfd}/scans/{nfc}.png"
    (root / "manifest.csv").write_text(f"path,label\n{listed},a\nb\\2.png,b\n", encoding="utf-8")
    data = folder.load(data_config(root))
    assert list(data.paths) == [str(on_disk), str(root / "b" / "2.png")]
    absolute = tmp_path / "list.csv"  # an absolute path, mixed the same way
    absolute.write_text(f"path,label\n{root}/{listed},a\n{root}/b/2.png,b\n", encoding="utf-8")
    assert list(folder.load(data_config("", manifest=str(absolute))).paths) == list(data.paths)


def test_a_class_named_in_two_unicode_forms_is_refused(tmp_path):
    # "méningiome" typed (NFC) and named by macOS (NFD) print the same: two classes of the same
    # name would split one class in two.
    names = (unicodedata.normalize("NFC", "méningiome"), unicodedata.normalize("NFD", "méningiome"))
    twins = "'méningiome' {} are each spelled in more than one Unicode form"
    root = tmp_path / "m"
    rows = ["path,label"]
    for i, label in enumerate((*names, "normal")):
        save_any(root / f"{i}.png", i)
        rows.append(f"{i}.png,{label}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=twins.format(f"listed in {root / 'manifest.csv'}")):
        folder.load(data_config(root))
    folders = tmp_path / "f"
    for i, label in enumerate((*names, "normal")):
        save_any(folders / label / f"{i}.png", i)
    with pytest.raises(DataError, match=twins.format(f"under {folders}")):
        folder.load(data_config(folders))


def test_group_regex_with_a_manifest_and_no_root_reads_paths_relative_to_the_manifest(tmp_path):
    # The manifest's parent folder matches the regex too ("P9_"): an absolute path would give
    # every image the id "P9", and an anchored regex would match no image at all.
    base = tmp_path / "P9_study"
    rows = ["path,label"]
    for c, name in enumerate("ab"):
        for p in range(3):
            save_any(base / name / f"P{c}{p}" / f"P{c}{p}_1.png", 10 * c + p)
            rows.append(f"{name}/P{c}{p}/P{c}{p}_1.png,{name}")
    (base / "list.csv").write_text("\n".join(rows) + "\n")
    for pattern in (r"(P\d+)_", r"^[^/]+/([^/]+)/"):
        data = folder.load(data_config("", manifest=str(base / "list.csv"), group_regex=pattern))
        assert len(np.unique(data.groups)) == 6, pattern


def test_same_class_duplicates_are_skipped_with_a_warning(tmp_path, caplog):
    root = patient_folder(tmp_path / "d", patients=2, nested=False)
    first = sorted((root / "benign").iterdir())[0]
    (root / "benign" / "zz_copy.png").write_bytes(first.read_bytes())
    with caplog.at_level(logging.WARNING):
        data = folder.load(data_config(root))
    assert len(data) == 12
    assert "zz_copy.png" in caplog.text and first.name in caplog.text


# ----------------------------------------------------------------------------- errors


def _two_classes(root):
    save_any(root / "a" / "1.png", 1)
    save_any(root / "b" / "2.png", 2)
    return root


def _truncated(root):
    _two_classes(root)
    data = (root / "a" / "1.png").read_bytes()
    (root / "a" / "1.png").write_bytes(data[: len(data) // 2])
    return root


def _fake_image(root):
    _two_classes(root)
    (root / "b" / "fake.jpg").write_text("hello")
    return root


def _empty_image(root):
    _two_classes(root)
    (root / "b" / "empty.png").write_bytes(b"")
    return root


def _broken_link(root):
    _two_classes(root)
    (root / "b" / "link.png").symlink_to("/no/such/scan.png")
    return root


def _broken_class_link(root):
    _two_classes(root)
    (root / "c").symlink_to("/mnt/unmounted/c")  # a class folder on a drive not mounted
    return root


def _broken_folder_link(root):
    _two_classes(root)
    (root / "b" / "scans").symlink_to("/mnt/unmounted/scans")  # a folder of class b's images
    return root


def _duplicate_across(root):
    _two_classes(root)
    (root / "b" / "same.png").write_bytes((root / "a" / "1.png").read_bytes())
    return root


def _class_without_images(root):
    _two_classes(root)
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("x")
    return root


def _single_class(root):
    save_any(root / "only" / "1.png", 1)
    return root


def _images_at_root(root):
    save_any(root / "1.png", 1)
    return root


def _manifest_missing(root):
    _two_classes(root)
    (root / "manifest.csv").write_text("path,label\na/1.png,a\nb/2.png,b\nb/gone.png,b\n")
    return root


def _manifest_broken_link(root):
    _broken_link(root)
    (root / "manifest.csv").write_text("path,label\na/1.png,a\nb/2.png,b\nb/link.png,b\n")
    return root


def _manifest_dicom(root):
    _two_classes(root)
    (root / "b" / "scan.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (root / "manifest.csv").write_text("path,label\na/1.png,a\nb/2.png,b\nb/scan.dcm,b\n")
    return root


def _manifest_header(root):
    _two_classes(root)
    (root / "manifest.csv").write_text("file,class\na/1.png,a\n")
    return root


def _manifest_latin1(root):
    _two_classes(root)
    (root / "manifest.csv").write_bytes("path,label\na/1.png,\xe9\nb/2.png,b\n".encode("latin-1"))
    return root


def _manifest_semicolons(root):
    _two_classes(root)
    (root / "manifest.csv").write_text("path;label\na/1.png;a\nb/2.png;b\n")
    return root


def _manifest_split_conflict(root):
    _two_classes(root)
    save_any(root / "b" / "3.png", 3)
    (root / "manifest.csv").write_text(
        "path,label,group,split\na/1.png,a,P1,train\nb/2.png,b,P1,test\nb/3.png,b,P2,\n"
    )
    return root


def _empty_root(root):
    root.mkdir()
    return root


@pytest.mark.parametrize(
    "make,overrides,needles",
    [
        (lambda r: r, {}, ["does not exist", "Fix: set --config.data.root"]),
        (_empty_root, {}, ["is empty", "DIR/<class>/<image>"]),
        (_class_without_images, {}, ["/c", "notes.txt", "add images", "remove the folders"]),
        (_single_class, {}, ["single class folder", "'only'", "at least 2"]),
        (_images_at_root, {}, ["no class folders", "1.png", "manifest.csv"]),
        (_truncated, {}, ["a/1.png", "truncated", "Fix: re-copy or re-export"]),
        (_fake_image, {}, ["b/fake.jpg", "not a PNG, JPEG", "Fix: re-copy"]),
        (_empty_image, {}, ["b/empty.png: empty file (0 bytes)", "interrupted copy"]),
        (_broken_link, {}, ["b/link.png: broken symbolic link to /no/such/scan.png", "Fix: point"]),
        (_broken_class_link, {}, ["c: broken symbolic link to /mnt/unmounted/c", "mount"]),
        (_broken_folder_link, {}, ["b/scans: broken symbolic link to /mnt/unmounted", "mount"]),
        (_duplicate_across, {}, ["a/1.png [a]", "b/same.png [b]", "Fix: delete the copy"]),
        (_manifest_missing, {}, ["b/gone.png", "line 4", "do not exist", "Fix: correct"]),
        (_manifest_broken_link, {}, ["line 4", "(a broken symbolic link to /no/such/scan.png)"]),
        (_manifest_dicom, {}, ["line 4: b/scan.dcm: DICOM is not supported: convert it to PNG"]),
        (_manifest_header, {}, ["no path and no label column", "Fix: the first line"]),
        (_manifest_latin1, {}, ["is not UTF-8", "Fix: save it as UTF-8"]),
        (_manifest_semicolons, {}, ["no path and no label column", "not ';'"]),
        (_manifest_split_conflict, {}, ["'P1'", "two splits", "a/1.png", "b/2.png", "same split"]),
        (_two_classes, {"group_regex": r"(P\d+)"}, ["no patient id", "a/1.png", "capture group"]),
        (_two_classes, {"group_regex": r"P\d+"}, ["no capture group", "Fix"]),
        (_two_classes, {"group_regex": r"(P"}, ["not a valid regular expression", "Fix"]),
        (_two_classes, {"channels": 4}, ["data.channels=4", "use 1"]),
        (_two_classes, {"manifest": "/no/such.csv"}, ["data.manifest=/no/such.csv", "Fix"]),
    ],
)
def test_bad_input_is_a_data_error_naming_file_and_fix(tmp_path, make, overrides, needles):
    root = make(tmp_path / "root")
    with pytest.raises(DataError) as e:
        folder.load(data_config(root, **overrides))
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_paths_group_regex_does_not_match_are_listed_sorted_under_the_pattern_as_typed(tmp_path):
    root = tmp_path / "root"
    names = ["b/img.png", "a/P1_x.png", "a/scan.png", "b/P2_x.png"]  # the manifest's order
    for seed, name in enumerate(names):
        save_any(root / name, seed)
    (root / "manifest.csv").write_text("path,label\n" + "".join(f"{n},{n[0]}\n" for n in names))
    with pytest.raises(DataError) as e:
        folder.load(data_config(root, group_regex=r"(P\d+)_"))
    assert str(e.value) == (
        rf"data.group_regex='(P\d+)_' finds no patient id in 2 image path(s) (matched against "
        f"the path relative to {root}):\n  a/scan.png\n  b/img.png\nFix: change the expression "
        "so that its first capture group matches every path, or give the ids in a manifest "
        "group column (data evaluated whole, as by evaluate --split all, needs no ids: "
        "--config.data.group_regex='')."
    )


def test_all_damaged_files_are_listed_at_once(tmp_path):
    root = _truncated(tmp_path / "root")
    (root / "b" / "fake.png").write_text("nope")
    with pytest.raises(DataError, match=r"(?s)2 image\(s\).*a/1.png.*b/fake.png"):
        folder.load(data_config(root))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_data_errors_and_the_limit_stays_on(tmp_path, monkeypatch):
    root = _two_classes(tmp_path / "root")
    save(root / "a" / "warn_zone.png", noise(5, (12, 12)))  # 144 px: Pillow would only warn
    save(root / "b" / "error_zone.png", noise(6, (30, 30)))  # 900 px: Pillow raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError) as e:
        folder.load(data_config(root))
    message = str(e.value)
    assert "warn_zone.png" in message and "error_zone.png" in message
    assert "decompression" in message and "Fix: downscale or tile" in message
    assert Image.MAX_IMAGE_PIXELS == 100


def test_check_enough_names_short_classes_and_the_fix(tmp_path):
    root = tmp_path / "root"
    for i in range(20):
        save_any(root / "common" / f"{i}.png", i)
    for i in range(3):
        save_any(root / "rare" / f"{i}.png", 100 + i)
    save_any(root / "single" / "0.png", 200)
    data = folder.load(data_config(root))
    with pytest.raises(DataError) as e:
        _check_enough(data, val_fraction=0.15, test_fraction=0.2, num_fractions=3, fraction=0.1)
    message = str(e.value)
    assert "'rare' (3 images): none in val" in message and "'common'" not in message
    assert "'single' (1 image): none in" in message
    assert "about 16 images" in message and "Fix: add images" in message
    assert "chain.fraction" in message
    # Without the single-image class, the same data passes with one large fraction and large
    # held-out shares.
    shutil.rmtree(root / "single")
    data = folder.load(data_config(root))
    _check_enough(data, val_fraction=0.34, test_fraction=0.34, num_fractions=1, fraction=1.0)


def test_check_enough_suggests_only_the_settings_of_the_short_parts(tmp_path):
    # Raising a held-out share takes images from the fractions: it is no fix for short fractions.
    root = tmp_path / "root"
    for c in "ab":
        for i in range(10):
            save_any(root / c / f"{i}.png", 100 * (c == "b") + i)
    data = folder.load(data_config(root))
    with pytest.raises(DataError) as e:
        _check_enough(data, val_fraction=0.2, test_fraction=0.2, num_fractions=3, fraction=0.1)
    assert "none in fraction" in str(e.value) and "none in val" not in str(e.value)
    assert str(e.value).endswith(
        "Fix: add images of these classes, remove the classes, or raise chain.fraction / lower "
        "chain.length."
    )
    with pytest.raises(DataError) as e:
        _check_enough(data, val_fraction=0.02, test_fraction=0.2, num_fractions=1, fraction=0.5)
    assert "'a' (10 images): none in val\n" in str(e.value)
    assert str(e.value).endswith(
        "Fix: add images of these classes, remove the classes, or raise data.val_fraction."
    )


def test_check_enough_refuses_a_first_fraction_without_labels(tmp_path):
    root = tmp_path / "root"
    for c in "ab":
        for i in range(20):
            save_any(root / c / f"{i}.png", 100 * (c == "b") + i)
    data = folder.load(data_config(root))
    kw = dict(val_fraction=0.2, test_fraction=0.2, num_fractions=1, fraction=0.5)
    _check_enough(data, label_ratio=0.2, **kw)  # 12 images, 2 labelled
    with pytest.raises(DataError, match=r"fraction 1 \(12 images\) keeps no label.*Fix: raise"):
        _check_enough(data, label_ratio=0.04, **kw)


def _check_enough(data, *, val_fraction, test_fraction, num_fractions, fraction, label_ratio=1.0):
    splits = make_splits(
        data.labels,
        data.groups,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        num_fractions=num_fractions,
        fraction=fraction,
        label_ratio=label_ratio,
        seed=0,
        fixed_split=data.split,
    )
    folder.check_enough(
        data, splits, val_fraction=val_fraction, test_fraction=test_fraction, fraction=fraction
    )


# ----------------------------------------------------------------------------- cache, progress


def test_cache_hit_on_second_load_never_decodes(tmp_path, monkeypatch):
    root = patient_folder(tmp_path / "d", patients=2)
    cache_dir = tmp_path / "cache"
    first = folder.load(data_config(root, cache_dir=str(cache_dir)))
    entries = list(cache_dir.rglob("*.npy"))
    assert len(entries) == len(first)
    assert not list(cache_dir.rglob(".tmp-*"))  # atomic writes leave no temporaries
    # Readable by everyone the umask lets read (not 0600): a cache folder can be shared.
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(e.stat().st_mode) for e in entries} == {0o666 & ~umask}

    def fail(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder, "_open_and_preprocess", fail)
    second = folder.load(data_config(root, cache_dir=str(cache_dir)))
    assert (second.images == first.images).all() and (second.labels == first.labels).all()
    # Other preprocessing settings are other keys: they miss (and here reach the failing decoder).
    with pytest.raises(AssertionError, match="decoded although cached"):
        folder.load(data_config(root, cache_dir=str(cache_dir), image_size=S + 8))


def test_cache_location_xdg_and_none(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_lib.cache_root("") == str(tmp_path / "xdg" / "weckd_jax")
    assert cache_lib.cache_root("none") is None and cache_lib.cache_root("None") is None
    root = _two_classes(tmp_path / "root")
    folder.load(data_config(root, cache_dir=""))
    assert len(list((tmp_path / "xdg" / "weckd_jax").rglob("*.npy"))) == 2
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg2"))
    folder.load(data_config(root, cache_dir="none"))
    assert not (tmp_path / "xdg2").exists()


def test_scan_progress_is_printed_to_stderr(tmp_path, monkeypatch, capsys):
    root = patient_folder(tmp_path / "d", patients=2)
    monkeypatch.setattr(folder._ProgressLine, "interval_s", 0.0)
    folder.load(data_config(root))
    err = capsys.readouterr().err
    assert f"scanning {root}: 1/12 images" in err
    assert f"scanning {root}: 12/12 images (12 decoded, 0 from the cache)" in err


# ----------------------------------------------------------------------------- end to end


def test_grayscale_folder_trains_a_one_channel_chain(tmp_path):
    root = tmp_path / "mri"
    for c, name in enumerate(("no_tumor", "tumor")):
        for i in range(30):
            image = noise(1000 * c + i, (24, 24), high=128) + (0 if c == 0 else 100)
            save(root / name / f"s{i:02d}.png", image.astype(np.uint8))
    config = smoke_config()
    config.data.source = "folder"
    config.data.root = str(root)
    config.data.channels = 1
    config.data.image_size = 24
    config.data.cache_dir = "none"
    config.train.epochs = 1
    config.baselines.union_supervised = False
    config.baselines.full_supervised = False
    config_lib.validate(config)
    workdir = str(tmp_path / "run")
    results = chain.run(config, workdir, Progress(enabled=False))
    assert results["data"]["channels"] == 1 and results["data"]["source"] == "folder"
    assert results["data"]["class_names"] == ["no_tumor", "tumor"]
    assert results["data"]["n_images"] == 60
    assert [r["link"] for r in results["links"]] == [1, 2]
    for record in results["links"]:
        assert record["n_train"] > 0 and 0.0 <= record["test"]["accuracy"] <= 1.0
        assert checkpoints.has_final(workdir, f"link_{record['link']}")
    assert results["links"][1]["teachers"] == ["link_1"]


@pytest.mark.parametrize(
    "module,classes,channels",
    [
        ("configs.brain_mri_folder", ("glioma", "meningioma", "no_tumor", "pituitary"), 1),
        ("configs.otoscopy_folder", ("earwax", "normal"), 3),
    ],
)
def test_folder_configs_validate_and_load_their_layout(tmp_path, module, classes, channels):
    config = importlib.import_module(module).get_config()
    config_lib.validate(config)
    assert config.data.source == "folder" and config.data.image_size == 128
    for c, name in enumerate(classes):
        save_any(tmp_path / name / f"{c}.png", c)
    config.data.root = str(tmp_path)
    config.data.cache_dir = "none"
    data = folder.load(config.data)
    assert data.class_names == classes and data.images.shape == (len(classes), 128, 128, channels)
