"""Paired significance between two evaluations of the same tasks: ``python -m gcl.eval.compare EVAL_A EVAL_B``.

For every retrieval task both evaluations ran (same queries, same judgements) and every metric the task reports,
it gives the mean of A, the mean of B, the delta B - A, a 95% paired bootstrap confidence interval of the delta
over queries and a paired randomization-test p-value; as a markdown table (stdout, ``--md``) and JSON
(``--json``). Use it for base vs fine-tuned, two losses, or two groups of seeds (``A1,A2`` averages the
per-query values of several evaluations before pairing).

The statistics, per (task, metric), with ``d_q = B_q - A_q`` the per-query differences (n queries):

* delta = mean(d).
* CI: the percentile bootstrap - resample the n queries with replacement ``n_boot`` times, take the
  alpha/2 and 1 - alpha/2 quantiles of the resampled means of d. Pairing is kept (a query's A and B move
  together), so the per-query difficulty cancels.
* p: a two-sided paired randomization (sign-flip) test - under "A and B are exchangeable per query" every
  d_q is equally likely to have either sign; p = (1 + #{|mean(s * d)| >= |mean(d)|}) / (1 + n_perm) over
  ``n_perm`` random sign vectors s (the +1 keeps p > 0 and the test exact at its level).

Per-query values are recomputed from each evaluation's TREC run and qrels files (``runs/`` next to its
``tasks/``; see ``gcl.eval.trec``) with ``gcl.eval.metrics``, so any metric name works (``--metrics``).
Zero-shot tasks write no run and are skipped (listed).

What does not live here: the metrics (``gcl.eval.metrics``), the file formats (``gcl.eval.trec``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gcl.eval import metrics as M
from gcl.eval import trec

log = logging.getLogger(__name__)

__all__ = ["PairedStats", "paired_stats", "bootstrap_ci", "randomization_p", "load_evaluation", "compare", "main"]

_ELEMS_PER_BLOCK = 1 << 22  # resample block size (elements): bounds memory at ~32 MB per block


# ------------------------------------------------------------------------------------------ statistics

def _blocks(total: int, per_item: int) -> list[int]:
    size = max(1, _ELEMS_PER_BLOCK // max(1, per_item))
    return [min(size, total - s) for s in range(0, total, size)]


def bootstrap_ci(d: np.ndarray, n_boot: int, alpha: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of mean(d) over the last axis.

    Args:
        d: [..., n] paired differences (leading axes are independent problems, resampled independently).
        n_boot: bootstrap resamples; alpha: 1 - confidence (0.05 -> a 95% interval).
    Returns:
        (lo, hi), each of shape d.shape[:-1].
    """
    d2 = d.reshape(-1, d.shape[-1])
    s, n = d2.shape
    means = np.empty((s, n_boot))
    at = 0
    for c in _blocks(n_boot, s * n):
        idx = rng.integers(0, n, size=(s, c, n))
        means[:, at: at + c] = np.take_along_axis(d2[:, None, :], idx, axis=2).mean(axis=2)
        at += c
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=1)
    return lo.reshape(d.shape[:-1]), hi.reshape(d.shape[:-1])


def randomization_p(d: np.ndarray, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """Two-sided paired sign-flip p-value of mean(d) != 0 over the last axis (shape d.shape[:-1])."""
    d2 = d.reshape(-1, d.shape[-1])
    s, n = d2.shape
    observed = np.abs(d2.mean(axis=1))
    # |mean| values equal up to float round-off count as ties (as extreme), never as less extreme
    tol = 1e-12 * np.maximum(1.0, np.abs(d2).max(axis=1, initial=0.0))
    count = np.zeros(s)
    for c in _blocks(n_perm, s * n):
        signs = rng.integers(0, 2, size=(s, c, n), dtype=np.int8) * 2 - 1
        flipped = np.abs((signs * d2[:, None, :]).mean(axis=2))
        count += (flipped >= (observed - tol)[:, None]).sum(axis=1)
    return ((1.0 + count) / (1.0 + n_perm)).reshape(d.shape[:-1])


@dataclass
class PairedStats:
    """One (task, metric) comparison."""

    task: str
    metric: str
    n: int  # queries
    mean_a: float
    mean_b: float
    delta: float  # mean_b - mean_a
    ci_low: float
    ci_high: float
    p_value: float


def paired_stats(a: np.ndarray, b: np.ndarray, *, task: str = "", metric: str = "", n_boot: int = 10000,
                 n_perm: int = 10000, alpha: float = 0.05, seed: int = 0) -> PairedStats:
    """Delta, bootstrap CI and randomization p of per-query values ``a`` and ``b`` (same queries, same order)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_stats: a and b must be 1-D of equal length (one value per query), got "
                         f"{a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError(f"paired_stats: task {task!r} metric {metric!r} has no queries")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"paired_stats: task {task!r} metric {metric!r} has non-finite per-query values")
    rng = np.random.default_rng(seed)
    d = b - a
    lo, hi = bootstrap_ci(d, n_boot, alpha, rng)
    p = randomization_p(d, n_perm, rng)
    return PairedStats(task, metric, int(a.size), float(a.mean()), float(b.mean()), float(d.mean()),
                       float(lo), float(hi), float(p))


# ------------------------------------------------------------------------------------------ evaluations

@dataclass
class TaskRun:
    """One retrieval task of one evaluation: its judgements, run, query texts and reported metrics."""

    qrels: dict[str, dict[str, int]]
    run: dict[str, dict[str, float]]
    queries: dict[str, str]
    metrics: list[str]


def _step_of(p: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", p.name)
    return int(m.group(1)) if m else -1


def resolve_evaluation(path: str | os.PathLike) -> Path:
    """The folder holding ``tasks/`` (and ``runs/``) of one evaluation.

    Accepts that folder itself, a ``step_XXXXXX.json`` / ``metrics.json`` file, a folder holding ``eval/``
    (a run dir), or a folder of in-loop evaluations (the latest ``step_*`` is taken and logged).
    """
    p = Path(os.path.expanduser(str(path)))
    if p.is_file() and p.suffix == ".json":
        p = p.with_suffix("") if _step_of(p.with_suffix("")) >= 0 else p.parent
    if (p / "tasks").is_dir():
        return p
    if (p / "eval").is_dir():
        return resolve_evaluation(p / "eval")
    steps = sorted((q for q in p.glob("step_*") if q.is_dir() and _step_of(q) >= 0), key=_step_of) if p.is_dir() else []
    if steps:
        log.info("%s: comparing its latest evaluation %s", p, steps[-1].name)
        return steps[-1]
    raise FileNotFoundError(f"{str(p)!r} is not an evaluation: expected a folder with tasks/ and runs/ (the out_dir of "
                            "`python evaluate.py`, a step_XXXXXX folder of in-loop evaluation, or a run dir)")


def load_evaluation(path: str | os.PathLike) -> tuple[dict[str, TaskRun], list[str]]:
    """({task name: TaskRun} for the retrieval tasks with run files, [names of tasks without one])."""
    base = resolve_evaluation(path)
    out: dict[str, TaskRun] = {}
    skipped: list[str] = []
    for f in sorted((base / "tasks").glob("*.json")):
        d = json.loads(f.read_text())
        files = d.get("files")
        if not files:
            skipped.append(d.get("task", f.stem))
            continue
        out[d["task"]] = TaskRun(qrels=trec.read_qrels(base / files["qrels"]), run=trec.read_run(base / files["run"]),
                                 queries=trec.read_queries(base / files["queries"]) if files.get("queries") else {},
                                 metrics=_ranking_metrics(d))
    if not out and not skipped:
        raise FileNotFoundError(f"{base / 'tasks'}: no task files")
    return out, skipped


def _ranking_metrics(task_json: dict) -> list[str]:
    """The task's configured ranking metrics (not the derived means such as avg_recall)."""
    names = (task_json.get("config") or {}).get("metrics") or list(task_json.get("metrics", {}))
    out = []
    for m in names:
        try:
            M.parse_metric(m)
        except ValueError:
            continue
        out.append(m)
    return out


def _check_same_queries(task: str, runs: Sequence[TaskRun], names: Sequence[str]) -> None:
    ref = runs[0]
    for r, name in zip(runs[1:], names[1:]):
        if r.qrels != ref.qrels:
            diff = sorted(set(r.qrels) ^ set(ref.qrels)) or [q for q in ref.qrels if r.qrels.get(q) != ref.qrels[q]]
            raise ValueError(f"task {task!r}: {name} and {names[0]} judge different queries or documents (first "
                             f"difference: query {diff[0]!r}); a paired comparison needs the same queries - use the "
                             "same eval preset, eval.seed and data for both")
        if r.queries and ref.queries and r.queries != ref.queries:
            q = next(q for q in ref.queries if r.queries.get(q) != ref.queries[q])
            raise ValueError(f"task {task!r}: query {q!r} has a different text in {name} and {names[0]}")


def _per_query(runs: Sequence[TaskRun], metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-query values averaged over a side's evaluations: {metric: [n]} in qrels order."""
    qids = [q for q in runs[0].qrels if runs[0].qrels[q]]
    acc = {m: np.zeros(len(qids)) for m in metrics}
    for r in runs:
        # complete=True: a query with nothing retrieved scores 0 (the evaluation itself averaged it that way)
        per = M.compute_per_query(r.qrels, r.run, list(metrics), complete=True)
        for m in metrics:
            acc[m] += np.array([per[q][m] for q in qids])
    return {m: v / len(runs) for m, v in acc.items()}


def compare(a: Sequence[str | os.PathLike], b: Sequence[str | os.PathLike], *, metrics: Sequence[str] | None = None,
            tasks: Sequence[str] | None = None, n_boot: int = 10000, n_perm: int = 10000, alpha: float = 0.05,
            seed: int = 0) -> tuple[list[PairedStats], list[str]]:
    """Compare evaluation(s) ``a`` with ``b`` (each a list: several = the mean of their per-query values).

    Returns (one PairedStats per task and metric, notes on what was skipped).
    """
    sides = [[load_evaluation(p) for p in side] for side in (a, b)]
    names = [[str(p) for p in side] for side in (a, b)]
    common = set.intersection(*(set(ev[0]) for side in sides for ev in side))
    notes = sorted({t for side in sides for ev in side for t in ev[1]})
    notes = [f"skipped (no run file, e.g. zero-shot): {', '.join(notes)}"] if notes else []
    every = sorted(set.union(*(set(ev[0]) for side in sides for ev in side)))
    if set(every) - common:
        notes.append(f"skipped (not in every evaluation): {', '.join(sorted(set(every) - common))}")
    wanted = [t for t in every if t in common and (not tasks or t in tasks)]
    if tasks and set(tasks) - common:
        raise ValueError(f"--tasks {sorted(set(tasks) - common)} are not retrieval tasks of every evaluation "
                         f"(common: {sorted(common)})")
    if not wanted:
        raise ValueError(f"no retrieval task is common to all evaluations ({', '.join(names[0] + names[1])})")
    rows: list[PairedStats] = []
    for t in wanted:
        runs = [[ev[0][t] for ev in side] for side in sides]
        _check_same_queries(t, runs[0] + runs[1], names[0] + names[1])
        ms = list(metrics) if metrics else runs[0][0].metrics
        va, vb = _per_query(runs[0], ms), _per_query(runs[1], ms)
        for i, m in enumerate(ms):
            rows.append(paired_stats(va[m], vb[m], task=t, metric=m, n_boot=n_boot, n_perm=n_perm, alpha=alpha,
                                     seed=seed + i))
    return rows, notes


# ------------------------------------------------------------------------------------------ outputs

def _fmt(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else "-"


def markdown_table(rows: Sequence[PairedStats], a: str, b: str, alpha: float, notes: Sequence[str] = ()) -> str:
    """The comparison as a markdown page: one row per task and metric."""
    conf = round(100 * (1 - alpha))
    lines = [f"# {b} vs {a}", "",
             f"Delta = B - A over the same queries; {conf}% paired bootstrap CI; p = paired randomization test "
             "(two-sided).", "", f"- A: `{a}`", f"- B: `{b}`", "",
             f"| task | metric | n | A | B | delta | {conf}% CI | p |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r.task} | {r.metric} | {r.n} | {_fmt(r.mean_a)} | {_fmt(r.mean_b)} | {r.delta:+.4f} | "
                     f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}] | {r.p_value:.4f} |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def _write(path: str, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(p)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gcl.eval.compare", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_a", help="evaluation A (baseline): an eval folder, run dir or step_*.json; A1,A2 = mean")
    ap.add_argument("eval_b", help="evaluation B, same form")
    ap.add_argument("--metrics", nargs="+", default=None, help="metrics to compare (default: each task's own)")
    ap.add_argument("--tasks", nargs="+", default=None, help="task names (default: every common retrieval task)")
    ap.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    ap.add_argument("--n-perm", type=int, default=10000, help="randomization-test sign flips (default 10000)")
    ap.add_argument("--alpha", type=float, default=0.05, help="1 - confidence of the interval (default 0.05)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not 0 < args.alpha < 1 or args.n_boot < 100 or args.n_perm < 100:
        ap.error("need 0 < --alpha < 1, --n-boot >= 100 and --n-perm >= 100")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a, b = args.eval_a.split(","), args.eval_b.split(",")
    try:
        rows, notes = compare(a, b, metrics=args.metrics, tasks=args.tasks, n_boot=args.n_boot, n_perm=args.n_perm,
                              alpha=args.alpha, seed=args.seed)
    except (ValueError, FileNotFoundError) as exn:
        log.error("compare: %s", exn)
        return 2
    md = markdown_table(rows, args.eval_a, args.eval_b, args.alpha, notes)
    sys.stdout.write(md)
    if args.md:
        _write(args.md, md)
    if args.json:
        _write(args.json, json.dumps({"a": a, "b": b, "alpha": args.alpha, "n_boot": args.n_boot,
                                      "n_perm": args.n_perm, "seed": args.seed, "notes": notes,
                                      "results": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
