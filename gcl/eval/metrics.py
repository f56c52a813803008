"""Ranking metrics with pytrec_eval / trec_eval semantics, vectorised over queries.

Two entry points share one implementation:

* ``compute(qrels, run, metrics)`` / ``compute_per_query(...)`` take pytrec_eval's dict format
  (``qrels = {qid: {docid: grade}}``, ``run = {qid: {docid: score}}``), order each query's run the way trec_eval
  does, and build the arrays below.
* ``compute_from_ranking(ranked_gains, ideal_gains, metrics)`` is the hot path for an evaluator that already
  holds (Q x K) top-k document indices: no dicts, no per-query Python loop (see ``lookup_gains``).

Metric names (``k`` a positive integer cut-off, ``p`` a persistence in (0, 1)):

=================  ==========================================================  ========================
name               definition (per query; ``rel`` = grade >= relevance_level)  trec_eval equivalent
=================  ==========================================================  ========================
``precision@k``    #rel in the top k / k (k even when fewer were retrieved)     ``P_k``
``recall@k``       #rel in the top k / #rel judged (0 when none)                ``recall_k``
``mrr`` ``mrr@k``  1 / rank of the first rel document (within the top k), or 0  ``recip_rank`` (uncut)
``map`` ``map@k``  sum of precision@rank over rel ranks (<= k) / #rel judged    ``map``, ``map_cut_k``
``ndcg`` ``ndcg@k``  DCG / ideal DCG, linear gain ``max(grade, 0)``,           ``ndcg``, ``ndcg_cut_k``
                   discount ``log2(rank + 1)``; the ideal ranks *all* judged
                   documents by grade (cut at k for ``ndcg@k``); 0 when the
                   ideal is 0
``accuracy@k``     1 if a rel document is in the top k, else 0 (BEIR's         ``success_k``
                   top-k accuracy)
``hole@k``         #retrieved documents in the top k that no query judges      (BEIR's ``Hole@k``)
                   (any grade, any query of the qrels) / k
``err`` ``err@k``  sum_r R_r / r * prod_{i<r} (1 - R_i) with                   (GCL's ``calculate_err``)
                   ``R = (2**g - 1) / 2**g_max``, ``g = max(grade, 0)``,
                   ``g_max`` the query's largest judged grade; 0 when g_max <= 0
``rbp@p``          (1 - p) * sum_r p**(r-1) * g_r / g_max (graded; with 0/1     (GCL's ``calculate_rbp``)
                   grades it is binary RBP); over all retrieved documents;
                   0 when g_max <= 0
=================  ==========================================================  ========================

Conventions, matched to pytrec_eval 0.5 (trec_eval 9) and checked against it in the tests:

* **Order**: a query's run is sorted by score descending, ties by docid *descending* (byte-wise string
  order), exactly as trec_eval does; all retrieved documents count (no 1000-document truncation). BEIR's
  MRR/accuracy/hole and GCL's ERR/RBP sort with Python's stable sort instead (ties stay in the run's insertion
  order); here every metric uses the one trec_eval order, so all metrics of a query see the same ranking.
* **Which queries are averaged**: pytrec_eval evaluates the queries that are in the run *and* have a
  non-empty judgement dict; a query whose judgements are all 0 is evaluated (and scores 0); a run entry
  ``{}`` scores 0; queries in only one of the two dicts are ignored. ``compute`` returns the plain mean of the
  per-query values over that set (what BEIR and GCL report), 0.0 for every metric when the set is empty.
  ``complete=True`` instead averages over every query with judgements, queries missing from the run counting
  0 (trec_eval ``-c``; GCL's ERR/RBP averaging).
* Unjudged retrieved documents have grade 0; negative grades are judged non-relevant with zero gain.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "compute",
    "compute_per_query",
    "compute_from_ranking",
    "compute_from_ranking_per_query",
    "lookup_gains",
    "parse_metric",
    "trec_order",
    "Metric",
]

_CUT = re.compile(r"^(recall|precision|mrr|map|ndcg|err|accuracy|hole)@(\d+)$")
_UNCUT = ("mrr", "map", "ndcg", "err")
_RBP = re.compile(r"^rbp@(\d*\.?\d+(?:[eE]-?\d+)?)$")
_TREC_KINDS = ("precision", "recall", "mrr", "map", "ndcg", "accuracy")  # computed from the sparse hit list


@dataclass(frozen=True)
class Metric:
    """A parsed metric name: ``kind`` in recall|precision|mrr|map|ndcg|accuracy|hole|err|rbp, ``k`` a cut-off
    or None (uncut), ``p`` RBP's persistence (``rbp`` only)."""

    name: str
    kind: str
    k: int | None = None
    p: float | None = None


def parse_metric(name: str) -> Metric:
    """Parse ``recall@10`` / ``ndcg`` / ``rbp@0.8`` ...; raise ValueError naming the accepted forms."""
    m = _CUT.match(name)
    if m:
        k = int(m.group(2))
        if k < 1:
            raise ValueError(f"metric {name!r}: the cut-off must be >= 1")
        return Metric(name, m.group(1), k=k)
    if name in _UNCUT:
        return Metric(name, name)
    m = _RBP.match(name)
    if m:
        p = float(m.group(1))
        if not 0.0 < p < 1.0:
            raise ValueError(f"metric {name!r}: RBP's persistence p must be in (0, 1), e.g. rbp@0.8")
        return Metric(name, "rbp", p=p)
    raise ValueError(
        f"unknown metric {name!r}: use recall@k, precision@k, mrr, mrr@k, map, map@k, ndcg, ndcg@k, accuracy@k, "
        f"hole@k, err, err@k or rbp@p (k a positive integer, 0 < p < 1), e.g. ['ndcg@10', 'map@1000', 'rbp@0.8']"
    )


def _as_f64(x: np.ndarray | torch.Tensor | Sequence, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D [queries, positions], got shape {a.shape}")
    return a


def _np(x: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@dataclass
class _Ranking:
    """The validated inputs of one evaluation: gains [Q, K], the descending ideal gains [Q, J], #relevant [Q],
    each query's largest judged grade [Q] and the unjudged-document mask [Q, K] (hole@k only)."""

    g: np.ndarray
    ideal: np.ndarray
    nrel: np.ndarray
    gmax: np.ndarray
    unjudged: np.ndarray | None

    @property
    def nq(self) -> int:
        return self.g.shape[0]

    @property
    def kk(self) -> int:
        return self.g.shape[1]

    def cut(self, k: int | None) -> int:
        return self.kk if k is None else min(k, self.kk)


def _ranking(ranked_gains: np.ndarray | torch.Tensor, ideal_gains: np.ndarray | torch.Tensor,
             n_rel: np.ndarray | torch.Tensor | None, relevance_level: int,
             unjudged: np.ndarray | torch.Tensor | None) -> _Ranking:
    if relevance_level < 1:
        raise ValueError(f"relevance_level={relevance_level}: must be >= 1 (unjudged documents have grade 0)")
    g = _as_f64(ranked_gains, "ranked_gains")
    judged = _as_f64(ideal_gains, "ideal_gains")
    nq = g.shape[0]
    if judged.shape[0] != nq:
        raise ValueError(f"ideal_gains has {judged.shape[0]} rows but ranked_gains has {nq}")
    ideal = -np.sort(-np.maximum(judged, 0.0), axis=1)  # descending; negative grades carry no gain
    if n_rel is None:
        nrel = (judged >= relevance_level).sum(1).astype(np.float64)
    else:
        nrel = _np(n_rel).astype(np.float64).reshape(-1)
        if nrel.shape[0] != nq:
            raise ValueError(f"n_rel has {nrel.shape[0]} entries but ranked_gains has {nq} rows")
    hole = None
    if unjudged is not None:
        hole = _np(unjudged).astype(bool)
        if hole.shape != g.shape:
            raise ValueError(f"unjudged has shape {hole.shape} but ranked_gains has {g.shape}")
    gmax = ideal[:, 0] if ideal.shape[1] else np.zeros(nq)
    return _Ranking(g, ideal, nrel, gmax, hole)


@dataclass
class _Hits:
    """Sparse view of a ranking: only positive-gain positions matter to the trec_eval metrics, and a run has
    few of them, so those metrics cost one O(Q*K) scan plus O(hits) (the hot path of a big evaluation).

    ``rows``/``cols``/``vals``: every positive gain (row-major: ascending rank within a row); ``rr``/``rc``: the
    relevant ones; ``nth``: 0-based rank of a relevant hit among its row's relevant hits; ``first_col``: each
    row's first relevant rank (int64 max when none)."""

    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    rr: np.ndarray
    rc: np.ndarray
    nth: np.ndarray
    first_col: np.ndarray


def _hits(r: _Ranking, kn: int, relevance_level: int) -> _Hits:
    rows, cols = np.nonzero(r.g[:, :kn] > 0)
    vals = r.g[rows, cols]
    isrel = vals >= relevance_level
    rr, rc = rows[isrel], cols[isrel]
    counts = np.bincount(rr, minlength=r.nq)
    first = np.cumsum(counts) - counts  # index of each row's first hit in rr/rc
    first_col = np.full(r.nq, np.iinfo(np.int64).max)
    has = counts > 0
    first_col[has] = rc[first[has]]
    return _Hits(rows, cols, vals, rr, rc, np.arange(rr.size) - first[rr], first_col)


def _per_row(nq: int, sel: np.ndarray, r: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(r[sel], weights=None if w is None else w[sel], minlength=nq).astype(np.float64)


def _trec_metric(m: Metric, r: _Ranking, h: _Hits) -> np.ndarray:
    """One of the binary / graded trec_eval metrics (and BEIR's accuracy@k) from the sparse hit list."""
    k, nq = r.cut(m.k), r.nq
    safe_nrel = np.where(r.nrel > 0, r.nrel, 1.0)
    if m.kind == "precision":
        return _per_row(nq, h.rc < k, h.rr) / m.k
    if m.kind == "recall":
        return np.where(r.nrel > 0, _per_row(nq, h.rc < k, h.rr) / safe_nrel, 0.0)
    if m.kind == "mrr":
        return np.where(h.first_col < k, 1.0 / (np.minimum(h.first_col, r.kk) + 1.0), 0.0)
    if m.kind == "accuracy":
        return (h.first_col < k).astype(np.float64)
    if m.kind == "map":
        prec = (h.nth + 1.0) / (h.rc + 1.0)  # precision at each relevant rank
        return np.where(r.nrel > 0, _per_row(nq, h.rc < k, h.rr, prec) / safe_nrel, 0.0)
    # ndcg: the ideal ranks every judged document (trec_eval), cut at k for ndcg@k
    dcg = _per_row(nq, h.cols < k, h.rows, h.vals / np.log2(h.cols + 2.0))
    ideal_disc = np.cumsum(r.ideal / np.log2(np.arange(2, r.ideal.shape[1] + 2, dtype=np.float64)), 1)
    j = r.ideal.shape[1] if m.k is None else min(m.k, r.ideal.shape[1])
    idcg = ideal_disc[:, j - 1] if j > 0 else np.zeros(nq)
    return np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)


def _err(r: _Ranking, k: int) -> np.ndarray:
    gain = np.maximum(r.g[:, :k], 0.0)
    gmax = r.gmax[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        # 2**(g - gmax) - 2**(-gmax) == (2**g - 1) / 2**gmax without overflowing for large grades
        r_prob = np.where(gmax > 0, np.exp2(gain - gmax) - np.exp2(-gmax), 0.0)
    reach = np.cumprod(1.0 - r_prob, 1)
    reach = np.concatenate([np.ones((r.nq, 1)), reach[:, :-1]], 1)  # P(the user reaches rank r)
    return (reach * r_prob / np.arange(1, k + 1, dtype=np.float64)).sum(1)


def _rbp(r: _Ranking, p: float) -> np.ndarray:
    w = (1.0 - p) * np.power(p, np.arange(r.kk, dtype=np.float64))
    ok = r.gmax > 0
    return np.where(ok, (np.maximum(r.g, 0.0) * w).sum(1) / np.where(ok, r.gmax, 1.0), 0.0)


def _hole(m: Metric, r: _Ranking) -> np.ndarray:
    if r.unjudged is None:
        raise ValueError(f"metric {m.name!r} needs `unjudged` (which retrieved documents no query judges); "
                         "compute() builds it from the qrels")
    return r.unjudged[:, : r.cut(m.k)].sum(1).astype(np.float64) / m.k


def compute_from_ranking_per_query(
    ranked_gains: np.ndarray | torch.Tensor,
    ideal_gains: np.ndarray | torch.Tensor,
    metrics: Sequence[str],
    n_rel: np.ndarray | torch.Tensor | None = None,
    relevance_level: int = 1,
    unjudged: np.ndarray | torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Per-query metric values from gain matrices (vectorised; no per-query Python).

    Args:
        ranked_gains: [Q, K] the judged grade of each query's retrieved documents in rank order (rank 1
            first); 0 for unjudged documents and for padding when a query retrieved fewer than K (padding
            with 0 changes no metric: precision@k divides by k regardless, as trec_eval does).
        ideal_gains: [Q, J] the grades of each query's judged documents in any order, padded with 0. It may
            be cut to the J largest grades per query if ``n_rel`` is given; uncut ``ndcg`` needs them all
            (trec_eval's ideal ranks every judged document).
        metrics: names (see the module docstring).
        n_rel: [Q] number of judged documents with grade >= relevance_level; default: counted in
            ``ideal_gains``.
        relevance_level: the smallest grade (>= 1) that counts as relevant for the binary metrics
            (pytrec_eval's ``relevance_level``, trec_eval -l).
        unjudged: [Q, K] bool, True where the retrieved document is judged by no query of the qrels (False
            for padding); needed by ``hole@k`` only.
    Returns:
        ``{metric: float64 ndarray[Q]}``.
    """
    parsed = [parse_metric(m) for m in metrics]
    r = _ranking(ranked_gains, ideal_gains, n_rel, relevance_level, unjudged)
    kn = max((r.cut(m.k) for m in parsed if m.kind in _TREC_KINDS), default=0)
    hits = _hits(r, kn, relevance_level)
    out: dict[str, np.ndarray] = {}
    for m in parsed:
        if m.kind in _TREC_KINDS:
            out[m.name] = _trec_metric(m, r, hits)
        elif m.kind == "err":
            out[m.name] = _err(r, r.cut(m.k))
        elif m.kind == "hole":
            out[m.name] = _hole(m, r)
        else:
            out[m.name] = _rbp(r, float(m.p))
    return out


def compute_from_ranking(
    ranked_gains: np.ndarray | torch.Tensor,
    ideal_gains: np.ndarray | torch.Tensor,
    metrics: Sequence[str],
    n_rel: np.ndarray | torch.Tensor | None = None,
    relevance_level: int = 1,
    unjudged: np.ndarray | torch.Tensor | None = None,
) -> dict[str, float]:
    """The mean over the Q rows of ``compute_from_ranking_per_query`` (same arguments); 0.0 when Q == 0."""
    per = compute_from_ranking_per_query(ranked_gains, ideal_gains, metrics, n_rel, relevance_level, unjudged)
    return {m: float(v.mean()) if v.size else 0.0 for m, v in per.items()}


def lookup_gains(
    indices: np.ndarray | torch.Tensor,
    judged_docs: np.ndarray | torch.Tensor,
    judged_grades: np.ndarray | torch.Tensor,
) -> np.ndarray:
    """Grades of retrieved document indices, vectorised (sort + binary search, no per-query Python).

    Args:
        indices: [Q, K] int document indices retrieved per query (e.g. ``topk``'s output); -1 = no document.
        judged_docs: [Q, J] int document indices judged for each query, padded with -1.
        judged_grades: [Q, J] their grades (padding ignored).
    Returns:
        float64 [Q, K]: the grade of each retrieved document for its query, 0 where unjudged.
    """
    def np_(x: np.ndarray | torch.Tensor) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    idx = np_(indices).astype(np.int64)
    jd = np_(judged_docs).astype(np.int64)
    jg = np_(judged_grades).astype(np.float64)
    if idx.ndim != 2 or jd.shape != jg.shape or jd.ndim != 2 or jd.shape[0] != idx.shape[0]:
        raise ValueError(f"lookup_gains: need indices [Q,K], judged_docs/judged_grades [Q,J] with the same Q; "
                         f"got {idx.shape}, {jd.shape}, {jg.shape}")
    out = np.zeros(idx.shape, dtype=np.float64)
    valid = jd >= 0
    if not valid.any() or idx.size == 0:
        return out
    srt = np.sort(jd, axis=1)
    if ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any():
        raise ValueError("lookup_gains: a document is judged twice for the same query in judged_docs")
    if jd.shape[1] <= 16:
        # few judged docs per query (the usual case): J broadcast comparisons beat sorting
        for j in range(jd.shape[1]):
            hit = idx == np.where(valid[:, j], jd[:, j], -2)[:, None]  # -2 never matches (-1 = no document)
            np.copyto(out, np.broadcast_to(jg[:, j: j + 1], out.shape), where=hit)
        return out
    width = int(max(jd.max(), idx.max())) + 2  # row-major composite key (query, doc); doc -1 -> slot 0
    qj = np.nonzero(valid)
    jkeys = qj[0].astype(np.int64) * width + jd[qj] + 1
    order = np.argsort(jkeys, kind="stable")
    jkeys, jvals = jkeys[order], jg[qj][order]
    rkeys = np.arange(idx.shape[0], dtype=np.int64)[:, None] * width + np.where(idx >= 0, idx + 1, 0)
    pos = np.searchsorted(jkeys, rkeys).clip(max=jkeys.size - 1)
    hit = (jkeys[pos] == rkeys) & (idx >= 0)
    out[hit] = jvals[pos[hit]]
    return out


def trec_order(docs: Mapping[str, float]) -> list[tuple[str, float]]:
    """A query's run as (docid, score) pairs in trec_eval's order: score descending, then docid descending
    (strcmp; Python's str order is code-point order, which UTF-8 byte order preserves)."""
    return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def _arrays(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    complete: bool,
    with_unjudged: bool,
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
    """Dicts -> (query ids, ranked grades [Q, K], judged grades [Q, J], unjudged mask [Q, K] or None) in
    trec_eval's order. A document is judged when any query of ``qrels`` judges it (BEIR's hole@k corpus)."""
    qids = [q for q in qrels if len(qrels[q]) > 0 and (complete or q in run)]
    kmax = max((len(run.get(q, ())) for q in qids), default=0)
    jmax = max((len(qrels[q]) for q in qids), default=0)
    ranked = np.zeros((len(qids), kmax))
    ideal = np.zeros((len(qids), jmax))
    unjudged = np.zeros((len(qids), kmax), dtype=bool) if with_unjudged else None
    annotated = {d for judged in qrels.values() for d in judged} if with_unjudged else set()
    for i, q in enumerate(qids):
        judged = qrels[q]
        ideal[i, : len(judged)] = list(judged.values())
        docs = run.get(q)
        if not docs:
            continue
        for s in docs.values():
            if math.isnan(s):
                raise ValueError(f"run[{q!r}] has a NaN score; fix the scores (NaN has no rank)")
        order = trec_order(docs)
        ranked[i, : len(order)] = [judged.get(d, 0) for d, _ in order]
        if unjudged is not None:
            unjudged[i, : len(order)] = [d not in annotated for d, _ in order]
    return qids, ranked, ideal, unjudged


def _needs_unjudged(metrics: Sequence[str]) -> bool:
    return any(parse_metric(m).kind == "hole" for m in metrics)


def compute_per_query(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    relevance_level: int = 1,
    complete: bool = False,
) -> dict[str, dict[str, float]]:
    """Per-query values in pytrec_eval's output shape ``{qid: {metric: value}}``.

    The queries are those pytrec_eval evaluates (in the run and with a non-empty judgement dict), or every
    judged query when ``complete`` (missing ones score 0). See the module docstring for the definitions.
    """
    qids, ranked, ideal, unjudged = _arrays(qrels, run, complete, _needs_unjudged(metrics))
    per = compute_from_ranking_per_query(ranked, ideal, metrics, relevance_level=relevance_level, unjudged=unjudged)
    return {q: {m: float(per[m][i]) for m in per} for i, q in enumerate(qids)}


def compute(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    relevance_level: int = 1,
    complete: bool = False,
) -> dict[str, float]:
    """Mean of each metric over the evaluated queries (see the module docstring), e.g.
    ``compute(qrels, run, ["ndcg@10", "map@1000", "mrr@10", "recall@10", "err", "rbp@0.8"])``.

    Args:
        qrels: ``{qid: {docid: grade}}`` (int grades; >= relevance_level is relevant).
        run: ``{qid: {docid: score}}`` (higher is better; ties broken by docid descending like trec_eval).
        metrics: metric names; the result has exactly these keys.
        relevance_level: the smallest relevant grade for the binary metrics (pytrec_eval's relevance_level).
        complete: average over every judged query (missing from the run = 0), like ``trec_eval -c``.
    """
    qids, ranked, ideal, unjudged = _arrays(qrels, run, complete, _needs_unjudged(metrics))
    return compute_from_ranking(ranked, ideal, metrics, relevance_level=relevance_level, unjudged=unjudged)
