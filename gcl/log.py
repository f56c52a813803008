"""Rank-zero run logging: console/progress bar, ``metrics.jsonl``, wandb (offline by default).

Named ``log`` (not ``logging``) so the standard library is never shadowed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 2)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as a string
    return v


class RunLogger:
    """Writes metrics on rank 0 only; every method is a no-op elsewhere.

    ``metrics.jsonl`` gets one JSON object per call to :meth:`log_metrics` (appended and flushed, so a killed
    run keeps what it logged). wandb is initialised lazily with ``mode`` in offline/online/disabled; its
    files land in ``<run_dir>/wandb``. The API key is read by wandb itself from the environment or the
    user's login and is never logged here.
    """

    def __init__(self, run_dir: str | os.PathLike, *, is_main: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True, wandb_mode: str = "offline", wandb_project: str = "gcl",
                 wandb_entity: str | None = None, wandb_name: str | None = None,
                 wandb_tags: list[str] | None = None, config: dict[str, Any] | None = None) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"logger.wandb.mode={wandb_mode!r} is not one of {WANDB_MODES}")
        self.is_main = is_main
        self.run_dir = Path(run_dir)
        self._file = None
        self._bar = None
        self._wandb = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, smoothing=0.1)
        if wandb_mode != "disabled":
            self._wandb = self._init_wandb(wandb_mode, wandb_project, wandb_entity, wandb_name, wandb_tags,
                                           config)

    def _init_wandb(self, mode, project, entity, name, tags, config):
        try:
            import wandb
        except ImportError as e:  # pragma: no cover - wandb is a runtime dependency
            raise RuntimeError("logger.wandb.mode needs the wandb package; or set logger.wandb.mode=disabled") from e
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            return wandb.init(project=project, entity=entity, name=name, tags=tags, config=config, mode=mode,
                              dir=str(self.run_dir), resume="allow")
        except Exception as e:  # noqa: BLE001 - report and continue: logging must not kill a training run
            log.warning("wandb.init failed (%s: %s); continuing without wandb. Use logger.wandb.mode=offline "
                        "without network, or disabled.", type(e).__name__, e)
            return None

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def progress(self, step: int, **shown: float) -> None:
        """Advance the bar to ``step`` and show e.g. loss, lr, samples/s."""
        if self._bar is None:
            return
        self._bar.n = step
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()},
                              refresh=False)
        self._bar.refresh()

    def write(self, msg: str) -> None:
        """An INFO message on rank 0 (console and train.log); see :func:`console_logging` for the bar."""
        if self.is_main:
            log.info(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._file = self._wandb = None


class _QuietOpenClip(logging.Filter):
    """open_clip logs its progress (model parsing, config loading) at INFO on the root logger; keep those
    lines out of the console and train.log, warnings and errors still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in record.pathname


@contextlib.contextmanager
def console_logging() -> Iterator[None]:
    """While active: console log lines are written through tqdm (the progress bar stays intact) and
    open_clip's INFO chatter is filtered out."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    quiet = _QuietOpenClip()
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(quiet)
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


class Throughput:
    """Samples/s over the steps since the last call (wall clock)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._n = 0

    def add(self, n: int) -> None:
        self._n += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self._n / max(now - self._t, 1e-9)
        self._t, self._n = now, 0
        return r
