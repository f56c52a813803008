"""WiSE-FT for retrieval: interpolate a run's base and fine-tuned weights, score the curve, export the choice.

Usage::

    python -m gcl.wise RUN_DIR [--alphas 0:1:0.1] [--per-tower] [--alpha auto|A] [--which latest|best] [--ema]
                               [--suites world ...] [--domain-metric M] [--retention-metric M]
                               [--max-retention-drop 0.01] [--split val] [--out DIR] [--no-export]

``theta(alpha) = (1 - alpha) * theta_base + alpha * theta_ft`` (Wortsman et al., "Robust fine-tuning of
zero-shot models", 2022), for every floating-point tensor; with ``--per-tower`` the image tower (``visual.*``)
and the text tower get their own alphas (a grid over both) and ``logit_scale`` / ``logit_bias`` take their
mean (they do not change a ranking). The base is the run's starting weights (:mod:`gcl.finetune.runs`).

Every alpha is scored on the selection split of the run's eval suite and of ``export.select.suites``
(:mod:`gcl.finetune.select`); the rule (``export.select``) picks one, which is exported as a plain open_clip
folder. Defaults come from the run's own ``export.select`` / ``export.wise`` config. Files in ``RUN_DIR/wise/``
(or ``--out``): ``wise.json`` (every point's metrics, the rule, the choice), ``wise.png`` (domain metric
against retention metric, one point per alpha: the WiSE-FT paper's figure), ``eval/`` (each point's
evaluation), ``export/`` (the chosen model). ``export.wise.alpha=auto|A`` runs the same at the end of training
(:func:`wise_after_training`), exporting into the run's export dir.

Lives here: interpolation, the grid, the plot, the report and the CLI. Not here: loading runs and bases,
scoring and the rule (:mod:`gcl.finetune.runs`, :mod:`gcl.finetune.select`), writing exports
(:func:`gcl.export.write_export`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from gcl.finetune.runs import Run, base_state_dict, cli_errors, load_run, merge_other
from gcl.finetune.select import (
    Rule,
    Scorer,
    parse_alpha,
    parse_alphas,
    select_defaults,
    selection_overrides,
    selection_suites,
)

log = logging.getLogger(__name__)

SCALE_KEYS = ("logit_scale", "logit_bias")


def tower_of(key: str) -> str:
    if key.startswith("visual."):
        return "image"
    return "scale" if key in SCALE_KEYS else "text"


def interpolate(base: dict[str, Tensor], ft: dict[str, Tensor], alpha_image: float,
                alpha_text: float | None = None) -> dict[str, Tensor]:
    """``(1 - a) * base + a * ft`` per floating-point tensor (in float64, cast back), ``a`` = the tensor's
    tower alpha (scale tensors: the mean). Other tensors: :func:`gcl.finetune.runs.merge_other`."""
    alpha_text = alpha_image if alpha_text is None else alpha_text
    alphas = {"image": alpha_image, "text": alpha_text, "scale": (alpha_image + alpha_text) / 2}
    out = {}
    for k, f in ft.items():
        b = base[k]
        if torch.is_floating_point(f):
            a = alphas[tower_of(k)]
            out[k] = ((1 - a) * b.double() + a * f.double()).to(f.dtype)
        else:
            out[k] = merge_other(k, [b, f], "the base and the fine-tuned model")
    return out


def grid(alphas: list[float], per_tower: bool) -> list[tuple[float, float]]:
    """``(alpha_image, alpha_text)`` points, the base ``(0, 0)`` and the fine-tuned ``(1, 1)`` always in."""
    vals = sorted(set(alphas) | {0.0, 1.0})
    if per_tower:
        return [(ai, at) for ai in vals for at in vals]
    return [(a, a) for a in vals]


def _label(ai: float, at: float) -> str:
    return f"alpha={ai:g}" if ai == at else f"alpha_image={ai:g},alpha_text={at:g}"


@dataclasses.dataclass
class WiseRequest:
    """What to compute: ``alpha`` is ``"auto"`` (the rule over ``alphas``) or a float (that point, scored with
    the base and the fine-tuned model beside it)."""

    alpha: float | str = "auto"
    alphas: list[float] = dataclasses.field(default_factory=lambda: parse_alphas("0:1:0.1"))
    per_tower: bool = False
    which: str = "latest"
    weights: str = "model"
    device: str = "auto"


def run_wise(run: Run, req: WiseRequest, select: DictConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Score the grid, choose, plot; returns the report (also written to ``out_dir/wise.json``) and the
    chosen weights."""
    t0 = time.perf_counter()
    base = base_state_dict(run)
    ft = run.src.state_dict
    rule = Rule.from_config(select)
    points = grid(req.alphas, req.per_tower) if req.alpha == "auto" else \
        sorted({(0.0, 0.0), (float(req.alpha),) * 2, (1.0, 1.0)})
    scorer = Scorer(run, selection_suites(run, select), out_dir=out_dir / "eval", device=req.device)
    results = []
    for ai, at in points:
        metrics = scorer(interpolate(base, ft, ai, at), _label(ai, at))
        dom, ret = rule.scores(metrics)
        results.append({"alpha_image": ai, "alpha_text": at, "domain": dom, "retention": ret, "metrics": metrics})
        log.info("WiSE-FT %s: %s=%.4f%s", _label(ai, at), rule.domain_metric, dom,
                 "" if ret is None else f", {rule.retention_metric}={ret:.4f}")
    reference = next(r["metrics"] for r in results if r["alpha_image"] == r["alpha_text"] == 0.0)
    if req.alpha == "auto":
        chosen = rule.choose([r["metrics"] for r in results], reference)
    else:
        chosen = next(i for i, r in enumerate(results) if r["alpha_image"] == r["alpha_text"] == float(req.alpha))
    report = {
        "run_dir": str(run.run_dir), "checkpoint": str(run.src.checkpoint_file), "step": run.src.step,
        "weights": req.weights, "base": {"name": run.src.name, "pretrained": run.src.pretrained},
        "split": str(select.split), "suites": [str(s) for s in select.suites], "per_tower": req.per_tower,
        "rule": rule.describe() if req.alpha == "auto" else f"fixed alpha {req.alpha} (export.wise.alpha)",
        "domain_metric": rule.domain_metric, "retention_metric": rule.retention_metric,
        "points": results, "chosen": {k: results[chosen][k] for k in ("alpha_image", "alpha_text", "domain",
                                                                       "retention")},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(report, out_dir / "wise.png")
    _write_json(report, out_dir / "wise.json")
    return report, interpolate(base, ft, results[chosen]["alpha_image"], results[chosen]["alpha_text"])


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def plot(report: dict[str, Any], path: Path) -> None:
    """Domain metric against retention metric, one point per alpha (domain against alpha without one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, chosen = report["points"], report["chosen"]
    has_ret = report["retention_metric"] is not None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [p["domain"] for p in pts] if has_ret else [p["alpha_image"] for p in pts]
    ys = [p["retention"] for p in pts] if has_ret else [p["domain"] for p in pts]
    diag = [i for i, p in enumerate(pts) if p["alpha_image"] == p["alpha_text"]]
    ax.plot([xs[i] for i in diag], [ys[i] for i in diag], "-o", color="tab:blue", ms=4, label="one alpha")
    off = [i for i in range(len(pts)) if i not in diag]
    if off:
        ax.scatter([xs[i] for i in off], [ys[i] for i in off], s=12, color="tab:gray", label="per-tower alphas")
    for i in diag:
        ax.annotate(f"{pts[i]['alpha_image']:g}", (xs[i], ys[i]), textcoords="offset points", xytext=(4, 3),
                    fontsize=7)
    c = next(i for i, p in enumerate(pts) if (p["alpha_image"], p["alpha_text"]) ==
              (chosen["alpha_image"], chosen["alpha_text"]))
    ax.scatter([xs[c]], [ys[c]], marker="*", s=180, color="tab:red", zorder=3,
               label=f"chosen: {_label(chosen['alpha_image'], chosen['alpha_text'])}")
    ax.set_xlabel(report["domain_metric"] if has_ret else "alpha (0 = base, 1 = fine-tuned)")
    ax.set_ylabel(report["retention_metric"] if has_ret else report["domain_metric"])
    ax.set_title(f"WiSE-FT on the {report['split']} split (step {report['step']})", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def export_choice(run: Run, report: dict[str, Any], state_dict: dict[str, Tensor], out: Path, *,
                  overwrite: bool = True) -> Path:
    """Export the chosen interpolation as an open_clip folder (verified by loading it back)."""
    from gcl.export import write_export

    ch = report["chosen"]
    base = f"{run.src.name}" + (f" ({run.src.pretrained})" if run.src.pretrained else "")
    src = dataclasses.replace(
        run.src, state_dict=state_dict, run_dir=None, checkpoint_file=None,
        weights_note=f"WiSE-FT interpolation {_label(ch['alpha_image'], ch['alpha_text'])} between the base "
                     f"{base} and the fine-tuned weights of step {run.src.step} ({report['rule']})")
    metrics = next(p["metrics"] for p in report["points"]
                   if (p["alpha_image"], p["alpha_text"]) == (ch["alpha_image"], ch["alpha_text"]))
    return write_export(src, out, overwrite=overwrite, metrics=metrics, metrics_step=run.src.step)


def wise_after_training(run_dir: Path, out: Path, export_cfg: DictConfig, *, which: str, weights: str,
                        device: Any) -> Path:
    """``export.wise.alpha`` at the end of training: the same as the CLI; the choice goes to ``out``."""
    run = load_run(run_dir, which, weights)
    w = export_cfg.wise
    req = WiseRequest(alpha=parse_alpha(w.alpha), alphas=parse_alphas(w.alphas), per_tower=bool(w.per_tower),
                      which=which, weights=weights, device=str(torch.device(device).type))
    report, chosen = run_wise(run, req, export_cfg.select, run_dir / "wise")
    ch = report["chosen"]
    log.info("WiSE-FT: chose %s (%s); curve in %s", _label(ch["alpha_image"], ch["alpha_text"]), report["rule"],
             run_dir / "wise" / "wise.png")
    return export_choice(run, report, chosen, out, overwrite=bool(export_cfg.overwrite))


# --------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gcl.wise", description=__doc__.split("\n\n")[0],
                                epilog="Defaults not given here come from the run's export.select / export.wise.")
    p.add_argument("run_dir")
    p.add_argument("--alphas", default=None, help="grid: start:stop:step (inclusive) or a comma list")
    p.add_argument("--alpha", default="auto", help="auto (the rule over --alphas) or one alpha in [0, 1]")
    p.add_argument("--per-tower", action="store_true", default=None, help="separate image / text alphas (a grid)")
    p.add_argument("--which", choices=("latest", "best"), default="latest")
    p.add_argument("--ema", action="store_true", help="interpolate the run's EMA weights (optim.ema)")
    p.add_argument("--split", default=None, help="the selection split (default export.select.split: val)")
    p.add_argument("--suites", nargs="*", default=None, help="eval presets scored besides the run's own suite")
    p.add_argument("--domain-metric", default=None)
    p.add_argument("--retention-metric", default=None, help="'none' for no retention constraint")
    p.add_argument("--max-retention-drop", type=float, default=None)
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/wise)")
    p.add_argument("--no-export", action="store_true", help="score and plot only")
    p.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run = load_run(args.run_dir, args.which, "ema" if args.ema else "model")
        defaults = select_defaults(run)
        select = selection_overrides(defaults.select, args)
        req = WiseRequest(alpha=parse_alpha(args.alpha), per_tower=bool(
            defaults.wise.per_tower if args.per_tower is None else args.per_tower),
            alphas=parse_alphas(args.alphas if args.alphas is not None else defaults.wise.alphas), which=args.which,
            weights="ema" if args.ema else "model", device=args.device)
        out = Path(args.out) if args.out else run.run_dir / "wise"
        report, chosen = run_wise(run, req, select, out)
        path = None if args.no_export else export_choice(run, report, chosen, out / "export")
    except cli_errors() as e:
        log.error("%s", e)
        return 1
    ch = report["chosen"]
    lines = [f"WiSE-FT over {len(report['points'])} points on the {report['split']} split; rule: {report['rule']}",
             f"chosen: {_label(ch['alpha_image'], ch['alpha_text'])} ({report['domain_metric']}={ch['domain']:.4f}"
             + ("" if ch["retention"] is None else f", {report['retention_metric']}={ch['retention']:.4f}") + ")",
             f"report: {out / 'wise.json'}, plot: {out / 'wise.png'}"]
    if path is not None:
        lines.append(f"exported to {path}; load it with open_clip.create_model_and_transforms('local-dir:{path}')")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
