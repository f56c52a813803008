"""Data: the synthetic catalog, table -> shard preparation, and the streaming pipeline."""
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
