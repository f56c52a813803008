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


def worker(run_dir: Path, shards: str, launch: str, stop_at: int) -> None:
    from gcl.resume import ResumeRefused
    from gcl.train import Trainer

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the resume's lines, for the test
    cfg = compose("train", [*FAST, *ARGS, f"data.train_shards='{shards}'"])
    try:
        t = Trainer(cfg, run_dir)
    except ResumeRefused as e:
        print(f"REFUSED: {e}", flush=True)  # noqa: T201 - read by the test
        sys.exit(3)
    t.stream = _Recorder(t, run_dir / f"keys-{launch}-rank{t.rank}.jsonl", stop_at)
    t.fit()
    t.accelerator.wait_for_everyone()


def _launch(world: int, run_dir: Path, shards: str, launch: str, stop_at: int) -> tuple[list[int], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, __file__, str(run_dir), shards, launch, str(stop_at)],
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


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_to_one_and_back_keep_each_epoch_exact(tmp_path):
    from gcl.checkpoint import load_checkpoint
    from gcl.data.synthetic import main as synthetic

    synthetic([str(tmp_path / "cat"), "--products", str(PRODUCTS), "--image-size", "32", "--per-shard", "20",
               "--splits", "1", "0", "0"])
    dataset = _dataset_keys(tmp_path / "cat" / "train")
    assert sum(dataset.values()) == STEPS_PER_EPOCH * 2 * B, "the catalog's train split changed size"
    shards = str(tmp_path / "cat" / "train" / "shard-{000000..000002}.tar")
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


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
