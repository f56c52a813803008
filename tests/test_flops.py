"""gcl.flops: the counting convention against open_clip's published profile, the training-step count against
FLOPs written out from the layer shapes, the peak table's matching rule, and the meter's arithmetic.

References: open_clip's ``docs/model_profile.csv`` (ViT-B-16: gflops 41.09 = image_gflops 35.13 +
text_gflops 5.96, one forward at batch 1, text at the full 77-token context) and the matmul shapes of a
transformer block, written here independently of torch's FLOP formulas.
"""
from __future__ import annotations

import math

import open_clip
import pytest
import torch

from gcl.flops import StepFlops, compute_dtype, count_flops, device_peak_tflops
from gcl.model import FieldEncoder, build_model

# open_clip docs/model_profile.csv, row ViT-B-16: image_gflops, text_gflops, gflops
OPEN_CLIP_VIT_B16 = {"image": 35.13, "text": 5.96, "total": 41.09}


def _vit_b16_text_on_cpu_image_on_meta() -> torch.nn.Module:
    """open_clip's ViT-B-16 built on the meta device (no memory, no init time); the text tower's parts are then
    given real (zero) CPU storage, because the FieldEncoder deduplicates and packs actual token rows. FLOPs
    depend on shapes only, so the weights' values do not matter."""
    with torch.device("meta"):  # open_clip's own device="meta" would still run the random init on CPU first
        model = open_clip.create_model("ViT-B-16", device="meta")
    visual, model.visual = model.visual, torch.nn.Identity()
    model.to_empty(device="cpu")
    model.visual = visual
    with torch.no_grad():
        for p in model.parameters():
            if p.device.type == "cpu":
                p.zero_()
    return model.eval()


def test_vit_b16_forward_matches_open_clip_published_profile():
    """One image (224 px) and one text row of 77 real tokens (so the real-length packed pass runs the full
    context, open_clip's profiling convention), through gcl's FieldEncoder, in eval mode with grad enabled
    (as open_clip's profiler runs). The image tower runs on meta (attention as math bmm), the text on CPU
    (attention as CPU's fused kernel, counted by gcl.flops's added formula): both within 2% of the profile."""
    model = _vit_b16_text_on_cpu_image_on_meta()
    enc = FieldEncoder(model, real_length=True, pad_id=0, context_length=77, text_packing="prefix")
    row = torch.tensor([[49406, *range(1000, 1075), 49407]])  # start, 75 words, end: 77 real tokens
    one = torch.ones(1, dtype=torch.bool)
    batch = {"image": torch.empty(1, 3, 224, 224, device="meta"), "tokens": {"title": row, "colors": row},
             "present": {"image": one, "title": one, "colors": one}}
    _, image = count_flops(enc, batch, ["image"])
    _, text = count_flops(enc, batch, ["title", "colors"])  # the same row in two fields is encoded once
    assert enc.last_unique_rows == 1 and enc.last_text_slots == 77
    got = {"image": image / 1e9, "text": text / 1e9, "total": (image + text) / 1e9}
    for part, ref in OPEN_CLIP_VIT_B16.items():
        assert abs(got[part] - ref) <= 0.02 * ref, (part, got[part], ref)


def _block_flops(tokens: int, width: int, seqs: int = 1) -> tuple[int, int]:
    """Forward FLOPs (2 per multiply-add) of one pre-norm transformer block over ``seqs`` sequences of
    ``tokens``: (matmuls with weights: qkv 3w^2 + out w^2 + mlp 8w^2 per token; attention QK^T and PV)."""
    linear = 2 * seqs * tokens * 12 * width * width
    attention = 2 * 2 * seqs * tokens * tokens * width
    return linear, attention


def test_training_step_count_matches_layer_shapes_with_patch_dropout_and_dedup():
    """gcl-tiny, train mode, forward + backward of one step: 2 images (64 px, patch 8, patch dropout 0.5 ->
    1 + 32 tokens) and one 9-token text row used by two fields and both samples (encoded once).
    Backward per torch's rules: a weight matmul 2x its forward (input and weight gradients), the patch conv 1x
    (the images need no gradient), fused attention 2.5x (its kernels recompute the scores)."""
    torch.manual_seed(0)
    bundle = build_model("gcl-tiny", patch_dropout=0.5)
    bundle.model.train()
    w, layers, d, b = 128, 3, 128, 2
    img_tokens = 1 + int(64 * 0.5)
    conv = 2 * b * 64 * (3 * 8 * 8) * w
    lin, att = _block_flops(img_tokens, w, seqs=b)
    image_fwd = conv + layers * (lin + att) + 2 * b * w * d
    image_bwd = conv + layers * (2 * lin + 2.5 * att) + 2 * 2 * b * w * d
    row = bundle.tokenizer(["red cotton midi dress with long sleeves"])
    n = int((row != 0).sum())
    row = row[:, :n].repeat(b, 1)
    lin, att = _block_flops(n, w)
    text_fwd = layers * (lin + att) + 2 * w * d
    text_bwd = layers * (2 * lin + 2.5 * att) + 2 * 2 * w * d
    ones = torch.ones(b, dtype=torch.bool)
    batch = {"image": torch.randn(b, 3, 64, 64), "tokens": {"title": row, "colors": row},
             "present": {"image": ones, "title": ones, "colors": ones}}
    enc = bundle.field_encoder()

    def step():
        out = enc(batch, ["image", "title", "colors"])
        sum(v.pow(2).sum() for v in out.values()).backward()

    _, flops = count_flops(step)
    assert enc.last_unique_rows == 1 and enc.last_text_slots == n
    assert flops == image_fwd + image_bwd + text_fwd + text_bwd


def test_peak_table_matching_and_dtype():
    """Names as torch.cuda.get_device_name() reports them; variants must not fall into a family's row."""
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert device_peak_tflops("NVIDIA H100 PCIe", "bf16") < device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16")
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert device_peak_tflops("NVIDIA A10", "bf16") == 125.0
    assert device_peak_tflops("NVIDIA A10G", "bf16") is None  # not an A10, not listed
    assert device_peak_tflops("NVIDIA L40", "bf16") != device_peak_tflops("NVIDIA L4", "bf16")
    assert device_peak_tflops("NVIDIA L40S", "bf16") != device_peak_tflops("NVIDIA L40", "bf16")
    assert device_peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 tensor cores
    assert device_peak_tflops("Some Future GPU", "bf16") is None
    with pytest.raises(ValueError, match="dtype"):
        device_peak_tflops("NVIDIA H200", "int8")
    assert compute_dtype("bf16") == "bf16" and compute_dtype("no", "pure_fp16") == "fp16"
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert compute_dtype("no") == "fp32"
        torch.set_float32_matmul_precision("high")
        assert compute_dtype("no") == "tf32"
    finally:
        torch.set_float32_matmul_precision(prev)


def test_step_meter_counts_once_then_converts_rates():
    calls = []

    def step(x):
        calls.append(x)
        return torch.ones(4, 8) @ torch.ones(8, 2)  # 2 * 4 * 8 * 2 = 128 FLOPs

    meter = StepFlops(peak_tflops=2e-9)
    assert meter.rates(1.0) == {}
    meter.run(step, 1)
    meter.run(step, 2)
    assert calls == [1, 2] and meter.flops_per_step == 128
    r = meter.rates(10.0)
    assert math.isclose(r["tflops_per_s"], 1280 / 1e12) and math.isclose(r["mfu"], 1280 / 1e12 / 2e-9)
    no_peak = StepFlops(None)
    no_peak.run(step, 3)
    assert set(no_peak.rates(1.0)) == {"tflops_per_s"}
    with pytest.raises(ValueError, match="peak_tflops"):
        StepFlops(0.0)
