"""Data throughput: synthetic catalog generation, and our loader vs OpenCLIP's webdataset loader. One run each.

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

Prints last: ``catalog_products_per_s=<x> loader_vs_openclip=<ours title-only / OpenCLIP>``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPENCLIP_VENV = ROOT / ".venv-openclip"
CTX_SEVEN = {"title": 77, "description": 77, "colors": 16, "materials": 16, "categories": 16, "details": 32,
             "keywords": 32}


def openclip_python() -> Path:
    """``.venv-openclip``'s python with webdataset<=0.2.86 (created light on first use, see the docstring)."""
    py = OPENCLIP_VENV / "bin" / "python"
    probe = "import webdataset, open_clip_train.data as d; print(webdataset.__version__)"
    if py.exists():
        out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
        if out.returncode == 0:
            return py
        raise RuntimeError(f"{OPENCLIP_VENV} exists but cannot import OpenCLIP's data code:\n{out.stderr[-2000:]}\n"
                           "delete it and rerun")
    subprocess.run([sys.executable, "-m", "venv", str(OPENCLIP_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "webdataset==0.2.86"], check=True)
    import site

    site_dir = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (OPENCLIP_VENV / "lib" / ver / "site-packages" / "zz_gcl_main_venv.pth").write_text(site_dir + "\n")
    subprocess.run([str(py), "-c", probe], check=True)
    return py


# ------------------------------------------------------------------------------------------ OpenCLIP side

def openclip_side(pattern: str, batch_size: int, workers: int) -> None:
    """Runs inside .venv-openclip: one epoch of OpenCLIP's training loader; prints one JSON line."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(train_data=pattern, val_data=None, dataset_resampled=False, train_num_samples=None,
                              train_data_upsampling_factors=None, seed=0, batch_size=batch_size, workers=workers,
                              world_size=1)
    preprocess = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    t0 = time.perf_counter()
    data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    n = batches = n_first = 0
    t_first = None
    for images, texts in data.dataloader:  # noqa: B007 - the last batch's shapes are reported below
        n += images.shape[0]
        batches += 1
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
    t1 = time.perf_counter()
    print(json.dumps({"samples": n, "batches": batches, "seconds": t1 - t0, "first_batch_s": t_first - t0,
                      "first_batch_n": n_first, "image": list(images.shape[1:]), "text": list(texts.shape[1:])}))


def rates(r: dict) -> tuple[float, float]:
    """(whole epoch incl. start-up, steady state after the first batch) in samples/s."""
    return r["samples"] / r["seconds"], (r["samples"] - r["first_batch_n"]) / (r["seconds"] - r["first_batch_s"])


def run_openclip(pattern: str, batch_size: int, workers: int) -> dict:
    py = openclip_python()
    out = subprocess.run([str(py), __file__, "--openclip-side", pattern, "--batch-size", str(batch_size),
                          "--workers", str(workers)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"OpenCLIP side failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- our side

def run_ours(pattern: str, batch_size: int, workers: int, batches: int, fields: list[str]) -> dict:
    import open_clip

    from gcl.data.stream import build_train_stream

    stream = build_train_stream(
        pattern, tokenizer=open_clip.get_tokenizer("ViT-B-16"), context_length={f: CTX_SEVEN[f] for f in fields},
        image_transform=open_clip.image_transform(224, is_train=True), batch_size=batch_size, fields=fields,
        num_workers=workers, seed=0)
    t0 = time.perf_counter()
    n = got = n_first = 0
    t_first = None
    for batch in stream:
        n += batch["image"].shape[0]
        got += 1
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
        if got == batches:
            break
    t1 = time.perf_counter()
    return {"samples": n, "batches": got, "seconds": t1 - t0, "first_batch_s": t_first - t0, "first_batch_n": n_first,
            "image": list(batch["image"].shape[1:]),
            "tokens": {f: list(t.shape[1:]) for f, t in batch["tokens"].items()}, "skipped": stream.skipped}


# ------------------------------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", type=int, default=4000)
    p.add_argument("--per-shard", type=int, default=200)
    p.add_argument("--gen-workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="loader workers (both sides)")
    p.add_argument("--data-dir", default=None, help="where to write the catalog (default: a temp dir, removed)")
    p.add_argument("--openclip-side", metavar="PATTERN", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.openclip_side:
        openclip_side(a.openclip_side, a.batch_size, a.workers)
        return

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))
    from gcl.data.schema import TEXT_FIELDS
    from gcl.data.synthetic import generate_catalog

    with tempfile.TemporaryDirectory(dir=a.data_dir) as tmp:
        out = Path(tmp) / "catalog"
        t0 = time.perf_counter()
        cat = generate_catalog(out, a.products, seed=0, image_size=64, per_shard=a.per_shard, workers=a.gen_workers)
        gen_s = time.perf_counter() - t0
        gen_rate = a.products / gen_s
        print(f"catalog: {a.products} products at 64 px on {a.gen_workers} workers in {gen_s:.1f} s "
              f"= {gen_rate:.1f} products/s", flush=True)
        train = cat["splits"]["train"]
        pattern = train["pattern"]
        print(f"train split: {train['count']} samples in {train['shards']} shards; batch {a.batch_size}, "
              f"{a.workers} loader workers, transform open_clip.image_transform(224, is_train=True)", flush=True)

        runs = {"openclip": run_openclip(pattern, a.batch_size, a.workers)}
        n_batches = runs["openclip"]["batches"]
        runs["ours_title"] = run_ours(pattern, a.batch_size, a.workers, n_batches, ["title"])
        runs["ours_seven"] = run_ours(pattern, a.batch_size, a.workers, n_batches, list(TEXT_FIELDS))

    labels = {"openclip": "OpenCLIP get_wds_dataset (title .txt)", "ours_title": "gcl stream, title only",
              "ours_seven": "gcl stream, seven fields"}
    r = {k: rates(v) for k, v in runs.items()}
    for k, v in runs.items():
        print(f"{labels[k]:<40} {v['samples']} samples in {v['seconds']:.2f} s: {r[k][0]:7.1f} samples/s "
              f"(after the first batch, which took {v['first_batch_s']:.2f} s: {r[k][1]:7.1f})")
    print(f"seven-field token widths of the last batch: {runs['ours_seven']['tokens']}")
    ratio, steady = r["ours_title"][0] / r["openclip"][0], r["ours_title"][1] / r["openclip"][1]
    seven, seven_steady = r["ours_seven"][0] / r["openclip"][0], r["ours_seven"][1] / r["openclip"][1]
    print(f"title-only / OpenCLIP: {ratio:.2f} (steady {steady:.2f}); "
          f"seven-field / OpenCLIP: {seven:.2f} (steady {seven_steady:.2f})")
    result = {"products": a.products, "catalog_products_per_s": gen_rate, "gen_workers": a.gen_workers,
              "loader": {"workers": a.workers, "batch_size": a.batch_size, "train_samples": train["count"],
                         "shards": train["shards"], "image_transform": "open_clip.image_transform(224, is_train=True)",
                         "runs": runs, "samples_per_s": {k: v[0] for k, v in r.items()},
                         "steady_samples_per_s": {k: v[1] for k, v in r.items()},
                         "title_vs_openclip": ratio, "title_vs_openclip_steady": steady,
                         "seven_vs_openclip": seven, "seven_vs_openclip_steady": seven_steady}}
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import save_result

        print(f"saved {save_result('bench_data', result)}")
    except ImportError:
        pass
    print(f"catalog_products_per_s={gen_rate:.1f} loader_vs_openclip={ratio:.2f}")


if __name__ == "__main__":
    main()
