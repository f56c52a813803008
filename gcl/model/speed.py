"""Speed settings of a built model: torch.compile, the SDPA kernel, channels_last, patch dropout.

Lives here: :func:`compile_towers` and :func:`compile_loss` (``model.compile``), :func:`attention_kernels`
(``model.attention``, entered by :class:`~gcl.model.FieldEncoder` around each forward),
:func:`to_channels_last` (``model.channels_last``), :func:`set_patch_dropout` (``model.patch_dropout``).
Each is measured by ``benchmarks/bench_knobs.py`` (CPU) and ``benchmarks/gpu_vit_b16.py`` (GPU).

Not here: building the model (:mod:`gcl.model`), the encoder that applies the image memory format and the
attention context per call (:mod:`gcl.model.encoder`), config validation (:func:`gcl.config.validate`).

What is sound with the FieldEncoder's shapes (why ``model.compile`` compiles these parts and not the rest):

* the image tower sees a fixed batch in training: compiled with automatic dynamic shapes (an eval batch of
  another size recompiles once, then that dimension is dynamic);
* the text tower's packed pass changes shape every batch (``S`` sequences x ``C`` slots, the mask
  ``[S * heads, C, C]``): compiled with ``dynamic=True`` from the start, so one graph serves every batch
  (dynamo specialises sizes 0 and 1, so a one-sequence batch adds at most one more graph);
* the glue between them (``torch.unique`` deduplication, the NumPy packing planner) has data-dependent output
  shapes and stays eager: compiling it would only add graph breaks and guards;
* ``step`` also compiles the loss (fixed ``[B, N]`` shapes per step; fuses its masked softmax/sigmoid
  elementwise work). The optimizer is left alone: ``optim.fused`` already runs AdamW as fused kernels.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from gcl.config import ATTENTION, COMPILE

log = logging.getLogger(__name__)


def _text_stack(model: nn.Module) -> nn.Module:
    """The module that runs the text tower's blocks: the transformer of a native open_clip text tower (the
    part the real-length / packed passes call), else the whole ``model.text``."""
    from gcl.model.packing import _native_text

    parts = _native_text(model)
    return parts.transformer if parts is not None else model.text


def compile_towers(model: nn.Module, mode: str, backend: str) -> None:
    """``torch.compile`` the image tower and the text stack in place for ``mode`` in ``model``/``step``
    (``none``: nothing). State-dict keys are unchanged (``nn.Module.compile``)."""
    if mode not in COMPILE:
        raise ValueError(f"model.compile={mode!r} is not one of {COMPILE}")
    if mode == "none":
        return
    model.visual.compile(backend=backend)
    _text_stack(model).compile(backend=backend, dynamic=True)
    log.info("model.compile=%s: image tower and text stack compiled with backend %s", mode, backend)


def compile_loss(loss: nn.Module, mode: str, backend: str) -> None:
    """Compile the loss module in place when ``mode == "step"`` (see the module docstring)."""
    if mode not in COMPILE:
        raise ValueError(f"model.compile={mode!r} is not one of {COMPILE}")
    if mode == "step":
        loss.compile(backend=backend)


# Kernel priority per setting; the rest of torch's order follows (set_priority keeps it as a fallback), so a
# call a kernel cannot serve (flash with a mask, cuDNN on CPU) takes the next one instead of failing.
_KERNELS = {
    "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "efficient": ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "MATH"),
    "math": ("MATH",),
}


@contextlib.contextmanager
def attention_kernels(setting: str) -> Iterator[None]:
    """Scaled-dot-product-attention kernels for the calls inside (``model.attention``).

    open_clip's blocks already call ``F.scaled_dot_product_attention`` (``nn.MultiheadAttention`` with
    ``need_weights=False``). ``auto`` keeps torch's choice: flash where there is no mask (the image tower,
    SigLIP's text tower), memory-efficient for the masked text passes (causal or prefix-packed masks, which
    flash cannot take), CPU's fused kernel on CPU. ``cudnn`` / ``efficient`` put that kernel first where the
    call allows it; ``math`` runs the unfused reference only (the baseline the others are measured against).
    The backward uses the forward's kernel, so entering this around the forward is enough.
    """
    if setting not in ATTENTION:
        raise ValueError(f"model.attention={setting!r} is not one of {ATTENTION}")
    if setting == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, k) for k in _KERNELS[setting]], set_priority=True):
        yield


def to_channels_last(model: nn.Module) -> None:
    """Store the image tower's 4-D weights (conv stems: a ViT's patch embedding, a ResNet's every conv) in
    channels_last (NHWC) order, the layout cuDNN's tensor-core convolutions run natively; the encoder feeds
    images in the same layout. Values and state-dict keys are unchanged (exports are written contiguous)."""
    model.visual.to(memory_format=torch.channels_last)


def set_patch_dropout(model: nn.Module, prob: float) -> None:
    """Give the image tower open_clip's patch dropout with probability ``prob`` (0 removes it).

    In training each image keeps ``max(1, int(patches * (1 - prob)))`` random patch tokens (the class token
    always), so the tower's sequence and cost shrink; in eval mode it is the identity. Set after the model is
    built, so the exported config (what ``open_clip`` rebuilds) never carries a training-only setting.
    Raises ValueError for image towers without open_clip's ``patch_dropout`` slot (timm, ResNet).
    """
    from open_clip.transformer import PatchDropout, VisionTransformer

    if not 0.0 <= prob < 1.0:
        raise ValueError(f"model.patch_dropout must be in [0, 1), got {prob}")
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        if prob == 0.0:
            return
        raise ValueError(f"model.patch_dropout needs an open_clip VisionTransformer image tower; "
                         f"{type(visual).__name__} has no patch tokens to drop. Set model.patch_dropout=0")
    if isinstance(visual.patch_dropout, PatchDropout) and visual.patch_dropout.prob != prob:
        log.info("model.patch_dropout=%s replaces the model config's patch dropout %s", prob,
                 visual.patch_dropout.prob)
    visual.patch_dropout = PatchDropout(prob) if prob > 0 else nn.Identity()
