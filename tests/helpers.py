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
