"""The shard schema shared by every writer and reader.

A sample is ``<key>.<jpg|png|webp>`` + ``<key>.json`` (the product's fields) + ``<key>.txt`` (the title, so
OpenCLIP's trainer reads the same shards). ``sizes.json`` in the shard folder maps shard file name -> count.
"""
from __future__ import annotations

import hashlib
import re

TEXT_FIELDS: tuple[str, ...] = (
    "title", "description", "colors", "materials", "categories", "details", "keywords",
)
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
# Keys become file-name stems inside tar files; webdataset splits the extension at the first dot.
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key (no dots, no slashes), else raise ValueError."""
    if not _KEY_OK.match(key):
        raise ValueError(f"invalid sample key {key!r}: use letters, digits, '_' and '-' only (no dots)")
    return key


def stable_hash(text: str) -> int:
    """A process-independent 63-bit positive hash of ``text`` (Python's ``hash`` is salted per process).

    Used to compare field values and item ids across workers and ranks; 0 is reserved for "missing".
    """
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return (h & 0x7FFF_FFFF_FFFF_FFFF) or 1
