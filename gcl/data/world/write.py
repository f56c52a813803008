"""Writing a world: shards per split, the table and ``world.json``; the build-on-first-use cache; the CLI.

Layout written by :func:`generate_world`::

    OUT/world.json                    vocabulary, held-out combinations, counts, arguments, splits
    OUT/world.parquet                 one row per sample (every field, split, shard; no image bytes)
    OUT/<split>/shard-%06d.tar        webdataset shards (<key>.jpg, <key>.json, <key>.txt) + sizes.json

Output bytes depend on the arguments other than ``workers`` / ``progress`` only.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcl.data.cache import build_once
from gcl.data.generated import (
    SplitShards,
    check_common_args,
    fresh_output_dir,
    ordered_map,
    progress_bar,
    resolve_patterns,
    split_info,
)
from gcl.data.world import scene as sc
from gcl.data.world.render import render_scene
from gcl.data.world.text import make_texts
from gcl.data.world.vocab import vocab_json

log = logging.getLogger(__name__)

# Bump when the generator's output changes for the same arguments: it is part of the cache folder name.
FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test", "test_heldout")
META = "world.json"
TABLE = "world.parquet"
# Fields every sample has (pair scenes and patterned objects add theirs, see gcl.data.world.text.make_texts).
FIELDS: tuple[str, ...] = ("item_id", "title", "sentence", "caption", "caption_form", "scene", "label", "category",
                           "color", "pattern", "count", "background")
OPTIONAL_FIELDS: tuple[str, ...] = ("pattern_color", "single_label", "single_color", "relation", "label2", "color2",
                                    "pattern2", "pattern_color2")
_JPEG_QUALITY = 92


@dataclass(frozen=True)
class _Job:
    seed: int
    image_size: int
    fractions: tuple[float, float, float]
    held: frozenset[tuple[str, str]]


def _build(job: _Job, index: int) -> tuple[str, bytes, dict[str, str]]:
    """(split, JPEG bytes, JSON fields) of sample ``index``: a pure function of its arguments."""
    scene = sc.sample_scene(sc.rng(job.seed, index, sc.S_SCENE))
    split = sc.split_of(job.seed, index, sc.is_heldout(scene, job.held), job.fractions)
    img = render_scene(scene, job.image_size, sc.rng(job.seed, index, sc.S_IMAGE))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps thin coloured details
    fields = {"item_id": f"w{index:07d}", **make_texts(scene, sc.rng(job.seed, index, sc.S_TEXT))}
    return split, buf.getvalue(), fields


def _build_star(args: tuple[_Job, int]) -> tuple[str, bytes, dict[str, str]]:
    return _build(*args)


def check_args(samples: int, seed: int, image_size: int, per_shard: int, splits: Sequence[float],
               workers: int = 1) -> tuple[float, float, float]:
    fractions = check_common_args("samples", samples, seed, image_size, per_shard, splits)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return fractions


def generate_world(out_dir: str | os.PathLike, samples: int, seed: int = 0, image_size: int = 64,
                   per_shard: int = 1000, splits: Sequence[float] = (0.8, 0.1, 0.1), workers: int = 1,
                   progress: bool = False, _final_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write a world of ``samples`` pictures into ``out_dir`` (created; must not already hold files).

    Returns the content of ``world.json``: ``splits[name] = {"pattern": absolute brace pattern or None when
    empty, "relpattern", "count", "shards"}`` for train / val / test / test_heldout, plus ``vocab``,
    ``heldout_combos``, ``counts``, ``args``, ``fields``, ``format_version``.
    """
    fractions = check_args(samples, seed, image_size, per_shard, splits, workers)
    out = Path(out_dir)
    fresh_output_dir(out)
    root = Path(_final_dir if _final_dir is not None else out).resolve()
    t0 = time.perf_counter()
    held = sc.heldout_combos(seed)
    job = _Job(seed, image_size, fractions, frozenset(held))
    rows: list[dict[str, Any]] = []
    tasks = ((job, i) for i in range(samples))
    with SplitShards(out, SPLITS, per_shard) as shards, contextlib.ExitStack() as stack, \
            progress_bar(progress, samples, "sample", "world") as bar:
        for split, jpg, fields in ordered_map(_build_star, tasks, workers, 32, stack):
            shard = shards.write(split, fields["item_id"], jpg, fields)
            rows.append({**fields, "key": fields["item_id"], "split": split, "shard": shard})
            if bar is not None:
                bar.update(1)
    _write_table(out / TABLE, rows)
    meta = _meta(root, seed, samples, image_size, per_shard, fractions, held, shards.sizes, rows)
    tmp = out / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    os.replace(tmp, out / META)
    log.debug("world: %d samples in %.1fs -> %s", samples, time.perf_counter() - t0, out)
    return meta


def _meta(root: Path, seed: int, samples: int, image_size: int, per_shard: int, fractions: Sequence[float],
          held: list[tuple[str, str]], sizes: dict[str, dict[str, int]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    splits = split_info(root, SPLITS, sizes)
    counts = {"samples": samples, "splits": {s: splits[s]["count"] for s in SPLITS}}
    for f in ("label", "color", "scene", "count", "background", "pattern", "caption_form"):
        counts[f] = dict(sorted(Counter(r[f] for r in rows).items()))
    return {
        "format_version": FORMAT_VERSION, "generator": "gcl.data.world", "seed": seed, "samples": samples,
        "image_size": image_size, "image_ext": "jpg",
        "args": {"samples": samples, "seed": seed, "image_size": image_size, "per_shard": per_shard,
                 "splits": list(fractions)},
        "fields": {"always": list(FIELDS), "optional": list(OPTIONAL_FIELDS)},
        "vocab": vocab_json(),
        "heldout_key": ["color", "label"],
        "heldout_combos": [{"color": c, "label": lab} for c, lab in held],
        "splits": splits, "counts": counts, "table": TABLE,
    }


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ("item_id", "key", "split", "shard", *FIELDS[1:], *OPTIONAL_FIELDS)
    schema = pa.schema([(n, pa.string()) for n in names])
    table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows], schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def load_world(world_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``world.json`` with split patterns re-resolved against ``world_dir`` (a moved world still works)."""
    root = Path(world_dir).resolve()
    path = root / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: generate the world with generate_world() or "
                                f"`python -m gcl.data.world {root} --samples N`")
    return resolve_patterns(json.loads(path.read_text()), root)


def world_name(samples: int, seed: int, image_size: int, per_shard: int = 1000,
               splits: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """The cache folder name of a world: readable parameters + a hash of everything that changes bytes."""
    key = json.dumps([FORMAT_VERSION, samples, seed, image_size, per_shard, [float(x) for x in splits]])
    h = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"world-v{FORMAT_VERSION}-n{samples}-s{seed}-{image_size}px-{h}"


def ensure_world(cache_dir: str | os.PathLike, samples: int, seed: int = 0, image_size: int = 64,
                 per_shard: int = 1000, splits: Sequence[float] = (0.8, 0.1, 0.1), workers: int = 1,
                 progress: bool = False) -> Path:
    """The world folder for these arguments under ``cache_dir``, generated on first use (see
    :func:`gcl.data.cache.build_once`: safe for concurrent callers, never half-written)."""
    check_args(samples, seed, image_size, per_shard, splits, workers)

    def build(tmp: Path, final: Path) -> None:
        log.info("generating the world (%d samples, seed %d, %d px) into %s", samples, seed, image_size, final)
        generate_world(tmp, samples, seed=seed, image_size=image_size, per_shard=per_shard, splits=splits,
                       workers=workers, progress=progress, _final_dir=final)

    return build_once(cache_dir, world_name(samples, seed, image_size, per_shard, splits), META, build)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m gcl.data.world",
                                description="Write the general synthetic world (gcl.data.world) as webdataset shards.")
    p.add_argument("out", help="output folder (created; must be empty)")
    p.add_argument("--samples", type=int, required=True, help="number of pictures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="square image side in px (default 64)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--splits", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes rendering pictures (the output is identical for any count)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    meta = generate_world(a.out, a.samples, seed=a.seed, image_size=a.image_size, per_shard=a.per_shard,
                          splits=a.splits, workers=a.workers, progress=True)
    dt = time.perf_counter() - t0
    counts = ", ".join(f"{s} {meta['splits'][s]['count']}" for s in SPLITS)
    log.info("wrote %d samples (%s) to %s in %.1fs (%.0f samples/s, %d workers)", a.samples, counts, a.out, dt,
             a.samples / dt, a.workers)
    return meta
