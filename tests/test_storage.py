"""Shards in object storage, against a real S3-compatible server on 127.0.0.1 (moto's server mode).

References: the same shards read from local disk (the loader must give bitwise the same batches from s3://),
an uninterrupted stream for exact resume, and errors that must name the URL and the fix and come at once.
"""
from __future__ import annotations

import io
import random
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from loopback import drop_auth, require_auth, s3_server
from PIL import Image

from gcl import storage
from gcl.data.shards import ShardWriter, expand_urls
from gcl.data.stream import build_train_stream

CTX = {"title": 16, "colors": 8}


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        yield endpoint


def _shards(out: Path, n: int, per_shard: int) -> str:
    rng = random.Random(0)
    with ShardWriter(out, per_shard=per_shard) as w:
        for i in range(n):
            arr = np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG")
            w.write(f"s{i:04d}", buf.getvalue(), "jpg",
                    {"title": f"item {i} {rng.choice(['red', 'blue'])} dress", "colors": [rng.choice(["red", "blue"])]})
    return w.shard_pattern()


def _upload(local_dir: Path, url: str) -> None:
    fs, path = storage.filesystem(url)
    if not fs.exists(path.split("/")[0]):
        fs.mkdir(path.split("/")[0])
    fs.put(str(local_dir) + "/", path + "/", recursive=True)


def _stream(urls, **kw):
    args = dict(tokenizer=open_clip.get_tokenizer("ViT-B-32"), context_length=CTX,
                image_transform=open_clip.image_transform(16, is_train=True), batch_size=4, fields=list(CTX),
                num_workers=2, seed=5, shuffle_buffer=6)
    args.update(kw)
    return build_train_stream(urls, **args)


def _take(stream, n):
    out = []
    for b in stream:
        out.append(b)
        if len(out) == n:
            break
    return out


def _same(a, b):
    assert [x["key"] for x in a] == [y["key"] for y in b]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"])
        assert all(torch.equal(x["tokens"][f], y["tokens"][f]) for f in CTX)


def test_s3_shards_stream_like_local_and_resume_exactly(tmp_path, s3):
    pattern = _shards(tmp_path / "local", 30, per_shard=5)  # 6 shards, 2 workers
    _upload(tmp_path / "local", "s3://shards/train")
    remote = "s3://shards/train/" + Path(pattern).name
    ref = _take(_stream(pattern), 10)  # 40 samples: crosses the 30-sample epoch
    _same(_take(_stream(remote), 10), ref)

    first = _stream(remote)
    head = _take(first, 4)
    state = first.state_dict()
    again = _stream(remote)
    again.load_state_dict(state)
    _same(head + _take(again, 6), ref)

    # a prefix and a glob list the same shards (sizes.json is not a shard)
    assert expand_urls("s3://shards/train/") == expand_urls("s3://shards/train/shard-*.tar") == [
        f"s3://shards/train/shard-{i:06d}.tar" for i in range(6)]


def test_the_loader_refuses_a_bad_s3_pattern_before_reading(tmp_path, s3):
    _shards(tmp_path / "d", 8, per_shard=4)
    _upload(tmp_path / "d", "s3://shards/two")
    t0 = time.perf_counter()
    with pytest.raises(storage.StorageError, match=r"s3://missing-bucket/.*does not exist.*aws s3 mb"):
        _stream("s3://missing-bucket/shard-{000000..000001}.tar")
    with pytest.raises(storage.StorageError, match=r"1 of the 3 shards under s3://shards/two/ do not exist "
                                                   r"\(first: s3://shards/two/shard-000002\.tar\)"):
        _stream("s3://shards/two/shard-{000000..000002}.tar")
    assert time.perf_counter() - t0 < 10


def test_missing_bucket_object_and_bad_credentials_fail_at_once_naming_url_and_fix(tmp_path, s3, monkeypatch):
    _shards(tmp_path / "d", 4, per_shard=4)
    _upload(tmp_path / "d", "s3://auth-bucket/d")
    t0 = time.perf_counter()
    with pytest.raises(storage.StorageError) as e:
        storage.check_readable("s3://no-such-bucket/shard-000000.tar")
    msg = str(e.value)
    assert "s3://no-such-bucket/shard-000000.tar" in msg and "does not exist" in msg and "aws s3 mb" in msg
    assert s3 in msg  # which server was asked
    with pytest.raises(storage.StorageError, match="upload the shards first"):
        storage.check_readable("s3://auth-bucket/d/shard-000099.tar")

    key, secret = require_auth(s3)
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        storage.check_readable("s3://auth-bucket/d/shard-000000.tar")  # the real key works
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        with pytest.raises(storage.StorageError) as e:
            storage.check_readable("s3://auth-bucket/d/shard-000000.tar")
        msg = str(e.value)
        assert "s3://auth-bucket/d/shard-000000.tar" in msg and "access denied" in msg
        assert "AWS_ACCESS_KEY_ID" in msg and "does not exist in our records" in msg  # the server's own reason
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        with pytest.raises(storage.StorageError, match="signature"):
            storage.check_writable("s3://auth-bucket/mirror")
    finally:
        drop_auth(s3)
    assert time.perf_counter() - t0 < 20  # no retry ladders: each failure is reported on the first answer


def test_unreachable_endpoint_and_missing_backend(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    t0 = time.perf_counter()
    with pytest.raises(storage.StorageError, match=r"cannot reach the storage server at http://127\.0\.0\.1:9"):
        storage.check_readable("s3://b/shard-000000.tar")
    assert time.perf_counter() - t0 < 15
    with pytest.raises(storage.StorageError, match="gcsfs"):
        storage.check_readable("gs://b/shard-000000.tar")
    assert storage.is_remote("s3://b/x") and not storage.is_remote("/tmp/x") and not storage.is_remote("pipe:cat x")
    assert not storage.is_remote("C:/data/x.tar") and not storage.is_remote("file:///tmp/x")
