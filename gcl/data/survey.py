"""What the first samples of a shard set carry: the evidence for the trainer's start-of-run field check.

Lives here: ``survey_fields`` (read the json of the first samples of each source, in shard order, and count in
how many each field holds a value) and its result ``FieldSurvey``. A value counts when the batch would hold
it: a non-blank string, a list with a non-blank string, a finite number, or another non-null value.

Not here: the decision (``Trainer`` checks the loss fields against the survey, ``loss.allow_absent_fields``),
the training stream (``gcl.data.stream``), raw shard reading (``gcl.data.shards``).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gcl.data.shards import _iter_shard, expand_urls

SURVEY_SAMPLES = 512  # per check: a field in 1% of the products shows up with probability 0.994


@dataclass
class FieldSurvey:
    """``samples``: samples whose json was read; ``present[f]``: how many of them hold a value for ``f``;
    ``unreadable``: samples or shards that could not be read (shard errors, bad json)."""

    samples: int = 0
    present: Counter = field(default_factory=Counter)
    unreadable: int = 0

    @property
    def found(self) -> list[str]:
        """The fields at least one surveyed sample holds, sorted."""
        return sorted(f for f, n in self.present.items() if n)


def _has_value(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list):
        return any(isinstance(v, str) and v.strip() for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def survey_fields(urls: str | list[str], max_samples: int = SURVEY_SAMPLES) -> FieldSurvey:
    """Count field values in the first samples of ``urls`` (a pattern, or a list of patterns = sources: each
    source contributes its first ``ceil(max_samples / sources)`` samples, read in shard order)."""
    sources = [urls] if isinstance(urls, str) else list(urls)
    per_source = -(-max_samples // len(sources))
    out = FieldSurvey()

    def on_error(reason: str, url: str, exn: BaseException) -> None:
        out.unreadable += 1

    for src in sources:
        n = 0
        for url in expand_urls(src):
            for raw in _iter_shard(url, on_error):
                try:
                    meta = json.loads(raw["json"]) if "json" in raw else None
                except (UnicodeDecodeError, json.JSONDecodeError):
                    meta = None
                if not isinstance(meta, dict):
                    out.unreadable += 1
                    continue
                out.samples += 1
                out.present.update(k for k, v in meta.items() if _has_value(v))
                n += 1
                if n >= per_source:
                    break
            if n >= per_source:
                break
    return out
