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

The package, by concern:

    attributes   vocabularies, per-product random streams, sample_attributes, held-out combinations
    draw         the canvas and one silhouette drawing per subcategory
    render       materials, patterns, light, background -> render_product
    text         make_texts, noisy_title, make_query
    write        generate_catalog, splits, products.parquet, catalog.json, ensure_catalog, load_catalog

CLI (not here): ``python -m gcl.data.synthetic OUT --products N --seed S [--image-size 64] [--per-shard K]
[--workers W]``; ``gcl.data.synthetic`` also keeps every name it exported before this package existed.
"""
from __future__ import annotations

from gcl.data.catalog.attributes import (
    COLOR_NAMES,
    COLORS,
    DETAILS,
    HIERARCHY,
    MATERIAL_NAMES,
    MATERIALS,
    PATTERN_NAMES,
    PATTERNS,
    SUBCATEGORIES,
    Subcategory,
    heldout_combos,
    sample_attributes,
)
from gcl.data.catalog.render import render_product
from gcl.data.catalog.text import make_query, make_texts, noisy_title
from gcl.data.catalog.write import (
    FLAT_FIELDS,
    FORMAT_VERSION,
    RANK_FIELDS,
    SPLITS,
    catalog_name,
    ensure_catalog,
    generate_catalog,
    load_catalog,
)

__all__ = [
    "COLORS", "COLOR_NAMES", "DETAILS", "FLAT_FIELDS", "FORMAT_VERSION", "HIERARCHY", "MATERIALS",
    "MATERIAL_NAMES", "PATTERNS", "PATTERN_NAMES", "RANK_FIELDS", "SPLITS", "SUBCATEGORIES", "Subcategory",
    "catalog_name", "ensure_catalog", "generate_catalog", "heldout_combos", "load_catalog", "make_query",
    "make_texts", "noisy_title", "render_product", "sample_attributes",
]
