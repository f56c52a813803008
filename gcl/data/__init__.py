"""Data: where samples come from, how they are written as shards, and how shards become batches.

    catalog/     the procedural fashion catalog (``python -m gcl.data.synthetic``; ``synthetic`` re-exports it)
    world/       the general world the base model is pretrained on (``python -m gcl.data.world``)
    prepare      a user table (+ images) -> shards: options, row mapping, workers, report, CLI
    read         reading that table and its images: formats, rows, columns, cell values, image re-encoding
    image        decoding an image into RGB the same way on every path (orientation, transparency, 16-bit, CMYK)
    download     a table whose images are URLs -> shards: HTTP fetch, failure reasons, resumable chunks, CLI
    hf           Hugging Face dataset copies (folder / HF cache): splits, Marqo's columns, CLI (via prepare)
    schema       the shard schema: text fields, image extensions, sample keys, ``stable_hash``
    shards       shard files: ``ShardWriter``, ``expand_urls`` (object-store URLs checked via ``gcl.storage``),
                 ``shard_sizes``, reading a shard's raw samples
    survey       which fields the first samples carry (the trainer's start-of-run loss field check)
    batch        raw sample -> decoded sample -> the batch dict (shared by training and evaluation)
    stream       the resumable training stream (``build_train_stream``, ``TrainStream``)
    eval_loader  one ordered pass for evaluation (``build_eval_loader``)

This file holds ``resolve_splits`` and ``builtin_splits`` only: the shard patterns per split of a ``data`` config
node and of a generated dataset (``data.builtin``: ``synthetic`` or ``world``).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

# The generated datasets a config can name: data.builtin, and "<name>/<split>" in eval tasks.
BUILTINS: tuple[str, ...] = ("synthetic", "world")


def builtin_splits(data: Any, name: str) -> dict[str, str | None]:
    """Shard pattern per split (train / val / test / test_heldout) of the generated dataset ``name``, built on
    first use into its cache dir (atomically; safe when several ranks start together)."""
    if name == "synthetic":
        from gcl.data.catalog import ensure_catalog

        s = data.synthetic
        root = ensure_catalog(s.cache_dir, products=s.products, seed=s.seed, image_size=s.image_size)
        meta = json.loads((root / "catalog.json").read_text())
    elif name == "world":
        from gcl.data.world import ensure_world, load_world

        w = data.world
        meta = load_world(ensure_world(w.cache_dir, samples=w.samples, seed=w.seed, image_size=w.image_size,
                                       workers=w.workers))
    else:
        raise ValueError(f"unknown generated dataset {name!r}; use one of {', '.join(BUILTINS)}")
    return {k: v["pattern"] for k, v in meta["splits"].items()}


def resolve_splits(data: Any, extra: Iterable[str] = ()) -> dict[str, Any]:
    """Shard patterns per split for a ``data`` config node.

    With ``data.train_shards: null`` the generated dataset ``data.builtin`` (the fashion catalog
    ``synthetic``, or the ``world``) is built on first use into its cache dir and its train / val / test /
    test_heldout patterns are returned (explicit ``val_shards`` / ``test_shards`` win). Otherwise the
    configured patterns are returned as given (``val``/``test`` may be None).

    ``extra`` names further splits wanted (the eval tasks' ``split`` values); a prefixed one,
    ``"<dataset>/<split>"`` (e.g. ``world/test``), is a split of that generated dataset whatever the training
    data, built on first use. Plain names are left to the caller (a missing one is its error to report).
    """
    if data.train_shards is None:
        splits: dict[str, Any] = dict(builtin_splits(data, data.builtin))
        for k in ("val", "test"):
            explicit = data[f"{k}_shards"]
            if explicit is not None:
                splits[k] = explicit
    else:
        train = data.train_shards
        if not isinstance(train, str):
            train = list(train)
        splits = {"train": train, "val": data.val_shards, "test": data.test_shards}
    for name in dict.fromkeys(extra):
        prefix, sep, _ = name.partition("/")
        if sep and name not in splits:
            splits.update({f"{prefix}/{k}": v for k, v in builtin_splits(data, prefix).items()})
    return splits
