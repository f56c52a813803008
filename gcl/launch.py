"""The process's dealings with its launcher: SLURM task variables, stop signals and the exit status.

Lives here: :func:`slurm_to_torch_env` (``srun`` task variables -> the ``RANK``/``WORLD_SIZE`` env that
torch.distributed and accelerate read), :class:`StopSignal` (SIGTERM/SIGINT -> a flag the training loop
polls at step boundaries; saves protected from a second Ctrl-C) and :data:`INTERRUPTED_EXIT` (the exit
status of a run stopped by a signal after saving). Not here: process-group setup (accelerate, in
``gcl.train``), collectives (``gcl.distributed``), checkpointing (``gcl.checkpoint``).
"""
from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

# The exit status of a run stopped by SIGTERM/SIGINT after its checkpoint was saved: sysexits' EX_TEMPFAIL
# ("try again later"). Not 0, so schedulers and sweeps do not count the run as finished; not 1 (an error) nor
# 128+N (killed by a signal, nothing saved), so a requeue rule can tell it apart: README "Clusters".
INTERRUPTED_EXIT = 75


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits.

    A second SIGINT outside a save stops the process at once (KeyboardInterrupt; the newest checkpoint on disk
    stays the last one). Inside :meth:`protect` (a checkpoint being written) signals are deferred: the save
    completes and the run then stops as after the first signal; only a third SIGINT aborts the save, whose
    temp file is removed (``gcl.checkpoint``), so a half-written checkpoint is never visible."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.count = 0
        self._protected = 0
        self._deferred = 0
        self._old: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)

    @staticmethod
    def _say(msg: str) -> None:
        # logging is not safe inside a signal handler (it takes locks the interrupted code may hold)
        with contextlib.suppress(OSError):
            os.write(2, f"\ngcl: {msg}\n".encode())

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.count += 1
        if self.received is None:
            self.received = name
            self._say(f"{name}: stopping after this step and saving a checkpoint"
                      + (" (Ctrl-C again quits without saving)" if signum == signal.SIGINT else ""))
            return
        if signum != signal.SIGINT:
            return
        if self._protected:
            self._deferred += 1
            if self._deferred == 1:
                self._say("a checkpoint is being written: exiting as soon as it is complete "
                          "(Ctrl-C once more aborts it; the previous checkpoint stays)")
                return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """A block (a checkpoint save) that a second SIGINT does not abort."""
        self._protected += 1
        try:
            yield
        finally:
            self._protected -= 1
            if not self._protected:
                self._deferred = 0

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
