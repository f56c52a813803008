"""The trainer: exact accumulation, exact kill/resume, multi-process parity, multirun, logging contract."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FAST, ROOT, compose

from gcl.checkpoint import find_checkpoint, load_checkpoint
from gcl.launch import INTERRUPTED_EXIT


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run in a new process group and kill the whole group on timeout (torchrun's workers included)."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout}s: {cmd}\n{err[-4000:]}") from None
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _cli(tmp_run: Path, cache: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return _run([sys.executable, "train.py", *FAST, f"data.synthetic.cache_dir={cache}", f"hydra.run.dir={tmp_run}",
                 *overrides], timeout)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _trainer(tmp_path: Path, cache: Path, *overrides: str):
    from gcl.train import Trainer

    cfg = compose("train", [*FAST, f"data.synthetic.cache_dir={cache}", *overrides])
    return Trainer(cfg, tmp_path)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["seven_field", "siglip_seven_field"])
def test_accumulation_equals_one_big_batch(tmp_path, catalog_cache, loss):
    """GradCache accumulation: tower AND logit_scale/bias gradients equal those of the whole batch at once."""
    common = ["data.batch_size=8", "optim.grad_clip=null", f"loss={loss}"]
    big = _trainer(tmp_path / "a", catalog_cache, *common, "trainer.accum_steps=1")
    batch = next(iter(big.stream))
    init = {n: p.detach().clone() for n, p in big.model.named_parameters()}
    big.train_step(batch)
    g1 = _grads(big.model)

    acc = _trainer(tmp_path / "b", catalog_cache, *common, "trainer.accum_steps=4")
    for n, p in acc.model.named_parameters():  # same seed -> same initial weights
        assert torch.equal(p.detach(), init[n]), n
    acc.train_step(batch)
    g4 = _grads(acc.model)

    assert set(g1) == set(g4) and "logit_scale" in g1
    for n in g1:
        torch.testing.assert_close(g4[n], g1[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert g1["logit_scale"].abs() > 0  # the scale really receives a gradient to compare


def test_metrics_jsonl_contract(tmp_path, catalog_cache):
    run = tmp_path / "run"
    _cli(run, catalog_cache, "trainer.max_steps=3", "trainer.save_every=2", "sched=cosine", "sched.warmup_steps=2",
         "optim.lr=5e-4", "trainer.peak_tflops=0.5")
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # row k logs the lr step k trained with: open_clip's schedule at its 0-based step k-1 (2.5e-4, 5e-4, 5e-4)
    from open_clip_train.scheduler import cosine_lr

    adjust = cosine_lr(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 5e-4, 2, 3)
    want = [adjust(s) for s in range(3)]
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-12), want
    for r in rows:
        for k in ("loss", "lr", "logit_scale", "samples_per_s", "world_size", "loss/title_image", "loss/colors_image"):
            assert k in r, k
        assert r["world_size"] == 1 and r["samples_per_s"] > 0
        # FLOPs counted once (first step), then per logged step: flops_per_step * steps/s; mfu against the peak
        assert r["tflops_per_s"] > 0 and r["mfu"] == pytest.approx(r["tflops_per_s"] / 0.5)
    per_sample = [r["tflops_per_s"] / r["samples_per_s"] for r in rows]
    assert max(per_sample) == pytest.approx(min(per_sample), rel=1e-9)
    assert (run / "train.log").exists() and (run / ".hydra" / "config.yaml").exists()
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 3
    state = load_checkpoint(find_checkpoint(run))
    assert state["step"] == 3 and {"model", "optimizer", "scheduler", "per_rank"} <= set(state)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(find_checkpoint(run))["model"]


def _patch_dropout_model(tmp_path: Path) -> list[str]:
    """Overrides for gcl-tiny with patch dropout 0.5 (a model whose forward draws random numbers)."""
    cfg = json.loads((ROOT / "gcl" / "model_configs" / "gcl-tiny.json").read_text())
    cfg["vision_cfg"]["patch_dropout"] = 0.5
    path = tmp_path / "gcl-tiny-pd.json"
    path.write_text(json.dumps(cfg))
    return ["model.name=gcl-tiny-pd", f"model.config_path={path}"]


@pytest.mark.slow
def test_sigkill_resume_equals_uninterrupted(tmp_path, catalog_cache):
    """Kill -9 a run mid-epoch between checkpoints; resume=auto ends with the uninterrupted run's weights and
    EMA, with 2 loader workers and a model that draws random numbers in its forward (patch dropout): the
    DataLoader must not draw from the restored global generator (issue 12.3). The image tower is locked until
    step 5, so the resume from step 3 crosses the unlock (with layer-wise decay on it); LoRA, and resumes right
    before / at / after the switch: tests/test_robust_train.py."""
    args = ["trainer.max_steps=9", "trainer.save_every=3", "data.num_workers=2", "data.batch_size=8",
            "sched.warmup_steps=2", *_patch_dropout_model(tmp_path), "optim.ema.decay=0.9",
            "model.lock_image=true", "model.lock_image_steps=5", "optim.layer_decay_image=0.8"]
    ref = tmp_path / "ref"
    _cli(ref, catalog_cache, *args)

    run = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *FAST, f"data.synthetic.cache_dir={catalog_cache}", f"hydra.run.dir={run}",
           *args]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    # wait until step 4 was logged (checkpoint at 3 exists, step 4 is lost): kill in the middle of the epoch
    while time.time() < deadline:
        m = run / "metrics.jsonl"
        if m.exists() and any(json.loads(x)["step"] >= 4 for x in m.read_text().splitlines() if x.strip()):
            break
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] in (3, 6)
    _cli(run, catalog_cache, *args, "trainer.resume=auto")

    a, b = _final_weights(ref), _final_weights(run)
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff == 0.0, diff  # bit-exact, like the EMA below
    ea, eb = (load_checkpoint(find_checkpoint(r))["ema"]["shadow"] for r in (ref, run))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    # and the run did move: the weights differ from the initial ones
    assert load_checkpoint(find_checkpoint(ref))["step"] == 9
    # the steps logged after the checkpoint and before the kill are not in metrics.jsonl twice
    assert [r["step"] for r in _metrics(run)] == [r["step"] for r in _metrics(ref)] == list(range(1, 10))


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_the_interrupted_code(tmp_path, catalog_cache):
    """SIGTERM: checkpoint saved, then exit 75 (INTERRUPTED_EXIT), so a scheduler or sweep does not count the
    run as finished; a finished run exits 0 (every other CLI test here)."""
    run = tmp_path / "term"
    cmd = [sys.executable, "train.py", *FAST, f"data.synthetic.cache_dir={catalog_cache}", f"hydra.run.dir={run}",
           "trainer.max_steps=100000"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                          and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == INTERRUPTED_EXIT == 75, err[-3000:]
    step = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    assert step >= 2
    assert "exit code 75" in (run / "train.log").read_text()


@pytest.mark.slow
def test_multirun_two_jobs(tmp_path, catalog_cache):
    _run([sys.executable, "train.py", "-m", *FAST, f"data.synthetic.cache_dir={catalog_cache}",
          f"hydra.sweep.dir={tmp_path}", "trainer.max_steps=2", "loss=clip_title,seven_field"])
    runs = sorted(p.parent for p in tmp_path.glob("*/metrics.jsonl"))
    assert len(runs) == 2
    terms = [set(k for k in _metrics(d)[-1] if k.startswith("loss/")) for d in runs]
    assert {"loss/title_image"} in terms and any(len(t) == 7 for t in terms)


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, catalog_cache):
    """torchrun --nproc_per_node=2 (gloo, CPU): world size 2 logged, and steps 1 and 2 equal one process on the
    same global batches (loss and updated weights). The data is two shards of 8, one global batch per epoch: an
    exact epoch gives rank 0 the first shard of the epoch's order and rank 1 the second, the one process both
    in turn. The image tower is locked for step 1 and trains in step 2: DDP, built when it was locked, must be
    rebuilt for its gradients to be averaged (without that the ranks' image towers drift apart)."""
    from gcl.data.synthetic import generate_catalog

    meta = generate_catalog(tmp_path / "cat", products=120, seed=3, image_size=32, per_shard=8)
    pattern = str(Path(meta["splits"]["train"]["pattern"]).parent / "shard-{000000..000001}.tar")
    common = [f"data.train_shards='{pattern}'", "data.shuffle_buffer=0", "data.augment=false",
              "trainer.max_steps=2", "eval=none", "loss=seven_field", "model.lock_image=true",
              "model.lock_image_steps=1"]
    one = tmp_path / "one"
    _cli(one, catalog_cache, *common, "data.batch_size=16")
    two = tmp_path / "two"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
          *FAST, f"data.synthetic.cache_dir={catalog_cache}", f"hydra.run.dir={two}", *common, "data.batch_size=8"])
    (_, row1), (_, row2) = _metrics(one), _metrics(two)
    assert row1["world_size"] == 1 and row2["world_size"] == 2
    assert abs(row1["loss"] - row2["loss"]) <= 1e-5, (row1["loss"], row2["loss"])
    for k in row1:
        if k.startswith("loss/"):
            assert abs(row1[k] - row2[k]) <= 1e-5, k
    a, b = _final_weights(one), _final_weights(two)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, diff


@pytest.mark.slow
def test_training_improves_eval_keeps_best_and_logs_wandb_offline(tmp_path, catalog_cache):
    """A short fixed-seed run scores clearly better than the same model at step 0 on the synthetic suite;
    evals land in eval/ and metrics.jsonl, the best checkpoint is kept, wandb writes real offline files."""
    run = tmp_path / "run"
    metric = "synthetic/avg/text2image/recall@10"
    _cli(run, catalog_cache, "data.synthetic.products=600", "data.synthetic.image_size=64", "data.batch_size=32",
         "trainer.max_steps=30", "trainer.eval_every=15", f"trainer.best_metric={metric}",
         "logger.wandb.mode=offline", "export.enabled=true", "export.which=best", "sched.warmup_steps=5")
    evals = {r["step"]: r for r in _metrics(run) if f"eval/{metric}" in r}
    assert sorted(evals) == [0, 15, 30]
    start, end = evals[0][f"eval/{metric}"], evals[30][f"eval/{metric}"]
    assert end > start + 0.15, (start, end)
    mrr = "eval/synthetic/avg/retrieval/mrr@10"  # every retrieval task, held-out combinations included
    assert evals[30][mrr] > evals[0][mrr], (evals[0][mrr], evals[30][mrr])
    assert {p.name for p in (run / "eval").glob("step_*.json")} == {
        "step_000000.json", "step_000015.json", "step_000030.json"}
    assert json.loads((run / "eval" / "step_000030.json").read_text())[metric] == pytest.approx(end)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["metric"] == metric and best["value"] == max(evals[s][f"eval/{metric}"] for s in (15, 30))
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "wandb offline files missing"
    assert (run / "export" / "open_clip_model.safetensors").exists()
    assert metric.split("/", 1)[1].split("/")[0] in (run / "export" / "README.md").read_text()


def test_nonfinite_loss_skips_the_step_and_stops_after_k(tmp_path, catalog_cache):
    t = _trainer(tmp_path, catalog_cache, "trainer.max_nonfinite=2", "trainer.max_steps=10")
    real = t.loss_fn

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    t.loss_fn = nan_loss
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    batch = next(iter(t.stream))
    out = t.train_step(batch)
    assert out["nonfinite_skipped"].item() == 1.0 and t.nonfinite_total == 1
    for n, p in t.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed on a skipped step"
    t.loss_fn = real
    t.train_step(batch)
    assert t.nonfinite_streak == 0 and t.nonfinite_total == 1
    t.loss_fn = nan_loss
    with pytest.raises(FloatingPointError, match="max_nonfinite"):
        t.fit()


@pytest.mark.slow
def test_optuna_sweep_maximises_the_returned_metric(tmp_path, catalog_cache):
    _run([sys.executable, "train.py", "-m", "hydra/sweeper=optuna_max", "hydra.sweeper.n_trials=2", *FAST,
          f"data.synthetic.cache_dir={catalog_cache}", f"hydra.sweep.dir={tmp_path}", "trainer.max_steps=2",
          "trainer.eval_every=2", "trainer.best_metric=synthetic/avg/text2image/recall@10",
          "eval.gallery.enabled=false"])
    import yaml

    res = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(res["best_params"]) == {"optim.lr", "optim.weight_decay"}
    returned = [json.loads((d / "checkpoints" / "best.json").read_text())["value"]
                for d in sorted(tmp_path.iterdir()) if (d / "checkpoints" / "best.json").exists()]
    assert len(returned) == 2 and res["best_value"] == pytest.approx(max(returned))


@pytest.mark.dist
@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path, catalog_cache):
    """`accelerate launch` runs the same recipe (its --multi_gpu launcher is torchrun; on CPU we fall back to
    gloo). accelerate's own --cpu multi-process mode needs MPI, so it is not used here."""
    run = tmp_path / "acc"
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", *FAST,
          f"data.synthetic.cache_dir={catalog_cache}", f"hydra.run.dir={run}", "eval=none", "trainer.max_steps=2"])
    rows = _metrics(run)
    assert [r["world_size"] for r in rows] == [2, 2]
    assert load_checkpoint(find_checkpoint(run))["world_size"] == 2


def _shards_without(tmp_path: Path, absent: tuple[str, ...], n: int = 12) -> Path:
    """n products with every seven-field field except ``absent`` (a catalog that lacks some of them)."""
    import io

    import numpy as np
    from PIL import Image

    from gcl.data.shards import ShardWriter

    out = tmp_path / "shards"
    rng = np.random.default_rng(0)
    with ShardWriter(out, per_shard=6) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
            fields = {"title": f"shirt {i}", "description": f"a cotton shirt number {i}", "colors": ["red"],
                      "materials": ["cotton"], "categories": ["tops"], "details": "collar", "keywords": ["shirt"]}
            w.write(f"p{i:03d}", buf.getvalue(), "png", {k: v for k, v in fields.items() if k not in absent})
    return out


def test_a_loss_field_absent_from_the_data_stops_the_run_at_start(tmp_path, catalog_cache):
    """The seven-field loss on a catalog without materials/details (and a typo) stops before the first step,
    naming the fields, the fields found and the opt-in; the opt-in lets it build."""
    from gcl.config import ConfigError

    data = f"data.train_shards={_shards_without(tmp_path, ('materials', 'details'))}"
    with pytest.raises(ConfigError) as err:
        _trainer(tmp_path / "a", catalog_cache, data)
    msg = str(err.value)
    assert "'materials' (read by materials_image)" in msg and "'details' (read by details_image)" in msg
    assert "fields found: categories, colors, description, keywords, title" in msg
    assert "loss.allow_absent_fields=[materials,details]" in msg
    with pytest.raises(ConfigError, match="'titel' .*fields found"):
        _trainer(tmp_path / "b", catalog_cache, "loss=clip_title", data, "loss.terms.0.left.fields=[titel]")
    t = _trainer(tmp_path / "c", catalog_cache, data, "loss.allow_absent_fields=[materials,details]")
    assert t.step == 0


def test_a_term_without_rows_in_a_logging_window_is_reported(tmp_path, catalog_cache, caplog, monkeypatch):
    from gcl.log import RunLogger

    shown = []
    monkeypatch.setattr(RunLogger, "progress", lambda self, step, **kw: shown.append((step, kw)))
    data = f"data.train_shards={_shards_without(tmp_path, ('materials',))}"
    t = _trainer(tmp_path / "run", catalog_cache, data, "loss.allow_absent_fields=true", "trainer.max_steps=3",
                 "trainer.log_every=2", "data.batch_size=4")
    with caplog.at_level(logging.WARNING, logger="gcl.train"):
        t.fit()
    warned = [r.getMessage() for r in caplog.records if "no valid rows" in r.getMessage()]
    # logged rows: step 1 (alone), steps 2-2 (log_every), step 3 (the last): one report per window
    assert warned == [f"loss term(s) materials_image had no valid rows in step {s}: no sample of those batches "
                      "holds their fields (or rank score), so they trained nothing (rows/<term> in metrics.jsonl)"
                      for s in (1, 2, 3)]
    assert [kw.get("empty") for _, kw in shown if "loss" in kw] == ["materials_image"] * 3
