"""Marqo's evaluation rules, reimplemented here from reading their code, against gcl's options.

References (each written in this file, not imported from gcl):
- query sampling: GCL ``evals/eval_hf_datasets_v1.py`` / ``eval_gs_v1.py`` ``get_test_queries`` - the query key
  is every left-key column + ``"_{!@#~}_"``, ``groupby(key).sum()`` then ``DataFrame.sample(n, [weights],
  random_state=1)``;
- relevance: the same files' ground truth - the key's rows ``sort_values(weight, ascending=False)[:1000]`` into
  a dict (a repeated document keeps its last, i.e. lowest, grade);
- multi-image items: Marqo-FashionCLIP ``utils/retrieval.py`` ``run_retrieval`` - ``{item_ID[row]: score}`` over
  the top-k rows in score order (an item keeps its last, i.e. lowest, row);
- ties: pytrec_eval on the full run.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import pytrec_eval
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from gcl.eval import queries as Q
from gcl.eval import tasks as T
from gcl.eval import trec
from gcl.eval.schema import EvalConfig, TaskConfig

SUFFIX = "_{!@#~}_"


def task(**kw) -> TaskConfig:
    base = {"name": "t", "table": "x.parquet", "query": {"fields": ["title"]}}
    base.update(kw)
    return OmegaConf.merge(OmegaConf.structured(TaskConfig), base)


def table_docs(df: pd.DataFrame, tmp_path, fields=("title",), doc_id="item_ID") -> T.DocSet:
    """The documents gcl reads from ``df`` written as parquet (the real reader, so raw texts are captured)."""
    path = tmp_path / "t.parquet"
    df.to_parquet(path)
    spec = T.SourceSpec("table", (str(path),), (("item_id", doc_id),) if doc_id else (), None, None, doc_id)
    r = T.TableReader(spec, list(fields), optional=(T.ITEM_ID,))
    return T.DocSet(ids=r.ids, item_ids=r.item_ids(), meta=r.meta, rows_meta=r.rows_meta if r.deduped else None,
                    row_doc=r.row_doc, raw_rows=r.raw_rows)


def shop_table(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """GoogleShopping-like rows: repeated titles, whitespace variants, prefixes ("abc" / "abc d"), empty and
    missing titles, one unique item per row (Marqo's to_dict('index') needs unique ids)."""
    rng = random.Random(seed)
    words = ["red", "dress", "shoe", "bag", "wool", "hat", "abc", "abc d", "x"]
    titles = []
    for _ in range(n):
        t = " ".join(rng.sample(words, rng.randint(1, 3)))
        u = rng.random()
        if u < 0.05:
            t = t + " "
        elif u < 0.08:
            t = " " + t
        elif u < 0.09:
            t = ""
        elif u < 0.1:
            t = None
        titles.append(t)
    return pd.DataFrame({"title": titles, "item_ID": [f"it{i}" for i in range(n)]})


# ----------------------------------------------------------------------------------- query sampling

def marqo_sample(df: pd.DataFrame, left_keys, n: int, weight_key=None) -> list[str]:
    """GCL's get_test_queries, as its code does it."""
    df = df.copy()
    df["query_id"] = ""
    for col in left_keys:
        df["query_id"] += df[col] + SUFFIX
    if weight_key is None:
        weight_key = "score"
        df[weight_key] = 1
    tmp = df[["query_id", weight_key]].groupby("query_id").sum()
    if weight_key == "score":
        return list(tmp.sample(n=n, random_state=1).index)
    # (pandas 3 refuses a weighted draw without replacement when n * the largest weight share > 1; the
    # pandas GCL was written against did not check, and numpy's choice draws it. Keep n below that bound.)
    assert n * tmp[weight_key].max() / tmp[weight_key].sum() <= 1, "fixture: lower n"
    return list(tmp.sample(n=n, weights=tmp[weight_key], random_state=1, replace=False).index)


def test_marqo_sampling_draws_the_queries_gcl_draws(tmp_path):
    df = shop_table()
    docs = table_docs(df, tmp_path)
    ref = marqo_sample(df, ["title"], 500)
    t = task(unique_queries=True, relevance={"rule": "field"}, num_queries=500, query_sampling="marqo",
             query_whitespace="none")
    q = Q.build_queries(t, docs, seed=1)
    ours = [Q.marqo_key((x,)) for x in q.texts["title"]]
    assert len(ours) == 500 and set(ours) == set(ref)
    # relevance = the rows holding exactly that (unstripped) title
    for x, judged in zip(q.texts["title"], q.qrels.values()):
        assert set(judged) == set(df.loc[df.title == x, "item_ID"])
    # gcl's own seeded draw (uniform) is a different sample of the same pool
    u = Q.build_queries(task(unique_queries=True, relevance={"rule": "field"}, num_queries=500,
                             query_whitespace="none"), docs, seed=1)
    shared = len(set(u.texts["title"]) & set(q.texts["title"]))
    assert 0 < shared < 500


def test_whitespace_rules_group_queries_differently(tmp_path):
    df = pd.DataFrame({"title": ["red dress", "red dress ", " red dress", "red  dress", "", None, "hat"],
                       "item_ID": [f"i{i}" for i in range(7)]})
    docs = table_docs(df, tmp_path)
    got = {}
    for rule in ("none", "strip", "collapse"):
        q = Q.build_queries(task(unique_queries=True, relevance={"rule": "field"}, query_whitespace=rule),
                            docs, seed=0)
        got[rule] = dict(zip(q.texts["title"], (sorted(j) for j in q.qrels.values())))
    assert got["none"] == {"": ["i4"], " red dress": ["i2"], "hat": ["i6"], "red  dress": ["i3"],
                           "red dress": ["i0"], "red dress ": ["i1"]}
    assert got["strip"] == {"hat": ["i6"], "red  dress": ["i3"], "red dress": ["i0", "i1", "i2"]}
    assert got["collapse"] == {"hat": ["i6"], "red dress": ["i0", "i1", "i2", "i3"]}


# ----------------------------------------------------------------------------------- graded (GS-10M)

def gs_pairs(seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for q in range(300):
        for _ in range(rng.randint(1, 40 if q % 50 == 0 else 6)):
            rows.append({"query": f"query {q}", "product_id": f"p{rng.randrange(400)}",
                         "score_linear": float(rng.choice([1, 2, 3, 5, 8, 13, 40, 90]))})
    rows.append({"query": "query 0", "product_id": "not-in-corpus", "score_linear": 90.0})
    return pd.DataFrame(rows)


def marqo_ground_truth(df: pd.DataFrame, queries, top_k: int) -> dict:
    """eval_gs_v1's gt_results: the query's rows by weight descending (pandas default sort), the first top_k,
    {doc: round(weight)} (a repeated doc keeps its last row)."""
    df = df.set_index("query_id")
    out = {}
    for q in queries:
        rows = df.loc[[q]].sort_values(by="w", ascending=False)
        out[q] = {d: round(w) for d, w in zip(rows["product_id"][:top_k].tolist(), rows["w"][:top_k].tolist())}
    return out


def test_graded_marqo_rules_match_gcl_gs_eval():
    df = gs_pairs()
    lo, hi = df.score_linear.min(), df.score_linear.max()
    ref_df = df.copy()
    ref_df["w"] = ((ref_df.score_linear - lo) / (hi - lo) * 99 + 1).astype(int)
    ref_df["query_id"] = ref_df["query"] + SUFFIX
    ref_q = marqo_sample(ref_df, ["query"], 30, weight_key="w")
    ref_gt = marqo_ground_truth(ref_df, ref_q, top_k=10)
    docs = T.DocSet(ids=[f"p{i}" for i in range(400)], item_ids=[f"p{i}" for i in range(400)], meta={})
    t = task(query={"fields": ["query"]}, corpus="c.json", doc_id_column="product_id", num_queries=30,
             query_sampling="marqo", query_weighting="grade", query_whitespace="none",
             relevance={"rule": "graded", "grade_field": "score_linear", "grade_scale": "gcl", "max_relevant": 10,
                        "cap_order": "marqo", "duplicate_grade": "min", "missing_docs": "keep"})
    q = Q.graded_queries(t, docs, df, seed=1)
    ours = {Q.marqo_key((x,)): j for x, j in zip(q.texts["query"], q.qrels.values())}
    assert set(ours) == set(ref_q)
    assert ours == ref_gt
    assert any(len(j) == 10 for j in ours.values())  # the cap bit
    assert "not-in-corpus" in ours["query 0" + SUFFIX]  # kept, as Marqo's ground truth keeps it
    # our defaults: highest grade of a repeated pair, documents missing from the corpus dropped
    mine = Q.graded_queries(task(query={"fields": ["query"]}, corpus="c.json", doc_id_column="product_id",
                                 relevance={"rule": "graded", "grade_field": "score_linear", "grade_scale": "gcl"}),
                            docs, df, seed=1)
    first = dict(zip(mine.texts["query"], mine.qrels.values()))["query 0"]
    assert "not-in-corpus" not in first
    dup = ref_df[ref_df.query_id.duplicated(keep=False) & ref_df.duplicated(["query_id", "product_id"], keep=False)]
    assert len(dup), "the fixture must repeat a (query, document) pair"
    for (qk, d), g in dup.groupby(["query", "product_id"])["w"]:
        got = dict(zip(mine.texts["query"], mine.qrels.values()))[qk][d]
        assert got == g.max()


def test_cap_marqo_order_is_pandas_sort_values_head():
    """The cap keeps the rows pandas' sort_values(ascending=False)[:cap] keeps, equal grades included."""
    rng = np.random.default_rng(0)
    for n, cap in [(40, 10), (300, 77), (5000, 1000)]:
        grades = rng.choice([1, 1, 1, 2, 5], n)
        frame = pd.DataFrame({"w": grades, "row": np.arange(n)})
        want = frame.sort_values(by="w", ascending=False)["row"][:cap].tolist()
        assert Q.cap_rows(list(range(n)), grades.astype(float), cap, "marqo") == want
        stable = Q.cap_rows(list(range(n)), grades.astype(float), cap, "stable")
        assert stable == frame.sort_values(by="w", ascending=False, kind="stable")["row"][:cap].tolist()


# ----------------------------------------------------------------------------------- multi-image items

def fashion_reference(scores: np.ndarray, items: list[str], k: int) -> dict:
    """Marqo-FashionCLIP run_retrieval: the top-k rows (distinct scores here), {item_ID[row]: score}."""
    top = np.argsort(-scores, kind="stable")[:k]
    return {items[i]: float(scores[i]) for i in top}


@pytest.mark.parametrize("rule", ["min", "max"])
def test_multi_image_items_scored_like_marqo_fashion_or_by_best_row(rule):
    g = torch.Generator().manual_seed(0)
    n, k = 60, 10
    items = [f"item{i % 17}" for i in range(n)]  # 3-4 rows (images) per item
    d = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    q = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    qrels = {f"q{j}": {f"item{j}": 1} for j in range(5)}
    _, run, top = T.score_retrieval(q, d, qrels, list(qrels), k=k, metrics=["mrr@10"], chunk_size=16,
                                    doc_ids=[str(i) for i in range(n)], units=items, multi_image=rule)
    scores = (q.double() @ d.double().T).float().numpy()
    for j, qid in enumerate(qrels):
        if rule == "min":
            want = fashion_reference(scores[j], items, k)
        else:
            best = {}
            for i in np.argsort(-scores[j], kind="stable"):
                best.setdefault(items[i], float(scores[j][i]))
            want = dict(sorted(best.items(), key=lambda kv: -kv[1])[:k])
        assert run[qid] == pytest.approx(want, abs=1e-6)
        assert [items[r] for r in top[j].tolist() if r >= 0] == [u for u, _ in trec_sorted(run[qid])]
    assert all(len(r) < k for r in run.values()) if rule == "min" else all(len(r) == k for r in run.values())


def trec_sorted(run: dict) -> list:
    return sorted(run.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


# ----------------------------------------------------------------------------------- ties and precision

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ties_at_the_cutoff_fall_as_trec_eval_breaks_them(precision):
    """Many exact duplicates (and fp16 rounding): the top k we keep are the first k of pytrec_eval's ranking of
    the full run, so metrics at cut-offs <= k agree exactly, whatever the order the documents were read in."""
    g = torch.Generator().manual_seed(1)
    base = F.normalize(torch.randn(12, 16, generator=g), dim=-1)
    pick = torch.randint(0, 12, (200,), generator=g)
    d = base[pick] if precision == "fp32" else F.normalize(base[pick] + 1e-3 * torch.randn(200, 16, generator=g), dim=-1)
    ids = [str(random.Random(i).randrange(10**random.Random(i).randint(1, 5))) + f"-{i}" for i in range(200)]
    q = F.normalize(torch.randn(30, 16, generator=g), dim=-1)
    qrels = {f"q{j}": {ids[i]: 1 + (i % 2) for i in random.Random(j).sample(range(200), 8)} for j in range(30)}
    names = {"ndcg@5": "ndcg_cut_5", "precision@5": "P_5", "recall@5": "recall_5", "mrr@5": None}
    values, run, _ = T.score_retrieval(q, d, qrels, list(qrels), k=5, metrics=list(names), chunk_size=32,
                                       doc_ids=ids, precision=precision)
    full = (q.double() @ d.double().T).float()
    if precision == "fp16":
        full = (q.half().float().double() @ d.half().float().double().T).float().half().float()
    full_run = {qid: {ids[i]: float(full[j, i]) for i in range(200)} for j, qid in enumerate(qrels)}
    ties = sum(len(set(r.values())) < 5 for r in run.values())
    assert ties >= 10  # the top 5 really tie often
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5", "P.5", "recall.5"}).evaluate(full_run)
    for name, measure in names.items():
        if measure:
            assert values[name] == pytest.approx(np.mean([v[measure] for v in ref.values()]), abs=1e-12), name
    for qid in qrels:  # the kept documents are the first 5 of trec_eval's order of the full run
        assert list(run[qid]) == [d for d, _ in trec_sorted(full_run[qid])[:5]]


def test_fp16_scoring_puts_ties_in_most_top10_lists():
    """Clustered embeddings (products of a few kinds, as real catalogs are): top-10 scores lie close together,
    so fp16 rounding ties most lists, fp16 inputs with fp32 scores almost none."""
    g = torch.Generator().manual_seed(2)
    centers = F.normalize(torch.randn(50, 64, generator=g), dim=-1)

    def around(n: int) -> torch.Tensor:
        return F.normalize(centers[torch.randint(0, 50, (n,), generator=g)] + torch.randn(n, 64, generator=g) / 16, dim=-1)

    d, q = around(20000), around(200)
    qrels = {f"q{j}": {"0": 1} for j in range(200)}
    share = {}
    for precision in ("fp32", "fp16", "fp16_inputs"):
        _, run, _ = T.score_retrieval(q, d, qrels, list(qrels), k=10, metrics=["mrr@10"], chunk_size=4096,
                                      precision=precision)
        share[precision] = np.mean([len(set(r.values())) < 10 for r in run.values()])
    assert share["fp32"] == 0 and share["fp16_inputs"] < 0.05 and share["fp16"] > 0.5, share


# ----------------------------------------------------------------------------------- fixed query sets

def test_fixed_query_sets_json_and_trec(tmp_path):
    docs = T.DocSet(ids=["a", "b", "c"], item_ids=["a", "b", "c"], meta={"text": ["x", "y", "z"]})
    gt = {"red dress": {"a": 1, "gone": 1}, "blue hat": {"b": 1}, "only missing": {"zz": 1}}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    fixed = Q.load_fixed_queries(tmp_path / "gt.json")
    base = {"query": {"fields": ["text"]}, "query_template": "a photo of {}", "query_whitespace": "none"}
    keep = Q.build_queries(task(relevance={"rule": "fixed", "qrels_file": "gt.json", "missing_docs": "keep"}, **base),
                           docs, 0, fixed)
    assert dict(zip(keep.texts["text"], keep.qrels.values())) == gt  # as Marqo-FashionCLIP scores them
    assert keep.embedded("text")[0] == "a photo of red dress"
    drop = Q.build_queries(task(relevance={"rule": "fixed", "qrels_file": "gt.json"}, **base), docs, 0, fixed)
    assert dict(zip(drop.texts["text"], drop.qrels.values())) == {"red dress": {"a": 1}, "blue hat": {"b": 1}}
    # round trip through the files an evaluation writes
    trec.write_qrels(tmp_path / "t.qrels", drop.qrels)
    trec.write_queries(tmp_path / "t.tsv", dict(zip(drop.ids, drop.texts["text"])))
    again = Q.build_queries(task(relevance={"rule": "fixed", "qrels_file": "t.qrels", "queries_file": "t.tsv"},
                                 **base), docs, 0, Q.load_fixed_queries(tmp_path / "t.qrels", tmp_path / "t.tsv"))
    assert again.qrels == drop.qrels and again.texts == drop.texts


# ----------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("bad, msg", [
    ({"query_sampling": "marqo"}, "query_sampling.*unique_queries"),
    ({"query_sampling": "all", "num_queries": 5}, "num_queries"),
    ({"query_template": "a photo"}, "query_template"),
    ({"multi_image": "mean"}, "multi_image"),
    ({"relevance": {"rule": "fixed"}}, "qrels_file"),
    ({"relevance": {"rule": "fixed", "qrels_file": "x.qrels"}}, "queries_file"),
    ({"relevance": {"rule": "field", "qrels_file": "x.json"}}, "only read by relevance.rule=fixed"),
    ({"relevance": {"max_relevant": -1}}, "max_relevant"),
    ({"relevance": {"duplicate_grade": "last"}}, "duplicate_grade"),
])
def test_protocol_options_are_validated(bad, msg):
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"tasks": [task(split="val", table=None, **bad)]})
    with pytest.raises(T.EvalConfigError, match=msg):
        T.validate_tasks(cfg)
    bad_suite = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"tasks": [], "score_precision": "bf16"})
    with pytest.raises(T.EvalConfigError, match="eval.score_precision"):
        T.validate_tasks(bad_suite)
