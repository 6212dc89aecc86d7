"""How every image file becomes 8-bit RGB, by a stated rule per pixel format — or is refused.

Pillow's ``convert("RGB")`` is silently wrong for some inputs: 16-bit greyscale saturates
(almost every pixel becomes 255), transparency is dropped and whatever colour hides under it
shows, a camera JPEG's orientation tag is ignored. Every file goes through :func:`to_rgb`,
which applies these rules and names the one it used, so prepare can count them in its manifest:

=============================  ===============================================================
input                          rule
=============================  ===============================================================
RGB (8 bit)                    as is
greyscale L / 1-bit            the grey value in all three channels
16-bit greyscale (I;16*, I)    value * 255 / 65535, rounded (values beyond 16 bits: refused)
palette (P)                    the palette colours (with transparency: the alpha rule below)
alpha (RGBA, LA, PA, ...)      composited onto black: a pixel keeps alpha/255 of its colour
CMYK                           Pillow's naive CMYK -> RGB (no colour profile is applied)
YCbCr, LAB, HSV                converted to RGB by Pillow
32-bit float (F)               refused: its value range is unknown
EXIF orientation               the image is turned upright first
animations / multi-page        the first frame
=============================  ===============================================================
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from fadrm.errors import DataError

ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
AS_IS = {"RGB"}
RULES = {
    "grey": "greyscale copied to R, G and B",
    "16bit": "16-bit greyscale scaled to 8 bits (v * 255 / 65535)",
    "palette": "palette colours looked up",
    "alpha": "transparency composited onto black",
    "cmyk": "CMYK converted without a colour profile",
    "other": "converted to RGB by Pillow",
    "rotated": "turned upright by its EXIF orientation",
}


def conversion(img: Image.Image) -> str | None:
    """The rule :func:`to_rgb` applies to ``img`` (None for plain 8-bit RGB); raises for refused formats."""
    mode = img.mode
    if mode == "F":
        raise DataError("32-bit floating-point pixels (mode F) have no defined range; convert the file to 8 or 16 bits")
    if mode in AS_IS:
        return None
    if mode in ("L", "1"):
        return "grey"
    if mode in SIXTEEN_BIT:
        return "16bit"
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        return "alpha"
    if mode == "P":
        return "palette"
    if mode == "CMYK":
        return "cmyk"
    return "other"


def to_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """``img`` as 8-bit RGB and the names of the rules used (see the module's table)."""
    rules = []
    orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
        rules.append("rotated")
    rule = conversion(img)
    if rule is not None:
        rules.append(rule)
    if rule is None:
        return img.copy() if img.mode == "RGB" else img.convert("RGB"), rules
    if rule == "16bit":
        values = np.asarray(img, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"integer pixels outside 0..65535 (mode {img.mode}); convert the file to 8 or 16 bits")
        grey = np.rint(values * (255 / 65535)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), rules
    if rule == "alpha":
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        rgb = np.rint(rgba[..., :3] * (rgba[..., 3:] / 255)).astype(np.uint8)
        return Image.fromarray(rgb, "RGB"), rules
    return img.convert("RGB"), rules
