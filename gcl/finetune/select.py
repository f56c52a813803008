"""Scoring candidate weights on the selection split, and the rule that chooses among them.

Lives here: :func:`parse_alphas` / :func:`parse_alpha` (the WiSE-FT grid and value), :func:`select_defaults`
(``export.select`` / ``export.wise`` of a run, else the repo's defaults), :func:`selection_suites` (the run's
eval suite plus ``export.select.suites``, every task moved to ``export.select.split``), :class:`Scorer` (one
eval model of a run's architecture; scores any state dict on those suites), :class:`Rule` (best domain
metric among candidates whose retention >= (1 - max_retention_drop) x the reference's).

Selection never looks at test data: a task on ``test`` (or ``<dataset>/test``) is moved to the selection
split, and a task on any other split (``test_heldout``: generalisation measured at the end) is left out and
named in the log. Not here: what the candidates are (:mod:`gcl.finetune.wise`, :mod:`gcl.finetune.soup`).
"""
from __future__ import annotations

import copy
import difflib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from gcl.finetune.runs import FinetuneError, Run

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def parse_alphas(spec: str) -> list[float]:
    """``"0:1:0.1"`` (start:stop:step, stop included) or ``"0,0.5,1"`` -> sorted alphas in [0, 1]."""
    text = str(spec).strip()
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(math.floor((stop - start) / step + 1e-9))
            vals = [round(start + i * step, 10) for i in range(n + 1)]
        else:
            vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"alphas {spec!r}: use start:stop:step (e.g. 0:1:0.1) or a comma list (0,0.5,1)") from None
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise ValueError(f"alphas {spec!r}: every alpha must lie in [0, 1]")
    return sorted(set(vals))


def parse_alpha(value: Any) -> float | str:
    """``export.wise.alpha``: ``"auto"`` or a float in [0, 1]."""
    if isinstance(value, str) and value.strip() == "auto":
        return "auto"
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"export.wise.alpha={value!r}: use auto, a number in [0, 1], or null (off)") from None
    if not 0 <= a <= 1:
        raise ValueError(f"export.wise.alpha={value!r}: must be in [0, 1] (0 = the base, 1 = the fine-tuned model)")
    return a


def select_defaults(run: Run | None) -> DictConfig:
    """The ``export`` node whose ``select`` / ``wise`` settings apply: the run's own, else conf/export."""
    node = None
    if run is not None:
        node = OmegaConf.select(run.config, "export")
    if node is None or OmegaConf.select(node, "select") is None or OmegaConf.select(node, "wise") is None:
        node = OmegaConf.load(CONF_DIR / "export" / "default.yaml")
    return node


def selection_overrides(select: DictConfig, args: Any) -> DictConfig:
    """``select`` with a command line's values where given (``python -m gcl.wise`` / ``gcl.soup``)."""
    s = OmegaConf.create(OmegaConf.to_container(select, resolve=True))
    for key, val in (("split", args.split), ("suites", args.suites), ("domain_metric", args.domain_metric),
                     ("max_retention_drop", args.max_retention_drop)):
        if val is not None:
            s[key] = val
    if args.retention_metric is not None:
        s.retention_metric = None if args.retention_metric.lower() == "none" else args.retention_metric
    return s


# ----------------------------------------------------------------------------------------------- suites

def load_eval_preset(name: str) -> DictConfig:
    """``conf/eval/<name>.yaml`` checked against the eval schema."""
    from gcl.eval.schema import EvalConfig

    path = CONF_DIR / "eval" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "eval").glob("*.yaml"))
        raise FinetuneError(f"export.select.suites: no eval preset {name!r} (known: {', '.join(known)})")
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(path))


def move_to_split(suite: DictConfig, split: str) -> tuple[DictConfig, list[str]]:
    """A copy of ``suite`` whose tasks read ``split``: ``test`` moves there (keeping a ``<dataset>/``
    prefix), tasks on other splits are dropped (returned by name). No gallery (many candidates are scored)."""
    out = copy.deepcopy(suite)
    kept, dropped = [], []
    for t in out.tasks:
        if t.split is None:  # a table/data_root task: its own documents, the same for every candidate
            log.warning("selection: task %s reads its own documents (no split to move to %s); choosing on it "
                        "is choosing on that data, so report another set", t.name, split)
            kept.append(t)
            continue
        prefix, sep, name = str(t.split).rpartition("/")
        if name == split:
            kept.append(t)
        elif name == "test":
            t.split = f"{prefix}{sep}{split}"
            kept.append(t)
        else:
            dropped.append(t.name)
    if not kept:
        raise FinetuneError(f"eval suite {suite.name!r} has no task on the {split} or test split to select with")
    out.tasks = kept
    out.gallery.enabled = False
    return out, dropped


def selection_suites(run: Run, select: DictConfig) -> list[DictConfig]:
    """The run's eval suite and ``select.suites`` (presets it does not already hold), each moved to
    ``select.split``."""
    own = run.config.eval
    # a preset the run's suite already holds (by name, or as "<name>/<task>" tasks of a combined suite) is skipped
    covered = {own.name} | {str(t.name).split("/", 1)[0] for t in own.tasks if "/" in str(t.name)}
    suites = [own] + [load_eval_preset(n) for n in select.suites if n not in covered]
    out = []
    for s in suites:
        moved, dropped = move_to_split(s, select.split)
        if dropped:
            log.info("selection on %s: suite %s leaves out %s (not on a %s/test split)", select.split,
                     s.name or "(multi-suite)", ", ".join(dropped), select.split)
        out.append(moved)
    return out


# ----------------------------------------------------------------------------------------------- scoring

class Scorer:
    """Scores state dicts of ``run``'s architecture on ``suites`` (metrics keyed as the evaluator's).

    One model is built from the run's checkpoint; each call loads a state dict into it (strict) and runs
    every suite on the selection split, writing files under ``out_dir/<label>/``.
    """

    def __init__(self, run: Run, suites: list[DictConfig], *, out_dir: Path, device: str = "auto") -> None:
        from gcl.data import resolve_splits
        from gcl.eval.load import load_model_for_eval

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        node = OmegaConf.create({**OmegaConf.to_container(run.config.model, resolve=True),
                                 "checkpoint": str(run.src.checkpoint_file), "precision": "fp32"})
        self.bundle = load_model_for_eval(node, device=self.device, work_dir=out_dir)
        self.data = run.config.data
        wanted = [t.split for s in suites for t in s.tasks if t.split]
        # prefixed splits (world/val: the retention suite's, moved from world/test) are built like the trainer's
        self.splits = resolve_splits(self.data, extra=wanted) if wanted else None
        self.suites, self.out_dir = suites, out_dir
        self.evaluations = 0

    def __call__(self, state_dict: dict[str, Tensor], label: str) -> dict[str, float]:
        from gcl.eval.run import evaluate_model

        self.bundle.model.load_state_dict(state_dict, strict=True)
        metrics: dict[str, float] = {}
        for suite in self.suites:
            metrics.update(evaluate_model(
                self.bundle, suite, splits=self.splits, context_length=dict(self.data.context_length),
                default_context_length=int(self.data.default_context_length), list_sep=str(self.data.list_sep),
                out_dir=self.out_dir / label / (suite.name or "suite"), device=self.device))
        self.evaluations += 1
        return metrics


# ------------------------------------------------------------------------------------------------ the rule

def _metric(metrics: dict[str, float], name: str, key: str) -> float:
    if name not in metrics:
        close = difflib.get_close_matches(name, list(metrics), n=3)
        raise FinetuneError(f"{key}={name!r} is not among the selection metrics (closest: {close}; all: "
                            f"{sorted(metrics)[:40]}...)")
    return float(metrics[name])


@dataclass
class Rule:
    """Best ``domain_metric`` among the candidates whose ``retention_metric`` is at least
    ``(1 - max_retention_drop)`` times the reference's (the base). Ties: higher retention, then the earlier
    candidate (the grid is ordered from the base towards the fine-tuned model). Without a retention metric:
    best domain metric."""

    domain_metric: str
    retention_metric: str | None
    max_retention_drop: float

    @classmethod
    def from_config(cls, select: DictConfig) -> Rule:
        return cls(str(select.domain_metric), select.retention_metric, float(select.max_retention_drop))

    def describe(self) -> str:
        if self.retention_metric is None:
            return f"best {self.domain_metric} (no retention constraint: export.select.retention_metric=null)"
        return (f"best {self.domain_metric} with {self.retention_metric} >= (1 - {self.max_retention_drop:g}) x "
                "the base's")

    def scores(self, metrics: dict[str, float]) -> tuple[float, float | None]:
        dom = _metric(metrics, self.domain_metric, "export.select.domain_metric")
        ret = None if self.retention_metric is None else _metric(metrics, self.retention_metric,
                                                                  "export.select.retention_metric")
        return dom, ret

    def choose(self, candidates: list[dict[str, float]], reference: dict[str, float] | None) -> int:
        """The index of the chosen candidate (``candidates``: metrics dicts; ``reference``: the base's)."""
        floor = -math.inf
        if self.retention_metric is not None and reference is not None:
            floor = (1 - self.max_retention_drop) * self.scores(reference)[1]
        best, best_key = None, None
        for i, m in enumerate(candidates):
            dom, ret = self.scores(m)
            if ret is not None and ret < floor - 1e-12:
                continue
            key = (dom, ret if ret is not None else 0.0)
            if best_key is None or key > best_key:
                best, best_key = i, key
        if best is None:
            raise FinetuneError(f"no candidate meets the rule ({self.describe()}); include alpha 0 (the base) in "
                                "the grid or raise export.select.max_retention_drop")
        return best
