"""Task logic on hand-built data: fusion, relevance rules, graded qrels, scoring vs pytrec_eval, zero-shot F1.

References are independent: plain-loop formulas written here and pytrec_eval on the produced qrels/run.
"""
from __future__ import annotations

import math
import random

import pandas as pd
import pytest
import pytrec_eval
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from gcl.eval import queries as Q
from gcl.eval import tasks as T
from gcl.eval.schema import EvalConfig, TaskConfig
from gcl.eval.zeroshot import class_embeddings, classification_metrics, evaluate_zeroshot


def task(**kw) -> TaskConfig:
    """A TaskConfig through OmegaConf (as Hydra builds it), with a source so it validates."""
    base = {"name": "t", "split": "val", "query": {"fields": ["title"]}}
    base.update(kw)
    return OmegaConf.merge(OmegaConf.structured(TaskConfig), base)


def docs(meta: dict, item_ids=None, **kw) -> T.DocSet:
    n = len(next(iter(meta.values())))
    return T.DocSet(ids=[f"d{i}" for i in range(n)], item_ids=item_ids or [f"i{i}" for i in range(n)],
                    meta=meta, **kw)


# ------------------------------------------------------------------------------------------------ fusion

def test_fuse_matches_plain_formula_with_missing_fields():
    g = torch.Generator().manual_seed(0)
    n, d = 7, 5
    emb = {f: torch.randn(n, d, generator=g) * (i + 1) for i, f in enumerate(["image", "title", "colors"])}
    present = {"image": torch.tensor([1, 1, 0, 1, 0, 1, 0], dtype=torch.bool),
               "title": torch.tensor([1, 0, 1, 1, 0, 1, 0], dtype=torch.bool),
               "colors": torch.tensor([0, 0, 1, 1, 0, 1, 0], dtype=torch.bool)}
    weights = [0.6, 0.3, 0.1]
    fused, ok = T.fuse(emb, present, ["image", "title", "colors"], weights)
    for r in range(n):
        used = [(w, f) for w, f in zip(weights, emb) if present[f][r]]
        if not used:
            assert not ok[r] and torch.count_nonzero(fused[r]) == 0
            continue
        total = sum(w for w, _ in used)
        ref = [0.0] * d
        for w, f in used:
            v = emb[f][r].tolist()
            norm = math.sqrt(sum(x * x for x in v))
            ref = [a + w / total * x / norm for a, x in zip(ref, v)]
        norm = math.sqrt(sum(x * x for x in ref))
        assert ok[r]
        assert torch.allclose(fused[r], torch.tensor([x / norm for x in ref]), atol=1e-6)


def test_fuse_equal_weights_by_default():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    present = {"a": torch.ones(1, dtype=torch.bool), "b": torch.ones(1, dtype=torch.bool)}
    fused, _ = T.fuse({"a": a, "b": b}, present, ["a", "b"], [])
    assert torch.allclose(fused, torch.tensor([[1.0, 1.0]]) / math.sqrt(2))


# ---------------------------------------------------------------------------------------- relevance rules

def test_item_id_rule_relevant_docs_share_the_item():
    d = docs({"title": ["red dress", "red dress back", None, "blue shirt", "hat"]},
             item_ids=["a", "a", "b", "c", "d"])
    q = Q.build_queries(task(relevance={"rule": "item_id"}), d, seed=0)
    # Doc 2 has no title: no query from it; the others each give one.
    assert q.texts["title"] == ["red dress", "red dress back", "blue shirt", "hat"]
    assert q.doc_rows == [0, 1, 3, 4]
    assert list(q.qrels.values()) == [{"d0": 1, "d1": 1}, {"d0": 1, "d1": 1}, {"d3": 1}, {"d4": 1}]


def test_field_rule_unique_queries_are_the_field_values():
    d = docs({"category": ["dresses", "shoes", "dresses", None, "bags", "shoes"]})
    t = task(query={"fields": ["category"]}, relevance={"rule": "field"}, unique_queries=True)
    q = Q.build_queries(t, d, seed=0)
    assert q.texts["category"] == ["bags", "dresses", "shoes"]  # sorted unique values, None excluded
    assert list(q.qrels.values()) == [{"d4": 1}, {"d0": 1, "d2": 1}, {"d1": 1, "d5": 1}]
    assert q.doc_rows is None


def test_field_rule_by_another_field():
    # Per-document title queries, relevant = every document of the same category.
    d = docs({"title": ["a", "b", "c", "d"], "category": ["x", "y", "x", None]})
    q = Q.build_queries(task(relevance={"rule": "field", "field": "category"}), d, seed=0)
    assert [q.texts["title"][i] for i in range(len(q))] == ["a", "b", "c"]  # "d" has no category: dropped
    assert list(q.qrels.values()) == [{"d0": 1, "d2": 1}, {"d1": 1}, {"d0": 1, "d2": 1}]


def test_rows_of_deduplicated_documents_all_count():
    # Two documents; document 0 appears in two rows (two search queries), as in GoogleShopping.
    d = docs({"query": ["shoes", "shoes"]}, rows_meta={"query": ["shoes", "bags", "shoes"]}, row_doc=[0, 0, 1])
    t = task(query={"fields": ["query"]}, relevance={"rule": "field"}, unique_queries=True)
    q = Q.build_queries(t, d, seed=0)
    assert dict(zip(q.texts["query"], q.qrels.values())) == {"bags": {"d0": 1}, "shoes": {"d0": 1, "d1": 1}}


def test_query_sampling_is_seeded_and_per_task():
    d = docs({"title": [f"t{i}" for i in range(50)]})
    a = Q.build_queries(task(num_queries=10), d, seed=3).texts["title"]
    assert a == Q.build_queries(task(num_queries=10), d, seed=3).texts["title"]
    assert len(a) == 10 and len(set(a)) == 10
    assert a != Q.build_queries(task(num_queries=10), d, seed=4).texts["title"]
    assert a != Q.build_queries(task(name="other", num_queries=10), d, seed=3).texts["title"]


# ------------------------------------------------------------------------------------------------ graded

def test_gcl_rescaling_matches_reference():
    g = [3.0, 10.0, 7.5, 3.0, 9.99]
    lo, hi = min(g), max(g)
    ref = [int((x - lo) / (hi - lo) * 99 + 1) for x in g]  # GCL: astype(int) truncates
    assert Q.scale_grades(g, "gcl").tolist() == ref
    assert Q.scale_grades([4.0, 4.0], "gcl").tolist() == [1.0, 1.0]
    assert Q.scale_grades([1, 2, 4], "reciprocal").tolist() == [100.0, 50.0, 25.0]
    assert Q.scale_grades([1.4, 2.6], "none").tolist() == [1.0, 3.0]


def test_graded_queries_qrels_and_weighted_sampling():
    d = docs({"title": ["p0", "p1", "p2"]})
    d.ids = ["A", "B", "C"]
    pairs = pd.DataFrame({
        "query": ["red", "red", "red", "blue", "blue", "green"],
        "product_id": ["A", "B", "Z", "B", "B", "C"],  # Z: not in the corpus; (blue, B) twice
        "score": [10.0, 5.0, 8.0, 1.0, 6.0, 1.0],
    })
    t = task(query={"fields": ["query"]}, table="x.csv", doc_id_column="product_id",
             relevance={"rule": "graded", "grade_field": "score", "grade_scale": "gcl"})
    q = Q.graded_queries(t, d, pairs, seed=0)
    scaled = {s: int((s - 1) / 9 * 99 + 1) for s in (10.0, 5.0, 6.0, 1.0)}
    got = dict(zip(q.texts["query"], q.qrels.values()))
    assert got == {"blue": {"B": scaled[6.0]}, "green": {"C": 1}, "red": {"A": 100, "B": scaled[5.0]}}
    # Grade-weighted sampling of 1 of 3 queries: "red" holds most of the grade mass.
    t.num_queries, t.query_weighting = 1, "grade"
    picks = [Q.graded_queries(t, d, pairs, seed=s).texts["query"][0] for s in range(40)]
    assert picks.count("red") > picks.count("green") and len(set(picks)) >= 2


# -------------------------------------------------------------------------------------------------- scoring

def _pytrec(qrels, run, names):
    """Our metric names -> pytrec_eval measures on the same qrels/run (the independent reference)."""
    m = {"recall@1": "recall_1", "recall@5": "recall_5", "precision@1": "P_1", "precision@5": "P_5",
         "ndcg@5": "ndcg_cut_5", "map@20": "map_cut_20", "mrr": "recip_rank"}
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"recall.1,5", "P.1,5", "ndcg_cut.5", "map_cut.20", "recip_rank"})
    per = ev.evaluate(run)
    return {n: sum(v[m[n]] for v in per.values()) / len(per) for n in names}


METRICS = ["recall@1", "recall@5", "precision@1", "precision@5", "ndcg@5", "map@20", "mrr"]


def test_perfect_embeddings_give_perfect_metrics():
    n = 12
    d = docs({"title": [f"product {i}" for i in range(n)]})
    q = Q.build_queries(task(), d, seed=0)
    emb = torch.eye(n)  # each product's title embeds exactly like its image
    values, run, top = T.score_retrieval(emb[q.doc_rows], emb, q.qrels, q.ids, k=20, metrics=METRICS, chunk_size=5,
                                         doc_ids=d.ids)
    assert values["recall@1"] == 1.0 and values["mrr"] == 1.0 and values["ndcg@5"] == 1.0
    assert values["precision@5"] == pytest.approx(0.2)
    assert top[:, 0].tolist() == q.doc_rows
    assert values == pytest.approx(_pytrec(q.qrels, run, METRICS))


def test_noisy_embeddings_match_pytrec_eval():
    g = torch.Generator().manual_seed(1)
    n = 40
    cats = [random.Random(i).choice(["a", "b", "c", "d"]) for i in range(n)]
    d = docs({"category": cats, "title": [f"t{i}" for i in range(n)]})
    t = task(query={"fields": ["category"]}, relevance={"rule": "field"}, unique_queries=True)
    q = Q.build_queries(t, d, seed=0)
    demb = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    qemb = F.normalize(torch.randn(len(q), 8, generator=g), dim=-1)
    values, run, _ = T.score_retrieval(qemb, demb, q.qrels, q.ids, k=20, metrics=METRICS, chunk_size=7,
                                       doc_ids=d.ids)
    assert all(len(r) == 20 for r in run.values())
    assert values == pytest.approx(_pytrec(q.qrels, run, METRICS), abs=1e-9)
    assert 0 < values["recall@5"] < 1


def test_documents_without_vectors_are_not_retrieved():
    valid = torch.tensor([True, False, True])
    d = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.6, 0.8]])
    _, run, top = T.score_retrieval(torch.tensor([[1.0, 0.0]]), d, {"q": {"b": 1}}, ["q"], k=3, metrics=["mrr"],
                                    chunk_size=2, doc_valid=valid, doc_ids=["a", "b", "c"])
    assert run == {"q": pytest.approx({"a": 0.8, "c": 0.6})} and top.tolist() == [[0, 2]]


def test_means_and_aggregates():
    per = {"A/t2i": {"recall@1": 0.2, "recall@10": 0.6}, "B/t2i": {"recall@1": 0.4, "recall@10": 0.8},
           "A/c2p": {"precision@1": 1.0}}
    per = {k: T.add_means(v, {"avg_recall": ["recall@1", "recall@10"]}) for k, v in per.items()}
    assert per["A/t2i"]["avg_recall"] == pytest.approx(0.4) and "avg_recall" not in per["A/c2p"]
    vals, names = T.aggregate(per, ["*/t2i"], ["avg_recall", "recall@1", "missing"])
    assert names == ["A/t2i", "B/t2i"]
    assert vals == pytest.approx({"avg_recall": 0.5, "recall@1": 0.3})


# ------------------------------------------------------------------------------------------------ zero-shot

def _f1_reference(y_true, y_pred, labels):
    """Per-class F1 by counting, then support-weighted and plain means (sklearn's definitions, no sklearn)."""
    f1s, supports = [], []
    for c in labels:
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred) if t == c and p != c)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        supports.append(sum(1 for t in y_true if t == c))
    seen = [i for i, c in enumerate(labels) if c in y_true or c in y_pred]
    return {"f1_weighted": sum(f * s for f, s in zip(f1s, supports)) / len(y_true),
            "f1_macro": sum(f1s[i] for i in seen) / len(seen),
            "accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)}


def test_weighted_f1_matches_reference():
    rng = random.Random(0)
    y_true = [rng.randrange(6) for _ in range(200)]
    y_pred = [t if rng.random() < 0.4 else rng.randrange(5) for t in y_true]  # class 5 never predicted
    got = classification_metrics(y_true, y_pred, num_classes=7)  # class 6 never occurs at all
    assert got == pytest.approx(_f1_reference(y_true, y_pred, list(range(7))))


def test_zeroshot_prompts_average_and_skips():
    texts_seen = []

    def encode(texts):
        texts_seen.extend(texts)
        # "a photo of a X" -> e_X * 2; "X clothing" -> e_X + e_2 (an offset the template mean keeps)
        out = []
        for t in texts:
            x = 0 if "red" in t else 1
            v = torch.zeros(3)
            v[x] = 2.0
            if t.endswith("clothing"):
                v[2] = 2.0
            out.append(v)
        return torch.stack(out)

    cls = class_embeddings(encode, ["red", "blue"], ["a photo of a {}", "{} clothing"])
    assert texts_seen == ["a photo of a red", "red clothing", "a photo of a blue", "blue clothing"]
    ref_red = F.normalize(torch.tensor([1.0, 0, 0]) + F.normalize(torch.tensor([1.0, 0, 1]), dim=0), dim=0)
    assert torch.allclose(cls[0], ref_red, atol=1e-6)
    images = torch.tensor([[1.0, 0.1, 0.3], [0.1, 1.0, 0.3], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = ["red", "red", None, "green"]  # row 2 unlabeled, row 3 not a class
    metrics, pred, rows = evaluate_zeroshot(images, labels, ["red", "blue"], cls, ["accuracy", "f1_weighted"])
    assert rows == [0, 1] and pred.tolist() == [0, 1]
    assert metrics == pytest.approx({"accuracy": 0.5, "f1_weighted": 2 / 3})


# ----------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("bad, msg", [
    ({"doc": {"fields": ["image", "title"], "weights": [1.0]}}, "doc.weights"),
    ({"table": "x.parquet"}, "exactly one document source"),
    ({"kind": "zeroshot"}, "labels_field"),
    ({"kind": "zeroshot", "labels_field": "category", "metrics": ["recall@1"]}, "not zeroshot metrics"),
    ({"relevance": {"rule": "graded"}}, "graded relevance reads"),
    ({"relevance": {"rule": "nearest"}}, "relevance.rule"),
    ({"query": {"fields": ["title", "color"]}, "relevance": {"rule": "field"}}, "relevance.field"),
])
def test_validate_names_the_key(bad, msg):
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"tasks": [task(**bad)]})
    with pytest.raises(T.EvalConfigError, match=msg):
        T.validate_tasks(cfg)


def test_missing_data_root_message_says_how_to_get_it(tmp_path):
    with pytest.raises(T.MissingDataError, match="eval.data_root is not set.*huggingface-cli download Marqo/KAGL"):
        T.resolve_path("KAGL", None, what="table", hint="Marqo/KAGL")
    with pytest.raises(T.MissingDataError, match="does not exist.*--local-dir"):
        T.resolve_path("KAGL", str(tmp_path), what="table", hint="Marqo/KAGL")
