"""Encode a batch's fields: :class:`FieldEncoder`, and the build-time check that decides how it encodes text.

Lives here: :class:`FieldEncoder` (a batch dict -> unnormalized features per field, text rows deduplicated
across fields and encoded at their real length when the tower allows); :func:`verify_real_length`, which
compares the real-length paths with open_clip's own full-context ``encode_text`` on probe strings; and
:func:`choose_text_encoding`, the build step that turns the structural test and that probe into the
``real_length`` / ``text_packing`` decisions a :class:`~gcl.model.ModelBundle` carries.

Not here: the packing and bucket plans and the tower forwards they run (:mod:`gcl.model.packing`); the loss
(:mod:`gcl.loss`).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcl.config import ATTENTION, TEXT_PACKING
from gcl.model.packing import (
    PASS_OVERHEAD_TOKENS,
    _forward_native,
    _forward_packed,
    _native_text,
    _NativeText,
    _packable,
    _pool_positions,
    plan_length_buckets,
    plan_prefix_packing,
    real_length_structure,
)
from gcl.model.speed import attention_kernels

log = logging.getLogger(__name__)

IMAGE = "image"

# Probe strings for the real-length and packing checks: one very short, one long, one in between, and rows
# that share prefixes with them (prefix-shared packing encodes a shared prefix once).
_PROBE_TEXTS = (
    "a",
    "red cotton midi dress with long sleeves, a round neck, a button front and two side pockets",
    "black leather ankle boots",
    "red cotton midi dress",
    "black leather belt",
)


class FieldEncoder(nn.Module):
    """Encode a batch's image and text fields with one model; text rows deduplicated, at real length.

    ``forward(batch, fields) -> {field: FloatTensor[B, D]}``: unnormalized tower outputs in float32, zero rows
    where ``batch["present"][field]`` is False. The model is a registered submodule, so wrapping this module in
    DistributedDataParallel covers both towers (pass the unwrapped model here).

    Text passes: the present rows of all requested fields are padded to a common width, deduplicated with
    ``torch.unique`` over rows (identical strings in different fields or samples are encoded once; gradients
    from every use add up through the gather), then encoded:

    * ``real_length=True`` (causal tower, EOT pooling, verified at build): each unique row runs at its real
      length (up to its EOT). ``text_packing="prefix"`` packs the rows into a few sequences in which every
      distinct prefix is one slot (see :func:`plan_prefix_packing`): one pass, no padding between rows, shared
      prefixes computed once. ``"buckets"`` groups rows by length into at most ``max_passes`` padded passes
      (see :func:`plan_length_buckets`; ``pass_overhead_tokens`` defaults to ``PASS_OVERHEAD_TOKENS`` of the
      model's device type). ``"auto"`` is prefix packing when every text block takes a per-sequence mask
      (open_clip's ``ResidualAttentionBlock``), else buckets. A packed pass whose attention mask
      (``S * heads * C * C`` floats) would exceed ``max_mask_bytes`` (256 MiB) is split in two;
    * ``real_length=False`` (SigLIP-like towers): rows are padded with ``pad_id`` back to ``context_length``
      and encoded by ``model.encode_text`` in one pass, exactly as the model was trained.

    A batch with no present row in any requested text field still runs the text tower, on one placeholder row
    (``null_tokens``: the tokenizer's row for an empty text; ``ModelBundle.field_encoder`` passes it), whose
    output enters the result multiplied by zero. Every process's backward then reaches the same text-tower
    parameters whatever its data holds (DDP's reducer, and FSDP's collectives, need that on every rank and
    every GradCache micro-batch), and the gradient is exactly unchanged. Without ``null_tokens`` the
    placeholder is ``[pad_id, pad_id]``.

    Speed settings (:mod:`gcl.model.speed`): ``attention`` selects the attention kernels for each forward;
    ``channels_last`` feeds images in NHWC order (for a tower whose weights were converted likewise).
    """

    def __init__(self, model: nn.Module, real_length: bool, pad_id: int, context_length: int,
                 max_passes: int = 8, pass_overhead_tokens: int | None = None, text_packing: str = "auto",
                 max_mask_bytes: int = 1 << 28, null_tokens: Tensor | None = None, attention: str = "auto",
                 channels_last: bool = False) -> None:
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r} is not one of {ATTENTION}")
        self.attention = attention
        self.channels_last = bool(channels_last)
        self.model = model
        self.real_length = bool(real_length)
        self.pad_id = int(pad_id)
        self.context_length = int(context_length)
        if null_tokens is None:
            null_tokens = torch.full((2,), self.pad_id, dtype=torch.long)
        null_tokens = torch.as_tensor(null_tokens, dtype=torch.long).reshape(-1)
        if not 0 < null_tokens.numel() <= self.context_length:
            raise ValueError(f"null_tokens must be one token row of 1..{self.context_length} tokens, got "
                             f"{null_tokens.numel()}")
        # A plain attribute, not a buffer: DDP would broadcast a buffer on every forward.
        self.null_tokens = null_tokens
        self.max_passes = max_passes
        self.pass_overhead_tokens = pass_overhead_tokens
        self.max_mask_bytes = int(max_mask_bytes)
        if text_packing not in TEXT_PACKING:
            raise ValueError(f"text_packing={text_packing!r} is not one of {TEXT_PACKING}")
        parts = _native_text(model)
        if self.real_length and parts is None:
            raise ValueError("real_length=True needs a native open_clip text tower (CLIP or TextTransformer)")
        packable = self.real_length and _packable(parts)
        if text_packing == "prefix" and not packable:
            raise ValueError("text_packing='prefix' needs a real-length causal text tower built from open_clip "
                             "ResidualAttentionBlocks; use text_packing='auto' or 'buckets'")
        self.text_packing = "prefix" if packable and text_packing != "buckets" else "buckets"
        self.last_passes = 0  # text-tower passes of the last call (for tests and logging)
        self.last_unique_rows = 0
        self.last_text_slots = 0  # token positions the text tower ran over in the last call, padding included

    # -- images
    def _image_dtype(self) -> torch.dtype:
        for m in self.model.visual.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                return m.weight.dtype
        return torch.float32

    def encode_image(self, images: Tensor) -> Tensor:
        """FloatTensor[B, 3, H, W] -> FloatTensor[B, D] (float32, unnormalized)."""
        images = images.to(self._image_dtype())
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model.encode_image(images).float()

    # -- text
    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Encode rows LongTensor[N, L] (L <= context_length; trailing pad allowed) -> FloatTensor[N, D].

        Deduplicates rows; each unique row is encoded once.
        """
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ValueError(f"expected a non-empty LongTensor[N, L], got shape {tuple(tokens.shape)}")
        uniq, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        self.last_unique_rows = uniq.shape[0]
        return self._encode_unique(uniq)[inverse]

    def _encode_unique(self, uniq: Tensor) -> Tensor:
        if uniq.shape[1] > self.context_length:
            raise ValueError(f"token rows of length {uniq.shape[1]} exceed the model's context length "
                             f"{self.context_length}; lower data.context_length for that field")
        if not self.real_length:
            self.last_passes = 1
            full = F.pad(uniq, (0, self.context_length - uniq.shape[1]), value=self.pad_id)
            self.last_text_slots = full.numel()
            return self.model.encode_text(full).float()
        parts = _native_text(self.model)
        lengths = _pool_positions(uniq, parts.pool_type, parts.eos_id) + 1
        if self.text_packing == "prefix":
            self.last_passes = self.last_text_slots = 0
            return self._encode_packed(parts, uniq, lengths)
        overhead = self.pass_overhead_tokens
        if overhead is None:
            overhead = PASS_OVERHEAD_TOKENS.get(uniq.device.type, PASS_OVERHEAD_TOKENS["cuda"])
        bounds = plan_length_buckets(lengths, self.max_passes, overhead)
        self.last_passes = len(bounds)
        self.last_text_slots = 0
        # One embedding lookup for all rows: its backward then builds the dense [vocab, width] gradient once
        # instead of once per pass.
        emb = parts.token_embedding(uniq[:, : bounds[-1]])
        outs, order, lo = [], [], 0
        for hi in bounds:
            idx = torch.nonzero((lengths > lo) & (lengths <= hi)).squeeze(1)
            self.last_text_slots += idx.numel() * hi
            outs.append(_forward_native(parts, uniq[idx, :hi], emb[idx, :hi]).float())
            order.append(idx)
            lo = hi
        order_t = torch.cat(order)
        inv = torch.empty_like(order_t)
        inv[order_t] = torch.arange(order_t.numel(), device=order_t.device)
        return torch.cat(outs)[inv]

    def _encode_packed(self, parts: _NativeText, uniq: Tensor, lengths: Tensor) -> Tensor:
        """Prefix-packed pass(es): rows (sorted, as ``torch.unique`` returns them, so halves keep most shared
        prefixes) are split in halves while one pass's attention mask would exceed ``max_mask_bytes``."""
        heads = parts.transformer.resblocks[0].attn.num_heads
        plan = plan_prefix_packing(uniq, lengths, parts.transformer.width, self.pad_id, heads=heads,
                                   max_mask_bytes=self.max_mask_bytes)
        if plan.allowed.numel() * heads * 4 > self.max_mask_bytes and uniq.shape[0] > 1:
            h = uniq.shape[0] // 2
            return torch.cat([self._encode_packed(parts, uniq[:h], lengths[:h]),
                              self._encode_packed(parts, uniq[h:], lengths[h:])])
        self.last_passes += 1
        self.last_text_slots += plan.tokens.numel()
        return _forward_packed(parts, plan).float()

    def _null_rows(self, batch_size: int, device: torch.device) -> Tensor:
        """FloatTensor[B, D] of zeros that depends on every text-tower parameter (zero gradient): the placeholder
        row is encoded and multiplied by zero (see the class docstring)."""
        enc = self._encode_unique(self.null_tokens.to(device).unsqueeze(0))
        self.last_unique_rows = 0
        # 0 * NaN would poison every gradient of the step, so a tower that cannot encode the placeholder stops here.
        if not bool(torch.isfinite(enc).all()):
            raise RuntimeError(f"the text tower gave non-finite features for the placeholder row "
                               f"{self.null_tokens.tolist()} (used when a batch has no present text row); build the "
                               "encoder with ModelBundle.field_encoder(), which passes the tokenizer's empty-text row")
        return (enc * 0).expand(batch_size, -1)

    def encode_text_fields(self, tokens: Mapping[str, Tensor], present: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Encode several text fields together.

        tokens: {field: LongTensor[B, L_f]}; present: {field: BoolTensor[B]} (False rows are not encoded).
        Returns {field: FloatTensor[B, D]} with zero rows where not present.
        """
        names = list(tokens)
        if not names:
            return {}
        b = tokens[names[0]].shape[0]
        device = tokens[names[0]].device
        width = max(tokens[f].shape[1] for f in names)
        rows, counts, masks = [], [], []
        for f in names:
            t, m = tokens[f], present[f].to(torch.bool)
            if t.shape[0] != b or m.shape != (b,):
                raise ValueError(f"field {f!r}: tokens {tuple(t.shape)} / present {tuple(m.shape)} do not match "
                                 f"batch size {b}")
            rows.append(F.pad(t[m], (0, width - t.shape[1]), value=self.pad_id))
            counts.append(int(m.sum()))
            masks.append(m)
        all_rows = torch.cat(rows)
        if all_rows.shape[0] == 0:
            zeros = self._null_rows(b, device)
            return {f: zeros.clone() for f in names}
        uniq, inverse = torch.unique(all_rows, dim=0, return_inverse=True)
        self.last_unique_rows = uniq.shape[0]
        enc = self._encode_unique(uniq)
        # Row 0 of the table is the zero vector for missing values; one gather per field scatters back.
        table = torch.cat([enc.new_zeros(1, enc.shape[1]), enc])
        out, start = {}, 0
        for f, m, n in zip(names, masks, counts):
            idx = torch.zeros(b, dtype=torch.long, device=device)
            idx[m] = inverse[start:start + n] + 1
            out[f] = table[idx]
            start += n
        return out

    def forward(self, batch: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Tensor]:
        """Features for ``fields`` (``"image"`` and/or text field names) of a batch dict."""
        with attention_kernels(self.attention):
            return self._forward(batch, list(dict.fromkeys(fields)))

    def _forward(self, batch: Mapping[str, Any], fields: list[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        text = [f for f in fields if f != IMAGE]
        missing = [f for f in text if f not in batch["tokens"]]
        if missing:
            raise KeyError(f"fields {missing} are not in the batch (has {sorted(batch['tokens'])}); check the "
                           f"loss/eval field names against the data")
        if IMAGE in fields:
            img = self.encode_image(batch["image"])
            mask = batch.get("present", {}).get(IMAGE)
            out[IMAGE] = img if mask is None or bool(mask.all()) else img * mask[:, None].to(img.dtype)
        out.update(self.encode_text_fields({f: batch["tokens"][f] for f in text},
                                           {f: batch["present"][f] for f in text}))
        return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, t in flags.items():
            m.training = t


def verify_real_length(model: nn.Module, tokenizer: Callable, pad_id: int, context_length: int,
                       packings: Iterable[str] = ("buckets",)) -> dict[str, tuple[bool, float]]:
    """Check empirically that real-length encoding equals open_clip's full-context ``encode_text``.

    Encodes probe strings at full context with the model's own ``encode_text`` (once) and with the
    real-length encoder in each of ``packings`` (``buckets``: rows trimmed and bucketed; ``prefix``:
    prefix-packed). Returns {packing: (ok, max abs difference)}; tolerance 1e-5 in fp32, and 2e-2 x the
    feature scale for bf16/fp16 towers (different sequence lengths change reduction order).
    """
    full = tokenizer(list(_PROBE_TEXTS), context_length=context_length)
    full = full.to(next(model.parameters()).device)
    cast = _native_text(model).transformer.get_cast_dtype()
    out = {}
    with torch.no_grad(), _eval_mode(model):
        ref = model.encode_text(full).float()
        tol = 1e-5 if cast == torch.float32 else 2e-2 * max(1.0, float(ref.abs().max()))
        for packing in packings:
            enc = FieldEncoder(model, True, pad_id, context_length, pass_overhead_tokens=0, text_packing=packing)
            diff = float((ref - enc.encode_tokens(full)).abs().max())
            out[packing] = (diff <= tol, diff)
    return out


def choose_text_encoding(model: nn.Module, tokenizer: Callable, pad_id: int, name: str,
                         text_packing: str) -> tuple[bool, str]:
    """Decide ``(real_length, packing)`` for a built model from its text tower and the probe.

    ``real_length`` only for a tower with the causal structure (:func:`real_length_structure`) whose
    bucketed probe matches ``encode_text``; ``"prefix"`` packing only when ``text_packing`` is ``auto`` or
    ``prefix``, every block takes a per-sequence mask, and the packed probe matches too; else ``"buckets"``.
    A failed probe is logged as a warning. Raises ValueError when ``text_packing="prefix"`` is impossible.
    """
    real_length, packing = False, "buckets"
    if real_length_structure(model):
        try_prefix = text_packing != "buckets" and _packable(_native_text(model))
        checks = verify_real_length(model, tokenizer, pad_id, model.context_length,
                                    ("buckets", "prefix") if try_prefix else ("buckets",))
        real_length, diff = checks["buckets"]
        if not real_length:
            log.warning("text tower looks causal but real-length encoding differs by %.2e from full context; "
                        "encoding at the fixed context length instead", diff)
        elif try_prefix:
            ok, diff = checks["prefix"]
            if ok:
                packing = "prefix"
            else:
                log.warning("prefix-packed text encoding differs by %.2e from encode_text; using length buckets",
                            diff)
    if text_packing == "prefix" and packing != "prefix":
        raise ValueError(f"model.text_packing=prefix is not possible for {name}: its text tower is not a verified "
                         "real-length causal open_clip tower; use model.text_packing=auto or buckets")
    return real_length, packing
