"""Pixels: a product's image from its attributes.

Lives here: material textures (``_material_gain``), pattern coverage (``_pattern_cover``), overlay tones
(``_tones``), the studio background, light and shadow, and ``render_product``, which composes them with the
silhouette drawn by ``draw`` into the final RGB image.

Not here: the silhouettes and details (``draw``), which attributes a product has (``attributes``), encoding
and writing images (``write``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gcl.data.catalog.attributes import COLORS, SUBCATEGORIES, _dist, _pick
from gcl.data.catalog.draw import _DRAW, _Canvas
from gcl.data.generated import pixel_grid as _grid  # also re-exported by gcl.data.synthetic

# ============================================================================================ rendering

# Studio backgrounds; each product gets one far enough from its colors to keep the silhouette readable.
_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (246, 245, 241), (226, 227, 229), (240, 233, 220), (220, 228, 236), (240, 228, 228),
    (175, 177, 180), (58, 60, 64), (72, 80, 96),
)
_METAL = (196, 196, 202)
TAU = 2 * math.pi


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Unit-variance-ish noise with ``cells`` (rows, cols) random values bilinearly stretched to size x size."""
    small = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR), dtype=np.float32)



def _material_gain(material: str, size: int, box: tuple[float, float, float, float],
                   rng: np.random.Generator) -> np.ndarray:
    """Multiplicative brightness texture ``[size, size]`` of a material (periods scale with the item)."""
    yy0, xx0 = _grid(size)
    x0, y0, w, h = box
    L = max(w, h)
    xx, yy = xx0 - x0, yy0 - y0
    ph = float(rng.random()) * TAU
    if material == "denim":  # diagonal twill + washed blotches
        g = 1 + 0.11 * np.cos(TAU * (xx + yy) / (L / 16) + ph) + 0.06 * _smooth_noise(rng, size, (5, 5))
    elif material == "wool":  # knit: columns of V stitches
        pc, pr = L / 11, L / 14
        vx = np.abs((xx % pc) / pc - 0.5) * pc * 0.9
        g = 1 + 0.12 * np.cos(TAU * (yy + vx) / pr + ph) - 0.08 * (np.abs((xx % pc) / pc - 0.5) > 0.44)
    elif material == "corduroy":  # vertical wales
        g = 1 + 0.14 * np.cos(TAU * xx / (L / 14) + ph)
    elif material == "nylon":  # quilted channels: bright bulges, dark seams
        p = L / 7
        g = 0.86 + 0.2 * np.sin(math.pi * ((yy + ph) % p) / p)
    elif material == "leather":  # fine grain + a soft highlight
        cx, cy = x0 + w * (0.3 + 0.2 * rng.random()), y0 + h * (0.25 + 0.2 * rng.random())
        r2 = ((xx0 - cx) ** 2 + (yy0 - cy) ** 2) / (0.25 * L) ** 2
        g = 0.95 + 0.16 * np.exp(-r2) + 0.035 * rng.standard_normal((size, size)).astype(np.float32)
    elif material == "silk":  # broad diagonal sheen bands
        g = 1 + 0.13 * np.sin(TAU * (0.8 * xx - 0.45 * yy) / (0.55 * L) + ph)
    elif material == "linen":  # horizontal slubs
        g = 1 + 0.07 * _smooth_noise(rng, size, (max(8, size // 3), 4)) + 0.03 * np.cos(TAU * yy / 3)
    elif material == "suede":  # matte, napped blotches
        g = 0.97 + 0.06 * _smooth_noise(rng, size, (9, 9)) + 0.025 * rng.standard_normal((size, size)).astype(np.float32)
    else:  # cotton: a faint fine weave
        g = 1 + 0.03 * np.cos(TAU * xx / 3) * np.cos(TAU * yy / 3)
    return np.asarray(g, dtype=np.float32)


def _pattern_cover(pattern: str, size: int, box: tuple[float, float, float, float],
                   rng: np.random.Generator) -> np.ndarray | None:
    """Share ``[size, size]`` in [0, 1] of the secondary color (None for plain). Coverage stays < 45% so
    the primary color dominates the picture."""
    if pattern == "plain":
        return None
    yy0, xx0 = _grid(size)
    x0, y0, w, h = box
    L = max(w, h)
    xx, yy = xx0 - x0, yy0 - y0
    if pattern == "striped":
        p = L / 8
        coord = yy if rng.random() < 0.7 else xx
        return (((coord + rng.random() * p) % p) < 0.34 * p).astype(np.float32)
    if pattern == "checked":
        p = L / 6
        w_ = 0.2 * p
        o = rng.random() * p
        return ((((xx + o) % p) < w_) | (((yy + o) % p) < w_)).astype(np.float32)
    if pattern == "polka dot":
        p = L / 7
        row = np.floor(yy / p)
        ox = (row % 2) * p / 2
        dx = ((xx + ox) % p) - p / 2
        dy = (yy % p) - p / 2
        return ((dx * dx + dy * dy) < (0.22 * p) ** 2).astype(np.float32)
    # floral: five-petal flowers on a jittered grid
    img = Image.new("L", (size, size), 0)
    dr = ImageDraw.Draw(img)
    p = L / 5
    r = 0.13 * p
    n = int(size / p) + 2
    for i in range(n):
        for j in range(n):
            cx = x0 + (i + 0.5 * (j % 2)) * p + (rng.random() - 0.5) * 0.3 * p - p / 2
            cy = y0 + j * p * 0.87 + (rng.random() - 0.5) * 0.3 * p - p / 2
            a0 = rng.random() * TAU
            for k in range(5):
                a = a0 + k * TAU / 5
                px, py = cx + 1.15 * r * math.cos(a), cy + 1.15 * r * math.sin(a)
                dr.ellipse([px - r, py - r, px + r, py + r], fill=255)
    return np.asarray(img, dtype=np.float32) / 255.0



def _lum(c: Sequence[float]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[int, int, int]:
    return tuple(int(round(min(255.0, max(0.0, x + (y - x) * t)))) for x, y in zip(a, b))  # type: ignore[return-value]


def _tones(primary: Sequence[float], secondary: Sequence[float]) -> dict[str, tuple[int, int, int]]:
    """Overlay colors derived from the product's colors (contrast flips on very dark garments)."""
    dark_garment = _lum(primary) < 60
    black, white = (0, 0, 0), (255, 255, 255)
    dark = _mix(primary, white, 0.38) if dark_garment else _mix(primary, black, 0.45)
    return {
        "dark": dark,
        "edge": _mix(primary, black, 0.35) if not dark_garment else _mix(primary, white, 0.15),
        "inner": _mix(primary, black, 0.5) if not dark_garment else _mix(primary, white, 0.22),
        "shade": _mix(primary, black, 0.12) if not dark_garment else _mix(primary, white, 0.08),
        "light": _mix(primary, white, 0.18),
        "accent": _mix(secondary, secondary, 0),
        "accent_edge": _mix(secondary, black, 0.4),
        "button": _mix(primary, white, 0.6) if dark_garment or _lum(primary) < 110 else _mix(primary, black, 0.6),
        "lace": (245, 245, 240) if _lum(primary) < 170 else (40, 40, 44),
        "metal": _METAL,
        "white": (244, 244, 240),
        "sole": (38, 34, 32) if _lum(primary) > 50 else (110, 105, 100),
        "sole_line": (190, 190, 186),
        "belt": (52, 36, 26) if _lum(primary) > 70 else (150, 120, 90),
    }


def render_product(attrs: dict[str, Any], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one product as an RGB ``image_size`` x ``image_size`` PIL image.

    ``attrs`` is a :func:`sample_attributes` dict; ``rng`` drives only the look (position, scale, color
    jitter, background, texture phase), never the attributes. Rendered at 2x and downsampled (anti-aliasing)
    up to 128 px, natively above (where anti-aliasing matters less).

    The steps below draw from ``rng`` in a fixed order (colors, box, backdrop, silhouette, texture, pattern,
    flip): reordering them changes every image.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 px, got {image_size}")
    sub = SUBCATEGORIES[attrs["subcategory"]]
    S = image_size * 2 if image_size <= 128 else image_size
    primary, secondary, bg = _colors(attrs, rng)
    box = _item_box(sub.aspect, S, rng)
    canvas = _backdrop(bg, sub.parent, S, box, rng)

    mask = Image.new("L", (S, S), 0)
    c = _Canvas(S, box, mask)
    _DRAW[attrs["subcategory"]](c, set(attrs["details"]), attrs["subcategory"], rng)

    img = _fill(attrs, S, box, mask, canvas, primary, secondary, rng)
    _outline_and_overlays(img, mask, c, _tones(primary, secondary))
    if sub.flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if S != image_size:
        img = img.resize((image_size, image_size), Image.LANCZOS)
    return img


def _jitter(name: str, rng: np.random.Generator) -> np.ndarray:
    # Per-product color jitter: small enough that the nearest palette color stays the product's color.
    base = np.asarray(COLORS[name][0], dtype=np.float32)
    return np.clip(base * rng.uniform(0.94, 1.05) + rng.normal(0, 3.0, 3), 0, 255).astype(np.float32)


def _colors(attrs: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The jittered primary and secondary colors (secondary = primary when there is none), and the
    background: a studio tone far from the item's color(s)."""
    primary = _jitter(attrs["color"], rng)
    secondary = _jitter(attrs["secondary_color"], rng) if attrs.get("secondary_color") else primary
    used = [primary] + ([secondary] if attrs.get("secondary_color") else [])
    ok = [b for b in _BACKGROUNDS if all(_dist(b, c) > 85 for c in used)]
    if not ok:
        ok = [max(_BACKGROUNDS, key=lambda b: min(_dist(b, c) for c in used))]
    bg = np.asarray(_pick(rng, ok), dtype=np.float32)
    return primary, secondary, bg


def _item_box(aspect: float, S: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Box ``(x0, y0, w, h)``: scale + aspect + position jitter, with a margin so the item never touches the
    border."""
    scale = rng.uniform(0.7, 0.88) * S
    a = aspect
    w, h = (scale, scale / a) if a >= 1 else (scale * a, scale)
    m = 0.05 * S
    x0 = m + rng.random() * max(0.0, S - 2 * m - w)
    y0 = m + rng.random() * max(0.0, S - 2 * m - h)
    return (x0, y0, w, h)


def _backdrop(bg: np.ndarray, parent: str, S: int, box: tuple[float, float, float, float],
              rng: np.random.Generator) -> np.ndarray:
    """The background ``[S, S, 3]``: a vertical light gradient, plus a contact shadow for standing objects."""
    x0, y0, w, h = box
    yy = _grid(S)[0]
    grad = 1.0 + rng.uniform(-0.05, 0.05) * (yy / S - 0.5) * 2
    canvas = bg[None, None, :] * grad[..., None]
    if parent in ("footwear", "bags", "accessories"):  # soft contact shadow under standing objects
        sh = Image.new("L", (S, S), 0)
        ImageDraw.Draw(sh).ellipse([x0 + 0.08 * w, y0 + 0.94 * h, x0 + 0.92 * w, y0 + 1.04 * h], fill=255)
        sh_a = np.asarray(sh.filter(ImageFilter.BoxBlur(max(1, S // 40))), dtype=np.float32) / 255.0
        canvas = canvas * (1 - 0.1 * sh_a[..., None])
    return canvas


def _fill(attrs: dict[str, Any], S: int, box: tuple[float, float, float, float], mask: Image.Image,
          canvas: np.ndarray, primary: np.ndarray, secondary: np.ndarray, rng: np.random.Generator
          ) -> Image.Image:
    """The silhouette filled with the material texture, pattern and key light, over the backdrop."""
    x0, y0, w, h = box
    yy, xx = _grid(S)
    m_arr = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    gain = _material_gain(attrs["material"], S, box, rng)
    light = 1.04 - 0.1 * np.clip(((xx - x0) / w + (yy - y0) / h) / 2, 0, 1)  # key light from the top left
    tex = np.broadcast_to(primary, (S, S, 3))
    cover = _pattern_cover(attrs["pattern"], S, box, rng)
    if cover is not None:
        tex = tex * (1 - cover[..., None]) + secondary * cover[..., None]
    tex = tex * (gain * light)[..., None]
    out = canvas * (1 - m_arr) + tex * m_arr
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def _outline_and_overlays(img: Image.Image, mask: Image.Image, c: _Canvas,
                          tones: dict[str, tuple[int, int, int]]) -> None:
    """Paint (in place) a thin darker outline around the silhouette, as product photos have, then the
    canvas's queued overlay shapes (seams, collars, buttons, prints ...)."""
    edge = np.asarray(mask.filter(ImageFilter.MaxFilter(3)), dtype=np.int16) - np.asarray(mask, dtype=np.int16)
    img.paste(tones["edge"], mask=Image.fromarray((edge > 0).astype(np.uint8) * 255, "L"))
    draw = ImageDraw.Draw(img)
    for op in c.ops:
        op(draw, tones)
