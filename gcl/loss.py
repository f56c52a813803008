"""The GCL multi-field contrastive loss: weighted terms, fused sides, duplicates, rank weights, gather.

A loss is a list of **terms**. Each term pairs a *left* side with a *right* side; a side is one field or a
weighted fusion of fields (``"image"`` is the picture, any other name is a text field)::

    side_i = normalize( sum_k a'_ik * normalize(f_k[i]) ),   a'_ik = a_k * present_k[i] / sum_k a_k * present_k[i]

so missing fields are dropped and the weights renormalised per sample (e.g. a document of 0.9 image + 0.1
title falls back to the image alone where the title is missing). A sample takes part in a term (as a row
*and* as a column) only if both sides have at least one present field with a positive weight and, for a
rank-weighted term, a valid score (see below). The total is ``loss = sum_t weight_t * L_t``.

Kinds (``s = exp(logit_scale)``, ``b = logit_bias``, ``cos`` the cosine of the fused sides, N valid samples):

- ``clip``: symmetric softmax InfoNCE on logits ``s * cos (+ b)``:
  ``L = sum_i w_i * (CE_i(left->right) + CE_i(right->left)) / 2 / Z``.
- ``siglip``: pairwise sigmoid on logits ``s * cos + b`` with labels ``y_ij = +1`` for positives, else -1:
  ``L = sum_i w_i * sum_j -log sigmoid(y_ij * logit_ij) / Z`` (summed over pairs and divided by the number
  of rows, as open_clip's ``SigLipLoss``).

``Z`` is the number of valid rows N, or ``sum_i w_i`` when ``normalize_weights`` (so the weights are
normalised per global batch to mean 1 and only their ratios matter). With one term, all fields present,
no rank weights and no duplicates, both kinds equal open_clip's ``ClipLoss`` / ``SigLipLoss`` exactly.

**Rank weights** (``score_to_weight``; one weight per positive pair i, i.e. per row, multiplying that row's
whole loss in both CLIP directions / its whole SigLIP row). Marqo's GCL paper turns ranking scores into
per-pair weights through a score-to-weight function (their training code is not public, so the formulas
below are ours, following the paper's names):

- ``none``:       ``w_i = 1``                                  (plain contrastive learning)
- ``linear``:     ``w_i = score_i``, needs ``score_field: score``, valid where finite and ``>= 0``
                  (higher relevance, larger weight, proportionally)
- ``reciprocal``: ``w_i = 1 / position_i``, needs ``score_field: position`` (1 = top result), valid where
                  finite and ``>= 1`` (the reciprocal-rank gain of MRR)

Rows whose score is missing (NaN) or invalid are left out of the term and counted in ``skipped/<term>``.

**Duplicates** (``duplicates=True``, the default): samples that are the same thing on one side are
positives, not negatives, of each other. Pairs (i, j) are positives when ``i == j``, or they share an
``item_id``, or a side is text-only and all its fields' ``text_id`` are equal (e.g. two products whose
``colors`` are both "black": identical text gives identical features, so the pair cannot be told apart).
The data path derives ``text_id`` from the token rows (:func:`gcl.data.batch.token_row_ids`), so texts are
duplicates exactly when the encoder sees the same tokens ("Black" / "black " under a lower-casing tokenizer,
texts equal after truncation).
The design brief names the left side; we apply the same rule to a text-only right side so that a term and
its mirror (``image <-> colors``) behave alike. Sides that contain the image use ``item_id`` only. CLIP uses
a soft target spread uniformly over the row's positives (soft-target cross entropy); SigLIP labels them +1.
``duplicates=False`` gives plain InfoNCE / SigLIP (only the diagonal is positive), exactly open_clip's.
Note for the CLIP kind: when duplicates are identical strings (identical features, so identical logit rows
and columns), the one-hot cross entropies of the duplicate rows already sum to the soft-target ones, so
the loss and its gradients are the same either way; the soft targets change the result for ``item_id``
duplicates (different texts or pictures of one item) and fused sides. For SigLIP every pair has its own
label, so text duplicates labelled negative are real label noise there (tests show both facts).

**Distributed** (``torch.distributed`` initialised, world size W > 1): every needed field's features are
gathered once (one autograd all-gather for all fields) and the metadata once (one plain all-gather). Each
rank computes its LOCAL rows against ALL global columns (both directions for CLIP) and returns
``W * (sum over its valid rows of w_i * l_i) / Z_global``. The all-gather's backward sums the column
gradients back to their owners, so the sum over ranks of the parameter gradients is W times the gradient of
the global loss and DDP's gradient *average* gives exactly the single-process gradient of the concatenated
global batch, for tower parameters and for ``logit_scale`` / ``logit_bias`` alike, whatever the number of
valid rows each rank holds. Local batches must have the same size on every rank.

**Precision**: the loss always runs in float32 (float64 when given float64 features): it switches autocast off
for its own ops and upcasts the features, ``logit_scale`` and ``logit_bias``, so that under
``trainer.mixed_precision=bf16`` only the towers run in bf16; the gathered features travel in float32 too.

Returned values: ``loss`` (differentiable) and, detached, ``loss/<term>`` (the unweighted ``L_t``),
``rows/<term>`` (global number of valid rows) and ``skipped/<term>`` (global number of rows dropped for a
missing/invalid rank score). With W > 1 ``loss`` and ``loss/<term>`` are this rank's share times W: their
**mean over ranks** is the true global value (the trainer all-reduces with AVG for logging); the counts are
already global. With W = 1 every value is the global value.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

IMAGE = "image"
KINDS: tuple[str, ...] = ("clip", "siglip")
SCORE_TO_WEIGHT: tuple[str, ...] = ("none", "linear", "reciprocal")
SCORE_FIELDS: tuple[str, ...] = ("score", "position")
# The rank-score field each score_to_weight needs (linear weights a relevance score, reciprocal a rank).
_STW_FIELD = {"linear": "score", "reciprocal": "position"}
_TERM_KEYS = frozenset({"name", "left", "right", "weight", "score_to_weight", "score_field", "normalize_weights"})
_SIDE_KEYS = frozenset({"fields", "weights"})


class SpecError(ValueError):
    """A bad term or side setting; ``key`` names it relative to its term or side (``weights``, ``score_field``)
    so :func:`build_loss` can report the full config key (``loss.terms[0].left.weights``)."""

    def __init__(self, key: str, msg: str) -> None:
        super().__init__(f"{key}: {msg}")
        self.key, self.msg = key, msg


@dataclass(frozen=True)
class Side:
    """One side of a term: ``fields`` fused with non-negative ``weights`` (same length, positive sum)."""

    fields: tuple[str, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.fields:
            raise SpecError("fields", "a side needs a non-empty list of field names")
        if len(set(self.fields)) != len(self.fields):
            raise SpecError("fields", f"{list(self.fields)} repeat a field; list each field once")
        if len(self.weights) != len(self.fields):
            raise SpecError("weights", f"{len(self.weights)} weights for {len(self.fields)} fields "
                            f"{list(self.fields)}; give one weight per field (or none for equal weights)")
        for w in self.weights:
            if not math.isfinite(w) or w < 0:
                raise SpecError("weights", f"{list(self.weights)} must be finite and >= 0")
        if sum(self.weights) <= 0:
            raise SpecError("weights", f"{list(self.weights)} sum to 0; give at least one positive weight")

    @property
    def text_only(self) -> bool:
        """True when the side holds no image: its identity is then its texts' ``text_id``s."""
        return IMAGE not in self.fields


@dataclass(frozen=True)
class Term:
    """A contrastive term ``left <-> right`` with its weight in the total and its rank-weight rule."""

    name: str
    left: Side
    right: Side
    weight: float = 1.0
    score_to_weight: str = "none"
    score_field: str = "score"
    normalize_weights: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError("name", f"a term needs a non-empty string name, got {self.name!r}")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise SpecError("weight", f"term {self.name!r}: weight must be finite and >= 0, got {self.weight}")
        if self.score_to_weight not in SCORE_TO_WEIGHT:
            raise SpecError("score_to_weight", f"term {self.name!r}: unknown score_to_weight "
                            f"{self.score_to_weight!r}; use one of {SCORE_TO_WEIGHT}")
        if self.score_field not in SCORE_FIELDS:
            raise SpecError("score_field", f"term {self.name!r}: unknown score_field {self.score_field!r}; use one "
                            f"of {SCORE_FIELDS}")
        need = _STW_FIELD.get(self.score_to_weight)
        if need is not None and self.score_field != need:
            raise SpecError("score_field", f"term {self.name!r}: score_to_weight={self.score_to_weight!r} needs "
                            f"score_field={need!r} (linear weights a relevance score, higher = better; "
                            f"reciprocal weights a 1-based position), got {self.score_field!r}")

    @property
    def weighted(self) -> bool:
        return self.score_to_weight != "none"


@dataclass
class _Global:
    """Per-forward view of the global batch: N = W*B rows, this rank's rows are ``[offset, offset+B)``."""

    world: int
    offset: int
    local: int
    feats: dict[str, Tensor]  # field -> normalized features [N, D] (graph-connected to every rank's input)
    present: dict[str, Tensor]  # field -> bool [N]
    text_id: dict[str, Tensor] = field(default_factory=dict)  # field -> long [N]
    item_id: Tensor | None = None  # long [N]
    rank_value: dict[str, Tensor] = field(default_factory=dict)  # "score"/"position" -> float64 [N]


def _dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward hands each rank the SUM over ranks of the gradient of its rows.

    Every rank differentiates its own share of the loss w.r.t. all N gathered rows; summing those gradients
    is what makes the per-rank gradients add up to the gradient of the global loss.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows, ctx.world = rank, x.shape[0], world
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend() in ("nccl", "xccl"):
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)  # SUM by default
            return out
        grad = grad.clone()  # gloo has no reduce-scatter: all-reduce a copy (never the autograd buffer)
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def _gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x [B, ...]`` from every rank into ``[W*B, ...]`` with gradient flow back to each rank."""
    return _AllGatherWithGrad.apply(x)


def _gather_no_grad(x: Tensor, world: int) -> Tensor:
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def _side_from_dict(raw: object, where: str) -> Side:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping with 'fields' (and optional 'weights'), got {raw!r}")
    unknown = set(raw) - _SIDE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_SIDE_KEYS)}")
    fields = raw.get("fields")
    if isinstance(fields, str):
        fields = [fields]
    if not isinstance(fields, Sequence) or not fields or not all(isinstance(f, str) and f for f in fields):
        raise ValueError(f"{where}.fields: a side needs a non-empty list of field names, got {fields!r}")
    weights = raw.get("weights") or [1.0] * len(fields)  # empty/absent -> equal weights (config schema)
    try:
        weights = tuple(float(w) for w in weights)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}.weights: must be a list of numbers, got {raw.get('weights')!r}") from e
    try:
        return Side(tuple(fields), weights)
    except SpecError as e:
        raise ValueError(f"{where}.{e.key}: {e.msg}") from e


def build_loss(kind: str, terms: list[dict], duplicates: bool) -> GCLLoss:
    """Build a :class:`GCLLoss` from plain containers (what ``OmegaConf.to_container(cfg.loss.terms)`` gives).

    Each term is ``{name, left: {fields, weights}, right: {fields, weights}, weight, score_to_weight,
    score_field, normalize_weights}``; ``weights`` may be omitted or empty (equal weights) and the last four
    keys default to ``1.0, "none", "score", True``. Raises ValueError starting with the full config key
    (``loss.kind``, ``loss.terms[0].left.weights``, ``loss.terms[1].name``, ...) and naming the fix, for unknown
    keys or kinds, unknown ``score_to_weight``, weights/fields length mismatch, negative weights, empty sides,
    duplicate term names. ``gcl.config.validate`` runs this before anything is built.
    """
    if not isinstance(terms, Sequence) or isinstance(terms, str) or not terms:
        raise ValueError(f"loss.terms: need a non-empty list of terms, got {terms!r}")
    built: list[Term] = []
    for i, raw in enumerate(terms):
        where = f"loss.terms[{i}]"
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {raw!r}")
        unknown = set(raw) - _TERM_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_TERM_KEYS)}")
        for key in ("name", "left", "right"):
            if key not in raw:
                raise ValueError(f"{where}: missing key {key!r}")
        left = _side_from_dict(raw["left"], f"{where}.left")
        right = _side_from_dict(raw["right"], f"{where}.right")
        options = {k: raw[k] for k in ("score_to_weight", "score_field", "normalize_weights") if k in raw}
        if "weight" in raw:
            try:
                options["weight"] = float(raw["weight"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}.weight: must be a number, got {raw['weight']!r}") from e
        if "normalize_weights" in options and not isinstance(options["normalize_weights"], bool):
            raise ValueError(f"{where}.normalize_weights: must be true or false, got {options['normalize_weights']!r}")
        try:
            built.append(Term(name=raw["name"], left=left, right=right, **options))
        except SpecError as e:
            raise ValueError(f"{where}.{e.key}: {e.msg}") from e
    try:
        return GCLLoss(built, kind=kind, duplicates=duplicates)  # kind and unique names are checked there
    except SpecError as e:
        raise ValueError(f"loss.{e.key}: {e.msg}") from e


class GCLLoss(nn.Module):
    """Weighted multi-term CLIP/SigLIP loss over fused fields; see the module docstring for the formulas.

    Args:
        terms: the terms (unique names).
        kind: ``"clip"`` or ``"siglip"``.
        duplicates: treat same-item / same-text samples as positives (True) or plain InfoNCE/SigLIP (False).
    """

    def __init__(self, terms: Sequence[Term], kind: str = "clip", duplicates: bool = True) -> None:
        super().__init__()
        if kind not in KINDS:
            raise SpecError("kind", f"unknown loss kind {kind!r}; use one of {KINDS}")
        if not terms:
            raise SpecError("terms", "GCLLoss needs at least one term")
        names = [t.name for t in terms]
        for j, n in enumerate(names):
            if n in names[:j]:
                raise SpecError(f"terms[{j}].name", f"duplicate term name {n!r}; give each term a unique name")
        self.terms: tuple[Term, ...] = tuple(terms)
        self.kind = kind
        self.duplicates = bool(duplicates)
        # Which metadata the forward needs (so a batch without e.g. scores works when no term uses them).
        self._id_fields = sorted({f for t in self.terms for s in (t.left, t.right) if s.text_only for f in s.fields}
                                 if self.duplicates else set())
        self._rank_fields = sorted({t.score_field for t in self.terms if t.weighted})

    @property
    def fields(self) -> list[str]:
        """Every field the terms read (``"image"`` included when used), sorted: ask the encoder for these."""
        return sorted({f for t in self.terms for s in (t.left, t.right) for f in s.fields})

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, duplicates={self.duplicates}, terms={[t.name for t in self.terms]}"

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        features: Mapping[str, Tensor],
        meta: Mapping[str, object],
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss.

        Args:
            features: field -> UNnormalized features ``[B, D]`` (rows of missing fields may hold anything).
            meta: the batch's ``present`` (field -> bool[B]), ``text_id`` (field -> long[B]), ``item_id``
                (long[B]), ``score`` / ``position`` (float[B], NaN = missing), as in docs/architecture.md.
                Only what the terms need is read.
            logit_scale: scalar log temperature (the model parameter; ``exp`` is applied here).
            logit_bias: scalar bias; required for ``siglip``, added to the logits for ``clip`` when given
                (softmax ignores it, as in open_clip).

        Returns:
            ``{"loss": Tensor[], "loss/<term>": Tensor[], "rows/<term>": Tensor[], "skipped/<term>": Tensor[]}``.
        """
        if self.kind == "siglip" and logit_bias is None:
            raise ValueError("kind='siglip' needs logit_bias (the model's logit_bias parameter); got None")
        # Autocast is switched off here: under bf16 autocast the similarity matmul would run in bf16 (+2.5..3.9%
        # error in the CLIP logit_scale gradient, +1.2% on the SigLIP loss, measured at B=256). The towers keep
        # their autocast; their outputs, the logit scale and bias are upcast to fp32 (at least) and every op
        # below runs in that precision.
        with _autocast_off(next(iter(features.values()), logit_scale).device):
            return self._forward(features, meta, _upcast(logit_scale),
                                 None if logit_bias is None else _upcast(logit_bias))

    def _forward(self, features: Mapping[str, Tensor], meta: Mapping[str, object], logit_scale: Tensor,
                 logit_bias: Tensor | None) -> dict[str, Tensor]:
        g = self._global_view(features, meta)
        scale = logit_scale.exp()
        fused: dict[Side, tuple[Tensor, Tensor]] = {}
        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        for term in self.terms:
            value, rows, skipped = self._term(term, g, fused, scale, logit_bias)
            total = term.weight * value if total is None else total + term.weight * value
            out[f"loss/{term.name}"] = value.detach()
            out[f"rows/{term.name}"] = rows.detach().float()
            out[f"skipped/{term.name}"] = skipped.detach().float()
        assert total is not None
        return {"loss": total, **out}

    def _global_view(self, features: Mapping[str, Tensor], meta: Mapping[str, object]) -> _Global:
        fields = self.fields
        missing = [f for f in fields if f not in features]
        if missing:
            raise KeyError(f"features lack fields {missing} needed by the loss terms; encode loss.fields "
                           f"({fields}), got {sorted(features)}")
        first = features[fields[0]]
        if first.dim() != 2:
            raise ValueError(f"features[{fields[0]!r}] must be [B, D], got shape {tuple(first.shape)}")
        b, d = first.shape
        for f in fields:
            if tuple(features[f].shape) != (b, d):
                raise ValueError(f"features[{f!r}] has shape {tuple(features[f].shape)}, expected ({b}, {d}) like "
                                 f"features[{fields[0]!r}]: every field needs the same batch size and embed dim")
        device = first.device
        # Low-precision tower outputs are upcast: the similarities and softmax need fp32 accuracy.
        dtype = torch.float32
        for f in fields:
            dtype = torch.promote_types(dtype, features[f].dtype)

        present_in = _get(meta, "present")
        meta_cols: list[Tensor] = []
        for f in fields:
            if f not in present_in:
                raise KeyError(f"meta['present'] lacks {f!r}; the batch must mark presence of every loss field")
            meta_cols.append(_as_vec(present_in[f], b, f"present[{f!r}]", device).to(torch.int64))
        if self._id_fields:
            text_in = _get(meta, "text_id")
            for f in self._id_fields:
                if f not in text_in:
                    raise KeyError(f"meta['text_id'] lacks {f!r}, needed for duplicate detection (duplicates=True)")
                meta_cols.append(_as_vec(text_in[f], b, f"text_id[{f!r}]", device).to(torch.int64))
        if self.duplicates:
            meta_cols.append(_as_vec(_get(meta, "item_id"), b, "item_id", device).to(torch.int64))
        for f in self._rank_fields:
            # float64 bits ride in the int64 metadata tensor so that one collective moves all metadata.
            vec = _as_vec(_get(meta, f), b, f, device).to(torch.float64).contiguous()
            meta_cols.append(vec.view(torch.int64))

        # Rows of missing fields are zeroed first: whatever they hold (even NaN) must not reach the logits.
        normed = torch.stack([F.normalize(torch.where(meta_cols[k].bool().unsqueeze(1), features[f].to(dtype), 0.0),
                                          dim=-1) for k, f in enumerate(fields)], dim=1)  # [B, F, D]
        packed = torch.stack(meta_cols, dim=1)  # [B, M]
        world, rank = _dist_world()
        if world > 1:
            sizes = _gather_no_grad(torch.tensor([b], device=device, dtype=torch.int64), world)
            if bool((sizes != b).any()):
                raise RuntimeError(f"GCLLoss needs the same local batch size on every rank; got {sizes.tolist()}. "
                                   "Drop the last partial batch (training batches must be full).")
            normed = _gather_with_grad(normed)
            packed = _gather_no_grad(packed, world)
        cols = iter(packed.unbind(dim=1))
        g = _Global(world=world, offset=rank * b, local=b,
                    feats={f: normed[:, k] for k, f in enumerate(fields)},
                    present={f: next(cols) != 0 for f in fields})
        for f in self._id_fields:
            g.text_id[f] = next(cols)
        if self.duplicates:
            g.item_id = next(cols)
        for f in self._rank_fields:
            g.rank_value[f] = next(cols).contiguous().view(torch.float64)
        return g

    def _fuse(self, side: Side, g: _Global, cache: dict[Side, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Global fused side features ``[N, D]`` (unit norm or zero) and validity ``bool[N]``; cached per side."""
        if side in cache:
            return cache[side]
        coef = torch.stack([g.present[f].to(g.feats[f].dtype) * w for f, w in zip(side.fields, side.weights)], 1)
        total = coef.sum(dim=1)  # [N]
        valid = total > 0
        if len(side.fields) == 1:
            x = g.feats[side.fields[0]]  # already unit norm: no second normalize, exactly open_clip's path
        else:
            a = coef / total.clamp_min(torch.finfo(coef.dtype).tiny).unsqueeze(1)  # renormalised per sample
            x = F.normalize(sum(a[:, k:k + 1] * g.feats[f] for k, f in enumerate(side.fields)), dim=-1)
        cache[side] = (x, valid)
        return cache[side]

    def _positives(self, term: Term, g: _Global) -> Tensor:
        """``bool[B, N]``: local row i and global column j are positives (diagonal always)."""
        rows = torch.arange(g.local, device=g.present[self.fields[0]].device) + g.offset
        n = g.world * g.local
        pos = rows.unsqueeze(1) == torch.arange(n, device=rows.device).unsqueeze(0)
        if not self.duplicates:
            return pos
        assert g.item_id is not None
        pos = pos | (g.item_id[rows].unsqueeze(1) == g.item_id.unsqueeze(0))
        for side in (term.left, term.right):
            if side.text_only:
                same = None
                for f in side.fields:
                    ids = g.text_id[f]
                    eq = ids[rows].unsqueeze(1) == ids.unsqueeze(0)
                    same = eq if same is None else same & eq
                pos = pos | same
        return pos

    def _rank_weights(self, term: Term, g: _Global, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per-row weights ``float64[N]`` and validity ``bool[N]`` of the rank score (formulas: module doc)."""
        if not term.weighted:
            return torch.ones(n, dtype=torch.float64, device=device), torch.ones(n, dtype=torch.bool, device=device)
        x = g.rank_value[term.score_field]
        if term.score_to_weight == "linear":
            ok = torch.isfinite(x) & (x >= 0)
            w = torch.where(ok, x, torch.zeros_like(x))
        else:  # reciprocal
            ok = torch.isfinite(x) & (x >= 1)
            w = torch.where(ok, 1.0 / torch.where(ok, x, torch.ones_like(x)), torch.zeros_like(x))
        return w, ok

    def _term(
        self, term: Term, g: _Global, cache: dict[Side, tuple[Tensor, Tensor]], scale: Tensor, bias: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's share of ``L_t`` (times W), global valid-row count, global skipped count."""
        left, left_ok = self._fuse(term.left, g, cache)
        right, right_ok = self._fuse(term.right, g, cache)
        n = left.shape[0]
        w, score_ok = self._rank_weights(term, g, n, left.device)
        both = left_ok & right_ok
        col_ok = both & score_ok  # [N]: takes part in the term (as row and as column)
        skipped = (both & ~score_ok).sum()
        lo, hi = g.offset, g.offset + g.local
        row_ok = col_ok[lo:hi]
        w = w.to(left.dtype) * col_ok.to(left.dtype)
        count = col_ok.sum()
        z = w.sum() if term.normalize_weights else count.to(left.dtype)
        # Z > 0 whenever a row is valid (z == 0 only for an empty term or all-zero linear scores: loss 0).
        z = z.clamp_min(torch.finfo(left.dtype).tiny)
        pos = self._positives(term, g) & col_ok.unsqueeze(0)  # [B, N]
        scale = scale.to(left.dtype)
        if self.kind == "clip":
            per_row = (_soft_ce(scale * left[lo:hi] @ right.T, bias, pos, col_ok)
                       + _soft_ce(scale * right[lo:hi] @ left.T, bias, pos, col_ok)) / 2
        else:
            logits = scale * left[lo:hi] @ right.T + bias.to(left.dtype)
            labels = pos.to(left.dtype) * 2 - 1
            pair = -F.logsigmoid(labels * logits)
            per_row = torch.where(col_ok.unsqueeze(0), pair, torch.zeros_like(pair)).sum(dim=1)
        per_row = torch.where(row_ok, per_row, torch.zeros_like(per_row))
        value = (w[lo:hi] * per_row).sum() / z * g.world
        return value, count, skipped


def _upcast(x: Tensor) -> Tensor:
    """``x`` in float32, or kept in float64 (differentiable cast)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A region where autocast is disabled for ``device``'s type (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _soft_ce(logits: Tensor, bias: Tensor | None, pos: Tensor, col_ok: Tensor) -> Tensor:
    """Per-row cross entropy ``[B]`` against a target uniform over each row's positives among valid columns."""
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    # Finite fill (not -inf): an all-masked row must not produce NaN, whose gradient would poison the step.
    logits = logits.masked_fill(~col_ok.unsqueeze(0), torch.finfo(logits.dtype).min)
    logp = F.log_softmax(logits, dim=1)
    target = pos.to(logits.dtype)
    target = target / target.sum(dim=1, keepdim=True).clamp_min(1)
    return -torch.where(pos, target * logp, torch.zeros_like(logp)).sum(dim=1)


def _get(meta: Mapping[str, object], key: str):
    if key not in meta:
        raise KeyError(f"batch meta lacks {key!r}, needed by the loss terms (see docs/architecture.md)")
    return meta[key]


def _as_vec(x: object, b: int, what: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(x, device=device)
    if tuple(t.shape) != (b,):
        raise ValueError(f"meta {what} must have shape ({b},) like the features, got {tuple(t.shape)}")
    return t
