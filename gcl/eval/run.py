"""The evaluation runner: embed each document set once, run every task, write JSON / markdown / gallery.

Entry points:

* ``build_evaluator(eval_cfg, splits=, data_cfg=)`` -> ``Evaluator``; the trainer calls
  ``evaluator(encoder, bundle, step=, out_dir=, rank=, world_size=, device=)`` every ``eval_every`` steps.
* ``evaluate_model(model, eval_cfg, ...)`` -> ``dict[str, float]``: the same for a ``ModelBundle`` (or a
  ``FieldEncoder`` + bundle), e.g. from a notebook.
* ``run(cfg)``: ``python evaluate.py`` (Hydra) - loads a run dir / checkpoint file / export dir or an open_clip
  model and evaluates it.

Metrics are flat: ``<suite>/<task>/<metric>`` per task and ``<suite>/<aggregate>/<metric>`` for the cross-task
means (a suite named ``""`` adds no prefix: its task names carry theirs, e.g. ``eval=synthetic_world``).
Files under ``out_dir``: per evaluation ``step_XXXXXX.json`` (flat metrics; ``metrics.json`` when ``step`` is
None) and a folder of the same stem with ``tasks/<task>.json``, ``results.md``, ``gallery.png`` and, per retrieval
task, TREC files ``runs/<task>.run``, ``.qrels`` and ``.queries.tsv`` (``gcl.eval.trec``; what
``python -m gcl.eval.compare`` reads).

Distributed: by default rank 0 does all the work and broadcasts the metrics to every rank (the others
wait), so every rank returns the same dict. With ``eval.sharded`` the document embedding (the expensive
part) is split across ranks - shards by ``rank::world_size``, table rows by ``row % world_size`` - and
gathered on rank 0 in canonical order, so results equal the single-process run up to float round-off.

Lives here: the ``Evaluator`` (task sources, the document pass per source with its embedding cache, scoring,
output files) and the entry points above. Not here: document loaders (``gcl.eval.sources``), the batch
embedder (``gcl.eval.embed``), model loading for ``evaluate.py`` (``gcl.eval.load``), collectives
(``gcl.distributed``), task definitions / scoring (``gcl.eval.tasks``), queries (``gcl.eval.queries``),
metrics, reports, TREC files (``gcl.eval.trec``).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gcl.data.image import parse_background
from gcl.distributed import PeerFailure, broadcast_object, dist_or_none
from gcl.eval import queries as Q
from gcl.eval import tasks as T
from gcl.eval import trec
from gcl.eval.embed import Embedder
from gcl.eval.load import adopt_run_config, load_model_for_eval
from gcl.eval.report import GalleryRow, markdown_report, save_gallery
from gcl.eval.sources import ShardDocs, SourceNeeds, TableDocs, source_needs
from gcl.eval.zeroshot import class_embeddings, evaluate_zeroshot

log = logging.getLogger(__name__)

IMAGE = T.IMAGE


# ----------------------------------------------------------------------------------------- the suite

@dataclass
class _TaskResult:
    metrics: dict[str, float]
    counts: dict[str, int]
    detail: dict[str, Any]
    gallery: list[GalleryRow] | None = None
    run: dict[str, dict[str, float]] | None = None  # retrieval tasks: what the TREC files hold
    queries: Q.Queries | None = None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "task"


def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=float))
    tmp.replace(path)


def _plain(x: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(x):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if hasattr(x, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(x)
    return x


class Evaluator:
    """A configured evaluation suite; call it with a model to get flat metrics (see module docstring).

    Args:
        cfg: the ``eval`` node (``gcl.eval.schema.EvalConfig`` or its DictConfig).
        splits: split name -> shard pattern(s), for tasks with ``split`` (``gcl.data.resolve_splits``).
        context_length: per text field token budgets (fields not listed use ``default_context_length``).
        list_sep: how list-valued fields are joined (the data config's ``list_sep``).
        image_background: the colour under transparent pixels (the data config's ``image_background``).
        cache: an ``EmbeddingCache`` for document embeddings (standalone evaluation), or None.
    """

    def __init__(self, cfg: Any, *, splits: Mapping[str, Any] | None = None,
                 context_length: Mapping[str, int] | None = None, default_context_length: int = 77,
                 list_sep: str = ", ", image_background: str = "white", cache: Any = None) -> None:
        T.validate_tasks(cfg)
        self.cfg = cfg
        self.splits = dict(splits or {})
        self.context_length = dict(context_length or {})
        self.default_context_length = int(default_context_length)
        self.list_sep = list_sep
        self.image_background = parse_background(image_background)
        self.cache = cache
        self.tasks = list(cfg.tasks)
        self.gallery_task = self._gallery_task()

    def _gallery_task(self) -> str | None:
        g = self.cfg.gallery
        if not g.enabled:
            return None
        if g.task:
            return g.task
        for t in self.tasks:
            if t.kind == "retrieval" and IMAGE in t.doc.fields:
                return t.name
        return None

    # -- sources
    def source_spec(self, t: Any) -> T.SourceSpec:
        """The document source of task ``t`` (resolved paths; raises MissingDataError with a fix)."""
        root = self.cfg.data_root
        if t.split:
            urls = self.splits.get(t.split)
            if not urls:
                have = sorted(k for k, v in self.splits.items() if v)
                fix = (f"set data.{t.split}_shards=PATTERN" if t.split in ("val", "test") else
                       f"{t.split!r} is a split of the synthetic catalog only (data.train_shards=null); with your "
                       "data, give the task its shards (eval.tasks[i].shards=PATTERN) or use split val/test with "
                       "data.val_shards/data.test_shards")
                raise T.MissingDataError(f"task {t.name!r} reads split {t.split!r}, but the data config gives no "
                                         f"shards for it (splits: {have}); {fix}")
            urls = [urls] if isinstance(urls, str) else list(urls)
            return T.SourceSpec("shards", tuple(urls), max_docs=t.max_docs)
        if t.shards:
            pat = t.shards
            if root and not (os.path.isabs(pat) or "://" in pat or pat.startswith("pipe:")):
                pat = str(Path(os.path.expanduser(root)) / pat)
            return T.SourceSpec("shards", (pat,), max_docs=t.max_docs)
        cols = tuple(sorted(dict(t.columns).items()))
        image_root = None
        if t.image_root:
            image_root = str(T.resolve_path(t.image_root, root, what=f"task {t.name!r} image_root",
                                            hint=t.hf_dataset))
        if t.relevance.rule == "graded":
            corpus = T.resolve_path(t.corpus, root, what=f"task {t.name!r} corpus", hint=t.hf_dataset)
            return T.SourceSpec("table", tuple(str(p) for p in T.table_files(corpus)), cols, t.image_column,
                                image_root, t.doc_id_column, t.max_docs)
        table = T.resolve_path(t.table, root, what=f"task {t.name!r} table", hint=t.hf_dataset)
        # multi_image max/min scores every row (image) of an item: the rows stay documents, doc_id_column then
        # only names the item (through columns.item_id) instead of de-duplicating the table
        doc_id = t.doc_id_column if t.multi_image == "first" else None
        return T.SourceSpec("table", tuple(str(p) for p in T.table_files(table)), cols, t.image_column, image_root,
                            doc_id, t.max_docs)

    def relevance_paths(self, t: Any) -> list[Path]:
        """The files a task's relevance rule reads besides the documents (resolved; MissingDataError with a fix):
        the (query, doc, grade) table (graded), the qrels file and its query texts (fixed), else none."""
        root, r = self.cfg.data_root, t.relevance
        if t.kind != "retrieval":
            return []
        if r.rule == "graded":
            return [T.resolve_path(t.table, root, what=f"task {t.name!r} table", hint=t.hf_dataset)]
        if r.rule == "fixed":
            hint = r.qrels_source or t.hf_dataset
            return [T.resolve_path(f, root, what=f"task {t.name!r} relevance.{key}", hint=hint)
                    for key, f in (("qrels_file", r.qrels_file), ("queries_file", r.queries_file)) if f]
        return []

    def relevance_input(self, t: Any) -> Any:
        """What a task's relevance rule reads: the graded table's DataFrame, the FixedQueries, else None."""
        paths = self.relevance_paths(t)
        if t.relevance.rule == "graded":  # only the columns it uses: a Hub Parquet split also holds every image
            return T.read_table(T.table_files(paths[0]), Q.pair_columns(t))
        if t.relevance.rule == "fixed":
            return Q.load_fixed_queries(*paths)
        return None

    def budgets(self, bundle: Any) -> tuple[dict[str, int], int]:
        """Token budgets (per field, default) for this suite: ``eval.context_length`` when set (0 = the model's
        own), else the data config's per-field budgets; the Embedder caps them at the model's."""
        n = self.cfg.context_length
        if n is None:
            return self.context_length, self.default_context_length
        if n == 0:
            return {}, int(getattr(bundle, "context_length", None) or self.default_context_length)
        return {}, int(n)

    # -- main
    def __call__(self, encoder: Any, bundle: Any, *, step: int | None = None, out_dir: str | os.PathLike | None = None,
                 rank: int = 0, world_size: int = 1, device: torch.device | str | None = None) -> dict[str, float]:
        """Evaluate with ``encoder`` (a FieldEncoder of the live model) and ``bundle`` (tokenizer, transforms).

        Returns the same flat metrics dict on every rank (see module docstring for the distributed modes).
        """
        sharded = bool(self.cfg.sharded) and world_size > 1
        if world_size > 1 and dist_or_none() is None:
            raise RuntimeError("world_size > 1 but torch.distributed is not initialized")
        if device is None:
            device = next(bundle.model.parameters()).device
        device = torch.device(device)
        ctx, default_ctx = self.budgets(bundle)
        emb = Embedder(encoder, bundle.tokenizer, ctx, default_ctx, device, int(self.cfg.batch_size),
                       getattr(bundle, "context_length", None), getattr(bundle, "pad_id", 0))
        result: dict[str, Any]
        try:
            metrics = self._evaluate(emb, bundle, step=step, out_dir=out_dir, rank=rank, world_size=world_size,
                                     sharded=sharded)
            result = {"ok": metrics}
        except Exception as exn:
            if world_size <= 1:
                raise
            log.exception("evaluation failed on rank %d", rank)
            result = {"error": f"{type(exn).__name__}: {exn}"}
        if world_size > 1:
            result = broadcast_object(result if rank == 0 else None, world_size)
        if "error" in result:
            raise RuntimeError(f"evaluation failed on rank 0: {result['error']}")
        return result["ok"]

    def _evaluate(self, emb: Embedder, bundle: Any, *, step: int | None, out_dir: Any, rank: int, world_size: int,
                  sharded: bool) -> dict[str, float] | None:
        t0 = time.perf_counter()
        if rank != 0 and not sharded:
            return None
        suite = self.cfg.name
        specs = {t.name: self.source_spec(t) for t in self.tasks}
        for t in self.tasks:  # a missing relevance file fails now, not after the documents are embedded
            self.relevance_paths(t)
        order: list[T.SourceSpec] = list(dict.fromkeys(specs.values()))
        per_task: dict[str, dict[str, float]] = {}
        results: dict[str, _TaskResult] = {}
        # Sharded: rank 0 works on a source after the other ranks have moved on to the next one. If it fails
        # there, it keeps joining the later gathers with the error (so nobody waits forever), then raises.
        failed: Exception | None = None
        for spec in order:
            tasks = [t for t in self.tasks if specs[t.name] == spec]
            needs = source_needs(tasks)
            src: ShardDocs | TableDocs = (ShardDocs(spec.location, self.image_background) if spec.kind == "shards"
                                          else TableDocs(spec, self.image_background))
            ts = time.perf_counter()
            try:
                docs = self._load_docs(src, spec, emb, bundle, needs, rank=rank, world_size=world_size,
                                       sharded=sharded,
                                       abort=None if failed is None else f"{type(failed).__name__}: {failed}")
                if docs is None:  # a non-zero rank in sharded mode: its part is done
                    continue
                log.info("eval %s: embedded %d documents (%s) in %.1fs", suite, len(docs),
                         ", ".join(sorted(needs.embed)), time.perf_counter() - ts)
                for t in tasks:
                    res = self._run_task(t, docs, emb, src, self.relevance_input(t))
                    results[t.name] = res
                    per_task[t.name] = T.add_means(res.metrics, dict(self.cfg.means))
            except PeerFailure:
                raise  # every rank raises it together
            except Exception as exn:
                if not sharded:
                    raise
                failed = failed or exn
        if failed is not None:
            raise failed
        if rank != 0:
            return None
        flat: dict[str, float] = {}
        prefix = f"{suite}/" if suite else ""  # an empty suite name: the task names carry their suites
        for name, vals in per_task.items():
            flat.update({f"{prefix}{name}/{m}": v for m, v in vals.items()})
        aggs: dict[str, dict[str, float]] = {}
        for a in self.cfg.aggregates:
            vals, matched = T.aggregate(per_task, list(a.tasks), list(a.metrics))
            if vals:
                aggs[a.name] = vals
                flat.update({f"{prefix}{a.name}/{m}": v for m, v in vals.items()})
        if out_dir is not None:
            self._write(Path(out_dir), suite, step, flat, per_task, aggs, results, bundle)
        log.info("eval %s done in %.1fs: %s", suite, time.perf_counter() - t0,
                 ", ".join(f"{k}={v:.4f}" for k, v in list(flat.items())[:6]))
        return flat

    def _load_docs(self, src: Any, spec: T.SourceSpec, emb: Embedder, bundle: Any, needs: SourceNeeds, *,
                   rank: int, world_size: int, sharded: bool, abort: str | None = None) -> T.DocSet | None:
        kwargs = dict(image_transform=bundle.preprocess_val, num_workers=int(self.cfg.num_workers),
                      list_sep=self.list_sep, max_docs=spec.max_docs, rank=rank, world_size=world_size,
                      sharded=sharded, abort=abort)
        key = self._cache_key(spec, needs, emb, bundle) if self.cache is not None and not sharded else None
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                tensors, side = hit
                log.info("eval: document embeddings of %s from the cache (%s)", spec.location[0], key[:12])
                if isinstance(src, TableDocs):
                    src.reader = T.TableReader(spec, sorted(needs.meta), list_sep=self.list_sep, optional=(T.ITEM_ID,),
                                               image_background=self.image_background)
                raw = side.get("raw_rows")  # JSON object keys are strings: back to row numbers
                return T.DocSet(ids=side["ids"], item_ids=side["item_ids"], meta=side["meta"],
                                emb={f[4:]: v for f, v in tensors.items() if f.startswith("emb/")},
                                present={f[8:]: v.bool() for f, v in tensors.items() if f.startswith("present/")},
                                rows_meta=side.get("rows_meta"), row_doc=side.get("row_doc"),
                                raw_rows={f: {int(r): x for r, x in v.items()} for f, v in raw.items()}
                                if raw is not None else None)
        docs = src.load(emb, needs, **kwargs)
        if key is not None and docs is not None:
            tensors = {**{f"emb/{f}": v for f, v in docs.emb.items()},
                       **{f"present/{f}": v for f, v in docs.present.items()}}
            self.cache.put(key, tensors, {"ids": docs.ids, "item_ids": docs.item_ids, "meta": docs.meta,
                                          "rows_meta": docs.rows_meta, "row_doc": docs.row_doc,
                                          "raw_rows": docs.raw_rows})
        return docs

    def _cache_key(self, spec: T.SourceSpec, needs: SourceNeeds, emb: Embedder, bundle: Any) -> str | None:
        """The embedding-cache key of a document pass: weights, preprocessing, tokenization, data files (size +
        mtime; image files too when a table points at them), fields. None (no caching) for remote data."""
        from gcl.eval.retrieval import files_fingerprint, model_fingerprint

        try:
            if spec.kind == "shards":
                from gcl.data.stream import expand_urls

                files = expand_urls(list(spec.location))
            else:
                files = list(spec.location)
                if IMAGE in needs.embed:
                    reader = T.TableReader(spec, [], list_sep=self.list_sep)
                    if not reader.lazy_images:  # images referenced by path: their files are data too
                        files += [str(p) for p in reader.doc_image_paths()]
            data = files_fingerprint(files)
        except (FileNotFoundError, ValueError) as exn:
            log.info("eval: embedding cache off for %s (%s)", spec.location[0], exn)
            return None
        return self.cache.key(
            model=model_fingerprint(bundle.model), preprocess=repr(bundle.preprocess_val), data=data,
            spec={"kind": spec.kind, "columns": list(spec.columns), "image_column": spec.image_column,
                  "doc_id_column": spec.doc_id_column, "max_docs": spec.max_docs, "embed": sorted(needs.embed),
                  "meta": sorted(needs.meta), "list_sep": self.list_sep,
                  # how pixels are decoded (gcl.data.image): version 2 composites transparency and scales 16-bit
                  "image_decode": [2, list(self.image_background)],
                  "context": {f: emb.context_length(f) for f in sorted(needs.embed | needs.meta) if f != IMAGE},
                  "tokenizer": type(emb.tokenizer).__name__, "version": 2})

    # -- one task
    def _run_task(self, t: Any, docs: T.DocSet, emb: Embedder, src: Any, relevance_input: Any) -> _TaskResult:
        ts = time.perf_counter()
        if t.kind == "zeroshot":
            return self._run_zeroshot(t, docs, emb)
        queries = Q.build_queries(t, docs, int(self.cfg.seed), relevance_input)
        if not len(queries):
            raise T.EvalConfigError(f"task {t.name!r}: no queries (no document has the query fields "
                                    f"{list(t.query.fields)} with a relevant document)")
        qemb: dict[str, torch.Tensor] = {}
        qpresent: dict[str, torch.Tensor] = {}
        for f in t.query.fields:
            if f == IMAGE:
                rows = torch.tensor(queries.doc_rows, dtype=torch.long)
                qemb[f], qpresent[f] = docs.emb[IMAGE][rows], docs.present[IMAGE][rows]
            else:
                qemb[f], qpresent[f] = emb.optional_strings(queries.embedded(f), f)
        q, q_ok = T.fuse(qemb, qpresent, list(t.query.fields), list(t.query.weights))
        d, d_ok = T.fuse(docs.emb, docs.present, list(t.doc.fields), list(t.doc.weights))
        if not bool(q_ok.all()):
            log.warning("task %s: %d queries have no embeddable field", t.name, int((~q_ok).sum()))
        n_bad = int((~d_ok).sum())
        if n_bad:
            log.warning("task %s: %d of %d documents have none of the fields %s and cannot be retrieved", t.name,
                        n_bad, len(docs), list(t.doc.fields))
        units = Q.unit_ids(t, docs)
        metrics, run, top = T.score_retrieval(q, d, queries.qrels, queries.ids, k=int(t.k), metrics=list(t.metrics),
                                             chunk_size=int(self.cfg.chunk_size), device=emb.device,
                                             doc_valid=d_ok, doc_ids=docs.ids, units=units,
                                             multi_image=t.multi_image, precision=self.cfg.score_precision)
        counts = {"queries": len(queries), "docs": len(docs)}
        detail = {"examples": [
            {"query": _query_text(queries, j), "relevant": len(queries.qrels[qid]),
             "top": [units[int(i)] for i in top[j, :5] if i >= 0]}
            for j, qid in enumerate(queries.ids[:5])]}
        gallery = None
        if t.name == self.gallery_task:
            gallery = self._gallery(queries, top, docs, units, src)
        log.info("task %s: %d queries x %d docs in %.1fs", t.name, len(queries), len(docs), time.perf_counter() - ts)
        return _TaskResult(metrics, counts, detail, gallery, run if self.cfg.write_runs else None, queries)

    def _run_zeroshot(self, t: Any, docs: T.DocSet, emb: Embedder) -> _TaskResult:
        labels = docs.meta[t.labels_field]
        names = list(t.labels) or sorted({v for v in labels if v is not None})
        cls = class_embeddings(lambda xs: emb.strings(xs, t.labels_field), names, list(t.prompt_templates))
        metrics, pred, rows = evaluate_zeroshot(docs.emb[IMAGE], labels, names, cls, list(t.metrics),
                                                docs.present.get(IMAGE))
        return _TaskResult(metrics, {"docs": len(rows), "classes": len(names)}, {"classes": names})

    def _gallery(self, queries: Q.Queries, top: torch.Tensor, docs: T.DocSet, units: list[str],
                 src: Any) -> list[GalleryRow]:
        g = self.cfg.gallery
        n = min(int(g.num_queries), len(queries))
        gen = torch.Generator().manual_seed(int(self.cfg.seed))
        pick = sorted(torch.randperm(len(queries), generator=gen)[:n].tolist())
        k = min(int(g.k), top.shape[1])
        shown = {j: [int(i) for i in top[j, :k] if i >= 0] for j in pick}  # -1: fewer ranked units than k
        want = [docs.ids[i] for j in pick for i in shown[j]]
        try:
            imgs = dict(zip(want, src.images(want)))
        except Exception as exn:  # noqa: BLE001 - the gallery must never fail an evaluation
            log.warning("gallery images unavailable: %r", exn)
            imgs = {}
        rows = []
        for j in pick:
            judged = queries.qrels[queries.ids[j]]
            rows.append(GalleryRow(query=_query_text(queries, j), images=[imgs.get(docs.ids[i]) for i in shown[j]],
                                   hits=[judged.get(units[i], 0) > 0 for i in shown[j]], n_relevant=len(judged)))
        return rows

    # -- outputs
    def _write(self, out_dir: Path, suite: str, step: int | None, flat: dict[str, float],
               per_task: dict[str, dict[str, float]], aggs: dict[str, dict[str, float]],
               results: dict[str, _TaskResult], bundle: Any) -> None:
        stem = f"step_{step:06d}" if step is not None else "metrics"
        base = out_dir / (stem if step is not None else "")
        _write_json(flat, out_dir / f"{stem}.json")
        for name, r in results.items():
            cfg = next(_plain(t) for t in self.tasks if t.name == name)
            files = _write_trec(base, _safe(name), r) if r.run is not None else None
            _write_json({"suite": suite, "task": name, "step": step, "metrics": per_task[name], "counts": r.counts,
                         **r.detail, **({"files": files} if files else {}), "config": cfg},
                        base / "tasks" / f"{_safe(name)}.json")
        md = markdown_report(suite or "multi-suite", per_task, aggs, model=_model_name(bundle), step=step,
                             counts={n: r.counts for n, r in results.items()})
        (base / "results.md").write_text(md)
        for name, r in results.items():
            if r.gallery:
                save_gallery(base / "gallery.png", r.gallery, thumb=int(self.cfg.gallery.thumb_size),
                             title=f"{suite}/{name}" + (f" @ step {step}" if step is not None else ""))


def _write_trec(base: Path, stem: str, r: _TaskResult) -> dict[str, str]:
    """A retrieval task's run, qrels and query texts as TREC files under ``base/runs``; their paths (relative)."""
    assert r.run is not None and r.queries is not None
    files = {"run": f"runs/{stem}.run", "qrels": f"runs/{stem}.qrels", "queries": f"runs/{stem}.queries.tsv"}
    trec.write_run(base / files["run"], r.run)
    trec.write_qrels(base / files["qrels"], r.queries.qrels)
    trec.write_queries(base / files["queries"], {qid: _query_text(r.queries, j) for j, qid in enumerate(r.queries.ids)})
    return files


def _query_text(queries: Q.Queries, j: int) -> str:
    parts = [f"{f}: {v[j]}" if len(queries.texts) > 1 else str(v[j])
             for f, v in queries.texts.items() if v[j] is not None]
    if queries.doc_rows is not None and not parts:
        parts = [f"[image of document row {queries.doc_rows[j]}]"]
    return " | ".join(parts)


def _model_name(bundle: Any) -> str | None:
    name = getattr(bundle, "name", None)
    pre = getattr(bundle, "pretrained", None)
    return f"{name} ({pre})" if name and pre else name


# -------------------------------------------------------------------------------------- entry points

def build_evaluator(cfg: Any, *, splits: Mapping[str, Any] | None, data_cfg: Any, cache: Any = None) -> Evaluator:
    """An Evaluator for the ``eval`` node ``cfg``, with text budgets and list joining from ``data_cfg``."""
    return Evaluator(cfg, splits=splits, context_length=dict(data_cfg.context_length),
                     default_context_length=int(data_cfg.default_context_length), list_sep=str(data_cfg.list_sep),
                     image_background=str(data_cfg.image_background), cache=cache)


def evaluate_model(model: Any, cfg: Any, *, bundle: Any = None, splits: Mapping[str, Any] | None = None,
                   context_length: Mapping[str, int] | None = None, default_context_length: int = 77,
                   list_sep: str = ", ", image_background: str = "white",
                   out_dir: str | os.PathLike | None = None, step: int | None = None,
                   rank: int = 0, world_size: int = 1, device: torch.device | str | None = None,
                   cache: Any = None) -> dict[str, float]:
    """Evaluate ``model`` on the suite ``cfg`` (an ``eval`` node) and return flat metrics.

    ``model`` is a ``gcl.model.ModelBundle`` (its FieldEncoder is built here) or a FieldEncoder-like callable,
    then ``bundle`` must give ``tokenizer``, ``preprocess_val`` and ``model``.
    """
    if bundle is None:
        bundle, encoder = model, model.field_encoder()
    else:
        encoder = model
    ev = Evaluator(cfg, splits=splits, context_length=context_length, default_context_length=default_context_length,
                   list_sep=list_sep, image_background=image_background, cache=cache)
    was = bundle.model.training
    bundle.model.eval()
    try:
        return ev(encoder, bundle, step=step, out_dir=out_dir, rank=rank, world_size=world_size, device=device)
    finally:
        bundle.model.train(was)


def run(cfg: Any) -> dict[str, float]:
    """``python evaluate.py``: build the model, the splits and the suite from ``cfg``; evaluate; write files. A
    user's mistake (a bad suite, a missing or foreign checkpoint) ends with its message and exit status 2."""
    from gcl.checkpoint import CheckpointError
    from gcl.config import ConfigError
    from gcl.export import ExportError
    from gcl.log import exit_on_user_error

    try:
        return _run(cfg)
    except Exception as exn:
        exit_on_user_error(exn, (ConfigError, T.EvalConfigError, ExportError, CheckpointError))
        raise


def _run(cfg: Any) -> dict[str, float]:
    from hydra.core.hydra_config import HydraConfig

    try:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        run_dir, overrides = Path.cwd(), []
    cfg = adopt_run_config(cfg, overrides)
    out = Path(cfg.out_dir) if cfg.out_dir else run_dir / "eval"
    T.validate_tasks(cfg.eval)  # fail on a bad suite before spending time on the model
    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    bundle = load_model_for_eval(cfg.model, device=dev, work_dir=run_dir)
    needs_splits = any(t.split for t in cfg.eval.tasks)
    splits = None
    if needs_splits:
        from gcl.data import resolve_splits

        splits = resolve_splits(cfg.data, extra=[t.split for t in cfg.eval.tasks if t.split])
    cache = None
    if cfg.eval.cache_dir:
        from gcl.eval.retrieval import EmbeddingCache

        cache = EmbeddingCache(cfg.eval.cache_dir)
    metrics = evaluate_model(bundle, cfg.eval, splits=splits, context_length=dict(cfg.data.context_length),
                             default_context_length=int(cfg.data.default_context_length),
                             list_sep=str(cfg.data.list_sep), image_background=str(cfg.data.image_background),
                             out_dir=out, device=dev, cache=cache)
    md = out / "results.md"
    log.info("results: %s\n%s", out, md.read_text() if md.is_file() else json.dumps(metrics, indent=1))
    return metrics


__all__ = ["Embedder", "Evaluator", "build_evaluator", "evaluate_model", "load_model_for_eval", "run"]
