"""Build-once folders in a shared cache: a generated dataset appears complete under its final name or not at all.

Used by the generated datasets (the world, ``gcl.data.world``; the fashion catalog, ``gcl.data.catalog``);
safe for concurrent callers (ranks, loader workers, jobs sharing a file system).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX flock); a no-op where flock is unavailable (the rename stays safe)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_once(cache_dir: str | os.PathLike, name: str, marker: str, build: Callable[[Path, Path], None]) -> Path:
    """Return ``cache_dir/name``, calling ``build(tmp_dir, final_dir)`` first when it lacks the file ``marker``.

    ``build`` writes everything into ``tmp_dir`` (``final_dir`` is where it will live, for absolute paths in
    its metadata); the folder is then moved into place with one ``os.replace``. A per-name file lock makes
    concurrent callers wait instead of building twice; a caller that loses the rename race anyway (locks
    that do not work across hosts) deletes its copy and uses the winner's.
    """
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / name
    if (final / marker).is_file():
        return final
    with file_lock(cache / f".{name}.lock"):
        if (final / marker).is_file():
            return final
        tmp = cache / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            build(tmp, final)
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / marker).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
