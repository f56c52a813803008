"""The shipped base model (gcl/assets/gcl-base-world): its checksum, its three load paths, its retention.

The three ways users load real weights give the same embeddings within 1e-6: ``model.pretrained=FILE`` with
the model config, ``local-dir:`` (an open_clip folder made by hand here), and ``hf-hub:org/name`` served from a
Hugging Face cache laid out as huggingface_hub writes it, in a fresh process with HF_HUB_OFFLINE=1 and HF_HOME
pointing at it. References: hashlib for the checksum, open_clip's own loaders for every path, huggingface_hub's
own cache scanner for the layout.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from gcl.assets import BASE_DIR, BASE_MODEL_NAME, BASE_WEIGHTS, verify_base

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "gcl-test/gcl-base-world"
CAPTIONS = ["a red cup to the left of a blue key", "two yellow stars on grass", "fish, teal, striped, sand",
            "a photo of a bicycle"]


def world_images() -> torch.Tensor:
    """A fixed batch of world pictures, preprocessed once (every path then sees the same input tensor)."""
    from gcl.data import world as W
    from gcl.data.world.scene import rng

    _, _, pre = open_clip.create_model_and_transforms(f"local-dir:{BASE_DIR}")
    return torch.stack([pre(W.render_scene(W.sample_scene(rng(5, i)), 64, rng(6, i))) for i in range(6)])


def embed(model: torch.nn.Module, tokenizer, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    with torch.no_grad():
        return (model.encode_image(images, normalize=True).numpy(),
                model.encode_text(tokenizer(CAPTIONS), normalize=True).numpy())


def test_shipped_weights_match_their_recorded_checksum() -> None:
    m = verify_base()
    data = BASE_WEIGHTS.read_bytes()
    assert hashlib.sha256(data).hexdigest() == m["sha256"] and len(data) == m["bytes"] <= 8 * 2**20
    card = (BASE_DIR / "README.md").read_text()
    assert m["sha256"] in card and "python -m gcl.assets.build" in card
    assert m["training"]["load_before"] and m["training"]["wall_s"] > 0  # the time and the machine's load
    from safetensors import safe_open

    with safe_open(str(BASE_WEIGHTS), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    # every float tensor in fp16; the only others are the ResNet BatchNorms' step counters
    assert {d for k, d in dtypes.items() if not k.endswith("num_batches_tracked")} == {"F16"}
    assert {d for k, d in dtypes.items() if k.endswith("num_batches_tracked")} <= {"I64"}


def hf_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """Lay ``folder`` out as huggingface_hub's cache does: blobs/<hash>, snapshots/<commit>/<file> symlinks
    to the blobs, refs/main holding the commit."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != "manifest.json":
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, repo / "blobs" / digest)
            (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


_HUB_SCRIPT = r"""
import json, sys, numpy as np, open_clip, torch
from huggingface_hub import scan_cache_dir, constants
from gcl.model import build_model
repo, out = sys.argv[1], sys.argv[2]
info = scan_cache_dir()  # huggingface_hub's own view of the cache (HF_HOME/hub)
assert constants.HF_HUB_OFFLINE, "HF_HUB_OFFLINE must be on"
images = torch.load(out + "/images.pt", weights_only=True)
captions = json.load(open(out + "/captions.json"))
res = {"repos": [r.repo_id for r in info.repos], "warnings": [str(w) for w in info.warnings]}
for which in ("open_clip", "gcl"):
    if which == "open_clip":
        model, _, _ = open_clip.create_model_and_transforms("hf-hub:" + repo)
        tok = open_clip.get_tokenizer("hf-hub:" + repo)
    else:
        b = build_model("hf-hub:" + repo)
        model, tok = b.model, b.tokenizer
    model.eval()
    with torch.no_grad():
        np.save(f"{out}/{which}_img.npy", model.encode_image(images, normalize=True).numpy())
        np.save(f"{out}/{which}_txt.npy", model.encode_text(tok(captions), normalize=True).numpy())
json.dump(res, open(out + "/hub.json", "w"))
"""


def test_three_load_paths_give_the_same_embeddings(tmp_path: Path) -> None:
    from gcl.model import build_model

    images = world_images()
    # 1. model.pretrained=FILE with the model config: open_clip's loader and gcl's
    ref_model = open_clip.create_model(BASE_MODEL_NAME, pretrained=str(BASE_WEIGHTS))
    tokenizer = open_clip.get_tokenizer(BASE_MODEL_NAME)
    ref = embed(ref_model, tokenizer, images)
    b = build_model(BASE_MODEL_NAME, str(BASE_WEIGHTS))
    got = {"pretrained=FILE (gcl)": embed(b.model, b.tokenizer, images)}
    # 2. local-dir: an open_clip folder written by hand (config + weights), loaded by open_clip and by gcl
    d = tmp_path / "by-hand"
    d.mkdir()
    shutil.copyfile(BASE_WEIGHTS, d / "open_clip_model.safetensors")
    cfg = json.loads((BASE_DIR / "open_clip_config.json").read_text())
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg["model_cfg"],
                                                          "preprocess_cfg": cfg["preprocess_cfg"]}))
    got["local-dir (open_clip)"] = embed(open_clip.create_model(f"local-dir:{d}"),
                                         open_clip.get_tokenizer(f"local-dir:{d}"), images)
    b = build_model(f"local-dir:{d}")
    got["local-dir (gcl)"] = embed(b.model, b.tokenizer, images)
    # 3. hf-hub:ORG/NAME from a local HF cache, offline, in a fresh process (huggingface_hub reads its env at import)
    home = hf_cache(tmp_path / "hf", REPO_ID, BASE_DIR)
    torch.save(images, tmp_path / "images.pt")
    (tmp_path / "captions.json").write_text(json.dumps(CAPTIONS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, REPO_ID, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    hub = json.loads((tmp_path / "hub.json").read_text())
    assert hub == {"repos": [REPO_ID], "warnings": []}, hub  # huggingface_hub accepts the layout as its own
    for which in ("open_clip", "gcl"):
        got[f"hf-hub ({which})"] = (np.load(tmp_path / f"{which}_img.npy"), np.load(tmp_path / f"{which}_txt.npy"))
    assert ref[0].shape == (6, 128) and ref[1].shape == (len(CAPTIONS), 128)
    for name, (img, txt) in got.items():
        assert np.abs(img - ref[0]).max() <= 1e-6 and np.abs(txt - ref[1]).max() <= 1e-6, name
    # the weights really are the base's (not a fresh random init that would also agree with itself)
    fresh = embed(open_clip.create_model(BASE_MODEL_NAME), tokenizer, images)
    assert np.abs(fresh[0] - ref[0]).max() > 0.1


@pytest.fixture(scope="module")
def base_world_metrics(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """The base on the retention preset (eval=world), on a small world of the same seed."""
    from helpers import compose

    from gcl.data import resolve_splits
    from gcl.eval.run import evaluate_model
    from gcl.model import build_model

    cache = tmp_path_factory.mktemp("world-cache")
    cfg = compose("evaluate", ["eval=world", f"data.world.cache_dir={cache}", "data.world.samples=1200",
                               "data.world.workers=1", "eval.gallery.enabled=false"])
    splits = resolve_splits(cfg.data, extra=[t.split for t in cfg.eval.tasks])
    torch.manual_seed(0)
    bundle = build_model(BASE_MODEL_NAME, str(BASE_WEIGHTS))
    return evaluate_model(bundle, cfg.eval, splits=splits, context_length=dict(cfg.data.context_length),
                          default_context_length=int(cfg.data.default_context_length), list_sep=cfg.data.list_sep)


def test_retention_suite_scores_the_base_well_above_chance(base_world_metrics: dict[str, float]) -> None:
    m = base_world_metrics
    n_test = 1200 * 0.91 * 0.1  # ~110 documents per split at 1200 samples: chance R@10 ~ 0.09
    assert m["world/zeroshot_class/accuracy"] >= 10 / 48, m  # 10x chance
    assert m["world/zeroshot_color/accuracy"] >= 5 / 16, m
    assert m["world/heldout_zeroshot_color/accuracy"] >= 5 / 16, m
    assert m["world/text2image/recall@10"] >= 5 * 10 / n_test, m
    assert m["world/heldout_text2image/recall@10"] >= 4 * 10 / n_test, m


# MRR and P@1: the tiny catalog's val split has a few dozen documents, so recall@10 / P@10 are near saturation
DEMO_SUMMARY = ["synthetic/avg/text2image/mrr@10", "synthetic/avg/retrieval/mrr@10",
                "synthetic/avg/attribute2product/precision@1"]


def test_short_finetune_from_the_base_improves_the_domain(tmp_path: Path, catalog_cache: Path) -> None:
    """experiment=demo (model.pretrained = the shipped base, the seven-field fashion loss) for a few steps on a
    small catalog: the domain metrics rise over step 0 (the base itself), and the before/after table the run
    ends with holds the values of the two evaluation files it names."""
    from helpers import FAST, compose

    from gcl.train import Trainer

    cfg = compose("train", ["experiment=demo", *FAST, f"data.synthetic.cache_dir={catalog_cache}", "eval=synthetic",
                            "eval.gallery.enabled=false", "trainer.max_steps=30", "trainer.eval_every=30",
                            "data.batch_size=32", f"eval.summary=[{','.join(DEMO_SUMMARY)}]"])
    assert cfg.model.pretrained == str(BASE_WEIGHTS)
    Trainer(cfg, tmp_path).fit()
    before = json.loads((tmp_path / "eval" / "step_000000.json").read_text())
    after = json.loads((tmp_path / "eval" / "step_000030.json").read_text())
    gains = {n: after[n] - before[n] for n in DEMO_SUMMARY}
    assert all(g > 0 for g in gains.values()) and gains[DEMO_SUMMARY[0]] >= 0.05, gains
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in (tmp_path / "eval" / "summary.md").read_text().splitlines()[2:]}
    assert list(rows) == DEMO_SUMMARY
    for n, (b, a, change) in rows.items():
        assert (b, a, change) == (f"{before[n]:.3f}", f"{after[n]:.3f}", f"{after[n] - before[n]:+.3f}"), n
