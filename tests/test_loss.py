"""GCLLoss against independent references: open_clip's ClipLoss/SigLipLoss and plain formulas written here."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from open_clip.loss import ClipLoss, SigLipLoss

from gcl.loss import GCLLoss, build_loss

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)
PRESETS = Path(__file__).resolve().parents[1] / "conf" / "loss"


def term(name, left, right, lw=None, rw=None, **kw):
    t = {"name": name, "left": {"fields": left}, "right": {"fields": right}}
    if lw is not None:
        t["left"]["weights"] = lw
    if rw is not None:
        t["right"]["weights"] = rw
    t.update(kw)
    return t


def feats(b, fields, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f: torch.randn(b, d, generator=g, dtype=DT).requires_grad_() for f in fields}


def meta(b, fields, present=None, text_id=None, item_id=None, score=None, position=None):
    """Batch meta as docs/architecture.md: all present, distinct texts and items unless overridden."""
    present = present or {}
    text_id = text_id or {}
    m = {
        "present": {f: torch.tensor(present[f], dtype=torch.bool) if f in present else torch.ones(b, dtype=torch.bool)
                    for f in fields},
        "text_id": {f: torch.tensor(text_id[f]) if f in text_id else torch.arange(b) + 1000 * (k + 1)
                    for k, f in enumerate(fields) if f != "image"},
        "item_id": torch.tensor(item_id) if item_id is not None else torch.arange(b) + 77,
        "score": torch.tensor(score, dtype=torch.float32) if score is not None else torch.full((b,), math.nan),
        "position": torch.tensor(position, dtype=torch.float32) if position is not None else torch.full((b,), math.nan),
    }
    for f in fields:
        m["text_id"].get(f, torch.zeros(b))[~m["present"][f]] = 0
    return m


def scalars(scale=2.0, bias=-4.0):
    return (torch.tensor(scale, dtype=DT, requires_grad=True), torch.tensor(bias, dtype=DT, requires_grad=True))


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def assert_grads_close(got, want, names):
    for g, w, n in zip(got, want, names):
        if g is None or w is None:  # unused on one side (e.g. a bias under softmax): must be ~0 on the other
            g, w = (torch.zeros(()) if g is None else g), (torch.zeros(()) if w is None else w)
            g, w = g.to(DT), w.to(DT)
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, n=n: f"grad of {n}: {m}")


# ----------------------------------------------------------------------------- parity with open_clip
@pytest.mark.parametrize("dup_texts", [False, True])
def test_clip_matches_open_clip(dup_texts):
    b = 8
    f = feats(b, ["image", "title"])
    ls, _ = scalars()
    # Duplicated titles must not matter with duplicates=False: exactly plain InfoNCE.
    tid = {"title": [1, 1, 2, 2, 3, 3, 4, 5]} if dup_texts else None
    m = meta(b, ["image", "title"], text_id=tid, item_id=[0, 0, 1, 2, 3, 4, 5, 6] if dup_texts else None)
    loss = build_loss("clip", [term("t", ["title"], ["image"])], duplicates=not dup_texts)
    out = loss(f, m, ls, None)
    ref = ClipLoss()(F.normalize(f["image"]), F.normalize(f["title"]), ls.exp())
    torch.testing.assert_close(out["loss"], ref, **TOL)
    torch.testing.assert_close(out["loss/t"], ref.detach(), **TOL)
    xs = [f["image"], f["title"], ls]
    assert_grads_close(grads(out["loss"], xs), grads(ref, xs), ["image", "title", "logit_scale"])
    assert out["rows/t"].item() == b and out["skipped/t"].item() == 0


@pytest.mark.parametrize("dup_texts", [False, True])
def test_siglip_matches_open_clip(dup_texts):
    b = 7
    f = feats(b, ["image", "title"], seed=1)
    ls, lb = scalars(math.log(10.0), -5.0)
    m = meta(b, ["image", "title"], text_id={"title": [1, 1, 1, 2, 3, 4, 5]} if dup_texts else None)
    loss = build_loss("siglip", [term("t", ["title"], ["image"])], duplicates=not dup_texts)
    out = loss(f, m, ls, lb)
    ref = SigLipLoss()(F.normalize(f["image"]), F.normalize(f["title"]), ls.exp(), lb)
    torch.testing.assert_close(out["loss"], ref, **TOL)
    xs = [f["image"], f["title"], ls, lb]
    assert_grads_close(grads(out["loss"], xs), grads(ref, xs), ["image", "title", "logit_scale", "logit_bias"])


def test_low_precision_features_are_upcast():
    f = {k: v.detach().to(torch.bfloat16) for k, v in feats(6, ["image", "title"]).items()}
    out = build_loss("clip", [term("t", ["title"], ["image"])], False)(f, meta(6, ["image", "title"]),
                                                                       torch.tensor(2.0), None)
    assert out["loss"].dtype == torch.float32
    ref = ClipLoss()(F.normalize(f["image"].float()), F.normalize(f["title"].float()), torch.tensor(2.0).exp())
    torch.testing.assert_close(out["loss"], ref, rtol=1e-6, atol=1e-6)


def _fp64_contrastive(left, right, log_scale, bias, kind):
    """Plain CLIP / SigLIP in float64 from the formulas (diagonal positives), written here as the reference."""
    n = left.shape[0]
    left = left / left.norm(dim=1, keepdim=True)
    right = right / right.norm(dim=1, keepdim=True)
    logits = log_scale.exp() * left @ right.T
    if kind == "clip":
        lse_rows, lse_cols = logits.logsumexp(dim=1), logits.logsumexp(dim=0)
        return ((lse_rows - logits.diag()).mean() + (lse_cols - logits.diag()).mean()) / 2
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return torch.log1p(torch.exp(-labels * (logits + bias))).sum() / n


@pytest.mark.parametrize("kind,scale,bias", [("clip", 100.0, None), ("siglip", 117.0, -12.9)])
def test_bf16_autocast_loss_is_computed_in_fp32(kind, scale, bias):
    """Called inside a bf16 autocast region (what trainer.mixed_precision=bf16 does) on bf16 tower outputs,
    the loss and the logit_scale/bias gradients equal float64 within 1e-4 relative (B=256, D=512, the sizes
    of the issue; a bf16 similarity matmul gave +2.5..3.7% on the CLIP logit_scale gradient)."""
    b, d = 256, 512
    g = torch.Generator().manual_seed(0)
    text = torch.randn(b, d, generator=g)
    image = (text + 6.0 * torch.randn(b, d, generator=g)).to(torch.bfloat16)  # a realistic, unsolved batch
    text = text.to(torch.bfloat16)
    fields = ["image", "title"]
    loss = build_loss(kind, [term("t", ["title"], ["image"])], duplicates=True)
    ls = torch.tensor(math.log(scale), requires_grad=True)
    lb = torch.tensor(bias, requires_grad=True) if bias is not None else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss({"title": text, "image": image}, meta(b, fields), ls, lb)
    got = [out["loss"], *torch.autograd.grad(out["loss"], [ls] + ([lb] if lb is not None else []))]

    ls64 = torch.tensor(math.log(scale), dtype=DT, requires_grad=True)
    lb64 = torch.tensor(bias, dtype=DT, requires_grad=True) if bias is not None else None
    ref = _fp64_contrastive(text.to(DT), image.to(DT), ls64, lb64, kind)
    want = [ref, *torch.autograd.grad(ref, [ls64] + ([lb64] if lb64 is not None else []))]
    for name, x, y in zip(["loss", "logit_scale grad", "logit_bias grad"], got, want):
        x, y = float(x.detach()), float(y.detach())
        rel = abs(x - y) / abs(y)
        assert rel <= 1e-4, f"{kind} {name}: {x:.6g} vs fp64 {y:.6g} (rel {rel:.2e})"


# ----------------------------------------------------------------------------- multi-term and fusion
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_multi_term_is_weighted_sum_of_single_terms(kind):
    b = 6
    fields = ["image", "title", "colors", "description"]
    f = feats(b, fields, seed=2)
    m = meta(b, fields, present={"description": [1, 0, 1, 1, 0, 1]}, text_id={"colors": [1, 1, 2, 3, 1, 4]})
    ls, lb = scalars()
    terms = [term("a", ["title"], ["image"], weight=0.5), term("b", ["colors"], ["image"], weight=2.0),
             term("c", ["description", "title"], ["image"], lw=[0.3, 0.7], weight=0.25)]
    out = build_loss(kind, terms, True)(f, m, ls, lb)
    want = 0
    for t in terms:
        single = build_loss(kind, [{**t, "weight": 1.0}], True)(f, m, ls, lb)["loss"]
        torch.testing.assert_close(out[f"loss/{t['name']}"], single.detach(), **TOL)  # unweighted L_t
        want = want + t["weight"] * single
    torch.testing.assert_close(out["loss"], want, **TOL)
    xs = [f[k] for k in fields] + [ls, lb]
    assert_grads_close(grads(out["loss"], xs), grads(want, xs), fields + ["logit_scale", "logit_bias"])


def _fuse_reference(f, m, fields, weights):
    """Per-sample loop: drop missing fields, renormalise weights, sum unit vectors, normalise."""
    rows, ok = [], []
    for i in range(f[fields[0]].shape[0]):
        have = [(k, w) for k, w in zip(fields, weights) if bool(m["present"][k][i]) and w > 0]
        ok.append(bool(have))
        if not have:
            rows.append(torch.zeros_like(f[fields[0]][i]))
            continue
        tot = sum(w for _, w in have)
        v = sum((w / tot) * f[k][i] / f[k][i].norm() for k, w in have)
        rows.append(v / v.norm())
    return torch.stack(rows), torch.tensor(ok)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_fusion_and_missing_fields_match_reference(kind):
    b = 9
    fields = ["image", "title", "query", "description"]
    f = feats(b, fields, seed=3)
    m = meta(b, fields, present={"title": [1, 0, 1, 1, 0, 1, 1, 1, 0],
                                 "query": [1, 1, 0, 1, 1, 1, 0, 1, 1],
                                 "description": [0, 0, 0, 1, 0, 1, 0, 1, 0]})
    ls, lb = scalars(1.5, -2.0)
    t = term("q_doc", ["query", "description"], ["image", "title"], lw=[2.0, 1.0], rw=[0.9, 0.1])
    out = build_loss(kind, [t], duplicates=False)(f, m, ls, lb)

    left, lok = _fuse_reference(f, m, ["query", "description"], [2.0, 1.0])
    right, rok = _fuse_reference(f, m, ["image", "title"], [0.9, 0.1])
    keep = (lok & rok).nonzero().squeeze(1)
    assert out["rows/q_doc"].item() == len(keep) == 7
    if kind == "clip":
        ref = ClipLoss()(right[keep], left[keep], ls.exp())
    else:
        ref = SigLipLoss()(right[keep], left[keep], ls.exp(), lb)
    torch.testing.assert_close(out["loss"], ref, **TOL)
    xs = [f[k] for k in fields] + [ls, lb]
    got, want = grads(out["loss"], xs), grads(ref, xs)
    assert_grads_close(got, want, fields + ["logit_scale", "logit_bias"])
    # Samples outside the term get no gradient at all (neither as rows nor as negatives).
    assert got[fields.index("query")][~(lok & rok)].abs().max() == 0


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_missing_rows_may_hold_garbage(kind):
    f = feats(5, ["image", "title"], seed=13)
    m = meta(5, ["image", "title"], present={"title": [1, 0, 1, 1, 0]})
    ls, lb = scalars()
    loss = build_loss(kind, [term("t", ["title"], ["image"])], True)
    clean = loss(f, m, ls, lb)["loss"]
    dirty = dict(f, title=torch.where(m["present"]["title"].unsqueeze(1), f["title"], math.nan))
    out = loss(dirty, m, ls, lb)["loss"]
    torch.testing.assert_close(out, clean, **TOL)
    assert all(torch.isfinite(g).all() for g in grads(out, [f["title"], f["image"], ls]))


def test_renormalisation_only_uses_present_fields():
    # A sample with only the image present on a 0.9 image + 0.1 title side equals the image alone.
    f = feats(4, ["image", "title", "query"], seed=4)
    m = meta(4, ["image", "title", "query"], present={"title": [0, 0, 0, 0]})
    ls, _ = scalars()
    fused = build_loss("clip", [term("t", ["query"], ["image", "title"], rw=[0.9, 0.1])], False)(f, m, ls, None)
    alone = build_loss("clip", [term("t", ["query"], ["image"])], False)(f, m, ls, None)
    torch.testing.assert_close(fused["loss"], alone["loss"], **TOL)


# ----------------------------------------------------------------------------- duplicates
def _soft_clip_reference(left, right, scale, target):
    """Soft-target InfoNCE written from the formula: rows of ``target`` sum to 1."""
    logits = scale * F.normalize(left) @ F.normalize(right).T
    a = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    b = -(target.T * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (a + b) / 2


def _siglip_reference(left, right, scale, bias, labels):
    logits = scale * F.normalize(left) @ F.normalize(right).T + bias
    return -F.logsigmoid(labels * logits).sum() / left.shape[0]


def test_clip_duplicate_texts_get_soft_targets():
    f = feats(4, ["image", "colors"], seed=5)
    m = meta(4, ["image", "colors"], text_id={"colors": [11, 11, 12, 13]})  # two products both "black"
    ls, _ = scalars()
    out = build_loss("clip", [term("c", ["colors"], ["image"])], True)(f, m, ls, None)
    target = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=DT)
    ref = _soft_clip_reference(f["colors"], f["image"], ls.exp(), target)
    torch.testing.assert_close(out["loss"], ref, **TOL)
    xs = [f["colors"], f["image"], ls]
    assert_grads_close(grads(out["loss"], xs), grads(ref, xs), ["colors", "image", "logit_scale"])
    plain = ClipLoss()(F.normalize(f["image"]), F.normalize(f["colors"]), ls.exp())
    assert not torch.allclose(out["loss"], plain)  # the duplicate really changed the objective


def test_clip_duplicate_items_and_multi_field_text_identity():
    f = feats(5, ["image", "title", "colors"], seed=6)
    # Left = title + colors: identical only where BOTH ids match (rows 0,1); rows 2,3 share the title only.
    # Rows 3 and 4 are the same item (item_id), whatever their texts.
    m = meta(5, ["image", "title", "colors"], text_id={"title": [1, 1, 2, 2, 3], "colors": [5, 5, 5, 6, 7]},
             item_id=[10, 11, 12, 13, 13])
    ls, _ = scalars(2.5)
    t = term("tc", ["title", "colors"], ["image"], lw=[0.5, 0.5])
    out = build_loss("clip", [t], True)(f, m, ls, None)
    left, _ = _fuse_reference(f, m, ["title", "colors"], [0.5, 0.5])
    h = 0.5
    target = torch.tensor([[h, h, 0, 0, 0], [h, h, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, h, h], [0, 0, 0, h, h]],
                          dtype=DT)
    ref = _soft_clip_reference(left, f["image"], ls.exp(), target)
    torch.testing.assert_close(out["loss"], ref, **TOL)


def test_image_sides_use_item_id_only():
    f = feats(4, ["image", "title"], seed=7)
    m = meta(4, ["image", "title"], text_id={"title": [1, 1, 1, 1]})  # same title everywhere, distinct items
    ls, _ = scalars()
    # (image + title) <-> image: no side is text-only, so equal titles are NOT positives.
    t = term("doc_img", ["title", "image"], ["image"], lw=[0.5, 0.5])
    out = build_loss("clip", [t], True)(f, m, ls, None)
    left, _ = _fuse_reference(f, m, ["title", "image"], [0.5, 0.5])
    torch.testing.assert_close(out["loss"], ClipLoss()(F.normalize(f["image"]), left, ls.exp()), **TOL)
    # ... but the same item is.
    m["item_id"] = torch.tensor([3, 3, 4, 5])
    out = build_loss("clip", [t], True)(f, m, ls, None)
    target = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=DT)
    torch.testing.assert_close(out["loss"], _soft_clip_reference(left, f["image"], ls.exp(), target), **TOL)


def test_clip_duplicates_symmetric_in_side_order():
    # A text-only right side gets the same identity rule, so image <-> colors == colors <-> image.
    f = feats(5, ["image", "colors"], seed=8)
    m = meta(5, ["image", "colors"], text_id={"colors": [1, 2, 1, 1, 3]})
    ls, _ = scalars()
    a = build_loss("clip", [term("x", ["colors"], ["image"])], True)(f, m, ls, None)["loss"]
    b = build_loss("clip", [term("x", ["image"], ["colors"])], True)(f, m, ls, None)["loss"]
    torch.testing.assert_close(a, b, **TOL)


def test_siglip_duplicates_are_labelled_positive():
    f = feats(5, ["image", "categories"], seed=9)
    m = meta(5, ["image", "categories"], text_id={"categories": [4, 4, 5, 4, 6]}, item_id=[0, 1, 2, 3, 2])
    ls, lb = scalars(math.log(10.0), -3.0)
    out = build_loss("siglip", [term("c", ["categories"], ["image"])], True)(f, m, ls, lb)
    pos = [[1, 1, 0, 1, 0], [1, 1, 0, 1, 0], [0, 0, 1, 0, 1], [1, 1, 0, 1, 0], [0, 0, 1, 0, 1]]
    labels = torch.tensor(pos, dtype=DT) * 2 - 1
    ref = _siglip_reference(f["categories"], f["image"], ls.exp(), lb, labels)
    torch.testing.assert_close(out["loss"], ref, **TOL)
    xs = [f["categories"], f["image"], ls, lb]
    assert_grads_close(grads(out["loss"], xs), grads(ref, xs), ["categories", "image", "logit_scale", "logit_bias"])
    off = build_loss("siglip", [term("c", ["categories"], ["image"])], False)(f, m, ls, lb)["loss"]
    torch.testing.assert_close(off, SigLipLoss()(F.normalize(f["image"]), F.normalize(f["categories"]),
                                                 ls.exp(), lb), **TOL)


# ----------------------------------------------------------------------------- rank weights
def _per_row_clip(left, right, scale):
    logits = scale * F.normalize(left) @ F.normalize(right).T
    y = torch.arange(left.shape[0])
    return (F.cross_entropy(logits, y, reduction="none") + F.cross_entropy(logits.T, y, reduction="none")) / 2


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_score_weights(normalize):
    b = 6
    f = feats(b, ["image", "query"], seed=10)
    score = [3.0, 1.0, math.nan, 2.0, -1.0, 0.5]  # NaN = missing, negative = invalid: both skipped
    m = meta(b, ["image", "query"], score=score)
    ls, _ = scalars()
    t = term("q", ["query"], ["image"], score_to_weight="linear", score_field="score", normalize_weights=normalize)
    out = build_loss("clip", [t], False)(f, m, ls, None)
    keep = torch.tensor([0, 1, 3, 5])
    w = torch.tensor([3.0, 1.0, 2.0, 0.5], dtype=DT)
    rows = _per_row_clip(f["query"][keep], f["image"][keep], ls.exp())
    ref = (w * rows).sum() / (w.sum() if normalize else len(keep))
    torch.testing.assert_close(out["loss"], ref, **TOL)
    xs = [f["query"], f["image"], ls]
    assert_grads_close(grads(out["loss"], xs), grads(ref, xs), ["query", "image", "logit_scale"])
    assert out["rows/q"].item() == 4 and out["skipped/q"].item() == 2


def test_reciprocal_position_weights_siglip():
    b = 6
    f = feats(b, ["image", "query"], seed=11)
    m = meta(b, ["image", "query"], position=[1, 2, 4, math.nan, 0, 3], present={"query": [1, 1, 1, 1, 1, 0]})
    ls, lb = scalars(math.log(5.0), -1.0)
    t = term("q", ["query"], ["image"], score_to_weight="reciprocal", score_field="position")
    out = build_loss("siglip", [t], False)(f, m, ls, lb)
    keep = torch.tensor([0, 1, 2])  # NaN and 0 (positions are 1-based) skipped; row 5 lacks a query
    w = torch.tensor([1.0, 1 / 2, 1 / 4], dtype=DT)
    logits = ls.exp() * F.normalize(f["query"][keep]) @ F.normalize(f["image"][keep]).T + lb
    labels = 2 * torch.eye(3, dtype=DT) - 1
    rows = -F.logsigmoid(labels * logits).sum(1)
    ref = (w * rows).sum() / w.sum()
    torch.testing.assert_close(out["loss"], ref, **TOL)
    assert out["rows/q"].item() == 3 and out["skipped/q"].item() == 2


def test_weights_and_duplicates_combine():
    # Query duplicates (one query, two products) share a soft target; each row carries its own weight.
    f = feats(4, ["image", "query"], seed=12)
    m = meta(4, ["image", "query"], text_id={"query": [1, 1, 2, 3]}, score=[4.0, 2.0, 1.0, 1.0])
    ls, _ = scalars()
    t = term("q", ["query"], ["image"], score_to_weight="linear")
    out = build_loss("clip", [t], True)(f, m, ls, None)
    target = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=DT)
    logits = ls.exp() * F.normalize(f["query"]) @ F.normalize(f["image"]).T
    rows = (-(target * F.log_softmax(logits, 1)).sum(1) - (target * F.log_softmax(logits.T, 1)).sum(1)) / 2
    w = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=DT)
    torch.testing.assert_close(out["loss"], (w * rows).sum() / w.sum(), **TOL)


# ----------------------------------------------------------------------------- edges and errors
def test_empty_term_is_zero_with_finite_grads():
    f = feats(3, ["image", "query"])
    m = meta(3, ["image", "query"], present={"query": [0, 0, 0]})
    ls, lb = scalars()
    for kind in ("clip", "siglip"):
        out = build_loss(kind, [term("q", ["query"], ["image"])], True)(f, m, ls, lb)
        assert out["loss"].item() == 0 and out["rows/q"].item() == 0
        for g in grads(out["loss"], [f["image"], ls]):
            assert g is None or torch.isfinite(g).all()


def test_forward_errors_are_clear():
    f = feats(3, ["image", "title"])
    m = meta(3, ["image", "title"])
    ls, _ = scalars()
    with pytest.raises(ValueError, match="logit_bias"):
        build_loss("siglip", [term("t", ["title"], ["image"])], True)(f, m, ls, None)
    with pytest.raises(KeyError, match="colors"):
        build_loss("clip", [term("t", ["colors"], ["image"])], True)(f, m, ls, None)
    with pytest.raises(KeyError, match="score"):
        build_loss("clip", [term("t", ["title"], ["image"], score_to_weight="linear")], True)(
            f, {k: v for k, v in m.items() if k != "score"}, ls, None)


@pytest.mark.parametrize("kind,terms,match", [  # each error starts with the full config key
    ("clip", [term("t", ["title"], ["image"], score_to_weight="cubic")],
     r"^loss\.terms\[0\]\.score_to_weight: .*unknown score_to_weight"),
    ("clip", [term("t", ["title", "colors"], ["image"], lw=[1.0])],
     r"^loss\.terms\[0\]\.left\.weights: 1 weights for 2 fields"),
    ("clip", [term("t", ["title"], ["image"], lw=[-1.0])], r"^loss\.terms\[0\]\.left\.weights: .*finite and >= 0"),
    ("clip", [term("t", ["title"], ["image"], lw=[0.0])], r"^loss\.terms\[0\]\.left\.weights: .*sum to 0"),
    ("clip", [term("t", [], ["image"])], r"^loss\.terms\[0\]\.left\.fields: .*non-empty list"),
    ("clip", [term("t", ["title", "title"], ["image"])], r"^loss\.terms\[0\]\.left\.fields: .*repeat a field"),
    ("clip", [term("t", ["title"], ["image"]), term("t", ["colors"], ["image"])],
     r"^loss\.terms\[1\]\.name: duplicate term name 't'"),
    ("clip", [term("t", ["title"], ["image"], weight=-1)], r"^loss\.terms\[0\]\.weight: .*weight must be"),
    ("clip", [term("t", ["title"], ["image"], score_to_weight="linear", score_field="position")],
     r"^loss\.terms\[0\]\.score_field: .*needs score_field"),
    ("clip", [term("t", ["title"], ["image"], score_field="rank")], r"^loss\.terms\[0\]\.score_field: .*unknown"),
    ("clip", [term("t", ["title"], ["image"], temperature=1)], r"^loss\.terms\[0\]: unknown keys"),
    ("clip", [], r"^loss\.terms: need a non-empty list"),
    ("softmax", [term("t", ["title"], ["image"])], r"^loss\.kind: unknown loss kind"),
])
def test_build_loss_validation(kind, terms, match):
    with pytest.raises(ValueError, match=match):
        build_loss(kind, terms, True)


def test_fields_and_equal_default_weights():
    loss = build_loss("clip", [term("a", ["title", "colors"], ["image"]), term("b", ["query"], ["image"], lw=[])], True)
    assert isinstance(loss, GCLLoss)
    assert loss.fields == ["colors", "image", "query", "title"]
    assert loss.terms[0].left.weights == (1.0, 1.0) and loss.terms[1].left.weights == (1.0,)


# ----------------------------------------------------------------------------- presets
def _preset(name):
    """A loss preset as build_loss takes it (``allow_absent_fields`` is the trainer's data check, not the loss's)."""
    cfg = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))
    assert cfg.pop("allow_absent_fields") == []
    return cfg


@pytest.mark.parametrize("name", ["clip_title", "seven_field", "gcl_ranking", "siglip_seven_field"])
def test_presets_build(name):
    cfg = _preset(name)
    assert set(cfg) == {"kind", "duplicates", "terms"}
    for t in cfg["terms"]:
        assert set(t) == {"name", "left", "right", "weight", "score_to_weight", "score_field", "normalize_weights"}
    loss = build_loss(**cfg)
    assert "image" in loss.fields


def test_preset_contents():
    base = build_loss(**_preset("clip_title"))
    assert base.kind == "clip" and not base.duplicates and [t.name for t in base.terms] == ["title_image"]
    seven = build_loss(**_preset("seven_field"))
    sig = build_loss(**_preset("siglip_seven_field"))
    assert sig.kind == "siglip" and seven.kind == "clip"
    want = {"description", "title", "colors", "materials", "categories", "details", "keywords"}
    assert {t.left.fields[0] for t in seven.terms} == want
    assert all(t.right.fields == ("image",) for t in seven.terms)
    assert math.isclose(sum(t.weight for t in seven.terms), 1.0)
    assert [(t.name, t.weight) for t in sig.terms] == [(t.name, t.weight) for t in seven.terms]
    (rank,) = build_loss(**_preset("gcl_ranking")).terms
    assert rank.left.fields == ("query",) and dict(zip(rank.right.fields, rank.right.weights)) == {
        "image": 0.9, "title": 0.1}
    assert rank.score_to_weight == "linear" and rank.score_field == "score"


def test_identical_text_duplicates_change_siglip_but_not_clip():
    """The encoder gives identical strings one shared feature (one unique row, gathered). Then CLIP's one-hot
    cross entropies of the duplicate rows already sum to the soft-target ones (identical logit rows and
    columns): same loss, same gradients w.r.t. the towers' outputs. SigLIP's per-pair labels really differ.
    This is what the study's no-duplicates arms measure."""
    g = torch.Generator().manual_seed(9)
    unique = torch.randn(3, 6, generator=g, dtype=DT).requires_grad_()  # "black", "red", "blue"
    image = torch.randn(5, 6, generator=g, dtype=DT).requires_grad_()
    def f():  # a fresh gather per loss, as the encoder builds it each step
        return {"colors": unique[torch.tensor([0, 0, 1, 1, 2])], "image": image}

    m = meta(5, ["image", "colors"], text_id={"colors": [11, 11, 12, 12, 13]})
    ls, lb = scalars()
    t = [term("c", ["colors"], ["image"])]
    xs = [unique, image, ls]
    clip_on = build_loss("clip", t, True)(f(), m, ls, None)["loss"]
    clip_off = build_loss("clip", t, False)(f(), m, ls, None)["loss"]
    torch.testing.assert_close(clip_on, clip_off, **TOL)
    assert_grads_close(grads(clip_on, xs), grads(clip_off, xs), ["colors", "image", "logit_scale"])
    sig_on = build_loss("siglip", t, True)(f(), m, ls, lb)["loss"]
    sig_off = build_loss("siglip", t, False)(f(), m, ls, lb)["loss"]
    assert (sig_on - sig_off).abs() > 1e-3
