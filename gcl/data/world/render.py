"""Rendering a world scene: layout (counts in grid cells, pairs in their relation), backgrounds, colour,
patterns, outlines and marks; rendered at 2x and downsampled (anti-aliasing) up to 128 px.

``render_scene(scene, image_size, rng)`` is a pure function of its arguments; ``rng`` drives only the look
(positions, sizes, mirroring, colour jitter, texture phases), never what the scene shows. The silhouettes are
in ``shapes``, the scene dict in ``scene``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from gcl.data.generated import pixel_grid as _grid
from gcl.data.world.shapes import DRAW, Pen
from gcl.data.world.vocab import BACKGROUNDS, CLASSES, COLORS

Box = tuple[float, float, float, float]  # x0, y0, w, h in pixels
TAU = 2 * math.pi
_MARGIN, _GAP = 0.06, 0.05  # canvas margin and gap between cells, as fractions of the canvas side


# ============================================================================================ layout

def _cells(scene: dict[str, Any], S: float, r: np.random.Generator) -> list[tuple[int, Box]]:
    """(object index, cell) per instance to draw; cells never overlap, so instances never touch."""
    m, g = _MARGIN * S, _GAP * S
    full = S - 2 * m
    half = (full - g) / 2
    left, right = (m, m, half, full), (m + half + g, m, half, full)
    top, bottom = (m, m, full, half), (m, m + half + g, full, half)
    if scene["relation"] is not None:
        a, b = {"left of": (left, right), "right of": (right, left), "above": (top, bottom),
                "below": (bottom, top)}[scene["relation"]]
        return [(0, a), (1, b)]
    n = scene["objects"][0]["count"]
    if n == 1:
        return [(0, (m, m, full, full))]
    if n == 2:
        pairs = ((left, right), (top, bottom), ((m, m, half, half), (m + half + g, m + half + g, half, half)),
                 ((m + half + g, m, half, half), (m, m + half + g, half, half)))
        return [(0, c) for c in pairs[int(r.integers(len(pairs)))]]
    quads = [(m + i * (half + g), m + j * (half + g), half, half) for j in (0, 1) for i in (0, 1)]
    keep = sorted(r.choice(4, size=n, replace=False).tolist())
    return [(0, quads[k]) for k in keep]


def _place(cell: Box, aspect: float, scale: float, r: np.random.Generator) -> Box:
    """The largest box of ``aspect`` in the cell, scaled by ``scale``, at a random position inside it."""
    cx, cy, cw, ch = cell
    w = min(cw, ch * aspect) * scale
    h = w / aspect
    return (cx + r.random() * (cw - w), cy + r.random() * (ch - h), w, h)


# ============================================================================================ pixels

@lru_cache(maxsize=8)
def _light(S: int) -> np.ndarray:
    """float32 [S, S, 1] brightness gain: a key light from the top left."""
    yy, xx = _grid(S)
    out = (1.03 - 0.07 * (xx + yy) / (2 * S))[..., None].astype(np.float32)
    out.setflags(write=False)
    return out


def _edge(mask: np.ndarray) -> np.ndarray:
    """BoolTensor-like [S, S]: pixels outside ``mask`` (> 0.5) with a mask pixel among their 8 neighbours."""
    m = mask > 0.5
    grown = m.copy()
    grown[1:] |= m[:-1]
    grown[:-1] |= m[1:]
    g2 = grown.copy()
    g2[:, 1:] |= grown[:, :-1]
    g2[:, :-1] |= grown[:, 1:]
    return g2 & ~m


@lru_cache(maxsize=32)
def _texture(name: str, S: int) -> np.ndarray:
    """float32 [S, S, 3] offsets from a background's base colour, periodic in x (and in y where the texture has
    no vertical gradient) so that a random roll (:func:`_background`) makes each picture's background differ.
    Textures stay within ~30 RGB units of the base colour, so a picture's background is told apart from its
    objects (>= 90 units away) by distance alone."""
    r = np.random.default_rng(12345)  # a fixed texture; pictures differ by their roll
    yy, xx = _grid(S)
    t = yy / S - 0.5
    k = TAU / S  # one period across the canvas: every sin below has a whole number of periods
    if name == "sky":
        d = t[..., None] * np.array([36, 26, 8], np.float32)
    elif name == "grass":
        small = r.standard_normal((6, S // 4)).astype(np.float32)
        blades = np.asarray(Image.fromarray(np.concatenate([small, small[:, :1]], 1)).resize(
            (S + S // (S // 4), S), Image.BILINEAR), dtype=np.float32)[:, :S]
        d = (8 * blades - 10 * t)[..., None] * np.array([0.6, 1.0, 0.5], np.float32)
    elif name == "sand":
        d = (5 * r.standard_normal((S, S)).astype(np.float32) + 5 * np.sin(k * (6 * yy + 2 * xx)))[..., None]
    elif name == "night":
        stars = r.random((S, S)) < 0.004
        d = 6 * t[..., None] + stars[..., None] * np.array([40, 40, 34], np.float32)
    elif name == "wood":
        plank = (yy % (S / 4)) < max(1.0, S / 64)
        d = (4 * np.sin(k * 8 * xx + 3 * np.sin(k * 4 * yy)) - 16 * plank)[..., None]
    elif name == "water":
        d = (12 * np.sin(k * 8 * yy + 1.6 * np.sin(k * 3 * xx)))[..., None] * np.array([0.8, 1.0, 1.0], np.float32)
    elif name == "brick":
        row = np.floor(yy / (S / 8))
        thin = max(1.0, S / 64)
        mortar = ((yy % (S / 8)) < thin) | (((xx + (row % 2) * S / 8) % (S / 4)) < thin)
        d = (16 * mortar + 3 * r.standard_normal((S, S)).astype(np.float32))[..., None]
    else:  # studio: a soft vertical gradient
        d = -8 * t[..., None] * np.ones(3, np.float32)
    base = np.asarray(BACKGROUNDS[name].rgb, dtype=np.float32)
    out = np.clip(base + d, 0, 255).astype(np.float32)
    out.setflags(write=False)
    return out


_ROLL_Y = frozenset({"sand", "wood", "water", "brick"})  # no vertical gradient: rolled in y too


def _background(name: str, S: int, r: np.random.Generator) -> np.ndarray:
    """float32 [S, S, 3]: the background texture, rolled by a random offset."""
    dx, dy = int(r.integers(S)), int(r.integers(S))
    return np.roll(_texture(name, S), (dy if name in _ROLL_Y else 0, dx), axis=(0, 1))


def _cover(pattern: str, w: int, h: int, L: float, r: np.random.Generator) -> np.ndarray | None:
    """Share [h, w] in [0, 1] of the pattern colour on an instance's box (None for plain). Coverage stays
    below ~40% so the object's own colour dominates its pixels."""
    if pattern == "plain":
        return None
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ph = float(r.random())
    if pattern == "striped":
        p = L / 6
        coord = yy if r.random() < 0.7 else xx
        return (((coord + ph * p) % p) < 0.36 * p).astype(np.float32)
    if pattern == "checked":
        p = L / 5
        o = ph * p
        return ((((xx + o) % p) < 0.2 * p) | (((yy + o) % p) < 0.2 * p)).astype(np.float32)
    if pattern == "polka dot":
        p = L / 5.5
        ox = (np.floor(yy / p) % 2) * p / 2
        dx, dy = ((xx + ox) % p) - p / 2, (yy % p) - p / 2
        return ((dx * dx + dy * dy) < (0.25 * p) ** 2).astype(np.float32)
    if pattern == "wavy":
        p = L / 6
        return (((yy + 0.12 * L * np.sin(TAU * xx / (L / 2.5)) + ph * p) % p) < 0.34 * p).astype(np.float32)
    # speckled: coarse random specks
    cell = max(1.0, L / 14)
    ny, nx = int(math.ceil(h / cell)), int(math.ceil(w / cell))
    specks = (r.random((ny, nx)) < 0.22).astype(np.float32)
    return specks[(yy / cell).astype(np.int64), (xx / cell).astype(np.int64)]


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[int, int, int]:
    return tuple(int(round(min(255.0, max(0.0, x + (y - x) * t)))) for x, y in zip(a, b))  # type: ignore[return-value]


def _tones(primary: np.ndarray) -> dict[str, tuple[int, int, int]]:
    """Outline and mark colours derived from the object's colour (contrast flips on very dark objects)."""
    dark_obj = 0.299 * primary[0] + 0.587 * primary[1] + 0.114 * primary[2] < 60
    black, white = (0, 0, 0), (255, 255, 255)
    return {"edge": _mix(primary, white, 0.2) if dark_obj else _mix(primary, black, 0.35),
            "dark": _mix(primary, white, 0.4) if dark_obj else _mix(primary, black, 0.45),
            "light": _mix(primary, white, 0.55)}


def _jitter(name: str, r: np.random.Generator) -> np.ndarray:
    # Small enough that the nearest palette colour of a rendered pixel stays the object's colour.
    base = np.asarray(COLORS[name], dtype=np.float32)
    return np.clip(base * r.uniform(0.95, 1.04) + r.normal(0, 3.0, 3), 0, 255).astype(np.float32)


def _draw_object(obj: dict[str, Any], boxes: list[Box], S: int, r: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray | None, list[tuple[Any, tuple[float, float]]]]:
    """Mask [S, S] in [0, 1], pattern cover [S, S] (or None) and offset marks of every instance of one object."""
    cls = CLASSES[obj["label"]]
    mask = np.zeros((S, S), np.float32)
    cover = None if obj["pattern"] == "plain" else np.zeros((S, S), np.float32)
    marks: list[tuple[Any, tuple[float, float]]] = []
    for x0, y0, w, h in boxes:
        pad = int(2 + 0.08 * max(w, h))  # room for bands and arcs drawn across the box edge
        ox, oy = int(math.floor(x0)) - pad, int(math.floor(y0)) - pad
        iw, ih = int(math.ceil(w)) + 2 * pad + 1, int(math.ceil(h)) + 2 * pad + 1
        img = Image.new("L", (iw, ih), 0)
        pen = Pen(ImageDraw.Draw(img), w, h, (x0 - ox, y0 - oy), cls.flip and r.random() < 0.5)
        DRAW[obj["label"]](pen)
        # Clip the instance canvas to the picture (a cell never leaves it; rounding may by a pixel).
        sy0, sx0 = max(0, oy), max(0, ox)
        sy1, sx1 = min(S, oy + ih), min(S, ox + iw)
        inst = np.asarray(img, dtype=np.float32)[sy0 - oy: sy1 - oy, sx0 - ox: sx1 - ox] / 255.0
        np.maximum(mask[sy0:sy1, sx0:sx1], inst, out=mask[sy0:sy1, sx0:sx1])
        if cover is not None:
            c = _cover(obj["pattern"], sx1 - sx0, sy1 - sy0, max(w, h), r)
            cover[sy0:sy1, sx0:sx1] = np.where(inst > 0, c, cover[sy0:sy1, sx0:sx1])
        marks += [(m, (ox, oy)) for m in pen.marks]
    return mask, cover, marks


def render_scene(scene: dict[str, Any], image_size: int, r: np.random.Generator) -> Image.Image:
    """Draw ``scene`` (a :func:`gcl.data.world.scene.sample_scene` dict) as an RGB ``image_size`` square."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 px, got {image_size}")
    S = image_size * 2 if image_size <= 128 else image_size
    cells = _cells(scene, S, r)
    scale_lo, scale_hi = (0.62, 0.86) if len(cells) == 1 else (0.66, 0.92)
    boxes: list[list[Box]] = [[] for _ in scene["objects"]]
    for k, cell in cells:
        aspect = CLASSES[scene["objects"][k]["label"]].aspect
        boxes[k].append(_place(cell, aspect, r.uniform(scale_lo, scale_hi), r))
    canvas = _background(scene["background"], S, r)
    light = _light(S)
    layers = []
    for obj, bxs in zip(scene["objects"], boxes):
        primary = _jitter(obj["color"], r)
        secondary = _jitter(obj["pattern_color"], r) if obj["pattern_color"] else primary
        mask, cover, marks = _draw_object(obj, bxs, S, r)
        tex = np.broadcast_to(primary, (S, S, 3))
        if cover is not None:
            tex = tex * (1 - cover[..., None]) + secondary * cover[..., None]
        canvas = canvas * (1 - mask[..., None]) + (tex * light) * mask[..., None]
        layers.append((mask, _tones(primary), marks))
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for mask, tones, marks in layers:
        img.paste(tones["edge"], mask=Image.fromarray(_edge(mask).astype(np.uint8) * 255, "L"))
        for mark, off in marks:
            mark(draw, off, tones)
    if S == 2 * image_size:
        img = img.reduce(2)  # 2x2 box filter: the anti-aliasing of the supersampled drawing
    elif S != image_size:
        img = img.resize((image_size, image_size), Image.LANCZOS)
    return img
