"""From raw shard samples to the batch dict: decoding, the list -> string rule, tokenizing, collation.

Lives here: the batch layout shared by the training stream and the eval loader (docs/architecture.md):
``_Decoder`` (json + RGB image by ``gcl.data.image.decode_image`` + transform, or ``_Skip(reason)``), ``_Collator`` (tokens per field trimmed
to the longest row, presence masks, text ids from the token rows (``token_row_ids``), item ids, scores),
``pad_id_of``, skip accounting (``SKIP_REASONS``, ``_SkipLog``), the worker -> main process wire format
(``_to_wire`` / ``_from_wire``), argument checks shared by both builders and ``concat_batches``.

Not here: which samples come in which order and how a position is resumed (``gcl.data.stream``), the
one-pass eval loader (``gcl.data.eval_loader``), shard files and URLs (``gcl.data.shards``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from gcl.data.image import RGB, decode_image
from gcl.data.schema import IMAGE_EXTS, stable_hash

# Records keep the logger name they had before this code moved here from gcl.data.stream.
logger = logging.getLogger("gcl.data.stream")

Batch = dict[str, Any]
SKIP_REASONS: tuple[str, ...] = (
    "missing_json", "bad_json", "bad_field", "missing_image", "corrupt_image", "transform_error",
    "shard_error", "truncated_shard",  # the last two count shards (reads of one), the others samples
)
LIST_RULES: tuple[str, ...] = ("join", "sample")


# ------------------------------------------------------------------------------------ decode + collate

class _Skip(Exception):
    """A sample that cannot be used; ``args[0]`` is its reason (one of SKIP_REASONS)."""


def _to_text(value: Any, field: str, rule: str, sep: str, rng: random.Random | None) -> str | None:
    """The final string of a field value; None when missing/empty. Raises _Skip for non-string values."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise _Skip("bad_field", f"field {field!r} is a list with non-string elements")
        items = [v.strip() for v in value if v.strip()]
        if not items:
            return None
        if rule == "join":
            return sep.join(items)
        return items[(rng or random).randrange(len(items))]
    raise _Skip("bad_field", f"field {field!r} is a {type(value).__name__}, expected a string or list of strings")


def _to_float(value: Any, field: str) -> float:
    if value is None or value == "":
        return math.nan
    if isinstance(value, bool):
        raise _Skip("bad_field", f"field {field!r} is a bool, expected a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _Skip("bad_field", f"field {field!r}={value!r} is not a number") from None


class _Decoder:
    """Raw sample -> dict(image, text, item_id, score, position, key), or _Skip(reason)."""

    def __init__(self, fields: list[str], image_transform: Callable[[Image.Image], torch.Tensor],
                 list_rule: str, list_sep: str, background: RGB) -> None:
        self.fields, self.transform, self.rule, self.sep = fields, image_transform, list_rule, list_sep
        self.background = background

    def __call__(self, raw: dict[str, Any], rng: random.Random | None) -> dict[str, Any]:
        key = raw["__key__"]
        if "json" not in raw:
            raise _Skip("missing_json", "no .json member")
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exn:
            raise _Skip("bad_json", str(exn)) from None
        if not isinstance(meta, dict):
            raise _Skip("bad_json", f"json is a {type(meta).__name__}, expected an object")
        # Cheap checks first: a sample that fails them costs no image decode.
        text = {f: _to_text(meta.get(f), f, self.rule, self.sep, rng) for f in self.fields}
        item_id = meta.get("item_id")
        if item_id is not None and not isinstance(item_id, (str, int)):
            raise _Skip("bad_field", f"item_id is a {type(item_id).__name__}")
        score, position = _to_float(meta.get("score"), "score"), _to_float(meta.get("position"), "position")
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise _Skip("missing_image", f"no image member (.{'/.'.join(IMAGE_EXTS)})")
        try:
            img = decode_image(raw[ext], self.background)  # full decode: truncated files fail now
        except Exception as exn:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise _Skip("corrupt_image", repr(exn)) from None
        try:
            image = self.transform(img)
        except Exception as exn:  # noqa: BLE001
            raise _Skip("transform_error", repr(exn)) from None
        return {"image": image, "text": text, "key": key,
                "item_id": str(item_id) if item_id not in (None, "") else key,
                "score": score, "position": position}


def pad_id_of(tokenizer: Any) -> int:
    """Pad token id of an open_clip tokenizer: the HF tokenizer's ``pad_token_id``, else 0 (SimpleTokenizer)."""
    inner = getattr(tokenizer, "tokenizer", None)
    pad = getattr(inner, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def token_row_ids(tokens: torch.Tensor, present: torch.Tensor, pad_id: int) -> torch.Tensor:
    """LongTensor[B]: the duplicate id of each row of ``tokens`` [B, L] (one field's token rows).

    Rows are duplicates exactly when the text tower sees the same tokens: "Black" and "black" under a
    lower-casing tokenizer, whitespace variants, texts that differ only after the truncation point. The id is
    a process-independent 63-bit hash of the row without its trailing ``pad_id`` tokens (so it does not depend on
    the batch's trimmed width, which varies across batches and ranks); 0 where ``present`` is False.
    """
    rows = tokens.to(torch.int64).cpu().numpy()
    out = np.zeros(rows.shape[0], dtype=np.int64)
    keep = (rows != pad_id)
    # length without trailing pads: 1 + index of the last non-pad token (0 for an all-pad row)
    lengths = np.where(keep.any(axis=1), rows.shape[1] - np.argmax(keep[:, ::-1], axis=1), 0)
    for i in np.flatnonzero(present.cpu().numpy()):
        digest = hashlib.blake2b(rows[i, : lengths[i]].astype("<i8").tobytes(), digest_size=8).digest()
        out[i] = (int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF) or 1
    return torch.from_numpy(out)


class _Collator:
    """Decoded samples -> the batch dict of docs/architecture.md (see ``build_train_stream``)."""

    def __init__(self, tokenizer: Any, context_length: dict[str, int], fields: list[str], trim: bool) -> None:
        self.tok, self.ctx, self.fields, self.trim = tokenizer, context_length, fields, trim
        self.pad = pad_id_of(tokenizer)

    def tokens(self, texts: list[str | None], n: int) -> torch.Tensor:
        """LongTensor[B, L<=n]: rows of missing texts are all pad; trailing all-pad columns dropped."""
        out = torch.full((len(texts), n), self.pad, dtype=torch.long)
        idx = [i for i, t in enumerate(texts) if t is not None]
        if idx:
            out[idx] = self.tok([texts[i] for i in idx], context_length=n).long()
        if self.trim:
            used = (out != self.pad).any(dim=0).nonzero()
            # Keep >= 1 column so an all-missing field is [B, 1] of pad, never a zero-size tensor.
            out = out[:, : max(1, int(used[-1]) + 1 if len(used) else 1)].contiguous()
        return out

    def __call__(self, samples: list[dict[str, Any]], skipped: dict[str, int]) -> Batch:
        text = {f: [s["text"][f] for s in samples] for f in self.fields}
        present = {f: torch.tensor([t is not None for t in ts], dtype=torch.bool) for f, ts in text.items()}
        present["image"] = torch.ones(len(samples), dtype=torch.bool)
        tokens = {f: self.tokens(ts, self.ctx[f]) for f, ts in text.items()}
        return {
            # default_collate stacks straight into shared memory inside a worker, saving the copy that
            # sending a plain stacked tensor to the main process would cost (~B*3*H*W*4 bytes per batch).
            "image": default_collate([s["image"] for s in samples]),
            "tokens": tokens,
            "present": present,
            # duplicates are what the encoder sees: ids from the token rows, not from the raw strings
            "text_id": {f: token_row_ids(tokens[f], present[f], self.pad) for f in text},
            "item_id": torch.tensor([stable_hash(s["item_id"]) for s in samples], dtype=torch.long),
            "score": torch.tensor([s["score"] for s in samples], dtype=torch.float32),
            "position": torch.tensor([s["position"] for s in samples], dtype=torch.float32),
            "text": text,
            "key": [s["key"] for s in samples],
            "skipped": dict(skipped),
        }


class _SkipLog:
    """Counts skipped samples by reason and logs each with its key: the first 5 per reason, then at powers
    of two (deterministic rate limit, so a shard full of bad samples cannot flood the log)."""

    def __init__(self, where: str, totals: dict[str, int] | None = None) -> None:
        self.where = where
        self.totals: Counter[str] = Counter(totals or {})
        self.delta: Counter[str] = Counter()

    def __call__(self, reason: str, key: str, detail: Any) -> None:
        self.totals[reason] += 1
        self.delta[reason] += 1
        n = self.totals[reason]
        if n <= 5 or (n & (n - 1)) == 0:
            logger.warning("skipped %s in %s: %s #%d: %s", key, self.where, reason, n, detail)

    def take_delta(self) -> dict[str, int]:
        out, self.delta = dict(self.delta), Counter()
        return out


def _all_reasons(counts: dict[str, int]) -> dict[str, int]:
    """``counts`` with every reason of SKIP_REASONS (in that order) present; any other reason follows."""
    out = {r: int(counts.get(r, 0)) for r in SKIP_REASONS}
    out.update({r: int(n) for r, n in sorted(counts.items()) if r not in out})
    return out


# ------------------------------------------------------------------------------- worker -> main process

def _to_wire(batch: Batch) -> Batch:
    """Small tensors -> numpy before leaving a worker process.

    The DataLoader moves every tensor through its own shared-memory segment, a fixed cost per tensor that
    a 7-field batch pays ~30 times; small numpy arrays travel inside the pickle instead. Only ``image``
    (megabytes) stays a tensor.
    """
    out: Batch = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and k != "image":
            out[k] = v.numpy()
        elif isinstance(v, dict) and k in ("tokens", "present", "text_id"):
            out[k] = {f: t.numpy() for f, t in v.items()}
        else:
            out[k] = v
    return out


def _from_wire(batch: Batch) -> Batch:
    """Inverse of ``_to_wire`` in the main process (zero-copy ``torch.from_numpy``)."""
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            batch[k] = torch.from_numpy(v)
        elif isinstance(v, dict) and k in ("tokens", "present", "text_id"):
            batch[k] = {f: torch.from_numpy(t) if isinstance(t, np.ndarray) else t for f, t in v.items()}
    return batch


# ------------------------------------------------------------------------------------------- arguments

def _validate_text_args(tokenizer: Any, context_length: dict[str, int], fields: list[str], list_rule: str) -> None:
    if not fields:
        raise ValueError("fields is empty: name at least one text field (e.g. ['title'])")
    if "image" in fields:
        raise ValueError("'image' is the reserved name of the picture; remove it from the text fields")
    missing = [f for f in fields if f not in context_length]
    if missing:
        raise ValueError(f"no context length for fields {missing}: add them to context_length (e.g. title: 77)")
    bad = {f: n for f, n in context_length.items() if f in fields and (not isinstance(n, int) or n < 2)}
    if bad:
        raise ValueError(f"context lengths must be integers >= 2 (start + end token), got {bad}")
    if list_rule not in LIST_RULES:
        raise ValueError(f"list_rule must be one of {LIST_RULES}, got {list_rule!r}")
    if not callable(tokenizer):
        raise TypeError("tokenizer must be callable as tok(texts, context_length=n) (open_clip.get_tokenizer)")


# ------------------------------------------------------------------------------------------ helpers

def concat_batches(batches: Sequence[Batch], pad_id: int = 0) -> Batch:
    """Concatenate batches along the sample axis (gradient-accumulation micro-batches -> one batch).

    Token tensors of one field are right-padded with ``pad_id`` (``stream.pad_id``) to the longest
    before concatenation; ``skipped`` counts are summed. Returns the same dict layout.
    """
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    first = batches[0]
    tokens = {}
    for f in first["tokens"]:
        parts = [b["tokens"][f] for b in batches]
        n = max(p.shape[1] for p in parts)
        tokens[f] = torch.cat([torch.nn.functional.pad(p, (0, n - p.shape[1]), value=pad_id) for p in parts])
    skipped: Counter[str] = Counter()
    for b in batches:
        skipped.update(b.get("skipped", {}))
    return {
        "image": torch.cat([b["image"] for b in batches]),
        "tokens": tokens,
        "present": {f: torch.cat([b["present"][f] for b in batches]) for f in first["present"]},
        "text_id": {f: torch.cat([b["text_id"][f] for b in batches]) for f in first["text_id"]},
        "item_id": torch.cat([b["item_id"] for b in batches]),
        "score": torch.cat([b["score"] for b in batches]),
        "position": torch.cat([b["position"] for b in batches]),
        "text": {f: [t for b in batches for t in b["text"][f]] for f in first["text"]},
        "key": [k for b in batches for k in b["key"]],
        "skipped": dict(skipped),
    }
