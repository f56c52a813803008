"""Elastic exact resume at the stream level (issue 18.2): positions saved by one layout of ranks x workers,
re-partitioned over another, keep every epoch exact.

Shards of chosen sizes (with ``sizes.json``) are written here with tarfile. Each layout is simulated in one
process: every (rank, worker) slot is the generator a DataLoader worker runs, and step t takes worker
``t % workers``'s next batch on every rank, as ``TrainStream`` and the trainer do; the saved state is the real
``TrainStream.state_dict()`` of each rank and the new positions come from the real ``load_state_dict``. The
reference is the dataset itself: the multiset of keys used by the steps of an epoch must equal it.
"""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from gcl.data import stream as S
from gcl.data.elastic import ElasticError, schedule_quotas

_PNG = io.BytesIO()
Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(_PNG, format="PNG")
SIZES = [5, 37, 12, 28, 8, 19, 11]  # 120 samples, uneven shards


@pytest.fixture(scope="module")
def tok():
    return open_clip.get_tokenizer("ViT-B-32")


def write_layout(root: Path, sizes: list[int], prefix: str = "k") -> tuple[str, list[str]]:
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for i, n in enumerate(sizes):
        with tarfile.open(root / f"s-{i:03d}.tar", "w") as tf:
            for j in range(n):
                key = f"{prefix}{i:03d}_{j:03d}"
                keys.append(key)
                for ext, data in (("png", _PNG.getvalue()), ("json", json.dumps({"title": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    (root / "sizes.json").write_text(json.dumps({f"s-{i:03d}.tar": n for i, n in enumerate(sizes)}))
    return str(root / f"s-{{000..{len(sizes) - 1:03d}}}.tar"), keys


class Layout:
    """Every rank's stream of one layout, its slots stepped as the trainer steps them."""

    def __init__(self, urls, tok, world: int, workers: int, batch: int, states=None, shuffle: int = 7,
                 weights=None) -> None:
        self.world, self.workers = world, workers
        self.streams = [S.build_train_stream(urls, tokenizer=tok, context_length={"title": 8}, batch_size=batch,
                                             image_transform=lambda im: torch.zeros(1), fields=["title"],
                                             num_workers=workers, seed=11, rank=r, world_size=world,
                                             shuffle_buffer=shuffle, source_weights=weights)
                        for r in range(world)]
        if states is not None:
            for st in self.streams:
                st.load_state_dict(states, strict=True)
        n = max(1, workers)
        self.slots = {(r, w): S._worker_batches(st._spec, w, dict(st._positions[w]), in_worker=False)
                      for r, st in enumerate(self.streams) for w in range(n)}

    def steps(self, k: int) -> Counter:
        """Keys used by the next ``k`` global batches; each stream's position follows (as ``__iter__`` does)."""
        seen: Counter = Counter()
        n = max(1, self.workers)
        for _ in range(k):
            for st in self.streams:
                w = st._next_worker
                b = next(self.slots[st.rank, w])
                st._positions[w] = b["_pos"]
                st._next_worker = (w + 1) % n
                st._batches += 1
                seen.update(b["key"])
        return seen

    def states(self) -> list[dict]:
        return [st.state_dict() for st in self.streams]


@pytest.mark.parametrize("old, new", [
    ((2, 2, 6), (3, 2, 4)),  # 2 -> 3 ranks: per-rank batch 6 -> 4 (global 12)
    ((2, 2, 6), (1, 2, 12)),  # 2 -> 1
    ((1, 2, 12), (2, 2, 6)),  # 1 -> 2
    ((2, 2, 6), (3, 1, 4)),  # ranks and workers change together
    ((2, 0, 6), (4, 2, 3)),  # in-process loading -> 2 workers on 4 ranks
], ids=["2to3", "2to1", "1to2", "2x2to3x1", "2x0to4x2"])
def test_interrupted_epoch_is_the_dataset_once(tmp_path, tok, old, new):
    urls, keys = write_layout(tmp_path, SIZES)
    n, glob = len(keys), old[0] * old[2]
    per_epoch = n // glob  # 10 steps of 12 samples
    a = Layout(urls, tok, *old)
    head = a.steps(per_epoch + 3)  # into epoch 1, mid-round of the workers
    b = Layout(urls, tok, *new, states=a.states())
    epoch1 = head + b.steps(per_epoch - 3)
    assert epoch1 == Counter({k: 2 for k in keys})  # epoch 0, then epoch 1 across both layouts: once each
    assert b.steps(per_epoch) == Counter(keys)  # the next epoch, all on the new layout, is exact too


def test_twice_inside_the_remainder_and_back(tmp_path, tok):
    """A second re-partition while the first one's remainder is being read (3 layouts, 2 -> 3 -> 1 ranks),
    then a resume on the same layout: the epoch stays exact, and that resume is bit-exact as before."""
    urls, keys = write_layout(tmp_path, SIZES)
    a = Layout(urls, tok, 2, 2, 6)
    seen = a.steps(4)
    b = Layout(urls, tok, 3, 2, 4, states=a.states())
    seen += b.steps(2)
    c = Layout(urls, tok, 1, 3, 12, states=b.states())
    seen += c.steps(1)
    saved = c.states()
    tail = c.steps(3)
    assert Layout(urls, tok, 1, 3, 12, states=saved).steps(3) == tail  # same layout: continues as it would have
    assert seen + tail == Counter(keys)


def test_samples_in_the_shuffle_block_are_not_lost(tmp_path, tok):
    """A large shuffle block (more raw samples read than used): the unused ones must come back."""
    urls, keys = write_layout(tmp_path, SIZES)
    a = Layout(urls, tok, 2, 1, 6, shuffle=50)
    head = a.steps(3)
    st = a.states()
    assert all(p["j"] > 0 for s in st for p in s["workers"])  # stopped inside a block
    b = Layout(urls, tok, 3, 1, 4, states=st, shuffle=50)
    assert head + b.steps(7) == Counter(keys)


def test_the_same_repartition_replays_the_same_batches(tmp_path, tok):
    """The new slots' order and randomness are pure functions of the saved states: a replayed resume matches."""
    urls, _ = write_layout(tmp_path, SIZES)
    a = Layout(urls, tok, 2, 2, 6)
    a.steps(5)
    st = a.states()
    x, y = Layout(urls, tok, 3, 1, 4, states=st), Layout(urls, tok, 3, 1, 4, states=st)
    for _ in range(4):
        for r in range(3):
            assert next(x.slots[r, 0])["key"] == next(y.slots[r, 0])["key"]
    assert all(p["elastic"]["gen"] == 1 for s in x.states() for p in s["workers"])


def test_lagging_slots_in_two_epochs(tmp_path, tok):
    """Shares that are not whole batches: at the stop some slots read epoch 1 while others still read
    epoch 0. Both remainders are split; once they are used up every key has been seen twice."""
    urls, keys = write_layout(tmp_path, SIZES)
    a = Layout(urls, tok, 2, 2, 8, shuffle=5)  # 30 samples per slot: 3.75 batches
    seen = a.steps(9)
    ep = [[p["start"]["sources"][0]["epoch"] for p in s["workers"]] for s in a.states()]
    b = Layout(urls, tok, 1, 2, 16, states=a.states(), shuffle=5)
    # (epochs 0 and 1: 240 samples) - 9 steps x 16 = 96 left = 6 steps of 16
    seen += b.steps(6)
    assert seen == Counter({k: 2 for k in keys}), ep


def test_weighted_sources_stay_exact_per_source(tmp_path, tok):
    """Two weighted sources cycle their own epochs: after the re-partition, each source's keys are seen a
    number of times that differs by at most one between its keys (no sample lost or repeated within an
    epoch), and the counts of the smaller source prove several epochs were crossed."""
    ua, ka = write_layout(tmp_path / "a", [9, 14, 7], prefix="a")
    ub, kb = write_layout(tmp_path / "b", [40, 33, 27], prefix="b")
    a = Layout([ua, ub], tok, 2, 2, 5, weights=[1.0, 1.0])
    seen = a.steps(7)
    b = Layout([ua, ub], tok, 3, 1, 5, states=a.states(), weights=[1.0, 1.0])
    seen += b.steps(10)
    for ks in (ka, kb):
        counts = [seen[k] for k in ks]
        assert max(counts) - min(counts) <= 1, sorted(Counter(counts).items())
    assert min(seen[k] for k in ka) >= 3


def test_resampled_streams_start_fresh_draws(tmp_path, tok):
    urls, _ = write_layout(tmp_path, SIZES)
    a = Layout(urls, tok, 2, 1, 4)
    a.streams = [S.build_train_stream(urls, tokenizer=tok, context_length={"title": 8}, batch_size=4,
                                      image_transform=lambda im: torch.zeros(1), fields=["title"], num_workers=0,
                                      seed=11, rank=r, world_size=2, resampled=True) for r in range(2)]
    st = [s.state_dict() for s in a.streams]
    new = S.build_train_stream(urls, tokenizer=tok, context_length={"title": 8}, batch_size=8,
                               image_transform=lambda im: torch.zeros(1), fields=["title"], num_workers=0, seed=11,
                               resampled=True)
    new.load_state_dict(st, strict=True)
    assert new._positions[0]["elastic"]["gen"] == 1
    again = S.build_train_stream(urls, tokenizer=tok, context_length={"title": 8}, batch_size=8,
                                 image_transform=lambda im: torch.zeros(1), fields=["title"], num_workers=0,
                                 seed=11, resampled=True)
    again.load_state_dict(st, strict=True)
    first = next(iter(new))["key"]
    assert first == next(iter(again))["key"]  # deterministic
    fresh = S.build_train_stream(urls, tokenizer=tok, context_length={"title": 8}, batch_size=8,
                                 image_transform=lambda im: torch.zeros(1), fields=["title"], num_workers=0, seed=11,
                                 resampled=True)
    assert first != next(iter(fresh))["key"]  # new draws, not a replay of slot 0's first chunk


def test_unknown_sizes_cannot_be_repartitioned(tmp_path, tok, caplog, monkeypatch):
    urls, _ = write_layout(tmp_path, SIZES)
    monkeypatch.setattr(S, "shard_sizes", lambda urls: None)  # as for remote shards without sizes.json
    a = Layout(urls, tok, 2, 1, 6)
    a.steps(2)
    st = a.states()
    new = Layout(urls, tok, 1, 1, 12).streams[0]
    with pytest.raises(ElasticError, match="sizes.json"):
        new.load_state_dict(st, strict=True)
    with caplog.at_level("WARNING", logger="gcl.data.stream"):
        new.load_state_dict(st)
    assert "restarting each source at the start of epoch [0]" in caplog.text


def test_damaged_state_set_is_refused(tmp_path, tok):
    urls, _ = write_layout(tmp_path, SIZES)
    a = Layout(urls, tok, 2, 1, 6)
    a.steps(2)
    st = a.states()
    new = Layout(urls, tok, 3, 1, 4).streams[0]
    with pytest.raises(ElasticError, match="one per rank"):
        new.load_state_dict([st[0], st[0]], strict=True)
    b = Layout(urls, tok, 3, 1, 4, states=st)
    b.steps(1)
    st = b.states()
    st[1]["workers"][0]["elastic"] = st[0]["workers"][0]["elastic"]  # two slots claim the same samples
    with pytest.raises(ElasticError, match="overlap"):
        Layout(urls, tok, 2, 1, 6).streams[0].load_state_dict(st, strict=True)


@pytest.mark.parametrize("total, world, workers, batch", [(24, 1, 2, 8), (24, 2, 2, 4), (30, 3, 2, 4),
                                                          (7, 2, 3, 5), (0, 2, 2, 3)])
def test_schedule_quotas_follow_the_steps(total, world, workers, batch):
    """The quotas equal what the steps take, counted by walking the steps (worker t % workers on every rank)."""
    want = [0] * (world * workers)
    left, t = total, 0
    while left > 0:
        take = min(left, batch * world)
        for r in range(world):  # a partial last step: its samples shared as evenly as the ranks can
            want[r * workers + t % workers] += (r + 1) * take // world - r * take // world
        left -= take
        t += 1
    assert schedule_quotas(total, world, workers, batch) == want
    assert sum(want) == total
