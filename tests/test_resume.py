"""Resume never ignores a change: each class of config change (applied, from step N, refused), damaged
checkpoints, a second Ctrl-C during the stop-save, one metrics row per step, the config history.

One tiny run is trained once per module (checkpoints at steps 2 and 4); each test resumes a copy of it.
References: the learning-rate schedule written here from its formula, a reference run whose lr the test sets
itself every step, the unchanged run's weights, files on disk.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import FAST, compose, interrupt_writes

from gcl.checkpoint import load_checkpoint, load_newest_intact
from gcl.resume import (
    APPLIED,
    FROM_STEP,
    REFUSED,
    WORLD_SIZE,
    Change,
    ResumeRefused,
    check,
    classify,
    diff,
    elastic_seed,
    per_process_batch,
)

TRAINED = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=3"]


def _trainer(run: Path, cache: Path, *overrides: str):
    from gcl.train import Trainer

    return Trainer(compose("train", [*FAST, f"data.synthetic.cache_dir={cache}", *TRAINED, *overrides]), run)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, catalog_cache) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    _trainer(run, catalog_cache, "logger.wandb.mode=offline").fit()
    return run


def _copy(trained: Path, dst: Path, killed_after_step_4: bool = False) -> Path:
    """A copy of the trained run; ``killed_after_step_4``: as if SIGKILLed after logging step 4 but before
    saving it (newest checkpoint step 2, metrics rows for steps 1..4)."""
    shutil.copytree(trained, dst)
    if killed_after_step_4:
        ck = dst / "checkpoints"
        for p in ck.glob("step_000000004.pt*"):
            p.unlink()
        (ck / "latest.json").write_text(json.dumps({"file": "step_000000002.pt", "step": 2}))
    return dst


def _weights(t) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def _cosine(step: int, total: int = 4) -> float:
    """The cosine schedule without warmup and with min_lr_ratio 0, from its formula."""
    return 0.5 * (1 + math.cos(math.pi * step / total))


# ------------------------------------------------------------------------------------------ the classes

BASE = [*FAST, "data.synthetic.cache_dir=/cache"]


# One override per case, all in one launch: each key changed must land in the class named here.
CASES = {
    "trainer.eval_every=5": APPLIED, "logger.wandb.mode=offline": APPLIED, "export.enabled=true": APPLIED,
    "eval.batch_size=16": APPLIED, "model.grad_checkpointing=true": APPLIED,
    "data.num_workers=2": APPLIED,  # another worker count: the data position is re-partitioned exactly
    "optim.lr=1e-6": FROM_STEP, "optim.lr_text=1e-5": FROM_STEP, "optim.weight_decay=0.01": FROM_STEP,
    "sched.name=constant": FROM_STEP, "trainer.max_steps=50": FROM_STEP,
    "data.batch_size=16": REFUSED, "trainer.seed=3": REFUSED, "data.synthetic.products=200": REFUSED,
    "model.name=gcl-tiny-siglip": REFUSED, "loss.terms.0.weight=2.0": REFUSED, "loss.kind=siglip": REFUSED,
    # robust fine-tuning: the EMA's settings from step N (its average so far is kept), in-loop EMA eval applied;
    # LoRA and turning layer-wise decay or an unlock schedule on change the parameters or optimizer groups
    "optim.ema.decay=0.99": FROM_STEP, "optim.ema.warmup_steps=10": FROM_STEP, "optim.ema.eval=true": APPLIED,
    "optim.weight_decay_image=0.0": FROM_STEP, "export.wise.alpha=auto": APPLIED,
    "model.lora.text.rank=4": REFUSED, "optim.layer_decay_image=0.8": REFUSED, "model.lock_text_steps=3": REFUSED,
}


def test_each_change_falls_in_its_class():
    from omegaconf import OmegaConf

    saved, now = (OmegaConf.to_container(compose("train", o), resolve=True) for o in (BASE, [*BASE, *CASES]))
    got = {c.key: c.kind for c in diff(saved, now, 1, 1)}
    want = {o.split("=")[0].replace(".0.", "[0]."): kind for o, kind in CASES.items()}
    assert got == want
    assert classify(WORLD_SIZE, 2, 3) == APPLIED  # elastic resume (gcl.data.elastic)
    assert classify("some_new_group.key", 1, 2) == REFUSED  # unknown keys are refused, never ignored
    # a schedule moved, not turned on or off: the same parameters and groups, new values from the resumed step
    assert classify("model.lock_image_steps", 2, 5) == classify("optim.layer_decay_text", 0.8, 0.6) == FROM_STEP
    assert classify("model.lock_image_steps", 2, None) == classify("optim.layer_decay_text", 0.8, None) == REFUSED


def test_refusal_names_every_key_and_the_ways_out(caplog):
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(compose("train", BASE), resolve=True)
    now = OmegaConf.to_container(compose("train", [*BASE, "data.batch_size=16", "optim.lr=1e-6"]), resolve=True)
    changes = diff(saved, now, 2, 2)
    assert {c.key: c.kind for c in changes} == {"data.batch_size": REFUSED, "optim.lr": FROM_STEP}
    with pytest.raises(ResumeRefused) as e:
        check(changes, policy="refuse", checkpoint=Path("/r/checkpoints/step_000000002.pt"), step=2)
    msg = str(e.value)
    for part in ("data.batch_size 8 -> 16", "trainer.resume_changes=allow",
                 "model.pretrained=/r/checkpoints/step_000000002.pt"):
        assert part in msg, part
    assert "optim.lr" not in msg  # it is not refused: it takes effect
    with caplog.at_level("INFO"):
        check(changes, policy="allow", checkpoint=Path("/r/c.pt"), step=2)
    assert "optim.lr 0.0005 -> 1e-06 from step 2" in caplog.text and "data.batch_size 8 -> 16" in caplog.text


# -------------------------------------------------------------------------------------- elastic batch

def _batch(changes=(), **kw):
    args = dict(saved_batch=8, saved_world=2, saved_global=None, batch=8, world=1, mode="keep_global", accum_steps=1)
    args.update(kw)
    return per_process_batch(list(changes), **args)


def test_elastic_batch_keeps_the_global_batch():
    assert _batch()[0] == 16 and "data.batch_size 8 -> 16 per process: the global batch 16 stays" in _batch()[2]
    assert _batch(world=4)[0] == 4
    assert _batch(world=2) == (8, [], None)  # the same layout: nothing moves
    # after 2 -> 1 (global 16 kept, data.batch_size=8 still on the command line), back on 2 processes
    assert _batch(saved_world=1, saved_global=16, world=2)[0] == 8
    # an explicit per-process batch that keeps the global batch is applied, another one stays refused
    change = Change("data.batch_size", 8, 16, REFUSED)
    per, changes, _ = _batch([change], batch=16)
    assert per == 16 and [c.kind for c in changes] == [APPLIED]
    assert _batch([change], batch=16, world=2)[1] == [change]


def test_elastic_batch_that_does_not_divide_is_refused_naming_the_numbers():
    with pytest.raises(ResumeRefused) as e:
        _batch(world=3)
    msg = str(e.value)
    for part in ("global batch 16 (2 processes x 8 per process)", "does not divide over 3 processes",
                 "16 / 3 = 5.333", "(1, 2, 4, 8, 16)", "trainer.elastic_batch=per_process", "8 x 3 = 24"):
        assert part in msg, part
    with pytest.raises(ResumeRefused, match="gives 8 per process, which trainer.accum_steps=3 does not divide"):
        _batch(world=2, saved_world=1, saved_global=16, batch=16, saved_batch=16, accum_steps=3)
    # the override accepts the new global batch: data.batch_size per process, a change from step N
    per, changes, line = _batch([Change("data.batch_size", 8, 5, REFUSED)], world=3, batch=5, mode="per_process")
    assert per == 5 and [(c.key, c.kind) for c in changes] == [("data.batch_size", FROM_STEP)]
    assert line.startswith("global batch 16 -> 15")


def test_elastic_seed_is_fixed_and_distinct_per_rank():
    seeds = {elastic_seed(0, 4, r, 3) for r in range(3)} | {elastic_seed(0, 4, 0, 2), elastic_seed(0, 6, 0, 3)}
    assert len(seeds) == 5 and elastic_seed(0, 4, 1, 3) == elastic_seed(0, 4, 1, 3)


# -------------------------------------------------------------------------------------- through Trainer

def test_changed_lr_takes_effect_from_step_n(trained, tmp_path, catalog_cache, caplog):
    """optim.lr / weight_decay given on resume win over the optimizer/scheduler state: the lr after resume is
    the new base lr on the schedule, and the weights equal a run whose lr the test sets itself each step."""
    run = _copy(trained, tmp_path / "changed", killed_after_step_4=True)
    with caplog.at_level("INFO"):
        t = _trainer(run, catalog_cache, "trainer.resume=auto", "optim.lr=1e-6", "optim.weight_decay=0.05",
                     "logger.wandb.mode=offline")
    assert t.step == 2 and "optim.lr 0.0005 -> 1e-06 from step 2" in caplog.text
    for g in t.optimizer.param_groups:
        assert g["lr"] == pytest.approx(1e-6 * _cosine(2), rel=1e-12), g["name"]
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.05), g["name"]
    t.fit()
    changed = _weights(t)

    ref = _trainer(_copy(trained, tmp_path / "ref", killed_after_step_4=True), catalog_cache, "trainer.resume=auto")
    groups = ref.optimizer.param_groups

    def set_lr(step: int) -> None:
        for g in groups:
            g["lr"] = 1e-6 * _cosine(step)
            g["weight_decay"] = 0.0 if g["name"].endswith("_no_decay") else 0.05

    set_lr(2)
    ref.scheduler.step = lambda: set_lr(ref.step + 1)  # called inside step ref.step, for the next one
    ref.save = lambda: None  # (its scheduler now holds a lambda, which a checkpoint cannot store)
    ref.fit()
    unchanged = load_checkpoint(trained / "checkpoints" / "step_000000004.pt")["model"]
    for k, v in changed.items():
        torch.testing.assert_close(v, ref.model.state_dict()[k], rtol=0, atol=0, msg=k)
    assert max((changed[k] - unchanged[k]).abs().max().item() for k in changed) > 1e-5

    # one metrics row per step although steps 3 and 4 ran twice, one wandb run across both launches; both
    # configs kept
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    launches = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(launches) == 2 and len({n.rsplit("-", 1)[1] for n in launches}) == 1, launches
    hist = run / ".hydra"
    assert "lr: 0.0005" in (hist / "config.step_000000000.yaml").read_text()
    assert "lr: 1.0e-06" in (hist / "config.step_000000002.yaml").read_text()


def test_refused_change_stops_and_keeps_the_runs_config_allow_continues(trained, tmp_path, catalog_cache, caplog):
    run = _copy(trained, tmp_path / "run")
    (run / ".hydra" / "config.yaml").write_text("what Hydra wrote for the refused launch\n")
    with pytest.raises(ResumeRefused) as e:
        _trainer(run, catalog_cache, "trainer.resume=auto", "data.batch_size=4")
    assert "data.batch_size 8 -> 4" in str(e.value) and "trainer.resume_changes=allow" in str(e.value)
    assert (run / ".hydra" / "config.yaml").read_text() == (run / ".hydra" / "config.step_000000000.yaml").read_text()
    with caplog.at_level("WARNING"):
        t = _trainer(run, catalog_cache, "trainer.resume=auto", "data.batch_size=4", "trainer.resume_changes=allow")
    assert t.step == 4 and "data.batch_size 8 -> 4" in caplog.text and "epoch" in caplog.text


def test_fresh_start_in_a_run_dir_with_checkpoints_is_refused(trained, tmp_path, catalog_cache):
    run = _copy(trained, tmp_path / "run")
    with pytest.raises(ResumeRefused, match="trainer.resume=auto"):
        _trainer(run, catalog_cache)


def test_resume_auto_skips_a_truncated_newest_checkpoint(trained, tmp_path, catalog_cache, caplog):
    run = _copy(trained, tmp_path / "run")
    newest = run / "checkpoints" / "step_000000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        t = _trainer(run, catalog_cache, "trainer.resume=auto")
    assert t.step == 2 and str(newest) in caplog.text and "truncated" in caplog.text


def test_second_ctrl_c_during_the_stop_save_keeps_the_steps(trained, tmp_path, catalog_cache, monkeypatch):
    """Ctrl-C during step 5, Ctrl-C again while its checkpoint is written: the save completes, then the run
    stops (interrupted), and resume would start at step 5."""
    run = _copy(trained, tmp_path / "run")
    t = _trainer(run, catalog_cache, "trainer.resume=auto", "trainer.max_steps=8")
    real = t.train_step

    def step_then_ctrl_c(batch):
        out = real(batch)
        os.kill(os.getpid(), signal.SIGINT)
        return out

    t.train_step = step_then_ctrl_c
    interrupt_writes(monkeypatch, after_bytes=1_000_000, times=1)
    t.fit()
    assert t.interrupted == "SIGINT" and t.step == 5
    path, state = load_newest_intact(run)  # verified against its manifest
    assert state["step"] == 5 and path.name == "step_000000005.pt"
    assert not list((run / "checkpoints").glob(".*tmp*"))
