"""The training loop: setup / train_step / evaluate / save. One recipe for 1..N processes.

Reading order: :func:`run` (entry) -> :meth:`Trainer.fit` (loop) -> :meth:`Trainer.train_step` (forward, loss,
backward, optimizer step) -> :class:`gcl.loss.GCLLoss`.

Distributed runs (``torchrun`` / ``accelerate launch``) use accelerate for process-group setup, device placement,
mixed precision and DDP; ``trainer.strategy=fsdp`` shards the model with FSDP2 instead (``gcl.fsdp``), with the
same step, the same checkpoint files and the same evaluation. Only rank 0 writes logs, checkpoints and exports.

Lives here: the ``Trainer`` (its build steps, checkpoint state and resume, the step, in-loop eval, the loop,
logging) and ``run``. Not here: collectives (``gcl.distributed``), FSDP2 sharding (``gcl.fsdp``), SLURM env and stop signals
(``gcl.launch``), the model (``gcl.model``), the loss (``gcl.loss``), data (``gcl.data``), evaluation
(``gcl.eval.run``), checkpoint files (``gcl.checkpoint``), their object-storage mirror (``gcl.remote``), export (``gcl.export``).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from gcl import config as gcl_config
from gcl import resume
from gcl.checkpoint import (
    BEST_FILE,
    CheckpointManager,
    atomic_write_text,
    find_checkpoint,
    load_checkpoint,
    load_newest_intact,
    read_sharded_into,
    rng_state,
    save_sharded,
    set_rng_state,
    step_files,
)
from gcl.distributed import all_reduce_sum, gather_checked, gather_objects
from gcl.flops import StepFlops, compute_dtype, resolve_peak_tflops
from gcl.fsdp import (
    average_replicated_grads,
    clip_grad_norm_,
    load_full_model_state,
    shard_optimizer_state,
    unsharded,
)
from gcl.launch import INTERRUPTED_EXIT, StopSignal, slurm_to_torch_env
from gcl.log import RunLogger, Throughput, console_logging, cut_metrics, exit_on_user_error, report_failure
from gcl.remote import RemoteSync, fetch_for_resume

log = logging.getLogger(__name__)

META_KEYS = ("present", "text_id", "item_id", "score", "position")


def to_device(x: Any, device: torch.device) -> Any:
    """Move every tensor inside nested dicts/lists to ``device``; other values pass through."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, list):
        return [to_device(v, device) for v in x]
    return x


def slice_batch(x: Any, sl: slice) -> Any:
    """The rows ``sl`` of every tensor/list in a batch (nested dicts kept; scalars and counters as they are)."""
    if isinstance(x, Tensor) and x.ndim > 0:
        return x[sl]
    if isinstance(x, dict):
        return {k: (v if k == "skipped" else slice_batch(v, sl)) for k, v in x.items()}
    if isinstance(x, list):
        return x[sl]
    return x


class _Forward(nn.Module):
    """What DDP wraps (and FSDP2 shards as its root): the field encoder plus the logit scale/bias, so every
    trainable parameter is reached through the wrapper's forward and its gradient is averaged over ranks.
    ``fields`` of a call default to the loss's (an evaluation passes its own)."""

    def __init__(self, encoder: nn.Module, model: nn.Module, fields: list[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.model = model
        self.fields = fields

    def forward(self, batch: dict[str, Any], fields: list[str] | None = None
                ) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
        feats = self.encoder(batch, self.fields if fields is None else fields)
        return feats, self.model.logit_scale, getattr(self.model, "logit_bias", None)


class _RngReplay:
    """Captures the torch RNG state so a micro-batch forward can be replayed identically (dropout etc.)."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class Trainer:
    """Builds everything from a validated cfg, then :meth:`fit` runs the loop."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        # Order matters: the seed is set before the model is built (weight init draws random numbers), and
        # each step reads what the ones before it built (the accelerator's device, the loss's fields, splits).
        self.cfg = cfg
        self._build_accelerator(run_dir)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.trainer.keep_last)
        self.batch_size = cfg.data.batch_size  # per process; a resume on another number of processes may change it
        # The checkpoint to continue is chosen and its config diff checked first: a refusal costs no model build.
        self._resuming = self._plan_resume()
        encoder = self._build_model_and_loss()
        self._build_optimizer(encoder)
        self._build_data()
        self._build_evaluator()
        self._export_preflight()
        self.flops = StepFlops(resolve_peak_tflops(cfg.trainer.peak_tflops, self.accelerator.device, compute_dtype(
            self.accelerator.mixed_precision, cfg.model.precision)))  # counts the first step, then rates
        # rank 0 writes checkpoints, so it mirrors them; the prefix is checked for writing now, not hours later
        self.remote = (RemoteSync(cfg.trainer.remote_sync, self.run_dir)
                       if cfg.trainer.remote_sync and self.is_main else None)
        self.step = 0
        self.step_lr: float | None = None  # the lr of the last train_step (param group 0), as logged
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.samples_seen = 0  # over all processes and launches (the global batch may change on an elastic resume)
        self.best: float | None = None
        self.last_eval: dict[str, float] = {}
        self._window: dict[str, Any] | None = None  # valid rows per term since the last logged step
        self.stop: StopSignal | None = None  # set while fit() runs
        self.interrupted: str | None = None  # the signal that stopped fit() after its checkpoint was saved
        self.resumed_from: int | None = None
        self.wandb_id = uuid.uuid4().hex[:8]  # one wandb run across resumes (kept in the checkpoint)
        self._saved_step: int | None = None  # the step of the newest checkpoint written or loaded
        self._restore_rng: Callable[[], None] | None = None  # set by a resume, run when the loop starts
        self._resume()

    # ------------------------------------------------------------------------------------------- build
    def _build_accelerator(self, run_dir: Path) -> None:
        """Device, mixed precision and process group (accelerate); rank, run dir, seed, determinism."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        t = self.cfg.trainer
        slurm_to_torch_env()
        if t.threads:
            torch.set_num_threads(t.threads)
        use_cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
        if t.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto")
        mp = t.mixed_precision
        if mp == "auto":
            mp = "no" if use_cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        if t.strategy == "fsdp" and mp == "fp16":  # the explicit value is refused by config.validate already
            raise gcl_config.ConfigError(
                "trainer.strategy=fsdp: trainer.mixed_precision=auto resolved to fp16 (this GPU has no bf16), and "
                "fp16 needs a loss scaler over sharded gradients, which gcl does not run; use "
                "trainer.mixed_precision=no, or trainer.strategy=ddp")
        self.accelerator = Accelerator(cpu=use_cpu, mixed_precision=mp)
        acc = self.accelerator
        self.rank, self.world_size = acc.process_index, acc.num_processes
        # FSDP2 shards over the process group; one process has nothing to shard and trains the plain model
        self.sharded = t.strategy == "fsdp" and self.world_size > 1
        if t.strategy == "fsdp" and not self.sharded:
            log.info("trainer.strategy=fsdp in one process: nothing to shard, the model trains unwrapped")
        self.is_main = acc.is_main_process
        # rank 0's Hydra dir for every rank
        self.run_dir = Path(gather_objects(str(run_dir), self.world_size)[0])
        set_seed(t.seed, device_specific=True)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

    def _build_model_and_loss(self) -> nn.Module:
        """The loss, the model bundle, the trained fields and the logit-scale ceiling; returns the encoder."""
        from gcl.loss import build_loss
        from gcl.model import build_model
        from gcl.model.speed import compile_loss

        cfg, acc = self.cfg, self.accelerator
        m = cfg.model
        self.loss_fn = build_loss(cfg.loss.kind, OmegaConf.to_container(cfg.loss.terms, resolve=True),
                                  cfg.loss.duplicates)
        self.bundle = build_model(
            m.name, m.pretrained, config_path=m.config_path, precision=m.precision, device=acc.device,
            lock_image=m.lock_image, lock_image_unlocked_groups=m.lock_image_unlocked_groups,
            lock_image_freeze_bn=m.lock_image_freeze_bn, lock_text=m.lock_text,
            lock_text_unlocked_layers=m.lock_text_unlocked_layers,
            lock_text_freeze_layer_norm=m.lock_text_freeze_layer_norm, grad_checkpointing=m.grad_checkpointing,
            compile=m.compile, compile_backend=m.compile_backend, attention=m.attention,
            channels_last=m.channels_last, patch_dropout=m.patch_dropout, text_packing=m.text_packing,
            logit_bias_init=(m.logit_bias_init if m.logit_bias_init is not None else -10.0)
            if cfg.loss.kind == "siglip" else None,
            cache_dir=m.cache_dir, lora=OmegaConf.to_container(m.lora, resolve=True))
        compile_loss(self.loss_fn, m.compile, m.compile_backend)
        model = self.bundle.model
        self.model = model
        from gcl.model import UnlockSchedule

        self.unlock = UnlockSchedule.from_model(model, {"image": m.lock_image_steps if m.lock_image else None,
                                                        "text": m.lock_text_steps if m.lock_text else None})
        self.fields = sorted(self.loss_fn.fields)
        encoder = self.bundle.field_encoder()
        # exp(logit_scale) is clamped to logit_scale_max, but never below a pretrained scale (SigLIP ~ 110).
        init_scale = float(model.logit_scale.detach())
        cap = cfg.optim.logit_scale_max
        self.logit_scale_ceiling = math.inf if cap is None else max(math.log(cap), init_scale)
        if cap is not None and init_scale > math.log(cap):
            log.warning("initial logit scale exp(%.3f) exceeds optim.logit_scale_max=%s; clamping at the initial "
                        "value instead", init_scale, cap)
        return encoder

    def _build_optimizer(self, encoder: nn.Module) -> None:
        """The forward module (encoder + logit scale/bias) wrapped for the strategy, then the optimizer and LR
        schedule. ddp: accelerate prepares both (DDP, mixed precision). fsdp: FSDP2 shards the forward module
        first (it replaces the parameters the optimizer must hold), and accelerate prepares the optimizer."""
        from gcl.fsdp import shard
        from gcl.optim import build_optimizer, build_scheduler

        cfg, acc, model = self.cfg, self.accelerator, self.model
        t = cfg.trainer
        o = cfg.optim
        forward = _Forward(encoder, model, self.fields)
        self.replicated: list[nn.Parameter] = []  # fsdp: the unsharded 0-dim parameters (logit scale/bias)
        if self.sharded:
            self.replicated = shard(forward, model, device=acc.device, world_size=self.world_size,
                                    mixed_precision=acc.mixed_precision)
            if self.unlock is not None:  # sharding replaced the parameters the schedule toggles
                self.unlock.rebind(model)
        # the optimizer holds the parameters of scheduled unlocks from the start (gcl.model.towers.UnlockSchedule)
        with self.unlock.all_unlocked() if self.unlock is not None else contextlib.nullcontext():
            optimizer = build_optimizer(
                model, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, lr_image=o.lr_image,
                lr_text=o.lr_text, fused=o.fused, layer_decay_image=o.layer_decay_image,
                layer_decay_text=o.layer_decay_text, weight_decay_image=o.weight_decay_image,
                weight_decay_text=o.weight_decay_text)
        s = cfg.sched
        self.scheduler = build_scheduler(optimizer, name=s.name, warmup_steps=s.warmup_steps,
                                         total_steps=t.max_steps, min_lr_ratio=s.min_lr_ratio,
                                         cooldown_steps=s.cooldown_steps)
        if self.sharded:
            self.forward_module, self.optimizer = forward, acc.prepare(optimizer)
        else:
            self.forward_module, self.optimizer = acc.prepare(forward, optimizer)
        from gcl.finetune.ema import build_ema

        self.ema = build_ema(model, o.ema.decay, o.ema.warmup_steps)

    def _build_data(self) -> None:
        """The splits and this rank's resumable training stream."""
        from gcl.data import resolve_splits

        d = self.cfg.data
        # eval tasks may read splits of a generated dataset other than the training data (world/test)
        extra = [k.split for k in self.cfg.eval.tasks if k.split] if self._in_loop_eval() else ()
        self.splits = resolve_splits(d, extra=extra)
        self._check_loss_fields()
        self.stream = self._build_stream()

    def _build_stream(self) -> Any:
        """This rank's resumable training stream of ``self.batch_size`` samples per batch."""
        from gcl.data.stream import build_train_stream

        cfg, acc = self.cfg, self.accelerator
        t, d = cfg.trainer, cfg.data
        ctx = {f: min(d.context_length.get(f, d.default_context_length), self.bundle.context_length)
               for f in self.fields if f != "image"}
        return build_train_stream(
            self.splits["train"], tokenizer=self.bundle.tokenizer, context_length=ctx,
            image_transform=self.bundle.preprocess_train if d.augment else self.bundle.preprocess_val,
            batch_size=self.batch_size,
            fields=[f for f in self.fields if f != "image"], num_workers=d.num_workers, seed=t.seed,
            resampled=d.resampled, source_weights=list(d.source_weights) if d.source_weights else None,
            shuffle_buffer=d.shuffle_buffer, list_rule=d.list_rule, list_sep=d.list_sep,
            image_background=d.image_background, rank=self.rank,
            world_size=self.world_size, pin_memory=acc.device.type == "cuda", prefetch_factor=d.prefetch_factor)

    def _check_loss_fields(self) -> None:
        """Stop before the first step when a loss field is in none of the first training samples: its term (or
        its share of a fused side) would silently be 0 for the whole run. ``loss.allow_absent_fields`` opts in.
        Every rank reads the same samples, so every rank decides alike."""
        from gcl.data.survey import survey_fields

        needed = gcl_config.loss_data_fields(self.loss_fn.terms)
        allow = gcl_config.allowed_absent(self.cfg.loss)
        if not needed or allow is True:
            return
        survey = survey_fields(self.splits["train"])
        if survey.samples == 0:
            log.warning("could not read any training sample to check the loss fields (%d unreadable); the data "
                        "stream reports why", survey.unreadable)
            return
        absent = {f: terms for f, terms in needed.items() if not survey.present[f]}
        allowed = sorted(f for f in absent if f in allow)
        if allowed:
            log.warning("loss fields %s are in none of the first %d training samples; their terms (%s) get no "
                        "rows from them (allowed by loss.allow_absent_fields)", allowed, survey.samples,
                        sorted({n for f in allowed for n in absent[f]}))
        refused = {f: terms for f, terms in absent.items() if f not in allow}
        if refused:
            what = "; ".join(f"{f!r} (read by {', '.join(terms)})" for f, terms in refused.items())
            raise gcl_config.ConfigError(
                f"loss: field(s) {what} are in none of the first {survey.samples} training samples of "
                f"{self.splits['train']}; fields found: {', '.join(survey.found) or 'none'}. Their terms would be "
                "0 for the whole run. Fix the field names in loss.terms (or the shards), or allow the absence: "
                f"loss.allow_absent_fields=[{','.join(refused)}] (or true for any field)")

    def _in_loop_eval(self) -> bool:
        """Whether the run evaluates in-loop: eval tasks configured and something uses them."""
        t = self.cfg.trainer
        return bool(self.cfg.eval.tasks) and (t.eval_every > 0 or bool(t.best_metric))

    def _build_evaluator(self) -> None:
        """The in-loop evaluator, or None when no eval task is configured or nothing would use it."""
        cfg = self.cfg
        self.evaluator = None
        if self._in_loop_eval():
            from gcl.eval.run import build_evaluator

            self.evaluator = build_evaluator(cfg.eval, splits=self.splits, data_cfg=cfg.data)

    def _export_preflight(self) -> None:
        cfg = self.cfg
        if cfg.export.enabled and cfg.export.push_to and self.is_main:
            from gcl.export import hub_preflight

            hub_preflight(cfg.export.push_to)  # token/network problems surface now, not after hours of training

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly; RNG and data position are per rank (gathered). Every rank
        calls it. Under fsdp (``fsdp_checkpoint=full``) the model and optimizer shards are gathered into full
        tensors that only rank 0 (the writer) keeps: the file is the same as a ddp run's; with ``sharded`` they
        stay shards, for :meth:`_write_state` to save with DCP."""
        from gcl.fsdp import full_state

        acc = self.accelerator
        per_rank = gather_objects({"rng": rng_state(), "data": self.stream.state_dict()}, self.world_size)
        b = self.bundle
        scaler = getattr(acc, "scaler", None)
        model_state = acc.unwrap_model(self.forward_module).model.state_dict()
        opt_state = self.optimizer.state_dict()
        ema_state = self.ema.state_dict() if self.ema is not None else None
        if self.sharded and self.cfg.trainer.fsdp_checkpoint == "full":
            model_state, opt_state = full_state(model_state, self.is_main), full_state(opt_state, self.is_main)
            ema_state = full_state(ema_state, self.is_main)
        return {
            "model": model_state,
            "model_info": {"name": b.name, "pretrained": b.pretrained, "config_path": self.cfg.model.config_path,
                           "model_cfg": b.model_cfg, "preprocess_cfg": b.preprocess_cfg},
            "optimizer": opt_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": self.step,
            "world_size": self.world_size,
            "global_batch": self.batch_size * self.world_size,
            "per_rank": per_rank,
            "counters": {"nonfinite_total": self.nonfinite_total, "nonfinite_streak": self.nonfinite_streak,
                         "samples_seen": self.samples_seen},
            "best": self.best,
            "ema": ema_state,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            "wandb_id": self.wandb_id,
        }

    def _plan_resume(self) -> tuple[Path, dict[str, Any], list[resume.Change]] | None:
        """``(file, state, changes)`` to continue from ``trainer.resume`` (auto: this run dir), or None to start
        at step 0. The checkpoint's config is diffed against this one (``gcl.resume``: applied, from-step or
        refused changes; a refusal raises here) and the per-process batch is settled (``self.batch_size``:
        another number of processes keeps the global batch, ``gcl.resume.per_process_batch``)."""
        found = self._checkpoint_to_resume()
        if found is None:
            return None
        path, state = found
        step = state["step"]
        saved = OmegaConf.to_container(OmegaConf.create(state["config"]), resolve=True)
        changes = resume.diff(saved, OmegaConf.to_container(self.cfg, resolve=True), state["world_size"],
                              self.world_size)
        try:
            self.batch_size, changes, moved_batch = resume.per_process_batch(
                changes, saved_batch=saved["data"]["batch_size"], saved_world=state["world_size"],
                saved_global=state.get("global_batch"), batch=self.cfg.data.batch_size, world=self.world_size,
                mode=self.cfg.trainer.elastic_batch, accum_steps=self.cfg.trainer.accum_steps)
            resume.check(changes, policy=self.cfg.trainer.resume_changes, checkpoint=path, step=step)
        except resume.ResumeRefused:
            if self.is_main:
                resume.restore_config(self.run_dir, step, state["config"])
            raise
        if moved_batch:
            log.info("resume at step %d: %s", step, moved_batch)
        return path, state, changes

    def _resume(self) -> None:
        """Load the planned checkpoint (:meth:`_plan_resume`) into the model, optimizer, scheduler, scaler,
        counters, data position and RNG; optimizer and schedule settings of this config win over the stored
        ones. Either way, this launch's config joins the run's config history."""
        planned, self._resuming = self._resuming, None  # the state is not kept alive for the whole run
        if planned is None:
            self._record_launch()
            return
        path, state, changes = planned
        step = state["step"]
        if self.sharded and state["model"] is None:  # a sharded checkpoint: each rank reads its own shards
            # the model and EMA tensors are filled in place; the optimizer's moments arrive as shards
            state = read_sharded_into(
                path, state, model=self.model.state_dict(),
                params=[p for g in self.optimizer.param_groups for p in g["params"]],
                ema=dict(zip(self.ema.names, self.ema.shadow)) if self.ema is not None else None)
            opt_state = state["optimizer"]
        elif self.sharded:  # full tensors (a full file, either strategy wrote it): each rank keeps its shard
            load_full_model_state(self.model, state["model"])
            opt_state = shard_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.accelerator.unwrap_model(self.forward_module).model.load_state_dict(state["model"])
            opt_state = state["optimizer"]
        moved: dict[tuple[float, float], list[str]] = {}
        for name, old, new in resume.load_optimizer_keeping_settings(self.optimizer, self.scheduler,
                                                                     opt_state, state["scheduler"]):
            moved.setdefault((old, new), []).append(name)
        for (old, new), names in moved.items():
            log.info("resume: lr at step %d %.4g -> %.4g (parameter groups %s)", step, old, new, ", ".join(names))
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        self._resume_ema(state.get("ema"))
        self.step = step
        self.nonfinite_total = state["counters"]["nonfinite_total"]
        self.nonfinite_streak = state["counters"]["nonfinite_streak"]
        # a checkpoint written before the counter existed: every step had the global batch its resume keeps
        self.samples_seen = state["counters"].get("samples_seen", step * self.batch_size * self.world_size)
        if any(c.key in ("trainer.best_metric", "trainer.best_mode") for c in changes):
            log.info("resume: trainer.best_metric/best_mode changed, so the best value so far starts afresh")
        else:
            self.best = state["best"]
        self._load_positions(state, path)
        self.resumed_from = step
        self._saved_step = step
        self.wandb_id = state.get("wandb_id") or self.wandb_id
        self._record_launch()
        log.info("resumed from %s at step %d", path, self.step)

    def _resume_ema(self, saved: dict[str, Any] | None) -> None:
        if self.ema is None:
            return
        if saved:
            if self.sharded:  # full tensors in the file: each rank keeps its shard of the average
                from gcl.fsdp import shard_state

                saved = {**saved, "shadow": shard_state(saved["shadow"], dict(zip(self.ema.names, self.ema.shadow)))}
            self.ema.load_state_dict(saved)
        else:
            from gcl.finetune.ema import build_ema

            log.warning("optim.ema: the checkpoint has no EMA (trained without it); it starts from the resumed weights")
            self.ema = build_ema(self.model, self.cfg.optim.ema.decay, self.cfg.optim.ema.warmup_steps)

    def _apply_unlock(self) -> None:
        """Lift the tower locks whose step has come (``model.lock_<tower>_steps``); with DDP the wrapper is
        rebuilt, since its reducer only knows the parameters that required gradients when it was built."""
        changed = self.unlock.apply(self.step) if self.unlock is not None else {}
        if not changed:
            return
        for tower, trainable in changed.items():
            log.info("step %d: the %s tower %s from now on", self.step, tower,
                     "trains" if trainable else f"is locked (a later model.lock_{tower}_steps)")
        self.flops.flops_per_step = None  # a step now also runs that tower's backward: counted again (every rank)
        acc = self.accelerator
        # FSDP2 needs nothing rebuilt: each unit reads requires_grad from its sharded parameters at every
        # all-gather and reduce-scatters the gradients that exist
        if self.world_size > 1 and not self.sharded:
            old, plain = self.forward_module, acc.unwrap_model(self.forward_module)
            acc._models = [x for x in acc._models if x is not old]  # drop the old DDP (its hooks go with it)
            del old
            self.forward_module = acc.prepare_model(plain)

    def _load_positions(self, state: dict[str, Any], path: Path) -> None:
        """This rank's data position and RNG streams from the checkpoint. On the checkpoint's number of
        processes each rank continues its own; on another, every old rank x worker position is re-partitioned
        over the new ones (``gcl.data.elastic``: the interrupted epoch stays exact) and each rank's RNG streams
        are re-derived from ``(trainer.seed, step, rank, world size)`` (``gcl.resume.elastic_seed``)."""
        from accelerate.utils import set_seed

        from gcl.data.elastic import ElasticError

        per_rank = state["per_rank"]
        elastic = len(per_rank) != self.world_size
        try:
            # strict: a position that cannot continue exactly (shard sizes unknown for a re-partition, shards
            # rewritten) is refused; trainer.resume_changes=allow restarts the epoch instead, with a warning
            self.stream.load_state_dict([p["data"] for p in per_rank],
                                        strict=self.cfg.trainer.resume_changes != "allow")
        except (ElasticError, ValueError) as e:
            if self.is_main:
                resume.restore_config(self.run_dir, state["step"], state["config"])
            raise resume.ResumeRefused(
                f"trainer.resume: {path} (step {state['step']}) cannot continue its data position exactly on "
                f"{self.world_size} process(es) x {max(1, self.cfg.data.num_workers)} DataLoader worker(s): {e}; "
                "or add trainer.resume_changes=allow to restart the interrupted epoch") from e
        if not elastic:
            saved_rng = per_rank[self.rank]["rng"]
            self._restore_rng = lambda: set_rng_state(saved_rng)
        else:
            seed = resume.elastic_seed(self.cfg.trainer.seed, state["step"], self.rank, self.world_size)
            self._restore_rng = lambda: set_seed(seed)
            log.info("resume: %d -> %d processes at step %d: data positions re-partitioned exactly, RNG streams "
                     "re-derived (rank %d seed %d)", len(per_rank), self.world_size, state["step"], self.rank, seed)

    def _checkpoint_to_resume(self) -> tuple[Path, dict[str, Any]] | None:
        """``(file, state)`` to resume from, or None to start at step 0. Rank 0 decides (the newest intact
        checkpoint; damaged ones are named and skipped) and every rank then loads that file; a refusal or an
        error on rank 0 is raised on every rank."""
        r = self.cfg.trainer.resume
        picked: list[tuple[Path, dict[str, Any]] | None] = [None]
        shards = not self.sharded  # fsdp reads a sharded checkpoint's tensors into its shards (_resume), not whole

        def pick() -> str | None:
            if not self.is_main:
                return None
            if r is None:
                if step_files(self.ckpt.dir):
                    raise resume.ResumeRefused(
                        f"trainer.resume=null, but {self.run_dir} already holds checkpoints of a run (newest "
                        f"{step_files(self.ckpt.dir)[-1].name}): continue it with trainer.resume=auto, or train "
                        "from scratch in another hydra.run.dir")
                return None
            if r == "auto":
                self.ckpt.remove_partial_files()
                picked[0] = load_newest_intact(self.run_dir, map_location="cpu", shards=shards)
                if picked[0] is None and fetch_for_resume(r, self.run_dir, self.cfg.trainer.remote_sync) is not None:
                    # the mirror's, downloaded
                    picked[0] = load_newest_intact(self.run_dir, map_location="cpu", shards=shards)
                if picked[0] is None:
                    log.info("trainer.resume=auto: no checkpoint in %s yet, starting from step 0", self.run_dir)
            else:
                local = fetch_for_resume(r, self.run_dir, self.cfg.trainer.remote_sync) or r
                picked[0] = load_newest_intact(local, map_location="cpu", shards=shards)
                if picked[0] is None:
                    find_checkpoint(local)  # raises FileNotFoundError with the advice
            return None if picked[0] is None else str(picked[0][0])

        chosen = gather_checked(pick, self.world_size, self.rank, what="finding the checkpoint to resume")[0]
        if chosen is None or self.is_main:
            return picked[0]
        return Path(chosen), load_checkpoint(chosen, map_location="cpu", verify=False, shards=shards)

    def _record_launch(self) -> None:
        """Rank 0: drop the metrics rows this launch logs again, and keep its config in the history."""
        if self.is_main:
            cut_metrics(self.run_dir / "metrics.jsonl", self.step)
            resume.record_config(self.run_dir, OmegaConf.to_yaml(self.cfg), self.step)

    def _write_state(self, write: Callable[[dict[str, Any]], Path], what: str, file_name: str) -> None:
        """Gather the state (every rank takes part) and let rank 0 ``write`` it as ``checkpoints/<file_name>``;
        every rank waits and raises if the write failed (a full disk, say), so no rank goes on alone. With
        ``trainer.fsdp_checkpoint=sharded`` every rank first writes its shards (``gcl.checkpoint.save_sharded``).
        A second Ctrl-C does not abort it."""
        with self.stop.protect() if self.stop is not None else contextlib.nullcontext():
            state = self.state_dict()
            if self.sharded and self.cfg.trainer.fsdp_checkpoint == "sharded":
                state = save_sharded(state, self.ckpt.dir / file_name, self.is_main)

            def work() -> None:
                if self.is_main:
                    path = write(state)
                    if self.remote is not None:
                        self.remote.push_checkpoint(path)

            gather_checked(work, self.world_size, self.rank, what=what)

    def save(self) -> None:
        """Save the checkpoint of this step (once per step)."""
        if self._saved_step != self.step:
            self._write_state(lambda state: self.ckpt.save(state, self.step),
                              f"saving the checkpoint of step {self.step}", self.ckpt.step_name(self.step))
            self._saved_step = self.step

    # -------------------------------------------------------------------------------------------- step
    def _meta(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in META_KEYS if k in batch}

    def _gradcache_backward(self, batch: dict[str, Any], k: int) -> dict[str, Tensor]:
        """The backward pass of one batch in ``k`` micro-batches (GradCache, see :meth:`train_step`); returns the
        loss terms of the whole batch."""
        acc, fwd = self.accelerator, self.forward_module
        n = batch["image"].shape[0]
        bounds = [(i * n // k, (i + 1) * n // k) for i in range(k)]
        micro = [slice_batch(batch, slice(a, b)) for a, b in bounds]
        plain = acc.unwrap_model(fwd)
        rngs, cached = [], []
        with torch.no_grad():
            for mb in micro:
                rngs.append(_RngReplay(acc.device))
                with acc.autocast():
                    f, scale, bias = plain(mb)
                cached.append(f)
        leaves = {name: torch.cat([c[name] for c in cached]).detach().requires_grad_() for name in cached[0]}
        scale_leaf = scale.detach().requires_grad_()
        bias_leaf = bias.detach().requires_grad_() if bias is not None else None
        with acc.autocast():
            out = self.loss_fn(leaves, self._meta(batch), scale_leaf, bias_leaf)
        acc.backward(out["loss"])
        for i, (mb, (a, b)) in enumerate(zip(micro, bounds)):
            last = i == k - 1
            # fsdp reduce-scatters every micro-batch's gradients into the shards: skipping that would keep
            # full unsharded gradients on every rank until the last one, the memory FSDP is there to save
            sync = contextlib.nullcontext() if last or self.sharded else acc.no_sync(fwd)
            with sync, rngs[i].replay():
                with acc.autocast():
                    f, s, bb = fwd(mb)
                outs, grads = [], []
                for name, t in f.items():
                    g = leaves[name].grad
                    if t.requires_grad and g is not None:
                        outs.append(t)
                        grads.append(g[a:b])
                if last:  # logit scale/bias gradients enter once, through DDP's forward
                    for t, leaf in ((s, scale_leaf), (bb, bias_leaf)):
                        if t is not None and leaf is not None and leaf.grad is not None:
                            outs.append(t)
                            grads.append(leaf.grad)
                torch.autograd.backward(outs, grads)
        return out

    def train_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Forward, loss, backward and optimizer step on one (per-rank) batch; returns detached metrics.

        With ``trainer.accum_steps = k > 1`` the batch is split into k micro-batches and the contrastive loss is
        still computed over the whole batch (GradCache): features of every micro-batch are computed without a
        graph, the loss and its gradients w.r.t. those features and logit_scale/bias are computed once, then each
        micro-batch is re-run with a graph and backpropagated with its slice of the feature gradients. Tower and
        logit_scale gradients equal those of one big batch (OpenCLIP's accumulation scales logit_scale k times).
        """
        acc, fwd = self.accelerator, self.forward_module
        k = self.cfg.trainer.accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        if k == 1:
            with acc.autocast():
                feats, scale, bias = fwd(batch)
                out = self.loss_fn(feats, self._meta(batch), scale, bias)
            acc.backward(out["loss"])
        else:
            out = self._gradcache_backward(batch, k)

        if self.sharded:  # DDP's reducer averages these too; FSDP2 leaves the unsharded scalars to us
            average_replicated_grads(self.replicated, self.world_size)
        metrics = {name: v.detach() for name, v in out.items()}
        finite = torch.isfinite(metrics["loss"]).to(torch.float32).reshape(1)
        all_finite = bool(all_reduce_sum(finite.clone()).item() == self.world_size)
        grad_clip = self.cfg.optim.grad_clip
        # The lr this step trains with (the scheduler moves on below): what metrics.jsonl logs for this step.
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        if all_finite:
            params = [p for p in self.model.parameters() if p.requires_grad]
            if grad_clip:
                clip = clip_grad_norm_ if self.sharded else acc.clip_grad_norm_
                metrics["grad_norm"] = clip(params, grad_clip).detach()
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
            self.nonfinite_streak = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(max=self.logit_scale_ceiling)
        metrics["nonfinite_skipped"] = torch.tensor(float(not all_finite))
        return metrics

    # -------------------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        model = self.accelerator.unwrap_model(self.forward_module)
        was_training = model.training
        model.eval()
        encoder: Callable[..., dict[str, Tensor]] = model.encoder
        if self.sharded:  # full weights on every rank for the whole evaluation, run through FSDP2's root
            encoder = lambda batch, fields: model(batch, fields)[0]  # noqa: E731

        def run(out_dir: Path) -> dict[str, float]:
            # fsdp: gathered inside, so the EMA's average (copied into the shards) is what gets gathered
            with unsharded(model) if self.sharded else contextlib.nullcontext():
                return self.evaluator(encoder, self.bundle, step=self.step, out_dir=out_dir, rank=self.rank,
                                      world_size=self.world_size, device=self.accelerator.device)

        try:
            metrics = run(self.run_dir / "eval")
            if self.ema is not None and self.cfg.optim.ema.eval:
                with self.ema.applied():
                    ema = run(self.run_dir / "eval" / "ema")
                metrics.update({f"ema/{k}": v for k, v in ema.items()})
        finally:
            model.train(was_training)
        self.last_eval = metrics
        return metrics

    def _maybe_best(self, metrics: dict[str, float]) -> None:
        name = self.cfg.trainer.best_metric
        if not name:
            return
        if name not in metrics:
            raise KeyError(f"trainer.best_metric={name!r} is not among the eval metrics: {sorted(metrics)}")
        v = metrics[name]
        better = self.best is None or (v > self.best if self.cfg.trainer.best_mode == "max" else v < self.best)
        if better:
            self.best = v
            self._write_state(lambda state: self.ckpt.save_best(state, self.step, name, v),
                              f"saving the best checkpoint (step {self.step})", BEST_FILE)

    # -------------------------------------------------------------------------------------------- loop
    def fit(self) -> float | None:
        """Train to ``trainer.max_steps``; returns the best (or last) value of ``trainer.best_metric`` for
        sweepers, else the last logged loss. After SIGTERM/SIGINT it saves a checkpoint, sets
        :attr:`interrupted` and returns early (:func:`run` then exits with ``INTERRUPTED_EXIT``)."""
        cfg, t, acc = self.cfg, self.cfg.trainer, self.accelerator
        logger = RunLogger(
            self.run_dir, is_main=self.is_main, total_steps=t.max_steps, start_step=self.step,
            progress=cfg.logger.progress, wandb_mode=cfg.logger.wandb.mode, wandb_project=cfg.logger.wandb.project,
            wandb_entity=cfg.logger.wandb.entity, wandb_name=cfg.logger.wandb.name,
            wandb_tags=list(cfg.logger.wandb.tags), wandb_id=self.wandb_id,
            config=OmegaConf.to_container(cfg, resolve=True) if self.is_main else None)
        self.stop = stop = StopSignal()
        last_loss: float | None = None
        exit_code = 1  # what wandb is told if the loop raises
        try:
            if self.evaluator is not None and self.step == 0:
                self._log_eval(logger, self.evaluate())
            if self._restore_rng is not None:
                self._restore_rng()  # last: model building and eval above draw random numbers
            data = iter(self.stream)
            meter = Throughput()
            self.model.train()
            t_start = time.perf_counter()
            while self.step < t.max_steps:
                batch = to_device(next(data), acc.device)
                self._apply_unlock()
                out = self.flops.run(self.train_step, batch)
                self.step += 1
                self._count_rows(out)
                meter.add(batch["image"].shape[0] * self.world_size)
                self.samples_seen += batch["image"].shape[0] * self.world_size
                if self.nonfinite_streak >= t.max_nonfinite:
                    raise FloatingPointError(
                        f"{self.nonfinite_streak} non-finite losses in a row at step {self.step} (limit "
                        f"trainer.max_nonfinite={t.max_nonfinite}); lower optim.lr, enable optim.grad_clip, or use "
                        "trainer.mixed_precision=no/bf16 instead of fp16")
                if self.step % t.log_every == 0 or self.step == t.max_steps or self.step == 1:
                    last_loss = self._log_step(logger, out, batch, meter.rate())
                else:
                    logger.progress(self.step)
                if self.evaluator is not None and t.eval_every and self.step % t.eval_every == 0:
                    self._log_eval(logger, self.evaluate())
                if t.save_every and self.step % t.save_every == 0:
                    self.save()
                if all_reduce_sum(torch.tensor([float(stop.received is not None)])).item() > 0:
                    logger.write(f"received {stop.received or 'a stop signal'}: saving a checkpoint at step "
                                 f"{self.step} and exiting with code {INTERRUPTED_EXIT}; resume with "
                                 "trainer.resume=auto")
                    self.save()
                    self.interrupted = stop.received or "a stop signal on another rank"
                    exit_code = INTERRUPTED_EXIT
                    return last_loss
            if self.evaluator is not None and (not t.eval_every or self.step % t.eval_every):
                self._log_eval(logger, self.evaluate())
            self.save()
            logger.write(f"done: {self.step} steps in {time.perf_counter() - t_start:.1f}s; run dir {self.run_dir}")
            self._write_summary(logger)
            if cfg.export.enabled and self.is_main:
                self._export()
            acc.wait_for_everyone()
            exit_code = 0
        finally:
            stop.restore()
            self.stop = None
            logger.close(exit_code)
            if self.remote is not None:  # waits for the uploads; strict unless an error is already on its way
                self.remote.close(strict=sys.exc_info()[0] is None)
        name = t.best_metric
        if name:
            return self.best if self.best is not None else self.last_eval.get(name)
        return last_loss

    def _log_step(self, logger: RunLogger, out: dict[str, Tensor], batch: dict[str, Any], rate: float) -> float:
        names = sorted(out)
        vals = torch.stack([out[n].float().reshape(()) for n in names]).cpu()
        vals = all_reduce_sum(vals) / self.world_size  # mean over ranks
        row: dict[str, Any] = {n: float(v) for n, v in zip(names, vals)}
        row.update(lr=self.step_lr, logit_scale=float(self.model.logit_scale.detach().exp()),
                   samples_per_s=rate, world_size=self.world_size, nonfinite_total=self.nonfinite_total)
        if getattr(self.model, "logit_bias", None) is not None:
            row["logit_bias"] = float(self.model.logit_bias.detach())
        # the stream lists every skip reason (zeros included) in a fixed order, so ranks reduce aligned tensors
        skipped = dict(self.stream.skipped)
        keys = sorted(skipped)
        tot = all_reduce_sum(torch.tensor([float(skipped[k]) for k in keys]))
        row.update({f"skipped/{k}": int(v) for k, v in zip(keys, tot)})
        row["samples_seen"] = self.samples_seen
        flops = self.flops.rates(rate / (batch["image"].shape[0] * self.world_size))  # steps/s
        row.update(flops)
        logger.log_metrics(row, self.step)
        empty = self._empty_terms()
        shown: dict[str, Any] = {"empty": ",".join(empty)} if empty else {}
        logger.progress(self.step, loss=row["loss"], lr=row["lr"], sps=round(rate, 1),
                        **{k.replace("_per_s", ""): v for k, v in flops.items()}, **shown)
        return row["loss"]

    def _count_rows(self, out: dict[str, Tensor]) -> None:
        """Add one step's valid rows per term (global counts, from the loss) to the logging window's."""
        window = self._window
        if window is None:
            window = self._window = {"first": self.step, "rows": {}}
        for k, v in out.items():
            if k.startswith("rows/"):
                window["rows"][k[5:]] = window["rows"].get(k[5:], 0) + v  # stays on the device until logged

    def _empty_terms(self) -> list[str]:
        """Terms with no valid row in any step since the last logged one (then the window restarts); each is
        reported in train.log, and the caller shows them in the progress bar. Such a term trained nothing in
        those steps: no sample held its fields (or its rank score)."""
        window, self._window = self._window, None
        if window is None:
            return []
        empty = sorted(name for name, n in window["rows"].items() if float(n) == 0)
        if empty and self.is_main:
            first = window["first"]
            steps = f"step {first}" if first == self.step else f"steps {first}-{self.step}"
            log.warning("loss term(s) %s had no valid rows in %s: no sample of those batches holds their fields "
                        "(or rank score), so they trained nothing (rows/<term> in metrics.jsonl)",
                        ", ".join(empty), steps)
        return empty

    def _log_eval(self, logger: RunLogger, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, self.step)
        head = ", ".join(f"{k}={v:.4f}" for k, v in list(metrics.items())[:6])
        logger.write(f"eval @ step {self.step}: {head}")
        self._maybe_best(metrics)

    def _write_summary(self, logger: RunLogger) -> None:
        """The ``eval.summary`` table: the run's first evaluation on disk (step 0: the starting model, also after
        a resume) against the last one, printed and written to ``eval/summary.md``."""
        import json
        import re

        from gcl.eval.report import before_after_table

        names = list(self.cfg.eval.summary)
        if not names or not self.is_main or not self.last_eval:
            return
        steps = sorted((int(m.group(1)), f) for f in (self.run_dir / "eval").glob("step_*.json")
                       if (m := re.fullmatch(r"step_(\d+)\.json", f.name)))
        if not steps or steps[0][0] >= self.step:
            return
        first_step, first_file = steps[0]
        table = before_after_table(names, json.loads(first_file.read_text()), self.last_eval,
                                   before_step=first_step, after_step=self.step)
        atomic_write_text(table, self.run_dir / "eval" / "summary.md")
        logger.write(f"before/after (eval.summary; {self.run_dir / 'eval' / 'summary.md'}):\n{table}")

    def _export(self) -> None:
        from gcl.export import export_model

        e = self.cfg.export
        out = Path(e.dir) if os.path.isabs(e.dir) else self.run_dir / e.dir
        # a "best" export takes its metrics from the eval of that step (export reads eval/), not the last one
        metrics = (self.last_eval or None) if e.which == "latest" else None
        weights = "ema" if e.ema else "model"
        if e.wise.alpha is not None:  # the export is the WiSE-FT interpolation (gcl.finetune.wise)
            from gcl.finetune.wise import wise_after_training

            path = wise_after_training(self.run_dir, out, e, which=e.which, weights=weights,
                                       device=self.accelerator.device)
        else:
            path = export_model(self.run_dir, out, which=e.which, overwrite=e.overwrite, push_to=e.push_to,
                                private=e.private, metrics=metrics, weights=weights)
        if self.remote is not None:
            self.remote.push_dir(path, "export")
        log.info("exported model to %s; load it with:\n  import open_clip\n  model, _, preprocess = "
                 "open_clip.create_model_and_transforms('local-dir:%s')\n  tokenizer = "
                 "open_clip.get_tokenizer('local-dir:%s')", path, path, path)


def run(cfg: DictConfig) -> float | None:
    """Entry point of ``train.py``: validate, build, train. Returns the sweep objective (see Trainer.fit).

    A run stopped by SIGTERM/SIGINT (its checkpoint saved) ends with ``SystemExit(INTERRUPTED_EXIT)``: not
    finished for schedulers and sweeps, which see a non-zero status and no objective. A failure is written to
    the run's ``train.log`` (traceback on rank 0, one line on every rank) before it propagates; a user's
    mistake (config error, refused resume, eval config) then ends with its message and ``SystemExit(2)``."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    trainer = None
    try:
        gcl_config.validate(cfg)
        with console_logging():
            trainer = Trainer(cfg, run_dir)
            value = trainer.fit()
    except BaseException as exn:
        from gcl.eval.tasks import EvalConfigError

        plain = (gcl_config.ConfigError, resume.ResumeRefused, EvalConfigError)
        rank = trainer.rank if trainer else int(os.environ.get("RANK", "0"))
        report_failure(exn, rank=rank, shared_log=trainer.run_dir / "train.log" if trainer else None, plain=plain)
        exit_on_user_error(exn, plain, rank)
        raise
    if trainer.interrupted:
        log.warning("stopped by %s after saving the checkpoint of step %d: exit code %d (not finished); "
                    "continue with trainer.resume=auto", trainer.interrupted, trainer.step, INTERRUPTED_EXIT)
        raise SystemExit(INTERRUPTED_EXIT)
    return value
