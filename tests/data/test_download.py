"""gcl.data.download: a real HTTP server on 127.0.0.1 serves good images and every kind of failure.

References are independent of the code under test: expected samples are written out from the table by hand,
image pixels are compared with Pillow's decode of the bytes the server sent (and Pillow's own thumbnail for
``--resize``), and the resumed job is compared with an uninterrupted one over the same table.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image

from gcl.data.download import FetchOptions, download, main

SLOW_S = 1.5  # the slow route answers after this long; tests use timeout=0.3 s


def _jpeg(color: tuple[int, int, int], size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (5, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


GOOD = {f"/img/{i}.jpg": _jpeg((40 * i % 256, 200, 10 * i % 256), (20 + i, 12 + i)) for i in range(12)}
HUGE_PNG = _png((1200, 1000))  # 1.2 MP: over the test's max_pixels, yet only a few KB
def _noise_jpeg(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


CUT = _noise_jpeg()  # ~ 5 KB: half of it keeps the header and loses pixel data


class _Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()
    lock = threading.Lock()
    flaky_left: dict[str, int] = {}

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes = b"", ctype: str = "image/jpeg", headers=(), length=None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: C901 - one route per failure kind, kept flat for reading
        path = self.path
        with self.lock:
            self.hits[path] += 1
        if path in GOOD:
            self._send(200, GOOD[path])
        elif path == "/slow.jpg":
            time.sleep(SLOW_S)
            self._send(200, GOOD["/img/0.jpg"])
        elif path == "/corrupt.jpg":
            self._send(200, bytes(range(256)) * 8)
        elif path == "/page.html":
            self._send(200, b"<!doctype html><html><body>Product not found</body></html>", "text/html")
        elif path == "/half.jpg":  # a complete transfer of an incomplete file: header fine, pixels cut
            self._send(200, CUT[: len(CUT) // 2])
        elif path == "/stub.jpg":  # cut inside the JPEG header
            self._send(200, CUT[:200])
        elif path == "/cut.jpg":  # promises the whole file, closes the connection half way
            self._send(200, CUT[: len(CUT) // 2], length=len(CUT))
            self.close_connection = True
        elif path == "/huge.png":
            self._send(200, HUGE_PNG, "image/png")
        elif path == "/endless":  # no Content-Length, more bytes than max_bytes
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\xff" * 8192)
            self.close_connection = True
        elif path.startswith("/loop"):
            nxt = "/loop-b" if path == "/loop-a" else "/loop-a"
            self._send(302, headers=[("Location", nxt)], ctype="text/plain")
        elif path == "/moved.jpg":
            self._send(301, headers=[("Location", "/img/1.jpg")], ctype="text/plain")
        elif path == "/flaky.jpg":  # 503 once, then the image: a retry saves it
            with self.lock:
                left = self.flaky_left.get(path, 1)
                self.flaky_left[path] = left - 1
            if left > 0:
                self._send(503, b"busy", "text/plain", headers=[("Retry-After", "0")])
            else:
                self._send(200, GOOD["/img/2.jpg"])
        elif path == "/error.jpg":
            self._send(500, b"boom", "text/plain")
        elif path == "/noai.jpg":
            self._send(200, GOOD["/img/3.jpg"], headers=[("X-Robots-Tag", "noai")])
        else:
            self._send(404, b"not here", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # the client hangs up on purpose (max_bytes, truncation tests): not a server failure to print
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@pytest.fixture()
def server():
    _Handler.hits = Counter()
    _Handler.flaky_left = {}
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


FAST = FetchOptions(timeout=0.3, total_timeout=5, retries=1, backoff=0.0, max_bytes=200_000, max_pixels=1_000_000)

# (sku, route, expected reason or None for a kept sample)
ROWS = [
    ("sku-0", "/img/0.jpg", None),
    ("sku-1", "/missing.jpg", "not_found"),
    ("sku-2", "/slow.jpg", "timeout"),
    ("sku-3", "/corrupt.jpg", "not_an_image"),
    ("sku-4", "/page.html", "not_an_image"),
    ("sku-5", "/half.jpg", "truncated"),
    ("sku-6", "/cut.jpg", "truncated"),
    ("sku-7", "/huge.png", "too_large"),
    ("sku-8", "/endless", "too_large"),
    ("sku-9", "/loop-a", "too_many_redirects"),
    ("sku-10", "/moved.jpg", None),
    ("sku-11", "/flaky.jpg", None),
    ("sku-12", "/error.jpg", "http_error"),
    ("sku-13", "/noai.jpg", "opted_out"),
    ("sku-14", "ftp://example.invalid/x.jpg", "bad_url"),
    ("sku-15", "/img/4.jpg", None),
    ("sku-16", "/stub.jpg", "truncated"),
]
SERVED = {"/img/0.jpg": "/img/0.jpg", "/moved.jpg": "/img/1.jpg", "/flaky.jpg": "/img/2.jpg", "/img/4.jpg": "/img/4.jpg"}


def _catalog(path: Path, base: str, rows=ROWS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["sku", "image_url", "name", "colour", "split"])
        for i, (sku, route, _) in enumerate(rows):
            url = route if "://" in route else base + route
            w.writerow([sku, url, f"Product {i}, cotton", "navy|red" if i % 2 else "black", "a" if i % 2 == 0 else "b"])
    return path


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    sizes = json.loads((folder / "sizes.json").read_text())
    out: dict[str, dict[str, bytes]] = {}
    for name, count in sizes.items():
        with tarfile.open(folder / name) as tar:
            keys = set()
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                keys.add(key)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
        assert len(keys) == count
    return out


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def test_every_failure_is_counted_and_listed_and_good_rows_land_in_shards(tmp_path, server):
    base, handler = server
    table = _catalog(tmp_path / "catalog.csv", base)
    out = tmp_path / "shards"
    report = download(table, out, fields={"title": "name", "colors": "colour", "item_id": "sku"},
                      image_column="image_url", key_column="sku", per_shard=4, list_sep="|", fetch=FAST,
                      threads=4, progress=False)

    expected_reasons = Counter(r for _, _, r in ROWS if r is not None)
    assert report.skipped == dict(expected_reasons)
    assert report.rows == len(ROWS) and report.total_written == 4 and report.chunks == 5
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["key"], r["reason"]) for r in rejects] == [
        (i, sku, reason) for i, (sku, _, reason) in enumerate(ROWS) if reason is not None]
    assert all(r["detail"] for r in rejects) and rejects[0]["url"] == base + "/missing.jpg"

    samples = _samples(out)
    assert sorted(samples) == ["sku-0", "sku-10", "sku-11", "sku-15"]
    for i, (sku, route, reason) in enumerate(ROWS):
        if reason is not None:
            continue
        s = samples[sku]
        assert json.loads(s["json"]) == {
            "title": f"Product {i}, cotton", "colors": ["navy", "red"] if i % 2 else ["black"], "item_id": sku,
            "image_url": base + route}
        assert s["txt"].decode() == f"Product {i}, cotton"
        # JPEG bytes kept as served (prepare keeps JPEG/PNG/WEBP that need no re-encode)
        assert s["jpg"] == GOOD[SERVED[route]]
    # retries: the flaky route was asked twice, a 404 once, the slow one twice (timeout is retried)
    assert handler.hits["/flaky.jpg"] == 2 and handler.hits["/missing.jpg"] == 1 and handler.hits["/slow.jpg"] == 2
    # the shards are what the loader and the eval sources read, with no extra step
    assert report.shards[""] == str(out / "shard-{000000..000003}.tar") or report.shards[""] == str(out)


def test_resize_and_splits_match_pillow_and_stream_through_the_eval_loader(tmp_path, server):
    import open_clip

    from gcl.data.stream import build_eval_loader

    base, _ = server
    rows = [(f"p{i}", f"/img/{i}.jpg", None) for i in range(6, 12)]
    table = _catalog(tmp_path / "c.csv", base, rows)
    out = tmp_path / "out"
    report = download(table, out, fields={"title": "name"}, image_column="image_url", key_column="sku",
                      split_column="split", per_shard=4, resize=16, fetch=FAST, threads=2, progress=False)
    assert report.written == {"a": 3, "b": 3}
    for split in ("a", "b"):
        for key, s in _samples(out / split).items():
            i = int(key[1:])
            ref = Image.open(io.BytesIO(GOOD[f"/img/{i}.jpg"])).convert("RGB")
            ref.thumbnail((16, 16), Image.Resampling.BICUBIC)
            got = _pixels(s["jpg"])
            assert got.shape[:2] == (ref.height, ref.width) and max(got.shape[:2]) == 16
            assert np.abs(got.astype(int) - np.asarray(ref).astype(int)).mean() < 4  # one JPEG round trip

    tok = open_clip.get_tokenizer("ViT-B-32")
    loader = build_eval_loader(report.shards["a"], tokenizer=tok, context_length={"title": 16},
                               image_transform=open_clip.image_transform(16, is_train=False), batch_size=8,
                               fields=["title"], num_workers=0)
    batches = list(loader)
    assert sorted(batches[0]["key"]) == ["p10", "p6", "p8"] and loader.skipped == {}
    titles = dict(zip(batches[0]["key"], batches[0]["text"]["title"]))
    assert titles == {"p6": "Product 0, cotton", "p8": "Product 2, cotton", "p10": "Product 4, cotton"}


def test_kill_then_rerun_resumes_without_refetching_finished_chunks(tmp_path, server):
    base, handler = server
    n = 12
    rows = [(f"k{i}", f"/img/{i}.jpg", None) for i in range(n)]
    table = _catalog(tmp_path / "c.csv", base, rows)
    out = tmp_path / "out"
    # one request at a time, 0.25 s apart: the kill lands in the middle of the job
    cmd = [sys.executable, "-m", "gcl.data.download", str(table), str(out), "--image-column", "image_url",
           "--field", "title=name", "--key-column", "sku", "--per-shard", "3", "--threads", "1",
           "--max-rps", "4", "--no-progress"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    record = out / ".download" / "chunk-000001.json"
    deadline = time.time() + 60
    while not record.exists():
        assert p.poll() is None, p.stderr.read()
        assert time.time() < deadline, "the first two chunks never finished"
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    before = Counter(handler.hits)
    assert sum(before.values()) < n, "killed too late to test a resume"

    assert main([*cmd[3:-1], "--no-progress"]) == 0
    refetched = {path for path in before if handler.hits[path] > before[path]}
    assert not refetched & {f"/img/{i}.jpg" for i in range(6)}, refetched  # chunks 0 and 1 were kept
    assert all(handler.hits[f"/img/{i}.jpg"] >= 1 for i in range(n))

    ref = tmp_path / "ref"
    download(table, ref, fields={"title": "name"}, image_column="image_url", key_column="sku", per_shard=3,
             threads=2, progress=False)
    a, b = _samples(out), _samples(ref)
    assert sorted(a) == sorted(b) == sorted(f"k{i}" for i in range(n))
    for k in a:
        assert a[k]["jpg"] == b[k]["jpg"] and json.loads(a[k]["json"]) == json.loads(b[k]["json"])
    assert json.loads((out / "sizes.json").read_text()) == json.loads((ref / "sizes.json").read_text())


def test_resume_refuses_changed_options_and_foreign_shards(tmp_path, server, capsys):
    base, _ = server
    table = _catalog(tmp_path / "c.csv", base, [("a", "/img/0.jpg", None), ("b", "/img/1.jpg", None)])
    out = tmp_path / "out"
    args = [str(table), str(out), "--image-column", "image_url", "--field", "title=name", "--no-progress"]
    assert main(args) == 0
    with pytest.raises(SystemExit) as exc:
        main([*args, "--resize", "8"])
    assert exc.value.code == 2 and "options" in capsys.readouterr().err
    assert main([*args, "--resize", "8", "--overwrite"]) == 0
    with pytest.raises(SystemExit) as exc:
        main([str(table), str(tmp_path / "o2"), "--image-column", "nope", "--field", "title=name"])
    assert exc.value.code == 2 and "nope" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        main([str(table), str(foreign), "--image-column", "image_url", "--field", "title=name"])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
