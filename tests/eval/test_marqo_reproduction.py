"""Acceptance: a GoogleShopping-style parquet evaluated with the ``marqo_ecommerce`` preset gives, per query, the
ranking that the published command's rules give (marqo-ecommerce-embeddings README -> GCL
``evals/eval_hf_datasets_v1.py``), reimplemented here from their code:

- queries: key = title + ``"_{!@#~}_"``, ``groupby(key).sum().sample(n=--top-q, random_state=1)``;
- ground truth: the key's rows ``sort_values(weight)[:1000]`` -> their ``item_ID`` (grade 1);
- features: ``tokenizer([str(title)], context_length=64)`` (``--context-length "[[64], [0]]"``), open_clip's
  ``encode_text`` / ``encode_image`` with ``normalize=True`` (weights ``[1]``);
- retrieval: inner products, top 1000 (``--run-queries-cpu``), exact ties in trec_eval's order;
- metrics: pytrec_eval (BEIR's evaluate) on the run and that ground truth.
"""
from __future__ import annotations

import importlib.util
import io
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytrec_eval
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from gcl.eval import trec
from gcl.eval.run import evaluate_model
from gcl.eval.schema import EvalConfig

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gcl_eval_test_fixtures", Path(__file__).with_name("fixtures.py"))
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

SUFFIX = "_{!@#~}_"
LONG = " ".join(f"word{i}" for i in range(40))  # ~80 BPE tokens: cut differently at 32 and at 64


def noise_png(seed: int) -> bytes:
    """A 16 px picture of random pixels: distinct seeds give clearly distinct features (no near-ties)."""
    px = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return buf.getvalue()


def gs_rows(n: int = 60) -> list[dict]:
    """GoogleShopping rows: unique item_IDs, repeated titles (several relevant items), whitespace variants,
    long titles (past 32 tokens), and duplicated images (exact score ties)."""
    rng = random.Random(0)
    base = ["running shoes", "leather bag", "wool hat", "red dress", "blue jeans", "silk scarf", "gold ring"]
    rows = []
    for i in range(n):
        t = rng.choice(base) + rng.choice(["", "", " model 2", " deluxe"])
        if i % 11 == 0:
            t = t + " "  # a different query for Marqo's raw keys
        if i % 9 == 0:
            t = f"{LONG} {rng.choice(base)}"
        rows.append({"image": noise_png(0 if i % 5 == 0 else i),  # every 5th image is the same picture
                     "item_ID": f"gs{i:03d}", "query": rng.choice(["shoes", "bags", "hats"]),
                     "title": t})
    return rows


def reference(bundle, df: pd.DataFrame, n_queries: int) -> tuple[dict, dict]:
    """(run, ground truth) keyed by the Marqo query key, from the published command's rules."""
    df = df.copy()
    df["query_id"] = df["title"] + SUFFIX
    df["score"] = 1
    sampled = df[["query_id", "score"]].groupby("query_id").sum().sample(n=n_queries, random_state=1)
    queries = list(sampled.index)
    by_key = df.set_index("query_id")
    gt = {q: {d: 1 for d in by_key.loc[[q]].sort_values(by="score", ascending=False)["item_ID"][:1000]}
          for q in queries}
    model = bundle.model.eval()
    with torch.no_grad():
        tok = bundle.tokenizer([by_key.loc[[q]]["title"].iloc[0] for q in queries], context_length=64)
        tok = F.pad(tok, (0, 77 - tok.shape[1]))  # causal tower, EOT pooling: padding after EOT changes nothing
        qv = model.encode_text(tok, normalize=True)
        imgs = torch.stack([bundle.preprocess_val(Image.open(io.BytesIO(b)).convert("RGB")) for b in df["image"]])
        dv = model.encode_image(imgs, normalize=True)
    scores = (qv.double() @ dv.double().T).numpy()
    ids = df["item_ID"].tolist()
    run = {q: {ids[i]: float(scores[j, i]) for i in range(len(ids))} for j, q in enumerate(queries)}
    return run, gt


def trec_ranking(docs: dict) -> list[str]:
    return [d for d, _ in sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


@pytest.fixture(scope="module")
def bundle():
    from gcl.model import build_model

    torch.manual_seed(0)
    return build_model("gcl-tiny")


def test_marqo_ecommerce_preset_reproduces_the_published_rules(tmp_path, bundle):
    rows = gs_rows()
    fx.write_hf_parquet(tmp_path / "data" / "google-shopping-general-eval", rows)
    df = pd.DataFrame(rows)
    n_q = 20
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(REPO / "conf/eval/marqo_ecommerce.yaml"),
                          {"data_root": str(tmp_path / "data"), "num_workers": 0, "batch_size": 16})
    cfg.tasks = [t for t in cfg.tasks if t.name == "GoogleShopping/text2image"]
    cfg.tasks[0].num_queries = n_q
    cfg.aggregates = []
    metrics = evaluate_model(bundle, cfg, out_dir=tmp_path / "out", context_length={"title": 32},
                             default_context_length=77)
    base = tmp_path / "out" / "runs"
    texts = trec.read_queries(base / "GoogleShopping-text2image.queries.tsv")
    run = trec.read_run(base / "GoogleShopping-text2image.run")
    qrels = trec.read_qrels(base / "GoogleShopping-text2image.qrels")
    ref_run, ref_gt = reference(bundle, df, n_q)
    key_of = {qid: t + SUFFIX for qid, t in texts.items()}
    assert sorted(key_of.values()) == sorted(ref_run)  # the same 20 queries (raw titles, whitespace kept)
    assert {key_of[q]: j for q, j in qrels.items()} == ref_gt
    assert any(len(j) > 1 for j in ref_gt.values()) and any(k.endswith(" " + SUFFIX) for k in ref_gt)
    image_of = dict(zip(df["item_ID"], df["image"]))
    ties = 0
    for qid, docs in run.items():
        want = ref_run[key_of[qid]]
        assert set(docs) == set(want)  # every document (k=1000 > 60 documents)
        # the same features up to float round-off (context 64: at 32 the long titles would be off by > 1e-3)
        assert max(abs(docs[d] - want[d]) for d in docs) < 1e-5
        rank = {d: r for r, d in enumerate(docs)}
        # every pair the reference orders clearly is in that order (a random tiny model puts many distinct
        # images within 1e-5 of each other: their order is float noise in any implementation)
        order = trec_ranking(want)
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                if want[a] - want[b] > 2e-5:
                    assert rank[a] < rank[b], (qid, a, b)
        # exact ties (the same picture) are broken by item_ID descending, as trec_eval does
        for img in {image_of[d] for d in docs}:
            same = [d for d in docs if image_of[d] == img]
            if len(same) > 1:
                assert len({docs[d] for d in same}) == 1
                assert sorted(same, key=rank.get) == sorted(same, reverse=True)
                ties += 1
    assert ties > 0
    # the metrics are pytrec_eval's on the written run and the Marqo ground truth
    ev = pytrec_eval.RelevanceEvaluator(ref_gt, {"map_cut.1000", "ndcg_cut.10", "recall.10", "P.10", "recip_rank"})
    ref = ev.evaluate({key_of[q]: docs for q, docs in run.items()})
    for ours, theirs in [("map@1000", "map_cut_1000"), ("ndcg@10", "ndcg_cut_10"), ("recall@10", "recall_10"),
                         ("precision@10", "P_10"), ("mrr@1000", "recip_rank")]:
        assert metrics[f"marqo_ecommerce/GoogleShopping/text2image/{ours}"] == pytest.approx(
            np.mean([v[theirs] for v in ref.values()]), abs=1e-12), ours
    # the long titles really depend on the context length: at 32 tokens their features differ
    with torch.no_grad():
        t32 = F.pad(bundle.tokenizer([LONG], context_length=32), (0, 45))
        t64 = F.pad(bundle.tokenizer([LONG], context_length=64), (0, 13))
        assert (bundle.model.encode_text(t32) - bundle.model.encode_text(t64)).abs().max() > 1e-3
