"""Build the open_clip model (weights, tower locks, checkpointing, precision) and encode a batch's fields.

Two public entry points:

* :func:`build_model` -> :class:`ModelBundle`: any open_clip model name (``ViT-B-16``, ``hf-hub:org/repo``,
  ``local-dir:PATH``, a config registered from ``config_path=FILE.json``, or the package's tiny configs
  ``gcl-tiny`` / ``gcl-tiny-siglip``), ``pretrained`` as an open_clip tag or a weights file.
* :class:`FieldEncoder`: turns a batch (see docs/architecture.md) into unnormalized features per field,
  encoding every distinct token row of all text fields once, at its real length when the text tower allows.

Weights that are not cached never cause a long hang: availability is checked before the model is built,
and a missing file fails at once with a message that names the fixes (pre-download, a local file,
``local-dir:``).

This module holds only :class:`ModelBundle` and :func:`build_model`, the sequence of build steps; each step
lives with its concern, and every public name is re-exported here (import from ``gcl.model``):

* :mod:`gcl.model.weights`: names, weights files, the Hub and offline handling, config registration, tokenizer;
* :mod:`gcl.model.towers`: tower structure, locking, unlock schedules;
* :mod:`gcl.model.lora`: LoRA adapters and merging them into plain weights;
* :mod:`gcl.model.packing`: native text-tower views, length buckets, prefix-shared packing, their forwards;
* :mod:`gcl.model.encoder`: :class:`FieldEncoder` and the build-time real-length / packing check;
* :mod:`gcl.model.speed`: speed settings (torch.compile, attention kernels, channels_last, patch dropout).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from gcl.config import ATTENTION, COMPILE, TEXT_PACKING
from gcl.model.encoder import IMAGE, FieldEncoder, choose_text_encoding, verify_real_length
from gcl.model.lora import apply_lora_config, merge_lora_state_dict
from gcl.model.packing import (
    PASS_OVERHEAD_TOKENS,
    PackPlan,
    plan_length_buckets,
    plan_prefix_packing,
    real_length_structure,
)
from gcl.model.speed import compile_towers, set_patch_dropout, to_channels_last
from gcl.model.towers import UnlockSchedule, lock_towers
from gcl.model.weights import (
    HF_CONFIG,
    HF_SAFE_WEIGHTS,
    HF_WEIGHTS,
    PACKAGE_CONFIG_DIR,
    WeightsUnavailableError,
    create_with_weights,
    load_weights_file,
    read_state_dict,
    register_model_config,
    tokenizer_pad_id,
)

__all__ = [
    "HF_CONFIG", "HF_SAFE_WEIGHTS", "HF_WEIGHTS", "IMAGE", "PACKAGE_CONFIG_DIR", "PASS_OVERHEAD_TOKENS",
    "PRECISIONS", "FieldEncoder", "ModelBundle", "PackPlan", "UnlockSchedule", "WeightsUnavailableError",
    "build_model", "load_weights_file", "lock_towers", "merge_lora_state_dict", "plan_length_buckets",
    "plan_prefix_packing", "read_state_dict",
    "real_length_structure", "register_model_config", "tokenizer_pad_id", "verify_real_length",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "pure_bf16", "pure_fp16")


@dataclass
class ModelBundle:
    """Everything built for one model. ``model_cfg`` / ``preprocess_cfg`` are what an open_clip export needs."""

    model: nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    context_length: int
    pad_id: int
    real_length: bool
    name: str
    pretrained: str | None
    model_cfg: dict = field(default_factory=dict)
    preprocess_cfg: dict = field(default_factory=dict)
    text_packing: str = "buckets"  # verified at build: "prefix" or "buckets" (see FieldEncoder)
    attention: str = "auto"  # SDPA kernels the encoder selects per forward (gcl.model.speed.attention_kernels)
    channels_last: bool = False  # the image tower's weights are NHWC; the encoder feeds images likewise

    def field_encoder(self, **kwargs: Any) -> FieldEncoder:
        """A :class:`FieldEncoder` for this model, tokenizer padding, real-length and packing decisions; its
        placeholder row (for batches without any present text) is the tokenizer's row for an empty text."""
        kwargs.setdefault("text_packing", self.text_packing)
        kwargs.setdefault("null_tokens", self.tokenizer([""], context_length=self.context_length)[0])
        kwargs.setdefault("attention", self.attention)
        kwargs.setdefault("channels_last", self.channels_last)
        return FieldEncoder(self.model, self.real_length, self.pad_id, self.context_length, **kwargs)


def _check_request(name: str, precision: str, text_packing: str, config_path: str | None, compile: str,
                   attention: str, patch_dropout: float) -> None:
    """Validate the arguments and register ``config_path``, before any file is looked up or model built."""
    for key, value, allowed in (("precision", precision, PRECISIONS), ("text_packing", text_packing, TEXT_PACKING),
                                ("compile", compile, COMPILE), ("attention", attention, ATTENTION)):
        if value not in allowed:
            raise ValueError(f"model.{key}={value!r} is not one of {allowed}")
    if not 0.0 <= patch_dropout < 1.0:
        raise ValueError(f"model.patch_dropout must be in [0, 1), got {patch_dropout}")
    if config_path:
        stem = register_model_config(config_path)
        if name != stem:
            raise ValueError(f"model.name={name!r} must be the stem of model.config_path ({stem!r})")
    schema_name = name.startswith(("hf-hub:", "local-dir:"))
    if not schema_name and open_clip.get_model_config(name.replace("/", "-")) is None:
        raise ValueError(f"unknown open_clip model {name!r}: use a name from open_clip.list_models() "
                         f"(e.g. ViT-B-16, gcl-tiny), hf-hub:org/repo, local-dir:PATH, or register a config "
                         f"with model.config_path=FILE.json")


def _attach_logit_bias(model: nn.Module, model_cfg: dict, logit_bias_init: float | None) -> None:
    """Give a CLIP-family model a learnable ``logit_bias`` (for a sigmoid loss); recorded in ``model_cfg``."""
    if logit_bias_init is not None:
        if getattr(model, "logit_bias", None) is None:
            model.logit_bias = nn.Parameter(torch.full_like(model.logit_scale.detach(), float(logit_bias_init)))
            model_cfg["init_logit_bias"] = float(logit_bias_init)
            log.info("attached a learnable logit_bias = %.3f for the sigmoid loss", logit_bias_init)
        else:
            log.info("model has logit_bias = %.3f; logit_bias_init ignored",
                     float(model.logit_bias.detach().reshape(-1)[0]))


def _apply_training_settings(model: nn.Module, grad_checkpointing: bool, patch_dropout: float,
                             channels_last: bool) -> None:
    """Activation checkpointing, patch dropout and the NHWC weight layout, in place (after locks and LoRA)."""
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    set_patch_dropout(model, patch_dropout)
    if channels_last:
        to_channels_last(model)


def _log_built(model: nn.Module, name: str, pretrained: str | None, precision: str, real_length: bool,
               packing: str, seconds: float) -> None:
    """One INFO line: parameter counts (all, trainable), the text encoding chosen and the build time."""
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("built %s (pretrained=%s, %s): %.1fM params, %.1fM trainable, text %s-length%s, %.1fs", name,
             pretrained, precision, n_all / 1e6, n_train / 1e6, "real" if real_length else "fixed",
             ", prefix-packed" if packing == "prefix" else "", seconds)


def build_model(name: str, pretrained: str | None = None, *, config_path: str | None = None,
                precision: str = "fp32", device: str | torch.device = "cpu", lock_image: bool = False,
                lock_image_unlocked_groups: int = 0, lock_image_freeze_bn: bool = True, lock_text: bool = False,
                lock_text_unlocked_layers: int = 0, lock_text_freeze_layer_norm: bool = True,
                grad_checkpointing: bool = False, compile: str = "none", compile_backend: str = "inductor",
                attention: str = "auto", channels_last: bool = False, patch_dropout: float = 0.0,
                logit_bias_init: float | None = None, cache_dir: str | None = None,
                text_packing: str = "auto", lora: dict | None = None) -> ModelBundle:
    """Build an open_clip model with its transforms and tokenizer, ready for GCL fine-tuning.

    Args:
        name: open_clip model name (``ViT-B-16``), ``hf-hub:org/repo``, ``local-dir:PATH``, ``gcl-tiny``,
            ``gcl-tiny-siglip``, or the stem of ``config_path``.
        pretrained: open_clip tag (``laion2b_s34b_b88k``) or a weights file (state dict, ``.safetensors``,
            open_clip training checkpoint with ``state_dict`` / ``module.`` prefixes). With an ``hf-hub:`` or
            ``local-dir:`` name, a file here replaces that source's weights.
        config_path: an open_clip model config JSON to register first; ``name`` must be its file stem.
        precision: weights precision passed to open_clip (fp32 | bf16 | fp16 | pure_bf16 | pure_fp16).
        lock_*: see :func:`lock_towers`.
        grad_checkpointing: activation checkpointing in both towers.
        compile: ``none``, ``model`` or ``step``: ``torch.compile`` (with ``compile_backend``) the image tower and
            the text stack in place (state-dict keys unchanged); ``step`` also compiles the loss, which the
            trainer does (:func:`gcl.model.speed.compile_loss`).
        attention: scaled-dot-product-attention kernels for the encoder's forwards (``auto``, ``cudnn``,
            ``efficient``, ``math``; :func:`gcl.model.speed.attention_kernels`).
        channels_last: image tower weights (and the encoder's image inputs) in NHWC order.
        patch_dropout: open_clip patch dropout of the image tower in training, in [0, 1) (0: none).
        logit_bias_init: if not None and the model has no ``logit_bias`` (CLIP family), attach a learnable one
            with this value after loading weights - pass it only for a sigmoid loss.
        cache_dir: download cache (open_clip's ``cache_dir``: the Hub cache or ~/.cache/clip for URL tags).
        text_packing: ``auto`` (prefix-shared packing when the text tower supports it and a probe confirms it
            matches ``encode_text``, else length buckets), ``prefix`` (required; error otherwise), or
            ``buckets``. See :class:`FieldEncoder`.
        lora: the ``model.lora`` mapping: adapters on the towers with rank > 0 (:mod:`gcl.model.lora`).

    Raises:
        WeightsUnavailableError: weights not cached and not downloadable (offline) - at once, before any
            model is instantiated, with the fixes in the message.
    """
    t0 = time.perf_counter()
    _check_request(name, precision, text_packing, config_path, compile, attention, patch_dropout)
    model, model_cfg, tokenizer = create_with_weights(name, pretrained, precision=precision, device=device,
                                                      cache_dir=cache_dir)
    _attach_logit_bias(model, model_cfg, logit_bias_init)
    lock_towers(model, lock_image=lock_image, lock_image_unlocked_groups=lock_image_unlocked_groups,
                lock_image_freeze_bn=lock_image_freeze_bn, lock_text=lock_text,
                lock_text_unlocked_layers=lock_text_unlocked_layers,
                lock_text_freeze_layer_norm=lock_text_freeze_layer_norm)
    apply_lora_config(model, lora)
    _apply_training_settings(model, grad_checkpointing, patch_dropout, channels_last)

    pad_id = tokenizer_pad_id(tokenizer)
    real_length, packing = choose_text_encoding(model, tokenizer, pad_id, name, text_packing)
    compile_towers(model, compile, compile_backend)  # after the probe above, which must run eagerly

    pp_cfg = dict(model.visual.preprocess_cfg)
    pp = PreprocessCfg(**pp_cfg)
    _log_built(model, name, pretrained, precision, real_length, packing, time.perf_counter() - t0)
    return ModelBundle(
        model=model,
        preprocess_train=image_transform_v2(pp, is_train=True),
        preprocess_val=image_transform_v2(pp, is_train=False),
        tokenizer=tokenizer,
        context_length=int(model.context_length),
        pad_id=pad_id,
        real_length=real_length,
        text_packing=packing,
        attention=attention,
        channels_last=channels_last,
        name=name,
        pretrained=pretrained,
        model_cfg=model_cfg,
        preprocess_cfg=pp_cfg,
    )

