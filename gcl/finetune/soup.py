"""Model soups over a sweep: average fine-tunes of one base (Wortsman et al., "Model soups", ICML 2022).

Usage::

    python -m gcl.soup MULTIRUN_DIR [RUN_DIR ...] [--which latest|best] [--ema] [--suites world ...]
                       [--domain-metric M] [--retention-metric M] [--split val] [--out DIR] [--no-export]

The trials are the run dirs given, or the run dirs inside a given folder (a Hydra multirun dir: ``0/``,
``1/``...); a folder without a checkpoint (a failed or running trial) is left out and named. Every trial
must be fine-tuned from the same base and architecture; otherwise nothing is averaged and the error names
each trial that differs.

* Uniform soup: the mean of every trial's weights.
* Greedy soup (the paper's Algorithm 1): trials sorted by their own selection metric, best first; the best
  one starts the soup, and each next one is kept if the soup with it scores at least as well
  (``>=``) on the selection split as the soup without it.

Scores come from the selection split of the trials' eval suite and ``export.select.suites``
(:mod:`gcl.finetune.select`; the metric is ``export.select.domain_metric``, retention reported beside it).
Files in ``MULTIRUN_DIR/soup/`` (or ``--out``): ``soup.json``, ``eval/``, ``uniform/`` and ``greedy/`` (open_clip
exports). Lives here: trial discovery, averaging, the greedy procedure, the report and the CLI. Not here:
run loading and base checks (:mod:`gcl.finetune.runs`), scoring (:mod:`gcl.finetune.select`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from gcl.finetune.runs import (
    FinetuneError,
    Run,
    base_state_dict,
    check_same_base,
    cli_errors,
    has_base,
    load_run,
    merge_other,
)
from gcl.finetune.select import Rule, Scorer, select_defaults, selection_overrides, selection_suites

log = logging.getLogger(__name__)


def _natural(p: Path) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name))


def find_trials(paths: list[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """``(trial run dirs, left-out folders)`` from run dirs and folders of run dirs."""
    trials, skipped = [], []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FinetuneError(f"{p} is not a folder (pass a multirun dir or run dirs)")
        if (p / "checkpoints").is_dir():
            trials.append(p)
            continue
        children = sorted((c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")), key=_natural)
        for c in children:
            if (c / "checkpoints").is_dir() and any((c / "checkpoints").glob("*.pt")):
                trials.append(c)
            elif (c / ".hydra").is_dir() or (c / "metrics.jsonl").is_file():
                skipped.append(c)  # a trial folder without a checkpoint: failed, or still running
    return trials, skipped


def average(state_dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The element-wise mean of floating-point tensors (in float64, cast back); other tensors:
    :func:`gcl.finetune.runs.merge_other`."""
    first = state_dicts[0]
    out = {}
    for k, v in first.items():
        if torch.is_floating_point(v):
            acc = torch.zeros_like(v, dtype=torch.float64)
            for sd in state_dicts:
                acc += sd[k].double()
            out[k] = (acc / len(state_dicts)).to(v.dtype)
        else:
            out[k] = merge_other(k, [sd[k] for sd in state_dicts], "the trials")
    return out


def _row(run: Run, metrics: dict[str, float], rule: Rule) -> dict[str, Any]:
    dom, ret = rule.scores(metrics)
    return {"run_dir": str(run.run_dir), "step": run.src.step, "domain": dom, "retention": ret, "metrics": metrics}


def greedy_soup(order: list[int], scores: list[float], runs: list[Run], scorer: Scorer, rule: Rule,
                ) -> tuple[list[int], list[dict[str, Any]], dict[str, float]]:
    """Algorithm 1 of the paper over ``order`` (indices, best first): ``(ingredients, decisions, metrics of
    the final soup)``."""
    ingredients = [order[0]]
    best, best_metrics = scores[order[0]], None
    decisions = [{"trial": order[0], "accepted": True, "domain": best}]
    for i in order[1:]:
        cand = ingredients + [i]
        metrics = scorer(average([runs[j].src.state_dict for j in cand]), "greedy_" + "_".join(map(str, cand)))
        dom = rule.scores(metrics)[0]
        accepted = dom >= best
        decisions.append({"trial": i, "accepted": accepted, "domain": dom})
        log.info("greedy soup: + trial %d -> %s=%.4f (%s %.4f): %s", i, rule.domain_metric, dom,
                 ">=" if accepted else "<", best, "kept" if accepted else "left out")
        if accepted:
            ingredients, best, best_metrics = cand, dom, metrics
    return ingredients, decisions, best_metrics


def run_soup(runs: list[Run], select: DictConfig, out_dir: Path, device: str = "auto",
             ) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """Score every trial, build both soups, score them; returns the report and the soups' weights."""
    t0 = time.perf_counter()
    if len(runs) < 2:
        raise FinetuneError(f"a soup needs at least 2 trials, found {len(runs)}")
    check_same_base(runs, "a model soup")
    rule = Rule.from_config(select)
    scorer = Scorer(runs[0], selection_suites(runs[0], select), out_dir=out_dir / "eval", device=device)
    trials = [_row(r, scorer(r.src.state_dict, f"trial_{i}"), rule) for i, r in enumerate(runs)]
    scores = [t["domain"] for t in trials]
    order = sorted(range(len(runs)), key=lambda i: -scores[i])  # stable: ties keep the trials' order
    ingredients, decisions, greedy_metrics = greedy_soup(order, scores, runs, scorer, rule)
    uniform_sd = average([r.src.state_dict for r in runs])
    uniform_metrics = scorer(uniform_sd, "uniform")
    if greedy_metrics is None:  # only the best trial: the greedy soup is that trial
        greedy_metrics = trials[order[0]]["metrics"]
    base = None
    if rule.retention_metric is not None and has_base(runs[0]):
        base = {"metrics": scorer(base_state_dict(runs[0]), "base")}
        base["domain"], base["retention"] = rule.scores(base["metrics"])
    report = {
        "trials": trials, "order": order, "split": str(select.split), "metric": rule.domain_metric,
        "retention_metric": rule.retention_metric, "base": base,
        "greedy": {"ingredients": ingredients, "decisions": decisions, "domain": rule.scores(greedy_metrics)[0],
                   "retention": rule.scores(greedy_metrics)[1], "metrics": greedy_metrics},
        "uniform": {"ingredients": list(range(len(runs))), "domain": rule.scores(uniform_metrics)[0],
                    "retention": rule.scores(uniform_metrics)[1], "metrics": uniform_metrics},
        "evaluations": scorer.evaluations, "seconds": round(time.perf_counter() - t0, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".soup.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=1, default=float))
    os.replace(tmp, out_dir / "soup.json")
    greedy_sd = average([runs[j].src.state_dict for j in ingredients])
    return report, {"uniform": uniform_sd, "greedy": greedy_sd}


def export_soups(runs: list[Run], report: dict[str, Any], soups: dict[str, dict[str, Tensor]], out_dir: Path,
                 ) -> dict[str, Path]:
    from gcl.export import write_export

    paths = {}
    for kind in ("uniform", "greedy"):
        members = [runs[i].run_dir.name for i in report[kind]["ingredients"]]
        src = dataclasses.replace(
            runs[0].src, state_dict=soups[kind], run_dir=None, checkpoint_file=None, step=None,
            weights_note=f"{kind} model soup of {len(members)} fine-tunes of one base ({', '.join(members)}; "
                         f"{'kept greedily by ' + report['metric'] if kind == 'greedy' else 'the mean of all'})")
        paths[kind] = write_export(src, out_dir / kind, overwrite=True, metrics=report[kind]["metrics"])
    return paths


# --------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gcl.soup", description=__doc__.split("\n\n")[0],
                                epilog="Defaults not given here come from the first trial's export.select.")
    p.add_argument("paths", nargs="+", help="a multirun dir (its trials) and/or run dirs")
    p.add_argument("--which", choices=("latest", "best"), default="latest")
    p.add_argument("--ema", action="store_true", help="average the trials' EMA weights (optim.ema)")
    p.add_argument("--split", default=None)
    p.add_argument("--suites", nargs="*", default=None)
    p.add_argument("--domain-metric", default=None, help="the greedy soup's metric (export.select.domain_metric)")
    p.add_argument("--retention-metric", default=None, help="reported beside it; 'none' for none")
    p.add_argument("--max-retention-drop", type=float, default=None)
    p.add_argument("--out", default=None, help="output folder (default <first path>/soup)")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        dirs, skipped = find_trials(args.paths)
        for s in skipped:
            log.warning("left out %s: no checkpoint (the trial failed or is still running)", s)
        runs = [load_run(d, args.which, "ema" if args.ema else "model") for d in dirs]
        if len(runs) < 2:
            raise FinetuneError(f"a soup needs at least 2 trials with checkpoints; found {len(runs)} in "
                                f"{', '.join(args.paths)} ({len(skipped)} left out)")
        select = selection_overrides(select_defaults(runs[0]).select, args)
        out = Path(args.out) if args.out else Path(args.paths[0]) / "soup"
        report, soups = run_soup(runs, select, out, device=args.device)
        paths = {} if args.no_export else export_soups(runs, report, soups, out)
    except cli_errors() as e:
        log.error("%s", e)
        return 1
    m = report["metric"]
    lines = [f"{len(runs)} trials ({len(skipped)} left out); {m} on the {report['split']} split:"]
    lines += [f"  trial {i} {runs[i].run_dir}: {report['trials'][i]['domain']:.4f}" for i in report["order"]]
    lines += [f"  uniform soup ({len(runs)} trials): {report['uniform']['domain']:.4f}",
              f"  greedy soup (trials {report['greedy']['ingredients']}): {report['greedy']['domain']:.4f}",
              f"report: {out / 'soup.json'}"]
    lines += [f"exported the {k} soup to {p}" for k, p in paths.items()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
