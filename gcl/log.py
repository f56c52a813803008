"""Rank-zero run logging: console/progress bar, ``metrics.jsonl``, wandb (offline by default), and the
record of a failure in ``train.log`` (:func:`report_failure`).

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
    files land in ``<run_dir>/wandb``; ``wandb_id`` (kept in the checkpoints) makes every launch of a resumed
    run continue one wandb run, which keeps one value per step. The API key is read by wandb itself from the environment or the
    user's login and is never logged here.
    """

    def __init__(self, run_dir: str | os.PathLike, *, is_main: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True, wandb_mode: str = "offline", wandb_project: str = "gcl",
                 wandb_entity: str | None = None, wandb_name: str | None = None,
                 wandb_tags: list[str] | None = None, wandb_id: str | None = None,
                 config: dict[str, Any] | None = None) -> None:
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
                                           wandb_id, config)

    def _init_wandb(self, mode, project, entity, name, tags, run_id, config):
        try:
            import wandb
        except ImportError as e:  # pragma: no cover - wandb is a runtime dependency
            raise RuntimeError("logger.wandb.mode needs the wandb package; or set logger.wandb.mode=disabled") from e
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            return wandb.init(project=project, entity=entity, name=name, tags=tags, config=config, mode=mode,
                              dir=str(self.run_dir), id=run_id, resume="allow")
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

    def close(self, exit_code: int = 0) -> None:
        """Close the bar, the file and wandb; a non-zero ``exit_code`` marks the wandb run as not finished."""
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
        self._bar = self._file = self._wandb = None


def cut_metrics(path: Path, step: int) -> int:
    """Drop the rows a resumed run will log again: those after ``step`` (the checkpoint's), or every row
    when it starts again from step 0 (its step-0 eval included). One row per step in ``metrics.jsonl`` then,
    even after a crash or SIGKILL between checkpoints. Returns how many rows were dropped."""
    from gcl.checkpoint import atomic_write_text

    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            row_step = None  # a line torn by a kill mid-write: never a complete row
        if row_step is not None and 0 < step and row_step <= step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text("".join(x + "\n" for x in keep), path)
        log.info("%s: dropped %d rows past step %d (logged before the run stopped; they are logged again)",
                 path, dropped, step)
    return dropped


def report_failure(exn: BaseException, *, rank: int, shared_log: Path | None = None,
                   plain: tuple[type[BaseException], ...] = ()) -> None:
    """Record why a run failed where it is kept: every rank logs one line (console and its log file); rank 0
    adds the traceback to its log files (Hydra's ``train.log``; Hydra prints it to stderr itself), or the
    whole message for the ``plain`` errors whose message says everything (a config mistake); the other
    ranks append their line to rank 0's ``train.log`` (``shared_log``) when it is known."""
    if isinstance(exn, KeyboardInterrupt):
        line = f"rank {rank}: interrupted (a second Ctrl-C) without saving; the newest checkpoint on disk stays"
    else:
        line = f"rank {rank} failed: {type(exn).__name__}: {exn}".splitlines()[0]
    log.error("%s", line)
    if rank != 0:
        if shared_log is not None:
            _append_line(shared_log, line)
        return
    if isinstance(exn, KeyboardInterrupt):
        return
    if isinstance(exn, plain):
        if "\n" in str(exn):
            _to_files(logging.ERROR, str(exn), None)
        return
    _to_files(logging.ERROR, f"traceback of the failure on rank {rank}:", exn)


def exit_on_user_error(exn: BaseException, plain: tuple[type[BaseException], ...], rank: int = 0) -> None:
    """For an entry point's ``except``: a user's mistake (``plain``: a config error, a refused resume, a
    missing path) whose message says everything ends the process with that message on stderr (rank 0) and
    exit status 2, no traceback. Anything else returns (the caller re-raises). A Hydra sweep keeps Hydra's
    handling: one bad trial must not end the others."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not isinstance(exn, plain):
        return
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return
    if rank == 0:
        import sys

        sys.stderr.write(f"error: {exn}\n")
    raise SystemExit(2) from None


def _to_files(level: int, msg: str, exn: BaseException | None) -> None:
    """One record for the root logger's file handlers only (the console already has the short line)."""
    rec = logging.LogRecord(__name__, level, __file__, 0, msg, None,
                            (type(exn), exn, exn.__traceback__) if exn is not None else None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler) and level >= h.level:
            h.handle(rec)


def _append_line(path: Path, line: str) -> None:
    with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as f:
        f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}][gcl][ERROR] - {line}\n")


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
