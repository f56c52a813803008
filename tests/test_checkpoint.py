"""gcl.checkpoint: damaged checkpoints are named and skipped, a full disk is reported plainly and leaves no
partial file, a second Ctrl-C never leaves a half-written checkpoint.

References: byte-level damage done by the test itself (truncation, a flipped byte, garbage JSON), a real full
filesystem (a small tmpfs mounted in a private mount namespace) and real signals sent to this process.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import ROOT, interrupt_writes

from gcl.checkpoint import (
    CheckpointError,
    CheckpointManager,
    candidates,
    find_checkpoint,
    load_checkpoint,
    load_newest_intact,
)
from gcl.launch import StopSignal


def _state(step: int, n: int = 50_000) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(n, generator=g)}, "step": step, "config": "a: 1\n"}


@pytest.fixture
def run(tmp_path) -> Path:
    """A run dir with checkpoints at steps 2, 4 and 6 written by the manager."""
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for s in (2, 4, 6):
        mgr.save(_state(s), s)
    return tmp_path


def _ck(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:09d}.pt"


def test_manifest_matches_the_bytes_on_disk(run):
    import hashlib

    man = json.loads((run / "checkpoints" / "step_000000006.pt.json").read_text())
    data = _ck(run, 6).read_bytes()
    assert man == {"file": "step_000000006.pt", "step": 6, "size": len(data),
                   "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_damaged_newest_checkpoint_is_named_and_skipped(run, caplog, damage):
    p = _ck(run, 6)
    data = bytearray(p.read_bytes())
    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte changed in the middle of the tensor data: only the hash can tell
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(p)):
        load_checkpoint(p)
    with caplog.at_level("WARNING"):
        path, state = load_newest_intact(run)
    assert path == _ck(run, 4) and state["step"] == 4
    assert str(p) in caplog.text and "falling back" in caplog.text
    # a damaged file given explicitly is refused, not silently replaced
    with pytest.raises(CheckpointError, match="another checkpoint file"):
        load_newest_intact(p)


def test_torn_latest_json_falls_back_to_the_newest_step_file(run, caplog):
    (run / "checkpoints" / "latest.json").write_text('{"file": "step_0000')
    with caplog.at_level("WARNING"):
        path, state = load_newest_intact(run)
    assert state["step"] == 6 and "latest.json is damaged" in caplog.text


def test_every_checkpoint_damaged_lists_them_all(run):
    for s in (2, 4, 6):
        _ck(run, s).write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as e:
        load_newest_intact(run)
    for s in (2, 4, 6):
        assert _ck(run, s).name in str(e.value)


def test_checkpoint_without_manifest_still_loads(run):
    """Checkpoints written before manifests existed are checked by reading them."""
    _ck(run, 6).with_name("step_000000006.pt.json").unlink()
    assert load_newest_intact(run)[1]["step"] == 6


def test_partial_files_are_never_candidates_and_are_removed(run):
    partial = run / "checkpoints" / ".step_000000008.pt.tmp-12345"
    partial.write_bytes(b"\0" * 1000)  # what a SIGKILL mid-write leaves behind
    assert partial not in candidates(run) and load_newest_intact(run)[1]["step"] == 6
    assert CheckpointManager(run).remove_partial_files() == 1 and not partial.exists()


def test_pruning_removes_manifests_with_their_checkpoints(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    for s in (1, 2):
        mgr.save(_state(s, 10), s)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest.json", "step_000000002.pt", "step_000000002.pt.json"]


def test_no_checkpoint_advice_fits_the_purpose(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer.resume=null"):
        find_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        find_checkpoint(tmp_path, purpose="export")
    assert "resum" not in str(e.value) and "save_every" in str(e.value)


# ------------------------------------------------------------------------------------ second Ctrl-C

def test_second_ctrl_c_during_a_save_lets_it_complete(tmp_path, monkeypatch):
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: stop after this step
        assert stop.received == "SIGINT"
        interrupt_writes(monkeypatch, after_bytes=50_000, times=1)
        with stop.protect():
            CheckpointManager(tmp_path).save(_state(3, 200_000), 3)
        path, state = load_newest_intact(tmp_path)  # verified against its manifest
        assert state["step"] == 3 and torch.equal(state["model"]["w"], _state(3, 200_000)["model"]["w"])
        # outside a save, a second Ctrl-C still quits at once
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


def test_third_ctrl_c_aborts_the_save_without_a_visible_partial_file(tmp_path, monkeypatch):
    CheckpointManager(tmp_path).save(_state(2), 2)
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        interrupt_writes(monkeypatch, after_bytes=50_000, times=2)
        with pytest.raises(KeyboardInterrupt), stop.protect():
            CheckpointManager(tmp_path).save(_state(3, 200_000), 3)
    finally:
        stop.restore()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest.json", "step_000000002.pt", "step_000000002.pt.json"]
    assert load_newest_intact(tmp_path)[1]["step"] == 2


# ---------------------------------------------------------------------------------------- disk full

DISK_FULL_SCRIPT = textwrap.dedent("""
    import os, sys, json
    import torch
    from gcl.checkpoint import CheckpointManager, DiskFullError, load_newest_intact
    run = sys.argv[1]
    mgr = CheckpointManager(run, keep_last=2)
    mgr.save({"model": {"w": torch.zeros(100_000)}, "step": 1, "config": ""}, 1)  # 0.4 MB of tensors
    try:
        mgr.save({"model": {"w": torch.zeros(1_000_000)}, "step": 2, "config": ""}, 2)  # 4 MB
        print(json.dumps({"error": None}))
    except OSError as e:
        print(json.dumps({"error": str(e), "type": type(e).__name__, "errno": e.errno,
                          "files": sorted(os.listdir(os.path.join(run, "checkpoints"))),
                          "resumes_at": load_newest_intact(run)[1]["step"]}))
""")


def _small_filesystem_runner() -> list[str] | None:
    """A command prefix under which a shell may mount a tmpfs: a private mount namespace (as root, or
    through an unprivileged user namespace). None where neither is allowed."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def test_disk_full_names_the_path_and_size_and_leaves_no_partial_file(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    prefix = _small_filesystem_runner()
    if prefix is not None:  # a real full filesystem: 3 MB holds the 0.4 MB checkpoint, not the 4 MB one
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        cmd = [*prefix, "sh", "-c", f'mount -t tmpfs -o size=3m tmpfs "{mnt}" && exec "$0" -c "$1" "{mnt}/run"',
               sys.executable, DISK_FULL_SCRIPT]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    else:  # no mount namespace here: a file size limit makes the second write fail (EFBIG) instead
        import resource

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))

        r = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(tmp_path / "run")], capture_output=True,
                           text=True, env=env, timeout=120, preexec_fn=limit)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["error"] is not None, "the second save should not fit"
    if prefix is not None:
        assert out["type"] == "DiskFullError" and out["errno"] == 28
        assert "no space left on device" in out["error"] and "step_000000002.pt" in out["error"]
        assert "needs about 4.0 MB" in out["error"]
    else:
        assert "step_000000002.pt" in out["error"] and "too large" in out["error"]
    # nothing partial stays, the newest complete checkpoint is untouched and resume uses it
    assert out["files"] == ["latest.json", "step_000000001.pt", "step_000000001.pt.json"]
    assert out["resumes_at"] == 1


def _optim_state(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    return {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(7, 3, generator=g),
                          "exp_avg_sq": torch.rand(7, 3, generator=g)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.98), "name": "image", "params": [0]}]}


def test_sharded_checkpoint_reads_back_whole_and_a_damaged_shard_is_skipped(tmp_path):
    """trainer.fsdp_checkpoint=sharded's layout in one process: the .pt without tensors plus the DCP folder
    reads back as the state that was saved; pruning removes the folder with its .pt; a flipped byte in a shard
    is named and the next older checkpoint is used."""
    from gcl.checkpoint import save_sharded

    mgr = CheckpointManager(tmp_path, keep_last=2)
    states = {s: {**_state(s, 1000), "optimizer": _optim_state(s)} for s in (2, 4, 6)}
    for s, st in states.items():
        name = mgr.step_name(s)
        mgr.save(save_sharded(st, mgr.dir / name, is_main=True), s)
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.suffix == ".dcp") == ["step_000000004.dcp", "step_000000006.dcp"]
    assert torch.load(_ck(tmp_path, 6), weights_only=True)["model"] is None
    got = load_checkpoint(_ck(tmp_path, 6))
    want = states[6]
    assert torch.equal(got["model"]["w"], want["model"]["w"])
    for k, v in want["optimizer"]["state"][0].items():
        assert torch.equal(got["optimizer"]["state"][0][k], v), k
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    shard = next(f for f in (ck / "step_000000006.dcp").iterdir() if f.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="step_000000006.dcp"):
        load_checkpoint(_ck(tmp_path, 6))
    path, state = load_newest_intact(tmp_path)
    assert path.name == "step_000000004.pt" and torch.equal(state["model"]["w"], states[4]["model"]["w"])
