"""gcl.export: the OpenCLIP Hub folder loads back with open_clip itself and reproduces the trained model.

References are independent of gcl.export: the in-memory trained model, open_clip's own
``create_model_and_transforms('local-dir:...')`` / ``get_tokenizer``, and plain file listings. The Hub is a
local stand-in (``HfApi`` methods replaced by recorders); no network is used.
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image

from gcl.checkpoint import CheckpointManager
from gcl.export import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, ExportError, HubError, export_model, main
from gcl.model import build_model

TOKEN = "hf_TESTtoken0123456789abcdefSECRET"
TEXTS = ["a red cotton dress", "Black Leather BOOTS, size 42!", "", "long " * 100]
TRAIN_YAML = """\
model: {name: gcl-tiny, pretrained: null}
data:
  train_shards: null
  synthetic: {products: 160, seed: 3}
  batch_size: 8
  context_length: {title: 32}
loss:
  kind: clip
  duplicates: true
  terms:
    - name: title_image
      left: {fields: [title], weights: [1.0]}
      right: {fields: [image], weights: [1.0]}
      weight: 0.7
      score_to_weight: none
    - name: query_product
      left: {fields: [query], weights: [1.0]}
      right: {fields: [image, title], weights: [0.9, 0.1]}
      weight: 0.3
      score_to_weight: linear
      score_field: score
logger:
  wandb: {mode: offline, api_key: wandb-SECRET-key}
"""


def _trained(name: str, **kw):
    """A tiny model whose weights, logit_scale and logit_bias are moved off their init (like training)."""
    b = build_model(name, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        b.model.logit_scale.fill_(2.75)
        if getattr(b.model, "logit_bias", None) is not None:
            b.model.logit_bias.fill_(-6.125)
    b.model.eval()
    return b


@pytest.fixture(scope="module")
def clip_bundle():
    return _trained("gcl-tiny")


@pytest.fixture(scope="module")
def siglip_bundle():
    return _trained("gcl-tiny-siglip")


@pytest.fixture(scope="module")
def clip_sigmoid_bundle():
    """CLIP family fine-tuned with a sigmoid loss: the trainer attaches a logit_bias the config lacks."""
    return _trained("gcl-tiny", logit_bias_init=-10.0)


def _run_dir(tmp_path, bundle, *, steps=(10,), model_cfg=None, evals=None, best=None, config=TRAIN_YAML):
    """A run dir in the trainer's format, written by the trainer's own CheckpointManager."""
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep_last=5)
    info = {"name": bundle.name, "pretrained": bundle.pretrained, "config_path": None,
            "model_cfg": model_cfg if model_cfg is not None else bundle.model_cfg,
            "preprocess_cfg": bundle.preprocess_cfg}
    for s in steps:
        mgr.save({"model": bundle.model.state_dict(), "model_info": info, "step": s, "config": config}, s)
    if best is not None:
        mgr.save_best({"model": bundle.model.state_dict(), "model_info": info, "step": best, "config": config},
                      best, "ndcg@10", 0.5)
    (run / "eval").mkdir(parents=True)
    for s, m in (evals or {}).items():
        (run / "eval" / f"step_{s:06d}.json").write_text(json.dumps(m))
    return run


def _images(n=3):
    rng = np.random.default_rng(0)
    # Not square and not the model's size, so resize + crop really run.
    return [Image.fromarray(rng.integers(0, 256, (50 + 7 * i, 81, 3), dtype=np.uint8)) for i in range(n)]


def _assert_same_model(bundle, out):
    """The export, loaded by open_clip alone, equals the trained model on images, texts and logit params."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    imgs = _images()
    x_ref = torch.stack([bundle.preprocess_val(im) for im in imgs])
    x_got = torch.stack([preprocess(im) for im in imgs])
    assert torch.equal(x_ref, x_got)
    t_ref, t_got = bundle.tokenizer(TEXTS), tokenizer(TEXTS)
    assert torch.equal(t_ref, t_got)
    with torch.no_grad():
        for a, b in ((bundle.model.encode_image(x_ref), model.encode_image(x_got)),
                     (bundle.model.encode_text(t_ref), model.encode_text(t_got))):
            assert a.shape == b.shape
            assert (a - b).abs().max().item() <= 1e-5
    assert model.logit_scale.item() == pytest.approx(bundle.model.logit_scale.item(), abs=0)
    ref_bias = getattr(bundle.model, "logit_bias", None)
    if ref_bias is None:
        assert model.logit_bias is None
    else:
        assert model.logit_bias is not None and model.logit_bias.item() == ref_bias.item() == -6.125
    return model


@pytest.mark.parametrize("family", ["clip", "siglip", "clip_sigmoid"])
def test_export_reproduces_trained_model(family, request, tmp_path):
    bundle = request.getfixturevalue(f"{family}_bundle")
    run = _run_dir(tmp_path, bundle)
    out = export_model(run, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == sorted([CARD_NAME, CONFIG_NAME, WEIGHTS_NAME])
    # every file readable like any file the user creates (the weights were 0600 while the rest was 0644)
    mask = os.umask(0o022)
    os.umask(mask)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        n: 0o666 & ~mask for n in (CARD_NAME, CONFIG_NAME, WEIGHTS_NAME)}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert set(cfg) == {"model_cfg", "preprocess_cfg"}
    # open_clip's built-in BPE is selected by the *absence* of an HF tokenizer name.
    assert "hf_tokenizer_name" not in cfg["model_cfg"]["text_cfg"]
    _assert_same_model(bundle, out)


def test_clip_with_sigmoid_bias_missing_from_config_still_loads(clip_sigmoid_bundle, tmp_path):
    """A checkpoint whose model_cfg lacks init_logit_bias (the bias was attached after building) loads too."""
    cfg = {k: v for k, v in clip_sigmoid_bundle.model_cfg.items() if k != "init_logit_bias"}
    run = _run_dir(tmp_path, clip_sigmoid_bundle, model_cfg=cfg)
    out = export_model(run, tmp_path / "export")
    assert "init_logit_bias" in json.loads((out / CONFIG_NAME).read_text())["model_cfg"]
    _assert_same_model(clip_sigmoid_bundle, out)


def test_model_card(clip_bundle, tmp_path):
    evals = {4: {"ndcg@10": 0.25, "recall@10": 0.5, "step": 4},
             10: {"ndcg@10": 0.3125, "recall@10": 0.625, "step": 10},
             12: {"ndcg@10": 0.99}}  # after the exported step: must not be reported for step-10 weights
    out = export_model(_run_dir(tmp_path, clip_bundle, evals=evals), tmp_path / "export", license="mit")
    card = (out / CARD_NAME).read_text()
    head = yaml.safe_load(card.split("---")[1])
    assert head["library_name"] == "open_clip" and head["license"] == "mit"
    assert {"clip", "open_clip", "gcl"} <= set(head["tags"])
    assert "base_model" not in head  # random init: no Hub base model to link
    assert "randomly initialised" in card and "`gcl-tiny`" in card and "# gcl fine-tune of gcl-tiny" in card
    assert re.search(r"\| title_image \| title \| image \| 0\.7 \| none \|", card)
    assert re.search(r"\| query_product \| query \| 0\.9·image \+ 0\.1·title \| 0\.3 \| linear \(score\) \|", card)
    assert "synthetic" in card and "160 products" in card
    assert "step 10" in card and "| ndcg@10 | 0.3125 |" in card and "| recall@10 | 0.6250 |" in card
    assert "0.99" not in card
    assert "wandb-SECRET-key" not in card and "<redacted>" in card
    assert f"open_clip.create_model_and_transforms('local-dir:{out.resolve()}')" in card
    assert f"open_clip.get_tokenizer('local-dir:{out.resolve()}')" in card


def test_base_model_metadata_for_pretrained_tag():
    from gcl.export import base_model_id

    # The Hub repo open_clip itself resolves the tag to; real names, no download needed.
    assert base_model_id("ViT-B-16", "laion2b_s34b_b88k") == open_clip.get_pretrained_cfg(
        "ViT-B-16", "laion2b_s34b_b88k")["hf_hub"].strip("/")
    assert base_model_id("hf-hub:Marqo/marqo-fashionSigLIP", None) == "Marqo/marqo-fashionSigLIP"
    assert base_model_id("gcl-tiny", None) is None


def test_best_checkpoint_and_its_metrics(clip_bundle, tmp_path):
    evals = {5: {"ndcg@10": 0.5}, 10: {"ndcg@10": 0.125}}
    run = _run_dir(tmp_path, clip_bundle, steps=(10,), best=5, evals=evals)
    out = export_model(run, tmp_path / "export", which="best")
    card = (out / CARD_NAME).read_text()
    assert "Training steps: 5" in card and "| ndcg@10 | 0.5000 |" in card and "0.1250" not in card


def test_best_without_a_recorded_best_fails(clip_bundle, tmp_path):
    run = _run_dir(tmp_path, clip_bundle, steps=(10,))
    with pytest.raises(ExportError, match="no best checkpoint recorded"):
        export_model(run, tmp_path / "export", which="best")


def test_export_inside_run_dir_like_the_trainer(clip_bundle, tmp_path):
    """The trainer exports to RUN/export (overwrite=True) at the end of every run, possibly twice."""
    run = _run_dir(tmp_path, clip_bundle)
    export_model(run, run / "export", overwrite=True)
    out = export_model(run, run / "export", overwrite=True)
    _assert_same_model(clip_bundle, out)
    assert (run / "checkpoints" / "latest.json").is_file()
    with pytest.raises(ExportError, match="contains the training run"):
        export_model(run, tmp_path, overwrite=True)


def test_explicit_metrics_win(clip_bundle, tmp_path):
    run = _run_dir(tmp_path, clip_bundle, evals={10: {"mrr@10": 0.25}})
    out = export_model(run, tmp_path / "export", metrics={"map@1000": 0.375})
    card = (out / CARD_NAME).read_text()
    assert "| map@1000 | 0.3750 |" in card and "mrr@10" not in card


def test_refuses_non_empty_out_dir_and_overwrites_previous_export(clip_bundle, siglip_bundle, tmp_path):
    run = _run_dir(tmp_path, clip_bundle)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_model(run, other)
    with pytest.raises(ExportError, match="not a previous export"):
        export_model(run, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"

    out = export_model(run, tmp_path / "export")
    with pytest.raises(ExportError, match="--overwrite"):
        export_model(run, out)
    run2 = _run_dir(tmp_path / "second", siglip_bundle)
    export_model(run2, out, overwrite=True)
    _assert_same_model(siglip_bundle, out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_export_leaves_no_folder(clip_bundle, tmp_path):
    bundle = clip_bundle
    sd = dict(bundle.model.state_dict())
    sd["bogus.weight"] = torch.ones(3)  # open_clip's strict load of the folder fails on this
    run = tmp_path / "run"
    CheckpointManager(run).save({"model": sd, "model_info": {
        "name": bundle.name, "pretrained": None, "config_path": None, "model_cfg": bundle.model_cfg,
        "preprocess_cfg": bundle.preprocess_cfg}, "step": 1, "config": TRAIN_YAML}, 1)
    with pytest.raises(ExportError, match="does not load"):
        export_model(run, tmp_path / "exports" / "model")
    assert list((tmp_path / "exports").iterdir()) == []  # neither the folder nor a temp dir


def test_run_without_a_checkpoint_gets_export_advice(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        export_model(tmp_path / "run", tmp_path / "out")
    assert "resum" not in str(e.value) and "trainer.save_every" in str(e.value)


def test_not_a_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(ExportError, match="neither an existing run dir"):
        export_model(tmp_path / "nope", tmp_path / "out")
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(ExportError, match="not a gcl training checkpoint"):
        export_model(tmp_path / "x.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reexport_open_clip_models(clip_bundle, tmp_path):
    """local-dir: and NAME --pretrained FILE re-exports give the same model again."""
    first = export_model(_run_dir(tmp_path, clip_bundle), tmp_path / "first")
    again = export_model(f"local-dir:{first}", tmp_path / "again")
    _assert_same_model(clip_bundle, again)
    weights = tmp_path / "weights.pt"
    torch.save(clip_bundle.model.state_dict(), weights)
    third = export_model("gcl-tiny", tmp_path / "third", pretrained=str(weights))
    _assert_same_model(clip_bundle, third)
    assert "weights file `weights.pt`" in (third / CARD_NAME).read_text()


def test_cli_prints_load_lines(clip_bundle, tmp_path, capsys):
    run = _run_dir(tmp_path, clip_bundle)
    out = tmp_path / "cli-export"
    assert main([str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{out.resolve()}')" in printed
    assert f"tokenizer = open_clip.get_tokenizer('local-dir:{out.resolve()}')" in printed
    assert main([str(run), str(out)]) == 1  # non-empty without --overwrite
    assert main([str(run), str(out), "--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------- the Hub
class FakeHub:
    """Records the HfApi calls the export makes; nothing leaves the machine."""

    def __init__(self, monkeypatch, whoami_error: Exception | None = None):
        import huggingface_hub

        self.calls: list[tuple[str, dict]] = []
        hub = self

        def whoami(api, *a, **k):
            hub.calls.append(("whoami", {"token": api.token}))
            if whoami_error is not None:
                raise whoami_error
            return {"name": "tester"}

        def create_repo(api, *a, **k):
            hub.calls.append(("create_repo", dict(k)))
            from huggingface_hub import RepoUrl

            return RepoUrl(f"https://huggingface.co/{k['repo_id']}")

        def upload_folder(api, *a, **k):
            from pathlib import Path

            files = sorted(p.name for p in Path(k["folder_path"]).iterdir())
            hub.calls.append(("upload_folder", {**k, "files": files, "token": api.token}))
            return "commit"

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", whoami)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


def _no_stored_token(monkeypatch, tmp_path):
    import huggingface_hub

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_push_makes_exact_hub_calls(clip_bundle, tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = FakeHub(monkeypatch)
    run = _run_dir(tmp_path, clip_bundle)
    out = tmp_path / "export"
    assert main([str(run), str(out), "--push-to", "my-org/fashion-tiny", "--private"]) == 0
    names = [c[0] for c in hub.calls]
    assert names == ["whoami", "create_repo", "upload_folder"]
    create, upload = hub.calls[1][1], hub.calls[2][1]
    assert create == {"repo_id": "my-org/fashion-tiny", "repo_type": "model", "private": True, "exist_ok": True}
    assert upload["repo_id"] == "my-org/fashion-tiny" and upload["folder_path"] == str(out)
    assert upload["files"] == sorted([CARD_NAME, CONFIG_NAME, WEIGHTS_NAME])
    assert upload["token"] == TOKEN  # the token reaches the client, and nothing else
    card = (out / CARD_NAME).read_text()
    assert "# fashion-tiny" in card
    assert "open_clip.create_model_and_transforms('hf-hub:my-org/fashion-tiny')" in card
    printed = capsys.readouterr()
    assert "hf-hub:my-org/fashion-tiny" in printed.out
    assert TOKEN not in printed.out + printed.err + caplog.text


def test_push_public_from_python_api(clip_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = FakeHub(monkeypatch)
    export_model(_run_dir(tmp_path, clip_bundle), tmp_path / "export", push_to="org/m", private=False)
    assert hub.calls[1][1]["private"] is False


def test_failed_upload_keeps_the_export_and_hides_the_token(clip_bundle, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    FakeHub(monkeypatch)

    def broken_upload(api, *a, **k):
        raise OSError(f"503 from hub, headers={{'authorization': 'Bearer {TOKEN}'}}")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", broken_upload)
    out = tmp_path / "export"
    with pytest.raises(HubError, match="the export in .* is complete") as e:
        export_model(_run_dir(tmp_path, clip_bundle), out, push_to="org/m")
    assert TOKEN not in str(e.value)
    _assert_same_model(clip_bundle, out)


def test_existing_export_folder_is_a_valid_source(clip_bundle, tmp_path):
    first = export_model(_run_dir(tmp_path, clip_bundle), tmp_path / "first")
    again = export_model(first, tmp_path / "again")  # a plain path, no local-dir: prefix
    _assert_same_model(clip_bundle, again)
    # The card (loss terms, data, metrics) is kept; only its load lines point at the new folder.
    old_card, new_card = (first / CARD_NAME).read_text(), (again / CARD_NAME).read_text()
    assert "| title_image |" in new_card
    assert new_card == old_card.replace(f"local-dir:{first.resolve()}", f"local-dir:{again.resolve()}")


def test_push_without_token_fails_before_any_work(tmp_path, monkeypatch, caplog):
    _no_stored_token(monkeypatch, tmp_path)
    hub = FakeHub(monkeypatch)
    # The checkpoint does not even exist: the token check must come first.
    with pytest.raises(HubError, match="no Hugging Face token found: set HF_TOKEN"):
        export_model(tmp_path / "missing-run", tmp_path / "out", push_to="org/m")
    assert hub.calls == [] and not (tmp_path / "out").exists()
    assert main([str(tmp_path / "missing-run"), str(tmp_path / "out"), "--push-to", "org/m"]) == 1
    assert "no Hugging Face token found" in caplog.text


def test_push_offline_or_unreachable_fails_fast_without_leaking_token(tmp_path, monkeypatch, caplog):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    FakeHub(monkeypatch, whoami_error=ConnectionError(f"cannot connect (Authorization: Bearer {TOKEN})"))
    with pytest.raises(HubError, match="cannot use the Hugging Face Hub") as e:
        export_model(tmp_path / "missing-run", tmp_path / "out", push_to="org/m")
    assert TOKEN not in str(e.value) and e.value.__cause__ is None
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        export_model(tmp_path / "missing-run", tmp_path / "out", push_to="org/m")
    with pytest.raises(HubError, match="ORG/NAME"):
        export_model(tmp_path / "missing-run", tmp_path / "out", push_to="not a repo")
    assert TOKEN not in caplog.text
