"""gcl.data.stream: batches, per-field tokens, skips, rank x worker splits, determinism and exact resume.

Shards are written here with ShardWriter (random 32 px images, DESIGN.md's json schema) or, for damaged
samples, with tarfile directly. References are independent: the open_clip tokenizer called on the raw
strings, the fields we wrote, and an uninterrupted run of the stream for resume.
"""
from __future__ import annotations

import io
import json
import logging
import math
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from gcl.data import stream as S
from gcl.data.schema import TEXT_FIELDS, stable_hash
from gcl.data.shards import ShardWriter

COLORS = ["black", "white", "navy blue", "red", "olive green", "beige"]
WORDS = ["cotton", "slim", "fit", "summer", "dress", "linen", "shirt", "wool", "relaxed", "vintage", "denim"]
CTX = {"title": 16, "description": 12, "colors": 8, "materials": 8, "categories": 8, "details": 12, "keywords": 8}


@pytest.fixture(scope="module")
def tok():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def train_tf():
    # open_clip's own train preprocess (RandomResizedCrop ...): augmentation must be reproducible.
    return open_clip.image_transform(16, is_train=True)


@pytest.fixture(scope="module")
def eval_tf():
    return open_clip.image_transform(16, is_train=False)


def _jpeg(rng: random.Random) -> bytes:
    arr = np.random.default_rng(rng.randrange(2**31)).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _fields(rng: random.Random, i: int) -> dict:
    """A product following the shard schema; some fields are empty/missing on purpose."""
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    d = {
        "title": f"{words(3)} {i}",
        "description": words(rng.randint(2, 20)),
        "colors": rng.sample(COLORS, rng.randint(0, 3)),  # [] sometimes -> missing
        "materials": [rng.choice(WORDS)],
        "categories": ["women", rng.choice(["dresses", "tops"])],
        "details": words(rng.randint(1, 6)),
        "keywords": [words(1), words(1), words(1)],
        "item_id": f"item{i // 2}",  # two images per item
        "score": rng.random(),
    }
    if i % 5 == 0:
        del d["description"]
    if i % 7 == 0:
        d["position"] = i % 3 + 1
    return d


def write_shards(out: Path, n: int, per_shard: int, prefix: str = "p", seed: int = 0) -> tuple[str, dict]:
    """n samples in ceil(n/per_shard) shards; returns (brace pattern, {key: fields})."""
    rng = random.Random(seed)
    written = {}
    with ShardWriter(out, per_shard=per_shard) as w:
        for i in range(n):
            key = f"{prefix}{i:05d}"
            written[key] = _fields(rng, i)
            w.write(key, _jpeg(rng), "jpg", written[key])
    return w.shard_pattern(), written


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _stream(urls, tok, tf, **kw):
    args = dict(tokenizer=tok, context_length=CTX, image_transform=tf, batch_size=4, fields=list(TEXT_FIELDS),
                num_workers=0, seed=3, shuffle_buffer=5)
    args.update(kw)
    return S.build_train_stream(urls, **args)


def _take(stream, n):
    out = []
    if n == 0:
        return out
    for b in stream:
        out.append(b)
        if len(out) == n:
            break
    return out


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"])  # bitwise: same decode and same augmentation
        for f in x["tokens"]:
            assert torch.equal(x["tokens"][f], y["tokens"][f]), f
        assert x["text"] == y["text"]


# ------------------------------------------------------------------------------------------ URLs

def test_expand_urls(tmp_path):
    pattern, _ = write_shards(tmp_path / "d", 9, per_shard=3)
    urls = S.expand_urls(pattern)
    assert [Path(u).name for u in urls] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert S.expand_urls(str(tmp_path / "d")) == urls  # a directory means its *.tar
    assert S.expand_urls([urls[0] + "::" + urls[2]]) == [urls[0], urls[2]]
    assert S.expand_urls("pipe:cat x.tar") == ["pipe:cat x.tar"]  # remote / pipe URLs pass through
    with pytest.raises(FileNotFoundError, match="matches nothing"):
        S.expand_urls(str(tmp_path / "d" / "shard-{000000..000005}.tar"))
    with pytest.raises(FileNotFoundError, match="matches nothing"):
        S.expand_urls(str(tmp_path / "nothing-*.tar"))


def test_folder_of_split_folders_says_what_it_found(tmp_path):
    """A folder holding train/ and val/ (what prepare and the catalog write) is not "missing": the message says
    what is there and which paths to give."""
    for split, n in (("train", 6), ("val", 3)):
        write_shards(tmp_path / "data" / split, n, per_shard=3)
    with pytest.raises(FileNotFoundError) as e:
        S.expand_urls(str(tmp_path / "data"))
    msg = str(e.value)
    assert "does not exist" not in msg and "train/ (2 .tar), val/ (1 .tar)" in msg
    assert f"data.train_shards={tmp_path / 'data' / 'train'}" in msg and f"data.val_shards={tmp_path / 'data' / 'val'}" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards in it"):
        S.expand_urls(str(tmp_path / "empty"))


def test_pipe_urls_are_read(tmp_path, tok, eval_tf):
    pattern, written = write_shards(tmp_path, 6, per_shard=6)
    loader = S.build_eval_loader(f"pipe:cat {pattern}", tokenizer=tok, context_length=CTX, image_transform=eval_tf,
                                 batch_size=4, fields=["title"], num_workers=0)
    assert [k for b in loader for k in b["key"]] == sorted(written)
    # Training stops mid-shard: closing the pipe early (SIGPIPE) must not raise.
    st = _stream(f"pipe:cat {pattern}", tok, eval_tf, fields=["title"], batch_size=2, shuffle_buffer=1)
    assert _take(st, 1)[0]["key"] == sorted(written)[:2]  # one shard, no sample shuffle: file order
    assert _take(st, 1)[0]["key"] == sorted(written)[2:4]


# ----------------------------------------------------------------------------------- batch content

def test_batch_fields_and_per_field_lengths(tmp_path, tok, eval_tf):
    pattern, written = write_shards(tmp_path, 10, per_shard=10)
    ctx = {"title": 77, "description": 6, "colors": 8}
    loader = S.build_eval_loader(pattern, tokenizer=tok, context_length=ctx, image_transform=eval_tf,
                                 batch_size=10, fields=list(ctx), num_workers=0)
    (b,) = list(loader)
    keys = sorted(written)
    assert b["key"] == keys
    assert b["image"].shape == (10, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["present"]["image"].all()
    for f, n in ctx.items():
        final = []
        for k in keys:
            v = written[k].get(f)
            v = ", ".join(v) if isinstance(v, list) else v
            final.append(v or None)
        assert b["text"][f] == final
        assert b["present"][f].tolist() == [t is not None for t in final]
        # Reference: the tokenizer at the field's own max length; the batch keeps up to the longest row.
        ref = tok([t or "" for t in final], context_length=n)
        ref[~b["present"][f]] = 0
        # duplicate ids: 0 where missing, else equal exactly when the token rows are (tests/data/test_batch.py)
        ids = b["text_id"][f]
        assert torch.equal(ids != 0, b["present"][f])
        assert all(bool(ids[i] == ids[j]) == torch.equal(ref[i], ref[j]) for i in range(10) for j in range(10)
                   if final[i] and final[j])
        longest = max(int((r != 0).sum()) for r in ref)
        assert b["tokens"][f].shape == (10, longest) and longest <= n
        assert torch.equal(b["tokens"][f], ref[:, :longest])
    assert b["tokens"]["description"].shape[1] == 6  # long descriptions are truncated at 6
    assert b["tokens"]["colors"].shape[1] <= 8 and b["tokens"]["title"].shape[1] < 77  # trimmed, not padded
    assert not b["present"]["description"][0]  # sample 0 has no description: an all-pad row
    assert b["item_id"].tolist() == [stable_hash(written[k]["item_id"]) for k in keys]
    assert torch.allclose(b["score"], torch.tensor([written[k]["score"] for k in keys]))
    pos = [written[k].get("position", math.nan) for k in keys]
    assert torch.equal(torch.isnan(b["position"]), torch.tensor([math.isnan(p) for p in pos]))
    assert b["position"][0] == 1.0


def test_hf_style_pad_id_is_trimmed():
    class Inner:
        pad_token_id = 1

    class FakeHF:  # pads with 1 like open_clip's HFTokenizer for T5-style vocabularies
        tokenizer = Inner()

        def __call__(self, texts, context_length):
            out = torch.ones(len(texts), context_length, dtype=torch.long)
            for i, t in enumerate(texts):
                ids = [7 + len(w) for w in t.split()][:context_length]
                out[i, : len(ids)] = torch.tensor(ids)
            return out

    assert S.pad_id_of(FakeHF()) == 1
    col = S._Collator(FakeHF(), {"title": 10}, ["title"], trim=True)
    t = col.tokens(["a bb", None, "ccc dd e"], 10)
    assert t.tolist() == [[8, 9, 1], [1, 1, 1], [10, 9, 8]]
    assert S.pad_id_of(open_clip.get_tokenizer("ViT-B-32")) == 0


def test_list_rules(tmp_path, tok, eval_tf, train_tf):
    pattern, written = write_shards(tmp_path, 24, per_shard=24)
    kw = dict(tokenizer=tok, context_length=CTX, image_transform=eval_tf, batch_size=24, fields=["keywords"],
              num_workers=0)
    (b,) = list(S.build_eval_loader(pattern, list_sep=" | ", **kw))
    assert b["text"]["keywords"] == [" | ".join(written[k]["keywords"]) for k in b["key"]]
    (s1,) = list(S.build_eval_loader(pattern, list_rule="sample", **kw))
    (s2,) = list(S.build_eval_loader(pattern, list_rule="sample", **kw))
    assert s1["text"] == s2["text"]  # eval sampling is fixed per key
    chosen = [written[k]["keywords"].index(t) for k, t in zip(s1["key"], s1["text"]["keywords"])]
    assert len(set(chosen)) > 1  # really sampled, not always the first item
    # Training: seeded per (seed, position), so two streams agree and a different seed differs.
    a = _take(_stream(pattern, tok, train_tf, list_rule="sample", fields=["keywords"], batch_size=12), 2)
    c = _take(_stream(pattern, tok, train_tf, list_rule="sample", fields=["keywords"], batch_size=12), 2)
    d = _take(_stream(pattern, tok, train_tf, list_rule="sample", fields=["keywords"], batch_size=12, seed=4), 2)
    assert [x["text"] for x in a] == [x["text"] for x in c]
    assert {(k, t) for x in a for k, t in zip(x["key"], x["text"]["keywords"])} != \
        {(k, t) for x in d for k, t in zip(x["key"], x["text"]["keywords"])}
    for x in a:
        for k, t in zip(x["key"], x["text"]["keywords"]):
            assert t in written[k]["keywords"]
    with pytest.raises(ValueError, match="list_rule"):
        S.build_eval_loader(pattern, list_rule="first", **kw)
    with pytest.raises(ValueError, match="context length"):
        S.build_eval_loader(pattern, **{**kw, "fields": ["keywords", "query"]})


# --------------------------------------------------------------------------------------- bad samples

def _damaged_shard(path: Path) -> tuple[set[str], Counter]:
    rng = random.Random(1)
    good = {f"g{i}": _fields(rng, i) for i in range(5)}
    ok_json = json.dumps({"title": "a shirt"}).encode()
    members = [
        ("bad1.jpg", b"this is not a jpeg"), ("bad1.json", ok_json),                       # corrupt_image
        ("bad2.json", ok_json),                                                          # missing_image
        ("bad3.jpg", _jpeg(rng)), ("bad3.json", b"{not json"),                            # bad_json
        ("bad4.jpg", _jpeg(rng)), ("bad4.json", json.dumps({"title": 123}).encode()),     # bad_field
        ("bad5.jpg", _jpeg(rng)), ("bad5.json", json.dumps({"colors": ["red", 1]}).encode()),  # bad_field
        ("bad6.jpg", _jpeg(rng)),                                                        # missing_json
        ("bad7.png", _jpeg(rng)[:40]), ("bad7.json", ok_json),                            # corrupt_image (truncated)
    ]
    for k, f in good.items():  # after the bad ones, so in file order a batch of the good ones counts them all
        members += [(f"{k}.jpg", _jpeg(rng)), (f"{k}.json", json.dumps(f).encode())]
    _tar(path, members)
    expected = Counter(corrupt_image=2, missing_image=1, bad_json=1, bad_field=2, missing_json=1)
    return set(good), expected


def test_bad_samples_are_skipped_and_counted(tmp_path, tok, train_tf, caplog):
    good, expected = _damaged_shard(tmp_path / "bad.tar")
    # File order (no sample shuffle) and a batch = all good samples: each batch reads each bad sample once.
    st = _stream(str(tmp_path / "bad.tar"), tok, train_tf, batch_size=len(good), shuffle_buffer=1)
    with caplog.at_level(logging.WARNING, logger="gcl.data.stream"):
        (b1, b2) = _take(st, 2)
    assert set(b1["key"]) == good
    assert b1["skipped"] == dict(expected)
    assert st.skipped == {r: 2 * expected[r] for r in S.SKIP_REASONS}  # two epochs read
    assert list(st.skipped) == list(S.SKIP_REASONS)  # fixed keys: ranks can all-reduce the values
    assert b2["skipped"] == dict(expected)
    assert "bad3" in caplog.text and "bad_json" in caplog.text  # logged with the sample key


@pytest.mark.dist
def test_skip_counts_reach_the_main_process_from_workers(tmp_path, tok, train_tf):
    # two damaged shards, one per worker (an exact epoch gives each worker a contiguous half of the samples)
    good, expected = _damaged_shard(tmp_path / "bad-0.tar")
    _damaged_shard(tmp_path / "bad-1.tar")
    st = _stream(str(tmp_path / "bad-{0..1}.tar"), tok, train_tf, batch_size=2, shuffle_buffer=4, num_workers=2)
    batches = _take(st, 6)
    summed = Counter()
    for b in batches:
        assert set(b["key"]) <= good
        summed.update(b["skipped"])
    nonzero = {r: n for r, n in st.skipped.items() if n}
    assert dict(summed) == nonzero and set(nonzero) <= set(expected) and sum(summed.values()) > 0
    assert json.loads(json.dumps(st.state_dict()))["workers"][0]["skipped"]  # totals survive a checkpoint


def test_bad_shards_do_not_stop_eval(tmp_path, tok, eval_tf):
    good, expected = _damaged_shard(tmp_path / "a-0.tar")
    pattern, written = write_shards(tmp_path / "ok", 6, per_shard=6)
    raw = Path(pattern).read_bytes()
    (tmp_path / "a-1.tar").write_bytes(raw[: len(raw) // 2])  # truncated mid-member
    (tmp_path / "a-2.tar").write_bytes(b"garbage" * 100)       # not a tar at all
    loader = S.build_eval_loader(str(tmp_path / "a-{0..2}.tar"), tokenizer=tok, context_length=CTX,
                                 image_transform=eval_tf, batch_size=4, fields=["title", "colors"], num_workers=0)
    keys = [k for b in loader for k in b["key"]]
    assert set(keys) >= good and len(keys) == len(set(keys))
    assert set(keys) - good <= set(written)  # the readable front part of the truncated shard
    for r, n in expected.items():
        assert loader.skipped[r] >= n
    assert loader.skipped["shard_error"] >= 2


# ------------------------------------------------------------------------------------ splits, order

def test_rank_worker_slots_are_disjoint_and_complete(tmp_path):
    urls = S.expand_urls(write_shards(tmp_path, 21, per_shard=3)[0])  # 7 shards
    all_keys = {f"p{i:05d}" for i in range(21)}
    for n_slots in (1, 2, 4, 7, 12):  # 12 > 7 shards: sample-level split
        for epoch in (0, 1):
            seen: list[str] = []
            for slot in range(n_slots):
                cur = S._SourceCursor(urls, source=0, seed=5, resampled=False, slot=slot, n_slots=n_slots,
                                      state={"epoch": epoch, "shard": 0, "offset": 0},
                                      on_error=lambda *a: pytest.fail(str(a)))
                while True:
                    raw = next(cur)
                    if cur.epoch != epoch:
                        break
                    seen.append(raw["__key__"])
            assert len(seen) == 21 and set(seen) == all_keys, (n_slots, epoch)


@pytest.mark.dist
def test_ranks_and_workers_see_disjoint_data(tmp_path, tok, eval_tf):
    pattern, written = write_shards(tmp_path, 40, per_shard=5)  # 8 shards -> 2 per (rank, worker)
    per_rank = []
    for rank in (0, 1):
        st = _stream(pattern, tok, eval_tf, fields=["title"], batch_size=5, shuffle_buffer=5, num_workers=2,
                     rank=rank, world_size=2)
        per_rank.append([k for b in _take(st, 4) for k in b["key"]])  # 2 batches per worker = its epoch 0
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(written)


@pytest.mark.dist
@pytest.mark.parametrize("sizes_known", [True, False])
def test_fewer_shards_than_workers_still_disjoint(tmp_path, tok, eval_tf, caplog, sizes_known):
    pattern, written = write_shards(tmp_path, 8, per_shard=8)
    if not sizes_known:  # a pipe: URL has no sizes.json: shard-split epochs, each worker filters the samples
        pattern = f"pipe:cat {pattern}"
    with caplog.at_level(logging.WARNING, logger="gcl.data.stream"):
        st = _stream(pattern, tok, eval_tf, fields=["title"], batch_size=4, shuffle_buffer=4, num_workers=2)
    # exact epochs split samples, so each worker reads only its half; without sizes, a warning says the cost
    warned = "1 shard for 2 data readers (1 process x 2 DataLoader workers)" in caplog.text
    assert warned == ("shard sizes unknown" in caplog.text) == (not sizes_known)
    b0, b1 = _take(st, 2)
    assert sorted(b0["key"] + b1["key"]) == sorted(written)


@pytest.mark.parametrize("world_size, num_workers, text", [
    (1, 2, "source 0 has 1 shard for 2 data readers (1 process x 2 DataLoader workers)"),
    (2, 0, "source 0 has 1 shard for 2 processes reading in-process (data.num_workers=0)"),
    (2, 3, "source 0 has 1 shard for 6 data readers (2 processes x 3 DataLoader workers)"),
])
def test_few_shards_warning_counts_exactly(tmp_path, tok, eval_tf, caplog, world_size, num_workers, text):
    pattern, _ = write_shards(tmp_path, 4, per_shard=4)
    pattern = f"pipe:cat {pattern}"  # no sizes.json: shard-split epochs, where the shard count matters
    with caplog.at_level(logging.WARNING, logger="gcl.data.stream"):
        _stream(pattern, tok, eval_tf, fields=["title"], num_workers=num_workers, world_size=world_size)
    assert text in caplog.text and "keeps 1 sample in" in caplog.text and "ranks x workers" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gcl.data.stream"):
        _stream(pattern, tok, eval_tf, fields=["title"], num_workers=0, world_size=1)
    assert "keeps 1 sample in" not in caplog.text  # one shard for one reader: nothing to say


@pytest.mark.parametrize("empty", ["empty_tar", "zero_bytes"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_empty_shard_beside_a_good_one_is_left_out(tmp_path, tok, eval_tf, caplog, empty, world_size):
    """One good shard and one empty one, read by 2 (or 3) ranks: each rank used to get the empty shard in some
    epoch and stop with "read no samples". Now it is left out with a warning, and the ranks split the good
    shard's samples disjointly and completely."""
    pattern, written = write_shards(tmp_path / "d", 6, per_shard=6)
    bad = tmp_path / "d" / "shard-000001.tar"
    if empty == "empty_tar":
        _tar(bad, [])
    else:
        bad.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="gcl.data.stream"):
        streams = [_stream(str(tmp_path / "d"), tok, eval_tf, fields=["title"], batch_size=1, shuffle_buffer=1,
                           rank=r, world_size=world_size) for r in range(world_size)]
    assert f"leaving out 1 empty shard(s) of 2: {bad}" in caplog.text
    keys = [k for st in streams for b in _take(st, 6 // world_size) for k in b["key"]]
    assert sorted(keys) == sorted(written)  # one epoch: disjoint and complete
    bad.with_name("shard-000000.tar").write_bytes(b"")  # now no sample at all: that alone is fatal
    with pytest.raises(ValueError, match="no samples at all"):
        _stream(str(tmp_path / "d"), tok, eval_tf, fields=["title"])


@pytest.mark.parametrize("where", [2 / 3, 1 / 2])  # inside a header; exactly at a member boundary
def test_truncated_shard_is_counted_as_one_naming_it(tmp_path, tok, eval_tf, caplog, where):
    """A tar cut short: counted once as truncated_shard (the shard named in the warning), the samples wholly
    before the cut are read, the one the cut went through is not counted as a sample without its json. At a
    member boundary tarfile sees a clean end; the missing end-of-archive blocks tell."""
    pattern, written = write_shards(tmp_path / "ok", 10, per_shard=10)
    raw = Path(pattern).read_bytes()
    cut = int(len(raw) * where) // 512 * 512 + (100 if where > 0.5 else 0)
    cut_shard = tmp_path / "cut.tar"
    cut_shard.write_bytes(raw[:cut])
    # the reference: samples whose every member ends before the cut, from the intact tar's member offsets
    ends: dict[str, list[int]] = {}
    with tarfile.open(pattern) as tf:
        for m in tf.getmembers():
            ends.setdefault(m.name.split(".")[0], []).append(m.offset_data + m.size)
    whole = [k for k, e in ends.items() if max(e) <= cut]
    assert 0 < len(whole) < 10
    st = _stream(str(cut_shard), tok, eval_tf, fields=["title"], batch_size=len(whole), shuffle_buffer=1)
    with caplog.at_level(logging.WARNING, logger="gcl.data.stream"):
        b1, b2 = _take(st, 2)  # one epoch each; the cut is met at the end of epoch 0, so batch 2 counts it
    assert b1["key"] == b2["key"] == whole
    assert b1["skipped"] == {} and b2["skipped"] == {"truncated_shard": 1}
    assert str(cut_shard) in caplog.text and "truncated_shard" in caplog.text


@pytest.mark.dist
def test_resume_from_in_process_loading_with_one_worker_is_exact(tmp_path, tok, train_tf):
    """data.num_workers 0 -> 1 on resume keeps the stream exact (one logical worker either way), as the resume
    rules (gcl.resume) promise."""
    pattern, _ = write_shards(tmp_path, 14, per_shard=7)
    full = _take(_stream(pattern, tok, train_tf, num_workers=0), 6)
    first = _stream(pattern, tok, train_tf, num_workers=0)
    head = _take(first, 2)
    resumed = _stream(pattern, tok, train_tf, num_workers=1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())), strict=True)
    _assert_same_batches(head + _take(resumed, 4), full)


def test_determinism_and_epoch_reshuffle(tmp_path, tok, train_tf):
    pattern, written = write_shards(tmp_path, 12, per_shard=6)
    kw = dict(batch_size=4, shuffle_buffer=6)
    a = _take(_stream(pattern, tok, train_tf, **kw), 6)
    b = _take(_stream(pattern, tok, train_tf, **kw), 6)
    _assert_same_batches(a, b)
    e0 = [k for x in a[:3] for k in x["key"]]
    e1 = [k for x in a[3:] for k in x["key"]]
    assert sorted(e0) == sorted(e1) == sorted(written)  # each epoch is a full pass...
    assert e0 != e1  # ...reshuffled
    assert e0 != sorted(written)  # sample shuffle happened
    c = _take(_stream(pattern, tok, train_tf, seed=4, **kw), 3)
    assert [k for x in c for k in x["key"]] != e0
    # Same key in two epochs gets a different augmentation (seeded by position, not by key).
    k = e0[0]
    img0 = a[0]["image"][0]
    img1 = next(x["image"][x["key"].index(k)] for x in a[3:] if k in x["key"])
    assert not torch.equal(img0, img1)


def test_loading_in_process_leaves_global_rng_alone(tmp_path, tok, train_tf):
    pattern, _ = write_shards(tmp_path, 8, per_shard=8)
    st = _stream(pattern, tok, train_tf)
    torch.manual_seed(123)
    random.seed(123)
    expect_t, expect_r = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    _take(st, 2)
    assert torch.equal(torch.rand(3), expect_t) and random.random() == expect_r


# ------------------------------------------------------------------------------------------ resume

class CountingTransform:
    def __init__(self, tf):
        self.tf, self.calls = tf, 0

    def __call__(self, img):
        self.calls += 1
        return self.tf(img)


@pytest.mark.parametrize("num_workers,ks", [(0, (0, 1, 3, 5, 8)), pytest.param(2, (1, 4, 7), marks=pytest.mark.dist)])
def test_resume_yields_the_uninterrupted_stream(tmp_path, tok, train_tf, num_workers, ks):
    # 3 shards x 7 samples; blocks of 5 cross shard and epoch boundaries; 12 batches of 4 = 48 samples,
    # so every worker wraps into a later epoch.
    pattern, _ = write_shards(tmp_path, 21, per_shard=7)
    kw = dict(num_workers=num_workers, batch_size=4, shuffle_buffer=5)
    full = _take(_stream(pattern, tok, train_tf, **kw), 12)
    assert len({k for b in full for k in b["key"]}) == 21
    for k in ks:
        first = _stream(pattern, tok, train_tf, **kw)
        head = _take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        assert state["batches"] == k
        counting = CountingTransform(train_tf)
        resumed = _stream(pattern, tok, counting, **kw)
        resumed.load_state_dict(state)
        tail = _take(resumed, 12 - k)
        _assert_same_batches(head + tail, full)
        assert resumed.batches == 12
        if num_workers == 0:
            assert counting.calls == (12 - k) * 4  # skipped samples were never decoded
    assert any(p["start"]["sources"][0]["epoch"] >= 1 for p in resumed.state_dict()["workers"])


def test_resume_twice_and_reiterate(tmp_path, tok, train_tf):
    pattern, _ = write_shards(tmp_path, 14, per_shard=7)
    full = _take(_stream(pattern, tok, train_tf), 9)
    st = _stream(pattern, tok, train_tf)
    got = _take(st, 2) + _take(st, 3)  # a second iteration continues where the first stopped
    st2 = _stream(pattern, tok, train_tf)
    st2.load_state_dict([{**st.state_dict()}])  # a list of per-rank states is accepted too
    got += _take(st2, 4)
    _assert_same_batches(got, full)


def test_resume_with_other_topology_restarts_epoch(tmp_path, tok, train_tf, caplog):
    pattern, _ = write_shards(tmp_path, 14, per_shard=7)
    st = _stream(pattern, tok, train_tf)
    _take(st, 5)  # 20 samples: into epoch 1
    other = _stream(pattern, tok, train_tf, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(st.state_dict(), strict=True)
    with caplog.at_level(logging.WARNING, logger="gcl.data.stream"):
        other.load_state_dict(st.state_dict())
    assert "exact resume is impossible" in caplog.text
    assert other.epoch == 1


# ------------------------------------------------------------------------------------- multi-source

def test_weighted_sources(tmp_path, tok, eval_tf):
    a, _ = write_shards(tmp_path / "a", 20, per_shard=10, prefix="a")
    b, _ = write_shards(tmp_path / "b", 20, per_shard=10, prefix="b", seed=1)
    kw = dict(fields=["title"], batch_size=20, shuffle_buffer=20)
    for resampled in (True, False):
        st = _stream([a, b], tok, eval_tf, source_weights=[3.0, 1.0], resampled=resampled, **kw)
        keys = [k for x in _take(st, 20) for k in x["key"]]
        frac_a = sum(k.startswith("a") for k in keys) / len(keys)
        assert abs(frac_a - 0.75) < 0.07, (resampled, frac_a)  # 400 draws: sd ~ 0.022
    # Without weights the patterns are one pool: one epoch = every sample of both once.
    st = _stream([a, b], tok, eval_tf, **kw)
    assert sorted(k for x in _take(st, 2) for k in x["key"]) == sorted(
        [f"a{i:05d}" for i in range(20)] + [f"b{i:05d}" for i in range(20)])
    with pytest.raises(ValueError, match="one weight per pattern"):
        _stream([a, b], tok, eval_tf, source_weights=[1.0], **kw)


def test_weighted_sources_resume(tmp_path, tok, train_tf):
    a, _ = write_shards(tmp_path / "a", 12, per_shard=4, prefix="a")
    b, _ = write_shards(tmp_path / "b", 6, per_shard=3, prefix="b", seed=1)
    kw = dict(source_weights=[1.0, 1.0], resampled=True, fields=["title"])
    full = _take(_stream([a, b], tok, train_tf, **kw), 8)
    st = _stream([a, b], tok, train_tf, **kw)
    head = _take(st, 3)
    st2 = _stream([a, b], tok, train_tf, **kw)
    st2.load_state_dict(st.state_dict())
    _assert_same_batches(head + _take(st2, 5), full)


# ------------------------------------------------------------------------------------- eval + concat

@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.dist)])
def test_eval_loader_single_ordered_pass(tmp_path, tok, eval_tf, num_workers):
    pattern, written = write_shards(tmp_path, 13, per_shard=5)  # shards of 5, 5, 3
    kw = dict(tokenizer=tok, context_length=CTX, image_transform=eval_tf, batch_size=4, fields=["title"],
              num_workers=num_workers)
    batches = list(S.build_eval_loader(pattern, **kw))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(written) and len(keys) == 13
    if num_workers == 0:
        assert keys == sorted(written)  # file order
        assert [len(b["key"]) for b in batches] == [4, 4, 4, 1]
    assert keys == [k for b in S.build_eval_loader(pattern, **kw) for k in b["key"]]  # same order again
    r0 = [k for b in S.build_eval_loader(pattern, rank=0, world_size=2, **kw) for k in b["key"]]
    r1 = [k for b in S.build_eval_loader(pattern, rank=1, world_size=2, **kw) for k in b["key"]]
    assert sorted(r0 + r1) == sorted(written) and not set(r0) & set(r1)


def test_concat_batches(tmp_path, tok, eval_tf):
    pattern, _ = write_shards(tmp_path, 8, per_shard=8)
    b = list(S.build_eval_loader(pattern, tokenizer=tok, context_length=CTX, image_transform=eval_tf,
                                 batch_size=3, fields=["title", "colors"], num_workers=0))
    b[0]["skipped"], b[1]["skipped"] = {"bad_json": 1}, {"bad_json": 2, "corrupt_image": 1}
    c = S.concat_batches(b)
    assert c["key"] == b[0]["key"] + b[1]["key"] + b[2]["key"]
    assert c["image"].shape[0] == 8 and torch.equal(c["image"][3:6], b[1]["image"])
    for f in ("title", "colors"):
        n = max(x["tokens"][f].shape[1] for x in b)
        assert c["tokens"][f].shape == (8, n)
        assert torch.equal(c["tokens"][f][3:6, : b[1]["tokens"][f].shape[1]], b[1]["tokens"][f])
        assert (c["tokens"][f][3:6, b[1]["tokens"][f].shape[1]:] == 0).all()
        assert torch.equal(c["present"][f], torch.cat([x["present"][f] for x in b]))
    assert c["text"]["title"] == b[0]["text"]["title"] + b[1]["text"]["title"] + b[2]["text"]["title"]
    assert c["skipped"] == {"bad_json": 3, "corrupt_image": 1}
