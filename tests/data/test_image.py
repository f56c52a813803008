"""Faithful images (issue 12.8): every path that reads an image gives the pixels the file means.

Inputs are built from numpy arrays here (RGBA, LA, a palette with per-index transparency, 16-bit greyscale,
CMYK JPEG, an EXIF-rotated PNG); the reference picture of each is computed from those arrays with numpy
(alpha compositing, /257 scaling, the CMYK formula, np.rot90), never with gcl's decoder. Paths: the training
stream, the eval loader, prepare (files kept, and re-encoded by --resize), a table eval source and the
gallery images of a shard eval source.
"""
from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from gcl.data import stream as S
from gcl.data.image import to_rgb
from gcl.data.prepare import prepare
from gcl.data.read import DEFAULT_JPEG_QUALITY
from gcl.eval import tasks as T
from gcl.eval.sources import ShardDocs

BG = (32, 96, 200)  # a configured background: blue-ish, so neither white nor black can pass by chance
H, W = 16, 16


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _composite(rgb: np.ndarray, alpha: np.ndarray, bg) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.round(rgb.astype(np.float64) * a + np.asarray(bg, np.float64) * (1 - a)).astype(np.uint8)


def make_inputs(bg) -> dict[str, tuple[bytes, str, np.ndarray]]:
    """name -> (encoded file, extension, reference RGB uint8 [h, w, 3] for background ``bg``)."""
    rng = np.random.default_rng(0)
    out = {}
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[0, :, 3], rgba[1, :, 3] = 0, 255  # fully transparent and opaque rows besides the random alphas
    out["rgba"] = (_png(Image.fromarray(rgba, "RGBA")), "png", _composite(rgba[..., :3], rgba[..., 3], bg))
    la = rng.integers(0, 256, (H, W, 2), dtype=np.uint8)
    grey = np.repeat(la[..., :1], 3, axis=-1)
    out["la"] = (_png(Image.fromarray(la, "LA")), "png", _composite(grey, la[..., 1], bg))
    palette = rng.integers(0, 256, (8, 3), dtype=np.uint8)
    trns = np.array([0, 64, 128, 255, 255, 200, 10, 255], dtype=np.uint8)
    idx = rng.integers(0, 8, (H, W), dtype=np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette.flatten().tolist())
    out["p_trns"] = (_png(p, transparency=trns.tobytes()), "png", _composite(palette[idx], trns[idx], bg))
    v16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    v16[0, :4] = [0, 65535, 128, 32895]  # extremes and values near a rounding step
    ref16 = np.round(v16 / 257).astype(np.uint8)
    out["i16"] = (_png(Image.fromarray(v16)), "png", np.repeat(ref16[..., None], 3, axis=-1))
    cmyk = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(cmyk, "CMYK").save(buf, format="JPEG", quality=95)
    raw = np.asarray(Image.open(io.BytesIO(buf.getvalue()))).astype(np.float64)  # the decoded C, M, Y, K
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "CMYK"
    ref = np.round((255 - raw[..., :3]) * (255 - raw[..., 3:]) / 255).astype(np.uint8)
    out["cmyk"] = (buf.getvalue(), "jpg", ref)
    tall = rng.integers(0, 256, (H, W // 2, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: rotate 90 degrees clockwise to display
    out["exif6"] = (_png(Image.fromarray(tall), exif=exif.tobytes()), "png", np.rot90(tall, k=-1))
    return out


def _pixels(img: Image.Image) -> torch.Tensor:
    """The image transform of these tests: the RGB pixels as they are, uint8 [h, w, 3]."""
    assert img.mode == "RGB"
    return torch.from_numpy(np.array(img))


def _write_shards(folder: Path, inputs) -> str:
    folder.mkdir(parents=True)
    with tarfile.open(folder / "s-0.tar", "w") as tf:
        for name, (data, ext, _) in inputs.items():
            for member, payload in ((f"{name}.{ext}", data), (f"{name}.json", json.dumps({"title": name}).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    (folder / "sizes.json").write_text(json.dumps({"s-0.tar": len(inputs)}))
    return str(folder / "s-0.tar")


def _check(got: dict[str, np.ndarray], inputs, path: str) -> None:
    assert set(got) == set(inputs), path
    for name, (_, _, ref) in inputs.items():
        assert got[name].shape == ref.shape, (path, name)
        diff = np.abs(got[name].astype(int) - ref.astype(int))
        assert diff.max() == 0, f"{path}: {name} differs from the reference by up to {diff.max()}"


@pytest.fixture(scope="module")
def tok():
    return open_clip.get_tokenizer("ViT-B-32")


def _loader_pixels(loader) -> dict[str, np.ndarray]:
    return {b["key"][0]: b["image"][0].numpy() for b in loader}


def test_stream_and_eval_loader_decode_faithfully(tmp_path, tok):
    inputs = make_inputs(BG)
    url = _write_shards(tmp_path / "shards", inputs)
    kw = dict(tokenizer=tok, context_length={"title": 8}, image_transform=_pixels, batch_size=1, fields=["title"],
              num_workers=0)
    _check(_loader_pixels(S.build_eval_loader(url, image_background="#2060c8", **kw)), inputs, "eval loader")
    train = S.build_train_stream(url, seed=0, shuffle_buffer=1, image_background=BG, **kw)
    got = {}
    for b in train:
        got[b["key"][0]] = b["image"][0].numpy()
        if len(got) == len(inputs):
            break
    _check(got, inputs, "training stream")
    # the default background is white
    _check(_loader_pixels(S.build_eval_loader(url, **kw)), make_inputs((255, 255, 255)), "eval loader, default")


def test_prepare_kept_and_resized_decode_faithfully(tmp_path, tok):
    inputs = make_inputs(BG)
    images = tmp_path / "images"
    images.mkdir()
    with open(tmp_path / "t.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "title", "img"])
        for name, (data, ext, _) in inputs.items():
            (images / f"{name}.{ext}").write_bytes(data)
            w.writerow([name, name, f"{name}.{ext}"])
    kw = dict(fields={"title": "title"}, image_column="img", images_root=images, key_column="key", progress=False)
    loader_kw = dict(tokenizer=tok, context_length={"title": 8}, image_transform=_pixels, batch_size=1,
                     fields=["title"], num_workers=0, image_background=BG)
    # kept: the files go into the shards as they are and the loader decodes them (the EXIF-rotated one is
    # re-encoded even without options, so prepare bakes its rotation in: it is checked with the JPEGs below)
    kept = prepare(tmp_path / "t.csv", tmp_path / "kept", **kw)
    got = _loader_pixels(S.build_eval_loader(kept.shards[""], **loader_kw))
    _check({k: v for k, v in got.items() if k != "exif6"}, {k: v for k, v in inputs.items() if k != "exif6"},
           "prepare (kept) + loader")
    # re-encoded: prepare composites, scales and rotates itself, then writes JPEG at its quality; the
    # reference goes through the same JPEG codec at the same quality
    resized = prepare(tmp_path / "t.csv", tmp_path / "resized", resize=64, image_background="#2060c8", **kw)
    assert resized.images_reencoded == len(inputs)
    got = {}
    for b in S.build_eval_loader(resized.shards[""], **loader_kw):
        got[b["key"][0]] = b["image"][0].numpy()
    jpeg = {}
    for name, (_, _, ref) in inputs.items():
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(ref)).save(buf, format="JPEG", quality=DEFAULT_JPEG_QUALITY)
        jpeg[name] = (b"", "jpg", np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    _check(got, jpeg, "prepare --resize")
    _check({"exif6": got["exif6"]}, {"exif6": jpeg["exif6"]}, "prepare, EXIF rotation baked in")


def test_eval_sources_decode_faithfully(tmp_path):
    inputs = make_inputs(BG)
    images = tmp_path / "images"
    images.mkdir()
    with open(tmp_path / "docs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["title", "img"])
        for name, (data, ext, _) in inputs.items():
            (images / f"{name}.{ext}").write_bytes(data)
            w.writerow([name, f"{name}.{ext}"])
    spec = T.SourceSpec("table", (str(tmp_path / "docs.csv"),), (("title", "title"),), "img", str(images))
    reader = T.TableReader(spec, ["title"], image_background=BG)
    got = {t: np.asarray(reader.open_image(p)) for t, p in zip(reader.meta["title"], reader.paths)}
    _check(got, inputs, "table eval source")
    gallery = ShardDocs([_write_shards(tmp_path / "shards", inputs)], BG).images(list(inputs))
    _check({n: np.asarray(im) for n, im in zip(inputs, gallery)}, inputs, "shard gallery")


def test_32_bit_integer_greyscale_is_scaled_as_16_bit():
    v = np.array([[0, 257, 65535, 70000, -5, 32896]], dtype=np.int32)
    got = np.asarray(to_rgb(Image.fromarray(v, "I")))
    assert Image.fromarray(v, "I").mode == "I"
    assert (got[..., 0] == np.round(np.clip(v, 0, 65535) / 257)).all() and (got == got[..., :1]).all()
