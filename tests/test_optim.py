"""LR schedules against open_clip's own (``open_clip_train.scheduler``), step by step.

The lr that metrics.jsonl logs for each step is checked against the same reference in
``tests/test_train.py::test_metrics_jsonl_contract``.
"""
from __future__ import annotations

import pytest
import torch
from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

from gcl.optim import build_scheduler

BASE_LR = 1e-3


def _ours(name: str, warmup: int, total: int, cooldown: int = 0, min_ratio: float = 0.0) -> list[float]:
    """The lr each of the ``total`` optimizer steps trains with: read from the optimizer right before its step,
    then the scheduler steps, as the trainer does."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    sched = build_scheduler(opt, name=name, warmup_steps=warmup, total_steps=total, min_lr_ratio=min_ratio,
                            cooldown_steps=cooldown)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def open_clip_lrs(adjuster_factory, total: int, **kw) -> list[float]:
    """open_clip's training loop calls ``adjuster(step)`` before optimizer step ``step`` (0-based)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    adjust = adjuster_factory(opt, BASE_LR, steps=total, **kw)
    return [adjust(step) for step in range(total)]


@pytest.mark.parametrize("warmup,total,cooldown", [(0, 10, 3), (3, 12, 5), (4, 10, 10), (2, 7, 1), (5, 9, 6)])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_const_cooldown_matches_open_clip(warmup, total, cooldown, min_ratio):
    ours = _ours("const_cooldown", warmup, total, cooldown, min_ratio)
    ref = open_clip_lrs(const_lr_cooldown, total, warmup_length=warmup, cooldown_steps=cooldown,
                     cooldown_end_lr=min_ratio * BASE_LR)
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert ours[-1] > min_ratio * BASE_LR  # the last step still trains


@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 12), (1, 2), (5, 6)])
def test_cosine_and_constant_match_open_clip(warmup, total):
    assert _ours("cosine", warmup, total) == pytest.approx(
        open_clip_lrs(cosine_lr, total, warmup_length=warmup), rel=1e-12, abs=1e-15)
    assert _ours("constant", warmup, total) == pytest.approx(
        open_clip_lrs(const_lr, total, warmup_length=warmup), rel=1e-12, abs=1e-15)

