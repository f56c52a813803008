"""A procedural fashion catalog: the built-in dataset for demos, tests and benchmarks.

Every product is drawn from a small attribute space (category, color, material, pattern, details); the
picture is rendered from those attributes with PIL and every text field is written from them, so each field
carries real signal a multi-field contrastive loss can learn:

- 7 parent categories / 18 subcategories with distinct silhouettes (t-shirt, shirt, sweater, jacket, coat,
  trousers, shorts, skirt, mini/maxi dress, sneakers, boots, heels, handbag, backpack, tote, hat, cap, scarf);
- 16 colors (a fixed palette, jittered per product), 9 materials rendered as textures (denim twill, knit
  chevrons, corduroy ribs, quilted nylon, leather sheen, ...), 5 patterns (plain, striped, polka dot,
  checked, floral) in a second color;
- visible details: sleeve length, necklines, collars, lapels, buttons, zips, pockets, prints, belts, hoods,
  laces, heels, handles, brims ...; plus position / scale / background jitter.

Text fields (``title``, ``description``, ``colors``, ``materials``, ``categories`` = [parent, child],
``details``, ``keywords``) come from templates with synonyms ("navy" / "dark blue"); flat helper fields
(``category``, ``subcategory``, ``color``, ``material``, ``pattern``, ``item_id``) are always present. A
``missing_rate`` share of text fields is dropped (never all of them, never the image) and a
``noisy_title_rate`` share of titles is corrupted. Optional GCL-style ranking rows add ``query`` (e.g.
"red striped dress"), ``score`` (1..100 from attribute overlap) and ``position`` (1-based rank of the product
among all products with the same query).

Splits: ``train`` / ``val`` / ``test`` (iid) and ``test_heldout``: products whose (color, subcategory) pair is
one of the held-out combinations, which never appear in the other splits (compositional generalization).

Everything is a pure function of ``(seed, product index, arguments)``: the same arguments give the same
shard bytes whatever the worker count. Layout written by :func:`generate_catalog`::

    OUT/catalog.json                  vocabularies, hierarchy, held-out combos, counts, args, splits
    OUT/products.parquet              one row per product (all fields, split, shard; no image bytes)
    OUT/<split>/shard-%06d.tar        webdataset shards (<key>.jpg, <key>.json, <key>.txt) + sizes.json

CLI: ``python -m gcl.data.synthetic OUT --products N --seed S [--image-size 64] [--per-shard K] [--workers W]``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gcl.data.schema import TEXT_FIELDS
from gcl.data.shards import ShardWriter

log = logging.getLogger(__name__)

# Bump when the generator's output changes for the same arguments: it is part of the ensure_catalog cache key.
FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test", "test_heldout")
FLAT_FIELDS: tuple[str, ...] = ("item_id", "category", "subcategory", "color", "material", "pattern")
RANK_FIELDS: tuple[str, ...] = ("query", "score", "position")
# Fixed tar member mtime so that shard bytes depend on the arguments only, never on the wall clock.
_TAR_MTIME = 946684800.0  # 2000-01-01T00:00:00Z
_JPEG_QUALITY = 92

# Independent per-product random streams: changing how one is consumed never shifts another.
_S_ATTR, _S_IMAGE, _S_TEXT, _S_QUERY, _S_MISSING = 0, 1, 2, 3, 4
_S_HELDOUT, _S_SPLIT = 101, 102  # catalog-level streams (seeded from the seed only)

# ============================================================================================ vocabulary

# name -> (RGB, synonyms). RGB values are spread so that the nearest palette color of a rendered pixel is
# still the product's color after the per-product jitter and shading (the test suite checks this).
COLORS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "black": ((25, 25, 28), ("black", "jet black", "ebony", "onyx")),
    "white": ((242, 242, 238), ("white", "optic white", "snow white", "chalk white")),
    "grey": ((135, 135, 135), ("grey", "gray", "heather grey", "ash grey")),
    "navy": ((28, 40, 100), ("navy", "dark blue", "midnight blue", "navy blue")),
    "blue": ((40, 95, 200), ("blue", "royal blue", "cobalt", "bright blue")),
    "light blue": ((140, 185, 230), ("light blue", "sky blue", "pale blue", "powder blue")),
    "teal": ((20, 128, 135), ("teal", "petrol", "blue-green", "dark turquoise")),
    "green": ((40, 135, 65), ("green", "emerald", "forest green", "kelly green")),
    "red": ((200, 30, 40), ("red", "scarlet", "crimson", "cherry red")),
    "burgundy": ((125, 25, 60), ("burgundy", "maroon", "wine", "oxblood")),
    "pink": ((240, 150, 185), ("pink", "rose", "blush pink", "bubblegum pink")),
    "orange": ((240, 125, 35), ("orange", "tangerine", "bright orange", "pumpkin")),
    "yellow": ((240, 205, 50), ("yellow", "lemon", "sunflower yellow", "golden yellow")),
    "beige": ((215, 195, 155), ("beige", "sand", "stone", "oatmeal")),
    "brown": ((120, 75, 40), ("brown", "chocolate", "chestnut", "cognac")),
    "purple": ((115, 60, 160), ("purple", "violet", "deep purple", "grape")),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

MATERIALS: dict[str, dict[str, tuple[str, ...]]] = {
    "cotton": {"say": ("cotton", "soft cotton", "pure cotton", "organic cotton"),
               "feel": ("soft and breathable", "light and breathable", "soft to the touch"),
               "care": ("Machine wash at 30 degrees.", "Machine washable.")},
    "denim": {"say": ("denim", "rigid denim", "washed denim", "stretch denim"),
              "feel": ("durable", "sturdy yet comfortable", "hard-wearing"),
              "care": ("Wash inside out.", "Machine wash cold, inside out.")},
    "wool": {"say": ("wool", "merino wool", "chunky knit wool", "wool blend"),
             "feel": ("warm and cosy", "soft and insulating", "warm"),
             "care": ("Hand wash cold and dry flat.", "Dry clean recommended.")},
    "leather": {"say": ("leather", "genuine leather", "smooth leather", "full-grain leather"),
                "feel": ("supple", "hard-wearing and supple", "smooth"),
                "care": ("Wipe clean with a damp cloth.", "Specialist leather clean only.")},
    "linen": {"say": ("linen", "pure linen", "breezy linen", "washed linen"),
              "feel": ("light and airy", "cool and breathable", "lightweight"),
              "care": ("Machine wash at 40 degrees.", "Wash gently and line dry.")},
    "silk": {"say": ("silk", "satin", "silky satin", "mulberry silk"),
             "feel": ("smooth and lustrous", "fluid with a soft sheen", "luxuriously smooth"),
             "care": ("Dry clean only.", "Hand wash cold.")},
    "corduroy": {"say": ("corduroy", "fine-wale corduroy", "cord", "needlecord"),
                 "feel": ("textured and warm", "soft with a ribbed texture", "robust"),
                 "care": ("Machine wash cold.", "Wash inside out at 30 degrees.")},
    "nylon": {"say": ("nylon", "quilted nylon", "recycled nylon", "ripstop nylon"),
              "feel": ("water-repellent", "light and weatherproof", "lightweight and tough"),
              "care": ("Machine wash cold.", "Wipe clean.")},
    "suede": {"say": ("suede", "soft suede", "brushed suede", "nubuck"),
              "feel": ("velvety", "soft and matte", "velvety to the touch"),
              "care": ("Brush clean; avoid water.", "Specialist suede clean only.")},
}
MATERIAL_NAMES: tuple[str, ...] = tuple(MATERIALS)
# Materials that take a printed / woven pattern; the rest are always plain.
_PATTERNABLE = {"cotton": ("striped", "polka dot", "checked", "floral"),
                "linen": ("striped", "checked", "floral"),
                "silk": ("striped", "polka dot", "floral"),
                "wool": ("striped", "checked")}
PATTERNS: dict[str, tuple[str, ...]] = {
    # name -> (title adjective, description phrases...)
    "plain": ("plain", "a clean solid finish", "a solid colour"),
    "striped": ("striped", "stripes", "a striped pattern", "classic stripes"),
    "polka dot": ("polka-dot", "polka dots", "a polka-dot print", "a dotted print"),
    "checked": ("checked", "checks", "a check pattern", "gingham checks"),
    "floral": ("floral", "a floral print", "little flowers", "a ditsy floral print"),
}
PATTERN_NAMES: tuple[str, ...] = tuple(PATTERNS)

# Details drawn on top of the silhouette. name -> phrases used in descriptions.
DETAILS: dict[str, tuple[str, ...]] = {
    "short sleeves": ("short sleeves", "a short-sleeved cut"),
    "long sleeves": ("long sleeves", "full-length sleeves"),
    "sleeveless": ("a sleeveless cut", "no sleeves"),
    "crew neck": ("a crew neck", "a round neckline"),
    "v-neck": ("a V-neck", "a V-shaped neckline"),
    "turtleneck": ("a turtleneck", "a high roll neck"),
    "point collar": ("a pointed collar", "a classic shirt collar"),
    "button front": ("a button front", "a buttoned placket", "front buttons"),
    "chest pocket": ("a chest pocket", "a patch pocket on the chest"),
    "graphic print": ("a graphic print", "a printed motif on the front"),
    "hood": ("a hood", "an attached hood"),
    "ribbed hem": ("a ribbed hem and cuffs", "rib-knit trims"),
    "zip front": ("a full zip", "a zip fastening"),
    "flap pockets": ("flap pockets", "two flap pockets"),
    "lapels": ("wide lapels", "notched lapels"),
    "belt": ("a belt", "a matching belt"),
    "slim fit": ("a slim fit", "a tapered leg"),
    "wide leg": ("a wide leg", "a relaxed wide-leg fit"),
    "cuffs": ("turn-up cuffs", "turned-up hems"),
    "side pockets": ("side pockets", "slanted side pockets"),
    "a-line": ("an A-line shape", "a flared A-line silhouette"),
    "pencil": ("a pencil shape", "a straight pencil cut"),
    "pleated": ("pleats", "knife pleats"),
    "low-top": ("a low-top profile", "a low-cut collar"),
    "high-top": ("a high-top profile", "an ankle-height collar"),
    "laces": ("laces", "a lace-up front"),
    "contrast stripe": ("a contrast side stripe", "a side stripe in a contrasting colour"),
    "ankle height": ("an ankle-height shaft", "an ankle-length cut"),
    "knee-high": ("a knee-high shaft", "a tall knee-high cut"),
    "flat sole": ("a flat sole", "a low flat sole"),
    "block heel": ("a block heel", "a chunky heel"),
    "stiletto heel": ("a stiletto heel", "a slim high heel"),
    "ankle strap": ("an ankle strap", "a buckled ankle strap"),
    "pointed toe": ("a pointed toe", "a sharp pointed toe"),
    "round toe": ("a round toe", "a soft rounded toe"),
    "top handle": ("a top handle", "a sturdy top handle"),
    "buckle": ("a metal buckle", "a polished buckle"),
    "crossbody strap": ("a crossbody strap", "a long shoulder strap"),
    "front pocket": ("a zipped front pocket", "a front zip pocket"),
    "long handles": ("long shoulder handles", "two long handles"),
    "wide brim": ("a wide brim", "a broad brim"),
    "bucket shape": ("a bucket shape", "a soft bucket silhouette"),
    "ribbon band": ("a ribbon band", "a contrast ribbon band"),
    "visor": ("a curved visor", "a curved peak"),
    "embroidered logo": ("an embroidered logo", "a small embroidered badge"),
    "button top": ("a button top", "a covered button on top"),
    "fringe": ("fringed ends", "tasselled ends"),
    "rolled hem": ("rolled hems", "neatly rolled edges"),
}
# Details drawn in the secondary color: the product then lists two colors.
_ACCENT_DETAILS = frozenset({"graphic print", "contrast stripe", "embroidered logo", "ribbon band"})


@dataclass(frozen=True)
class Subcategory:
    """How one subcategory looks and is named.

    ``choices``: exactly one detail of each group; ``fixed``: always present; ``extras``: each present with
    probability 0.35. ``aspect`` is the width / height of the item's bounding box; ``flip``: may be mirrored.
    """

    parent: str
    nouns: tuple[str, ...]
    materials: tuple[str, ...]
    aspect: float
    choices: tuple[tuple[str, ...], ...] = ()
    fixed: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    flip: bool = False


SUBCATEGORIES: dict[str, Subcategory] = {
    "t-shirts": Subcategory("tops", ("t-shirt", "tee", "t-shirt"), ("cotton", "linen"), 1.0,
                            (("short sleeves", "long sleeves"), ("crew neck", "v-neck")),
                            extras=("chest pocket", "graphic print")),
    "shirts": Subcategory("tops", ("shirt", "button-up shirt", "shirt"), ("cotton", "linen", "silk", "denim"),
                          0.95, (("short sleeves", "long sleeves"),), fixed=("point collar", "button front"),
                          extras=("chest pocket",)),
    "sweaters": Subcategory("tops", ("sweater", "jumper", "pullover"), ("wool", "cotton"), 1.0,
                            (("crew neck", "v-neck", "turtleneck"),), fixed=("long sleeves", "ribbed hem"),
                            extras=("hood", "graphic print")),
    "jackets": Subcategory("outerwear", ("jacket", "jacket", "short jacket"),
                           ("denim", "leather", "nylon", "corduroy", "wool"), 1.0,
                           (("zip front", "button front"),), fixed=("long sleeves",),
                           extras=("hood", "flap pockets", "point collar")),
    "coats": Subcategory("outerwear", ("coat", "overcoat", "long coat"), ("wool", "nylon", "leather"), 0.66,
                         (("button front", "belt"),), fixed=("long sleeves", "lapels"),
                         extras=("flap pockets",)),
    "trousers": Subcategory("bottoms", ("trousers", "pants", "trousers"),
                            ("denim", "cotton", "linen", "corduroy", "wool"), 0.52,
                            (("slim fit", "wide leg"),), extras=("belt", "cuffs", "side pockets")),
    "shorts": Subcategory("bottoms", ("shorts", "shorts", "short pants"), ("denim", "cotton", "linen"), 1.15,
                          (("slim fit", "wide leg"),), extras=("belt", "cuffs", "side pockets")),
    "skirts": Subcategory("bottoms", ("skirt", "skirt", "midi skirt"),
                          ("denim", "cotton", "silk", "leather", "wool", "corduroy"), 0.85,
                          (("a-line", "pencil", "pleated"),), extras=("belt", "button front")),
    "mini dresses": Subcategory("dresses", ("mini dress", "short dress", "mini dress"),
                                ("cotton", "silk", "linen"), 0.72,
                                (("sleeveless", "short sleeves", "long sleeves"), ("crew neck", "v-neck")),
                                extras=("belt",)),
    "maxi dresses": Subcategory("dresses", ("maxi dress", "long dress", "floor-length dress"),
                                ("cotton", "silk", "linen"), 0.44,
                                (("sleeveless", "short sleeves", "long sleeves"), ("crew neck", "v-neck")),
                                extras=("belt",)),
    "sneakers": Subcategory("footwear", ("sneakers", "trainers", "sneakers"), ("cotton", "leather", "nylon", "suede"),
                            1.7, (("low-top", "high-top"),), fixed=("laces",), extras=("contrast stripe",),
                            flip=True),
    "boots": Subcategory("footwear", ("boots", "boots", "leather boots"), ("leather", "suede"), 0.8,
                         (("ankle height", "knee-high"), ("flat sole", "block heel")), extras=("laces",),
                         flip=True),
    "heels": Subcategory("footwear", ("heels", "pumps", "court shoes"), ("leather", "suede", "silk"), 1.45,
                         (("stiletto heel", "block heel"), ("pointed toe", "round toe")),
                         extras=("ankle strap",), flip=True),
    "handbags": Subcategory("bags", ("handbag", "purse", "bag"), ("leather", "suede", "nylon"), 1.15,
                            fixed=("top handle",), extras=("buckle", "crossbody strap")),
    "backpacks": Subcategory("bags", ("backpack", "rucksack", "daypack"), ("nylon", "cotton", "leather"), 0.78,
                             fixed=("top handle",), extras=("front pocket",)),
    "totes": Subcategory("bags", ("tote bag", "tote", "shopper bag"), ("cotton", "leather", "nylon"), 1.0,
                         fixed=("long handles",), extras=("graphic print",)),
    "hats": Subcategory("accessories", ("hat", "hat", "sun hat"), ("wool", "cotton", "linen"), 1.7,
                        (("wide brim", "bucket shape"),), extras=("ribbon band",)),
    "caps": Subcategory("accessories", ("cap", "baseball cap", "cap"), ("cotton", "wool", "denim"), 1.35,
                        fixed=("visor",), extras=("embroidered logo", "button top"), flip=True),
    "scarves": Subcategory("accessories", ("scarf", "wrap scarf", "scarf"), ("wool", "silk", "cotton"), 0.5,
                           (("fringe", "rolled hem"),)),
}
HIERARCHY: dict[str, tuple[str, ...]] = {}
for _child, _sub in SUBCATEGORIES.items():
    HIERARCHY.setdefault(_sub.parent, ())
    HIERARCHY[_sub.parent] += (_child,)
# A parent as it is searched for ("red dress", "leather shoes").
_PARENT_NOUN = {"tops": "top", "outerwear": "outerwear", "bottoms": "bottoms", "dresses": "dress",
                "footwear": "shoes", "bags": "bag", "accessories": "accessory"}


# ============================================================================================ attributes

def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _dist(a: Sequence[float], b: Sequence[float]) -> float:
    return float(math.dist(a, b))


def sample_attributes(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one product's attributes.

    Returns ``{"category", "subcategory", "color", "secondary_color" (None when not visible), "material",
    "pattern", "details" (list, canonical names)}``; every value is a key of the vocabularies above.
    """
    sub_name = _pick(rng, tuple(SUBCATEGORIES))
    sub = SUBCATEGORIES[sub_name]
    color = _pick(rng, COLOR_NAMES)
    material = _pick(rng, sub.materials)
    pattern = "plain"
    allowed = _PATTERNABLE.get(material, ())
    # Shoes / bags / hats are plain whatever the material: printed footwear would blur the silhouette cue.
    if allowed and sub.parent not in ("footwear", "bags") and rng.random() < 0.5:
        pattern = _pick(rng, allowed)
    details = list(sub.fixed) + [_pick(rng, group) for group in sub.choices]
    details += [d for d in sub.extras if rng.random() < 0.35]
    secondary = None
    if pattern != "plain" or any(d in _ACCENT_DETAILS for d in details):
        rgb = COLORS[color][0]
        options = [c for c in COLOR_NAMES if _dist(COLORS[c][0], rgb) > 110]
        secondary = _pick(rng, options)
    return {"category": sub.parent, "subcategory": sub_name, "color": color, "secondary_color": secondary,
            "material": material, "pattern": pattern, "details": details}


def heldout_combos(seed: int) -> list[tuple[str, str]]:
    """The (color, subcategory) pairs reserved for ``test_heldout``: one color per subcategory, spread so that
    every color is held out for at most two subcategories and is seen with all the others in training."""
    rng = _rng(seed, _S_HELDOUT)
    perm = rng.permutation(len(COLOR_NAMES))
    return [(COLOR_NAMES[int(perm[i % len(perm)])], sub) for i, sub in enumerate(SUBCATEGORIES)]


# ============================================================================================ rendering

# Studio backgrounds; each product gets one far enough from its colors to keep the silhouette readable.
_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (246, 245, 241), (226, 227, 229), (240, 233, 220), (220, 228, 236), (240, 228, 228),
    (175, 177, 180), (58, 60, 64), (72, 80, 96),
)
_METAL = (196, 196, 202)
TAU = 2 * math.pi


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Unit-variance-ish noise with ``cells`` (rows, cols) random values bilinearly stretched to size x size."""
    small = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR), dtype=np.float32)


class _Canvas:
    """Draws an item in unit coordinates of its bounding box.

    Body shapes go to the silhouette mask (filled later with the material texture and pattern); overlay
    shapes are queued and drawn on the composited image in a named tone ('dark', 'inner', 'accent', ...).
    """

    def __init__(self, size: int, box: tuple[float, float, float, float], mask: Image.Image) -> None:
        self.size = size
        self.x0, self.y0, self.w, self.h = box
        self.md = ImageDraw.Draw(mask)
        self.lw = max(1, round(size * 0.016))  # ~1 px after the 2x downsample at 64 px
        self.ops: list[Callable[[ImageDraw.ImageDraw, dict[str, tuple[int, int, int]]], None]] = []

    def p(self, u: float, v: float) -> tuple[float, float]:
        return (self.x0 + u * self.w, self.y0 + v * self.h)

    def ps(self, pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return [self.p(u, v) for u, v in pts]

    def bb(self, u0: float, v0: float, u1: float, v1: float) -> list[float]:
        (x0, y0), (x1, y1) = self.p(u0, v0), self.p(u1, v1)
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

    def px(self, t: float) -> int:
        """A length given as a fraction of the box's larger side, in pixels (>= 1)."""
        return max(1, round(t * max(self.w, self.h)))

    # --- body (textured) ---
    def poly(self, pts: Sequence[tuple[float, float]]) -> None:
        self.md.polygon(self.ps(pts), fill=255)

    def ellipse(self, u0: float, v0: float, u1: float, v1: float) -> None:
        self.md.ellipse(self.bb(u0, v0, u1, v1), fill=255)

    def rect(self, u0: float, v0: float, u1: float, v1: float, r: float = 0.0) -> None:
        b = self.bb(u0, v0, u1, v1)
        if r > 0:
            self.md.rounded_rectangle(b, radius=self.px(r), fill=255)
        else:
            self.md.rectangle(b, fill=255)

    def chord(self, box: tuple[float, float, float, float], start: float, end: float) -> None:
        self.md.chord(self.bb(*box), start, end, fill=255)

    def band(self, pts: Sequence[tuple[float, float]], width: float) -> None:
        self.md.line(self.ps(pts), fill=255, width=self.px(width), joint="curve")

    def arc(self, box: tuple[float, float, float, float], start: float, end: float, width: float) -> None:
        self.md.arc(self.bb(*box), start, end, fill=255, width=self.px(width))

    # --- overlay (queued) ---
    def f_poly(self, pts: Sequence[tuple[float, float]], tone: str, outline: str | None = None) -> None:
        xy = self.ps(pts)
        lw = self.lw
        self.ops.append(lambda d, t: d.polygon(xy, fill=t[tone], outline=t[outline] if outline else None,
                                               width=lw))

    def f_ellipse(self, box: tuple[float, float, float, float], tone: str, outline: str | None = None) -> None:
        b = self.bb(*box)
        lw = self.lw
        self.ops.append(lambda d, t: d.ellipse(b, fill=t[tone], outline=t[outline] if outline else None,
                                               width=lw))

    def f_rect(self, box: tuple[float, float, float, float], tone: str, outline: str | None = None,
               r: float = 0.0) -> None:
        b = self.bb(*box)
        rad = self.px(r) if r > 0 else 0
        lw = self.lw
        self.ops.append(lambda d, t: d.rounded_rectangle(b, radius=rad, fill=t[tone],
                                                         outline=t[outline] if outline else None, width=lw))

    def f_chord(self, box: tuple[float, float, float, float], start: float, end: float, tone: str) -> None:
        b = self.bb(*box)
        self.ops.append(lambda d, t: d.chord(b, start, end, fill=t[tone]))

    def line(self, pts: Sequence[tuple[float, float]], tone: str, width: float = 1.0) -> None:
        xy = self.ps(pts)
        w = max(1, round(self.lw * width))
        self.ops.append(lambda d, t: d.line(xy, fill=t[tone], width=w, joint="curve"))

    def dot(self, u: float, v: float, r: float, tone: str) -> None:
        x, y = self.p(u, v)
        rr = max(1.0, r * max(self.w, self.h))
        self.ops.append(lambda d, t: d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=t[tone]))

    def motif(self, u: float, v: float, r: float, kind: int) -> None:
        """A small printed motif (circle, star-ish diamond, or bars) in the accent color."""
        if kind == 0:
            self.f_ellipse((u - r, v - r * self.w / self.h, u + r, v + r * self.w / self.h), "accent", "accent_edge")
        elif kind == 1:
            k = self.w / self.h
            self.f_poly([(u, v - 1.2 * r * k), (u + r, v), (u, v + 1.2 * r * k), (u - r, v)], "accent", "accent_edge")
        else:
            k = self.w / self.h
            for i in range(3):
                vv = v + (i - 1) * 0.9 * r * k
                self.f_rect((u - r, vv - 0.3 * r * k, u + r, vv + 0.3 * r * k), "accent")


def _draw_top(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    """T-shirts, shirts, sweaters, jackets and coats: a flat-lay upper body garment."""
    bw = {"t-shirts": 0.25, "shirts": 0.24, "sweaters": 0.26, "jackets": 0.28, "coats": 0.26}[sub]
    hem = {"jackets": 0.9, "coats": 1.0}.get(sub, 0.97)
    flare = 0.05 if sub == "coats" else 0.0
    nw, nv, sv = 0.1, 0.08, 0.15  # neck half-width, neck v, shoulder v
    L, R = 0.5 - bw, 0.5 + bw
    if "hood" in d:
        c.ellipse(0.5 - 0.17, 0.0, 0.5 + 0.17, 0.24)
    if "turtleneck" in d:
        c.rect(0.5 - nw, 0.01, 0.5 + nw, nv + 0.03)
    c.poly([(0.5 - nw, nv), (L, sv), (L - flare, hem), (R + flare, hem), (R, sv), (0.5 + nw, nv)])
    long = "long sleeves" in d
    for s in (-1, 1):
        sx = 0.5 + s * bw
        if long:
            c.poly([(sx, sv), (sx + s * 0.23, 0.86), (sx + s * 0.12, 0.89), (sx, 0.42)])
            c.line([(sx + s * 0.22, 0.8), (sx + s * 0.11, 0.83)], "dark")  # cuff seam
        elif "short sleeves" in d:
            c.poly([(sx, sv), (sx + s * 0.2, 0.37), (sx + s * 0.12, 0.46), (sx, 0.38)])
        c.line([(sx, sv + 0.02), (sx, 0.38)], "dark", 0.7)  # armhole seam: separates sleeve from body
    # Neckline
    if "hood" in d:
        c.f_ellipse((0.5 - 0.11, 0.04, 0.5 + 0.11, 0.2), "inner")
    elif "turtleneck" in d:
        c.f_ellipse((0.5 - nw, 0.0, 0.5 + nw, 0.05), "inner")
        for i in range(1, 6):
            x = 0.5 - nw + i * 2 * nw / 6
            c.line([(x, 0.03), (x, nv + 0.02)], "dark", 0.6)
    elif "v-neck" in d:
        c.f_poly([(0.5 - nw, nv), (0.5, nv + 0.16), (0.5 + nw, nv)], "inner")
    elif "lapels" in d:
        c.f_poly([(0.5 - nw, nv), (0.5, 0.4), (0.5 + nw, nv)], "inner")
    else:
        c.f_chord((0.5 - nw, nv - 0.06, 0.5 + nw, nv + 0.07), 0, 180, "inner")
    if "lapels" in d:
        for s in (-1, 1):
            c.f_poly([(0.5 + s * nw, nv), (0.5 + s * 0.01, 0.42), (0.5 + s * 0.12, 0.3), (0.5 + s * (nw + 0.06), 0.14)],
                     "shade", "dark")
    if "point collar" in d:
        for s in (-1, 1):
            c.f_poly([(0.5 + s * (nw + 0.02), nv - 0.01), (0.5, nv + 0.07), (0.5 + s * 0.05, nv + 0.14),
                      (0.5 + s * (nw + 0.05), nv + 0.07)], "light", "dark")
    # Closures
    top = nv + 0.1 if "point collar" in d else nv + (0.17 if "v-neck" in d else 0.07)
    if "lapels" in d:
        top = 0.42
    if "zip front" in d:
        c.line([(0.5, top), (0.5, hem)], "metal", 1.3)
        c.f_rect((0.49, top, 0.525, top + 0.06), "metal")
    elif "button front" in d:
        c.line([(0.5, top), (0.5, hem)], "dark", 0.8)
        cols = (0.45, 0.55) if sub == "coats" else (0.5,)
        n = 4 if sub == "coats" else 5
        for i in range(n):
            v = top + 0.04 + i * (hem - top - 0.1) / max(1, n - 1)
            for u in cols:
                c.dot(u, v, 0.022, "button")
    if "belt" in d:
        c.f_rect((L - flare * 0.5, 0.52, R + flare * 0.5, 0.58), "belt")
        c.f_rect((0.46, 0.51, 0.54, 0.59), "metal")
    if "chest pocket" in d:
        c.f_rect((L + 0.05, 0.27, L + 0.17, 0.39), "shade", "dark")
    if "flap pockets" in d:
        for u0 in (L + 0.04, R - 0.18):
            c.f_rect((u0, 0.66, u0 + 0.14, 0.74), "shade", "dark")
            c.line([(u0, 0.66), (u0 + 0.14, 0.66)], "dark", 1.3)
    if "graphic print" in d:
        c.motif(0.5, 0.45, 0.1, int(rng.integers(3)))
    if "ribbed hem" in d:
        c.f_rect((L, hem - 0.07, R, hem), "shade")
        for i in range(1, 12):
            x = L + i * 2 * bw / 12
            c.line([(x, hem - 0.07), (x, hem)], "dark", 0.5)
    if sub == "jackets":
        c.line([(L, hem - 0.06), (R, hem - 0.06)], "dark")  # waistband seam


def _draw_bottoms(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    """Trousers, shorts and skirts: waistband + legs / skirt panel."""
    if sub == "skirts":
        wb = 0.09
        c.rect(0.2, 0.0, 0.8, wb)
        if "pencil" in d:
            c.poly([(0.2, wb), (0.14, 0.5), (0.18, 1.0), (0.82, 1.0), (0.86, 0.5), (0.8, wb)])
        elif "pleated" in d:
            hem = [(0.0, 0.97)] + [(i / 10, 0.97 + 0.03 * (i % 2)) for i in range(1, 10)] + [(1.0, 0.97)]
            c.poly([(0.2, wb)] + hem + [(0.8, wb)])
            for i in range(1, 10):
                c.line([(0.2 + i * 0.06, wb), (i / 10, 0.97)], "dark", 0.6)
        else:
            c.poly([(0.2, wb), (0.02, 1.0), (0.98, 1.0), (0.8, wb)])
        waist = (0.2, 0.8)
        if "button front" in d:
            c.line([(0.5, wb), (0.5, 0.95)], "dark", 0.7)
            for i in range(5):
                c.dot(0.5, wb + 0.06 + i * 0.17, 0.02, "button")
    else:
        wb = 0.07 if sub == "trousers" else 0.12
        c.rect(0.08, 0.0, 0.92, wb)
        if sub == "shorts":
            o = 0.02 if "wide leg" in d else 0.1  # hem flare
            c.poly([(0.08, wb), (o, 1.0), (0.47, 1.0), (0.5, 0.6), (0.53, 1.0), (1 - o, 1.0), (0.92, wb)])
            crotch = 0.6
        elif "wide leg" in d:
            c.poly([(0.08, wb), (0.0, 1.0), (0.46, 1.0), (0.5, 0.32), (0.54, 1.0), (1.0, 1.0), (0.92, wb)])
            crotch = 0.32
        else:
            c.poly([(0.08, wb), (0.13, 1.0), (0.43, 1.0), (0.5, 0.3), (0.57, 1.0), (0.87, 1.0), (0.92, wb)])
            crotch = 0.3
        waist = (0.08, 0.92)
        c.line([(0.5, wb), (0.5, crotch * 0.8 + wb * 0.2)], "dark", 0.8)  # fly
        if "side pockets" in d:
            c.line([(0.1, wb + 0.02), (0.24, wb + 0.02), (0.14, wb + (0.2 if sub == "trousers" else 0.3))], "dark")
            c.line([(0.9, wb + 0.02), (0.76, wb + 0.02), (0.86, wb + (0.2 if sub == "trousers" else 0.3))], "dark")
        if "cuffs" in d:
            cv = 0.94 if sub == "trousers" else 0.86
            if sub == "shorts":
                o = 0.02 if "wide leg" in d else 0.1
                legs = ((o, 0.47), (0.53, 1 - o))
            elif "wide leg" in d:
                legs = ((0.0, 0.46), (0.54, 1.0))
            else:
                legs = ((0.13, 0.43), (0.57, 0.87))
            for a, b in legs:
                c.f_rect((a, cv, b, 1.0), "shade")
                c.line([(a, cv), (b, cv)], "dark", 1.2)
    c.line([(waist[0], wb), (waist[1], wb)], "dark", 0.8)
    if "belt" in d:
        c.f_rect((waist[0] - 0.01, wb * 0.2, waist[1] + 0.01, wb * 0.85), "belt")
        c.f_rect((0.45, 0.0, 0.55, wb), "metal")
        c.f_rect((0.475, wb * 0.3, 0.525, wb * 0.7), "belt")
    else:
        for u in (0.25, 0.5, 0.75):  # belt loops
            c.line([(u, 0.0), (u, wb)], "dark", 0.6)


def _draw_dress(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    waist = 0.36 if sub == "mini dresses" else 0.27
    c.poly([(0.38, 0.04), (0.3, 0.07), (0.33, waist), (0.67, waist), (0.7, 0.07), (0.62, 0.04)])
    if sub == "mini dresses":
        c.poly([(0.33, waist), (0.08, 1.0), (0.92, 1.0), (0.67, waist)])
    else:
        c.poly([(0.33, waist), (0.22, 0.6), (0.08, 1.0), (0.92, 1.0), (0.78, 0.6), (0.67, waist)])
    sl = 0.22 if sub == "mini dresses" else 0.16
    for s in (-1, 1):
        sx = 0.5 + s * 0.2
        if "long sleeves" in d:
            c.poly([(sx, 0.07), (sx + s * 0.2, 0.07 + 2.4 * sl), (sx + s * 0.12, 0.08 + 2.5 * sl), (sx - s * 0.02, 0.07 + sl)])
        elif "short sleeves" in d:
            c.poly([(sx, 0.07), (sx + s * 0.15, 0.07 + 0.75 * sl), (sx + s * 0.08, 0.07 + sl), (sx - s * 0.02, 0.07 + 0.8 * sl)])
    if "v-neck" in d:
        c.f_poly([(0.39, 0.04), (0.5, 0.04 + 0.55 * waist), (0.61, 0.04)], "inner")
    else:
        c.f_chord((0.39, -0.02, 0.61, 0.04 + 0.25 * waist), 0, 180, "inner")
    if "sleeveless" in d:
        for s in (-1, 1):
            c.line([(0.5 + s * 0.19, 0.07), (0.5 + s * 0.19, 0.06 + 0.5 * waist)], "dark", 0.6)
    c.line([(0.33, waist), (0.67, waist)], "dark", 0.8)  # waist seam
    if "belt" in d:
        c.f_rect((0.32, waist - 0.025, 0.68, waist + 0.025), "belt")
        c.f_rect((0.47, waist - 0.03, 0.53, waist + 0.03), "metal")


def _draw_sneaker(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    high = "high-top" in d
    collar = 0.06 if high else 0.36
    c.poly([(0.02, 0.84), (0.03, collar + 0.06), (0.1, collar), (0.3, collar + (0.02 if high else 0.08)),
            (0.38, collar - 0.04 if high else 0.3), (0.46, 0.4 if high else 0.36), (0.75, 0.55), (0.94, 0.66),
            (1.0, 0.84)])
    c.f_rect((0.0, 0.8, 1.0, 1.0), "white", "dark", r=0.04)  # rubber sole
    c.line([(0.02, 0.88), (0.99, 0.88)], "sole_line", 0.7)
    c.line([(0.66, 0.8), (0.72, 0.6), (0.95, 0.7)], "dark", 0.8)  # toe cap
    for i in range(4):  # laces
        u = 0.4 + i * 0.07
        v = (0.42 if high else 0.38) + i * 0.045
        c.line([(u - 0.03, v - 0.03), (u + 0.04, v + 0.04)], "lace", 0.9)
        c.line([(u - 0.03, v + 0.04), (u + 0.04, v - 0.03)], "lace", 0.9)
    if "contrast stripe" in d:
        c.f_poly([(0.12, 0.74), (0.62, 0.46), (0.68, 0.52), (0.2, 0.78)], "accent")
    if high:
        c.dot(0.13, 0.4, 0.035, "dark")  # ankle patch


def _draw_boot(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    top = 0.42 if "ankle height" in d else 0.0
    heel = "block heel" in d
    sole = 0.86 if heel else 0.93
    c.poly([(0.08, sole), (0.1, top), (0.5, top), (0.52, 0.62), (0.78, 0.7), (0.97, 0.78), (0.98, sole)])
    c.f_rect((0.06, sole, 1.0, sole + 0.05), "sole")
    if heel:
        c.f_poly([(0.08, sole), (0.32, sole), (0.3, 1.0), (0.1, 1.0)], "sole")
    c.line([(0.1, top + 0.02), (0.5, top + 0.02)], "dark", 0.8)  # top edge
    if "laces" in d:
        for i in range(4):
            v = max(top, 0.42) + 0.04 + i * 0.05
            c.line([(0.4, v), (0.54, v + 0.04)], "lace", 0.9)
    else:
        c.line([(0.44, top + 0.03), (0.44, 0.72)], "dark", 0.6)  # side zip seam
    c.f_rect((0.06, top - 0.04, 0.13, top + 0.06), "shade", "dark")  # pull tab


def _draw_heel(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    pointed = "pointed toe" in d
    toe = [(1.0, 0.93)] if pointed else [(0.95, 0.78), (0.99, 0.86), (0.98, 0.95)]
    c.poly([(0.04, 0.32), (0.14, 0.36), (0.45, 0.66), (0.62, 0.62), (0.86, 0.72)] + toe
           + [(0.6, 0.96), (0.35, 0.8), (0.05, 0.58)])
    if "stiletto heel" in d:
        c.poly([(0.05, 0.55), (0.16, 0.6), (0.12, 1.0), (0.09, 1.0)])
    else:
        c.poly([(0.05, 0.55), (0.22, 0.64), (0.19, 1.0), (0.07, 1.0)])
    c.line([(0.05, 0.58), (0.35, 0.8), (0.6, 0.96), (0.96, 0.96)], "sole", 1.0)
    c.f_poly([(0.14, 0.36), (0.45, 0.66), (0.3, 0.6), (0.1, 0.42)], "inner")  # opening / insole
    if "ankle strap" in d:
        c.band([(0.06, 0.33), (0.2, 0.2), (0.34, 0.26), (0.3, 0.52)], 0.035)
        c.f_rect((0.16, 0.18, 0.24, 0.25), "metal")


def _draw_handbag(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    c.poly([(0.14, 0.4), (0.03, 1.0), (0.97, 1.0), (0.86, 0.4)])
    c.arc((0.28, 0.1, 0.72, 0.72), 180, 360, 0.06)
    if "crossbody strap" in d:
        c.band([(0.14, 0.42), (0.0, 0.0)], 0.02)
        c.band([(0.86, 0.42), (1.0, 0.0)], 0.02)
    c.f_poly([(0.13, 0.42), (0.87, 0.42), (0.9, 0.62), (0.5, 0.72), (0.1, 0.62)], "shade", "dark")
    if "buckle" in d:
        c.f_rect((0.45, 0.64, 0.55, 0.76), "metal", "dark")
    else:
        c.dot(0.5, 0.68, 0.03, "metal")


def _draw_backpack(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    c.rect(0.08, 0.12, 0.92, 1.0, r=0.2)
    c.arc((0.38, 0.02, 0.62, 0.22), 180, 360, 0.04)
    for u0 in (0.0, 0.9):  # shoulder straps behind the body
        c.f_rect((u0, 0.28, u0 + 0.1, 0.86), "dark", r=0.03)
    c.line([(0.2, 0.24), (0.5, 0.19), (0.8, 0.24)], "metal", 0.9)  # top zip
    if "front pocket" in d:
        c.f_rect((0.2, 0.55, 0.8, 0.93), "shade", "dark", r=0.08)
        c.line([(0.24, 0.6), (0.76, 0.6)], "metal", 0.9)
    else:
        c.line([(0.25, 0.55), (0.75, 0.55)], "dark", 0.7)


def _draw_tote(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    c.poly([(0.1, 0.38), (0.05, 1.0), (0.95, 1.0), (0.9, 0.38)])
    for u0 in (0.18, 0.55):
        c.arc((u0, 0.02, u0 + 0.27, 0.74), 180, 360, 0.035)
    c.line([(0.1, 0.44), (0.9, 0.44)], "dark", 0.8)
    if "graphic print" in d:
        c.motif(0.5, 0.7, 0.14, int(rng.integers(3)))


def _draw_hat(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    if "bucket shape" in d:
        c.poly([(0.31, 0.62), (0.35, 0.16), (0.65, 0.16), (0.69, 0.62)])
        c.ellipse(0.35, 0.08, 0.65, 0.26)
        c.poly([(0.31, 0.58), (0.1, 0.92), (0.9, 0.92), (0.69, 0.58)])
        band = (0.32, 0.5, 0.68, 0.6)
        c.line([(0.14, 0.86), (0.86, 0.86)], "dark", 0.6)  # brim stitching
    else:
        c.ellipse(0.0, 0.6, 1.0, 0.94)
        c.poly([(0.27, 0.74), (0.29, 0.2), (0.4, 0.1), (0.5, 0.17), (0.6, 0.1), (0.71, 0.2), (0.73, 0.74)])
        band = (0.28, 0.56, 0.72, 0.68)
        c.line([(0.5, 0.18), (0.5, 0.4)], "dark", 0.7)  # crown crease
    if "ribbon band" in d:
        c.f_rect(band, "accent")
    else:
        c.line([(band[0], band[3]), (band[2], band[3])], "dark", 0.8)


def _draw_cap(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    c.chord((0.04, 0.1, 0.72, 1.3), 180, 360)
    c.poly([(0.5, 0.62), (0.9, 0.66), (1.0, 0.76), (0.92, 0.8), (0.5, 0.74)])  # visor
    c.line([(0.38, 0.1), (0.2, 0.68)], "dark", 0.6)
    c.line([(0.38, 0.1), (0.52, 0.68)], "dark", 0.6)
    c.line([(0.04, 0.7), (0.62, 0.7)], "dark", 0.8)
    if "button top" in d:
        c.f_ellipse((0.34, 0.05, 0.42, 0.15), "shade", "dark")
    if "embroidered logo" in d:
        c.motif(0.33, 0.45, 0.08, int(rng.integers(3)))


def _draw_scarf(c: _Canvas, d: set[str], sub: str, rng: np.random.Generator) -> None:
    c.rect(0.12, 0.0, 0.88, 0.22, r=0.08)
    c.poly([(0.18, 0.12), (0.48, 0.12), (0.5, 0.9), (0.2, 0.9)])
    c.poly([(0.52, 0.14), (0.82, 0.14), (0.8, 0.8), (0.5, 0.8)])
    c.f_ellipse((0.3, 0.05, 0.7, 0.17), "inner")
    c.line([(0.5, 0.12), (0.51, 0.8)], "dark", 0.7)
    for a, b, v in ((0.2, 0.5, 0.9), (0.5, 0.8, 0.8)):
        if "fringe" in d:
            for i in range(7):
                u = a + 0.02 + i * (b - a - 0.04) / 6
                c.band([(u, v - 0.01), (u, v + 0.09)], 0.012)
        else:  # rolled hem: a stitched edge just above each end
            c.line([(a + 0.01, v - 0.04), (b - 0.01, v - 0.04)], "dark", 0.8)


_DRAW: dict[str, Callable[[_Canvas, set[str], str, np.random.Generator], None]] = {
    "t-shirts": _draw_top, "shirts": _draw_top, "sweaters": _draw_top, "jackets": _draw_top, "coats": _draw_top,
    "trousers": _draw_bottoms, "shorts": _draw_bottoms, "skirts": _draw_bottoms,
    "mini dresses": _draw_dress, "maxi dresses": _draw_dress,
    "sneakers": _draw_sneaker, "boots": _draw_boot, "heels": _draw_heel,
    "handbags": _draw_handbag, "backpacks": _draw_backpack, "totes": _draw_tote,
    "hats": _draw_hat, "caps": _draw_cap, "scarves": _draw_scarf,
}


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
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 px, got {image_size}")
    sub = SUBCATEGORIES[attrs["subcategory"]]
    S = image_size * 2 if image_size <= 128 else image_size
    # Per-product color jitter: small enough that the nearest palette color stays the product's color.
    def jitter(name: str) -> np.ndarray:
        base = np.asarray(COLORS[name][0], dtype=np.float32)
        return np.clip(base * rng.uniform(0.94, 1.05) + rng.normal(0, 3.0, 3), 0, 255).astype(np.float32)

    primary = jitter(attrs["color"])
    secondary = jitter(attrs["secondary_color"]) if attrs.get("secondary_color") else primary
    # Background: a studio tone far from the item's color(s).
    used = [primary] + ([secondary] if attrs.get("secondary_color") else [])
    ok = [b for b in _BACKGROUNDS if all(_dist(b, c) > 85 for c in used)]
    if not ok:
        ok = [max(_BACKGROUNDS, key=lambda b: min(_dist(b, c) for c in used))]
    bg = np.asarray(_pick(rng, ok), dtype=np.float32)
    # Box: scale + aspect + position jitter, with a margin so the item never touches the border.
    scale = rng.uniform(0.7, 0.88) * S
    a = sub.aspect
    w, h = (scale, scale / a) if a >= 1 else (scale * a, scale)
    m = 0.05 * S
    x0 = m + rng.random() * max(0.0, S - 2 * m - w)
    y0 = m + rng.random() * max(0.0, S - 2 * m - h)
    box = (x0, y0, w, h)

    yy, xx = _grid(S)
    grad = 1.0 + rng.uniform(-0.05, 0.05) * (yy / S - 0.5) * 2
    canvas = bg[None, None, :] * grad[..., None]
    if sub.parent in ("footwear", "bags", "accessories"):  # soft contact shadow under standing objects
        sh = Image.new("L", (S, S), 0)
        ImageDraw.Draw(sh).ellipse([x0 + 0.08 * w, y0 + 0.94 * h, x0 + 0.92 * w, y0 + 1.04 * h], fill=255)
        sh_a = np.asarray(sh.filter(ImageFilter.BoxBlur(max(1, S // 40))), dtype=np.float32) / 255.0
        canvas = canvas * (1 - 0.1 * sh_a[..., None])

    mask = Image.new("L", (S, S), 0)
    c = _Canvas(S, box, mask)
    _DRAW[attrs["subcategory"]](c, set(attrs["details"]), attrs["subcategory"], rng)
    m_arr = np.asarray(mask, dtype=np.float32)[..., None] / 255.0

    gain = _material_gain(attrs["material"], S, box, rng)
    light = 1.04 - 0.1 * np.clip(((xx - x0) / w + (yy - y0) / h) / 2, 0, 1)  # key light from the top left
    tex = np.broadcast_to(primary, (S, S, 3))
    cover = _pattern_cover(attrs["pattern"], S, box, rng)
    if cover is not None:
        tex = tex * (1 - cover[..., None]) + secondary * cover[..., None]
    tex = tex * (gain * light)[..., None]
    out = canvas * (1 - m_arr) + tex * m_arr
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")
    # A thin darker outline around the silhouette, as product photos have.
    edge = np.asarray(mask.filter(ImageFilter.MaxFilter(3)), dtype=np.int16) - np.asarray(mask, dtype=np.int16)
    tones = _tones(primary, secondary)
    img.paste(tones["edge"], mask=Image.fromarray((edge > 0).astype(np.uint8) * 255, "L"))
    draw = ImageDraw.Draw(img)
    for op in c.ops:
        op(draw, tones)
    if sub.flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if S != image_size:
        img = img.resize((image_size, image_size), Image.LANCZOS)
    return img


# ============================================================================================ text

def _title_case(s: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in s.split())


def _noun(attrs: dict[str, Any], rng: np.random.Generator) -> str:
    sub = attrs["subcategory"]
    d = attrs["details"]
    if sub == "sweaters" and "hood" in d:
        return "hoodie"
    if sub == "boots":
        return "ankle boots" if "ankle height" in d else "knee-high boots"
    if sub == "hats":
        return "bucket hat" if "bucket shape" in d else _pick(rng, ("fedora", "wide-brim hat"))
    if sub == "sneakers" and "high-top" in d:
        return _pick(rng, ("high-top sneakers", "high-tops"))
    return _pick(rng, SUBCATEGORIES[sub].nouns)


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _season(attrs: dict[str, Any]) -> str:
    d, m, sub = attrs["details"], attrs["material"], attrs["subcategory"]
    if m in ("wool", "corduroy") or sub in ("coats", "boots", "scarves") or "turtleneck" in d:
        return "winter"
    if m == "linen" or "sleeveless" in d or sub in ("shorts", "hats") or (m == "silk" and sub.endswith("dresses")):
        return "summer"
    return "all season"


def _style(attrs: dict[str, Any]) -> str:
    d, m, sub = attrs["details"], attrs["material"], attrs["subcategory"]
    if sub in ("sneakers", "caps", "backpacks") or "hood" in d or "graphic print" in d:
        return "sporty"
    if sub in ("shirts", "coats", "heels") or "pencil" in d or m == "silk" or (sub == "handbags" and m == "leather"):
        return "smart"
    return "casual"


def make_texts(attrs: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The text fields of a product (all present; missing values are applied later).

    Returns ``title`` (str), ``description`` (str, 20..80 words), ``colors``, ``materials``, ``categories``
    ([parent, child]), ``details``, ``keywords`` (lists of str).
    """
    color, sec, mat, pat = attrs["color"], attrs["secondary_color"], attrs["material"], attrs["pattern"]
    sub, parent, det = attrs["subcategory"], attrs["category"], list(attrs["details"])
    noun = _noun(attrs, rng)
    csyn = _pick(rng, COLORS[color][1]) if rng.random() < 0.6 else color
    msay = _pick(rng, MATERIALS[mat]["say"])
    padj = PATTERNS[pat][0]
    plural = noun.endswith("s") and not noun.endswith("dress")

    # --- title ---
    pat_word = "" if pat == "plain" else padj + " "
    feature = _pick(rng, det) if det else None
    t = int(rng.integers(5))
    if t == 0:
        title = f"{csyn} {pat_word}{mat} {noun}"
    elif t == 1:
        title = f"{pat_word}{noun} in {csyn} {mat}"
    elif t == 2 and feature:
        title = f"{csyn} {pat_word}{noun} with {feature}"
    elif t == 3:
        title = f"{mat} {noun} - {csyn}"
    else:
        title = f"{csyn} {pat_word}{noun}"
    title = _title_case(title)

    # --- description: an opening, then optional sentences until 20..80 words ---
    it = "They" if plural else "It"
    has = "have" if plural else "has"
    are = "are" if plural else "is"
    o = int(rng.integers(4))
    if o == 0:
        opening = f"This {csyn} {noun} {are} made from {msay}."
    elif o == 1:
        opening = f"A {csyn} {noun} cut from {msay}." if not plural else f"{_title_case(csyn)} {noun} crafted in {msay}."
    elif o == 2:
        opening = f"Meet our {noun} in {csyn} {msay}."
    else:
        opening = f"{_title_case(csyn)} {msay} {noun} for everyday wear."
    sentences: list[str] = []
    if pat != "plain":
        ssyn = _pick(rng, COLORS[sec][1])
        sentences.append(_pick(rng, (f"{it} {are} finished with {_pick(rng, PATTERNS[pat][1:])} in {ssyn}.",
                                     f"The design features {_pick(rng, PATTERNS[pat][1:])} in {ssyn}.")))
    if det:
        phrases = [_pick(rng, DETAILS[x]) for x in det]
        accent = [x for x in det if x in _ACCENT_DETAILS]
        sentences.append(_pick(rng, (f"Details include {_join(phrases)}.", f"{it} {has} {_join(phrases)}.",
                                     f"Look for {_join(phrases)}.")))
        if accent and pat == "plain":
            sentences.append(f"The {accent[0]} comes in {_pick(rng, COLORS[sec][1])}.")
    sentences.append(_pick(rng, (f"The {mat} feels {_pick(rng, MATERIALS[mat]['feel'])}.",
                                 f"{_title_case(mat)} keeps {'them' if plural else 'it'} {_pick(rng, MATERIALS[mat]['feel'])}.")))
    season, style = _season(attrs), _style(attrs)
    sentences.append(_pick(rng, (
        f"A {style} piece for {season if season != 'all season' else 'any season'}.",
        f"Easy to style for a {style} look" + (f" in {season}." if season != "all season" else " all year round."),
        f"Pair {'them' if plural else 'it'} with your favourite {style} staples.")))
    fillers = [
        _pick(rng, MATERIALS[mat]["care"]),
        _pick(rng, ("Designed to last for many seasons.", "A versatile wardrobe essential.",
                    "Our designers love this one.", "Part of our core collection.")),
        _pick(rng, ("True to size.", "Regular fit.", "Fits true to size; take your usual size.",
                    "Model is 178 cm and wears size M.")) if parent not in ("bags", "accessories") else
        _pick(rng, ("One size.", "Comes with a dust bag.", "Measurements are listed in the size guide.")),
        _pick(rng, ("Free returns within 30 days.", "Responsibly made.", "Ships in recyclable packaging.")),
    ]
    order = rng.permutation(len(sentences))
    body = [sentences[int(i)] for i in order]
    words = lambda parts: sum(len(s.split()) for s in parts)  # noqa: E731
    text = [opening] + body
    # Always add one or two filler sentences (variety), more while below 20 words; drop from the end past 80.
    n_fill = 1 + int(rng.integers(2))
    text += fillers[:n_fill]
    k = n_fill
    while words(text) < 20 and k < len(fillers):
        text.append(fillers[k])
        k += 1
    while words(text) > 80 and len(text) > 2:
        text.pop()
    description = " ".join(text)
    if words(text) < 20:  # cannot happen with the sentence pools above; fail loudly if they change
        raise AssertionError(f"description too short: {description!r}")

    colors = [color] + ([sec] if sec else [])
    if sub == "sneakers" and "white" not in colors:
        colors.append("white")  # the rubber sole
    materials = [mat] + (["rubber"] if sub in ("sneakers", "boots") else [])
    keywords = [SUBCATEGORIES[sub].nouns[0], parent, color, mat] + ([padj] if pat != "plain" else [])
    keywords += [style, season]
    if rng.random() < 0.5:
        keywords.append(_pick(rng, COLORS[color][1][1:]))
    keywords = list(dict.fromkeys(keywords))
    return {"title": title, "description": description, "colors": colors, "materials": materials,
            "categories": [parent, sub], "details": det, "keywords": keywords}


def noisy_title(title: str, rng: np.random.Generator) -> str:
    """A corrupted title as in scraped data: a dropped word, swapped words, lower case or a typo."""
    words = title.split()
    kind = int(rng.integers(4))
    if kind == 0 and len(words) >= 3:
        del words[int(rng.integers(len(words)))]
    elif kind == 1 and len(words) >= 2:
        i = int(rng.integers(len(words) - 1))
        words[i], words[i + 1] = words[i + 1], words[i]
    elif kind == 2:
        words = [w.lower() for w in words]
    else:
        i = int(np.argmax([len(w) for w in words]))
        w = words[i]
        if len(w) >= 3:
            j = int(rng.integers(len(w) - 1))
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        else:
            words = [x.lower() for x in words]
    out = " ".join(words)
    return out if out != title else title.lower() + "s"


# ============================================================================================ queries

_QUERY_WEIGHTS = {"category": 0.4, "color": 0.3, "pattern": 0.15, "material": 0.15}


def make_query(attrs: dict[str, Any], rng: np.random.Generator) -> tuple[str, int]:
    """A search query for which this product was shown, and its relevance score (1..100).

    The query names 1..4 attributes (category always; color / pattern / material sometimes), taken from the
    product and, 40% of the time, with one attribute swapped for another value, so scores spread out. Score
    = 1 + 99 x (weighted share of the query's attributes the product matches; a parent-only category match
    counts half).
    """
    q: dict[str, str] = {}
    child = rng.random() < 0.6
    q["category"] = attrs["subcategory"] if child else attrs["category"]
    for k, p in (("color", 0.65), ("pattern", 0.3), ("material", 0.25)):
        if rng.random() < p and not (k == "pattern" and attrs["pattern"] == "plain" and rng.random() < 0.7):
            q[k] = attrs[k]
    if rng.random() < 0.4:  # a partially relevant impression
        k = _pick(rng, sorted(q))
        if k == "category":
            q[k] = _pick(rng, [c for c in (SUBCATEGORIES if child else HIERARCHY) if c != q[k]])
        else:
            pool = {"color": COLOR_NAMES, "pattern": PATTERN_NAMES, "material": MATERIAL_NAMES}[k]
            q[k] = _pick(rng, [v for v in pool if v != q[k]])
    got = total = 0.0
    for k, v in q.items():
        wgt = _QUERY_WEIGHTS[k]
        total += wgt
        if k == "category":
            if v == attrs["subcategory"] or v == attrs["category"]:
                got += wgt
            elif v in SUBCATEGORIES and SUBCATEGORIES[v].parent == attrs["category"]:
                got += wgt / 2
        elif v == attrs[k]:
            got += wgt
    score = int(round(1 + 99 * got / total))
    cat = q["category"]
    noun = SUBCATEGORIES[cat].nouns[0] if cat in SUBCATEGORIES else _PARENT_NOUN[cat]
    pat = q.get("pattern")
    words = [q.get("color"), PATTERNS[pat][0] if pat and pat != "plain" else None, q.get("material"), noun]
    return " ".join(w for w in words if w), score


# ============================================================================================ catalog

@dataclass(frozen=True)
class _Job:
    seed: int
    image_size: int
    missing_rate: float
    noisy_title_rate: float


def _build(job: _Job, index: int, attrs: dict[str, Any], rank: tuple[str, int, int] | None
           ) -> tuple[bytes, dict[str, Any]]:
    """Image (JPEG bytes) and JSON fields of product ``index``; a pure function of its arguments."""
    img = render_product(attrs, job.image_size, _rng(job.seed, index, _S_IMAGE))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps thin colored details
    texts = make_texts(attrs, _rng(job.seed, index, _S_TEXT))
    mr = _rng(job.seed, index, _S_MISSING)
    if mr.random() < job.noisy_title_rate:
        texts["title"] = noisy_title(texts["title"], mr)
    drop = [f for f in TEXT_FIELDS if mr.random() < job.missing_rate]
    if len(drop) == len(TEXT_FIELDS):  # never all texts: keep one at random
        drop.remove(_pick(mr, drop))
    fields: dict[str, Any] = {"item_id": _item_id(index)}
    fields.update({k: v for k, v in texts.items() if k not in drop})
    fields.update({"category": attrs["category"], "subcategory": attrs["subcategory"], "color": attrs["color"],
                   "material": attrs["material"], "pattern": attrs["pattern"]})
    if rank is not None:
        fields.update({"query": rank[0], "score": rank[1], "position": rank[2]})
    return buf.getvalue(), fields


def _build_star(args: tuple[_Job, int, dict[str, Any], tuple[str, int, int] | None]
                ) -> tuple[bytes, dict[str, Any]]:
    return _build(*args)


def _item_id(index: int) -> str:
    return f"p{index:07d}"


def _check_args(products: int, seed: int, image_size: int, per_shard: int, splits: Sequence[float],
                missing_rate: float, noisy_title_rate: float, workers: int) -> tuple[float, float, float]:
    if int(products) != products or products < 1:
        raise ValueError(f"products must be a positive integer, got {products!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 px, got {image_size}")
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    sp = tuple(float(x) for x in splits)
    if len(sp) != 3 or any(x < 0 for x in sp) or abs(sum(sp) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test) summing to 1, got {splits!r}")
    for name, r in (("missing_rate", missing_rate), ("noisy_title_rate", noisy_title_rate)):
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return sp  # type: ignore[return-value]


def _assign_splits(products: int, seed: int, fractions: tuple[float, float, float],
                   attrs: list[dict[str, Any]], held: set[tuple[str, str]]) -> list[str]:
    """Split name per product: held-out combos -> test_heldout; the rest a seeded exact-share partition."""
    split = ["test_heldout" if (a["color"], a["subcategory"]) in held else "" for a in attrs]
    free = np.asarray([i for i, s in enumerate(split) if not s], dtype=np.int64)
    perm = _rng(seed, _S_SPLIT).permutation(free)
    n_train = int(round(fractions[0] * len(free)))
    n_val = int(round(fractions[1] * len(free)))
    n_val = min(n_val, len(free) - n_train)
    for j, i in enumerate(perm.tolist()):
        split[i] = "train" if j < n_train else ("val" if j < n_train + n_val else "test")
    return split


def _rank_rows(products: int, seed: int, attrs: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(query, score, position) per product; position = 1-based rank among products with the same query,
    by score descending then product index."""
    qs = [make_query(a, _rng(seed, i, _S_QUERY)) for i, a in enumerate(attrs)]
    by_q: dict[str, list[int]] = {}
    for i, (q, _s) in enumerate(qs):
        by_q.setdefault(q, []).append(i)
    pos = [0] * products
    for idx in by_q.values():
        for r, i in enumerate(sorted(idx, key=lambda i: (-qs[i][1], i))):
            pos[i] = r + 1
    return [(q, s, pos[i]) for i, (q, s) in enumerate(qs)]


def _open_writer(out: Path, per_shard: int) -> ShardWriter:
    # A fixed tar mtime makes shard bytes reproducible for a seed.
    return ShardWriter(out, per_shard=per_shard, mtime=_TAR_MTIME)


def _pattern(root: Path, split: str, n_shards: int) -> str | None:
    if n_shards == 0:
        return None
    if n_shards == 1:
        return str(root / split / "shard-000000.tar")
    return str(root / split / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def _vocab() -> dict[str, Any]:
    return {
        "colors": {k: {"rgb": list(rgb), "synonyms": list(syn)} for k, (rgb, syn) in COLORS.items()},
        "materials": list(MATERIAL_NAMES) + ["rubber"],
        "patterns": list(PATTERN_NAMES),
        "details": list(DETAILS),
        "categories": {p: list(c) for p, c in HIERARCHY.items()},
    }


def generate_catalog(out_dir: str | os.PathLike, products: int, seed: int = 0, image_size: int = 64,
                     per_shard: int = 1000, splits: Sequence[float] = (0.8, 0.1, 0.1),
                     missing_rate: float = 0.05, noisy_title_rate: float = 0.05, with_queries: bool = True,
                     workers: int = 1, progress: bool = False, _final_dir: str | os.PathLike | None = None
                     ) -> dict[str, Any]:
    """Write the catalog for ``products`` products into ``out_dir`` (created; must not already hold files).

    Output bytes depend only on the arguments other than ``workers`` / ``progress``. Returns the content of
    ``catalog.json``: ``splits[name] = {"pattern": absolute brace pattern or None when the split is empty,
    "relpattern": the same relative to the catalog dir, "count": int, "shards": int}`` for train / val / test
    / test_heldout, plus ``vocab``, ``heldout_combos``, ``counts``, ``args``, ``format_version``.
    """
    fractions = _check_args(products, seed, image_size, per_shard, splits, missing_rate, noisy_title_rate, workers)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new output directory or delete this one")
    out.mkdir(parents=True, exist_ok=True)
    root = Path(_final_dir) if _final_dir is not None else out
    root = root.resolve()
    t0 = time.perf_counter()

    # Pass 1 (cheap, in process): attributes, splits and ranking rows, which need the whole catalog.
    attrs = [sample_attributes(_rng(seed, i, _S_ATTR)) for i in range(products)]
    held = heldout_combos(seed)
    split_of = _assign_splits(products, seed, fractions, attrs, set(held))
    ranks: list[tuple[str, int, int]] | None = _rank_rows(products, seed, attrs) if with_queries else None

    # Pass 2: images and texts, in index order (imap keeps order, so workers never change the bytes).
    job = _Job(seed, image_size, missing_rate, noisy_title_rate)
    tasks = ((job, i, attrs[i], ranks[i] if ranks else None) for i in range(products))
    writers = {s: _open_writer(out / s, per_shard) for s in SPLITS}
    seen = dict.fromkeys(SPLITS, 0)
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=products, unit="product", desc="synthetic catalog", dynamic_ncols=True)
    with contextlib.ExitStack() as stack:
        results: Iterator[tuple[bytes, dict[str, Any]]]
        if workers > 1:
            # spawn: safe under threads / CUDA in the parent (the trainer); workers import only numpy + PIL.
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            results = pool.imap(_build_star, tasks, chunksize=16)
        else:
            results = map(_build_star, tasks)
        for i, (jpg, fields) in enumerate(results):
            s = split_of[i]
            key = fields["item_id"]
            writers[s].write(key, jpg, "jpg", fields)
            row = {k: fields.get(k) for k in (*FLAT_FIELDS, *TEXT_FIELDS, *RANK_FIELDS)}
            row.update(split=s, shard=f"{s}/shard-{seen[s] // per_shard:06d}.tar", key=key,
                       secondary_color=attrs[i]["secondary_color"])
            seen[s] += 1
            rows.append(row)
            if bar is not None:
                bar.update(1)
        sizes = {s: w.close() for s, w in writers.items()}
    if bar is not None:
        bar.close()
    _write_table(out / "products.parquet", rows, with_queries)

    split_info = {}
    for s in SPLITS:
        n_sh = len(sizes[s])
        split_info[s] = {"pattern": _pattern(root, s, n_sh), "relpattern": _pattern(Path("."), s, n_sh),
                         "count": int(sum(sizes[s].values())), "shards": n_sh}
    counts = {"products": products, "splits": {s: split_info[s]["count"] for s in SPLITS},
              "subcategories": {c: 0 for c in SUBCATEGORIES}, "colors": {c: 0 for c in COLOR_NAMES}}
    for a in attrs:
        counts["subcategories"][a["subcategory"]] += 1
        counts["colors"][a["color"]] += 1
    catalog = {
        "format_version": FORMAT_VERSION,
        "generator": "gcl.data.synthetic",
        "seed": seed,
        "products": products,
        "image_size": image_size,
        "image_ext": "jpg",
        "args": {"products": products, "seed": seed, "image_size": image_size, "per_shard": per_shard,
                 "splits": list(fractions), "missing_rate": missing_rate, "noisy_title_rate": noisy_title_rate,
                 "with_queries": with_queries},
        "fields": {"text": list(TEXT_FIELDS), "flat": list(FLAT_FIELDS),
                   "ranking": list(RANK_FIELDS) if with_queries else []},
        "vocab": _vocab(),
        "heldout_key": ["color", "subcategory"],
        "heldout_combos": [{"color": c, "subcategory": s} for c, s in held],
        "splits": split_info,
        "counts": counts,
        "table": "products.parquet",
    }
    tmp = out / "catalog.json.tmp"
    tmp.write_text(json.dumps(catalog, indent=1, ensure_ascii=False))
    os.replace(tmp, out / "catalog.json")
    log.debug("synthetic catalog: %d products in %.1fs -> %s", products, time.perf_counter() - t0, out)
    return catalog


def _write_table(path: Path, rows: list[dict[str, Any]], with_queries: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lst = pa.list_(pa.string())
    schema = [("item_id", pa.string()), ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()),
              ("category", pa.string()), ("subcategory", pa.string()), ("color", pa.string()),
              ("secondary_color", pa.string()), ("material", pa.string()), ("pattern", pa.string()),
              ("title", pa.string()), ("description", pa.string()), ("colors", lst), ("materials", lst),
              ("categories", lst), ("details", lst), ("keywords", lst)]
    if with_queries:
        schema += [("query", pa.string()), ("score", pa.int32()), ("position", pa.int32())]
    sch = pa.schema(schema)
    table = pa.Table.from_pylist([{k: r.get(k) for k in sch.names} for r in rows], schema=sch)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def load_catalog(catalog_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``catalog.json`` with split patterns re-resolved against ``catalog_dir`` (so a moved catalog
    still works)."""
    root = Path(catalog_dir).resolve()
    path = root / "catalog.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: generate the catalog with generate_catalog() or "
                                f"`python -m gcl.data.synthetic {root} --products N`")
    cat = json.loads(path.read_text())
    for info in cat["splits"].values():
        rel = info.get("relpattern")
        info["pattern"] = str(root / rel) if rel else None
    return cat


def catalog_name(products: int, seed: int, image_size: int, per_shard: int = 1000,
                 splits: Sequence[float] = (0.8, 0.1, 0.1), missing_rate: float = 0.05,
                 noisy_title_rate: float = 0.05, with_queries: bool = True) -> str:
    """The cache folder name of a catalog: readable parameters + a hash of everything that changes bytes."""
    key = json.dumps([FORMAT_VERSION, products, seed, image_size, per_shard, [float(x) for x in splits],
                      float(missing_rate), float(noisy_title_rate), bool(with_queries)])
    h = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"fashion-v{FORMAT_VERSION}-n{products}-s{seed}-{image_size}px-{h}"


def ensure_catalog(cache_dir: str | os.PathLike, products: int, seed: int = 0, image_size: int = 64,
                   per_shard: int = 1000, splits: Sequence[float] = (0.8, 0.1, 0.1), missing_rate: float = 0.05,
                   noisy_title_rate: float = 0.05, with_queries: bool = True, workers: int = 1,
                   progress: bool = False) -> Path:
    """Return the catalog folder for these arguments under ``cache_dir``, generating it on first use.

    Safe for concurrent callers (ranks, workers, jobs sharing a file system): a per-catalog file lock makes
    the others wait instead of generating twice, and the catalog is generated into a unique temporary folder
    and moved into place with one ``os.replace``; a caller that loses the rename race (e.g. where locks do
    not work across hosts) deletes its copy and uses the winner's, which is byte-identical.
    """
    _check_args(products, seed, image_size, per_shard, splits, missing_rate, noisy_title_rate, workers)
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    name = catalog_name(products, seed, image_size, per_shard, splits, missing_rate, noisy_title_rate, with_queries)
    final = cache / name
    if (final / "catalog.json").is_file():
        return final
    with _file_lock(cache / f".{name}.lock"):
        if (final / "catalog.json").is_file():
            return final
        tmp = cache / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            log.info("generating synthetic catalog (%d products, seed %d, %d px) into %s", products, seed,
                     image_size, final)
            generate_catalog(tmp, products, seed=seed, image_size=image_size, per_shard=per_shard, splits=splits,
                             missing_rate=missing_rate, noisy_title_rate=noisy_title_rate,
                             with_queries=with_queries, workers=workers, progress=progress, _final_dir=final)
            try:
                os.replace(tmp, final)
            except OSError:
                # Lost the race: another process put an identical catalog there first.
                if not (final / "catalog.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX flock); a no-op where flock is unavailable (the rename stays safe)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ============================================================================================ CLI

def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m gcl.data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (created; must be empty)")
    p.add_argument("--products", type=int, required=True, help="number of products")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="square image side in px (default 64)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--splits", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--missing-rate", type=float, default=0.05)
    p.add_argument("--noisy-title-rate", type=float, default=0.05)
    p.add_argument("--no-queries", action="store_true", help="omit the query / score / position fields")
    p.add_argument("--workers", type=int, default=1, help="processes rendering images (output is identical)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    cat = generate_catalog(a.out, a.products, seed=a.seed, image_size=a.image_size, per_shard=a.per_shard,
                           splits=a.splits, missing_rate=a.missing_rate, noisy_title_rate=a.noisy_title_rate,
                           with_queries=not a.no_queries, workers=a.workers, progress=True)
    dt = time.perf_counter() - t0
    counts = ", ".join(f"{s} {cat['splits'][s]['count']}" for s in SPLITS)
    log.info("wrote %d products (%s) to %s in %.1fs (%.0f products/s)", a.products, counts, a.out, dt,
             a.products / dt)
    return cat


if __name__ == "__main__":
    main()
