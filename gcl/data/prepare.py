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
  pending); otherwise it is decoded by ``gcl.data.image.decode_image``'s rules (the loaders' own: upright,
  transparency composited on ``image_background``, default white, 16-bit scaled, CMYK converted) and
  re-encoded as RGB JPEG. Kept files are decoded by the same rules when training and evaluating, with
  ``data.image_background``. URLs are refused at once: this tool never touches the network.
* **Keys** come from ``key_column`` (else the row index, zero-padded). A key with characters outside
  ``[A-Za-z0-9_-]`` is sanitised (bad characters -> ``_``) and suffixed with a hash of the original, so two
  different raw keys never collide. Keys must be unique across the whole output.
* **Bad rows** are skipped and counted per reason (see ``REASONS``), logged, optionally written to
  ``reject_file`` as JSONL ``{"row", "key", "reason", "detail"}``; ``strict`` raises :class:`PrepareError`
  on the first one instead (and removes the shards written so far). ``row`` is the 0-based data row index
  across all input files (header and blank lines not counted).
* **Splits.** With ``split_column`` each split value gets its own sub-folder ``out_dir/<split>/`` with its
  own shards and ``sizes.json``.

This module is the driver: the options check, the per-row mapping (fields, key, split, required fields;
run in worker processes too), the ordered worker pool, shard writing, the skip accounting, the report and
the CLI. Reading the table and its images (formats, rows, columns, cell values, image bytes, decoding)
lives in ``gcl.data.read``; the tar format in ``gcl.data.shards``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gcl.data.image import parse_background
from gcl.data.read import (  # noqa: F401 - DEFAULT_JPEG_QUALITY: re-exported for existing importers
    DEFAULT_JPEG_QUALITY,
    FORMATS,
    PrepareError,
    Table,
    _Bad,
    _encode_image,
    _image_bytes,
    _image_url,
    _is_missing,
    _iter_rows,
    _number_value,
    _table_columns,
    _table_files,
    _text_value,
    _Unparsable,
    _url_error,
    as_table,
    table_root,
)
from gcl.data.schema import stable_hash
from gcl.data.shards import ShardWriter

log = logging.getLogger(__name__)

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
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CHUNK_ROWS = 32  # rows per task sent to a worker process


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
# Everything from here to ``_process_chunk`` (and what it calls in gcl.data.read) runs in worker processes
# too: plain data in, plain data out.


@dataclass(frozen=True)
class _Settings:
    fields: dict[str, str]
    image_column: str
    images_root: Path
    key_column: str | None
    split_column: str | None
    resize: int | None
    jpeg_quality: int | None
    image_background: tuple[int, int, int]
    list_sep: str | None
    list_fields: frozenset[str]
    required: tuple[str, ...]


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


def sanitize_key(raw: str) -> str:
    """Map ``raw`` to a valid sample key: unchanged if already valid, else bad characters -> ``_`` plus
    ``-<8 hex>`` of a stable hash of ``raw`` (so ``a.b`` and ``a_b`` stay distinct)."""
    if raw and not _BAD_KEY_CHARS.search(raw):
        return raw
    return f"{_BAD_KEY_CHARS.sub('_', raw)}-{stable_hash(raw) & 0xFFFFFFFF:08x}"


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
        data = _image_bytes(settings.image_column, settings.images_root, image_value)
        image, ext, reencoded = _encode_image(data, settings.resize, settings.jpeg_quality,
                                              settings.image_background)
    except _Bad as bad:
        return _Reject(key, bad.reason, bad.detail)
    return _Sample(sanitize_key(key), split, image, ext, fields, reencoded)


def _process_chunk(settings: _Settings, chunk: list[tuple[int, Any]]) -> list[_Sample | _Reject | _Fatal]:
    return [_process_row(settings, index, row) for index, row in chunk]


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
    table: str | Path | Sequence[str | Path],
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
    image_background: str = "white",
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
        table: a CSV / TSV / Parquet / JSONL file (``.gz`` allowed for the text formats), a folder or a glob
            of them, or a list of such files (one format).
        out_dir: output folder; with ``split_column`` one sub-folder per split value.
        fields: our field name -> table column.
        image_column: column of image paths, encoded bytes or ``{"bytes", "path"}`` structs.
        images_root: base folder of relative image paths (default: the table's folder).
        key_column: column of unique sample keys (default: the row index).
        split_column: column whose value picks the output sub-folder.
        per_shard: samples per shard file.
        resize: if set, shrink images so the longest side is at most this many pixels (re-encodes).
        jpeg_quality: if set, re-encode every image as JPEG at this quality (1-95).
        image_background: colour that transparent pixels are composited on when an image is re-encoded
            (``"white"``, ``"#f0f0f0"``; training uses ``data.image_background`` for kept files).
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
    out_dir = Path(out_dir)
    source = _open_table(table, input_format, fields, image_column, images_root, key_column, split_column,
                         per_shard, resize, jpeg_quality, image_background, list_sep, list_fields, required,
                         workers, max_rows)
    _clear_outputs(out_dir, overwrite)

    bar = tqdm(total=source.total, unit=" rows", desc="prepare", disable=not progress, dynamic_ncols=True)
    run = _Run(out_dir, per_shard, strict, bar)
    _write_rows(run, source.settings, source.rows(), workers, progress, reject_file)
    report = run.report
    report.skipped = dict(run.skipped)
    report.seconds = time.perf_counter() - start
    _log_summary(report, run.first_detail, reject_file)
    return report


def _clear_outputs(out_dir: Path, overwrite: bool) -> None:
    """Refuse to mix with shards already in ``out_dir`` (or delete them with ``overwrite``); create it."""
    existing = _existing_outputs(out_dir)
    if existing and not overwrite:
        raise PrepareError(f"{out_dir} already holds shards ({existing[0]}, ...); pass --overwrite to replace "
                           "them or choose an empty output folder")
    for path in existing:
        path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


class _Run:
    """One ``prepare`` call while its rows stream through: a shard writer per split, the keys written, the
    skips per reason (and the first detail of each), the reject file, the progress bar and the report."""

    def __init__(self, out_dir: Path, per_shard: int, strict: bool, bar: Any) -> None:
        self.out_dir, self.per_shard, self.strict, self.bar = out_dir, per_shard, strict, bar
        self.report = PrepareReport(out_dir=out_dir)
        self.skipped: Counter[str] = Counter()
        self.first_detail: dict[str, str] = {}
        self.writers: dict[str, ShardWriter] = {}
        self.seen_keys: set[str] = set()
        self.reject_fh: IO[str] | None = None

    def take(self, index: int, result: _Sample | _Reject | _Fatal) -> None:
        """Count row ``index`` and write its sample, or skip it; raise PrepareError on a fatal row."""
        report = self.report
        report.rows += 1
        self.bar.update(1)
        if isinstance(result, _Fatal):
            raise PrepareError(result.message)
        if isinstance(result, _Sample) and result.key in self.seen_keys:
            result = _Reject(result.key, "duplicate_key", f"key {result.key!r} appeared in an earlier row")
        if isinstance(result, _Reject):
            self.skip(index, result)
            return
        self.seen_keys.add(result.key)
        writer = self.writers.get(result.split)
        if writer is None:
            writer = self.writers[result.split] = ShardWriter(self.out_dir / result.split, per_shard=self.per_shard)
        writer.write(result.key, result.image, result.ext, result.fields)
        report.images_reencoded += result.reencoded
        if report.rows % 256 == 0:
            self.bar.set_postfix(written=len(self.seen_keys), skipped=sum(self.skipped.values()), refresh=False)

    def skip(self, index: int, result: _Reject) -> None:
        """Count, log and (with a reject file) record a bad row; with ``strict`` raise PrepareError instead."""
        if self.strict:
            raise PrepareError(f"row {index} (key {result.key!r}): {result.reason}: {result.detail}. "
                               "Fix the row, or drop --strict to skip and count such rows.")
        self.skipped[result.reason] += 1
        self.first_detail.setdefault(result.reason, f"row {index}: {result.detail}")
        level = logging.WARNING if sum(self.skipped.values()) <= 10 else logging.DEBUG
        log.log(level, "skipping row %d (key %r): %s: %s", index, result.key, result.reason,
                result.detail)
        if self.reject_fh is not None:
            self.reject_fh.write(json.dumps({"row": index, "key": result.key, "reason": result.reason,
                                             "detail": result.detail}, ensure_ascii=False) + "\n")

    def finish(self) -> None:
        """Close every split's last shard and ``sizes.json`` into the report; PrepareError if none was written."""
        if not self.seen_keys:
            reasons = ", ".join(f"{r}={n} (e.g. {self.first_detail[r]})" for r, n in self.skipped.items())
            raise PrepareError(f"no sample written: the table has {self.report.rows} rows"
                               + (f", all skipped: {reasons}" if reasons else ""))
        for split, writer in sorted(self.writers.items()):
            writer.close()
            self.report.written[split] = writer.total
            self.report.shards[split] = writer.shard_pattern()


def _write_rows(run: _Run, settings: _Settings, rows: Iterator[tuple[int, Any]], workers: int, progress: bool,
                reject_file: str | Path | None) -> None:
    """Process every row (in ``workers`` processes) and hand the results to ``run`` in row order. On any
    failure, every shard written so far is removed; the bar and the reject file are always closed."""
    try:
        if reject_file is not None:
            Path(reject_file).parent.mkdir(parents=True, exist_ok=True)
            run.reject_fh = open(reject_file, "w", encoding="utf-8")  # closed in finally
        # closing(): a raise below must stop the worker pool now, not whenever the generator is collected.
        # logging_redirect_tqdm: skip warnings go above the bar instead of breaking it.
        with contextlib.closing(_results(settings, rows, workers)) as results, \
                logging_redirect_tqdm() if progress else contextlib.nullcontext():
            for index, result in enumerate(results):
                run.take(index, result)
        run.finish()
    except BaseException:
        _discard(run.writers)
        raise
    finally:
        run.bar.set_postfix(written=len(run.seen_keys), skipped=sum(run.skipped.values()), refresh=False)
        run.bar.close()
        if run.reject_fh is not None:
            run.reject_fh.close()


def _limited(rows: Iterator[tuple[int, Any]], max_rows: int | None) -> Iterator[tuple[int, Any]]:
    for index, row in rows:
        if max_rows is not None and index >= max_rows:
            return
        yield index, row


def _discard(writers: dict[str, ShardWriter]) -> None:
    """Remove everything a failed run wrote, so a rerun starts clean (no --overwrite needed)."""
    for writer in writers.values():
        writer.abort()


@dataclass(frozen=True)
class _Source:
    """A table opened for one ``prepare`` / ``download`` run: its files and format, the checked options, the
    columns read, and the row count for the progress bar (None where the format cannot tell cheaply)."""

    files: list[Path]
    fmt: str
    settings: _Settings
    columns: list[str]
    total: int | None
    max_rows: int | None

    def rows(self) -> Iterator[tuple[int, Any]]:
        """(row index, row) for every data row, in table order, up to ``max_rows``."""
        return _limited(enumerate(_iter_rows(self.files, self.fmt, self.columns)), self.max_rows)


def _open_table(table: str | Path | Sequence[str | Path], input_format: str | None, fields: dict[str, str],
                image_column: str, images_root: str | Path | None, key_column: str | None,
                split_column: str | None, per_shard: int, resize: int | None, jpeg_quality: int | None,
                image_background: str, list_sep: str | None, list_fields: Sequence[str] | None,
                required: Sequence[str], workers: int, max_rows: int | None) -> _Source:
    """The option preamble shared by ``prepare`` and ``gcl.data.download.download``: find the table's files,
    check the options (PrepareError naming the bad one) and that the columns exist, before anything is written."""
    table = as_table(table)
    files, fmt = _table_files(table, input_format)
    settings = _check_options(
        table, fields, image_column, images_root, key_column, split_column, per_shard, resize, jpeg_quality,
        image_background, list_sep, list_fields, required, workers, max_rows)
    columns = list(dict.fromkeys([image_column, *fields.values(),
                                  *(c for c in (key_column, split_column) if c is not None)]))
    total = _table_columns(files, fmt, columns)
    if total is not None and max_rows is not None:
        total = min(total, max_rows)
    return _Source(files, fmt, settings, columns, total, max_rows)


def _check_options(table: Table, fields: dict[str, str], image_column: str, images_root: str | Path | None,
                   key_column: str | None, split_column: str | None, per_shard: int, resize: int | None,
                   jpeg_quality: int | None, image_background: str, list_sep: str | None,
                   list_fields: Sequence[str] | None, required: Sequence[str], workers: int,
                   max_rows: int | None) -> _Settings:
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
    try:
        background = parse_background(image_background)
    except ValueError:
        raise PrepareError(f"image_background {image_background!r} is not a colour: use a name such as white, "
                           "or #rrggbb") from None
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
    root = Path(images_root) if images_root is not None else table_root(table)
    if images_root is not None and not root.is_dir():
        raise PrepareError(f"images_root {root} is not a folder")
    return _Settings(fields=dict(fields), image_column=image_column, images_root=root, key_column=key_column,
                     split_column=split_column, resize=resize, jpeg_quality=jpeg_quality,
                     image_background=background, list_sep=list_sep,
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


def add_table_arguments(p: argparse.ArgumentParser, *, table_help: str) -> None:
    """The table -> shards options, shared by ``gcl.data.prepare``, ``gcl.data.download`` and ``gcl.data.hf``
    (read back with :func:`table_options`)."""
    p.add_argument("table", help=table_help)
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
    p.add_argument("--image-background", default="white",
                   help="colour under transparent pixels when an image is re-encoded (default: white; a name "
                        "or #rrggbb; set data.image_background alike for the files kept as they are)")
    p.add_argument("--list-sep", help="split string values of the list fields on this separator")
    p.add_argument("--list-fields", type=_split_list,
                   help=f"comma-separated fields split by --list-sep (default: {','.join(DEFAULT_LIST_FIELDS)})")
    p.add_argument("--required", action="append", type=_split_list, default=[],
                   help="comma-separated fields that must be non-empty (repeatable)")
    p.add_argument("--reject-file", help="write skipped rows here as JSONL (row, key, reason, detail)")
    p.add_argument("--format", dest="input_format", choices=FORMATS, help="override the table format")
    p.add_argument("--max-rows", type=int, help="read only the first N rows (a trial run)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def table_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The keyword arguments of :func:`prepare`, minus ``table`` and ``out_dir``, that
    :func:`add_table_arguments` parsed."""
    fields = dict(args.fields)
    if len(fields) != len(args.fields):
        parser.error("a --field NAME is given twice")
    return dict(fields=fields, image_column=args.image_column, images_root=args.images_root,
                key_column=args.key_column, split_column=args.split_column, per_shard=args.per_shard,
                resize=args.resize, jpeg_quality=args.jpeg_quality, image_background=args.image_background,
                list_sep=args.list_sep,
                list_fields=args.list_fields, required=[r for group in args.required for r in group],
                reject_file=args.reject_file, input_format=args.input_format, max_rows=args.max_rows,
                overwrite=args.overwrite, progress=not args.no_progress)


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """Options of prepare itself (not of the downloader): --strict, --workers."""
    p.add_argument("--strict", action="store_true", help="fail on the first bad row instead of skipping")
    p.add_argument("--workers", type=int, default=0,
                   help="image decode/re-encode processes (default: 0 = in the main process)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gcl.data.prepare",
        description="Turn a CSV / TSV / Parquet / JSONL table (+ images) into gcl webdataset shards. Image "
                    "URLs: python -m gcl.data.download (same options); Hugging Face datasets: python -m "
                    "gcl.data.hf.",
        epilog="example: python -m gcl.data.prepare products.parquet shards/ --image-column image "
               "--field title=product_name --field description=desc --field categories=category "
               "--split-column split --required title --resize 512")
    add_table_arguments(p, table_help="table file, a folder of table files of one format, or a quoted glob "
                                      "('data/train-*.parquet')")
    add_worker_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log every skipped row")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 on success). Errors exit with status 2 and a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    options = table_options(args, parser)
    try:
        prepare(args.table, args.out_dir, strict=args.strict, workers=args.workers, **options)
    except PrepareError as err:
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
