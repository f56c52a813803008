"""Helpers shared by tests (importable: pytest's pythonpath includes tests/)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Small, fast settings shared by trainer/eval tests: tiny model, tiny catalog, no wandb, no export.
FAST = [
    "trainer.max_steps=4", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=1",
    "data.batch_size=8", "data.num_workers=0", "data.synthetic.products=160", "data.synthetic.image_size=32",
    "logger.wandb.mode=disabled", "logger.progress=false", "export.enabled=false", "sched.warmup_steps=0",
]


def code_blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of a markdown text in language ``lang``."""
    import re

    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def shell_commands(block: str) -> list[list[str]]:
    """Commands of a shell block as argv lists (continuations joined, comments and `export` lines dropped)."""
    import shlex

    joined = block.replace("\\\n", " ")
    cmds = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv and argv[0] != "export":
            cmds.append(argv)
    return cmds


def compose(config_name: str = "train", overrides: list[str] | None = None, return_hydra_config: bool = False):
    """hydra.compose over the repo's conf/ (the real configs users run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import gcl.config  # noqa: F401  (registers schemas)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [],
                             return_hydra_config=return_hydra_config)


def interrupt_writes(monkeypatch, after_bytes: int, times: int) -> None:
    """SIGINT to this process ``times`` times while a checkpoint file is being written (from inside the file's
    write, where a Ctrl-C during the write system call is delivered), once ``after_bytes`` are out."""
    import os
    import signal

    from gcl import checkpoint

    sent = {"n": 0, "bytes": 0}

    class File:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            sent["bytes"] += len(b)
            if sent["bytes"] >= after_bytes and sent["n"] < times:
                sent["n"] += 1
                os.kill(os.getpid(), signal.SIGINT)
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    real_init = checkpoint._HashingWriter.__init__
    monkeypatch.setattr(checkpoint._HashingWriter, "__init__", lambda self, f: real_init(self, File(f)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, args: list[str], world: int = 2, timeout: int = 400) -> None:
    """Run ``script RANK *args`` on ``world`` gloo processes (RANK/WORLD_SIZE env, as torchrun sets them) and
    fail with their logs when one exits non-zero or they time out (a rank waiting in a collective)."""
    import pytest

    port = free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, script, str(r), *args], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out (a rank waiting in a collective the other never joined)")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-4000:] for log in logs)


# ------------------------------------------------------------- generated datasets (the world and the catalog)
# Both generators take the same arguments apart from their size's name (``samples`` / ``products``) and write
# the same layout (split folders of shards, a Parquet table, a metadata JSON holding absolute paths), so the
# checks of that shared contract are written once here and called by tests/data/test_world.py and
# tests/data/test_synthetic.py. They read the output with plain tarfile / hashlib / pyarrow, never gcl's code.


def read_split(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} for every member of every shard of a split (plain tarfile)."""
    import tarfile
    from collections import defaultdict

    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for tar_path in sorted((root / split).glob("shard-*.tar")):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples[key][ext] = tf.extractfile(m).read()
    return dict(samples)


def shard_digests(root: Path, meta_name: str) -> dict[str, str]:
    """sha256 of every shard / sizes.json file under root (relative path -> digest); the metadata file
    ``meta_name`` is left out (it holds the dataset's absolute location)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".tar", ".json")
            and p.name != meta_name}


def check_same_seed_same_bytes(generate, size_name: str, tmp_path: Path, meta_name: str, table_name: str) -> None:
    """Same seed -> the same shard bytes and table; another seed -> other bytes; the splits hold every sample."""
    import pyarrow.parquet as pq

    a = generate(tmp_path / "a", **{size_name: 40}, seed=7, per_shard=16)
    generate(tmp_path / "b", **{size_name: 40}, seed=7, per_shard=16)
    generate(tmp_path / "c", **{size_name: 40}, seed=8, per_shard=16)
    da, db, dc = (shard_digests(tmp_path / x, meta_name) for x in "abc")
    assert da and da == db
    assert da != dc
    ta, tb = (pq.read_table(tmp_path / x / table_name) for x in "ab")
    assert ta.equals(tb)
    assert sum(a["splits"][s]["count"] for s in ("train", "val", "test", "test_heldout")) == 40


def check_bytes_independent_of_worker_count(generate, size_name: str, tmp_path: Path, meta_name: str,
                                            table_name: str) -> None:
    """One worker and two spawned workers write the same shards and the same table."""
    import pyarrow.parquet as pq

    generate(tmp_path / "w1", **{size_name: 48}, seed=5, per_shard=10, workers=1)
    generate(tmp_path / "w2", **{size_name: 48}, seed=5, per_shard=10, workers=2)
    assert shard_digests(tmp_path / "w1", meta_name) == shard_digests(tmp_path / "w2", meta_name)
    assert pq.read_table(tmp_path / "w1" / table_name).equals(pq.read_table(tmp_path / "w2" / table_name))


def check_bad_arguments_name_the_problem(generate, size_name: str, tmp_path: Path) -> None:
    """Bad splits, a zero size and a non-empty output folder each fail with an error that names them."""
    import pytest

    with pytest.raises(ValueError, match="splits"):
        generate(tmp_path / "x", **{size_name: 5}, splits=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match=size_name):
        generate(tmp_path / "x", **{size_name: 0})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(tmp_path / "full", **{size_name: 5})


def call_concurrently(fn, n: int = 3) -> list:
    """Call ``fn()`` from ``n`` threads started together; their results once all returned (no thread raised)."""
    import threading

    results: list = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(fn())
        except BaseException as e:  # noqa: BLE001 - reported below in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def strategy_trainer(strategy: str, overrides: list[str], run_dir: Path):
    """A real Trainer composed from the repo's configs with ``trainer.strategy=strategy``, in a process of a
    gloo group. accelerate keeps one mixed-precision setting per process (a shared state), so it is reset here:
    a trainer built earlier must not be used after one with another setting."""
    from accelerate.state import AcceleratorState

    from gcl.train import Trainer

    AcceleratorState._reset_state()  # keeps the process group (PartialState)
    return Trainer(compose("train", [*FAST, *overrides, f"trainer.strategy={strategy}"]), run_dir)


def gathered(state: dict) -> dict:
    """A state dict with every FSDP2 shard gathered into a full tensor (plain tensors copied); collective."""
    from gcl.fsdp import full_state

    return full_state({n: v.detach().clone() for n, v in state.items()}, keep=True)


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)
