"""Shared test setup: few threads (the suite runs on 2 cores), offline hub, deterministic seeds."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def catalog_cache(tmp_path_factory) -> Path:
    """A cache dir for the synthetic catalog shared by every test of the session (generated on first use)."""
    return tmp_path_factory.mktemp("gcl-cache")
