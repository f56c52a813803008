"""Does the seven-field GCL loss beat plain title<->image InfoNCE? A controlled study on the synthetic catalog.

Arms (same initial weights, same data order, same step budget; only the loss changes):
  clip_title          title <-> image InfoNCE: the baseline (OpenCLIP's objective)
  seven_field         GCL seven-field loss (description, title, colors, materials, categories, details, keywords)
  seven_field_nodup   the same without duplicate-aware targets (products sharing "black" are negatives)
  siglip_seven_field  the seven terms with the pairwise sigmoid loss
  siglip_seven_field_nodup  the same without duplicate-aware labels (shared values labelled negative)
  seven_field_fused   the seven_field models, evaluated with documents = 0.9 image + 0.1 title everywhere

Why a SigLIP no-duplicates arm too: with the softmax (CLIP) loss, duplicates by identical text change
nothing. Rows with the same string have identical logits, so the one-hot cross entropies of k duplicate rows
sum to exactly the soft-target ones (and in the other direction their columns are identical), so
`seven_field_nodup` must equal `seven_field` (a check that the study can fail). The pairwise sigmoid loss
labels each pair on its own, so there "black" vs another black product's picture really is a wrong label.

Training logs in-loop metrics on the val split (the curves; any choice of weights or hyperparameters is made
there); the final numbers come from the test split and the held-out-combination split, never used before.
Every arm runs for each seed (trainer.seed: initial weights and data order); the table gives mean, spread
(standard deviation over seeds) and the relative change of each arm over the baseline, in the shape of
Marqo's tables.

  python benchmarks/study_multifield.py            # the full study (3 seeds), updates BENCHMARKS.md
  python benchmarks/study_multifield.py --quick    # one seed, few steps: the same path end to end (tests)
  python benchmarks/study_multifield.py --scale 4  # 4x the products and steps
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine  # noqa: E402

ARMS = {
    "clip_title": ["loss=clip_title"],
    "seven_field": ["loss=seven_field"],
    "seven_field_nodup": ["loss=seven_field", "loss.duplicates=false"],
    "siglip_seven_field": ["loss=siglip_seven_field"],
    "siglip_seven_field_nodup": ["loss=siglip_seven_field", "loss.duplicates=false"],
}
EVAL_ONLY_ARMS = {"seven_field_fused": "seven_field"}
BASELINE = "clip_title"
# (task, metric) pairs reported in the table, in Marqo's order: text-to-image, then attribute-to-product.
REPORT = [
    ("text2image_description", "recall@1"), ("text2image_description", "recall@10"),
    ("text2image_description", "mrr@10"),
    ("text2image_title", "recall@1"), ("text2image_title", "recall@10"), ("text2image_title", "mrr@10"),
    ("category2product", "precision@1"), ("category2product", "precision@10"), ("category2product", "mrr@10"),
    ("subcategory2product", "precision@1"), ("subcategory2product", "precision@10"),
    ("subcategory2product", "mrr@10"),
    ("color2product", "precision@1"), ("color2product", "precision@10"), ("color2product", "mrr@10"),
    ("material2product", "precision@1"), ("material2product", "precision@10"), ("material2product", "mrr@10"),
    ("heldout_text2image_title", "recall@1"), ("heldout_text2image_title", "recall@10"),
    ("heldout_subcategory2product", "precision@1"), ("heldout_subcategory2product", "precision@10"),
]
CURVE_METRICS = ["synthetic/avg/text2image/recall@10", "synthetic/avg/attribute2product/precision@10"]
MARK_START, MARK_END = "<!-- study:start -->", "<!-- study:end -->"


def train(arm: str, seed: int, run_dir: Path, a: argparse.Namespace) -> None:
    if (run_dir / "checkpoints" / "latest.json").exists():
        step = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
        if step >= a.steps:
            return  # finished earlier (the study can be resumed)
    cmd = [sys.executable, "train.py", *ARMS[arm], f"trainer.seed={seed}", f"trainer.max_steps={a.steps}",
           f"trainer.eval_every={a.eval_every}", "trainer.save_every=0", "trainer.log_every=10",
           f"data.synthetic.products={a.products}", f"data.batch_size={a.batch_size}",
           "logger.wandb.mode=disabled", "logger.progress=false", "export.enabled=false",
           "eval.gallery.enabled=false", f"hydra.run.dir={run_dir}", "trainer.resume=auto"]
    if a.cache_dir:
        cmd.append(f"data.synthetic.cache_dir={a.cache_dir}")
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def test_suite(fused: bool):
    """The synthetic eval suite moved from the val split to the test split (held-out split kept)."""
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import gcl.config  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["eval=synthetic", "eval.gallery.enabled=false"])
    ev = copy.deepcopy(cfg.eval)
    OmegaConf.set_struct(ev, False)
    for t in ev.tasks:
        if t.split == "val":
            t.split = "test"
        t.num_queries = 0  # every query of the split
        if fused and t.kind == "retrieval" and list(t.doc.fields) == ["image"]:
            t.doc.fields, t.doc.weights = ["image", "title"], [0.9, 0.1]
    return cfg, ev


def evaluate(run_dir: Path, fused: bool, a: argparse.Namespace) -> dict[str, float]:
    from gcl.data import resolve_splits
    from gcl.eval.run import evaluate_model, load_model_for_eval

    cfg, ev = test_suite(fused)
    cfg.data.synthetic.products = a.products
    if a.cache_dir:
        cfg.data.synthetic.cache_dir = a.cache_dir
    bundle = load_model_for_eval(_model_node(cfg, run_dir), device="cpu")
    return evaluate_model(bundle, ev, splits=resolve_splits(cfg.data), context_length=dict(cfg.data.context_length),
                          default_context_length=cfg.data.default_context_length, list_sep=cfg.data.list_sep)


def _model_node(cfg, run_dir: Path):
    from omegaconf import OmegaConf

    node = copy.deepcopy(cfg.model)
    OmegaConf.set_struct(node, False)
    node.checkpoint = str(run_dir)
    return node


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {m: [] for m in CURVE_METRICS}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for m in CURVE_METRICS:
            if f"eval/{m}" in row:
                out[m].append((row["step"], row[f"eval/{m}"]))
    return out


def summarize(results: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """arm -> "task/metric" -> {mean, sd, rel} (rel: relative change of the mean over the baseline's mean)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for arm, by_seed in results.items():
        table[arm] = {}
        for task, metric in REPORT:
            key = f"synthetic/{task}/{metric}"
            vals = [m[key] for m in by_seed.values() if key in m]
            if not vals:
                continue
            table[arm][f"{task}/{metric}"] = {"mean": statistics.fmean(vals),
                                              "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    base = table.get(BASELINE, {})
    for arm in table:
        for k, v in table[arm].items():
            b = base.get(k, {}).get("mean")
            v["rel"] = (v["mean"] / b - 1.0) if b else float("nan")
    return table


def markdown(table: dict, a: argparse.Namespace, seconds: float) -> str:
    arms = list(table)
    lines = [f"Test split of the synthetic catalog ({a.products} products, seed 0), tiny ViT (`gcl-tiny`), "
             f"{a.steps} steps x batch {a.batch_size}, seeds {a.seeds}; mean ± sd over seeds, and in brackets "
             f"the relative change over `{BASELINE}`. Machine: {machine()}. Study wall time {seconds / 60:.1f} min.",
             "", "| task / metric | " + " | ".join(f"`{x}`" for x in arms) + " |",
             "|---|" + "---|" * len(arms)]
    for task, metric in REPORT:
        k = f"{task}/{metric}"
        cells = []
        for arm in arms:
            v = table[arm].get(k)
            if v is None:
                cells.append("-")
            elif arm == BASELINE:
                cells.append(f"{v['mean']:.3f} ± {v['sd']:.3f}")
            else:
                cells.append(f"{v['mean']:.3f} ± {v['sd']:.3f} [{v['rel'] * 100:+.0f}%]")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(all_curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(6 * len(CURVE_METRICS), 4))
    for ax, m in zip(axes, CURVE_METRICS):
        for arm, per_seed in all_curves.items():
            steps = sorted({s for c in per_seed for s, _ in c[m]})
            means = [statistics.fmean([v for c in per_seed for s, v in c[m] if s == st]) for st in steps]
            ax.plot(steps, means, marker="o", label=arm)
        ax.set_title(m.replace("synthetic/", "") + " (val)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 40 steps, 600 products (<= 5 min)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--products", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--scale", type=float, default=1.0, help="multiply products and steps")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results/study[_quick])")
    p.add_argument("--cache-dir", default=None, help="synthetic catalog cache (default: the trainer's)")
    p.add_argument("--no-update", action="store_true", help="do not rewrite the study section of BENCHMARKS.md")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.eval_every, a.products, a.batch_size = a.seeds[:1], 40, 20, 600, 32
    a.products, a.steps = int(a.products * a.scale), int(a.steps * a.scale)
    out = Path(a.out or ROOT / "benchmarks" / "results" / ("study_quick" if a.quick else "study"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, dict[int, dict[str, float]]] = {arm: {} for arm in [*ARMS, *EVAL_ONLY_ARMS]}
    all_curves: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in a.seeds:
        for arm in ARMS:
            run_dir = out / "runs" / f"{arm}-seed{seed}"
            t = time.perf_counter()
            train(arm, seed, run_dir, a)
            results[arm][seed] = evaluate(run_dir, fused=False, a=a)
            all_curves[arm].append(curves(run_dir))
            for fused_arm, src in EVAL_ONLY_ARMS.items():
                if src == arm:
                    results[fused_arm][seed] = evaluate(run_dir, fused=True, a=a)
            print(f"[study] {arm} seed {seed}: {time.perf_counter() - t:.0f}s", flush=True)
    seconds = time.perf_counter() - t0
    table = summarize(results)
    md = markdown(table, a, seconds)
    plot(all_curves, out / "curves.png")
    raw = {"settings": vars(a), "machine": machine(), "seconds": seconds, "per_seed": results, "summary": table,
           "curves": all_curves}
    (out / "study.json").write_text(json.dumps(raw, indent=1))
    (out / "table.md").write_text(md + "\n")
    if not a.quick and not a.no_update:
        bench = ROOT / "BENCHMARKS.md"
        text = bench.read_text()
        if MARK_START in text and MARK_END in text:
            head, rest = text.split(MARK_START, 1)
            _, tail = rest.split(MARK_END, 1)
            bench.write_text(f"{head}{MARK_START}\n{md}\n\n![eval curves](benchmarks/results/study/curves.png)\n"
                             f"{MARK_END}{tail}")
    print(md)
    return raw


if __name__ == "__main__":
    main()
