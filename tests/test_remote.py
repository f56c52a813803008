"""The s3:// checkpoint mirror (gcl.remote), against a real S3-compatible server on 127.0.0.1 (moto).

References: the local checkpoint files themselves (the mirror must hold byte-identical copies of what the run
dir holds, pruned the same way) and, for training, the losses the killed run logged before it died (the run
resumed from the mirror alone must log bitwise the same ones for the same steps).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FAST, ROOT, compose
from loopback import s3_server

from gcl import storage
from gcl.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
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
    assert remote == local == ["best.json", "best.pt", "best.pt.json", "latest.json", "step_000000004.pt",
                               "step_000000004.pt.json", "step_000000006.pt", "step_000000006.pt.json"]
    for name in local:
        assert _remote_bytes(f"s3://mirror/runs/a/checkpoints/{name}") == (run / "checkpoints" / name).read_bytes()
    assert storage.read_text("s3://mirror/runs/a/.hydra/config.yaml") == "a: 1\n"
    assert storage.read_text("s3://mirror/runs/a/export/open_clip_config.json") == "{}"

    shutil.rmtree(run)  # the node is gone: only the mirror is left
    got = fetch_latest("s3://mirror/runs/a", tmp_path / "new")
    assert got == tmp_path / "new" / "checkpoints" / "step_000000006.pt"
    assert load_checkpoint(got)["step"] == 6  # verified against the manifest that came with it
    assert (got.parent / (got.name + ".json")).read_bytes() == _remote_bytes(
        "s3://mirror/runs/a/checkpoints/step_000000006.pt.json")
    assert json.loads((got.parent / "latest.json").read_text())["file"] == got.name
    assert fetch_latest("s3://mirror/runs/empty", tmp_path / "other") is None
    # a mirrored file damaged in storage is caught on download, by the manifest that came with it
    storage.put_file(got.parent / "latest.json", "s3://mirror/runs/a/checkpoints/step_000000006.pt")
    bad = fetch_latest("s3://mirror/runs/a", tmp_path / "third")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(bad)


def test_missing_bucket_fails_at_once_and_non_urls_are_refused(tmp_path, s3):
    t0 = time.perf_counter()
    with pytest.raises(storage.StorageError) as e:
        RemoteSync("s3://no-such-bucket/runs/a", tmp_path)
    assert "s3://no-such-bucket/runs/a" in str(e.value) and "does not exist" in str(e.value)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(storage.StorageError, match="not an object-storage URL"):
        RemoteSync(str(tmp_path / "local"), tmp_path)


# ------------------------------------------------------------------------------------------ training

def _metrics(run: Path) -> dict[int, dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def _remote_step(prefix: str) -> int | None:
    text = storage.read_text(f"{prefix}/checkpoints/latest.json")
    return None if text is None else json.loads(text)["step"]


@pytest.mark.slow
def test_train_from_s3_kill_and_resume_from_the_mirror_alone(tmp_path, s3, catalog_cache, caplog):
    """Shards on S3, checkpoints mirrored to S3; SIGKILL mid-run, delete the run dir, resume=auto: the run
    continues from the mirror and logs bitwise the losses the killed run logged for the same steps."""
    from gcl.data.synthetic import ensure_catalog

    root = ensure_catalog(catalog_cache, products=160, seed=0, image_size=32)
    train = json.loads((root / "catalog.json").read_text())["splits"]["train"]
    fs, _ = storage.filesystem("s3://mirror")
    fs.put(str(Path(train["pattern"]).parent) + "/", "mirror/data/train/", recursive=True)
    shards = "s3://mirror/data/train/" + Path(train["pattern"]).name
    prefix = "s3://mirror/runs/kill"
    run = tmp_path / "run"
    # one thread in both runs: the killed one is a process of its own, the resumed one runs in this process
    overrides = [*FAST, f"data.synthetic.cache_dir={catalog_cache}", f"data.train_shards='{shards}'",
                 "trainer.max_steps=5", "trainer.save_every=2", "data.num_workers=0", "trainer.threads=1",
                 f"trainer.remote_sync={prefix}", "trainer.resume=auto"]
    p = subprocess.Popen([sys.executable, "train.py", *overrides, f"hydra.run.dir={run}"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while True:  # kill between two saves, once the mirror holds a checkpoint and a later step was logged
            assert p.poll() is None, p.stderr.read()[-3000:]
            assert time.time() < deadline, "the run never reached a mirrored checkpoint"
            mirrored, logged = _remote_step(prefix), max(_metrics(run), default=0)
            if mirrored is not None and logged > mirrored and logged % 2 != 0:
                break
            time.sleep(0.05)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    killed = _metrics(run)
    mirrored = _remote_step(prefix)
    assert mirrored in (2, 4) and max(killed) > mirrored
    shutil.rmtree(run)  # the machine is gone; only the mirror is left

    from gcl.train import Trainer

    with caplog.at_level(logging.INFO, logger="gcl"):
        Trainer(compose("train", overrides), run).fit()
    assert "from the mirror" in caplog.text
    resumed = _metrics(run)
    assert min(resumed) == mirrored + 1 and max(resumed) == 5
    overlap = [s for s in killed if s > mirrored]
    for step in overlap:
        for key in ("loss", "lr", "logit_scale"):
            assert resumed[step][key] == killed[step][key], (step, key)
    # the mirror ends with the finished run's checkpoints (pruned like the run dir) and its config
    assert _remote_step(prefix) == 5
    assert storage.listdir(f"{prefix}/checkpoints") == sorted(
        p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert storage.read_text(f"{prefix}/.hydra/config.yaml") is not None
