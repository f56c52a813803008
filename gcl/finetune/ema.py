"""Exponential moving average of the weights (``optim.ema``), kept in checkpoints so resume stays exact.

Lives here: :class:`EMA` (update, state dict for checkpoints, temporarily swapping the average into the model
for an evaluation) and :func:`build_ema`. Not here: where it is updated, saved, evaluated and exported (hooks
in :mod:`gcl.train`, ``export.ema`` in :mod:`gcl.export`).

The rule, for update ``t = 1, 2, ...`` (one per applied optimizer step; a step skipped for a non-finite loss
is not an update)::

    shadow_0 = weights at build
    d_t      = decay * min(1, (t - 1) / warmup_steps)   (d_t = decay when warmup_steps = 0)
    shadow_t = d_t * shadow_{t-1} + (1 - d_t) * weights_t

so with warmup the first update copies the weights and the decay reaches ``decay`` after ``warmup_steps + 1``
updates. Every floating-point entry of the model's state dict is averaged (parameters, frozen ones included,
and float buffers); LoRA adapters are averaged as adapters, and the export merges them.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class EMA:
    """The moving average of ``model``'s floating-point state (see the module docstring for the rule)."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"optim.ema.decay must be in (0, 1), got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"optim.ema.warmup_steps must be >= 0, got {warmup_steps}")
        self.decay, self.warmup_steps = float(decay), int(warmup_steps)
        self.num_updates = 0
        live = {k: v for k, v in model.state_dict(keep_vars=True).items() if v.is_floating_point()}
        self.names = list(live)
        self._live = [v.detach() for v in live.values()]  # the model's own tensors (same storage)
        self.shadow = [v.detach().clone() for v in self._live]

    def decay_at(self, t: int) -> float:
        """``d_t`` of update ``t`` (1-based)."""
        if self.warmup_steps == 0:
            return self.decay
        return self.decay * min(1.0, (t - 1) / self.warmup_steps)

    @torch.no_grad()
    def update(self) -> None:
        """One update towards the model's current weights."""
        self.num_updates += 1
        d = self.decay_at(self.num_updates)
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, self._live, alpha=1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup_steps": self.warmup_steps, "num_updates": self.num_updates,
                "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's EMA; the tracked names must match this model's (same architecture, LoRA)."""
        shadow = state["shadow"]
        if list(shadow) != self.names:
            missing = sorted(set(self.names) - set(shadow))[:3]
            extra = sorted(set(shadow) - set(self.names))[:3]
            raise ValueError(f"the checkpoint's EMA does not fit this model (missing {missing}, unexpected {extra})")
        if (state["decay"], state["warmup_steps"]) != (self.decay, self.warmup_steps):
            log.info("optim.ema: decay %s, warmup %s from the checkpoint's update %d on (was decay %s, warmup %s)",
                     self.decay, self.warmup_steps, state["num_updates"], state["decay"], state["warmup_steps"])
        with torch.no_grad():
            for s, v in zip(self.shadow, shadow.values()):
                s.copy_(v)
        self.num_updates = int(state["num_updates"])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights for the duration; its own weights come back afterwards."""
        saved = [v.clone() for v in self._live]
        _copy(self._live, self.shadow)
        try:
            yield
        finally:
            _copy(self._live, saved)


@torch.no_grad()
def _copy(dst: list[Tensor], src: list[Tensor]) -> None:
    # one copy_ per tensor: FSDP2's sharded parameters (DTensors) have no _foreach_copy_
    for d, s in zip(dst, src):
        d.copy_(s)


def build_ema(model: nn.Module, decay: float | None, warmup_steps: int) -> EMA | None:
    """An :class:`EMA` of ``model`` for ``optim.ema.decay``, or None when it is null (off)."""
    return None if decay is None else EMA(model, decay, warmup_steps)


def ema_state_dict(shadow: dict[str, Tensor], model_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A full model state dict from a checkpoint's EMA ``shadow``: the averaged entries, the model's others."""
    out = dict(model_state)
    unknown = sorted(set(shadow) - set(model_state))
    if unknown:
        raise KeyError(f"EMA entries not in the model: {unknown[:3]}")
    out.update(shadow)
    return out
