"""gcl.eval.compare: the interval covers the true difference at its nominal rate, the p-value is uniform under
the null and small under a real difference (simulations, fixed seeds), and the CLI pairs two evaluations'
TREC files (delta checked against pytrec_eval on the same files). TREC file round trips are checked here too."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import pytrec_eval

from gcl.eval import compare as C
from gcl.eval import trec

S, N = 800, 100  # simulated studies, queries per study


def simulate(delta: float, seed: int, exchangeable: bool = False) -> np.ndarray:
    """[S, N] per-query differences B - A of a metric: each query has its own difficulty (cancels in the
    pairing). By default the improvement is skewed (most queries change little, a few gain a lot), like real
    runs; ``exchangeable``: A and B get independent draws of the same skewed noise (the randomization test's
    null hypothesis exactly: each d_q is symmetric about delta)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0, 1, (S, N))
    noise_a = 0.1 * (rng.exponential(1.0, (S, N)) - 1.0) if exchangeable else 0.0
    a = difficulty + noise_a + rng.normal(0, 0.05, (S, N))
    gain = rng.exponential(1.0, (S, N)) - 1.0  # mean 0, skewed
    b = difficulty + delta + 0.1 * gain + rng.normal(0, 0.05, (S, N))
    return b - a


def test_bootstrap_interval_covers_the_true_difference_at_the_nominal_rate():
    delta = 0.03
    d = simulate(delta, seed=1)
    lo, hi = C.bootstrap_ci(d, n_boot=1000, alpha=0.05, rng=np.random.default_rng(2))
    coverage = float(((lo <= delta) & (delta <= hi)).mean())
    # 800 studies: the estimate's sd is 0.008 at 0.95. An interval 1.4x too wide covers ~0.99, one 0.7x too
    # narrow ~0.82, an unpaired one (difficulty not cancelled) ~1.0: all outside.
    assert 0.925 <= coverage <= 0.975, coverage
    width = float(np.median(hi - lo))
    se = float(np.median(d.std(axis=1, ddof=1))) / np.sqrt(N)
    assert 3.3 * se < width < 4.6 * se, (width, se)  # ~2 x 1.96 standard errors


def test_randomization_p_is_uniform_under_the_null_and_small_under_a_difference():
    p0 = C.randomization_p(simulate(0.0, seed=3, exchangeable=True), n_perm=999, rng=np.random.default_rng(4))
    ks = float(np.max(np.abs(np.sort(p0) - np.arange(1, S + 1) / S)))
    assert ks < 1.95 / np.sqrt(S), ks  # Kolmogorov-Smirnov at level 0.001 (p-values on a 1/1000 grid)
    assert 0.027 <= float((p0 <= 0.05).mean()) <= 0.075  # the test's size at 5% (sd 0.008)
    assert p0.min() >= 1 / 1000  # (1 + count) / (1 + n_perm): never 0
    p1 = C.randomization_p(simulate(0.08, seed=5, exchangeable=True), n_perm=999, rng=np.random.default_rng(6))
    assert float((p1 <= 0.05).mean()) > 0.9  # power: a data-blind p-value would fail here


def test_paired_stats_edge_cases():
    same = C.paired_stats([0.5, 0.2, 1.0], [0.5, 0.2, 1.0], n_boot=200, n_perm=200)
    assert same.delta == 0 and same.ci_low == same.ci_high == 0 and same.p_value == 1.0
    with pytest.raises(ValueError, match="no queries"):
        C.paired_stats([], [], n_boot=200, n_perm=200)
    with pytest.raises(ValueError, match="equal length"):
        C.paired_stats([1.0], [1.0, 2.0])


# ------------------------------------------------------------------------------------------- TREC files

def test_trec_files_round_trip_and_pytrec_eval_reads_the_same_ranking(tmp_path):
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(30)] + ["with space", "tab\there", "50%", "ünï"]
    qrels = {f"q{i}": {d: rng.choice([0, 1, 2]) for d in rng.sample(docs, 5)} for i in range(6)}
    run = {q: {d: rng.choice([0.5, 0.25, rng.random()]) for d in rng.sample(docs, 12)} for q in qrels}
    trec.write_run(tmp_path / "x.run", run)
    trec.write_qrels(tmp_path / "x.qrels", qrels)
    trec.write_queries(tmp_path / "x.tsv", {q: f"text\twith {q}\nline \\ end" for q in qrels})
    assert trec.read_run(tmp_path / "x.run") == run
    assert trec.read_qrels(tmp_path / "x.qrels") == qrels
    assert trec.read_queries(tmp_path / "x.tsv") == {q: f"text\twith {q}\nline \\ end" for q in qrels}
    lines = (tmp_path / "x.run").read_text().splitlines()
    assert all(len(line.split()) == 6 for line in lines) and "with%20space" in (tmp_path / "x.run").read_text()
    # pytrec_eval's own parsers on the written files give the same per-query values as on the dicts
    with open(tmp_path / "x.qrels") as fq, open(tmp_path / "x.run") as fr:
        q2, r2 = pytrec_eval.parse_qrel(fq), pytrec_eval.parse_run(fr)
    ev = pytrec_eval.RelevanceEvaluator(q2, {"ndcg_cut.5", "recip_rank"}).evaluate(r2)
    enc = {trec.encode_id(q): {trec.encode_id(d): g for d, g in j.items()} for q, j in qrels.items()}
    ref = pytrec_eval.RelevanceEvaluator(enc, {"ndcg_cut.5", "recip_rank"}).evaluate(
        {q: {trec.encode_id(d): s for d, s in r.items()} for q, r in run.items()})
    assert ev == ref
    # ranks follow trec_eval's order (score desc, docid desc)
    first = [line.split() for line in lines if line.startswith("q0 ")]
    assert [int(f[3]) for f in first] == list(range(1, len(first) + 1))


def test_trec_readers_name_the_bad_line(tmp_path):
    (tmp_path / "bad.run").write_text("q0 Q0 d1 1 0.5 tag\nq0 Q0 d2 2\n")
    with pytest.raises(ValueError, match="bad.run:2"):
        trec.read_run(tmp_path / "bad.run")
    (tmp_path / "dup.qrels").write_text("q 0 d 1\nq 0 d 2\n")
    with pytest.raises(ValueError, match="judged twice"):
        trec.read_qrels(tmp_path / "dup.qrels")


# ------------------------------------------------------------------------------------------- the CLI

def _fake_eval(base, qrels, run, metrics, task="shop/text2image", extra_task=True):
    """The files an evaluation writes: tasks/<task>.json naming runs/<task>.{run,qrels,queries.tsv}."""
    safe = task.replace("/", "-")
    trec.write_run(base / "runs" / f"{safe}.run", run)
    trec.write_qrels(base / "runs" / f"{safe}.qrels", qrels)
    trec.write_queries(base / "runs" / f"{safe}.queries.tsv", {q: f"query {q}" for q in qrels})
    (base / "tasks").mkdir(parents=True, exist_ok=True)
    (base / "tasks" / f"{safe}.json").write_text(json.dumps({
        "task": task, "metrics": {m: 0.0 for m in metrics},
        "files": {"run": f"runs/{safe}.run", "qrels": f"runs/{safe}.qrels", "queries": f"runs/{safe}.queries.tsv"}}))
    if extra_task:
        (base / "tasks" / "zs.json").write_text(json.dumps({"task": "zeroshot_color", "metrics": {"accuracy": 0.5}}))
    (base / "metrics.json").write_text("{}")


def test_cli_pairs_two_evaluations(tmp_path, capsys):
    rng = random.Random(1)
    docs = [f"p{i}" for i in range(40)]
    qrels = {f"q{i}": {rng.choice(docs): 1} for i in range(60)}
    good = {q: {d: 1.0 if d in qrels[q] and rng.random() < 0.7 else rng.random() * 0.9 for d in docs[:20] + list(qrels[q])}
            for q in qrels}
    base = {q: {d: rng.random() for d in docs[:20] + list(qrels[q])} for q in qrels}
    metrics = ["mrr@10", "ndcg@10"]
    _fake_eval(tmp_path / "A", qrels, base, metrics)
    _fake_eval(tmp_path / "B" / "eval" / "step_000010", qrels, base, metrics)
    _fake_eval(tmp_path / "B" / "eval" / "step_000200", qrels, good, metrics)  # the latest is taken
    rc = C.main([str(tmp_path / "A"), str(tmp_path / "B"), "--n-boot", "500", "--n-perm", "500",
                 "--json", str(tmp_path / "cmp.json"), "--md", str(tmp_path / "cmp.md")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| shop/text2image | mrr@10 | 60 |" in out and "zeroshot_color" in out
    res = {r["metric"]: r for r in json.loads((tmp_path / "cmp.json").read_text())["results"]}
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"})
    want = np.mean([v["ndcg_cut_10"] for v in ev.evaluate(good).values()]) - np.mean(
        [v["ndcg_cut_10"] for v in ev.evaluate(base).values()])
    assert res["ndcg@10"]["delta"] == pytest.approx(want, abs=1e-12)
    assert res["mrr@10"]["delta"] > 0.2 and res["mrr@10"]["p_value"] < 0.01
    assert res["mrr@10"]["ci_low"] < res["mrr@10"]["delta"] < res["mrr@10"]["ci_high"]
    assert (tmp_path / "cmp.md").read_text() == out
    # two "seeds" per side: per-query values are averaged before pairing; A vs A,A is a zero delta
    rows, _ = C.compare([tmp_path / "A"], [tmp_path / "A", tmp_path / "A"], n_boot=200, n_perm=200)
    assert all(r.delta == 0 and r.p_value == 1.0 for r in rows)


def test_cli_refuses_different_queries(tmp_path):
    qrels = {"q0": {"a": 1}, "q1": {"b": 1}}
    run = {"q0": {"a": 1.0, "b": 0.5}, "q1": {"a": 1.0, "b": 0.5}}
    _fake_eval(tmp_path / "A", qrels, run, ["mrr@10"])
    _fake_eval(tmp_path / "B", {"q0": {"a": 1}, "q1": {"a": 1}}, run, ["mrr@10"])
    with pytest.raises(ValueError, match="judge different queries.*q1"):
        C.compare([tmp_path / "A"], [tmp_path / "B"], n_boot=200, n_perm=200)
    assert C.main([str(tmp_path / "A"), str(tmp_path / "nowhere"), "--n-boot", "200", "--n-perm", "200"]) == 2
