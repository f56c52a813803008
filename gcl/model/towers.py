"""Which tower parameters train, and when: tower structure, locks, unlock schedules.

Lives here: :func:`lock_towers` (open_clip's image-tower lock; a text-tower lock that also handles the CLIP
class, CustomTextCLIP and HF text towers, with a trainable-LayerNorm option); :class:`UnlockSchedule` (a lock
that lifts after N optimizer steps: LP-FT / LiT-then-fine-tune); :func:`tower_parameters`,
:func:`tower_transformer` and :func:`layer_depths` (which parameter belongs to which tower and block, for
LoRA and layer-wise lr decay; a ResNet image tower's blocks are its stages).

Not here: LoRA adapters (:mod:`gcl.model.lora`), patch dropout (:mod:`gcl.model.speed`), the optimizer's
parameter groups (:mod:`gcl.optim`),
building the model (:mod:`gcl.model`).
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from open_clip.transformer import TextTransformer, Transformer
from torch import nn

TOWERS = ("image", "text")
# Parameters before the first block, per tower (relative to the tower's root): depth 0 for layer-wise decay.
_EMBEDDINGS = {"image": ("conv1", "class_embedding", "positional_embedding", "ln_pre"),
               "text": ("token_embedding", "positional_embedding", "cls_emb")}
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")


def tower_parameters(model: nn.Module, tower: str) -> list[tuple[str, nn.Parameter]]:
    """Every parameter of ``tower``: ``visual.*`` for image; for text every other one but logit_scale/bias."""
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    return [(n, p) for n, p in model.named_parameters()
            if n not in ("logit_scale", "logit_bias") and n.startswith("visual.") == (tower == "image")]


def tower_transformer(model: nn.Module, tower: str, key: str) -> tuple[Transformer, str]:
    """``(transformer, root prefix)`` of an open_clip native tower; ``key`` names the setting in the error."""
    if tower == "image":
        root, prefix = getattr(model, "visual", None), "visual."
    else:
        text = getattr(model, "text", None)
        root, prefix = (text, "text.") if text is not None else (model, "")
    t = getattr(root, "transformer", None)
    if not isinstance(t, Transformer):
        raise NotImplementedError(
            f"{key}: the {tower} tower of {type(model).__name__} ({type(root).__name__}) is not an open_clip "
            "Transformer tower (ResNet, timm and Hugging Face towers have no such blocks); turn the setting off")
    return t, prefix


def _resnet_depths(model: nn.Module) -> tuple[dict[str, int], int] | None:
    """Depths of an open_clip ModifiedResNet image tower (CLIP's RN50 family), its 4 stages as the blocks:
    the stem (conv1-3, bn1-3) 0, ``layer<k>`` k, the attention pool 5. None for any other image tower."""
    from open_clip.modified_resnet import ModifiedResNet

    if not isinstance(getattr(model, "visual", None), ModifiedResNet):
        return None
    depths = {}
    for name, _ in tower_parameters(model, "image"):
        first = name[len("visual."):].split(".")[0]
        if first.startswith("layer") and first[len("layer"):].isdigit():
            depths[name] = int(first[len("layer"):])
        else:
            depths[name] = 5 if first == "attnpool" else 0
    return depths, 4


def layer_depths(model: nn.Module, tower: str, key: str) -> tuple[dict[str, int], int]:
    """``({parameter name: depth}, n_blocks)`` for ``tower``: depth 0 = embeddings (before the blocks),
    ``i + 1`` = block i, ``n_blocks + 1`` = everything after the last block (final norm, projection).
    A ResNet image tower counts its stages as blocks (:func:`_resnet_depths`)."""
    resnet = _resnet_depths(model) if tower == "image" else None
    if resnet is not None:
        return resnet
    transformer, prefix = tower_transformer(model, tower, key)
    n = len(transformer.resblocks)
    depths = {}
    for name, _ in tower_parameters(model, tower):
        rel = name[len(prefix):]
        m = _BLOCK.match(rel)
        if m:
            depths[name] = int(m.group(1)) + 1
        elif rel.split(".")[0] in _EMBEDDINGS[tower]:
            depths[name] = 0
        else:
            depths[name] = n + 1
    return depths, n


class UnlockSchedule:
    """Tower parameters a lock froze at build that train from a given optimizer step on.

    The optimizer must hold them from the start, so its parameter groups (and a checkpoint's optimizer state)
    never change shape: build it inside :meth:`all_unlocked`. While locked they get no gradient, and AdamW
    skips parameters without one (no moment update, no weight decay), so they stay exactly as built.
    :meth:`apply` at the start of every step (and after a resume) sets ``requires_grad`` from the step alone,
    which is what makes resume exact on either side of the switch.
    """

    def __init__(self, entries: list[tuple[str, str, nn.Parameter, int]]) -> None:
        self.entries = entries  # (tower, name, parameter, first trainable step)

    @classmethod
    def from_model(cls, model: nn.Module, steps: dict[str, int | None]) -> UnlockSchedule | None:
        """The schedule for ``{tower: steps or None}``: the tower's currently frozen parameters unlock at step
        ``steps``. None when no tower has a schedule."""
        entries = []
        for tower, at in steps.items():
            if at is None:
                continue
            frozen = [(n, p) for n, p in tower_parameters(model, tower) if not p.requires_grad]
            if not frozen:
                raise ValueError(f"model.lock_{tower}_steps={at}: nothing of the {tower} tower is locked "
                                 f"(set model.lock_{tower}=true)")
            entries += [(tower, n, p, int(at)) for n, p in frozen]
        return cls(entries) if entries else None

    def apply(self, step: int) -> dict[str, bool]:
        """Set ``requires_grad`` for optimizer step ``step`` (0-based); returns ``{tower: trainable now}`` for
        the towers that changed (locked again too: a resume with a later ``lock_<tower>_steps``)."""
        changed = {}
        for tower, _, p, at in self.entries:
            trainable = step >= at
            if p.requires_grad != trainable:
                p.requires_grad = trainable
                changed[tower] = trainable
        return changed

    def rebind(self, model: nn.Module) -> None:
        """Point the entries at ``model``'s current parameters of the same names: FSDP2's ``fully_shard``
        replaces every parameter it shards, so a schedule built before sharding would toggle stale tensors."""
        current = dict(model.named_parameters())
        missing = [n for _, n, _, _ in self.entries if n not in current]
        if missing:
            raise KeyError(f"unlock schedule: parameters {missing[:3]} are no longer in the model")
        self.entries = [(tower, n, current[n], at) for tower, n, _, at in self.entries]

    @contextlib.contextmanager
    def all_unlocked(self) -> Iterator[None]:
        """Every scheduled parameter trainable for the duration (to build the optimizer over all of them)."""
        before = [p.requires_grad for _, _, p, _ in self.entries]
        for _, _, p, _ in self.entries:
            p.requires_grad = True
        try:
            yield
        finally:
            for (_, _, p, _), rg in zip(self.entries, before):
                p.requires_grad = rg


def _text_root_and_params(model: nn.Module) -> tuple[nn.Module | None, list[tuple[str, Any]]]:
    """The text tower's parts in forward order, for the CLIP class (parts on the model) or CustomTextCLIP."""
    text = getattr(model, "text", None)
    if text is not None:
        if not isinstance(text, TextTransformer):
            return text, []
        root = text
    else:
        root = model
    names = ("token_embedding", "positional_embedding", "cls_emb", "transformer", "ln_final", "text_projection")
    return root, [(n, getattr(root, n)) for n in names if getattr(root, n, None) is not None]


def _params(x: Any) -> list[nn.Parameter]:
    return [x] if isinstance(x, nn.Parameter) else list(x.parameters())


def _lock_text(model: nn.Module, unlocked_layers: int, freeze_layer_norm: bool) -> None:
    """Freeze the text tower but its last ``unlocked_layers`` groups; optionally keep LayerNorms trainable.

    Groups, first to last: embeddings, each transformer block but the last, (last block + final LayerNorm),
    projection - the grouping open_clip uses. Unlike open_clip's native lock this also supports
    ``freeze_layer_norm=False`` (every LayerNorm in the tower stays trainable, as HF towers do).
    """
    root, parts = _text_root_and_params(model)
    if not parts:
        if root is not None and hasattr(root, "lock"):  # HF text towers implement both flags themselves
            root.lock(unlocked_layers=unlocked_layers, freeze_layer_norm=freeze_layer_norm)
            return
        raise NotImplementedError(f"cannot lock the text tower of {type(model).__name__} "
                                  f"({type(root).__name__}); set model.lock_text=false")
    p = dict(parts)
    for _, x in parts:
        for q in _params(x):
            q.requires_grad = False
    blocks = list(p["transformer"].resblocks)
    groups: list[list[Any]] = [[p[k] for k in ("token_embedding", "positional_embedding", "cls_emb") if k in p]]
    groups += [[b] for b in blocks[:-1]]
    groups.append([blocks[-1]] + ([p["ln_final"]] if "ln_final" in p else []))
    if "text_projection" in p:
        groups.append([p["text_projection"]])
    for g in groups[len(groups) - min(unlocked_layers, len(groups)):] if unlocked_layers else []:
        for x in g:
            for q in _params(x):
                q.requires_grad = True
    if not freeze_layer_norm:
        for _, x in parts:
            if isinstance(x, nn.Module):
                for m in x.modules():
                    if isinstance(m, nn.LayerNorm):
                        for q in m.parameters():
                            q.requires_grad = True


def lock_towers(model: nn.Module, *, lock_image: bool = False, lock_image_unlocked_groups: int = 0,
                lock_image_freeze_bn: bool = True, lock_text: bool = False, lock_text_unlocked_layers: int = 0,
                lock_text_freeze_layer_norm: bool = True) -> None:
    """Freeze towers in place (LiT-style). Unlocked counts are ignored for a tower that is not locked.

    Image: open_clip's ``lock_image_tower`` (groups: embeddings, blocks, last block + post-norm, projection;
    BatchNorm statistics frozen when ``lock_image_freeze_bn`` for CNN/timm towers). Text: see ``_lock_text``.
    ``logit_scale`` / ``logit_bias`` stay trainable.
    """
    for key, n in (("lock_image_unlocked_groups", lock_image_unlocked_groups),
                   ("lock_text_unlocked_layers", lock_text_unlocked_layers)):
        if n < 0:
            raise ValueError(f"model.{key} must be >= 0, got {n}")
    if lock_image:
        model.lock_image_tower(unlocked_groups=lock_image_unlocked_groups, freeze_bn_stats=lock_image_freeze_bn)
    if lock_text:
        _lock_text(model, lock_text_unlocked_layers, lock_text_freeze_layer_norm)
