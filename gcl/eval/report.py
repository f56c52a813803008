"""Human-readable outputs of an evaluation: leaderboard-style markdown tables, a run's before/after table and a
retrieval gallery PNG."""
from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HIT = (40, 170, 60)
MISS = (210, 50, 50)


def _fmt(v: float | int | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):  # counts (queries, docs, classes)
        return str(v)
    return f"{v:.3f}"


def _table(title: str, rows: Mapping[str, Mapping[str, float | int]], first: str) -> list[str]:
    metrics: list[str] = []
    for vals in rows.values():
        metrics += [m for m in vals if m not in metrics]
    out = [f"### {title}", "", "| " + " | ".join([first, *metrics]) + " |",
           "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|"]
    for name, vals in rows.items():
        out.append("| " + " | ".join([name, *(_fmt(vals.get(m)) for m in metrics)]) + " |")
    return out + [""]


def markdown_report(suite: str, per_task: Mapping[str, Mapping[str, float]],
                    aggregates: Mapping[str, Mapping[str, float]], *, model: str | None = None,
                    step: int | None = None, counts: Mapping[str, Mapping[str, int]] | None = None) -> str:
    """A markdown page like the published leaderboards: averages first, then one table per task family.

    Tasks named ``dataset/task`` are grouped by dataset; within a group, tasks with the same metric columns
    share a table. ``counts`` (task -> {"queries": Q, "docs": N}) adds those columns.
    """
    head = f"# {suite} evaluation"
    lines = [head, ""]
    if model:
        lines.append(f"- model: `{model}`")
    if step is not None:
        lines.append(f"- step: {step}")
    if model or step is not None:
        lines.append("")
    if aggregates:
        lines += ["## Averages", ""]
        groups: dict[tuple[str, ...], dict[str, Mapping[str, float]]] = {}
        for name, vals in aggregates.items():
            groups.setdefault(tuple(vals), {})[name] = vals
        for rows in groups.values():
            lines += _table(", ".join(rows), rows, "Aggregate")
    by_group: dict[str, dict[str, dict[str, float | int]]] = {}
    for name, vals in per_task.items():
        group, _, task = name.rpartition("/")
        row: dict[str, float | int] = dict(vals)
        if counts and name in counts:
            row.update({k: int(v) for k, v in counts[name].items()})
        by_group.setdefault(group or suite, {})[task or name] = row
    for group, tasks in by_group.items():
        lines += [f"## {group}", ""]
        shapes: dict[tuple[str, ...], dict[str, dict[str, float | int]]] = {}
        for task, vals in tasks.items():
            shapes.setdefault(tuple(vals), {})[task] = vals
        for rows in shapes.values():
            lines += _table(", ".join(rows), rows, "Task")
    return "\n".join(lines).rstrip() + "\n"


@dataclass
class GalleryRow:
    """One gallery line: the query text, its top-k document images (None = unreadable) and hit flags."""

    query: str
    images: Sequence[Image.Image | None]
    hits: Sequence[bool]
    n_relevant: int = 0


def before_after_table(names: Sequence[str], before: Mapping[str, float], after: Mapping[str, float], *,
                       before_step: int, after_step: int) -> str:
    """A markdown table of ``names``: the value at ``before_step``, at ``after_step``, and the change (absolute and
    relative to the first value). A metric missing from either side shows ``-``."""
    out = [f"| metric | step {before_step} | step {after_step} | change | relative |", "|---|---:|---:|---:|---:|"]
    for name in names:
        b, a = before.get(name), after.get(name)
        if b is None or a is None:
            out.append(f"| {name} | {_fmt(b)} | {_fmt(a)} | - | - |")
            continue
        rel = f"{(a - b) / abs(b):+.1%}" if b else "-"
        out.append(f"| {name} | {b:.3f} | {a:.3f} | {a - b:+.3f} | {rel} |")
    return "\n".join(out) + "\n"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def save_gallery(path: str | Path, rows: Sequence[GalleryRow], *, thumb: int = 96, title: str = "") -> Path:
    """Write a PNG: one line per query (text on the left) with its top-k thumbnails, framed green for a
    relevant document and red otherwise. Returns the path."""
    pad, border, text_w = 6, 4, max(220, 2 * thumb)
    k = max((len(r.images) for r in rows), default=1)
    cell = thumb + 2 * border
    title_h = 24 if title else 0
    width = pad + text_w + k * (cell + pad)
    height = title_h + pad + max(1, len(rows)) * (cell + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(13), _font(11)
    if title:
        draw.text((pad, 4), title, fill="black", font=font)
    chars = max(12, text_w // 7)
    for r, row in enumerate(rows):
        y = title_h + pad + r * (cell + pad)
        text = "\n".join(textwrap.wrap(row.query, chars)[: max(1, cell // 15 - 1)])
        draw.multiline_text((pad, y), text, fill="black", font=font, spacing=2)
        found = sum(bool(h) for h in row.hits)
        draw.text((pad, y + cell - 14), f"{found}/{len(row.hits)} hits, {row.n_relevant} relevant",
                  fill="dimgray", font=small)
        for j, (img, hit) in enumerate(zip(row.images, row.hits)):
            x = pad + text_w + j * (cell + pad)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=HIT if hit else MISS)
            if img is None:
                draw.rectangle([x + border, y + border, x + border + thumb - 1, y + border + thumb - 1],
                               fill="lightgray")
                continue
            im = img.convert("RGB")
            im.thumbnail((thumb, thumb))
            ox, oy = x + border + (thumb - im.width) // 2, y + border + (thumb - im.height) // 2
            draw.rectangle([x + border, y + border, x + border + thumb - 1, y + border + thumb - 1], fill="white")
            canvas.paste(im, (ox, oy))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path
