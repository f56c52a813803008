"""FLOPs accounting: count a training step's FLOPs once, then report TFLOP/s and MFU; the GPU peak table.

Lives here: :func:`flop_counter` / :func:`count_flops` (torch's ``FlopCounterMode`` plus the CPU attention
formula it lacks), :data:`PEAK_TFLOPS` and :func:`device_peak_tflops` (dense datasheet peaks of common
accelerators), :func:`compute_dtype` (which peak applies to a run), and :class:`StepFlops`, the trainer's
meter. Not here: timing (the trainer's samples/s meter, ``gcl.log.Throughput``), logging (``gcl.log``).

**Counting convention** (the one behind open_clip's ``docs/model_profile.csv``, reproduced in
``tests/test_flops.py``: ViT-B-16 at batch 1 gives image 35.13 + text 5.96 = 41.09 GFLOPs there and here):

* torch's ``FlopCounterMode``: **2 FLOPs per multiply-add** of matrix products (``mm``, ``addmm``, ``bmm``),
  convolutions and attention (``Q K^T`` and ``P V``, the full ``L x L`` even under a causal mask). Norms,
  softmax, activations, embedding lookups, elementwise ops and the optimizer update count 0. (open_clip's
  ``gflops`` column is this count / 1e9 per sample; fvcore's older "flops" were multiply-adds, half of it.)
* open_clip profiles one **forward** in eval mode with the text at the **full context** (77 tokens, padding
  included). gcl counts **what a training step runs**: forward and backward (torch's formulas: a matmul's
  backward is 2x its forward when both inputs need a gradient, a frozen tower has no weight gradients, a
  fused-attention backward is 5 ``bmm`` as torch counts it because those kernels recompute the scores), the
  text rows at their real length through the FieldEncoder's deduplicated, prefix-packed pass (each distinct
  prefix once), patch dropout's shorter image sequences, and the loss's similarity matmuls.
* Recomputation is counted as run: with ``model.grad_checkpointing`` (forward recomputed in backward) or
  ``trainer.accum_steps > 1`` (GradCache's extra no-grad feature pass) the figure is hardware FLOPs
  utilisation in PaLM's terms, not model FLOPs utilisation; without them the two are the same.

torch's counter has no formula for CPU's fused attention kernel (``_scaled_dot_product_flash_attention_for_cpu``
and its backward), so out of the box it counts attention as 0 on CPU; :func:`flop_counter` adds the formula
torch uses for the CUDA kernels, so CPU and GPU counts agree.

**MFU** = achieved FLOP/s per device / the device's dense peak for the step's matmul dtype
(:func:`compute_dtype`: bf16/fp16 autocast or weights, else tf32 when enabled, else fp32). Sparse
("2:4") peaks are never used. Text FLOPs vary with each batch's unique rows; the count is the first step's,
averaged over ranks.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

log = logging.getLogger(__name__)

_aten = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


_CPU_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU fused attention (see the module docstring)."""
    return FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)`` once under :func:`flop_counter`; return its result and the FLOPs it ran
    (everything inside, a backward included when ``fn`` runs one)."""
    with flop_counter() as counter:
        result = fn(*args, **kwargs)
    return result, int(counter.get_total_flops())


# Dense (no 2:4 sparsity) datasheet peaks per device, TFLOP/s, by matmul dtype. Patterns are matched in order
# against torch.cuda.get_device_name(), so variants come before the family name (H100 PCIe before H100 SXM).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"\bB200\b", {"bf16": 2250.0, "fp16": 2250.0}),
    (r"\bH200 NVL\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH200\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bH100 NVL\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH100 PCIe\b", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"\bH100\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bL40S\b", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bRTX 4090\b", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"\bRTX 3090\b", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"\bV100\b", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", {"fp16": 65.0, "fp32": 8.1}),
    (r"\bMI300X\b", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
]
DTYPES = ("bf16", "fp16", "tf32", "fp32")


def device_peak_tflops(device_name: str, dtype: str) -> float | None:
    """The table's dense peak (TFLOP/s) for a device name and matmul dtype, or None when not listed."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks.get(dtype)
    return None


def compute_dtype(mixed_precision: str, weights_precision: str = "fp32") -> str:
    """The dtype a step's matmuls run in: autocast's (``bf16`` / ``fp16``), else the weights' (``bf16``,
    ``pure_bf16``, ...), else ``tf32`` when torch allows TF32 matmuls, else ``fp32``."""
    for p in (mixed_precision, weights_precision):
        for d in ("bf16", "fp16"):
            if d in p:
                return d
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def resolve_peak_tflops(configured: float | None, device: torch.device, dtype: str) -> float | None:
    """``trainer.peak_tflops`` when set, else the table's peak for a CUDA device (None on CPU / unlisted;
    logged once so a missing ``mfu`` is explained)."""
    if configured is not None:
        return float(configured)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = device_peak_tflops(name, dtype) if device.type == "cuda" else None
    if peak is None:
        log.info("mfu not logged: no %s peak known for %s; set trainer.peak_tflops=<dense TFLOP/s per device>",
                 dtype, name)
    return peak


class StepFlops:
    """Counts the FLOPs of the first step it runs, then converts step rates into ``tflops_per_s`` / ``mfu``.

    ``run(step, *args)`` calls ``step(*args)``; the first call runs under :func:`flop_counter` and its count
    is averaged over the ranks of an initialized process group (one all-reduce, so every rank must count the
    same step: the first one of the process). ``rates(steps_per_s)`` -> ``{"tflops_per_s": per-device
    TFLOP/s, "mfu": fraction of ``peak_tflops``}`` (``mfu`` only with a peak; empty before the count).
    """

    def __init__(self, peak_tflops: float | None) -> None:
        if peak_tflops is not None and not peak_tflops > 0:
            raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
        self.peak_tflops = peak_tflops
        self.flops_per_step: float | None = None

    def run(self, step: Callable[..., Any], *args: Any) -> Any:
        if self.flops_per_step is not None:
            return step(*args)
        result, flops = count_flops(step, *args)
        self.flops_per_step = _mean_over_ranks(float(flops))
        log.info("counted %.4g GFLOPs per step per device (forward + backward, as run)", self.flops_per_step / 1e9)
        return result

    def rates(self, steps_per_s: float) -> dict[str, float]:
        if self.flops_per_step is None:
            return {}
        tflops = self.flops_per_step * steps_per_s / 1e12
        out = {"tflops_per_s": tflops}
        if self.peak_tflops is not None:
            out["mfu"] = tflops / self.peak_tflops
        return out


def _mean_over_ranks(x: float) -> float:
    from gcl.distributed import all_reduce_sum, dist_or_none

    dist = dist_or_none()
    if dist is None or dist.get_world_size() == 1:
        return x
    return float(all_reduce_sum(torch.tensor([x], dtype=torch.float64))) / dist.get_world_size()
