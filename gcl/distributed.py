"""Object and tensor collectives shared by the trainer and the evaluator; each one is a no-op in one process.

Lives here: ``dist_or_none`` (the process group, if one is up), ``gather_objects``, ``broadcast_object``,
``all_reduce_sum`` and ``gather_checked`` (an all-gather that fails on every rank together, ``PeerFailure``).
Not here: process-group setup and device placement (accelerate, in ``gcl.train``), the loss's differentiable
feature gather (``gcl.loss``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import Tensor

log = logging.getLogger(__name__)


def dist_or_none() -> Any:
    """``torch.distributed`` when a process group is initialized, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in one process)."""
    dist = dist_or_none()
    if world_size <= 1 or dist is None:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (and return it)."""
    dist = dist_or_none()
    if dist is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class PeerFailure(RuntimeError):
    """Raised on every rank together when some rank failed its part of a collective piece of work (a sharded
    evaluation, a checkpoint save)."""


def gather_checked(work: Callable[[], Any], world_size: int, rank: int, abort: str | None = None,
                   what: str = "sharded evaluation") -> list[Any]:
    """Run this rank's ``work()`` and all-gather the results, failing on every rank if any rank failed
    (``PeerFailure`` saying that ``what`` failed, with each failed rank's error).

    A rank that raises (or arrives with ``abort``, an earlier failure of its own) still joins the gather,
    sending its error instead of a result, so no rank is left waiting in a collective that never completes.
    """
    if world_size <= 1 or dist_or_none() is None:
        if abort is not None:
            raise RuntimeError(abort)
        return [work()]
    if abort is not None:
        payload: tuple[str, Any] = ("error", f"rank {rank}: {abort}")
    else:
        try:
            payload = ("ok", work())
        except Exception as exn:  # noqa: BLE001 - reported to every rank below
            log.exception("%s failed on rank %d", what, rank)
            payload = ("error", f"rank {rank}: {type(exn).__name__}: {exn}")
    parts = gather_objects(payload, world_size)
    errors = [p[1] for p in parts if p[0] == "error"]
    if errors:
        raise PeerFailure(f"{what} failed: " + "; ".join(errors))
    return [p[1] for p in parts]


def broadcast_object(obj: Any, world_size: int) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    dist = dist_or_none()
    if world_size <= 1 or dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
