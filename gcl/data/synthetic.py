"""A procedural fashion catalog: the built-in dataset for demos, tests and benchmarks.

This module is the command line, ``python -m gcl.data.synthetic OUT --products N --seed S [--image-size 64]
[--per-shard K] [--workers W]``, and the import path that existed before the catalog became a package: every
name it defined is re-exported here from ``gcl.data.catalog`` (attributes, draw, render, text, write), where
the code and its description live, or from ``gcl.data.cache`` / ``gcl.data.generated`` for the few pieces the
catalog now shares with the world. New code imports from ``gcl.data.catalog``.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

# Re-exports (public and private) so that existing importers keep working.
from gcl.data.cache import file_lock as _file_lock  # noqa: F401
from gcl.data.catalog.attributes import (  # noqa: F401
    _ACCENT_DETAILS,
    _PARENT_NOUN,
    _PATTERNABLE,
    _S_ATTR,
    _S_HELDOUT,
    _S_IMAGE,
    _S_MISSING,
    _S_QUERY,
    _S_SPLIT,
    _S_TEXT,
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
    _dist,
    _pick,
    _rng,
    heldout_combos,
    sample_attributes,
)
from gcl.data.catalog.draw import (  # noqa: F401
    _DRAW,
    _Canvas,
    _draw_backpack,
    _draw_boot,
    _draw_bottoms,
    _draw_cap,
    _draw_dress,
    _draw_handbag,
    _draw_hat,
    _draw_heel,
    _draw_scarf,
    _draw_sneaker,
    _draw_top,
    _draw_tote,
)
from gcl.data.catalog.render import (  # noqa: F401
    _BACKGROUNDS,
    _METAL,
    TAU,
    _grid,
    _lum,
    _material_gain,
    _mix,
    _pattern_cover,
    _smooth_noise,
    _tones,
    render_product,
)
from gcl.data.catalog.text import (  # noqa: F401
    _QUERY_WEIGHTS,
    _join,
    _noun,
    _season,
    _style,
    _title_case,
    make_query,
    make_texts,
    noisy_title,
)
from gcl.data.catalog.write import (  # noqa: F401
    _JPEG_QUALITY,
    FLAT_FIELDS,
    FORMAT_VERSION,
    RANK_FIELDS,
    SPLITS,
    _assign_splits,
    _build,
    _build_star,
    _check_args,
    _item_id,
    _Job,
    _rank_rows,
    _vocab,
    _write_table,
    catalog_name,
    ensure_catalog,
    generate_catalog,
    load_catalog,
)
from gcl.data.generated import TAR_MTIME as _TAR_MTIME  # noqa: F401
from gcl.data.generated import split_pattern as _pattern  # noqa: F401

log = logging.getLogger(__name__)


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
