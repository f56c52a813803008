"""The catalog's attribute space and how one product's attributes are drawn.

Lives here: the vocabularies (colors with RGB and synonyms, materials with their phrases, patterns, details,
the 7 parent / 18 subcategories and how each looks: ``Subcategory``), the per-product random streams
(``_rng`` and the ``_S_*`` stream ids), ``sample_attributes`` and the held-out (color, subcategory) pairs.

Not here: drawing (``draw``, ``render``), words (``text``), writing the catalog (``write``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
