"""Mirror a run's checkpoints and export to an object-storage prefix, and get the latest checkpoint back.

``trainer.remote_sync=s3://bucket/runs/my-run`` (one prefix per run, like OpenCLIP's ``--remote-sync``) keeps
a copy of the run dir's restart state at that prefix, in the same layout::

    <prefix>/checkpoints/step_000000100.pt   uploaded after the local save, in a background thread
    <prefix>/checkpoints/latest.json         uploaded only once its step file is complete remotely
    <prefix>/checkpoints/best.pt, best.json  the same rule
    <prefix>/.hydra/*, metrics.jsonl         small run files, with every checkpoint
    <prefix>/export/...                      after the export

Remote step files that the local run pruned (``trainer.keep_last``) are deleted after each upload, so the
prefix holds what the run dir holds. ``trainer.resume=auto`` uses the local run dir's checkpoint when there is
one, else downloads the mirror's latest (a lost node, a fresh machine); a ``trainer.resume=s3://...`` path
downloads that prefix's latest (or that file).

Lives here: what is mirrored and in which order, and the way back. Not here: URL access and errors
(``gcl.storage``), the checkpoint format and local layout (``gcl.checkpoint``), when the trainer saves.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from gcl import storage
from gcl.checkpoint import BEST, LATEST, MANIFEST_SUFFIX, atomic_write_json

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
RUN_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "metrics.jsonl", "train.log")


class RemoteSync:
    """Uploads a run dir's checkpoints to ``url`` in one background thread (rank 0 only).

    The constructor checks at once that the prefix is writable (StorageError naming the URL and the fix).
    ``push_checkpoint`` returns immediately; uploads run in order. A failed upload is logged and retried with
    the next checkpoint; ``close()`` waits for the queue and raises StorageError if the newest checkpoint is
    not mirrored, so a run never ends believing a copy exists that does not.
    """

    def __init__(self, url: str, run_dir: str | os.PathLike) -> None:
        if not storage.is_remote(url):
            raise storage.StorageError(f"trainer.remote_sync={url!r} is not an object-storage URL "
                                       "(e.g. s3://bucket/runs/my-run)")
        storage.check_writable(url)
        self.url = url.rstrip("/")
        self.run_dir = Path(run_dir)
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: Exception | None = None
        self._mirrored: str | None = None  # name of the newest step file whose pointer is uploaded
        self._wanted: str | None = None
        self._latest_text = ""
        self._thread = threading.Thread(target=self._work, name="gcl-remote-sync", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------------------------- the worker
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
                self._error = None
            except Exception as err:  # noqa: BLE001 - keep training; the next push retries, close() reports
                self._error = err
                log.warning("remote sync to %s failed (training continues; retried with the next checkpoint): %s",
                            self.url, err)

    def _upload_checkpoint(self, name: str, pointer: str, pointer_text: str) -> None:
        """Step file (or best.pt) and its manifest, then the small run files, then its pointer last (a pointer
        on the mirror means everything it needs is there); prune what the run pruned."""
        local_dir = self.run_dir / CKPT_DIR
        path = local_dir / name
        if not path.exists():  # pruned locally before its turn came: a newer checkpoint supersedes it
            return
        storage.put_file(path, storage.join(self.url, CKPT_DIR, name))
        manifest = local_dir / (name + MANIFEST_SUFFIX)  # size + SHA-256: a download is verified like a local file
        if manifest.is_file():
            storage.put_file(manifest, storage.join(self.url, CKPT_DIR, manifest.name))
        for rel in RUN_FILES:
            p = self.run_dir / rel
            if p.is_file():
                storage.put_file(p, storage.join(self.url, rel))
        storage.write_text(storage.join(self.url, CKPT_DIR, pointer), pointer_text)
        if pointer == LATEST:
            self._mirrored = name
            keep = {p.name for p in local_dir.glob("step_*.pt")} | {name}
            for remote in storage.listdir(storage.join(self.url, CKPT_DIR)):
                stem = remote[:-len(MANIFEST_SUFFIX)] if remote.endswith(".pt" + MANIFEST_SUFFIX) else remote
                if stem.startswith("step_") and stem.endswith(".pt") and stem not in keep:
                    storage.remove(storage.join(self.url, CKPT_DIR, remote))

    def _upload_dir(self, local: Path, rel: str) -> None:
        for p in sorted(local.rglob("*")):
            if p.is_file():
                storage.put_file(p, storage.join(self.url, rel, p.relative_to(local).as_posix()))

    # ------------------------------------------------------------------------------------------ the API
    def push_checkpoint(self, path: str | os.PathLike) -> None:
        """Mirror a checkpoint just saved by ``CheckpointManager`` (``step_*.pt`` or ``best.pt``)."""
        name = Path(path).name
        pointer = BEST if name == "best.pt" else LATEST
        # the pointer as it is now: by the time the upload runs, the local one may name a newer file
        text = (Path(path).parent / pointer).read_text()
        if pointer == LATEST:
            self._wanted = name
            self._latest_text = text
        self._jobs.put(lambda: self._upload_checkpoint(name, pointer, text))

    def push_dir(self, local: str | os.PathLike, rel: str) -> None:
        """Mirror a folder (the export) to ``<prefix>/<rel>/``."""
        self._jobs.put(lambda: self._upload_dir(Path(local), rel))

    def close(self, strict: bool = True) -> None:
        """Wait for every queued upload. If the newest checkpoint is not mirrored: StorageError with
        ``strict`` (the run ended normally), else a logged error (another exception is on its way)."""
        if not self._thread.is_alive():
            return
        if self._wanted is not None and self._mirrored != self._wanted:
            wanted, text = self._wanted, self._latest_text
            self._jobs.put(lambda: self._upload_checkpoint(wanted, LATEST, text))  # one more try
        self._jobs.put(None)
        self._thread.join()
        if self._wanted is not None and self._mirrored != self._wanted:
            msg = (f"the newest checkpoint {self._wanted} could not be mirrored to {self.url}: {self._error}. "
                   f"It is in {self.run_dir / CKPT_DIR}")
            if strict:
                raise storage.StorageError(msg)
            log.error(msg)
        elif self._error is not None:
            log.warning("remote sync to %s: the last upload failed: %s", self.url, self._error)


def _fetch_manifest(checkpoint_url: str, local: Path) -> None:
    """The checkpoint's manifest (size + SHA-256), when the mirror has one, so the download is verified."""
    text = storage.read_text(checkpoint_url + MANIFEST_SUFFIX)
    if text is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text)


def fetch_latest(url: str, run_dir: str | os.PathLike) -> Path | None:
    """Download the checkpoint ``url`` points at into ``run_dir/checkpoints`` and return its local path.

    ``url`` is a mirror prefix (its ``checkpoints/latest.json`` is followed; without one, the newest
    ``step_*.pt``) or a checkpoint file URL. Returns None when the prefix holds no checkpoint yet.
    """
    url = url.rstrip("/")
    local_dir = Path(run_dir) / CKPT_DIR
    if url.endswith(".pt"):
        _fetch_manifest(url, local_dir / (url.rsplit("/", 1)[1] + MANIFEST_SUFFIX))
        return storage.get_file(url, local_dir / url.rsplit("/", 1)[1])
    remote_dir = storage.join(url, CKPT_DIR)
    pointer = storage.read_text(storage.join(remote_dir, LATEST))
    names = storage.listdir(remote_dir)
    name = json.loads(pointer)["file"] if pointer is not None else None
    if name is None or name not in names:
        steps = sorted(n for n in names if n.startswith("step_") and n.endswith(".pt"))
        if name is not None:
            log.warning("%s points at %s, which is missing; using the newest step file instead", remote_dir, name)
        name = steps[-1] if steps else None
    if name is None:
        return None
    if name + MANIFEST_SUFFIX in names:
        _fetch_manifest(storage.join(remote_dir, name), local_dir / (name + MANIFEST_SUFFIX))
    local = storage.get_file(storage.join(remote_dir, name), local_dir / name)
    step = int(name[len("step_"):-len(".pt")]) if name.startswith("step_") else None
    if step is not None:  # the local pointer too, so a later local resume finds it without the mirror
        atomic_write_json({"file": name, "step": step}, local_dir / LATEST)
    log.info("downloaded checkpoint %s from the mirror %s", name, url)
    return local


def fetch_for_resume(resume: str, run_dir: str | os.PathLike, remote_sync: str | None) -> Path | None:
    """Download what ``trainer.resume`` names from object storage into the run dir; None when nothing is remote.

    Called on rank 0 only (ranks share the run dir, as they do for saving; the trainer tells the others).
    ``auto`` (the caller found no intact local checkpoint): the ``remote_sync`` mirror's latest, or None when
    there is no mirror or it is still empty. An object-storage URL: that prefix's latest (or that file); an
    empty prefix raises StorageError. A local path: None (nothing to fetch).
    """
    if storage.is_remote(resume):
        got = fetch_latest(resume, run_dir)
        if got is None:
            raise storage.StorageError(f"trainer.resume={resume}: no checkpoint there (looked for "
                                       f"{storage.join(resume, CKPT_DIR, LATEST)} and step_*.pt)")
        return got
    if resume == "auto" and remote_sync is not None:
        return fetch_latest(remote_sync, run_dir)
    return None
