"""The world's vocabulary: object classes, colours, patterns, backgrounds, counts and relations.

Pure data plus name helpers (plurals, count words); no drawing (``shapes``), no sampling (``scene``). Colours
and three patterns (striped, checked, polka dot) are the concepts the world shares with the fashion catalog
(same names, same RGB values); everything else here is not fashion.
"""
from __future__ import annotations

from dataclasses import dataclass

# name -> RGB; the fashion catalog's 16-colour palette (gcl.data.synthetic.COLORS), so "red" is the same red in
# both worlds. The values are spread so that a rendered pixel's nearest palette colour is still its colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 28), "white": (242, 242, 238), "grey": (135, 135, 135), "navy": (28, 40, 100),
    "blue": (40, 95, 200), "light blue": (140, 185, 230), "teal": (20, 128, 135), "green": (40, 135, 65),
    "red": (200, 30, 40), "burgundy": (125, 25, 60), "pink": (240, 150, 185), "orange": (240, 125, 35),
    "yellow": (240, 205, 50), "beige": (215, 195, 155), "brown": (120, 75, 40), "purple": (115, 60, 160),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# name -> (adjective, plural noun used in "with white stripes"). Patterns are drawn in a second colour.
PATTERNS: dict[str, tuple[str, str]] = {
    "plain": ("plain", ""),
    "striped": ("striped", "stripes"),
    "checked": ("checked", "checks"),
    "polka dot": ("polka-dot", "polka dots"),
    "wavy": ("wavy", "waves"),
    "speckled": ("speckled", "speckles"),
}
PATTERN_NAMES: tuple[str, ...] = tuple(PATTERNS)


@dataclass(frozen=True)
class Background:
    """A scene background: its base colour (the pixel statistics' reference), how it is textured, and how a
    caption says it."""

    rgb: tuple[int, int, int]
    phrase: str  # "on grass"
    word: str  # "grass" (attribute lists)


BACKGROUNDS: dict[str, Background] = {
    "studio": Background((236, 235, 231), "on a plain background", "plain background"),
    "sky": Background((160, 200, 238), "against the sky", "sky"),
    "grass": Background((92, 150, 62), "on grass", "grass"),
    "sand": Background((222, 196, 146), "on sand", "sand"),
    "night": Background((18, 22, 46), "against a night sky", "night sky"),
    "wood": Background((142, 96, 56), "on a wooden floor", "wooden floor"),
    "water": Background((42, 106, 150), "on water", "water"),
    "brick": Background((172, 78, 58), "in front of a brick wall", "brick wall"),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)


@dataclass(frozen=True)
class ObjectClass:
    """One object class: its super-category, plural, box aspect (width / height) and whether a mirrored
    drawing is still the same object seen from the other side (animals, vehicles, ...)."""

    category: str
    aspect: float
    plural: str = ""
    flip: bool = False

    def noun(self, name: str, n: int) -> str:
        return name if n == 1 else (self.plural or name + "s")


def _c(category: str, aspect: float, plural: str = "", flip: bool = False) -> ObjectClass:
    return ObjectClass(category, aspect, plural, flip)


# 48 classes in 8 super-categories; each has its own silhouette in gcl.data.world.shapes.
CLASSES: dict[str, ObjectClass] = {
    # animals
    "fish": _c("animal", 1.6, "fish", True), "bird": _c("animal", 1.25, flip=True),
    "butterfly": _c("animal", 1.3, "butterflies"), "snail": _c("animal", 1.4, flip=True),
    "turtle": _c("animal", 1.6, flip=True), "rabbit": _c("animal", 0.75), "snake": _c("animal", 1.7, flip=True),
    # vehicles
    "car": _c("vehicle", 2.0, flip=True), "truck": _c("vehicle", 1.9, flip=True),
    "bus": _c("vehicle", 2.2, "buses", True), "bicycle": _c("vehicle", 1.6, flip=True),
    "sailboat": _c("vehicle", 1.0, flip=True), "airplane": _c("vehicle", 1.7, flip=True),
    "rocket": _c("vehicle", 0.5),
    # tools
    "hammer": _c("tool", 0.85, flip=True), "key": _c("tool", 2.2, flip=True), "wrench": _c("tool", 2.4, flip=True),
    "axe": _c("tool", 0.8, flip=True), "shovel": _c("tool", 0.42),
    # food
    "apple": _c("food", 1.0), "banana": _c("food", 2.0, flip=True), "carrot": _c("food", 0.45),
    "mushroom": _c("food", 1.0), "ice cream": _c("food", 0.6, "ice creams"), "cherry": _c("food", 1.0, "cherries",
                                                                                           True),
    "pizza slice": _c("food", 0.95, "pizza slices"),
    # furniture
    "chair": _c("furniture", 0.65, flip=True), "table": _c("furniture", 1.6), "lamp": _c("furniture", 0.6),
    "bed": _c("furniture", 2.0, flip=True), "sofa": _c("furniture", 2.0), "shelf": _c("furniture", 0.7, "shelves"),
    # symbols
    "stop sign": _c("symbol", 0.55), "arrow": _c("symbol", 2.0, flip=True), "star": _c("symbol", 1.05),
    "heart": _c("symbol", 1.1), "moon": _c("symbol", 0.7, flip=True),
    "lightning bolt": _c("symbol", 0.6, flip=True), "cross": _c("symbol", 1.0, "crosses"),
    # household things
    "cup": _c("household item", 1.15, flip=True), "bottle": _c("household item", 0.4),
    "umbrella": _c("household item", 1.0), "bell": _c("household item", 0.9),
    "clock": _c("household item", 0.95),
    # scenery
    "house": _c("scenery", 1.0), "tree": _c("scenery", 0.75), "flower": _c("scenery", 0.6),
    "cloud": _c("scenery", 1.8),
}
CLASS_NAMES: tuple[str, ...] = tuple(CLASSES)
CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(c.category for c in CLASSES.values()))

COUNT_WORDS: tuple[str, ...] = ("", "one", "two", "three", "four")
MAX_COUNT = 4
# relation -> its converse (the same picture described from the other object)
RELATIONS: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SCENES: tuple[str, ...] = ("single", "pair")


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def vocab_json() -> dict:
    """The vocabulary as written into ``world.json`` (names, RGB values, hierarchy)."""
    return {
        "colors": {k: list(v) for k, v in COLORS.items()},
        "patterns": list(PATTERN_NAMES),
        "backgrounds": {k: {"rgb": list(b.rgb), "phrase": b.phrase} for k, b in BACKGROUNDS.items()},
        "classes": {k: {"category": c.category, "plural": c.noun(k, 2)} for k, c in CLASSES.items()},
        "categories": {cat: [k for k, c in CLASSES.items() if c.category == cat] for cat in CATEGORIES},
        "counts": list(range(1, MAX_COUNT + 1)),
        "relations": list(RELATIONS),
    }
