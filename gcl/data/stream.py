"""Webdataset shards -> batches of preprocessed images and per-field tokens, with exact mid-epoch resume.

The pipeline, per DataLoader worker ("slot" = one worker of one rank)::

    shard lists  -> per-source cursors (exact epochs: shard shuffle + samples split over ranks x workers;
                                        or resampled draws)
                 -> weighted per-sample mix of sources            (raw bytes, nothing decoded yet)
                 -> block shuffle (permute blocks of ``shuffle_buffer`` raw samples, never two epochs)
                 -> decode json + RGB image, list->string rule, seeded image transform
                 -> batch of ``batch_size`` good samples, tokenized per field, trimmed per field

Why a block shuffle rather than webdataset's rolling buffer: its state is two integers (block number,
index inside the block) plus where the block started in each source, so a resumed stream re-reads at
most one block of raw bytes (never decoding the samples it skips) and reproduces the uninterrupted
stream exactly. Every random choice is a pure function of ``(seed, slot, position)``: shard order of
``(seed, source, epoch)`` (the same on every rank, so ranks split it disjointly), block permutations of
``(seed, slot, block)``, augmentation and list sampling of ``(seed, slot, block, index)``.

Exact epochs: with the shard sizes known (``sizes.json``, see ``gcl.data.shards.shard_sizes``), each epoch's
samples, in its shard order, are cut into one contiguous run per slot, of sizes that differ by at most one
and add up to the epoch (``_quota``). Every slot makes one batch per round, so all slots cross each epoch
boundary together and every sample is read exactly once per epoch over all ranks x workers, however uneven
the shards are. An epoch that does not divide into batches is carried, not dropped: its last samples share a
batch with the first samples of the next epoch (a sample can then meet its next-epoch self in that one batch).
Without sizes, each slot takes whole shards (every n-th) and epochs are approximate (a warning says so).

Batches are made inside the workers; the DataLoader hands them over round-robin (worker 0, 1, ...),
so the main process knows which worker made each batch and records that worker's position after it.
On resume, physical worker ``i`` plays logical worker ``(i + next) % num_workers``, which makes the
round-robin continue where it stopped. On another layout (ranks, workers or per-rank batch), every rank's
saved positions are re-partitioned over the new slots so the interrupted epoch stays exact
(``gcl.data.elastic``); the re-partition generation then enters the slot-specific RNG keys (``_rng_key``).

Bad samples never stop the loader: each is skipped, counted by reason (``SKIP_REASONS``) and logged
with its key (rate-limited). ``batch["skipped"]`` holds the counts since the same worker's previous
batch (deltas, so micro-batches and ranks can simply be summed); ``TrainStream.skipped`` holds totals.

This module is that pipeline: the per-source cursors, the mixer, the block shuffle, the training workers
and ``TrainStream`` with its state, built by ``build_train_stream``. Not here: decoding and collation into the
batch dict (``gcl.data.batch``), shard URLs and raw shard reading (``gcl.data.shards``), the one-pass eval
loader (``gcl.data.eval_loader``). ``expand_urls``, ``build_eval_loader``, ``EvalLoader``, ``concat_batches``,
``pad_id_of``, ``SKIP_REASONS``, ``LIST_RULES`` and ``Batch`` stay importable from here.
"""
from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gcl.data.batch import (  # noqa: F401 - LIST_RULES, SKIP_REASONS, concat_batches: re-exported
    LIST_RULES,
    SKIP_REASONS,
    Batch,
    _all_reasons,
    _Collator,
    _Decoder,
    _from_wire,
    _Skip,
    _SkipLog,
    _to_wire,
    _validate_text_args,
    concat_batches,
    pad_id_of,
)
from gcl.data.eval_loader import EvalLoader, build_eval_loader  # noqa: F401 - re-exported
from gcl.data.image import parse_background
from gcl.data.schema import stable_hash
from gcl.data.shards import _iter_shard, expand_urls, is_empty_shard, shard_sizes

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# A worker that skips this many samples in a row is reading garbage; stop instead of spinning forever.
_MAX_CONSECUTIVE_SKIPS = 10_000
_MIX_CHUNK = 1024  # per-sample source choices are drawn this many at a time (one RNG per chunk)
# Salts keep the RNG streams of different purposes independent for the same (seed, ...) numbers.
_SALT_EPOCH, _SALT_RESAMPLE, _SALT_MIX, _SALT_BLOCK, _SALT_SAMPLE, _SALT_LOADER = 1, 2, 3, 4, 5, 6
_ELASTIC = 7  # marks the RNG keys of slots made by an elastic re-partition (gcl.data.elastic)


def _rng_key(seed: int, salt: int, gen: int, *parts: int) -> list[int]:
    """Entropy words of one slot-specific RNG stream. ``gen`` counts the elastic re-partitions (resumes on
    another layout of ranks x workers) the stream went through: a slot made by one draws from streams of its
    own, never those of an earlier layout's slot with the same number; ``gen`` 0 keeps the original keys."""
    return [seed, salt, *parts] if gen == 0 else [seed, salt, _ELASTIC, gen, *parts]


# ----------------------------------------------------------------------------------- raw sample cursors

def _quota(total: int, epoch: int, slot: int, n_slots: int) -> int:
    """Samples slot ``slot`` of ``n_slots`` reads in ``epoch`` of a source of ``total`` samples.

    Slot s's running total after epoch e is ``floor(((e+1) * total + s) / n_slots)``: by Hermite's identity the
    slots' totals add up to ``(e+1) * total`` exactly, and any two slots' totals differ by at most one, so
    slots that consume samples at the same rate cross every epoch boundary together (within one sample).
    """
    return ((epoch + 1) * total + slot) // n_slots - (epoch * total + slot) // n_slots


def _exact_range(total: int, epoch: int, slot: int, n_slots: int) -> tuple[int, int]:
    """Slot ``slot``'s contiguous run ``[lo, hi)`` of an epoch's ``total`` samples (numbered in shard order)."""
    lo = sum(_quota(total, epoch, s, n_slots) for s in range(slot))
    return lo, lo + _quota(total, epoch, slot, n_slots)


def _epoch_perm(seed: int, source: int, epoch: int, n_shards: int) -> np.ndarray:
    """The shard order of one epoch of a source: the same on every rank and for every layout."""
    return np.random.default_rng([seed, _SALT_EPOCH, source, epoch]).permutation(n_shards)


def _range_pieces(sizes: list[int], perm: np.ndarray, ranges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(shard index, first sample, end sample)`` pieces, in reading order, of the epoch samples in ``ranges``.

    The epoch is the shards in ``perm`` order, concatenated; its samples are numbered in that order, and
    ``ranges`` are sorted, disjoint ``[a, b)`` runs of those numbers. A run may start or end inside a shard
    (read sequentially up to its first sample)."""
    ends = np.cumsum([sizes[i] for i in perm])
    pieces = []
    for a, b in ranges:
        k = int(np.searchsorted(ends, a, side="right"))  # the shard holding sample a
        while a < b:
            start = int(ends[k]) - sizes[perm[k]]
            stop = min(b, int(ends[k]))
            if stop > a:
                pieces.append((int(perm[k]), a - start, stop - start))
            a, k = max(a, stop), k + 1
    return pieces


def _exact_share(sizes: list[int], perm: np.ndarray, epoch: int, slot: int, n_slots: int) -> list[tuple[int, int, int]]:
    """This slot's share of an epoch: ``(shard index, first sample, end sample)`` pieces, in reading order.

    The epoch is the shards in ``perm`` order, concatenated; slot s reads the contiguous run of ``_quota``
    samples after those of slots 0..s-1. Slots split samples, not shards: a run may start or end inside a
    shard (read sequentially up to its first sample), and every sample of the epoch is in exactly one run.
    """
    lo, hi = _exact_range(sum(sizes), epoch, slot, n_slots)
    return _range_pieces(sizes, perm, [(lo, hi)] if hi > lo else [])


class _SourceCursor:
    """Infinite iterator over the raw samples one slot reads from one source, resumable from its state.

    State ``{"epoch", "shard", "offset", "seen"}``: the next sample is number ``offset`` (in tar order) of
    piece ``shard`` of this slot's plan for ``epoch``, and ``seen`` raw samples of that plan came before it.
    After ``next()`` returns, ``state()`` is the position right after the returned sample, and ``epoch_end``
    says whether that sample was the last of this slot's share of its epoch (exact epochs only).

    Exact epochs (the default for finite data with known shard sizes): the source's shards are permuted by
    ``(seed, source, epoch)``, identically on every rank, and the epoch's samples are cut into one contiguous
    run per slot (``_exact_share``), so every sample is read exactly once per epoch over all ranks x workers.
    Without sizes (``sizes=None``): slot ``s`` of ``n`` takes every n-th shard (with fewer shards than slots,
    every slot reads all shards and keeps the epoch's raw sample number ``c`` iff ``c % n == s``); slots then
    hold unequal shares, so epochs are approximate. Resampled mode: "epoch" ``e`` is a chunk of
    ``ceil(shards / slots)`` shards drawn with replacement by ``(seed, source, slot, e)``.

    After an elastic re-partition (``elastic``: ``{"gen", "residual", "from"}``, see ``gcl.data.elastic``)
    the slot's plan for an epoch listed in ``residual`` is that explicit list of ``[a, b)`` runs of the
    epoch's sample numbers (what the earlier layout left of it), epochs before ``from`` hold nothing else,
    and epochs from ``from`` on are this layout's exact shares.
    """

    def __init__(self, urls: list[str], *, source: int, seed: int, resampled: bool, slot: int, n_slots: int,
                 state: dict[str, int], on_error: Callable[[str, str, BaseException], None],
                 sizes: list[int] | None = None, elastic: dict[str, Any] | None = None) -> None:
        self.urls, self.source, self.seed, self.resampled = urls, source, seed, resampled
        self.slot, self.n_slots, self.on_error = slot, n_slots, on_error
        self.epoch, self.shard, self.offset = int(state["epoch"]), int(state["shard"]), int(state["offset"])
        self.seen = int(state.get("seen", 0))
        self.sizes = None if resampled else sizes
        self.sample_split = not resampled and sizes is None and len(urls) < n_slots
        self.epoch_end = False
        self.gen = int(elastic["gen"]) if elastic else 0
        self.residual = {int(e): [tuple(r) for r in rs] for e, rs in elastic["residual"].items()} if elastic else {}
        self.normal_from = int(elastic["from"]) if elastic else 0
        self._declared = {} if self.sizes is None else dict(zip(urls, self.sizes))
        self._size_warned: set[str] = set()
        self._gen = self._generate()

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, "seen": self.seen}

    def plan(self, epoch: int) -> list[tuple[str, int, int | None]]:
        """This slot's pieces for ``epoch`` in reading order: ``(url, first sample, end sample)``, end None
        meaning the shard's end."""
        n = len(self.urls)
        if self.resampled:
            rng = np.random.default_rng(_rng_key(self.seed, _SALT_RESAMPLE, self.gen, self.source, self.slot, epoch))
            return [(self.urls[i], 0, None) for i in rng.integers(0, n, size=math.ceil(n / self.n_slots))]
        perm = _epoch_perm(self.seed, self.source, epoch, n)
        if self.sizes is not None:
            if epoch in self.residual:
                return [(self.urls[i], a, b) for i, a, b in _range_pieces(self.sizes, perm, self.residual[epoch])]
            if epoch < self.normal_from:
                return []
            return [(self.urls[i], a, b) for i, a, b in _exact_share(self.sizes, perm, epoch, self.slot, self.n_slots)]
        if self.sample_split:
            return [(self.urls[i], 0, None) for i in perm]
        return [(self.urls[i], 0, None) for i in perm[self.slot::self.n_slots]]

    def __next__(self) -> dict[str, Any]:
        return next(self._gen)

    def _generate(self) -> Iterator[dict[str, Any]]:
        empty_rounds = 0
        while True:
            plan = self.plan(self.epoch)
            planned = sum(b - a for _, a, b in plan) if self.sizes is not None else None
            whole_epoch = self.shard == 0 and self.offset == 0
            produced = 0
            while self.shard < len(plan):
                last = self.shard
                while last + 1 < len(plan) and plan[last + 1][0] == plan[last][0] and plan[last][2] is not None:
                    last += 1  # later pieces of the same shard (a re-partitioned plan): one pass reads them all
                for raw in self._pieces(plan[self.shard][0], plan[self.shard:last + 1]):
                    c = self.seen
                    self.seen = c + 1
                    if self.sample_split and c % self.n_slots != self.slot:
                        continue
                    produced += 1
                    self.epoch_end = self.seen == planned
                    yield raw
                self.shard, self.offset = last + 1, 0
            self.epoch, self.shard, self.offset, self.seen = self.epoch + 1, 0, 0, 0
            if planned == 0:
                continue  # fewer samples than slots (or a re-partitioned epoch): this slot has no share of it
            empty_rounds = empty_rounds + 1 if (whole_epoch and produced == 0) else 0
            # Shard-split epochs: a whole empty epoch means this slot can never get data. An exact share can
            # sit inside one damaged shard for an epoch (it moves every epoch) and resampled draws can be
            # unlucky: tolerate a few empty rounds there first.
            if empty_rounds >= (20 if self.resampled else 3 if self.sizes is not None else 1):
                raise RuntimeError(
                    f"data reader {self.slot} of {self.n_slots} (processes x DataLoader workers) read no samples "
                    f"from source {self.source} in a whole {'chunk' if self.resampled else 'epoch'} (shards "
                    f"{[p[0] for p in plan[:3]]}{'...' if len(plan) > 3 else ''}): they are unreadable (see the shard_error "
                    f"warnings), or the source has fewer samples than the {self.n_slots} readers")

    def _pieces(self, url: str, pieces: list[tuple[str, int, int | None]]) -> Iterator[dict[str, Any]]:
        """Samples ``first <= i < end`` (in tar order) of consecutive pieces ``pieces`` of one shard, read in one
        pass from ``offset`` on, updating ``shard`` and ``offset``; the samples between them are read and
        dropped undecoded (a tar stream cannot seek)."""
        base, k = self.shard, 0
        _, first, end = pieces[0]
        start = max(first, self.offset)
        if end is not None and start >= end and len(pieces) == 1:
            return  # resumed right after this piece's last sample
        declared = self._declared.get(url)
        i = -1
        for i, raw in enumerate(_iter_shard(url, self.on_error)):
            while end is not None and i >= end and k + 1 < len(pieces):  # on to the next piece of this shard
                k += 1
                self.shard, self.offset = base + k, 0
                _, start, end = pieces[k]
            if end is not None and i >= end:  # only reached at the declared end: the shard holds more
                self._size_mismatch(url, declared, "more than")
                return
            if i < start:
                continue
            self.offset = i + 1
            yield raw
            if end is not None and i + 1 == end and k + 1 == len(pieces) and end != declared:
                return  # the rest of this shard belongs to other slots
        if end is not None and i + 1 < end:
            self._size_mismatch(url, declared, f"only {i + 1}, fewer than")

    def _size_mismatch(self, url: str, declared: int | None, how: str) -> None:
        if url in self._size_warned:
            return
        self._size_warned.add(url)
        logger.warning("shard %s holds %s the %s samples its sizes.json lists: epochs are no longer exact "
                       "(samples beyond the listed count are never read); rewrite sizes.json", url, how, declared)


def _mix_chunk(seed: int, gen: int, slot: int, chunk_no: int, p: np.ndarray) -> np.ndarray:
    """Source choices ``chunk_no * _MIX_CHUNK ...`` of a slot: a pure function of ``(seed, gen, slot, chunk)``."""
    rng = np.random.default_rng(_rng_key(seed, _SALT_MIX, gen, slot, chunk_no))
    return rng.choice(len(p), size=_MIX_CHUNK, p=p)


class _Mixer:
    """Raw samples of one slot: one pooled source, or a per-sample weighted choice among sources.

    State ``{"t": draws so far, "sources": [cursor states]}``; source choice number ``t`` is a pure
    function of ``(seed, gen, slot, t)``. ``elastic``: the slot's re-partition record (``gcl.data.elastic``).
    """

    def __init__(self, sources: list[list[str]], weights: list[float] | None, *, seed: int, resampled: bool,
                 slot: int, n_slots: int, state: dict[str, Any],
                 on_error: Callable[[str, str, BaseException], None],
                 sizes: list[list[int] | None] | None = None, elastic: dict[str, Any] | None = None) -> None:
        self.seed, self.slot = seed, slot
        self.gen = int(elastic["gen"]) if elastic else 0
        sizes = sizes or [None] * len(sources)
        self.cursors = [
            _SourceCursor(urls, source=i, seed=seed, resampled=resampled, slot=slot, n_slots=n_slots,
                          state=st, on_error=on_error, sizes=sz,
                          elastic={"gen": self.gen, **elastic["sources"][i]} if elastic else None)
            for i, (urls, st, sz) in enumerate(zip(sources, state["sources"], sizes))
        ]
        self.epoch_end = False  # the last sample returned ended this slot's share of an epoch of its source
        self.p = None if weights is None else np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.t = int(state["t"])
        self._chunk_no, self._chunk = -1, np.zeros(0, dtype=np.int64)

    def state(self) -> dict[str, Any]:
        return {"t": self.t, "sources": [c.state() for c in self.cursors]}

    def next(self) -> dict[str, Any]:
        i = 0
        if self.p is not None:
            chunk_no = self.t // _MIX_CHUNK
            if chunk_no != self._chunk_no:
                self._chunk_no, self._chunk = chunk_no, _mix_chunk(self.seed, self.gen, self.slot, chunk_no, self.p)
            i = int(self._chunk[self.t % _MIX_CHUNK])
        self.t += 1
        raw = next(self.cursors[i])
        self.epoch_end = self.cursors[i].epoch_end
        return raw


def _fresh_position(n_sources: int) -> dict[str, Any]:
    return {"block": 0, "j": 0,
            "start": {"t": 0, "sources": [{"epoch": 0, "shard": 0, "offset": 0, "seen": 0}
                                          for _ in range(n_sources)]},
            "skipped": {}}


def _seed_all(s: int) -> random.Random:
    """Seed the global RNGs that torchvision transforms use; return a private RNG for list sampling.

    Only the CPU generator: ``torch.manual_seed`` would also reseed CUDA, which in-process loading
    (num_workers=0) must not touch.
    """
    torch.default_generator.manual_seed(s)
    random.seed(s)
    return random.Random(s)



# ----------------------------------------------------------------------------------------- training

class _TrainDataset(IterableDataset):
    """Each (logical) worker yields full batches forever, tagged with ``_worker`` and ``_pos``."""

    def __init__(self, spec: dict[str, Any], positions: list[dict[str, Any]], first_worker: int) -> None:
        super().__init__()
        self.spec, self.positions, self.first_worker = spec, positions, first_worker

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        n_logical = len(self.positions)
        logical = ((info.id if info is not None else 0) + self.first_worker) % n_logical
        return _worker_batches(self.spec, logical, self.positions[logical], in_worker=info is not None)


def _prune_residual(elastic: dict[str, Any], start: dict[str, Any]) -> dict[str, Any]:
    """The re-partition record without the epochs each source's cursor has left behind (they would only
    grow every checkpoint); ``gcl.data.elastic`` reads a dropped epoch as one this slot has finished."""
    sources, dropped = [], False
    for src, cur in zip(elastic["sources"], start["sources"]):
        keep = {e: runs for e, runs in src["residual"].items() if int(e) >= int(cur["epoch"])}
        dropped |= len(keep) < len(src["residual"])
        sources.append({**src, "residual": keep})
    return {**elastic, "sources": sources} if dropped else elastic


def _block_order(seed: int, gen: int, slot: int, block_no: int, n: int) -> np.ndarray:
    """The order in which a slot's block ``block_no`` of ``n`` raw samples is used."""
    return np.random.default_rng(_rng_key(seed, _SALT_BLOCK, gen, slot, block_no)).permutation(n)


def _read_block(mixer: _Mixer, block_size: int) -> list[dict[str, Any]]:
    """The next shuffle block: ``block_size`` raw samples, or fewer where the slot's share of an epoch ends.
    A block never mixes two epochs, so exact epochs stay exact and a sample never meets itself in a block."""
    block = []
    while len(block) < block_size:
        block.append(mixer.next())
        if mixer.epoch_end:
            break
    return block


def _worker_batches(spec: dict[str, Any], logical: int, pos: dict[str, Any], *, in_worker: bool) -> Iterator[Batch]:
    n_logical = spec["num_workers"] or 1
    slot = spec["rank"] * n_logical + logical
    n_slots = spec["world_size"] * n_logical
    seed, block_size, batch_size = spec["seed"], spec["block_size"], spec["batch_size"]
    log = _SkipLog(f"rank {spec['rank']} worker {logical}", pos["skipped"])
    elastic = pos.get("elastic")  # present after a resume on another layout (gcl.data.elastic)
    gen = int(elastic["gen"]) if elastic else 0
    mixer = _Mixer(spec["sources"], spec["weights"], seed=seed, resampled=spec["resampled"], slot=slot,
                   n_slots=n_slots, state=pos["start"], on_error=lambda r, url, e: log(r, url, repr(e)),
                   sizes=spec["sizes"], elastic=elastic)
    decode = _Decoder(spec["fields"], spec["image_transform"], spec["list_rule"], spec["list_sep"],
                      spec["background"])
    collate = _Collator(spec["tokenizer"], spec["context_length"], spec["fields"], spec["trim_tokens"])
    block_no, j0 = int(pos["block"]), int(pos["j"])
    pending: list[dict[str, Any]] = []
    consecutive_skips = 0
    saved_rng = None
    while True:
        start = mixer.state()
        if elastic:
            elastic = _prune_residual(elastic, start)
        block = _read_block(mixer, block_size)
        end = mixer.state()
        order = _block_order(seed, gen, slot, block_no, len(block))
        for j in range(j0, len(block)):
            if not in_worker and saved_rng is None:
                # In-process loading must not disturb the trainer's RNG streams (dropout, etc.).
                saved_rng = (torch.random.get_rng_state(), random.getstate())
            raw = block[order[j]]
            block[order[j]] = None  # free the bytes early
            rng = _seed_all(int(np.random.SeedSequence(_rng_key(seed, _SALT_SAMPLE, gen, slot, block_no, j))
                                .generate_state(1)[0]))
            try:
                pending.append(decode(raw, rng))
                consecutive_skips = 0
            except _Skip as skip:
                log(skip.args[0], raw["__key__"], f"{skip.args[1] if len(skip.args) > 1 else ''} @ {raw['__url__']}")
                consecutive_skips += 1
                if consecutive_skips >= _MAX_CONSECUTIVE_SKIPS:
                    raise RuntimeError(
                        f"{consecutive_skips} consecutive samples were unusable in rank {spec['rank']} worker "
                        f"{logical} (counts {dict(log.totals)}); check the shards' schema (docs: shard schema)"
                    ) from None
                continue
            if len(pending) == batch_size:
                nxt = ({"block": block_no, "j": j + 1, "start": start} if j + 1 < len(block)
                       else {"block": block_no + 1, "j": 0, "start": end})
                batch = collate(pending, log.take_delta())
                batch["_worker"] = logical
                batch["_pos"] = {**nxt, "skipped": dict(log.totals)}
                if elastic:
                    batch["_pos"]["elastic"] = elastic
                pending = []
                if saved_rng is not None:
                    torch.random.set_rng_state(saved_rng[0])
                    random.setstate(saved_rng[1])
                    saved_rng = None
                yield _to_wire(batch) if in_worker else batch
        block_no, j0 = block_no + 1, 0


class TrainStream:
    """Infinite, exactly resumable stream of training batches (see ``build_train_stream``).

    ``for batch in stream`` yields full batches forever; iterating again continues where the last
    iteration's consumer stopped (batches prefetched but never yielded are not lost).
    ``state_dict()`` is JSON-able and describes exactly the batches yielded so far; ``load_state_dict``
    (before iterating) makes the stream continue from there, bit-identically for the same configuration.
    Each rank has its own state: save all ranks' states (e.g. ``all_gather_object``) and give each rank
    its own back; ``load_state_dict`` also accepts the list of all ranks' states and picks ``rank``'s, or,
    when they come from another layout of ranks x workers, re-partitions them exactly (``gcl.data.elastic``).
    """

    def __init__(self, spec: dict[str, Any], *, pin_memory: bool = False, prefetch_factor: int = 2) -> None:
        self._spec = spec
        self.num_workers: int = spec["num_workers"]
        self.rank: int = spec["rank"]
        self.pad_id: int = pad_id_of(spec["tokenizer"])
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        n_logical = max(1, self.num_workers)
        self._positions = [_fresh_position(len(spec["sources"])) for _ in range(n_logical)]
        self._next_worker = 0
        self._batches = 0

    # -- state
    def _fingerprint(self) -> dict[str, Any]:
        s = self._spec
        return {"sources": [[len(u), stable_hash("\n".join(u))] for u in s["sources"]], "weights": s["weights"],
                "sizes": [None if z is None else stable_hash(json.dumps(z)) for z in s["sizes"]],
                "resampled": s["resampled"], "seed": s["seed"], "block_size": s["block_size"],
                "batch_size": s["batch_size"], "fields": s["fields"], "list_rule": s["list_rule"],
                # logical workers: 0 (in-process) and 1 worker read the same samples in the same order
                "num_workers": max(1, s["num_workers"]), "world_size": s["world_size"], "rank": s["rank"]}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position after the batches yielded so far: per logical worker ``{"block", "j", "start",
        "skipped"}``, the worker that makes the next batch, the batch count and a configuration fingerprint."""
        return json.loads(json.dumps({
            "version": STATE_VERSION, "config": self._fingerprint(), "batches": self._batches,
            "next_worker": self._next_worker, "workers": self._positions,
        }))

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]], strict: bool = False) -> None:
        """Continue from ``state``: this rank's state, or the list of every rank's states.

        Given every rank's states of another layout (world size, DataLoader workers or per-rank batch; the
        data settings unchanged), the saved epochs are re-partitioned over this layout and stay exact
        (``gcl.data.elastic``). Any other difference (data settings, or one state of another layout) makes
        exact resume impossible: ``strict`` raises, otherwise each source restarts at the start of the
        earliest saved epoch (a warning says so). Where a re-partition is impossible (shard sizes unknown),
        ``strict`` raises ``gcl.data.elastic.ElasticError`` and otherwise the epoch restarts the same way."""
        states = state if isinstance(state, list) else [state]
        for st in states:
            if st.get("version") != STATE_VERSION:
                raise ValueError(f"data stream state version {st.get('version')!r}; this code reads {STATE_VERSION}")
        here = self._fingerprint()

        def differs(st: dict[str, Any]) -> list[str]:
            saved = {**st["config"], "num_workers": max(1, int(st["config"].get("num_workers") or 0))}
            return sorted(k for k in here if saved.get(k) != here[k])

        if isinstance(state, list):
            layout = {"world_size", "num_workers", "batch_size"}
            diffs = [set(differs(st)) for st in states]
            if len(states) != here["world_size"] or any(d & layout for d in diffs):  # another layout
                if all(d <= layout | {"rank"} for d in diffs):
                    return self._repartition(states, strict)
                msg = (f"data stream state differs from this configuration in {sorted(set().union(*diffs))}; exact "
                       "resume is impossible")
                if strict:
                    raise ValueError(msg + " (resume with the same data settings or pass strict=False)")
                self._batches = max(int(s["batches"]) for s in states)
                return self._restart_epochs(states[0], msg)
            mine = [st for st in states if st.get("config", {}).get("rank") == self.rank]
            if len(mine) != 1:
                raise ValueError(f"expected exactly one state for rank {self.rank} in the list, found {len(mine)}")
            state = mine[0]
        diff = differs(state)
        self._batches = int(state["batches"])
        if not diff:
            self._positions = [dict(p) for p in state["workers"]]
            self._next_worker = int(state["next_worker"])
            return
        msg = f"data stream state differs from this configuration in {diff}; exact resume is impossible"
        if strict:
            raise ValueError(msg + " (resume with the same data/loader settings or pass strict=False)")
        self._restart_epochs(state, msg)

    def _repartition(self, states: list[dict[str, Any]], strict: bool) -> None:
        from gcl.data.elastic import ElasticError, repartition  # elastic builds on this module's primitives

        try:
            self._positions, self._batches = repartition(states, self._spec)
        except ElasticError as e:
            if strict:
                raise
            self._batches = max(int(s["batches"]) for s in states)
            self._restart_epochs(states[0], str(e))
            return
        self._next_worker = 0

    def _restart_epochs(self, state: dict[str, Any], msg: str) -> None:
        """Every worker starts each source at the start of the earliest epoch ``state`` saved (skip totals kept)."""
        n_src = len(self._spec["sources"])
        saved = [w["start"]["sources"] for w in state["workers"]]
        epochs = [min(w[i]["epoch"] for w in saved) if len(saved[0]) == n_src else 0 for i in range(n_src)]
        totals: Counter[str] = Counter()
        for w in state["workers"]:
            totals.update(w["skipped"])
        logger.warning("%s; restarting each source at the start of epoch %s", msg, epochs)
        self._positions = [_fresh_position(n_src) for _ in self._positions]
        for p in self._positions:
            p["start"]["sources"] = [{"epoch": e, "shard": 0, "offset": 0, "seen": 0} for e in epochs]
        self._positions[0]["skipped"] = dict(totals)  # keep the totals in one place
        self._next_worker = 0

    # -- progress
    @property
    def skipped(self) -> dict[str, int]:
        """Total skipped samples by reason over all workers, up to the last yielded batch.

        Every reason of ``SKIP_REASONS`` is present (zeros included) and in that order, so ranks can
        all-reduce the values without first agreeing on the keys.
        """
        out: Counter[str] = Counter()
        for p in self._positions:
            out.update(p["skipped"])
        return _all_reasons(out)

    @property
    def epoch(self) -> int:
        """The earliest epoch (of source 0) any worker is reading: a progress indicator."""
        return min(p["start"]["sources"][0]["epoch"] for p in self._positions)

    @property
    def batches(self) -> int:
        """Batches yielded so far (over the stream's life, resumes included)."""
        return self._batches

    def _loader_generator(self) -> torch.Generator:
        """The DataLoader's own generator. Without one, starting the workers draws their base seed from the
        global generator: a resumed run, whose trainer restored that generator from the checkpoint, would
        then draw it again and its dropout / patch dropout would diverge from the uninterrupted run. Workers
        reseed per sample (``_seed_all``), so this seed only has to be fixed, not meaningful."""
        seed = np.random.SeedSequence([self._spec["seed"], _SALT_LOADER, self.rank, self._batches])
        return torch.Generator().manual_seed(int(seed.generate_state(1)[0]))

    def __iter__(self) -> Iterator[Batch]:
        n_logical = max(1, self.num_workers)
        ds = _TrainDataset(self._spec, [dict(p) for p in self._positions], self._next_worker)
        if self.num_workers == 0:
            it: Iterator[Batch] = iter(ds)
        else:
            it = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                 prefetch_factor=self.prefetch_factor, persistent_workers=False,
                                 generator=self._loader_generator()))
        try:
            for batch in it:
                batch = _from_wire(batch)
                w = batch.pop("_worker")
                pos = batch.pop("_pos")
                if w != self._next_worker:  # the resume bookkeeping relies on strict round-robin
                    raise RuntimeError(f"DataLoader returned worker {w}'s batch, expected {self._next_worker}")
                self._positions[w] = pos
                self._next_worker = (w + 1) % n_logical
                self._batches += 1
                yield batch
        finally:
            del it  # shuts the workers down when the consumer stops early


def build_train_stream(
    urls: str | list[str],
    *,
    tokenizer: Any,
    context_length: dict[str, int],
    image_transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    fields: list[str],
    num_workers: int,
    seed: int,
    resampled: bool = False,
    source_weights: list[float] | None = None,
    shuffle_buffer: int = 1000,
    list_rule: str = "join",
    list_sep: str = ", ",
    rank: int = 0,
    world_size: int = 1,
    trim_tokens: bool = True,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    image_background: str | tuple[int, int, int] = "white",
) -> TrainStream:
    """The infinite training stream of one rank.

    Args:
        urls: one shard pattern (``'dir/shard-{000000..000099}.tar'``, ``'a.tar::b.tar'``, ``pipe:...``,
            ``s3://...``) or a list of patterns. Without ``source_weights`` all patterns form one pool;
            with them each list element is a source and every sample comes from source ``i`` with
            probability ``source_weights[i] / sum`` (each source cycles its own epochs).
        tokenizer: an open_clip tokenizer (``open_clip.get_tokenizer(name)``).
        context_length: max tokens per field, e.g. ``{"title": 77, "colors": 8}``.
        image_transform: PIL RGB image -> FloatTensor[3, H, W] (open_clip's train preprocess).
        batch_size: samples per batch B (every training batch is full).
        fields: text fields to extract from each sample's json.
        num_workers: DataLoader worker processes (0 = in-process).
        seed: fixes shard order per epoch, sample order, augmentation and list sampling (>= 0).
        resampled: draw shards with replacement (infinite) instead of exact epochs without replacement.
        shuffle_buffer: sample-shuffle block size (raw samples); <= 1 keeps the (shuffled) shard order.
            Each worker holds one block of raw (encoded) samples in memory, like webdataset's buffer.
        list_rule: list-valued fields become ``list_sep.join(items)`` ("join") or one seeded random item
            ("sample"). Empty strings/lists count as missing.
        rank, world_size: this process's data-parallel rank and the number of ranks. In epoch mode ranks
            x workers read disjoint data: samples split exactly when the shard sizes are known
            (``sizes.json``, or counted for local shards), else whole shards (with fewer shards than slots,
            samples filtered).
        image_background: the colour transparent pixels are composited on (``gcl.data.image``).
        trim_tokens: drop trailing all-pad token columns (set False for text towers that pool a fixed
            position, e.g. SigLIP's 'last' pooling, where pad == eos would also be cut).

    Yields (per batch): ``image`` FloatTensor[B,3,H,W]; ``tokens[f]`` LongTensor[B,L_f] (L_f <= context
    length, trimmed to the longest row, missing rows all pad); ``present[f]`` BoolTensor[B] (plus
    ``present["image"]``, all True); ``text_id[f]`` LongTensor[B] (hash of the token row, 0 if missing);
    ``item_id`` LongTensor[B]; ``score``/``position`` FloatTensor[B] (NaN if missing); ``text[f]``
    list[str | None]; ``key`` list[str]; ``skipped`` dict[reason, int] (skips since this worker's
    previous batch).
    """
    _validate_text_args(tokenizer, context_length, fields, list_rule)
    _check_train_args(batch_size, num_workers, seed, rank, world_size)
    sources = _sources(urls, source_weights)
    sizes = [None if resampled else _source_sizes(i, src) for i, src in enumerate(sources)]
    _warn_if_few_shards(sources, sizes, world_size, num_workers, resampled)
    spec = {
        "sources": sources, "sizes": sizes,
        "weights": None if source_weights is None else [float(w) for w in source_weights],
        "resampled": bool(resampled), "seed": seed, "block_size": max(1, int(shuffle_buffer)),
        "batch_size": int(batch_size), "fields": list(fields), "context_length": dict(context_length),
        "list_rule": list_rule, "list_sep": list_sep, "tokenizer": tokenizer, "image_transform": image_transform,
        "num_workers": int(num_workers), "rank": int(rank), "world_size": int(world_size),
        "trim_tokens": bool(trim_tokens), "background": parse_background(image_background),
    }
    return TrainStream(spec, pin_memory=pin_memory, prefetch_factor=prefetch_factor)


def _check_train_args(batch_size: int, num_workers: int, seed: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def _sources(urls: str | list[str], source_weights: list[float] | None) -> list[list[str]]:
    """Shard URLs per source: one pool of every pattern without weights, else one source per pattern. Empty
    shards are left out (a warning names them): one would leave the worker it falls to without samples.
    Only a source with no shard holding samples is an error."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    if source_weights is not None:
        if len(source_weights) != len(patterns):
            raise ValueError(f"{len(source_weights)} source_weights for {len(patterns)} url patterns; give one "
                             "weight per pattern")
        if any(w < 0 for w in source_weights) or sum(source_weights) <= 0:
            raise ValueError(f"source_weights must be >= 0 with a positive sum, got {source_weights}")
    out = []
    for i, group in enumerate([patterns] if source_weights is None else [[p] for p in patterns]):
        urls_i = expand_urls(group)
        empty = [u for u in urls_i if is_empty_shard(u)]
        if len(empty) == len(urls_i):
            raise ValueError(f"source {i} ({group}) has no samples at all: its {len(urls_i)} shard(s) are empty "
                             f"({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''})")
        if empty:
            logger.warning("source %d: leaving out %d empty shard(s) of %d: %s%s", i, len(empty), len(urls_i),
                           ", ".join(empty[:5]), ", ..." if len(empty) > 5 else "")
        out.append([u for u in urls_i if u not in empty])
    return out


def _source_sizes(i: int, urls: list[str]) -> list[int] | None:
    """Per-shard sample counts of source ``i`` for exact epochs (None: unknown, shard-split epochs)."""
    sizes = shard_sizes(urls)
    if sizes is not None and sum(sizes) == 0:
        raise ValueError(f"source {i} has no samples: sizes.json lists 0 for all its {len(urls)} shards "
                         f"({urls[0]}...); check the shard pattern, or rewrite sizes.json if it is stale")
    return sizes


def _warn_if_few_shards(sources: list[list[str]], sizes: list[list[int] | None], world_size: int,
                        num_workers: int, resampled: bool) -> None:
    """Fewer shards than data readers (processes x DataLoader workers) where sizes are unknown (shard-split
    epochs): every reader reads every shard."""
    workers = max(1, num_workers)
    n = world_size * workers
    readers = (f"{n} data reader{'s' if n > 1 else ''} ({world_size} process{'es' if world_size > 1 else ''} x "
               f"{workers} DataLoader worker{'s' if workers > 1 else ''})" if num_workers else
               f"{n} process{'es' if n > 1 else ''} reading in-process (data.num_workers=0)")
    for i, (src, sz) in enumerate(zip(sources, sizes)):
        if not resampled and sz is None and len(src) < n:
            logger.warning(
                "source %d has %d shard%s for %s: each reader reads every shard and keeps 1 sample in %d "
                "(correct, but %dx the reading); write at least %d shards or set data.resampled=true",
                i, len(src), "s" if len(src) > 1 else "", readers, n, n, n)
