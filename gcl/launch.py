"""The process's dealings with its launcher: SLURM task variables and stop signals.

Lives here: :func:`slurm_to_torch_env` (``srun`` task variables -> the ``RANK``/``WORLD_SIZE`` env that
torch.distributed and accelerate read) and :class:`StopSignal` (SIGTERM/SIGINT -> a flag the training loop
polls at step boundaries). Not here: process-group setup (accelerate, in ``gcl.train``), collectives
(``gcl.distributed``), checkpointing (``gcl.checkpoint``).
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Any


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits cleanly.

    A second SIGINT falls back to the default handler (immediate KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)


def slurm_to_torch_env(env: dict[str, str] | None = None) -> None:
    """Under ``srun`` (one task per GPU, e.g. Hydra's submitit launcher) map SLURM's task variables to the
    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` that torch.distributed and accelerate read. torchrun's own variables
    win when present. ``MASTER_ADDR``/``MASTER_PORT`` come from the launcher's setup lines."""
    env = os.environ if env is None else env
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    env.setdefault("MASTER_PORT", "29500")
