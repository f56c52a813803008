"""Package data: the shipped base model (``gcl-base-world/``), pretrained on the general world.

``BASE_DIR`` is an open_clip folder (``open_clip_config.json``, ``open_clip_model.safetensors`` in fp16,
``README.md`` model card) plus ``manifest.json`` (sha256, size, the rebuild command, training time and machine
load). Load it as ``model.name=local-dir:<BASE_DIR>`` or ``model.name=gcl-base model.pretrained=<BASE_WEIGHTS>``.
Rebuilding it: ``gcl.assets.build``. This module only locates and checks the files.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent / "gcl-base-world"
BASE_WEIGHTS = BASE_DIR / "open_clip_model.safetensors"
BASE_MANIFEST = BASE_DIR / "manifest.json"
BASE_MODEL_NAME = "gcl-base"  # its architecture, registered from gcl/model_configs/gcl-base.json


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_manifest() -> dict[str, Any]:
    """The shipped base's manifest; raises FileNotFoundError naming the rebuild command when it is missing."""
    if not BASE_MANIFEST.is_file() or not BASE_WEIGHTS.is_file():
        raise FileNotFoundError(f"the shipped base model is missing from {BASE_DIR}; rebuild it with "
                                "`python -m gcl.assets.build` (trains experiment=pretrain_world; its manifest and "
                                "card give the exact commands and times)")
    return json.loads(BASE_MANIFEST.read_text())


def verify_base() -> dict[str, Any]:
    """Check the shipped weights against the manifest's sha256 and size; return the manifest."""
    m = base_manifest()
    got = sha256(BASE_WEIGHTS)
    if got != m["sha256"] or BASE_WEIGHTS.stat().st_size != m["bytes"]:
        raise ValueError(f"{BASE_WEIGHTS} has sha256 {got} ({BASE_WEIGHTS.stat().st_size} bytes); the manifest "
                         f"records {m['sha256']} ({m['bytes']} bytes): the file was changed or damaged, restore "
                         "it from git or rebuild it with `python -m gcl.assets.build`")
    return m
