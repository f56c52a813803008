"""Text and image batches -> L2-normalized fp32 features on CPU, for evaluation (:class:`Embedder`).

Lives here: batching, per-field tokenization budgets and the normalization of a ``FieldEncoder``'s outputs.
Not here: where documents come from (``gcl.eval.sources``), scoring (``gcl.eval.tasks``), the encoder itself
(``gcl.model``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


class Embedder:
    """Batches -> fp32 L2-normalized features on CPU, through a ``FieldEncoder``-like callable.

    ``encoder(batch, fields) -> {field: FloatTensor[B, D]}`` (unnormalized, zero rows where missing);
    ``context_length(field)`` gives each text field's token budget (already capped at the model's).
    """

    def __init__(self, encoder: Any, tokenizer: Any, context_length: Mapping[str, int], default_context_length: int,
                 device: torch.device, batch_size: int, model_context_length: int | None = None,
                 pad_id: int = 0) -> None:
        self.encoder, self.tokenizer, self.device = encoder, tokenizer, device
        self.ctx, self.default_ctx = dict(context_length), int(default_context_length)
        self.model_ctx = model_context_length
        self.batch_size, self.pad_id = int(batch_size), int(pad_id)

    def context_length(self, f: str) -> int:
        n = int(self.ctx.get(f, self.default_ctx))
        return min(n, self.model_ctx) if self.model_ctx else n

    def _to(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(self.device, non_blocking=True)
        if isinstance(x, dict):
            return {k: self._to(v) for k, v in x.items()}
        return x

    @torch.no_grad()
    def batch(self, batch: Mapping[str, Any], fields: Sequence[str]) -> dict[str, torch.Tensor]:
        """Normalized FloatTensor[B, D] (CPU) per field of a batch dict (docs/architecture.md layout)."""
        b = {k: self._to(batch[k]) for k in ("image", "tokens", "present") if k in batch}
        out = self.encoder(b, list(fields))
        return {f: F.normalize(out[f].float(), dim=-1).cpu() for f in fields}

    def tokens(self, texts: Sequence[str], f: str) -> torch.Tensor:
        """LongTensor[n, L<=context]: tokenized with the field's budget, trailing all-pad columns dropped."""
        tok = self.tokenizer(list(texts), context_length=self.context_length(f)).long()
        used = (tok != self.pad_id).any(dim=0).nonzero()
        return tok[:, : max(1, int(used[-1]) + 1 if len(used) else 1)].contiguous()

    @torch.no_grad()
    def strings(self, texts: Sequence[str], f: str) -> torch.Tensor:
        """FloatTensor[n, D] normalized features of ``texts`` as field ``f`` (each distinct string encoded once)."""
        uniq = sorted(set(texts))
        pos = {s: i for i, s in enumerate(uniq)}
        parts = []
        for s in range(0, len(uniq), self.batch_size):
            chunk = uniq[s: s + self.batch_size]
            batch = {"tokens": {f: self.tokens(chunk, f)}, "present": {f: torch.ones(len(chunk), dtype=torch.bool)}}
            parts.append(self.batch(batch, [f])[f])
        table = torch.cat(parts) if parts else torch.zeros(0, 0)
        return table[[pos[s] for s in texts]] if texts else table

    def optional_strings(self, texts: Sequence[str | None], f: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(FloatTensor[n, D] with zero rows for None, BoolTensor[n] present) of possibly-missing strings."""
        present = torch.tensor([t is not None for t in texts], dtype=torch.bool)
        vals = [t for t in texts if t is not None]
        enc = self.strings(vals, f)
        if enc.numel() == 0:
            dim = self.embed_dim()
            return torch.zeros(len(texts), dim), present
        out = torch.zeros(len(texts), enc.shape[1])
        out[present] = enc
        return out, present

    def embed_dim(self) -> int:
        return int(self.strings(["a"], "__probe__").shape[1])
