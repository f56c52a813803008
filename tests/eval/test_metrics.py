"""gcl.eval.metrics against pytrec_eval (trec_eval) and against plain per-query reference formulas."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from gcl.eval import metrics as M

pytrec_eval = pytest.importorskip("pytrec_eval")

CUTS = (1, 3, 5, 10, 20)
# our name -> pytrec_eval measure name (pytrec accepts arbitrary cut-offs such as P_7)
OURS_TO_TREC = {
    **{f"recall@{k}": f"recall_{k}" for k in CUTS},
    **{f"precision@{k}": f"P_{k}" for k in CUTS},
    **{f"ndcg@{k}": f"ndcg_cut_{k}" for k in CUTS},
    **{f"map@{k}": f"map_cut_{k}" for k in CUTS},
    "ndcg": "ndcg",
    "map": "map",
    "mrr": "recip_rank",
}


def random_case(seed: int, n_q: int = 40, n_docs: int = 60) -> tuple[dict, dict]:
    """Random graded qrels + a run with many score ties and every awkward case the metrics must handle."""
    rng = random.Random(seed)
    # ids of different lengths so "d9" > "d10" (string order) differs from numeric order
    docs = [f"d{i}" for i in range(n_docs)]
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for qi in range(n_q):
        q = f"q{qi}"
        judged = rng.sample(docs, rng.randint(1, 15))
        qrels[q] = {d: rng.choice([0, 0, 1, 2, 3]) for d in judged}
        if qi % 7 == 0:
            qrels[q] = {d: 0 for d in judged}  # judged, nothing relevant
        if qi % 11 == 3:
            qrels[q][judged[0]] = -1  # a negative judgement
        retrieved = rng.sample(docs, rng.randint(0, 40))  # some unjudged, some judged docs never retrieved
        # few distinct scores -> many exact ties, broken by docid
        run[q] = {d: float(rng.choice([0.1, 0.2, 0.5, 0.5, 0.7, 1.0, rng.random()])) for d in retrieved}
    run["only_in_run"] = {"d1": 1.0}
    qrels["only_in_qrels"] = {"d1": 1}
    qrels["empty_qrels"] = {}
    run["empty_qrels"] = {"d1": 1.0}
    run["q1"] = {}  # in both, nothing retrieved: evaluated, scores 0
    return qrels, run


def trec_order(docs: dict[str, float]) -> list[str]:
    """trec_eval's order, the one rule pytrec_eval documents: score desc, then docid desc."""
    return [d for d, _ in sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("level", [1, 2])
def test_per_query_matches_pytrec_eval(seed: int, level: int) -> None:
    qrels, run = random_case(seed)
    ref = pytrec_eval.RelevanceEvaluator(qrels, set(OURS_TO_TREC.values()), relevance_level=level).evaluate(run)
    ours = M.compute_per_query(qrels, run, list(OURS_TO_TREC), relevance_level=level)
    assert set(ours) == set(ref)  # the same queries are evaluated
    assert "q1" in ours and "only_in_run" not in ours and "empty_qrels" not in ours
    for q in ref:
        for name, trec in OURS_TO_TREC.items():
            assert ours[q][name] == pytest.approx(ref[q][trec], abs=1e-9), (seed, q, name)
    # a non-trivial case: some query scores strictly between 0 and 1
    assert any(0 < ours[q]["ndcg@10"] < 1 for q in ours)


@pytest.mark.parametrize("seed", [0, 5])
def test_cut_mrr_matches_recip_rank_of_cut_run(seed: int) -> None:
    qrels, run = random_case(seed)
    for k in (1, 3, 10):
        cut = {q: {d: run[q][d] for d in trec_order(docs)[:k]} for q, docs in run.items()}
        ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        ours = M.compute_per_query(qrels, run, [f"mrr@{k}"])
        for q in ref:
            assert ours[q][f"mrr@{k}"] == pytest.approx(ref[q]["recip_rank"], abs=1e-9)


def test_mean_and_complete() -> None:
    qrels, run = random_case(7)
    names = ["ndcg@10", "map", "recall@5", "precision@3", "mrr"]
    ref = pytrec_eval.RelevanceEvaluator(qrels, {OURS_TO_TREC[n] for n in names}).evaluate(run)
    means = M.compute(qrels, run, names)
    assert list(means) == names
    for n in names:
        assert means[n] == pytest.approx(np.mean([v[OURS_TO_TREC[n]] for v in ref.values()]), abs=1e-12)
    # complete: every query with judgements counts, missing from the run = 0 (trec_eval -c)
    judged = [q for q, j in qrels.items() if j]
    full = M.compute(qrels, run, names, complete=True)
    for n in names:
        assert full[n] == pytest.approx(sum(v[OURS_TO_TREC[n]] for v in ref.values()) / len(judged), abs=1e-12)
    assert full["map"] < means["map"]


def test_ties_broken_by_docid_descending_like_trec_eval() -> None:
    qrels = {"q": {"d10": 1}}
    run = {"q": {"d9": 0.5, "d10": 0.5, "a": 0.1}}  # "d9" > "d10" as strings -> d9 first
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)["q"]["recip_rank"]
    assert ref == 0.5
    assert M.compute(qrels, run, ["mrr"])["mrr"] == 0.5


def test_no_evaluated_query_gives_zeros() -> None:
    assert M.compute({"a": {"x": 1}}, {"b": {"x": 1.0}}, ["ndcg@10", "err"]) == {"ndcg@10": 0.0, "err": 0.0}


# ------------------------------------------------------------------------------ ERR and RBP by hand
def ref_err(judged: dict[str, int], ranking: list[str], k: int | None = None) -> float:
    """ERR with GCL's normalisation: R = (2^g - 1) / 2^gmax, gmax the query's largest judged grade."""
    gmax = max(max(judged.values()), 0)
    if gmax <= 0:
        return 0.0
    err, p_reach = 0.0, 1.0
    for r, d in enumerate(ranking[:k] if k else ranking, start=1):
        g = max(judged.get(d, 0), 0)
        prob = (2**g - 1) / 2**gmax
        err += p_reach * prob / r
        p_reach *= 1 - prob
    return err


def ref_rbp(judged: dict[str, int], ranking: list[str], p: float) -> float:
    gmax = max(max(judged.values()), 0)
    if gmax <= 0:
        return 0.0
    return (1 - p) * sum(p ** (r - 1) * max(judged.get(d, 0), 0) / gmax for r, d in enumerate(ranking, start=1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_err_and_rbp_match_reference_formulas(seed: int) -> None:
    qrels, run = random_case(seed)
    names = ["err", "err@3", "err@10", "rbp@0.8", "rbp@0.5"]
    ours = M.compute_per_query(qrels, run, names)
    for q, vals in ours.items():
        ranking = trec_order(run[q])
        assert vals["err"] == pytest.approx(ref_err(qrels[q], ranking), abs=1e-12)
        assert vals["err@3"] == pytest.approx(ref_err(qrels[q], ranking, 3), abs=1e-12)
        assert vals["err@10"] == pytest.approx(ref_err(qrels[q], ranking, 10), abs=1e-12)
        assert vals["rbp@0.8"] == pytest.approx(ref_rbp(qrels[q], ranking, 0.8), abs=1e-12)
        assert vals["rbp@0.5"] == pytest.approx(ref_rbp(qrels[q], ranking, 0.5), abs=1e-12)
    assert any(v["err"] > 0 for v in ours.values())


def test_err_rbp_known_values() -> None:
    # grades 2 then 0 then 1, gmax 2: R = 3/4, 0, 1/4
    qrels = {"q": {"a": 2, "b": 0, "c": 1}}
    run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    out = M.compute(qrels, run, ["err", "rbp@0.5"])
    assert out["err"] == pytest.approx(0.75 + 0.25 * 0.25 / 3)
    assert out["rbp@0.5"] == pytest.approx(0.5 * (1.0 + 0.25 * 0.5))
    # binary RBP: relevant at ranks 1 and 3
    assert M.compute({"q": {"a": 1, "c": 1}}, run, ["rbp@0.5"])["rbp@0.5"] == pytest.approx(0.5 * (1 + 0.25))


# ------------------------------------------------------------------------------ matrix API
def test_matrix_api_matches_pytrec_eval_from_index_arrays() -> None:
    rng = np.random.default_rng(0)
    n_q, n_docs, k = 50, 300, 30
    idx = np.stack([rng.permutation(n_docs)[:k] for _ in range(n_q)])  # [Q, K] top-k doc indices
    jd = np.full((n_q, 12), -1)
    jg = np.zeros((n_q, 12))
    qrels = {}
    for i in range(n_q):
        nj = rng.integers(1, 12)
        docs = rng.choice(n_docs, nj, replace=False)
        grades = rng.integers(0, 4, nj)
        if i < 20:  # make hits likely: judge some retrieved docs
            docs[: nj // 2] = idx[i, rng.choice(k, nj // 2, replace=False)]
            docs = np.unique(docs)
            grades = grades[: docs.size]
        jd[i, : docs.size], jg[i, : docs.size] = docs, grades
        qrels[f"q{i}"] = {str(d): int(g) for d, g in zip(docs, grades)}
    run = {f"q{i}": {str(d): float(k - r) for r, d in enumerate(idx[i])} for i in range(n_q)}
    gains = M.lookup_gains(idx, jd, jg)
    names = ["ndcg@10", "ndcg", "map@20", "recall@10", "precision@5", "mrr"]
    ours = M.compute_from_ranking_per_query(gains, jg, names)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {OURS_TO_TREC.get(n, n.replace("@", "_cut_"))
                                                 for n in names}).evaluate(run)
    trec = {"map@20": "map_cut_20", **OURS_TO_TREC}
    for i in range(n_q):
        for n in names:
            assert ours[n][i] == pytest.approx(ref[f"q{i}"][trec[n]], abs=1e-9)
    assert ours["ndcg@10"].max() > 0
    means = M.compute_from_ranking(gains, jg, names)
    assert means["mrr"] == pytest.approx(float(ours["mrr"].mean()))


@pytest.mark.parametrize("n_judged", [4, 40])  # the broadcast path and the sort + search path
def test_lookup_gains_matches_dict_lookup(n_judged: int) -> None:
    rng = np.random.default_rng(n_judged)
    idx = rng.integers(-1, 200, (30, 50))
    jd = np.stack([rng.choice(200, n_judged, replace=False) for _ in range(30)])
    jd[::4, n_judged // 2:] = -1  # padding
    jg = rng.integers(-1, 4, jd.shape).astype(float)
    want = np.array([[dict(zip(jd[i][jd[i] >= 0], jg[i][jd[i] >= 0])).get(d, 0.0) if d >= 0 else 0.0
                      for d in idx[i]] for i in range(30)])
    got = M.lookup_gains(idx, jd, jg)
    np.testing.assert_array_equal(got, want)
    assert (got != 0).sum() > 10


def test_lookup_gains_basic_and_duplicate_error() -> None:
    idx = np.array([[5, 2, -1], [2, 7, 5]])
    jd = np.array([[2, 9], [5, -1]])
    jg = np.array([[3, 1], [2, 0]])
    np.testing.assert_array_equal(M.lookup_gains(idx, jd, jg), [[0, 3, 0], [0, 0, 2]])
    with pytest.raises(ValueError, match="judged twice"):
        M.lookup_gains(idx, np.array([[2, 2], [5, -1]]), jg)
    np.testing.assert_array_equal(M.lookup_gains(idx, np.array([[-1, -1], [5, -1]]), jg), [[0, 0, 0], [0, 0, 2]])


@pytest.mark.parametrize("bad", ["ndcg@0", "foo", "recall", "rbp@1.5", "rbp@0", "ndcg@x"])
def test_bad_metric_names_raise(bad: str) -> None:
    with pytest.raises(ValueError, match="metric"):
        M.compute({"q": {"a": 1}}, {"q": {"a": 1.0}}, [bad])


def test_nan_score_raises() -> None:
    with pytest.raises(ValueError, match="NaN"):
        M.compute({"q": {"a": 1}}, {"q": {"a": math.nan}}, ["mrr"])


# ------------------------------------------------------------------------------ accuracy@k and hole@k
@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("level", [1, 2])
def test_accuracy_matches_trec_success(seed: int, level: int) -> None:
    qrels, run = random_case(seed)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"success.1,3,7,20"}, relevance_level=level).evaluate(run)
    ours = M.compute_per_query(qrels, run, ["accuracy@1", "accuracy@3", "accuracy@7", "accuracy@20"],
                               relevance_level=level)
    assert set(ours) == set(ref)
    for q in ref:
        for k in (1, 3, 7, 20):
            assert ours[q][f"accuracy@{k}"] == ref[q][f"success_{k}"], (q, k)
    assert 0 < np.mean([v["accuracy@3"] for v in ours.values()]) < 1


def ref_hole(qrels: dict, ranking: list[str], k: int) -> float:
    """BEIR's Hole@k, written from its definition: the share of the top k that no query of the qrels judges."""
    annotated = {d for judged in qrels.values() for d in judged}
    return sum(d not in annotated for d in ranking[:k]) / k


@pytest.mark.parametrize("seed", [0, 1])
def test_hole_matches_reference(seed: int) -> None:
    qrels, run = random_case(seed, n_docs=200)  # many retrieved documents judged by no query
    ours = M.compute_per_query(qrels, run, ["hole@1", "hole@5", "hole@50"])
    for q, vals in ours.items():
        ranking = trec_order(run[q])
        for k in (1, 5, 50):
            assert vals[f"hole@{k}"] == pytest.approx(ref_hole(qrels, ranking, k), abs=1e-12)
    assert 0 < np.mean([v["hole@5"] for v in ours.values()]) < 1
    with pytest.raises(ValueError, match="unjudged"):
        M.compute_from_ranking_per_query(np.zeros((1, 2)), np.ones((1, 1)), ["hole@1"])


def test_run_full_of_ties_matches_pytrec_eval() -> None:
    """Every score equal: the ranking is decided by docid alone (trec_eval: descending), for every metric."""
    docs = ["1390", "237", "99", "a", "B", "d10", "d9", "0"]
    qrels = {f"q{i}": {docs[i]: 1, docs[(i + 3) % 8]: 2} for i in range(8)}
    run = {q: {d: 0.5 for d in docs} for q in qrels}
    names = {"mrr": "recip_rank", "ndcg@3": "ndcg_cut_3", "precision@2": "P_2", "map": "map",
             "recall@4": "recall_4", "accuracy@1": "success_1"}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "ndcg_cut.3", "P.2", "map", "recall.4",
                                                 "success.1"}).evaluate(run)
    ours = M.compute_per_query(qrels, run, list(names))
    for q in qrels:
        for n, t in names.items():
            assert ours[q][n] == pytest.approx(ref[q][t], abs=1e-12), (q, n)
    # the direction: "d9" > "d10" > "a" > "B" > "99" > "237" > "1390" > "0" as byte strings, highest first
    assert [d for d, _ in M.trec_order(run["q0"])] == sorted(docs, reverse=True)
    assert ours["q1"]["mrr"] == 1 / 4  # judged: "237" (6th) and "B" (4th, the first hit)
