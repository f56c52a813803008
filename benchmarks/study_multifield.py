"""Study v2: fine-tuning the shipped base model, does the seven-field GCL loss beat plain title<->image
InfoNCE on the fashion catalog, and what does each loss cost in retention of the base's general knowledge?

Every arm starts from the same pretrained base (gcl/assets/gcl-base-world: pretrained from scratch on the
general world, `experiment=pretrain_world`), as users fine-tune laion2b / webli weights, with the same data order
and the same step budget; only the loss changes:
  clip_title          title <-> image InfoNCE: the baseline (OpenCLIP's objective)
  seven_field         GCL seven-field loss (description, title, colors, materials, categories, details, keywords)
  siglip_seven_field  the seven terms with the pairwise sigmoid loss (from the same CLIP-trained base: a
                      logit bias is added at model.logit_bias_init; no sigmoid-loss base is pretrained)
  seven_field_fused   the seven_field models, evaluated with documents = 0.9 image + 0.1 title everywhere
Opt-in (--arms): seven_field_nodup, siglip_seven_field_nodup (the same without duplicate-aware targets; with
the softmax loss, duplicates by identical text change nothing, so seven_field_nodup must equal seven_field).

Training logs in-loop metrics on the catalog's val split (the curves; any choice is made there); the final
numbers come from the test split and the held-out-combination split, never used before, and from the world
retention suite (eval=world: zero-shot class / colour, text->image on the world's test and held-out splits).
The base itself is evaluated the same way: each arm's numbers are given as the relative change over the base
(domain gain, retention), and the goal checks compare seven_field with clip_title.

  python benchmarks/study_multifield.py            # the full study (3 seeds), updates BENCHMARKS.md
  python benchmarks/study_multifield.py --quick    # one seed, few steps: the same path end to end (tests)
  python benchmarks/study_multifield.py --seeds 0 --steps 150   # a reduced budget
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine  # noqa: E402

sys.path.insert(0, str(ROOT))

ALL_ARMS = {
    "clip_title": ["loss=clip_title"],
    "seven_field": ["loss=seven_field"],
    "siglip_seven_field": ["loss=siglip_seven_field"],
    "seven_field_nodup": ["loss=seven_field", "loss.duplicates=false"],
    "siglip_seven_field_nodup": ["loss=siglip_seven_field", "loss.duplicates=false"],
}
DEFAULT_ARMS = ["clip_title", "seven_field", "siglip_seven_field"]
EVAL_ONLY_ARMS = {"seven_field_fused": "seven_field"}
BASELINE = "clip_title"
BASE = "base"  # the starting model, evaluated like an arm (one value: no training, no seed)
# Reported metrics, in Marqo's order: text-to-image, attribute-to-product, held-out; then retention.
REPORT = [f"synthetic/{k}" for k in (
    "text2image_description/recall@1", "text2image_description/recall@10", "text2image_description/mrr@10",
    "text2image_title/recall@1", "text2image_title/recall@10", "text2image_title/mrr@10",
    "category2product/precision@1", "category2product/precision@10", "category2product/mrr@10",
    "subcategory2product/precision@1", "subcategory2product/precision@10", "subcategory2product/mrr@10",
    "color2product/precision@1", "color2product/precision@10", "color2product/mrr@10",
    "material2product/precision@1", "material2product/precision@10", "material2product/mrr@10",
    "heldout_text2image_title/recall@1", "heldout_text2image_title/recall@10",
    "heldout_subcategory2product/precision@1", "heldout_subcategory2product/precision@10")] + [
    f"world/{k}" for k in (
        "zeroshot_class/f1_weighted", "zeroshot_color/f1_weighted", "text2image/recall@1", "text2image/recall@10",
        "heldout_zeroshot_class/f1_weighted", "heldout_text2image/recall@10", "avg/zeroshot/f1_weighted",
        "avg/text2image/avg_recall")]
# The goal: seven_field vs clip_title on these P@1 (>= +10% relative), text->image (>= 0%), retention
# (every world/avg metric within 5% of the base).
GOAL_ATTRIBUTES = [f"synthetic/{t}/precision@1" for t in ("category2product", "color2product", "material2product")]
GOAL_TEXT2IMAGE = ["synthetic/text2image_title/recall@10", "synthetic/text2image_description/recall@10"]
GOAL_RETENTION = ["world/avg/zeroshot/f1_weighted", "world/avg/text2image/avg_recall"]
CURVE_METRICS = ["synthetic/avg/text2image/recall@10", "synthetic/avg/attribute2product/precision@10"]
MARK_START, MARK_END = "<!-- study:start -->", "<!-- study:end -->"


def train(arm: str, seed: int, run_dir: Path, a: argparse.Namespace) -> None:
    if (run_dir / "checkpoints" / "latest.json").exists():
        step = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
        if step >= a.steps:
            return  # finished earlier (the study can be resumed)
    from gcl.assets import BASE_WEIGHTS

    cmd = [sys.executable, "train.py", "model=base", f"model.pretrained={BASE_WEIGHTS}", f"optim.lr={a.lr}",
           f"sched.warmup_steps={a.warmup}", f"trainer.threads={a.threads}", *ALL_ARMS[arm], f"trainer.seed={seed}", f"trainer.max_steps={a.steps}",
           f"trainer.eval_every={a.eval_every}", "trainer.save_every=0", "trainer.log_every=10",
           f"data.synthetic.products={a.products}", f"data.batch_size={a.batch_size}",
           "logger.wandb.mode=disabled", "logger.progress=false", "export.enabled=false",
           "eval.gallery.enabled=false", f"hydra.run.dir={run_dir}", "trainer.resume=auto"]
    cmd += _data_overrides(a)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def _data_overrides(a: argparse.Namespace) -> list[str]:
    out = [f"data.synthetic.cache_dir={a.cache_dir}"] if a.cache_dir else []
    if a.world_cache_dir:
        out.append(f"data.world.cache_dir={a.world_cache_dir}")
    if a.world_samples:
        out.append(f"data.world.samples={a.world_samples}")
    return out


def suites(fused: bool, a: argparse.Namespace):
    """The evaluate config, the synthetic suite moved from the val split to the test split (held-out split kept),
    and the world retention suite."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import gcl.config  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["eval=synthetic", "eval.gallery.enabled=false",
                                                          f"data.synthetic.products={a.products}",
                                                          *_data_overrides(a)])
        world = compose(config_name="evaluate", overrides=["eval=world", "eval.gallery.enabled=false"]).eval
    ev = copy.deepcopy(cfg.eval)
    OmegaConf.set_struct(ev, False)
    for t in ev.tasks:
        if t.split == "val":
            t.split = "test"
        t.num_queries = 0  # every query of the split
        if fused and t.kind == "retrieval" and list(t.doc.fields) == ["image"]:
            t.doc.fields, t.doc.weights = ["image", "title"], [0.9, 0.1]
    return cfg, ev, world


def evaluate(run_dir: Path | None, fused: bool, a: argparse.Namespace) -> dict[str, float]:
    """Domain (test split) and retention (world) metrics of a run's final model, or of the base (None)."""
    from omegaconf import OmegaConf

    from gcl.assets import BASE_MODEL_NAME, BASE_WEIGHTS
    from gcl.data import resolve_splits
    from gcl.eval.run import evaluate_model, load_model_for_eval

    cfg, ev, world = suites(fused, a)
    node = copy.deepcopy(cfg.model)
    OmegaConf.set_struct(node, False)
    if run_dir is None:
        node.name, node.pretrained = BASE_MODEL_NAME, str(BASE_WEIGHTS)
    else:
        node.checkpoint = str(run_dir)
    bundle = load_model_for_eval(node, device="cpu")
    d = cfg.data
    out = {}
    for suite in (ev, world):
        splits = resolve_splits(d, extra=[t.split for t in suite.tasks])
        out.update(evaluate_model(bundle, suite, splits=splits, context_length=dict(d.context_length),
                                  default_context_length=d.default_context_length, list_sep=d.list_sep))
    return out


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {m: [] for m in CURVE_METRICS}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for m in CURVE_METRICS:
            if f"eval/{m}" in row:
                out[m].append((row["step"], row[f"eval/{m}"]))
    return out


def summarize(results: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """arm -> metric -> {mean, sd, n, rel_base, rel_baseline}: relative changes of the mean over the base's value
    and over the baseline arm's mean."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for arm, by_seed in results.items():
        table[arm] = {}
        for key in REPORT:
            vals = [m[key] for m in by_seed.values() if key in m]
            if vals:
                table[arm][key] = {"mean": statistics.fmean(vals),
                                   "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    for arm in table:
        for k, v in table[arm].items():
            for ref, name in ((BASE, "rel_base"), (BASELINE, "rel_baseline")):
                b = table.get(ref, {}).get(k, {}).get("mean")
                v[name] = (v["mean"] / b - 1.0) if b else float("nan")
    return table


def goals(table: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, str, bool | None]]:
    """The issue's goal, checked on the means: (what, measured, met). None where an arm is missing."""
    seven = table.get("seven_field", {})
    out: list[tuple[str, str, bool | None]] = []
    for k in GOAL_ATTRIBUTES:
        r = seven.get(k, {}).get("rel_baseline")
        out.append((f"seven_field vs clip_title, {k}: >= +10%", "-" if r is None else f"{r:+.1%}",
                    None if r is None else r >= 0.10))
    for k in GOAL_TEXT2IMAGE:
        r = seven.get(k, {}).get("rel_baseline")
        out.append((f"seven_field vs clip_title, {k}: >= 0%", "-" if r is None else f"{r:+.1%}",
                    None if r is None else r >= 0.0))
    for k in GOAL_RETENTION:
        r = seven.get(k, {}).get("rel_base")
        out.append((f"seven_field retention, {k}: within 5% of the base", "-" if r is None else f"{r:+.1%}",
                    None if r is None else r >= -0.05))
    return out


def _cell(v: dict[str, float] | None, arm: str) -> str:
    if v is None:
        return "-"
    if arm == BASE:
        return f"{v['mean']:.3f}"
    rel = "base 0" if math.isnan(v["rel_base"]) else f"{v['rel_base'] * 100:+.0f}%"
    return f"{v['mean']:.3f} ± {v['sd']:.3f} [{rel}]"


def markdown(table: dict, a: argparse.Namespace, seconds: float) -> str:
    arms = list(table)
    lines = [f"Every arm fine-tunes the shipped base (`gcl-base`, gcl/assets/gcl-base-world) for {a.steps} steps x "
             f"batch {a.batch_size} at lr {a.lr} (warmup {a.warmup}, {a.threads} thread(s)) on the synthetic catalog ({a.products} "
             f"products); seeds {a.seeds}. Domain: the catalog's test and held-out splits; retention: the world "
             f"suite (`eval=world`). Mean ± sd over seeds, in brackets the relative change over the base "
             f"(column `base`). Machine: {machine()}. Study wall time {seconds / 60:.1f} min.",
             "", "| metric | " + " | ".join(f"`{x}`" for x in arms) + " |", "|---|" + "---|" * len(arms)]
    for k in REPORT:
        lines.append(f"| {k} | " + " | ".join(_cell(table[arm].get(k), arm) for arm in arms) + " |")
    lines += ["", "Goal (issue 14), on the means:", "", "| check | measured | met |", "|---|---:|---|"]
    lines += [f"| {what} | {got} | {'-' if ok is None else ('yes' if ok else 'no')} |"
              for what, got, ok in goals(table)]
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
    p.add_argument("--quick", action="store_true", help="1 seed, 20 steps, 600 products, small world (tests)")
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ALL_ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--products", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4, help="fine-tuning lr (the demo's, conf/experiment/demo.yaml)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in training and evaluation (1: fastest on a busy 2-core machine)")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results/study[_quick])")
    p.add_argument("--cache-dir", default=None, help="synthetic catalog cache (default: the trainer's)")
    p.add_argument("--world-cache-dir", default=None, help="world cache (default: the trainer's)")
    p.add_argument("--world-samples", type=int, default=None, help="world size (default: data.world.samples)")
    p.add_argument("--no-update", action="store_true", help="do not rewrite the study section of BENCHMARKS.md")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.eval_every, a.products, a.batch_size = a.seeds[:1], 20, 10, 600, 32
        a.world_samples = a.world_samples or 1200
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out or ROOT / "benchmarks" / "results" / ("study_quick" if a.quick else "study"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, dict[int, dict[str, float]]] = {BASE: {0: evaluate(None, fused=False, a=a)}}
    results.update({arm: {} for arm in [*a.arms, *(e for e, src in EVAL_ONLY_ARMS.items() if src in a.arms)]})
    all_curves: dict[str, list[dict]] = {arm: [] for arm in a.arms}
    for seed in a.seeds:
        for arm in a.arms:
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
           "goals": goals(table), "curves": all_curves}
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
