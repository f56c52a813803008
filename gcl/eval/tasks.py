"""Evaluation tasks: document sources, queries with their relevance judgements, fusion and scoring.

The pieces, in the order the runner (``gcl.eval.run``) uses them:

* ``validate_tasks(cfg)`` - fail fast on a bad ``eval`` node, naming the key and the fix.
* ``source_of(task, ...)`` -> a hashable ``SourceSpec``: tasks with equal specs share one embedding pass.
* ``read_docs`` / ``TableReader`` - document metadata (strings per field) from shards or a Parquet/CSV/JSON table;
  images are read lazily (``TableReader.images``) so big tables never hold all image bytes in memory.
* ``build_queries(task, docs, seed, pairs)`` -> ``Queries``: ids, query strings, and pytrec_eval-style qrels
  ``{qid: {doc_index_str: grade}}`` by the task's relevance rule (item_id | field | graded).
* ``fuse(emb, present, fields, weights)`` - ``normalize(sum_k a_k normalize(f_k))``, missing fields dropped and
  the weights renormalised per row (the loss's side fusion).
* ``score_retrieval(q, d, qrels, ...)`` - exact fp32 top-k (``gcl.eval.retrieval.topk``) -> run -> metrics
  (``gcl.eval.metrics.compute``).

Document ids inside qrels/runs are the row numbers of the documents (as strings) in the source's canonical
order (shards: sorted by sample key; tables: file order), so duplicated external ids can never collide.
"""
from __future__ import annotations

import fnmatch
import glob
import io
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gcl.data.schema import stable_hash
from gcl.eval.schema import (
    GRADE_SCALES,
    QUERY_SAMPLING,
    RELEVANCE_RULES,
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
        if t.kind not in TASK_KINDS:
            _fail(f"{key}.kind", f"{t.kind!r} is not one of {TASK_KINDS}")
        sources = [s for s in ("split", "shards", "table") if getattr(t, s)]
        if len(sources) != 1:
            _fail(key, f"give exactly one document source of split / shards / table (got {sources or 'none'})")
        if t.k < 1:
            _fail(f"{key}.k", f"must be >= 1, got {t.k}")
        if t.num_queries < 0:
            _fail(f"{key}.num_queries", f"must be >= 0 (0 = all), got {t.num_queries}")
        if t.kind == "zeroshot":
            if not t.labels_field:
                _fail(f"{key}.labels_field", "a zeroshot task needs the field holding each document's label")
            if not t.prompt_templates or any("{}" not in p for p in t.prompt_templates):
                _fail(f"{key}.prompt_templates", "give at least one template, each with a '{}' for the label")
            bad = [m for m in t.metrics if m not in ZEROSHOT_METRICS]
            if bad:
                _fail(f"{key}.metrics", f"{bad} are not zeroshot metrics; use some of {ZEROSHOT_METRICS}")
            continue
        for side in ("query", "doc"):
            s = getattr(t, side)
            if not s.fields:
                _fail(f"{key}.{side}.fields", "a side needs at least one field")
            if s.weights and len(s.weights) != len(s.fields):
                _fail(f"{key}.{side}.weights", f"{len(s.weights)} weights for {len(s.fields)} fields "
                      f"{list(s.fields)}; give one weight per field or none (equal weights)")
            if any(w < 0 for w in s.weights) or (s.weights and sum(s.weights) <= 0):
                _fail(f"{key}.{side}.weights", "weights must be >= 0 with a positive sum")
        r = t.relevance
        if r.rule not in RELEVANCE_RULES:
            _fail(f"{key}.relevance.rule", f"{r.rule!r} is not one of {RELEVANCE_RULES}")
        if r.grade_scale not in GRADE_SCALES:
            _fail(f"{key}.relevance.grade_scale", f"{r.grade_scale!r} is not one of {GRADE_SCALES}")
        if t.query_sampling not in QUERY_SAMPLING:
            _fail(f"{key}.query_sampling", f"{t.query_sampling!r} is not one of {QUERY_SAMPLING}")
        qtext = [f for f in t.query.fields if f != IMAGE]
        if IMAGE in t.query.fields and (t.unique_queries or r.rule == "graded"):
            _fail(f"{key}.query.fields", "image queries are per-document queries: unique_queries and graded "
                  "relevance need text query fields")
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
        bad = [m for m in t.metrics if m in ZEROSHOT_METRICS]
        if bad:
            _fail(f"{key}.metrics", f"{bad} are zeroshot metrics; a retrieval task reports ranking metrics")
    for i, a in enumerate(cfg.aggregates):
        if not any(fnmatch.fnmatchcase(n, p) for p in a.tasks for n in names):
            _fail(f"eval.aggregates[{i}].tasks", f"{list(a.tasks)} match no task name (tasks: {sorted(names)})")
    g = cfg.gallery
    if g.enabled and g.task is not None and g.task not in names:
        _fail("eval.gallery.task", f"{g.task!r} is not a task name (tasks: {sorted(names)})")


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

    ``hint`` names where the data comes from (a Hugging Face dataset id) for the error message.
    """
    p = Path(os.path.expanduser(path))
    if not p.is_absolute():
        if data_root is None:
            raise MissingDataError(
                f"{what} {path!r} is relative but eval.data_root is not set; set eval.data_root=DIR to the folder "
                f"holding the local copy of the evaluation data{_hint(hint, '<eval.data_root>/' + path)}")
        p = Path(os.path.expanduser(data_root)) / p
    if any(c in str(p) for c in "*?["):
        if not glob.glob(str(p)):
            raise MissingDataError(f"{what} {str(p)!r} matches no file{_hint(hint, str(p))}")
    elif not p.exists():
        raise MissingDataError(f"{what} {str(p)!r} does not exist{_hint(hint, str(p))}")
    return p


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


@dataclass
class DocSet:
    """The documents of one source, in canonical order (N of them).

    ``meta[f]``: N strings or None (missing). ``item_ids``: N strings (equal = same product).
    ``emb[f]``: FloatTensor[N, D], L2-normalized rows, zero rows where ``present[f]`` (BoolTensor[N]) is False.
    ``rows_meta`` / ``row_doc``: when a table was de-duplicated by a document id (several rows per document,
    e.g. one per search query), the metadata of every row and the document index of each row; queries and
    relevance are built from the rows (a document is relevant when any of its rows matches). None otherwise.
    """

    ids: list[str]
    item_ids: list[str]
    meta: dict[str, list[str | None]]
    emb: dict[str, torch.Tensor] = field(default_factory=dict)
    present: dict[str, torch.Tensor] = field(default_factory=dict)
    rows_meta: dict[str, list[str | None]] | None = None
    row_doc: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ids)


class TableReader:
    """Metadata and lazily-read images of a table source (Parquet image structs / bytes, or file paths).

    Rows are the table's rows (the first ``max_docs`` when set). With ``doc_id_column`` the documents are the
    distinct ids in order of first appearance (the first row of each gives its image and fields; ``row_doc``
    maps every row to its document); otherwise every row is a document with id = its row number.
    """

    def __init__(self, spec: SourceSpec, meta_fields: Sequence[str], list_sep: str = ", ",
                 optional: Sequence[str] = ()) -> None:
        self.spec = spec
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
        missing = []
        for f in [*meta_fields, *optional]:
            c = spec.column(f)
            if c not in df.columns:
                if f not in optional:
                    missing.append(f"{f} (column {c!r})")
                continue
            self.rows_meta[f] = [to_text(v, list_sep) for v in df[c].tolist()]
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
        """Decode one raw image value to RGB; raises on unreadable input (the caller counts and skips)."""
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                value = value["bytes"]
            elif value.get("path"):
                value = value["path"]
            else:
                raise ValueError("image struct with neither bytes nor path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(value))) as im:
                return im.convert("RGB")
        if isinstance(value, str) and value.strip():
            with Image.open(self.image_path(value.strip())) as im:
                return im.convert("RGB")
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


# ---------------------------------------------------------------------------------------------- queries

@dataclass
class Queries:
    """Q queries of one task.

    ``texts[f]``: Q strings (or None) per text query field; ``doc_rows``: for per-document queries the
    document each query was drawn from (used for image query fields), else None. ``qrels``: pytrec_eval
    dict ``{qid: {str(doc_index): grade >= 1}}``; every query has at least one relevant document.
    """

    ids: list[str]
    texts: dict[str, list[str | None]]
    qrels: dict[str, dict[str, int]]
    doc_rows: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, stable_hash(name)])


def _sample(n: int, k: int, rng: np.random.Generator, p: np.ndarray | None = None) -> list[int]:
    """``k`` of ``range(n)`` without replacement (all when k <= 0 or k >= n), sorted."""
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False, p=p))


def _query_value(texts: Mapping[str, list[str | None]], fields: Sequence[str], i: int) -> tuple | None:
    vals = tuple(texts[f][i] for f in fields)
    return None if all(v is None for v in vals) else vals


def build_queries(task: Any, docs: DocSet, seed: int, pairs: Any = None) -> Queries:
    """The task's queries and qrels over ``docs`` (see ``Queries``); sampling is seeded by (seed, task name).

    Queries come from the documents' rows (``docs.rows_meta`` when the table was de-duplicated, else the
    documents themselves). Per-row queries (default): each sampled row with a query field value is a query;
    relevant are the documents with the row's item id (rule ``item_id``) or with a row whose
    ``relevance.field`` equals the row's (rule ``field``). ``unique_queries``: each unique value (tuple) of
    the query text fields is one query; relevant are the documents with a row whose ``relevance.field``
    equals it (``field``; ``relevance.field`` defaults to the query field), or that share an item id with a
    row having that value (``item_id``). Graded: see ``graded_queries``.
    """
    rule = task.relevance.rule
    if rule == "graded":
        if pairs is None:
            raise EvalConfigError(f"task {task.name!r}: graded relevance needs the (query, doc, grade) table")
        return graded_queries(task, docs, pairs, seed)
    rng = _rng(seed, task.name)
    qfields = [f for f in task.query.fields if f != IMAGE]
    rel_field = task.relevance.field or (qfields[0] if len(qfields) == 1 else None)
    rows = docs.rows_meta if docs.rows_meta is not None else docs.meta
    row_doc = docs.row_doc if docs.row_doc is not None else list(range(len(docs)))
    for f in qfields + ([rel_field] if rule == "field" and rel_field else []):
        if f not in rows:
            raise EvalConfigError(f"task {task.name!r}: documents have no field {f!r}")
    n_rows = len(row_doc)
    by_item: dict[str, set[int]] = defaultdict(set)
    for d, it in enumerate(docs.item_ids):
        by_item[it].add(d)
    by_value: dict[str, set[int]] = defaultdict(set)
    if rule == "field":
        for r, v in enumerate(rows[rel_field]):
            if v is not None:
                by_value[v].add(row_doc[r])

    def relevant(r: int) -> set[int]:
        if rule == "field":
            v = rows[rel_field][r]
            return by_value.get(v, set()) if v is not None else set()
        return by_item[docs.item_ids[row_doc[r]]]

    dropped = 0
    ids: list[str] = []
    texts: dict[str, list[str | None]] = {f: [] for f in qfields}
    qrels: dict[str, dict[str, int]] = {}
    doc_rows: list[int] | None = None
    if task.unique_queries:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for r in range(n_rows):
            v = _query_value(rows, qfields, r)
            if v is not None:
                groups[v].append(r)
        values = sorted(groups, key=lambda t: tuple("" if x is None else x for x in t))
        for j in _sample(len(values), task.num_queries, rng):
            v = values[j]
            rel = set().union(*(relevant(r) for r in groups[v]))
            if not rel:
                dropped += 1
                continue
            qid = f"q{len(ids)}"
            ids.append(qid)
            for f, x in zip(qfields, v):
                texts[f].append(x)
            qrels[qid] = {str(d): 1 for d in sorted(rel)}
    else:
        doc_rows = []
        has_img = docs.present.get(IMAGE) if IMAGE in task.query.fields else None
        cand = [r for r in range(n_rows)
                if (qfields and _query_value(rows, qfields, r) is not None)
                or (has_img is not None and bool(has_img[row_doc[r]]))]
        for j in _sample(len(cand), task.num_queries, rng):
            r = cand[j]
            rel = relevant(r)
            if not rel:
                dropped += 1
                continue
            qid = f"q{len(ids)}"
            ids.append(qid)
            doc_rows.append(row_doc[r])
            for f in qfields:
                texts[f].append(rows[f][r])
            qrels[qid] = {str(d): 1 for d in sorted(rel)}
    if dropped:
        log.warning("task %s: dropped %d queries without a relevant document", task.name, dropped)
    return Queries(ids=ids, texts=texts, qrels=qrels, doc_rows=doc_rows)


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
    raise EvalConfigError(f"unknown grade_scale {scale!r}; use one of {GRADE_SCALES}")


def graded_queries(task: Any, docs: DocSet, pairs: Any, seed: int) -> Queries:
    """Queries and graded qrels from a (query, document id, grade) table (the GS-10M CSV layout).

    ``pairs`` is a DataFrame with the query text columns (``columns`` mapping applies), the document id
    column ``doc_id_column`` and the grade column of ``relevance.grade_field``. Grades are scaled by
    ``relevance.grade_scale``; pairs below ``relevance.min_grade`` or whose document is not in ``docs``
    are dropped (counted). A query is identified by ``query_id_column`` when set, else by its text(s).
    ``query_sampling: grade`` samples queries with probability proportional to their summed grade (GCL);
    ``uniform`` samples uniformly. Duplicate (query, doc) pairs keep the highest grade.
    """
    r = task.relevance
    cols = dict(task.columns)
    qfields = list(task.query.fields)
    qcols = [cols.get(f, f) for f in qfields]
    gcol = cols.get(r.grade_field, r.grade_field)
    need = qcols + [task.doc_id_column, gcol] + ([task.query_id_column] if task.query_id_column else [])
    absent = [c for c in need if c not in pairs.columns]
    if absent:
        raise EvalConfigError(f"task {task.name!r}: relevance table lacks columns {absent} "
                              f"(has {sorted(map(str, pairs.columns))})")
    grades = scale_grades(np.asarray(pairs[gcol].astype(float)), r.grade_scale)
    row_of = {d: i for i, d in enumerate(docs.ids)}
    doc_rows = [row_of.get(str(d)) for d in pairs[task.doc_id_column].tolist()]
    qtexts = [[to_text(v) for v in pairs[c].tolist()] for c in qcols]
    qkeys = (pairs[task.query_id_column].astype(str).tolist() if task.query_id_column
             else ["\x1f".join(t or "" for t in ts) for ts in zip(*qtexts)])
    rel: dict[str, dict[int, int]] = {}
    first: dict[str, int] = {}
    no_doc = low = 0
    for j, (qk, d, g) in enumerate(zip(qkeys, doc_rows, grades)):
        if all(t[j] is None for t in qtexts):
            continue
        first.setdefault(qk, j)
        if d is None:
            no_doc += 1
            continue
        if not np.isfinite(g) or g < r.min_grade:
            low += 1
            continue
        cur = rel.setdefault(qk, {})
        cur[d] = max(cur.get(d, 0), int(g))
    if no_doc:
        log.warning("task %s: %d relevance rows name documents missing from the corpus (dropped)", task.name, no_doc)
    if low:
        log.info("task %s: %d relevance rows below min_grade=%s dropped", task.name, low, r.min_grade)
    keys = sorted(rel)
    p = None
    if task.query_sampling == "grade":
        w = np.array([sum(rel[k].values()) for k in keys], dtype=np.float64)
        p = w / w.sum() if w.sum() > 0 else None
    chosen = _sample(len(keys), task.num_queries, _rng(seed, task.name), p)
    ids, texts, qrels = [], {f: [] for f in qfields}, {}
    for j in chosen:
        k = keys[j]
        qid = f"q{len(ids)}"
        ids.append(qid)
        for f, col in zip(qfields, qtexts):
            texts[f].append(col[first[k]])
        qrels[qid] = {str(d): g for d, g in rel[k].items()}
    return Queries(ids=ids, texts=texts, qrels=qrels)


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


def to_run(query_ids: Sequence[str], scores: torch.Tensor, indices: torch.Tensor,
           valid: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """Top-k (FloatTensor[Q,k], LongTensor[Q,k]) -> pytrec_eval run ``{qid: {str(doc_row): score}}``.

    ``valid`` (BoolTensor[N]) drops documents that have no vector (all fields missing).
    """
    run: dict[str, dict[str, float]] = {}
    sc, ix = scores.tolist(), indices.tolist()
    ok = None if valid is None else valid.tolist()
    for q, s_row, i_row in zip(query_ids, sc, ix):
        run[q] = {str(i): float(s) for s, i in zip(s_row, i_row) if i >= 0 and (ok is None or ok[i])}
    return run


def score_retrieval(q: torch.Tensor, d: torch.Tensor, qrels: Mapping[str, Mapping[str, int]],
                    query_ids: Sequence[str], *, k: int, metrics: Sequence[str], chunk_size: int,
                    device: torch.device | str = "cpu",
                    doc_valid: torch.Tensor | None = None) -> tuple[dict[str, float], dict[str, dict[str, float]],
                                                                    torch.Tensor]:
    """Exact fp32 retrieval of the top ``k`` documents per query, then the metrics.

    Args:
        q: FloatTensor[Q, D] normalized query vectors; d: FloatTensor[N, D] normalized document vectors.
        qrels: ``{qid: {str(doc_row): grade}}`` for the ``query_ids`` (Q of them, in ``q``'s order).
    Returns: (metric -> mean over queries, the run dict, LongTensor[Q, k'] of top document rows).
    """
    from gcl.eval.metrics import compute
    from gcl.eval.retrieval import topk

    kk = min(k, d.shape[0])
    scores, idx = topk(q.float(), d.float(), kk, chunk_size=chunk_size, device=device)
    run = to_run(query_ids, scores, idx, doc_valid)
    values = compute({qid: dict(qrels[qid]) for qid in query_ids}, run, list(metrics))
    return {m: float(values[m]) for m in metrics}, run, idx


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
