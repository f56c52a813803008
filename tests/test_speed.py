"""gcl.model.speed: each speed setting takes effect, and results stay equal where they must.

References: the same model built without the setting (same seed, so the same weights), open_clip's own
tower forward, and torch's operator trace (which attention kernel ran, which memory format a conv saw).
"""
from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from helpers import FAST, compose

from gcl.config import ConfigError, validate
from gcl.flops import flop_counter
from gcl.loss import build_loss
from gcl.model import build_model
from gcl.model.speed import compile_loss

FIELDS = ["title", "colors"]
TERMS = [{"name": f"{f}_image", "left": {"fields": [f], "weights": [1.0]},
          "right": {"fields": ["image"], "weights": [1.0]}, "weight": 0.5} for f in FIELDS]


def _build(**kw):
    torch.manual_seed(0)
    return build_model("gcl-tiny", **kw)


def _batch(tokenizer, titles: list[str], colors: list[str], size: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = len(titles)
    tokens = {}
    for f, texts in (("title", titles), ("colors", colors)):
        t = tokenizer(texts)
        tokens[f] = t[:, : int((t != 0).any(0).nonzero().max()) + 1]
    ones = torch.ones(b, dtype=torch.bool)
    return {"image": torch.randn(b, 3, size, size, generator=g), "tokens": tokens,
            "present": {"image": ones, "title": ones, "colors": ones},
            "text_id": {f: torch.tensor([hash(x) % 1000 + 1 for x in texts]) for f, texts in
                        (("title", titles), ("colors", colors))},
            "item_id": torch.arange(1, b + 1)}


# Training batches have a fixed size; their packed text passes differ in shape from batch to batch.
BATCHES = [
    (["red cotton midi dress", "black leather ankle boots", "wool scarf"], ["red", "black", "grey"]),
    (["denim jacket with a very long and detailed title that keeps going", "a", "blue shirt"],
     ["blue", "red", "blue"]),
    (["black leather belt", "red cotton midi dress with long sleeves and a round neck", "red cotton belt"],
     ["black", "red", "red"]),
]


def _loss_and_grads(bundle, loss, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = bundle.model
    model.zero_grad(set_to_none=True)
    feats = bundle.field_encoder()(batch, ["image", *FIELDS])
    out = loss(feats, batch, model.logit_scale)["loss"]
    out.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_config_rejects_bad_speed_values_naming_the_key():
    base = compose("train", [*FAST, "model.compile=step", "model.attention=math", "model.channels_last=true",
                             "model.patch_dropout=0.5"])
    validate(base)
    for key, value in (("compile", "yes"), ("attention", "flash"), ("patch_dropout", 1.0), ("compile_backend", "")):
        cfg = copy.deepcopy(base)
        cfg.model[key] = value
        with pytest.raises(ConfigError, match=f"model.{key}"):
            validate(cfg)


def test_compile_step_equals_eager_and_text_shapes_do_not_recompile_per_batch():
    """model.compile=step (towers + loss) gives eager's loss and gradients on batches whose packed text passes
    all differ in shape. The eager backend runs dynamo's capture (graphs, guards, dynamic shapes) without code
    generation, to keep CI fast; benchmarks/bench_knobs.py checks inductor's loss against eager on the real
    step. Under the FLOP counter the compiled towers run eagerly, so the trainer's first-step count is exact."""
    import torch._dynamo as dynamo

    eager = _build()
    compiled = _build(compile="step", compile_backend="eager")
    loss_e = build_loss("clip", TERMS, duplicates=True)
    loss_c = build_loss("clip", TERMS, duplicates=True)
    compile_loss(loss_c, "step", "eager")
    batches = [_batch(eager.tokenizer, t, c, seed=i) for i, (t, c) in enumerate(BATCHES)]
    with flop_counter() as fc_e:
        _loss_and_grads(eager, loss_e, batches[0])
    dynamo.reset()
    dynamo.utils.counters.clear()
    with flop_counter() as fc_c:
        _loss_and_grads(compiled, loss_c, batches[0])
    assert fc_c.get_total_flops() == fc_e.get_total_flops() > 0
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 0  # nothing compiled under the counter
    for batch in batches:
        le, ge = _loss_and_grads(eager, loss_e, batch)
        lc, gc = _loss_and_grads(compiled, loss_c, batch)
        torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-6)
        assert set(gc) == set(ge)
        for n in ge:
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    # image tower 1 graph, loss 1, text stack <= 2 (dynamic from the start; dynamo specialises one sequence)
    assert dynamo.utils.counters["stats"]["unique_graphs"] <= 4
    assert not dynamo.utils.counters["graph_break"]
    # the module tree and state-dict keys are those of the eager model (checkpoints and exports unchanged)
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())


def _ops(bundle, batch, fields) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    with flop_counter() as fc:
        out = bundle.field_encoder()(batch, fields)
    return {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}, out


def test_attention_setting_selects_the_kernel_and_keeps_results():
    """auto runs CPU's fused attention kernel; math runs the unfused reference (bmm). Same features; the
    FLOP count of the fused kernel equals that of the math decomposition (gcl.flops's CPU formula)."""
    auto, math = _build(), _build(attention="math")
    batch = _batch(auto.tokenizer, *BATCHES[1])
    ops_a, out_a = _ops(auto, batch, ["image", *FIELDS])
    ops_m, out_m = _ops(math, batch, ["image", *FIELDS])
    assert ops_a.get("aten._scaled_dot_product_flash_attention_for_cpu", 0) > 0 and "aten.bmm" not in ops_a
    assert "aten._scaled_dot_product_flash_attention_for_cpu" not in ops_m and ops_m["aten.bmm"] > 0
    assert sum(ops_a.values()) == sum(ops_m.values())
    for f in out_a:
        torch.testing.assert_close(out_m[f], out_a[f], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="model.attention"):
        build_model("gcl-tiny", attention="flash")


def _tiny_resnet(tmp_path) -> str:
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "gcl-test-rn.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return "gcl-test-rn"


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_channels_last_takes_effect_and_keeps_results(tower, tmp_path):
    """Conv weights and the stem's input are NHWC; features and gradients equal the NCHW model's."""
    name = "gcl-tiny" if tower == "vit" else _tiny_resnet(tmp_path)
    torch.manual_seed(0)
    ref = build_model(name)
    torch.manual_seed(0)
    cl = build_model(name, channels_last=True)
    convs = [m for m in cl.model.visual.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    seen = []
    convs[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    size = 64 if tower == "vit" else 32
    images = torch.randn(3, 3, size, size)
    outs, grads = [], []
    for b in (ref, cl):
        b.model.zero_grad(set_to_none=True)
        f = b.field_encoder()({"image": images, "tokens": {}, "present": {}}, ["image"])["image"]
        f.pow(2).sum().backward()
        outs.append(f.detach())
        grads.append({n: p.grad for n, p in b.model.visual.named_parameters() if p.grad is not None})
    assert seen == [True]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert set(grads[1]) == set(grads[0])
    for n, g in grads[0].items():
        # NHWC kernels sum a weight's gradient over positions in another order: compare to the gradient's scale
        assert (grads[1][n] - g).abs().max() <= 1e-4 * g.abs().max() + 1e-6, n


def test_patch_dropout_in_training_only(tmp_path):
    """Training keeps 1 + int(64 * 0.5) of the 65 tokens (class token kept); eval sees all 65 and equals the
    model built without patch dropout. A tower without patch tokens is refused, naming the key."""
    plain, pd = _build(), _build(patch_dropout=0.5)
    lengths = []
    pd.model.visual.transformer.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    images = torch.randn(2, 3, 64, 64)
    batch = {"image": images, "tokens": {}, "present": {}}
    pd.model.train()
    pd.field_encoder()(batch, ["image"])
    pd.model.eval()
    plain.model.eval()
    with torch.no_grad():
        got = pd.field_encoder()(batch, ["image"])["image"]
        ref = plain.model.encode_image(images)
    assert lengths == [33, 65]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert "patch_dropout" not in json.dumps(pd.model_cfg)  # a training setting never reaches the export
    with pytest.raises(ValueError, match="model.patch_dropout"):
        build_model(_tiny_resnet(tmp_path), patch_dropout=0.5)


def test_trainer_applies_every_speed_setting(tmp_path, catalog_cache):
    """The trainer's model, encoder and loss get what the config says (the settings' effects are tested above)."""
    from gcl.train import Trainer

    cfg = compose("train", [*FAST, f"data.synthetic.cache_dir={catalog_cache}", "model.compile=step",
                            "model.compile_backend=eager", "model.attention=math", "model.channels_last=true",
                            "model.patch_dropout=0.25"])
    trainer = Trainer(cfg, tmp_path)
    visual = trainer.model.visual
    assert visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert visual.patch_dropout.prob == 0.25
    encoder = trainer.accelerator.unwrap_model(trainer.forward_module).encoder
    assert encoder.attention == "math" and encoder.channels_last
    for module in (visual, trainer.model.transformer, trainer.loss_fn):
        assert module._compiled_call_impl is not None
