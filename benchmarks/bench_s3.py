"""Loader throughput from an S3-compatible server on loopback vs local disk: same shards, same workers.

The synthetic catalog's train split is written once to local disk and uploaded to a moto S3 server that
runs in its own process on 127.0.0.1 (so serving does not share the benchmark's interpreter). Then
``gcl.data.stream.build_train_stream`` reads the local pattern and the ``s3://`` pattern alternately for
``--rounds`` rounds: seven text fields, ``open_clip.image_transform(224, is_train=True)``, batch
``--batch-size``, ``--workers`` DataLoader workers, ``--batches`` batches per run (start-up included and,
separately, the steady rate after the first batch). Medians over rounds are reported.

Target (issue 17): s3 / local >= 0.9. Loopback S3 removes the network, so this measures the client side
(fsspec/s3fs range reads, request overhead per shard) and the server's per-request cost, not a WAN.

Prints last: ``s3_vs_local=<median s3 samples/s / median local samples/s>``; writes
benchmarks/results/bench_s3.json (not with ``--quick``, the small dry-run mode).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, save_result  # noqa: E402

sys.path.insert(0, str(ROOT))
CTX = {"title": 32, "description": 77, "colors": 16, "materials": 16, "categories": 16, "details": 32,
       "keywords": 32}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    """moto's S3 server in its own process; returns once it answers."""
    import requests

    p = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return p
        except requests.ConnectionError:
            if p.poll() is not None:
                raise RuntimeError("moto server exited; is moto[s3] installed (pip install -e '.[dev]')?") from None
            time.sleep(0.2)
    p.kill()
    raise RuntimeError("moto server did not answer within 60 s")


def run_once(pattern: str, batch_size: int, workers: int, batches: int) -> dict:
    import open_clip

    from gcl.data.stream import build_train_stream

    stream = build_train_stream(pattern, tokenizer=open_clip.get_tokenizer("ViT-B-16"), context_length=CTX,
                                image_transform=open_clip.image_transform(224, is_train=True),
                                batch_size=batch_size, fields=list(CTX), num_workers=workers, seed=0)
    t0 = time.perf_counter()
    n = got = 0
    t_first = n_first = None
    it = iter(stream)
    for b in it:
        n += b["image"].shape[0]
        got += 1
        if t_first is None:
            t_first, n_first = time.perf_counter() - t0, n
        if got == batches:
            break
    seconds = time.perf_counter() - t0
    it.close()
    steady = (n - n_first) / (seconds - t_first) if got > 1 else float("nan")
    return {"samples": n, "seconds": seconds, "samples_per_s": n / seconds, "steady_samples_per_s": steady,
            "skipped": {k: v for k, v in stream.skipped.items() if v}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", type=int, default=4000)
    p.add_argument("--per-shard", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny dry run (checks the script; no result file)")
    a = p.parse_args(argv)
    if a.quick:
        a.products, a.per_shard, a.batch_size, a.workers, a.batches, a.rounds = 240, 40, 16, 2, 6, 1

    import s3fs

    from gcl.data.synthetic import generate_catalog

    port = _free_port()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)  # read by s3fs here and in the DataLoader workers
    server = start_moto(port)
    runs: dict[str, list[dict]] = {"local": [], "s3": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cat = generate_catalog(Path(tmp) / "catalog", a.products, seed=0, image_size=64, per_shard=a.per_shard,
                                   workers=1)
            train = cat["splits"]["train"]
            local_dir = Path(train["pattern"]).parent
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("bench")
            fs.put(str(local_dir) + "/", "bench/train/", recursive=True)
            s3_pattern = "s3://bench/train/" + Path(train["pattern"]).name
            print(f"{train['count']} samples in {train['shards']} shards; batch {a.batch_size}, {a.workers} workers, "
                  f"{a.batches} batches per run, {a.rounds} rounds; S3 = moto on 127.0.0.1:{port}", flush=True)
            for r in range(a.rounds):
                for side, pattern in (("local", train["pattern"]), ("s3", s3_pattern)):
                    res = run_once(pattern, a.batch_size, a.workers, a.batches)
                    runs[side].append(res)
                    print(f"round {r} {side:>5}: {res['samples_per_s']:8.1f} samples/s "
                          f"(steady {res['steady_samples_per_s']:.1f})", flush=True)
    finally:
        server.terminate()
        server.wait(10)

    med = {s: statistics.median(x["samples_per_s"] for x in v) for s, v in runs.items()}
    steady = {s: statistics.median(x["steady_samples_per_s"] for x in v) for s, v in runs.items()}
    summary = {"s3_vs_local": med["s3"] / med["local"], "s3_vs_local_steady": steady["s3"] / steady["local"]}
    print("; ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    payload = {"products": a.products, "per_shard": a.per_shard, "batch_size": a.batch_size, "workers": a.workers,
               "batches": a.batches, "rounds": a.rounds, "samples_per_s": med, "steady_samples_per_s": steady,
               **summary, "runs": runs}
    if not a.quick:
        print(f"saved {save_result('bench_s3', payload)}")
    return payload


if __name__ == "__main__":
    main()
