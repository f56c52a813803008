"""The evaluation runner: embed each document set once, run every task, write JSON / markdown / gallery.

Entry points:

* ``build_evaluator(eval_cfg, splits=, data_cfg=)`` -> ``Evaluator``; the trainer calls
  ``evaluator(encoder, bundle, step=, out_dir=, rank=, world_size=, device=)`` every ``eval_every`` steps.
* ``evaluate_model(model, eval_cfg, ...)`` -> ``dict[str, float]``: the same for a ``ModelBundle`` (or a
  ``FieldEncoder`` + bundle), e.g. from a notebook.
* ``run(cfg)``: ``python evaluate.py`` (Hydra) - loads a run dir / checkpoint file / export dir or an open_clip
  model and evaluates it.

Metrics are flat: ``<suite>/<task>/<metric>`` per task and ``<suite>/<aggregate>/<metric>`` for the cross-task
means. Files under ``out_dir``: per evaluation ``step_XXXXXX.json`` (flat metrics; ``metrics.json`` when
``step`` is None) and a folder of the same stem with ``tasks/<task>.json``, ``results.md``, ``gallery.png``.

Distributed: by default rank 0 does all the work and broadcasts the metrics to every rank (the others
wait), so every rank returns the same dict. With ``eval.sharded`` the document embedding (the expensive
part) is split across ranks - shards by ``rank::world_size``, table rows by ``row % world_size`` - and
gathered on rank 0 in canonical order, so results equal the single-process run up to float round-off.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from gcl.eval import tasks as T
from gcl.eval.report import GalleryRow, markdown_report, save_gallery
from gcl.eval.zeroshot import class_embeddings, evaluate_zeroshot

log = logging.getLogger(__name__)

IMAGE = T.IMAGE


# ------------------------------------------------------------------------------------------- encoding

class Embedder:
    """Batches -> fp32 L2-normalized features on CPU, through a ``FieldEncoder``-like callable.

    ``encoder(batch, fields) -> {field: FloatTensor[B, D]}`` (unnormalized, zero rows where missing);
    ``context_length(field)`` gives each text field's token budget (already capped at the model's).
    """

    def __init__(self, encoder: Any, tokenizer: Any, context_length: Mapping[str, int], default_context_length: int,
                 device: torch.device, batch_size: int, model_context_length: int | None = None,
                 pad_id: int = 0) -> None:
        self.encoder, self.tokenizer, self.device = encoder, tokenizer, device
        self.ctx, self.default_ctx = dict(context_length), int(default_context_length)
        self.model_ctx = model_context_length
        self.batch_size, self.pad_id = int(batch_size), int(pad_id)

    def context_length(self, f: str) -> int:
        n = int(self.ctx.get(f, self.default_ctx))
        return min(n, self.model_ctx) if self.model_ctx else n

    def _to(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(self.device, non_blocking=True)
        if isinstance(x, dict):
            return {k: self._to(v) for k, v in x.items()}
        return x

    @torch.no_grad()
    def batch(self, batch: Mapping[str, Any], fields: Sequence[str]) -> dict[str, torch.Tensor]:
        """Normalized FloatTensor[B, D] (CPU) per field of a batch dict (docs/architecture.md layout)."""
        b = {k: self._to(batch[k]) for k in ("image", "tokens", "present") if k in batch}
        out = self.encoder(b, list(fields))
        return {f: F.normalize(out[f].float(), dim=-1).cpu() for f in fields}

    def tokens(self, texts: Sequence[str], f: str) -> torch.Tensor:
        """LongTensor[n, L<=context]: tokenized with the field's budget, trailing all-pad columns dropped."""
        tok = self.tokenizer(list(texts), context_length=self.context_length(f)).long()
        used = (tok != self.pad_id).any(dim=0).nonzero()
        return tok[:, : max(1, int(used[-1]) + 1 if len(used) else 1)].contiguous()

    @torch.no_grad()
    def strings(self, texts: Sequence[str], f: str) -> torch.Tensor:
        """FloatTensor[n, D] normalized features of ``texts`` as field ``f`` (each distinct string encoded once)."""
        uniq = sorted(set(texts))
        pos = {s: i for i, s in enumerate(uniq)}
        parts = []
        for s in range(0, len(uniq), self.batch_size):
            chunk = uniq[s: s + self.batch_size]
            batch = {"tokens": {f: self.tokens(chunk, f)}, "present": {f: torch.ones(len(chunk), dtype=torch.bool)}}
            parts.append(self.batch(batch, [f])[f])
        table = torch.cat(parts) if parts else torch.zeros(0, 0)
        return table[[pos[s] for s in texts]] if texts else table

    def optional_strings(self, texts: Sequence[str | None], f: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(FloatTensor[n, D] with zero rows for None, BoolTensor[n] present) of possibly-missing strings."""
        present = torch.tensor([t is not None for t in texts], dtype=torch.bool)
        vals = [t for t in texts if t is not None]
        enc = self.strings(vals, f)
        if enc.numel() == 0:
            dim = self.embed_dim()
            return torch.zeros(len(texts), dim), present
        out = torch.zeros(len(texts), enc.shape[1])
        out[present] = enc
        return out, present

    def embed_dim(self) -> int:
        return int(self.strings(["a"], "__probe__").shape[1])


# --------------------------------------------------------------------------------------- distributed

def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _gather(obj: Any, world_size: int) -> list[Any]:
    dist = _dist()
    if world_size <= 1 or dist is None:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class PeerFailure(RuntimeError):
    """Raised on every rank together when some rank failed its part of a sharded evaluation."""


def _gather_checked(work: Callable[[], Any], world_size: int, rank: int, abort: str | None = None) -> list[Any]:
    """Run this rank's ``work()`` and all-gather the results, failing on every rank if any rank failed.

    A rank that raises (or arrives with ``abort``, an earlier failure of its own) still joins the gather,
    sending its error instead of a result, so no rank is left waiting in a collective that never completes.
    """
    if world_size <= 1 or _dist() is None:
        if abort is not None:
            raise RuntimeError(abort)
        return [work()]
    if abort is not None:
        payload: tuple[str, Any] = ("error", f"rank {rank}: {abort}")
    else:
        try:
            payload = ("ok", work())
        except Exception as exn:  # noqa: BLE001 - reported to every rank below
            log.exception("evaluation failed on rank %d", rank)
            payload = ("error", f"rank {rank}: {type(exn).__name__}: {exn}")
    parts = _gather(payload, world_size)
    errors = [p[1] for p in parts if p[0] == "error"]
    if errors:
        raise PeerFailure("sharded evaluation failed: " + "; ".join(errors))
    return [p[1] for p in parts]


def _broadcast(obj: Any, world_size: int) -> Any:
    dist = _dist()
    if world_size <= 1 or dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------- doc passes

@dataclass
class _Needs:
    """What one source must provide for its tasks."""

    meta: set[str] = field(default_factory=set)  # text fields whose strings are needed
    embed: set[str] = field(default_factory=set)  # fields embedded per document (image, doc-side text)


def _source_needs(tasks: Sequence[Any]) -> _Needs:
    n = _Needs()
    for t in tasks:
        if t.kind == "zeroshot":
            n.meta.add(t.labels_field)
            n.embed.add(IMAGE)
            continue
        n.embed.update(t.doc.fields)
        if t.relevance.rule != "graded":  # graded queries come from the relevance table, not the documents
            n.meta.update(f for f in t.query.fields if f != IMAGE)
        if IMAGE in t.query.fields:
            n.embed.add(IMAGE)
        if t.relevance.rule == "field" and t.relevance.field:
            n.meta.add(t.relevance.field)
    n.meta.update(f for f in n.embed if f != IMAGE)
    return n


class _ShardDocs:
    """A document set read from webdataset shards through ``gcl.data.stream.build_eval_loader``."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)

    def load(self, emb: Embedder, needs: _Needs, *, image_transform: Any, num_workers: int, list_sep: str,
             max_docs: int, rank: int, world_size: int, sharded: bool, abort: str | None = None) -> T.DocSet | None:
        text_fields = sorted(needs.meta) or ["title"]  # the loader needs >= 1 text field
        embed = sorted(needs.embed)
        parts = _gather_checked(lambda: self._local(emb, text_fields, embed, image_transform, num_workers, list_sep,
                                                    max_docs, rank, world_size, sharded),
                                world_size if sharded else 1, rank, abort)
        if rank != 0 and sharded:
            return None
        keys = [k for p in parts for k in p[0]]
        order = sorted(range(len(keys)), key=keys.__getitem__)  # canonical order: by sample key
        if max_docs:
            order = order[:max_docs]
        items = [i for p in parts for i in p[1]]
        meta = {f: [v for p in parts for v in p[2][f]] for f in text_fields}
        cat = {f: torch.cat([p[3][f] for p in parts if p[3][f].numel()]) if any(p[3][f].numel() for p in parts)
               else torch.zeros(0) for f in embed}
        prs = {f: torch.cat([p[4][f] for p in parts]) for f in embed}
        dup = len(keys) - len(set(keys))
        if dup:
            log.warning("eval shards %s: %d duplicate sample keys", self.urls, dup)
        idx = torch.tensor(order, dtype=torch.long)
        return T.DocSet(ids=[keys[i] for i in order], item_ids=[items[i] for i in order],
                        meta={f: [v[i] for i in order] for f, v in meta.items()},
                        emb={f: v[idx] if v.numel() else v for f, v in cat.items()},
                        present={f: v[idx] for f, v in prs.items()})

    def _local(self, emb: Embedder, text_fields: list[str], embed: list[str], image_transform: Any, num_workers: int,
               list_sep: str, max_docs: int, rank: int, world_size: int, sharded: bool) -> tuple:
        """This rank's documents: (keys, item ids, meta fields, embeddings, present masks)."""
        from gcl.data.stream import build_eval_loader

        loader = build_eval_loader(
            self.urls if len(self.urls) > 1 else self.urls[0], tokenizer=emb.tokenizer,
            context_length={f: emb.context_length(f) for f in text_fields}, image_transform=image_transform,
            batch_size=emb.batch_size, fields=text_fields, num_workers=num_workers,
            rank=rank if sharded else 0, world_size=world_size if sharded else 1, list_sep=list_sep)
        keys: list[str] = []
        items: list[str] = []
        meta: dict[str, list[str | None]] = {f: [] for f in text_fields}
        feats: dict[str, list[torch.Tensor]] = {f: [] for f in embed}
        pres: dict[str, list[torch.Tensor]] = {f: [] for f in embed}
        for batch in loader:
            out = emb.batch(batch, embed)
            for f in embed:
                feats[f].append(out[f])
                pres[f].append(batch["present"][f].cpu())
            keys += batch["key"]
            items += [str(int(x)) for x in batch["item_id"]]
            for f in text_fields:
                meta[f] += batch["text"][f]
            if max_docs and not sharded and len(keys) >= max_docs:
                break
        if loader.skipped:
            log.warning("eval shards %s: skipped samples %s", self.urls, loader.skipped)
        return (keys, items, meta, {f: torch.cat(v) if v else torch.zeros(0) for f, v in feats.items()},
                {f: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool) for f, v in pres.items()})

    def images(self, ids: Sequence[str]) -> list[Image.Image | None]:
        """Original images of some sample keys (local shards only; None otherwise), for the gallery."""
        from gcl.data.schema import IMAGE_EXTS
        from gcl.data.stream import expand_urls

        want, got = set(ids), {}
        for url in expand_urls(self.urls):
            if not os.path.isfile(url) or len(got) == len(want):
                continue
            with tarfile.open(url) as tf:
                for m in tf:
                    stem, _, ext = m.name.rpartition("/")[2].partition(".")
                    if stem in want and ext.lower() in IMAGE_EXTS and stem not in got:
                        try:
                            with Image.open(tf.extractfile(m)) as im:  # type: ignore[arg-type]
                                got[stem] = im.convert("RGB")
                        except Exception as exn:  # noqa: BLE001 - a gallery thumbnail is optional
                            log.warning("gallery: cannot read %s from %s: %r", stem, url, exn)
        return [got.get(i) for i in ids]


class _TableDocs:
    """A document set read from a table (Parquet / CSV / JSON); images decoded in DataLoader workers."""

    def __init__(self, spec: T.SourceSpec) -> None:
        self.spec = spec
        self.reader: T.TableReader | None = None

    def load(self, emb: Embedder, needs: _Needs, *, image_transform: Any, num_workers: int, list_sep: str,
             max_docs: int, rank: int, world_size: int, sharded: bool, abort: str | None = None) -> T.DocSet | None:
        with_images = IMAGE in needs.embed
        if sharded and not with_images and rank != 0:
            return None  # rank 0 reads the table and embeds its texts alone
        gathered = _gather_checked(
            lambda: self._local(emb, needs, image_transform, num_workers, list_sep, rank, world_size, sharded),
            world_size if sharded and with_images else 1, rank, abort)
        if rank != 0 and sharded:
            return None
        reader = self.reader
        assert reader is not None
        n = reader.n
        parts_emb: dict[str, torch.Tensor] = {}
        parts_present: dict[str, torch.Tensor] = {}
        if with_images:
            idx_all = [i for g in gathered for i in g[0]]
            bad = [x for g in gathered for x in g[2]]
            if bad:
                log.warning("table %s: %d unreadable images skipped (first: document %s: %s)",
                            self.spec.location[0], len(bad), reader.ids[bad[0][0]], bad[0][1])
            allf = [g[1] for g in gathered if g[1].numel()]
            if allf:
                cat = torch.cat(allf)
                img = torch.zeros(n, cat.shape[1])
                img[torch.tensor(idx_all, dtype=torch.long)] = cat
            else:
                img = torch.zeros(n, emb.embed_dim())
            present = torch.zeros(n, dtype=torch.bool)
            present[torch.tensor(idx_all, dtype=torch.long)] = True
            parts_emb[IMAGE], parts_present[IMAGE] = img, present
        for f in sorted(needs.embed - {IMAGE}):
            parts_emb[f], parts_present[f] = emb.optional_strings(reader.meta[f], f)
        return T.DocSet(ids=reader.ids, item_ids=reader.item_ids(), meta=dict(reader.meta), emb=parts_emb,
                        present=parts_present, rows_meta=reader.rows_meta if reader.deduped else None,
                        row_doc=reader.row_doc)

    def _local(self, emb: Embedder, needs: _Needs, image_transform: Any, num_workers: int, list_sep: str, rank: int,
               world_size: int, sharded: bool) -> tuple | None:
        """Read the table (into ``self.reader``) and embed this rank's share of its images:
        (document indices, features, unreadable (document, error) pairs); None when no task embeds images."""
        reader = T.TableReader(self.spec, sorted(needs.meta), list_sep=list_sep, optional=(T.ITEM_ID,))
        self.reader = reader
        if IMAGE not in needs.embed:
            return None
        if self.spec.image_column is None:
            raise T.EvalConfigError(f"table {self.spec.location[0]!r}: a task embeds images but the task has no "
                                    "image_column; set it to the column holding image bytes or paths")
        mine = [j for j in range(reader.n) if not (sharded and world_size > 1) or j % world_size == rank]
        doc_of_row = {reader.doc_rows[j]: j for j in mine}
        ds = T.ImageDataset(reader, image_transform, set(doc_of_row))
        loader = torch.utils.data.DataLoader(ds, batch_size=emb.batch_size, num_workers=num_workers,
                                             collate_fn=T.collate_images)
        idx_all, feats, bad = [], [], []
        for b in loader:
            bad += [(doc_of_row[r], e) for r, e in b["bad"]]
            if b["image"] is None:
                continue
            batch = {"image": b["image"], "tokens": {}, "present": {IMAGE: torch.ones(len(b["index"]),
                                                                                      dtype=torch.bool)}}
            feats.append(emb.batch(batch, [IMAGE])[IMAGE])
            idx_all += [doc_of_row[r] for r in b["index"]]
        return idx_all, torch.cat(feats) if feats else torch.zeros(0), bad

    def images(self, ids: Sequence[str]) -> list[Image.Image | None]:
        assert self.reader is not None
        doc = {d: i for i, d in enumerate(self.reader.ids)}
        return self.reader.images([doc[d] for d in ids])


# ----------------------------------------------------------------------------------------- the suite

@dataclass
class _TaskResult:
    metrics: dict[str, float]
    counts: dict[str, int]
    detail: dict[str, Any]
    gallery: list[GalleryRow] | None = None


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
        cache: an ``EmbeddingCache`` for document embeddings (standalone evaluation), or None.
    """

    def __init__(self, cfg: Any, *, splits: Mapping[str, Any] | None = None,
                 context_length: Mapping[str, int] | None = None, default_context_length: int = 77,
                 list_sep: str = ", ", cache: Any = None) -> None:
        T.validate_tasks(cfg)
        self.cfg = cfg
        self.splits = dict(splits or {})
        self.context_length = dict(context_length or {})
        self.default_context_length = int(default_context_length)
        self.list_sep = list_sep
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
                raise T.MissingDataError(
                    f"task {t.name!r} reads split {t.split!r}, but the data config gives no shards for it "
                    f"(splits: {sorted(k for k, v in self.splits.items() if v)}); set data.{t.split}_shards or "
                    "use the synthetic catalog (data.train_shards=null)")
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
        return T.SourceSpec("table", tuple(str(p) for p in T.table_files(table)), cols, t.image_column, image_root,
                            t.doc_id_column, t.max_docs)

    # -- main
    def __call__(self, encoder: Any, bundle: Any, *, step: int | None = None, out_dir: str | os.PathLike | None = None,
                 rank: int = 0, world_size: int = 1, device: torch.device | str | None = None) -> dict[str, float]:
        """Evaluate with ``encoder`` (a FieldEncoder of the live model) and ``bundle`` (tokenizer, transforms).

        Returns the same flat metrics dict on every rank (see module docstring for the distributed modes).
        """
        sharded = bool(self.cfg.sharded) and world_size > 1
        if world_size > 1 and _dist() is None:
            raise RuntimeError("world_size > 1 but torch.distributed is not initialized")
        if device is None:
            device = next(bundle.model.parameters()).device
        device = torch.device(device)
        emb = Embedder(encoder, bundle.tokenizer, self.context_length, self.default_context_length, device,
                       int(self.cfg.batch_size), getattr(bundle, "context_length", None),
                       getattr(bundle, "pad_id", 0))
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
            result = _broadcast(result if rank == 0 else None, world_size)
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
        order: list[T.SourceSpec] = list(dict.fromkeys(specs.values()))
        per_task: dict[str, dict[str, float]] = {}
        results: dict[str, _TaskResult] = {}
        # Sharded: rank 0 works on a source after the other ranks have moved on to the next one. If it fails
        # there, it keeps joining the later gathers with the error (so nobody waits forever), then raises.
        failed: Exception | None = None
        for spec in order:
            tasks = [t for t in self.tasks if specs[t.name] == spec]
            needs = _source_needs(tasks)
            src: _ShardDocs | _TableDocs = _ShardDocs(spec.location) if spec.kind == "shards" else _TableDocs(spec)
            ts = time.perf_counter()
            try:
                docs = self._load_docs(src, spec, emb, bundle, needs, rank=rank, world_size=world_size,
                                       sharded=sharded,
                                       abort=None if failed is None else f"{type(failed).__name__}: {failed}")
                if docs is None:  # a non-zero rank in sharded mode: its part is done
                    continue
                log.info("eval %s: embedded %d documents (%s) in %.1fs", suite, len(docs),
                         ", ".join(sorted(needs.embed)), time.perf_counter() - ts)
                pairs = None
                for t in tasks:
                    if t.relevance.rule == "graded":
                        ptable = T.resolve_path(t.table, self.cfg.data_root, what=f"task {t.name!r} table",
                                                hint=t.hf_dataset)
                        pairs = T.read_table(T.table_files(ptable))
                    res = self._run_task(t, docs, emb, src, pairs if t.relevance.rule == "graded" else None)
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
        for name, vals in per_task.items():
            flat.update({f"{suite}/{name}/{m}": v for m, v in vals.items()})
        aggs: dict[str, dict[str, float]] = {}
        for a in self.cfg.aggregates:
            vals, matched = T.aggregate(per_task, list(a.tasks), list(a.metrics))
            if vals:
                aggs[a.name] = vals
                flat.update({f"{suite}/{a.name}/{m}": v for m, v in vals.items()})
        if out_dir is not None:
            self._write(Path(out_dir), suite, step, flat, per_task, aggs, results, bundle)
        log.info("eval %s done in %.1fs: %s", suite, time.perf_counter() - t0,
                 ", ".join(f"{k}={v:.4f}" for k, v in list(flat.items())[:6]))
        return flat

    def _load_docs(self, src: Any, spec: T.SourceSpec, emb: Embedder, bundle: Any, needs: _Needs, *, rank: int,
                   world_size: int, sharded: bool, abort: str | None = None) -> T.DocSet | None:
        kwargs = dict(image_transform=bundle.preprocess_val, num_workers=int(self.cfg.num_workers),
                      list_sep=self.list_sep, max_docs=spec.max_docs, rank=rank, world_size=world_size,
                      sharded=sharded, abort=abort)
        key = self._cache_key(spec, needs, emb, bundle) if self.cache is not None and not sharded else None
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                tensors, side = hit
                log.info("eval: document embeddings of %s from the cache (%s)", spec.location[0], key[:12])
                if isinstance(src, _TableDocs):
                    src.reader = T.TableReader(spec, sorted(needs.meta), list_sep=self.list_sep, optional=(T.ITEM_ID,))
                return T.DocSet(ids=side["ids"], item_ids=side["item_ids"], meta=side["meta"],
                                emb={f[4:]: v for f, v in tensors.items() if f.startswith("emb/")},
                                present={f[8:]: v.bool() for f, v in tensors.items() if f.startswith("present/")},
                                rows_meta=side.get("rows_meta"), row_doc=side.get("row_doc"))
        docs = src.load(emb, needs, **kwargs)
        if key is not None and docs is not None:
            tensors = {**{f"emb/{f}": v for f, v in docs.emb.items()},
                       **{f"present/{f}": v for f, v in docs.present.items()}}
            self.cache.put(key, tensors, {"ids": docs.ids, "item_ids": docs.item_ids, "meta": docs.meta,
                                          "rows_meta": docs.rows_meta, "row_doc": docs.row_doc})
        return docs

    def _cache_key(self, spec: T.SourceSpec, needs: _Needs, emb: Embedder, bundle: Any) -> str | None:
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
                  "context": {f: emb.context_length(f) for f in sorted(needs.embed | needs.meta) if f != IMAGE},
                  "tokenizer": type(emb.tokenizer).__name__, "version": 1})

    # -- one task
    def _run_task(self, t: Any, docs: T.DocSet, emb: Embedder, src: Any, pairs: Any) -> _TaskResult:
        ts = time.perf_counter()
        if t.kind == "zeroshot":
            return self._run_zeroshot(t, docs, emb)
        queries = T.build_queries(t, docs, int(self.cfg.seed), pairs)
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
                qemb[f], qpresent[f] = emb.optional_strings(queries.texts[f], f)
        q, q_ok = T.fuse(qemb, qpresent, list(t.query.fields), list(t.query.weights))
        d, d_ok = T.fuse(docs.emb, docs.present, list(t.doc.fields), list(t.doc.weights))
        if not bool(q_ok.all()):
            log.warning("task %s: %d queries have no embeddable field", t.name, int((~q_ok).sum()))
        n_bad = int((~d_ok).sum())
        if n_bad:
            log.warning("task %s: %d of %d documents have none of the fields %s and cannot be retrieved", t.name,
                        n_bad, len(docs), list(t.doc.fields))
        metrics, run, top = T.score_retrieval(q, d, queries.qrels, queries.ids, k=int(t.k), metrics=list(t.metrics),
                                             chunk_size=int(self.cfg.chunk_size), device=emb.device,
                                             doc_valid=d_ok)
        counts = {"queries": len(queries), "docs": len(docs)}
        detail = {"examples": [
            {"query": _query_text(queries, j), "relevant": len(queries.qrels[qid]),
             "top": [docs.ids[int(i)] for i in top[j, :5]]}
            for j, qid in enumerate(queries.ids[:5])]}
        gallery = None
        if t.name == self.gallery_task:
            gallery = self._gallery(queries, top, docs, src)
        log.info("task %s: %d queries x %d docs in %.1fs", t.name, len(queries), len(docs), time.perf_counter() - ts)
        return _TaskResult(metrics, counts, detail, gallery)

    def _run_zeroshot(self, t: Any, docs: T.DocSet, emb: Embedder) -> _TaskResult:
        labels = docs.meta[t.labels_field]
        names = list(t.labels) or sorted({v for v in labels if v is not None})
        cls = class_embeddings(lambda xs: emb.strings(xs, t.labels_field), names, list(t.prompt_templates))
        metrics, pred, rows = evaluate_zeroshot(docs.emb[IMAGE], labels, names, cls, list(t.metrics),
                                                docs.present.get(IMAGE))
        return _TaskResult(metrics, {"docs": len(rows), "classes": len(names)}, {"classes": names})

    def _gallery(self, queries: T.Queries, top: torch.Tensor, docs: T.DocSet, src: Any) -> list[GalleryRow]:
        g = self.cfg.gallery
        n = min(int(g.num_queries), len(queries))
        gen = torch.Generator().manual_seed(int(self.cfg.seed))
        pick = sorted(torch.randperm(len(queries), generator=gen)[:n].tolist())
        k = min(int(g.k), top.shape[1])
        want = [docs.ids[int(i)] for j in pick for i in top[j, :k]]
        try:
            imgs = dict(zip(want, src.images(want)))
        except Exception as exn:  # noqa: BLE001 - the gallery must never fail an evaluation
            log.warning("gallery images unavailable: %r", exn)
            imgs = {}
        rows = []
        for j in pick:
            qid = queries.ids[j]
            ids = [int(i) for i in top[j, :k]]
            rows.append(GalleryRow(query=_query_text(queries, j), images=[imgs.get(docs.ids[i]) for i in ids],
                                   hits=[str(i) in queries.qrels[qid] for i in ids],
                                   n_relevant=len(queries.qrels[qid])))
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
            _write_json({"suite": suite, "task": name, "step": step, "metrics": per_task[name], "counts": r.counts,
                         **r.detail, "config": cfg}, base / "tasks" / f"{_safe(name)}.json")
        md = markdown_report(suite, per_task, aggs, model=_model_name(bundle), step=step,
                             counts={n: r.counts for n, r in results.items()})
        (base / "results.md").write_text(md)
        for name, r in results.items():
            if r.gallery:
                save_gallery(base / "gallery.png", r.gallery, thumb=int(self.cfg.gallery.thumb_size),
                             title=f"{suite}/{name}" + (f" @ step {step}" if step is not None else ""))


def _query_text(queries: T.Queries, j: int) -> str:
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
                     cache=cache)


def evaluate_model(model: Any, cfg: Any, *, bundle: Any = None, splits: Mapping[str, Any] | None = None,
                   context_length: Mapping[str, int] | None = None, default_context_length: int = 77,
                   list_sep: str = ", ", out_dir: str | os.PathLike | None = None, step: int | None = None,
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
                   list_sep=list_sep, cache=cache)
    was = bundle.model.training
    bundle.model.eval()
    try:
        return ev(encoder, bundle, step=step, out_dir=out_dir, rank=rank, world_size=world_size, device=device)
    finally:
        bundle.model.train(was)


def load_model_for_eval(model_cfg: Any, *, device: torch.device | str = "cpu", work_dir: Path | None = None) -> Any:
    """The ModelBundle to evaluate, from ``model.checkpoint`` (run dir | checkpoint file | export dir) or
    ``model.name`` + ``model.pretrained``. Weights that cannot be found fail with the model builder's message."""
    from gcl.model import build_model

    ck = model_cfg.checkpoint
    if not ck:
        return build_model(model_cfg.name, model_cfg.pretrained, config_path=model_cfg.config_path,
                           precision=model_cfg.precision, device=device, cache_dir=model_cfg.cache_dir,
                           text_packing=model_cfg.text_packing)
    p = Path(os.path.expanduser(str(ck)))
    if not p.exists():
        raise FileNotFoundError(f"model.checkpoint={ck!r} does not exist; pass a run dir (with checkpoints/), a "
                                "checkpoint file, or an exported open_clip folder")
    if p.is_dir() and (p / "open_clip_config.json").is_file():
        return build_model(f"local-dir:{p}", None, precision=model_cfg.precision, device=device,
                           cache_dir=model_cfg.cache_dir, text_packing=model_cfg.text_packing)
    from gcl.export import load_training_checkpoint

    src = load_training_checkpoint(p)
    import open_clip

    name, config_path = src.name, src.config_path
    if config_path and not Path(config_path).is_file():
        config_path = None
    known = not name.startswith(("hf-hub:", "local-dir:")) and (
        config_path or open_clip.get_model_config(name.replace("/", "-")) is not None)
    if not known:
        # hf-hub:/local-dir: bases (or a moved config file): rebuild the architecture from the stored config.
        stem = "gcl-eval-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        cfg_dir = (work_dir or p.parent) / ".model_cfg"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        config_path = str(cfg_dir / f"{stem}.json")
        Path(config_path).write_text(json.dumps(src.model_cfg))
        name = stem
    bias = src.state_dict.get("logit_bias")
    bundle = build_model(name, None, config_path=config_path, precision=model_cfg.precision, device=device,
                         cache_dir=model_cfg.cache_dir, text_packing=model_cfg.text_packing,
                         logit_bias_init=float(bias.reshape(-1)[0]) if bias is not None else None)
    missing, unexpected = bundle.model.load_state_dict(src.state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {src.checkpoint_file} does not fit {src.name}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if src.preprocess_cfg:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        bundle.preprocess_val = image_transform_v2(PreprocessCfg(**src.preprocess_cfg), is_train=False)
        bundle.preprocess_cfg = dict(src.preprocess_cfg)
    bundle.name = f"{src.name} @ {src.checkpoint_file}" + (f" step {src.step}" if src.step is not None else "")
    log.info("loaded %s (step %s) from %s", src.name, src.step, src.checkpoint_file)
    return bundle


def run(cfg: Any) -> dict[str, float]:
    """``python evaluate.py``: build the model, the splits and the suite from ``cfg``; evaluate; write files."""
    from hydra.core.hydra_config import HydraConfig

    try:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        run_dir = Path.cwd()
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

        splits = resolve_splits(cfg.data)
    cache = None
    if cfg.eval.cache_dir:
        from gcl.eval.retrieval import EmbeddingCache

        cache = EmbeddingCache(cfg.eval.cache_dir)
    metrics = evaluate_model(bundle, cfg.eval, splits=splits, context_length=dict(cfg.data.context_length),
                             default_context_length=int(cfg.data.default_context_length),
                             list_sep=str(cfg.data.list_sep), out_dir=out, device=dev, cache=cache)
    md = out / "results.md"
    log.info("results: %s\n%s", out, md.read_text() if md.is_file() else json.dumps(metrics, indent=1))
    return metrics


__all__ = ["Embedder", "Evaluator", "build_evaluator", "evaluate_model", "load_model_for_eval", "run"]
