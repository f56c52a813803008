"""The runs robust fine-tuning works on: a run's fine-tuned weights, its base, and whether runs share one.

Lives here: :class:`Run` (a run dir's plain fine-tuned weights - LoRA merged, EMA when asked - with its
``model_info`` and resolved config), :func:`load_run`, :func:`base_state_dict` (the run's starting weights,
rebuilt from ``model.name`` + ``model.pretrained`` as recorded in the checkpoint), :func:`base_identity`,
:func:`check_same_base` and :func:`check_same_keys`.

The base of a run is its starting weights. A run that started from random weights (``model.pretrained=null``
with a plain architecture name) has no base to return to: WiSE-FT refuses it with that reason (the random
init is not recorded, and interpolating towards noise keeps no knowledge), and a soup refuses it because its
trials' inits cannot be shown to be the same. Not here: scoring (:mod:`gcl.finetune.select`), interpolation
(:mod:`gcl.finetune.wise`), averaging (:mod:`gcl.finetune.soup`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

log = logging.getLogger(__name__)


class FinetuneError(ValueError):
    """A run or a set of runs that robust fine-tuning cannot use; the message names the run and the fix."""


@dataclass
class Run:
    run_dir: Path
    src: Any  # gcl.export.ExportSource: plain state dict, model_cfg, preprocess_cfg, name, pretrained, step
    config: DictConfig  # the run's resolved training config


def cli_errors() -> tuple[type[Exception], ...]:
    """The errors ``python -m gcl.wise`` / ``gcl.soup`` report as one logged line and exit status 1: a user's
    input (a run dir, a sweep, weights that are not there), not a bug."""
    from gcl.export import ExportError
    from gcl.model import WeightsUnavailableError

    return FinetuneError, ExportError, FileNotFoundError, WeightsUnavailableError, ValueError


def load_run(run_dir: str | os.PathLike, which: str = "latest", weights: str = "model") -> Run:
    """A run dir's latest (or best) checkpoint as plain open_clip weights, with its config."""
    from gcl.export import ExportError, load_training_checkpoint

    p = Path(run_dir)
    if not p.is_dir():
        raise FinetuneError(f"{p} is not a run directory (expected the output dir of a train.py run)")
    try:
        src = load_training_checkpoint(p, which, weights)
    except (ExportError, FileNotFoundError) as e:
        raise FinetuneError(f"{p}: {e}") from e
    if not src.config_yaml:
        raise FinetuneError(f"{src.checkpoint_file} has no resolved training config; it was not written by train.py")
    return Run(run_dir=p, src=src, config=OmegaConf.create(src.config_yaml))


def _pretrained_id(pretrained: str | None) -> str | None:
    if pretrained and os.path.exists(pretrained):
        return os.path.realpath(pretrained)  # the same file reached through another relative path
    return pretrained


def base_identity(run: Run) -> dict[str, Any]:
    """What makes two runs' bases the same: model name, pretrained weights and the architecture config."""
    s = run.src
    return {"name": s.name, "pretrained": _pretrained_id(s.pretrained), "model_cfg": dict(s.model_cfg)}


def has_base(run: Run) -> bool:
    return bool(run.src.pretrained) or run.src.name.startswith(("hf-hub:", "local-dir:"))


def require_base(run: Run, what: str) -> None:
    if not has_base(run):
        raise FinetuneError(
            f"{run.run_dir}: {what} needs the pretrained base this run started from, but it started from random "
            f"weights (model.name={run.src.name}, model.pretrained=null): there is no base knowledge to keep. "
            "Fine-tune from pretrained weights (model.pretrained=TAG_OR_FILE, or an hf-hub:/local-dir: model.name)")


def base_state_dict(run: Run) -> dict[str, Tensor]:
    """The run's starting weights (CPU, fp32 as open_clip builds them), keyed like its fine-tuned weights."""
    from gcl.model import build_model

    require_base(run, "WiSE-FT")
    s = run.src
    config_path = s.config_path
    if config_path and not Path(config_path).is_file():
        raise FinetuneError(f"{run.run_dir}: the run registered its architecture from {config_path}, which no "
                            "longer exists; restore that file")
    from gcl.model import WeightsUnavailableError

    bias = s.model_cfg.get("init_logit_bias")
    try:
        bundle = build_model(s.name, s.pretrained, config_path=config_path, device="cpu",
                             logit_bias_init=float(bias) if bias is not None else None)
    except (OSError, ValueError, WeightsUnavailableError) as e:
        raise FinetuneError(f"{run.run_dir}: cannot rebuild its base (model.name={s.name}, model.pretrained="
                            f"{s.pretrained}): {e}") from e
    base = {k: v.detach() for k, v in bundle.model.state_dict().items()}
    check_same_keys({"the base": base, str(run.run_dir): s.state_dict})
    return base


def check_same_keys(state_dicts: dict[str, dict[str, Tensor]]) -> None:
    """Every state dict has the same keys and shapes as the first; the error names the first difference."""
    (ref_name, ref), *rest = state_dicts.items()
    for name, sd in rest:
        missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
        if missing or extra:
            raise FinetuneError(f"{name} and {ref_name} have different weights: {name} lacks {missing[:3]} and "
                                f"has {extra[:3]} more: they are not the same architecture")
        for k, v in ref.items():
            if sd[k].shape != v.shape:
                raise FinetuneError(f"{name} and {ref_name} differ in the shape of {k}: {tuple(sd[k].shape)} vs "
                                    f"{tuple(v.shape)}: they are not the same architecture")


def check_same_base(runs: list[Run], what: str) -> None:
    """All runs fine-tune one base (same model name, pretrained weights and architecture); the error names
    every run that differs from the first and how."""
    for r in runs:
        require_base(r, what)
    ref = base_identity(runs[0])
    bad = []
    for r in runs[1:]:
        ident = base_identity(r)
        diffs = [f"{k}: {ident[k]!r} (vs {ref[k]!r})" for k in ("name", "pretrained") if ident[k] != ref[k]]
        if ident["model_cfg"] != ref["model_cfg"]:
            diffs.append("a different architecture (model_cfg)")
        if diffs:
            bad.append(f"  {r.run_dir}: " + "; ".join(diffs))
    if bad:
        raise FinetuneError(f"{what} needs runs fine-tuned from one base; these differ from {runs[0].run_dir}:\n"
                            + "\n".join(bad) + "\nleave them out (pass the matching run dirs explicitly)")
    check_same_keys({str(r.run_dir): r.src.state_dict for r in runs})


def merge_other(key: str, values: list[Tensor], what: str) -> Tensor:
    """A non-floating-point entry of weights being interpolated or averaged. BatchNorm's ``num_batches_tracked``
    (ResNet towers, e.g. the shipped base's) counts the batches each model saw, so it differs after any
    fine-tune: the merged model takes the largest count (it only matters with ``momentum=None``). Any other
    integer tensor must be equal in all of them."""
    if key.endswith("num_batches_tracked"):
        return torch.stack(values).max(dim=0).values
    if any(not torch.equal(v, values[0]) for v in values[1:]):
        raise FinetuneError(f"{key} (not floating point) differs between {what}")
    return values[0]


def float_keys(state_dict: dict[str, Tensor]) -> list[str]:
    return [k for k, v in state_dict.items() if torch.is_floating_point(v)]
