"""Catalog tables whose images are URLs -> webdataset shards: fetch over HTTP(S), then ``prepare``'s row logic.

    python -m gcl.data.download products.csv shards/ --image-column image_url \\
        --field title=name --field description=desc --field categories=category --key-column sku --resize 512

Everything ``python -m gcl.data.prepare`` accepts works the same here (field mapping, keys, splits, lists,
``--resize`` / ``--jpeg-quality``); the only difference is that an image value that is an ``http(s)://`` URL
(or a Hugging Face ``{"bytes": None, "path": URL}`` struct) is downloaded first. Local paths and embedded
bytes in the same column pass through unchanged. The fetched bytes then go through exactly the row code of
``gcl.data.prepare``, so fields, keys and image decoding / re-encoding are identical to a local ``prepare``.

What lives here (and what does not): the HTTP fetch with its limits and failure reasons, the chunked,
resumable job over the table, and the CLI. Table reading and image encoding are ``gcl.data.read``'s, the
per-row mapping (fields, keys, splits) and the shared CLI options ``gcl.data.prepare``'s, shard files
``gcl.data.shards.ShardWriter``'s.

Contracts:

* **Chunks and resume.** Table rows are cut into chunks of ``per_shard`` rows; chunk ``c`` becomes
  ``shard-<c>.tar`` (one per split folder with ``split_column``), so a shard holds at most ``per_shard``
  samples (fewer when rows are rejected) and shard numbers may have gaps when a chunk keeps no row of a
  split. A chunk is written to a staging folder, moved into place, and only then recorded in
  ``OUT_DIR/.download/chunk-<c>.json``. A rerun after an interruption (even SIGKILL) keeps every recorded
  chunk and fetches only the rest. ``.download/job.json`` fingerprints the table and the options that shape
  the output; a rerun with a changed table or such an option refuses and names what changed
  (``--overwrite`` starts over). Timeouts, retries, threads and the rate limit may change between runs.
* **Failures** are counted per reason (``REASONS``: the fetch reasons below plus ``prepare``'s row reasons)
  and every rejected row is listed in ``reject_file`` (default ``OUT_DIR/rejects.jsonl``) as JSON lines
  ``{"row", "key", "url", "reason", "detail"}`` in row order, resumed chunks included.
  ``not_found`` (HTTP 404/410), ``http_error`` (other 4xx/5xx), ``timeout`` (connect, a read, or the whole
  response beyond ``total_timeout``), ``connection_error``, ``too_many_redirects``, ``too_large`` (more than
  ``max_bytes`` bytes, declared or streamed, or more than ``max_pixels`` pixels), ``not_an_image`` (the bytes
  are no image format Pillow knows, e.g. an HTML error page), ``truncated`` (the transfer ended early, or
  the image header is fine but its pixel data is cut off or corrupt), ``opted_out`` (the server sent
  ``X-Robots-Tag: noai`` / ``noimageai``; ``respect_noai=False`` ignores it), ``bad_url``.
  Timeouts, connection errors, 429 and 5xx are retried ``retries`` times with exponential back-off.
* **Politeness.** ``threads`` concurrent requests in all, at most ``max_rps`` requests per second when set,
  one ``requests.Session`` per thread (connection reuse), a ``gcl`` User-Agent.
* **Fields.** The sample JSON holds the mapped fields exactly as ``prepare`` writes them, plus ``image_url``
  (where the picture came from).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from gcl import __version__
from gcl.data import prepare as P
from gcl.data import read as R
from gcl.data.shards import ShardWriter

log = logging.getLogger(__name__)

FETCH_REASONS: tuple[str, ...] = (
    "bad_url", "not_found", "http_error", "timeout", "connection_error", "too_many_redirects", "too_large",
    "not_an_image", "truncated", "opted_out",
)
# prepare's "unreadable_image" becomes "truncated" here: the header decoded (else it is "not_an_image"),
# so a failure to decode the pixels means cut-off or corrupt image data.
REASONS: tuple[str, ...] = FETCH_REASONS + tuple(r for r in P.REASONS if r != "unreadable_image")
STATE_DIR = ".download"
JOB_VERSION = 1
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_READ_BLOCK = 64 * 1024
_MAX_BACKOFF = 30.0
_USER_AGENT = f"gcl/{__version__} image downloader (python-requests)"
_NOAI = ("noai", "noimageai")
# Leading bytes of the formats prepare keeps; bytes that start like one but do not parse are a cut-off file.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "JPEG"), (0, b"\x89PNG\r\n\x1a\n", "PNG"), (0, b"GIF87a", "GIF"), (0, b"GIF89a", "GIF"),
    (8, b"WEBP", "WEBP"),
)


class DownloadError(R.PrepareError):
    """Options, table or output folder that cannot work; the message names the problem and the fix."""


@dataclass(frozen=True)
class FetchOptions:
    """How one image is fetched. Sizes in bytes / pixels, times in seconds."""

    timeout: float = 10.0  # connect, and each read of the response
    total_timeout: float = 60.0  # the whole response, redirects included
    retries: int = 2  # extra attempts after a timeout / connection error / 408 / 429 / 5xx
    backoff: float = 1.0  # first retry waits this long, then 2x, 4x, ... (capped at 30 s; Retry-After wins)
    max_bytes: int = 20_000_000
    max_pixels: int = 50_000_000
    max_redirects: int = 5
    max_rps: float = 0.0  # requests per second over all threads (0 = unlimited)
    respect_noai: bool = True
    user_agent: str = _USER_AGENT

    def check(self) -> None:
        for name in ("timeout", "total_timeout"):
            if getattr(self, name) <= 0:
                raise DownloadError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("retries", "max_redirects", "backoff", "max_rps"):
            if getattr(self, name) < 0:
                raise DownloadError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise DownloadError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class DownloadReport:
    """What ``download`` did. Counts cover the whole job (chunks kept from an earlier run included);
    ``fetched`` and ``chunks_resumed`` tell this run apart. ``shards`` holds per split a brace pattern
    (or the folder, when chunk numbers have gaps) ready for ``data.train_shards=``."""

    out_dir: Path
    rows: int = 0
    written: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    shards: dict[str, str] = field(default_factory=dict)
    chunks: int = 0
    chunks_resumed: int = 0
    fetched: int = 0
    reject_file: Path | None = None
    seconds: float = 0.0

    @property
    def total_written(self) -> int:
        return sum(self.written.values())

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


# ------------------------------------------------------------------------------------------------ fetching


class _Fail(Exception):
    """A failed fetch: ``reason`` is one of FETCH_REASONS; ``retry`` marks transient failures."""

    def __init__(self, reason: str, detail: str, retry: bool = False, wait: float | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.retry, self.wait = reason, detail, retry, wait


class _RateLimit:
    """At most ``rps`` request starts per second across threads (evenly spaced)."""

    def __init__(self, rps: float) -> None:
        self.interval = 1.0 / rps if rps > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class Fetcher:
    """Fetches image bytes by URL with the limits of ``FetchOptions``; thread-safe (a session per thread)."""

    def __init__(self, opts: FetchOptions) -> None:
        import requests

        self.requests = requests
        self.opts = opts
        self.rate = _RateLimit(opts.max_rps)
        self._local = threading.local()
        self.attempts = 0  # HTTP attempts made (retries included)
        self._count_lock = threading.Lock()

    def _session(self) -> Any:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self.requests.Session()
            s.max_redirects = self.opts.max_redirects
            s.headers["User-Agent"] = self.opts.user_agent
            self._local.session = s
        return s

    def fetch(self, url: str) -> bytes:
        """The response body of ``url`` after retries; raises ``_Fail`` with the reason of the last attempt."""
        if not url.lower().startswith(("http://", "https://")):
            raise _Fail("bad_url", f"{R._short(url, 80)} is not an http(s) URL")
        for attempt in range(self.opts.retries + 1):
            try:
                return self._attempt(url)
            except _Fail as fail:
                if not fail.retry or attempt == self.opts.retries:
                    raise
                delay = fail.wait if fail.wait is not None else self.opts.backoff * 2 ** attempt
                time.sleep(min(delay, _MAX_BACKOFF))
        raise AssertionError("unreachable")

    def _attempt(self, url: str) -> bytes:
        req, opts = self.requests, self.opts
        self.rate.wait()
        with self._count_lock:
            self.attempts += 1
        start = time.monotonic()
        try:
            with self._session().get(url, stream=True, timeout=(opts.timeout, opts.timeout)) as r:
                self._check_response(r)
                return self._read_body(r, start)
        except req.TooManyRedirects:
            raise _Fail("too_many_redirects", f"more than {opts.max_redirects} redirects") from None
        except (req.ConnectTimeout, req.ReadTimeout):
            raise _Fail("timeout", f"no response within {opts.timeout:g} s", retry=True) from None
        except (req.exceptions.ChunkedEncodingError, req.exceptions.ContentDecodingError) as err:
            raise _Fail("truncated", f"the transfer ended before the body was complete ({_first_line(err)})",
                        retry=True) from None
        except (req.exceptions.InvalidURL, req.exceptions.MissingSchema, req.exceptions.InvalidSchema) as err:
            raise _Fail("bad_url", _first_line(err)) from None
        except req.ConnectionError as err:
            raise _Fail("connection_error", _first_line(err), retry=True) from None
        except req.RequestException as err:  # anything else requests reports is this URL's failure, not ours
            raise _Fail("connection_error", _first_line(err)) from None

    def _check_response(self, r: Any) -> None:
        opts = self.opts
        if r.status_code in (404, 410):
            raise _Fail("not_found", f"HTTP {r.status_code} {r.reason}")
        if r.status_code >= 400:
            wait = _retry_after(r.headers.get("Retry-After"))
            raise _Fail("http_error", f"HTTP {r.status_code} {r.reason}", retry=r.status_code in _RETRY_STATUS,
                        wait=wait)
        robots = r.headers.get("X-Robots-Tag", "").lower()
        if opts.respect_noai and any(tag in robots for tag in _NOAI):
            raise _Fail("opted_out", f"X-Robots-Tag: {robots} (pass --ignore-noai to download anyway)")
        declared = r.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > opts.max_bytes:
            raise _Fail("too_large", f"Content-Length {declared} > max_bytes {opts.max_bytes}")

    def _read_body(self, r: Any, start: float) -> bytes:
        opts = self.opts
        buf = bytearray()
        for block in r.iter_content(_READ_BLOCK):
            buf += block
            if len(buf) > opts.max_bytes:
                raise _Fail("too_large", f"more than max_bytes {opts.max_bytes} bytes")
            if time.monotonic() - start > opts.total_timeout:
                raise _Fail("timeout", f"the response took more than total_timeout {opts.total_timeout:g} s",
                            retry=True)
        if not buf:
            raise _Fail("not_an_image", f"empty body (HTTP {r.status_code})")
        return bytes(buf)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def check_image(data: bytes, max_pixels: int) -> None:
    """Raise ``_Fail`` unless ``data`` starts like an image Pillow knows, of at most ``max_pixels`` pixels.
    Reads the header only; ``prepare`` decodes every pixel afterwards."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Image.DecompressionBombError as err:
        raise _Fail("too_large", str(err)) from None
    except Exception:  # noqa: BLE001 - UnidentifiedImageError and friends: not an image we can read
        fmt = next((name for at, sig, name in _SIGNATURES if data[at:at + len(sig)] == sig), None)
        if fmt is not None:
            raise _Fail("truncated", f"{len(data)} bytes that start like a {fmt} but whose header does not "
                                     "parse") from None
        raise _Fail("not_an_image", f"{len(data)} bytes starting {data[:24]!r}") from None
    if w * h > max_pixels:
        raise _Fail("too_large", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")


# --------------------------------------------------------------------------------------------- one row


@dataclass
class _Row:
    """One processed table row: the prepare result plus where its image came from."""

    index: int
    result: Any  # P._Sample | P._Reject
    url: str | None


def _process(fetcher: Fetcher, settings: Any, index: int, row: Any) -> _Row:
    """Fetch the row's image when it is a URL, then run prepare's row logic on the bytes."""
    if isinstance(row, R._Unparsable):
        return _Row(index, P._process_row(settings, index, row), None)
    url = R._image_url(row.get(settings.image_column))
    if url is not None:
        try:
            data = fetcher.fetch(url)
            check_image(data, fetcher.opts.max_pixels)
        except _Fail as fail:
            key = _raw_key(settings, index, row)
            return _Row(index, P._Reject(key, fail.reason, fail.detail), url)
        row = dict(row)
        row[settings.image_column] = data
    result = P._process_row(settings, index, row)
    if isinstance(result, P._Fatal):  # only URLs are fatal in prepare, and they were replaced above
        raise DownloadError(result.message)
    if isinstance(result, P._Reject) and result.reason == "unreadable_image":
        result = P._Reject(result.key, "truncated", result.detail)
    if isinstance(result, P._Sample) and url is not None:
        result.fields.setdefault("image_url", url)
    return _Row(index, result, url)


def _raw_key(settings: Any, index: int, row: dict[str, Any]) -> str | None:
    """The row's key as prepare reports it in rejects (before sanitising), for a row whose image failed."""
    if settings.key_column is None:
        return f"{index:09d}"
    raw = row.get(settings.key_column)
    return None if R._is_missing(raw) or not str(raw).strip() else str(raw).strip()


# ------------------------------------------------------------------------------------------- job state


@dataclass
class _Chunk:
    """Rows ``[start, stop)`` of the table, written as ``shard-<index>.tar`` per split."""

    index: int
    start: int
    rows: list[tuple[int, Any]]

    @property
    def stop(self) -> int:
        return self.start + len(self.rows)


class _Job:
    """The output folder's state: ``.download/job.json`` and one record per finished chunk."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.dir = out_dir / STATE_DIR
        self.records: dict[int, dict[str, Any]] = {}

    def record_path(self, chunk: int) -> Path:
        return self.dir / f"chunk-{chunk:06d}.json"

    def open(self, fingerprint: dict[str, Any], overwrite: bool) -> None:
        """Start a new job or resume the one in ``out_dir``; refuse a resume whose inputs changed."""
        job_file = self.dir / "job.json"
        if overwrite:
            self._clear()
        elif job_file.exists():
            # through JSON first: the stored copy has lists where the fresh one has tuples
            old, new = _flat(json.loads(job_file.read_text())), _flat(json.loads(json.dumps(fingerprint)))
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if changed:
                raise DownloadError(
                    f"{self.out_dir} holds an earlier download of another table or with other options (changed: "
                    f"{', '.join(changed)}); rerun with the same table and options to resume it, or pass "
                    "--overwrite to start over")
        else:
            existing = P._existing_outputs(self.out_dir)
            if existing:
                raise DownloadError(f"{self.out_dir} already holds shards ({existing[0]}, ...) that no download "
                                    "job wrote; pass --overwrite to replace them or choose an empty folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_text(job_file, json.dumps(fingerprint, indent=1, sort_keys=True))
        for p in self.dir.glob("stage-*"):  # leftovers of a chunk interrupted mid-write
            shutil.rmtree(p, ignore_errors=True)
        for p in sorted(self.dir.glob("chunk-*.json")):
            rec = json.loads(p.read_text())
            self.records[rec["chunk"]] = rec

    def _clear(self) -> None:
        for path in P._existing_outputs(self.out_dir):
            path.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)

    def done(self, chunk: _Chunk) -> bool:
        rec = self.records.get(chunk.index)
        return rec is not None and rec["start"] == chunk.start and rec["stop"] == chunk.stop

    def commit(self, chunk: _Chunk, rows: list[_Row]) -> dict[str, Any]:
        """Write the chunk's shards (staged, then moved into place), then its record."""
        stage = self.dir / f"stage-{chunk.index:06d}"
        shutil.rmtree(stage, ignore_errors=True)
        writers: dict[str, ShardWriter] = {}
        rejects, skipped, keys = [], Counter(), []
        for r in rows:
            res = r.result
            if isinstance(res, P._Reject):
                skipped[res.reason] += 1
                rejects.append({"row": r.index, "key": res.key, "url": r.url, "reason": res.reason,
                                "detail": res.detail})
                continue
            w = writers.get(res.split)
            if w is None:
                w = writers[res.split] = ShardWriter(stage / f"s{res.split}", per_shard=len(chunk.rows) + 1)
            w.write(res.key, res.image, res.ext, res.fields)
            keys.append(res.key)
        written = {}
        name = f"shard-{chunk.index:06d}.tar"
        self._drop(chunk.index)  # a chunk redone with more rows (a larger max_rows) replaces its old shards
        for split, w in sorted(writers.items()):
            w.close()
            dst = self.out_dir / split
            dst.mkdir(parents=True, exist_ok=True)
            os.replace(stage / f"s{split}" / "shard-000000.tar", dst / name)
            written[split] = w.total
        shutil.rmtree(stage, ignore_errors=True)
        rec = {"chunk": chunk.index, "start": chunk.start, "stop": chunk.stop, "shard": name,
               "written": written, "skipped": dict(skipped), "rejects": rejects, "keys": keys}
        _atomic_text(self.record_path(chunk.index), json.dumps(rec, ensure_ascii=False))
        self.records[chunk.index] = rec
        return rec

    def _drop(self, chunk: int) -> None:
        """Delete a chunk's shards and record."""
        rec = self.records.pop(chunk, None)
        if rec is None:
            return
        self.record_path(chunk).unlink(missing_ok=True)
        for split in rec["written"]:
            (self.out_dir / split / rec["shard"]).unlink(missing_ok=True)

    def finish(self, n_chunks: int, reject_file: Path) -> DownloadReport:
        """Write ``sizes.json`` per split and the reject file from the records of chunks ``< n_chunks``
        (chunks beyond, left by an earlier run over more rows, are deleted: the output is this run's rows)."""
        for c in [c for c in self.records if c >= n_chunks]:
            self._drop(c)
        report = DownloadReport(out_dir=self.out_dir, chunks=n_chunks, reject_file=reject_file)
        sizes: dict[str, dict[str, int]] = {}
        skipped: Counter[str] = Counter()
        tmp = reject_file.with_name(f".{reject_file.name}.tmp")
        reject_file.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            for c in range(n_chunks):
                rec = self.records[c]
                report.rows += rec["stop"] - rec["start"]
                for split, n in rec["written"].items():
                    sizes.setdefault(split, {})[rec["shard"]] = n
                skipped.update(rec["skipped"])
                for line in rec["rejects"]:
                    fh.write(json.dumps(line, ensure_ascii=False) + "\n")
        os.replace(tmp, reject_file)
        for split, table in sorted(sizes.items()):
            folder = self.out_dir / split
            _atomic_text(folder / "sizes.json", json.dumps(dict(sorted(table.items())), indent=1))
            report.written[split] = sum(table.values())
            report.shards[split] = _pattern(folder, sorted(table))
        report.skipped = dict(skipped)
        return report


def _flat(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"options": {"resize": 8}}`` -> ``{"options.resize": 8}``."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _pattern(folder: Path, names: list[str]) -> str:
    """A brace pattern over ``names`` (``shard-NNNNNN.tar``) when they are consecutive, else the folder."""
    numbers = [int(n[len("shard-"):-len(".tar")]) for n in names]
    if len(numbers) == 1:
        return str(folder / names[0])
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return str(folder / f"shard-{{{numbers[0]:06d}..{numbers[-1]:06d}}}.tar")
    return str(folder)


def _fingerprint(files: list[Path], options: dict[str, Any]) -> dict[str, Any]:
    """What must not change between an interrupted run and its resume."""
    table = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return {"version": JOB_VERSION, "table": table, "options": options}


# -------------------------------------------------------------------------------------------- the driver


def _chunks(rows: Iterator[tuple[int, Any]], per_shard: int) -> Iterator[_Chunk]:
    chunk = _Chunk(0, 0, [])
    for index, row in rows:
        chunk.rows.append((index, row))
        if len(chunk.rows) == per_shard:
            yield chunk
            chunk = _Chunk(chunk.index + 1, index + 1, [])
    if chunk.rows:
        yield chunk


def download(
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
    reject_file: str | Path | None = None,
    input_format: str | None = None,
    fetch: FetchOptions | None = None,
    threads: int = 16,
    max_rows: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> DownloadReport:
    """Download the images of ``table`` and write the rows as shards under ``out_dir`` (module docstring).

    Arguments shared with :func:`gcl.data.prepare.prepare` mean the same; ``per_shard`` counts table rows.
    ``fetch`` sets the HTTP limits, ``threads`` the concurrent requests, ``reject_file`` defaults to
    ``out_dir/rejects.jsonl``. Returns a DownloadReport; raises DownloadError (a PrepareError) for bad
    options, columns, or a resume whose table/options changed.
    """
    start = time.perf_counter()
    fetch = fetch or FetchOptions()
    fetch.check()
    if threads < 1:
        raise DownloadError(f"threads must be >= 1, got {threads}")
    out_dir = Path(out_dir)
    # workers=0: no prepare worker processes here; the fetch threads run prepare's row code themselves.
    source = P._open_table(table, input_format, fields, image_column, images_root, key_column, split_column,
                           per_shard, resize, jpeg_quality, image_background, list_sep, list_fields, required, 0,
                           max_rows)
    settings = source.settings
    options = {"settings": {k: (sorted(v) if isinstance(v, frozenset) else v)
                            for k, v in asdict(settings).items() if k != "images_root"},
               "images_root": str(settings.images_root), "per_shard": per_shard, "format": source.fmt,
               "max_bytes": fetch.max_bytes, "max_pixels": fetch.max_pixels, "max_redirects": fetch.max_redirects,
               "respect_noai": fetch.respect_noai}
    job = _Job(out_dir)
    job.open(_fingerprint(source.files, options), overwrite)
    fetcher = Fetcher(fetch)
    bar = tqdm(total=source.total, unit=" rows", desc="download", disable=not progress, dynamic_ncols=True)
    n_chunks = resumed = 0
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="gcl-download") as pool:
            n_chunks, resumed = _run_chunks(job, _chunks(source.rows(), per_shard), pool, fetcher, settings, bar)
    finally:
        bar.close()
    report = job.finish(n_chunks, Path(reject_file) if reject_file is not None else out_dir / "rejects.jsonl")
    report.chunks_resumed, report.fetched = resumed, fetcher.attempts
    report.seconds = time.perf_counter() - start
    if not report.total_written:
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(report.skipped.items()))
        raise DownloadError(f"no sample written: the table has {report.rows} rows"
                            + (f", all skipped ({reasons}); see {report.reject_file}" if reasons else ""))
    _log_summary(report)
    return report


def _run_chunks(job: _Job, chunks: Iterator[_Chunk], pool: ThreadPoolExecutor, fetcher: Fetcher, settings: Any,
                bar: Any) -> tuple[int, int]:
    """Fetch and write every chunk not done yet; two chunks in flight so a slow URL does not idle the pool.
    Returns (chunks in the table, chunks kept from an earlier run)."""
    seen_keys: set[str] = {k for rec in job.records.values() for k in rec["keys"]}
    in_flight: deque[tuple[_Chunk, list[Future]]] = deque()
    n_chunks = resumed = 0

    def drain_one() -> None:
        chunk, futures = in_flight.popleft()
        rows = [_dedupe(f.result(), seen_keys) for f in futures]
        job.commit(chunk, rows)
        bar.update(len(rows))

    try:
        for chunk in chunks:
            n_chunks += 1
            if job.done(chunk):
                resumed += 1
                bar.update(len(chunk.rows))
                continue
            in_flight.append((chunk, [pool.submit(_process, fetcher, settings, i, r) for i, r in chunk.rows]))
            if len(in_flight) >= 2:
                drain_one()
        while in_flight:
            drain_one()
    except BaseException:
        for _, futures in in_flight:  # Ctrl-C: do not fetch the rest of the queued rows before exiting
            for f in futures:
                f.cancel()
        raise
    return n_chunks, resumed


def _dedupe(row: _Row, seen: set[str]) -> _Row:
    """Keys must be unique over the whole output, as in prepare (rows are visited in table order)."""
    res = row.result
    if isinstance(res, P._Sample):
        if res.key in seen:
            row.result = P._Reject(res.key, "duplicate_key", f"key {res.key!r} appeared in an earlier row")
        else:
            seen.add(res.key)
    return row


def _log_summary(report: DownloadReport) -> None:
    log.info("downloaded %d samples from %d rows in %.1f s (%d HTTP requests this run, %d of %d chunks kept "
             "from an earlier run) into %s", report.total_written, report.rows, report.seconds, report.fetched,
             report.chunks_resumed, report.chunks, report.out_dir)
    for split in sorted(report.written):
        log.info("  %s%d samples: %s", f"split {split!r}: " if split else "", report.written[split],
                 report.shards[split])
    if report.skipped:
        log.warning("skipped %d rows (listed in %s):", report.total_skipped, report.reject_file)
        for reason in sorted(report.skipped):
            log.warning("  %s: %d", reason, report.skipped[reason])


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gcl.data.download",
        description="Download the image URLs of a CSV / TSV / Parquet / JSONL catalog and write gcl webdataset "
                    "shards: the options of python -m gcl.data.prepare, plus HTTP limits. An interrupted run "
                    "resumes: run the same command again. Rejected rows: OUT_DIR/rejects.jsonl.",
        epilog="example: python -m gcl.data.download products.csv shards/ --image-column image_url "
               "--field title=name --field categories=category --key-column sku --resize 512 --threads 32")
    P.add_table_arguments(p, table_help="table file, a folder of table files of one format, or a quoted glob; "
                                        "--image-column holds URLs (local paths and bytes pass through)")
    d = FetchOptions()
    g = p.add_argument_group("HTTP")
    g.add_argument("--threads", type=int, default=16, help="concurrent requests (default: 16)")
    g.add_argument("--timeout", type=float, default=d.timeout,
                   help=f"seconds to connect, and per read (default: {d.timeout:g})")
    g.add_argument("--total-timeout", type=float, default=d.total_timeout,
                   help=f"seconds for a whole response (default: {d.total_timeout:g})")
    g.add_argument("--retries", type=int, default=d.retries,
                   help=f"extra attempts after a timeout, connection error, 408, 429 or 5xx (default: {d.retries})")
    g.add_argument("--backoff", type=float, default=d.backoff,
                   help=f"first retry delay in seconds, doubling; Retry-After wins (default: {d.backoff:g})")
    g.add_argument("--max-bytes", type=int, default=d.max_bytes, help=f"largest response (default: {d.max_bytes})")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"largest image, width x height (default: {d.max_pixels})")
    g.add_argument("--max-redirects", type=int, default=d.max_redirects, help=f"(default: {d.max_redirects})")
    g.add_argument("--max-rps", type=float, default=0.0, help="requests per second, all threads (default: no limit)")
    g.add_argument("--ignore-noai", action="store_true",
                   help="download even when the server sends X-Robots-Tag: noai / noimageai")
    g.add_argument("--user-agent", default=d.user_agent, help="User-Agent header")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns 0 on success. Errors exit with status 2 and a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = P.table_options(args, parser)
    fetch = FetchOptions(timeout=args.timeout, total_timeout=args.total_timeout, retries=args.retries,
                         backoff=args.backoff, max_bytes=args.max_bytes, max_pixels=args.max_pixels,
                         max_redirects=args.max_redirects, max_rps=args.max_rps,
                         respect_noai=not args.ignore_noai, user_agent=args.user_agent)
    try:
        download(args.table, args.out_dir, fetch=fetch, threads=args.threads, **options)
    except R.PrepareError as err:
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
