"""Cost of the seven-field GCL step vs OpenCLIP's single-field step, on the real target architecture.

One full training step (forward, loss, backward, AdamW step) of ViT-B-16 (random init, 224 px, fp32) on a
batch of synthetic-catalog products, in three ways:

* ``single``: the title only, encoded as OpenCLIP does (every row padded to the full 77-token context,
  plain ``model.encode_text``), loss ``conf/loss/clip_title.yaml``;
* ``naive``: seven text fields, one full-context ``encode_text`` pass per field, loss
  ``conf/loss/seven_field.yaml``;
* ``seven``: the same seven fields through ``gcl.model.FieldEncoder``: identical rows deduplicated across
  fields and samples, each unique row encoded at its real length, prefix-packed (every distinct prefix
  computed once, one pass; the default ``text_packing=auto``);
* ``buckets``: as ``seven`` with ``text_packing=buckets`` (rows grouped into length-bucketed passes).

Steps of the three modes are interleaved and the median of ``--steps`` timed steps after ``--warmup`` is
reported. On CPU the default clock is the process CPU time with one thread (``--clock cpu --threads 1``):
on a machine shared with other jobs, wall time mostly measures their load (we saw the same step vary 2x),
while CPU time measures this step's work. ``--clock wall`` (the default on CUDA, with synchronisation)
measures elapsed time. Prints ``buckets_vs_single=<r>``, then last, exactly:
``seven_vs_single=<r> naive_vs_single=<r>``.

    python benchmarks/bench_loss_step.py [--batch-size 16] [--steps 5] [--warmup 1] [--clock cpu|wall]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from gcl.data.batch import token_row_ids
from gcl.data.schema import TEXT_FIELDS, stable_hash
from gcl.loss import build_loss
from gcl.model import FieldEncoder, build_model

ROOT = Path(__file__).resolve().parents[1]


def catalog_texts(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` products' text fields from the procedural catalog, lists joined as the data stream does."""
    from gcl.data.synthetic import make_texts, sample_attributes

    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        texts = make_texts(sample_attributes(rng), rng)
        out.append({f: ", ".join(v) if isinstance(v, list) else v for f, v in texts.items()})
    return out


def tokens_trimmed(tokenizer, texts: list[str], pad_id: int) -> torch.Tensor:
    """LongTensor[B, L]: tokenized at 77 then trailing all-pad columns dropped (the batch contract)."""
    tok = tokenizer(texts, context_length=77)
    used = (tok != pad_id).any(dim=0).nonzero()
    return tok[:, : int(used[-1]) + 1].contiguous()


def loss_terms(name: str) -> tuple[str, list[dict], bool]:
    cfg = OmegaConf.load(ROOT / "conf" / "loss" / f"{name}.yaml")
    return cfg.kind, OmegaConf.to_container(cfg.terms, resolve=True), bool(cfg.duplicates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="cpu: process CPU time (default on CPU); wall: elapsed time (default on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    clock = a.clock or ("wall" if dev.type == "cuda" else "cpu")
    now_s = time.perf_counter if clock == "wall" else time.process_time

    bundle = build_model(a.model, device=dev)
    model, ctx, pad = bundle.model, bundle.context_length, bundle.pad_id
    model.train()
    enc = FieldEncoder(model, bundle.real_length, pad, ctx, text_packing=bundle.text_packing)
    enc_buckets = FieldEncoder(model, bundle.real_length, pad, ctx, text_packing="buckets")
    size = bundle.preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)

    b = a.batch_size
    products = catalog_texts(b, a.seed)
    fields = list(TEXT_FIELDS)
    texts = {f: [pr[f] for pr in products] for f in fields}
    tokens = {f: tokens_trimmed(bundle.tokenizer, texts[f], pad).to(dev) for f in fields}
    full = {f: torch.nn.functional.pad(t, (0, ctx - t.shape[1]), value=pad) for f, t in tokens.items()}
    meta = {
        "present": {f: torch.ones(b, dtype=torch.bool, device=dev) for f in [*fields, "image"]},
        "text_id": {f: token_row_ids(tokens[f], torch.ones(b, dtype=torch.bool), pad).to(dev) for f in fields},
        "item_id": torch.tensor([stable_hash(f"item-{i}") for i in range(b)], device=dev),
    }
    images = torch.randn(b, 3, *size, device=dev)
    single_loss = build_loss(*loss_terms("clip_title"))
    seven_loss = build_loss(*loss_terms("seven_field"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.2)

    def feats_single():
        return {"image": model.encode_image(images), "title": model.encode_text(full["title"])}

    def feats_naive():
        return {"image": model.encode_image(images), **{f: model.encode_text(full[f]) for f in fields}}

    def feats_with(encoder):
        return lambda: encoder({"image": images, "tokens": tokens, "present": meta["present"]}, ["image", *fields])

    modes = {"single": (feats_single, single_loss), "naive": (feats_naive, seven_loss),
             "seven": (feats_with(enc), seven_loss), "buckets": (feats_with(enc_buckets), seven_loss)}

    def step(name: str) -> tuple[float, float]:
        """One training step; returns (seconds on the chosen clock, wall seconds)."""
        feats_fn, loss_fn = modes[name]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, w0 = now_s(), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = loss_fn(feats_fn(), meta, model.logit_scale, getattr(model, "logit_bias", None))
        out["loss"].backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return now_s() - t0, time.perf_counter() - w0

    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(a.warmup + a.steps):
        now = {m: step(m) for m in modes}
        if i >= a.warmup:
            for m, (dt, _) in now.items():
                times[m].append(dt)
        print(f"step {i}{' (warm-up)' if i < a.warmup else ''} [{clock} s, wall s]: "
              + ", ".join(f"{m} {dt:.2f} ({w:.1f})" for m, (dt, w) in now.items()), flush=True)

    n_rows = sum(t.shape[0] for t in tokens.values())
    with torch.no_grad():
        enc.encode_text_fields(tokens, meta["present"])
        enc_buckets.encode_text_fields(tokens, meta["present"])
    real_tokens = sum(int((t != pad).sum()) for t in tokens.values())
    print(f"model={a.model} device={dev} threads={a.threads} batch={b} clock={clock} "
          f"real_length={bundle.real_length} text_packing={enc.text_packing}")
    print(f"text rows: naive {n_rows} x {ctx} tokens; seven {enc.last_unique_rows} unique rows "
          f"({real_tokens} non-pad tokens before dedup): {enc.last_text_slots} slots in {enc.last_passes} "
          f"pass(es) prefix-packed, {enc_buckets.last_text_slots} slots in {enc_buckets.last_passes} passes "
          f"bucketed; single {b} x {ctx}")
    med = {m: statistics.median(v) for m, v in times.items()}
    for m, v in med.items():
        print(f"{m}: median {v:.3f} s/step ({clock}) over {a.steps} steps "
              f"({', '.join(f'{x:.2f}' for x in times[m])})")
    print(f"buckets_vs_single={med['buckets'] / med['single']:.3f}")
    print(f"seven_vs_single={med['seven'] / med['single']:.3f} naive_vs_single={med['naive'] / med['single']:.3f}")


if __name__ == "__main__":
    main()
