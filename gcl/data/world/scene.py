"""What a world picture shows: scene sampling, the held-out combinations and the split of each sample.

A scene is a plain dict (JSON-able, the single source for the picture and every text field)::

    {"scene": "single" | "pair",
     "objects": [{"label", "color", "pattern", "pattern_color" (None when plain), "count"}, ...],  # 1 or 2
     "relation": None | "left of" | "right of" | "above" | "below",   # pair: objects[0] <relation> objects[1]
     "background": name}

A single scene shows ``count`` (1-4) copies of one object; a pair scene one of each of two different objects
in a spatial relation. Rendering is in ``render``, captions in ``text``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gcl.data.world.vocab import (
    BACKGROUNDS,
    CLASS_NAMES,
    COLOR_NAMES,
    COLORS,
    MAX_COUNT,
    PATTERN_NAMES,
    RELATIONS,
)

# Independent per-sample random streams: changing how one is consumed never shifts another.
S_SCENE, S_IMAGE, S_TEXT = 0, 1, 2
S_SPLIT = 3
S_HELDOUT = 101  # world-level stream (seeded from the seed only)

PAIR_RATE = 0.4  # share of pair scenes
PATTERN_RATE = (0.5, 0.3)  # share of patterned objects in single / pair scenes
COUNT_WEIGHTS = (0.4, 0.2, 0.2, 0.2)  # P(count = 1..4) in single scenes
# Minimum RGB distances that keep the picture readable: pattern colour vs object colour, two objects'
# colours, and the background vs every colour in the scene.
_PATTERN_DIST, _PAIR_DIST, _BG_DIST = 110.0, 80.0, 90.0


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _pick(r: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(r.integers(len(seq)))]


def _dist(a: Sequence[float], b: Sequence[float]) -> float:
    return float(math.dist(a, b))


def _object(r: np.random.Generator, label: str, color: str, pattern_rate: float, avoid: Sequence[str]) -> dict:
    pattern, pcolor = "plain", None
    if r.random() < pattern_rate:
        pattern = _pick(r, PATTERN_NAMES[1:])
        options = [c for c in COLOR_NAMES if c not in avoid and _dist(COLORS[c], COLORS[color]) > _PATTERN_DIST]
        pcolor = _pick(r, options)
    return {"label": label, "color": color, "pattern": pattern, "pattern_color": pcolor, "count": 1}


def _background(r: np.random.Generator, colors: Sequence[str]) -> str:
    rgbs = [COLORS[c] for c in colors]
    ok = [b for b, bg in BACKGROUNDS.items() if all(_dist(bg.rgb, c) > _BG_DIST for c in rgbs)]
    if not ok:  # no background is far from every colour: take the farthest one
        ok = [max(BACKGROUNDS, key=lambda b: min(_dist(BACKGROUNDS[b].rgb, c) for c in rgbs))]
    return _pick(r, ok)


def sample_scene(r: np.random.Generator) -> dict[str, Any]:
    """Draw one scene (see the module docstring) from ``r``."""
    if r.random() < PAIR_RATE:
        a, b = (CLASS_NAMES[int(i)] for i in r.choice(len(CLASS_NAMES), size=2, replace=False))
        ca = _pick(r, COLOR_NAMES)
        cb = _pick(r, [c for c in COLOR_NAMES if _dist(COLORS[c], COLORS[ca]) > _PAIR_DIST])
        objs = [_object(r, a, ca, PATTERN_RATE[1], (cb,)), _object(r, b, cb, PATTERN_RATE[1], (ca,))]
        relation = _pick(r, tuple(RELATIONS))
    else:
        obj = _object(r, _pick(r, CLASS_NAMES), _pick(r, COLOR_NAMES), PATTERN_RATE[0], ())
        obj["count"] = int(r.choice(np.arange(1, MAX_COUNT + 1), p=COUNT_WEIGHTS))
        objs, relation = [obj], None
    colors = [c for o in objs for c in (o["color"], o["pattern_color"]) if c]
    return {"scene": "pair" if relation else "single", "objects": objs, "relation": relation,
            "background": _background(r, colors)}


def heldout_combos(seed: int) -> list[tuple[str, str]]:
    """The (color, label) pairs reserved for ``test_heldout``: one colour per class, spread so every colour is
    held out for at most ceil(48 / 16) = 3 classes and is seen with every other class in training."""
    perm = rng(seed, S_HELDOUT).permutation(len(COLOR_NAMES))
    return [(COLOR_NAMES[int(perm[i % len(perm)])], label) for i, label in enumerate(CLASS_NAMES)]


def is_heldout(scene: dict[str, Any], held: set[tuple[str, str]]) -> bool:
    return any((o["color"], o["label"]) in held for o in scene["objects"])


def split_of(seed: int, index: int, heldout: bool, fractions: Sequence[float]) -> str:
    """The split of sample ``index``: ``test_heldout`` for held-out combinations, else train / val / test by
    a per-sample draw. It depends on (seed, index) only, never on the world's size, so the val / test samples
    of a small world are val / test samples of every larger world with the same seed (no leakage when a
    model pretrained on a big world is evaluated on a small one)."""
    if heldout:
        return "test_heldout"
    u = rng(seed, index, S_SPLIT).random()
    return "train" if u < fractions[0] else ("val" if u < fractions[0] + fractions[1] else "test")
