"""Optimizer-state memory of LoRA against full fine-tuning, measured: AdamW's state tensors after one step.

For each arm the model is built (random init: the architecture decides the sizes, not the weights), one
AdamW step runs on a small batch of both towers, and the bytes of every tensor in ``optimizer.state`` are
summed (``exp_avg``, ``exp_avg_sq`` and the per-parameter ``step``). Trainable parameters and gradient bytes
are reported beside them.

  python benchmarks/bench_lora_memory.py                  # ViT-B-16: full vs LoRA r=8 and r=16 (both towers)
  python benchmarks/bench_lora_memory.py --model gcl-tiny # seconds; what the tests run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result  # noqa: E402

TARGETS = ["in_proj", "out_proj", "c_fc", "c_proj"]


def lora_cfg(rank: int) -> dict | None:
    if rank == 0:
        return None
    tower = {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "targets": TARGETS}
    return {"image": dict(tower), "text": dict(tower), "train_logit_scale": True}


def measure(model_name: str, rank: int, batch: int) -> dict:
    from gcl.model import build_model
    from gcl.optim import build_optimizer

    torch.manual_seed(0)
    b = build_model(model_name, lora=lora_cfg(rank), text_packing="buckets")
    m = b.model
    opt = build_optimizer(m, lr=1e-4, fused=False)
    size = b.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    x = torch.randn(batch, 3, size, size)
    tok = b.tokenizer(["a red cotton summer dress with short sleeves"] * batch)
    t0 = time.perf_counter()
    img, txt = m.encode_image(x, normalize=True), m.encode_text(tok, normalize=True)
    loss = -(m.logit_scale.exp() * img @ txt.T).diag().mean()
    loss.backward()
    opt.step()
    step_s = time.perf_counter() - t0
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    grads = sum(p.grad.numel() * p.grad.element_size() for p in m.parameters() if p.grad is not None)
    return {"model": model_name, "arm": "full" if rank == 0 else f"lora_r{rank}",
            "params": sum(p.numel() for p in m.parameters()),
            "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "optimizer_state_bytes": state, "grad_bytes": grads, "step_s": round(step_s, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    rows = [measure(a.model, r, a.batch) for r in [0, *a.ranks]]
    full = rows[0]["optimizer_state_bytes"]
    for r in rows:
        r["state_vs_full"] = round(r["optimizer_state_bytes"] / full, 5)
        print(f"{r['model']} {r['arm']:>9}: trainable {r['trainable'] / 1e6:8.3f}M of {r['params'] / 1e6:.1f}M, "
              f"optimizer state {r['optimizer_state_bytes'] / 2**20:9.2f} MiB ({100 * r['state_vs_full']:.2f}% of "
              f"full), gradients {r['grad_bytes'] / 2**20:8.2f} MiB")
    payload = {"rows": rows}
    if not a.no_save:
        print("saved", save_result(f"lora_memory_{a.model}", payload))
    return payload


if __name__ == "__main__":
    main()
