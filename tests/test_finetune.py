"""WiSE-FT and model soups on real tiny runs: ``python -m gcl.wise`` / ``python -m gcl.soup`` and
``export.wise.alpha`` at the end of training.

References: the interpolation and the averages written here from the papers' formulas over the base file
(read with safetensors) and the checkpoints (read with torch.load); open_clip loading the exports alone; the
selection rule and greedy-soup Algorithm 1 (Wortsman et al. 2022) re-applied here to the recorded scores.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
from helpers import FAST, ROOT, compose
from safetensors.torch import load_file, save_file

from gcl.checkpoint import find_checkpoint, load_checkpoint
from gcl.config import validate
from gcl.finetune import soup, wise
from gcl.finetune.runs import FinetuneError
from gcl.model import build_model

RETENTION = "synthetic/zeroshot_subcategory/accuracy"  # a stand-in retention metric on the tiny catalog
DOMAIN = "synthetic/avg/retrieval/mrr@10"


def _base_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    sd = build_model("gcl-tiny").model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _train(run: Path, cache: Path, *overrides: str) -> Path:
    from gcl.train import Trainer

    cfg = compose("train", [*FAST, f"data.synthetic.cache_dir={cache}", "loss=clip_title", "sched=constant",
                            *overrides])
    validate(cfg)
    Trainer(cfg, run).fit()
    return run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, catalog_cache):
    """Two trials of one base (a 2-job multirun dir with a third, failed job), a run of another base and a
    run from random weights. Trial 0 exports its WiSE-FT interpolation at alpha 0.5 when training ends; trial 1
    keeps an EMA, scores it in-loop and exports it."""
    root = tmp_path_factory.mktemp("sweep")
    a, b = _base_file(root / "base_a.safetensors", 11), _base_file(root / "base_b.safetensors", 12)
    multirun = root / "multirun"
    _train(multirun / "0", catalog_cache, f"model.pretrained={a}", "optim.lr=1e-3", "trainer.max_steps=3",
           "export.enabled=true", "export.wise.alpha=0.5", f"export.dir={root / 'wise_export'}")
    _train(multirun / "1", catalog_cache, f"model.pretrained={a}", "optim.lr=2e-4", "trainer.max_steps=3",
           "optim.ema.decay=0.5", "optim.ema.eval=true", "trainer.eval_every=3", "export.enabled=true",
           "export.ema=true", f"export.dir={root / 'ema_export'}")
    (multirun / "2" / ".hydra").mkdir(parents=True)  # a job that failed before its first checkpoint
    other = _train(root / "other", catalog_cache, f"model.pretrained={b}", "trainer.max_steps=1")
    scratch = _train(root / "scratch", catalog_cache, "trainer.max_steps=1")
    return SimpleNamespace(root=root, base=a, multirun=multirun, trials=[multirun / "0", multirun / "1"],
                           other=other, scratch=scratch)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(find_checkpoint(run))["model"]


def _loaded(folder: Path) -> dict[str, torch.Tensor]:
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.state_dict()


def _assert_export(folder: Path, want: dict[str, torch.Tensor]) -> None:
    got = _loaded(folder)
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v.to(got[k].dtype), rtol=0, atol=1e-6, msg=k)


def _lerp(base: dict, ft: dict, ai: float, at: float) -> dict:
    out = {}
    for k, f in ft.items():
        a = ai if k.startswith("visual.") else at if k not in ("logit_scale", "logit_bias") else (ai + at) / 2
        out[k] = (1 - a) * base[k].double() + a * f.double()
    return out


def test_export_wise_alpha_at_the_end_of_training(sweep):
    report = json.loads((sweep.trials[0] / "wise" / "wise.json").read_text())
    assert [p["alpha_image"] for p in report["points"]] == [0.0, 0.5, 1.0]
    assert report["chosen"]["alpha_image"] == 0.5 and "export.wise.alpha" in report["rule"]
    want = _lerp(load_file(str(sweep.base)), _weights(sweep.trials[0]), 0.5, 0.5)
    _assert_export(sweep.root / "wise_export", want)
    card = (sweep.root / "wise_export" / "README.md").read_text()
    assert "WiSE-FT interpolation alpha=0.5" in card


def test_ema_scored_in_loop_and_exported(sweep):
    rows = [json.loads(x) for x in (sweep.trials[1] / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if f"eval/{DOMAIN}" in r}
    assert sorted(evals) == [0, 3]
    # step 0: the average is the weights themselves; step 3: the scores of other weights
    assert evals[0][f"eval/ema/{DOMAIN}"] == evals[0][f"eval/{DOMAIN}"]
    ema_keys = [k for k in evals[3] if k.startswith("eval/ema/")]
    assert len(ema_keys) == len([k for k in evals[3] if k.startswith("eval/synthetic/")]) > 10
    state = load_checkpoint(find_checkpoint(sweep.trials[1]))
    shadow = state["ema"]["shadow"]
    assert state["ema"]["num_updates"] == 3
    # the trained weights came back after the EMA evaluation (the checkpoint is written after it)
    assert any(not torch.equal(state["model"][k], shadow[k]) for k in shadow)
    _assert_export(sweep.root / "ema_export", {**state["model"], **shadow})
    assert "exponential moving average" in (sweep.root / "ema_export" / "README.md").read_text()


def _rule_choice(points: list[dict], drop: float) -> dict:
    """The rule, from its statement: among points whose retention >= (1 - drop) x the base's (alpha 0), the best
    domain metric; ties: the better retention, then the point nearer the base."""
    base = next(p for p in points if p["alpha_image"] == p["alpha_text"] == 0)
    ok = [p for p in points if p["retention"] >= (1 - drop) * base["retention"]]
    return max(ok, key=lambda p: (p["domain"], p["retention"], -p["alpha_image"] - p["alpha_text"]))


def test_wise_cli_scores_the_curve_chooses_by_the_rule_and_exports_it(sweep, tmp_path, capsys):
    out = tmp_path / "wise"
    rc = wise.main([str(sweep.trials[1]), "--alphas", "0:1:0.5", "--retention-metric", RETENTION,
                    "--max-retention-drop", "0.05", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "wise.json").read_text())
    pts = report["points"]
    assert [p["alpha_image"] for p in pts] == [0.0, 0.5, 1.0] and report["domain_metric"] == DOMAIN
    for p in pts:
        assert p["domain"] == p["metrics"][DOMAIN] and p["retention"] == p["metrics"][RETENTION]
    want = _rule_choice(pts, 0.05)
    assert (report["chosen"]["alpha_image"], report["chosen"]["domain"]) == (want["alpha_image"], want["domain"])
    assert (out / "wise.png").stat().st_size > 5000
    a = want["alpha_image"]
    _assert_export(out / "export", _lerp(load_file(str(sweep.base)), _weights(sweep.trials[1]), a, a))
    assert f"chosen: alpha={a:g}" in capsys.readouterr().out


def test_wise_per_tower_grid(sweep, tmp_path):
    out = tmp_path / "wise"
    assert wise.main([str(sweep.trials[0]), "--per-tower", "--alphas", "0,1", "--out", str(out)]) == 0
    report = json.loads((out / "wise.json").read_text())
    grid = {(p["alpha_image"], p["alpha_text"]) for p in report["points"]}
    assert grid == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}
    best = max(report["points"], key=lambda p: p["domain"])  # no retention metric: the best domain score
    assert report["chosen"]["domain"] == best["domain"]
    ch = report["chosen"]
    want = _lerp(load_file(str(sweep.base)), _weights(sweep.trials[0]), ch["alpha_image"], ch["alpha_text"])
    _assert_export(out / "export", want)
    # the interpolation itself, off the grid: image and text towers each at their own alpha
    base, ft = load_file(str(sweep.base)), _weights(sweep.trials[0])
    got = wise.interpolate(base, ft, 0.25, 0.75)
    for k, v in _lerp(base, ft, 0.25, 0.75).items():
        torch.testing.assert_close(got[k].double(), v, rtol=0, atol=1e-6)  # fp32 resolution


def test_wise_refuses_runs_without_a_base(sweep, caplog):
    # the command users run: a clear message and exit status 1, no traceback
    r = subprocess.run([sys.executable, "-m", "gcl.wise", str(sweep.scratch)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "started from random weights" in r.stderr and str(sweep.scratch) in r.stderr
    caplog.set_level(logging.ERROR)
    assert wise.main([str(sweep.root / "missing")]) == 1
    assert "is not a run directory" in caplog.text


def _greedy(trials: list[dict], decisions: list[dict]) -> list[int]:
    """Algorithm 1 of the paper re-applied to the recorded scores: keep a trial when the soup with it scores
    >= the soup without it; the best trial starts the soup."""
    order = sorted(range(len(trials)), key=lambda i: -trials[i]["domain"])
    assert [d["trial"] for d in decisions] == order
    kept, best = [order[0]], trials[order[0]]["domain"]
    for d in decisions[1:]:
        if d["domain"] >= best:
            kept, best = kept + [d["trial"]], d["domain"]
    return kept


def test_soup_uniform_and_greedy(sweep, tmp_path, caplog, capsys):
    caplog.set_level(logging.WARNING)
    out = tmp_path / "soup"
    assert soup.main([str(sweep.multirun), "--out", str(out)]) == 0
    assert f"left out {sweep.multirun / '2'}" in caplog.text  # the failed job is named, not silently dropped
    report = json.loads((out / "soup.json").read_text())
    assert len(report["trials"]) == 2 and report["metric"] == DOMAIN
    kept = _greedy(report["trials"], report["greedy"]["decisions"])
    assert report["greedy"]["ingredients"] == kept
    w = [_weights(t) for t in sweep.trials]
    _assert_export(out / "uniform", {k: (w[0][k].double() + w[1][k].double()) / 2 for k in w[0]})
    _assert_export(out / "greedy", {k: sum(w[i][k].double() for i in kept) / len(kept) for k in w[0]})
    text = capsys.readouterr().out
    assert "uniform soup (2 trials)" in text and "greedy soup" in text


def test_soup_refuses_trials_of_different_bases(sweep, caplog):
    caplog.set_level(logging.ERROR)
    assert soup.main([*map(str, sweep.trials), str(sweep.other), "--no-export"]) == 1
    assert str(sweep.other) in caplog.text and "base_b.safetensors" in caplog.text
    assert str(sweep.trials[1]) not in caplog.text.split("differ from")[1]  # only the odd one is named
    assert soup.main([str(sweep.trials[0])]) == 1
    assert "at least 2 trials" in caplog.text


def test_batchnorm_counters_merge_and_other_integers_must_agree():
    """A ResNet tower (the shipped base's) carries BatchNorm's integer num_batches_tracked, which any fine-tune
    changes: WiSE-FT and soups take the largest count and interpolate the float buffers; any other integer
    tensor that differs is refused by name."""
    bn = torch.nn.BatchNorm2d(3)
    base = {f"visual.bn1.{k}": v.clone() for k, v in bn.state_dict().items()}
    bn.train()
    for _ in range(5):
        bn(torch.randn(4, 3, 2, 2))
    ft = {f"visual.bn1.{k}": v.clone() for k, v in bn.state_dict().items()}
    mixed = wise.interpolate(base, ft, 0.25)
    assert mixed["visual.bn1.num_batches_tracked"].item() == 5
    want = 0.75 * base["visual.bn1.running_mean"].double() + 0.25 * ft["visual.bn1.running_mean"].double()
    torch.testing.assert_close(mixed["visual.bn1.running_mean"], want.float())
    assert soup.average([base, ft])["visual.bn1.num_batches_tracked"].item() == 5
    other = {**ft, "positional_ids": torch.tensor([1, 2])}
    with pytest.raises(FinetuneError, match="positional_ids"):
        wise.interpolate({**base, "positional_ids": torch.tensor([1, 3])}, other, 0.5)
