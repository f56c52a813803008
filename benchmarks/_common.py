"""Shared helpers for the benchmark scripts: machine description, result files, the OpenCLIP venv."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OPENCLIP_VENV = ROOT / ".venv-openclip"
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    """One line: CPU model, cores, memory, torch version, GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{mem}, torch {torch.__version__}{gpu}"


def save_result(name: str, payload: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the machine, command and date added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": _dt.date.today().isoformat(), "machine": machine(),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def openclip_python() -> Path:
    """``.venv-openclip``'s python: OpenCLIP's training code needs webdataset<=0.2.86 (it fails on 1.x).

    Created light on first use: the venv holds only webdataset 0.2.86 and reads torch / torchvision /
    open_clip / PIL from the main ``.venv`` through a .pth line, so both sides run the same library versions
    and nothing large is downloaded."""
    py = OPENCLIP_VENV / "bin" / "python"
    probe = "import webdataset, open_clip_train.data as d; print(webdataset.__version__)"
    if py.exists():
        out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
        if out.returncode == 0:
            return py
        raise RuntimeError(f"{OPENCLIP_VENV} exists but cannot import OpenCLIP's data code:\n{out.stderr[-2000:]}\n"
                           "delete it and rerun")
    subprocess.run([sys.executable, "-m", "venv", str(OPENCLIP_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "webdataset==0.2.86"], check=True)
    import site

    site_dir = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (OPENCLIP_VENV / "lib" / ver / "site-packages" / "zz_gcl_main_venv.pth").write_text(site_dir + "\n")
    subprocess.run([str(py), "-c", probe], check=True)
    return py
