"""Object-storage URLs (``s3://``, ``gs://``, ``az://``, ... through fsspec): check access, list, move files.

Lives here: telling remote URLs from local paths, one access check that fails at once with the URL and the
fix (missing bucket or object, rejected or missing credentials, unreachable endpoint, backend not
installed), listing shard files under a prefix, and whole-file transfers (``get_file`` is atomic on the
local side; an object store's PUT is atomic on the remote side). Not here: reading tar shards (done in
``gcl.data.shards``: fsspec streams them), and what the trainer mirrors and when (``gcl.remote``).

Credentials and endpoints come from where each backend normally reads them; nothing is passed in code.
For S3 (s3fs / botocore): ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE``, or an
instance role), and ``AWS_ENDPOINT_URL`` for S3-compatible servers (MinIO, Ceph, R2, a local moto server).
"""
from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

S3_FIX = ("give credentials that may read it: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
          "and for an S3-compatible server (MinIO, R2, Ceph) its address in AWS_ENDPOINT_URL")
_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs"}
# Checks should answer in seconds, not after botocore's and s3fs's retry ladders (~10 s on a dead endpoint).
_FAST_S3 = {"config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 5, "read_timeout": 20}}


class StorageError(RuntimeError):
    """A remote URL that cannot be used; the message names the URL, what went wrong and the fix."""


def is_remote(url: str) -> bool:
    """True for ``scheme://`` URLs other than ``file://`` (``pipe:`` and local paths are not remote)."""
    scheme = urlparse(str(url)).scheme
    return len(scheme) > 1 and scheme != "file" and not str(url).startswith("pipe:")


def _protocol(url: str) -> str:
    return urlparse(url).scheme


def filesystem(url: str, *, fail_fast: bool = False) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` for ``url``. ``fail_fast`` gives a fresh instance with short
    retries, for checks. Raises StorageError when the backend package is missing."""
    import fsspec

    proto = _protocol(url)
    try:
        if fail_fast and proto in ("s3", "s3a"):
            fs = fsspec.filesystem(proto, skip_instance_cache=True, **_FAST_S3)
            return fs, fs._strip_protocol(url)
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        pkg = _BACKENDS.get(proto, f"the fsspec backend for {proto!r}")
        extra = " (pip install 'gcl[s3]')" if pkg == "s3fs" else ""
        raise StorageError(f"{url}: reading {proto}:// URLs needs {pkg}, which is not installed{extra}; "
                           f"install it ({err})") from None
    except ValueError as err:
        raise StorageError(f"{url}: {err}") from None


def endpoint(fs: Any) -> str:
    """The server an fsspec filesystem talks to, for messages."""
    for value in (getattr(fs, "endpoint_url", None), getattr(fs, "client_kwargs", {}).get("endpoint_url"),
                  os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL")):
        if value:
            return str(value)
    return "the provider's default endpoint"


def explain(url: str, err: BaseException, fs: Any = None, *, write: bool = False) -> str:
    """One message for a failed access to ``url``: what happened, at which server, and the fix."""
    proto = _protocol(url)
    where = f" at {endpoint(fs)}" if fs is not None and proto in ("s3", "s3a") else ""
    bucket = urlparse(url).netloc
    text = f"{type(err).__name__}: {err}".strip()
    name = type(err).__name__
    if isinstance(err, FileNotFoundError):
        if fs is not None and not _exists(fs, bucket):
            return (f"{url}: the bucket {bucket!r} does not exist{where}. Create it (e.g. `aws s3 mb "
                    f"{proto}://{bucket}`), or fix the bucket name in the URL")
        if write:
            return f"{url}: cannot write there{where} ({text}); check the prefix"
        return (f"{url} does not exist{where} (the bucket {bucket!r} does). Check the path and brace range, or "
                f"upload the shards first (e.g. `aws s3 cp --recursive SHARD_DIR {proto}://{bucket}/PREFIX/`)")
    if isinstance(err, PermissionError) or name in ("NoCredentialsError", "PartialCredentialsError"):
        fix = S3_FIX if proto in ("s3", "s3a") else "give credentials that may access it"
        verb = "write" if write else "read"
        return f"{url}: access denied{where} ({text}). Fix: {fix}, with permission to {verb} this prefix"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or isinstance(
            err, (ConnectionError, TimeoutError)):
        return (f"{url}: cannot reach the storage server{where} ({text}). Check the network, and for an "
                "S3-compatible server that AWS_ENDPOINT_URL holds its address (e.g. http://127.0.0.1:9000)")
    return f"{url}: {text}"


def _exists(fs: Any, path: str) -> bool:
    try:
        return bool(fs.exists(path))
    except Exception:  # noqa: BLE001 - only used to choose a message; the caller reports the real error
        return True


def check_readable(url: str) -> None:
    """Raise StorageError now (not in a DataLoader worker, not after retries) unless ``url`` can be read."""
    fs, path = filesystem(url, fail_fast=True)
    try:
        fs.info(path)
    except Exception as err:  # noqa: BLE001 - every failure becomes one message with the fix
        raise StorageError(explain(url, _detail(fs, path, err), fs)) from err


def check_writable(url: str) -> None:
    """Raise StorageError unless an object can be written (and deleted) under the prefix ``url``."""
    fs, path = filesystem(url, fail_fast=True)
    probe = posixpath.join(path.rstrip("/"), f".gcl-write-check-{os.getpid()}")
    try:
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as err:  # noqa: BLE001
        raise StorageError(explain(url, _detail(fs, path, err), fs, write=True)) from err


def _detail(fs: Any, path: str, err: BaseException) -> BaseException:
    """HEAD answers a bad key with a bare 403 'Forbidden'; a listing call returns the server's reason
    (InvalidAccessKeyId, SignatureDoesNotMatch...), which tells the user which half of the key is wrong."""
    if isinstance(err, PermissionError) and str(err).strip() in ("Forbidden", ""):
        try:
            fs.ls(path.split("/", 1)[0], detail=False)
        except PermissionError as better:
            return better
        except Exception:  # noqa: BLE001 - keep the original error
            return err
    return err


def check_shards(urls: list[str]) -> None:
    """Fail now, naming the URL and the fix, unless the first shard is readable and every shard exists.

    One read check (bucket, credentials, endpoint), then one listing per folder to find missing shards of a
    brace range. Where listing is not allowed (a read-only key without ``s3:ListBucket``), a missing shard
    is reported when the loader reaches it instead."""
    check_readable(urls[0])
    by_folder: dict[str, list[str]] = {}
    for u in urls:
        by_folder.setdefault(posixpath.dirname(u), []).append(posixpath.basename(u))
    for folder, names in by_folder.items():
        try:
            present = set(listdir(folder))
        except StorageError:
            return
        missing = [n for n in names if n not in present]
        if missing:
            raise StorageError(f"{len(missing)} of the {len(names)} shards under {folder}/ do not exist (first: "
                               f"{folder}/{missing[0]}). Check the brace range, or upload the shards first")


def list_files(url: str, suffix: str = ".tar") -> list[str]:
    """Full URLs of the files matching a glob (``s3://b/shards/*.tar``) or lying directly under a prefix
    (``s3://b/shards/``) that end with ``suffix``, sorted. Raises StorageError when nothing matches."""
    fs, path = filesystem(url)
    proto = _protocol(url)
    try:
        if any(c in path for c in "*?["):
            found = fs.glob(path)
        else:
            found = fs.ls(path.rstrip("/"), detail=False)
    except Exception as err:  # noqa: BLE001
        raise StorageError(explain(url, err, fs)) from err
    urls = sorted(f"{proto}://{p}" for p in found if p.endswith(suffix))
    if not urls:
        raise StorageError(f"{url}: no *{suffix} files there; check the prefix, or upload the shards first")
    return urls


def get_file(url: str, local: str | os.PathLike) -> Path:
    """Download ``url`` to ``local`` atomically (temporary name, then rename); returns the local path."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
    fs, path = filesystem(url)
    try:
        fs.get_file(path, str(tmp))
        os.replace(tmp, local)
    except Exception as err:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        raise StorageError(explain(url, err, fs)) from err
    return local


def put_file(local: str | os.PathLike, url: str) -> None:
    """Upload one local file to ``url`` (the object appears complete or not at all)."""
    fs, path = filesystem(url)
    try:
        fs.put_file(str(local), path)
    except Exception as err:  # noqa: BLE001
        raise StorageError(explain(url, err, fs, write=True)) from err


def read_text(url: str) -> str | None:
    """The text of ``url``, or None when it does not exist."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001
        raise StorageError(explain(url, err, fs)) from err


def write_text(url: str, text: str) -> None:
    fs, path = filesystem(url)
    try:
        fs.pipe_file(path, text.encode("utf-8"))
    except Exception as err:  # noqa: BLE001
        raise StorageError(explain(url, err, fs, write=True)) from err


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under the prefix ``url``; empty when there is nothing."""
    fs, path = filesystem(url)
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path.rstrip("/"), detail=False))
    except FileNotFoundError:
        return []
    except Exception as err:  # noqa: BLE001
        raise StorageError(explain(url, err, fs)) from err


def remove(url: str) -> None:
    """Delete one object; a missing one is fine."""
    fs, path = filesystem(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    except Exception as err:  # noqa: BLE001
        raise StorageError(explain(url, err, fs, write=True)) from err


def join(url: str, *parts: str) -> str:
    """``join("s3://b/runs/x", "checkpoints", "a.pt")`` -> ``s3://b/runs/x/checkpoints/a.pt``."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])
