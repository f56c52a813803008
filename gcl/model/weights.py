"""Where a model's weights, config and tokenizer come from: names, weights files, the Hub, offline handling.

Lives here: registration of open_clip model configs (the package's ``gcl-tiny`` configs, registered on import,
and ``model.config_path`` files); resolving ``model.name`` / ``model.pretrained`` to a weights source and
failing fast, before any model is instantiated, when weights are neither cached nor downloadable
(:class:`WeightsUnavailableError`, with the fixes in its message); running open_clip with the Hub offline when
everything is cached; reading and loading weights files (:func:`read_state_dict`, :func:`load_weights_file`);
the model's config dict for an export; the tokenizer and its pad id; :func:`create_with_weights`, the build
step that ties these together.

Not here: which parameters train (:mod:`gcl.model.towers`), how text is encoded (:mod:`gcl.model.packing`,
:mod:`gcl.model.encoder`), the order of the build steps (:func:`gcl.model.build_model`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed
from torch import Tensor, nn

from gcl.model.lora import merge_lora_state_dict

log = logging.getLogger(__name__)

# Package data (pyproject's package-data): gcl/model_configs/*.json, beside this package, not in it.
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
HF_WEIGHTS = "open_clip_pytorch_model.bin"
HF_SAFE_WEIGHTS = "open_clip_model.safetensors"
HF_CONFIG = "open_clip_config.json"
_REACH_TIMEOUT_S = 3.0

# Names whose config gcl registered (package configs and config_path files). They get open_clip's default
# BPE tokenizer unless their text_cfg names an HF tokenizer: open_clip would otherwise pick a SigLIP
# tokenizer (a Hub download) for any name containing "siglip".
_GCL_CONFIG_NAMES: set[str] = set()
_REGISTERED_PATHS: set[Path] = set()


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights (or a Hub config/tokenizer) are not cached locally and cannot be downloaded."""


# ------------------------------------------------------------------------------------------ registration


def _register_path(path: Path) -> list[str]:
    """Add a config file or folder to open_clip's registry once; return the model names it defines."""
    path = path.resolve()
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    for f in files:
        cfg = json.loads(f.read_text())
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            # open_clip silently skips such files; a user would then see "model not found".
            raise ValueError(f"open_clip model config {f} lacks keys {missing}: it needs embed_dim, "
                             f"vision_cfg and text_cfg (see open_clip/model_configs/*.json for examples)")
    if path not in _REGISTERED_PATHS:
        open_clip.add_model_config(path)
        _REGISTERED_PATHS.add(path)
    names = [f.stem for f in files]
    _GCL_CONFIG_NAMES.update(names)
    return names


def register_model_config(config_path: str | os.PathLike) -> str:
    """Register a user open_clip model config JSON with open_clip; return its model name (the file stem)."""
    path = Path(config_path).expanduser()
    if not path.is_file() or path.suffix != ".json":
        raise FileNotFoundError(f"model.config_path={str(config_path)!r} is not an existing .json file")
    return _register_path(path)[0]


# The tiny configs are package data; registering on import makes `gcl-tiny` a normal open_clip name.
_register_path(PACKAGE_CONFIG_DIR)


# --------------------------------------------------------------------------------- weights availability


def _env_offline() -> bool:
    import huggingface_hub.constants as hc

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(hc.HF_HUB_OFFLINE)


def _reachable(url: str) -> bool:
    """Whether a TCP connection to ``url``'s host opens within a few seconds (no HTTP, no retries)."""
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname, port), timeout=_REACH_TIMEOUT_S):
            return True
    except OSError:
        return False


class _NoRandomInitWarning(logging.Filter):
    """Drops open_clip's "initialized randomly" warning: with a weights file gcl loads the file right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _quiet_random_init(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    f = _NoRandomInitWarning()
    logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


@contextlib.contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Put huggingface_hub in offline mode for the block (cached files resolve with no HTTP request).

    Without it, even a cached file triggers a metadata request that, with no network, retries for ~25 s.
    """
    if not enabled:
        yield
        return
    import huggingface_hub.constants as hc

    old, old_env = hc.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hc.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = old
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _hf_cached(repo_id: str, filename: str, cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    return hit if isinstance(hit, str) else None


def _safe_alternative(filename: str) -> str | None:
    """The .safetensors twin open_clip tries first for a .bin/.pth file on the Hub."""
    if filename == HF_WEIGHTS:
        return HF_SAFE_WEIGHTS
    if filename.endswith((".bin", ".pth")):
        return filename[:-4] + ".safetensors"
    return None


def _unavailable(what: str, reason: str, repo: str | None, filename: str | None,
                 url: str | None = None) -> WeightsUnavailableError:
    lines = [f"{what}: not in the local cache and cannot be downloaded ({reason}). Fix one of:"]
    if repo:
        target = f"{repo} {filename}" if filename else repo
        lines.append(f"  - pre-download it on a machine with network: `huggingface-cli download {target}` "
                     f"(or `hf download {target}`), then run with the same HF_HOME / HF_HUB_CACHE "
                     f"(or pass model.cache_dir=DIR and download with --cache-dir DIR)")
    if url:
        lines.append(f"  - download {url} into model.cache_dir (default ~/.cache/clip)")
    lines.append("  - pass a local weights file: model.pretrained=/path/to/weights.bin|.pt|.safetensors "
                 "(a state dict or an open_clip training checkpoint)")
    lines.append("  - or load an open_clip folder (e.g. a gcl export): model.name=local-dir:/path/to/folder")
    return WeightsUnavailableError("\n".join(lines))


@dataclass
class _Source:
    """Where the weights come from. kind: none | tag | file | hub | dir."""

    kind: str
    offline: bool = False  # run open_clip with the Hub in offline mode (everything needed is cached)
    file: str | None = None


def _offline_reason() -> str:
    return "HF_HUB_OFFLINE is set" if _env_offline() else "the download host cannot be reached"


def _resolve_source(name: str, pretrained: str | None, cache_dir: str | None) -> _Source:
    """Decide how to get the weights and fail fast when they are neither cached nor downloadable."""
    schema = "hf-hub" if name.startswith("hf-hub:") else "local-dir" if name.startswith("local-dir:") else None
    if pretrained and not (schema is None and open_clip.is_pretrained_cfg(name.replace("/", "-"), pretrained)):
        path = Path(pretrained).expanduser()
        if path.is_file():
            kind = "file"
        elif schema is None:
            tags = open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))
            raise ValueError(f"model.pretrained={pretrained!r} is neither an open_clip tag for {name!r} "
                             f"(known tags: {tags or 'none'}) nor an existing file")
        else:
            raise ValueError(f"model.pretrained={pretrained!r} is not an existing file; with "
                             f"model.name={name!r} give a weights file or set model.pretrained=null")
        # A file replaces the schema's own weights; the Hub is only needed for an hf-hub config.
        src = _Source(kind, offline=True, file=str(path))
        if schema == "hf-hub":
            src.offline = _hub_files_cached(name[len("hf-hub:"):], cache_dir, need_weights=False)
        return src

    if schema == "local-dir":
        d = Path(name[len("local-dir:"):]).expanduser()
        if not (d / HF_CONFIG).is_file():
            raise FileNotFoundError(f"model.name={name!r}: {d / HF_CONFIG} not found; a local-dir: folder "
                                    f"needs open_clip_config.json and a weights file (a gcl export has both)")
        if not any(d.glob(p) for p in ("*.safetensors", "*.bin", "*.pth")):
            # open_clip would warn and continue with random weights; that is a silent loss.
            raise FileNotFoundError(f"model.name={name!r}: no *.safetensors/*.bin/*.pth weights in {d}")
        return _Source("dir", offline=True)

    if schema == "hf-hub":
        repo = name[len("hf-hub:"):]
        return _Source("hub", offline=_hub_files_cached(repo, cache_dir, need_weights=True))

    if not pretrained:
        return _Source("none", offline=_env_offline())

    pcfg = open_clip.get_pretrained_cfg(name.replace("/", "-"), pretrained)
    what = f"Pretrained weights {name} / {pretrained}"
    if "file" in pcfg:
        return _Source("tag", offline=True)
    if pcfg.get("hf_hub"):
        repo, filename = os.path.split(pcfg["hf_hub"])
        filename = filename or HF_WEIGHTS
        candidates = [f for f in (_safe_alternative(filename), filename) if f]
        if any(_hf_cached(repo, f, cache_dir) for f in candidates):
            return _Source("tag", offline=True)
        from huggingface_hub import constants as hc

        if _env_offline() or not _reachable(hc.ENDPOINT):
            raise _unavailable(f"{what} (Hugging Face repo {repo})", _offline_reason(), repo, filename)
        return _Source("tag", offline=False)
    url = pcfg["url"]
    target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if target.is_file():
        return _Source("tag", offline=True)
    if _env_offline() or not _reachable(url):
        raise _unavailable(f"{what} ({url})", _offline_reason(), None, None, url=url)
    return _Source("tag", offline=False)


def _hub_files_cached(repo: str, cache_dir: str | None, need_weights: bool) -> bool:
    """True if the hf-hub model's config (and weights) are cached; raise if missing and not downloadable."""
    have_cfg = _hf_cached(repo, HF_CONFIG, cache_dir) is not None
    have_w = any(_hf_cached(repo, f, cache_dir) for f in (HF_SAFE_WEIGHTS, HF_WEIGHTS))
    if have_cfg and (have_w or not need_weights):
        return True
    from huggingface_hub import constants as hc

    if _env_offline() or not _reachable(hc.ENDPOINT):
        missing = HF_CONFIG if not have_cfg else HF_SAFE_WEIGHTS
        raise _unavailable(f"open_clip model hf-hub:{repo} ({missing})", _offline_reason(), repo, None)
    return False


# ---------------------------------------------------------------------------------------- weights files


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a weights file into a plain ``{name: tensor}`` dict.

    Accepts ``.safetensors``, a torch state dict, or a training checkpoint holding one under ``state_dict``
    (open_clip's trainer) or ``model`` (a sharded gcl checkpoint is read back whole); strips DDP ``module.`` and
    torch.compile ``_orig_mod.`` prefixes and merges LoRA adapters (:func:`gcl.model.lora.merge_lora_state_dict`).
    Loads with ``weights_only=True``.
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj: Any = load_file(path, device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and obj.get("sharded"):  # a trainer.fsdp_checkpoint=sharded checkpoint
        from gcl.checkpoint import load_checkpoint

        obj = load_checkpoint(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path} holds no state dict (expected a dict of tensors, or a checkpoint with one "
                         f"under 'state_dict' or 'model')")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            continue
        while k.startswith("module."):
            k = k[len("module."):]
        out[k.replace("_orig_mod.", "")] = v
    if not out:
        raise ValueError(f"{path} holds no tensors")
    return merge_lora_state_dict(out)  # a gcl checkpoint of a LoRA run: its plain (merged) weights


def load_weights_file(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a weights file into ``model`` (strict but for an absent ``logit_bias``); return the changes.

    A ``logit_bias`` in the file that the model lacks (a CLIP-family model fine-tuned with a sigmoid loss)
    is attached as a parameter. Position embeddings of another size are resized as open_clip does.
    Returns ``{"logit_bias": value}`` when it attached one, else ``{}``.
    """
    if Path(path).suffix in (".npz", ".npy"):  # big_vision SigLIP weights: open_clip's converter
        open_clip.load_checkpoint(model, str(path))
        return {}
    sd = read_state_dict(path)
    changes: dict[str, Any] = {}
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for k in ("logit_scale", "logit_bias"):
        if k in sd and getattr(model, k, None) is not None:
            sd[k] = sd[k].reshape(getattr(model, k).shape)
    if "logit_bias" in sd and getattr(model, "logit_bias", None) is None:
        model.logit_bias = nn.Parameter(torch.zeros_like(model.logit_scale))
        changes["logit_bias"] = float(sd["logit_bias"].reshape(-1)[0])
        sd["logit_bias"] = sd["logit_bias"].reshape(model.logit_scale.shape)
    try:
        resize_pos_embed(sd, model)
        resize_text_pos_embed(sd, model)
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except (RuntimeError, AssertionError) as e:  # size mismatch; open_clip's resize asserts on width
        raise RuntimeError(f"weights in {path} do not fit this model ({e}); check that model.name / "
                           f"model.config_path name the checkpoint's architecture") from e
    missing = [k for k in missing if k != "logit_bias"]  # a SigLIP-style head on CLIP weights keeps its init
    if missing or unexpected:
        raise RuntimeError(f"weights in {path} do not fit this model: {len(missing)} missing keys "
                           f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}; check that "
                           f"model.name / model.config_path name the checkpoint's architecture")
    return changes


# -------------------------------------------------------------------------------------------- tokenizer


def _build_tokenizer(name: str, model_cfg: dict, context_length: int, cache_dir: str | None) -> Callable:
    text_cfg = model_cfg.get("text_cfg", {})
    if name in _GCL_CONFIG_NAMES and not text_cfg.get("hf_tokenizer_name"):
        return open_clip.SimpleTokenizer(context_length=context_length,
                                         **(text_cfg.get("tokenizer_kwargs") or {}))
    try:
        return open_clip.get_tokenizer(name, context_length=context_length, cache_dir=cache_dir)
    except ImportError as e:
        raise RuntimeError(f"model {name!r} uses a Hugging Face tokenizer "
                           f"({text_cfg.get('hf_tokenizer_name')!r}), which needs the `transformers` "
                           f"package: pip install transformers sentencepiece") from e
    except OSError as e:
        hf_name = text_cfg.get("hf_tokenizer_name") or name
        raise _unavailable(f"The tokenizer of {name!r} ({hf_name})", f"{type(e).__name__}: {e}",
                           hf_name, None) from e


def tokenizer_pad_id(tokenizer: Any) -> int:
    """The id the tokenizer pads rows with (0 for open_clip's BPE tokenizer)."""
    if isinstance(tokenizer, open_clip.SimpleTokenizer):
        return 0
    pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None)
    return int(pad) if pad is not None else 0


# ------------------------------------------------------------------------------------ creating the model


def _model_cfg(name: str, cache_dir: str | None) -> dict:
    if name.startswith("local-dir:"):
        cfg = json.loads((Path(name[len("local-dir:"):]).expanduser() / HF_CONFIG).read_text())
        return cfg.get("model_cfg", cfg)
    if name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        cfg = json.loads(Path(hf_hub_download(name[len("hf-hub:"):], HF_CONFIG, cache_dir=cache_dir)).read_text())
        return cfg.get("model_cfg", cfg)
    return open_clip.get_model_config(name.replace("/", "-"))


def create_with_weights(name: str, pretrained: str | None, *, precision: str, device: str | torch.device,
                        cache_dir: str | None) -> tuple[nn.Module, dict, Callable]:
    """Resolve the weights source, instantiate the open_clip model with its weights; return it, its
    config dict (what an export needs) and its tokenizer.

    Fails fast with :class:`WeightsUnavailableError` before instantiating anything when the weights are
    neither cached nor downloadable; runs open_clip with the Hub offline when everything is cached.
    """
    src = _resolve_source(name, pretrained, cache_dir)
    tag = pretrained if src.kind == "tag" else None
    with _hub_offline(src.offline), _quiet_random_init(src.kind == "file"):
        try:
            model = open_clip.create_model(
                name, pretrained=tag, load_weights=src.kind in ("tag", "hub", "dir"), precision=precision,
                device=device, cache_dir=cache_dir, pretrained_text=src.kind == "none",
            )
        except AttributeError as e:
            if precision == "fp32":
                raise
            # open_clip's low-precision cast fails on a native ViT + Linear text projection (proj_bias).
            raise ValueError(f"open_clip cannot cast {name!r} to {precision} ({e}); use model.precision=fp32 "
                             f"with trainer.mixed_precision={precision.replace('pure_', '')}") from e
        if src.kind == "hub" and not src.offline:
            # open_clip continues with random weights when the Hub weights download fails; refuse that.
            repo = name[len("hf-hub:"):]
            if not any(_hf_cached(repo, f, cache_dir) for f in (HF_SAFE_WEIGHTS, HF_WEIGHTS)):
                raise _unavailable(f"Weights of {name}", "download failed", repo, None)
        model_cfg = _model_cfg(name, cache_dir)
        tokenizer = _build_tokenizer(name, model_cfg, model.context_length, cache_dir)
    if src.kind == "file":
        changes = load_weights_file(model, src.file)
        if "logit_bias" in changes:
            model_cfg["init_logit_bias"] = changes["logit_bias"]
        log.info("loaded weights from %s", src.file)
    return model, model_cfg, tokenizer
