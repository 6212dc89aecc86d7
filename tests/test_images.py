"""Every pixel format becomes 8-bit RGB by a stated rule, or is refused — and a user's dataset
is named and sized after itself, not after CIFAR-10."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fadrm.data.images import to_rgb
from fadrm.data.prepared import Prepared
from fadrm.errors import DataError
from fadrm.stage import Layout
from fadrm.stages.prepare import prepare

from .conftest import make_tree, tiny_config


def _real(builtin_tree, k: int = 0) -> np.ndarray:
    path = sorted((builtin_tree / "train" / "cat").iterdir())[k]
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_sixteen_bit_greyscale_is_scaled_not_saturated(builtin_tree):
    grey8 = np.asarray(Image.fromarray(_real(builtin_tree)).convert("L"))
    img16 = Image.fromarray(grey8.astype(np.uint16) * 257)  # the same picture in 16 bits
    assert img16.mode == "I;16" and (np.asarray(img16.convert("RGB")) == 255).mean() > 0.9  # Pillow's own convert
    rgb, rules = to_rgb(img16)
    assert rules == ["16bit"] and np.array_equal(np.asarray(rgb)[..., 0], grey8)
    assert np.array_equal(np.asarray(rgb)[..., 1], grey8) and np.array_equal(np.asarray(rgb)[..., 2], grey8)


def test_transparency_is_composited_onto_black_whatever_colour_it_hides():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200  # colour under the transparent pixels
    rgba[:2, :, 3] = 255  # top half opaque
    rgba[2:, :, 3] = 0
    rgb, rules = to_rgb(Image.fromarray(rgba, "RGBA"))
    pixels = np.asarray(rgb)
    assert rules == ["alpha"] and (pixels[:2] == 200).all() and (pixels[2:] == 0).all()
    half = rgba.copy()
    half[..., 3] = 128
    assert (np.asarray(to_rgb(Image.fromarray(half, "RGBA"))[0]) == round(200 * 128 / 255)).all()


def test_palette_cmyk_grey_and_exif_orientation(builtin_tree):
    real = _real(builtin_tree)
    palette = Image.fromarray(real).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    rgb, rules = to_rgb(palette)
    assert rules == ["palette"] and np.array_equal(np.asarray(rgb), np.asarray(palette.convert("RGB")))
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0)))[1] == ["cmyk"]
    assert to_rgb(Image.fromarray(real).convert("L"))[1] == ["grey"]
    wide = Image.fromarray(np.zeros((2, 6, 3), np.uint8))
    exif = wide.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    turned, rules = to_rgb(Image.open(_save(wide, exif)))
    assert rules == ["rotated"] and turned.size == (2, 6)


def _save(img: Image.Image, exif):
    import io

    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", exif=exif)
    buffer.seek(0)
    return buffer


def test_floating_point_pixels_are_refused():
    with pytest.raises(DataError, match=r"32-bit floating-point pixels \(mode F\) have no defined range"):
        to_rgb(Image.fromarray(np.zeros((4, 4), np.float32)))


def test_prepare_converts_by_rule_and_counts_the_conversions(builtin_tree, tmp_path):
    root = make_tree(builtin_tree, tmp_path / "data", ["cat", "dog"], 4, 2)
    first = sorted((root / "train" / "cat").iterdir())[0]
    grey8 = np.asarray(Image.open(first).convert("L"))
    Image.fromarray(grey8.astype(np.uint16) * 257).save(first.with_suffix(".png"))
    first.unlink()
    cfg = tiny_config(
        tmp_path / "out", "data.source=imagefolder", f"data.path={root}", "data.train_per_class=null", "data.test_per_class=null"
    )
    metrics = prepare(cfg)
    data = Prepared(Layout.of(cfg).stage("prepare"))
    assert metrics["converted_images"] == 1
    assert data.manifest["conversions"] == {"16-bit greyscale scaled to 8 bits (v * 255 / 65535)": 1}
    index = data.split("train").sources.index(first.with_suffix(".png").relative_to(root).as_posix())
    assert np.array_equal(data.split("train").images[index][..., 0], grey8)  # not 255 almost everywhere


def test_images_of_different_sizes_need_a_stated_resolution(builtin_tree, tmp_path):
    root = make_tree(builtin_tree, tmp_path / "mixed", ["cat", "dog"], 4, 2)
    odd = sorted((root / "train" / "dog").iterdir())[1]
    with Image.open(odd) as img:
        img.resize((64, 40)).save(odd)
    cfg = tiny_config(
        tmp_path / "out",
        "data.source=imagefolder",
        f"data.path={root}",
        "data.name=null",
        "data.train_per_class=null",
        "data.test_per_class=null",
    )
    with pytest.raises(
        DataError,
        match=r"differ in size \(2 sizes: 11 are 32x32, train/dog/.* is 64x40\); "
        r"set data.resolution",
    ):
        prepare(cfg)
    sized = tiny_config(
        tmp_path / "out",
        "data.source=imagefolder",
        f"data.path={root}",
        "data.resolution=32",
        "data.train_per_class=null",
        "data.test_per_class=null",
    )
    assert prepare(sized)["resolution"] == 32
