"""Decoding an image into the RGB picture the model sees: one function for every path.

Lives here: ``decode_image`` (encoded bytes, a file or a path -> an upright RGB PIL image), its two steps
``upright`` (EXIF orientation) and ``to_rgb`` (any PIL mode -> RGB), and ``parse_background`` (a colour
setting -> RGB). Used by ``gcl.data.prepare`` through ``gcl.data.read`` (images kept or re-encoded), by the
training stream and the eval loader through ``gcl.data.batch``, and by the table eval sources and the
galleries (``gcl.eval.tasks``, ``gcl.eval.sources``), so a picture looks the same wherever it is read.

The rules, each chosen so the pixels mean what the file meant:

- EXIF orientation is applied (a photo taken sideways is shown upright, as every viewer shows it).
- Transparency (RGBA / LA / PA, a palette or grey/RGB transparency key) is composited on ``background``,
  white by default: product cut-outs are made to sit on white. ``round(c * a/255 + bg * (1 - a/255))``.
- 16-bit greyscale (``I;16*``, and ``I`` as 16-bit PNGs open in some Pillow versions) is scaled to 8 bits,
  ``round(v / 257)`` (0 -> 0, 65535 -> 255); PIL's own conversion clips it, which turns most pixels white.
- CMYK becomes RGB as ``(255 - C) * (255 - K) / 255`` (PIL's conversion; embedded ICC profiles are not applied).
- Every other mode goes through PIL's ``convert("RGB")``.

Not here: transforms to tensors (open_clip's preprocess), image bytes from tables (``gcl.data.read``). No torch
import: prepare's worker processes load this module.
"""
from __future__ import annotations

import io
import os
from typing import IO

import numpy as np
from PIL import Image, ImageColor, ImageOps

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
ImageSource = bytes | bytearray | memoryview | str | os.PathLike | IO[bytes]

_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def parse_background(value: str | RGB) -> RGB:
    """``"white"``, ``"#f0f0f0"``, ``"rgb(240,240,240)"`` or an (r, g, b) tuple -> (r, g, b); ValueError if not
    a colour."""
    if isinstance(value, str):
        rgb = ImageColor.getrgb(value)  # ValueError on unknown names
        return int(rgb[0]), int(rgb[1]), int(rgb[2])
    r, g, b = (int(v) for v in value)
    if not all(0 <= v <= 255 for v in (r, g, b)):
        raise ValueError(f"background {value!r} must hold three values in 0..255")
    return r, g, b


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says (``im`` itself when it has none)."""
    if im.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
        return im
    return ImageOps.exif_transpose(im)


def _sixteen_bit(im: Image.Image) -> Image.Image:
    """16-bit greyscale -> 8-bit L (or LA when a transparency key marks pixels), scaled, not clipped."""
    v = np.asarray(im).astype(np.int64)
    grey = ((np.clip(v, 0, 65535) + 128) // 257).astype(np.uint8)  # == round(v / 257): no ties can occur
    key = im.info.get("transparency")
    if isinstance(key, int):
        alpha = np.where(v == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
    return Image.fromarray(grey, "L")


def to_rgb(im: Image.Image, background: RGB = WHITE) -> Image.Image:
    """Any PIL image -> 8-bit RGB by the module's rules (transparency on ``background``)."""
    if im.mode in _SIXTEEN_BIT:
        im = _sixteen_bit(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)
        a = rgba[..., 3:4]
        bg = np.asarray(background, dtype=np.uint32)
        out = (rgba[..., :3] * a + bg * (255 - a) + 127) // 255  # == round(...): x/255 never ends in .5
        return Image.fromarray(out.astype(np.uint8), "RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_image(src: ImageSource, background: RGB = WHITE) -> Image.Image:
    """Fully decode ``src`` (encoded bytes, a path or a binary file) into an upright RGB image.

    Raises what PIL raises for unreadable or truncated data (every pixel is decoded here, not later).
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    with Image.open(src) as im:  # leaving the block closes the file only; the loaded pixels stay
        im.load()
        return to_rgb(upright(im), background)
