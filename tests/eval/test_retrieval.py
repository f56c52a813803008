"""gcl.eval.retrieval: exact top-k against a brute-force full sort, the faiss backend, the embedding cache."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gcl.eval.retrieval import EmbeddingCache, files_fingerprint, model_fingerprint, topk


def brute(q: np.ndarray, d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full sort of every score, float64, by (score desc, index asc): the contract, written independently."""
    s = q.astype(np.float64) @ d.astype(np.float64).T
    idx = np.stack([np.lexsort((np.arange(d.shape[0]), -row))[:k] for row in s])
    return np.take_along_axis(s, idx, 1), idx


def tie_data(seed: int, nq: int = 23, n: int = 2500, dim: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Small-integer vectors: every dot product is exact in fp32 and many are equal (ties on purpose),
    plus exact duplicate documents."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, (nq, dim)).astype(np.float32)
    d = rng.integers(-2, 3, (n, dim)).astype(np.float32)
    d[n // 2: n // 2 + 50] = d[:50]  # duplicates far apart
    return q, d


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("chunk_size,query_chunk_size,threads", [(1, 5, 1), (7, 100, 3), (300, 8, 2), (10_000, 1024, 2)])
def test_topk_equals_full_sort_with_ties(backend: str, chunk_size: int, query_chunk_size: int, threads: int) -> None:
    q, d = tie_data(0)
    for k in (1, 10, 257, 1000, d.shape[0]):
        ref_s, ref_i = brute(q, d, k)
        s, i = topk(torch.from_numpy(q), torch.from_numpy(d), k, chunk_size, query_chunk_size=query_chunk_size,
                    device="cpu", backend=backend, threads=threads)
        assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == (q.shape[0], k)
        np.testing.assert_array_equal(i.numpy(), ref_i, err_msg=f"k={k}")
        np.testing.assert_array_equal(s.numpy(), ref_s.astype(np.float32))
    # the data really has ties inside the returned lists
    assert (np.diff(ref_s, axis=1) == 0).any()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_topk_adversarial_orders(backend: str) -> None:
    """Scores rising with the index by one fp32 step (every chunk beats the running threshold by a hair),
    falling (nothing after the first chunk qualifies), and all equal (the answer is the first k indices)."""
    n, k = 5000, 300
    base = np.float32(1.0) + np.arange(n, dtype=np.float32) * np.float32(2.0**-22)  # exact, distinct, tiny gaps
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    for col, want in [(base, np.arange(n - 1, n - 1 - k, -1)), (base[::-1].copy(), np.arange(k)),
                      (np.ones(n, np.float32), np.arange(k))]:
        d = np.stack([col, np.zeros(n, np.float32)], 1)
        for chunk in (1, 450, 4096):
            _, i = topk(q, d, k, chunk, backend=backend, device="cpu")
            np.testing.assert_array_equal(i.numpy()[0], want)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_topk_one_ulp_above_threshold_enters_and_a_tie_does_not(backend: str) -> None:
    k = 100
    col = np.zeros(4 * k, np.float32)
    col[: k - 1] = 2.0
    col[k - 1: 2 * k] = 1.0  # the first chunk (2k docs): k-th best score is exactly 1.0
    col[2 * k + 5] = np.nextafter(np.float32(1.0), np.float32(2.0))  # one ulp above it, a later chunk
    col[2 * k + 6] = 1.0  # ties the k-th score but has a larger index than doc k-1
    d = np.stack([col, np.zeros_like(col)], 1)
    for chunk in (k, 4 * k):
        s, i = topk(np.array([[1.0, 0.0]], np.float32), d, k, chunk, backend=backend, device="cpu")
        np.testing.assert_array_equal(i.numpy()[0], [*range(k - 1), 2 * k + 5])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_topk_fp16_scores_are_rounded_before_selection(backend: str) -> None:
    """score_precision="fp16": the contract of the fp32 path on scores rounded to fp16 (ties by index)."""
    rng = np.random.default_rng(3)
    q = rng.normal(size=(17, 16)).astype(np.float32)
    d = rng.normal(size=(3000, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    s16 = (q.astype(np.float64) @ d.astype(np.float64).T).astype(np.float32).astype(np.float16).astype(np.float64)
    k = 50
    ref_i = np.stack([np.lexsort((np.arange(d.shape[0]), -row))[:k] for row in s16])
    s, i = topk(q, d, k, 256, backend=backend, device="cpu", score_precision="fp16")
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_array_equal(s.numpy(), np.take_along_axis(s16, ref_i, 1).astype(np.float32))
    assert (np.diff(s.numpy(), axis=1) == 0).mean() > 0.05  # fp16 scores do tie often
    with pytest.raises(ValueError, match="faiss"):
        topk(q, d, k, backend="faiss", score_precision="fp16")


def test_topk_random_normal_and_inputs() -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((40, 32)).astype(np.float32)
    d = rng.standard_normal((3000, 32)).astype(np.float32)
    ref_s, ref_i = brute(q, d, 50)
    for queries, docs in [(q, d), (torch.from_numpy(q).half().float(), torch.from_numpy(d).half().float()),
                          (torch.from_numpy(q), torch.from_numpy(d).to(torch.float16))]:
        s, i = topk(queries, docs, 50, 512, query_chunk_size=16, device="cpu")
        if isinstance(queries, np.ndarray):  # exact fp32 inputs: same ids, scores within fp32 rounding
            np.testing.assert_array_equal(i.numpy(), ref_i)
            np.testing.assert_allclose(s.numpy(), ref_s, atol=1e-4)
        assert (torch.diff(s, dim=1) <= 0).all()  # sorted descending
    # numpy and torch backends agree bit-for-bit on ids for the same fp32 inputs
    s2, i2 = topk(q, d, 50, 700, backend="torch", device="cpu")
    np.testing.assert_array_equal(i2.numpy(), ref_i)


def test_topk_memmap_docs(tmp_path) -> None:
    q, d = tie_data(2, n=1500)
    mm = np.lib.format.open_memmap(tmp_path / "docs.npy", mode="w+", dtype=np.float32, shape=d.shape)
    mm[:] = d
    mm.flush()
    docs = np.load(tmp_path / "docs.npy", mmap_mode="r")
    for backend in ("numpy", "torch"):
        s, i = topk(q, docs, 20, 256, backend=backend, device="cpu")
        np.testing.assert_array_equal(i.numpy(), brute(q, d, 20)[1])


def test_torch_backend_forces_full_fp32_and_restores_setting() -> None:
    rng = np.random.default_rng(7)
    q = rng.standard_normal((20, 64)).astype(np.float32)
    d = rng.standard_normal((3000, 64)).astype(np.float32)
    ref = topk(q, d, 30, backend="torch", device="cpu")
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # a training script may have enabled TF32/bf16 matmuls
        got = topk(q, d, 30, backend="torch", device="cpu")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(old)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0])


def test_faiss_backend_agrees() -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    q = rng.standard_normal((30, 16)).astype(np.float32)
    d = rng.standard_normal((2000, 16)).astype(np.float32)
    s_ref, i_ref = topk(q, d, 40, 300)
    s_f, i_f = topk(q, d, 40, backend="faiss")
    np.testing.assert_array_equal(i_f.numpy(), i_ref.numpy())
    np.testing.assert_allclose(s_f.numpy(), s_ref.numpy(), atol=1e-5)
    # with exact ties the returned scores agree and equal scores are listed by ascending index
    q, d = tie_data(4)
    s_ref, _ = topk(q, d, 100)
    s_f, i_f = topk(q, d, 100, backend="faiss")
    np.testing.assert_array_equal(s_f.numpy(), s_ref.numpy())
    same = s_f[:, 1:] == s_f[:, :-1]
    assert same.any() and (i_f[:, 1:][same] > i_f[:, :-1][same]).all()


def test_faiss_backend_missing_gives_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # as if faiss were not installed
    q, d = tie_data(8, n=200)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        topk(q, d, 5, backend="faiss")


def test_topk_errors() -> None:
    q, d = tie_data(5, n=100)
    with pytest.raises(ValueError, match="k=101"):
        topk(q, d, 101)
    with pytest.raises(ValueError, match="dim"):
        topk(q[:, :3], d, 5)
    bad = d.copy()
    bad[57, 2] = np.nan
    for backend in ("numpy", "torch"):
        with pytest.raises(ValueError, match="NaN"):
            topk(q, bad, 5, 16, backend=backend, device="cpu")
    with pytest.raises(ValueError, match="backend"):
        topk(q, d, 5, backend="annoy")
    with pytest.raises(TypeError, match="floating"):
        topk(q.astype(np.int64), d, 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_topk_cuda_matches_cpu() -> None:
    q, d = tie_data(6, n=20_000)
    s_c, i_c = topk(q, d, 500, 4096, device="cpu")
    s_g, i_g = topk(torch.from_numpy(q), torch.from_numpy(d), 500, 4096, device="cuda")
    np.testing.assert_array_equal(i_g.numpy(), i_c.numpy())
    np.testing.assert_array_equal(s_g.numpy(), s_c.numpy())


# ------------------------------------------------------------------------------------- embedding cache
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def test_model_fingerprint_tracks_every_weight() -> None:
    m = tiny_model()
    fp = model_fingerprint(m)
    assert fp == model_fingerprint(tiny_model())  # deterministic
    assert fp == model_fingerprint(m.state_dict())
    with torch.no_grad():
        m[0].weight[1, 2] += 1e-6  # one weight, a tiny change
    assert model_fingerprint(m) != fp
    m2 = tiny_model()
    m2[1].running_mean += 1  # buffers count too
    assert model_fingerprint(m2) != fp
    assert model_fingerprint({"w": torch.zeros(2, dtype=torch.bfloat16)}) != model_fingerprint({"w": torch.zeros(2)})


def test_cache_hit_miss_and_stale_model(tmp_path) -> None:
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(b"x" * 100)
    cache = EmbeddingCache(tmp_path / "cache")
    model = tiny_model()
    calls = []

    def embed() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"emb": torch.randn(5, 3), "valid": torch.ones(5, dtype=torch.bool)}

    def key() -> str:
        return cache.key(model=model_fingerprint(model), preprocess={"size": 224, "mean": [0.5, 0.5, 0.5]},
                         data=files_fingerprint([shard]), spec={"side": "right", "fields": ["image", "title"],
                                                                "weights": [0.9, 0.1]})

    k1 = key()
    first = cache.get_or_compute(k1, embed, meta={"n": 5})
    again = cache.get_or_compute(k1, embed)
    assert len(calls) == 1 and torch.equal(first["emb"], again["emb"]) and again["valid"].dtype == torch.bool
    tensors, meta = cache.get(k1)
    assert meta["n"] == 5 and meta["shapes"]["emb"] == [5, 3]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]  # atomic writes left no temp

    # one changed weight -> a different key -> a miss, never the stale embeddings
    with torch.no_grad():
        model[0].bias[0] += 0.5
    k2 = key()
    assert k2 != k1 and cache.get(k2) is None
    cache.get_or_compute(k2, embed)
    assert len(calls) == 2

    # changed data (size/mtime) or spec -> miss; dict order does not matter
    shard.write_bytes(b"y" * 101)
    assert key() != k2
    assert cache.key(a=1, b={"x": 1, "y": 2}) == cache.key(b={"y": 2, "x": 1}, a=1)
    assert cache.key(a=1) != cache.key(a=2)


def test_cache_incomplete_entry_is_a_miss(tmp_path) -> None:
    cache = EmbeddingCache(tmp_path)
    k = cache.key(x=1)
    cache.put(k, {"emb": torch.zeros(2, 2)})
    os.remove(tmp_path / f"{k}.json")  # as if the process died before the sidecar was renamed in
    assert cache.get(k) is None
    with pytest.raises(ValueError, match="not a key"):
        cache.get("../etc")
    with pytest.raises(FileNotFoundError, match="not a file"):
        files_fingerprint([tmp_path / "missing.tar"])


def test_files_fingerprint_content_mode(tmp_path) -> None:
    a, b = tmp_path / "a.tar", tmp_path / "sub" / "a.tar"
    b.parent.mkdir()
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    assert files_fingerprint([a], content=True) == files_fingerprint([b], content=True)
    assert files_fingerprint([a]) != files_fingerprint([b])  # path-based identity differs
