"""What the two generated datasets (the world, ``gcl.data.world``; the fashion catalog, ``gcl.data.catalog``)
share: the checks of their common arguments, a fresh output folder, samples built in index order (in
spawned worker processes when asked), one shard folder per split written with a fixed tar mtime, the
``splits`` metadata (brace patterns, counts) and its re-resolution after a move, the progress bar, and the
pixel grid both renderers start from.

The bytes of a generated dataset depend on its arguments only (never on the worker count or the wall clock);
everything here keeps that. Not here: what a sample is and how it is drawn (each generator's own modules),
the build-on-first-use cache (``gcl.data.cache``), the tar format (``gcl.data.shards.ShardWriter``).
"""
from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from gcl.data.shards import ShardWriter

T = TypeVar("T")
R = TypeVar("R")

TAR_MTIME = 946684800.0  # 2000-01-01T00:00:00Z: shard bytes never depend on the wall clock


def check_common_args(count_name: str, count: int, seed: int, image_size: int, per_shard: int,
                      splits: Sequence[float]) -> tuple[float, float, float]:
    """The arguments both generators take: a ValueError naming the first bad one; returns the split fractions
    (train, val, test). ``count_name`` is the generator's word for its size (``samples``, ``products``)."""
    if int(count) != count or count < 1:
        raise ValueError(f"{count_name} must be a positive integer, got {count!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 px, got {image_size}")
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    sp = tuple(float(x) for x in splits)
    if len(sp) != 3 or any(x < 0 for x in sp) or abs(sum(sp) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test) summing to 1, "
                         f"got {splits!r}")
    return sp  # type: ignore[return-value]


def fresh_output_dir(out: Path) -> None:
    """Create ``out``; refuse one that already holds files (a generator never mixes with older output)."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new output directory or delete this one")
    out.mkdir(parents=True, exist_ok=True)


def split_pattern(root: Path, split: str, n_shards: int) -> str | None:
    """The brace pattern of a split's ``n_shards`` shards under ``root`` (None when the split is empty)."""
    if n_shards == 0:
        return None
    if n_shards == 1:
        return str(root / split / "shard-000000.tar")
    return str(root / split / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def split_info(root: Path, splits: Sequence[str], sizes: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """The ``splits`` entry of a generated dataset's metadata file: per split its absolute and relative brace
    patterns (None when empty), sample and shard counts. ``sizes``: split -> its ``sizes.json`` content."""
    return {s: {"pattern": split_pattern(root, s, len(sizes[s])), "relpattern": split_pattern(Path("."), s, len(sizes[s])),
                "count": int(sum(sizes[s].values())), "shards": len(sizes[s])} for s in splits}


def resolve_patterns(meta: dict[str, Any], root: Path) -> dict[str, Any]:
    """``meta`` (read from a metadata file) with each split's ``pattern`` re-resolved against ``root`` from its
    ``relpattern``, so a moved dataset still works."""
    for info in meta["splits"].values():
        rel = info.get("relpattern")
        info["pattern"] = str(root / rel) if rel else None
    return meta


def ordered_map(fn: Callable[[T], R], tasks: Iterable[T], workers: int, chunksize: int,
                stack: contextlib.ExitStack) -> Iterator[R]:
    """``fn`` over ``tasks`` in task order: in this process, or in ``workers`` (> 1) spawned processes whose
    pool ``stack`` closes. spawn: safe under threads / CUDA in the parent (the trainer); imap keeps the order,
    so the worker count never changes the output."""
    if workers > 1:
        pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
        return pool.imap(fn, tasks, chunksize=chunksize)
    return map(fn, tasks)


@contextlib.contextmanager
def progress_bar(progress: bool, total: int, unit: str, desc: str) -> Iterator[Any]:
    """A tqdm bar when ``progress`` (closed on exit), else None."""
    if not progress:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


class SplitShards:
    """One :class:`ShardWriter` per split under ``out`` (``out/<split>/shard-%06d.tar`` + ``sizes.json``),
    with the fixed tar mtime. As a context manager: every split is closed on success (``sizes`` then maps
    split -> its ``sizes.json`` content); on an error every shard written so far is removed."""

    def __init__(self, out: Path, splits: Sequence[str], per_shard: int) -> None:
        self.per_shard = per_shard
        self.writers = {s: ShardWriter(out / s, per_shard=per_shard, mtime=TAR_MTIME) for s in splits}
        self.sizes: dict[str, dict[str, int]] = {}

    def write(self, split: str, key: str, jpg: bytes, fields: dict[str, Any]) -> str:
        """Write one JPEG sample to ``split``; returns its shard's path relative to ``out``."""
        writer = self.writers[split]
        shard = f"{split}/shard-{writer.total // self.per_shard:06d}.tar"
        writer.write(key, jpg, "jpg", fields)
        return shard

    def __enter__(self) -> SplitShards:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.sizes = {s: w.close() for s, w in self.writers.items()}
                return
            except BaseException:
                self._abort()
                raise
        self._abort()

    def _abort(self) -> None:
        for w in self.writers.values():
            w.abort()


@lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only ``(yy, xx)`` float32 pixel coordinates of a ``size`` x ``size`` canvas (cached: every
    picture of a dataset has the same size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx
