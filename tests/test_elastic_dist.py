"""Elastic exact resume through the real Trainer on gloo processes (issue 18.2): 2 ranks stopped by SIGTERM
mid-epoch resume on 1 process, which is stopped mid-epoch again and resumes on 2; a resume on 3 processes,
where the global batch does not divide, is refused naming the numbers and the override.

Each launch runs this file as a script on every rank (the torchrun environment set by hand, as
tests/test_train_dist.py does): it builds the Trainer from the repo's configs with ``trainer.resume=auto``, wraps
its stream to write down the sample keys each step trains on, and sends itself SIGTERM (rank 0) when it draws
the batch of the step to stop at: the trainer finishes that step, saves and returns, as under a scheduler's
preemption. The reference is the training shards themselves (their tar members): the keys of the steps of
each epoch must be the dataset exactly once. The schedule is checked against its formula and the optimizer's
step counter against the number of steps.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import FAST, ROOT, compose

B, PRODUCTS = 4, 50  # per-rank batch on 2 ranks (global 8); 50 products give 48 training samples
STEPS_PER_EPOCH = 6
ARGS = ["data.num_workers=2", "data.shuffle_buffer=10", f"data.batch_size={B}", "eval=none",
        f"trainer.max_steps={2 * STEPS_PER_EPOCH}", "trainer.resume=auto", "trainer.log_every=1"]


class _Recorder:
    """The trainer's stream, writing each drawn batch's keys (and stopping the run at ``stop_at``)."""

    def __init__(self, trainer, path: Path, stop_at: int) -> None:
        self.trainer, self.stream, self.path, self.stop_at = trainer, trainer.stream, path, stop_at

    def __iter__(self):
        for batch in self.stream:
            step = self.trainer.step + 1
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "keys": batch["key"]}) + "\n")
            if step == self.stop_at and self.trainer.rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # the loop saves after this step and returns
            yield batch

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _check_resumed_state(t, run_dir: Path, launch: str) -> None:
    """Under fsdp: the state each rank read in place (its shards of a sharded checkpoint written on another
    number of processes), gathered, must equal the checkpoint read whole in one process (DCP's own reader)."""
    from gcl.checkpoint import load_checkpoint
    from gcl.fsdp import full_state

    model = full_state(t.model.state_dict(), keep=t.is_main)
    opt = full_state(t.optimizer.state_dict()["state"], keep=t.is_main)
    if not t.is_main:
        return
    ref = load_checkpoint(run_dir / "checkpoints" / f"step_{t.resumed_from:09d}.pt")
    diff = max((model[k] - ref["model"][k]).abs().max().item() for k in ref["model"])
    diff = max([diff] + [(opt[i][n] - v).abs().max().item() for i, e in ref["optimizer"]["state"].items()
                         for n, v in e.items()])
    (run_dir / f"resumed-{launch}.json").write_text(json.dumps({"step": t.resumed_from, "max_diff": diff,
                                                                 "sharded": t.sharded}))


def worker(run_dir: Path, shards: str, launch: str, stop_at: int, *extra: str) -> None:
    from gcl.resume import ResumeRefused
    from gcl.train import Trainer

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the resume's lines, for the test
    cfg = compose("train", [*FAST, *ARGS, f"data.train_shards='{shards}'", *extra])
    try:
        t = Trainer(cfg, run_dir)
    except ResumeRefused as e:
        print(f"REFUSED: {e}", flush=True)  # noqa: T201 - read by the test
        sys.exit(3)
    if t.resumed_from is not None and t.sharded:
        _check_resumed_state(t, run_dir, launch)
    t.stream = _Recorder(t, run_dir / f"keys-{launch}-rank{t.rank}.jsonl", stop_at)
    t.fit()
    t.accelerator.wait_for_everyone()


def _launch(world: int, run_dir: Path, shards: str, launch: str, stop_at: int,
            *extra: str) -> tuple[list[int], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, __file__, str(run_dir), shards, launch, str(stop_at), *extra],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out, t0 = [], time.perf_counter()
    for p in procs:
        try:
            out.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"launch {launch} timed out (a rank waiting in a collective the other never joined)")
    print(f"launch {launch} on {world} process(es): {time.perf_counter() - t0:.1f}s")  # noqa: T201
    return [p.returncode for p in procs], "\n".join(out)


def _dataset_keys(train_dir: Path) -> Counter:
    keys: Counter = Counter()
    for tar in sorted(train_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys.update({m.name.split(".")[0] for m in tf.getmembers()})
    return keys


def _catalog(tmp_path: Path) -> tuple[Counter, str]:
    """The training shards (3) and their sample keys."""
    from gcl.data.synthetic import main as synthetic

    synthetic([str(tmp_path / "cat"), "--products", str(PRODUCTS), "--image-size", "32", "--per-shard", "20",
               "--splits", "1", "0", "0"])
    dataset = _dataset_keys(tmp_path / "cat" / "train")
    assert sum(dataset.values()) == STEPS_PER_EPOCH * 2 * B, "the catalog's train split changed size"
    return dataset, str(tmp_path / "cat" / "train" / "shard-{000000..000002}.tar")


def _check_epochs(run: Path, dataset: Counter) -> None:
    """Every step trained on the global batch, and each epoch's steps on the dataset exactly once."""
    steps: dict[int, Counter] = {}
    for f in run.glob("keys-*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], Counter()).update(row["keys"])
    assert sorted(steps) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert all(sum(c.values()) == 2 * B for c in steps.values())  # the global batch stayed 8 at every step
    for epoch in range(2):
        seen = sum((steps[s] for s in range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)),
                   Counter())
        assert seen == dataset, f"epoch {epoch}: {sorted((seen - dataset).items())} extra, " \
                                f"{sorted((dataset - seen).items())} missing"


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_to_one_and_back_keep_each_epoch_exact(tmp_path):
    from gcl.checkpoint import load_checkpoint

    dataset, shards = _catalog(tmp_path)
    run = tmp_path / "run"

    codes, out = _launch(2, run, shards, "a", stop_at=3)  # 2 ranks, stopped mid-epoch 0
    assert codes == [0, 0], out[-3000:]
    codes, out = _launch(3, run, shards, "refused", stop_at=0)  # global batch 8 over 3 processes
    assert codes == [3, 3, 3], out[-3000:]
    for part in ("global batch 8 (2 processes x 4 per process) does not divide over 3 processes",
                 "(1, 2, 4, 8)", "trainer.elastic_batch=per_process"):
        assert part in out, part
    codes, out = _launch(1, run, shards, "b", stop_at=STEPS_PER_EPOCH + 2)  # 1 process, stopped mid-epoch 1
    assert codes == [0], out[-3000:]
    assert "data.batch_size 4 -> 8 per process: the global batch 8 stays on 1 process" in out
    codes, out = _launch(2, run, shards, "c", stop_at=0)  # back on 2 ranks to the end
    assert codes == [0, 0], out[-3000:]

    _check_epochs(run, dataset)

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = {r["step"]: r for r in rows if "loss" in r}
    assert [rows[s]["world_size"] for s in sorted(rows)] == [2] * 3 + [1] * 5 + [2] * 4
    assert [rows[s]["samples_seen"] for s in sorted(rows)] == [s * 2 * B for s in sorted(rows)]
    lr0 = rows[1]["lr"]
    for s, r in rows.items():  # the schedule continued across both resumes: cosine, no warmup, from its formula
        assert r["lr"] == pytest.approx(lr0 * 0.5 * (1 + math.cos(math.pi * (s - 1) / (2 * STEPS_PER_EPOCH)))), s
    final = load_checkpoint(run / "checkpoints" / f"step_{2 * STEPS_PER_EPOCH:09d}.pt")
    assert final["global_batch"] == 2 * B and final["world_size"] == 2
    assert {int(v["step"]) for v in final["optimizer"]["state"].values()} == {2 * STEPS_PER_EPOCH}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp_sharded_checkpoints_resume_elastically(tmp_path):
    """trainer.strategy=fsdp with sharded checkpoints: 2 ranks stopped mid-epoch resume on 4 (each rank reads
    its part of shards cut for 2), which stop in the next epoch and resume on 2 to the end. The state each
    resume read in place equals the checkpoint read whole, and each epoch stays exact."""
    from gcl.checkpoint import load_checkpoint

    dataset, shards = _catalog(tmp_path)
    run = tmp_path / "run"
    fsdp = ["trainer.strategy=fsdp", "trainer.fsdp_checkpoint=sharded", "data.num_workers=1"]
    for world, launch, stop_at in ((2, "a", 3), (4, "b", STEPS_PER_EPOCH + 2), (2, "c", 0)):
        codes, out = _launch(world, run, shards, launch, stop_at, *fsdp)
        assert codes == [0] * world, out[-3000:]
    _check_epochs(run, dataset)
    for launch, step in (("b", 3), ("c", STEPS_PER_EPOCH + 2)):
        got = json.loads((run / f"resumed-{launch}.json").read_text())
        assert got["sharded"] and got["step"] == step and got["max_diff"] == 0.0, got
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in rows if "loss" in r] == [2] * 3 + [4] * 5 + [2] * 4
    final = load_checkpoint(run / "checkpoints" / f"step_{2 * STEPS_PER_EPOCH:09d}.pt")
    assert final["sharded"] and {int(v["step"]) for v in final["optimizer"]["state"].values()} == {2 * STEPS_PER_EPOCH}


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:])
