"""Every eval preset runs end to end on a tiny fixture with the real column names and file layout, producing
sane metrics, per-task JSON, a leaderboard-style markdown and a gallery PNG; evaluate.py loads checkpoints,
run dirs and exports; unavailable weights fail with a clear message."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytrec_eval
import torch
from omegaconf import OmegaConf
from PIL import Image

from gcl.eval import trec
from gcl.eval.compare import compare
from gcl.eval.run import Evaluator, evaluate_model, load_model_for_eval
from gcl.eval.schema import EvalConfig
from gcl.eval.tasks import MissingDataError, metric_names

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gcl_eval_test_fixtures", Path(__file__).with_name("fixtures.py"))
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)


def preset(name: str, **overrides) -> EvalConfig:
    """The preset YAML merged into the typed schema (what Hydra does for eval=<name>)."""
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(REPO / "conf" / "eval" / f"{name}.yaml"),
                          {"num_workers": 0, "batch_size": 16, **overrides})
    return cfg


@pytest.fixture(scope="module")
def bundle():
    from gcl.model import build_model

    torch.manual_seed(0)
    return build_model("gcl-tiny")


def check_outputs(out: Path, metrics: dict[str, float], cfg, stem: str = "metrics") -> dict:
    assert metrics, "no metrics"
    # what trainer.best_metric is checked against before training: the names this evaluation reports
    assert sorted(metrics) == sorted(metric_names(cfg))
    for k, v in metrics.items():
        assert k.startswith(f"{cfg.name}/")
        assert 0.0 <= v <= 1.0 + 1e-9, (k, v)
    flat = json.loads((out / f"{stem}.json").read_text())
    assert flat == pytest.approx(metrics)
    base = out if stem == "metrics" else out / stem
    per_task = {}
    for t in cfg.tasks:
        for m in t.metrics:
            assert f"{cfg.name}/{t.name}/{m}" in metrics
        files = list((base / "tasks").glob("*.json"))
        assert len(files) == len(cfg.tasks)
    for f in (base / "tasks").glob("*.json"):
        d = json.loads(f.read_text())
        per_task[d["task"]] = d
        assert d["counts"]["docs"] > 0
        if d["config"]["kind"] == "retrieval":  # TREC files that re-score to the reported metrics (pytrec_eval)
            run, qrels = trec.read_run(base / d["files"]["run"]), trec.read_qrels(base / d["files"]["qrels"])
            assert set(trec.read_queries(base / d["files"]["queries"])) == set(qrels)
            ms = [m for m in d["config"]["metrics"] if m.startswith(("recall@", "precision@", "ndcg@"))]
            trec_names = {m: m.replace("recall@", "recall_").replace("precision@", "P_").replace("ndcg@", "ndcg_cut_")
                          for m in ms}
            measures = {f"{t.rpartition('_')[0]}.{t.rpartition('_')[2]}" for t in trec_names.values()}
            ev = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
            for m in ms:
                assert d["metrics"][m] == pytest.approx(sum(v[trec_names[m]] for v in ev.values()) / len(ev)), m
    md = (base / "results.md").read_text()
    for t in cfg.tasks:
        assert t.name.rpartition("/")[2] in md
    for a in cfg.aggregates:
        assert a.name in md
    with Image.open(base / "gallery.png") as im:
        assert im.width > 200 and im.height > 100
    return per_task


def test_marqo_fashion_preset(tmp_path, bundle):
    fx.build_marqo_fashion(tmp_path / "data", n=18)
    cfg = preset("marqo_fashion", data_root=str(tmp_path / "data"))
    metrics = evaluate_model(bundle, cfg, out_dir=tmp_path / "out")
    per_task = check_outputs(tmp_path / "out", metrics, cfg)
    # Queries: 18 unique texts; category queries = the unique values of the query column.
    assert per_task["KAGL/text2image"]["counts"] == {"queries": 18, "docs": 18}
    assert per_task["KAGL/category2product"]["counts"]["queries"] == 2
    assert per_task["DeepFashion-InShop/subcategory2product"]["counts"]["queries"] == 4
    assert per_task["iMaterialist/neckline2image"]["counts"]["queries"] == 3
    # DeepFashion-InShop: 2 images (rows) per item, each scored; an item ranks by its lowest row in the top 10
    # (multi_image: min, Marqo-FashionCLIP's run dict), so the run holds item_IDs, fewer than 10 per query
    d = per_task["DeepFashion-InShop/text2image"]
    assert d["counts"]["docs"] == 18
    run = trec.read_run(tmp_path / "out" / d["files"]["run"])
    assert all(0 < len(r) < 10 and set(r) <= {str(1000 + i) for i in range(9)} for r in run.values())
    # The leaderboard averages: text-to-image over the 6 sets that have it (not iMaterialist).
    t2i = [t.name for t in cfg.tasks if t.name.endswith("/text2image")]
    assert len(t2i) == 6
    for m in ("recall@1", "recall@10", "mrr@10", "avg_recall"):
        want = sum(metrics[f"marqo_fashion/{t}/{m}"] for t in t2i) / 6
        assert metrics[f"marqo_fashion/avg/text2image/{m}"] == pytest.approx(want)
    assert len([t for t in cfg.tasks if t.name.endswith("/category2product")]) == 5
    assert len([t for t in cfg.tasks if t.name.endswith("/subcategory2product")]) == 4
    # With 18 documents and top-10 retrieval, recall@10 of a unique-text query is >= 10/18 on average only by
    # luck; what must hold exactly: precision/recall are consistent with the counts.
    r = metrics["marqo_fashion/KAGL/text2image/avg_recall"]
    assert r == pytest.approx((metrics["marqo_fashion/KAGL/text2image/recall@1"]
                               + metrics["marqo_fashion/KAGL/text2image/recall@10"]) / 2)


def test_marqo_ecommerce_preset_deduplicates_products(tmp_path, bundle):
    fx.build_marqo_ecommerce(tmp_path / "data", products=16)
    cfg = preset("marqo_ecommerce", data_root=str(tmp_path / "data"))
    metrics = evaluate_model(bundle, cfg, out_dir=tmp_path / "out")
    per_task = check_outputs(tmp_path / "out", metrics, cfg)
    # 20 rows, 16 distinct item_IDs: one document per product; 3 category queries, 16 unique titles.
    assert per_task["GoogleShopping/category2image"]["counts"] == {"queries": 3, "docs": 16}
    assert per_task["GoogleShopping/text2image"]["counts"] == {"queries": 16, "docs": 16}
    for m in ("err", "rbp@0.7", "rbp@0.8", "rbp@0.9"):  # the summary of Marqo's script
        assert 0 < metrics[f"marqo_ecommerce/GoogleShopping/text2image/{m}"] <= 1
    # k=1000 > 16 documents: every document is retrieved, so recall over the full list is 1 -> map > 0.
    assert metrics["marqo_ecommerce/GoogleShopping/category2image/map@1000"] > 0


def test_marqo_gs10m_preset_graded(tmp_path, bundle, caplog):
    fx.build_marqo_gs10m(tmp_path / "data", products=12, queries=6)
    cfg = preset("marqo_gs10m", data_root=str(tmp_path / "data"))
    metrics = evaluate_model(bundle, cfg, out_dir=tmp_path / "out", step=7)
    per_task = check_outputs(tmp_path / "out", metrics, cfg, stem="step_000007")
    assert {t: d["counts"] for t, d in per_task.items()} == {
        t: {"queries": 6, "docs": 12} for t in ("in_domain", "novel_query", "novel_corpus", "zero_shot")}
    assert "name documents missing from the corpus" in caplog.text  # the "not-in-corpus" rows, counted
    for m in ("ndcg@10", "err", "rbp@0.9"):
        vals = [metrics[f"marqo_gs10m/{t}/{m}"] for t in per_task]
        assert metrics[f"marqo_gs10m/avg/{m}"] == pytest.approx(sum(vals) / 4)


def test_marqo_gs10m_subset_param(tmp_path, bundle):
    fx.build_marqo_gs10m(tmp_path / "data", subset="marqo_gs_wfash_1m", products=6, queries=2)
    cfg = preset("marqo_gs10m", data_root=str(tmp_path / "data"), params={"gs_subset": "marqo_gs_wfash_1m"},
                 gallery={"enabled": False})
    cfg.tasks = cfg.tasks[:1]
    cfg.aggregates = []
    assert "marqo_gs10m/in_domain/ndcg@10" in evaluate_model(bundle, cfg)


def test_synthetic_preset(tmp_path, bundle):
    from gcl.data.synthetic import ensure_catalog

    root = ensure_catalog(tmp_path / "cat", products=300, seed=0, image_size=32)
    splits = {k: v["pattern"] for k, v in json.loads((root / "catalog.json").read_text())["splits"].items()}
    cfg = preset("synthetic")
    metrics = evaluate_model(bundle, cfg, splits=splits, context_length={"title": 32}, out_dir=tmp_path / "out",
                             step=3)
    check_outputs(tmp_path / "out", metrics, cfg, stem="step_000003")
    assert "synthetic/text2image_title/recall@1" in metrics
    assert "synthetic/zeroshot_subcategory/f1_weighted" in metrics
    assert "synthetic/avg/retrieval/mrr@10" in metrics
    # the files compare reads: an evaluation against itself is a zero delta everywhere, zero-shot skipped
    rows, notes = compare([tmp_path / "out"], [tmp_path / "out" / "step_000003"], n_boot=200, n_perm=200)
    assert len(rows) == sum(len(t.metrics) for t in cfg.tasks if t.kind == "retrieval")
    assert all(r.delta == 0 and r.p_value == 1 for r in rows) and "zeroshot_subcategory" in notes[0]


def test_presets_fail_clearly_without_data(tmp_path, bundle):
    with pytest.raises(MissingDataError, match="eval.data_root is not set"):
        evaluate_model(bundle, preset("marqo_fashion"))
    with pytest.raises(MissingDataError, match=r"huggingface-cli download Marqo/atlas .*--local-dir"):
        evaluate_model(bundle, preset("marqo_fashion", data_root=str(tmp_path)))
    with pytest.raises(MissingDataError, match="marqo-gs-dataset.tar"):
        evaluate_model(bundle, preset("marqo_gs10m", data_root=str(tmp_path)))
    with pytest.raises(MissingDataError, match="split 'val'"):
        Evaluator(preset("synthetic"), splits={}).source_spec(preset("synthetic").tasks[0])
    fx.build_marqo_fashion(tmp_path / "fashion", n=6)
    import shutil

    shutil.rmtree(tmp_path / "fashion" / "marqo-FashionCLIP")
    with pytest.raises(MissingDataError, match="qrels_file.*ground_truth_text-image.json.*marqo-FashionCLIP"):
        evaluate_model(bundle, preset("marqo_fashion", data_root=str(tmp_path / "fashion")))
    # a synthetic-only split with the user's shards: the advice names keys that exist (no data.test_heldout_shards)
    from gcl.config import DataConfig

    heldout = next(t for t in preset("synthetic").tasks if t.split == "test_heldout")
    with pytest.raises(MissingDataError) as e:
        Evaluator(preset("synthetic"), splits={"train": "x.tar", "val": "v.tar"}).source_spec(heldout)
    named = set(re.findall(r"data\.(\w+)", str(e.value)))
    assert named and named <= set(DataConfig.__dataclass_fields__), named
    assert "eval.tasks[i].shards" in str(e.value)


# ------------------------------------------------------------------------------------ evaluate.py + loading

def _trainer_checkpoint(run_dir: Path, bundle) -> Path:
    """A checkpoint in the trainer's format (see gcl.train.Trainer.state_dict)."""
    ck = run_dir / "checkpoints"
    ck.mkdir(parents=True)
    state = {"model": bundle.model.state_dict(), "step": 5, "config": "model: {name: gcl-tiny}\n",
             "model_info": {"name": bundle.name, "pretrained": None, "config_path": None,
                            "model_cfg": bundle.model_cfg, "preprocess_cfg": bundle.preprocess_cfg}}
    torch.save(state, ck / "step_000005.pt")
    (ck / "latest.json").write_text(json.dumps({"file": "step_000005.pt", "step": 5}))
    return ck / "step_000005.pt"


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_model_for_eval_checkpoint_run_dir_and_export(tmp_path, bundle):
    from gcl.export import export_model

    with torch.no_grad():
        bundle.model.logit_scale.fill_(2.5)  # a trained value, distinct from a fresh init
    f = _trainer_checkpoint(tmp_path / "run", bundle)
    mc = OmegaConf.create({"name": "unused", "pretrained": None, "config_path": None, "precision": "fp32",
                          "cache_dir": None, "checkpoint": None, "text_packing": "auto",
                          "attention": "auto", "channels_last": False})
    for ref in (tmp_path / "run", f):
        mc.checkpoint = str(ref)
        got = load_model_for_eval(mc, work_dir=tmp_path)
        assert _same_weights(got.model, bundle.model)
    export = export_model(tmp_path / "run", tmp_path / "export")
    mc.checkpoint = str(export)
    assert _same_weights(load_model_for_eval(mc).model, bundle.model)
    mc.checkpoint = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model.checkpoint"):
        load_model_for_eval(mc)
    # model.name + model.pretrained=<weights file>
    torch.save(bundle.model.state_dict(), tmp_path / "weights.pt")
    mc.checkpoint, mc.name, mc.pretrained = None, "gcl-tiny", str(tmp_path / "weights.pt")
    assert _same_weights(load_model_for_eval(mc).model, bundle.model)


def test_embedding_cache_hits_and_never_goes_stale(tmp_path, caplog):
    import logging

    from gcl.eval.retrieval import EmbeddingCache
    from gcl.model import build_model

    torch.manual_seed(1)
    b = build_model("gcl-tiny")
    fx.build_marqo_fashion(tmp_path / "data", n=10)
    cfg = preset("marqo_fashion", data_root=str(tmp_path / "data"), gallery={"enabled": False}, aggregates=[])
    cfg.tasks = [t for t in cfg.tasks if t.name.startswith("KAGL/")][:2]
    cache = EmbeddingCache(tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="gcl.eval.run"):
        first = evaluate_model(b, cfg, cache=cache)
        assert "from the cache" not in caplog.text
        again = evaluate_model(b, cfg, cache=cache)
        assert "from the cache" in caplog.text
    assert again == first
    caplog.clear()
    with torch.no_grad():
        b.model.visual.proj.mul_(-1.0)  # new weights: the cached image embeddings must not be reused
    with caplog.at_level(logging.INFO, logger="gcl.eval.run"):
        changed = evaluate_model(b, cfg, cache=cache)
    assert "from the cache" not in caplog.text
    assert changed != first


def test_unavailable_weights_fail_clearly(monkeypatch):
    from gcl.model import WeightsUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mc = OmegaConf.create({"name": "ViT-B-16", "pretrained": "laion2b_s34b_b88k", "config_path": None,
                          "text_packing": "auto", "precision": "fp32", "cache_dir": None, "checkpoint": None,
                          "attention": "auto", "channels_last": False})
    with pytest.raises(WeightsUnavailableError, match="pre-download"):
        load_model_for_eval(mc)


def test_evaluate_cli_on_a_checkpoint(tmp_path, bundle):
    _trainer_checkpoint(tmp_path / "run", bundle)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "evaluate.py"), f"model.checkpoint={tmp_path / 'run'}", "eval=synthetic",
           "data.synthetic.products=200", "data.synthetic.image_size=32",
           f"data.synthetic.cache_dir={tmp_path / 'cat'}", "eval.num_workers=0", "device=cpu",
           f"hydra.run.dir={tmp_path / 'out'}"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    assert "synthetic/text2image_title/recall@1" in metrics
    assert "step_000005.pt" in (tmp_path / "out" / "eval" / "results.md").read_text()
    # a user's mistakes end with one line and exit status 2, as train.py's do: no traceback
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for ref, msg in ((tmp_path / "nope", "model.checkpoint="), (tmp_path / "junk.pt", "cannot be read")):
        bad = [c if not c.startswith("model.checkpoint=") else f"model.checkpoint={ref}" for c in cmd]
        r = subprocess.run(bad, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "error: " in r.stderr and msg in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------- distributed

_DIST_WORKER = r'''
import json, sys
import torch, torch.distributed as dist
from omegaconf import OmegaConf
from gcl.eval.run import Evaluator
from gcl.eval.schema import EvalConfig
from gcl.model import build_model

cfg_file, splits_file, out_dir = sys.argv[1:4]
dist.init_process_group("gloo")
rank, ws = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
torch.manual_seed(0)
b = build_model("gcl-tiny")
splits = json.loads(open(splits_file).read())
out = {}
for sharded in (False, True):
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(cfg_file), {"sharded": sharded})
    ev = Evaluator(cfg, splits=splits, context_length={"title": 32})
    out[f"sharded={sharded}"] = ev(b.field_encoder(), b, rank=rank, world_size=ws, device="cpu",
                                   out_dir=f"{out_dir}/{sharded}" if rank == 0 else None)
if rank == 0:  # the single-process reference, same weights
    out["single"] = Evaluator(cfg, splits=splits, context_length={"title": 32})(b.field_encoder(), b)
json.dump(out, open(f"{out_dir}/rank{rank}.json", "w"))
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.dist
def test_two_ranks_rank0_and_sharded_match_single_process(tmp_path):
    from gcl.data.synthetic import ensure_catalog

    root = ensure_catalog(tmp_path / "cat", products=300, seed=0, image_size=32, per_shard=16)
    splits = {k: v["pattern"] for k, v in json.loads((root / "catalog.json").read_text())["splits"].items()}
    fx.build_marqo_fashion(tmp_path / "data", n=18)
    syn = OmegaConf.load(REPO / "conf" / "eval" / "synthetic.yaml")
    fashion = OmegaConf.load(REPO / "conf" / "eval" / "marqo_fashion.yaml")
    cfg = OmegaConf.merge(syn, {
        "num_workers": 0, "batch_size": 8, "data_root": str(tmp_path / "data"), "aggregates": [],
        "params": fashion.params,  # where the fashion tasks find their ground-truth files
        "tasks": [t for t in syn.tasks if t.name in ("text2image_title", "category2product", "zeroshot_subcategory")]
        + [t for t in fashion.tasks if t.name in ("KAGL/text2image", "KAGL/color2product")]})
    OmegaConf.save(cfg, tmp_path / "eval.yaml")
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    (tmp_path / "worker.py").write_text(_DIST_WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "worker.py"), str(tmp_path / "eval.yaml"), str(tmp_path / "splits.json"), str(tmp_path)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    single = r0.pop("single")
    assert "synthetic/KAGL/color2product/precision@10" in single and len(single) > 10
    for mode in ("sharded=False", "sharded=True"):
        assert r0[mode] == r1[mode], f"{mode}: ranks disagree"
        assert r0[mode] == pytest.approx(single, abs=1e-6), mode
    assert (tmp_path / "True" / "metrics.json").is_file()


_DIST_FAIL_WORKER = r'''
import json, sys
import torch, torch.distributed as dist
from omegaconf import OmegaConf
from gcl.eval import run as R
from gcl.eval import sources as S
from gcl.eval.schema import EvalConfig
from gcl.model import build_model

cfg_file, splits_file, out_dir, where = sys.argv[1:5]
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
b = build_model("gcl-tiny")
if where == "rank1_local":  # a non-zero rank fails embedding its share of the shards
    orig = S.ShardDocs._local
    def local(self, *a, **k):
        if rank == 1:
            raise OSError("disk gone on rank 1")
        return orig(self, *a, **k)
    S.ShardDocs._local = local
else:  # rank 0 fails scoring the first source, after the others moved on to the next source's gather
    orig_run = R.Evaluator._run_task
    def run_task(self, t, *a, **k):
        if rank == 0 and t.name == "text2image_title":
            raise ValueError("scoring bug on rank 0")
        return orig_run(self, t, *a, **k)
    R.Evaluator._run_task = run_task
cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(cfg_file), {"sharded": True})
ev = R.Evaluator(cfg, splits=json.loads(open(splits_file).read()), context_length={"title": 32})
try:
    ev(b.field_encoder(), b, rank=rank, world_size=2, device="cpu")
    msg = "no error"
except Exception as exn:
    msg = f"{type(exn).__name__}: {exn}"
open(f"{out_dir}/rank{rank}.txt", "w").write(msg)
dist.destroy_process_group()
'''


@pytest.mark.dist
@pytest.mark.parametrize("where, expect", [("rank1_local", "disk gone on rank 1"),
                                           ("rank0_task", "scoring bug on rank 0")])
def test_sharded_eval_failure_on_one_rank_fails_every_rank_without_hanging(tmp_path, where, expect):
    from gcl.data.synthetic import ensure_catalog

    root = ensure_catalog(tmp_path / "cat", products=120, seed=0, image_size=32, per_shard=16)
    splits = {k: v["pattern"] for k, v in json.loads((root / "catalog.json").read_text())["splits"].items()}
    fx.build_marqo_fashion(tmp_path / "data", n=12)
    syn = OmegaConf.load(REPO / "conf" / "eval" / "synthetic.yaml")
    fashion = OmegaConf.load(REPO / "conf" / "eval" / "marqo_fashion.yaml")
    cfg = OmegaConf.merge(syn, {  # two sources, both gathered in sharded mode: shards, then a table with images
        "num_workers": 0, "batch_size": 8, "data_root": str(tmp_path / "data"), "aggregates": [],
        "params": fashion.params,  # where the fashion tasks find their ground-truth files
        "tasks": [t for t in syn.tasks if t.name == "text2image_title"]
        + [t for t in fashion.tasks if t.name == "KAGL/text2image"]})
    OmegaConf.save(cfg, tmp_path / "eval.yaml")
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    (tmp_path / "worker.py").write_text(_DIST_FAIL_WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "worker.py"), str(tmp_path / "eval.yaml"), str(tmp_path / "splits.json"), str(tmp_path),
           where]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):
        msg = (tmp_path / f"rank{rank}.txt").read_text()
        assert expect in msg, (rank, msg)
