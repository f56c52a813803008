"""The s3:// checkpoint mirror (gcl.remote), against a real S3-compatible server on 127.0.0.1 (moto).

References: the local checkpoint files themselves (the mirror must hold byte-identical copies of what the run
dir holds, pruned the same way) and, for training, the losses the killed run logged before it died (the run
resumed from the mirror alone must log bitwise the same ones for the same steps).
"""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from loopback import s3_server

from gcl import storage
from gcl.checkpoint import CheckpointManager, load_checkpoint
from gcl.remote import RemoteSync, fetch_latest


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        fs, _ = storage.filesystem("s3://mirror")
        fs.mkdir("mirror")
        yield endpoint


def _remote_bytes(url: str) -> bytes:
    fs, path = storage.filesystem(url)
    return fs.cat_file(path)


def test_mirror_holds_what_the_run_dir_holds_and_comes_back(tmp_path, s3):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("a: 1\n")
    ckpt = CheckpointManager(run, keep_last=2)
    sync = RemoteSync("s3://mirror/runs/a", run)
    for step in (2, 4, 6):
        sync.push_checkpoint(ckpt.save({"w": torch.full((3,), float(step)), "step": step}, step))
    sync.push_checkpoint(ckpt.save_best({"w": torch.zeros(2)}, 4, "m", 0.5))
    export = run / "export"
    export.mkdir()
    (export / "open_clip_config.json").write_text("{}")
    sync.push_dir(export, "export")
    sync.close()

    remote = storage.listdir("s3://mirror/runs/a/checkpoints")
    local = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert remote == local == ["best.json", "best.pt", "latest.json", "step_000000004.pt", "step_000000006.pt"]
    for name in local:
        assert _remote_bytes(f"s3://mirror/runs/a/checkpoints/{name}") == (run / "checkpoints" / name).read_bytes()
    assert storage.read_text("s3://mirror/runs/a/.hydra/config.yaml") == "a: 1\n"
    assert storage.read_text("s3://mirror/runs/a/export/open_clip_config.json") == "{}"

    shutil.rmtree(run)  # the node is gone: only the mirror is left
    got = fetch_latest("s3://mirror/runs/a", tmp_path / "new")
    assert got == tmp_path / "new" / "checkpoints" / "step_000000006.pt"
    assert load_checkpoint(got)["step"] == 6
    assert json.loads((got.parent / "latest.json").read_text())["file"] == got.name
    assert fetch_latest("s3://mirror/runs/empty", tmp_path / "other") is None


def test_missing_bucket_fails_at_once_and_non_urls_are_refused(tmp_path, s3):
    t0 = time.perf_counter()
    with pytest.raises(storage.StorageError) as e:
        RemoteSync("s3://no-such-bucket/runs/a", tmp_path)
    assert "s3://no-such-bucket/runs/a" in str(e.value) and "does not exist" in str(e.value)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(storage.StorageError, match="not an object-storage URL"):
        RemoteSync(str(tmp_path / "local"), tmp_path)
