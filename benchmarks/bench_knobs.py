"""Speed settings, measured: each ``model.*`` speed setting's training step against the defaults, same run.

Arms (``gcl.model.speed``); each builds its model from the same seed (same weights) and runs gcl's step
(seven-field FieldEncoder, ``seven_field``-style loss, backward, AdamW) on the same catalog batch:

* ``compile_model`` / ``compile_step``: ``model.compile=model`` (towers) / ``step`` (towers + loss);
* ``attention_math`` / ``attention_efficient`` / ``attention_cudnn``: ``model.attention``; on CPU only
  ``math`` differs from ``auto`` (the others fall back to CPU's fused kernel), so the others are GPU-only;
* ``channels_last``: ``model.channels_last=true``;
* ``patch_dropout_50``: ``model.patch_dropout=0.5`` (changes the result by design: fewer image tokens).

Each arm is timed alternating with the baseline (defaults) step by step, so both see the same machine load;
the figure is ``<arm> = median arm step / median baseline step`` (< 1: faster). Arms that must not change the
result also report ``loss_diff``: |first-step loss - baseline first-step loss| on the same batch and weights
(fp32 on CPU: ~1e-6; bf16 autocast on GPU: ~1e-2), and every arm reports its FLOPs per step (gcl.flops).
On CPU the clock is process CPU time with one thread (``--clock cpu``; a shared machine's load does not
enter), on CUDA wall time with synchronisation. Prints one line per arm, then last, exactly:
``knobs: <arm>=<ratio> ...``.

    python benchmarks/bench_knobs.py [--model ViT-B-16] [--batch-size 16] [--steps 3] [--warmup 2]
    python benchmarks/bench_knobs.py --dry-run   # tiny model, batch 4, 1 step, compile backend eager (tests)

``benchmarks/gpu_vit_b16.py`` runs the same arms (:func:`run_knobs`) on the GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result  # noqa: E402
from _gcl_step import SEVEN, batch, gcl_step, image_size, step_time, terms, texts  # noqa: E402

# arm -> build_model speed arguments; "same" marks arms whose loss must equal the baseline's
ARMS: dict[str, tuple[dict, bool]] = {
    "compile_model": ({"compile": "model"}, True),
    "compile_step": ({"compile": "step"}, True),
    "attention_math": ({"attention": "math"}, True),
    "attention_efficient": ({"attention": "efficient"}, True),
    "attention_cudnn": ({"attention": "cudnn"}, True),
    "channels_last": ({"channels_last": True}, True),
    "patch_dropout_50": ({"patch_dropout": 0.5}, False),
}
GPU_ONLY = ("attention_efficient", "attention_cudnn")


def _setup(name: str, kind: str, knobs: dict, backend: str, rows: list[dict], device, seed: int):
    """(bundle, step) for one arm: model from ``seed``, its loss (compiled for ``compile=step``), AdamW, batch."""
    from gcl.loss import build_loss
    from gcl.model import build_model
    from gcl.model.speed import compile_loss

    torch.manual_seed(seed)
    bundle = build_model(name, None, device=device, compile_backend=backend,
                         logit_bias_init=-10.0 if kind == "siglip" else None, **knobs)
    loss_fn = build_loss(kind, terms(SEVEN), duplicates=True)
    compile_loss(loss_fn, knobs.get("compile", "none"), backend)
    opt = torch.optim.AdamW([p for p in bundle.model.parameters() if p.requires_grad], lr=1e-5,
                            fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(seed)  # the same images in every arm
    data = batch(bundle, rows, SEVEN, image_size(bundle), device, full_context=False)
    data["image"] = torch.randn(data["image"].shape, generator=g).to(device)
    return bundle, data, opt, loss_fn


def run_knobs(name: str, kind: str, batch_size: int, steps: int, warmup: int, device: torch.device,
              dtype: torch.dtype, backend: str, arms: list[str], clock: str, peak_tflops: float | None,
              seed: int = 0) -> dict:
    """Time each arm against the baseline (alternating steps); see the module docstring."""
    from gcl.flops import count_flops

    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    now = time.perf_counter if clock == "wall" else time.process_time
    rows = texts(batch_size, seed)
    base_bundle, base_data, base_opt, base_loss = _setup(name, kind, {}, backend, rows, device, seed)
    base_step = gcl_step(base_bundle, base_opt, base_loss, base_data, SEVEN, autocast)
    base_first = float(base_step())  # the baseline's first step, at the initial weights
    res: dict = {"model": name, "kind": kind, "batch_size": batch_size, "device": str(device), "clock": clock,
                 "compile_backend": backend, "steps": steps, "warmup": warmup}
    _, flops = count_flops(base_step)
    res["baseline"] = {"flops_per_step": flops}
    for arm in arms:
        knobs, same = ARMS[arm]
        bundle, data, opt, loss_fn = _setup(name, kind, knobs, backend, rows, device, seed)
        step = gcl_step(bundle, opt, loss_fn, data, SEVEN, autocast)
        t_start = time.perf_counter()
        first = float(step())  # the arm's first step (compiles, for compile arms)
        first_s = time.perf_counter() - t_start
        for _ in range(max(0, warmup - 1)):
            step()
        t_base, t_arm = [], []
        for _ in range(steps):
            t_base.append(step_time(base_step, device, now))
            t_arm.append(step_time(step, device, now))
        _, arm_flops = count_flops(step)
        mb, ma = statistics.median(t_base), statistics.median(t_arm)
        res[arm] = {"knobs": knobs, "baseline_step_s": mb, "step_s": ma, "ratio": ma / mb,
                    "first_step_s": first_s, "flops_per_step": arm_flops,
                    "flops_vs_baseline": arm_flops / flops,
                    "loss_diff": abs(first - base_first) if same else None,
                    "tflops_per_s": arm_flops / ma / 1e12,
                    "mfu": arm_flops / ma / 1e12 / peak_tflops if peak_tflops else None}
        print(f"{name} {arm:20} ratio {ma / mb:.3f} (step {ma:.3f} s vs baseline {mb:.3f} s, {clock}); "
              f"first step {first_s:.1f} s wall; FLOPs x{arm_flops / flops:.3f}"
              + (f"; loss_diff {abs(first - base_first):.2e}" if same else ""), flush=True)
        del bundle, data, opt, loss_fn, step
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny model, batch 4, 1 step, compile backend eager")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="arm steps before timing (compile arms compile here)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="cpu: process CPU time (default on CPU); wall: elapsed time (default on CUDA)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--arms", default=None, help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/bench_knobs.json)")
    a = p.parse_args(argv)
    if a.dry_run:
        a.model, a.batch_size, a.steps, a.warmup, a.compile_backend = "gcl-tiny", 4, 1, 1, "eager"
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    clock = a.clock or ("wall" if device.type == "cuda" else "cpu")
    arms = a.arms.split(",") if a.arms else [x for x in ARMS if device.type == "cuda" or x not in GPU_ONLY]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    res = run_knobs(a.model, "clip", a.batch_size, a.steps, a.warmup, device, torch.bfloat16, a.compile_backend,
                    arms, clock, peak_tflops=None)
    payload = {"dry_run": a.dry_run, "threads": a.threads, "results": res}
    if a.out:
        Path(a.out).write_text(json.dumps(payload, indent=1))
    else:
        save_result("bench_knobs" + ("_dry" if a.dry_run else ""), payload)
    print("knobs: " + " ".join(f"{arm}={res[arm]['ratio']:.3f}" for arm in arms))
    return payload


if __name__ == "__main__":
    main()
