"""A task's queries and their relevance judgements (qrels), by the task's relevance rule and sampling rule.

``build_queries(task, docs, seed, relevance_input)`` -> ``Queries`` (ids, texts, pytrec_eval-style qrels
``{qid: {doc id: grade}}``). The rules (``relevance.rule``):

* ``item_id`` / ``field``: queries come from the documents' rows (one per row, or one per unique value with
  ``unique_queries``); relevant are the documents sharing the row's item id, or holding the same value.
* ``graded``: (query, document, grade) rows of a table (the GS-10M CSV layout), see ``graded_queries``.
* ``fixed``: a fixed list of queries and judgements from a file (``load_fixed_queries``).

Document ids in qrels are the ids of the *retrieval units*: the documents' ids (``DocSet.ids``), or their item
ids when a task scores an item by several rows (``multi_image: max|min``). Runs use the same ids, so
trec_eval's tie rule (docid descending) applies to the real ids.

Sampling (``num_queries`` > 0 draws that many, without replacement, from the sorted candidate keys):
``uniform`` (a numpy Generator seeded by (eval.seed, task name)), ``marqo`` (``numpy.random.RandomState(seed)
.choice`` over Marqo's query keys - each query field's text followed by ``_{!@#~}_``, sorted as pandas'
``groupby`` sorts them - which is what ``DataFrame.sample(n, random_state=seed)`` in GCL's evals draws),
``all``. ``query_weighting: grade`` draws with probability proportional to the query's summed grade.

What does not live here: reading documents (``gcl.eval.tasks``), embedding, scoring, the runner.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gcl.data.schema import stable_hash
from gcl.eval.tasks import IMAGE, DocSet, EvalConfigError, to_text

log = logging.getLogger(__name__)

__all__ = ["Queries", "FixedQueries", "build_queries", "graded_queries", "scale_grades", "load_fixed_queries",
           "marqo_key", "marqo_order", "unit_ids"]

MARQO_KEY_SUFFIX = "_{!@#~}_"  # GCL's evals build a query's key as sum over left keys of (value + this)


@dataclass
class Queries:
    """Q queries of one task.

    ``texts[f]``: Q strings (or None) per text query field, as the query is (``embedded(f)`` applies the task's
    ``query_template``); ``doc_rows``: for per-document queries the document each query was drawn from (used
    for image query fields), else None. ``qrels``: ``{qid: {doc id: grade}}``; every query judges at least one
    document (possibly one absent from the corpus, with ``missing_docs: keep``).
    """

    ids: list[str]
    texts: dict[str, list[str | None]]
    qrels: dict[str, dict[str, int]]
    doc_rows: list[int] | None = None
    template: str = "{}"

    def __len__(self) -> int:
        return len(self.ids)

    def embedded(self, f: str) -> list[str | None]:
        """The texts of field ``f`` as they are embedded: ``template`` with ``{}`` <- the query."""
        if self.template == "{}":
            return list(self.texts[f])
        return [None if t is None else self.template.replace("{}", t) for t in self.texts[f]]


@dataclass
class FixedQueries:
    """A fixed query set: ``keys`` (file order), ``texts[key]`` and ``qrels[key] = {doc id: grade}``."""

    keys: list[str]
    texts: dict[str, str]
    qrels: dict[str, dict[str, int]]
    source: str


# ------------------------------------------------------------------------------------------- small rules

def unit_ids(task: Any, docs: DocSet) -> list[str]:
    """The id of each document's retrieval unit: the document, or its item when rows are collapsed."""
    return list(docs.item_ids) if task.multi_image != "first" else list(docs.ids)


def normalize(text: str | None, rule: str) -> str | None:
    """A query text under ``query_whitespace``: ``none`` as given; ``strip`` (empty -> missing); ``collapse``
    (strip, and every run of whitespace -> one space)."""
    if text is None or rule == "none":
        return text
    out = " ".join(text.split()) if rule == "collapse" else text.strip()
    return out or None


def marqo_key(values: Sequence[str | None]) -> str | None:
    """GCL's query key: each query field's text + ``_{!@#~}_``, concatenated; None if any is missing (pandas'
    NaN propagates through the string sum, and ``groupby`` drops NaN keys)."""
    if any(v is None for v in values):
        return None
    return "".join(f"{v}{MARQO_KEY_SUFFIX}" for v in values)


def marqo_order(grades: np.ndarray) -> np.ndarray:
    """The row order of pandas' default ``sort_values(ascending=False)`` (numpy quicksort on the reversed
    values, reversed back, as ``pandas.core.sorting.nargsort`` does). Equal grades end up in the order numpy's
    quicksort leaves them, which depends on numpy's version and CPU, exactly as in Marqo's own run."""
    g = np.asarray(grades)
    if g.dtype.kind == "f" and np.all(g == np.round(g)):
        g = g.astype(np.int64)  # Marqo's grades are int64 (astype(int) / a constant 1 column)
    idx = np.arange(g.size)[::-1]
    return idx[g[::-1].argsort(kind="quicksort")][::-1]


def cap_rows(rows: Sequence[int], grades: Sequence[float], cap: int, order: str) -> list[int]:
    """The first ``cap`` of ``rows`` (table order) by grade descending; ``cap`` <= 0 keeps all (table order)."""
    if cap <= 0 or len(rows) <= cap:
        return list(rows)  # every row is kept: the order does not matter (grades are merged per document)
    g = np.asarray(grades, dtype=np.float64)
    pos = marqo_order(g) if order == "marqo" else np.argsort(-g, kind="stable")
    return [rows[i] for i in pos[:cap]]


def keep_grade(cur: int | None, new: int, rule: str) -> int:
    """The grade kept for a (query, document) pair judged again: ``max`` or ``min`` (Marqo's dict keeps the
    last row of the grade-descending order, i.e. the lowest)."""
    if cur is None:
        return new
    return max(cur, new) if rule == "max" else min(cur, new)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, stable_hash(name)])


def sample(n: int, task: Any, seed: int, weights: np.ndarray | None = None) -> list[int]:
    """Indices (sorted) of the candidates drawn by the task's sampling rule; candidates are already sorted."""
    k = int(task.num_queries)
    if task.query_sampling == "all" or k <= 0 or k >= n:
        return list(range(n))
    p = None
    if task.query_weighting == "grade" and weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.sum() <= 0:
            raise EvalConfigError(f"task {task.name!r}: query_weighting=grade but the queries' grades sum to 0")
        p = w / w.sum()
    if task.query_sampling == "marqo":
        # pandas DataFrame.sample(n=k, weights=w, random_state=seed) -> RandomState(seed).choice(n, k, False, p)
        picked = np.random.RandomState(seed).choice(n, size=k, replace=False, p=p)
    else:
        picked = _rng(seed, task.name).choice(n, size=k, replace=False, p=p)
    return sorted(int(i) for i in picked)


# ------------------------------------------------------------------------------------------- row views

class _Rows:
    """The rows queries are drawn from (``docs.rows_meta`` when the table was de-duplicated, else the documents)
    with the task's whitespace rule applied, and the retrieval unit of each row."""

    def __init__(self, task: Any, docs: DocSet) -> None:
        self.meta = docs.rows_meta if docs.rows_meta is not None else docs.meta
        self.row_doc = docs.row_doc if docs.row_doc is not None else list(range(len(docs)))
        self.raw = docs.raw_rows or {}
        self.rule = task.query_whitespace
        self.units = unit_ids(task, docs)
        self._cache: dict[str, list[str | None]] = {}

    def __len__(self) -> int:
        return len(self.row_doc)

    def text(self, f: str) -> list[str | None]:
        """Per row: field ``f`` under the whitespace rule (``none``: the stored text, where the table had one)."""
        if f not in self._cache:
            if f not in self.meta:
                raise KeyError(f)
            vals = list(self.meta[f])
            if self.rule == "none":
                for r, v in self.raw.get(f, {}).items():
                    vals[int(r)] = v
            else:
                vals = [normalize(v, self.rule) for v in vals]
            self._cache[f] = vals
        return self._cache[f]

    def unit(self, r: int) -> str:
        return self.units[self.row_doc[r]]


def _judge(task: Any, rows: _Rows, cand: Sequence[int]) -> dict[str, int]:
    """Binary qrels from candidate relevant rows (table order): the cap, then one grade per unit."""
    r = task.relevance
    kept = cap_rows(cand, [1.0] * len(cand), int(r.max_relevant), r.cap_order)
    out: dict[str, int] = {}
    for row in kept:
        out[rows.unit(row)] = 1
    return out


# ------------------------------------------------------------------------------------------- the rules

def build_queries(task: Any, docs: DocSet, seed: int, relevance_input: Any = None) -> Queries:
    """The task's queries and qrels over ``docs`` (see the module docstring); sampling seeded by ``seed``.

    ``relevance_input``: the (query, document, grade) DataFrame for ``graded`` tasks, the ``FixedQueries`` for
    ``fixed`` ones, None otherwise. Per-row queries (default): each sampled row with a query field value is a
    query; relevant are the documents with the row's item id (``item_id``) or with a row whose
    ``relevance.field`` equals the row's (``field``). ``unique_queries``: each unique value (tuple) of the
    query text fields is one query; relevant are the documents with a row whose ``relevance.field`` equals
    it (``field``; defaults to the query field), or that share an item id with such a row (``item_id``).
    """
    rule = task.relevance.rule
    if rule in ("graded", "fixed"):
        want = "the (query, doc, grade) table" if rule == "graded" else "the FixedQueries of relevance.qrels_file"
        if relevance_input is None:
            raise EvalConfigError(f"task {task.name!r}: {rule} relevance needs {want}")
        if rule == "graded":
            return graded_queries(task, docs, relevance_input, seed)
        return fixed_queries(task, docs, relevance_input, seed)
    rows = _Rows(task, docs)
    qfields = [f for f in task.query.fields if f != IMAGE]
    rel_field = task.relevance.field or (qfields[0] if len(qfields) == 1 else None)
    for f in qfields + ([rel_field] if rule == "field" and rel_field else []):
        if f not in rows.meta:
            raise EvalConfigError(f"task {task.name!r}: documents have no field {f!r}")
    related = _related_rows(task, docs, rows, rel_field)
    if task.unique_queries:
        return _unique_queries(task, rows, qfields, rel_field, related, seed)
    return _row_queries(task, docs, rows, qfields, related, seed)


def _related_rows(task: Any, docs: DocSet, rows: _Rows, rel_field: str | None) -> Any:
    """row -> the rows (ascending) relevant to a query drawn from it: same item (``item_id``) or the same
    ``relevance.field`` value under the whitespace rule (``field``)."""
    groups: dict[Any, list[int]] = defaultdict(list)
    if task.relevance.rule == "field":
        vals = rows.text(rel_field)
        for r, v in enumerate(vals):
            if v is not None:
                groups[v].append(r)
        return lambda r: groups.get(vals[r], []) if vals[r] is not None else []
    items = docs.item_ids
    for r in range(len(rows)):
        groups[items[rows.row_doc[r]]].append(r)
    return lambda r: groups[items[rows.row_doc[r]]]


def _query_tuple(rows: _Rows, fields: Sequence[str], r: int, marqo: bool) -> tuple | None:
    vals = tuple(rows.text(f)[r] for f in fields)
    if marqo:
        return None if any(v is None for v in vals) else vals  # Marqo drops a key with any NaN part
    return None if all(v is None for v in vals) else vals


def _unique_queries(task: Any, rows: _Rows, qfields: list[str], rel_field: str | None, related: Any,
                    seed: int) -> Queries:
    marqo = task.query_sampling == "marqo"
    groups: dict[tuple, list[int]] = defaultdict(list)
    for r in range(len(rows)):
        v = _query_tuple(rows, qfields, r, marqo)
        if v is not None:
            groups[v].append(r)
    if marqo:
        values = sorted(groups, key=marqo_key)
    else:
        values = sorted(groups, key=lambda t: tuple("" if x is None else x for x in t))
    weights = np.array([len(groups[v]) for v in values], dtype=np.float64)  # every row has grade 1
    ids: list[str] = []
    texts: dict[str, list[str | None]] = {f: [] for f in qfields}
    qrels: dict[str, dict[str, int]] = {}
    chosen = sample(len(values), task, seed, weights)
    for j in chosen:
        v = values[j]
        cand = sorted({x for r in groups[v] for x in related(r)})
        judged = _judge(task, rows, cand)
        if not judged:
            continue
        qid = f"q{len(ids)}"
        ids.append(qid)
        for f, x in zip(qfields, v):
            texts[f].append(x)
        qrels[qid] = judged
    return _done(task, ids, texts, qrels, None, len(chosen))


def _row_queries(task: Any, docs: DocSet, rows: _Rows, qfields: list[str], related: Any, seed: int) -> Queries:
    has_img = docs.present.get(IMAGE) if IMAGE in task.query.fields else None
    cand = [r for r in range(len(rows))
            if (qfields and _query_tuple(rows, qfields, r, False) is not None)
            or (has_img is not None and bool(has_img[rows.row_doc[r]]))]
    ids: list[str] = []
    texts: dict[str, list[str | None]] = {f: [] for f in qfields}
    qrels: dict[str, dict[str, int]] = {}
    doc_rows: list[int] = []
    chosen = sample(len(cand), task, seed)
    for j in chosen:
        r = cand[j]
        judged = _judge(task, rows, list(related(r)))
        if not judged:
            continue
        qid = f"q{len(ids)}"
        ids.append(qid)
        doc_rows.append(rows.row_doc[r])
        for f in qfields:
            texts[f].append(rows.text(f)[r])
        qrels[qid] = judged
    return _done(task, ids, texts, qrels, doc_rows, len(chosen))


def _done(task: Any, ids: list[str], texts: dict, qrels: dict, doc_rows: list[int] | None, drawn: int) -> Queries:
    if drawn > len(ids):
        log.warning("task %s: dropped %d of %d drawn queries without a judged document", task.name,
                    drawn - len(ids), drawn)
    return Queries(ids=ids, texts=texts, qrels=qrels, doc_rows=doc_rows, template=str(task.query_template))


# ------------------------------------------------------------------------------------------- graded

def scale_grades(grades: np.ndarray, scale: str) -> np.ndarray:
    """Raw grades -> integer qrel grades (float array of integers).

    ``none``: rounded. ``gcl``: min-max rescaled to 1..100 over the whole table and truncated, as GCL's
    evaluation does (``int((g - min) / (max - min) * 99 + 1)``; all equal -> 1). ``reciprocal``: a 1-based
    position p -> round(100 / p).
    """
    g = np.asarray(grades, dtype=np.float64)
    if scale == "none":
        return np.round(g)
    if scale == "gcl":
        finite = g[np.isfinite(g)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        if hi <= lo:
            return np.where(np.isfinite(g), 1.0, np.nan)
        return np.floor((g - lo) / (hi - lo) * 99.0 + 1.0)
    if scale == "reciprocal":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(g >= 1, np.round(100.0 / g), np.nan)
    raise EvalConfigError(f"unknown grade_scale {scale!r}; use one of none, gcl, reciprocal")


@dataclass
class _Pairs:
    """The relevance table, one entry per row: query key, query texts, document id, scaled grade."""

    keys: list[Any]
    texts: list[list[str | None]]
    docs: list[str]
    grades: np.ndarray


def pair_columns(task: Any) -> list[str]:
    """The columns a graded task reads from its (query, document, grade) table."""
    cols = dict(task.columns)
    return ([cols.get(f, f) for f in task.query.fields] + [task.doc_id_column]
            + [cols.get(task.relevance.grade_field, task.relevance.grade_field)]
            + ([task.query_id_column] if task.query_id_column else []))


def _read_pairs(task: Any, pairs: Any) -> _Pairs:
    r = task.relevance
    cols = dict(task.columns)
    qcols = [cols.get(f, f) for f in task.query.fields]
    gcol = cols.get(r.grade_field, r.grade_field)
    absent = [c for c in pair_columns(task) if c not in pairs.columns]
    if absent:
        raise EvalConfigError(f"task {task.name!r}: relevance table lacks columns {absent} "
                              f"(has {sorted(map(str, pairs.columns))})")
    grades = scale_grades(np.asarray(pairs[gcol].astype(float)), r.grade_scale)
    raw = [[None if v is None or (isinstance(v, float) and v != v) else str(v) for v in pairs[c].tolist()]
           for c in qcols]
    if task.query_whitespace == "none":
        texts = raw
    else:
        texts = [[normalize(to_text(v), task.query_whitespace) for v in col] for col in raw]
    by_row = [list(t) for t in zip(*texts)]
    if task.query_id_column:
        keys: list[Any] = [None if all(t is None for t in ts) else k
                           for k, ts in zip(pairs[task.query_id_column].tolist(), by_row)]
    elif task.query_sampling == "marqo":
        keys = [marqo_key(ts) for ts in by_row]
    else:
        keys = [None if all(t is None for t in ts) else "\x1f".join(t or "" for t in ts) for ts in by_row]
    return _Pairs(keys, by_row, [str(d) for d in pairs[task.doc_id_column].tolist()], grades)


def _sort_keys(keys: Sequence[Any]) -> list[Any]:
    """Sorted query keys: native order (pandas groupby), strings when the types do not compare."""
    try:
        return sorted(keys)
    except TypeError:
        return sorted(keys, key=str)


def graded_queries(task: Any, docs: DocSet, pairs: Any, seed: int) -> Queries:
    """Queries and graded qrels from a (query, document id, grade) table (the GS-10M CSV layout).

    ``pairs`` is a DataFrame with the query text columns (``columns`` mapping applies), the document id
    column ``doc_id_column`` and the grade column of ``relevance.grade_field``. Grades are scaled by
    ``relevance.grade_scale``; rows below ``relevance.min_grade`` are dropped. A query is identified by
    ``query_id_column`` when set, else by its text(s). Per query, in table order: at most
    ``relevance.max_relevant`` rows by grade descending (``cap_order``), one grade per document
    (``duplicate_grade``), documents absent from the corpus dropped or kept (``missing_docs``, counted).
    Candidates: every query with a judged document in the corpus; with ``query_sampling: marqo``, every query
    of the table (Marqo's pool), and a drawn query left without judgements is dropped (counted).
    ``query_weighting: grade`` weights a query by the summed grade of all its rows (GCL's ``groupby().sum()``).
    """
    r = task.relevance
    p = _read_pairs(task, pairs)
    rows_of: dict[Any, list[int]] = defaultdict(list)
    for j, k in enumerate(p.keys):
        if k is not None:
            rows_of[k].append(j)
    in_corpus = set(unit_ids(task, docs))
    qrels_of: dict[Any, dict[str, int]] = {}
    counts = {"missing": 0, "low": 0}
    for k, rws in rows_of.items():
        ok = [j for j in rws if np.isfinite(p.grades[j]) and p.grades[j] >= r.min_grade]
        counts["low"] += len(rws) - len(ok)
        judged: dict[str, int] = {}
        for j in cap_rows(ok, p.grades[ok], int(r.max_relevant), r.cap_order):
            if p.docs[j] not in in_corpus:
                counts["missing"] += 1
                if r.missing_docs == "drop":
                    continue
            judged[p.docs[j]] = keep_grade(judged.get(p.docs[j]), int(p.grades[j]), r.duplicate_grade)
        qrels_of[k] = judged
    if counts["missing"]:
        log.warning("task %s: %d relevance rows name documents missing from the corpus (%s)", task.name,
                    counts["missing"], "kept as unretrievable" if r.missing_docs == "keep" else "dropped")
    if counts["low"]:
        log.info("task %s: %d relevance rows below min_grade=%s dropped", task.name, counts["low"], r.min_grade)
    pool = _sort_keys(rows_of if task.query_sampling == "marqo" else
                      [k for k, j in qrels_of.items() if any(d in in_corpus for d in j)])
    weights = np.array([np.nansum(p.grades[rows_of[k]]) for k in pool])
    ids, texts, qrels = [], {f: [] for f in task.query.fields}, {}
    chosen = sample(len(pool), task, seed, weights)
    for j in chosen:
        k = pool[j]
        if not qrels_of[k]:
            continue
        qid = f"q{len(ids)}"
        ids.append(qid)
        for f, t in zip(task.query.fields, p.texts[rows_of[k][0]]):
            texts[f].append(t)
        qrels[qid] = qrels_of[k]
    return _done(task, ids, texts, qrels, None, len(chosen))


# ------------------------------------------------------------------------------------------- fixed

def load_fixed_queries(qrels_path: str | Path, queries_path: str | Path | None = None) -> FixedQueries:
    """A fixed query set from a JSON ``{query text: {doc id: grade}}`` (Marqo-FashionCLIP ``gt_query_doc``,
    GCL ``gt_results.json``) or TREC qrels + a ``qid<TAB>text`` queries file."""
    from gcl.eval import trec

    qrels_path = Path(qrels_path)
    if qrels_path.suffix.lower() == ".json":
        data = json.loads(qrels_path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise EvalConfigError(f"{qrels_path}: expected a JSON object {{query text: {{doc id: grade}}}}")
        qrels = {str(q): {str(d): int(g) for d, g in j.items()} for q, j in data.items()}
        return FixedQueries(list(qrels), {q: q for q in qrels}, qrels, str(qrels_path))
    if queries_path is None:
        raise EvalConfigError(f"{qrels_path}: TREC qrels hold query ids, not texts; set relevance.queries_file to "
                              "a qid<TAB>text file (every evaluation writes one as runs/<task>.queries.tsv)")
    qrels = trec.read_qrels(qrels_path)
    texts = trec.read_queries(queries_path)
    missing = [q for q in qrels if q not in texts]
    if missing:
        raise EvalConfigError(f"{queries_path}: no text for {len(missing)} judged queries of {qrels_path} "
                              f"(first: {missing[0]!r})")
    return FixedQueries(list(qrels), {q: texts[q] for q in qrels}, qrels, str(qrels_path))


def fixed_queries(task: Any, docs: DocSet, fixed: FixedQueries, seed: int) -> Queries:
    """Queries from a fixed set; judged documents absent from the corpus are dropped or kept (``missing_docs``),
    and counted; a query left without judgements is dropped (counted)."""
    f = next(x for x in task.query.fields if x != IMAGE)
    in_corpus = set(unit_ids(task, docs))
    keys = _sort_keys(fixed.keys) if task.query_sampling == "marqo" else list(fixed.keys)
    weights = np.array([sum(max(g, 0) for g in fixed.qrels[k].values()) for k in keys], dtype=np.float64)
    chosen = sample(len(keys), task, seed, weights)
    ids: list[str] = []
    texts: list[str | None] = []
    qrels: dict[str, dict[str, int]] = {}
    missing = 0
    for j in chosen:
        k = keys[j]
        judged = {}
        for d, g in fixed.qrels[k].items():
            if d not in in_corpus:
                missing += 1
                if task.relevance.missing_docs == "drop":
                    continue
            judged[d] = g
        text = normalize(fixed.texts[k], task.query_whitespace)
        if not judged or text is None:
            continue
        qid = f"q{len(ids)}"
        ids.append(qid)
        texts.append(text)
        qrels[qid] = judged
    if missing:
        log.warning("task %s: %d judgements of %s name documents missing from the corpus (%s)", task.name, missing,
                    fixed.source, "kept as unretrievable" if task.relevance.missing_docs == "keep" else "dropped")
    return _done(task, ids, {f: texts}, qrels, None, len(chosen))

