"""The general synthetic world: the pretraining data of the base model and its retention suite.

Not fashion: 48 object classes with distinct silhouettes in 8 super-categories (animals, vehicles, tools,
food, furniture, symbols, household things, scenery), 16 colours, 6 patterns (striped, checked and polka dot
are shared with the fashion catalog, as are the colours), counts 1-4, spatial relations between two objects
("a red cup left of a blue key"), 8 textured backgrounds, and captions in varied forms (a short label, a
sentence, an attribute list).

Splits: ``train`` / ``val`` / ``test`` (iid) and ``test_heldout``: pictures showing a held-out (colour,
class) combination, which never appears in the other splits (compositional generalization).

Everything is a pure function of ``(seed, sample index, arguments)``: the same arguments give the same shard
bytes whatever the worker count, and a sample's split does not depend on the world's size.

Modules: ``vocab`` (names), ``shapes`` (silhouettes), ``scene`` (what a picture shows, held-out combos,
splits), ``render`` (pixels), ``text`` (captions and fields), ``write`` (shards, table, cache, CLI).

CLI: ``python -m gcl.data.world OUT --samples N --seed S [--image-size 64] [--per-shard K] [--workers W]``.
"""
from __future__ import annotations

from gcl.data.world.render import render_scene
from gcl.data.world.scene import heldout_combos, sample_scene, split_of
from gcl.data.world.text import make_texts
from gcl.data.world.vocab import (
    BACKGROUNDS,
    CATEGORIES,
    CLASS_NAMES,
    CLASSES,
    COLOR_NAMES,
    COLORS,
    PATTERN_NAMES,
    RELATIONS,
)
from gcl.data.world.write import (
    FIELDS,
    FORMAT_VERSION,
    SPLITS,
    ensure_world,
    generate_world,
    load_world,
    main,
    world_name,
)

__all__ = [
    "BACKGROUNDS", "CATEGORIES", "CLASS_NAMES", "CLASSES", "COLOR_NAMES", "COLORS", "FIELDS", "FORMAT_VERSION",
    "PATTERN_NAMES", "RELATIONS", "SPLITS", "ensure_world", "generate_world", "heldout_combos", "load_world",
    "main", "make_texts", "render_scene", "sample_scene", "split_of", "world_name",
]
