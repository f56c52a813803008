"""The eval loader: one ordered pass over a rank's shards (no shuffle, partial last batches).

Lives here: ``build_eval_loader``, ``EvalLoader`` (worker ``w`` of ``W`` reads shards ``w, w+W, ...``;
batches come back round-robin, so the order is fixed for a worker count) and its dataset. Importable from
``gcl.data.stream`` too, where it lived first.

Not here: the batch layout, decoding and skip accounting (``gcl.data.batch``), shard URLs and reading
(``gcl.data.shards``), the resumable training stream (``gcl.data.stream``), the documents and metrics of an
evaluation (``gcl.eval``).
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gcl.data.batch import (
    Batch,
    _Collator,
    _Decoder,
    _from_wire,
    _Skip,
    _SkipLog,
    _to_wire,
    _validate_text_args,
    pad_id_of,
)
from gcl.data.image import parse_background
from gcl.data.schema import stable_hash
from gcl.data.shards import _iter_shard, expand_urls

# Records keep the logger name they had before this code moved here from gcl.data.stream.
logger = logging.getLogger("gcl.data.stream")

class _EvalDataset(IterableDataset):
    def __init__(self, urls: list[str], spec: dict[str, Any]) -> None:
        super().__init__()
        self.urls, self.spec = urls, spec

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        s = self.spec
        log = _SkipLog(f"eval worker {wid}")
        decode = _Decoder(s["fields"], s["image_transform"], s["list_rule"], s["list_sep"], s["background"])
        collator = _Collator(s["tokenizer"], s["context_length"], s["fields"], s["trim_tokens"])

        def collate(samples: list[dict[str, Any]]) -> Batch:
            batch = collator(samples, log.take_delta())
            return _to_wire(batch) if info is not None else batch

        pending: list[dict[str, Any]] = []
        for url in self.urls[wid::nw]:
            for raw in _iter_shard(url, lambda r, u, e: log(r, u, repr(e))):
                # list_rule="sample" must pick the same item every evaluation: seed by the sample key.
                rng = random.Random(stable_hash(raw["__key__"])) if s["list_rule"] == "sample" else None
                try:
                    pending.append(decode(raw, rng))
                except _Skip as skip:
                    log(skip.args[0], raw["__key__"], f"{skip.args[1] if len(skip.args) > 1 else ''} @ {url}")
                    continue
                if len(pending) == s["batch_size"]:
                    yield collate(pending)
                    pending = []
        if pending:
            yield collate(pending)
        elif log.delta:
            yield {"skipped": log.take_delta()}  # counts of trailing skips, no samples


class EvalLoader:
    """One ordered pass over this rank's shards (no shuffle); last batches may be partial.

    Worker ``w`` of ``W`` reads shards ``w, w+W, ...`` of the rank's shards and batches are returned
    round-robin, so the order is fixed for a given worker count. ``skipped`` totals the skipped samples
    (reasons that occurred only) of the finished passes and the current one.
    """

    def __init__(self, urls: list[str], spec: dict[str, Any]) -> None:
        self.urls, self._spec = urls, spec
        self.num_workers = min(spec["num_workers"], len(urls))
        self.pad_id = pad_id_of(spec["tokenizer"])
        self.skipped: dict[str, int] = {}  # only reasons that occurred (empty = nothing skipped)

    def __iter__(self) -> Iterator[Batch]:
        ds = _EvalDataset(self.urls, self._spec)
        it = iter(ds) if self.num_workers == 0 else iter(
            DataLoader(ds, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                       # its own generator: an in-loop evaluation must not advance the training RNG
                       generator=torch.Generator().manual_seed(0)))
        totals = Counter(self.skipped)
        for batch in it:
            batch = _from_wire(batch)
            totals.update(batch["skipped"])
            self.skipped = dict(totals)
            if "image" in batch:  # a trailing skip-only record carries counts but no samples
                yield batch


def build_eval_loader(
    urls: str | list[str],
    *,
    tokenizer: Any,
    context_length: dict[str, int],
    image_transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    fields: list[str],
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    list_rule: str = "join",
    list_sep: str = ", ",
    trim_tokens: bool = True,
    image_background: str | tuple[int, int, int] = "white",
) -> EvalLoader:
    """A single ordered pass over ``urls`` (same batch dict as ``build_train_stream``; partial batches).

    With ``world_size > 1`` rank ``r`` reads shards ``r, r + world_size, ...`` (a rank without shards
    yields nothing; pass ``world_size=1`` to read everything on every rank). ``image_background``: the colour
    under transparent pixels (``gcl.data.image``).
    """
    _validate_text_args(tokenizer, context_length, fields, list_rule)
    if batch_size < 1 or num_workers < 0 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1, num_workers >= 0, 0 <= rank < world_size; got {batch_size}, "
                         f"{num_workers}, {rank}, {world_size}")
    mine = expand_urls(urls)[rank::world_size]
    if not mine:
        logger.warning("eval rank %d of %d has no shards (fewer shards than ranks)", rank, world_size)
    spec = {"fields": list(fields), "context_length": dict(context_length), "tokenizer": tokenizer,
            "image_transform": image_transform, "batch_size": int(batch_size), "list_rule": list_rule,
            "list_sep": list_sep, "num_workers": int(num_workers), "trim_tokens": bool(trim_tokens),
            "background": parse_background(image_background)}
    return EvalLoader(mine, spec)

