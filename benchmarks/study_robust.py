"""Robust fine-tuning study: which recipe keeps what the base knew and still gains on the domain?

Every arm fine-tunes the same base with the seven-field loss on the synthetic fashion catalog, for the same
step budget and data order per seed:

  full        full fine-tune at the sweep's middle lr (the reference gain), trained with an EMA beside it
  full+wise   the full arm's weights interpolated with the base (WiSE-FT), alpha chosen on val by the rule
              "best domain metric with retention >= (1 - 1%) x the base's"
  full+ema    the full arm's EMA weights (optim.ema.decay)
  llrd        layer-wise lr decay in both towers (optim.layer_decay_image/text)
  lora_r8     LoRA rank 8 on both towers (attention and MLP), adapters merged for evaluation
  soup        greedy soup (Wortsman et al. 2022) over an lr sweep (the full arm is one of its trials), on val
  pd50        the full arm with patch dropout 0.5 in training (model.patch_dropout): its samples/s and its
              effect on the metrics; only for a ViT image tower (a ResNet has no patch tokens)

Choices (alpha, soup ingredients) use the val split; the table is the test split: domain = the synthetic
suite (test and held-out combinations), retention = the retention suite (``world``: the base's own world),
each as mean ± sd over seeds with the relative change over the base and over plain full fine-tuning. The
goal line asks, per arm, for retention >= 98% of the base's and a domain gain >= 95% of full fine-tuning's.

  python benchmarks/study_robust.py            # 3 seeds, 4-trial sweep; updates BENCHMARKS.md
  python benchmarks/study_robust.py --quick    # 1 seed, few steps, 2-trial sweep: the path end to end (tests)

The base defaults to the shipped one (``gcl.assets``, architecture ``gcl-base``); ``--base FILE --model NAME``
takes any weights file of an open_clip architecture. Runs are kept in ``--out`` and reused when the study is
started again (a finished run is not retrained).
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine  # noqa: E402

sys.path.insert(0, str(ROOT))
DOMAIN = "synthetic/avg/retrieval/mrr@10"
RETENTION = "world/avg/zeroshot/f1_weighted"
# rows of the table (those the suites produce), domain first
ROWS = ["synthetic/avg/retrieval/mrr@10", "synthetic/avg/text2image/recall@1", "synthetic/avg/text2image/recall@10",
        "synthetic/avg/attribute2product/precision@1", "synthetic/heldout_text2image_title/recall@10",
        "world/avg/zeroshot/f1_weighted", "world/avg/zeroshot/accuracy", "world/avg/text2image/recall@1",
        "world/avg/text2image/mrr@10"]
ARMS = ["base", "full", "full+wise", "full+ema", "llrd", "lora_r8", "soup", "pd50"]  # pd50: ViT image towers only
MARK_START, MARK_END = "<!-- robust:start -->", "<!-- robust:end -->"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import gcl.config  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def common_overrides(a: argparse.Namespace, seed: int) -> list[str]:
    ov = ["loss=seven_field", f"model.name={a.model}", f"model.pretrained={a.base}", f"trainer.seed={seed}",
          f"trainer.max_steps={a.steps}", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=10",
          f"data.synthetic.products={a.products}", f"data.batch_size={a.batch_size}", f"data.num_workers={a.workers}",
          f"data.synthetic.image_size={a.image_size}", "logger.wandb.mode=disabled", "logger.progress=false",
          "export.enabled=false", "eval.gallery.enabled=false", f"sched.warmup_steps={max(1, a.steps // 10)}",
          f"export.select.domain_metric={DOMAIN}", "export.select.max_retention_drop=0.01"]
    if a.retention_suite != "none":
        ov += [f"export.select.suites=[{a.retention_suite}]", f"export.select.retention_metric={RETENTION}"]
    if a.cache_dir:
        ov.append(f"data.synthetic.cache_dir={a.cache_dir}")
    return ov


def train(run_dir: Path, overrides: list[str], a: argparse.Namespace) -> Path:
    """Train in this process (the trainer is the same one train.py runs); a finished run is reused."""
    from gcl.config import validate
    from gcl.train import Trainer

    latest = run_dir / "checkpoints" / "latest.json"
    if latest.exists() and json.loads(latest.read_text())["step"] >= a.steps:
        return run_dir
    cfg = compose(overrides)
    validate(cfg)
    Trainer(cfg, run_dir).fit()
    return run_dir


def report_suites(a: argparse.Namespace) -> list:
    """The test-split suites: the synthetic suite with its val tasks on test (held-out kept), all queries;
    the retention preset as it is (its test and held-out splits)."""
    from omegaconf import OmegaConf

    from gcl.finetune.select import load_eval_preset

    dom = copy.deepcopy(load_eval_preset("synthetic"))
    OmegaConf.set_struct(dom, False)
    for t in dom.tasks:
        if t.split == "val":
            t.split = "test"
        t.num_queries = 0
    dom.gallery.enabled = False
    suites = [dom]
    if a.retention_suite != "none":
        ret = load_eval_preset(a.retention_suite)
        ret.gallery.enabled = False
        suites.append(ret)
    return suites


def seed_arms(seed: int, a: argparse.Namespace, out: Path) -> dict[str, dict[str, float]]:
    """Train the seed's runs, make every arm's weights, score them on test."""
    from gcl.finetune.runs import base_state_dict, load_run
    from gcl.finetune.select import Scorer, parse_alphas, select_defaults
    from gcl.finetune.soup import run_soup
    from gcl.finetune.wise import WiseRequest, run_wise

    runs = out / "runs"
    common = common_overrides(a, seed)
    sweep = []
    for lr in a.lrs:
        extra = [f"optim.lr={lr}"] + ([f"optim.ema.decay={a.ema_decay}"] if lr == a.lr else [])
        sweep.append(train(runs / f"sweep-lr{lr:g}-seed{seed}", common + extra, a))
    full_dir = sweep[a.lrs.index(a.lr)]
    llrd = train(runs / f"llrd-seed{seed}", common + [f"optim.lr={a.lr}", f"optim.layer_decay_image={a.layer_decay}",
                                                      f"optim.layer_decay_text={a.layer_decay}"], a)
    lora = train(runs / f"lora_r{a.lora_rank}-seed{seed}", common + [f"optim.lr={a.lora_lr}", *a.lora_overrides], a)
    trained = {"full": full_dir, "llrd": llrd, "lora_r8": lora}
    if a.patch_dropout_arm:  # the full arm with half the image patches dropped in training (a speed setting)
        trained["pd50"] = train(runs / f"pd50-seed{seed}", common + [f"optim.lr={a.lr}", "model.patch_dropout=0.5"], a)
    full = load_run(full_dir)
    select = select_defaults(full).select
    wise_report, wise_sd = run_wise(full, WiseRequest(alphas=parse_alphas(a.alphas)), select,
                                    out / "wise" / f"seed{seed}")
    soup_report, soups = run_soup([load_run(d) for d in sweep], select, out / "soup" / f"seed{seed}")
    scorer = Scorer(full, report_suites(a), out_dir=out / "test" / f"seed{seed}")
    weights = {"base": base_state_dict(full), "full": full.src.state_dict, "full+wise": wise_sd,
               "full+ema": load_run(full_dir, weights="ema").src.state_dict,
               "llrd": load_run(llrd).src.state_dict, "lora_r8": load_run(lora).src.state_dict,
               "soup": soups["greedy"]}
    if "pd50" in trained:
        weights["pd50"] = load_run(trained["pd50"]).src.state_dict
    scores = {arm: scorer(sd, arm) for arm, sd in weights.items()}
    scores["_samples_per_s"] = {arm: samples_per_s(d) for arm, d in trained.items()}
    scores["_choices"] = {"wise_alpha": wise_report["chosen"]["alpha_image"],
                          "soup_ingredients": [a.lrs[i] for i in soup_report["greedy"]["ingredients"]]}
    return scores


def samples_per_s(run_dir: Path) -> float | None:
    """The run's mean logged training throughput (metrics.jsonl rows after the first, which holds start-up)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]
    return statistics.fmean(rates) if rates else None


def arms_of(per_seed: dict[int, dict]) -> list[str]:
    return [x for x in ARMS if all(x in s for s in per_seed.values())]


def summarize(per_seed: dict[int, dict]) -> dict[str, dict[str, dict[str, float]]]:
    """arm -> row -> {mean, sd, vs_base, vs_full} (relative changes of the means)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    arms = arms_of(per_seed)
    for arm in arms:
        table[arm] = {}
        for row in ROWS:
            vals = [s[arm][row] for s in per_seed.values() if row in s[arm]]
            if vals:
                table[arm][row] = {"mean": statistics.fmean(vals),
                                   "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    for arm in arms:
        for row, v in table[arm].items():
            for ref, key in (("base", "vs_base"), ("full", "vs_full")):
                r = table[ref].get(row, {}).get("mean")
                v[key] = (v["mean"] / r - 1.0) if r else float("nan")
    return table


def goal(table: dict) -> dict[str, dict[str, float | bool]]:
    """Per arm: retention / base retention and domain gain / full fine-tuning's gain (the issue's goal)."""
    out = {}
    b_dom, f_dom = table["base"][DOMAIN]["mean"], table["full"][DOMAIN]["mean"]
    for arm in [x for x in table if x != "base"]:
        g = {"gain_vs_full": (table[arm][DOMAIN]["mean"] - b_dom) / (f_dom - b_dom) if f_dom != b_dom else float("nan")}
        if RETENTION in table["base"]:
            g["retention_vs_base"] = table[arm][RETENTION]["mean"] / table["base"][RETENTION]["mean"]
            g["met"] = g["retention_vs_base"] >= 0.98 and g["gain_vs_full"] >= 0.95
        out[arm] = g
    return out


def markdown(table: dict, goals: dict, per_seed: dict, a: argparse.Namespace, seconds: float) -> str:
    arms, choices = list(table), per_seed[a.seeds[0]]["_choices"]
    lines = [f"Base `{a.model}` (`{Path(a.base).name}`), seven-field loss on the synthetic catalog ({a.products} "
             f"products), {a.steps} steps x batch {a.batch_size}, seeds {a.seeds}, lr sweep {a.lrs} (full arm: "
             f"{a.lr}); LoRA rank {a.lora_rank}{a.lora_note}; test split; mean ± sd over seeds, then the relative "
             "change over the base and over `full`. "
             f"Choices on val: WiSE alpha {choices['wise_alpha']}, soup ingredients (lr) "
             f"{choices['soup_ingredients']}. Machine: {machine()}. Wall time {seconds / 60:.1f} min.",
             "", "| metric | " + " | ".join(f"`{x}`" for x in arms) + " |", "|---|" + "---|" * len(arms)]
    for row in ROWS:
        if row not in table["base"]:
            continue
        cells = []
        for arm in arms:
            v = table[arm][row]
            cell = f"{v['mean']:.3f} ± {v['sd']:.3f}"
            if arm != "base":
                cell += f" [{v['vs_base'] * 100:+.0f}% / {v['vs_full'] * 100:+.0f}%]"
            cells.append(cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", f"Goal (retention >= 98% of the base's `{RETENTION}`, domain gain >= 95% of `full`'s on `{DOMAIN}`):",
              ""]
    for arm, g in goals.items():
        ret = f", retention {100 * g['retention_vs_base']:.1f}% of the base" if "retention_vs_base" in g else ""
        met = "" if "met" not in g else (" — **met**" if g["met"] else " — not met")
        lines.append(f"- `{arm}`: domain gain {100 * g['gain_vs_full']:.0f}% of full fine-tuning's{ret}{met}")
    speeds = {arm: [s["_samples_per_s"][arm] for s in per_seed.values() if s["_samples_per_s"].get(arm)]
              for arm in per_seed[a.seeds[0]]["_samples_per_s"]}
    speeds = {arm: statistics.fmean(v) for arm, v in speeds.items() if v}
    if speeds:
        lines += ["", "Training samples/s (mean of the logged rows after the first, over seeds; the other arms are "
                  "made from these runs): " + ", ".join(f"`{arm}` {v:.0f}" for arm, v in speeds.items())]
    if "pd50" not in arms:
        lines += ["", "`pd50` (patch dropout 0.5) is left out: the base's image tower has no patch tokens."]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, few steps, 2-trial sweep (tests)")
    p.add_argument("--base", default=None, help="base weights file (default: the shipped base, gcl.assets)")
    p.add_argument("--model", default="gcl-base", help="the base's open_clip architecture")
    p.add_argument("--retention-suite", default="world", help="eval preset of the retention suite, or none")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--products", type=int, default=4000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4, help="the full / llrd arms' lr (one of --lrs)")
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3], help="the soup's sweep")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--alphas", default="0:1:0.1")
    p.add_argument("--workers", type=int, default=1, help="data loader workers per run")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results/study_robust[_quick])")
    p.add_argument("--cache-dir", default=None, help="synthetic catalog cache (default: the trainer's)")
    p.add_argument("--no-update", action="store_true", help="do not rewrite the section of BENCHMARKS.md")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.products, a.batch_size, a.image_size = a.seeds[:1], 3, 160, 8, 32
        a.lrs, a.alphas, a.workers = [a.lr, round(3 * a.lr, 12)], "0:1:0.5", 0
    if a.lr not in a.lrs:
        p.error(f"--lr {a.lr} must be one of --lrs {a.lrs} (the full arm is a trial of the sweep)")
    if a.base is None:
        try:
            from gcl.assets import BASE_WEIGHTS, verify_base
        except ImportError:
            p.error("this checkout has no shipped base (gcl/assets); give one with --base FILE --model NAME")
        verify_base()
        a.base = str(BASE_WEIGHTS)
    if a.retention_suite != "none" and not (ROOT / "conf" / "eval" / f"{a.retention_suite}.yaml").is_file():
        p.error(f"--retention-suite {a.retention_suite}: no such eval preset in conf/eval/ (the world suite comes "
                "with the shipped base); name one, or none")
    if not Path(a.base).is_file():
        p.error(f"--base {a.base}: no such weights file")
    a.lora_overrides, a.lora_note, a.patch_dropout_arm = tower_arms(a.model, a.lora_rank)
    return a


def tower_arms(model: str, rank: int) -> tuple[list[str], str, bool]:
    """The LoRA arm's overrides: adapters on every open_clip Transformer tower. A tower without one (CLIP's
    ResNet image tower, which the shipped base has) is locked instead, so the arm stays parameter-efficient.
    Also whether the patch-dropout arm applies (an open_clip VisionTransformer image tower)."""
    from open_clip.transformer import VisionTransformer

    from gcl.model import build_model
    from gcl.model.towers import tower_transformer

    built = build_model(model).model
    overrides, locked = [], []
    for tower in ("image", "text"):
        try:
            tower_transformer(built, tower, "lora")
            overrides.append(f"model.lora.{tower}.rank={rank}")
        except NotImplementedError:
            overrides.append(f"model.lock_{tower}=true")
            locked.append(tower)
    if len(locked) == 2:
        raise SystemExit(f"--model {model}: neither tower is an open_clip Transformer; LoRA has no target")
    note = f" (the {locked[0]} tower has no Transformer blocks: locked in this arm)" if locked else ""
    return overrides, note, isinstance(built.visual, VisionTransformer)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    out = Path(a.out or ROOT / "benchmarks" / "results" / ("study_robust_quick" if a.quick else "study_robust"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed = {}
    for seed in a.seeds:
        t = time.perf_counter()
        per_seed[seed] = seed_arms(seed, a, out)
        print(f"[study_robust] seed {seed}: {time.perf_counter() - t:.0f}s", flush=True)
    seconds = time.perf_counter() - t0
    table = summarize(per_seed)
    goals = goal(table)
    md = markdown(table, goals, per_seed, a, seconds)
    cmd = " ".join(["python benchmarks/study_robust.py", *(sys.argv[1:] if argv is None else argv)])
    md += f"\n\nCommand ({time.strftime('%Y-%m-%d')}): `{cmd}`"
    shutil.copyfile(out / "wise" / f"seed{a.seeds[0]}" / "wise.png", out / "wise_curve.png")
    raw = {"settings": vars(a), "machine": machine(), "seconds": seconds, "per_seed": per_seed, "summary": table,
           "goal": goals}
    (out / "study.json").write_text(json.dumps(raw, indent=1, default=float))
    (out / "table.md").write_text(md + "\n")
    if not a.quick and not a.no_update:
        bench = ROOT / "BENCHMARKS.md"
        text = bench.read_text()
        curve = out.resolve() / "wise_curve.png"
        link = curve.relative_to(ROOT) if curve.is_relative_to(ROOT) else curve  # BENCHMARKS.md is at ROOT
        block = f"{MARK_START}\n{md}\n\n![WiSE-FT curve]({link})\n{MARK_END}"
        if MARK_START in text and MARK_END in text:
            head, rest = text.split(MARK_START, 1)
            text = head + block + rest.split(MARK_END, 1)[1]
        else:
            text = text.rstrip() + "\n\n## Study: robust fine-tuning (WiSE-FT, EMA, LLRD, LoRA, soups)\n\n" \
                   "`python benchmarks/study_robust.py` (see its docstring for the arms).\n\n" + block + "\n"
        bench.write_text(text)
    print(md)
    return raw


if __name__ == "__main__":
    main()
