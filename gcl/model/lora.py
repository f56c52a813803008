"""LoRA adapters on open_clip's transformer towers, and merging them into plain open_clip weights.

Lives here: :func:`apply_lora` (rank-r adapters on one tower's attention projections and MLP linears; the rest
of that tower is frozen), :func:`merge_lora_state_dict` (a state dict with adapters -> the plain open_clip
state dict, ``W + scale * B @ A``), :func:`has_lora`. Not here: tower locking and unlock schedules
(:mod:`gcl.model.towers`), optimizer groups (:mod:`gcl.optim`).

One algebra for every target: ``ΔW = (alpha / rank) * B @ A`` with ``A: [rank, in]`` (Kaiming-uniform, as
``nn.Linear``) and ``B: [out, rank]`` (zeros, so training starts exactly at the base model). Two forms:

* MLP linears (``mlp.c_fc``, ``mlp.c_proj``) are called through their ``forward`` and become
  :class:`LoRALinear` (an ``nn.Linear``): ``y = x Wᵀ + b + scale * dropout(x) Aᵀ Bᵀ`` (LoRA's dropout on the
  adapter path).
* open_clip's attention is ``nn.MultiheadAttention``: q, k and v share one fused ``in_proj_weight`` that the
  module reads as a tensor, and ``F.multi_head_attention_forward`` reads ``out_proj.weight`` without calling
  ``out_proj``. Both get a weight parametrization (``torch.nn.utils.parametrize``), so the module sees
  ``W + scale * B @ A``. The module stays an ``nn.MultiheadAttention``: prefix-packed text forwards, the
  attention fast path and every open_clip code path keep working. There is no per-projection input, so
  ``dropout`` cannot apply to attention targets (logged at build).

Why not peft (0.21, tried on gcl-tiny): its ``nn.MultiheadAttention`` support deletes and re-registers
``in_proj_weight`` around every forward, adapts in_proj and out_proj only together, and replaces the module
type (which turns off gcl's prefix-packed text forward). The merged export needs no adapter code either way.

State-dict keys: ``<linear>.lora_A`` / ``.lora_B`` / ``.lora_scale`` beside ``<linear>.weight``, and
``<mha>.parametrizations.<w>.original`` with ``<mha>.parametrizations.<w>.0.lora_A`` / ``.lora_B`` /
``.lora_scale``. :func:`merge_lora_state_dict` needs only the state dict (the scale is stored).
"""
from __future__ import annotations

import logging
import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gcl.model.towers import tower_parameters, tower_transformer

log = logging.getLogger(__name__)

TARGETS = ("in_proj", "out_proj", "c_fc", "c_proj")
MLP_TARGETS = ("c_fc", "c_proj")
_PARAM_KEY = re.compile(r"^(?P<module>.*)\.parametrizations\.(?P<weight>[^.]+)\.0$")


def _init_pair(out_features: int, in_features: int, rank: int, like: Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    a = torch.empty(rank, in_features, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's init, as the LoRA paper's reference code
    b = torch.zeros(out_features, rank, dtype=like.dtype, device=like.device)
    return nn.Parameter(a), nn.Parameter(b)


class LoRADelta(nn.Module):
    """A weight parametrization ``W -> W + scale * B @ A`` (for tensors a module reads directly)."""

    def __init__(self, weight: Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_A, self.lora_B = _init_pair(weight.shape[0], weight.shape[1], rank, weight)
        self.register_buffer("lora_scale", torch.tensor(alpha / rank, dtype=torch.float32))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.lora_B @ self.lora_A) * self.lora_scale.to(weight.dtype)


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank adapter on its input path (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        # built on the meta device (no allocation, no random draws), then given the base's own Parameters
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta",
                         dtype=base.weight.dtype)
        self.weight, self.bias = base.weight, base.bias
        self.lora_A, self.lora_B = _init_pair(base.out_features, base.in_features, rank, base.weight)
        self.register_buffer("lora_scale", torch.tensor(alpha / rank, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        low = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return super().forward(x) + low * self.lora_scale.to(low.dtype)


def apply_lora(model: nn.Module, tower: str, *, rank: int, alpha: float, dropout: float,
               targets: list[str] | tuple[str, ...]) -> int:
    """Add adapters to every block of ``tower`` and freeze the tower's other parameters; returns the number
    of adapter parameters. ``targets`` is a subset of :data:`TARGETS`."""
    key = f"model.lora.{tower}"
    if rank < 1:
        raise ValueError(f"{key}.rank must be >= 1 to add adapters, got {rank}")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"{key}.targets={list(targets)}: choose from {list(TARGETS)} (at least one)")
    if not 0 <= dropout < 1:
        raise ValueError(f"{key}.dropout must be in [0, 1), got {dropout}")
    transformer, _ = tower_transformer(model, tower, f"{key}.rank")
    for _, p in tower_parameters(model, tower):
        p.requires_grad = False
    added = 0
    for block in transformer.resblocks:
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if not isinstance(attn, nn.MultiheadAttention) or not getattr(attn, "_qkv_same_embed_dim", False):
            raise NotImplementedError(f"{key}: {type(block).__name__} has no fused nn.MultiheadAttention; "
                                      "only open_clip's ResidualAttentionBlock is supported")
        for t in targets:
            if t == "in_proj":
                holder, attr = attn, "in_proj_weight"
            elif t == "out_proj":
                holder, attr = attn.out_proj, "weight"
            else:
                lin = getattr(mlp, t, None)
                if type(lin) is not nn.Linear:
                    raise NotImplementedError(f"{key}: mlp.{t} of {type(block).__name__} is not an nn.Linear")
                new = LoRALinear(lin, rank, alpha, dropout)
                setattr(mlp, t, new)
                added += new.lora_A.numel() + new.lora_B.numel()
                continue
            delta = LoRADelta(getattr(holder, attr).detach(), rank, alpha)
            parametrize.register_parametrization(holder, attr, delta)
            added += delta.lora_A.numel() + delta.lora_B.numel()
    if dropout > 0 and any(t not in MLP_TARGETS for t in targets):
        log.info("%s.dropout=%s applies to the MLP adapters (c_fc, c_proj) only: attention adapters are "
                 "weight-space (open_clip fuses q/k/v in one nn.MultiheadAttention)", key, dropout)
    return added


def lora_requested(lora_cfg: dict) -> dict[str, dict]:
    """The towers of a ``model.lora`` mapping whose rank is > 0."""
    return {t: dict(lora_cfg[t]) for t in ("image", "text") if int(lora_cfg[t]["rank"]) > 0}


def apply_lora_config(model: nn.Module, lora_cfg: dict | None) -> None:
    """Apply ``model.lora`` (towers with rank > 0; None = none); logit_scale/bias train unless
    ``train_logit_scale`` is off."""
    towers = lora_requested(lora_cfg) if lora_cfg else {}
    if not towers:
        return
    for tower, c in towers.items():
        n = apply_lora(model, tower, rank=int(c["rank"]), alpha=float(c["alpha"]), dropout=float(c["dropout"]),
                       targets=list(c["targets"]))
        log.info("LoRA on the %s tower: rank %d, alpha %g, targets %s: %d adapter parameters", tower,
                 int(c["rank"]), float(c["alpha"]), list(c["targets"]), n)
    for name in ("logit_scale", "logit_bias"):
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter):
            p.requires_grad = bool(lora_cfg["train_logit_scale"])


def has_lora(state_dict: dict[str, Tensor]) -> bool:
    return any(k.endswith(".lora_A") for k in state_dict)


def merge_lora_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The plain open_clip state dict of a state dict with adapters (unchanged when it has none).

    Each adapted weight becomes ``W + scale * B @ A``, computed in float64 and cast to W's dtype; the adapter
    keys disappear and parametrized keys get their plain names back.
    """
    if not has_lora(state_dict):
        return dict(state_dict)
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".lora_A")]:
        prefix = key[: -len(".lora_A")]
        a, b = out.pop(f"{prefix}.lora_A"), out.pop(f"{prefix}.lora_B")
        scale = out.pop(f"{prefix}.lora_scale")
        m = _PARAM_KEY.match(prefix)
        if m:
            src = f"{m['module']}.parametrizations.{m['weight']}.original"
            dst = f"{m['module']}.{m['weight']}"
        else:
            src = dst = f"{prefix}.weight"
        if src not in out:
            raise KeyError(f"adapter {prefix} has no base weight {src} in the state dict")
        w = out.pop(src)
        merged = w.double() + float(scale) * (b.double() @ a.double())
        out[dst] = merged.to(w.dtype)
    left = [k for k in out if ".parametrizations." in k]
    if left:
        raise KeyError(f"parametrized keys without an adapter: {left[:3]}")
    return out
