"""TrainState save/load: model, optimizer, scheduler, scaler, step, RNG states and the data position.

Layout inside a run dir::

    checkpoints/step_000000100.pt        one file per save (torch.save of a plain dict of tensors/containers)
    checkpoints/step_000000100.pt.json   its manifest: {"file", "step", "size", "sha256"}
    checkpoints/latest.json              {"file": "step_000000100.pt", "step": 100}: the newest complete one
    checkpoints/best.pt (+ best.pt.json) + best.json   the best one by the configured eval metric
    checkpoints/step_000000100.dcp/      trainer.fsdp_checkpoint=sharded only: the model, optimizer and EMA tensors,
                                         written by every rank with torch.distributed.checkpoint (DCP)

A sharded checkpoint's ``.pt`` holds everything but those tensors (``model`` is None) plus ``sharded``: the
folder's name and the size and SHA-256 of each of its files (so the ``.pt``'s own manifest covers them).
Every rank writes its shards into a hidden temporary folder, rank 0 renames it once all are written, then
writes the ``.pt``. :func:`load_checkpoint` reads the folder back as full tensors (DCP reassembles shards of
any layout), so a sharded checkpoint loads like a full one: in another strategy, world size or one process
(export, evaluate.py, ``model.pretrained``). A resume under fsdp never holds it whole:
:func:`read_sharded_into` has every rank read just its shards into its live tensors (DCP reshards when the
number of processes changed).

Writes go to a hidden temporary file in the same folder (``.NAME.tmp-PID``) that is fsynced and then
``os.replace``d; on any failure the temporary file is removed. The manifest is written after its checkpoint
and ``latest.json`` after both, so a crash (even SIGKILL) mid-write never touches the newest good checkpoint,
and a temporary file is never taken for a checkpoint (``step_*.pt`` does not match it; a manager removes the
leftovers of a crash). A full disk is reported as :class:`DiskFullError`: the path, about how much the file
needs and how much was free.

Loading verifies the file against its manifest (size, then SHA-256) and reads it with
``torch.load(..., weights_only=True)``: everything stored is tensors, numbers, strings and containers (numpy
RNG state is converted to a tensor for that reason). A damaged file raises :class:`CheckpointError` naming
it; :func:`load_newest_intact` skips damaged ones (each named in a warning) and falls back to the newest
intact checkpoint. Not here: what goes into the state (``gcl.train``), the resume rules (``gcl.resume``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

log = logging.getLogger(__name__)

LATEST = "latest.json"
BEST = "best.json"
BEST_FILE = "best.pt"
MANIFEST_SUFFIX = ".json"  # step_000000100.pt -> step_000000100.pt.json
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
_TMP_GLOB = ".*.tmp-*"
# errnos of a full filesystem or an exhausted quota: reported with sizes and a fix, not as a raw torch error
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or unreadable; the message names the file(s) and the fix."""


class DiskFullError(OSError):
    """A write failed because its filesystem (or quota) is full; the message gives the path and the sizes."""


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages inside ``obj`` (what torch.save writes, give or take metadata)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        key = st.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return st.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


class _HashingWriter:
    """A file-like sink for ``torch.save``: counts and hashes the bytes, and keeps the exception of a failed
    write. torch turns whatever a write raises into an opaque "unexpected pos" RuntimeError; the original
    says what happened (an OSError's errno "disk full", a KeyboardInterrupt from a signal handler)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None

    def write(self, b: Any) -> int:
        try:
            n = self.f.write(b)
            self.sha.update(b)
            self.size += n
            return n
        except BaseException as e:  # a signal handler may raise here too (KeyboardInterrupt)
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except BaseException as e:
            self.error = e
            raise


def _write_atomic(path: Path, write: Callable[[_HashingWriter], None], needed: int) -> dict[str, Any]:
    """Write ``path`` through ``write(sink)`` into a temp file, fsync, rename; returns ``{"size", "sha256"}``.

    On any failure (including KeyboardInterrupt) the temp file is removed, so nothing partial stays behind; a
    full disk raises :class:`DiskFullError` naming ``path`` with ``needed`` bytes and the free space."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    free = shutil.disk_usage(path.parent).free
    sink = None
    try:
        with open(tmp, "wb") as f:
            sink = _HashingWriter(f)
            write(sink)
            sink.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = sink.error if sink is not None and sink.error is not None else e
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
            raise DiskFullError(
                cause.errno,
                f"no space left on device writing {path}: it needs about {_mb(needed)} and {_mb(free)} were free "
                f"on that filesystem when the write started (the partial file was removed; earlier checkpoints "
                f"are intact). Free space there (or lower trainer.keep_last), then resume with "
                f"trainer.resume=auto", str(path)) from cause
        if isinstance(cause, OSError) and cause is not e:
            raise OSError(cause.errno, f"cannot write {path}: {cause.strerror}", str(path)) from e
        if cause is not e:
            raise cause from None
        raise
    return {"size": sink.size, "sha256": sink.sha.hexdigest()}


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``torch.save`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    Returns the file's ``{"size", "sha256"}`` (hashed while writing). Raises DiskFullError on a full disk."""
    return _write_atomic(Path(path), lambda sink: torch.save(obj, sink), needed=_tensor_bytes(obj))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename); DiskFullError on a full disk."""
    data = text.encode()
    _write_atomic(Path(path), lambda sink: sink.write(data), needed=len(data))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=1, sort_keys=True), path)


def rng_state() -> dict[str, Any]:
    """Every RNG the training step can touch, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    # weights_only loading turns the inner tuple into a list; random.setstate needs tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ writing

class CheckpointManager:
    """Saves checkpoints in ``<run_dir>/checkpoints``; keeps the last ``keep_last`` step files."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"trainer.keep_last must be >= 1, got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` as ``step_<step>.pt`` with its manifest, point ``latest.json`` at it, prune."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = self.step_name(step)
        self._write(state, name, step)
        atomic_write_json({"file": name, "step": step}, self.dir / LATEST)
        self._prune(keep=name)
        log.info("saved checkpoint %s", self.dir / name)
        return self.dir / name

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:09d}.pt"

    def save_best(self, state: dict[str, Any], step: int, metric: str, value: float) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write(state, BEST_FILE, step)
        atomic_write_json({"file": BEST_FILE, "step": step, "metric": metric, "value": value}, self.dir / BEST)
        return self.dir / BEST_FILE

    def _write(self, state: dict[str, Any], name: str, step: int) -> None:
        digest = atomic_torch_save(state, self.dir / name)
        atomic_write_json({"file": name, "step": step, **digest}, self.dir / (name + MANIFEST_SUFFIX))

    def _prune(self, keep: str) -> None:
        steps = step_files(self.dir)
        for p in steps[: max(0, len(steps) - self.keep_last)]:
            if p.name != keep:
                p.unlink(missing_ok=True)
                p.with_name(p.name + MANIFEST_SUFFIX).unlink(missing_ok=True)
                shutil.rmtree(sharded_dir(p), ignore_errors=True)
        self.remove_partial_files()

    def remove_partial_files(self) -> int:
        """Delete the temp files (and sharded temp folders) a crashed or killed save left behind (never a
        checkpoint); returns how many."""
        n = 0
        for p in self.dir.glob(_TMP_GLOB) if self.dir.is_dir() else []:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                log.info("removed %s, the partial shards of an interrupted save", p)
            else:
                size = p.stat().st_size if p.exists() else 0
                p.unlink(missing_ok=True)
                log.info("removed %s (%s), the partial file of an interrupted save", p, _mb(size))
            n += 1
        return n

    def best_value(self) -> float | None:
        p = self.dir / BEST
        return json.loads(p.read_text())["value"] if p.exists() else None


# ------------------------------------------------------------------------------------------ sharded (DCP)

SHARDED_SUFFIX = ".dcp"  # step_000000100.pt -> step_000000100.dcp/


def sharded_dir(file: Path) -> Path:
    """The DCP folder of a checkpoint file (``step_N.pt`` -> ``step_N.dcp``)."""
    return file.with_suffix(SHARDED_SUFFIX)


def _split_tensors(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(flat tensors, rest)`` of the model, optimizer and EMA entries: tensors under flat keys
    ``model/<name>``, ``optimizer/<param index>/<name>`` and ``ema/<name>`` (DCP keeps flat keys as they are);
    ``rest`` is the state with those tensors taken out (``model`` None, optimizer state entries without their
    tensors, the EMA's ``shadow`` None with its names in order in ``shadow_names``)."""
    flat: dict[str, Any] = {f"model/{k}": v for k, v in state["model"].items()}
    ema = state.get("ema")
    if ema:
        flat.update({f"ema/{k}": v for k, v in ema["shadow"].items()})
        state = {**state, "ema": {**ema, "shadow": None, "shadow_names": list(ema["shadow"])}}
    opt = state["optimizer"]
    kept_state = {}
    for idx, entry in opt["state"].items():
        kept_state[idx] = {}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                flat[f"optimizer/{idx}/{k}"] = v
            else:
                kept_state[idx][k] = v
    return flat, {**state, "model": None, "optimizer": {**opt, "state": kept_state}}


def save_sharded(state: dict[str, Any], file: Path, is_main: bool) -> dict[str, Any]:
    """Every rank: write the model and optimizer tensors of ``state`` (DTensor shards or plain tensors) into
    ``sharded_dir(file)`` with torch.distributed.checkpoint. Returns the state to write as ``file`` (on rank 0;
    other ranks get it without the file list): the rest of ``state`` with ``sharded`` naming the folder and
    each of its files' size and SHA-256. Collective: every rank calls it with the same keys."""
    import torch.distributed.checkpoint as dcp

    from gcl.distributed import dist_or_none

    dist = dist_or_none()
    final = sharded_dir(file)
    tmp = final.with_name(f".{final.name}.tmp-shards")
    if is_main:
        file.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a killed save
    if dist is not None:
        dist.barrier()
    flat, rest = _split_tensors(state)
    with warnings.catch_warnings():  # one process (no process group): DCP says it saves alone, as intended
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.save(flat, checkpoint_id=str(tmp))  # returns once every rank's shards and the metadata are written
    files: dict[str, Any] = {}
    if is_main:
        shutil.rmtree(final, ignore_errors=True)  # a folder of the same step left by a save killed before its .pt
        os.replace(tmp, final)
        for f in sorted(final.iterdir()):
            files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    return {**rest, "sharded": {"dir": final.name, "files": files}}


def _verify_sharded(file: Path, info: dict[str, Any]) -> Path:
    d = file.parent / info["dir"]
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {file} is damaged: its sharded tensors folder {d} is missing")
    for name, want in info["files"].items():
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {file} is damaged: {f} is missing")
        if f.stat().st_size != want["size"] or _sha256(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint {file} is damaged: {f} differs from the size/SHA-256 recorded in it")
    return d


def _read_sharded(file: Path, state: dict[str, Any], verify: bool) -> dict[str, Any]:
    """Fill a sharded checkpoint's model and optimizer tensors back in, as full tensors on the CPU (DCP reads
    every shard; no process group is needed or used)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    info = state["sharded"]
    d = _verify_sharded(file, info) if verify else file.parent / info["dir"]
    try:
        reader = dcp.FileSystemReader(str(d))
        meta = reader.read_metadata().state_dict_metadata
        flat = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()
                if isinstance(m, TensorStorageMetadata)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(flat, storage_reader=reader, no_dist=True)
    except Exception as e:  # noqa: BLE001 - DCP raises many kinds for a damaged folder
        raise CheckpointError(f"checkpoint {file}: its sharded tensors in {d} cannot be read "
                              f"({type(e).__name__}: {str(e)[:200]})") from e
    return _unflatten(flat, state, file, with_ema=True)


def _unflatten(flat: dict[str, torch.Tensor], state: dict[str, Any], file: Path, with_ema: bool) -> dict[str, Any]:
    """The inverse of :func:`_split_tensors`: ``state`` (a sharded checkpoint's ``.pt``) in the full-file layout
    with the tensors of ``flat`` put back. ``with_ema=False``: the stored EMA is left out (``ema`` None)."""
    model: dict[str, Any] = {}
    ema: dict[str, Any] = {}
    opt_state = {idx: dict(entry) for idx, entry in state["optimizer"]["state"].items()}
    for key, t in flat.items():
        kind, _, rest = key.partition("/")
        if kind == "model":
            model[rest] = t
        elif kind == "ema":
            ema[rest] = t
        elif kind == "optimizer":
            idx, _, name = rest.partition("/")
            opt_state.setdefault(int(idx), {})[name] = t
    out = {**state, "model": model, "optimizer": {**state["optimizer"], "state": opt_state}}
    if state.get("ema"):  # the average's entries in their saved order (EMA.load_state_dict checks it)
        e = dict(state["ema"])
        names = e.pop("shadow_names")
        missing = [n for n in names if n not in ema]
        if with_ema and missing:
            raise CheckpointError(f"checkpoint {file}: its sharded tensors lack EMA entries {missing[:3]}")
        out["ema"] = {**e, "shadow": {n: ema[n] for n in names}} if with_ema else None
    return out


def read_sharded_into(file: Path, state: dict[str, Any], model: dict[str, torch.Tensor],
                      params: list[torch.Tensor], ema: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """A sharded checkpoint's tensors read straight into this process's tensors: the collective form of
    :func:`_read_sharded` for a sharded (FSDP2) resume. Every rank calls it; each reads only the parts of the
    files its shards hold, and DCP reshards when the number of processes changed. Nothing is gathered whole.

    ``state``: the checkpoint loaded with ``shards=False``. ``model``: the live model's state dict (DTensor
    shards or plain tensors sharing the parameters' storage), filled in place. ``params``: the optimizer's
    parameters in group order; each stored optimizer tensor is allocated like its parameter (or with its
    stored shape, for scalars such as Adam's step) and filled. ``ema``: the EMA's tensors by name, filled in
    place (None: the run has no EMA, its stored one is not read). Returns ``state`` in the full-file layout,
    holding those tensors."""
    import torch.distributed.checkpoint as dcp

    d = file.parent / state["sharded"]["dir"]
    try:
        reader = dcp.FileSystemReader(str(d))
        meta = reader.read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - DCP raises many kinds for a damaged folder
        raise CheckpointError(f"checkpoint {file}: its sharded tensors in {d} cannot be read "
                              f"({type(e).__name__}: {str(e)[:200]})") from e
    stored = {k.partition("/")[2] for k in meta if k.startswith("model/")}
    if stored != set(model):
        raise CheckpointError(f"checkpoint {file} does not fit this model: missing {sorted(set(model) - stored)[:3]}, "
                              f"unexpected {sorted(stored - set(model))[:3]}")
    if ema is not None and state.get("ema"):
        names = state["ema"]["shadow_names"]
        if list(names) != list(ema):
            raise CheckpointError(f"checkpoint {file}: its EMA does not fit this model (missing "
                                  f"{sorted(set(ema) - set(names))[:3]}, unexpected {sorted(set(names) - set(ema))[:3]})")
    flat: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in model.items()}
    for key, m in meta.items():
        kind, _, rest = key.partition("/")
        if kind == "ema" and ema is not None:
            flat[key] = ema[rest]
        elif kind == "optimizer":
            idx, _, name = rest.partition("/")
            if int(idx) >= len(params):
                raise CheckpointError(f"checkpoint {file}: its optimizer state names parameter {idx}, but the "
                                      f"optimizer has {len(params)} parameters")
            p = params[int(idx)]
            like = tuple(m.size) == tuple(p.shape) and len(m.size) > 0
            flat[key] = torch.zeros_like(p, dtype=m.properties.dtype) if like else torch.zeros(
                tuple(m.size), dtype=m.properties.dtype)
    try:
        dcp.load(flat, storage_reader=reader)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {file}: its sharded tensors in {d} cannot be read "
                              f"({type(e).__name__}: {str(e)[:200]})") from e
    return _unflatten(flat, state, file, with_ema=ema is not None)


# ------------------------------------------------------------------------------------------ finding

def step_files(ck: Path) -> list[Path]:
    """``step_*.pt`` files of a checkpoints folder, oldest first (by the step number in the name)."""
    if not ck.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ck.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def _checkpoints_dir(p: Path) -> Path:
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def _pointer_target(pointer: Path) -> Path | None:
    """The file a ``latest.json`` / ``best.json`` names, or None (a torn or garbled pointer is named)."""
    if not pointer.exists():
        return None
    try:
        target = pointer.parent / json.loads(pointer.read_text())["file"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        log.warning("%s is damaged (%s: %s); looking at the checkpoint files themselves", pointer,
                    type(e).__name__, e)
        return None
    if not target.exists():
        log.warning("%s points at missing %s; looking at the checkpoint files themselves", pointer, target.name)
        return None
    return target


def candidates(path: str | os.PathLike, which: str = "latest") -> list[Path]:
    """Checkpoint files of a run dir / ``checkpoints/`` dir, the preferred first: for ``latest``, the file
    ``latest.json`` names, then every ``step_*.pt`` newest first; for ``best``, ``best.pt``. A file: itself."""
    p = Path(path)
    if p.is_file():
        return [p]
    ck = _checkpoints_dir(p)
    if which == "best":
        target = _pointer_target(ck / BEST) or (ck / BEST_FILE if (ck / BEST_FILE).is_file() else None)
        return [target] if target is not None else []
    first = _pointer_target(ck / LATEST)
    rest = [s for s in reversed(step_files(ck)) if s != first]
    return ([first] if first is not None else []) + rest


NO_CHECKPOINT_FIX = {
    "resume": "pass a run dir with checkpoints/ or a checkpoint file, or use trainer.resume=null to start fresh",
    "export": "the run has not saved a checkpoint yet (the trainer saves every trainer.save_every steps and at "
              "the end); pass a run dir that has checkpoints/, a checkpoint file, or an open_clip model "
              "(hf-hub:ORG/NAME, local-dir:PATH, NAME:TAG)",
    "evaluate": "pass a run dir that has checkpoints/, a checkpoint file, or an exported open_clip folder",
}


def find_checkpoint(path: str | os.PathLike, which: str = "latest", missing_ok: bool = False,
                    purpose: str = "resume") -> Path | None:
    """The preferred checkpoint file of a run dir, a ``checkpoints/`` dir or a file (not verified: see
    :func:`load_newest_intact`). Raises FileNotFoundError with advice for ``purpose`` unless ``missing_ok``."""
    found = candidates(path, which)
    if found:
        return found[0]
    if missing_ok:
        return None
    ck = _checkpoints_dir(Path(path))
    raise FileNotFoundError(f"no checkpoint found in {path} (looked for {ck / (LATEST if which == 'latest' else BEST)}"
                            f" and step_*.pt): {NO_CHECKPOINT_FIX[purpose]}")


# ------------------------------------------------------------------------------------------ loading

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: str | os.PathLike) -> None:
    """Check ``path`` against its manifest (size, then SHA-256); raise CheckpointError naming it. A file
    without a manifest (an older checkpoint) passes here and is checked by reading it."""
    p = Path(path)
    manifest = p.with_name(p.name + MANIFEST_SUFFIX)
    if not manifest.is_file():
        return
    try:
        want = json.loads(manifest.read_text())
        size, sha = int(want["size"]), str(want["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        log.warning("manifest %s is unreadable (%s); checking %s by reading it", manifest, e, p.name)
        return
    got = p.stat().st_size
    if got != size:
        raise CheckpointError(f"checkpoint {p} is damaged: {got} bytes, its manifest says {size} "
                              f"({'truncated' if got < size else 'extra bytes'})")
    if _sha256(p) != sha:
        raise CheckpointError(f"checkpoint {p} is damaged: its SHA-256 differs from the manifest's")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    verify: bool = True, shards: bool = True) -> dict[str, Any]:
    """Verify (unless already done: ``verify=False``) and load a checkpoint dict safely (``weights_only=True``);
    CheckpointError names a damaged or unreadable file. ``shards=False``: a sharded checkpoint's folder is
    verified but not read (its ``model`` stays None), for :func:`read_sharded_into`."""
    if verify:
        verify_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError/... for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    if state.get("sharded"):
        if shards:
            state = _read_sharded(Path(path), state, verify)
        elif verify:
            _verify_sharded(Path(path), state["sharded"])
    return state


def load_newest_intact(path: str | os.PathLike, which: str = "latest", map_location: str | torch.device = "cpu",
                       purpose: str = "resume", shards: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """``(file, state)`` of the newest intact checkpoint of ``path`` (see :func:`candidates`), or None when
    there is none at all. Each damaged one is named in a warning and skipped; when every one is damaged,
    CheckpointError lists them. A file given directly is loaded or refused, never replaced by another.
    ``shards``: as in :func:`load_checkpoint`."""
    found = candidates(path, which)
    damaged: list[str] = []
    for f in found:
        try:
            state = load_checkpoint(f, map_location, shards=shards)
        except CheckpointError as e:
            if Path(path).is_file():
                raise CheckpointError(f"{e}. Pass another checkpoint file, or the run dir (then the newest "
                                      "intact checkpoint is used)") from e
            log.warning("%s; skipping it, falling back to the next newest checkpoint", e)
            damaged.append(str(e))
            continue
        if damaged:
            log.warning("using %s (step %s) instead of %d damaged newer checkpoint(s)", f, state.get("step"),
                        len(damaged))
        return f, state
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {path}: " + "; ".join(damaged) + f". {NO_CHECKPOINT_FIX[purpose]}")
    return None
