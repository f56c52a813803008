"""Hugging Face dataset layouts, read from a local copy: where the files are, which files make a split, and
how the columns of Marqo's datasets map to gcl fields.

    python -m gcl.data.hf Marqo/marqo-GS-10M shards/gs10m --split in_domain --resize 256
    python -m gcl.data.hf ~/data/google-shopping-general-eval shards/gs-eval

A local copy is either a folder (``huggingface-cli download REPO --repo-type dataset --local-dir DIR``) or the
Hugging Face cache (``huggingface-cli download REPO --repo-type dataset`` on a machine with network, then
``HF_HUB_OFFLINE=1``): :func:`locate` resolves both through ``huggingface_hub`` with
``local_files_only=True``, so nothing here ever downloads.

Lives here: :func:`locate`, :func:`split_files` / :func:`split_names` (the split -> files rule of the Hub:
the ``configs:`` block of the dataset card when it has one, else the file-name convention
``<split>-NNNNN-of-NNNNN.<ext>`` / ``<split>.<ext>`` / a ``<split>/`` folder), :func:`default_fields` (Marqo's
column names -> gcl fields), the Marqo-GS-10M split names and how they map to the evaluation presets, and
:func:`convert` / the CLI, which run ``gcl.data.prepare`` once per split. Not here: table reading and shard
writing (prepare), the evaluation itself (``gcl.eval``; the presets ``marqo_gs10m_hf``, ``marqo_ecommerce``
and ``marqo_fashion`` read these copies directly).
"""
from __future__ import annotations

import argparse
import glob
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gcl.data.read import PrepareError

log = logging.getLogger(__name__)

GS10M_REPO = "Marqo/marqo-GS-10M"
# Hugging Face split -> task name in the eval presets marqo_gs10m (released tar layout) and marqo_gs10m_hf.
GS10M_SPLITS: dict[str, str] = {
    "in_domain": "in_domain",
    "novel_query": "novel_query",
    "novel_document": "novel_corpus",
    "zero_shot": "zero_shot",
}
# Hugging Face split -> file stem of the same split in the released tar (marqo-gs-dataset/<subset>/<stem>.csv).
GS10M_RELEASE_STEMS: dict[str, str] = {
    "in_domain": "query_0_product_id_0",
    "novel_query": "query_1_product_id_0",
    "novel_document": "query_0_product_id_1",
    "zero_shot": "query_1_product_id_1",
}
# gcl field -> the column names Marqo's datasets use for it (first present wins).
MARQO_COLUMNS: dict[str, tuple[str, ...]] = {
    "title": ("title",),
    "query": ("query",),
    "item_id": ("item_ID", "product_id"),
    "score": ("score_linear",),
    "position": ("position",),
}
TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".json")
_SHARDED = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class HFLayoutError(PrepareError):
    """A local copy that cannot be found or read as a dataset; the message says how to fix it."""


def is_repo_id(source: str) -> bool:
    """``org/name`` (a Hub dataset id), as opposed to a path or URL."""
    return bool(_REPO_ID.match(source)) and not Path(source).expanduser().exists()


def locate(source: str, *, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """The folder of a local copy: ``source`` itself when it is a folder, else the cached snapshot of the
    dataset repo ``source`` (``revision`` or the cache's ``refs/main``). Never downloads."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not is_repo_id(source):
        raise HFLayoutError(f"{source!r} is neither a folder nor a Hugging Face dataset id (org/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, repo_type="dataset", revision=revision, cache_dir=cache_dir,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        where = cache_dir or constants.HF_HUB_CACHE
        raise HFLayoutError(
            f"dataset {source!r}{f' at revision {revision!r}' if revision else ''} is not in the Hugging Face "
            f"cache ({where}) and gcl never downloads it. On a machine with network run `huggingface-cli "
            f"download {source} --repo-type dataset` (into the cache; then run here with HF_HUB_OFFLINE=1 and "
            f"the same HF_HOME), or add `--local-dir DIR` and pass DIR instead of the id") from None


def _card_configs(root: Path) -> list[dict[str, Any]]:
    """The ``configs:`` list of the dataset card's YAML header (README.md), or [] without one."""
    card = root / "README.md"
    if not card.is_file():
        return []
    import yaml

    text = card.read_text(encoding="utf-8")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return []
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as err:
        raise HFLayoutError(f"{card}: the YAML header does not parse ({err})") from None
    configs = meta.get("configs") or []
    return configs if isinstance(configs, list) else []


def _pick_config(root: Path, config: str | None) -> dict[str, Any] | None:
    configs = _card_configs(root)
    if not configs:
        if config is not None:
            raise HFLayoutError(f"{root} has no dataset card with configs, so config {config!r} cannot be chosen")
        return None
    names = [c.get("config_name", "default") for c in configs]
    if config is not None:
        if config not in names:
            raise HFLayoutError(f"{root}: no config {config!r}; the card lists {names}")
        return configs[names.index(config)]
    for c in configs:
        if c.get("default") or c.get("config_name", "default") == "default":
            return c
    if len(configs) == 1:
        return configs[0]
    raise HFLayoutError(f"{root}: the card lists several configs {names} and none is the default; choose one "
                        "with --config")


def _card_splits(cfg: dict[str, Any]) -> dict[str, list[str]]:
    files = cfg.get("data_files") or []
    if isinstance(files, (str, list)) and not (isinstance(files, list) and files and isinstance(files[0], dict)):
        return {"train": [files] if isinstance(files, str) else list(files)}
    out: dict[str, list[str]] = {}
    for entry in files:
        paths = entry.get("path")
        out.setdefault(str(entry.get("split", "train")), []).extend([paths] if isinstance(paths, str) else paths)
    return out


def _tables(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in TABLE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _convention_split(path: Path, root: Path) -> str | None:
    """The split a file belongs to by the Hub's naming convention, if any."""
    m = _SHARDED.match(path.stem)
    if m:
        return m.group("split")
    parts = path.relative_to(root).parts
    if len(parts) >= 2 and parts[-2] not in ("data",):
        return parts[-2]  # <split>/file.parquet
    return None


def split_names(root: Path, *, config: str | None = None) -> list[str]:
    """The splits of the local copy at ``root`` (card order, else sorted)."""
    cfg = _pick_config(root, config)
    if cfg is not None:
        return list(_card_splits(cfg))
    return sorted({s for p in _tables(root) if (s := _convention_split(p, root)) is not None})


def split_files(root: Path, split: str, *, config: str | None = None) -> list[Path]:
    """The table files of ``split`` under ``root``, sorted; raises HFLayoutError naming the splits there."""
    cfg = _pick_config(root, config)
    if cfg is not None:
        patterns = _card_splits(cfg).get(split)
        files = sorted({Path(f) for pat in patterns or [] for f in glob.glob(str(root / pat), recursive=True)
                        if Path(f).is_file()})
    else:
        files = [p for p in _tables(root) if _convention_split(p, root) == split or p.stem == split]
    if not files:
        raise HFLayoutError(f"{root}: no files for split {split!r}; splits there: {split_names(root, config=config)}")
    return files


def default_fields(columns: Sequence[str]) -> dict[str, str]:
    """gcl field -> column for the Marqo column names present in ``columns`` (see MARQO_COLUMNS)."""
    have = set(columns)
    out = {}
    for name, candidates in MARQO_COLUMNS.items():
        col = next((c for c in candidates if c in have), None)
        if col is not None:
            out[name] = col
    return out


def table_columns(files: Sequence[Path]) -> list[str]:
    """Column names of the first table file: the Parquet schema, the CSV/TSV header, or the first JSONL row."""
    first = Path(files[0])
    suffix = first.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(first).schema_arrow.names)
    import pandas as pd

    if suffix in (".jsonl", ".json"):
        return list(pd.read_json(first, lines=True, nrows=1).columns)
    return list(pd.read_csv(first, sep="\t" if suffix == ".tsv" else ",", nrows=0).columns)


def convert(source: str, out_dir: str | Path, *, splits: Sequence[str] = (), config: str | None = None,
            revision: str | None = None, cache_dir: str | None = None, fields: dict[str, str] | None = None,
            reject_file: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """Write each split of a local dataset copy as shards under ``out_dir/<split>/`` with ``prepare``.

    ``splits`` defaults to every split; ``fields`` to :func:`default_fields` of each split's columns;
    ``reject_file`` gets the split's name before its suffix; ``options`` are :func:`gcl.data.prepare.prepare`'s.
    Returns ``{split: PrepareReport}``.
    """
    from gcl.data.prepare import prepare

    root = locate(source, revision=revision, cache_dir=cache_dir)
    names = list(splits) or split_names(root, config=config)
    if not names:
        raise HFLayoutError(f"{root} holds no table files with a split name; pass a folder of a dataset copy")
    reports = {}
    for split in names:
        files = split_files(root, split, config=config)
        mapped = fields or default_fields(table_columns(files))
        if not mapped:
            raise HFLayoutError(f"split {split!r} of {source}: none of Marqo's column names "
                                f"({sorted(c for cs in MARQO_COLUMNS.values() for c in cs)}) is there; its columns "
                                f"are {table_columns(files)}. Map them with --field NAME=COLUMN")
        log.info("split %s: %d file(s), fields %s", split, len(files), mapped)
        rejects = None
        if reject_file is not None:
            r = Path(reject_file)
            rejects = r.with_name(f"{r.stem}-{split}{r.suffix}")
        reports[split] = prepare(files, Path(out_dir) / split, fields=mapped, reject_file=rejects, **options)
    return reports


def build_parser() -> argparse.ArgumentParser:
    from gcl.data.prepare import add_table_arguments, add_worker_arguments

    p = argparse.ArgumentParser(
        prog="python -m gcl.data.hf",
        description="Turn the splits of a Hugging Face dataset (a local copy: a folder, or the HF cache with "
                    "HF_HUB_OFFLINE=1) into gcl webdataset shards, one folder per split. Without --field, "
                    "Marqo's columns map to our fields (title, query, item_ID/product_id -> item_id, "
                    "score_linear -> score, position). Other options are python -m gcl.data.prepare's.",
        epilog="example: HF_HUB_OFFLINE=1 python -m gcl.data.hf Marqo/marqo-GS-10M shards/gs10m --split in_domain "
               "--resize 256")
    add_table_arguments(p, table_help="a dataset id (org/name; looked up in the Hugging Face cache, never "
                                      "downloaded) or the folder of a local copy")
    add_worker_arguments(p)
    p.add_argument("--split", dest="splits", action="append", default=[],
                   help="split to convert (repeatable; default: every split)")
    p.add_argument("--config", help="the dataset card's config to read (default: its default one)")
    p.add_argument("--revision", help="the cached revision (default: the cache's refs/main)")
    p.add_argument("--cache-dir", help="the Hugging Face hub cache (default: HF_HUB_CACHE / HF_HOME)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns 0 on success. Errors exit with status 2 and a message."""
    from gcl.data.prepare import table_options

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = table_options(args, parser)
    try:
        convert(args.table, args.out_dir, splits=args.splits, config=args.config, revision=args.revision,
                cache_dir=args.cache_dir, strict=args.strict, workers=args.workers,
                **{**options, "fields": options["fields"] or None})
    except PrepareError as err:
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
