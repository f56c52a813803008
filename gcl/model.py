"""Build the open_clip model (weights, tower locks, checkpointing, precision) and encode a batch's fields.

Two public entry points:

* :func:`build_model` -> :class:`ModelBundle`: any open_clip model name (``ViT-B-16``, ``hf-hub:org/repo``,
  ``local-dir:PATH``, a config registered from ``config_path=FILE.json``, or the package's tiny configs
  ``gcl-tiny`` / ``gcl-tiny-siglip``), ``pretrained`` as an open_clip tag or a weights file.
* :class:`FieldEncoder`: turns a batch (see docs/architecture.md) into unnormalized features per field,
  encoding every distinct token row of all text fields once, at its real length when the text tower allows.

Weights that are not cached never cause a long hang: availability is checked before the model is built,
and a missing file fails at once with a message that names the fixes (pre-download, a local file,
``local-dir:``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, text_global_pool
from torch import Tensor, nn

from gcl.config import TEXT_PACKING

log = logging.getLogger(__name__)

IMAGE = "image"
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
PRECISIONS = ("fp32", "bf16", "fp16", "pure_bf16", "pure_fp16")
HF_WEIGHTS = "open_clip_pytorch_model.bin"
HF_SAFE_WEIGHTS = "open_clip_model.safetensors"
HF_CONFIG = "open_clip_config.json"
# Probe strings for the real-length and packing checks: one very short, one long, one in between, and rows
# that share prefixes with them (prefix-shared packing encodes a shared prefix once).
_PROBE_TEXTS = (
    "a",
    "red cotton midi dress with long sleeves, a round neck, a button front and two side pockets",
    "black leather ankle boots",
    "red cotton midi dress",
    "black leather belt",
)
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
    (open_clip's trainer) or ``model``; strips DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes.
    Loads with ``weights_only=True``.
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj: Any = load_file(path, device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
    return out


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


# --------------------------------------------------------------------------------------------- locking


def _text_root_and_params(model: nn.Module) -> tuple[nn.Module | None, list[tuple[str, Any]]]:
    """The text tower's parts in forward order, for the CLIP class (parts on the model) or CustomTextCLIP."""
    text = getattr(model, "text", None)
    if text is not None:
        if not isinstance(text, TextTransformer):
            return text, []
        root = text
    else:
        root = model
    names = ("token_embedding", "positional_embedding", "cls_emb", "transformer", "ln_final", "text_projection")
    return root, [(n, getattr(root, n)) for n in names if getattr(root, n, None) is not None]


def _params(x: Any) -> list[nn.Parameter]:
    return [x] if isinstance(x, nn.Parameter) else list(x.parameters())


def _lock_text(model: nn.Module, unlocked_layers: int, freeze_layer_norm: bool) -> None:
    """Freeze the text tower but its last ``unlocked_layers`` groups; optionally keep LayerNorms trainable.

    Groups, first to last: embeddings, each transformer block but the last, (last block + final LayerNorm),
    projection - the grouping open_clip uses. Unlike open_clip's native lock this also supports
    ``freeze_layer_norm=False`` (every LayerNorm in the tower stays trainable, as HF towers do).
    """
    root, parts = _text_root_and_params(model)
    if not parts:
        if root is not None and hasattr(root, "lock"):  # HF text towers implement both flags themselves
            root.lock(unlocked_layers=unlocked_layers, freeze_layer_norm=freeze_layer_norm)
            return
        raise NotImplementedError(f"cannot lock the text tower of {type(model).__name__} "
                                  f"({type(root).__name__}); set model.lock_text=false")
    p = dict(parts)
    for _, x in parts:
        for q in _params(x):
            q.requires_grad = False
    blocks = list(p["transformer"].resblocks)
    groups: list[list[Any]] = [[p[k] for k in ("token_embedding", "positional_embedding", "cls_emb") if k in p]]
    groups += [[b] for b in blocks[:-1]]
    groups.append([blocks[-1]] + ([p["ln_final"]] if "ln_final" in p else []))
    if "text_projection" in p:
        groups.append([p["text_projection"]])
    for g in groups[len(groups) - min(unlocked_layers, len(groups)):] if unlocked_layers else []:
        for x in g:
            for q in _params(x):
                q.requires_grad = True
    if not freeze_layer_norm:
        for _, x in parts:
            if isinstance(x, nn.Module):
                for m in x.modules():
                    if isinstance(m, nn.LayerNorm):
                        for q in m.parameters():
                            q.requires_grad = True


def lock_towers(model: nn.Module, *, lock_image: bool = False, lock_image_unlocked_groups: int = 0,
                lock_image_freeze_bn: bool = True, lock_text: bool = False, lock_text_unlocked_layers: int = 0,
                lock_text_freeze_layer_norm: bool = True) -> None:
    """Freeze towers in place (LiT-style). Unlocked counts are ignored for a tower that is not locked.

    Image: open_clip's ``lock_image_tower`` (groups: embeddings, blocks, last block + post-norm, projection;
    BatchNorm statistics frozen when ``lock_image_freeze_bn`` for CNN/timm towers). Text: see ``_lock_text``.
    ``logit_scale`` / ``logit_bias`` stay trainable.
    """
    for key, n in (("lock_image_unlocked_groups", lock_image_unlocked_groups),
                   ("lock_text_unlocked_layers", lock_text_unlocked_layers)):
        if n < 0:
            raise ValueError(f"model.{key} must be >= 0, got {n}")
    if lock_image:
        model.lock_image_tower(unlocked_groups=lock_image_unlocked_groups, freeze_bn_stats=lock_image_freeze_bn)
    if lock_text:
        _lock_text(model, lock_text_unlocked_layers, lock_text_freeze_layer_norm)


# ------------------------------------------------------------------------------------- text tower views


@dataclass
class _NativeText:
    """References to a native open_clip text tower's parts (no copies), for a forward at any length."""

    token_embedding: nn.Module
    positional_embedding: Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Any
    attn_mask: Tensor | None
    pool_type: str
    eos_id: int | None


def _native_text(model: nn.Module) -> _NativeText | None:
    text = getattr(model, "text", None)
    if text is None and hasattr(model, "token_embedding"):  # CLIP class: text parts live on the model
        return _NativeText(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                           model.text_projection, model.attn_mask, model.text_pool_type,
                           getattr(model, "text_eos_id", None))
    if isinstance(text, TextTransformer) and text.cls_emb is None and not text.use_pad_mask:
        return _NativeText(text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
                           text.text_projection, text.attn_mask, text.pool_type, text.eos_id)
    return None  # HF towers, CoCa-style class tokens, pad masks: encode with open_clip at fixed length


def _is_causal(mask: Tensor | None) -> bool:
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    above = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.equal(torch.isneginf(mask), above) and (mask[~above] == 0).all())


def real_length_structure(model: nn.Module) -> bool:
    """Whether the text tower's output provably ignores tokens after the pooled one.

    True for a native tower with a causal attention mask that pools at the EOT token (``argmax`` or
    ``eos``): position i only attends to positions <= i, so trimming trailing tokens after the pooled
    position cannot change the output. SigLIP-style towers (no mask, ``last`` pooling over padding) are False.
    """
    parts = _native_text(model)
    return parts is not None and _is_causal(parts.attn_mask) and parts.pool_type in ("argmax", "eos")


def _pool_positions(tokens: Tensor, pool_type: str, eos_id: int | None) -> Tensor:
    """Index of the pooled token per row (LongTensor[N]); real length = position + 1."""
    if pool_type == "argmax":
        return tokens.argmax(dim=1)
    # First EOS; a row without one pools position 0, as open_clip's text_global_pool(..., "eos") does.
    return (tokens == eos_id).int().argmax(dim=1)


def _forward_native(parts: _NativeText, tokens: Tensor, embedded: Tensor | None = None) -> Tensor:
    """Text tower forward at the tokens' own length L (LongTensor[N, L] -> [N, D]).

    open_clip's ``CLIP.encode_text`` adds the full positional embedding and full causal mask, so it only
    accepts full-context rows; this slices both to L (valid for causal towers, see real_length_structure).
    ``embedded``: the rows' token embeddings [N, L, W] when already looked up.
    """
    n_ctx = tokens.shape[1]
    cast = parts.transformer.get_cast_dtype()
    if embedded is None:
        embedded = parts.token_embedding(tokens)
    x = embedded.to(cast) + parts.positional_embedding[:n_ctx].to(cast)
    mask = parts.attn_mask[:n_ctx, :n_ctx] if parts.attn_mask is not None else None
    x = parts.transformer(x, attn_mask=mask)
    x = parts.ln_final(x)
    x = text_global_pool(x, tokens, parts.pool_type, eos_token_id=parts.eos_id)
    proj = parts.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


@dataclass
class PackPlan:
    """Prefix-shared packing of token rows into ``S`` sequences of ``C`` slots (see :func:`plan_prefix_packing`)."""

    tokens: Tensor  # LongTensor[S, C]: the token of each slot (pad_id in unused slots)
    positions: Tensor  # LongTensor[S, C]: each slot's depth in its row, the positional-embedding index
    allowed: Tensor  # BoolTensor[S, C, C]: allowed[s, i, j] = slot j is slot i or one of its ancestors
    pooled: Tensor  # LongTensor[U]: flat slot (s * C + i) of each row's pooled (last) token
    nodes: int  # slots holding a token; the rest are padding


def _greedy_fill(lengths: list[int], lcp: list[int], capacity: int) -> tuple[list[int], list[int], list[int]]:
    """Next-fit of rows into sequences of ``capacity`` slots; a row shares its prefix with the row before it
    when both are in the same sequence. Returns per row (sequence, first new slot, shared prefix length)."""
    seq, start, shared = [], [], []
    s, fill = -1, capacity
    for r, n in enumerate(lengths):
        p = lcp[r] if r else 0
        if fill + n - p > capacity:
            s, fill, p = s + 1, 0, 0
        seq.append(s)
        start.append(fill)
        shared.append(p)
        fill += n - p
    return seq, start, shared


def plan_prefix_packing(rows: Tensor, lengths: Tensor, width: int, pad_id: int = 0, heads: int = 1,
                        max_mask_bytes: int = 1 << 28) -> PackPlan:
    """Pack token rows for a causal text tower so that every distinct prefix is computed once.

    Under a causal mask, the hidden state of a token depends only on the tokens before it, so rows that
    start with the same tokens (every row's start token; "red cotton ..." and "red cotton dress") share
    those positions' states exactly. Rows are taken in lexicographic order, so a row's longest common
    prefix with any earlier row of its sequence is its prefix with the row just before it; the row then
    adds only its remaining tokens as new slots. Each slot attends to itself and its ancestors (the
    ``allowed`` mask) and keeps its depth as its position, so every row sees exactly the keys, values and
    positions it would see alone: the pooled outputs equal per-row encoding up to float reduction order.

    The sequence capacity ``C`` (>= the longest row) is chosen among a few multiples of the longest row to
    minimise ``slots * (1 + C / (6 * width))``: slots are the per-token matmul work (``12 * width**2``
    multiply-adds per layer), and ``2 * C * width`` is one slot's attention work. Capacities whose additive
    attention mask (``S * heads * C * C`` floats) would exceed ``max_mask_bytes`` are skipped, except the
    smallest.

    rows: LongTensor[U, W], distinct rows, trailing padding allowed; lengths: LongTensor[U] real lengths
    (pooled position + 1).
    """
    u = rows.detach().cpu().numpy()
    n = lengths.detach().cpu().numpy().astype(np.int64)
    if u.ndim != 2 or len(u) == 0 or len(n) != len(u) or n.min() < 1:
        raise ValueError(f"expected non-empty rows [U, W] with lengths >= 1, got {u.shape} / {n.shape}")
    order = np.lexsort(u[:, ::-1].T)  # lexicographic: column 0 is the primary key
    u, n = u[order], n[order]
    depth = int(n.max())
    lcp = np.zeros(len(u), dtype=np.int64)
    if len(u) > 1:
        lcp[1:] = np.cumprod(u[1:, :depth] == u[:-1, :depth], axis=1).sum(axis=1)
        # Share only positions both rows have, and leave each row >= 1 own slot (its pooled token).
        lcp[1:] = np.minimum(lcp[1:], np.minimum(n[1:] - 1, n[:-1]))
    n_list, lcp_list = n.tolist(), lcp.tolist()
    best = None
    for c in sorted({depth, *(-(-depth * k // 16) * 8 for k in (3, 4, 6, 8))}):  # 1x, 1.5x, 2x, 3x, 4x
        fill = _greedy_fill(n_list, lcp_list, c)
        slots = (fill[0][-1] + 1) * c
        if best is not None and slots * heads * c * 4 > max_mask_bytes:
            break
        cost = slots * (1 + c / (6 * width))
        if best is None or cost < best[0]:
            best = (cost, c, fill)
    _, cap, (seq_l, start_l, shared_l) = best
    seq, start, shared = (np.asarray(x, dtype=np.int64) for x in (seq_l, start_l, shared_l))
    n_seq = int(seq[-1]) + 1

    # path[r, d]: slot (within its sequence) of row r's token at depth d. The slot was created by the
    # latest row r' <= r with shared[r'] <= d; sequence starts have shared = 0, so r' is in r's sequence.
    idx_rows = np.arange(len(u))
    path = np.empty((len(u), depth), dtype=np.int64)
    for d in range(depth):
        creator = np.maximum.accumulate(np.where(shared <= d, idx_rows, 0))
        path[:, d] = start[creator] + d - shared[creator]

    ri, di = np.nonzero((np.arange(depth)[None, :] >= shared[:, None]) & (np.arange(depth)[None, :] < n[:, None]))
    flat = seq[ri] * cap + path[ri, di]
    tokens = np.full(n_seq * cap, pad_id, dtype=np.int64)
    positions = np.zeros(n_seq * cap, dtype=np.int64)
    tokens[flat] = u[ri, di]
    positions[flat] = di
    allowed = np.zeros((n_seq * cap, cap), dtype=bool)
    allowed[np.arange(n_seq * cap), np.arange(n_seq * cap) % cap] = True  # padding slots see only themselves
    node, e = np.nonzero(np.arange(depth)[None, :] <= di[:, None])
    allowed[flat[node], path[ri[node], e]] = True
    pooled = np.empty(len(u), dtype=np.int64)
    pooled[order] = seq * cap + path[idx_rows, n - 1]
    device = rows.device
    return PackPlan(tokens=torch.from_numpy(tokens).view(n_seq, cap).to(device),
                    positions=torch.from_numpy(positions).view(n_seq, cap).to(device),
                    allowed=torch.from_numpy(allowed).view(n_seq, cap, cap).to(device),
                    pooled=torch.from_numpy(pooled).to(device), nodes=len(flat))


def _packable(parts: _NativeText) -> bool:
    """Whether every block of the tower takes a per-sequence [N * heads, L, L] attention mask (open_clip's
    ResidualAttentionBlock over ``nn.MultiheadAttention``)."""
    blocks = getattr(parts.transformer, "resblocks", None)
    return bool(blocks) and all(isinstance(b, ResidualAttentionBlock) and isinstance(b.attn, nn.MultiheadAttention)
                                and not hasattr(b, "ln_1_kv") for b in blocks)


def _forward_packed(parts: _NativeText, plan: PackPlan) -> Tensor:
    """Text tower forward over a :class:`PackPlan` -> FloatTensor[U, D], one pooled row per packed row."""
    cast = parts.transformer.get_cast_dtype()
    embedded = parts.token_embedding(plan.tokens)
    # F.embedding, not indexing: its CPU backward sums repeated positions in a fixed order (indexing's
    # backward uses atomic adds there, so resumed and uninterrupted runs would drift apart by ~1e-6).
    x = embedded.to(cast) + F.embedding(plan.positions, parts.positional_embedding).to(cast)
    heads = parts.transformer.resblocks[0].attn.num_heads
    mask = torch.zeros(plan.allowed.shape, dtype=cast, device=x.device).masked_fill_(~plan.allowed, float("-inf"))
    x = parts.transformer(x, attn_mask=mask.repeat_interleave(heads, dim=0))
    x = parts.ln_final(x.reshape(-1, x.shape[-1])[plan.pooled])
    proj = parts.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


# Fixed cost of one more text-tower pass, in tokens of work. CPU: a pass costs ~1 ms of Python/dispatch
# while one ViT-B text token (forward + backward) costs ~1-3 ms, so splitting almost always pays. CUDA: a pass
# is ~500 kernel launches (~2-3 ms) while thousands of tokens run in that time at small batch.
PASS_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 2048}


def plan_length_buckets(lengths: Tensor, max_passes: int = 8, pass_overhead_tokens: int = 1024) -> list[int]:
    """Split rows by real length into at most ``max_passes`` text-tower passes; return ascending max lengths.

    Rule: minimise ``sum_p rows_p * len_p + pass_overhead_tokens * passes`` (padded tokens processed plus a
    fixed per-pass cost in token equivalents), where a pass runs at its longest row's length ``len_p``. The
    cost is linear in tokens because at L <= 77 the per-token MLP/projection work dominates attention.
    Exact dynamic programme over the distinct lengths (at most context_length of them).
    """
    vals, counts = torch.unique(lengths.cpu(), return_counts=True)
    v, c = vals.tolist(), counts.tolist()
    n = len(v)
    pre = [0]
    for x in c:
        pre.append(pre[-1] + x)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(max_passes + 1)]
    arg = [[0] * (n + 1) for _ in range(max_passes + 1)]
    best[0][0] = 0.0
    for k in range(1, max_passes + 1):
        for j in range(1, n + 1):
            for i in range(j):
                cost = best[k - 1][i] + (pre[j] - pre[i]) * v[j - 1] + pass_overhead_tokens
                if cost < best[k][j]:
                    best[k][j], arg[k][j] = cost, i
    k = min(range(1, max_passes + 1), key=lambda kk: best[kk][n])
    bounds, j = [], n
    while j > 0:
        bounds.append(v[j - 1])
        j, k = arg[k][j], k - 1
    return bounds[::-1]


# ------------------------------------------------------------------------------------------ field encoder


class FieldEncoder(nn.Module):
    """Encode a batch's image and text fields with one model; text rows deduplicated, at real length.

    ``forward(batch, fields) -> {field: FloatTensor[B, D]}``: unnormalized tower outputs in float32, zero rows
    where ``batch["present"][field]`` is False. The model is a registered submodule, so wrapping this module in
    DistributedDataParallel covers both towers (pass the unwrapped model here).

    Text passes: the present rows of all requested fields are padded to a common width, deduplicated with
    ``torch.unique`` over rows (identical strings in different fields or samples are encoded once; gradients
    from every use add up through the gather), then encoded:

    * ``real_length=True`` (causal tower, EOT pooling, verified at build): each unique row runs at its real
      length (up to its EOT). ``text_packing="prefix"`` packs the rows into a few sequences in which every
      distinct prefix is one slot (see :func:`plan_prefix_packing`): one pass, no padding between rows, shared
      prefixes computed once. ``"buckets"`` groups rows by length into at most ``max_passes`` padded passes
      (see :func:`plan_length_buckets`; ``pass_overhead_tokens`` defaults to ``PASS_OVERHEAD_TOKENS`` of the
      model's device type). ``"auto"`` is prefix packing when every text block takes a per-sequence mask
      (open_clip's ``ResidualAttentionBlock``), else buckets. A packed pass whose attention mask
      (``S * heads * C * C`` floats) would exceed ``max_mask_bytes`` (256 MiB) is split in two;
    * ``real_length=False`` (SigLIP-like towers): rows are padded with ``pad_id`` back to ``context_length``
      and encoded by ``model.encode_text`` in one pass, exactly as the model was trained.
    """

    def __init__(self, model: nn.Module, real_length: bool, pad_id: int, context_length: int,
                 max_passes: int = 8, pass_overhead_tokens: int | None = None, text_packing: str = "auto",
                 max_mask_bytes: int = 1 << 28) -> None:
        super().__init__()
        self.model = model
        self.real_length = bool(real_length)
        self.pad_id = int(pad_id)
        self.context_length = int(context_length)
        self.max_passes = max_passes
        self.pass_overhead_tokens = pass_overhead_tokens
        self.max_mask_bytes = int(max_mask_bytes)
        if text_packing not in TEXT_PACKING:
            raise ValueError(f"text_packing={text_packing!r} is not one of {TEXT_PACKING}")
        parts = _native_text(model)
        if self.real_length and parts is None:
            raise ValueError("real_length=True needs a native open_clip text tower (CLIP or TextTransformer)")
        packable = self.real_length and _packable(parts)
        if text_packing == "prefix" and not packable:
            raise ValueError("text_packing='prefix' needs a real-length causal text tower built from open_clip "
                             "ResidualAttentionBlocks; use text_packing='auto' or 'buckets'")
        self.text_packing = "prefix" if packable and text_packing != "buckets" else "buckets"
        self._embed_dim: int | None = None
        self.last_passes = 0  # text-tower passes of the last call (for tests and logging)
        self.last_unique_rows = 0
        self.last_text_slots = 0  # token positions the text tower ran over in the last call, padding included

    # -- images
    def _image_dtype(self) -> torch.dtype:
        for m in self.model.visual.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                return m.weight.dtype
        return torch.float32

    def encode_image(self, images: Tensor) -> Tensor:
        """FloatTensor[B, 3, H, W] -> FloatTensor[B, D] (float32, unnormalized)."""
        return self.model.encode_image(images.to(self._image_dtype())).float()

    # -- text
    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Encode rows LongTensor[N, L] (L <= context_length; trailing pad allowed) -> FloatTensor[N, D].

        Deduplicates rows; each unique row is encoded once.
        """
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ValueError(f"expected a non-empty LongTensor[N, L], got shape {tuple(tokens.shape)}")
        uniq, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        self.last_unique_rows = uniq.shape[0]
        return self._encode_unique(uniq)[inverse]

    def _encode_unique(self, uniq: Tensor) -> Tensor:
        if uniq.shape[1] > self.context_length:
            raise ValueError(f"token rows of length {uniq.shape[1]} exceed the model's context length "
                             f"{self.context_length}; lower data.context_length for that field")
        if not self.real_length:
            self.last_passes = 1
            full = F.pad(uniq, (0, self.context_length - uniq.shape[1]), value=self.pad_id)
            self.last_text_slots = full.numel()
            return self.model.encode_text(full).float()
        parts = _native_text(self.model)
        lengths = _pool_positions(uniq, parts.pool_type, parts.eos_id) + 1
        if self.text_packing == "prefix":
            self.last_passes = self.last_text_slots = 0
            return self._encode_packed(parts, uniq, lengths)
        overhead = self.pass_overhead_tokens
        if overhead is None:
            overhead = PASS_OVERHEAD_TOKENS.get(uniq.device.type, PASS_OVERHEAD_TOKENS["cuda"])
        bounds = plan_length_buckets(lengths, self.max_passes, overhead)
        self.last_passes = len(bounds)
        self.last_text_slots = 0
        # One embedding lookup for all rows: its backward then builds the dense [vocab, width] gradient once
        # instead of once per pass.
        emb = parts.token_embedding(uniq[:, : bounds[-1]])
        outs, order, lo = [], [], 0
        for hi in bounds:
            idx = torch.nonzero((lengths > lo) & (lengths <= hi)).squeeze(1)
            self.last_text_slots += idx.numel() * hi
            outs.append(_forward_native(parts, uniq[idx, :hi], emb[idx, :hi]).float())
            order.append(idx)
            lo = hi
        order_t = torch.cat(order)
        inv = torch.empty_like(order_t)
        inv[order_t] = torch.arange(order_t.numel(), device=order_t.device)
        return torch.cat(outs)[inv]

    def _encode_packed(self, parts: _NativeText, uniq: Tensor, lengths: Tensor) -> Tensor:
        """Prefix-packed pass(es): rows (sorted, as ``torch.unique`` returns them, so halves keep most shared
        prefixes) are split in halves while one pass's attention mask would exceed ``max_mask_bytes``."""
        heads = parts.transformer.resblocks[0].attn.num_heads
        plan = plan_prefix_packing(uniq, lengths, parts.transformer.width, self.pad_id, heads=heads,
                                   max_mask_bytes=self.max_mask_bytes)
        if plan.allowed.numel() * heads * 4 > self.max_mask_bytes and uniq.shape[0] > 1:
            h = uniq.shape[0] // 2
            return torch.cat([self._encode_packed(parts, uniq[:h], lengths[:h]),
                              self._encode_packed(parts, uniq[h:], lengths[h:])])
        self.last_passes += 1
        self.last_text_slots += plan.tokens.numel()
        return _forward_packed(parts, plan).float()

    def _zero_rows(self, batch_size: int, device: torch.device) -> Tensor:
        if self._embed_dim is None:
            with torch.no_grad():
                probe = torch.full((1, 2), self.pad_id, dtype=torch.long, device=device)
                self._embed_dim = self.encode_tokens(probe).shape[1]
        return torch.zeros(batch_size, self._embed_dim, device=device)

    def encode_text_fields(self, tokens: Mapping[str, Tensor], present: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Encode several text fields together.

        tokens: {field: LongTensor[B, L_f]}; present: {field: BoolTensor[B]} (False rows are not encoded).
        Returns {field: FloatTensor[B, D]} with zero rows where not present.
        """
        names = list(tokens)
        if not names:
            return {}
        b = tokens[names[0]].shape[0]
        device = tokens[names[0]].device
        width = max(tokens[f].shape[1] for f in names)
        rows, counts, masks = [], [], []
        for f in names:
            t, m = tokens[f], present[f].to(torch.bool)
            if t.shape[0] != b or m.shape != (b,):
                raise ValueError(f"field {f!r}: tokens {tuple(t.shape)} / present {tuple(m.shape)} do not match "
                                 f"batch size {b}")
            rows.append(F.pad(t[m], (0, width - t.shape[1]), value=self.pad_id))
            counts.append(int(m.sum()))
            masks.append(m)
        all_rows = torch.cat(rows)
        if all_rows.shape[0] == 0:
            self.last_passes = self.last_unique_rows = 0
            zeros = self._zero_rows(b, device)
            return {f: zeros.clone() for f in names}
        uniq, inverse = torch.unique(all_rows, dim=0, return_inverse=True)
        self.last_unique_rows = uniq.shape[0]
        enc = self._encode_unique(uniq)
        self._embed_dim = enc.shape[1]
        # Row 0 of the table is the zero vector for missing values; one gather per field scatters back.
        table = torch.cat([enc.new_zeros(1, enc.shape[1]), enc])
        out, start = {}, 0
        for f, m, n in zip(names, masks, counts):
            idx = torch.zeros(b, dtype=torch.long, device=device)
            idx[m] = inverse[start:start + n] + 1
            out[f] = table[idx]
            start += n
        return out

    def forward(self, batch: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Tensor]:
        """Features for ``fields`` (``"image"`` and/or text field names) of a batch dict."""
        fields = list(dict.fromkeys(fields))
        out: dict[str, Tensor] = {}
        text = [f for f in fields if f != IMAGE]
        missing = [f for f in text if f not in batch["tokens"]]
        if missing:
            raise KeyError(f"fields {missing} are not in the batch (has {sorted(batch['tokens'])}); check the "
                           f"loss/eval field names against the data")
        if IMAGE in fields:
            img = self.encode_image(batch["image"])
            mask = batch.get("present", {}).get(IMAGE)
            out[IMAGE] = img if mask is None or bool(mask.all()) else img * mask[:, None].to(img.dtype)
        out.update(self.encode_text_fields({f: batch["tokens"][f] for f in text},
                                           {f: batch["present"][f] for f in text}))
        return out


# --------------------------------------------------------------------------------------------- building


@dataclass
class ModelBundle:
    """Everything built for one model. ``model_cfg`` / ``preprocess_cfg`` are what an open_clip export needs."""

    model: nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    context_length: int
    pad_id: int
    real_length: bool
    name: str
    pretrained: str | None
    model_cfg: dict = field(default_factory=dict)
    preprocess_cfg: dict = field(default_factory=dict)
    text_packing: str = "buckets"  # verified at build: "prefix" or "buckets" (see FieldEncoder)

    def field_encoder(self, **kwargs: Any) -> FieldEncoder:
        """A :class:`FieldEncoder` for this model, tokenizer padding, real-length and packing decisions."""
        kwargs.setdefault("text_packing", self.text_packing)
        return FieldEncoder(self.model, self.real_length, self.pad_id, self.context_length, **kwargs)


def _model_cfg(name: str, cache_dir: str | None) -> dict:
    if name.startswith("local-dir:"):
        cfg = json.loads((Path(name[len("local-dir:"):]).expanduser() / HF_CONFIG).read_text())
        return cfg.get("model_cfg", cfg)
    if name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        cfg = json.loads(Path(hf_hub_download(name[len("hf-hub:"):], HF_CONFIG, cache_dir=cache_dir)).read_text())
        return cfg.get("model_cfg", cfg)
    return open_clip.get_model_config(name.replace("/", "-"))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, t in flags.items():
            m.training = t


def verify_real_length(model: nn.Module, tokenizer: Callable, pad_id: int, context_length: int,
                       packings: Iterable[str] = ("buckets",)) -> dict[str, tuple[bool, float]]:
    """Check empirically that real-length encoding equals open_clip's full-context ``encode_text``.

    Encodes probe strings at full context with the model's own ``encode_text`` (once) and with the
    real-length encoder in each of ``packings`` (``buckets``: rows trimmed and bucketed; ``prefix``:
    prefix-packed). Returns {packing: (ok, max abs difference)}; tolerance 1e-5 in fp32, and 2e-2 x the
    feature scale for bf16/fp16 towers (different sequence lengths change reduction order).
    """
    full = tokenizer(list(_PROBE_TEXTS), context_length=context_length)
    full = full.to(next(model.parameters()).device)
    cast = _native_text(model).transformer.get_cast_dtype()
    out = {}
    with torch.no_grad(), _eval_mode(model):
        ref = model.encode_text(full).float()
        tol = 1e-5 if cast == torch.float32 else 2e-2 * max(1.0, float(ref.abs().max()))
        for packing in packings:
            enc = FieldEncoder(model, True, pad_id, context_length, pass_overhead_tokens=0, text_packing=packing)
            diff = float((ref - enc.encode_tokens(full)).abs().max())
            out[packing] = (diff <= tol, diff)
    return out


def build_model(name: str, pretrained: str | None = None, *, config_path: str | None = None,
                precision: str = "fp32", device: str | torch.device = "cpu", lock_image: bool = False,
                lock_image_unlocked_groups: int = 0, lock_image_freeze_bn: bool = True, lock_text: bool = False,
                lock_text_unlocked_layers: int = 0, lock_text_freeze_layer_norm: bool = True,
                grad_checkpointing: bool = False, compile: bool = False, logit_bias_init: float | None = None,
                cache_dir: str | None = None, text_packing: str = "auto") -> ModelBundle:
    """Build an open_clip model with its transforms and tokenizer, ready for GCL fine-tuning.

    Args:
        name: open_clip model name (``ViT-B-16``), ``hf-hub:org/repo``, ``local-dir:PATH``, ``gcl-tiny``,
            ``gcl-tiny-siglip``, or the stem of ``config_path``.
        pretrained: open_clip tag (``laion2b_s34b_b88k``) or a weights file (state dict, ``.safetensors``,
            open_clip training checkpoint with ``state_dict`` / ``module.`` prefixes). With an ``hf-hub:`` or
            ``local-dir:`` name, a file here replaces that source's weights.
        config_path: an open_clip model config JSON to register first; ``name`` must be its file stem.
        precision: weights precision passed to open_clip (fp32 | bf16 | fp16 | pure_bf16 | pure_fp16).
        lock_*: see :func:`lock_towers`.
        grad_checkpointing: activation checkpointing in both towers.
        compile: ``torch.compile`` the image tower and the text transformer in place (state-dict keys unchanged).
        logit_bias_init: if not None and the model has no ``logit_bias`` (CLIP family), attach a learnable one
            with this value after loading weights - pass it only for a sigmoid loss.
        cache_dir: download cache (open_clip's ``cache_dir``: the Hub cache or ~/.cache/clip for URL tags).
        text_packing: ``auto`` (prefix-shared packing when the text tower supports it and a probe confirms it
            matches ``encode_text``, else length buckets), ``prefix`` (required; error otherwise), or
            ``buckets``. See :class:`FieldEncoder`.

    Raises:
        WeightsUnavailableError: weights not cached and not downloadable (offline) - at once, before any
            model is instantiated, with the fixes in the message.
    """
    t0 = time.perf_counter()
    if precision not in PRECISIONS:
        raise ValueError(f"model.precision={precision!r} is not one of {PRECISIONS}")
    if text_packing not in TEXT_PACKING:
        raise ValueError(f"model.text_packing={text_packing!r} is not one of {TEXT_PACKING}")
    if config_path:
        stem = register_model_config(config_path)
        if name != stem:
            raise ValueError(f"model.name={name!r} must be the stem of model.config_path ({stem!r})")
    schema_name = name.startswith(("hf-hub:", "local-dir:"))
    if not schema_name and open_clip.get_model_config(name.replace("/", "-")) is None:
        raise ValueError(f"unknown open_clip model {name!r}: use a name from open_clip.list_models() "
                         f"(e.g. ViT-B-16, gcl-tiny), hf-hub:org/repo, local-dir:PATH, or register a config "
                         f"with model.config_path=FILE.json")
    src = _resolve_source(name, pretrained, cache_dir)
    tag = pretrained if src.kind == "tag" else None
    with _hub_offline(src.offline):
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
    if logit_bias_init is not None:
        if getattr(model, "logit_bias", None) is None:
            model.logit_bias = nn.Parameter(torch.full_like(model.logit_scale.detach(), float(logit_bias_init)))
            model_cfg["init_logit_bias"] = float(logit_bias_init)
            log.info("attached a learnable logit_bias = %.3f for the sigmoid loss", logit_bias_init)
        else:
            log.info("model has logit_bias = %.3f; logit_bias_init ignored",
                     float(model.logit_bias.detach().reshape(-1)[0]))
    lock_towers(model, lock_image=lock_image, lock_image_unlocked_groups=lock_image_unlocked_groups,
                lock_image_freeze_bn=lock_image_freeze_bn, lock_text=lock_text,
                lock_text_unlocked_layers=lock_text_unlocked_layers,
                lock_text_freeze_layer_norm=lock_text_freeze_layer_norm)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)

    pad_id = tokenizer_pad_id(tokenizer)
    real_length, packing = False, "buckets"
    if real_length_structure(model):
        try_prefix = text_packing != "buckets" and _packable(_native_text(model))
        checks = verify_real_length(model, tokenizer, pad_id, model.context_length,
                                    ("buckets", "prefix") if try_prefix else ("buckets",))
        real_length, diff = checks["buckets"]
        if not real_length:
            log.warning("text tower looks causal but real-length encoding differs by %.2e from full context; "
                        "encoding at the fixed context length instead", diff)
        elif try_prefix:
            ok, diff = checks["prefix"]
            if ok:
                packing = "prefix"
            else:
                log.warning("prefix-packed text encoding differs by %.2e from encode_text; using length buckets",
                            diff)
    if text_packing == "prefix" and packing != "prefix":
        raise ValueError(f"model.text_packing=prefix is not possible for {name}: its text tower is not a verified "
                         "real-length causal open_clip tower; use model.text_packing=auto or buckets")
    if compile:
        model.visual.compile()
        parts = _native_text(model)
        (parts.transformer if parts is not None else model.text).compile()

    pp_cfg = dict(model.visual.preprocess_cfg)
    pp = PreprocessCfg(**pp_cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("built %s (pretrained=%s, %s): %.1fM params, %.1fM trainable, text %s-length%s, %.1fs", name,
             pretrained, precision, n_all / 1e6, n_train / 1e6, "real" if real_length else "fixed",
             ", prefix-packed" if packing == "prefix" else "", time.perf_counter() - t0)
    return ModelBundle(
        model=model,
        preprocess_train=image_transform_v2(pp, is_train=True),
        preprocess_val=image_transform_v2(pp, is_train=False),
        tokenizer=tokenizer,
        context_length=int(model.context_length),
        pad_id=pad_id,
        real_length=real_length,
        text_packing=packing,
        name=name,
        pretrained=pretrained,
        model_cfg=model_cfg,
        preprocess_cfg=pp_cfg,
    )
