"""What a resume may change: the config diff against the checkpoint, its classes, and the config history.

A checkpoint keeps the resolved config it was trained with. On ``trainer.resume=auto|PATH`` the current
config is compared with it key by key, and every difference falls in one class of :data:`CHANGE_RULES`
(the one table of them; the longest matching key prefix wins):

- ``applied``: cannot change what is trained (eval, logging, export, checkpoint cadence, a longer or shorter
  run's bookkeeping, execution settings such as ``model.grad_checkpointing``); applied and logged.
- ``from_step``: optimizer and schedule settings (the EMA's decay, a new unlock step or layer-decay factor
  too); they take effect from the resumed step and are logged as
  ``optim.lr 0.0005 -> 1e-06 from step N`` (:func:`load_optimizer_keeping_settings` makes them win over
  the values stored in the optimizer and scheduler state).
- ``refused``: changes that break exactness or meaning (data, loss, model and its LoRA adapters, batch size,
  seed, turning an unlock schedule or layer-wise decay on or off): the resume stops before any step, naming
  each key and the ways out (``trainer.resume_changes=allow``, which warns instead, or a fresh start from the
  checkpoint's weights).

Elastic resume: another number of processes (or DataLoader workers) is applied. The data position of every
old rank x worker is re-partitioned over the new ones so the interrupted epoch stays exact
(``gcl.data.elastic``); the per-process batch follows from the global batch (:func:`per_process_batch`,
``trainer.elastic_batch``); each new rank's RNG streams are re-derived from ``(trainer.seed, step, rank, world
size)`` (:func:`elastic_seed`).

Also here: the config history (``.hydra/config.step_<N>.yaml``: the config of the launch that started at
step N, kept because Hydra rewrites ``.hydra/config.yaml`` on every launch). Not here: reading and
verifying checkpoint files (``gcl.checkpoint``), building the trainer (``gcl.train``).
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

APPLIED, FROM_STEP, REFUSED = "applied", "from_step", "refused"
WORLD_SIZE = "world size"  # not a config key: the number of processes, compared like one


def _both_set(old: Any, new: Any) -> str:
    # a schedule value moved (lock_<tower>_steps, layer_decay_<tower>) takes effect from the resumed step; turned
    # on or off it changes what the optimizer holds (its groups, the scheduled parameters): the state won't fit
    return FROM_STEP if old is not None and new is not None else REFUSED


Rule = str | Callable[[Any, Any], str]
# The classes of change, by key prefix (longest match wins; a key under no prefix is refused). Another number of
# processes or DataLoader workers is applied: the data position is re-partitioned exactly (gcl.data.elastic);
# data.batch_size is settled by per_process_batch before this table is consulted.
CHANGE_RULES: dict[str, Rule] = {
    "model": REFUSED,
    "model.cache_dir": APPLIED,
    "model.checkpoint": APPLIED,
    "model.compile": APPLIED,
    "model.grad_checkpointing": APPLIED,
    "model.lock_image_steps": _both_set,  # the unlock step (the lock itself, LoRA: model, refused)
    "model.lock_text_steps": _both_set,
    "model.text_packing": APPLIED,
    "data": REFUSED,
    "data.num_workers": APPLIED,
    "data.prefetch_factor": APPLIED,
    "data.val_shards": APPLIED,
    "data.test_shards": APPLIED,
    "loss": REFUSED,
    "optim": FROM_STEP,
    "optim.fused": APPLIED,
    "optim.layer_decay_image": _both_set,  # on/off regroups the parameters; a new factor rescales the groups
    "optim.layer_decay_text": _both_set,
    "optim.ema.eval": APPLIED,  # optim.ema.decay / warmup_steps: from step N (the EMA so far is kept)
    "sched": FROM_STEP,
    "trainer": APPLIED,
    "trainer.max_steps": FROM_STEP,
    "trainer.seed": REFUSED,
    "eval": APPLIED,
    "logger": APPLIED,
    "export": APPLIED,
    WORLD_SIZE: APPLIED,
}
WHY = {
    REFUSED: "change the data, the loss, the model, the batch or what the optimizer holds, so the run would not "
             "continue the checkpoint's",
}
_ABSENT = "<absent>"  # a key (or list item) only one side has


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    kind: str

    def describe(self, step: int) -> str:
        tail = f" from step {step}" if self.kind == FROM_STEP else ""
        return f"{self.key} {_fmt(self.old)} -> {_fmt(self.new)}{tail}"


def _fmt(v: Any) -> str:
    if isinstance(v, dict) and "name" in v:  # a loss term or eval task: its name says which
        return f"{{name: {v['name']}, ...}}"
    return v if isinstance(v, str) else json.dumps(v)


def classify(key: str, old: Any, new: Any) -> str:
    """The class of a change of ``key`` from ``old`` to ``new`` (see :data:`CHANGE_RULES`)."""
    best = None
    for prefix in CHANGE_RULES:
        if key == prefix or key.startswith(prefix + ".") or key.startswith(prefix + "["):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        return REFUSED
    rule = CHANGE_RULES[best]
    return rule(old, new) if callable(rule) else rule


def _walk(a: Any, b: Any, key: str, out: list[Change]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            _walk(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{key}.{k}" if key else str(k), out)
    elif isinstance(a, list) and isinstance(b, list) and any(isinstance(v, dict) for v in a + b):
        for i in range(max(len(a), len(b))):  # list items holding mappings (loss terms, eval tasks) one by one
            _walk(a[i] if i < len(a) else _ABSENT, b[i] if i < len(b) else _ABSENT, f"{key}[{i}]", out)
    elif a != b:
        out.append(Change(key, a, b, classify(key, a, b)))


def diff(saved: dict[str, Any], current: dict[str, Any], saved_world: int, world: int) -> list[Change]:
    """Every difference between the checkpoint's resolved config and the current one (plus the world size),
    keyed like ``loss.terms[0].weight``; an item only one side has is one change (``loss.terms[3]``)."""
    changes: list[Change] = []
    _walk(saved, current, "", changes)
    if saved_world != world:
        changes.append(Change(WORLD_SIZE, saved_world, world, classify(WORLD_SIZE, saved_world, world)))
    return changes


class ResumeRefused(RuntimeError):
    """A resume whose config changes would not continue the checkpoint's run; the message names each key."""


def check(changes: list[Change], *, policy: str, checkpoint: Path, step: int) -> None:
    """Log every change by class; raise ResumeRefused for refused ones unless ``policy == "allow"``."""
    for c in changes:
        if c.kind == APPLIED:
            log.info("resume: %s (applied)", c.describe(step))
        elif c.kind == FROM_STEP:
            log.info("resume: %s", c.describe(step))
    refused = [c for c in changes if c.kind == REFUSED]
    if not refused:
        return
    lines = "\n".join(f"  {c.describe(step)}" for c in refused)
    if policy == "allow":
        log.warning("trainer.resume_changes=allow: resuming %s (step %d) despite changes that %s; the run no "
                    "longer continues the checkpoint's exactly (where data settings changed, the data stream "
                    "restarts at the start of its epoch):\n%s", checkpoint, step, WHY[REFUSED], lines)
        return
    raise ResumeRefused(
        f"trainer.resume: the checkpoint {checkpoint} (step {step}) was trained with settings this launch changes; "
        f"these changes {WHY[REFUSED]}:\n{lines}\nWays out: "
        + "; ".join([
            "undo these overrides to continue exactly",
            "add trainer.resume_changes=allow to continue anyway (each change is warned about)",
            f"or start a new run from its weights: model.pretrained={checkpoint} trainer.resume=null "
            "hydra.run.dir=NEW_DIR"]))


# ------------------------------------------------------------------------------------------ elastic resume

KEEP_GLOBAL, PER_PROCESS = "keep_global", "per_process"  # trainer.elastic_batch


def per_process_batch(changes: list[Change], *, saved_batch: int, saved_world: int, saved_global: int | None,
                      batch: int, world: int, mode: str, accum_steps: int) -> tuple[int, list[Change], str | None]:
    """The per-process batch a resume trains with, the changes with ``data.batch_size`` settled, and a line
    to log (None when nothing moves).

    ``saved_global``: the checkpoint's global batch (processes x per-process batch; older checkpoints: None,
    then ``saved_batch x saved_world``). ``batch``: this launch's ``data.batch_size``. With
    ``mode="keep_global"`` and ``data.batch_size`` as the checkpoint's config has it, the global batch stays:
    each of the ``world`` processes takes ``global / world`` (refused, naming the numbers and the override,
    when that does not divide, or does not divide by ``trainer.accum_steps``). An explicit ``data.batch_size``
    that keeps the global batch is applied; another one stays a refused change. ``mode="per_process"`` accepts
    a new global batch: ``data.batch_size`` per process, whatever it was."""
    glob = saved_global or saved_batch * saved_world
    rest = [c for c in changes if c.key != "data.batch_size"]
    if mode == PER_PROCESS:
        moved = [Change("data.batch_size", saved_batch, batch, FROM_STEP)] if batch != saved_batch else []
        line = None if batch * world == glob else (
            f"global batch {glob} -> {batch * world} (trainer.elastic_batch=per_process: "
            f"data.batch_size={batch} per process x {world} process{'es' if world > 1 else ''})")
        return batch, rest + moved, line
    if batch != saved_batch:
        if batch * world == glob:  # an explicit per-process batch that keeps the global one
            return batch, rest + [Change("data.batch_size", saved_batch, batch, APPLIED)], None
        return batch, changes, None  # a refused change of the batch (check() names it)
    procs = f"{world} process{'es' if world > 1 else ''}"
    if glob % world or (glob // world) % accum_steps:
        why = (f"does not divide over {procs} ({glob} / {world} = {glob / world:.4g})" if glob % world else
               f"gives {glob // world} per process, which trainer.accum_steps={accum_steps} does not divide")
        ok = [w for w in range(1, glob + 1) if glob % w == 0 and (glob // w) % accum_steps == 0]
        raise ResumeRefused(
            f"trainer.resume: the checkpoint's global batch {glob} ({saved_world} process"
            f"{'es' if saved_world > 1 else ''} x {glob // saved_world} per process) {why}, so it cannot be kept. "
            f"Ways out: relaunch on a number of processes it fits ({', '.join(map(str, ok[:12]))}"
            f"{', ...' if len(ok) > 12 else ''}); or accept a new global batch with trainer.elastic_batch="
            f"per_process, which trains with data.batch_size per process ({batch} x {world} = {batch * world} "
            f"here; set data.batch_size=N for N x {world})")
    per = glob // world
    line = None if per == batch else (
        f"data.batch_size {batch} -> {per} per process: the global batch {glob} stays on {procs} "
        "(trainer.elastic_batch=keep_global)")
    return per, changes, line


def elastic_seed(seed: int, step: int, rank: int, world: int) -> int:
    """The seed of rank ``rank``'s RNG streams (torch, CUDA, numpy, random) after a resume at ``step`` on
    another number of processes ``world``: the saved per-rank states belong to the old ranks, so each new rank
    draws fresh streams that depend on nothing else (the same ones on every replay of that resume)."""
    return int(np.random.SeedSequence([seed, step, rank, world, 0x18E]).generate_state(1)[0])


def load_optimizer_keeping_settings(optimizer: torch.optim.Optimizer, scheduler: Any, opt_state: dict[str, Any],
                                    sched_state: dict[str, Any]) -> list[tuple[str, float, float]]:
    """Load the optimizer and LambdaLR scheduler state (moments, step counts, schedule position) while the
    current config's hyperparameters win: each group's base lr, weight decay, betas, eps... are the ones the
    optimizer and scheduler were just built with, and the lr is recomputed at the restored position.

    Unchanged settings give the stored values bit for bit (the same formula, ``base_lr * factor(step)``).
    Returns ``(group name, stored lr, lr now)`` per group whose lr changed."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    base = list(scheduler.base_lrs)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(sched_state)
    names = [g.get("name") for g in optimizer.param_groups]
    if names != [g.get("name") for g in fresh]:
        raise ResumeRefused(f"the checkpoint's optimizer groups {names} differ from this model's "
                            f"{[g.get('name') for g in fresh]} (a tower was locked or unlocked, layer-wise decay or LoRA turned on "
                            "or off)")
    step = scheduler.last_epoch
    lrs = [b * fn(step) for b, fn in zip(base, scheduler.lr_lambdas)]
    moved = []
    for g, f, b, lr in zip(optimizer.param_groups, fresh, base, lrs):
        if g["lr"] != lr:
            moved.append((str(g.get("name")), float(g["lr"]), float(lr)))
        g.update({k: v for k, v in f.items() if k not in ("lr", "initial_lr")}, initial_lr=b, lr=lr)
    scheduler.base_lrs = base
    scheduler._last_lr = lrs  # what get_last_lr() (the logged lr) reports until the next step
    return moved


# ------------------------------------------------------------------------------------------ config history

def _history(hydra_dir: Path, stem: str) -> list[tuple[int, Path]]:
    out = []
    for p in hydra_dir.glob(f"{stem}.step_*.yaml"):
        digits = p.name[len(stem) + len(".step_"):-len(".yaml")]
        if digits.isdigit():
            out.append((int(digits), p))
    return sorted(out)


def record_config(run_dir: Path, config_yaml: str, step: int) -> Path:
    """Keep this launch's config (and Hydra's ``overrides.yaml``) as ``.hydra/config.step_<step>.yaml``:
    Hydra rewrites ``.hydra/config.yaml`` on every launch, so without these the earlier configs are lost."""
    from gcl.checkpoint import atomic_write_text

    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    dst = hydra_dir / f"config.step_{step:09d}.yaml"
    atomic_write_text(config_yaml, dst)
    if (hydra_dir / "overrides.yaml").is_file():
        shutil.copyfile(hydra_dir / "overrides.yaml", hydra_dir / f"overrides.step_{step:09d}.yaml")
    return dst


def restore_config(run_dir: Path, step: int, fallback_yaml: str) -> None:
    """After a refused resume: put back the run's own config as ``.hydra/config.yaml`` (Hydra has already
    written the refused launch's there): the newest history file at or before ``step``, else the
    checkpoint's resolved config ``fallback_yaml``."""
    from gcl.checkpoint import atomic_write_text

    hydra_dir = run_dir / ".hydra"
    if not hydra_dir.is_dir():
        return
    for stem in ("config", "overrides"):
        kept = [p for s, p in _history(hydra_dir, stem) if s <= step]
        if kept:
            shutil.copyfile(kept[-1], hydra_dir / f"{stem}.yaml")
        elif stem == "config":
            atomic_write_text(fallback_yaml, hydra_dir / "config.yaml")
