"""Trainer.train_step on 2 gloo processes equals one process on the global batch when a rank (or its last
GradCache micro-batch) holds no present value in the loss's only text field.

Such a rank used to encode no text at all, so its backward never reached the text tower: DDP's reducer fell
out of step (gloo: "Received data size doesn't match"; NCCL would hang). Each rank runs this file as a script,
builds the real Trainer from the repo's configs (DDP through accelerate), and takes one step per case
(clip/siglip x accum_steps 1/2) from the same initial state; the test compares the logged loss (mean over
ranks) and the updated weights with a single process stepping once on the concatenated batch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, compose, run_ranks

WORLD, B = 2, 6  # per-rank batch; rank 0 holds the only queries, in its first micro-batch (rows 0..2)
PRESENT = 3
KINDS = {"clip": ["model=tiny"], "siglip": ["model=tiny_siglip", "loss.kind=siglip"]}
TERMS = "loss.terms=[{name:q,left:{fields:[query]},right:{fields:[image]}}]"


def _trainer(kind: str, batch_size: int, run_dir: Path, cache: str):
    from gcl.train import Trainer

    cfg = compose("train", [*FAST, f"data.synthetic.cache_dir={cache}", *KINDS[kind], TERMS,
                            f"data.batch_size={batch_size}", "eval=none"])
    return Trainer(cfg, run_dir)


def sparse_batch(batch: dict) -> dict:
    """Only rows 0..PRESENT-1 keep their query; the others become missing exactly as the collator writes a
    missing value (all-pad tokens, present False, text id 0, text None)."""
    assert bool(batch["present"]["query"][:PRESENT].all()), "the synthetic catalog should give every row a query"
    drop = torch.arange(batch["image"].shape[0]) >= PRESENT
    batch["present"]["query"][drop] = False
    batch["tokens"]["query"][drop] = 0  # both tiny models use open_clip's SimpleTokenizer: pad id 0
    batch["text_id"]["query"][drop] = 0
    batch["text"]["query"] = [t if i < PRESENT else None for i, t in enumerate(batch["text"]["query"])]
    return batch


def _weights(t) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in t.model.state_dict().items()}


def worker(rank: int, out_dir: Path, cache: str) -> None:
    from gcl.train import slice_batch

    torch.set_num_threads(1)
    results = {}
    for kind in KINDS:
        t = _trainer(kind, B, out_dir / f"ddp-{kind}", cache)
        assert t.world_size == WORLD and t.rank == rank
        start = (_weights(t), t.optimizer.state_dict(), t.scheduler.state_dict())
        full = torch.load(out_dir / f"batch-{kind}.pt", weights_only=True)
        local = slice_batch(full, slice(rank * B, (rank + 1) * B))
        for k in (1, 2):  # the same DDP module steps twice: a reducer left out of step fails the next step
            t.model.load_state_dict(start[0])
            t.optimizer.load_state_dict(start[1])
            t.scheduler.load_state_dict(start[2])
            t.cfg.trainer.accum_steps = k
            out = t.train_step(local)
            results[f"{kind}/k{k}"] = {"loss": out["loss"].item(), "weights": _weights(t)}
    torch.save(results, out_dir / f"rank{rank}.pt")
    t.accelerator.wait_for_everyone()


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rank_without_text_rows_matches_one_process(tmp_path, catalog_cache):
    ref = {}
    for kind in KINDS:
        one = _trainer(kind, WORLD * B, tmp_path / f"one-{kind}", str(catalog_cache))
        batch = sparse_batch(next(iter(one.stream)))
        torch.save(batch, tmp_path / f"batch-{kind}.pt")
        init = _weights(one)
        out = one.train_step(batch)
        assert out["rows/q"].item() == PRESENT
        ref[kind] = {"loss": out["loss"].item(), "weights": _weights(one)}
        # the text tower really trains on this batch, so comparing its weights can fail
        moved = max((ref[kind]["weights"][n] - w).abs().max().item() for n, w in init.items()
                    if n.startswith(("token_embedding", "text.", "transformer.")))
        assert moved > 1e-5, f"{kind}: the text tower did not move ({moved:.1e})"

    run_ranks(__file__, [str(tmp_path), str(catalog_cache)], world=WORLD, timeout=240)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for kind in KINDS:
        want = ref[kind]
        for k in (1, 2):
            got = [res[f"{kind}/k{k}"] for res in ranks]
            loss = sum(g["loss"] for g in got) / WORLD  # what the trainer logs: the mean over ranks
            assert abs(loss - want["loss"]) <= 1e-5, (kind, k, loss, want["loss"])
            for r, g in enumerate(got):
                diff = max((g["weights"][n] - w).abs().max().item() for n, w in want["weights"].items())
                assert diff <= 1e-5, f"{kind} k={k} rank {r}: updated weights differ by {diff:.2e}"


if __name__ == "__main__":
    worker(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
