"""The general world: determinism, every attribute visible in pixels, text rules, splits, shards, cache, CLI.

The visual checks are plain pixel statistics written here, independent of the renderer's code: the border
median gives the background (nearest published background colour), pixels far from it are the foreground,
the nearest palette colour of foreground pixels gives an object's colour, bounding-box-normalised masks +
nearest centroid tell classes apart, connected components (scipy) count objects, and colour centroids give
left/right/above/below.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
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
    shard_digests,
)
from PIL import Image
from scipy import ndimage

from gcl.data import world as W
from gcl.data.world.scene import rng

N = 300


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world") / "w"
    return out, W.generate_world(out, samples=N, seed=3, per_shard=64)


def read_all(root: Path) -> dict[str, tuple[str, dict, np.ndarray]]:
    """key -> (split, fields, RGB float array) over every split."""
    out = {}
    for s in W.SPLITS:
        for k, v in read_split(root, s).items():
            out[k] = (s, json.loads(v["json"]), np.asarray(Image.open(io.BytesIO(v["jpg"])).convert("RGB"), float))
    return out


def tree_digest(root: Path) -> dict[str, str]:
    return shard_digests(root, "world.json")


# ------------------------------------------------------------------------------------ pixel "classifiers"

PALETTE_NAMES = list(W.COLORS)
PALETTE = np.array([W.COLORS[n] for n in PALETTE_NAMES], dtype=float)
BG_NAMES = list(W.BACKGROUNDS)
BG_RGB = np.array([W.BACKGROUNDS[n].rgb for n in BG_NAMES], dtype=float)


def border_median(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def background_name(img: np.ndarray) -> str:
    return BG_NAMES[int(np.argmin(((BG_RGB - border_median(img)) ** 2).sum(-1)))]


def foreground(img: np.ndarray) -> np.ndarray:
    """Pixels far from the published colour of the picture's background."""
    bg = BG_RGB[BG_NAMES.index(background_name(img))]
    return np.linalg.norm(img - bg, axis=-1) > 45


def nearest_palette(px: np.ndarray) -> np.ndarray:
    return np.argmin(((px[:, None, :] - PALETTE[None]) ** 2).sum(-1), axis=1)


def dominant_color(img: np.ndarray) -> str:
    idx = nearest_palette(img[foreground(img)])
    return PALETTE_NAMES[int(np.bincount(idx, minlength=len(PALETTE)).argmax())]


def components(img: np.ndarray, min_px: int = 6) -> list[np.ndarray]:
    """Foreground connected components (8-connectivity) of at least ``min_px`` pixels."""
    lab, n = ndimage.label(foreground(img), structure=np.ones((3, 3)))
    sizes = np.bincount(lab.ravel())
    return [lab == i for i in range(1, n + 1) if sizes[i] >= min_px]


def silhouette(img: np.ndarray) -> np.ndarray:
    """Foreground mask cropped to its box, 16x16, averaged with its mirror (objects may face either way),
    plus the log aspect ratio."""
    m = foreground(img)
    ys, xs = np.nonzero(m)
    crop = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    small = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((16, 16), Image.BILINEAR)) / 255.0
    h, w = crop.shape
    return np.concatenate([((small + small[:, ::-1]) / 2).ravel(), [4 * np.log(w / h)]])


def single(label: str, color: str = "red", *, count: int = 1, pattern: str = "plain", pattern_color=None,
           background: str = "studio") -> dict:
    return {"scene": "single", "relation": None, "background": background,
            "objects": [{"label": label, "color": color, "pattern": pattern, "pattern_color": pattern_color,
                         "count": count}]}


def render(scene: dict, i: int) -> np.ndarray:
    return np.asarray(W.render_scene(scene, 64, rng(99, i)), dtype=float)


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    check_same_seed_same_bytes(W.generate_world, "samples", tmp_path, "world.json", "world.parquet")


def test_a_sample_does_not_depend_on_the_world_size(tmp_path: Path, world: tuple[Path, dict]) -> None:
    """Sample i has the same split and bytes in a 60-sample world as in the 300-sample one (no leakage when a
    model pretrained on a big world is evaluated on a small one)."""
    root, _ = world
    W.generate_world(tmp_path / "small", samples=60, seed=3, per_shard=64)
    big = {s: read_split(root, s) for s in W.SPLITS}
    for s in W.SPLITS:
        for key, files in read_split(tmp_path / "small", s).items():
            assert big[s][key] == files, (s, key)


@pytest.mark.dist
def test_bytes_independent_of_worker_count(tmp_path: Path) -> None:
    check_bytes_independent_of_worker_count(W.generate_world, "samples", tmp_path, "world.json", "world.parquet")


# ------------------------------------------------------------------------------------ shards, table, splits


def test_shards_table_and_fields(world: tuple[Path, dict]) -> None:
    root, meta = world
    rows = {r["item_id"]: r for r in pq.read_table(root / "world.parquet").to_pylist()}
    samples = read_all(root)
    assert len(rows) == len(samples) == N
    for split in W.SPLITS:
        sizes = json.loads((root / split / "sizes.json").read_text())
        assert sum(sizes.values()) == meta["splits"][split]["count"] == sum(r["split"] == split for r in rows.values())
    for key, (split, fields, img) in samples.items():
        r = rows[key]
        assert r["split"] == split and (root / r["shard"]).is_file() and fields["item_id"] == key
        assert img.shape == (64, 64, 3)
        assert set(W.FIELDS) <= set(fields) and all(isinstance(v, str) and v for v in fields.values()), fields
        assert {k: r[k] for k in fields} == fields
        assert fields["label"] in W.CLASSES and fields["color"] in W.COLORS
        assert W.CLASSES[fields["label"]].category == fields["category"]
        assert (fields["scene"] == "pair") == ("relation" in fields) == ("single_label" not in fields)
    assert W.load_world(root)["splits"]["train"]["pattern"] == meta["splits"]["train"]["pattern"]
    counts = Counter(f["scene"] for _, f, _ in samples.values())
    assert counts["single"] > counts["pair"] > 0.25 * N
    assert set(Counter(f["count"] for _, f, _ in samples.values())) == {"1", "2", "3", "4"}
    assert len(Counter(f["caption_form"] for _, f, _ in samples.values())) == 3


def test_vocabulary_size() -> None:
    assert len(W.CLASSES) >= 40 and len(W.CATEGORIES) >= 6 and len(W.COLORS) >= 16
    assert len(W.PATTERN_NAMES) >= 5 and len(W.BACKGROUNDS) >= 6 and len(W.RELATIONS) == 4
    # concepts shared with the fashion catalog: the colours (same RGB) and the basic patterns
    from gcl.data import synthetic as syn

    assert {k: v[0] for k, v in syn.COLORS.items()} == W.COLORS
    assert {"striped", "checked", "polka dot"} <= set(W.PATTERN_NAMES) & set(syn.PATTERN_NAMES)


def test_heldout_combinations_only_in_test_heldout(world: tuple[Path, dict]) -> None:
    root, meta = world
    held = {(h["color"], h["label"]) for h in meta["heldout_combos"]}
    assert len(held) == len(W.CLASSES)
    rows = pq.read_table(root / "world.parquet").to_pylist()
    for r in rows:
        combos = {(r["color"], r["label"])} | ({(r["color2"], r["label2"])} if r["label2"] else set())
        assert bool(combos & held) == (r["split"] == "test_heldout"), r
    counts = Counter(r["split"] for r in rows)
    assert counts["test_heldout"] > 0 and counts["val"] > 0 and counts["test"] > 0
    iid = N - counts["test_heldout"]
    assert abs(counts["train"] / iid - 0.8) < 0.08  # a per-sample draw: binomial, sd ~0.024
    train = [r for r in rows if r["split"] == "train"]
    assert all(any(r["color"] == c for r in train) for c, _ in held)  # held-out colours are seen otherwise


# ------------------------------------------------------------------------------------ visible signal


def test_color_and_background_are_in_the_pixels(world: tuple[Path, dict]) -> None:
    hits = bg_hits = n = 0
    for _split, fields, img in read_all(world[0]).values():
        bg_hits += background_name(img) == fields["background"]
        if fields["scene"] == "single":
            n += 1
            hits += dominant_color(img) == fields["color"]
    assert bg_hits == N, f"background from the border: {bg_hits}/{N}"
    assert n > 100 and hits / n >= 0.9, f"palette classifier agrees on only {hits}/{n}"


def test_counts_are_connected_components(world: tuple[Path, dict]) -> None:
    hits = n = 0
    for _split, fields, img in read_all(world[0]).values():
        if fields["scene"] == "single":
            n += 1
            hits += len(components(img)) == int(fields["count"])
    assert hits / n >= 0.95, f"components == count in {hits}/{n}"


def test_relations_from_colour_centroids(world: tuple[Path, dict]) -> None:
    """In a pair picture, the centroid of the pixels of the first object's colour lies to the left of /
    above / ... that of the second object's colour, as the relation says."""
    yy, xx = np.mgrid[0:64, 0:64]
    hits = n = 0
    for _split, f, img in read_all(world[0]).values():
        if f["scene"] != "pair":
            continue
        fg = foreground(img)
        idx = np.full(fg.shape, -1)
        idx[fg] = nearest_palette(img[fg])
        a, b = idx == PALETTE_NAMES.index(f["color"]), idx == PALETTE_NAMES.index(f["color2"])
        (ay, ax), (by, bx) = [(yy[m].mean(), xx[m].mean()) for m in (a, b)]
        ok = {"left of": ax < bx - 8, "right of": ax > bx + 8, "above": ay < by - 8, "below": ay > by + 8}
        hits += ok[f["relation"]]
        n += 1
    assert n > 50 and hits / n >= 0.95, f"relation from centroids holds in {hits}/{n}"


def test_silhouettes_separate_classes() -> None:
    """Nearest centroid on mirrored, box-normalised masks of one object per picture, fit on half."""
    feats, labels = [], []
    for i in range(8):
        for label in W.CLASS_NAMES:
            color = W.COLOR_NAMES[(i * 5 + len(labels)) % 16]
            bg = "night" if color in ("white", "beige", "yellow", "light blue", "pink") else "studio"
            feats.append(silhouette(render(single(label, color, background=bg), len(labels))))
            labels.append(label)
    x, y = np.stack(feats), np.array(labels)
    fit = (np.arange(len(y)) // len(W.CLASS_NAMES)) % 2 == 0  # 4 pictures per class to fit, 4 to test
    classes = sorted(set(y))
    centroids = np.stack([x[fit & (y == c)].mean(0) for c in classes])
    pred = np.array(classes)[np.argmin(((x[~fit][:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    acc = float((pred == y[~fit]).mean())
    assert acc >= 0.8 > 30 / len(classes), f"class accuracy {acc:.2f} (chance {1 / len(classes):.3f})"


def test_patterns_show_their_colour() -> None:
    def share(pattern: str, i: int) -> float:
        img = render(single("cup", "blue", pattern=pattern, pattern_color=None if pattern == "plain" else "yellow"), i)
        idx = nearest_palette(img[foreground(img)])
        return float((idx == PALETTE_NAMES.index("yellow")).mean())

    for i in range(3):
        assert share("plain", i) < 0.02
        for pattern in W.PATTERN_NAMES[1:]:
            assert 0.06 < share(pattern, i) < 0.45, pattern


def test_stripes_and_checks_differ() -> None:
    """Horizontal stripes fill whole rows of the object with the pattern colour and no column; vertical
    stripes the reverse; checks fill some rows and some columns."""
    def line_fill(pattern: str, i: int) -> tuple[float, float]:
        img = render(single("heart", "blue", count=1, pattern=pattern, pattern_color="yellow"), i)
        fg = foreground(img)
        yel = np.zeros(fg.shape, bool)
        yel[fg] = nearest_palette(img[fg]) == PALETTE_NAMES.index("yellow")

        def full(axis: int) -> float:  # share of the object's rows (axis=1) / columns (0) mostly yellow
            n = fg.sum(axis)
            return float(((yel.sum(axis) / np.maximum(n, 1) > 0.7) & (n >= 8)).sum() / (n >= 8).sum())

        return full(1), full(0)

    stripes = [line_fill("striped", i) for i in range(10)]
    checks = [line_fill("checked", i) for i in range(6)]
    horizontal = [r > 0.15 and c == 0 for r, c in stripes]
    vertical = [c > 0.15 and r == 0 for r, c in stripes]
    assert all(h or v for h, v in zip(horizontal, vertical)), stripes
    assert sum(horizontal) >= 4, stripes  # about 70% of striped objects have horizontal stripes
    assert all(r > 0.05 and c > 0.05 for r, c in checks), checks


def test_render_scales_and_is_deterministic() -> None:
    scene = W.sample_scene(rng(1))
    for size in (32, 64, 224):
        a, b = (W.render_scene(scene, size, rng(2)) for _ in range(2))
        assert a.size == (size, size) and a.tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="image_size"):
        W.render_scene(scene, 8, rng(2))


# ------------------------------------------------------------------------------------ text


def test_texts_follow_the_scene(world: tuple[Path, dict]) -> None:
    forms = Counter()
    for _split, f, _img in read_all(world[0]).values():
        cls = W.CLASSES[f["label"]]
        n = int(f["count"])
        noun = cls.noun(f["label"], n)
        assert noun in f["title"] and f["color"] in f["title"] and f["sentence"].startswith(f["title"].split(" ")[0])
        assert W.BACKGROUNDS[f["background"]].phrase in f["sentence"]
        if n > 1:
            assert f["title"].startswith(("two ", "three ", "four "))
        if f["pattern"] != "plain":
            assert f["pattern_color"] in f["title"]
        if f["scene"] == "pair":
            assert f"{f['label']} {f['relation']} " in f["title"] or f["relation"] in f["title"]
            assert f["label2"] in f["title"] and f["color2"] in f["title"]
        forms[f["caption_form"]] += 1
        if f["caption_form"] == "attributes":
            assert f["label"] in f["caption"]
    assert min(forms.values()) > 0.15 * N


# ------------------------------------------------------------------------------------ args, cache, CLI


def test_bad_arguments_name_the_problem(tmp_path: Path) -> None:
    check_bad_arguments_name_the_problem(W.generate_world, "samples", tmp_path)


def test_ensure_world_concurrent_callers_share_one_copy(tmp_path: Path) -> None:
    results = call_concurrently(lambda: W.ensure_world(tmp_path, samples=20, seed=4, image_size=32))
    assert len(set(results)) == 1
    root = results[0]
    assert root.name == W.world_name(20, 4, 32) and (root / "world.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [root.name]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "gcl.data.world", str(out), "--samples", "12", "--seed", "1",
                        "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 12 samples" in r.stderr and "samples/s" in r.stderr
    assert json.loads((out / "world.json").read_text())["samples"] == 12
    assert tree_digest(out) == tree_digest(W.ensure_world(tmp_path / "cache", samples=12, seed=1))
