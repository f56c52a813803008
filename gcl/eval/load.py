"""The model to evaluate: :func:`load_model_for_eval` turns ``evaluate.py``'s ``model`` node into a bundle.

Lives here: choosing between a run dir / checkpoint file / exported open_clip folder (``model.checkpoint``)
and ``model.name`` + ``model.pretrained``, rebuilding a checkpoint's architecture and eval transform, and
:func:`adopt_run_config` (a run is evaluated with its own eval suite and data unless ``eval=`` says otherwise).
Not here: building models and resolving weights (``gcl.model``), reading training checkpoints
(``gcl.export.load_training_checkpoint``), evaluation itself (``gcl.eval.run``).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def load_model_for_eval(model_cfg: Any, *, device: torch.device | str = "cpu", work_dir: Path | None = None) -> Any:
    """The ModelBundle to evaluate, from ``model.checkpoint`` (run dir | checkpoint file | export dir) or
    ``model.name`` + ``model.pretrained``. Weights that cannot be found fail with the model builder's message."""
    from gcl.model import build_model

    ck = model_cfg.checkpoint
    # inference speed settings; model.compile and model.patch_dropout are training settings (gcl.train)
    speed = {"attention": model_cfg.attention, "channels_last": model_cfg.channels_last}
    if not ck:
        return build_model(model_cfg.name, model_cfg.pretrained, config_path=model_cfg.config_path,
                           precision=model_cfg.precision, device=device, cache_dir=model_cfg.cache_dir,
                           text_packing=model_cfg.text_packing, **speed)
    p = Path(os.path.expanduser(str(ck)))
    if not p.exists():
        from gcl.config import MissingPathError

        raise MissingPathError(f"model.checkpoint={ck!r} does not exist; pass a run dir (with checkpoints/), a "
                               "checkpoint file, or an exported open_clip folder")
    if p.is_dir() and (p / "open_clip_config.json").is_file():
        return build_model(f"local-dir:{p}", None, precision=model_cfg.precision, device=device,
                           cache_dir=model_cfg.cache_dir, text_packing=model_cfg.text_packing, **speed)
    from gcl.export import load_training_checkpoint

    src = load_training_checkpoint(p)
    import open_clip

    name, config_path = src.name, src.config_path
    if config_path and not Path(config_path).is_file():
        config_path = None
    known = not name.startswith(("hf-hub:", "local-dir:")) and (
        config_path or open_clip.get_model_config(name.replace("/", "-")) is not None)
    if not known:
        # hf-hub:/local-dir: bases (or a moved config file): rebuild the architecture from the stored config.
        stem = "gcl-eval-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        cfg_dir = (work_dir or p.parent) / ".model_cfg"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        config_path = str(cfg_dir / f"{stem}.json")
        Path(config_path).write_text(json.dumps(src.model_cfg))
        name = stem
    bias = src.state_dict.get("logit_bias")
    bundle = build_model(name, None, config_path=config_path, precision=model_cfg.precision, device=device,
                         cache_dir=model_cfg.cache_dir, text_packing=model_cfg.text_packing, **speed,
                         logit_bias_init=float(bias.reshape(-1)[0]) if bias is not None else None)
    missing, unexpected = bundle.model.load_state_dict(src.state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {src.checkpoint_file} does not fit {src.name}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if src.preprocess_cfg:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        bundle.preprocess_val = image_transform_v2(PreprocessCfg(**src.preprocess_cfg), is_train=False)
        bundle.preprocess_cfg = dict(src.preprocess_cfg)
    bundle.name = f"{src.name} @ {src.checkpoint_file}" + (f" step {src.step}" if src.step is not None else "")
    log.info("loaded %s (step %s) from %s", src.name, src.step, src.checkpoint_file)
    return bundle


def run_config_file(checkpoint: str | None) -> Path | None:
    """The config file a training run was launched with (``RUN/.hydra/config.yaml``), when ``checkpoint`` is
    a run dir, its ``checkpoints/`` or a checkpoint file inside one; else None."""
    if not checkpoint:
        return None
    p = Path(os.path.expanduser(str(checkpoint)))
    run_dir = p.parent.parent if p.is_file() and p.parent.name == "checkpoints" else p
    if p.name == "checkpoints" and p.is_dir():
        run_dir = p.parent
    path = run_dir / ".hydra" / "config.yaml"
    return path if path.is_file() else None


def adopt_run_config(cfg: Any, overrides: list[str]) -> Any:
    """``python evaluate.py model.checkpoint=RUN`` without ``eval=``: evaluate with the run's own ``eval``
    suite (and its ``data``, where the suite's splits live) instead of the default synthetic one; the
    command line's ``eval.*`` / ``data.*`` overrides still apply on top. ``eval=NAME`` (or ``data=NAME``)
    keeps that group as composed. Returns the (possibly) updated cfg."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = run_config_file(cfg.model.checkpoint)
    if path is None:
        return cfg
    saved = OmegaConf.load(path)
    parsed = OverridesParser.create().parse_overrides(overrides)
    cfg = cfg.copy()
    for group in ("eval", "data"):
        if group not in saved or any(o.key_or_group == group for o in parsed):
            continue
        schema = OmegaConf.structured(OmegaConf.get_type(cfg, group))  # the run's node alone, typed
        setattr(cfg, group, OmegaConf.merge(schema, OmegaConf.to_container(saved[group], resolve=True)))
        for o in parsed:
            if o.key_or_group.startswith(group + ".") and not o.is_delete():
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
    log.info("evaluating with the run's own eval suite %r (from %s); pass eval=NAME for another", cfg.eval.name,
             path)
    return cfg
