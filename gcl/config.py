"""Typed schemas for every config group, registered in Hydra's ConfigStore, and ``validate(cfg)``.

Hydra merges each group's YAML into these dataclasses, so an unknown key or a wrong type fails at compose
time with the key named. ``validate`` adds the cross-field rules and runs before any model is built.
Defaults live in the YAML files under ``conf/``; the dataclass defaults here only give types.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from gcl.eval.schema import EvalConfig


class ConfigError(ValueError):
    """A config value or combination that cannot work; the message names the key and the fix."""


class MissingPathError(ConfigError, FileNotFoundError):
    """A setting names a file or folder that does not exist (a ConfigError that is also a FileNotFoundError)."""


@dataclass
class LoRATowerConfig:
    rank: int = 0  # 0 = no adapters: the tower trains (or is locked) as configured
    alpha: float = 16.0  # the update is (alpha / rank) * B @ A
    dropout: float = 0.0  # on the adapter input of the MLP targets (attention adapters are weight-space)
    targets: list[str] = field(default_factory=lambda: ["in_proj", "out_proj", "c_fc", "c_proj"])


@dataclass
class LoRAConfig:
    image: LoRATowerConfig = field(default_factory=LoRATowerConfig)
    text: LoRATowerConfig = field(default_factory=LoRATowerConfig)
    train_logit_scale: bool = True  # with adapters: logit_scale / logit_bias train too


@dataclass
class ModelConfig:
    name: str = MISSING  # open_clip name | hf-hub:org/repo | local-dir:PATH
    pretrained: Optional[str] = None  # open_clip tag or a checkpoint file
    config_path: Optional[str] = None  # a user open_clip model config JSON to register
    checkpoint: Optional[str] = None  # evaluate.py: a run dir, checkpoint file or export dir
    precision: str = "fp32"  # weights dtype: fp32 | bf16 | fp16 (mixed precision is trainer.mixed_precision)
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn: bool = True
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = True
    lock_image_steps: Optional[int] = None  # with lock_image: locked for the first N optimizer steps only
    lock_text_steps: Optional[int] = None  # with lock_text: locked for the first N optimizer steps only
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    grad_checkpointing: bool = False
    compile: str = "none"  # none | model | step (gcl.model.speed)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager / eager to debug a compile problem)
    attention: str = "auto"  # auto | cudnn | efficient | math: scaled-dot-product-attention kernels
    channels_last: bool = False  # image tower weights and inputs in NHWC order
    patch_dropout: float = 0.0  # image tower patch dropout in training, in [0, 1); off at eval
    text_packing: str = "auto"  # auto | prefix | buckets: how real-length text rows are batched (gcl.model.encoder)
    logit_bias_init: Optional[float] = None  # sigmoid loss on a model without logit_bias: init value
    cache_dir: Optional[str] = None


@dataclass
class SyntheticConfig:
    products: int = 4000
    seed: int = 0
    image_size: int = 64
    cache_dir: str = MISSING


@dataclass
class WorldConfig:
    samples: int = 10000
    seed: int = 0
    image_size: int = 64
    workers: int = 2
    cache_dir: str = MISSING


@dataclass
class DataConfig:
    train_shards: Optional[Any] = None  # pattern | list of patterns; null -> the generated dataset `builtin`
    val_shards: Optional[str] = None
    test_shards: Optional[str] = None
    source_weights: Optional[list[float]] = None
    builtin: str = "synthetic"  # synthetic (the fashion catalog) | world (gcl.data.world)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    batch_size: int = 32
    num_workers: int = 2
    resampled: bool = False
    shuffle_buffer: int = 1000
    augment: bool = True  # false: train on the eval transform (no random crop)
    prefetch_factor: int = 2
    list_rule: str = "join"  # join | sample
    list_sep: str = ", "
    image_background: str = "white"  # colour under transparent pixels (a name or #rrggbb; gcl.data.image)
    context_length: dict[str, int] = field(default_factory=dict)  # per text field max tokens
    default_context_length: int = 77


@dataclass
class SideConfig:
    fields: list[str] = MISSING
    weights: list[float] = field(default_factory=list)  # empty -> equal weights


@dataclass
class TermConfig:
    name: str = MISSING
    left: SideConfig = field(default_factory=SideConfig)
    right: SideConfig = field(default_factory=SideConfig)
    weight: float = 1.0
    score_to_weight: str = "none"  # none | linear | reciprocal
    score_field: str = "score"  # score | position
    normalize_weights: bool = True


@dataclass
class LossConfig:
    kind: str = "clip"  # clip | siglip
    duplicates: bool = True
    terms: list[TermConfig] = MISSING
    allow_absent_fields: Any = field(default_factory=list)  # field names (or true: all) the data may lack


@dataclass
class EMAConfig:
    decay: Optional[float] = None  # null = no EMA; e.g. 0.999 (gcl.finetune.ema)
    warmup_steps: int = 0  # the decay ramps linearly from 0 over this many updates
    eval: bool = False  # in-loop eval also evaluates the EMA weights (metrics ema/<name>)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    lr_image: Optional[float] = None
    lr_text: Optional[float] = None
    fused: Optional[bool] = None
    grad_clip: Optional[float] = 1.0
    logit_scale_max: Optional[float] = 100.0  # clamp exp(logit_scale) <= this (never below a pretrained init)
    layer_decay_image: Optional[float] = None  # layer-wise lr decay (gcl.optim): earlier blocks get lr * decay^k
    layer_decay_text: Optional[float] = None
    weight_decay_image: Optional[float] = None  # per-tower weight decay (null = weight_decay)
    weight_decay_text: Optional[float] = None
    ema: EMAConfig = field(default_factory=EMAConfig)


@dataclass
class SchedConfig:
    name: str = "cosine"  # cosine | constant | const_cooldown
    warmup_steps: int = 0
    cooldown_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    max_steps: int = 100
    accum_steps: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    resume: Optional[str] = None  # auto | PATH | URL of a remote_sync prefix | null
    remote_sync: Optional[str] = None  # s3://bucket/runs/NAME: mirror checkpoints + export there (gcl.remote)
    resume_changes: str = "refuse"  # refuse | allow (gcl.resume)
    elastic_batch: str = "keep_global"  # keep_global | per_process: the batch on another number of processes
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | no | bf16 | fp16
    strategy: str = "ddp"  # ddp | fsdp (FSDP2: gcl.fsdp)
    fsdp_checkpoint: str = "full"  # full | sharded (torch.distributed.checkpoint; fsdp only)
    log_every: int = 10
    max_nonfinite: int = 5
    best_metric: Optional[str] = None
    best_mode: str = "max"
    deterministic: bool = False
    threads: Optional[int] = None
    peak_tflops: Optional[float] = None  # per-device dense peak for mfu; null: gcl.flops's GPU table


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "gcl"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class SelectConfig:
    split: str = "val"  # every eval task moves to this split (world/test -> world/val); held-out tasks are left out
    suites: list[str] = field(default_factory=list)  # eval presets evaluated besides the run's own suite
    domain_metric: str = MISSING
    retention_metric: Optional[str] = None
    max_retention_drop: float = 0.01  # relative: retention >= (1 - this) * the base's


@dataclass
class WiseConfig:
    alpha: Optional[Any] = None  # null (off) | auto | a float in [0, 1]
    alphas: str = "0:1:0.1"  # start:stop:step (inclusive) or a comma list
    per_tower: bool = False


@dataclass
class ExportConfig:
    enabled: bool = True
    dir: str = "export"  # relative to the run dir unless absolute
    which: str = "latest"  # latest | best
    push_to: Optional[str] = None
    private: bool = True
    overwrite: bool = True
    ema: bool = False  # export the EMA weights (optim.ema) instead of the trained ones
    select: SelectConfig = field(default_factory=SelectConfig)
    wise: WiseConfig = field(default_factory=WiseConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class EvaluateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    out_dir: Optional[str] = None  # default: the Hydra run dir


def rank_run_dir(path: str) -> str:
    """``${gcl_rank_dir:PATH}``: PATH on rank 0; on the other ranks of a distributed launch, a throwaway
    directory under the system temp dir. Ranks may start in different seconds, so a ``${now:...}`` run dir
    would differ between them and leave empty run dirs beside rank 0's; the trainer uses rank 0's run dir on
    every rank (an explicit ``hydra.run.dir=...`` is the same on every rank and bypasses this)."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    if rank == "0":
        return path
    return str(Path(tempfile.gettempdir()) / f"gcl-rank{rank}" / path)


def base_weights_path() -> str:
    """``${gcl_base_weights:}``: the shipped base model's weights file (gcl/assets), wherever gcl is installed
    and whatever the working directory; ``experiment=demo`` fine-tunes it."""
    from gcl.assets import BASE_WEIGHTS

    return str(BASE_WEIGHTS)


def register() -> None:
    """Register the schemas (the YAML defaults lists name them: ``train_schema``, ``evaluate_schema``), the
    ``gcl_rank_dir`` resolver used by the default Hydra run dirs and ``gcl_base_weights`` (the shipped base)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    if not OmegaConf.has_resolver("gcl_rank_dir"):
        OmegaConf.register_new_resolver("gcl_rank_dir", rank_run_dir)
    if not OmegaConf.has_resolver("gcl_base_weights"):
        OmegaConf.register_new_resolver("gcl_base_weights", base_weights_path)


register()

# ---------------------------------------------------------------------------------------------- command line

_BRACES = re.compile(r"\{[^{}]*\}")


def brace_hint(arg: str) -> str | None:
    """One line with the working forms of an override whose brace pattern Hydra cannot parse (it reads
    ``{...}`` as a dictionary), or None when ``arg`` parses or has no braces."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    if "{" not in arg or "=" not in arg or arg.startswith("-"):
        return None
    try:
        OverridesParser.create().parse_overrides([arg])
        return None
    except OverrideParseException:
        pass
    key, value = arg.split("=", 1)
    value = value.strip("[]'\"").split(",")[0]
    folder = os.path.dirname(value) or "."
    return (f"{arg}: Hydra reads {{...}} as a dictionary, so a brace pattern must be quoted. Use one of: "
            f"\"{key}='{value}'\" (the pattern, quoted) | {key}={folder} (every .tar in the folder) | "
            f"\"{key}='{_BRACES.sub('*', value)}'\" (a glob)")


def _shell_expanded(key: str, values: list[str]) -> str:
    """The one-line fix for a key the shell repeated by expanding an unquoted brace pattern."""
    head = os.path.commonprefix(values)
    tail = os.path.commonprefix([v[::-1] for v in values])[::-1]
    while head and head[-1].isdigit():  # keep zero-padded numbers whole: {000000..000099}
        head = head[:-1]
    while tail and tail[0].isdigit():
        tail = tail[1:]
    first, last = values[0][len(head):len(values[0]) - len(tail)], values[-1][len(head):len(values[-1]) - len(tail)]
    pattern = f"{head}{{{first}..{last}}}{tail}"
    return (f"{key} is given {len(values)} times ({values[0]} ... {values[-1]}): the shell expanded an unquoted "
            f"brace pattern, and Hydra would keep only the last value. Quote it: \"{key}='{pattern}'\", or give "
            f"the folder: {key}={os.path.dirname(values[0]) or '.'}")


def _expanded_run(argv: list[str], start: int) -> list[str]:
    """The values of the adjacent ``key=value`` words from ``start`` on that a shell's brace expansion makes of
    one pattern: the same key, values that differ only in one run of digits. Fewer than 2: not one."""
    key = argv[start].split("=", 1)[0]
    values = []
    for arg in argv[start:]:
        k, sep, v = arg.partition("=")
        if not sep or k != key:
            break
        values.append(v)
    if len(values) < 2:
        return []
    head = os.path.commonprefix(values)
    tail = os.path.commonprefix([v[::-1] for v in values])[::-1]
    middles = [v[len(head):len(v) - len(tail)] for v in values]
    return values if all(m.isdigit() for m in middles) else []


def check_cli(argv: list[str]) -> None:
    """Before Hydra parses the command line: a brace pattern that Hydra cannot parse (typed unquoted inside
    a quoted word) or that the shell expanded into many words gets one clear line and exit code 2, instead
    of Hydra's "mismatched input '{'" or a run silently trained on the last shard only."""
    for i, arg in enumerate(argv):
        hint = brace_hint(arg)
        if hint is not None:
            sys.stderr.write(f"error: {hint}\n")
            raise SystemExit(2)
        if "=" in arg and not arg.startswith("-") and (i == 0 or argv[i - 1].split("=", 1)[0] != arg.split("=", 1)[0]):
            values = _expanded_run(argv, i)
            if values:
                sys.stderr.write(f"error: {_shell_expanded(arg.split('=', 1)[0], values)}\n")
                raise SystemExit(2)


# ---------------------------------------------------------------------------------------------- validate

IMAGE = "image"
RESUME_CHANGES = ("refuse", "allow")  # trainer.resume_changes (gcl.resume)
STRATEGIES = ("ddp", "fsdp")  # trainer.strategy
FSDP_CHECKPOINTS = ("full", "sharded")  # trainer.fsdp_checkpoint
ELASTIC_BATCH = ("keep_global", "per_process")  # trainer.elastic_batch (gcl.resume.per_process_batch)
TEXT_PACKING = ("auto", "prefix", "buckets")  # model.text_packing (see gcl.model.FieldEncoder)
COMPILE = ("none", "model", "step")  # model.compile (see gcl.model.speed)
ATTENTION = ("auto", "cudnn", "efficient", "math")  # model.attention (see gcl.model.speed.attention_kernels)


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"{key}: {msg}")


def data_fields(cfg: DictConfig) -> set[str] | None:
    """Fields the data provides, when knowable before reading data (a generated dataset); else None."""
    if cfg.data.train_shards is not None:
        return None
    if cfg.data.builtin == "world":
        from gcl.data.world.write import FIELDS, OPTIONAL_FIELDS

        return {IMAGE, *FIELDS, *OPTIONAL_FIELDS}
    from gcl.data.schema import TEXT_FIELDS

    return {IMAGE, *TEXT_FIELDS, "query", "category", "subcategory", "color", "material", "item_id"}


def loss_data_fields(terms: Any) -> dict[str, list[str]]:
    """Every sample field the built loss ``terms`` read (text fields, and the score field of rank-weighted
    terms; not the image) -> the names of the terms that read it."""
    out: dict[str, list[str]] = {}
    for t in terms:
        fields = [f for side in (t.left, t.right) for f in side.fields if f != IMAGE]
        for f in fields + ([t.score_field] if t.weighted else []):
            if t.name not in out.setdefault(f, []):
                out[f].append(t.name)
    return out


def allowed_absent(loss: DictConfig) -> set[str] | bool:
    """``loss.allow_absent_fields`` as True (every field may be absent) or a set of field names."""
    allow = loss.allow_absent_fields
    if isinstance(allow, bool):
        return allow
    return set(allow or [])


def _validate_allow_absent(loss: DictConfig, built: Any) -> None:
    allow = loss.allow_absent_fields
    if isinstance(allow, bool) or allow is None:
        return
    if not OmegaConf.is_list(allow) or not all(isinstance(f, str) for f in allow):
        _fail("loss.allow_absent_fields", f"must be true/false or a list of field names, got {allow!r}")
    used = loss_data_fields(built.terms)
    unknown = [f for f in allow if f not in used]
    if unknown:
        _fail("loss.allow_absent_fields", f"{unknown} are not fields of the loss terms ({sorted(used)}); "
              "remove them or fix their spelling")


def validate_loss(loss: DictConfig, provided: set[str] | None) -> None:
    """The loss rules of :func:`gcl.loss.build_loss` (one place; its errors name the config key), plus: every
    field a term reads must be provided by the data, when that is known before reading it (unless listed in
    ``loss.allow_absent_fields``)."""
    from gcl.loss import build_loss

    try:
        built = build_loss(loss.kind, OmegaConf.to_container(loss.terms, resolve=True), loss.duplicates)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _validate_allow_absent(loss, built)
    allow = allowed_absent(loss)
    if provided is None or allow is True:
        return
    for i, t in enumerate(built.terms):
        for side_name, side in (("left", t.left), ("right", t.right)):
            for f in side.fields:
                if f not in provided and f not in allow:
                    _fail(f"loss.terms[{i}].{side_name}.fields", f"field {f!r} is not provided by the data "
                          f"(available: {sorted(provided)}); fix the loss preset or the data")


def _validate_background(value: str) -> None:
    from gcl.data.image import parse_background

    try:
        parse_background(value)
    except ValueError:
        _fail("data.image_background", f"{value!r} is not a colour; use a name such as white, or #rrggbb")


def validate_model(m: DictConfig) -> None:
    """The model group's value rules (shared by train.py and evaluate.py configs)."""
    for key, allowed in (("text_packing", TEXT_PACKING), ("compile", COMPILE), ("attention", ATTENTION)):
        if m[key] not in allowed:
            _fail(f"model.{key}", f"{m[key]!r} is not one of {', '.join(allowed)}")
    if m.compile != "none" and not m.compile_backend:
        _fail("model.compile_backend", "must name a torch.compile backend (inductor, aot_eager, ...)")
    if not 0.0 <= m.patch_dropout < 1.0:
        _fail("model.patch_dropout", f"must be in [0, 1) (0 disables; 0.5 keeps half the patches), got "
              f"{m.patch_dropout}")


def validate(cfg: DictConfig) -> None:
    """Cross-field rules; raise ConfigError naming the key and the fix. Call before building anything."""
    t = cfg.trainer
    if t.max_steps < 1:
        _fail("trainer.max_steps", f"must be >= 1, got {t.max_steps}")
    for k in ("eval_every", "save_every"):
        if t[k] < 0:
            _fail(f"trainer.{k}", f"must be >= 0 (0 disables), got {t[k]}")
    if t.accum_steps < 1:
        _fail("trainer.accum_steps", f"must be >= 1, got {t.accum_steps}")
    if cfg.data.batch_size % t.accum_steps:
        _fail("data.batch_size", f"{cfg.data.batch_size} must be divisible by trainer.accum_steps="
              f"{t.accum_steps} (data.batch_size is the per-rank batch of one optimizer step)")
    validate_model(cfg.model)
    if t.device not in ("auto", "cpu", "cuda"):
        _fail("trainer.device", f"{t.device!r} is not one of auto, cpu, cuda")
    if t.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        _fail("trainer.mixed_precision", f"{t.mixed_precision!r} is not one of auto, no, bf16, fp16")
    if t.peak_tflops is not None and not t.peak_tflops > 0:
        _fail("trainer.peak_tflops", f"must be > 0 (the device's dense TFLOP/s), or null; got {t.peak_tflops}")
    if t.best_mode not in ("max", "min"):
        _fail("trainer.best_mode", f"{t.best_mode!r} is not max or min")
    if t.resume not in (None, "auto") and not str(t.resume):
        _fail("trainer.resume", "use auto, a path, or null")
    if t.remote_sync is not None:
        from gcl.storage import is_remote

        if not is_remote(t.remote_sync):
            _fail("trainer.remote_sync", f"{t.remote_sync!r} is not an object-storage URL; use e.g. "
                  "s3://bucket/runs/my-run (one prefix per run), or null")
    if cfg.data.list_rule not in ("join", "sample"):
        _fail("data.list_rule", f"{cfg.data.list_rule!r} is not join or sample")
    from gcl.data import BUILTINS

    if cfg.data.builtin not in BUILTINS:
        _fail("data.builtin", f"{cfg.data.builtin!r} is not one of {', '.join(BUILTINS)}")
    for i, task in enumerate(cfg.eval.tasks):
        prefix, sep, _ = (task.split or "").partition("/")
        if sep and prefix not in BUILTINS:
            _fail(f"eval.tasks[{i}].split", f"{task.split!r}: a prefixed split names a generated dataset "
                  f"({', '.join(f'{b}/<split>' for b in BUILTINS)}); use one of those or a plain split name")
    if cfg.data.batch_size < 1:
        _fail("data.batch_size", "must be >= 1")
    _validate_background(cfg.data.image_background)
    if cfg.data.source_weights is not None:
        shards = cfg.data.train_shards
        n = len(shards) if OmegaConf.is_list(shards) else 1
        if len(cfg.data.source_weights) != n:
            _fail("data.source_weights", f"{len(cfg.data.source_weights)} weights for {n} train sources")
    for f, n in cfg.data.context_length.items():
        if n < 2:
            _fail(f"data.context_length.{f}", f"must be >= 2 tokens (start + end), got {n}")
    validate_loss(cfg.loss, data_fields(cfg))
    from gcl.eval.tasks import validate_tasks

    validate_tasks(cfg.eval)
    if cfg.sched.name == "const_cooldown" and not 0 < cfg.sched.cooldown_steps <= t.max_steps:
        _fail("sched.cooldown_steps", f"must be in (0, trainer.max_steps={t.max_steps}] for const_cooldown")
    if cfg.sched.warmup_steps < 0:
        _fail("sched.warmup_steps", "must be >= 0")
    if cfg.export.which not in ("latest", "best"):
        _fail("export.which", f"{cfg.export.which!r} is not latest or best")
    if cfg.export.which == "best" and not t.best_metric:
        _fail("export.which", "best needs trainer.best_metric (and trainer.eval_every > 0)")
    if t.best_metric and not cfg.eval.tasks:
        _fail("trainer.best_metric", "needs eval tasks (eval=...)")
    if t.best_metric and t.eval_every == 0:
        _fail("trainer.best_metric", "needs trainer.eval_every > 0 to pick a best checkpoint during training")
    if t.best_metric:
        validate_best_metric(t.best_metric, cfg.eval)
    for i, name in enumerate(cfg.eval.summary):
        validate_metric_name(f"eval.summary[{i}]", name, cfg.eval)
    if t.resume_changes not in RESUME_CHANGES:
        _fail("trainer.resume_changes", f"{t.resume_changes!r} is not one of {', '.join(RESUME_CHANGES)}")
    validate_strategy(t, cfg.model)
    if t.elastic_batch not in ELASTIC_BATCH:
        _fail("trainer.elastic_batch", f"{t.elastic_batch!r} is not one of {', '.join(ELASTIC_BATCH)}")
    validate_optim(cfg.optim, cfg.sched)
    validate_finetune(cfg)


def validate_strategy(t: DictConfig, m: DictConfig) -> None:
    """``trainer.strategy`` / ``trainer.fsdp_checkpoint`` and the settings FSDP2 does not combine with."""
    if t.strategy not in STRATEGIES:
        _fail("trainer.strategy", f"{t.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if t.fsdp_checkpoint not in FSDP_CHECKPOINTS:
        _fail("trainer.fsdp_checkpoint", f"{t.fsdp_checkpoint!r} is not one of {', '.join(FSDP_CHECKPOINTS)}")
    if t.strategy != "fsdp":
        if t.fsdp_checkpoint != "full":
            _fail("trainer.fsdp_checkpoint", f"{t.fsdp_checkpoint} needs trainer.strategy=fsdp (a ddp run's model "
                  "is whole on every rank, so it saves full checkpoints)")
        return
    if t.fsdp_checkpoint == "sharded" and t.remote_sync is not None:
        _fail("trainer.fsdp_checkpoint", "sharded checkpoints are folders written by every rank, which "
              "trainer.remote_sync does not mirror; use trainer.fsdp_checkpoint=full with remote_sync")
    if t.mixed_precision == "fp16":
        _fail("trainer.mixed_precision", "fp16 with trainer.strategy=fsdp needs a loss scaler over sharded "
              "gradients, which gcl does not run; use bf16 (or no), or trainer.strategy=ddp")
    if m.precision != "fp32":
        _fail("model.precision", f"{m.precision} with trainer.strategy=fsdp: open_clip's low-precision weights keep "
              "norms in fp32, and an FSDP2 unit needs one dtype; keep model.precision=fp32 and set "
              "trainer.mixed_precision=bf16 (bf16 all-gathers and compute over fp32 master weights)")
    if m.compile != "none":
        _fail("model.compile", f"{m.compile} with trainer.strategy=fsdp is not supported (compiling a whole tower "
              "would trace through FSDP2's per-block hooks, untested here); use model.compile=none, or "
              "trainer.strategy=ddp")


def validate_best_metric(name: str, eval_cfg: DictConfig) -> None:
    """``trainer.best_metric`` must be a name the eval suite reports (derived from its config, no model)."""
    validate_metric_name("trainer.best_metric", name, eval_cfg)


def validate_metric_name(key: str, name: str, eval_cfg: DictConfig) -> None:
    """The metric ``name`` given at config key ``key`` must be one the eval suite reports (from its config)."""
    import difflib

    from gcl.eval.tasks import metric_names

    names = metric_names(eval_cfg)
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else f"the suite {eval_cfg.name!r} reports e.g. {names[:3]}"
    _fail(key, f"{name!r} is not a metric of eval={eval_cfg.name} ({len(names)} names: "
          f"<suite>/<task or aggregate>/<metric>); {hint}")


def validate_optim(o: DictConfig, s: DictConfig) -> None:
    """Ranges of every learning-rate, weight-decay and Adam key: a negative lr trains by gradient ascent."""
    if not o.lr > 0:
        _fail("optim.lr", f"must be > 0, got {o.lr}")
    for k in ("lr_image", "lr_text"):
        if o[k] is not None and not o[k] >= 0:
            _fail(f"optim.{k}", f"must be >= 0 (0 leaves that tower unchanged; null = optim.lr), got {o[k]}")
    if not o.weight_decay >= 0:
        _fail("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        _fail("optim.betas", f"must be two numbers in [0, 1), got {list(o.betas)}")
    if not o.eps > 0:
        _fail("optim.eps", f"must be > 0, got {o.eps}")
    for k in ("grad_clip", "logit_scale_max"):
        if o[k] is not None and not o[k] > 0:
            _fail(f"optim.{k}", f"must be > 0 or null (off), got {o[k]}")
    if not 0 <= s.min_lr_ratio <= 1:
        _fail("sched.min_lr_ratio", f"must be in [0, 1], got {s.min_lr_ratio}")
    if s.cooldown_steps < 0:
        _fail("sched.cooldown_steps", f"must be >= 0, got {s.cooldown_steps}")


def validate_finetune(cfg: DictConfig) -> None:
    """The robust fine-tuning settings: LoRA, unlock schedules, layer-wise decay, EMA, WiSE-FT."""
    m, o, e = cfg.model, cfg.optim, cfg.export
    from gcl.model.lora import TARGETS

    for tower in ("image", "text"):
        lock, steps, lora = m[f"lock_{tower}"], m[f"lock_{tower}_steps"], m.lora[tower]
        if steps is not None and (not lock or steps < 1):
            _fail(f"model.lock_{tower}_steps", f"{steps}: needs model.lock_{tower}=true and a value >= 1 "
                  "(the number of optimizer steps the lock holds)")
        if lora.rank < 0:
            _fail(f"model.lora.{tower}.rank", f"must be >= 0 (0 = no adapters), got {lora.rank}")
        if lora.rank == 0:
            continue
        if lock:
            _fail(f"model.lora.{tower}.rank", f"adapters freeze the {tower} tower's weights themselves; drop "
                  f"model.lock_{tower} (or set the rank to 0)")
        if lora.alpha <= 0:
            _fail(f"model.lora.{tower}.alpha", f"must be > 0, got {lora.alpha}")
        if not 0 <= lora.dropout < 1:
            _fail(f"model.lora.{tower}.dropout", f"must be in [0, 1), got {lora.dropout}")
        bad = [x for x in lora.targets if x not in TARGETS]
        if bad or not lora.targets:
            _fail(f"model.lora.{tower}.targets", f"{list(lora.targets)}: choose from {list(TARGETS)}")
    for tower in ("image", "text"):
        d, wd = o[f"layer_decay_{tower}"], o[f"weight_decay_{tower}"]
        if d is not None and not 0 < d <= 1:
            _fail(f"optim.layer_decay_{tower}", f"must be in (0, 1] (null = off), got {d}")
        if wd is not None and wd < 0:
            _fail(f"optim.weight_decay_{tower}", f"must be >= 0, got {wd}")
    if o.ema.decay is not None and not 0 < o.ema.decay < 1:
        _fail("optim.ema.decay", f"must be in (0, 1) (null = off), got {o.ema.decay}")
    if o.ema.warmup_steps < 0:
        _fail("optim.ema.warmup_steps", f"must be >= 0, got {o.ema.warmup_steps}")
    if o.ema.decay is None and (o.ema.eval or e.ema):
        _fail("optim.ema.decay" if o.ema.eval else "export.ema", "needs an EMA: set optim.ema.decay (e.g. 0.999)")
    if e.select.max_retention_drop < 0:
        _fail("export.select.max_retention_drop", f"must be >= 0, got {e.select.max_retention_drop}")
    if e.wise.alpha is not None:
        from gcl.finetune.select import parse_alpha, parse_alphas

        try:
            parse_alpha(e.wise.alpha)
            parse_alphas(e.wise.alphas)
        except ValueError as exn:
            raise ConfigError(str(exn)) from exn
        if not e.enabled:
            _fail("export.wise.alpha", "exports the interpolated model: needs export.enabled=true")
        if not m.pretrained and not str(m.name).startswith(("hf-hub:", "local-dir:")):
            _fail("export.wise.alpha", "WiSE-FT interpolates towards the pretrained base, and this run starts from "
                  "random weights (model.pretrained=null); set model.pretrained, or export.wise.alpha=null")
