"""Export a trained model as an OpenCLIP Hugging Face Hub folder, with a model card; optionally push it.

Usage::

    python -m gcl.export CHECKPOINT OUT_DIR [--which latest|best] [--push-to ORG/NAME [--private]]
                                           [--overwrite] [--pretrained TAG] [--license ID] [--ema]

``CHECKPOINT`` is a run dir (its latest or best checkpoint), a checkpoint file written by the trainer, or an
open_clip model to re-export: ``hf-hub:ORG/NAME``, ``local-dir:PATH``, ``NAME:PRETRAINED_TAG`` or ``NAME`` with
``--pretrained TAG_OR_FILE``. A run's LoRA adapters are merged into plain open_clip weights; ``--ema`` exports
its moving average of the weights (``optim.ema``) instead of the trained ones. :func:`write_export` writes
any weights (WiSE-FT interpolations, soups: :mod:`gcl.finetune`).

``OUT_DIR`` gets exactly what ``open_clip.create_model_and_transforms('local-dir:OUT_DIR')`` and
``open_clip.get_tokenizer('local-dir:OUT_DIR')`` read (the same layout ``hf-hub:`` reads after a push):

- ``open_clip_config.json``: ``{"model_cfg": ..., "preprocess_cfg": ...}``;
- ``open_clip_model.safetensors``: the model state dict;
- tokenizer files, only for a Hugging Face tokenizer (``text_cfg.hf_tokenizer_name``; open_clip then reads
  them from the folder). OpenCLIP's built-in BPE tokenizer has no files: a ``text_cfg`` without
  ``hf_tokenizer_name`` makes open_clip use it, with the config's context length and tokenizer kwargs;
- ``README.md``: the model card (HF metadata header, base model, loss terms, data, metrics, config, usage);
  re-exporting an export folder keeps its card, with the load lines pointed at the new place.

The folder is built in a hidden sibling temp dir, loaded back with open_clip and compared tensor by tensor
(and tokenizer by tokenizer where the training tokenizer is known), and only then renamed into place, so a
failed export never leaves a folder that looks complete.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from gcl.checkpoint import BEST, find_checkpoint, load_newest_intact

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
CARD_NAME = "README.md"
# Keys of open_clip's PreprocessCfg: anything else in a preprocess dict is ignored by open_clip.
PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
# Strings the tokenizer check runs on: case, punctuation, non-ASCII and an over-long text (truncation).
TOKENIZER_PROBES = ["a photo of a red dress", "Black Leather BOOTS, size 42!", "café crème — 100% cotton",
                    "long " * 200]
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Whole key words only: "hf_token" or "api_key" is a secret, "max_tokens" is not.
SECRET_KEY_RE = re.compile(r"(?:^|[_-])(?:token|secret|password|passwd|api_?key|credentials?|auth)(?:$|[_-])",
                           re.IGNORECASE)
URL_USERINFO_RE = re.compile(r"(\w+://)[^/\s@]+@")


class ExportError(RuntimeError):
    """An export that cannot go on; the message names the problem and the fix."""


class HubError(ExportError):
    """Pushing to the Hugging Face Hub is impossible here (no token, offline, no network, bad repo id)."""


@dataclass
class ExportSource:
    """Everything an export needs, whatever it came from.

    ``state_dict`` holds the open_clip model's tensors (unwrapped keys); ``model_cfg`` and ``preprocess_cfg``
    are open_clip's dicts; ``tokenizer`` is the tokenizer the model was trained with when it is at hand (a
    re-export), else None and it is rebuilt from ``model_cfg``.
    """

    state_dict: dict[str, Tensor]
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    name: str
    pretrained: str | None
    config_path: str | None = None
    step: int | None = None
    config_yaml: str | None = None
    run_dir: Path | None = None
    checkpoint_file: Path | None = None
    tokenizer: Any = None
    card: str | None = None  # the model card of a re-exported folder, kept (with new load lines)
    weights_note: str | None = None  # how the weights were made when not plainly trained (EMA, WiSE-FT, soup)


# ------------------------------------------------------------------------------------------- sources
def is_model_ref(ref: str, pretrained: str | None = None) -> bool:
    """True when ``ref`` names an open_clip model (not a path of a run dir or checkpoint file)."""
    if ref.startswith(("hf-hub:", "local-dir:")):
        return True
    if Path(ref).exists():
        return False
    return pretrained is not None or ":" in ref


def _run_dir_of(ckpt_file: Path) -> Path | None:
    """The run dir a checkpoint file lives in (``<run>/checkpoints/x.pt``), if it looks like one."""
    if ckpt_file.parent.name == "checkpoints":
        return ckpt_file.parent.parent
    return None


def _strip_wrappers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    # DDP ("module.") and torch.compile ("_orig_mod.") prefixes never belong in an open_clip state dict.
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_training_checkpoint(path: str | os.PathLike, which: str = "latest", weights: str = "model") -> ExportSource:
    """Read a run dir or a trainer checkpoint file into an :class:`ExportSource`.

    ``weights``: ``model`` (the trained weights) or ``ema`` (their moving average, ``optim.ema``). LoRA
    adapters are merged into plain open_clip weights either way.
    """
    if which not in ("latest", "best"):
        raise ExportError(f"--which must be latest or best, got {which!r}")
    if weights not in ("model", "ema"):
        raise ExportError(f"weights must be model or ema, got {weights!r}")
    p = Path(path)
    if which == "best" and p.is_dir():
        ck = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        # find_checkpoint falls back to the newest step file; exporting that as "best" would mislabel it.
        if not (ck / BEST).is_file():
            raise ExportError(f"no best checkpoint recorded in {ck} (no {BEST}): it needs trainer.best_metric "
                              "and at least one in-loop evaluation; export --which latest instead")
    found = load_newest_intact(path, which=which, purpose="export")  # damaged ones are named and skipped
    if found is None:
        find_checkpoint(path, which=which, purpose="export")  # raises FileNotFoundError with the advice
    ckpt_file, state = found
    missing = [k for k in ("model", "model_info") if k not in state]
    if missing:
        raise ExportError(
            f"{ckpt_file} is not a gcl training checkpoint (missing {missing}); pass a run dir or a file "
            "written by train.py, or an open_clip model as hf-hub:/local-dir:/NAME:TAG")
    info = state["model_info"]
    for k in ("name", "model_cfg"):
        if not info.get(k):
            raise ExportError(f"{ckpt_file}: model_info.{k} is empty; the checkpoint cannot be exported")
    run_dir = Path(path) if Path(path).is_dir() else _run_dir_of(ckpt_file)
    if run_dir is not None and run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    config_yaml = state.get("config")
    if not config_yaml and run_dir is not None and (run_dir / ".hydra" / "config.yaml").is_file():
        config_yaml = (run_dir / ".hydra" / "config.yaml").read_text()
    from gcl.model.lora import merge_lora_state_dict

    sd, note = _strip_wrappers(state["model"]), None
    if weights == "ema":
        if not state.get("ema"):
            raise ExportError(f"{ckpt_file} holds no EMA weights: the run was trained without optim.ema.decay; "
                              "export its trained weights (no --ema / export.ema=false)")
        from gcl.finetune.ema import ema_state_dict

        sd = ema_state_dict(_strip_wrappers(state["ema"]["shadow"]), sd)
        note = (f"exponential moving average of the weights (decay {state['ema']['decay']}, "
                f"{state['ema']['num_updates']} updates)")
    return ExportSource(
        state_dict=merge_lora_state_dict(sd), model_cfg=copy.deepcopy(dict(info["model_cfg"])),
        preprocess_cfg=dict(info.get("preprocess_cfg") or {}), name=info["name"],
        pretrained=info.get("pretrained"), config_path=info.get("config_path"), step=state.get("step"),
        config_yaml=config_yaml, run_dir=run_dir, checkpoint_file=ckpt_file, weights_note=note)


def load_open_clip_model(ref: str, pretrained: str | None = None) -> ExportSource:
    """Build an open_clip model (``hf-hub:``, ``local-dir:``, ``NAME:TAG`` or ``NAME`` + ``pretrained``)."""
    from gcl.model import build_model

    name = ref
    if pretrained is None and not ref.startswith(("hf-hub:", "local-dir:")) and ":" in ref:
        name, pretrained = ref.split(":", 1)
    if not ref.startswith(("hf-hub:", "local-dir:")) and not pretrained:
        raise ExportError(
            f"{ref!r} is neither an existing run dir/checkpoint file nor a pretrained open_clip model; "
            "pass NAME:PRETRAINED_TAG, NAME --pretrained TAG_OR_FILE, hf-hub:ORG/NAME or local-dir:PATH")
    bundle = build_model(name, pretrained)
    card = None
    if name.startswith("local-dir:") and not pretrained:
        readme = Path(name[len("local-dir:"):]) / CARD_NAME
        card = readme.read_text() if readme.is_file() else None
    return ExportSource(
        state_dict=bundle.model.state_dict(), model_cfg=copy.deepcopy(dict(bundle.model_cfg)),
        preprocess_cfg=dict(bundle.preprocess_cfg), name=bundle.name, pretrained=bundle.pretrained,
        tokenizer=bundle.tokenizer, card=card)


# -------------------------------------------------------------------------------------------- config
def _plain(x: Any) -> Any:
    """Containers of an OmegaConf/tuple flavour -> plain JSON types."""
    if isinstance(x, dict) or hasattr(x, "items"):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def open_clip_config(src: ExportSource) -> dict[str, Any]:
    """The ``open_clip_config.json`` content for ``src``.

    Fixes a CLIP-family model trained with a sigmoid loss: its state dict carries a ``logit_bias`` that
    open_clip only creates when ``model_cfg.init_logit_bias`` is set, so the key is added (its value is
    irrelevant, the trained value is loaded over it).
    """
    model_cfg = _plain(src.model_cfg)
    has_bias = "logit_bias" in src.state_dict
    if has_bias and model_cfg.get("init_logit_bias") is None:
        model_cfg["init_logit_bias"] = float(src.state_dict["logit_bias"].float().flatten()[0])
    elif not has_bias and model_cfg.get("init_logit_bias") is not None:
        raise ExportError(
            "model_cfg.init_logit_bias is set but the state dict has no logit_bias; open_clip would load a "
            "zero bias silently. Re-train with the sigmoid loss or remove init_logit_bias from the config")
    pre = {k: _plain(v) for k, v in src.preprocess_cfg.items() if k in PREPROCESS_KEYS and v is not None}
    return {"model_cfg": model_cfg, "preprocess_cfg": pre}


# ------------------------------------------------------------------------------------------ tokenizer
def _hf_tokenizer_source(name: str, text_cfg: dict[str, Any]) -> str:
    # open_clip reads an HF tokenizer from the folder itself for local-dir:, else from hf_tokenizer_name.
    if name.startswith("local-dir:"):
        return name[len("local-dir:"):]
    return text_cfg["hf_tokenizer_name"]


def training_tokenizer(src: ExportSource, text_cfg: dict[str, Any]) -> Any:
    """The tokenizer ``src`` was trained with (the one open_clip gives for its model name and config)."""
    if src.tokenizer is not None:
        return src.tokenizer
    from open_clip.tokenizer import SimpleTokenizer

    ctx = text_cfg.get("context_length", 77)
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if text_cfg.get("hf_tokenizer_name"):
        source = _hf_tokenizer_source(src.name, text_cfg)
        try:
            from open_clip.tokenizer import HFTokenizer

            return HFTokenizer(source, context_length=ctx, tokenizer_mode=text_cfg.get("tokenizer_mode"),
                               **kwargs)
        except Exception as e:  # ImportError (no transformers), offline cache miss, ...
            raise ExportError(
                f"the text tower uses the Hugging Face tokenizer {source!r}, which could not be loaded "
                f"({type(e).__name__}: {e}). Install `transformers` and make its files available (download "
                "them once with network, or point hf_tokenizer_name at a local folder)") from e
    if _open_clip_picks_siglip_tokenizer(src):
        raise ExportError(
            f"{src.name!r} was tokenized with open_clip's SigLipTokenizer (picked from 'siglip' in the name), "
            "which open_clip's local-dir/hf-hub loaders cannot rebuild. Use the model's hf-hub: name or set "
            "text_cfg.hf_tokenizer_name in its config (as open_clip's own SigLIP configs do)")
    return SimpleTokenizer(context_length=ctx, **kwargs)


def _open_clip_picks_siglip_tokenizer(src: ExportSource) -> bool:
    # open_clip.get_tokenizer picks a SigLIP tokenizer for a plain name containing "siglip" without
    # hf_tokenizer_name; gcl.model gives its own registered configs (package or config_path) the built-in BPE.
    if src.name.startswith(("hf-hub:", "local-dir:")) or "siglip" not in src.name.lower() or src.config_path:
        return False
    from gcl.model import PACKAGE_CONFIG_DIR

    return not (PACKAGE_CONFIG_DIR / f"{src.name}.json").is_file()


def write_tokenizer(tokenizer: Any, text_cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """Save ``tokenizer``'s files into ``out`` if it has any; returns the ``text_cfg`` open_clip must see.

    HF tokenizers are saved with ``save_pretrained`` and keep ``hf_tokenizer_name`` (for ``local-dir:`` open_clip
    loads them from the folder). OpenCLIP's ``SimpleTokenizer`` is built into open_clip: no files, and no
    ``hf_tokenizer_name``, which is what selects it.
    """
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    text_cfg = dict(text_cfg)
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save_pretrained(str(out))
        if not text_cfg.get("hf_tokenizer_name"):
            # The hf-hub fallback (a repo without a config) tokenizes with the repo itself.
            text_cfg["hf_tokenizer_name"] = str(getattr(tokenizer.tokenizer, "name_or_path", "") or "self")
        return text_cfg
    if isinstance(tokenizer, SimpleTokenizer):
        if text_cfg.pop("hf_tokenizer_name", None):
            log.warning("the model was tokenized with open_clip's built-in BPE although text_cfg names an HF "
                        "tokenizer; the export drops hf_tokenizer_name so the folder loads the same tokenizer")
        return text_cfg
    raise ExportError(
        f"cannot export a {type(tokenizer).__name__}: open_clip's local-dir/hf-hub loaders only rebuild its "
        "built-in BPE tokenizer or a Hugging Face tokenizer (text_cfg.hf_tokenizer_name). Set "
        "hf_tokenizer_name in the model config to the tokenizer's Hub id and train with it")


# ----------------------------------------------------------------------------------------- model card
def _redact(x: Any) -> Any:
    """Drop values that look like credentials from a config before it goes into a public card."""
    if isinstance(x, dict):
        return {k: ("<redacted>" if SECRET_KEY_RE.search(str(k)) and v not in (None, "") else _redact(v))
                for k, v in x.items()}
    if isinstance(x, list):
        return [_redact(v) for v in x]
    if isinstance(x, str):
        return URL_USERINFO_RE.sub(r"\1<redacted>@", x)
    return x


def base_model_id(name: str, pretrained: str | None) -> str | None:
    """The Hub id of the model training started from, when it has one."""
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):].split("@")[0]
    if name.startswith("local-dir:") or not pretrained or os.path.isfile(pretrained):
        return None
    import open_clip

    hub = open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub", "")
    return hub.strip("/") or None


def _base_description(name: str, pretrained: str | None) -> str:
    if name.startswith(("hf-hub:", "local-dir:")):
        return f"`{name}`"
    if pretrained and os.path.isfile(pretrained):
        return f"open_clip `{name}` initialised from the weights file `{Path(pretrained).name}`"
    if pretrained:
        return f"open_clip `{name}`, pretrained tag `{pretrained}`"
    return f"open_clip `{name}` architecture, randomly initialised (no pretrained weights)"


def _side(side: Any) -> str:
    if not isinstance(side, dict):
        return str(side)
    fields, weights = list(side.get("fields") or []), list(side.get("weights") or [])
    if len(fields) > 1 and len(weights) == len(fields):
        return " + ".join(f"{w:g}·{f}" for f, w in zip(fields, weights))
    return " + ".join(fields) if len(fields) > 1 else (fields[0] if fields else "?")


def _cell(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def _loss_section(loss: dict[str, Any] | None) -> list[str]:
    if not loss:
        return ["Not recorded (re-export of an open_clip model, or a checkpoint without its training config)."]
    lines = [f"Kind: **{loss.get('kind', '?')}** (pairwise {'sigmoid' if loss.get('kind') == 'siglip' else 'softmax'} "
             f"contrastive); duplicate field values treated as positives: **{loss.get('duplicates', '?')}**.",
             "", "Total loss = Σ weight × term. A side fuses fields as normalize(Σ aₖ · normalize(fₖ)).", "",
             "| term | left | right | weight | rank weighting |", "|---|---|---|---|---|"]
    terms = loss.get("terms") or []
    if isinstance(terms, dict):
        terms = [{"name": k, **v} for k, v in terms.items()]
    for t in terms:
        if not isinstance(t, dict):
            lines.append(f"| {_cell(t)} | | | | |")
            continue
        rank = t.get("score_to_weight", "none")
        if rank not in (None, "none"):
            rank = f"{rank} ({t.get('score_field', 'score')})"
        lines.append(f"| {_cell(t.get('name', '?'))} | {_cell(_side(t.get('left')))} | "
                     f"{_cell(_side(t.get('right')))} | {_cell(t.get('weight', 1.0))} | {_cell(rank)} |")
    return lines


def _data_section(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return ["Not recorded."]
    lines = []
    shards = data.get("train_shards")
    if shards in (None, "", []) and data.get("builtin") == "world":
        w = data.get("world") or {}
        lines.append(f"- Training data: the built-in general synthetic world (`gcl.data.world`: 48 object classes, "
                     f"16 colours, patterns, counts, spatial relations, backgrounds; {w.get('samples', '?')} "
                     f"pictures, seed {w.get('seed', '?')}). Not fashion and not real data.")
    elif shards in (None, "", []):
        syn = data.get("synthetic") or {}
        lines.append(f"- Training data: the built-in procedural (synthetic) fashion catalog "
                     f"({syn.get('products', '?')} products, seed {syn.get('seed', '?')}). Not real data: "
                     "this model is a pipeline demo, not a useful retrieval model.")
    else:
        lines.append(f"- Training shards (webdataset): `{_cell(shards)}`")
    for key, label in (("val_shards", "Validation shards"), ("test_shards", "Test shards"),
                       ("source_weights", "Source weights"), ("batch_size", "Batch size per process"),
                       ("context_length", "Context length per field"),
                       ("default_context_length", "Default context length")):
        if data.get(key) not in (None, "", [], {}):
            lines.append(f"- {label}: `{_cell(data[key])}`")
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _cell(v)
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(src: ExportSource, cfg: dict[str, Any], *, metrics: dict[str, Any] | None,
               metrics_step: int | None, repo_id: str | None, out_dir: Path, license: str) -> str:
    """The README.md model card (HF metadata header + markdown body) for an export of ``src``."""
    train_cfg = _redact(_plain(yaml.safe_load(src.config_yaml))) if src.config_yaml else {}
    if not isinstance(train_cfg, dict):
        train_cfg = {}
    loss = train_cfg.get("loss")
    siglip = "init_logit_bias" in cfg["model_cfg"]
    base = base_model_id(src.name, src.pretrained)
    # Not the folder name: the trainer's default folder is just "export".
    title = repo_id.split("/")[-1] if repo_id else f"gcl fine-tune of {src.name}"

    tags = ["clip", "open_clip", "gcl", "generalized-contrastive-learning", "image-text-retrieval"]
    if siglip:
        tags.append("siglip")
    head = ["---", "library_name: open_clip", "pipeline_tag: zero-shot-image-classification",
            f"license: {license}", "tags:", *[f"- {t}" for t in tags]]
    if base:
        head += ["base_model:", f"- {base}"]
    head.append("---")

    arch = "SigLIP-style (non-causal text tower)" if cfg["model_cfg"].get("text_cfg", {}).get("no_causal_mask") \
        else "CLIP"
    mc, tc, vc = cfg["model_cfg"], cfg["model_cfg"].get("text_cfg", {}), cfg["model_cfg"].get("vision_cfg", {})
    body = [f"# {title}", "",
            "An OpenCLIP model fine-tuned with **gcl** (Generalized Contrastive Learning): a weighted sum of "
            "contrastive terms, each pairing one field or a weighted fusion of product fields (image, title, "
            "description, colors, ...) with another.", "",
            "## Model", "",
            f"- Base model: {_base_description(src.name, src.pretrained)}"
            + (f" ([{base}](https://huggingface.co/{base}))" if base else ""),
            f"- Architecture: {arch}; logits: {'sigmoid with a learned logit_bias' if siglip else 'softmax'}",
            f"- Embedding dim: {mc.get('embed_dim', '?')}; image size: {vc.get('image_size', '?')}; "
            f"text context length: {tc.get('context_length', '?')}",
            f"- Tokenizer: {'Hugging Face `' + tc['hf_tokenizer_name'] + '` (files in this repo)' if tc.get('hf_tokenizer_name') else 'OpenCLIP built-in BPE (SimpleTokenizer)'}",
            f"- Logit scale (exp): {float(src.state_dict['logit_scale'].float().exp().flatten()[0]):.4f}"
            if "logit_scale" in src.state_dict else "- Logit scale: n/a",
            ]
    if "logit_bias" in src.state_dict:
        body.append(f"- Logit bias: {float(src.state_dict['logit_bias'].float().flatten()[0]):.4f}")
    if src.step is not None:
        body.append(f"- Training steps: {src.step}")
    if src.weights_note:
        body.append(f"- Weights: {src.weights_note}")
    body += ["", "## Training objective", "", *_loss_section(loss if isinstance(loss, dict) else None),
             "", "## Data", "", *_data_section(train_cfg.get("data") if isinstance(train_cfg.get("data"), dict)
                                                 else None), "", "## Evaluation", ""]
    nums = {k: v for k, v in (metrics or {}).items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if nums:
        at = f" at step {metrics_step}" if metrics_step is not None else ""
        body += [f"Latest in-training evaluation{at}:", "", "| metric | value |", "|---|---|",
                 *[f"| {_cell(k)} | {_fmt(v)} |" for k, v in sorted(nums.items())]]
    else:
        body.append("No evaluation was recorded for this checkpoint.")
    ref = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{out_dir}"
    body += ["", "## Usage", "", "```python", "import open_clip", "import torch", "from PIL import Image", "",
             f"model, _, preprocess = open_clip.create_model_and_transforms({ref!r})",
             f"tokenizer = open_clip.get_tokenizer({ref!r})", "model.eval()", "",
             "image = preprocess(Image.open('product.jpg')).unsqueeze(0)",
             "text = tokenizer(['a black leather jacket', 'a red summer dress'])",
             "with torch.no_grad():",
             "    img = model.encode_image(image, normalize=True)",
             "    txt = model.encode_text(text, normalize=True)",
             "    logits = model.logit_scale.exp() * img @ txt.T"
             + (" + model.logit_bias" if siglip else ""),
             "print(logits.sigmoid() if model.logit_bias is not None else logits.softmax(dim=-1))", "```"]
    if train_cfg:
        body += ["", "## Training configuration", "",
                 "The resolved Hydra configuration of the run (credentials redacted):", "", "<details>",
                 "<summary>config.yaml</summary>", "", "```yaml",
                 yaml.safe_dump(train_cfg, sort_keys=False, allow_unicode=True).rstrip(), "```", "",
                 "</details>"]
    body += ["", "## Limitations", "",
             "Check the licenses of the base model and the training data before use. Retrieval quality outside "
             "the training domain is not measured here.", ""]
    return "\n".join(head + [""] + body)


def retarget_card(card: str, ref: str) -> str:
    """A kept model card with its open_clip load lines pointing at ``ref`` (the new folder or Hub repo)."""
    return re.sub(r"(open_clip\.(?:create_model_and_transforms|get_tokenizer)\()'[^']*'", lambda m: m.group(1) + repr(ref), card)


def _eval_step(p: Path) -> int | None:
    m = re.fullmatch(r"step_(\d+)", p.stem)
    return int(m.group(1)) if m else None


def latest_metrics(run_dir: Path | None, max_step: int | None) -> tuple[dict[str, Any] | None, int | None]:
    """The newest ``eval/step_*.json`` at or before ``max_step`` (metrics of later weights would mislead)."""
    if run_dir is None or not (run_dir / "eval").is_dir():
        return None, None
    found = [(s, p) for p in (run_dir / "eval").glob("step_*.json") if (s := _eval_step(p)) is not None
             and (max_step is None or s <= max_step)]
    if not found:
        return None, None
    step, path = max(found)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("cannot read eval file %s (%s); the card will have no metrics", path, e)
        return None, None
    return (data if isinstance(data, dict) else None), step


# ------------------------------------------------------------------------------------------- writing
def _save_weights(state_dict: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage or are non-contiguous: give each its own copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()
               if isinstance(v, Tensor)}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _even_permissions(root: Path) -> None:
    """Every file and folder of the export gets the mode a plain ``open``/``mkdir`` gives under the umask:
    writers that go through a private temp file (safetensors) would leave 0600 on the weights alone."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def verify_export(folder: Path, src: ExportSource, tokenizer: Any) -> None:
    """Load ``folder`` the way users will (``local-dir:``) and check it reproduces ``src`` exactly.

    Every tensor of the loaded model must equal the source tensor (after a cast to the source dtype; open_clip
    builds fp32), and the loaded tokenizer must give the same token ids as the training tokenizer on
    :data:`TOKENIZER_PROBES`. Raises ExportError otherwise.
    """
    import open_clip

    ref = f"local-dir:{folder}"
    try:
        model = open_clip.create_model(ref, device="cpu")
    except Exception as e:
        raise ExportError(f"the exported folder does not load with open_clip ({type(e).__name__}: {e})") from e
    loaded = model.state_dict()
    src_sd = {k: v for k, v in src.state_dict.items() if isinstance(v, Tensor)}
    if set(loaded) != set(src_sd):
        raise ExportError(f"exported model keys differ from the checkpoint: missing "
                          f"{sorted(set(src_sd) - set(loaded))[:5]}, unexpected {sorted(set(loaded) - set(src_sd))[:5]}")
    for k, v in src_sd.items():
        got = loaded[k].to(v.dtype).reshape(v.shape) if loaded[k].numel() == v.numel() else loaded[k]
        if got.shape != v.shape or not torch.equal(got, v.cpu()):
            raise ExportError(f"exported tensor {k!r} differs from the checkpoint after loading")
    tok = open_clip.get_tokenizer(ref)
    if tokenizer is not None and not torch.equal(tok(TOKENIZER_PROBES), tokenizer(TOKENIZER_PROBES)):
        raise ExportError("the exported tokenizer gives other token ids than the training tokenizer")


def _check_out_dir(out: Path, overwrite: bool, protect: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another OUT_DIR")
    for p in protect:
        if p is not None and (out.resolve() == p.resolve() or out.resolve() in p.resolve().parents):
            raise ExportError(f"OUT_DIR {out} contains the training run/checkpoint {p}; export elsewhere "
                              "(e.g. RUN_DIR/export)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} is not empty; pass --overwrite (export.overwrite=true) to replace it, "
                              "or choose another OUT_DIR")
        if not (out / CONFIG_NAME).is_file():
            raise ExportError(f"refusing to overwrite {out}: it is not empty and is not a previous export "
                              f"(no {CONFIG_NAME}); remove it yourself or choose another OUT_DIR")


def _commit_dir(tmp: Path, out: Path) -> None:
    """Put ``tmp`` at ``out`` by renames; a previous export at ``out`` is removed only after the swap."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- hub
def hub_preflight(repo_id: str) -> tuple[Any, str]:
    """Fail fast before any work when a push cannot succeed; returns ``(HfApi, token)``.

    The token comes from ``HF_TOKEN`` or the user's ``hf auth login``; it is never logged or put in messages.
    """
    if not REPO_ID_RE.match(repo_id):
        raise HubError(f"--push-to expects a Hub repo id ORG/NAME, got {repo_id!r}")
    try:
        import huggingface_hub
    except ImportError as e:
        raise HubError("pushing needs huggingface_hub: pip install huggingface_hub") from e
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (and make sure this machine "
                       "can reach huggingface.co) or export without --push-to and upload the folder later")
    token = huggingface_hub.get_token()
    if not token:
        raise HubError("no Hugging Face token found: set HF_TOKEN (docker: -e HF_TOKEN) or run "
                       "`hf auth login`, or export without --push-to and upload the folder later")
    api = huggingface_hub.HfApi(token=token)
    try:
        api.whoami()
    except Exception as e:
        msg = str(e).replace(token, "<token>")
        raise HubError(f"cannot use the Hugging Face Hub ({type(e).__name__}: {msg}); check the network and "
                       "that the token is valid, or export without --push-to and upload the folder later") from None
    return api, token


def push_folder(api: Any, folder: Path, repo_id: str, *, private: bool,
                commit_message: str = "Upload gcl export") -> str:
    """Create ``repo_id`` (model repo, ``private`` as given, kept if it exists) and upload ``folder``."""
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        final_id = getattr(url, "repo_id", None) or repo_id
        api.upload_folder(repo_id=final_id, folder_path=str(folder), repo_type="model",
                          commit_message=commit_message)
    except Exception as e:
        token = api.token if isinstance(getattr(api, "token", None), str) else None
        msg = str(e).replace(token, "<token>") if token else str(e)
        raise HubError(f"upload to {repo_id} failed ({type(e).__name__}: {msg}); the export in {folder} is "
                       f"complete: retry with `python -m gcl.export {folder} OTHER_DIR --push-to {repo_id}` "
                       f"or `hf upload {repo_id} {folder}`") from None
    log.info("pushed %s to https://huggingface.co/%s (private=%s)", folder, final_id, private)
    return final_id


# --------------------------------------------------------------------------------------------- main
def export_model(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, which: str = "latest",
                 overwrite: bool = False, push_to: str | None = None, private: bool = True,
                 metrics: dict[str, Any] | None = None, pretrained: str | None = None,
                 license: str = "apache-2.0", verify: bool = True, weights: str = "model") -> Path:
    """Export ``checkpoint`` as an OpenCLIP Hub folder at ``out_dir``; optionally push it to ``push_to``.

    Args:
        checkpoint: a run dir, a trainer checkpoint file, or an open_clip model to re-export: an open_clip
            folder (a previous export), ``hf-hub:``, ``local-dir:``, ``NAME:TAG``, or ``NAME`` with
            ``pretrained``.
        out_dir: target folder; must be missing or empty unless ``overwrite`` (then only a previous export
            is replaced).
        which: ``latest`` or ``best`` checkpoint of a run dir.
        push_to: Hub repo id ``ORG/NAME``; checked (token, offline, network) before any work, so a caller
            that must not lose the local export on a Hub problem (the trainer) should call
            :func:`hub_preflight` itself early. A failed upload leaves the complete local export.
        private: visibility of a repo the push creates.
        metrics: eval metrics for the card; default the run's newest ``eval/step_*.json`` at or before the
            exported step.
        license: the card's license id.
        verify: load the folder back with open_clip and compare every tensor and the tokenizer before
            committing it (recommended; costs one model build).
        weights: ``model`` or ``ema`` (a run's moving average of the weights, ``optim.ema``).

    Returns:
        The export folder (``out_dir``).
    """
    api = hub_preflight(push_to)[0] if push_to else None
    ref = str(checkpoint)
    if Path(ref).is_dir() and (Path(ref) / CONFIG_NAME).is_file():
        ref = f"local-dir:{ref}"  # an existing export (or any open_clip folder): re-export it
    if is_model_ref(ref, pretrained):
        if weights != "model":
            raise ExportError(f"--ema needs a run dir or a training checkpoint, not the open_clip model {ref!r}")
        src = load_open_clip_model(ref, pretrained)
    elif Path(ref).exists():
        src = load_training_checkpoint(ref, which, weights)
    else:
        raise ExportError(f"{ref!r} is neither an existing run dir/checkpoint file nor an open_clip model "
                          "reference; pass a run dir, a checkpoint file, hf-hub:ORG/NAME, local-dir:PATH, "
                          "NAME:PRETRAINED_TAG or NAME --pretrained TAG_OR_FILE")
    metrics_step: int | None = src.step
    if metrics is None:
        metrics, metrics_step = latest_metrics(src.run_dir, src.step)
        if src.weights_note:
            metrics = None  # the run's evaluations scored its trained weights, not these
    return write_export(src, out_dir, overwrite=overwrite, push_to=push_to, metrics=metrics,
                        metrics_step=metrics_step, license=license, verify=verify, api=api, private=private)


def write_export(src: ExportSource, out_dir: str | os.PathLike, *, overwrite: bool = False,
                 push_to: str | None = None, private: bool = True, metrics: dict[str, Any] | None = None,
                 metrics_step: int | None = None, license: str = "apache-2.0", verify: bool = True,
                 api: Any = None) -> Path:
    """Write ``src`` (any weights: a checkpoint's, an interpolation, a soup) as an open_clip folder at
    ``out_dir``: built in a hidden temp dir, verified with open_clip, then renamed into place; pushed to
    ``push_to`` when given (``api`` from :func:`hub_preflight`, made here when None)."""
    out = Path(out_dir)
    if push_to and api is None:
        api = hub_preflight(push_to)[0]
    _check_out_dir(out, overwrite, [p for p in (src.run_dir, src.checkpoint_file) if p is not None])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed export of this pid; never visible as OUT_DIR
    tmp.mkdir()
    try:
        cfg = open_clip_config(src)
        tokenizer = training_tokenizer(src, cfg["model_cfg"].get("text_cfg", {}))
        cfg["model_cfg"]["text_cfg"] = write_tokenizer(tokenizer, cfg["model_cfg"].get("text_cfg", {}), tmp)
        _save_weights(src.state_dict, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        if src.card is not None:  # re-export of a folder: its card has the training details
            card = retarget_card(src.card, f"hf-hub:{push_to}" if push_to else f"local-dir:{out.resolve()}")
        else:
            card = model_card(src, cfg, metrics=metrics, metrics_step=metrics_step, repo_id=push_to,
                              out_dir=out.resolve(), license=license)
        (tmp / CARD_NAME).write_text(card)
        if verify:
            verify_export(tmp, src, tokenizer)
        _even_permissions(tmp)
        _fsync_tree(tmp)
        _commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (step %s) to %s", src.checkpoint_file or src.name, src.step, out)
    if api is not None:
        push_folder(api, out, push_to, private=private)
    return out


def load_instructions(out: Path, repo_id: str | None = None) -> str:
    """The exact open_clip lines that load an export."""
    refs = [f"local-dir:{out.resolve()}"] + ([f"hf-hub:{repo_id}"] if repo_id else [])
    lines = []
    for r in refs:
        lines += ["import open_clip", f"model, _, preprocess = open_clip.create_model_and_transforms({r!r})",
                  f"tokenizer = open_clip.get_tokenizer({r!r})", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m gcl.export`` command line."""
    p = argparse.ArgumentParser(prog="python -m gcl.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="run dir, checkpoint file, hf-hub:ORG/NAME, local-dir:PATH or NAME:TAG")
    p.add_argument("out_dir")
    p.add_argument("--which", choices=("latest", "best"), default="latest")
    p.add_argument("--pretrained", default=None, help="pretrained tag or weights file for a NAME checkpoint")
    p.add_argument("--push-to", default=None, metavar="ORG/NAME", help="Hugging Face Hub repo id to upload to")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in OUT_DIR")
    p.add_argument("--license", default="apache-2.0", help="license id for the model card header")
    p.add_argument("--no-verify", action="store_true", help="skip loading the export back for a check")
    p.add_argument("--ema", action="store_true", help="export the run's EMA weights (trained with optim.ema.decay)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    from gcl.model import WeightsUnavailableError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.private and not args.push_to:
        p.error("--private only applies with --push-to")
    try:
        out = export_model(args.checkpoint, args.out_dir, which=args.which, overwrite=args.overwrite,
                           push_to=args.push_to, private=args.private, pretrained=args.pretrained,
                           license=args.license, verify=not args.no_verify,
                           weights="ema" if args.ema else "model")
    except (ExportError, FileNotFoundError, ValueError, WeightsUnavailableError) as e:
        log.error("%s", e)
        return 1
    sys.stdout.write(f"Exported to {out}. Load it with:\n\n{load_instructions(out, args.push_to)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
