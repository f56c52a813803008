"""trainer.strategy=fsdp with the robust fine-tuning settings, on 2 gloo processes: each equals ddp.

Each rank runs this file as a script and builds the real Trainer once with ``trainer.strategy=ddp`` (itself
checked against one process in test_train_dist.py) and once with ``trainer.strategy=fsdp`` for each case,
then takes two GradCache steps (``accum_steps=2``, fp32) on the same local batches, as the training loop does
(``_apply_unlock`` before each step). The test compares, step by step, the loss (mean over ranks), the grad
norm, the updated weights gathered from the shards and the set of frozen parameters, within 1e-5:

- ``lora``: rank-4 adapters on both towers (the rest of each tower frozen inside the same FSDP2 units);
- ``layer-decay``: layer-wise lr decay on both towers (parameter groups by name, over sharded parameters);
- ``unlock``: the image tower locked for step 0 and trained from step 1 (``model.lock_image_steps=1``);
- ``ema``: an EMA with decay 0.5, whose average (gathered) must equal ddp's. Then its checkpoint, written as
  shards (``trainer.fsdp_checkpoint=sharded``, the EMA included), resumes in a new fsdp trainer that reads
  each rank's shards in place (reading the checkpoint whole fails the test), with the same weights and
  average, and its next step equals the live trainer's bit for bit (optimizer state restored); and both strategies' in-loop evaluations of the EMA weights (``optim.ema.eval``)
  agree, and differ from the trained weights' (the average really is what gets gathered and scored).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import gathered, max_diff, run_ranks, strategy_trainer

WORLD, B, K, STEPS = 2, 6, 2, 2
BASE = ["model=tiny", "loss=seven_field", "eval=none"]
EVAL = ["eval=synthetic", "eval.gallery.enabled=false", "trainer.eval_every=1", "optim.ema.eval=true"]
CASES = {
    "lora": ["model.lora.image.rank=4", "model.lora.text.rank=4"],
    "layer-decay": ["optim.layer_decay_image=0.7", "optim.layer_decay_text=0.8"],
    "unlock": ["model.lock_image=true", "model.lock_image_steps=1"],
    "ema": ["optim.ema.decay=0.5", "trainer.fsdp_checkpoint=sharded"],
}


def _trainer(strategy: str, case: str, run_dir: Path, cache: str, *extra: str):
    over = [o for o in CASES[case] if strategy == "fsdp" or not o.startswith("trainer.fsdp")]
    return strategy_trainer(strategy, [f"data.synthetic.cache_dir={cache}", *BASE, *over, f"data.batch_size={B}",
                                       f"trainer.accum_steps={K}", *extra], run_dir)


def _weights(t) -> dict[str, torch.Tensor]:
    return gathered(t.model.state_dict())


def _ema(t) -> dict[str, torch.Tensor]:
    return gathered(dict(zip(t.ema.names, t.ema.shadow)))


def _steps(t, batches: list[dict]) -> list[dict]:
    """Two steps as the loop takes them; after each, what the test compares."""
    out = []
    for batch in batches:
        t._apply_unlock()
        m = t.train_step(batch)
        t.step += 1
        out.append({"loss": m["loss"].item(), "grad_norm": m["grad_norm"].item(), "weights": _weights(t),
                    "frozen": sorted(n for n, p in t.model.named_parameters() if not p.requires_grad),
                    "ema": _ema(t) if t.ema is not None else None})
    return out


def worker(rank: int, out_dir: Path, cache: str) -> None:
    from gcl.fsdp import is_sharded

    torch.set_num_threads(1)
    results = {}
    for case in CASES:
        ddp = _trainer("ddp", case, out_dir / f"ddp-{case}", cache)
        fsdp = _trainer("fsdp", case, out_dir / f"fsdp-{case}", cache)
        assert fsdp.sharded and any(is_sharded(p) for p in fsdp.model.parameters())
        assert max((a - b).abs().max().item() for a, b in zip(_weights(ddp).values(), _weights(fsdp).values())) == 0
        it = iter(ddp.stream)
        batches = [next(it) for _ in range(STEPS + 1)]  # this rank's batches
        results[case] = {"ddp": _steps(ddp, batches[:STEPS]), "fsdp": _steps(fsdp, batches[:STEPS])}
        if case == "ema":
            for name, t in (("ddp", ddp), ("fsdp", fsdp)):  # same weights, same average: same metrics
                ev = _trainer(name, case, out_dir / f"{name}-ema-eval", cache, *EVAL)
                ev.model.load_state_dict(t.model.state_dict())
                ev.ema.load_state_dict(t.ema.state_dict())
                results[f"ema/eval/{name}"] = ev.evaluate()
            fsdp.save()  # sharded: every rank writes its shards of the weights, optimizer state and EMA
            import gcl.checkpoint

            def whole(*a, **k):
                raise AssertionError("an fsdp resume must read its shards in place, not the whole checkpoint")

            read_whole, gcl.checkpoint._read_sharded = gcl.checkpoint._read_sharded, whole
            back = _trainer("fsdp", case, out_dir / f"fsdp-{case}", cache, "trainer.resume=auto")
            gcl.checkpoint._read_sharded = read_whole
            results["ema/resumed"] = {"step": back.step, "weights": _weights(back), "ema": _ema(back)}
            # the optimizer state came back too: one more step from the resumed and the live trainer agree
            results["ema/resumed"]["next"] = _steps(back, batches[STEPS:])[0]
            results["ema/live-next"] = _steps(fsdp, batches[STEPS:])[0]
    torch.save(results, out_dir / f"rank{rank}.pt")
    torch.distributed.barrier()


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp_robust_finetune_settings_equal_ddp(tmp_path, catalog_cache):
    run_ranks(__file__, [str(tmp_path), str(catalog_cache)], world=WORLD, timeout=500)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for case in CASES:
        for s in range(STEPS):
            ddp = [res[case]["ddp"][s] for res in ranks]
            fsdp = [res[case]["fsdp"][s] for res in ranks]
            lddp, lfsdp = (sum(g["loss"] for g in x) / WORLD for x in (ddp, fsdp))
            assert abs(lddp - lfsdp) <= 1e-5, (case, s, lddp, lfsdp)
            gddp, gfsdp = ddp[0]["grad_norm"], fsdp[0]["grad_norm"]
            assert abs(gddp - gfsdp) <= 1e-5 * max(1.0, gddp), (case, s, gddp, gfsdp)
            assert fsdp[0]["frozen"] == ddp[0]["frozen"], (case, s)
            for r in range(WORLD):
                diff = max_diff(fsdp[r]["weights"], ddp[0]["weights"])
                assert diff <= 1e-5, f"{case} step {s} rank {r}: weights differ from ddp's by {diff:.2e}"
                if ddp[0]["ema"] is not None:
                    diff = max_diff(fsdp[r]["ema"], ddp[0]["ema"])
                    assert diff <= 1e-5, f"{case} step {s} rank {r}: EMA differs from ddp's by {diff:.2e}"
    first, last = ranks[0]["lora"]["ddp"][0], ranks[0]["lora"]["ddp"][-1]
    assert any(n.endswith("lora_A") for n in first["weights"]), "LoRA adapters should be in the state dict"
    assert any(".resblocks." in n and "lora" not in n for n in first["frozen"]), "LoRA freezes the base weights"
    moved = max((last["weights"][n] - first["weights"][n]).abs().max().item() for n in last["weights"]
                if n.endswith("lora_B"))
    assert moved > 0, "the adapters should train"
    unlock = ranks[0]["unlock"]["ddp"]
    locked = [n for n in unlock[0]["frozen"] if n.startswith("visual.")]
    assert locked and not [n for n in unlock[1]["frozen"] if n.startswith("visual.")], "image tower unlocks at 1"
    moved = max((unlock[1]["weights"][n] - unlock[0]["weights"][n]).abs().max().item() for n in locked)
    assert moved > 0, "the unlocked image tower should train at step 1"
    ema = ranks[0]["ema"]["fsdp"][-1]
    assert max_diff(ema["ema"], ema["weights"]) > 1e-4, "with decay 0.5 the average lags the weights"
    for res in ranks:  # the sharded checkpoint (EMA included) resumes exactly
        back, want = res["ema/resumed"], res["ema"]["fsdp"][-1]
        assert back["step"] == STEPS
        assert max_diff(back["weights"], want["weights"]) == 0.0 and max_diff(back["ema"], want["ema"]) == 0.0
        nxt, live = back["next"], res["ema/live-next"]
        assert nxt["loss"] == live["loss"] and max_diff(nxt["weights"], live["weights"]) == 0.0
        assert max_diff(nxt["ema"], live["ema"]) == 0.0 and max_diff(nxt["weights"], want["weights"]) > 0
    e_ddp, e_fsdp = ranks[0]["ema/eval/ddp"], ranks[0]["ema/eval/fsdp"]
    assert any(k.startswith("ema/") for k in e_ddp) and e_ddp.keys() == e_fsdp.keys()
    diff = max(abs(e_ddp[k] - e_fsdp[k]) for k in e_ddp)
    assert diff <= 1e-6, diff
    assert any(e_fsdp[k] != e_fsdp[f"ema/{k}"] for k in e_fsdp if not k.startswith("ema/")), \
        "the EMA's metrics should differ from the trained weights' (the average must be what is scored)"


if __name__ == "__main__":
    worker(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
