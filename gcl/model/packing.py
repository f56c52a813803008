"""Real-length text-tower passes: native tower views, length buckets, prefix-shared packing.

Lives here: a view of a native open_clip text tower's parts (:class:`_NativeText`) and the structural test
that its output ignores tokens after the pooled one (:func:`real_length_structure`); the tower's forward at
a row's own length (:func:`_forward_native`); the length-bucket plan (:func:`plan_length_buckets`); the
prefix-shared packing plan (:func:`plan_prefix_packing`, :class:`PackPlan`) and its packed forward
(:func:`_forward_packed`). Pure planning and tower forwards: no deduplication, no batch dicts.

Not here: :class:`~gcl.model.encoder.FieldEncoder`, which deduplicates a batch's rows and picks a plan, and
the build-time check that these paths equal ``encode_text`` (:func:`gcl.model.encoder.verify_real_length`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, text_global_pool
from torch import Tensor, nn


@dataclass
class _NativeText:
    """References to a native open_clip text tower's parts (no copies), for a forward at any length."""

    token_embedding: nn.Module
    positional_embedding: Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Any
    attn_mask: Tensor | None
    pool_type: str
    eos_id: int | None


def _native_text(model: nn.Module) -> _NativeText | None:
    text = getattr(model, "text", None)
    if text is None and hasattr(model, "token_embedding"):  # CLIP class: text parts live on the model
        return _NativeText(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                           model.text_projection, model.attn_mask, model.text_pool_type,
                           getattr(model, "text_eos_id", None))
    if isinstance(text, TextTransformer) and text.cls_emb is None and not text.use_pad_mask:
        return _NativeText(text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
                           text.text_projection, text.attn_mask, text.pool_type, text.eos_id)
    return None  # HF towers, CoCa-style class tokens, pad masks: encode with open_clip at fixed length


def _is_causal(mask: Tensor | None) -> bool:
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    above = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.equal(torch.isneginf(mask), above) and (mask[~above] == 0).all())


def real_length_structure(model: nn.Module) -> bool:
    """Whether the text tower's output provably ignores tokens after the pooled one.

    True for a native tower with a causal attention mask that pools at the EOT token (``argmax`` or
    ``eos``): position i only attends to positions <= i, so trimming trailing tokens after the pooled
    position cannot change the output. SigLIP-style towers (no mask, ``last`` pooling over padding) are False.
    """
    parts = _native_text(model)
    return parts is not None and _is_causal(parts.attn_mask) and parts.pool_type in ("argmax", "eos")


def _pool_positions(tokens: Tensor, pool_type: str, eos_id: int | None) -> Tensor:
    """Index of the pooled token per row (LongTensor[N]); real length = position + 1."""
    if pool_type == "argmax":
        return tokens.argmax(dim=1)
    # First EOS; a row without one pools position 0, as open_clip's text_global_pool(..., "eos") does.
    return (tokens == eos_id).int().argmax(dim=1)


def _forward_native(parts: _NativeText, tokens: Tensor, embedded: Tensor | None = None) -> Tensor:
    """Text tower forward at the tokens' own length L (LongTensor[N, L] -> [N, D]).

    open_clip's ``CLIP.encode_text`` adds the full positional embedding and full causal mask, so it only
    accepts full-context rows; this slices both to L (valid for causal towers, see real_length_structure).
    ``embedded``: the rows' token embeddings [N, L, W] when already looked up.
    """
    n_ctx = tokens.shape[1]
    cast = parts.transformer.get_cast_dtype()
    if embedded is None:
        embedded = parts.token_embedding(tokens)
    x = embedded.to(cast) + parts.positional_embedding[:n_ctx].to(cast)
    mask = parts.attn_mask[:n_ctx, :n_ctx] if parts.attn_mask is not None else None
    x = parts.transformer(x, attn_mask=mask)
    x = parts.ln_final(x)
    x = text_global_pool(x, tokens, parts.pool_type, eos_token_id=parts.eos_id)
    proj = parts.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


@dataclass
class PackPlan:
    """Prefix-shared packing of token rows into ``S`` sequences of ``C`` slots (see :func:`plan_prefix_packing`)."""

    tokens: Tensor  # LongTensor[S, C]: the token of each slot (pad_id in unused slots)
    positions: Tensor  # LongTensor[S, C]: each slot's depth in its row, the positional-embedding index
    allowed: Tensor  # BoolTensor[S, C, C]: allowed[s, i, j] = slot j is slot i or one of its ancestors
    pooled: Tensor  # LongTensor[U]: flat slot (s * C + i) of each row's pooled (last) token
    nodes: int  # slots holding a token; the rest are padding


def _greedy_fill(lengths: list[int], lcp: list[int], capacity: int) -> tuple[list[int], list[int], list[int]]:
    """Next-fit of rows into sequences of ``capacity`` slots; a row shares its prefix with the row before it
    when both are in the same sequence. Returns per row (sequence, first new slot, shared prefix length)."""
    seq, start, shared = [], [], []
    s, fill = -1, capacity
    for r, n in enumerate(lengths):
        p = lcp[r] if r else 0
        if fill + n - p > capacity:
            s, fill, p = s + 1, 0, 0
        seq.append(s)
        start.append(fill)
        shared.append(p)
        fill += n - p
    return seq, start, shared


def plan_prefix_packing(rows: Tensor, lengths: Tensor, width: int, pad_id: int = 0, heads: int = 1,
                        max_mask_bytes: int = 1 << 28) -> PackPlan:
    """Pack token rows for a causal text tower so that every distinct prefix is computed once.

    Under a causal mask, the hidden state of a token depends only on the tokens before it, so rows that
    start with the same tokens (every row's start token; "red cotton ..." and "red cotton dress") share
    those positions' states exactly. Rows are taken in lexicographic order, so a row's longest common
    prefix with any earlier row of its sequence is its prefix with the row just before it; the row then
    adds only its remaining tokens as new slots. Each slot attends to itself and its ancestors (the
    ``allowed`` mask) and keeps its depth as its position, so every row sees exactly the keys, values and
    positions it would see alone: the pooled outputs equal per-row encoding up to float reduction order.

    The sequence capacity ``C`` (>= the longest row) is chosen among a few multiples of the longest row to
    minimise ``slots * (1 + C / (6 * width))``: slots are the per-token matmul work (``12 * width**2``
    multiply-adds per layer), and ``2 * C * width`` is one slot's attention work. Capacities whose additive
    attention mask (``S * heads * C * C`` floats) would exceed ``max_mask_bytes`` are skipped, except the
    smallest.

    rows: LongTensor[U, W], distinct rows, trailing padding allowed; lengths: LongTensor[U] real lengths
    (pooled position + 1).
    """
    u = rows.detach().cpu().numpy()
    n = lengths.detach().cpu().numpy().astype(np.int64)
    if u.ndim != 2 or len(u) == 0 or len(n) != len(u) or n.min() < 1:
        raise ValueError(f"expected non-empty rows [U, W] with lengths >= 1, got {u.shape} / {n.shape}")
    order = np.lexsort(u[:, ::-1].T)  # lexicographic: column 0 is the primary key
    u, n = u[order], n[order]
    depth = int(n.max())
    lcp = np.zeros(len(u), dtype=np.int64)
    if len(u) > 1:
        lcp[1:] = np.cumprod(u[1:, :depth] == u[:-1, :depth], axis=1).sum(axis=1)
        # Share only positions both rows have, and leave each row >= 1 own slot (its pooled token).
        lcp[1:] = np.minimum(lcp[1:], np.minimum(n[1:] - 1, n[:-1]))
    n_list, lcp_list = n.tolist(), lcp.tolist()
    best = None
    for c in sorted({depth, *(-(-depth * k // 16) * 8 for k in (3, 4, 6, 8))}):  # 1x, 1.5x, 2x, 3x, 4x
        fill = _greedy_fill(n_list, lcp_list, c)
        slots = (fill[0][-1] + 1) * c
        if best is not None and slots * heads * c * 4 > max_mask_bytes:
            break
        cost = slots * (1 + c / (6 * width))
        if best is None or cost < best[0]:
            best = (cost, c, fill)
    _, cap, (seq_l, start_l, shared_l) = best
    seq, start, shared = (np.asarray(x, dtype=np.int64) for x in (seq_l, start_l, shared_l))
    n_seq = int(seq[-1]) + 1

    # path[r, d]: slot (within its sequence) of row r's token at depth d. The slot was created by the
    # latest row r' <= r with shared[r'] <= d; sequence starts have shared = 0, so r' is in r's sequence.
    idx_rows = np.arange(len(u))
    path = np.empty((len(u), depth), dtype=np.int64)
    for d in range(depth):
        creator = np.maximum.accumulate(np.where(shared <= d, idx_rows, 0))
        path[:, d] = start[creator] + d - shared[creator]

    ri, di = np.nonzero((np.arange(depth)[None, :] >= shared[:, None]) & (np.arange(depth)[None, :] < n[:, None]))
    flat = seq[ri] * cap + path[ri, di]
    tokens = np.full(n_seq * cap, pad_id, dtype=np.int64)
    positions = np.zeros(n_seq * cap, dtype=np.int64)
    tokens[flat] = u[ri, di]
    positions[flat] = di
    allowed = np.zeros((n_seq * cap, cap), dtype=bool)
    allowed[np.arange(n_seq * cap), np.arange(n_seq * cap) % cap] = True  # padding slots see only themselves
    node, e = np.nonzero(np.arange(depth)[None, :] <= di[:, None])
    allowed[flat[node], path[ri[node], e]] = True
    pooled = np.empty(len(u), dtype=np.int64)
    pooled[order] = seq * cap + path[idx_rows, n - 1]
    device = rows.device
    return PackPlan(tokens=torch.from_numpy(tokens).view(n_seq, cap).to(device),
                    positions=torch.from_numpy(positions).view(n_seq, cap).to(device),
                    allowed=torch.from_numpy(allowed).view(n_seq, cap, cap).to(device),
                    pooled=torch.from_numpy(pooled).to(device), nodes=len(flat))


def _packable(parts: _NativeText) -> bool:
    """Whether every block of the tower takes a per-sequence [N * heads, L, L] attention mask (open_clip's
    ResidualAttentionBlock over ``nn.MultiheadAttention``)."""
    blocks = getattr(parts.transformer, "resblocks", None)
    return bool(blocks) and all(isinstance(b, ResidualAttentionBlock) and isinstance(b.attn, nn.MultiheadAttention)
                                and not hasattr(b, "ln_1_kv") for b in blocks)


def _forward_packed(parts: _NativeText, plan: PackPlan) -> Tensor:
    """Text tower forward over a :class:`PackPlan` -> FloatTensor[U, D], one pooled row per packed row."""
    cast = parts.transformer.get_cast_dtype()
    embedded = parts.token_embedding(plan.tokens)
    # F.embedding, not indexing: its CPU backward sums repeated positions in a fixed order (indexing's
    # backward uses atomic adds there, so resumed and uninterrupted runs would drift apart by ~1e-6).
    x = embedded.to(cast) + F.embedding(plan.positions, parts.positional_embedding).to(cast)
    heads = parts.transformer.resblocks[0].attn.num_heads
    mask = torch.zeros(plan.allowed.shape, dtype=cast, device=x.device).masked_fill_(~plan.allowed, float("-inf"))
    x = parts.transformer(x, attn_mask=mask.repeat_interleave(heads, dim=0))
    x = parts.ln_final(x.reshape(-1, x.shape[-1])[plan.pooled])
    proj = parts.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


# Fixed cost of one more text-tower pass, in tokens of work. CPU: a pass costs ~1 ms of Python/dispatch
# while one ViT-B text token (forward + backward) costs ~1-3 ms, so splitting almost always pays. CUDA: a pass
# is ~500 kernel launches (~2-3 ms) while thousands of tokens run in that time at small batch.
PASS_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 2048}


def plan_length_buckets(lengths: Tensor, max_passes: int = 8, pass_overhead_tokens: int = 1024) -> list[int]:
    """Split rows by real length into at most ``max_passes`` text-tower passes; return ascending max lengths.

    Rule: minimise ``sum_p rows_p * len_p + pass_overhead_tokens * passes`` (padded tokens processed plus a
    fixed per-pass cost in token equivalents), where a pass runs at its longest row's length ``len_p``. The
    cost is linear in tokens because at L <= 77 the per-token MLP/projection work dominates attention.
    Exact dynamic programme over the distinct lengths (at most context_length of them).
    """
    vals, counts = torch.unique(lengths.cpu(), return_counts=True)
    v, c = vals.tolist(), counts.tolist()
    n = len(v)
    pre = [0]
    for x in c:
        pre.append(pre[-1] + x)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(max_passes + 1)]
    arg = [[0] * (n + 1) for _ in range(max_passes + 1)]
    best[0][0] = 0.0
    for k in range(1, max_passes + 1):
        for j in range(1, n + 1):
            for i in range(j):
                cost = best[k - 1][i] + (pre[j] - pre[i]) * v[j - 1] + pass_overhead_tokens
                if cost < best[k][j]:
                    best[k][j], arg[k][j] = cost, i
    k = min(range(1, max_passes + 1), key=lambda kk: best[kk][n])
    bounds, j = [], n
    while j > 0:
        bounds.append(v[j - 1])
        j, k = arg[k][j], k - 1
    return bounds[::-1]
