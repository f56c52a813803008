"""Elastic exact resume: the training stream's saved position re-partitioned over another layout.

A checkpoint holds the data position of every slot (one DataLoader worker of one rank; see
``gcl.data.stream``). When a run resumes on another number of ranks, DataLoader workers or per-rank batch,
:func:`repartition` turns those positions into positions for the new slots such that every epoch stays exact:
over the old and the new layout together, each sample of the interrupted epoch is used once, none lost, none
repeated.

What "consumed" means. A slot's position after its last *yielded* batch is ``(block, j, start)``: the
slot had read the raw samples of its plan up to ``start`` (the mixer state where block ``block`` began),
then the block (``shuffle_buffer`` raw samples, fewer where an epoch's share ends), and had used the block's
samples in its shuffled order up to ``j`` (yielded, or skipped as unusable). So the consumed samples are every
sample of the slot's plan before ``start`` plus ``block[order[:j]]``; the block's other samples sit in the
shuffle buffer and are *not* consumed, and neither is anything the DataLoader had prefetched (its batches
were never yielded, so the position does not include them). The block is not read again: its content follows
from the plan, the mixer's source choices and the block permutation, which are pure functions of the seed
and the slot, so it is recomputed from the shard sizes (``sizes.json``) alone.

The re-partition, per source: epochs before the earliest one any old slot is still reading are done; each
epoch from there to the latest one touched keeps its remainder (its samples the old layout owned minus those
consumed), in sample order; the later epochs are split over the new layout as usual. The remainders, epoch by
epoch, are cut into one contiguous run per new slot (slot order). With one source, run sizes follow the new
stream's schedule (step ``k`` takes a batch of ``batch_size`` from worker ``k % workers`` of every rank), so
the remainder ends on the step where the interrupted epoch would have ended for the same global batch (a
remainder that is not a whole number of global batches is shared by the ranks' batches of its last step).
With weighted sources, each source's remainder is split evenly (``_quota``): their epochs never line up
with steps anyway.

Randomness: every slot-specific stream (block order, augmentation, list sampling, source choices, resampled
draws) of a new slot is keyed by ``(seed, generation, slot, ...)`` with the generation (number of
re-partitions so far) in the key, so the new slots draw fresh streams, the same ones on every replay. The
shard order of an epoch depends on ``(seed, source, epoch)`` only and is unchanged.

Limits: exact re-partition needs every shard's sample count (remote shards without ``sizes.json`` have
approximate epochs in the first place: :class:`ElasticError`). Resampled streams have no epochs to keep: the
new slots start fresh draws. A shard holding another number of samples than its ``sizes.json`` lists breaks
exactness here as it does for epochs (the stream warns about it).

Not here: the stream itself and its state (``gcl.data.stream``), the per-rank batch and the trainer's RNG
(``gcl.resume``, ``gcl.train``).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gcl.data.stream import _MIX_CHUNK, _block_order, _exact_range, _fresh_position, _mix_chunk

logger = logging.getLogger(__name__)

TOPOLOGY = ("world_size", "rank", "num_workers", "batch_size")  # fingerprint keys a re-partition may change


class ElasticError(ValueError):
    """The saved positions cannot be re-partitioned exactly; the message says why and the ways out."""


class _Seq:
    """An ordered run list ``[(a, b), ...]`` of epoch sample numbers, indexed as one sequence."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = [(int(a), int(b)) for a, b in ranges if b > a]
        self.cum = np.cumsum([0] + [b - a for a, b in self.ranges])
        self.len = int(self.cum[-1])

    def at(self, k: int) -> int:
        j = int(np.searchsorted(self.cum, k, side="right")) - 1
        return self.ranges[j][0] + k - int(self.cum[j])

    def prefix(self, k: int) -> list[tuple[int, int]]:
        out = []
        for a, b in self.ranges:
            if k <= 0:
                break
            out.append((a, a + min(b - a, k)))
            k -= b - a
        return out


@dataclass
class _OldSlot:
    """One slot of the saved layout: its number, the layout's slot count and its saved position."""

    slot: int
    n_slots: int
    pos: dict[str, Any]
    _plans: dict[tuple[int, int], _Seq] = field(default_factory=dict)

    def plan(self, source: int, epoch: int, total: int) -> _Seq:
        """The sample numbers this slot reads from ``epoch`` of ``source``, in reading order."""
        key = (source, epoch)
        if key not in self._plans:
            el = self.pos.get("elastic")
            src = el["sources"][source] if el else {"residual": {}, "from": 0}
            if str(epoch) in src["residual"]:
                self._plans[key] = _Seq(src["residual"][str(epoch)])
            elif epoch < int(src["from"]):
                self._plans[key] = _Seq([])
            else:
                self._plans[key] = _Seq([_exact_range(total, epoch, self.slot, self.n_slots)])
        return self._plans[key]


def _check_states(states: list[dict[str, Any]]) -> tuple[int, int, int]:
    """The saved layout ``(ranks, logical workers, per-rank batch)``; raises unless ``states`` is every rank's
    state of one layout, once each."""
    cfgs = [s.get("config", {}) for s in states]
    world = int(cfgs[0].get("world_size", 0))
    ranks = sorted(int(c.get("rank", -1)) for c in cfgs)
    if ranks != list(range(world)) or any(int(c.get("world_size", 0)) != world for c in cfgs):
        raise ElasticError(f"the checkpoint's data positions are not one per rank of one layout (ranks {ranks}, "
                           f"world sizes {[c.get('world_size') for c in cfgs]}); the checkpoint is damaged")
    workers = {max(1, int(c.get("num_workers") or 0)) for c in cfgs}
    batches = {int(c["batch_size"]) for c in cfgs}
    gens = {int((p.get("elastic") or {}).get("gen", 0)) for s in states for p in s["workers"]}
    if len(workers) != 1 or len(batches) != 1 or len(gens) != 1 or \
            any(len(s["workers"]) != max(1, int(c.get("num_workers") or 0)) for s, c in zip(states, cfgs)):
        raise ElasticError("the checkpoint's data positions disagree about workers per rank, batch size or "
                           "re-partition generation; the checkpoint is damaged")
    return world, workers.pop(), batches.pop()


def _old_slots(states: list[dict[str, Any]], world: int, workers: int) -> list[_OldSlot]:
    by_rank = sorted(states, key=lambda s: int(s["config"]["rank"]))
    return [_OldSlot(r * workers + w, world * workers, by_rank[r]["workers"][w])
            for r in range(world) for w in range(workers)]


def _block(old: _OldSlot, totals: list[int], p: np.ndarray | None, seed: int, block_size: int,
           gen: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """The raw samples of the slot's current block as ``(source, epoch, number)`` in reading order, and each
    source's cursor ``(epoch, seen)`` at the block's start, moved past a finished epoch.

    Mirrors ``stream._read_block`` over ``_Mixer`` and ``_SourceCursor`` without reading a shard."""
    start = old.pos["start"]
    curs = []
    for i, c in enumerate(start["sources"]):
        e, seen = int(c["epoch"]), int(c["seen"])
        if seen >= old.plan(i, e, totals[i]).len:
            e, seen = e + 1, 0  # resumed right after the last sample of an epoch's share
        curs.append((e, seen))
    at_start = list(curs)
    t, block, chunk_no, chunk = int(start["t"]), [], -1, None
    while len(block) < block_size:
        i = 0
        if p is not None:
            if t // _MIX_CHUNK != chunk_no:
                chunk_no = t // _MIX_CHUNK
                chunk = _mix_chunk(seed, gen, old.slot, chunk_no, p)
            i = int(chunk[t % _MIX_CHUNK])
        t += 1
        e, seen = curs[i]
        seq = old.plan(i, e, totals[i])
        for _ in range(100_000):  # shares of 0 samples (fewer samples than slots) are skipped, as the cursor does
            if seen < seq.len:
                break
            e, seen = e + 1, 0
            seq = old.plan(i, e, totals[i])
        else:
            raise ElasticError(f"slot {old.slot}: source {i} has no samples for it in 100000 epochs")
        block.append((i, e, seq.at(seen)))
        curs[i] = (e, seen + 1)
        if seen + 1 == seq.len:
            break  # a block never crosses the end of an epoch's share
    return block, at_start


def _mark(arr: np.ndarray, ranges: list[tuple[int, int]], what: str) -> None:
    for a, b in ranges:
        if arr[a:b].any():
            raise ElasticError(f"the checkpoint's data positions overlap ({what}: samples {a}..{b - 1} twice); "
                               "the checkpoint is damaged")
        arr[a:b] = True


def remainders(states: list[dict[str, Any]], sizes: list[list[int]], weights: list[float] | None, seed: int,
               block_size: int) -> tuple[list[list[tuple[int, list[tuple[int, int]]]]], list[int], int]:
    """Per source, what the saved layout left of its epochs: ``([(epoch, runs), ...] per source, first epoch
    to split as usual per source, generation)``; ``runs`` are sorted ``[a, b)`` runs of epoch sample numbers."""
    world, workers, _ = _check_states(states)
    olds = _old_slots(states, world, workers)
    gen = int((olds[0].pos.get("elastic") or {}).get("gen", 0))
    totals = [sum(z) for z in sizes]
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / float(sum(weights))
    blocks = []
    for old in olds:
        block, at_start = _block(old, totals, p, seed, block_size, gen)
        order = _block_order(seed, gen, old.slot, int(old.pos["block"]), len(block))
        used = [block[k] for k in order[:int(old.pos["j"])]]
        blocks.append((at_start, used))
    out, firsts = [], []
    for i, total in enumerate(totals):
        lo = min(at_start[i][0] for at_start, _ in blocks)
        touched = [e for at_start, used in blocks for e in [at_start[i][0]] + [e for s, e, _ in used if s == i]]
        froms = [int(o.pos["elastic"]["sources"][i]["from"]) for o in olds if o.pos.get("elastic")]
        hi = max(touched)
        consumed: dict[int, np.ndarray] = {}
        owned: dict[int, np.ndarray] = {}
        for e in range(lo, max([hi, *froms]) + 1):
            consumed[e], owned[e] = np.zeros(total, bool), np.zeros(total, bool)
            for old in olds:
                _mark(owned[e], old.plan(i, e, total).ranges, f"source {i} epoch {e} shares")
        for old, (at_start, used) in zip(olds, blocks):
            e0, seen = at_start[i]
            for e in range(lo, e0):
                _mark(consumed[e], old.plan(i, e, total).ranges, f"source {i} epoch {e}")
            _mark(consumed[e0], old.plan(i, e0, total).prefix(seen), f"source {i} epoch {e0}")
            for s, e, k in used:
                if s == i:
                    _mark(consumed[e], [(k, k + 1)], f"source {i} epoch {e} shuffle block")
        first = max([hi + 1 if consumed[hi].any() else hi, *froms])
        left = []
        for e in range(lo, first):
            rest = owned[e] & ~consumed[e]
            if rest.any():
                edges = np.flatnonzero(np.diff(np.concatenate([[0], rest.view(np.int8), [0]])))
                left.append((e, [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]))
        out.append(left)
        firsts.append(first)
    return out, firsts, gen


def schedule_quotas(total: int, world: int, workers: int, batch: int) -> list[int]:
    """Samples per new slot (``rank * workers + worker``) such that ``total`` samples end on one step: step
    ``k`` takes ``batch`` samples from worker ``k % workers`` of every rank; the last, partial step's
    samples are shared by the ranks as evenly as possible."""
    full, rest = divmod(total, batch * world)
    quotas = [0] * (world * workers)
    for r in range(world):
        for w in range(workers):
            quotas[r * workers + w] = batch * len(range(w, full, workers))
        quotas[r * workers + full % workers] += (r + 1) * rest // world - r * rest // world
    return quotas


def _cut(left: list[tuple[int, list[tuple[int, int]]]], quotas: list[int]) -> list[dict[str, list[list[int]]]]:
    """Cut the epochs' runs, in order, into consecutive pieces of ``quotas`` samples: per slot
    ``{epoch: runs}``."""
    flat = [(e, a, b) for e, runs in left for a, b in runs]
    out: list[dict[str, list[list[int]]]] = []
    k = 0
    for q in quotas:
        mine: dict[str, list[list[int]]] = {}
        while q > 0:
            e, a, b = flat[k]
            n = min(q, b - a)
            mine.setdefault(str(e), []).append([a, a + n])
            q -= n
            if a + n == b:
                k += 1
            else:
                flat[k] = (e, a + n, b)
        out.append(mine)
    return out


def repartition(states: list[dict[str, Any]], spec: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Positions of this rank's logical workers (``spec``: the new stream's) that continue the saved layout's
    epochs exactly, and the stream's batch count. ``states``: every old rank's ``TrainStream.state_dict()``."""
    world, workers, batch = _check_states(states)
    n_src = len(spec["sources"])
    new_world, new_workers = spec["world_size"], max(1, spec["num_workers"])
    n_new = new_world * new_workers
    if spec["resampled"]:
        gen = int((states[0]["workers"][0].get("elastic") or {}).get("gen", 0))
        left, firsts = [[] for _ in range(n_src)], [0] * n_src
    else:
        missing = [i for i, z in enumerate(spec["sizes"]) if z is None]
        if missing:
            raise ElasticError(
                f"source(s) {missing} have no known shard sizes (remote shards without sizes.json), so their "
                f"epochs are approximate and the data position cannot be re-partitioned exactly over another "
                f"layout; write sizes.json beside the shards, or relaunch with the checkpoint's {world} "
                f"process(es) x {workers} worker(s)")
        left, firsts, gen = remainders(states, spec["sizes"], spec["weights"], spec["seed"], spec["block_size"])
    shares = []
    for i in range(n_src):
        total = sum(b - a for _, runs in left[i] for a, b in runs)
        quotas = (schedule_quotas(total, new_world, new_workers, spec["batch_size"]) if spec["weights"] is None
                  else [(s + 1) * total // n_new - s * total // n_new for s in range(n_new)])
        shares.append(_cut(left[i], quotas))
    skipped: Counter[str] = Counter()
    for s in states:
        for p in s["workers"]:
            skipped.update(p["skipped"])
    positions = []
    for w in range(new_workers):
        slot = spec["rank"] * new_workers + w
        pos = _fresh_position(n_src)
        pos["elastic"] = {"gen": gen + 1, "sources": [{"residual": shares[i][slot], "from": firsts[i]}
                                                      for i in range(n_src)]}
        for i, cur in enumerate(pos["start"]["sources"]):
            cur["epoch"] = min([int(e) for e in shares[i][slot]] + [firsts[i]])
        positions.append(pos)
    if spec["rank"] == 0:
        positions[0]["skipped"] = dict(skipped)  # the totals live in one place, as the stream sums them
        left_n = [sum(b - a for _, runs in src for a, b in runs) for src in left]
        logger.info("data stream re-partitioned from %d rank(s) x %d worker(s) (batch %d per rank) to %d x %d "
                    "(batch %d): %s samples of the interrupted epoch(s) %s left, split over the new slots; "
                    "epoch %s on as usual", world, workers, batch, new_world, new_workers, spec["batch_size"],
                    left_n, [[e for e, _ in src] for src in left], firsts)
    return positions, max(int(s["batches"]) for s in states)
