"""Turn a user table (CSV / TSV / Parquet / JSONL, plus images) into webdataset shards.

    python -m gcl.data.prepare products.csv shards/ --image-column image_path --images-root images/ \\
        --field title=product_name --field description=desc --field categories=category --required title

Each kept row becomes one sample of the shard schema (``gcl.data.schema``): ``<key>.<jpg|png|webp>`` +
``<key>.json`` with the mapped fields, written through :class:`gcl.data.shards.ShardWriter` (atomic shards,
``sizes.json``). Contracts:

* **Fields.** ``fields`` maps *our* field name -> *table* column. Any field name is allowed (the seven
  ``TEXT_FIELDS``, ``item_id``, ``query``, ``score``, ``position`` or your own). Text values are stripped
  strings; empty values are left out of the JSON (the loader treats them as missing). List values (Parquet
  lists, JSON arrays, or strings split by ``list_sep`` for the ``list_fields``) become lists of strings.
  ``score`` / ``position`` are stored as JSON numbers (numeric strings are parsed); an integer ``item_id``
  becomes its decimal string.
* **Images** come from ``image_column``: a path (relative ones resolved against ``images_root``, default the
  table's folder), raw encoded bytes, or a Hugging Face image struct ``{"bytes": ..., "path": ...}`` (the
  Parquet layout of the Marqo fashion and Google Shopping evaluation sets). Every image is fully decoded
  once, so a truncated file is caught here and not mid-training. Original bytes are kept when the image is
  already JPEG / PNG / WEBP and neither ``resize`` nor ``jpeg_quality`` is asked (and no EXIF rotation is
  pending); otherwise it is re-encoded as RGB JPEG (transparency composited on white). URLs are refused at
  once: this tool never touches the network.
* **Keys** come from ``key_column`` (else the row index, zero-padded). A key with characters outside
  ``[A-Za-z0-9_-]`` is sanitised (bad characters -> ``_``) and suffixed with a hash of the original, so two
  different raw keys never collide. Keys must be unique across the whole output.
* **Bad rows** are skipped and counted per reason (see ``REASONS``), logged, optionally written to
  ``reject_file`` as JSONL ``{"row", "key", "reason", "detail"}``; ``strict`` raises :class:`PrepareError`
  on the first one instead (and removes the shards written so far). ``row`` is the 0-based data row index
  across all input files (header and blank lines not counted).
* **Splits.** With ``split_column`` each split value gets its own sub-folder ``out_dir/<split>/`` with its
  own shards and ``sizes.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import json
import logging
import math
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gcl.data.schema import stable_hash
from gcl.data.shards import ShardWriter

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("csv", "tsv", "parquet", "jsonl")
NUMERIC_FIELDS: tuple[str, ...] = ("score", "position")
# Fields whose string values are split by ``list_sep`` when the caller does not name ``list_fields``:
# the short categorical ones. Titles and descriptions contain commas and are never split by default.
DEFAULT_LIST_FIELDS: tuple[str, ...] = ("colors", "materials", "categories", "keywords")
REASONS: tuple[str, ...] = (
    "missing_image",  # no image value, or the path does not exist
    "unreadable_image",  # the bytes/file cannot be read or decoded
    "empty_required",  # a ``required`` field is missing or empty
    "non_string_field",  # a text field holds a number, dict, ... (or a list holding one)
    "bad_number",  # ``score`` / ``position`` is not a finite number
    "missing_key",  # the key column is empty
    "duplicate_key",  # the (sanitised) key was already written
    "missing_split",  # the split column is empty
    "unparsable_row",  # a JSONL line that is not a JSON object
)
DEFAULT_JPEG_QUALITY = 95
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_EXIF_ORIENTATION = 0x0112
_PARQUET_BATCH_ROWS = 256  # rows carry image bytes: keep a batch to tens of MB
_CHUNK_ROWS = 32  # rows per task sent to a worker process
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
             ".jsonl": "jsonl", ".ndjson": "jsonl"}


class PrepareError(ValueError):
    """The table or the options cannot be turned into shards; the message names the problem and the fix."""


@dataclass
class PrepareReport:
    """What ``prepare`` did.

    ``written`` and ``shards`` are keyed by split value ('' when there is no split column); ``shards`` holds
    each split's brace pattern, ready for ``data.train_shards=``. ``skipped`` counts bad rows per reason.
    """

    out_dir: Path
    rows: int = 0
    written: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    shards: dict[str, str] = field(default_factory=dict)
    images_reencoded: int = 0
    seconds: float = 0.0

    @property
    def total_written(self) -> int:
        return sum(self.written.values())

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


# ---------------------------------------------------------------------------------------------- row logic
# Everything from here to ``_process_chunk`` runs in worker processes too: plain data in, plain data out.


@dataclass(frozen=True)
class _Settings:
    fields: dict[str, str]
    image_column: str
    images_root: Path
    key_column: str | None
    split_column: str | None
    resize: int | None
    jpeg_quality: int | None
    list_sep: str | None
    list_fields: frozenset[str]
    required: tuple[str, ...]


class _Bad(Exception):
    """A bad row: ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Unparsable:
    """Stands in for a row the reader could not parse."""

    def __init__(self, detail: str) -> None:
        self.detail = detail


@dataclass
class _Sample:
    key: str
    split: str
    image: bytes
    ext: str
    fields: dict[str, Any]
    reencoded: bool


@dataclass
class _Reject:
    key: str | None
    reason: str
    detail: str


@dataclass
class _Fatal:
    message: str


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def sanitize_key(raw: str) -> str:
    """Map ``raw`` to a valid sample key: unchanged if already valid, else bad characters -> ``_`` plus
    ``-<8 hex>`` of a stable hash of ``raw`` (so ``a.b`` and ``a_b`` stay distinct)."""
    if raw and not _BAD_KEY_CHARS.search(raw):
        return raw
    return f"{_BAD_KEY_CHARS.sub('_', raw)}-{stable_hash(raw) & 0xFFFFFFFF:08x}"


def _text_value(name: str, column: str, value: Any, split_sep: str | None) -> str | list[str] | None:
    """Normalise one text field value: stripped string, list of non-empty strings, or None (missing)."""
    if _is_missing(value):
        return None
    if isinstance(value, str):
        if split_sep is not None:
            items = [part.strip() for part in value.split(split_sep)]
            return [item for item in items if item] or None
        return value.strip() or None
    if isinstance(value, (list, tuple)):
        items = []
        for item in value:
            if _is_missing(item):
                continue
            if not isinstance(item, str):
                raise _Bad("non_string_field", f"field {name!r} (column {column!r}) is a list holding "
                                               f"{type(item).__name__} {_short(item)}")
            if item.strip():
                items.append(item.strip())
        return items or None
    if name == "item_id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _Bad("non_string_field",
               f"field {name!r} (column {column!r}) holds {type(value).__name__} {_short(value)}, not text")


def _number_value(name: str, column: str, value: Any) -> int | float | None:
    """``score`` / ``position``: a finite JSON number, or None when missing."""
    if _is_missing(value):
        return None
    number: int | float
    if isinstance(value, bool):
        raise _Bad("bad_number", f"field {name!r} (column {column!r}) holds a boolean {value!r}")
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise _Bad("bad_number", f"field {name!r} (column {column!r}) holds {_short(value)}, "
                                         "not a number") from None
    else:
        raise _Bad("bad_number", f"field {name!r} (column {column!r}) holds {type(value).__name__} "
                                 f"{_short(value)}, not a number")
    if isinstance(number, float) and math.isnan(number):
        return None
    if not math.isfinite(number):
        raise _Bad("bad_number", f"field {name!r} (column {column!r}) is not finite: {value!r}")
    return number


def _url_error(column: str, value: str) -> str:
    return (f"image column {column!r} holds a URL ({_short(value, 80)}); gcl.data.prepare never downloads "
            "images. Download them first (for example with img2dataset or a script of your own), then "
            "point --image-column at a column of local paths (relative ones are resolved against "
            "--images-root) or at a column of encoded image bytes.")


def _image_bytes(settings: _Settings, value: Any) -> bytes:
    """Encoded image bytes from a path, bytes or ``{"bytes", "path"}`` value; URLs are caught earlier."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return bytes(data)
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise _Bad("missing_image", "the image bytes are empty")
        return bytes(value)
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        raise _Bad("missing_image", f"no image in column {settings.image_column!r}")
    if not isinstance(value, str):
        raise _Bad("unreadable_image", f"image column {settings.image_column!r} holds "
                                       f"{type(value).__name__} {_short(value)}: expected a path or bytes")
    path = Path(value.strip()).expanduser()
    if not path.is_absolute():
        path = settings.images_root / path
    if not path.is_file():
        raise _Bad("missing_image", f"image file not found: {path}")
    try:
        return path.read_bytes()
    except OSError as err:
        raise _Bad("unreadable_image", f"cannot read {path}: {err}") from None


def _image_url(value: Any) -> str | None:
    """The URL when the image value is (or its struct path is) a URL without bytes, else None."""
    if isinstance(value, dict) and not value.get("bytes"):
        value = value.get("path")
    if isinstance(value, str) and _URL.match(value.strip()):
        return value.strip()
    return None


def _encode_image(data: bytes, resize: int | None, jpeg_quality: int | None) -> tuple[bytes, str, bool]:
    """Decode ``data`` fully, then keep it or re-encode it. Returns (bytes, extension, re-encoded?)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Decode every pixel now: a truncated or corrupt file must fail here, not in a training worker.
            img.load()
            fmt = img.format
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            if resize is None and jpeg_quality is None and fmt in _KEPT_FORMATS and orientation in (0, 1):
                return data, _KEPT_FORMATS[fmt], False
            # Loaders decode with plain PIL, which ignores EXIF orientation: bake the rotation in.
            out = ImageOps.exif_transpose(img)
            if resize is not None:
                out.thumbnail((resize, resize), Image.Resampling.BICUBIC)  # keeps aspect, never enlarges
            if out.mode in ("RGBA", "LA", "PA") or (out.mode == "P" and "transparency" in out.info):
                # JPEG has no alpha; product cut-outs are meant to sit on white, not on black.
                rgba = out.convert("RGBA")
                out = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                out.alpha_composite(rgba)
            out = out.convert("RGB")
            buf = io.BytesIO()
            out.save(buf, format="JPEG", quality=jpeg_quality or DEFAULT_JPEG_QUALITY)
            return buf.getvalue(), "jpg", True
    except Exception as err:  # any decoder failure on user data is one bad row, not a crash
        raise _Bad("unreadable_image", f"cannot decode image ({type(err).__name__}: {err})") from None


def _process_row(settings: _Settings, index: int, row: dict[str, Any] | _Unparsable
                 ) -> _Sample | _Reject | _Fatal:
    """Validate and convert one table row."""
    if isinstance(row, _Unparsable):
        return _Reject(None, "unparsable_row", row.detail)
    image_value = row.get(settings.image_column)
    url = _image_url(image_value)
    if url is not None:
        return _Fatal(f"row {index}: {_url_error(settings.image_column, url)}")
    key: str | None = None
    try:
        if settings.key_column is None:
            key = f"{index:09d}"
        else:
            raw_key = row.get(settings.key_column)
            if _is_missing(raw_key) or not str(raw_key).strip():
                raise _Bad("missing_key", f"key column {settings.key_column!r} is empty")
            key = str(raw_key).strip()
        split = ""
        if settings.split_column is not None:
            raw_split = row.get(settings.split_column)
            if _is_missing(raw_split) or not str(raw_split).strip():
                raise _Bad("missing_split", f"split column {settings.split_column!r} is empty")
            split = _BAD_KEY_CHARS.sub("_", str(raw_split).strip())
        fields: dict[str, Any] = {}
        for name, column in settings.fields.items():
            value = row.get(column)
            if name in NUMERIC_FIELDS:
                converted: Any = _number_value(name, column, value)
            else:
                sep = settings.list_sep if name in settings.list_fields else None
                converted = _text_value(name, column, value, sep)
            if converted is not None:
                fields[name] = converted
        for name in settings.required:
            if name not in fields:
                raise _Bad("empty_required", f"required field {name!r} (column {settings.fields[name]!r}) "
                                             "is missing or empty")
        data = _image_bytes(settings, image_value)
        image, ext, reencoded = _encode_image(data, settings.resize, settings.jpeg_quality)
    except _Bad as bad:
        return _Reject(key, bad.reason, bad.detail)
    return _Sample(sanitize_key(key), split, image, ext, fields, reencoded)


def _process_chunk(settings: _Settings, chunk: list[tuple[int, Any]]) -> list[_Sample | _Reject | _Fatal]:
    return [_process_row(settings, index, row) for index, row in chunk]


# -------------------------------------------------------------------------------------------- table input


def _detect_format(path: Path, input_format: str | None) -> str:
    if input_format is not None:
        if input_format not in FORMATS:
            raise PrepareError(f"input_format {input_format!r} is not one of {FORMATS}")
        return input_format
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in _SUFFIXES:
        return _SUFFIXES[suffixes[-1]]
    raise PrepareError(f"cannot tell the format of {path} from its extension; pass --format "
                       f"(one of {', '.join(FORMATS)})")


def _table_files(table: Path, input_format: str | None) -> tuple[list[Path], str]:
    """The input files (one file, or every file of the format in a folder, sorted) and their format."""
    if table.is_dir():
        files = sorted(p for p in table.iterdir() if p.is_file() and not p.name.startswith("."))
        if input_format is None:
            formats = set()
            for p in files:
                with contextlib.suppress(PrepareError):
                    formats.add(_detect_format(p, None))
            if len(formats) != 1:
                raise PrepareError(f"folder {table} holds {'no' if not formats else 'several'} table formats "
                                   f"({sorted(formats)}); pass --format to choose")
            input_format = formats.pop()
        fmt = input_format
        files = [p for p in files if _SUFFIXES.get(_strip_gz(p).suffix.lower()) == fmt]
        if not files:
            raise PrepareError(f"no {fmt} files in folder {table}")
        return files, fmt
    if not table.is_file():
        raise PrepareError(f"table {table} does not exist")
    return [table], _detect_format(table, input_format)


def _strip_gz(path: Path) -> Path:
    return path.with_suffix("") if path.suffix.lower() == ".gz" else path


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would corrupt the first header.
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")  # the caller closes it (with-block)


def _csv_rows(path: Path, delimiter: str) -> Iterator[dict[str, Any]]:
    # Product descriptions can exceed the csv module's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    with _open_text(path) as fh:
        yield from csv.DictReader(fh, delimiter=delimiter)


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any] | _Unparsable]:
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield _Unparsable(f"{path.name} line {line_no}: invalid JSON ({err})")
                continue
            if not isinstance(row, dict):
                yield _Unparsable(f"{path.name} line {line_no}: a JSON {type(row).__name__}, not an object")
                continue
            yield row


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    # Batches, not read_table: an image table can be far larger than memory.
    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()


def _iter_rows(files: list[Path], fmt: str, columns: list[str]) -> Iterator[dict[str, Any] | _Unparsable]:
    for path in files:
        if fmt == "parquet":
            yield from _parquet_rows(path, columns)
        elif fmt == "jsonl":
            yield from _jsonl_rows(path)
        else:
            yield from _csv_rows(path, "\t" if fmt == "tsv" else ",")


def _table_columns(files: list[Path], fmt: str, needed: list[str]) -> int | None:
    """Check that every needed column exists (raising PrepareError naming it); return the row count if
    cheap to know (Parquet metadata), else None."""
    total: int | None = 0 if fmt == "parquet" else None
    for path in files:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with pq.ParquetFile(path) as pf:
                available = list(pf.schema_arrow.names)
                assert total is not None
                total += pf.metadata.num_rows
        elif fmt == "jsonl":
            # JSONL rows need not share keys: accept a column seen anywhere in the first lines.
            seen: dict[str, None] = {}
            for i, row in enumerate(_jsonl_rows(path)):
                if i >= 1000:
                    break
                if isinstance(row, dict):
                    seen.update(dict.fromkeys(row))
            if not seen:
                continue
            available = list(seen)
        else:
            with _open_text(path) as fh:
                available = next(csv.reader(fh, delimiter="\t" if fmt == "tsv" else ","), [])
        missing = [c for c in needed if c not in available]
        if missing:
            raise PrepareError(f"column(s) {missing} not found in {path}; available columns: {available}. "
                               "Fix the --field / --image-column / --key-column / --split-column mapping.")
    return total


# ------------------------------------------------------------------------------------------------- output


_OUTPUT_GLOBS = ("sizes.json", "sizes.json.tmp", "shard-*.tar", "shard-*.tar.tmp")


def _existing_outputs(out_dir: Path) -> list[Path]:
    """Shard files and sizes.json already in ``out_dir`` or its split sub-folders."""
    if not out_dir.is_dir():
        return []
    found: list[Path] = []
    for folder in [out_dir, *(p for p in out_dir.iterdir() if p.is_dir())]:
        for pattern in _OUTPUT_GLOBS:
            found.extend(folder.glob(pattern))
    return sorted(found)


def _results(settings: _Settings, rows: Iterable[tuple[int, Any]], workers: int
             ) -> Iterator[_Sample | _Reject | _Fatal]:
    """Process rows in order, in this process or in ``workers`` processes with bounded read-ahead."""
    if workers <= 0:
        for index, row in rows:
            yield _process_row(settings, index, row)
        return
    # spawn, not fork: the caller may hold threads (torch, tqdm) that a forked child would inherit locked.
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    try:
        pending: deque = deque()
        chunk: list[tuple[int, Any]] = []
        for item in rows:
            chunk.append(item)
            if len(chunk) == _CHUNK_ROWS:
                pending.append(pool.submit(_process_chunk, settings, chunk))
                chunk = []
                # At most 2 chunks per worker in flight: memory stays bounded whatever the table size.
                if len(pending) >= 2 * workers:
                    yield from pending.popleft().result()
        if chunk:
            pending.append(pool.submit(_process_chunk, settings, chunk))
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prepare(
    table: str | Path,
    out_dir: str | Path,
    *,
    fields: dict[str, str],
    image_column: str,
    images_root: str | Path | None = None,
    key_column: str | None = None,
    split_column: str | None = None,
    per_shard: int = 1000,
    resize: int | None = None,
    jpeg_quality: int | None = None,
    list_sep: str | None = None,
    list_fields: Sequence[str] | None = None,
    required: Sequence[str] = (),
    strict: bool = False,
    reject_file: str | Path | None = None,
    input_format: str | None = None,
    progress: bool = True,
    workers: int = 0,
    max_rows: int | None = None,
    overwrite: bool = False,
) -> PrepareReport:
    """Write the rows of ``table`` as webdataset shards under ``out_dir`` (see the module docstring).

    Args:
        table: a CSV / TSV / Parquet / JSONL file (``.gz`` allowed for the text formats), or a folder of them.
        out_dir: output folder; with ``split_column`` one sub-folder per split value.
        fields: our field name -> table column.
        image_column: column of image paths, encoded bytes or ``{"bytes", "path"}`` structs.
        images_root: base folder of relative image paths (default: the table's folder).
        key_column: column of unique sample keys (default: the row index).
        split_column: column whose value picks the output sub-folder.
        per_shard: samples per shard file.
        resize: if set, shrink images so the longest side is at most this many pixels (re-encodes).
        jpeg_quality: if set, re-encode every image as JPEG at this quality (1-95).
        list_sep: separator that splits the string values of ``list_fields`` into lists.
        list_fields: fields split by ``list_sep`` (default: those of DEFAULT_LIST_FIELDS that are mapped).
        required: fields that must be non-empty; rows without them are skipped (``empty_required``).
        strict: raise PrepareError on the first bad row instead of skipping it.
        reject_file: write one JSON line per skipped row here.
        input_format: one of FORMATS, overriding the file extension.
        progress: show a tqdm bar (rows/s).
        workers: decode/re-encode images in this many processes (0: in this process). They are started
            with ``spawn``, so a script calling this must guard its top level with
            ``if __name__ == "__main__":``; the CLI already does.
        max_rows: stop after this many table rows (a quick trial run).
        overwrite: delete shards and sizes.json already in ``out_dir`` instead of refusing to run.

    Returns:
        PrepareReport with the samples written per split and the rows skipped per reason.

    Raises:
        PrepareError: bad options or columns, an image URL, no row written, or (``strict``) a bad row.
    """
    start = time.perf_counter()
    table = Path(table)
    out_dir = Path(out_dir)
    files, fmt = _table_files(table, input_format)
    settings = _check_options(
        table, fields, image_column, images_root, key_column, split_column, per_shard, resize, jpeg_quality,
        list_sep, list_fields, required, workers, max_rows)
    needed = list(dict.fromkeys([image_column, *fields.values(),
                                 *(c for c in (key_column, split_column) if c is not None)]))
    total = _table_columns(files, fmt, needed)
    if total is not None and max_rows is not None:
        total = min(total, max_rows)

    existing = _existing_outputs(out_dir)
    if existing and not overwrite:
        raise PrepareError(f"{out_dir} already holds shards ({existing[0]}, ...); pass --overwrite to replace "
                           "them or choose an empty output folder")
    for path in existing:
        path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)

    report = PrepareReport(out_dir=out_dir)
    skipped: Counter[str] = Counter()
    first_detail: dict[str, str] = {}
    writers: dict[str, ShardWriter] = {}
    seen_keys: set[str] = set()
    rows = _limited(enumerate(_iter_rows(files, fmt, needed)), max_rows)
    reject_fh = None
    bar = tqdm(total=total, unit=" rows", desc="prepare", disable=not progress, dynamic_ncols=True)
    try:
        if reject_file is not None:
            Path(reject_file).parent.mkdir(parents=True, exist_ok=True)
            reject_fh = open(reject_file, "w", encoding="utf-8")  # closed in finally
        # closing(): a raise below must stop the worker pool now, not whenever the generator is collected.
        # logging_redirect_tqdm: skip warnings go above the bar instead of breaking it.
        with contextlib.closing(_results(settings, rows, workers)) as results, \
                logging_redirect_tqdm() if progress else contextlib.nullcontext():
            for index, result in enumerate(results):
                report.rows += 1
                bar.update(1)
                if isinstance(result, _Fatal):
                    raise PrepareError(result.message)
                if isinstance(result, _Sample) and result.key in seen_keys:
                    result = _Reject(result.key, "duplicate_key", f"key {result.key!r} appeared in an earlier row")
                if isinstance(result, _Reject):
                    if strict:
                        raise PrepareError(f"row {index} (key {result.key!r}): {result.reason}: {result.detail}. "
                                           "Fix the row, or drop --strict to skip and count such rows.")
                    skipped[result.reason] += 1
                    first_detail.setdefault(result.reason, f"row {index}: {result.detail}")
                    level = logging.WARNING if sum(skipped.values()) <= 10 else logging.DEBUG
                    log.log(level, "skipping row %d (key %r): %s: %s", index, result.key, result.reason,
                            result.detail)
                    if reject_fh is not None:
                        reject_fh.write(json.dumps({"row": index, "key": result.key, "reason": result.reason,
                                                    "detail": result.detail}, ensure_ascii=False) + "\n")
                    continue
                seen_keys.add(result.key)
                writer = writers.get(result.split)
                if writer is None:
                    writer = writers[result.split] = ShardWriter(out_dir / result.split, per_shard=per_shard)
                writer.write(result.key, result.image, result.ext, result.fields)
                report.images_reencoded += result.reencoded
                if report.rows % 256 == 0:
                    bar.set_postfix(written=len(seen_keys), skipped=sum(skipped.values()), refresh=False)
        if not seen_keys:
            reasons = ", ".join(f"{r}={n} (e.g. {first_detail[r]})" for r, n in skipped.items())
            raise PrepareError(f"no sample written: the table has {report.rows} rows"
                               + (f", all skipped: {reasons}" if reasons else ""))
        for split, writer in sorted(writers.items()):
            writer.close()
            report.written[split] = writer.total
            report.shards[split] = writer.shard_pattern()
    except BaseException:
        _discard(writers)
        raise
    finally:
        bar.set_postfix(written=len(seen_keys), skipped=sum(skipped.values()), refresh=False)
        bar.close()
        if reject_fh is not None:
            reject_fh.close()
    report.skipped = dict(skipped)
    report.seconds = time.perf_counter() - start
    _log_summary(report, first_detail, reject_file)
    return report


def _limited(rows: Iterator[tuple[int, Any]], max_rows: int | None) -> Iterator[tuple[int, Any]]:
    for index, row in rows:
        if max_rows is not None and index >= max_rows:
            return
        yield index, row


def _discard(writers: dict[str, ShardWriter]) -> None:
    """Remove everything a failed run wrote, so a rerun starts clean (no --overwrite needed)."""
    for writer in writers.values():
        writer.abort()


def _check_options(table: Path, fields: dict[str, str], image_column: str, images_root: str | Path | None,
                   key_column: str | None, split_column: str | None, per_shard: int, resize: int | None,
                   jpeg_quality: int | None, list_sep: str | None, list_fields: Sequence[str] | None,
                   required: Sequence[str], workers: int, max_rows: int | None) -> _Settings:
    if not fields:
        raise PrepareError("no fields mapped: pass at least one --field NAME=COLUMN (e.g. title=product_name)")
    for name, column in fields.items():
        if not _FIELD_NAME.match(name) or name == "image":
            raise PrepareError(f"field name {name!r} is not allowed: use letters, digits and '_' "
                               "('image' is reserved for the picture)")
        if not isinstance(column, str) or not column:
            raise PrepareError(f"field {name!r} maps to an empty column name")
    if per_shard < 1:
        raise PrepareError(f"per_shard must be >= 1, got {per_shard}")
    if resize is not None and resize < 1:
        raise PrepareError(f"resize must be a positive pixel count, got {resize}")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 95:
        # Pillow documents 95 as the useful maximum: above it files grow with no visible gain.
        raise PrepareError(f"jpeg_quality must be in 1..95, got {jpeg_quality}")
    if workers < 0:
        raise PrepareError(f"workers must be >= 0, got {workers}")
    if max_rows is not None and max_rows < 1:
        raise PrepareError(f"max_rows must be >= 1, got {max_rows}")
    if list_sep == "":
        raise PrepareError("list_sep must be a non-empty string")
    if list_fields is not None:
        if list_sep is None:
            raise PrepareError("list_fields given without list_sep: pass --list-sep too")
        unknown = [f for f in list_fields if f not in fields]
        if unknown:
            raise PrepareError(f"list field(s) {unknown} are not mapped by --field")
        split_fields = frozenset(list_fields)
    else:
        split_fields = frozenset(f for f in DEFAULT_LIST_FIELDS if f in fields) if list_sep else frozenset()
    bad_numeric = [f for f in split_fields if f in NUMERIC_FIELDS]
    if bad_numeric:
        raise PrepareError(f"numeric field(s) {bad_numeric} cannot be list fields")
    req = tuple(dict.fromkeys(r for r in required if r != "image"))  # the image is always required
    unknown = [r for r in req if r not in fields]
    if unknown:
        raise PrepareError(f"required field(s) {unknown} are not mapped: add --field NAME=COLUMN for them")
    root = Path(images_root) if images_root is not None else (table if table.is_dir() else table.parent)
    if images_root is not None and not root.is_dir():
        raise PrepareError(f"images_root {root} is not a folder")
    return _Settings(fields=dict(fields), image_column=image_column, images_root=root, key_column=key_column,
                     split_column=split_column, resize=resize, jpeg_quality=jpeg_quality, list_sep=list_sep,
                     list_fields=split_fields, required=req)


def _log_summary(report: PrepareReport, first_detail: dict[str, str], reject_file: str | Path | None) -> None:
    rate = report.rows / report.seconds if report.seconds > 0 else float("inf")
    log.info("prepared %d samples from %d rows in %.1f s (%.0f rows/s, %d images re-encoded) into %s",
             report.total_written, report.rows, report.seconds, rate, report.images_reencoded, report.out_dir)
    for split in sorted(report.written):
        log.info("  %s%d samples: %s", f"split {split!r}: " if split else "", report.written[split],
                 report.shards[split])
    if report.skipped:
        log.warning("skipped %d rows%s:", report.total_skipped,
                    f" (listed in {reject_file})" if reject_file is not None else "")
        for reason in sorted(report.skipped):
            log.warning("  %s: %d (first: %s)", reason, report.skipped[reason], first_detail[reason])


# ---------------------------------------------------------------------------------------------------- CLI


def _parse_field(spec: str) -> tuple[str, str]:
    name, sep, column = spec.partition("=")
    name = name.strip()
    if not name:
        raise argparse.ArgumentTypeError(f"bad --field {spec!r}: expected NAME=COLUMN or NAME")
    return name, (column if sep else name)


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gcl.data.prepare",
        description="Turn a CSV / TSV / Parquet / JSONL table (+ images) into gcl webdataset shards.",
        epilog="example: python -m gcl.data.prepare products.parquet shards/ --image-column image "
               "--field title=product_name --field description=desc --field categories=category "
               "--split-column split --required title --resize 512")
    p.add_argument("table", help="table file, or a folder of table files of one format")
    p.add_argument("out_dir", help="output folder (one sub-folder per split with --split-column)")
    p.add_argument("--field", dest="fields", action="append", type=_parse_field, default=[],
                   metavar="NAME=COLUMN",
                   help="map our field NAME (title, description, colors, materials, categories, details, "
                        "keywords, item_id, query, score, position, or any other) to a table COLUMN; "
                        "repeatable; NAME alone means COLUMN=NAME")
    p.add_argument("--image-column", default="image",
                   help="column of image paths, encoded bytes or Hugging Face {bytes, path} structs "
                        "(default: image)")
    p.add_argument("--images-root", help="folder that relative image paths start from (default: the "
                                         "table's folder)")
    p.add_argument("--key-column", help="column of unique sample keys (default: the row index)")
    p.add_argument("--split-column", help="column whose value names the output sub-folder")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--resize", type=int, help="shrink images so the longest side is at most this")
    p.add_argument("--jpeg-quality", type=int, help="re-encode all images as JPEG at this quality (1-95)")
    p.add_argument("--list-sep", help="split string values of the list fields on this separator")
    p.add_argument("--list-fields", type=_split_list,
                   help=f"comma-separated fields split by --list-sep (default: {','.join(DEFAULT_LIST_FIELDS)})")
    p.add_argument("--required", action="append", type=_split_list, default=[],
                   help="comma-separated fields that must be non-empty (repeatable)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad row instead of skipping")
    p.add_argument("--reject-file", help="write skipped rows here as JSONL (row, key, reason, detail)")
    p.add_argument("--format", dest="input_format", choices=FORMATS, help="override the table format")
    p.add_argument("--workers", type=int, default=0,
                   help="image decode/re-encode processes (default: 0 = in the main process)")
    p.add_argument("--max-rows", type=int, help="read only the first N rows (a trial run)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log every skipped row")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 on success). Errors exit with status 2 and a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    fields = dict(args.fields)
    if len(fields) != len(args.fields):
        parser.error("a --field NAME is given twice")
    try:
        prepare(args.table, args.out_dir, fields=fields, image_column=args.image_column,
                images_root=args.images_root, key_column=args.key_column, split_column=args.split_column,
                per_shard=args.per_shard, resize=args.resize, jpeg_quality=args.jpeg_quality,
                list_sep=args.list_sep, list_fields=args.list_fields,
                required=[r for group in args.required for r in group], strict=args.strict,
                reject_file=args.reject_file, input_format=args.input_format, progress=not args.no_progress,
                workers=args.workers, max_rows=args.max_rows, overwrite=args.overwrite)
    except PrepareError as err:
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
