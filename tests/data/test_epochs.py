"""Exact epochs (issue 12.5): over all ranks x workers, every sample exactly once per epoch.

Shards of chosen sizes are written here with tarfile and a hand-written ``sizes.json`` (not with ShardWriter).
Ranks and workers are simulated in one process: each (rank, worker) slot is the generator a DataLoader worker
runs, and step t takes worker ``t % W``'s next batch on every rank, as ``TrainStream`` and the trainer do.
The reference is the dataset itself: the multiset of keys seen must equal it, epoch after epoch.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from gcl.data import stream as S

R, W = 2, 2  # ranks x workers
_PNG = io.BytesIO()
Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(_PNG, format="PNG")


@pytest.fixture(scope="module")
def tok():
    return open_clip.get_tokenizer("ViT-B-32")


def write_layout(root: Path, sizes: list[int], sizes_json: bool = True) -> tuple[str, list[str]]:
    """Shards ``s-000.tar``... holding ``sizes[i]`` samples each; returns (brace pattern, every key)."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for i, n in enumerate(sizes):
        with tarfile.open(root / f"s-{i:03d}.tar", "w") as tf:
            for j in range(n):
                key = f"k{i:03d}_{j:03d}"
                keys.append(key)
                for ext, data in (("png", _PNG.getvalue()), ("json", json.dumps({"title": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    if sizes_json:
        (root / "sizes.json").write_text(json.dumps({f"s-{i:03d}.tar": n for i, n in enumerate(sizes)}))
    return str(root / f"s-{{000..{len(sizes) - 1:03d}}}.tar"), keys


def slot_streams(pattern: str, tok, batch: int, shuffle: int = 7, positions=None) -> dict:
    """The generator of every (rank, worker) slot, from fresh or given positions."""
    out = {}
    for r in range(R):
        spec = S.build_train_stream(pattern, tokenizer=tok, context_length={"title": 8}, batch_size=batch,
                                    image_transform=lambda im: torch.zeros(1), fields=["title"], num_workers=W,
                                    seed=11, rank=r, world_size=R, shuffle_buffer=shuffle)._spec
        for w in range(W):
            pos = positions[r, w] if positions else S._fresh_position(1)
            out[r, w] = S._worker_batches(spec, w, pos, in_worker=False)
    return out


def run_steps(slots: dict, steps: range, positions: dict | None = None) -> Counter:
    """Keys consumed by the global batches of ``steps`` (step t: worker t % W of every rank)."""
    seen: Counter = Counter()
    for t in steps:
        for r in range(R):
            b = next(slots[r, t % W])
            seen.update(b["key"])
            if positions is not None:
                positions[r, t % W] = b["_pos"]
    return seen


LAYOUTS = {
    # name: (shard sizes, batch, epochs checked); epochs x samples divides into R x B-sample steps
    "even": ([20] * 10, 10, 2),
    "uneven": ([5, 37, 12, 28, 8, 40, 19, 31, 3, 17], 10, 10),  # the bias figure
    "few_shards_remainder": ([150, 0, 1, 51], 5, 10),  # fewer shards than slots, an empty one, 50.5 per slot
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_sample_exactly_once_per_epoch(tmp_path, tok, name):
    sizes, batch, epochs = LAYOUTS[name]
    pattern, keys = write_layout(tmp_path, sizes)
    n = len(keys)
    steps = epochs * n // (R * batch)
    slots = slot_streams(pattern, tok, batch)
    first = n // (R * batch) // W * W  # whole rounds of every worker within the first epoch
    head = run_steps(slots, range(first))
    assert max(head.values()) == 1, "a sample came twice within the first epoch"
    seen = head + run_steps(slots, range(first, steps))
    # every sample exactly `epochs` times: no bias between shards of different sizes or slots
    assert seen == Counter({k: epochs for k in keys})


def test_resume_mid_epoch_keeps_every_sample_once(tmp_path, tok):
    sizes, batch, _ = LAYOUTS["uneven"]
    pattern, keys = write_layout(tmp_path, sizes)
    steps = 2 * len(keys) // (R * batch)  # two epochs
    positions = {(r, w): S._fresh_position(1) for r in range(R) for w in range(W)}
    head = run_steps(slot_streams(pattern, tok, batch), range(7), positions)  # stop mid-epoch, mid-round
    tail = run_steps(slot_streams(pattern, tok, batch, positions=positions), range(7, steps))
    assert head + tail == Counter({k: 2 for k in keys})
    assert head + tail == run_steps(slot_streams(pattern, tok, batch), range(steps))


@pytest.mark.parametrize("n_slots", [1, 3, 4, 7, 12])
def test_slot_shares_partition_each_epoch(tmp_path, n_slots):
    """Cursor level, where every raw sample carries its epoch: for each epoch, the slots' shares together are
    the dataset once, also when the samples do not divide by the slots (shares differ by one, and rotate)."""
    sizes = [5, 37, 12, 0, 28, 3]
    pattern, keys = write_layout(tmp_path, sizes)
    urls = S.expand_urls(pattern)
    per_epoch: dict[int, Counter] = {e: Counter() for e in range(3)}
    totals = []
    for slot in range(n_slots):
        cur = S._SourceCursor(urls, source=0, seed=5, resampled=False, slot=slot, n_slots=n_slots, sizes=sizes,
                              state={"epoch": 0, "shard": 0, "offset": 0}, on_error=lambda *a: pytest.fail(str(a)))
        n = 0
        while True:
            raw = next(cur)
            if cur.epoch >= 3:
                break
            per_epoch[cur.epoch][raw["__key__"]] += 1
            n += 1
        totals.append(n)
    for e, seen in per_epoch.items():
        assert seen == Counter(keys), e
    assert max(totals) - min(totals) <= 1  # slots that read at the same rate stay within one sample


def test_missing_or_stale_sizes_json(tmp_path, tok, caplog):
    sizes = [9, 4, 11]
    with_json, _ = write_layout(tmp_path / "a", sizes)
    without, _ = write_layout(tmp_path / "b", sizes, sizes_json=False)
    with caplog.at_level(logging.WARNING, logger="gcl.data.stream"):
        counted = S.build_train_stream(without, tokenizer=tok, context_length={"title": 8}, batch_size=4,
                                       image_transform=lambda im: torch.zeros(1), fields=["title"], num_workers=0,
                                       seed=0)
    assert counted._spec["sizes"] == [sizes]  # counted from the tar headers...
    assert "no sizes.json" in caplog.text and "counting their tar headers" in caplog.text  # ...and said so
    (tmp_path / "a" / "sizes.json").write_text("{not json")
    with pytest.raises(ValueError, match="sizes.json is not valid JSON"):
        slot_streams(with_json, tok, 4)
    (tmp_path / "a" / "sizes.json").write_text(json.dumps({"s-000.tar": 9, "s-001.tar": 2, "s-002.tar": 11}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gcl.data.stream"):
        run_steps(slot_streams(with_json, tok, 4), range(4))
    assert "holds more than the 2 samples its sizes.json lists" in caplog.text
