"""GPU benchmark: ViT-B-16 CLIP and SigLIP training with gcl vs OpenCLIP's own step, one call.

Measures, on the visible GPU (bf16 autocast, AdamW):
- training throughput (samples/s) and model FLOPs utilisation (MFU, from torch's FLOP counter and the card's
  dense bf16 peak) for ViT-B-16 (CLIP) and ViT-B-16-SigLIP, with gcl's seven-field loss and single-field loss;
- OpenCLIP's own step on the same card (model(image, text) -> ClipLoss/SigLipLoss -> backward -> step, full
  context, the way open_clip_train does it) as the baseline;
- peak GPU memory at batch 256 with and without gradient checkpointing;
- every speed setting of ``gcl.model.speed`` (compile, attention kernels, channels_last, patch dropout) on
  ViT-B-16, each against the defaults in alternating steps (``bench_knobs.run_knobs``).
It prints a short table last and writes the full numbers as JSON (benchmarks/results/gpu_vit_b16.json).

`--dry-run` runs the same code path on CPU with a tiny model, batch 4 and 2 steps (exercised by the tests).
Random init weights (no download needed); texts from the synthetic catalog's generator.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result  # noqa: E402
from _gcl_step import SEVEN, batch, field_text, gcl_step, image_size, terms, texts, time_steps  # noqa: E402
from bench_knobs import ARMS, run_knobs  # noqa: E402

from gcl.flops import compute_dtype, count_flops, device_peak_tflops  # noqa: E402


def _peak(device: torch.device) -> float | None:
    """The card's dense bf16 peak (TFLOP/s) from gcl.flops's table; None on CPU or an unlisted card."""
    if device.type != "cuda":
        return None
    return device_peak_tflops(torch.cuda.get_device_name(device), compute_dtype("bf16"))


def bench_model(name: str, kind: str, batch_size: int, steps: int, warmup: int, device, dtype) -> dict:
    from open_clip.loss import ClipLoss, SigLipLoss

    from gcl.loss import build_loss
    from gcl.model import build_model

    res: dict = {"model": name, "kind": kind, "batch_size": batch_size}
    rows = texts(batch_size)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

    def make(grad_ckpt: bool):
        bundle = build_model(name, None, device=device, grad_checkpointing=grad_ckpt,
                             logit_bias_init=-10.0 if kind == "siglip" else None)
        opt = torch.optim.AdamW([p for p in bundle.model.parameters() if p.requires_grad], lr=1e-5,
                                fused=device.type == "cuda")
        return bundle, opt

    def gcl_step_fn(bundle, opt, fields, naive=False, packing=None):
        """gcl's step; ``naive`` encodes each text field in its own full-context pass (no dedup, no trimming);
        ``packing`` overrides the model's verified text packing (``buckets`` to compare with prefix packing)."""
        loss_fn = build_loss(kind, terms(fields), duplicates=True)
        data = batch(bundle, rows, fields, size, device, full_context=naive)
        if not naive:
            return gcl_step(bundle, opt, loss_fn, data, fields, autocast,
                            encoder=bundle.field_encoder(text_packing=packing or bundle.text_packing))
        model = bundle.model

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                feats = {"image": model.encode_image(data["image"])}
                feats.update({f: model.encode_text(data["tokens"][f]) for f in fields})
                out = loss_fn(feats, data, model.logit_scale, getattr(model, "logit_bias", None))
            out["loss"].backward()
            opt.step()
        return step

    def openclip_step_fn(bundle, opt):
        loss_fn = SigLipLoss() if kind == "siglip" else ClipLoss()
        image = torch.randn(batch_size, 3, size, size, device=device)
        text = bundle.tokenizer([field_text(r, "title") for r in rows], context_length=bundle.context_length).to(device)
        model = bundle.model

        def step():
            model.output_dict = True  # as open_clip_train creates its models
            opt.zero_grad(set_to_none=True)
            with autocast:
                out = model(image, text)
                if kind == "siglip":
                    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
                else:
                    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            opt.step()
        return step

    bundle, opt = make(False)
    size = image_size(bundle)
    res["image_size"] = size
    peak = _peak(device)
    res["peak_tflops"] = peak
    arms = {"openclip_single": openclip_step_fn(bundle, opt),
            "gcl_single": gcl_step_fn(bundle, opt, ["title"]),
            "gcl_seven": gcl_step_fn(bundle, opt, SEVEN),
            "gcl_seven_buckets": gcl_step_fn(bundle, opt, SEVEN, packing="buckets"),
            "gcl_seven_naive": gcl_step_fn(bundle, opt, SEVEN, naive=True)}
    for arm, step in arms.items():
        t = time_steps(step, steps, warmup, device)
        _, flops = count_flops(step)
        res[arm] = {"step_s": t, "samples_per_s": batch_size / t, "flops_per_step": flops,
                    "tflops_per_s": flops / t / 1e12, "mfu": (flops / t / 1e12 / peak) if peak else None}
    res["seven_vs_single_step"] = res["gcl_seven"]["step_s"] / res["gcl_single"]["step_s"]
    res["text_packing"] = bundle.text_packing
    res["buckets_vs_packed_step"] = res["gcl_seven_buckets"]["step_s"] / res["gcl_seven"]["step_s"]
    res["gcl_single_vs_openclip"] = res["openclip_single"]["step_s"] / res["gcl_single"]["step_s"]
    del bundle, opt, arms

    for ckpt in (False, True):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        bundle, opt = make(ckpt)
        step = gcl_step_fn(bundle, opt, SEVEN)
        t = time_steps(step, max(1, steps // 2), 1, device)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        res[f"seven_gradckpt_{ckpt}"] = {"peak_mem_gib": mem, "step_s": t}
        del bundle, opt, step
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, batch 4, 2 steps (tests)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile_* knob arms")
    p.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/gpu_vit_b16.json)")
    a = p.parse_args(argv)
    # Every speed-setting arm on the GPU; the dry run leaves out the compile arms, which bench_knobs.py's own
    # dry run exercises through the same run_knobs (keeps the test short).
    knob_arms = [x for x in ARMS if not (a.dry_run and x.startswith("compile"))]
    if a.dry_run:
        device, models, a.batch_size, a.steps, a.warmup = torch.device("cpu"), [("gcl-tiny", "clip"),
                                                                              ("gcl-tiny-siglip", "siglip")], 4, 2, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run on CPU, or on a GPU machine")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        models = [("ViT-B-16", "clip"), ("ViT-B-16-SigLIP", "siglip")]
    results = [bench_model(n, k, a.batch_size, a.steps, a.warmup, device, torch.bfloat16)
               for n, k in models]
    knobs = run_knobs(models[0][0], models[0][1], a.batch_size, a.steps, a.warmup, device, torch.bfloat16,
                      a.compile_backend, knob_arms, "wall", _peak(device))
    payload = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
               "dry_run": a.dry_run, "results": results, "knobs": knobs}
    if a.out:
        Path(a.out).write_text(json.dumps(payload, indent=1))
    else:
        save_result("gpu_vit_b16" + ("_dry" if a.dry_run else ""), payload)

    def f(x, spec=".1f"):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    print(f"{'model':18} {'arm':18} {'samples/s':>10} {'MFU':>6} {'step ms':>8}")
    for r in results:
        for arm in ("openclip_single", "gcl_single", "gcl_seven", "gcl_seven_buckets", "gcl_seven_naive"):
            x = r[arm]
            print(f"{r['model']:18} {arm:18} {f(x['samples_per_s']):>10} {f(x['mfu'], '.2f'):>6} "
                  f"{f(x['step_s'] * 1000):>8}")
        print(f"{r['model']:18} peak mem GiB (seven, bs {r['batch_size']}): no ckpt "
              f"{f(r['seven_gradckpt_False']['peak_mem_gib'], '.2f')}, grad ckpt {f(r['seven_gradckpt_True']['peak_mem_gib'], '.2f')}")
        print(f"{r['model']:18} seven_vs_single={r['seven_vs_single_step']:.3f} "
              f"gcl_single_vs_openclip={r['gcl_single_vs_openclip']:.3f} text_packing={r['text_packing']} "
              f"buckets_vs_packed={r['buckets_vs_packed_step']:.3f}")
    print(f"knobs ({knobs['model']}, bs {knobs['batch_size']}, step time vs defaults): "
          + " ".join(f"{arm}={knobs[arm]['ratio']:.3f}" for arm in knob_arms))
    return payload


if __name__ == "__main__":
    main()
