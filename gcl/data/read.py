"""Reading a user table and its images: the input side of ``gcl.data.prepare``.

Lives here: the table formats (CSV / TSV / Parquet / JSONL, ``.gz`` for the text ones) and how a file or a
folder, glob or list of them is found (``_table_files``), read row by row (``_iter_rows``; Parquet in batches, never
whole) and checked for the needed columns (``_table_columns``); cell values turned into our types
(``_text_value``, ``_number_value``); image bytes from a path, raw bytes or a Hugging Face
``{"bytes", "path"}`` struct (``_image_bytes``), URLs refused (``_image_url``, ``_url_error``), and the
full decode that keeps or re-encodes an image (``_encode_image``, by ``gcl.data.image``'s rules).

A bad value raises ``_Bad(reason, detail)`` (one skipped row); a table or option that cannot work raises
``PrepareError``. The code here also runs in prepare's worker processes: plain data in, plain data out.

Not here: the field mapping, keys, splits and required fields of a row, the worker pool, the shard writing
and the CLI (``gcl.data.prepare``).
"""
from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import io
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from gcl.data.image import RGB, WHITE, to_rgb, upright

FORMATS: tuple[str, ...] = ("csv", "tsv", "parquet", "jsonl")
DEFAULT_JPEG_QUALITY = 95
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_EXIF_ORIENTATION = 0x0112
_PARQUET_BATCH_ROWS = 256  # rows carry image bytes: keep a batch to tens of MB
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
             ".jsonl": "jsonl", ".ndjson": "jsonl"}


class PrepareError(ValueError):
    """The table or the options cannot be turned into shards; the message names the problem and the fix."""


class _Bad(Exception):
    """A bad row: ``reason`` is one of ``gcl.data.prepare.REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Unparsable:
    """Stands in for a row the reader could not parse."""

    def __init__(self, detail: str) -> None:
        self.detail = detail


# ------------------------------------------------------------------------------------------ cell values


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


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


# ------------------------------------------------------------------------------------------------ images


def _url_error(column: str, value: str) -> str:
    return (f"image column {column!r} holds a URL ({_short(value, 80)}); gcl.data.prepare never downloads "
            "images. Run the same command as `python -m gcl.data.download ...` instead: it fetches the URLs "
            "(resumably, failures counted and listed) and writes the same shards.")


def _image_bytes(image_column: str, images_root: Path, value: Any) -> bytes:
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
        raise _Bad("missing_image", f"no image in column {image_column!r}")
    if not isinstance(value, str):
        raise _Bad("unreadable_image", f"image column {image_column!r} holds "
                                       f"{type(value).__name__} {_short(value)}: expected a path or bytes")
    path = Path(value.strip()).expanduser()
    if not path.is_absolute():
        path = images_root / path
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


def _encode_image(data: bytes, resize: int | None, jpeg_quality: int | None,
                  background: RGB = WHITE) -> tuple[bytes, str, bool]:
    """Decode ``data`` fully, then keep it or re-encode it. Returns (bytes, extension, re-encoded?).

    A re-encoded image is what every loader would make of the original (``gcl.data.image``: upright,
    transparency on ``background``, 16-bit scaled, CMYK converted), shrunk to ``resize``, as RGB JPEG.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Decode every pixel now: a truncated or corrupt file must fail here, not in a training worker.
            img.load()
            fmt = img.format
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            if resize is None and jpeg_quality is None and fmt in _KEPT_FORMATS and orientation in (0, 1):
                return data, _KEPT_FORMATS[fmt], False
            # The rotation is baked in, so readers that ignore EXIF (OpenCLIP's loader) see it upright too.
            out = to_rgb(upright(img), background)
            if resize is not None:
                out.thumbnail((resize, resize), Image.Resampling.BICUBIC)  # keeps aspect, never enlarges
            buf = io.BytesIO()
            out.save(buf, format="JPEG", quality=jpeg_quality or DEFAULT_JPEG_QUALITY)
            return buf.getvalue(), "jpg", True
    except Exception as err:  # any decoder failure on user data is one bad row, not a crash
        raise _Bad("unreadable_image", f"cannot decode image ({type(err).__name__}: {err})") from None


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


Table = Path | list[Path]


def as_table(table: str | Path | Sequence[str | Path]) -> Table:
    """A table argument as a path (file, folder or glob) or a list of file paths."""
    if isinstance(table, (str, Path)):
        return Path(table).expanduser()
    return [Path(p).expanduser() for p in table]


def table_root(table: Table) -> Path:
    """The folder relative image paths start from by default: the table's folder (the first file's)."""
    first = table[0] if isinstance(table, list) else table
    if isinstance(table, Path) and _is_glob(table):
        return first.parent
    return first if first.is_dir() else first.parent


def _is_glob(path: Path) -> bool:
    return any(c in str(path) for c in "*?[") and not path.exists()


def _listed_files(files: list[Path], what: str, input_format: str | None) -> tuple[list[Path], str]:
    if not files:
        raise PrepareError(f"{what} names no table file")
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise PrepareError(f"table file {missing[0]} does not exist ({what})")
    formats = sorted({_detect_format(p, input_format) for p in files})
    if len(formats) != 1:
        raise PrepareError(f"{what} mixes table formats {formats}; give files of one format or pass --format")
    return files, formats[0]


def _table_files(table: Table, input_format: str | None) -> tuple[list[Path], str]:
    """The input files and their one format: a file, every file of the format in a folder, the matches of a
    glob (``data/train-*.parquet``; sorted), or a list of files (in its order)."""
    if isinstance(table, list):
        return _listed_files(table, f"the list of {len(table)} files", input_format)
    if _is_glob(table):
        return _listed_files(sorted(Path(p) for p in glob.glob(str(table))), f"pattern {table}", input_format)
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
