"""Training throughput of `python train.py` vs OpenCLIP's `python -m open_clip_train.main`, one run.

Same shards (the synthetic catalog at 64 px), same model (`bench-ViT-S` from ../shared/bench), same batch (64),
same threads, same number of loader workers, fp32 on CPU, no gradient clipping (OpenCLIP's default). OpenCLIP runs in a separate venv (.venv-openclip,
created on first use: its training code pins webdataset<=0.2.86) through ../shared/bench/openclip_baseline.py.

Targets: single-field (title) >= 1.0x OpenCLIP; seven-field >= 0.75x OpenCLIP's single-field.
Also runs seven-field with `model.text_packing=buckets` (length-bucketed text passes instead of the default
prefix-shared packing) to show what the packing contributes.
Prints last: `single_vs_openclip=<r> seven_vs_openclip=<r>`.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SHARED, openclip_python, save_result  # noqa: E402


def ours(shards: str, samples: int, batch: int, workers: int, loss: str, run_dir: Path, *extra: str) -> float:
    steps = samples // batch
    cmd = [sys.executable, "train.py", "model.name=bench-ViT-S", f"model.config_path={SHARED / 'bench' / 'bench-ViT-S.json'}",
           f"loss={loss}", f"data.train_shards='{shards}'", f"data.batch_size={batch}", f"data.num_workers={workers}",
           f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=5",
           "optim.lr=1e-4", "optim.grad_clip=null", "sched.warmup_steps=10", "eval=none", "export.enabled=false",
           "logger.wandb.mode=disabled", "logger.progress=false", f"hydra.run.dir={run_dir}", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True)
    rates = [json.loads(x)["samples_per_s"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in rates if isinstance(r, float)]
    steady = rates[2:] if len(rates) > 4 else rates  # skip start-up intervals, as the OpenCLIP side does
    return statistics.median(steady)


def openclip(shards: str, samples: int, batch: int, workers: int) -> float:
    py = openclip_python()
    out = subprocess.run([str(py), str(SHARED / "bench" / "openclip_baseline.py"), shards, "--samples", str(samples),
                          "--batch-size", str(batch), "--workers", str(workers)],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    m = re.findall(r"openclip_samples_per_s=([\d.]+)", out.stdout)
    if not m:
        raise RuntimeError(f"OpenCLIP baseline printed no rate:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return float(m[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", type=int, default=5000)
    p.add_argument("--samples", type=int, default=3200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--data-dir", default=None, help="catalog dir (default: a temp dir)")
    a = p.parse_args()

    from gcl.data.synthetic import generate_catalog

    data_dir = Path(a.data_dir or tempfile.mkdtemp(prefix="gcl-bench-train-"))
    if not (data_dir / "catalog.json").exists():
        generate_catalog(data_dir, products=a.products, seed=0, image_size=64, per_shard=500, workers=2)
    shards = json.loads((data_dir / "catalog.json").read_text())["splits"]["train"]["pattern"]

    oc = openclip(shards, a.samples, a.batch_size, a.workers)
    with tempfile.TemporaryDirectory() as tmp:
        single = ours(shards, a.samples, a.batch_size, a.workers, "clip_title", Path(tmp) / "single")
        seven = ours(shards, a.samples, a.batch_size, a.workers, "seven_field", Path(tmp) / "seven")
        buckets = ours(shards, a.samples, a.batch_size, a.workers, "seven_field", Path(tmp) / "buckets",
                       "model.text_packing=buckets")
    res = {"openclip_samples_per_s": oc, "single_samples_per_s": single, "seven_samples_per_s": seven,
           "seven_buckets_samples_per_s": buckets, "seven_buckets_vs_openclip": buckets / oc,
           "single_vs_openclip": single / oc, "seven_vs_openclip": seven / oc,
           "targets": {"single_vs_openclip": ">= 1.0", "seven_vs_openclip": ">= 0.75"},
           "settings": vars(a)}
    save_result("train_vs_openclip", res)
    print(f"openclip={oc:.1f}/s gcl_single={single:.1f}/s gcl_seven={seven:.1f}/s "
          f"gcl_seven_buckets={buckets:.1f}/s (seven_buckets_vs_openclip={buckets / oc:.3f})")
    print(f"single_vs_openclip={single / oc:.3f} seven_vs_openclip={seven / oc:.3f}")


if __name__ == "__main__":
    main()
