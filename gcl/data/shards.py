"""Webdataset shard files: writing them atomically with ``sizes.json``, naming them (URL patterns), and
reading one shard's raw samples.

Lives here: ``ShardWriter`` (used by the synthetic catalog and ``prepare``), ``expand_urls`` (brace patterns,
'::' lists, local folders and globs, ``pipe:`` and object-store URLs -> the list of shard URLs; a pattern
that matches nothing says what it found), ``is_empty_shard``, ``shard_sizes`` (sample counts from
``sizes.json``, or counted from local tar headers), ``_open_url`` and ``_iter_shard`` (a shard's raw
``{"__key__", "__url__", ext: bytes}`` samples, damaged parts skipped and reported, a truncated shard named).

Not here: decoding samples and making batches (``gcl.data.batch``), the training stream and the eval loader
(``gcl.data.stream``, ``gcl.data.eval_loader``), the sample schema (``gcl.data.schema``).

webdataset is imported inside the reading functions only: it imports torch, which the writers (catalog
worker processes, ``prepare``) do not need.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gcl import storage
from gcl.data.schema import IMAGE_EXTS, check_key

# Records keep the logger name they had before shard reading moved here from gcl.data.stream.
logger = logging.getLogger("gcl.data.stream")


# -------------------------------------------------------------------------------------------- writing

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


# ------------------------------------------------------------------------------------- URLs and reading

def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file") and not url.startswith("pipe:")


def _is_object_store(url: str) -> bool:
    return storage.is_remote(url) and urlparse(url).scheme not in ("http", "https")


def _no_shards_here(pattern: str, path: str) -> FileNotFoundError:
    """What a local pattern that matches no shard file actually found, and which path to give instead."""
    if not os.path.isdir(path):
        return FileNotFoundError(
            f"shard pattern {pattern!r} matches nothing ({path!r} does not exist); check the path/brace range, "
            "or generate the data first (python -m gcl.data.synthetic)")
    subs = {d: len(glob.glob(os.path.join(path, d, "*.tar"))) for d in sorted(os.listdir(path))
            if os.path.isdir(os.path.join(path, d))}
    subs = {d: n for d, n in subs.items() if n}
    if not subs:
        return FileNotFoundError(f"{path!r} is a folder with no .tar shards in it or in its subfolders; give the "
                                 "folder (or a pattern) of the .tar files")
    found = ", ".join(f"{d}/ ({n} .tar)" for d, n in subs.items())
    keys = {"train": "data.train_shards", "val": "data.val_shards", "test": "data.test_shards"}
    give = " ".join(f"{k}={os.path.join(path, d)}" for d, k in keys.items() if d in subs) or \
        f"the subfolder, e.g. {os.path.join(path, next(iter(subs)))}"
    return FileNotFoundError(f"{path!r} holds no .tar shards itself, but its subfolders do: {found}; give the "
                             f"subfolder: {give}")


def _expand_one(pattern: str) -> list[str]:
    """Brace-expand one pattern; glob / list a folder and check existence for local paths and object-store
    URLs (``s3://b/shards/``, ``s3://b/shards/*.tar``: listed; a missing bucket, shard or credential fails now,
    naming the URL and the fix)."""
    from webdataset.shardlists import expand_urls as _wds_expand_urls

    out: list[str] = []
    remote: list[str] = []
    for url in _wds_expand_urls(pattern):  # splits on '::', expands ${WDS_*} and braces
        if _is_object_store(url):
            listed = storage.list_files(url) if url.endswith("/") or any(c in url for c in "*?[") else [url]
            remote.extend(listed)
            out.extend(listed)
            continue
        if not _is_local(url):
            out.append(url)  # pipe:, http(s)://: cannot be checked cheaply
            continue
        path = urlparse(url).path if url.startswith("file:") else url
        if any(c in path for c in "*?["):
            found = sorted(glob.glob(path))
        elif os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "*.tar")))
        else:
            found = [path] if os.path.isfile(path) else []
        if not found:
            raise _no_shards_here(pattern, path)
        out.extend(found)
    if remote:
        storage.check_shards(remote)
    return out


def is_empty_shard(url: str) -> bool:
    """True for a local shard that holds no member at all (a 0-byte file, or a tar whose first block is the
    end-of-archive marker). Only the first 512 bytes are read; remote URLs are never called empty."""
    if not _is_local(url):
        return False
    path = urlparse(url).path if url.startswith("file:") else url
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False  # unreadable: reported (and counted) when it is read
    return not head.strip(b"\0")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """All shard URLs of ``urls`` in order: brace patterns (``dir/shard-{000000..000009}.tar``), '::'-joined
    patterns, local directories (their ``*.tar``), local globs, ``pipe:CMD`` and fsspec URLs (``s3://...``,
    including a prefix ending in ``/`` or a glob, which are listed).

    Raises FileNotFoundError naming the pattern when a local path matches nothing, ``gcl.storage.StorageError``
    (URL, server and fix) when an object-store URL cannot be read, ValueError when empty.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out = [u for p in patterns for u in _expand_one(p)]
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}; pass a brace pattern such as 'dir/shard-{{000000..000009}}.tar'")
    return out


# ------------------------------------------------------------------------------------------ shard sizes

SIZES = "sizes.json"


def _sizes_location(url: str) -> tuple[str, str, bool] | None:
    """(where the ``sizes.json`` beside ``url`` is, the shard's name in it, local?); None for ``pipe:`` URLs."""
    if url.startswith("pipe:"):
        return None
    if _is_local(url):
        path = urlparse(url).path if url.startswith("file:") else url
        return os.path.join(os.path.dirname(path), SIZES), os.path.basename(path), True
    head, _, name = url.rpartition("/")
    return f"{head}/{SIZES}", name, False


def _read_sizes(location: str, local: bool) -> dict[str, int] | None:
    """The mapping in one ``sizes.json``: {} when a local one does not exist, None when a remote one cannot be
    read. A file that exists but is not a {shard name: count >= 0} object raises ValueError naming it."""
    try:
        if local:
            if not os.path.isfile(location):
                return {}
            text = Path(location).read_text(encoding="utf-8")
        else:
            with _open_url(location) as fh:
                text = fh.read().decode("utf-8")
    except Exception as exn:  # noqa: BLE001 - no readable remote sizes.json: the caller falls back
        logger.debug("cannot read %s: %r", location, exn)
        return None
    try:
        sizes = json.loads(text)
    except json.JSONDecodeError as exn:
        raise ValueError(f"{location} is not valid JSON ({exn}); it must map shard file names to sample counts "
                         "(delete it to have local shards counted, or rewrite it)") from None
    if not isinstance(sizes, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes.values()):
        raise ValueError(f"{location} must be a JSON object of shard file name -> sample count (an integer >= 0)")
    return sizes


def count_samples(path: str) -> int:
    """Samples in a local tar shard, from its member headers alone (the data is seeked over, not read).

    Counts what ``_iter_shard`` yields: regular members outside webdataset's ``__meta__`` names, grouped by
    consecutive keys (the name up to the first dot of its last path part). A damaged shard (a header tar
    cannot read, or no end-of-archive blocks: cut short) is counted by reading it as ``_iter_shard`` does, so
    the count leaves out what the reader will drop.
    """
    from webdataset.tariterators import base_plus_ext

    n, last = 0, None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                name = member.name
                if not member.isreg() or re.match(r"__[^/]*__($|/)", name):
                    continue
                key, _ = base_plus_ext(name)
                if key is not None and key != last:
                    n, last = n + 1, key
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 1024))
            intact = not f.read().strip(b"\0")  # a tar ends in two zero blocks (then zero padding)
    except (tarfile.TarError, EOFError):
        intact = False
    if intact:
        return n
    return sum(1 for _ in _iter_shard(path, lambda *_: None))


def shard_sizes(urls: Sequence[str]) -> list[int] | None:
    """The sample count of every shard in ``urls``, read from the ``sizes.json`` beside each shard.

    Local shards that no ``sizes.json`` lists are counted from their tar headers (a warning names the folder:
    writing ``sizes.json`` saves that pass). Returns None, with a warning, when a shard's size cannot be known
    without downloading it (``pipe:`` URLs, remote shards without a readable ``sizes.json``).
    """
    tables: dict[str, dict[str, int] | None] = {}
    out: list[int] = []
    counted: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    for url in urls:
        loc = _sizes_location(url)
        if loc is None:
            return _unknown_sizes(url, "a pipe: URL has no sizes.json beside it")
        where, name, local = loc
        if where not in tables:
            tables[where] = _read_sizes(where, local)
        table = tables[where]
        if table is not None and name in table:
            out.append(table[name])
        elif local:
            path = urlparse(url).path if url.startswith("file:") else url
            out.append(count_samples(path))
            counted.setdefault(os.path.dirname(path) or ".", []).append(name)
        else:
            return _unknown_sizes(url, f"{where} {'does not list it' if table is not None else 'cannot be read'}")
    for folder, names in counted.items():
        logger.warning(
            "%s in %s lists %d of its shards (e.g. %s) only by counting their tar headers (%.1fs for all); write "
            "%s (shard file name -> sample count; ShardWriter and gcl.data.prepare do) to skip this",
            SIZES if os.path.isfile(os.path.join(folder, SIZES)) else f"no {SIZES}", folder, len(names), names[0],
            time.perf_counter() - t0, SIZES)
    return out


def _unknown_sizes(url: str, why: str) -> None:
    logger.warning(
        "shard sizes unknown for %s (%s): epochs fall back to whole shards per rank x worker, so one epoch may "
        "show some samples twice and others not at all; put a %s (shard file name -> sample count) beside "
        "the shards for exact epochs", url, why, SIZES)
    return None


def _open_url(url: str) -> Any:
    """Open a shard for reading: local files and ``pipe:`` / http / gs through webdataset's gopen, other
    schemes (s3://, az://, hf://, ...) through fsspec (the protocol's package, e.g. s3fs, must be installed)."""
    from webdataset.gopen import gopen, gopen_schemes

    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec  # only needed for object stores

    try:
        return fsspec.open(url, "rb").open()
    except ImportError as exn:
        raise ImportError(
            f"reading {url!r} needs an fsspec backend for {scheme!r} ({exn}); install it (e.g. pip install "
            f"s3fs / gcsfs / adlfs) or stream it with a pipe: URL such as 'pipe:aws s3 cp {url} -'"
        ) from exn


def _is_truncation(exn: BaseException) -> bool:
    """A tar stream that ends inside a member or header (a copy or download cut short)."""
    if isinstance(exn, EOFError):
        return True
    return isinstance(exn, tarfile.ReadError) and any(w in str(exn).lower() for w in ("truncated", "unexpected end"))


class _TailWatch:
    """A read-only stream that remembers its last 512 bytes. A tar ends with zero blocks; a stream that ends
    on anything else was cut short, even exactly at a member boundary, where tarfile sees a clean end."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tail = b""

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if data:
            self.tail = (self.tail + data)[-512:]
        return data

    def cut_short(self) -> bool:
        return bool(self.tail) and bool(self.tail.strip(b"\0"))

    def close(self) -> None:
        self.stream.close()


def _iter_shard(url: str, on_error: Callable[[str, str, BaseException], None]) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", "__url__", ext: bytes}``) of one tar shard, in file order.

    Unreadable shards and broken tar members are reported through ``on_error`` ("shard_error") and the rest
    is skipped, so a damaged shard costs its damaged part only. A shard cut short is reported once as
    "truncated_shard" (naming it), and the sample it ends in is dropped with it when that sample lacks a
    member the one before had (it was cut), instead of being counted as a sample without its json/image.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    truncated: list[BaseException] = []

    def handler(exn: BaseException) -> bool:
        if _is_truncation(exn):  # webdataset appends " @ <stream>" to the message: keep tar's own words
            truncated.append(EOFError(f"cut short ({str(exn.args[0]).split(' @ ')[0] if exn.args else exn})"))
        else:
            on_error("shard_error", url, exn)
        return True  # continue with the next member (or end this shard when the tar stream is broken)

    try:
        stream = _TailWatch(_open_url(url))
    except Exception as exn:  # noqa: BLE001 - any open failure (missing file, network) is a counted skip
        on_error("shard_error", url, exn)
        return
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        held: dict[str, Any] | None = None
        members: set[str] | None = None  # the member extensions of the sample before ``held``
        for sample in group_by_keys(files, handler=handler):
            if held is not None:
                members = {k for k in held if not k.startswith("__")}
                yield held
            held = sample
        if not truncated and stream.cut_short():
            truncated.append(EOFError("the tar stream ends without its end-of-archive blocks"))
        if truncated:
            on_error("truncated_shard", url, truncated[0])
            if held is not None and (members is None or not members <= set(held)):
                held = None  # the sample the cut went through
        if held is not None:
            yield held
    finally:
        try:
            stream.close()
        except Exception as exn:  # noqa: BLE001 - a pipe closed early exits by SIGPIPE; nothing was lost
            logger.debug("closing %s: %r", url, exn)
