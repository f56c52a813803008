"""Robust fine-tuning during training: layer-wise lr decay, EMA, unlock schedules, and exact resume of all of
them together (LoRA and patch dropout included; patch dropout itself is tested in test_speed.py).

References: the lr / weight-decay assignment written here from the definition in the issue; the EMA
recurrence written here in float64; an uninterrupted run (resume before, at and after an unlock switch).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import FAST, compose

from gcl.checkpoint import load_checkpoint
from gcl.config import ConfigError, validate
from gcl.model import build_model
from gcl.optim import build_optimizer

IMAGE_EMBED = ("conv1", "class_embedding", "positional_embedding", "ln_pre")
TEXT_EMBED = ("token_embedding", "positional_embedding")


def _reference_lr_wd(name: str, p: torch.Tensor, *, lr: float, lr_image: float, di: float, dt: float, wd: float,
                     wdi: float, wdt: float, blocks: int) -> tuple[float, float]:
    """The issue's definition: the last block gets the tower's lr, each earlier block decay x the block after
    it; the embeddings are one step before block 0; what follows the last block keeps the tower's lr."""
    no_decay = p.ndim < 2 or name.endswith(".bias") or any(k in name for k in (
        "positional_embedding", "class_embedding"))
    if name in ("logit_scale", "logit_bias"):
        return lr, 0.0
    if name.startswith("visual."):
        rel, decay, tower_lr, tower_wd, embed = name[len("visual."):], di, lr_image, wdi, IMAGE_EMBED
    else:  # the CLIP class holds the text tower's parts itself; CustomTextCLIP under .text
        rel, decay, tower_lr, tower_wd, embed = name.removeprefix("text."), dt, lr, wdt, TEXT_EMBED
    m = re.match(r"transformer\.resblocks\.(\d+)\.", rel)
    if m:
        mult = 1.0
        for _ in range(blocks - 1 - int(m.group(1))):  # one factor per block after this one
            mult *= decay
    elif rel.split(".")[0] in embed:
        mult = decay ** blocks
    else:
        mult = 1.0
    return tower_lr * mult, 0.0 if no_decay else tower_wd


class _TimmLike(torch.nn.Module):
    """A model whose towers are not open_clip Transformers (as timm / Hugging Face towers)."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = torch.nn.Sequential(torch.nn.Linear(4, 4))
        self.logit_scale = torch.nn.Parameter(torch.zeros(()))


@pytest.mark.parametrize("name", ["gcl-tiny", "gcl-tiny-siglip"])
def test_layer_decay_and_per_tower_weight_decay_follow_the_definition(name):
    torch.manual_seed(0)
    model = build_model(name).model
    kw = dict(lr=1e-3, lr_image=2e-3, di=0.5, dt=0.8, wd=0.1, wdi=0.05, wdt=0.3, blocks=3)
    opt = build_optimizer(model, lr=kw["lr"], lr_image=kw["lr_image"], weight_decay=kw["wd"],
                          layer_decay_image=kw["di"], layer_decay_text=kw["dt"], weight_decay_image=kw["wdi"],
                          weight_decay_text=kw["wdt"], fused=False)
    got = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(got) == len(names)
    seen = set()
    for name, p in names.items():
        want = _reference_lr_wd(name, p, **kw)
        assert got[id(p)] == pytest.approx(want, rel=1e-12), name
        seen.add(round(want[0], 12))
    # the spread is real: image embeddings 2e-3 * 0.5^3, its last block 2e-3, text embeddings 1e-3 * 0.8^3
    assert {round(2e-3 * 0.125, 12), 2e-3, round(1e-3 * 0.512, 12)} <= seen
    assert opt.param_groups[0]["name"] == "image/layer4" and opt.param_groups[0]["lr"] == 2e-3
    # without decay the groups are the plain ones (checkpoints of earlier runs keep their group names)
    plain = build_optimizer(model, lr=1e-3, fused=False)
    assert [g["name"] for g in plain.param_groups] == ["image", "image_no_decay", "scale_no_decay", "text",
                                                       "text_no_decay"]
    with pytest.raises(NotImplementedError, match="optim.layer_decay_image"):
        build_optimizer(_TimmLike(), lr=1e-3, layer_decay_image=0.5)


def test_layer_decay_on_a_resnet_image_tower_counts_its_stages(tmp_path):
    """CLIP's ModifiedResNet (the shipped base's image tower): its 4 stages are the blocks. From the definition:
    stage k gets decay^(4 - k), the stem (before stage 1) decay^4, the attention pool after the last stage 1."""
    import json

    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "gcl-test-rn-lld.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "gcl-test-rn-lld.json")
    model = build_model("gcl-test-rn-lld").model
    opt = build_optimizer(model, lr=1e-3, layer_decay_image=0.5, fused=False)
    got = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    seen = set()
    for name, p in model.visual.named_parameters():
        first = name.split(".")[0]
        if first in ("layer1", "layer2", "layer3", "layer4"):
            want = 1e-3 * 0.5 ** (4 - int(first[-1]))
        else:
            want = 1e-3 if first == "attnpool" else 1e-3 * 0.5 ** 4
        assert got[id(p)] == pytest.approx(want, rel=1e-12), name
        seen.add(first)
    assert {"conv1", "bn3", "layer1", "layer4", "attnpool"} <= seen


def _trainer(run: Path, cache: Path, *overrides: str):
    from gcl.train import Trainer

    cfg = compose("train", [*FAST, f"data.synthetic.cache_dir={cache}", *overrides])
    validate(cfg)
    return Trainer(cfg, run)


def test_ema_equals_the_reference_recurrence(tmp_path, catalog_cache):
    decay, warmup = 0.6, 2
    tr = _trainer(tmp_path / "ema", catalog_cache, "loss=clip_title", f"optim.ema.decay={decay}",
                  f"optim.ema.warmup_steps={warmup}", "sched=constant")
    names = tr.ema.names
    snap = [{k: v.detach().double().clone() for k, v in tr.model.state_dict().items() if k in names}]
    data = iter(tr.stream)
    for _ in range(4):
        tr.train_step(next(data))
        snap.append({k: v.detach().double().clone() for k, v in tr.model.state_dict().items() if k in names})
    ref = dict(snap[0])
    for t in range(1, 5):
        d = decay * min(1.0, (t - 1) / warmup)
        ref = {k: d * ref[k] + (1 - d) * snap[t][k] for k in ref}
    got = tr.ema.state_dict()
    assert got["num_updates"] == 4
    for k in names:
        torch.testing.assert_close(got["shadow"][k].double(), ref[k], rtol=0, atol=1e-6)
    moved = max((snap[4][k] - snap[0][k]).abs().max().item() for k in names)
    lag = max((got["shadow"][k].double() - snap[4][k]).abs().max().item() for k in names)
    assert moved > 1e-3 and lag > 1e-5  # the weights moved and the average really lags behind them


def _final(run: Path) -> dict:
    state = load_checkpoint(sorted((run / "checkpoints").glob("step_*.pt"))[-1])
    return state


ROBUST = ["loss=clip_title", "sched=constant", "model.lock_image=true", "model.lock_image_steps=2",
          "model.lora.text.rank=4", "model.lora.text.dropout=0.1", "optim.layer_decay_image=0.7",
          "optim.ema.decay=0.8", "model.patch_dropout=0.3", "trainer.keep_last=10", "trainer.max_steps=4"]


def test_resume_is_exact_before_at_and_after_an_unlock_with_lora_ema_and_layer_decay(tmp_path, catalog_cache):
    """The image tower is locked for 2 steps; a run resumed from step 1 (the lock still holds for one step),
    step 2 (the first unlocked step comes next) and step 3 (its optimizer state exists) ends with the
    uninterrupted run's weights and EMA, bit for bit. LoRA adapters and patch dropout train meanwhile."""
    ref = tmp_path / "ref"
    tr = _trainer(ref, catalog_cache, *ROBUST, "trainer.save_every=1")
    image = {n: p.detach().clone() for n, p in tr.model.named_parameters() if n.startswith("visual.")}
    tr.fit()
    ckpts = {int(p.stem.split("_")[1]): p for p in (ref / "checkpoints").glob("step_*.pt")}
    assert sorted(ckpts) == [1, 2, 3, 4]
    s1, s2 = load_checkpoint(ckpts[1])["model"], load_checkpoint(ckpts[2])["model"]
    s3 = load_checkpoint(ckpts[3])["model"]
    # locked for steps 0 and 1, trained from step 2 on
    assert all(torch.equal(s2[n], v) for n, v in image.items())
    assert not torch.equal(s3["visual.proj"], s2["visual.proj"])
    assert not torch.equal(s1["transformer.resblocks.0.mlp.c_fc.lora_B"], torch.zeros_like(s1[
        "transformer.resblocks.0.mlp.c_fc.lora_B"]))  # the adapters train from step 0
    want = load_checkpoint(ckpts[4])
    for k in (1, 2, 3):
        run = tmp_path / f"from{k}"
        _trainer(run, catalog_cache, *ROBUST, f"trainer.resume={ckpts[k]}").fit()
        got = _final(run)
        assert got["step"] == 4
        for name, v in want["model"].items():
            assert torch.equal(got["model"][name], v), (k, name)
        for name, v in want["ema"]["shadow"].items():
            assert torch.equal(got["ema"]["shadow"][name], v), (k, "ema", name)
    _resume_with_a_later_unlock_and_another_decay(tmp_path / "moved", catalog_cache, ckpts[1], image)


def _resume_with_a_later_unlock_and_another_decay(run: Path, cache: Path, ckpt: Path, image: dict) -> None:
    """gcl.resume's 'from step N' class for the schedules: from step 1, the unlock moves from step 2 to 3 and
    the image tower's layer decay from 0.7 to 0.5; the lock then holds through step 3 and the groups' lrs
    follow the new factor (the definition: block i of L gets decay^(L - 1 - i), the embeddings decay^L)."""
    moved = [o for o in ROBUST if not o.startswith(("model.lock_image_steps", "optim.layer_decay_image"))]
    _trainer(run, cache, *moved, "model.lock_image_steps=3", "optim.layer_decay_image=0.5", "trainer.save_every=1",
             f"trainer.resume={ckpt}").fit()
    ckpts = {int(p.stem.split("_")[1]): p for p in (run / "checkpoints").glob("step_*.pt")}
    s3, s4 = load_checkpoint(ckpts[3]), load_checkpoint(ckpts[4])
    assert all(torch.equal(s3["model"][n], v) for n, v in image.items())  # locked for steps 0, 1 and 2
    assert not torch.equal(s4["model"]["visual.proj"], s3["model"]["visual.proj"])
    lrs = {g["name"]: g["lr"] for g in s4["optimizer"]["param_groups"]}
    blocks, head = 3, lrs["image/layer4"]
    for depth in range(blocks + 2):
        want = head * 0.5 ** max(0, blocks - depth)
        assert lrs[f"image/layer{depth}"] == pytest.approx(want, rel=1e-12), depth


CASES = [
    (["model.lock_image_steps=3"], "model.lock_image_steps"),
    (["model.lock_text=true", "model.lock_text_steps=0"], "model.lock_text_steps"),
    (["model.lora.image.rank=4", "model.lock_image=true"], "model.lora.image.rank"),
    (["model.lora.text.rank=4", "model.lora.text.targets=[qkv]"], "model.lora.text.targets"),
    (["optim.layer_decay_text=1.5"], "optim.layer_decay_text"),
    (["optim.ema.eval=true"], "optim.ema.decay"),
    (["export.ema=true"], "export.ema"),
    (["optim.ema.decay=1.0"], "optim.ema.decay"),
    (["export.wise.alpha=0.5"], "export.wise.alpha"),  # random init: no base to interpolate towards
    (["model.pretrained=x.pt", "export.wise.alpha=1.5"], "export.wise.alpha"),
    (["model.pretrained=x.pt", "export.wise.alpha=auto", "export.wise.alphas=1:0:0.1"], "alphas"),
]


def test_robust_settings_are_validated():
    from omegaconf import OmegaConf

    base = compose("train", [])
    validate(base)
    for overrides, key in CASES:
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        with pytest.raises(ConfigError, match=re.escape(key)):
            validate(cfg)
