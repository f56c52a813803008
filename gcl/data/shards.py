"""Atomic webdataset shard writing with ``sizes.json``, shared by the synthetic catalog and ``prepare``."""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

from gcl.data.schema import IMAGE_EXTS, check_key


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Write samples into ``<prefix>-%06d.tar`` shards of at most ``per_shard`` samples.

    Each shard is written to a temporary name and renamed when complete, and ``sizes.json`` is written
    atomically on ``close()``, so a crash never leaves a shard that looks complete but is not.

    Use as a context manager; ``write(key, image_bytes, image_ext, fields)`` adds one sample with
    ``<key>.<ext>``, ``<key>.json`` (``fields``) and ``<key>.txt`` (the title when present).
    """

    def __init__(self, out_dir: str | os.PathLike, per_shard: int = 1000, prefix: str = "shard",
                 mtime: float | None = None) -> None:
        if per_shard < 1:
            raise ValueError(f"per_shard must be >= 1, got {per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.per_shard = per_shard
        self.prefix = prefix
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._count = 0
        self._keys: set[str] = set()
        # a fixed mtime makes shard bytes reproducible (the synthetic catalog is byte-identical per seed)
        self._mtime = time.time() if mtime is None else mtime

    @property
    def total(self) -> int:
        return sum(self.sizes.values()) + self._count

    def _open(self) -> None:
        self._name = f"{self.prefix}-{len(self.sizes):06d}.tar"
        self._tar = tarfile.open(self.out_dir / (self._name + ".tmp"), "w")
        self._count = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self.out_dir / (self._name + ".tmp"), self.out_dir / self._name)
        self.sizes[self._name] = self._count
        self._tar = None
        self._count = 0

    def write(self, key: str, image: bytes, image_ext: str, fields: dict[str, Any]) -> None:
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        ext = image_ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image extension {image_ext!r} not in {IMAGE_EXTS}")
        if self._tar is None:
            self._open()
        self._keys.add(key)
        _add(self._tar, f"{key}.{ext}", image, self._mtime)
        _add(self._tar, f"{key}.json", json.dumps(fields, ensure_ascii=False).encode("utf-8"), self._mtime)
        title = fields.get("title")
        if isinstance(title, str) and title:
            _add(self._tar, f"{key}.txt", title.encode("utf-8"), self._mtime)
        self._count += 1
        if self._count >= self.per_shard:
            self._finish()

    def close(self) -> dict[str, int]:
        """Finish the open shard and write ``sizes.json`` atomically; returns the sizes."""
        self._finish()
        tmp = self.out_dir / "sizes.json.tmp"
        tmp.write_text(json.dumps(self.sizes, indent=1))
        os.replace(tmp, self.out_dir / "sizes.json")
        return self.sizes

    def abort(self) -> None:
        """Delete the shard in progress and every finished shard of this writer (a failed run leaves nothing)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        (self.out_dir / (self._name + ".tmp")).unlink(missing_ok=True)
        for name in self.sizes:
            (self.out_dir / name).unlink(missing_ok=True)
        self.sizes.clear()

    def shard_pattern(self) -> str:
        """Brace pattern covering every shard written, e.g. ``dir/shard-{000000..000003}.tar``."""
        n = len(self.sizes)
        if n == 1:
            return str(self.out_dir / f"{self.prefix}-000000.tar")
        return str(self.out_dir / f"{self.prefix}-{{000000..{n - 1:06d}}}.tar")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # keep finished shards (the caller may abort()); drop the partial one
            self._tar.close()
            self._tar = None
            (self.out_dir / (self._name + ".tmp")).unlink(missing_ok=True)
