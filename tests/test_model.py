"""gcl.model: building, weights loading, locking, offline failure, and the field encoder.

References are independent of the code under test: open_clip's own ``encode_text`` at full context, a naive
per-field loop, a brute-force bucket search, and lock expectations written out from open_clip's documented
layer grouping.
"""
from __future__ import annotations

import copy
import itertools
import json
import shutil
import time
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from gcl.model import (
    FieldEncoder,
    WeightsUnavailableError,
    build_model,
    lock_towers,
    plan_length_buckets,
    plan_prefix_packing,
    real_length_structure,
)

TEXTS = {
    "title": ["red cotton midi dress with long sleeves", "black leather ankle boots", "red cotton midi dress "
              "with long sleeves", "wool scarf", "denim jacket with a very long and detailed product title "
              "that keeps going for many many tokens so it is long", "wool scarf"],
    "colors": ["red", "black", "red", None, "blue", "grey"],
    "categories": ["dresses", "boots", "dresses", "scarves", None, "scarves"],
    "materials": ["cotton", None, "cotton", "wool", "denim", "wool"],
}


def tokens_like_stream(tokenizer, texts: list[str | None], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize like gcl.data.stream: missing values are all-pad rows; trailing all-pad columns dropped."""
    present = torch.tensor([t is not None for t in texts])
    tok = tokenizer([t if t is not None else "" for t in texts])
    tok[~present] = pad_id
    keep = (tok != pad_id).any(0).nonzero()
    return tok[:, : int(keep.max()) + 1], present


def batch_tokens(bundle, fields=TEXTS):
    tokens, present = {}, {}
    for f, texts in fields.items():
        tokens[f], present[f] = tokens_like_stream(bundle.tokenizer, texts, bundle.pad_id)
    return tokens, present


def full_context(tokens: torch.Tensor, context_length: int, pad_id: int) -> torch.Tensor:
    return torch.nn.functional.pad(tokens, (0, context_length - tokens.shape[1]), value=pad_id)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("gcl-tiny")


@pytest.fixture(scope="module")
def tiny_siglip():
    torch.manual_seed(0)
    return build_model("gcl-tiny-siglip")


def _seq_lengths(transformer: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    seen: list[int] = []
    handle = transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[1]),
                                                   with_kwargs=True)
    return seen, handle


# ------------------------------------------------------------------------------------------ real length


@pytest.mark.parametrize("packing", ["buckets", "prefix"])
def test_tiny_real_length_equals_full_context(tiny, packing):
    assert tiny.real_length and real_length_structure(tiny.model)
    assert tiny.context_length == 77 and tiny.pad_id == 0 and tiny.text_packing == "prefix"
    enc = tiny.field_encoder(text_packing=packing)
    tokens, present = batch_tokens(tiny)
    seen, h = _seq_lengths(tiny.model.transformer)
    with torch.no_grad():
        out = enc.encode_text_fields(tokens, present)
    h.remove()
    if packing == "buckets":
        assert max(seen) < 40, f"text passes should run at real length, saw {seen}"
    else:  # one packed pass (its slot accounting is checked in the plan test below)
        assert len(seen) == 1 and enc.last_passes == 1
    with torch.no_grad():
        for f in TEXTS:
            ref = tiny.model.encode_text(full_context(tokens[f], 77, 0))
            ref[~present[f]] = 0
            assert (out[f] - ref).abs().max().item() <= 1e-5, f


def test_siglip_tiny_is_fixed_length_and_matches_encode_text(tiny_siglip):
    m = tiny_siglip.model
    assert not tiny_siglip.real_length and not real_length_structure(m)
    tokens, present = batch_tokens(tiny_siglip)
    seen, h = _seq_lengths(m.text.transformer)
    with torch.no_grad():
        out = tiny_siglip.field_encoder().encode_text_fields(tokens, present)
    h.remove()
    assert seen and set(seen) == {64}
    with torch.no_grad():
        for f in TEXTS:
            full = full_context(tokens[f], 64, tiny_siglip.pad_id)
            ref = m.encode_text(full)
            ref[~present[f]] = 0
            assert (out[f] - ref).abs().max().item() <= 1e-6, f
        # Why detection matters: this tower's output changes when trailing padding is cut.
        t = tokens["title"]
        assert (m.encode_text(t) - m.encode_text(full_context(t, 64, 0))).abs().max().item() > 1e-3


def _write_cfg(tmp_path: Path, stem: str, **text_overrides) -> Path:
    cfg = json.loads((Path(open_clip.__file__).parent / "model_configs" / "ViT-B-16.json").read_text())
    cfg["embed_dim"] = 32
    cfg["vision_cfg"] = {"image_size": 32, "patch_size": 16, "layers": 1, "width": 64, "head_width": 32}
    cfg["text_cfg"].update({"width": 64, "heads": 2, "layers": 1, **text_overrides})
    p = tmp_path / f"{stem}.json"
    p.write_text(json.dumps(cfg))
    return p


def test_real_length_detection_is_structural_not_by_name(tmp_path):
    # A causal tower named like SigLIP is still real-length (and gets the default BPE tokenizer offline).
    p = _write_cfg(tmp_path, "my-siglip-causal")
    b = build_model("my-siglip-causal", config_path=str(p))
    assert b.real_length and isinstance(b.tokenizer, open_clip.SimpleTokenizer)
    # Causal mask but last-token pooling: the pooled position is padding, so not real-length.
    p = _write_cfg(tmp_path, "causal-last-pool", pool_type="last")
    assert not build_model("causal-last-pool", config_path=str(p)).real_length
    # EOT pooling without a causal mask: padding is attended to, so not real-length.
    p = _write_cfg(tmp_path, "bidir-argmax", no_causal_mask=True)
    assert not build_model("bidir-argmax", config_path=str(p)).real_length


# -------------------------------------------------------------------------------------------- dedup


def _naive(bundle, tokens, present):
    """One full-context encode_text pass per field; zero rows where missing."""
    out = {}
    for f, t in tokens.items():
        e = bundle.model.encode_text(full_context(t, bundle.context_length, bundle.pad_id))
        out[f] = e * present[f][:, None]
    return out


@pytest.mark.parametrize("which,packing", [("tiny", "prefix"), ("tiny", "buckets"), ("tiny_siglip", "auto")])
def test_dedup_outputs_and_gradients_equal_naive(which, packing, request):
    bundle = request.getfixturevalue(which)
    enc = bundle.field_encoder(text_packing=packing)
    tokens, present = batch_tokens(bundle)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    w = {f: torch.randn(len(TEXTS[f]), 128) for f in TEXTS}

    def grads(out):
        loss = sum((out[f] * w[f]).sum() + out[f].pow(2).sum() for f in out)
        return torch.autograd.grad(loss, params, allow_unused=True)

    got = enc.encode_text_fields(tokens, present)
    n_present = int(sum(p.sum() for p in present.values()))
    assert enc.last_unique_rows < n_present  # duplicates were shared
    ref = _naive(bundle, tokens, present)
    for f in TEXTS:
        assert (got[f] - ref[f]).abs().max().item() <= 1e-5, f
        assert (got[f][~present[f]] == 0).all()
    for name_p, g, r in zip([n for n, p in bundle.model.named_parameters() if p.requires_grad],
                            grads(got), grads(ref)):
        if r is None:
            assert g is None or g.abs().max() == 0, name_p
            continue
        # Duplicated rows sum their gradient in another order: compare relative to the gradient's scale.
        assert (g - r).abs().max() <= 1e-5 * r.abs().max() + 1e-6, name_p


@pytest.mark.parametrize("which", ["tiny", "tiny_siglip"])
def test_no_present_text_still_reaches_the_text_tower_with_zero_gradient(which, request):
    """A batch without any present text row gives zero features whose backward reaches exactly the parameters a
    batch with text reaches, each with an exactly zero gradient (DDP needs the same parameters on every rank)."""
    bundle = request.getfixturevalue(which)
    enc = bundle.field_encoder()
    names = [n for n, p in bundle.model.named_parameters() if p.requires_grad]
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    tokens, present = batch_tokens(bundle, {"colors": TEXTS["colors"]})
    with_text = torch.autograd.grad(enc.encode_text_fields(tokens, present)["colors"].sum(), params,
                                    allow_unused=True)
    reached = {n for n, g in zip(names, with_text) if g is not None}
    assert any(n.startswith(("transformer.", "text.")) for n in reached)

    none = {"colors": torch.zeros(6, dtype=torch.bool)}
    out = enc.encode_text_fields({"colors": torch.zeros(6, 1, dtype=torch.long)}, none)["colors"]
    assert out.shape == (6, 128) and bool((out == 0).all()) and out.requires_grad
    grads = torch.autograd.grad((out * torch.randn(6, 128)).sum(), params, allow_unused=True)
    assert {n for n, g in zip(names, grads) if g is not None} == reached
    assert all(bool((g == 0).all()) for g in grads if g is not None)


def test_field_encoder_forward_batch(tiny):
    tokens, present = batch_tokens(tiny)
    images = torch.randn(6, 3, 64, 64)
    batch = {"image": images, "tokens": tokens, "present": {**present, "image": torch.ones(6, dtype=torch.bool)}}
    enc = FieldEncoder(tiny.model, tiny.real_length, tiny.pad_id, tiny.context_length)
    with torch.no_grad():
        out = enc(batch, ["image", "title", "colors"])
        assert set(out) == {"image", "title", "colors"}
        assert torch.allclose(out["image"], tiny.model.encode_image(images), atol=1e-6)
        assert out["colors"].shape == (6, 128) and (out["colors"][3] == 0).all()
        assert out["title"].dtype == torch.float32
    with pytest.raises(KeyError, match="not in the batch"):
        enc(batch, ["query"])
    with pytest.raises(ValueError, match="context length"):
        enc.encode_text_fields({"t": torch.ones(2, 80, dtype=torch.long)}, {"t": torch.ones(2, dtype=torch.bool)})


def _bucket_cost(lengths: list[int], bounds: list[int], overhead: int) -> int:
    cost, lo = 0, 0
    for hi in bounds:
        cost += sum(1 for x in lengths if lo < x <= hi) * hi + overhead
        lo = hi
    return cost


def _random_rows(g: torch.Generator, n: int, vocab: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct token rows like a tokenizer's: start 49406, a few words from a small vocab (so prefixes are
    shared often), end 49407, zero padding."""
    rows = set()
    while len(rows) < n:
        k = int(torch.randint(0, 12, (1,), generator=g))
        rows.add((49406, *torch.randint(1, vocab, (k,), generator=g).tolist(), 49407))
    width = max(map(len, rows)) + 3
    t = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows])
    return t[torch.randperm(len(t), generator=g)], torch.tensor([len(r) for r in rows])


def test_prefix_packing_plan_reconstructs_every_row_and_shares_prefixes():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        rows, _ = _random_rows(g, int(torch.randint(1, 60, (1,), generator=g)))
        lengths = rows.argmax(1) + 1
        plan = plan_prefix_packing(rows, lengths, width=64)
        n_seq, cap = plan.tokens.shape
        assert cap >= int(lengths.max()) and plan.allowed.shape == (n_seq, cap, cap)
        toks, pos = plan.tokens.reshape(-1), plan.positions.reshape(-1)
        for r in range(len(rows)):
            s, i = divmod(int(plan.pooled[r]), cap)
            # The pooled slot sees exactly its row: one slot per position 0..L-1 holding the row's tokens.
            seen = plan.allowed[s, i].nonzero().squeeze(1) + s * cap
            order = seen[pos[seen].argsort()]
            assert pos[order].tolist() == list(range(int(lengths[r])))
            assert toks[order].tolist() == rows[r, : int(lengths[r])].tolist()
        # Every slot sees itself and only slots at smaller depth (a chain); no real slot sees padding.
        allowed = plan.allowed.reshape(-1, cap)
        assert allowed[torch.arange(n_seq * cap), torch.arange(n_seq * cap) % cap].all()
        assert int(allowed.sum(1).max()) <= int(lengths.max())
        trie = {tuple(r[:k].tolist()) for r, n in zip(rows, lengths) for k in range(1, int(n) + 1)}
        assert len(trie) <= plan.nodes <= int(lengths.sum())
        if n_seq == 1:
            assert plan.nodes == len(trie), trial  # one sequence: each distinct prefix is one slot
        # A mask budget too small for any larger capacity keeps sequences at the longest row's length.
        assert plan_prefix_packing(rows, lengths, width=64, max_mask_bytes=0).tokens.shape[1] == int(lengths.max())


def test_prefix_packing_gradients_equal_open_clip_per_row(tiny):
    """Packed encoding of rows with many shared prefixes: features and every parameter gradient equal
    open_clip's own encode_text at full context, row by row."""
    rows, _ = _random_rows(torch.Generator().manual_seed(1), 40, vocab=4)
    enc = tiny.field_encoder(text_packing="prefix")
    params = [p for p in tiny.model.parameters() if p.requires_grad]
    w = torch.randn(len(rows), 128, generator=torch.Generator().manual_seed(2))
    got = enc.encode_tokens(rows)
    assert enc.last_text_slots < int((rows.argmax(1) + 1).sum())
    ref = tiny.model.encode_text(full_context(rows, 77, 0))
    assert (got - ref).abs().max().item() <= 1e-5
    # A tiny mask budget splits the rows into several packed passes; the features stay the same.
    split = tiny.field_encoder(text_packing="prefix", max_mask_bytes=4 * 64 * 64 * 4)
    with torch.no_grad():
        assert (split.encode_tokens(rows) - ref).abs().max().item() <= 1e-5
    assert split.last_passes > 1
    g_got = torch.autograd.grad((got * w).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    for (name, _), a, b in zip([x for x in tiny.model.named_parameters() if x[1].requires_grad], g_got, g_ref):
        if b is None or not b.abs().max():
            assert a is None or not a.abs().max(), name
        else:
            assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-7, name


@pytest.mark.parametrize("packing", ["prefix", "buckets"])
def test_eos_pooled_tower_rows_without_eos_match_open_clip(packing):
    """EOS pooling (open_clip's *-worldwide towers): a row without the EOS token pools position 0 in
    open_clip; the real-length encoder must agree (and not depend on the batch's padded width)."""
    torch.manual_seed(0)
    m = copy.deepcopy(build_model("gcl-tiny").model).eval()
    m.text_pool_type, m.text_eos_id = "eos", 1
    t = torch.tensor([[5, 7, 9, 1, 0, 0], [5, 7, 9, 11, 13, 15], [5, 7, 0, 0, 0, 0]])
    with torch.no_grad():
        ref = m.encode_text(full_context(t, 77, 0))
        got = FieldEncoder(m, True, 0, 77, text_packing=packing).encode_tokens(t)
    assert (got - ref).abs().max().item() <= 1e-5


def test_text_packing_choice_is_checked(tiny, tiny_siglip):
    assert tiny_siglip.text_packing == "buckets"
    assert tiny_siglip.field_encoder().text_packing == "buckets"
    with pytest.raises(ValueError, match="text_packing='prefix' needs"):
        tiny_siglip.field_encoder(text_packing="prefix")
    with pytest.raises(ValueError, match="is not one of"):
        tiny.field_encoder(text_packing="packed")
    assert build_model("gcl-tiny", text_packing="buckets").text_packing == "buckets"
    with pytest.raises(ValueError, match="model.text_packing=prefix is not possible"):
        build_model("gcl-tiny-siglip", text_packing="prefix")


def test_length_buckets_are_optimal_by_brute_force():
    assert plan_length_buckets(torch.tensor([5] * 10)) == [5]
    # 100 short rows + 2 long ones: two passes (3 and 77) beat one padded pass to 77.
    assert plan_length_buckets(torch.tensor([3] * 100 + [77] * 2), pass_overhead_tokens=1024) == [3, 77]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(2, 30, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        for overhead in (0, 16, 200):
            got = plan_length_buckets(torch.tensor(lengths), max_passes=3, pass_overhead_tokens=overhead)
            assert got[-1] == max(lengths) and len(got) <= 3
            distinct = sorted(set(lengths))
            best = min(_bucket_cost(lengths, [*cuts, distinct[-1]], overhead)
                       for k in range(3) for cuts in itertools.combinations(distinct[:-1], k))
            assert _bucket_cost(lengths, got, overhead) == best


# ------------------------------------------------------------------------------------------- locking

_VIS_GROUPS = [  # open_clip VisionTransformer.lock grouping, first to last, for 3 blocks
    ["visual.conv1.", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre."],
    ["visual.transformer.resblocks.0."], ["visual.transformer.resblocks.1."],
    ["visual.transformer.resblocks.2.", "visual.ln_post."], ["visual.proj"],
]


def _text_groups(prefix: str) -> list[list[str]]:
    return [[f"{prefix}token_embedding.", f"{prefix}positional_embedding"],
            [f"{prefix}transformer.resblocks.0."], [f"{prefix}transformer.resblocks.1."],
            [f"{prefix}transformer.resblocks.2.", f"{prefix}ln_final."], [f"{prefix}text_projection"]]


def _expected_trainable(names, text_prefix, li, gi, lt, nt, freeze_ln) -> set[str]:
    def unlocked(groups, k):
        pre = [p for g in (groups[len(groups) - min(k, len(groups)):] if k else []) for p in g]
        return {n for n in names if any(n.startswith(p) for p in pre)}

    vis = {n for n in names if n.startswith("visual.")}
    txt_groups = _text_groups(text_prefix)
    txt = {n for n in names if any(n.startswith(p) for g in txt_groups for p in g)}
    keep = set(names) - (vis if li else set()) - (txt if lt else set())
    if li:
        keep |= unlocked(_VIS_GROUPS, gi)
    if lt:
        keep |= unlocked(txt_groups, nt)
        if not freeze_ln:
            keep |= {n for n in txt if ".ln_1." in n or ".ln_2." in n or n.startswith(f"{text_prefix}ln_final.")}
    return keep


@pytest.mark.parametrize("which,text_prefix", [("tiny", ""), ("tiny_siglip", "text.")])
def test_every_lock_combination(which, text_prefix, request):
    model = copy.deepcopy(request.getfixturevalue(which).model)
    names = [n for n, _ in model.named_parameters()]
    assert {"logit_scale"} <= set(names)
    combos = itertools.product([False, True], [0, 1, 2, 9], [True, False], [False, True], [0, 1, 2, 9],
                               [True, False])
    for li, gi, bn, lt, nt, fln in combos:
        for p in model.parameters():
            p.requires_grad_(True)
        lock_towers(model, lock_image=li, lock_image_unlocked_groups=gi, lock_image_freeze_bn=bn, lock_text=lt,
                    lock_text_unlocked_layers=nt, lock_text_freeze_layer_norm=fln)
        got = {n for n, p in model.named_parameters() if p.requires_grad}
        assert got == _expected_trainable(names, text_prefix, li, gi, lt, nt, fln), (li, gi, bn, lt, nt, fln)
        assert "logit_scale" in got


def test_build_model_applies_locks_without_open_clip_layernorm_assert():
    b = build_model("gcl-tiny", lock_image=True, lock_image_unlocked_groups=1, lock_text=True,
                    lock_text_unlocked_layers=2, lock_text_freeze_layer_norm=False, grad_checkpointing=True)
    train = {n for n, p in b.model.named_parameters() if p.requires_grad}
    assert "visual.proj" in train and "visual.ln_post.weight" not in train
    assert {"text_projection", "ln_final.weight", "transformer.resblocks.2.attn.in_proj_weight",
            "transformer.resblocks.0.ln_1.weight"} <= train
    assert "transformer.resblocks.0.attn.in_proj_weight" not in train and "token_embedding.weight" not in train
    assert b.model.transformer.grad_checkpointing and b.model.visual.transformer.grad_checkpointing
    with pytest.raises(ValueError, match="must be >= 0"):
        build_model("gcl-tiny", lock_text=True, lock_text_unlocked_layers=-1)


# ------------------------------------------------------------------------------------- weights files


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["openclip_train", "plain", "safetensors"])
def test_weights_file_loads(tmp_path, fmt):
    torch.manual_seed(0)
    src = build_model("gcl-tiny")
    sd = _state(src.model)
    if fmt == "openclip_train":  # open_clip's trainer: DDP-wrapped state dict + optimizer and metadata
        opt = torch.optim.AdamW(src.model.parameters())
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                    "optimizer": opt.state_dict()}, path)
    elif fmt == "plain":
        path = tmp_path / "weights.pt"
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file(sd, str(path))
    torch.manual_seed(1)
    assert not torch.equal(build_model("gcl-tiny").model.visual.proj, sd["visual.proj"])  # init differs
    torch.manual_seed(1)
    b = build_model("gcl-tiny", pretrained=str(path))
    got = b.model.state_dict()
    assert set(got) == set(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert b.pretrained == str(path)


def test_logit_bias_attached_and_reloaded(tmp_path):
    b = build_model("gcl-tiny", logit_bias_init=-7.0)
    assert b.model.logit_bias.requires_grad and b.model.logit_bias.item() == -7.0
    assert b.model_cfg["init_logit_bias"] == -7.0
    s = build_model("gcl-tiny-siglip", logit_bias_init=-3.0)  # has its own bias: kept
    assert s.model.logit_bias.item() == -10.0
    path = tmp_path / "w.pt"
    torch.save(b.model.state_dict(), path)
    r = build_model("gcl-tiny", pretrained=str(path))
    assert r.model.logit_bias.item() == -7.0 and r.model_cfg["init_logit_bias"] == -7.0


def test_wrong_architecture_and_bad_pretrained_fail_clearly(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build_model("gcl-tiny").model.state_dict(), path)
    cfg = _write_cfg(tmp_path, "narrow-clip")  # width 64 instead of 128
    with pytest.raises(RuntimeError, match="do not fit"):
        build_model("narrow-clip", pretrained=str(path), config_path=str(cfg))
    with pytest.raises(ValueError, match="neither an open_clip tag"):
        build_model("gcl-tiny", pretrained="no_such_tag")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        build_model("ViT-Nope")


# ---------------------------------------------------------------------------------- config_path, offline


def test_config_path_registers_user_config(tmp_path):
    shared = Path(__file__).resolve().parents[2] / "shared" / "bench" / "bench-ViT-S.json"  # beside the repo
    p = tmp_path / "bench-ViT-S.json"
    if shared.is_file():
        shutil.copy(shared, p)
    else:  # same content, for checkouts without the shared folder
        p.write_text(json.dumps({"embed_dim": 256, "vision_cfg": {"image_size": 64, "layers": 4, "width": 256,
                                 "patch_size": 8, "head_width": 64}, "text_cfg": {"context_length": 32,
                                 "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4}}))
    b = build_model("bench-ViT-S", config_path=str(p))
    assert "bench-ViT-S" in open_clip.list_models()
    assert b.context_length == 32 and b.model_cfg["embed_dim"] == 256 and b.real_length
    assert b.preprocess_cfg["size"] == (64, 64)
    x = b.preprocess_val(Image.new("RGB", (80, 60)))
    assert tuple(x.shape) == (3, 64, 64)
    with pytest.raises(ValueError, match="stem"):
        build_model("other-name", config_path=str(p))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="vision_cfg"):
        build_model("bad", config_path=str(bad))


@pytest.mark.parametrize("name,pretrained,repo", [
    ("ViT-B-32", "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    ("hf-hub:Marqo/marqo-fashionSigLIP", None, "Marqo/marqo-fashionSigLIP"),
])
def test_uncached_weights_fail_fast_with_fix(tmp_path, monkeypatch, name, pretrained, repo):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as e:
        build_model(name, pretrained, cache_dir=str(tmp_path))  # an empty cache: never cached
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert f"huggingface-cli download {repo}" in msg and "HF_HOME" in msg
    assert "model.pretrained=/path" in msg and "local-dir:" in msg


def test_local_dir_export_round_trip(tmp_path):
    """model_cfg + preprocess_cfg + weights in a folder load back through open_clip's local-dir: schema."""
    from safetensors.torch import save_file

    b = build_model("gcl-tiny", logit_bias_init=-5.0)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": b.model_cfg, "preprocess_cfg": b.preprocess_cfg}))
    sd = _state(b.model)
    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    r = build_model(f"local-dir:{tmp_path}")
    got = r.model.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert r.model.logit_bias.item() == -5.0 and r.real_length and r.context_length == 77
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        build_model(f"local-dir:{tmp_path / 'missing'}")
