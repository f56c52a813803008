"""Which tower parameters train: LiT-style locking of the image and text towers.

Lives here: :func:`lock_towers` (open_clip's image-tower lock; a text-tower lock that also handles the CLIP
class, CustomTextCLIP and HF text towers, with a trainable-LayerNorm option). Parameter-efficient and
scheduled fine-tuning of the towers (LoRA, gradual unfreezing) belong here too.

Not here: the optimizer's parameter groups (:mod:`gcl.optim`), building the model (:mod:`gcl.model`).
"""
from __future__ import annotations

from typing import Any

from open_clip.transformer import TextTransformer
from torch import nn


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
