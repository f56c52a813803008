"""trainer.strategy=fsdp checkpoints under torchrun (2 gloo ranks): exact kill/resume, ddp <-> fsdp resume, export.

References are uninterrupted runs of the same config: an fsdp run and a ddp run, 6 steps each, checkpoints
every 2 (kept: 2, 4, 6). Checked:

- the fsdp reference writes sharded checkpoints (torch.distributed.checkpoint); its end-of-run export, read
  back from the shards, holds its final weights;
- kill -9 of an fsdp run (full checkpoints) mid-epoch, then ``trainer.resume=auto``: the final weights equal
  the uninterrupted fsdp run's bit for bit;
- the fsdp run's (sharded) step-4 checkpoint resumed under ddp ends within 1e-5 of the fsdp run, and the ddp
  run's step-4 checkpoint resumed under fsdp within 1e-5 of the ddp run;
- the two references agree within 1e-5.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FAST, ROOT

from gcl.checkpoint import find_checkpoint, load_checkpoint

COMMON = ["trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_last=3", "eval=none", "loss=seven_field",
          "trainer.accum_steps=2", "sched.warmup_steps=2"]


def _cmd(run: Path, cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *FAST,
            f"data.synthetic.cache_dir={cache}", f"hydra.run.dir={run}", *COMMON, *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(run: Path, cache: Path, *overrides: str, timeout: int = 300) -> None:
    p = subprocess.Popen(_cmd(run, cache, *overrides), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        raise AssertionError(f"timed out after {timeout}s\n{err[-4000:]}") from None
    assert p.returncode == 0, err[-4000:]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(find_checkpoint(path))["model"]


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _kill_after_step(run: Path, cache: Path, step: int, *overrides: str) -> None:
    """Start a torchrun job and SIGKILL its whole process group once ``step`` is logged."""
    p = subprocess.Popen(_cmd(run, cache, *overrides), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            m = run / "metrics.jsonl"
            if m.exists() and max(_steps(run), default=0) >= step:
                break
            assert p.poll() is None, p.stderr.read()[-4000:]
            time.sleep(0.05)
        else:
            raise AssertionError(f"step {step} was not logged within 300 s")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_fsdp_kill_resume_and_ddp_fsdp_checkpoints(tmp_path, catalog_cache):
    fsdp, ddp = ["trainer.strategy=fsdp"], ["trainer.strategy=ddp"]
    ref_fsdp, ref_ddp = tmp_path / "ref-fsdp", tmp_path / "ref-ddp"
    _torchrun(ref_fsdp, catalog_cache, *fsdp, "trainer.fsdp_checkpoint=sharded", "export.enabled=true")
    _torchrun(ref_ddp, catalog_cache, *ddp)
    final_fsdp, final_ddp = _weights(ref_fsdp), _weights(ref_ddp)
    ck = ref_fsdp / "checkpoints"
    assert sorted(p.name for p in ck.glob("*.dcp")) == [f"step_00000000{s}.dcp" for s in (2, 4, 6)]
    assert torch.load(ck / "step_000000006.pt", weights_only=True)["model"] is None  # tensors live in the shards
    assert load_checkpoint(ck / "step_000000006.pt")["world_size"] == 2
    from safetensors.torch import load_file

    exported = load_file(next((ref_fsdp / "export").glob("*.safetensors")))  # exported from the shards
    assert _diff({k: exported[k] for k in final_fsdp}, final_fsdp) == 0.0

    # kill -9 mid-epoch (checkpoint of step 2 on disk, step 3 lost), resume=auto under fsdp
    killed = tmp_path / "killed"
    _kill_after_step(killed, catalog_cache, 3, *fsdp)
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["step"] == 2
    _torchrun(killed, catalog_cache, *fsdp, "trainer.resume=auto")
    diff = _diff(_weights(killed), final_fsdp)
    assert diff == 0.0, f"fsdp kill/resume: final weights differ from the uninterrupted run's by {diff:.2e}"
    assert _steps(killed) == _steps(ref_fsdp) == list(range(1, 7))

    # cross-strategy: each reference's step-4 checkpoint finishes the run under the other strategy
    cases = [("fsdp->ddp", ref_fsdp, ddp, final_fsdp), ("ddp->fsdp", ref_ddp, fsdp, final_ddp)]
    for name, src, strategy, want in cases:
        run = tmp_path / name.replace(">", "")
        _torchrun(run, catalog_cache, *strategy, f"trainer.resume={src / 'checkpoints' / 'step_000000004.pt'}")
        assert _steps(run) == [5, 6], name
        diff = _diff(_weights(run), want)
        assert diff <= 1e-5, f"{name}: final weights differ from the uninterrupted run's by {diff:.2e}"
    # and the two strategies agree with each other over 6 steps
    assert _diff(final_fsdp, final_ddp) <= 1e-5
