"""Document sets for evaluation: read a task's documents and embed them once per source.

Lives here: :func:`source_needs` (which text fields and embeddings the tasks of one source need),
:class:`ShardDocs` (webdataset shards through ``gcl.data.stream.build_eval_loader``) and :class:`TableDocs`
(Parquet / CSV / JSON tables), each with ``load`` -> ``gcl.eval.tasks.DocSet`` (split across ranks when
sharded, gathered on rank 0 in canonical order) and ``images`` for the gallery.
Not here: resolving a task's source (``Evaluator.source_spec`` in ``gcl.eval.run``), the embedding cache
(``gcl.eval.retrieval``), table reading and image decoding (``gcl.eval.tasks``), queries and scoring.
"""
from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from gcl.data.image import RGB, decode_image
from gcl.distributed import gather_checked
from gcl.eval import tasks as T
from gcl.eval.embed import Embedder

log = logging.getLogger(__name__)

IMAGE = T.IMAGE


@dataclass
class SourceNeeds:
    """What one source must provide for its tasks."""

    meta: set[str] = field(default_factory=set)  # text fields whose strings are needed
    embed: set[str] = field(default_factory=set)  # fields embedded per document (image, doc-side text)


def source_needs(tasks: Sequence[Any]) -> SourceNeeds:
    n = SourceNeeds()
    for t in tasks:
        if t.kind == "zeroshot":
            n.meta.add(t.labels_field)
            n.embed.add(IMAGE)
            continue
        n.embed.update(t.doc.fields)
        if t.relevance.rule not in ("graded", "fixed"):  # those queries come from a relevance file instead
            n.meta.update(f for f in t.query.fields if f != IMAGE)
        if IMAGE in t.query.fields:
            n.embed.add(IMAGE)
        if t.relevance.rule == "field" and t.relevance.field:
            n.meta.add(t.relevance.field)
    n.meta.update(f for f in n.embed if f != IMAGE)
    return n


class ShardDocs:
    """A document set read from webdataset shards through ``gcl.data.stream.build_eval_loader``; transparent
    pixels land on ``image_background`` (``gcl.data.image``)."""

    def __init__(self, urls: Sequence[str], image_background: RGB) -> None:
        self.urls = list(urls)
        self.image_background = image_background

    def load(self, emb: Embedder, needs: SourceNeeds, *, image_transform: Any, num_workers: int, list_sep: str,
             max_docs: int, rank: int, world_size: int, sharded: bool, abort: str | None = None) -> T.DocSet | None:
        text_fields = sorted(needs.meta) or ["title"]  # the loader needs >= 1 text field
        embed = sorted(needs.embed)
        parts = gather_checked(lambda: self._local(emb, text_fields, embed, image_transform, num_workers, list_sep,
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
            rank=rank if sharded else 0, world_size=world_size if sharded else 1, list_sep=list_sep,
            image_background=self.image_background)
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
                            got[stem] = decode_image(tf.extractfile(m), self.image_background)  # type: ignore[arg-type]
                        except Exception as exn:  # noqa: BLE001 - a gallery thumbnail is optional
                            log.warning("gallery: cannot read %s from %s: %r", stem, url, exn)
        return [got.get(i) for i in ids]


class TableDocs:
    """A document set read from a table (Parquet / CSV / JSON); images decoded in DataLoader workers, transparent
    pixels on ``image_background`` (``gcl.data.image``)."""

    def __init__(self, spec: T.SourceSpec, image_background: RGB) -> None:
        self.spec = spec
        self.image_background = image_background
        self.reader: T.TableReader | None = None

    def load(self, emb: Embedder, needs: SourceNeeds, *, image_transform: Any, num_workers: int, list_sep: str,
             max_docs: int, rank: int, world_size: int, sharded: bool, abort: str | None = None) -> T.DocSet | None:
        with_images = IMAGE in needs.embed
        if sharded and not with_images and rank != 0:
            return None  # rank 0 reads the table and embeds its texts alone
        gathered = gather_checked(
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
                        row_doc=reader.row_doc, raw_rows=reader.raw_rows)

    def _local(self, emb: Embedder, needs: SourceNeeds, image_transform: Any, num_workers: int, list_sep: str,
               rank: int, world_size: int, sharded: bool) -> tuple | None:
        """Read the table (into ``self.reader``) and embed this rank's share of its images:
        (document indices, features, unreadable (document, error) pairs); None when no task embeds images."""
        reader = T.TableReader(self.spec, sorted(needs.meta), list_sep=list_sep, optional=(T.ITEM_ID,),
                               image_background=self.image_background)
        self.reader = reader
        if IMAGE not in needs.embed:
            return None
        if self.spec.image_column is None:
            raise T.EvalConfigError(f"table {self.spec.location[0]!r}: a task embeds images but the task has no "
                                    "image_column; set it to the column holding image bytes or paths")
        mine = [j for j in range(reader.n) if not (sharded and world_size > 1) or j % world_size == rank]
        doc_of_row = {reader.doc_rows[j]: j for j in mine}
        ds = T.ImageDataset(reader, image_transform, set(doc_of_row))
        # its own generator: an in-loop evaluation must not advance the training RNG
        loader = torch.utils.data.DataLoader(ds, batch_size=emb.batch_size, num_workers=num_workers,
                                             collate_fn=T.collate_images, generator=torch.Generator().manual_seed(0))
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
