"""Optimizer (AdamW with parameter groups: tower lr, layer-wise lr decay, per-tower weight decay) and
learning-rate schedules (groups ``optim`` and ``sched``). The EMA of the weights is :mod:`gcl.finetune.ema`."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

log = logging.getLogger(__name__)

_NO_DECAY_NAMES = ("logit_scale", "logit_bias", "positional_embedding", "class_embedding", "cls_token", "pos_embed")


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """Norm weights, biases, logit scale/bias and embeddings-as-parameters are not weight-decayed."""
    return p.ndim < 2 or name.endswith(".bias") or any(k in name for k in _NO_DECAY_NAMES)


def _tower(name: str) -> str:
    if name.startswith("visual."):
        return "image"
    if name in ("logit_scale", "logit_bias"):
        return "scale"
    return "text"


def layer_scales(model: nn.Module, tower: str, decay: float) -> dict[str, tuple[int, float]]:
    """``{parameter name: (depth, lr multiplier)}`` of ``tower`` under layer-wise lr decay ``decay``.

    The last block gets the tower's lr (multiplier 1) and each earlier block ``decay`` times the block after
    it: block ``i`` of ``L`` gets ``decay ** (L - 1 - i)``; the embeddings (before block 0) ``decay ** L``;
    what follows the last block (final norm, projection) 1. Depths from :func:`gcl.model.towers.layer_depths`.
    """
    from gcl.model.towers import layer_depths

    if not 0 < decay <= 1:
        raise ValueError(f"optim.layer_decay_{tower} must be in (0, 1], got {decay}")
    depths, n = layer_depths(model, tower, f"optim.layer_decay_{tower}")
    return {name: (d, decay ** max(0, n - d)) for name, d in depths.items()}


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.2,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    lr_image: float | None = None,
    lr_text: float | None = None,
    fused: bool | None = None,
    layer_decay_image: float | None = None,
    layer_decay_text: float | None = None,
    weight_decay_image: float | None = None,
    weight_decay_text: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, grouped by (tower, depth, decay).

    Groups without decay: parameters with ndim < 2, biases, logit_scale/logit_bias, positional/class
    embeddings. ``lr_image``/``lr_text`` override ``lr`` for the image (``visual.*``) and text towers;
    logit_scale/bias use ``lr``. ``layer_decay_<tower>`` splits a tower into one group per depth with the lr
    multipliers of :func:`layer_scales` (groups named ``<tower>/layer<depth>[_no_decay]``).
    ``weight_decay_<tower>`` overrides ``weight_decay`` for a tower. ``fused=None`` picks the fused kernel
    when every parameter is on CUDA or CPU.
    """
    scales = {}
    for tower, decay in (("image", layer_decay_image), ("text", layer_decay_text)):
        if decay is not None:
            scales.update(layer_scales(model, tower, decay))
    groups: dict[tuple[str, int, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # the key holds minus the depth, so a tower's groups sort from its head down to its embeddings (the
        # first group has the tower's lr); 1 for a tower without layer-wise decay
        depth = -scales[name][0] if name in scales else 1
        groups.setdefault((_tower(name), depth, _no_decay(name, p)), []).append(p)
    if not groups:
        raise ValueError("no trainable parameters: every tower is locked (check model.lock_image/lock_text)")
    tower_lr = {"image": lr if lr_image is None else lr_image, "text": lr if lr_text is None else lr_text,
                "scale": lr}
    tower_wd = {"image": weight_decay if weight_decay_image is None else weight_decay_image,
                "text": weight_decay if weight_decay_text is None else weight_decay_text, "scale": weight_decay}
    mult = {(_tower(n), -d): m for n, (d, m) in scales.items()}
    param_groups = []
    for (tower, depth, nd), ps in sorted(groups.items()):
        layer = f"/layer{-depth}" if depth <= 0 else ""
        param_groups.append({"params": ps, "lr": tower_lr[tower] * mult.get((tower, depth), 1.0),
                             "weight_decay": 0.0 if nd else tower_wd[tower],
                             "name": f"{tower}{layer}{'_no_decay' if nd else ''}"})
    if fused is None:
        # one fused kernel per step on CUDA and CPU (torch >= 2.4 has a fused CPU AdamW); not on MPS/XLA
        fused = all(p.device.type in ("cuda", "cpu") for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def _cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _constant(step: int, warmup: int, total: int, min_ratio: float) -> float:
    return (step + 1) / warmup if step < warmup else 1.0


def _const_cooldown(step: int, warmup: int, total: int, min_ratio: float, cooldown: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    start = total - cooldown
    if step < start:
        return 1.0
    # Linear decay over the last `cooldown` steps, reaching min_ratio one step AFTER the last one (as open_clip's
    # const_lr_cooldown): the last step still trains, at (1 - min_ratio) / cooldown above the minimum.
    progress = min(1.0, (step - start) / cooldown)
    return 1.0 - (1.0 - min_ratio) * progress


SCHEDULES = ("cosine", "constant", "const_cooldown")


def lr_factor(name: str, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
              cooldown_steps: int = 0) -> Callable[[int], float]:
    """The multiplier of the base lr at optimizer step ``s`` (0-based) for schedule ``name``.

    Step ``s`` trains with this factor (``LambdaLR`` applies ``f(0)`` at construction and ``f(s)`` after the
    ``s``-th ``scheduler.step()``), as open_clip's ``_lr_adjuster(step)`` called before step ``s``. Warmup is
    ``(s + 1) / warmup_steps``; ``cosine`` then decays over ``[warmup_steps, total_steps)`` to ``min_lr_ratio``
    (open_clip's ``cosine_lr`` for ratio 0); ``constant`` stays at 1 (``const_lr``); ``const_cooldown``
    decays linearly from 1 at step ``total - cooldown`` towards ``min_lr_ratio``, which it would reach at step
    ``total`` (``const_lr_cooldown`` with power 1), so every step trains.
    """
    if name not in SCHEDULES:
        raise ValueError(f"sched.name={name!r} is not one of {SCHEDULES}")
    if name == "const_cooldown":
        if not 0 < cooldown_steps <= total_steps:
            raise ValueError(f"sched.cooldown_steps must be in (0, trainer.max_steps={total_steps}], "
                             f"got {cooldown_steps}")
        return partial(_const_cooldown, warmup=warmup_steps, total=total_steps, min_ratio=min_lr_ratio,
                       cooldown=cooldown_steps)
    fn = _cosine if name == "cosine" else _constant
    return partial(fn, warmup=warmup_steps, total=total_steps, min_ratio=min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, *, name: str, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0, cooldown_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step; its state_dict holds the position for resume."""
    fn = lr_factor(name, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio,
                   cooldown_steps=cooldown_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
