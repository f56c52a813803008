"""Evaluation tasks: validation, document sources, fusion and scoring (queries live in ``gcl.eval.queries``).

The pieces, in the order the runner (``gcl.eval.run``) uses them:

* ``validate_tasks(cfg)`` - fail fast on a bad ``eval`` node, naming the key and the fix.
* ``SourceSpec`` - a hashable document source: tasks with equal specs share one embedding pass.
* ``TableReader`` - document metadata (strings per field) from a Parquet/CSV/JSON table; images are read
  lazily (``TableReader.images``) so big tables never hold all image bytes in memory.
* ``fuse(emb, present, fields, weights)`` - ``normalize(sum_k a_k normalize(f_k))``, missing fields dropped and
  the weights renormalised per row (the loss's side fusion).
* ``score_retrieval(q, d, qrels, ...)`` - exact top-k (``gcl.eval.retrieval.topk``) with trec_eval's tie rule
  (document id descending) at every cut-off, optional fp16 emulation and per-item collapsing of several rows
  -> run -> metrics (``gcl.eval.metrics.compute``).

Document ids in qrels and runs are the documents' own ids (``DocSet.ids``: the table's ``doc_id_column``, a
row number when there is none, a shard's sample key), made unique if a source repeats one, so run files are
readable by any trec_eval user and ties fall the way trec_eval breaks them.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gcl.data.image import RGB, WHITE, decode_image
from gcl.eval.schema import (
    CAP_ORDER,
    DUPLICATE_GRADE,
    GRADE_SCALES,
    MISSING_DOCS,
    MULTI_IMAGE,
    QUERY_SAMPLING,
    QUERY_WEIGHTING,
    QUERY_WHITESPACE,
    RELEVANCE_RULES,
    SCORE_PRECISION,
    TASK_KINDS,
)

log = logging.getLogger(__name__)

IMAGE = "image"
ITEM_ID = "item_id"
ZEROSHOT_METRICS = ("accuracy", "f1_weighted", "f1_macro")
TABLE_EXTS = (".parquet", ".csv", ".tsv", ".json", ".jsonl")


class EvalConfigError(ValueError):
    """A task definition that cannot work; the message names the key and the fix."""


class MissingDataError(FileNotFoundError):
    """An evaluation data file is not where the config says; the message says how to get it."""


# ------------------------------------------------------------------------------------------- validation

def _fail(key: str, msg: str) -> None:
    raise EvalConfigError(f"{key}: {msg}")


def _one_of(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        _fail(key, f"{value!r} is not one of {tuple(allowed)}")


def validate_tasks(cfg: Any) -> None:
    """Check an ``eval`` node (``EvalConfig`` or its DictConfig) before anything is built.

    Raises EvalConfigError naming the key (``eval.tasks[i].…``) and the fix.
    """
    names: set[str] = set()
    for i, t in enumerate(cfg.tasks):
        key = f"eval.tasks[{i}]"
        if t.name in names:
            _fail(f"{key}.name", f"duplicate task name {t.name!r}")
        names.add(t.name)
        _one_of(f"{key}.kind", t.kind, TASK_KINDS)
        sources = [s for s in ("split", "shards", "table") if getattr(t, s)]
        if len(sources) != 1:
            _fail(key, f"give exactly one document source of split / shards / table (got {sources or 'none'})")
        if t.k < 1:
            _fail(f"{key}.k", f"must be >= 1, got {t.k}")
        if t.num_queries < 0:
            _fail(f"{key}.num_queries", f"must be >= 0 (0 = all), got {t.num_queries}")
        if t.kind == "zeroshot":
            _validate_zeroshot(t, key)
            continue
        _validate_sides(t, key)
        _validate_relevance(t, key)
        _validate_protocol(t, key)
        bad = [m for m in t.metrics if m in ZEROSHOT_METRICS]
        if bad:
            _fail(f"{key}.metrics", f"{bad} are zeroshot metrics; a retrieval task reports ranking metrics")
    _validate_suite(cfg, names)


def _validate_zeroshot(t: Any, key: str) -> None:
    if not t.labels_field:
        _fail(f"{key}.labels_field", "a zeroshot task needs the field holding each document's label")
    if not t.prompt_templates or any("{}" not in p for p in t.prompt_templates):
        _fail(f"{key}.prompt_templates", "give at least one template, each with a '{}' for the label")
    bad = [m for m in t.metrics if m not in ZEROSHOT_METRICS]
    if bad:
        _fail(f"{key}.metrics", f"{bad} are not zeroshot metrics; use some of {ZEROSHOT_METRICS}")


def _validate_sides(t: Any, key: str) -> None:
    for side in ("query", "doc"):
        s = getattr(t, side)
        if not s.fields:
            _fail(f"{key}.{side}.fields", "a side needs at least one field")
        if s.weights and len(s.weights) != len(s.fields):
            _fail(f"{key}.{side}.weights", f"{len(s.weights)} weights for {len(s.fields)} fields "
                  f"{list(s.fields)}; give one weight per field or none (equal weights)")
        if any(w < 0 for w in s.weights) or (s.weights and sum(s.weights) <= 0):
            _fail(f"{key}.{side}.weights", "weights must be >= 0 with a positive sum")
    if IMAGE in t.query.fields and (t.unique_queries or t.relevance.rule in ("graded", "fixed")):
        _fail(f"{key}.query.fields", "image queries are per-document queries: unique_queries, graded and fixed "
              "relevance need text query fields")


def _validate_relevance(t: Any, key: str) -> None:
    r = t.relevance
    _one_of(f"{key}.relevance.rule", r.rule, RELEVANCE_RULES)
    _one_of(f"{key}.relevance.grade_scale", r.grade_scale, GRADE_SCALES)
    _one_of(f"{key}.relevance.cap_order", r.cap_order, CAP_ORDER)
    _one_of(f"{key}.relevance.duplicate_grade", r.duplicate_grade, DUPLICATE_GRADE)
    _one_of(f"{key}.relevance.missing_docs", r.missing_docs, MISSING_DOCS)
    if r.max_relevant < 0:
        _fail(f"{key}.relevance.max_relevant", f"must be >= 0 (0 = every judged document), got {r.max_relevant}")
    qtext = [f for f in t.query.fields if f != IMAGE]
    if r.rule == "field" and not r.field and len(qtext) != 1:
        _fail(f"{key}.relevance.field", "name the field whose equal values are relevant (the query side has "
              f"{len(qtext)} text fields, so it cannot default to the query field)")
    if r.rule == "graded":
        if not t.table:
            _fail(f"{key}.table", "graded relevance reads (query, document, grade) rows from a table")
        if not t.corpus:
            _fail(f"{key}.corpus", "graded relevance needs the documents' table / JSON (GS-10M: corpus_N.json)")
        if not r.grade_field:
            _fail(f"{key}.relevance.grade_field", "graded relevance needs the grade column's field name")
        if not t.doc_id_column:
            _fail(f"{key}.doc_id_column", "graded relevance needs the document id column shared by the "
                  "rows and the documents")
    elif t.corpus:
        _fail(f"{key}.corpus", "a separate corpus is only used by graded tasks (relevance.rule=graded)")
    if r.rule == "fixed":
        if not r.qrels_file:
            _fail(f"{key}.relevance.qrels_file", "fixed relevance reads its queries and judgements from a file: a "
                  "JSON {query: {doc id: grade}} or TREC qrels (+ relevance.queries_file)")
        if not str(r.qrels_file).lower().endswith(".json") and not r.queries_file:
            _fail(f"{key}.relevance.queries_file", "TREC qrels hold query ids; name the qid<TAB>text file")
        if len(qtext) != 1 or t.unique_queries:
            _fail(f"{key}.query.fields", "a fixed query set embeds its query texts as one text field "
                  "(and its queries are already unique: leave unique_queries false)")
    elif r.qrels_file or r.queries_file:
        _fail(f"{key}.relevance.qrels_file", "a qrels/queries file is only read by relevance.rule=fixed")


def _validate_protocol(t: Any, key: str) -> None:
    _one_of(f"{key}.query_sampling", t.query_sampling, QUERY_SAMPLING)
    _one_of(f"{key}.query_weighting", t.query_weighting, QUERY_WEIGHTING)
    _one_of(f"{key}.query_whitespace", t.query_whitespace, QUERY_WHITESPACE)
    _one_of(f"{key}.multi_image", t.multi_image, MULTI_IMAGE)
    grouped = t.unique_queries or t.relevance.rule in ("graded", "fixed")
    if t.query_sampling == "marqo" and not grouped:
        _fail(f"{key}.query_sampling", "marqo sampling draws from the sorted unique query keys, as GCL's evals "
              "do; set unique_queries=true (or use graded / fixed relevance), or use uniform")
    if t.query_sampling == "all" and t.num_queries:
        _fail(f"{key}.num_queries", "query_sampling=all takes every query; set num_queries=0 or sample with "
              "uniform / marqo")
    if t.query_weighting == "grade" and t.query_sampling == "all":
        _fail(f"{key}.query_weighting", "weights only matter when queries are sampled (uniform / marqo)")
    if "{}" not in t.query_template:
        _fail(f"{key}.query_template", f"{t.query_template!r} has no '{{}}' for the query text, e.g. 'a photo of {{}}'")
    if t.multi_image != "first" and t.relevance.rule == "graded":
        _fail(f"{key}.multi_image", "graded corpora hold one row per document; use first")


def _validate_suite(cfg: Any, names: set[str]) -> None:
    for i, a in enumerate(cfg.aggregates):
        if not any(fnmatch.fnmatchcase(n, p) for p in a.tasks for n in names):
            _fail(f"eval.aggregates[{i}].tasks", f"{list(a.tasks)} match no task name (tasks: {sorted(names)})")
    g = cfg.gallery
    if g.enabled and g.task is not None and g.task not in names:
        _fail("eval.gallery.task", f"{g.task!r} is not a task name (tasks: {sorted(names)})")
    _one_of("eval.score_precision", cfg.score_precision, SCORE_PRECISION)
    if cfg.context_length is not None and cfg.context_length < 0:
        _fail("eval.context_length", f"{cfg.context_length}: use null (the data config's budgets), 0 (the model's "
              "context length) or a positive token count")


# ---------------------------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class SourceSpec:
    """Where one document set comes from; equal specs are embedded once per evaluation.

    kind ``shards``: ``location`` is a tuple of shard URL patterns. kind ``table``: ``location`` is a tuple of
    files (Parquet / CSV / TSV / JSON / JSONL, read in order), ``columns`` maps field -> column.
    """

    kind: str
    location: tuple[str, ...]
    columns: tuple[tuple[str, str], ...] = ()
    image_column: str | None = None
    image_root: str | None = None
    doc_id_column: str | None = None
    max_docs: int = 0

    def column(self, f: str) -> str:
        return dict(self.columns).get(f, f)


def resolve_path(path: str, data_root: str | None, *, what: str, hint: str | None = None) -> Path:
    """``path`` if absolute, else ``data_root/path``; raise MissingDataError with a fix when it does not exist.

    ``hint`` names where the data comes from (a Hugging Face dataset id) for the error message. Without
    ``data_root``, a Hugging Face dataset ``hint`` is looked up in the Hugging Face cache (never downloaded):
    the path's first part, which names the dataset's folder under ``data_root``, becomes its cached snapshot.
    """
    p = Path(os.path.expanduser(path))
    if not p.is_absolute():
        snapshot = _hf_snapshot(hint) if data_root is None else None
        if snapshot is not None:
            p = snapshot.joinpath(*p.parts[1:])
        elif data_root is None:
            cache = (f", or put {hint} in the Hugging Face cache (`huggingface-cli download {hint} --repo-type "
                     "dataset`) and leave eval.data_root unset" if _is_hf_id(hint) else "")
            raise MissingDataError(
                f"{what} {path!r} is relative but eval.data_root is not set; set eval.data_root=DIR to the folder "
                f"holding the local copy of the evaluation data{_hint(hint, '<eval.data_root>/' + path)}{cache}")
        else:
            p = Path(os.path.expanduser(data_root)) / p
    if any(c in str(p) for c in "*?["):
        if not glob.glob(str(p)):
            raise MissingDataError(f"{what} {str(p)!r} matches no file{_hint(hint, str(p))}")
    elif not p.exists():
        raise MissingDataError(f"{what} {str(p)!r} does not exist{_hint(hint, str(p))}")
    return p


def _is_hf_id(source: str | None) -> bool:
    from gcl.data.hf import is_repo_id

    return bool(source) and is_repo_id(source)


def _hf_snapshot(source: str | None) -> Path | None:
    """The cached snapshot of the Hugging Face dataset ``source``, or None (not an id, or not cached)."""
    if not _is_hf_id(source):
        return None
    from gcl.data.hf import HFLayoutError, locate

    try:
        return locate(source)
    except HFLayoutError:
        return None


def _hint(source: str | None, where: str) -> str:
    if not source:
        return ""
    if source.startswith(("http://", "https://")):
        return f"; it comes from {source}: download and unpack it (on a machine with network) so that {where} exists"
    return (f"; get it once on a machine with network: `huggingface-cli download {source} --repo-type dataset "
            f"--local-dir {where}` (evaluation itself never downloads)")


def table_files(path: Path) -> list[Path]:
    """The table files behind ``path``: the file itself, a glob's matches, or a folder's tables (recursive)."""
    if any(c in str(path) for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path)))
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TABLE_EXTS and p.is_file())
        parquet = [p for p in files if p.suffix.lower() == ".parquet"]
        files = parquet or files  # an HF snapshot folder: its parquet files, not README/json side files
    else:
        files = [path]
    if not files:
        raise MissingDataError(f"no table files ({', '.join(TABLE_EXTS)}) under {str(path)!r}")
    bad = [p for p in files if p.suffix.lower() not in TABLE_EXTS]
    if bad:
        raise EvalConfigError(f"unsupported table file {str(bad[0])!r}; use one of {TABLE_EXTS}")
    return files


def _read_one(path: Path, columns: list[str] | None) -> Any:
    import pandas as pd

    ext = path.suffix.lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq

        have = set(pq.ParquetFile(path).schema_arrow.names)
        cols = None if columns is None else [c for c in columns if c in have]
        return pd.read_parquet(path, columns=cols)
    if ext in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if ext == ".tsv" else ",", dtype=str, keep_default_na=False,
                           na_values=[""], usecols=(lambda c: c in columns) if columns is not None else None)
    if ext == ".jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    data = json.loads(path.read_text())
    if isinstance(data, dict):  # GS-10M corpus layout: {doc_id: {field: value}}
        df = pd.DataFrame.from_dict(data, orient="index")
        df.index.name = "__id__"
        return df.reset_index()
    return pd.DataFrame(data)


def read_table(files: Sequence[Path], columns: list[str] | None = None) -> Any:
    """Concatenate ``files`` into one DataFrame (only ``columns`` when given; absent ones are skipped)."""
    import pandas as pd

    parts = [_read_one(p, columns) for p in files]
    df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    return df


def to_text(value: Any, sep: str = ", ") -> str | None:
    """A table cell as the final string (lists joined by ``sep``, like the loader's join rule); None if missing."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [str(v).strip() for v in value if v is not None and str(v).strip()]
        return sep.join(items) or None
    s = str(value).strip()
    return s or None


def raw_text(value: Any, sep: str = ", ") -> str | None:
    """A table cell's string exactly as stored (lists joined by ``sep``); None only if missing (None / NaN).
    What Marqo's evaluation groups queries by (``query_whitespace: none``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return sep.join(str(v) for v in value if v is not None)
    return str(value)


def unique_ids(ids: Sequence[str], where: str) -> list[str]:
    """``ids`` with repeats made unique (``key``, ``key#2``, ...; logged): runs and qrels are keyed by id."""
    seen: dict[str, int] = {}
    out, dup = [], 0
    taken = set(ids)
    for i in ids:
        n = seen.get(i, 0)
        seen[i] = n + 1
        if n == 0:
            out.append(i)
            continue
        dup += 1
        j, cand = n + 1, f"{i}#{n + 1}"
        while cand in taken:
            j += 1
            cand = f"{i}#{j}"
        taken.add(cand)
        out.append(cand)
    if dup:
        log.warning("%s: %d repeated document ids renamed with a #n suffix (runs and qrels need unique ids)", where, dup)
    return out


@dataclass
class DocSet:
    """The documents of one source, in canonical order (N of them).

    ``meta[f]``: N strings or None (missing). ``item_ids``: N strings (equal = same product).
    ``emb[f]``: FloatTensor[N, D], L2-normalized rows, zero rows where ``present[f]`` (BoolTensor[N]) is False.
    ``rows_meta`` / ``row_doc``: when a table was de-duplicated by a document id (several rows per document,
    e.g. one per search query), the metadata of every row and the document index of each row; queries and
    relevance are built from the rows (a document is relevant when any of its rows matches). None otherwise.
    ``raw_rows[f]``: ``{row: text as stored}`` for the rows (``rows_meta`` order, else document order) whose
    stored text differs from ``meta``'s stripped one (e.g. ``" red dress"``, ``""``); None when unknown
    (shards). ``ids`` are unique (repeats get a ``#n`` suffix).
    """

    ids: list[str]
    item_ids: list[str]
    meta: dict[str, list[str | None]]
    emb: dict[str, torch.Tensor] = field(default_factory=dict)
    present: dict[str, torch.Tensor] = field(default_factory=dict)
    rows_meta: dict[str, list[str | None]] | None = None
    row_doc: list[int] | None = None
    raw_rows: dict[str, dict[int, str]] | None = None

    def __post_init__(self) -> None:
        if len(set(self.ids)) != len(self.ids):
            self.ids = unique_ids(self.ids, "documents")

    def __len__(self) -> int:
        return len(self.ids)


class TableReader:
    """Metadata and lazily-read images of a table source (Parquet image structs / bytes, or file paths).

    Rows are the table's rows (the first ``max_docs`` when set). With ``doc_id_column`` the documents are the
    distinct ids in order of first appearance (the first row of each gives its image and fields; ``row_doc``
    maps every row to its document); otherwise every row is a document with id = its row number.
    """

    def __init__(self, spec: SourceSpec, meta_fields: Sequence[str], list_sep: str = ", ",
                 optional: Sequence[str] = (), image_background: RGB = WHITE) -> None:
        self.spec = spec
        self.image_background = image_background  # under transparent pixels (gcl.data.image)
        self.files = [Path(p) for p in spec.location]
        cols = {spec.column(f) for f in [*meta_fields, *optional]}
        if spec.doc_id_column:
            cols.add(spec.doc_id_column)
        parquet = all(p.suffix.lower() == ".parquet" for p in self.files)
        # Parquet images stay on disk until the image pass; path columns are small and read now.
        self.lazy_images = parquet and spec.image_column is not None
        if spec.image_column and not self.lazy_images:
            cols.add(spec.image_column)
        df = read_table(self.files, sorted(cols) + (["__id__"] if self._json_dict() else []))
        self.rows_per_file = [self._count(p) for p in self.files] if self.lazy_images else []
        n_rows = len(df) if spec.max_docs <= 0 else min(len(df), spec.max_docs)
        df = df.iloc[:n_rows]
        self.n_rows = n_rows
        if spec.doc_id_column and spec.doc_id_column in df.columns:
            id_col: str | None = spec.doc_id_column
        elif "__id__" in df.columns:  # a {doc_id: {...}} JSON corpus: its keys are the ids
            id_col = "__id__"
        elif spec.doc_id_column:
            raise EvalConfigError(f"doc_id_column {spec.doc_id_column!r} is not a column of {self._where()} "
                                  f"(columns: {sorted(map(str, df.columns))})")
        else:
            id_col = None
        if spec.image_column and not self.lazy_images and spec.image_column not in df.columns:
            raise EvalConfigError(f"image_column {spec.image_column!r} is not a column of {self._where()}")
        row_ids = [str(v) for v in df[id_col]] if id_col else [str(i) for i in range(n_rows)]
        first: dict[str, int] = {}
        for r, d in enumerate(row_ids):
            first.setdefault(d, r)
        self.doc_rows = list(first.values())  # row of each document (ascending)
        self.deduped = len(self.doc_rows) < n_rows
        doc_of = {d: j for j, d in enumerate(first)}
        self.row_doc = [doc_of[d] for d in row_ids] if self.deduped else None
        if self.deduped:
            log.info("%s: %d rows -> %d documents (one per %s)", self._where(), n_rows, len(self.doc_rows), id_col)
        self.ids = list(first)
        self.n = len(self.ids)
        self.rows_meta: dict[str, list[str | None]] = {}
        self.raw_rows: dict[str, dict[int, str]] = {}  # see DocSet.raw_rows
        missing = []
        for f in [*meta_fields, *optional]:
            c = spec.column(f)
            if c not in df.columns:
                if f not in optional:
                    missing.append(f"{f} (column {c!r})")
                continue
            values = df[c].tolist()
            self.rows_meta[f] = [to_text(v, list_sep) for v in values]
            raw = {r: x for r, (v, t) in enumerate(zip(values, self.rows_meta[f]))
                   if (x := raw_text(v, list_sep)) is not None and x != t}
            if raw:
                self.raw_rows[f] = raw
        if missing:
            raise EvalConfigError(
                f"{self._where()} lacks {missing}; its columns are {sorted(map(str, df.columns))}. Map the "
                "field with the task's `columns: {field: column}` or fix the preset")
        self.meta = ({f: [v[r] for r in self.doc_rows] for f, v in self.rows_meta.items()} if self.deduped
                     else self.rows_meta)
        self.paths = df[spec.image_column].tolist() if spec.image_column and not self.lazy_images else None
        if spec.image_column and self.lazy_images:
            import pyarrow.parquet as pq

            for p in self.files:
                if spec.image_column not in pq.ParquetFile(p).schema_arrow.names:
                    raise EvalConfigError(f"image_column {spec.image_column!r} is not a column of {str(p)!r}")

    def _json_dict(self) -> bool:
        return any(p.suffix.lower() == ".json" for p in self.files)

    def _where(self) -> str:
        return f"table {str(self.files[0])!r}" + (f" (+{len(self.files) - 1} files)" if len(self.files) > 1 else "")

    @staticmethod
    def _count(p: Path) -> int:
        import pyarrow.parquet as pq

        return pq.ParquetFile(p).metadata.num_rows

    def item_ids(self, item_field: str = ITEM_ID) -> list[str]:
        """Per document: its item id (its document id when the table has no item id)."""
        vals = self.meta.get(item_field)
        if vals is None:
            return list(self.ids)
        return [v if v is not None else f"__doc{i}" for i, v in enumerate(vals)]

    def units(self) -> list[tuple[int, int, int]]:
        """Work units over rows for the image pass: (file index or -1, first row, row count)."""
        out = []
        if self.lazy_images:
            import pyarrow.parquet as pq

            start = 0
            for fi, p in enumerate(self.files):
                md = pq.ParquetFile(p).metadata
                for g in range(md.num_row_groups):
                    rows = md.row_group(g).num_rows
                    if start < self.n_rows:
                        out.append((fi, start, min(rows, self.n_rows - start)))
                    start += rows
        else:
            step = 256
            out = [(-1, s, min(step, self.n_rows - s)) for s in range(0, self.n_rows, step)]
        return out

    def iter_unit(self, unit: tuple[int, int, int]) -> Iterator[tuple[int, Any]]:
        """(row, raw image value) for the rows of one unit; the value is bytes / HF struct / path."""
        fi, start, count = unit
        if fi < 0:
            for i in range(start, start + count):
                yield i, self.paths[i]  # type: ignore[index]
            return
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.files[fi])
        group_start, gi = sum(self.rows_per_file[:fi]), 0
        md = pf.metadata
        while gi < md.num_row_groups and group_start + md.row_group(gi).num_rows <= start:
            group_start += md.row_group(gi).num_rows
            gi += 1
        col = pf.read_row_group(gi, columns=[self.spec.image_column]).column(0).to_pylist()
        for j, v in enumerate(col[start - group_start: start - group_start + count]):
            yield start + j, v

    def open_image(self, value: Any) -> Image.Image:
        """Decode one raw image value to RGB like every other path (``gcl.data.image.decode_image``); raises
        on unreadable input (the caller counts and skips)."""
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                value = value["bytes"]
            elif value.get("path"):
                value = value["path"]
            else:
                raise ValueError("image struct with neither bytes nor path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return decode_image(value, self.image_background)
        if isinstance(value, str) and value.strip():
            return decode_image(self.image_path(value.strip()), self.image_background)
        raise ValueError(f"empty or unsupported image value of type {type(value).__name__}")

    def image_path(self, value: str) -> Path:
        """The local file of an image path value: absolute, or under image_root (default: the table's folder);
        falls back to image_root/basename (GCL's path fix-up for moved image folders)."""
        if value.startswith(("http://", "https://")):
            raise ValueError(f"image {value!r} is a URL; evaluation never downloads: use local files")
        p = Path(value)
        if p.is_absolute() and p.exists():
            return p
        root = Path(self.spec.image_root) if self.spec.image_root else self.files[0].parent
        for cand in (root / p, root / p.name):
            if cand.exists():
                return cand
        raise FileNotFoundError(f"image {value!r} not found (looked in {str(root)!r}); set the task's image_root")

    def doc_image_paths(self) -> list[Path]:
        """Local files of every document's image (path-valued image columns only)."""
        assert self.paths is not None
        return [self.image_path(str(self.paths[r])) for r in self.doc_rows]

    def images(self, docs: Sequence[int]) -> list[Image.Image | None]:
        """Decoded images of some documents (for the gallery); None where unreadable."""
        rows = [self.doc_rows[d] for d in docs]
        want = set(rows)
        got: dict[int, Image.Image | None] = {}
        for unit in self.units():
            _, s, c = unit
            if not any(s <= i < s + c for i in want):
                continue
            for i, v in self.iter_unit(unit):
                if i in want:
                    try:
                        got[i] = self.open_image(v)
                    except Exception as exn:  # noqa: BLE001 - a gallery thumbnail is optional
                        log.warning("gallery: cannot read image of row %d: %r", i, exn)
                        got[i] = None
        return [got.get(r) for r in rows]


class ImageDataset(torch.utils.data.IterableDataset):
    """(row, image tensor or None, error) over a table's rows in ``rows``; DataLoader workers split the units."""

    def __init__(self, reader: TableReader, transform: Any, rows: set[int]) -> None:
        super().__init__()
        self.reader, self.transform, self.rows = reader, transform, rows
        self.units = [u for u in reader.units() if any(r in rows for r in range(u[1], u[1] + u[2]))]

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor | None, str]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for unit in self.units[wid::nw]:
            for i, v in self.reader.iter_unit(unit):
                if i not in self.rows:
                    continue
                try:
                    yield i, self.transform(self.reader.open_image(v)), ""
                except Exception as exn:  # noqa: BLE001 - a bad image is a counted skip, not a crash
                    yield i, None, repr(exn)


def collate_images(items: list[tuple[int, torch.Tensor | None, str]]) -> dict[str, Any]:
    ok = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, e) for i, t, e in items if t is None]
    return {"index": [i for i, _ in ok], "image": torch.stack([t for _, t in ok]) if ok else None, "bad": bad}


# ------------------------------------------------------------------------------------- fusion + scoring

def side_weights(fields: Sequence[str], weights: Sequence[float]) -> list[float]:
    """The side's weights (equal when none are given)."""
    return [float(w) for w in weights] if weights else [1.0] * len(fields)


def fuse(emb: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor], fields: Sequence[str],
         weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse per-field features into one vector per row, like the loss fuses a side.

    Args:
        emb: field -> FloatTensor[N, D] (any norm; normalized here).
        present: field -> BoolTensor[N] (False = missing; the field is dropped from that row).
        fields, weights: the side (``weights`` empty = equal).
    Returns:
        (FloatTensor[N, D] = normalize(sum_k a_k normalize(f_k)) with a_k renormalised over the present
        fields, BoolTensor[N] = the row has at least one present field with positive weight; other rows are 0).
    """
    w = side_weights(fields, weights)
    first = emb[fields[0]]
    total = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
    wsum = torch.zeros(first.shape[0], dtype=torch.float32, device=first.device)
    for f, a in zip(fields, w):
        m = present[f].to(first.device).float() * a
        total += m[:, None] * F.normalize(emb[f].float(), dim=-1)
        wsum += m
    ok = wsum > 0
    # Renormalising the present weights to sum 1 is a per-row scale, which the final normalize absorbs.
    return F.normalize(total, dim=-1) * ok[:, None], ok


def tie_order(ids: Sequence[str], valid: torch.Tensor | None = None,
              units: Sequence[str] | None = None) -> torch.Tensor:
    """LongTensor[M]: the rows of the documents that have a vector, sorted by id descending (by unit id, then
    document id, when rows are grouped into units).

    ``topk`` puts equal scores in ascending index order, so scoring the documents in this order breaks ties by
    document id descending - trec_eval's rule - at every cut-off, including which tied documents make the
    top k.
    """
    ok = valid.tolist() if valid is not None else None
    rows = [i for i in range(len(ids)) if ok is None or ok[i]]
    if units is None:
        rows.sort(key=ids.__getitem__, reverse=True)
    else:
        rows.sort(key=lambda i: (units[i], ids[i]), reverse=True)
    return torch.tensor(rows, dtype=torch.long)


def collapse(scores: list[list[float]], rows: list[list[int]], units: Sequence[str], k: int,
             rule: str) -> tuple[list[dict[str, float]], list[list[int]]]:
    """Per query, ranked rows -> ranked units (items): ``max`` scores an item by its best row, ``min`` by its
    lowest row among the retrieved ones (Marqo-FashionCLIP's ``{item: score}`` dict over its top-k rows keeps
    the last, i.e. lowest, row of an item). Returns ({unit: score} per query, the best row of each kept unit in
    rank order). ``first`` (one row per unit) maps rows to units one to one."""
    runs, shown = [], []
    for s_row, r_row in zip(scores, rows):
        best: dict[str, int] = {}
        val: dict[str, float] = {}
        for s, r in zip(s_row, r_row):
            u = units[r]
            if u not in best:
                best[u], val[u] = r, s
            elif rule == "min":
                val[u] = min(val[u], s)
        ranked = sorted(val.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]  # trec_eval's order
        runs.append(dict(ranked))
        shown.append([best[u] for u, _ in ranked])
    return runs, shown


def score_retrieval(q: torch.Tensor, d: torch.Tensor, qrels: Mapping[str, Mapping[str, int]],
                    query_ids: Sequence[str], *, k: int, metrics: Sequence[str], chunk_size: int,
                    device: torch.device | str = "cpu", doc_valid: torch.Tensor | None = None,
                    doc_ids: Sequence[str] | None = None, units: Sequence[str] | None = None,
                    multi_image: str = "first", precision: str = "fp32",
                    ) -> tuple[dict[str, float], dict[str, dict[str, float]], torch.Tensor]:
    """Exact retrieval of the top ``k`` units per query (ties by id descending, as trec_eval), then the metrics.

    Args:
        q: FloatTensor[Q, D] normalized query vectors; d: FloatTensor[N, D] normalized document vectors.
        qrels: ``{qid: {unit id: grade}}`` for the ``query_ids`` (Q of them, in ``q``'s order).
        doc_valid: BoolTensor[N], False for documents without a vector (never retrieved).
        doc_ids: the N documents' ids (default: their row numbers); ``units``: each document's retrieval unit
            (its item) when ``multi_image`` is ``max`` / ``min``, which score an item by its best / lowest row
            (see ``collapse``; ``max`` retrieves enough rows that the top k items are exact).
        precision: ``fp32`` | ``fp16`` (vectors and scores rounded to fp16, as a half-precision GEMM) |
            ``fp16_inputs`` (vectors rounded to fp16, fp32 scores).
    Returns: (metric -> mean over queries, the run ``{qid: {unit id: score}}``, LongTensor[Q, k'] of the
    document row shown for each ranked unit, -1 where a query ranked fewer than k' units).
    """
    from gcl.eval.metrics import compute
    from gcl.eval.retrieval import topk

    ids = list(doc_ids) if doc_ids is not None else [str(i) for i in range(d.shape[0])]
    grouped = multi_image != "first"
    if grouped and units is None:
        raise ValueError(f"score_retrieval: multi_image={multi_image!r} needs each document's unit (item) id")
    order = tie_order(ids, doc_valid, units if grouped else None)
    dd, qq = d[order].float(), q.float()
    if precision in ("fp16", "fp16_inputs"):
        dd, qq = dd.half().float(), qq.half().float()
    n = dd.shape[0]
    per_unit = max(Counter(units[i] for i in order.tolist()).values(), default=1) if grouped else 1
    kk = min(n, k * per_unit if multi_image == "max" else k)
    if kk == 0:
        run: dict[str, dict[str, float]] = {qid: {} for qid in query_ids}
        top = torch.full((len(query_ids), 0), -1, dtype=torch.long)
    else:
        scores, idx = topk(qq, dd, kk, chunk_size=chunk_size, device=device,
                           score_precision="fp16" if precision == "fp16" else "fp32")
        rows = order[idx]
        if grouped:
            per_query, shown = collapse(scores.tolist(), rows.tolist(), units, k, multi_image)
            run = dict(zip(query_ids, per_query))
            width = max((len(x) for x in shown), default=0)
            top = torch.full((len(query_ids), width), -1, dtype=torch.long)
            for j, x in enumerate(shown):
                top[j, : len(x)] = torch.tensor(x, dtype=torch.long)
        else:
            run = {qid: {ids[r]: s for s, r in zip(s_row, r_row)}
                   for qid, s_row, r_row in zip(query_ids, scores.tolist(), rows.tolist())}
            top = rows
    values = compute({qid: dict(qrels[qid]) for qid in query_ids}, run, list(metrics))
    return {m: float(values[m]) for m in metrics}, run, top


def add_means(values: dict[str, float], means: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Add each ``name: [metrics]`` mean where all listed metrics exist (Marqo's AvgRecall / AvgP)."""
    out = dict(values)
    for name, parts in means.items():
        if parts and all(p in values for p in parts):
            out[name] = float(sum(values[p] for p in parts) / len(parts))
    return out


def aggregate(per_task: Mapping[str, Mapping[str, float]], patterns: Sequence[str],
              metrics: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """Unweighted mean over the tasks whose names match a pattern (fnmatch) of each metric they all report.

    Returns (metric -> mean, the matched task names). ``metrics`` empty = every metric shared by them.
    """
    names = [n for n in per_task if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        return {}, []
    shared = set.intersection(*(set(per_task[n]) for n in names))
    wanted = [m for m in metrics if m in shared] if metrics else sorted(shared)
    return {m: float(np.mean([per_task[n][m] for n in names])) for m in wanted}, names


def metric_names(cfg: Any) -> list[str]:
    """Every flat metric name an evaluation of the ``eval`` node ``cfg`` reports (``<suite>/<task>/<metric>``
    and ``<suite>/<aggregate>/<metric>``), from the config alone: the same rules as :func:`add_means` and
    :func:`aggregate`, without a model or data. Lets ``trainer.best_metric`` be checked before training."""
    means = {str(k): [str(m) for m in v] for k, v in dict(cfg.means).items()}
    per_task: dict[str, list[str]] = {}
    for t in cfg.tasks:
        ms = [str(m) for m in t.metrics]
        per_task[str(t.name)] = ms + [n for n, parts in means.items() if parts and all(p in ms for p in parts)]
    prefix = f"{cfg.name}/" if cfg.name else ""  # an empty suite name: the task names carry their suites
    names = [f"{prefix}{t}/{m}" for t, ms in per_task.items() for m in ms]
    for a in cfg.aggregates:
        matched = [t for t in per_task if any(fnmatch.fnmatchcase(t, p) for p in a.tasks)]
        if not matched:
            continue
        shared = set.intersection(*(set(per_task[t]) for t in matched))
        wanted = [m for m in a.metrics if m in shared] if a.metrics else sorted(shared)
        names += [f"{prefix}{a.name}/{m}" for m in wanted]
    return names
