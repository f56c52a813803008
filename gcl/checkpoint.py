"""TrainState save/load: model, optimizer, scheduler, scaler, step, RNG states and the data position.

Layout inside a run dir::

    checkpoints/step_000100.pt   one file per save (torch.save of a plain dict of tensors/containers)
    checkpoints/latest.json      {"file": "step_000100.pt", "step": 100}: the newest *complete* checkpoint
    checkpoints/best.pt + best.json  the best one by the configured eval metric

Writes go to a temporary file that is fsynced and then ``os.replace``d, and ``latest.json`` is updated only
after the checkpoint file is complete, so a crash (even SIGKILL) mid-write never corrupts the latest good
checkpoint. Loading uses ``torch.load(..., weights_only=True)``: everything stored is tensors, numbers,
strings and containers (numpy RNG state is converted to a tensor for that reason).
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

LATEST = "latest.json"
BEST = "best.json"


def _fsync_replace(tmp: Path, dst: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    _fsync_replace(tmp, path)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    _fsync_replace(tmp, path)


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


class CheckpointManager:
    """Saves and finds checkpoints in ``<run_dir>/checkpoints``; keeps the last ``keep_last`` step files."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"trainer.keep_last must be >= 1, got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` as ``step_<step>.pt``, point ``latest.json`` at it, prune old step files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:09d}.pt"
        atomic_torch_save(state, self.dir / name)
        atomic_write_json({"file": name, "step": step}, self.dir / LATEST)
        self._prune(keep=name)
        log.info("saved checkpoint %s", self.dir / name)
        return self.dir / name

    def save_best(self, state: dict[str, Any], step: int, metric: str, value: float) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(state, self.dir / "best.pt")
        atomic_write_json({"file": "best.pt", "step": step, "metric": metric, "value": value}, self.dir / BEST)
        return self.dir / "best.pt"

    def _prune(self, keep: str) -> None:
        steps = sorted(p for p in self.dir.glob("step_*.pt"))
        for p in steps[: max(0, len(steps) - self.keep_last)]:
            if p.name != keep:
                p.unlink(missing_ok=True)
        for p in self.dir.glob(".*.tmp-*"):  # leftovers of a crash mid-write
            p.unlink(missing_ok=True)

    def latest(self) -> Path | None:
        return find_checkpoint(self.dir.parent, which="latest", missing_ok=True)

    def best_value(self) -> float | None:
        p = self.dir / BEST
        return json.loads(p.read_text())["value"] if p.exists() else None


def find_checkpoint(path: str | os.PathLike, which: str = "latest", missing_ok: bool = False) -> Path | None:
    """Resolve a run dir, a ``checkpoints/`` dir or a checkpoint file to a checkpoint file.

    ``which`` is ``latest`` or ``best`` for directories. Raises FileNotFoundError with a clear message unless
    ``missing_ok``.
    """
    p = Path(path)
    if p.is_file():
        return p
    ck = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    pointer = ck / (LATEST if which == "latest" else BEST)
    if pointer.exists():
        target = ck / json.loads(pointer.read_text())["file"]
        if target.exists():
            return target
        log.warning("%s points at missing %s; falling back to the newest step file", pointer, target.name)
    steps = sorted(ck.glob("step_*.pt")) if ck.is_dir() else []
    if steps:
        return steps[-1]
    if missing_ok:
        return None
    raise FileNotFoundError(
        f"no checkpoint found in {path} (looked for {pointer} and step_*.pt); pass a run dir with "
        "checkpoints/, a checkpoint file, or use trainer.resume=null to start fresh")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``)."""
    return torch.load(path, map_location=map_location, weights_only=True)
