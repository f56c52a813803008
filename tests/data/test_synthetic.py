"""The synthetic catalog: determinism, visible signal per field, text rules, splits, shards, caching, CLI.

The visual checks use plain pixel statistics written here (border-median background, nearest palette color,
bounding-box-normalised silhouettes + nearest centroid), independent of the renderer's code.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import (
    call_concurrently,
    check_bad_arguments_name_the_problem,
    check_bytes_independent_of_worker_count,
    check_same_seed_same_bytes,
    read_split,
)
from PIL import Image

from gcl.data import synthetic as syn
from gcl.data.catalog import write as catalog_write
from gcl.data.schema import TEXT_FIELDS

N = 240


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cat") / "c"
    cat = syn.generate_catalog(out, products=N, seed=3, per_shard=64, missing_rate=0.2)
    return out, cat


def read_all(root: Path) -> dict[str, tuple[str, dict[str, bytes]]]:
    return {k: (s, v) for s in syn.SPLITS for k, v in read_split(root, s).items()}


# ------------------------------------------------------------------------------------ pixel "classifiers"

PALETTE_NAMES = list(syn.COLORS)
PALETTE = np.array([syn.COLORS[n][0] for n in PALETTE_NAMES], dtype=float)


def foreground(img: np.ndarray) -> np.ndarray:
    """Pixels far from the background, estimated as the median of a 2 px border."""
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    return np.linalg.norm(img - bg, axis=-1) > 40


def nearest_palette(px: np.ndarray) -> np.ndarray:
    return np.argmin(((px[:, None, :] - PALETTE[None]) ** 2).sum(-1), axis=1)


def dominant_color(img: np.ndarray) -> str:
    idx = nearest_palette(img[foreground(img)])
    return PALETTE_NAMES[int(np.bincount(idx, minlength=len(PALETTE_NAMES)).argmax())]


def silhouette_features(img: np.ndarray) -> np.ndarray:
    """Foreground mask cropped to its bounding box, resized to 16x16, plus the log aspect ratio."""
    m = foreground(img)
    ys, xs = np.nonzero(m)
    crop = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    small = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((16, 16), Image.BILINEAR)) / 255.0
    h, w = crop.shape
    return np.concatenate([small.ravel(), [4 * np.log(w / h)]])


def as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=float)


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    check_same_seed_same_bytes(syn.generate_catalog, "products", tmp_path, "catalog.json", "products.parquet")


@pytest.mark.dist
def test_bytes_independent_of_worker_count(tmp_path: Path) -> None:
    check_bytes_independent_of_worker_count(syn.generate_catalog, "products", tmp_path, "catalog.json",
                                            "products.parquet")


# ------------------------------------------------------------------------------------ shards and table


def test_shards_readable_with_plain_tarfile(catalog: tuple[Path, dict]) -> None:
    root, cat = catalog
    total = 0
    for split in syn.SPLITS:
        sizes = json.loads((root / split / "sizes.json").read_text())
        samples = read_split(root, split)
        per_shard: Counter[str] = Counter()
        for tar_path in (root / split).glob("shard-*.tar"):
            with tarfile.open(tar_path) as tf:
                per_shard[tar_path.name] = len({m.name.split(".", 1)[0] for m in tf.getmembers()})
        assert dict(per_shard) == sizes
        assert sum(sizes.values()) == len(samples) == cat["splits"][split]["count"]
        total += len(samples)
        for key, files in samples.items():
            assert "." not in key
            assert {"jpg", "json"} <= set(files) <= {"jpg", "json", "txt"}
            fields = json.loads(files["json"])
            assert fields["item_id"] == key
            if "title" in fields:
                assert files["txt"].decode() == fields["title"]
            else:
                assert "txt" not in files
            img = Image.open(io.BytesIO(files["jpg"]))
            assert img.format == "JPEG" and img.size == (64, 64)
            for k, v in fields.items():
                if k in ("score", "position"):
                    assert isinstance(v, int)
                elif isinstance(v, list):
                    assert v and all(isinstance(x, str) and x for x in v), (k, v)
                else:
                    assert isinstance(v, str) and v, (k, v)
    assert total == N


def test_table_matches_shards_and_catalog_patterns(catalog: tuple[Path, dict]) -> None:
    root, cat = catalog
    rows = pq.read_table(root / "products.parquet").to_pylist()
    assert len(rows) == N and len({r["item_id"] for r in rows}) == N
    shards = read_all(root)
    for r in rows:
        split, files = shards[r["item_id"]]
        assert r["split"] == split
        fields = json.loads(files["json"])
        for k in (*TEXT_FIELDS, "color", "subcategory", "query", "score", "position"):
            assert fields.get(k) == r[k], k
        assert (root / r["shard"]).is_file()
    on_disk = json.loads((root / "catalog.json").read_text())
    assert on_disk["format_version"] == syn.FORMAT_VERSION and on_disk["seed"] == 3
    for split, info in on_disk["splits"].items():
        assert info["count"] == sum(r["split"] == split for r in rows)
        # The brace pattern names exactly the shard files on disk.
        pat = info["pattern"]
        if "{" in pat:
            head, rest = pat.split("{", 1)
            lo, hi = rest.split("}", 1)[0].split("..")
            names = {f"{head}{i:06d}.tar" for i in range(int(lo), int(hi) + 1)}
        else:
            names = {pat}
        assert names == {str(p) for p in (root / split).resolve().glob("shard-*.tar")}
    assert syn.load_catalog(root)["splits"]["train"]["pattern"] == on_disk["splits"]["train"]["pattern"]


# ------------------------------------------------------------------------------------ visible signal


def test_color_field_is_the_dominant_pixel_color(catalog: tuple[Path, dict]) -> None:
    root, _ = catalog
    hits = n = 0
    for _key, (_split, files) in read_all(root).items():
        fields = json.loads(files["json"])
        img = as_array(Image.open(io.BytesIO(files["jpg"])))
        hits += dominant_color(img) == fields["color"]
        n += 1
    assert n == N
    assert hits / n >= 0.9, f"palette classifier agrees on only {hits}/{n}"


def test_silhouettes_separate_subcategories() -> None:
    """A nearest-centroid classifier on bounding-box-normalised masks, fit on half the products."""
    feats, labels = [], []
    for i in range(540):
        attrs = syn.sample_attributes(np.random.default_rng([11, i]))
        img = syn.render_product(attrs, 64, np.random.default_rng([12, i]))
        assert img.size == (64, 64) and img.mode == "RGB"
        feats.append(silhouette_features(as_array(img)))
        labels.append(attrs["subcategory"])
    x, y = np.stack(feats), np.array(labels)
    fit = np.arange(len(y)) % 2 == 0
    classes = sorted(set(y[fit]))
    centroids = np.stack([x[fit & (y == c)].mean(0) for c in classes])
    pred = np.array(classes)[np.argmin(((x[~fit][:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    acc = float((pred == y[~fit]).mean())
    chance = 1 / len(syn.SUBCATEGORIES)
    assert acc >= 0.6 > 5 * chance, f"subcategory accuracy {acc:.2f} (chance {chance:.2f})"
    parent = {c: s.parent for c, s in syn.SUBCATEGORIES.items()}
    pacc = float(np.mean([parent[a] == parent[b] for a, b in zip(pred, y[~fit])]))
    assert pacc >= 0.75, f"parent accuracy {pacc:.2f}"


BASE = {"category": "tops", "subcategory": "t-shirts", "color": "red", "secondary_color": None,
        "material": "cotton", "pattern": "plain", "details": ["short sleeves", "crew neck"]}


def test_sleeve_length_is_visible() -> None:
    """Long sleeves fill the outer columns of the lower bounding box; short sleeves leave them empty."""
    def outer_fill(details: list[str], i: int) -> float:
        img = as_array(syn.render_product(dict(BASE, details=details), 64, np.random.default_rng([13, i])))
        m = foreground(img)
        ys, xs = np.nonzero(m)
        crop = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        h, w = crop.shape
        return float(crop[int(0.6 * h):int(0.85 * h), : max(1, int(0.12 * w))].mean())

    short = [outer_fill(["short sleeves", "crew neck"], i) for i in range(8)]
    long_ = [outer_fill(["long sleeves", "crew neck"], i) for i in range(8)]
    assert max(short) < 0.15 < 0.4 < min(long_), (short, long_)


def test_patterns_show_the_second_color() -> None:
    def secondary_share(pattern: str, i: int) -> float:
        attrs = dict(BASE, pattern=pattern, secondary_color=None if pattern == "plain" else "white")
        img = as_array(syn.render_product(attrs, 64, np.random.default_rng([14, i])))
        idx = nearest_palette(img[foreground(img)])
        return float((idx == PALETTE_NAMES.index("white")).mean())

    for i in range(4):
        assert secondary_share("plain", i) < 0.03
        for pattern in ("striped", "polka dot", "checked", "floral"):
            share = secondary_share(pattern, i)
            assert 0.08 < share < 0.5, (pattern, share)


def test_material_textures_differ() -> None:
    """Ribbed / twill / knit materials have far more horizontal pixel contrast than smooth cotton."""
    def roughness(material: str, i: int) -> float:
        attrs = dict(BASE, category="bottoms", subcategory="trousers", color="grey", material=material,
                     details=["wide leg"])
        rgb = as_array(syn.render_product(attrs, 64, np.random.default_rng([15, i])))
        img, m = rgb.mean(-1), foreground(rgb)
        inner = m.copy()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1), (2, 0), (-2, 0), (0, 2), (0, -2)):
            inner &= np.roll(m, (dy, dx), axis=(0, 1))  # erode: keep the edges out of the statistic
        g = np.abs(np.diff(img, axis=1))
        return float(g[inner[:, 1:] & inner[:, :-1]].mean())

    cotton = np.mean([roughness("cotton", i) for i in range(4)])
    for material in ("corduroy", "denim", "wool"):
        assert np.mean([roughness(material, i) for i in range(4)]) > 2.5 * cotton, material


def test_render_scales_and_is_deterministic() -> None:
    attrs = syn.sample_attributes(np.random.default_rng(1))
    for size in (32, 64, 224):
        a = syn.render_product(attrs, size, np.random.default_rng(2))
        b = syn.render_product(attrs, size, np.random.default_rng(2))
        assert a.size == (size, size)
        assert a.tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="image_size"):
        syn.render_product(attrs, 8, np.random.default_rng(2))


# ------------------------------------------------------------------------------------ text fields


def test_text_fields_follow_the_attributes(catalog: tuple[Path, dict]) -> None:
    root, cat = catalog
    hierarchy = cat["vocab"]["categories"]
    assert len(hierarchy) >= 4 and sum(len(v) for v in hierarchy.values()) >= 8
    assert len(cat["vocab"]["colors"]) >= 12 and len(cat["vocab"]["materials"]) >= 6
    synonyms = {k: v["synonyms"] for k, v in cat["vocab"]["colors"].items()}
    rows = pq.read_table(root / "products.parquet").to_pylist()
    titled_with_color = titled = 0
    for r in rows:
        assert r["subcategory"] in hierarchy[r["category"]]
        if r["categories"] is not None:
            assert r["categories"] == [r["category"], r["subcategory"]]
        if r["description"] is not None:
            assert 20 <= len(r["description"].split()) <= 80, r["description"]
        if r["colors"] is not None:
            assert r["colors"][0] == r["color"] and set(r["colors"]) <= set(synonyms)
        if r["materials"] is not None:
            assert r["materials"][0] == r["material"]
        if r["keywords"] is not None:
            assert r["color"] in r["keywords"]
        if r["title"] is not None:
            titled += 1
            titled_with_color += any(s in r["title"].lower() for s in synonyms[r["color"]])
    assert titled_with_color >= 0.9 * titled
    # Synonyms are used: "navy" products are sometimes called "dark blue" / "midnight blue" ...
    descs = " ".join(r["description"] or "" for r in rows).lower()
    assert sum(s in descs for syns in synonyms.values() for s in syns[1:]) >= 10


def test_missing_rate_and_noisy_titles(tmp_path: Path, catalog: tuple[Path, dict]) -> None:
    root, _ = catalog
    rows = pq.read_table(root / "products.parquet").to_pylist()
    missing = np.array([[r[f] is None for f in TEXT_FIELDS] for r in rows])
    assert 0.15 < missing.mean() < 0.25  # missing_rate=0.2 over 7 x 240 draws (sd ~0.01)
    assert not missing.all(axis=1).any()
    assert all(r[k] is not None for r in rows for k in ("color", "category", "subcategory", "material"))

    clean = syn.generate_catalog(tmp_path / "clean", products=30, seed=2, missing_rate=0.0, noisy_title_rate=0.0)
    noisy = syn.generate_catalog(tmp_path / "noisy", products=30, seed=2, missing_rate=0.0, noisy_title_rate=1.0)
    assert clean["args"]["noisy_title_rate"] == 0.0 and noisy["args"]["noisy_title_rate"] == 1.0
    tc = pq.read_table(tmp_path / "clean" / "products.parquet").to_pylist()
    tn = pq.read_table(tmp_path / "noisy" / "products.parquet").to_pylist()
    assert all(r[f] is not None for r in tc for f in TEXT_FIELDS)
    assert all(a["title"] != b["title"] for a, b in zip(tc, tn))
    assert all(a["description"] == b["description"] and a["details"] == b["details"] for a, b in zip(tc, tn))


# ------------------------------------------------------------------------------------ splits and queries


def test_heldout_combinations_only_in_test_heldout(catalog: tuple[Path, dict]) -> None:
    root, cat = catalog
    held = {(h["color"], h["subcategory"]) for h in cat["heldout_combos"]}
    assert len(held) >= len(syn.SUBCATEGORIES)
    rows = pq.read_table(root / "products.parquet").to_pylist()
    for r in rows:
        assert ((r["color"], r["subcategory"]) in held) == (r["split"] == "test_heldout")
    counts = Counter(r["split"] for r in rows)
    assert counts["test_heldout"] > 0
    iid = N - counts["test_heldout"]
    assert abs(counts["train"] - 0.8 * iid) <= 1 and abs(counts["val"] - 0.1 * iid) <= 1
    # Each held-out color and subcategory is still seen in training, in other combinations.
    train = [r for r in rows if r["split"] == "train"]
    seen_colors = {r["color"] for r in train}
    seen_subs = {r["subcategory"] for r in train}
    assert all(c in seen_colors for c, _ in held) and all(s in seen_subs for _, s in held)


def test_query_scores_and_positions(catalog: tuple[Path, dict]) -> None:
    root, _ = catalog
    rows = pq.read_table(root / "products.parquet").to_pylist()
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        assert 1 <= r["score"] <= 100 and r["query"]
        groups[r["query"]].append(r)
        if r["score"] == 100:  # fully relevant: any color the query names is the product's color
            named = [c for c in syn.COLORS if r["query"].startswith(c + " ")]
            assert not named or r["color"] in named, (r["query"], r["color"])
    assert len(groups) < len(rows)  # queries are shared across products
    assert len({len(r["query"].split()) for r in rows}) >= 3  # varying specificity
    for q, g in groups.items():
        g = sorted(g, key=lambda r: r["position"])
        assert [r["position"] for r in g] == list(range(1, len(g) + 1)), q
        assert all(a["score"] >= b["score"] for a, b in zip(g, g[1:])), q
    assert len({r["score"] for r in rows}) >= 4


def test_without_queries(tmp_path: Path) -> None:
    syn.generate_catalog(tmp_path / "c", products=12, seed=1, with_queries=False)
    for _split, files in read_all(tmp_path / "c").values():
        assert not {"query", "score", "position"} & set(json.loads(files["json"]))


# ------------------------------------------------------------------------------------ args, cache, CLI


def test_bad_arguments_name_the_problem(tmp_path: Path) -> None:
    check_bad_arguments_name_the_problem(syn.generate_catalog, "products", tmp_path)


def test_ensure_catalog_concurrent_callers_share_one_copy(tmp_path: Path) -> None:
    results = call_concurrently(lambda: syn.ensure_catalog(tmp_path, products=20, seed=4, image_size=32))
    assert len(set(results)) == 1
    root = results[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [root.name]  # no temp dirs left
    stamp = (root / "catalog.json").stat().st_mtime_ns
    assert syn.ensure_catalog(tmp_path, products=20, seed=4, image_size=32) == root
    assert (root / "catalog.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    cat = json.loads((root / "catalog.json").read_text())
    assert cat["splits"]["train"]["pattern"].startswith(str(root.resolve()))  # final location, not the temp dir
    other = syn.ensure_catalog(tmp_path, products=20, seed=5, image_size=32)
    assert other != root


def test_ensure_catalog_tolerates_losing_the_rename_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = syn.generate_catalog
    final = tmp_path / syn.catalog_name(10, 6, 32)

    def racing(out_dir, *args, **kwargs):  # another host finishes first, while we generate
        real(final, *args, **kwargs)
        return real(out_dir, *args, **kwargs)

    monkeypatch.setattr(catalog_write, "generate_catalog", racing)  # where ensure_catalog looks it up
    root = syn.ensure_catalog(tmp_path, products=10, seed=6, image_size=32)
    assert root == final and (root / "catalog.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [final.name]


def test_cli_writes_catalog_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "gcl.data.synthetic", str(out), "--products", "12", "--seed", "1",
                           "--per-shard", "5", "--image-size", "48"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert "products/s" in proc.stderr and "wrote 12 products" in proc.stderr
    cat = json.loads((out / "catalog.json").read_text())
    assert cat["image_size"] == 48 and sum(v["count"] for v in cat["splits"].values()) == 12
    assert json.loads((out / "train" / "sizes.json").read_text())
