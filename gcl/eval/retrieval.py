"""Exact top-k retrieval by chunked inner products, and a content-keyed embedding cache.

``topk(queries, docs, k)`` returns the k largest inner products per query, in fp32, with a deterministic
order: score descending, equal scores -> lower document index first. Memory is bounded by the chunk sizes
(two [query_chunk_size, chunk_size] fp32 score blocks + masks, and a [Q, 2k] int64 candidate buffer), never by
the corpus: documents are streamed chunk by chunk (a memory-mapped array works; on GPU they may stay on CPU).

How it stays exact and fast: every (score, doc index) pair is packed into one int64 key whose order is
"score descending, then index ascending" (the fp32 bit pattern mapped to an order-preserving int32 in the
high word, ``0xFFFFFFFF - index`` in the low word). A threshold per query (a lower bound on its k-th best
score so far, raised whenever its candidate buffer is compacted) discards almost every score of later chunks
with one vectorised comparison; only the few survivors become keys, merged by occasional partial sorts. Survivors must be *strictly* above the threshold:
a later document tying the threshold score has a larger index than the k documents already at or above it,
so it can never enter the top k.

Backends: ``"numpy"`` (CPU: numpy's OpenBLAS sgemm on all cores - measured ~1.5-2x faster than torch's MKL
sgemm on this AMD EPYC - while worker threads filter the previous score block with numpy's SIMD comparisons),
``"torch"`` (any torch device; the default on GPU), ``"faiss"`` (``IndexFlatIP``; copies the whole corpus into
the index). ``"auto"`` picks numpy on CPU and torch elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["topk", "EmbeddingCache", "model_fingerprint", "files_fingerprint"]

_MIN_KEY = np.iinfo(np.int64).min  # an empty slot: below every real key
_LOW = 0xFFFFFFFF
_SIGN_OFF = 0x7FFFFFFF
BACKENDS = ("auto", "numpy", "torch", "faiss")


# ----------------------------------------------------------------------------------------------- keys
def _keys_np(vals: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """fp32 scores + int64 doc indices -> int64 keys ordered by (score desc, index asc) when sorted desc."""
    v = vals.astype(np.float32, copy=False) + np.float32(0.0)  # -0.0 -> +0.0 so the two zeros tie
    b = v.view(np.int32)
    mono = np.where(b >= 0, b, b ^ np.int32(_SIGN_OFF)).astype(np.int64)  # order-preserving int view
    return (mono << 32) | (np.int64(_LOW) - idx)


def _vals_np(keys: np.ndarray) -> np.ndarray:
    mono = (keys >> 32).astype(np.int32)
    return np.where(mono >= 0, mono, mono ^ np.int32(_SIGN_OFF)).view(np.float32)


def _keys_t(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    b = (vals.float() + 0.0).view(torch.int32)
    mono = torch.where(b >= 0, b, b ^ _SIGN_OFF).to(torch.int64)
    return (mono << 32) | (_LOW - idx)


def _vals_t(keys: torch.Tensor) -> torch.Tensor:
    mono = (keys >> 32).to(torch.int32)
    return torch.where(mono >= 0, mono, mono ^ _SIGN_OFF).view(torch.float32)


def _idx_t(keys: torch.Tensor) -> torch.Tensor:
    return _LOW - (keys & _LOW)


# -------------------------------------------------------------------------------------------- checks
def _check(queries: Any, docs: Any, k: int) -> tuple[int, int, int]:
    for name, x in (("queries", queries), ("docs", docs)):
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise TypeError(f"topk: {name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"topk: {name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")
        if isinstance(x, torch.Tensor) and not x.is_floating_point():
            raise TypeError(f"topk: {name} must be floating point, got {x.dtype}")
        if isinstance(x, np.ndarray) and not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"topk: {name} must be floating point, got {x.dtype}")
    (nq, d), (n, d2) = tuple(queries.shape), tuple(docs.shape)
    if d != d2:
        raise ValueError(f"topk: queries have dim {d} but docs have dim {d2}; embed both with the same model")
    if not 1 <= k <= n:
        raise ValueError(f"topk: k={k} must be in [1, number of documents={n}]; lower k or add documents")
    if n >= 2**32:
        raise ValueError(f"topk: {n} documents exceed the 2**32 the packed keys support; shard the corpus")
    return nq, n, d


def _np_f32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu" or x.dtype != torch.float32:
            x = x.to("cpu", torch.float32)
        return x.numpy()
    return np.ascontiguousarray(x, dtype=np.float32) if x.dtype != np.float32 else x


def _finite_np(x: np.ndarray, what: str) -> None:
    # a NaN/inf anywhere makes the plain sum non-finite; the exact check runs only then (or on overflow)
    if not np.isfinite(np.sum(x)) and not np.isfinite(x).all():
        raise ValueError(f"topk: {what} contain NaN or inf; fix the embeddings (a NaN has no rank)")


def _chunk_bounds(n: int, k: int, chunk_size: int) -> list[tuple[int, int]]:
    """Document chunks: the first has 2k rows, then doubling up to chunk_size (>= k).

    A small first chunk makes its exact k-th score cheap; doubling keeps the survivors of each next chunk at
    about k per query (k * size / seen) until the threshold is tight, so merges stay small.
    """
    size, cap, out, s = min(2 * k, max(chunk_size, k)), max(chunk_size, k), [], 0
    while s < n:
        e = min(n, s + size)
        out.append((s, e))
        s, size = e, min(cap, 2 * size)
    return out


# ---------------------------------------------------------------------------------- numpy backend
class _Buffer:
    """Per-query candidate keys: [Q, 2k] int64 with fill counts and a threshold score per query.

    Candidates are appended; a row is partially sorted down to its k best (and its threshold raised) only when
    the next append would overflow it, so each query pays O(k) merge work about log(N/k) times in total.
    Distinct rows may be updated from different threads at once (no shared scratch state).
    """

    def __init__(self, nq: int, k: int) -> None:
        self.k, self.cap = k, 2 * k
        self.keys = np.full((nq, self.cap), _MIN_KEY, dtype=np.int64)
        self.fill = np.zeros(nq, dtype=np.int64)
        self.thr = np.full(nq, -np.inf, dtype=np.float32)

    def add(self, r0: int, nrows: int, rows: np.ndarray, keys: np.ndarray) -> None:
        """Add candidate ``keys`` for rows ``r0 + rows`` (``rows`` ascending in [0, nrows), as flatnonzero
        yields them)."""
        counts = np.bincount(rows, minlength=nrows)
        start = np.cumsum(counts) - counts
        pos = np.arange(rows.size) - start[rows]  # rank of each candidate within its row
        grows = np.arange(r0, r0 + nrows)
        over = self.fill[grows] + counts > self.cap
        if over.any():
            # rows that would overflow: [their candidates | new ones] -> the k best, one partial sort
            orows = np.flatnonzero(over)
            sel = over[rows]
            width = self.cap + int(counts[orows].max())
            merged = np.full((orows.size, width), _MIN_KEY, dtype=np.int64)
            merged[:, : self.cap] = self.keys[r0 + orows]
            slot = np.cumsum(over) - 1  # row -> its index among the overflowing rows
            merged[slot[rows[sel]], self.cap + pos[sel]] = keys[sel]
            best = np.partition(merged, width - self.k, axis=1)[:, width - self.k:]
            g = r0 + orows
            self.keys[g, self.k:] = _MIN_KEY
            self.keys[g, : self.k] = best
            self.fill[g] = self.k
            self.thr[g] = _vals_np(best.min(1))
            keep = ~sel
            rows, pos, keys = rows[keep], pos[keep], keys[keep]
        if rows.size:
            r = rows + r0
            self.keys[r, self.fill[r] + pos] = keys
            self.fill[grows] += np.where(over, 0, counts)

    def result(self, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(scores fp32 [Q, k], indices int64 [Q, k]) sorted; row blocks keep the temporaries small."""
        nq = self.keys.shape[0]
        vals, idx = np.empty((nq, self.k), np.float32), np.empty((nq, self.k), np.int64)
        for a in range(0, nq, block):
            best = np.partition(self.keys[a: a + block], self.cap - self.k, axis=1)[:, self.cap - self.k:]
            best = ~np.sort(~best, axis=1)  # descending; ~x (= -x - 1) reverses order without overflowing
            vals[a: a + block] = _vals_np(best)
            idx[a: a + block] = np.int64(_LOW) - (best & np.int64(_LOW))
        return vals, idx


def _select(buf: _Buffer, scores: np.ndarray, mask: np.ndarray, r0: int, s: int, k: int) -> None:
    """Push the documents of one score block that can still enter the top k into ``buf``.

    scores/mask: [m, n] (contiguous) for queries r0..r0+m and documents s..s+n.
    """
    m, n = scores.shape
    if s == 0:
        # first chunk: everything at or above each row's exact k-th score (ties included); that score is a
        # valid strict threshold for all later (higher-index) documents
        kth = np.partition(scores, n - k, axis=1)[:, n - k] if n > k else np.full(m, -np.inf, np.float32)
        np.greater_equal(scores, kth[:, None], out=mask)
    else:
        np.greater(scores, buf.thr[r0: r0 + m, None], out=mask)
    flat = np.flatnonzero(mask)
    if flat.size:
        rows = flat // n
        buf.add(r0, m, rows, _keys_np(scores.reshape(-1)[flat], flat - rows * n + s))
    if s == 0:
        buf.thr[r0: r0 + m] = np.maximum(buf.thr[r0: r0 + m], kth)


def _topk_numpy(queries: Any, docs: Any, k: int, chunk_size: int, query_chunk_size: int, threads: int,
                half: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Main thread: sgemm of block j+1 (BLAS threads) while ``threads`` workers select from block j.

    Each worker owns a fixed slice of a block's rows, so updates of one query always run in document order.
    """
    q = _np_f32(queries)
    _finite_np(q, "queries")
    nq = q.shape[0]
    buf = _Buffer(nq, k)
    qcs = min(query_chunk_size, nq)
    width = max(chunk_size, k)
    # two flat score/mask buffers (double buffering), so every [m, n] view is contiguous
    slots = [(np.empty(qcs * width, np.float32), np.empty(qcs * width, bool)) for _ in range(2)]
    pending: list[list[Future]] = [[], []]
    workers = [ThreadPoolExecutor(1, thread_name_prefix=f"topk{i}") for i in range(threads)]
    j = 0
    try:
        for s, e in _chunk_bounds(docs.shape[0], k, chunk_size):
            dc = _np_f32(docs[s:e])
            _finite_np(dc, f"docs[{s}:{e}]")
            n = e - s
            for qs in range(0, nq, qcs):
                qe = min(nq, qs + qcs)
                m = qe - qs
                slot = j % 2
                j += 1
                for f in pending[slot]:
                    f.result()  # its buffer is free again (and worker errors surface here)
                scores = slots[slot][0][: m * n].reshape(m, n)
                mask = slots[slot][1][: m * n].reshape(m, n)
                np.matmul(q[qs:qe], dc.T, out=scores)  # fp32 sgemm on all BLAS threads
                if half:  # each score rounded to fp16, as a half-precision GEMM's output is
                    np.copyto(scores, scores.astype(np.float16))
                cuts = np.linspace(0, m, min(threads, m) + 1).astype(int)
                pending[slot] = [workers[i].submit(_select, buf, scores[a:b], mask[a:b], qs + a, s, k)
                                 for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
        for fs in pending:
            for f in fs:
                f.result()
    finally:
        for w in workers:
            w.shutdown(wait=True, cancel_futures=True)
    del slots, scores, mask  # free the score blocks before the result's temporaries
    vals, idx = buf.result()
    return torch.from_numpy(vals), torch.from_numpy(idx)


# ---------------------------------------------------------------------------------- torch backend
def _topk_torch(queries: Any, docs: Any, k: int, chunk_size: int, query_chunk_size: int,
                device: torch.device, half: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    def dev_f32(x: Any) -> torch.Tensor:
        if isinstance(x, np.ndarray):  # copy read-only (memory-mapped) arrays: torch wants writable memory
            x = torch.from_numpy(np.asarray(x, np.float32) if x.flags.writeable else np.array(x, np.float32))
        return x.detach().to(device=device, dtype=torch.float32, non_blocking=True)

    q = dev_f32(queries)
    if not torch.isfinite(q).all():
        raise ValueError("topk: queries contain NaN or inf; fix the embeddings (a NaN has no rank)")
    nq = q.shape[0]
    keys = torch.full((nq, k), _MIN_KEY, dtype=torch.int64, device=device)
    thr = torch.full((nq,), float("-inf"), device=device)
    for s, e in _chunk_bounds(docs.shape[0], k, chunk_size):
        dc = dev_f32(docs[s:e])
        if not torch.isfinite(dc).all():
            raise ValueError(f"topk: docs[{s}:{e}] contain NaN or inf; fix the embeddings")
        n = e - s
        for qs in range(0, nq, query_chunk_size):
            qe = min(nq, qs + query_chunk_size)
            scores = q[qs:qe] @ dc.T  # [m, n] fp32
            if half:
                scores = scores.half().float()
            if s == 0:
                kth = scores.topk(k, dim=1).values[:, -1:] if n > k else torch.full_like(scores[:, :1], -torch.inf)
                mask = scores >= kth
            else:
                mask = scores > thr[qs:qe, None]
            nz = mask.nonzero()
            if nz.shape[0] == 0:
                continue
            rows, cols = nz[:, 0], nz[:, 1]
            counts = torch.bincount(rows, minlength=qe - qs)
            urows = counts.nonzero()[:, 0]
            compact = torch.cumsum(counts > 0, 0) - 1
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(rows.shape[0], device=device) - starts[rows]
            pad = torch.full((urows.shape[0], int(counts.max())), _MIN_KEY, dtype=torch.int64, device=device)
            pad[compact[rows], pos] = _keys_t(scores[rows, cols], cols + s)
            g = urows + qs
            best = torch.cat([keys[g], pad], 1).topk(k, dim=1, sorted=False).values
            keys[g] = best
            thr[g] = _vals_t(best.min(1).values)
    keys = keys.sort(dim=1, descending=True).values
    return _vals_t(keys).cpu(), _idx_t(keys).cpu()


# ---------------------------------------------------------------------------------- faiss backend
def _topk_faiss(queries: Any, docs: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import faiss
    except ImportError as err:
        raise ImportError("topk(backend='faiss') needs faiss: pip install faiss-cpu (or use backend='auto')") from err
    q, d = _np_f32(queries), _np_f32(docs)
    _finite_np(q, "queries")
    _finite_np(d, "docs")
    index = faiss.IndexFlatIP(d.shape[1])
    index.add(np.ascontiguousarray(d))
    vals, idx = index.search(np.ascontiguousarray(q), k)
    # faiss orders equal scores arbitrarily; apply our rule within the returned lists (lexsort: last key first)
    order = np.lexsort((idx, -vals), axis=1)
    vals = np.take_along_axis(vals, order, 1)
    idx = np.take_along_axis(idx, order, 1)
    return torch.from_numpy(np.ascontiguousarray(vals)), torch.from_numpy(np.ascontiguousarray(idx.astype(np.int64)))


def topk(queries: torch.Tensor | np.ndarray, docs: torch.Tensor | np.ndarray, k: int, chunk_size: int = 8192,
         *, query_chunk_size: int = 1024, device: torch.device | str | None = None, backend: str = "auto",
         threads: int | None = None, score_precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products of each query against every document.

    Args:
        queries: [Q, D] float (any float dtype; scored in fp32). Normalise rows first for cosine similarity.
        docs: [N, D] float, on CPU or ``device``; read ``chunk_size`` rows at a time (a memory-mapped array
            works), so the corpus is never copied whole (except by ``backend="faiss"``).
        k: results per query, 1 <= k <= N.
        chunk_size: documents per score block (at least k is used). Peak extra memory is about
            ``query_chunk_size * chunk_size * 10`` bytes (two score blocks + masks) plus ``Q * k * 24`` bytes.
        query_chunk_size: queries per score block.
        device: where to score: None = "cuda" when available, else "cpu".
        backend: "auto" (numpy on CPU, torch elsewhere), "numpy", "torch" or "faiss".
        threads: numpy backend: worker threads that filter score blocks while the next block's sgemm runs
            (the sgemm itself uses all BLAS threads); default: the CPUs this process may use, at most 8.
        score_precision: "fp32", or "fp16": every score is rounded to fp16 before selection (emulates scoring
            with a half-precision GEMM: many exact ties, still ordered by index). Not with ``backend="faiss"``.
    Returns:
        (scores FloatTensor[Q, k] fp32, indices LongTensor[Q, k]) on CPU, each row sorted by score descending
        with equal scores in ascending document index (faiss: the same order, but which documents tie in at
        the k-th score is faiss's choice).
    Raises:
        ValueError on mismatched dims, k out of range or non-finite embeddings.
    """
    if backend not in BACKENDS:
        raise ValueError(f"topk: backend={backend!r} is not one of {BACKENDS}")
    if score_precision not in ("fp32", "fp16"):
        raise ValueError(f"topk: score_precision={score_precision!r} is not 'fp32' or 'fp16'")
    half = score_precision == "fp16"
    if half and backend == "faiss":
        raise ValueError("topk: faiss scores in fp32 only; use backend='auto' for score_precision='fp16'")
    if chunk_size < 1 or query_chunk_size < 1:
        raise ValueError(f"topk: chunk_size ({chunk_size}) and query_chunk_size ({query_chunk_size}) must be >= 1")
    nq, _, _ = _check(queries, docs, k)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "auto":
        backend = "numpy" if dev.type == "cpu" else "torch"
    if backend == "numpy" and dev.type != "cpu":
        raise ValueError(f"topk: backend='numpy' runs on CPU only, but device={dev}; use backend='torch'")
    t0 = time.perf_counter()
    if nq == 0:
        out = torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
    elif backend == "numpy":
        n_threads = threads if threads is not None else min(8, len(os.sched_getaffinity(0)) if hasattr(
            os, "sched_getaffinity") else (os.cpu_count() or 1))
        out = _topk_numpy(queries, docs, k, chunk_size, query_chunk_size, max(1, n_threads), half)
    elif backend == "torch":
        # full fp32 products even if the caller enabled TF32 (``set_float32_matmul_precision("high")``): TF32's
        # 10-bit mantissa would reorder near ties and break exactness
        precision = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("highest")
            with torch.no_grad():
                out = _topk_torch(queries, docs, k, chunk_size, query_chunk_size, dev, half)
        finally:
            torch.set_float32_matmul_precision(precision)
    else:
        out = _topk_faiss(queries, docs, k)
    log.debug("topk: %d queries x %d docs, k=%d, %s on %s: %.3fs", nq, docs.shape[0], k, backend, dev,
              time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------------- embedding cache
def model_fingerprint(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A deterministic hex digest of a model's state dict: every tensor's name, dtype, shape and bytes.

    Changing any single weight (or buffer) changes the digest. Costs one read of the weights (blake2b,
    ~1 GB/s); tensors on GPU are copied to CPU one at a time.
    """
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}|{type(t).__name__}|{t!r}\n".encode())
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def files_fingerprint(paths: Sequence[str | os.PathLike], content: bool = False) -> str:
    """Identity of a data set's files, in the given order: resolved path + size + mtime (ns), or, with
    ``content=True``, a blake2b of the bytes (slower; survives copies and touch). A missing path raises.

    For data that has no local files (URLs), pass your own version string to ``EmbeddingCache.key`` instead.
    """
    h = hashlib.blake2b(digest_size=20)
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"files_fingerprint: {path} is not a file; pass local shard paths, or give "
                                    f"EmbeddingCache.key a version string for remote data")
        if content:
            h.update(f"{path.name}\n".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
        else:
            st = path.stat()
            h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class EmbeddingCache:
    """Embeddings on disk, keyed by everything that determines them.

    ``key(model=..., preprocess=..., data=..., spec=...)`` hashes a canonical JSON of the parts (use
    ``model_fingerprint`` for the model and ``files_fingerprint`` for the data), so a changed weight,
    transform, shard file or field/side spec is a miss, never a stale hit. An entry is ``<key>.safetensors``
    (the tensors) plus ``<key>.json`` (the key parts, shapes, optional row ids); both are written to temp files
    and renamed, sidecar last, so a crash never leaves an entry that looks complete.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.dir = Path(cache_dir)

    @staticmethod
    def key(**parts: Any) -> str:
        """Hex digest of the JSON-serialisable ``parts`` (dict key order does not matter)."""
        try:
            blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=_json_default)
        except TypeError as err:
            raise TypeError(f"EmbeddingCache.key: parts must be JSON-serialisable (str/number/list/dict): {err}") from err
        return hashlib.blake2b(blob.encode(), digest_size=20).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"EmbeddingCache: {key!r} is not a key from EmbeddingCache.key(...)")
        return self.dir / f"{key}.safetensors", self.dir / f"{key}.json"

    def get(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, sidecar metadata) for ``key``, or None on a miss (or an entry missing either file)."""
        from safetensors.torch import load_file

        tensor_path, meta_path = self._paths(key)
        if not (meta_path.is_file() and tensor_path.is_file()):
            return None
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
        shapes = {n: list(t.shape) for n, t in tensors.items()}
        if meta.get("key") != key or meta.get("shapes") != shapes:
            log.warning("embedding cache entry %s is inconsistent with its sidecar; recomputing", key)
            return None
        return tensors, meta

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> None:
        """Store ``tensors`` (name -> Tensor) under ``key`` atomically; ``meta`` (JSON) goes to the sidecar."""
        from safetensors.torch import save_file

        tensor_path, meta_path = self._paths(key)
        self.dir.mkdir(parents=True, exist_ok=True)
        cpu = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        sidecar = {"key": key, "shapes": {n: list(t.shape) for n, t in cpu.items()},
                   "dtypes": {n: str(t.dtype) for n, t in cpu.items()}, "created": time.time(), **dict(meta or {})}
        _atomic(tensor_path, lambda p: save_file(cpu, p))
        _atomic(meta_path, lambda p: Path(p).write_text(json.dumps(sidecar, indent=1, default=_json_default)))

    def get_or_compute(self, key: str, compute: Callable[[], Mapping[str, torch.Tensor]],
                       meta: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The cached tensors for ``key``, else ``compute()``'s, stored before returning."""
        hit = self.get(key)
        if hit is not None:
            log.info("embedding cache hit %s", key[:12])
            return hit[0]
        log.info("embedding cache miss %s: computing", key[:12])
        out = dict(compute())
        self.put(key, out, meta)
        return out


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (set, frozenset, tuple)):
        return sorted(x) if isinstance(x, (set, frozenset)) else list(x)
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
