"""gcl.data.prepare: user tables (CSV / JSONL / Parquet + images) -> shards.

Expected shard contents are written out by hand from the input tables; shards are read back with plain
``tarfile`` + ``json`` (and through gcl.data.stream when that module is present).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import socket
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gcl.data.prepare import PrepareError, main, prepare, sanitize_key
from gcl.data.schema import check_key


def _image(color: tuple[int, ...], size=(8, 6), fmt="JPEG", mode="RGB", exif=None) -> bytes:
    buf = io.BytesIO()
    img = Image.new(mode, size, color)
    if exif is not None:
        img.save(buf, format=fmt, exif=exif)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def _half_transparent() -> bytes:
    """20x10 RGBA PNG: left half opaque red, right half fully transparent (black underneath)."""
    img = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 10, 10))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _read_shards(folder: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of every shard listed in ``folder/sizes.json``; checks the listed counts."""
    sizes = json.loads((folder / "sizes.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for name, count in sizes.items():
        keys = set()
        with tarfile.open(folder / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                keys.add(key)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        assert len(keys) == count, f"{name}: sizes.json says {count}, tar holds {len(keys)}"
    return samples


def _fields(sample: dict[str, bytes]) -> dict:
    return json.loads(sample["json"])


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ round trips


def test_csv_with_image_paths_round_trip(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    files = {
        "a.jpg": _image((255, 0, 0)),
        "b.png": _image((0, 255, 0), fmt="PNG"),
        "c.webp": _image((0, 0, 255), fmt="WEBP"),
        "sub/d.jpg": _image((9, 9, 9), size=(5, 7)),
        "e.jpg": _image((200, 100, 0)),
    }
    for name, data in files.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(data)
    table = _write_csv(tmp_path / "products.csv", ["sku", "name", "desc", "color", "img"], [
        ["p1", "Red Dress", "A red, flowing dress", "red, white", "a.jpg"],
        ["p2", "Green Tee", "", "green", "b.png"],
        ["A.1", " Blue Scarf ", "Soft", "", "c.webp"],
        ["p-4", "Grey Coat", "Warm", "grey,,black ", "sub/d.jpg"],
        ["p_5", "Orange Hat", "Small", "orange", str(images / "e.jpg")],  # absolute path
    ])
    report = prepare(table, tmp_path / "out", fields={"title": "name", "description": "desc", "colors": "color"},
                     image_column="img", images_root=images, key_column="sku", per_shard=2, list_sep=",",
                     progress=False)

    dotted = sanitize_key("A.1")
    assert dotted != "A.1" and check_key(dotted) == dotted
    expected = {
        "p1": ({"title": "Red Dress", "description": "A red, flowing dress", "colors": ["red", "white"]},
               "jpg", files["a.jpg"]),
        "p2": ({"title": "Green Tee", "colors": ["green"]}, "png", files["b.png"]),
        dotted: ({"title": "Blue Scarf", "description": "Soft"}, "webp", files["c.webp"]),
        "p-4": ({"title": "Grey Coat", "description": "Warm", "colors": ["grey", "black"]}, "jpg",
                files["sub/d.jpg"]),
        "p_5": ({"title": "Orange Hat", "description": "Small", "colors": ["orange"]}, "jpg", files["e.jpg"]),
    }
    out = _read_shards(tmp_path / "out")
    assert set(out) == set(expected)
    for key, (fields, ext, image) in expected.items():
        assert _fields(out[key]) == fields, key
        assert out[key][ext] == image, key  # JPEG/PNG/WEBP kept byte for byte without resize/quality
        assert out[key]["txt"].decode() == fields["title"]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {
        "shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}
    assert report.written == {"": 5} and report.skipped == {} and report.rows == 5
    assert report.images_reencoded == 0
    assert report.shards[""].endswith("shard-{000000..000002}.tar")


def test_jsonl_lists_numbers_and_default_images_root(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.jpg").write_bytes(_image((1, 2, 3)))
    table = _write_jsonl(tmp_path / "t.jsonl", [
        {"id": 17, "q": "red dress", "t": "Dress", "cats": ["women", " dresses ", ""], "s": 0.5, "pos": 1,
         "path": "img/x.jpg"},
        "",  # blank lines are not rows
        {"id": "18", "q": "hat", "t": "Hat", "cats": [], "s": "2.5", "pos": "3", "path": "img/x.jpg"},
        {"id": 17, "q": "dress", "t": "Dress", "cats": None, "s": None, "path": "img/x.jpg"},
    ])
    report = prepare(table, tmp_path / "out",
                     fields={"item_id": "id", "query": "q", "title": "t", "categories": "cats", "score": "s",
                             "position": "pos"},
                     image_column="path", progress=False)
    out = _read_shards(tmp_path / "out")
    # No key column: keys are the zero-padded row index (the blank line is not counted).
    assert {k: _fields(v) for k, v in out.items()} == {
        "000000000": {"item_id": "17", "query": "red dress", "title": "Dress", "categories": ["women", "dresses"],
                      "score": 0.5, "position": 1},
        "000000001": {"item_id": "18", "query": "hat", "title": "Hat", "score": 2.5, "position": 3},
        "000000002": {"item_id": "17", "query": "dress", "title": "Dress"},
    }
    assert report.written == {"": 3}


def test_parquet_hf_image_struct_with_splits_streams_in_batches(tmp_path: Path, monkeypatch) -> None:
    colors = [(i * 20, 255 - i * 20, 7) for i in range(7)]
    images = [_image(c, fmt="PNG") for c in colors]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)], type=struct),
        "item_ID": [f"item{i}" for i in range(7)],
        "title": [f"Title {i}" for i in range(7)],
        "category": pa.array([["dresses", "women"], [], None, ["hats"], ["a"], ["b", "c"], ["d"]],
                             type=pa.list_(pa.string())),
        "split": ["train", "test", "train", "train", "test", "train", "train"],
    })
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=2)

    def _no_full_read(*args, **kwargs):
        raise AssertionError("prepare must stream Parquet in batches, not read the whole table")

    monkeypatch.setattr(pq, "read_table", _no_full_read)
    monkeypatch.setattr(pq.ParquetFile, "read", _no_full_read)
    monkeypatch.setattr("gcl.data.read._PARQUET_BATCH_ROWS", 3)

    report = prepare(path, tmp_path / "out", fields={"title": "title", "categories": "category",
                                                      "item_id": "item_ID"},
                     image_column="image", key_column="item_ID", split_column="split", per_shard=2,
                     progress=False)
    assert report.written == {"train": 5, "test": 2}
    train, test = _read_shards(tmp_path / "out" / "train"), _read_shards(tmp_path / "out" / "test")
    assert json.loads((tmp_path / "out" / "train" / "sizes.json").read_text()) == {
        "shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}
    assert json.loads((tmp_path / "out" / "test" / "sizes.json").read_text()) == {"shard-000000.tar": 2}
    assert sorted(train) == ["item0", "item2", "item3", "item5", "item6"]
    assert sorted(test) == ["item1", "item4"]
    cats = {0: ["dresses", "women"], 3: ["hats"], 4: ["a"], 5: ["b", "c"], 6: ["d"]}
    for i in range(7):
        sample = (train | test)[f"item{i}"]
        assert sample["png"] == images[i]
        expected = {"title": f"Title {i}", "item_id": f"item{i}"}
        if i in cats:
            expected["categories"] = cats[i]
        assert _fields(sample) == expected


# ------------------------------------------------------------------------------------------------ bad rows


def _bad_rows_table(tmp_path: Path) -> Path:
    good = _image((10, 20, 30))
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all")
    (tmp_path / "truncated.jpg").write_bytes(_image((10, 20, 30), size=(64, 64))[:300])
    return _write_jsonl(tmp_path / "t.jsonl", [
        {"k": "ok0", "t": "Fine", "d": "x", "s": 1, "img": "good.jpg"},
        {"k": "r1", "t": "No file", "img": "missing.jpg"},
        {"k": "r2", "t": "No image", "img": None},
        {"k": "r3", "t": "Garbage", "img": "garbage.jpg"},
        {"k": "r4", "t": "Truncated", "img": "truncated.jpg"},
        {"k": "r5", "t": "  ", "img": "good.jpg"},
        {"k": "r6", "t": "Number", "d": 42, "img": "good.jpg"},
        {"k": "r7", "t": "Score", "s": "high", "img": "good.jpg"},
        {"k": "ok0", "t": "Duplicate", "img": "good.jpg"},
        {"k": None, "t": "No key", "img": "good.jpg"},
        "{oops",
        {"k": "ok1", "t": "Fine too", "img": "good.jpg"},
    ])


def test_bad_rows_are_skipped_counted_and_rejected(tmp_path: Path) -> None:
    table = _bad_rows_table(tmp_path)
    reject = tmp_path / "logs" / "rejects.jsonl"
    report = prepare(table, tmp_path / "out", fields={"title": "t", "description": "d", "score": "s"},
                     image_column="img", key_column="k", required=["title"], reject_file=reject,
                     progress=False)
    assert report.written == {"": 2}
    assert report.rows == 12
    assert report.skipped == {"missing_image": 2, "unreadable_image": 2, "empty_required": 1,
                              "non_string_field": 1, "bad_number": 1, "duplicate_key": 1, "missing_key": 1,
                              "unparsable_row": 1}
    assert sorted(_read_shards(tmp_path / "out")) == ["ok0", "ok1"]
    lines = [json.loads(line) for line in reject.read_text().splitlines()]
    assert [(r["row"], r["key"], r["reason"]) for r in lines] == [
        (1, "r1", "missing_image"), (2, "r2", "missing_image"), (3, "r3", "unreadable_image"),
        (4, "r4", "unreadable_image"), (5, "r5", "empty_required"), (6, "r6", "non_string_field"),
        (7, "r7", "bad_number"), (8, "ok0", "duplicate_key"), (9, None, "missing_key"),
        (10, None, "unparsable_row"),
    ]
    assert "missing.jpg" in lines[0]["detail"] and "'description'" in lines[5]["detail"]


def test_strict_raises_naming_the_row_and_leaves_no_shards(tmp_path: Path) -> None:
    table = _bad_rows_table(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=r"row 1 \(key 'r1'\): missing_image: .*missing\.jpg"):
        prepare(table, out, fields={"title": "t"}, image_column="img", key_column="k", per_shard=1,
                strict=True, progress=False)
    # Row 0 had completed a shard (per_shard=1); a failed run removes it so a rerun starts clean.
    assert list(out.rglob("*.tar*")) == [] and not (out / "sizes.json").exists()


def test_url_images_fail_at_once_without_network(tmp_path: Path, monkeypatch) -> None:
    def _no_network(*args, **kwargs):
        raise AssertionError("prepare must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    rows = [["t", "https://example.com/img.jpg"]] + [["t", f"s3://bucket/{i}.jpg"] for i in range(2000)]
    table = _write_csv(tmp_path / "t.csv", ["title", "url"], rows)
    start = time.perf_counter()
    with pytest.raises(PrepareError, match=r"row 0: .*URL.*https://example\.com/img\.jpg.*[Dd]ownload"):
        prepare(table, tmp_path / "out", fields={"title": "title"}, image_column="url", progress=False)
    assert time.perf_counter() - start < 5
    # Not even --strict-less skipping: a URL is a usage error, raised on the first such row.
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": "http://h/x.png"}], type=struct),
                             "title": ["t"]}), tmp_path / "t.parquet")
    with pytest.raises(PrepareError, match="http://h/x.png"):
        prepare(tmp_path / "t.parquet", tmp_path / "out2", fields={"title": "title"}, image_column="image",
                progress=False)


# ------------------------------------------------------------------------------------------ image options


def test_resize_quality_alpha_and_exif(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = {
        "big.jpg": _image((200, 10, 10), size=(300, 120)),
        "clear.png": _half_transparent(),
        "rotated.jpg": _image((50, 60, 70), size=(40, 20), exif=exif.tobytes()),
        "small.gif": _image(3, size=(10, 10), fmt="GIF", mode="P"),
    }
    for name, payload in data.items():
        (tmp_path / name).write_bytes(payload)
    table = _write_csv(tmp_path / "t.csv", ["title", "img"], [[n, n] for n in data])

    report = prepare(table, tmp_path / "resized", fields={"title": "title"}, image_column="img", resize=64,
                     progress=False)
    out = {_fields(s)["title"]: s for s in _read_shards(tmp_path / "resized").values()}
    assert report.images_reencoded == 4
    sizes = {}
    for name, sample in out.items():
        assert set(sample) == {"jpg", "json", "txt"}, name
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB"
        sizes[name] = img.size
    assert sizes["big.jpg"] == (64, 26)  # 300x120 scaled by 64/300, aspect kept
    assert sizes["rotated.jpg"] == (20, 40)  # the EXIF rotation is applied
    assert sizes["clear.png"] == (20, 10)  # never enlarged
    assert sizes["small.gif"] == (10, 10)
    # A transparent background becomes white, not black; opaque pixels keep their colour.
    cutout = Image.open(io.BytesIO(out["clear.png"]["jpg"]))
    assert min(cutout.getpixel((17, 5))) >= 245
    red = cutout.getpixel((2, 5))
    assert red[0] >= 240 and red[1] <= 15 and red[2] <= 15

    # No options: JPEG/PNG kept as is, the GIF and the EXIF-rotated JPEG re-encoded.
    report = prepare(table, tmp_path / "kept", fields={"title": "title"}, image_column="img", progress=False)
    kept = {_fields(s)["title"]: s for s in _read_shards(tmp_path / "kept").values()}
    assert kept["big.jpg"]["jpg"] == data["big.jpg"] and kept["clear.png"]["png"] == data["clear.png"]
    assert Image.open(io.BytesIO(kept["rotated.jpg"]["jpg"])).size == (20, 40)
    assert "jpg" in kept["small.gif"] and report.images_reencoded == 2

    # Quality alone re-encodes everything as JPEG; lower quality gives smaller files.
    noisy = Image.effect_noise((128, 128), 64).convert("RGB")
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    (tmp_path / "noise.png").write_bytes(buf.getvalue())
    one = _write_csv(tmp_path / "one.csv", ["title", "img"], [["n", "noise.png"]])
    lengths = []
    for q in (20, 90):
        prepare(one, tmp_path / f"q{q}", fields={"title": "title"}, image_column="img", jpeg_quality=q,
                progress=False)
        (sample,) = _read_shards(tmp_path / f"q{q}").values()
        lengths.append(len(sample["jpg"]))
    assert lengths[0] < lengths[1]


# ----------------------------------------------------------------------------------- errors, CLI, workers


def test_option_and_column_errors(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(_image((1, 1, 1)))
    table = _write_csv(tmp_path / "t.csv", ["name", "img"], [["x", "a.jpg"]])
    with pytest.raises(PrepareError, match=r"\['nme'\] not found .*available columns: \['name', 'img'\]"):
        prepare(table, tmp_path / "o", fields={"title": "nme"}, image_column="img", progress=False)
    with pytest.raises(PrepareError, match="required field.*'description'.*not mapped"):
        prepare(table, tmp_path / "o", fields={"title": "name"}, image_column="img", required=["description"],
                progress=False)
    with pytest.raises(PrepareError, match="--format"):
        prepare(tmp_path / "a.jpg", tmp_path / "o", fields={"title": "name"}, image_column="img",
                progress=False)
    with pytest.raises(PrepareError, match="no sample written.*missing_image=1"):
        prepare(table, tmp_path / "o", fields={"title": "name"}, image_column="name", progress=False)


def test_cli_end_to_end_and_overwrite(tmp_path: Path, capsys) -> None:
    pq.write_table(pa.table({
        "image": [_image((i, i, i)) for i in range(4)],  # plain binary column
        "name": ["a", "b", "c", "d"],
        "cat": ["x|y", "z", "", "w"],
        "split": ["train", "train", "val", "val"],
    }), tmp_path / "t.parquet")
    argv = [str(tmp_path / "t.parquet"), str(tmp_path / "out"), "--field", "title=name",
            "--field", "categories=cat", "--list-sep", "|", "--split-column", "split", "--required", "title",
            "--no-progress"]
    assert main(argv) == 0
    train = _read_shards(tmp_path / "out" / "train")
    assert [_fields(train[k]) for k in sorted(train)] == [
        {"title": "a", "categories": ["x", "y"]}, {"title": "b", "categories": ["z"]}]
    assert len(_read_shards(tmp_path / "out" / "val")) == 2

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--max-rows", "1"]) == 0
    assert list((tmp_path / "out").rglob("sizes.json")) == [tmp_path / "out" / "train" / "sizes.json"]

    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "t.parquet"), str(tmp_path / "o2"), "--field", "title=nope", "--no-progress"])
    assert exc.value.code == 2 and "'nope'" in capsys.readouterr().err


def test_worker_processes_give_identical_shards(tmp_path: Path) -> None:
    rows = []
    for i in range(40):
        (tmp_path / f"{i}.png").write_bytes(_image((i, 2 * i, 3 * i), size=(30 + i, 20), fmt="PNG"))
        rows.append([f"t{i}", f"{i}.png" if i != 33 else "gone.png"])
    table = _write_csv(tmp_path / "t.csv", ["title", "img"], rows)
    kwargs = dict(fields={"title": "title"}, image_column="img", resize=16, per_shard=7, progress=False)
    serial = prepare(table, tmp_path / "serial", **kwargs)
    parallel = prepare(table, tmp_path / "parallel", workers=2, **kwargs)
    assert serial.written == parallel.written == {"": 39}
    assert serial.skipped == parallel.skipped == {"missing_image": 1}
    assert (tmp_path / "serial" / "sizes.json").read_text() == (tmp_path / "parallel" / "sizes.json").read_text()
    for name in json.loads((tmp_path / "serial" / "sizes.json").read_text()):
        with tarfile.open(tmp_path / "serial" / name) as a, tarfile.open(tmp_path / "parallel" / name) as b:
            assert a.getnames() == b.getnames()  # same samples in the same order
            for member in a.getmembers():
                assert a.extractfile(member).read() == b.extractfile(member.name).read()


def test_folder_of_parquet_files_and_gzipped_tsv(tmp_path: Path) -> None:
    parts = tmp_path / "data"
    parts.mkdir()
    for n in range(2):  # the Hugging Face layout: data/test-0000n-of-00002.parquet
        pq.write_table(pa.table({"image": [_image((n, 0, 0)), _image((n, 9, 0))], "t": [f"f{n}a", f"f{n}b"]}),
                       parts / f"test-{n:05d}-of-00002.parquet")
    (parts / "README.md").write_text("not a table")
    report = prepare(parts, tmp_path / "out", fields={"title": "t"}, image_column="image", progress=False)
    out = _read_shards(tmp_path / "out")
    assert {k: _fields(v)["title"] for k, v in out.items()} == {
        "000000000": "f0a", "000000001": "f0b", "000000002": "f1a", "000000003": "f1b"}
    assert report.rows == 4

    (tmp_path / "i.png").write_bytes(_image((1, 2, 3), fmt="PNG"))
    with gzip.open(tmp_path / "t.tsv.gz", "wt", encoding="utf-8") as fh:
        fh.write("\ufeffname\tcolors\tpic\nShirt, slim\tred; blue\ti.png\n")  # BOM, as spreadsheets write
    prepare(tmp_path / "t.tsv.gz", tmp_path / "tsv", fields={"title": "name", "colors": "colors"},
            image_column="pic", list_sep=";", progress=False)
    (sample,) = _read_shards(tmp_path / "tsv").values()
    assert _fields(sample) == {"title": "Shirt, slim", "colors": ["red", "blue"]}


def test_sanitized_keys_stay_distinct() -> None:
    keys = [sanitize_key(k) for k in ("a.b", "a_b", "a/b", "a b", "ok-key_1")]
    assert len(set(keys)) == 5
    assert keys[1] == "a_b" and keys[4] == "ok-key_1"
    assert all(check_key(k) == k for k in keys)


def test_worker_read_ahead_is_bounded(tmp_path: Path, monkeypatch) -> None:
    pulled = []

    def _rows(files, fmt, columns):
        for i in range(100_000):
            pulled.append(i)
            yield {"title": "t", "img": "http://x/y.jpg" if i == 0 else "y.jpg"}

    monkeypatch.setattr("gcl.data.prepare._iter_rows", _rows)
    table = _write_csv(tmp_path / "t.csv", ["title", "img"], [["t", "y.jpg"]])
    with pytest.raises(PrepareError, match="URL"):
        prepare(table, tmp_path / "out", fields={"title": "title"}, image_column="img", workers=1,
                progress=False)
    assert len(pulled) <= 3 * 32  # two chunks of 32 in flight plus the one being filled, not the table


def test_round_trip_through_the_eval_loader(tmp_path: Path) -> None:
    """Table -> prepare -> gcl.data.stream.build_eval_loader gives back the table's values."""
    import open_clip
    import torch

    from gcl.data.stream import build_eval_loader

    colors = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "image": pa.array([{"bytes": _image(c, size=(16, 16)), "path": None} for c in colors], type=struct),
        "query": ["red dress", "green tee", "blue scarf", "yellow hat", "cyan coat"],
        "title": ["Dress", "Tee", "Scarf", "Hat", "Coat"],
        "category": pa.array([["women", "dresses"], ["tops"], None, ["hats"], ["coats"]],
                             type=pa.list_(pa.string())),
        "position": [1, 2, None, 4, 5],
        "item_ID": ["i1", "i2", "i3", "i4", "i5"],
    }), tmp_path / "eval.parquet")
    report = prepare(tmp_path / "eval.parquet", tmp_path / "out", key_column="item_ID", per_shard=2,
                     fields={"query": "query", "title": "title", "categories": "category", "position": "position",
                             "item_id": "item_ID"},
                     image_column="image", progress=False)

    def to_tensor(img: Image.Image) -> torch.Tensor:  # FloatTensor[3, 16, 16] in [0, 1]
        return torch.tensor(list(img.getdata()), dtype=torch.float32).T.reshape(3, 16, 16) / 255

    fields = ["query", "title", "categories"]
    loader = build_eval_loader(report.shards[""], tokenizer=open_clip.get_tokenizer("ViT-B-32"),
                               context_length={f: 16 for f in fields}, image_transform=to_tensor,
                               batch_size=2, fields=fields, num_workers=0)
    got: dict[str, tuple] = {}
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            got[key] = (batch["text"]["query"][i], batch["text"]["title"][i], batch["text"]["categories"][i],
                        float(batch["position"][i]), batch["image"][i].mean(dim=(1, 2)))
    assert loader.skipped == {}
    assert sorted(got) == ["i1", "i2", "i3", "i4", "i5"]
    expected = {"i1": ("red dress", "Dress", "women, dresses", 1.0), "i2": ("green tee", "Tee", "tops", 2.0),
                "i3": ("blue scarf", "Scarf", None, float("nan")), "i4": ("yellow hat", "Hat", "hats", 4.0),
                "i5": ("cyan coat", "Coat", "coats", 5.0)}
    for n, key in enumerate(sorted(got)):
        query, title, cats, position, mean_rgb = got[key]
        exp = expected[key]
        assert (query, title, cats) == exp[:3]
        assert position == exp[3] or (math.isnan(position) and math.isnan(exp[3]))  # NaN where missing
        assert torch.allclose(mean_rgb, torch.tensor(colors[n], dtype=torch.float32) / 255, atol=0.03)
