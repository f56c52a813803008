"""Data throughput: synthetic catalog generation, and our loader vs OpenCLIP's webdataset loader.

1. ``gcl.data.synthetic.generate_catalog`` at 64 px on 2 processes: products/s (wall clock, all splits).
2. Loader samples/s on the catalog's train shards: read tar -> decode RGB -> augment -> tokenize -> batch, in
   DataLoader workers, for one epoch of the train split (the same number of batches on both sides, start-up
   included). Both sides use the same image transform (``open_clip.image_transform(224, is_train=True)``,
   i.e. ViT-B-16's train preprocess: 64 px shards upscaled to 224), the same CLIP tokenizer, the same worker
   count, batch size and shards, epoch mode with shard + sample shuffling.

   - OpenCLIP: ``open_clip_train.data.get_wds_dataset`` (tokenizes ``<key>.txt`` = the title, 77 tokens).
     It does not run on webdataset 1.0.2 (its ``group_by_keys_nothrow`` chokes on the end-of-shard marker),
     so it runs in ``.venv-openclip`` with webdataset 0.2.86. That venv holds only webdataset and reads
     torch / torchvision / open_clip / PIL from ``.venv`` (a .pth line), so both sides run the same versions.
   - ours, title only (like-for-like): ``gcl.data.stream.build_train_stream(fields=["title"])``.
   - ours, seven fields: all of ``TEXT_FIELDS`` with per-field context lengths.

   Each loader runs in a fresh process, the three alternating for ``--rounds`` rounds (the machine is shared,
   so single timings are noisy); reported are medians of samples/s (whole epoch, start-up included), of the
   steady rate after the first batch, and of CPU ms per sample (main process + workers: the work done, which
   other load on the machine barely changes).

Prints last: ``catalog_products_per_s=<x> loader_vs_openclip=<ours title-only / OpenCLIP>``.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, openclip_python  # noqa: E402

SIDES = ("openclip", "ours-title", "ours-seven")
CTX_SEVEN = {"title": 77, "description": 77, "colors": 16, "materials": 16, "categories": 16, "details": 32,
             "keywords": 32}


# ----------------------------------------------------------------------------------------- the two sides

def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(batches, n_max: int | None) -> dict:
    """Iterate ``batches`` (image tensor first) and time it; stops after ``n_max`` batches if given."""
    t0 = time.perf_counter()
    n = got = n_first = 0
    t_first = None
    for b in batches:
        n += (b["image"] if isinstance(b, dict) else b[0]).shape[0]
        got += 1
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
        if got == n_max:
            break
    return {"samples": n, "batches": got, "seconds": time.perf_counter() - t0, "first_batch_s": t_first - t0,
            "first_batch_n": n_first}


def side_openclip(pattern: str, batch_size: int, workers: int) -> dict:
    """Runs inside .venv-openclip: one epoch of OpenCLIP's training loader."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(train_data=pattern, val_data=None, dataset_resampled=False, train_num_samples=None,
                              train_data_upsampling_factors=None, seed=0, batch_size=batch_size, workers=workers,
                              world_size=1)
    data = get_wds_dataset(args, open_clip.image_transform(224, is_train=True), is_train=True, epoch=0,
                           tokenizer=open_clip.get_tokenizer("ViT-B-16"))
    return _timed(data.dataloader, None)


def side_ours(pattern: str, batch_size: int, workers: int, batches: int, fields: list[str]) -> dict:
    import open_clip

    from gcl.data.stream import build_train_stream

    stream = build_train_stream(
        pattern, tokenizer=open_clip.get_tokenizer("ViT-B-16"), context_length={f: CTX_SEVEN[f] for f in fields},
        image_transform=open_clip.image_transform(224, is_train=True), batch_size=batch_size, fields=fields,
        num_workers=workers, seed=0)
    it = iter(stream)
    out = _timed(it, batches)
    it.close()  # shuts the workers down so their CPU time is counted
    out["skipped"] = stream.skipped
    return out


def run_side(side: str, pattern: str, batch_size: int, workers: int, batches: int) -> dict:
    """One side in a fresh process (the OpenCLIP one in .venv-openclip); adds ``cpu_s``."""
    py = openclip_python() if side == "openclip" else Path(sys.executable)
    cmd = [str(py), __file__, "--side", side, "--pattern", pattern, "--batch-size", str(batch_size),
           "--workers", str(workers), "--batches", str(batches)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _side_main(a: argparse.Namespace) -> None:
    import open_clip  # noqa: F401 - imports happen before the CPU clock starts

    if a.side == "openclip":
        import open_clip_train.data  # noqa: F401

        c0 = _cpu_seconds()
        r = side_openclip(a.pattern, a.batch_size, a.workers)
    else:
        sys.path.insert(0, str(ROOT))
        from gcl.data.schema import TEXT_FIELDS
        from gcl.data.stream import build_train_stream  # noqa: F401

        fields = ["title"] if a.side == "ours-title" else list(TEXT_FIELDS)
        c0 = _cpu_seconds()
        r = side_ours(a.pattern, a.batch_size, a.workers, a.batches, fields)
    gc.collect()  # drop loaders so their workers are joined before reading RUSAGE_CHILDREN
    r["cpu_s"] = _cpu_seconds() - c0
    print(json.dumps(r))


# ------------------------------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", type=int, default=4000)
    p.add_argument("--per-shard", type=int, default=200)
    p.add_argument("--gen-workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="loader workers (both sides)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the three loaders; medians reported")
    p.add_argument("--data-dir", default=None, help="where to write the catalog (default: a temp dir, removed)")
    p.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--pattern", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        _side_main(a)
        return

    sys.path.insert(0, str(ROOT))
    from gcl.data.synthetic import generate_catalog

    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory(dir=a.data_dir) as tmp:
        t0 = time.perf_counter()
        cat = generate_catalog(Path(tmp) / "catalog", a.products, seed=0, image_size=64, per_shard=a.per_shard,
                               workers=a.gen_workers)
        gen_s = time.perf_counter() - t0
        gen_rate = a.products / gen_s
        print(f"catalog: {a.products} products at 64 px on {a.gen_workers} workers in {gen_s:.1f} s "
              f"= {gen_rate:.1f} products/s", flush=True)
        train = cat["splits"]["train"]
        print(f"loader: train split {train['count']} samples in {train['shards']} shards, batch {a.batch_size}, "
              f"{a.workers} workers, open_clip.image_transform(224, is_train=True), one epoch per run, "
              f"{a.rounds} alternating rounds", flush=True)
        batches = 0
        for _ in range(a.rounds):
            for side in SIDES:
                r = run_side(side, train["pattern"], a.batch_size, a.workers, batches)
                batches = batches or r["batches"]  # ours reads as many batches as OpenCLIP's epoch has
                runs[side].append(r)

    def med(side: str, f) -> float:
        return statistics.median(f(r) for r in runs[side])

    rate = {s: med(s, lambda r: r["samples"] / r["seconds"]) for s in SIDES}
    steady = {s: med(s, lambda r: (r["samples"] - r["first_batch_n"]) / (r["seconds"] - r["first_batch_s"]))
              for s in SIDES}
    cpu_ms = {s: med(s, lambda r: 1000 * r["cpu_s"] / r["samples"]) for s in SIDES}
    labels = {"openclip": "OpenCLIP get_wds_dataset (title .txt)", "ours-title": "gcl stream, title only",
              "ours-seven": "gcl stream, seven fields"}
    print(f"{'loader':<40} {'samples/s':>10} {'steady':>8} {'CPU ms/sample':>14}   (medians of {a.rounds})")
    for s in SIDES:
        each = ", ".join(f"{r['samples'] / r['seconds']:.0f}" for r in runs[s])
        print(f"{labels[s]:<40} {rate[s]:10.1f} {steady[s]:8.1f} {cpu_ms[s]:14.2f}   runs: {each}")
    ratio = rate["ours-title"] / rate["openclip"]
    summary = {
        "title_vs_openclip": ratio, "seven_vs_openclip": rate["ours-seven"] / rate["openclip"],
        "title_vs_openclip_steady": steady["ours-title"] / steady["openclip"],
        "title_vs_openclip_cpu": cpu_ms["openclip"] / cpu_ms["ours-title"],
        "seven_vs_openclip_cpu": cpu_ms["openclip"] / cpu_ms["ours-seven"],
    }
    print("; ".join(f"{k}={v:.2f}" for k, v in summary.items()))
    result = {"products": a.products, "catalog_products_per_s": gen_rate, "gen_workers": a.gen_workers,
              "loader": {"workers": a.workers, "batch_size": a.batch_size, "train_samples": train["count"],
                         "shards": train["shards"], "image_transform": "open_clip.image_transform(224, is_train=True)",
                         "rounds": a.rounds, "samples_per_s": rate, "steady_samples_per_s": steady,
                         "cpu_ms_per_sample": cpu_ms, **summary, "runs": runs}}
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import save_result

        print(f"saved {save_result('bench_data', result)}")
    except ImportError:
        pass
    print(f"catalog_products_per_s={gen_rate:.1f} loader_vs_openclip={ratio:.2f}")


if __name__ == "__main__":
    main()
