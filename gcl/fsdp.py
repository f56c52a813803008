"""FSDP2 for the trainer (``trainer.strategy=fsdp``): sharding, full state dicts, evaluation, gradient norms.

``torch.distributed.fsdp.fully_shard`` shards every transformer block of both towers as its own unit, then
the trainer's forward module (the root: embeddings, projections, norms left over). Parameters become
``DTensor`` shards on a 1-D mesh of all ranks; a unit's full weights exist only while it runs.

Lives here:

- :func:`shard`: the wrapping (blocks, then root) with a ``MixedPrecisionPolicy`` (bf16 block compute, fp32
  gradient reduction; the root's parameters stay fp32). 0-dim parameters (``logit_scale``, ``logit_bias``)
  cannot be sharded (FSDP2 shards dim 0): they stay plain, replicated tensors whose gradients
  :func:`average_replicated_grads` averages over ranks, as DDP's reducer does.
- :func:`full_state` / :func:`load_full_model_state` / :func:`shard_state` / :func:`shard_optimizer_state`: the checkpoint's
  plain, full tensors (the same file format as DDP's, so either strategy resumes the other's checkpoints)
  gathered from and scattered back to the shards.
- :func:`clip_grad_norm_`: the global gradient norm over shards and replicated parameters.
- :func:`unsharded`: every unit's full weights held during an evaluation, so ranks that run different
  numbers of eval batches never meet in a collective.

Not here: the step and the loop (``gcl.train``), checkpoint files (``gcl.checkpoint``), sharded checkpoints
(``gcl.dcp``).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# ModuleList names that hold a tower's transformer blocks: open_clip (resblocks), timm (blocks), HF (layer(s)).
BLOCK_LISTS = ("resblocks", "blocks", "layers", "layer")


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: Any) -> bool:
    return isinstance(t, _dtensor())


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of every tower, in module order: the items of each ``nn.ModuleList`` named in
    :data:`BLOCK_LISTS` that is not itself inside a block already found."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS and len(m):
            for block in m:
                found.append(block)
                inside.update(id(x) for x in block.modules())
    return found


def shard(root: nn.Module, model: nn.Module, *, device: torch.device, world_size: int,
          mixed_precision: str) -> list[nn.Parameter]:
    """``fully_shard`` each block of ``model`` (a submodule of ``root``), then ``root``, from rank 0's weights;
    returns the 0-dim parameters left replicated (see the module docstring). Call before building the
    optimizer: sharding replaces the parameters.

    ``mixed_precision``: accelerate's resolved value (``no`` or ``bf16``; fp16 is refused by the config).
    bf16 all-gathers and computes the blocks in bf16 (their outputs cast back to fp32) and reduces gradients
    in fp32; the root's parameters (embeddings, final norms, projections) stay fp32, like the logit scale the
    loss reads. An evaluation computes the blocks in bf16 too (their gathered weights are bf16)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"FSDP mixed precision {mixed_precision!r}: only no and bf16 are supported")
    _broadcast_from_rank0(root)
    mesh = init_device_mesh(device.type, (world_size,))
    # fp32 block outputs: the residual stream between blocks and the root's fp32 layers (final norm,
    # projection) then see fp32 as under DDP + autocast, also in an evaluation, which runs without autocast
    block_mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    output_dtype=torch.float32)
                if mixed_precision == "bf16" else MixedPrecisionPolicy())
    root_mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    replicated = [p for p in root.parameters() if p.ndim == 0]
    blocks = block_modules(model)
    for b in blocks:
        fully_shard(b, mesh=mesh, mp_policy=block_mp)
    fully_shard(root, mesh=mesh, mp_policy=root_mp, ignored_params=set(replicated))
    n = sum(p.numel() for p in root.parameters())
    log.info("FSDP2: %d blocks sharded as units, then the root; %d parameters over %d ranks (%s compute, fp32 "
             "gradient reduction); %d scalar parameter(s) replicated", len(blocks), n, world_size,
             "bf16" if mixed_precision == "bf16" else "fp32", len(replicated))
    if not blocks:
        log.warning("FSDP2 found no transformer blocks (ModuleLists named %s) in %s: the whole model is one unit, "
                    "so every rank holds all its weights during forward and backward", BLOCK_LISTS,
                    type(model).__name__)
    return replicated


def _broadcast_from_rank0(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, as DDP does when it wraps a module: each rank seeds its
    random initialisation differently (``set_seed(device_specific=True)``), and FSDP2 shards what each rank
    holds, so without this the shards would come from different initialisations."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def average_replicated_grads(params: Iterable[nn.Parameter], world_size: int) -> None:
    """Average the gradients of the replicated (unsharded) parameters over ranks in place; every rank calls
    this after its backward. A rank whose parameter got no gradient sends zeros and keeps None."""
    from gcl.distributed import all_reduce_sum

    for p in params:
        if not p.requires_grad:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        all_reduce_sum(g)
        g.div_(world_size)


def _full(t: Any) -> Any:
    return t.full_tensor() if is_sharded(t) else t


def full_state(state: Any, keep: bool) -> Any:
    """``state`` (a state dict, possibly nested) with every DTensor gathered into a full CPU tensor. Every rank
    must call this with the same structure (each gather is a collective); only where ``keep`` is the gathered
    tensor kept (rank 0, the writer), elsewhere it is replaced by None, so the full model never stays in the
    memory of every rank."""
    if isinstance(state, dict):
        return {k: full_state(v, keep) for k, v in state.items()}
    if isinstance(state, list):
        return [full_state(v, keep) for v in state]
    if isinstance(state, Tensor):
        full = _full(state)
        return full.detach().cpu() if keep else None
    return state


def _shard_like(full: Tensor, like: Any) -> Any:
    """``full`` cut into the shard ``like`` holds (no communication: every rank has ``full``)."""
    from torch.distributed.tensor import distribute_tensor

    if not is_sharded(like) or is_sharded(full):  # nothing to cut, or already a shard (read in place)
        return full
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"a checkpoint tensor of shape {tuple(full.shape)} cannot fill a parameter of shape "
                         f"{tuple(like.shape)}")
    return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def shard_state(full: dict[str, Tensor], like: dict[str, Any]) -> dict[str, Any]:
    """A full (plain-tensor) state dict cut into the shards ``like``'s entries of the same name hold; entries
    ``like`` lacks, or holds plain, stay as they are."""
    return {k: _shard_like(v, like[k]) if k in like else v for k, v in full.items()}


def load_full_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full (plain-tensor) state dict into a sharded model: each rank keeps its shard."""
    model.load_state_dict(shard_state(state, model.state_dict()))


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict (``optimizer.state_dict()`` format: state keyed by parameter index in
    group order) with each per-parameter tensor of the parameter's shape cut to this rank's shard, ready for
    ``optimizer.load_state_dict``. Step counters and other scalars stay as they are."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out_state = {}
    for idx, per_param in state["state"].items():
        i = int(idx)
        if i >= len(params):
            raise ValueError(f"the checkpoint's optimizer state names parameter {i}, but the optimizer has "
                             f"{len(params)} parameters")
        p = params[i]
        out_state[idx] = {k: _shard_like(v, p) if isinstance(v, Tensor) and v.shape == p.shape and v.ndim else v
                          for k, v in per_param.items()}
    return {**state, "state": out_state}


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Scale the gradients so their global L2 norm is at most ``max_norm``; returns the norm before (a plain
    fp32 scalar on every rank). Shards add their squares over ranks; replicated parameters count once.
    Matches ``torch.nn.utils.clip_grad_norm_`` on the unsharded model (same ``1e-6`` guard)."""
    from gcl.distributed import all_reduce_sum

    sharded = [p.grad for p in params if p.grad is not None and is_sharded(p.grad)]
    plain = [p.grad for p in params if p.grad is not None and not is_sharded(p.grad)]
    dev = (sharded or plain)[0].device if (sharded or plain) else torch.device("cpu")
    local = torch.zeros((), dtype=torch.float32, device=dev)
    for g in sharded:
        local += g.to_local().float().pow(2).sum()
    total_sq = all_reduce_sum(local.reshape(1)).reshape(())
    for g in plain:
        total_sq = total_sq + g.float().pow(2).sum()
    total = total_sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in sharded:
        g.to_local().mul_(coef.to(g.dtype))
    for g in plain:
        g.mul_(coef.to(g.dtype))
    return total


def fsdp_modules(root: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(root: nn.Module) -> Iterator[None]:
    """Hold every unit's full weights (one all-gather each, on every rank) and keep them through forwards,
    then reshard. Inside, forwards run no collective, so ranks may run different numbers of them (a sharded
    evaluation). Run the forwards through ``root`` (FSDP2 initialises at the root's first forward)."""
    mods = fsdp_modules(root)
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            # the root keeps its weights from forward to backward (FSDP2's own choice for a root); blocks free theirs
            m.set_reshard_after_forward(m is not root, recurse=False)
