"""Shared by the step benchmarks (gpu_vit_b16, bench_knobs): catalog texts, a batch in the trainer's format,
one-field-per-term losses, gcl's training step, and a step timer."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

SEVEN = ["description", "title", "colors", "materials", "categories", "details", "keywords"]


def texts(n: int, seed: int = 0) -> list[dict]:
    """Product text fields from the synthetic catalog's generator (realistic lengths)."""
    import numpy as np

    from gcl.data import synthetic

    rng = np.random.default_rng(seed)
    return [synthetic.make_texts(synthetic.sample_attributes(rng), rng) for _ in range(n)]


def field_text(row: dict, field: str) -> str:
    v = row.get(field, "")
    return ", ".join(v) if isinstance(v, list) else str(v or "")


def batch(bundle, rows: list[dict], fields: list[str], image_size: int, device, full_context: bool) -> dict:
    """A batch as gcl.data.batch builds it (random images); ``full_context`` keeps every row at the model's
    context length instead of trimming trailing padding."""
    from gcl.data.batch import token_row_ids

    b = len(rows)
    out = {"image": torch.randn(b, 3, image_size, image_size, device=device), "tokens": {}, "present": {},
           "text_id": {}, "item_id": torch.arange(1, b + 1, device=device),
           "score": torch.full((b,), float("nan"), device=device),
           "position": torch.full((b,), float("nan"), device=device)}
    for f in fields:
        strings = [field_text(r, f) for r in rows]
        tok = bundle.tokenizer(strings, context_length=bundle.context_length).to(device)
        if not full_context and bundle.real_length:
            keep = int((tok != bundle.pad_id).any(0).nonzero().max()) + 1
            tok = tok[:, :keep]
        out["tokens"][f] = tok
        out["present"][f] = torch.ones(b, dtype=torch.bool, device=device)
        out["text_id"][f] = token_row_ids(tok, out["present"][f], bundle.pad_id).to(device)  # as the collator
    out["present"]["image"] = torch.ones(b, dtype=torch.bool, device=device)
    return out


def terms(fields: list[str]) -> list[dict]:
    """One ``<field>_image`` term per text field, equal weights."""
    return [{"name": f"{f}_image", "left": {"fields": [f], "weights": [1.0]},
             "right": {"fields": ["image"], "weights": [1.0]}, "weight": 1.0 / len(fields)} for f in fields]


def image_size(bundle) -> int:
    size = bundle.preprocess_cfg.get("size", 224)
    return size[0] if isinstance(size, (list, tuple)) else size


def gcl_step(bundle, opt, loss_fn, data: dict, fields: list[str], autocast, encoder=None) -> Callable[[], torch.Tensor]:
    """gcl's training step on ``data``: FieldEncoder features (the bundle's encoder unless ``encoder``), the
    loss, backward, optimizer step. Returns a callable that runs one step and returns the detached loss."""
    enc = encoder if encoder is not None else bundle.field_encoder()
    model = bundle.model

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = loss_fn(enc(data, ["image", *fields]), data, model.logit_scale, getattr(model, "logit_bias", None))
        out["loss"].backward()
        opt.step()
        return out["loss"].detach()
    return step


def step_time(step: Callable[[], object], device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one call on ``clock`` (CUDA work synchronised on both sides)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = clock()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t


def time_steps(step: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Median wall seconds per call over ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        step()
    return statistics.median(step_time(step, device) for _ in range(steps))
