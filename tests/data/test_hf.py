"""gcl.data.hf: Hugging Face dataset layouts from a local copy (a folder, or the HF cache offline).

Fixtures are written here in the layouts the Hub produces: Marqo-GS-10M's four splits as sharded Parquet
files with an image struct ``{"bytes", "path"}`` and a dataset card whose ``configs:`` name the files, Marqo's
GoogleShopping eval set (one ``data`` split), and the cache layout ``huggingface_hub`` writes
(``datasets--org--name/{refs/main, blobs/, snapshots/<rev>/}`` with symlinks into ``blobs``).
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gcl.data import hf

SPLITS = ("in_domain", "novel_query", "novel_document", "zero_shot")
CARD = """---
license: apache-2.0
dataset_info:
  features:
  - name: image
    dtype: image
  - name: query
    dtype: string
  - name: product_id
    dtype: string
  - name: position
    dtype: int64
  - name: title
    dtype: string
  - name: score_linear
    dtype: int64
configs:
- config_name: default
  data_files:
{files}
---
# Marqo-GS-10M (test fixture)
"""


def jpeg(seed: int, size=(16, 16)) -> bytes:
    img = Image.new("RGB", size, ((37 * seed) % 256, (91 * seed) % 256, (53 * seed) % 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def gs10m_rows(split_index: int) -> list[dict]:
    """6 (query, product) pairs per split over 4 products and 3 queries, graded by position."""
    rows = []
    for q in range(3):
        for rank, p in enumerate([(q + k) % 4 for k in range(2)]):
            pid = f"P{split_index}{p}"
            rows.append({"image": {"bytes": jpeg(10 * split_index + p), "path": f"{pid}.jpg"},
                         "query": f"query {split_index}-{q}", "product_id": pid, "position": rank + 1,
                         "title": f"product {pid} title", "score_linear": 100 - 40 * rank})
    return rows


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    arrays = {k: pa.array(v, type=IMAGE_TYPE) if k == "image" else pa.array(v) for k, v in cols.items()}
    pq.write_table(pa.table(arrays), path, row_group_size=4)


def write_gs10m(root: Path, card: bool = True) -> dict[str, list[dict]]:
    """The Hub layout of Marqo-GS-10M: data/<split>-0000i-of-00002.parquet (+ the card). Returns rows per split."""
    out = {}
    for s, split in enumerate(SPLITS):
        rows = gs10m_rows(s)
        out[split] = rows
        for i, part in enumerate((rows[:4], rows[4:])):
            write_parquet(root / "data" / f"{split}-{i:05d}-of-00002.parquet", part)
    if card:
        files = "\n".join(f"  - split: {s}\n    path: data/{s}-*" for s in SPLITS)
        (root / "README.md").write_text(CARD.format(files=files))
    return out


def to_cache(folder: Path, cache: Path, repo_id: str, rev: str = "0123abcd" * 5) -> Path:
    """Move a dataset folder into huggingface_hub's cache layout; returns the snapshot folder."""
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snap


def test_locate_a_folder_and_a_cached_snapshot_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "copy"
    write_gs10m(folder)
    assert hf.locate(str(folder)) == folder
    snap = to_cache(folder, tmp_path / "hub", hf.GS10M_REPO)
    assert hf.locate(hf.GS10M_REPO, cache_dir=str(tmp_path / "hub")) == snap
    with pytest.raises(hf.HFLayoutError) as e:
        hf.locate("Marqo/not-downloaded", cache_dir=str(tmp_path / "hub"))
    assert "huggingface-cli download Marqo/not-downloaded --repo-type dataset" in str(e.value)
    assert "HF_HUB_OFFLINE=1" in str(e.value)
    with pytest.raises(hf.HFLayoutError, match="neither a folder"):
        hf.locate(str(tmp_path / "no" / "such" / "dir"))


def test_splits_from_the_card_and_from_file_names(tmp_path):
    with_card, bare = tmp_path / "a", tmp_path / "b"
    write_gs10m(with_card)
    write_gs10m(bare, card=False)
    for root in (with_card, bare):
        assert sorted(hf.split_names(root)) == sorted(SPLITS)
        files = hf.split_files(root, "novel_document")
        assert [f.name for f in files] == ["novel_document-00000-of-00002.parquet",
                                           "novel_document-00001-of-00002.parquet"]
        with pytest.raises(hf.HFLayoutError, match="splits there"):
            hf.split_files(root, "train")
    # a card whose config names other files wins over the convention
    (with_card / "README.md").write_text(CARD.format(files="  - split: all\n    path: data/zero_shot-00000-*"))
    assert [f.name for f in hf.split_files(with_card, "all")] == ["zero_shot-00000-of-00002.parquet"]
    assert hf.split_names(with_card) == ["all"]


def test_cli_turns_cached_splits_into_shards_offline(tmp_path, monkeypatch):
    import json
    import socket
    import tarfile

    def no_network(*args, **kwargs):
        raise AssertionError("gcl.data.hf must not open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = write_gs10m(tmp_path / "copy")
    to_cache(tmp_path / "copy", tmp_path / "hub", hf.GS10M_REPO)
    out = tmp_path / "shards"
    assert hf.main([hf.GS10M_REPO, str(out), "--split", "in_domain", "--split", "novel_document",
                    "--cache-dir", str(tmp_path / "hub"), "--per-shard", "4", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["in_domain", "novel_document"]
    for split in ("in_domain", "novel_document"):
        sizes = json.loads((out / split / "sizes.json").read_text())
        assert sizes == {"shard-000000.tar": 4, "shard-000001.tar": 2}
        got = {}
        for name in sizes:
            with tarfile.open(out / split / name) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    got.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for i, row in enumerate(rows[split]):  # the expected sample, written from the row by hand
            sample = got[f"{i:09d}"]
            assert sample["jpg"] == row["image"]["bytes"]
            assert json.loads(sample["json"]) == {"title": row["title"], "query": row["query"],
                                                  "item_id": row["product_id"], "score": row["score_linear"],
                                                  "position": row["position"]}
    with pytest.raises(SystemExit):
        hf.main([hf.GS10M_REPO, str(tmp_path / "o2"), "--split", "train", "--cache-dir", str(tmp_path / "hub")])


def test_marqo_columns_map_to_gcl_fields(tmp_path):
    write_gs10m(tmp_path)
    cols = hf.table_columns(hf.split_files(tmp_path, "in_domain"))
    assert hf.default_fields(cols) == {"title": "title", "query": "query", "item_id": "product_id",
                                       "score": "score_linear", "position": "position"}
    assert hf.default_fields(["image", "item_ID", "query", "title", "position"]) == {
        "title": "title", "query": "query", "item_id": "item_ID", "position": "position"}
    # every GS-10M split has a task of that preset name; the release stems are the tar layout's file names
    assert set(hf.GS10M_SPLITS) == set(SPLITS) == set(hf.GS10M_RELEASE_STEMS)


# ------------------------------------------------------------------------------------- evaluation

def _eval_fixtures():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gcl_eval_test_fixtures",
                                                  Path(__file__).resolve().parents[1] / "eval" / "fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _preset(name: str, **overrides):
    from omegaconf import OmegaConf

    from gcl.eval.schema import EvalConfig

    conf = Path(__file__).resolve().parents[2] / "conf" / "eval" / f"{name}.yaml"
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(conf),
                           {"num_workers": 0, "batch_size": 16, "gallery": {"enabled": False}, **overrides})


def _tar_to_hub(tar_root: Path, hub: Path) -> None:
    """Rewrite the released tar layout as the Hub's: per split, Parquet rows (query, product_id, position,
    title, score_linear) with the product's image embedded, ordered like the split's corpus file."""
    import json

    import pandas as pd

    base = tar_root / "marqo-gs-dataset" / "marqo_gs_full_10m"
    for split, stem in hf.GS10M_RELEASE_STEMS.items():
        pairs = pd.read_csv(base / f"{stem}.csv")
        corpus = "corpus_1" if stem.endswith("product_id_0") else "corpus_2"
        order = {pid: i for i, pid in enumerate(json.loads((base / f"{corpus}.json").read_text()))}
        pairs = pairs[pairs.product_id.isin(order)].copy()
        pairs["_o"] = pairs.product_id.map(order)
        rows = [{"image": {"bytes": (tar_root / "images" / f"{r.product_id}.png").read_bytes(), "path": None},
                 "query": r.query, "product_id": r.product_id, "position": int(r.position), "title": r.title,
                 "score_linear": int(r.score_linear)}
                for r in pairs.sort_values("_o", kind="stable").itertuples()]
        write_parquet(hub / "data" / f"{split}-00000-of-00001.parquet", rows)


def test_gs10m_hub_layout_evaluates_like_the_released_tar(tmp_path, monkeypatch):
    """The Hub's Parquet layout, read by eval=marqo_gs10m_hf from a folder or from the HF cache offline, gives
    marqo_gs10m's numbers on the same data."""
    import pandas as pd
    import torch
    from huggingface_hub import constants

    from gcl.eval.run import evaluate_model
    from gcl.model import build_model

    fx = _eval_fixtures()
    tar_root = tmp_path / "tar"
    fx.build_marqo_gs10m(tar_root, products=6, queries=4)  # every product is ranked by some query
    base = tar_root / "marqo-gs-dataset" / "marqo_gs_full_10m"
    for csv in base.glob("*.csv"):  # the Hub files hold no rows without a product; keep the grade ranges equal
        df = pd.read_csv(csv)
        df[df.product_id != "not-in-corpus"].to_csv(csv, index=False)
    _tar_to_hub(tar_root, tmp_path / "hub" / "marqo-GS-10M")

    torch.manual_seed(0)
    bundle = build_model("gcl-tiny")
    ref = evaluate_model(bundle, _preset("marqo_gs10m", data_root=str(tar_root)))
    got = evaluate_model(bundle, _preset("marqo_gs10m_hf", data_root=str(tmp_path / "hub")))
    assert len(got) == len(ref) > 0
    for task in hf.GS10M_SPLITS.values():
        for metric in ("ndcg@10", "err", "rbp@0.8", "map@1000", "mrr@1000"):
            assert got[f"marqo_gs10m_hf/{task}/{metric}"] == ref[f"marqo_gs10m/{task}/{metric}"], (task, metric)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    to_cache(tmp_path / "hub" / "marqo-GS-10M", tmp_path / "hf-cache", hf.GS10M_REPO)
    assert evaluate_model(bundle, _preset("marqo_gs10m_hf")) == got  # eval.data_root unset: the cache


def test_marqo_ecommerce_sets_evaluate_from_the_hf_cache_like_from_a_folder(tmp_path, monkeypatch):
    import torch
    from huggingface_hub import constants

    from gcl.eval.run import evaluate_model
    from gcl.model import build_model

    root = _eval_fixtures().build_marqo_ecommerce(tmp_path / "data", products=8)
    torch.manual_seed(0)
    bundle = build_model("gcl-tiny")
    ref = evaluate_model(bundle, _preset("marqo_ecommerce", data_root=str(root)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("google-shopping-general-eval", "amazon-products-eval"):
        to_cache(root / name, tmp_path / "hf-cache", f"Marqo/{name}")
    assert evaluate_model(bundle, _preset("marqo_ecommerce")) == ref and len(ref) > 10
    # a dataset missing from both places names both fixes
    from gcl.eval.tasks import MissingDataError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingDataError, match="eval.data_root=DIR.*Hugging Face cache"):
        evaluate_model(bundle, _preset("marqo_ecommerce"))


def test_the_hub_preset_keeps_every_protocol_value_of_marqo_gs10m():
    """marqo_gs10m_hf differs from marqo_gs10m only in where the data comes from (names kept per split)."""
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf" / "eval"
    tar, hub = (OmegaConf.to_container(OmegaConf.load(conf / f"{n}.yaml")) for n in ("marqo_gs10m", "marqo_gs10m_hf"))
    source = {"table", "corpus", "hf_dataset", "image_column", "image_root"}
    top = {"name", "data_root", "params", "tasks"}
    assert {k: v for k, v in tar.items() if k not in top} == {k: v for k, v in hub.items() if k not in top}
    assert [t["name"] for t in hub["tasks"]] == [t["name"] for t in tar["tasks"]] == list(hf.GS10M_SPLITS.values())
    for a, b, split in zip(tar["tasks"], hub["tasks"], hf.GS10M_SPLITS):
        assert {k: v for k, v in a.items() if k not in source} == {k: v for k, v in b.items() if k not in source}
        assert b["table"] == b["corpus"] == f"marqo-GS-10M/data/{split}-*.parquet"
