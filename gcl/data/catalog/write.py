"""Writing the catalog: products -> JPEG + JSON samples in split shards, ``products.parquet`` and
``catalog.json``; and finding it again (``load_catalog``, ``ensure_catalog``'s cache under a name that
hashes every argument that changes bytes).

Lives here: the per-product build (image bytes, text fields, missing values, noisy titles, ranking rows),
the split assignment, ``generate_catalog``, the Parquet table, ``catalog.json``, ``catalog_name``,
``ensure_catalog`` and ``load_catalog``.

Not here: what a product is (``attributes``), its picture (``draw``, ``render``) and its words (``text``);
what the world and the catalog share for writing (``gcl.data.generated``: output folder, ordered worker pool,
split shards, patterns); the locked, atomic, race-tolerant cache folder (``gcl.data.cache.build_once``); the
tar format (``gcl.data.shards.ShardWriter``); the CLI (``gcl.data.synthetic``).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gcl.data.cache import build_once
from gcl.data.catalog.attributes import (
    _S_ATTR,
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
    PATTERN_NAMES,
    SUBCATEGORIES,
    _pick,
    _rng,
    heldout_combos,
    sample_attributes,
)
from gcl.data.catalog.render import render_product
from gcl.data.catalog.text import make_query, make_texts, noisy_title
from gcl.data.generated import (
    SplitShards,
    check_common_args,
    fresh_output_dir,
    ordered_map,
    progress_bar,
    resolve_patterns,
    split_info,
)
from gcl.data.schema import TEXT_FIELDS

# Records keep the logger name they had before this code moved here from gcl.data.synthetic.
log = logging.getLogger("gcl.data.synthetic")

# Bump when the generator's output changes for the same arguments: it is part of the ensure_catalog cache key.
FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test", "test_heldout")
FLAT_FIELDS: tuple[str, ...] = ("item_id", "category", "subcategory", "color", "material", "pattern")
RANK_FIELDS: tuple[str, ...] = ("query", "score", "position")
_JPEG_QUALITY = 92

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
    sp = check_common_args("products", products, seed, image_size, per_shard, splits)
    for name, r in (("missing_rate", missing_rate), ("noisy_title_rate", noisy_title_rate)):
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return sp


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
    fresh_output_dir(out)
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
    rows, sizes = _write_shards(out, job, attrs, split_of, ranks, per_shard, workers, progress)
    _write_table(out / "products.parquet", rows, with_queries)

    args = {"products": products, "seed": seed, "image_size": image_size, "per_shard": per_shard,
            "splits": list(fractions), "missing_rate": missing_rate, "noisy_title_rate": noisy_title_rate,
            "with_queries": with_queries}
    catalog = _catalog_json(args, attrs, held, split_info(root, SPLITS, sizes))
    tmp = out / "catalog.json.tmp"
    tmp.write_text(json.dumps(catalog, indent=1, ensure_ascii=False))
    os.replace(tmp, out / "catalog.json")
    log.debug("synthetic catalog: %d products in %.1fs -> %s", products, time.perf_counter() - t0, out)
    return catalog


def _write_shards(out: Path, job: _Job, attrs: list[dict[str, Any]], split_of: list[str],
                  ranks: list[tuple[str, int, int]] | None, per_shard: int, workers: int, progress: bool
                  ) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Build every product (in ``workers`` processes when > 1) and write it to its split's shards, in index
    order. Returns the table rows and each split's ``sizes.json`` content."""
    products = len(attrs)
    tasks = ((job, i, attrs[i], ranks[i] if ranks else None) for i in range(products))
    rows: list[dict[str, Any]] = []
    # Workers import only numpy + PIL (and the catalog's own modules).
    with SplitShards(out, SPLITS, per_shard) as shards, contextlib.ExitStack() as stack, \
            progress_bar(progress, products, "product", "synthetic catalog") as bar:
        for i, (jpg, fields) in enumerate(ordered_map(_build_star, tasks, workers, 16, stack)):
            s = split_of[i]
            key = fields["item_id"]
            shard = shards.write(s, key, jpg, fields)
            row = {k: fields.get(k) for k in (*FLAT_FIELDS, *TEXT_FIELDS, *RANK_FIELDS)}
            row.update(split=s, shard=shard, key=key, secondary_color=attrs[i]["secondary_color"])
            rows.append(row)
            if bar is not None:
                bar.update(1)
    return rows, shards.sizes


def _catalog_json(args: dict[str, Any], attrs: list[dict[str, Any]], held: list[tuple[str, str]],
                  split_info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The content of ``catalog.json`` (key order is part of the file's bytes)."""
    products, seed, image_size = args["products"], args["seed"], args["image_size"]
    counts = {"products": products, "splits": {s: split_info[s]["count"] for s in SPLITS},
              "subcategories": {c: 0 for c in SUBCATEGORIES}, "colors": {c: 0 for c in COLOR_NAMES}}
    for a in attrs:
        counts["subcategories"][a["subcategory"]] += 1
        counts["colors"][a["color"]] += 1
    return {
        "format_version": FORMAT_VERSION,
        "generator": "gcl.data.synthetic",
        "seed": seed,
        "products": products,
        "image_size": image_size,
        "image_ext": "jpg",
        "args": args,
        "fields": {"text": list(TEXT_FIELDS), "flat": list(FLAT_FIELDS),
                   "ranking": list(RANK_FIELDS) if args["with_queries"] else []},
        "vocab": _vocab(),
        "heldout_key": ["color", "subcategory"],
        "heldout_combos": [{"color": c, "subcategory": s} for c, s in held],
        "splits": split_info,
        "counts": counts,
        "table": "products.parquet",
    }


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
    return resolve_patterns(json.loads(path.read_text()), root)


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

    def build(tmp: Path, final: Path) -> None:
        log.info("generating synthetic catalog (%d products, seed %d, %d px) into %s", products, seed,
                 image_size, final)
        generate_catalog(tmp, products, seed=seed, image_size=image_size, per_shard=per_shard, splits=splits,
                         missing_rate=missing_rate, noisy_title_rate=noisy_title_rate,
                         with_queries=with_queries, workers=workers, progress=progress, _final_dir=final)

    name = catalog_name(products, seed, image_size, per_shard, splits, missing_rate, noisy_title_rate, with_queries)
    return build_once(cache_dir, name, "catalog.json", build)
