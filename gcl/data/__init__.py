"""Data: where samples come from, how they are written as shards, and how shards become batches.

    catalog/     the procedural fashion catalog (``python -m gcl.data.synthetic``; ``synthetic`` re-exports it)
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

This file holds ``resolve_splits`` only: the shard patterns per split of a ``data`` config node.
"""
from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)


def resolve_splits(data: Any) -> dict[str, Any]:
    """Shard patterns per split for a ``data`` config node.

    With ``data.train_shards: null`` the synthetic catalog is generated on first use into
    ``data.synthetic.cache_dir`` (atomically; safe when several ranks start together) and its train / val /
    test / test_heldout patterns are returned. Otherwise the configured patterns are returned as given
    (``val``/``test`` may be None).
    """
    if data.train_shards is None:
        from gcl.data.catalog import ensure_catalog

        s = data.synthetic
        root = ensure_catalog(s.cache_dir, products=s.products, seed=s.seed, image_size=s.image_size)
        meta = json.loads((root / "catalog.json").read_text())
        splits: dict[str, Any] = {k: v["pattern"] for k, v in meta["splits"].items()}
        for k in ("val", "test"):
            explicit = data[f"{k}_shards"]
            if explicit is not None:
                splits[k] = explicit
        return splits
    train = data.train_shards
    if not isinstance(train, str):
        train = list(train)
    return {"train": train, "val": data.val_shards, "test": data.test_shards}
