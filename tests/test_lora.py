"""LoRA per tower (gcl.model.lora): trainable parameters as configured, the merged export equals the adapter
forward (open_clip loads the export alone), optimizer state only for the adapters, prefix packing kept.

References: parameter counts computed here from the open_clip config (rank x (in + out) per adapted weight);
open_clip's ``create_model_and_transforms('local-dir:...')`` of the export; AdamW's state tensors.
"""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
import yaml

from gcl.checkpoint import CheckpointManager
from gcl.export import export_model
from gcl.model import PACKAGE_CONFIG_DIR, build_model
from gcl.model.lora import merge_lora_state_dict
from gcl.optim import build_optimizer

ALL = ["in_proj", "out_proj", "c_fc", "c_proj"]


def _lora(image: int = 0, text: int = 0, targets=ALL, dropout: float = 0.0, train_logit_scale: bool = True):
    return {"image": {"rank": image, "alpha": 8.0, "dropout": dropout, "targets": list(targets)},
            "text": {"rank": text, "alpha": 8.0, "dropout": dropout, "targets": list(targets)},
            "train_logit_scale": train_logit_scale}


def _adapter_params(cfg: dict, rank: int, targets: list[str]) -> int:
    """rank x (in + out) for every adapted weight of every block, from the open_clip config."""
    d, layers, mlp = cfg["width"], cfg["layers"], int(cfg["width"] * cfg.get("mlp_ratio", 4.0))
    shapes = {"in_proj": (d, 3 * d), "out_proj": (d, d), "c_fc": (d, mlp), "c_proj": (mlp, d)}
    return layers * sum(rank * (i + o) for i, o in (shapes[t] for t in targets))


def test_trainable_parameters_are_as_configured():
    cfg = json.loads((PACKAGE_CONFIG_DIR / "gcl-tiny.json").read_text())
    torch.manual_seed(0)
    b = build_model("gcl-tiny", lora=_lora(text=4, targets=["in_proj", "c_fc"]))
    m = b.model
    image_all = sum(p.numel() for n, p in m.named_parameters() if n.startswith("visual."))
    trainable = {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}
    text_trainable = {n for n in trainable if not n.startswith("visual.") and n != "logit_scale"}
    assert all(".lora_" in n for n in text_trainable)  # only the adapters train in the LoRA tower
    assert sum(trainable.values()) == image_all + _adapter_params(cfg["text_cfg"], 4, ["in_proj", "c_fc"]) + 1
    # both towers, every target, logit_scale frozen: the adapters alone
    torch.manual_seed(0)
    m2 = build_model("gcl-tiny", lora=_lora(image=2, text=3, train_logit_scale=False)).model
    got = sum(p.numel() for p in m2.parameters() if p.requires_grad)
    vis = {"width": cfg["vision_cfg"]["width"], "layers": cfg["vision_cfg"]["layers"]}
    assert got == _adapter_params(vis, 2, ALL) + _adapter_params(cfg["text_cfg"], 3, ALL)
    # the attention module is still an nn.MultiheadAttention: prefix-packed text stays on (checked at build)
    assert isinstance(m2.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    assert build_model("gcl-tiny", lora=_lora(text=3)).text_packing == "prefix"
    # adapters start at zero (B = 0): the model equals its base
    torch.manual_seed(0)
    plain = build_model("gcl-tiny").model.eval()
    tok = open_clip.get_tokenizer("gcl-tiny")(["a red dress"])
    with torch.no_grad():
        assert torch.allclose(m2.eval().encode_text(tok), plain.encode_text(tok), atol=1e-6)


def test_optimizer_state_holds_the_adapters_only():
    torch.manual_seed(0)
    full = build_model("gcl-tiny").model
    torch.manual_seed(0)
    lora = build_model("gcl-tiny", lora=_lora(image=4, text=4, train_logit_scale=False)).model
    sizes = {}
    for name, m in (("full", full), ("lora", lora)):
        opt = build_optimizer(m, lr=1e-3, fused=False)
        x = torch.randn(2, 3, 64, 64)
        m.encode_image(x).sum().backward()
        m.encode_text(open_clip.get_tokenizer("gcl-tiny")(["a", "b"])).sum().backward()
        opt.step()
        sizes[name] = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                          if k in ("exp_avg", "exp_avg_sq"))
        n_train = sum(p.numel() for p in m.parameters() if p.grad is not None)  # logit_scale had no loss here
        assert sizes[name] == 2 * 4 * n_train  # two fp32 moments per trained number
    assert sizes["lora"] < sizes["full"] / 20


@pytest.fixture(scope="module")
def adapted():
    """A tiny model with adapters on both towers, moved off zero (as after training), in eval mode."""
    torch.manual_seed(0)
    b = build_model("gcl-tiny", lora=_lora(image=4, text=4, dropout=0.2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in b.model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    b.model.eval()
    return b


def test_merged_export_equals_the_adapter_forward(adapted, tmp_path):
    run = tmp_path / "run"
    info = {"name": adapted.name, "pretrained": None, "config_path": None, "model_cfg": adapted.model_cfg,
            "preprocess_cfg": adapted.preprocess_cfg}
    state = {"model": adapted.model.state_dict(), "model_info": info, "step": 3,
             "config": yaml.safe_dump({"model": {"name": "gcl-tiny"}})}
    assert any(".parametrizations." in k for k in state["model"]) and any(k.endswith("c_fc.lora_A")
                                                                          for k in state["model"])
    CheckpointManager(run).save(state, 3)
    out = export_model(run, tmp_path / "export")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    assert not any("lora" in k or "parametrizations" in k for k in model.state_dict())
    torch.manual_seed(2)
    x = torch.randn(3, 3, 64, 64)
    tok = open_clip.get_tokenizer(f"local-dir:{out}")(["a red cotton dress", "black boots", ""])
    torch.manual_seed(0)
    base = build_model("gcl-tiny").model.eval()
    with torch.no_grad():
        for ref, got, plain in ((adapted.model.encode_image(x), model.encode_image(x), base.encode_image(x)),
                                (adapted.model.encode_text(tok), model.encode_text(tok), base.encode_text(tok))):
            assert (ref - got).abs().max().item() <= 1e-5
            assert (ref - plain).abs().max().item() > 1e-3  # the adapters do change the model
    # the state-dict merge is W + (alpha / rank) B @ A, written out here
    sd = adapted.model.state_dict()
    pre = "transformer.resblocks.1.attn.parametrizations.in_proj_weight"
    want = sd[f"{pre}.original"] + 2.0 * sd[f"{pre}.0.lora_B"] @ sd[f"{pre}.0.lora_A"]
    torch.testing.assert_close(merge_lora_state_dict(sd)["transformer.resblocks.1.attn.in_proj_weight"], want)
    pre = "visual.transformer.resblocks.0.mlp.c_proj"
    want = sd[f"{pre}.weight"] + 2.0 * sd[f"{pre}.lora_B"] @ sd[f"{pre}.lora_A"]
    torch.testing.assert_close(merge_lora_state_dict(sd)[f"{pre}.weight"], want)


def test_dropout_acts_on_the_mlp_adapters_in_training_only(adapted):
    x = torch.randn(2, 3, 64, 64)
    m = adapted.model
    with torch.no_grad():
        m.train()
        a, b = m.encode_image(x), m.encode_image(x)
        m.eval()
        c, d = m.encode_image(x), m.encode_image(x)
    assert not torch.equal(a, b) and torch.equal(c, d)
