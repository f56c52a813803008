"""The benchmark scripts run end to end in their small modes, so they are known to work before a GPU or a
long run is at hand."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from helpers import ROOT


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_benchmark_dry_run(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    payload = _load("gpu_vit_b16").main(["--dry-run", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["dry_run"] is True and len(saved["results"]) == 2
    for r in payload["results"]:
        for arm in ("openclip_single", "gcl_single", "gcl_seven", "gcl_seven_buckets", "gcl_seven_naive"):
            assert r[arm]["samples_per_s"] > 0 and r[arm]["flops_per_step"] > 0
        # seven text fields cost more FLOPs than one; seven full-context passes without dedup cost the most
        # (strictly more for the causal tower, which gcl runs at real length)
        flops = {arm: r[arm]["flops_per_step"] for arm in ("gcl_single", "gcl_seven", "gcl_seven_naive")}
        assert flops["gcl_seven_naive"] >= flops["gcl_seven"] > flops["gcl_single"]
        if r["kind"] == "clip":
            assert flops["gcl_seven_naive"] > 1.5 * flops["gcl_seven"]
            # prefix packing computes shared prefixes once: fewer FLOPs than length buckets
            assert r["text_packing"] == "prefix"
            assert r["gcl_seven_buckets"]["flops_per_step"] > flops["gcl_seven"]
    # every speed-setting arm ran against the defaults (compile arms: test_knob_benchmark_dry_run)
    knobs = payload["knobs"]
    for arm in ("attention_math", "attention_efficient", "attention_cudnn", "channels_last", "patch_dropout_50"):
        assert knobs[arm]["ratio"] > 0 and knobs[arm]["flops_per_step"] > 0
    out = capsys.readouterr().out
    assert "seven_vs_single=" in out and "knobs (gcl-tiny" in out


def test_knob_benchmark_dry_run(tmp_path, capsys):
    """bench_knobs.py end to end (tiny model, dynamo's eager backend): settings that must not change the
    result do not; patch dropout 0.5 keeps 33 of 65 image tokens, so it runs fewer FLOPs."""
    out = tmp_path / "knobs.json"
    _load("bench_knobs").main(["--dry-run", "--out", str(out)])
    res = json.loads(out.read_text())["results"]
    for arm in ("compile_model", "compile_step", "attention_math", "channels_last"):
        assert res[arm]["loss_diff"] <= 1e-5 and res[arm]["ratio"] > 0, arm
    assert res["compile_model"]["flops_vs_baseline"] == 1.0 and res["channels_last"]["flops_vs_baseline"] == 1.0
    assert res["patch_dropout_50"]["flops_vs_baseline"] < 0.9 and res["patch_dropout_50"]["loss_diff"] is None
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("knobs: compile_model=")


@pytest.mark.slow
def test_study_quick_end_to_end(tmp_path, catalog_cache):
    """Study v2 in its quick mode: every arm fine-tunes the shipped base; the base is evaluated like an arm
    (domain and retention), and every number is also given relative to it."""
    raw = _load("study_multifield").main(["--quick", "--out", str(tmp_path), "--cache-dir", str(catalog_cache),
                                          "--world-cache-dir", str(tmp_path / "world")])
    summary = raw["summary"]
    assert set(summary) == {"base", "clip_title", "seven_field", "siglip_seven_field", "seven_field_fused"}
    base = summary["base"]["world/zeroshot_color/f1_weighted"]
    assert base["rel_base"] == 0.0 and base["mean"] > 2 / 16  # the base knows the world's colours
    clip = summary["clip_title"]["synthetic/text2image_title/recall@1"]
    assert clip["rel_baseline"] == 0.0 and 0.0 <= clip["mean"] <= 1.0
    b, s = summary["base"]["synthetic/text2image_title/recall@10"]["mean"], summary["seven_field"]
    assert s["synthetic/text2image_title/recall@10"]["rel_base"] == pytest.approx(
        s["synthetic/text2image_title/recall@10"]["mean"] / b - 1)
    assert len(raw["goals"]) == 7 and (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "table.md").read_text().count("|") > 20
    # the curves come from in-loop evaluation on the val split
    assert all(len(c["synthetic/avg/text2image/recall@10"]) >= 2 for c in raw["curves"]["seven_field"])


@pytest.mark.slow
def test_study_robust_quick_end_to_end(tmp_path, catalog_cache):
    """Every arm of the robust fine-tuning study (WiSE-FT, EMA, LLRD, LoRA, greedy soup) runs end to end from a
    base file; the shipped base and the world retention suite are the full study's defaults."""
    import torch
    from safetensors.torch import save_file

    from gcl.model import build_model

    torch.manual_seed(5)
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("gcl-tiny").model.state_dict().items()}, str(base))
    out = tmp_path / "out"
    study = _load("study_robust")
    raw = study.main(["--quick", "--out", str(out), "--cache-dir", str(catalog_cache), "--base", str(base),
                      "--model", "gcl-tiny", "--retention-suite", "none"])
    summary = raw["summary"]
    assert set(summary) == set(study.ARMS)
    full = summary["full"][study.DOMAIN]
    assert full["vs_full"] == 0.0 and 0.0 <= full["mean"] <= 1.0
    # WiSE at alpha 0 is the base itself and at 1 the full arm: the same weights score the same
    seed = raw["per_seed"][0]
    alpha = seed["_choices"]["wise_alpha"]
    if alpha in (0.0, 1.0):
        assert seed["full+wise"] == seed["base" if alpha == 0.0 else "full"]
    assert (out / "wise_curve.png").stat().st_size > 0 and (out / "table.md").read_text().count("|") > 30
    assert set(raw["goal"]) == set(study.ARMS[1:]) and raw["goal"]["full"]["gain_vs_full"] == 1.0
    assert set(seed["_samples_per_s"]) == {"full", "llrd", "lora_r8", "pd50"}  # the trained arms (gcl-tiny: a ViT)
