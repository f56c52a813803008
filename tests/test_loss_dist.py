"""GCLLoss across 2 processes (gloo, CPU) under DDP equals one process on the concatenated batch.

Each rank runs this file as a script (``--rank``), wraps a tiny linear "tower" in DDP, computes the loss on
its half of a fixed global batch and saves its (DDP-averaged) gradients. The test compares them, for both
kinds with duplicates on (cross-rank duplicate texts and items, missing fields, unequal valid rows per rank,
rank weights with a missing score), against a single process on the whole batch - and shows that a naive
no-grad gather (open_clip's default) gives different tower gradients, so the comparison can fail.
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

WORLD, B, D_IN, D = 2, 6, 5, 4
N = WORLD * B
TEXT = ("title", "colors", "description", "query")
TERMS = [
    {"name": "title_image", "left": {"fields": ["title"]}, "right": {"fields": ["image"]}, "weight": 1.0},
    {"name": "colors_image", "left": {"fields": ["colors"]}, "right": {"fields": ["image"]}, "weight": 0.5},
    {"name": "doc_image", "left": {"fields": ["description", "title"], "weights": [0.7, 0.3]},
     "right": {"fields": ["image"]}, "weight": 0.25},
    {"name": "query_doc", "left": {"fields": ["query"]}, "right": {"fields": ["image", "title"], "weights": [0.9, 0.1]},
     "weight": 1.0, "score_to_weight": "linear", "score_field": "score", "normalize_weights": True},
]
ROOT = Path(__file__).resolve().parents[1]


def global_batch() -> dict:
    """A fixed global batch of N samples; ranks take rows [r*B, (r+1)*B)."""
    g = torch.Generator().manual_seed(123)
    present = {
        "image": [1] * N,
        "title": [1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1],
        "colors": [1] * N,
        # Unequal valid rows per rank for doc_image/query_doc: rank 0 holds more descriptions, fewer queries.
        "description": [1, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0],
        "query": [1, 0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1],
    }
    text_id = {
        "title": [1, 2, 3, 4, 5, 6, 7, 2, 9, 10, 11, 3],  # titles 2 and 3 repeat across ranks
        "colors": [21, 22, 21, 23, 22, 21, 22, 21, 23, 24, 21, 22],  # few colors: duplicates everywhere
        "description": list(range(31, 31 + N)),
        "query": [41, 42, 43, 41, 45, 46, 41, 48, 46, 50, 51, 52],  # one query, several products, across ranks
    }
    for f in TEXT:
        text_id[f] = [t if p else 0 for t, p in zip(text_id[f], present[f])]
    vocab = {t: torch.randn(D_IN, generator=g) for f in TEXT for t in text_id[f]}
    return {
        "x_image": torch.randn(N, D_IN, generator=g),
        "x_text": {f: torch.stack([vocab[t] if t else torch.zeros(D_IN) for t in text_id[f]]) for f in TEXT},
        "present": {f: torch.tensor(v, dtype=torch.bool) for f, v in present.items()},
        "text_id": {f: torch.tensor(v) for f, v in text_id.items()},
        "item_id": torch.tensor([100, 101, 102, 103, 104, 105, 106, 107, 102, 109, 110, 101]),  # cross-rank items
        "score": torch.tensor([3.0, 1.0, 2.0, math.nan, 5.0, 1.5, 2.5, 1.0, 4.0, 0.5, 2.0, 1.0]),
        "position": torch.full((N,), math.nan),
    }


def take(batch: dict, lo: int, hi: int) -> dict:
    return {k: take(v, lo, hi) if isinstance(v, dict) else v[lo:hi] for k, v in batch.items()}


class Tower(nn.Module):
    """Two linear towers plus the model's logit_scale (and logit_bias for siglip)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(D_IN, D)
        self.text = nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(8.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if kind == "siglip" else None

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = {"image": self.image(batch["x_image"])}
        for f in TEXT:
            out[f] = self.text(batch["x_text"][f]) * batch["present"][f].unsqueeze(1)
        return out


def run_step(model: nn.Module, tower: Tower, batch: dict, kind: str) -> dict:
    from gcl.loss import build_loss

    out = build_loss(kind, TERMS, duplicates=True)(model(batch), batch, tower.logit_scale, tower.logit_bias)
    out["loss"].backward()
    return {"values": {k: v.detach().clone() for k, v in out.items()},
            "grads": {n: p.grad.detach().clone() for n, p in tower.named_parameters()}}


def worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gcl.loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    local = take(global_batch(), rank * B, (rank + 1) * B)
    results = {}
    correct_gather = gcl.loss._gather_with_grad

    def naive_gather(x):  # open_clip's default: no gradient through the other ranks' features
        parts = [torch.empty_like(x) for _ in range(WORLD)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[rank] = x
        return torch.cat(parts)

    for mode, gather in (("grad", correct_gather), ("naive", naive_gather)):
        gcl.loss._gather_with_grad = gather
        for kind in ("clip", "siglip"):
            tower = Tower(kind)
            results[f"{mode}/{kind}"] = run_step(DDP(tower), tower, local, kind)
    gcl.loss._gather_with_grad = correct_gather
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_ddp_gradients_equal_single_process(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--port", str(port), "--out", str(tmp_path)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=100)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    batch = global_batch()
    for kind in ("clip", "siglip"):
        tower = Tower(kind)
        ref = run_step(tower, tower, batch, kind)
        # 6 + 5 valid doc rows, 2 + 6 valid query rows (one query row lacks a score): ranks differ.
        assert ref["values"]["rows/doc_image"] == 11 and ref["values"]["rows/query_doc"] == 8
        assert ref["values"]["skipped/query_doc"] == 1
        got = [r[f"grad/{kind}"] for r in ranks]
        # DDP averaged the gradients: every rank holds the single-process gradient of the global batch.
        for r, res in enumerate(got):
            for name, want in ref["grads"].items():
                torch.testing.assert_close(res["grads"][name], want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, r=r, n=name, c=kind: f"{c} rank {r} grad {n}: {m}")
        # Logged values: the mean over ranks of each rank's share is the global value.
        for key, want in ref["values"].items():
            mean = sum(res["values"][key] for res in got) / WORLD
            torch.testing.assert_close(mean, want, rtol=1e-5, atol=1e-5, msg=lambda m, k=key, c=kind: f"{c} {k}: {m}")
        # A naive no-grad gather loses the cross-rank feature gradients: this comparison would catch it.
        naive = ranks[0][f"naive/{kind}"]["grads"]
        err = max((naive[n] - ref["grads"][n]).abs().max().item() for n in ("image.weight", "text.weight"))
        assert err > 1e-3, f"{kind}: naive gather unexpectedly matched ({err})"


if __name__ == "__main__":
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    worker(int(args["--rank"]), int(args["--port"]), args["--out"])
