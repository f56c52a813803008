"""GPU benchmark: ViT-B-16 CLIP and SigLIP training with gcl vs OpenCLIP's own step, one call.

Measures, on the visible GPU (bf16 autocast, AdamW):
- training throughput (samples/s) and model FLOPs utilisation (MFU, from torch's FLOP counter and the card's
  dense bf16 peak) for ViT-B-16 (CLIP) and ViT-B-16-SigLIP, with gcl's seven-field loss and single-field loss;
- OpenCLIP's own step on the same card (model(image, text) -> ClipLoss/SigLipLoss -> backward -> step, full
  context, the way open_clip_train does it) as the baseline;
- peak GPU memory at batch 256 with and without gradient checkpointing.
It prints a short table last and writes the full numbers as JSON (benchmarks/results/gpu_vit_b16.json).

`--dry-run` runs the same code path on CPU with a tiny model, batch 4 and 2 steps (exercised by the tests).
Random init weights (no download needed); texts from the synthetic catalog's generator.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; unknown cards report MFU as null.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
SEVEN = ["description", "title", "colors", "materials", "categories", "details", "keywords"]


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _texts(n: int, seed: int = 0) -> list[dict]:
    """Product text fields from the synthetic catalog's generator (realistic lengths)."""
    import numpy as np

    from gcl.data import synthetic

    rng = np.random.default_rng(seed)
    return [synthetic.make_texts(synthetic.sample_attributes(rng), rng) for _ in range(n)]


def _field_text(row: dict, field: str) -> str:
    v = row.get(field, "")
    return ", ".join(v) if isinstance(v, list) else str(v or "")


def _batch(bundle, rows: list[dict], fields: list[str], image_size: int, device, full_context: bool):
    from gcl.data.batch import token_row_ids

    b = len(rows)
    batch = {"image": torch.randn(b, 3, image_size, image_size, device=device), "tokens": {}, "present": {},
             "text_id": {}, "item_id": torch.arange(1, b + 1, device=device),
             "score": torch.full((b,), float("nan"), device=device),
             "position": torch.full((b,), float("nan"), device=device)}
    for f in fields:
        texts = [_field_text(r, f) for r in rows]
        tok = bundle.tokenizer(texts, context_length=bundle.context_length).to(device)
        if not full_context and bundle.real_length:
            keep = int((tok != bundle.pad_id).any(0).nonzero().max()) + 1
            tok = tok[:, :keep]
        batch["tokens"][f] = tok
        batch["present"][f] = torch.ones(b, dtype=torch.bool, device=device)
        batch["text_id"][f] = token_row_ids(tok, batch["present"][f], bundle.pad_id).to(device)  # as the collator
    batch["present"]["image"] = torch.ones(b, dtype=torch.bool, device=device)
    return batch


def _terms(fields: list[str]) -> list[dict]:
    return [{"name": f"{f}_image", "left": {"fields": [f], "weights": [1.0]},
             "right": {"fields": ["image"], "weights": [1.0]}, "weight": 1.0 / len(fields)} for f in fields]


def _time(step, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return float(fc.get_total_flops())


def bench_model(name: str, kind: str, batch_size: int, steps: int, warmup: int, device, dtype) -> dict:
    from open_clip.loss import ClipLoss, SigLipLoss

    from gcl.loss import build_loss
    from gcl.model import FieldEncoder, build_model

    res: dict = {"model": name, "kind": kind, "batch_size": batch_size}
    rows = _texts(batch_size)
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
        enc = FieldEncoder(bundle.model, real_length=bundle.real_length, pad_id=bundle.pad_id,
                           context_length=bundle.context_length, text_packing=packing or bundle.text_packing)
        loss_fn = build_loss(kind, _terms(fields), duplicates=True)
        batch = _batch(bundle, rows, fields, image_size, device, full_context=naive)
        model = bundle.model

        def features():
            if not naive:
                return enc(batch, ["image", *fields])
            feats = {"image": model.encode_image(batch["image"])}
            feats.update({f: model.encode_text(batch["tokens"][f]) for f in fields})
            return feats

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                out = loss_fn(features(), batch, model.logit_scale, getattr(model, "logit_bias", None))
            out["loss"].backward()
            opt.step()
        return step

    def openclip_step_fn(bundle, opt):
        loss_fn = SigLipLoss() if kind == "siglip" else ClipLoss()
        image = torch.randn(batch_size, 3, image_size, image_size, device=device)
        text = bundle.tokenizer([_field_text(r, "title") for r in rows], context_length=bundle.context_length).to(device)
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
    image_size = bundle.preprocess_cfg.get("size", 224)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    res["image_size"] = image_size
    peak = _peak(device)
    arms = {"openclip_single": openclip_step_fn(bundle, opt),
            "gcl_single": gcl_step_fn(bundle, opt, ["title"]),
            "gcl_seven": gcl_step_fn(bundle, opt, SEVEN),
            "gcl_seven_buckets": gcl_step_fn(bundle, opt, SEVEN, packing="buckets"),
            "gcl_seven_naive": gcl_step_fn(bundle, opt, SEVEN, naive=True)}
    for arm, step in arms.items():
        t = _time(step, steps, warmup, device)
        flops = _flops(step)
        res[arm] = {"step_s": t, "samples_per_s": batch_size / t, "flops_per_step": flops,
                    "mfu": (flops / t / peak) if peak else None}
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
        t = _time(step, max(1, steps // 2), 1, device)
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
    p.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/gpu_vit_b16.json)")
    a = p.parse_args(argv)
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
    payload = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
               "dry_run": a.dry_run, "results": results}
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
    return payload


if __name__ == "__main__":
    main()
