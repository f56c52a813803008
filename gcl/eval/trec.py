"""TREC-format files: runs, qrels and query lists (what every retrieval task writes, what compare reads).

Formats (whitespace-separated, one line per entry, the ones trec_eval, pytrec_eval and ranx read):

* run: ``qid Q0 docid rank score tag``, each query's lines in trec_eval's order (score descending, ties by docid
  descending), rank 1-based. Scores are written with ``repr`` so reading them back gives the same float.
* qrels: ``qid 0 docid grade``.
* queries: ``qid<TAB>text`` (a TSV; tabs, newlines and backslashes inside a text are backslash-escaped).

Ids are written as they are, except that whitespace and ``%`` are percent-encoded (``"a b"`` -> ``"a%20b"``):
trec_eval splits lines on whitespace, and the same encoding in the run and the qrels keeps them consistent.
The readers decode it. Writes are atomic (temp file + ``os.replace``).

What does not live here: computing metrics (``gcl.eval.metrics``), comparing evaluations (``gcl.eval.compare``).
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import unquote

from gcl.eval.metrics import trec_order

__all__ = ["write_run", "write_qrels", "write_queries", "read_run", "read_qrels", "read_queries",
           "encode_id", "decode_id"]

_TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_TSV_UNESCAPE = re.compile(r"\\(.)")
_TSV_CHARS = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def encode_id(s: str) -> str:
    """An id safe for whitespace-separated TREC files: whitespace and ``%`` percent-encoded."""
    s = str(s)
    if not s:
        raise ValueError("TREC files cannot hold an empty id")
    if not any(c == "%" or c.isspace() for c in s):
        return s
    return "".join("".join(f"%{b:02X}" for b in c.encode()) if c == "%" or c.isspace() else c for c in s)


def decode_id(s: str) -> str:
    """The inverse of ``encode_id`` (every ``%`` of an encoded id starts an escape)."""
    return unquote(s) if "%" in s else s


def _atomic_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_run(path: str | os.PathLike, run: Mapping[str, Mapping[str, float]], tag: str = "gcl") -> Path:
    """Write ``{qid: {docid: score}}`` as a TREC run (queries in dict order, documents in trec_eval's order)."""
    tag = encode_id(tag)

    def lines() -> Iterable[str]:
        for qid, docs in run.items():
            q = encode_id(qid)
            for rank, (doc, score) in enumerate(trec_order(docs), start=1):
                if not math.isfinite(score):
                    raise ValueError(f"run[{qid!r}][{doc!r}] = {score}: TREC runs need finite scores")
                yield f"{q} Q0 {encode_id(doc)} {rank} {float(score)!r} {tag}"

    return _atomic_lines(path, lines())


def write_qrels(path: str | os.PathLike, qrels: Mapping[str, Mapping[str, int]]) -> Path:
    """Write ``{qid: {docid: grade}}`` as TREC qrels (``qid 0 docid grade``)."""
    return _atomic_lines(path, (f"{encode_id(q)} 0 {encode_id(d)} {int(g)}"
                                for q, docs in qrels.items() for d, g in docs.items()))


def write_queries(path: str | os.PathLike, texts: Mapping[str, str]) -> Path:
    """Write ``{qid: text}`` as ``qid<TAB>text`` lines."""
    def esc(t: str) -> str:
        return "".join(_TSV_ESCAPES.get(c, c) for c in t)

    return _atomic_lines(path, (f"{encode_id(q)}\t{esc(t)}" for q, t in texts.items()))


def _fields(path: Path, n: int, what: str) -> Iterable[tuple[int, list[str]]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != n:
                raise ValueError(f"{path}:{i}: a {what} line has {n} whitespace-separated fields, got "
                                 f"{len(parts)}: {line.rstrip()!r}")
            yield i, parts


def read_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """A TREC run file -> ``{qid: {docid: score}}`` (rank and tag are ignored, as trec_eval does)."""
    path = Path(path)
    out: dict[str, dict[str, float]] = {}
    for i, (q, _, d, _, score, _) in _fields(path, 6, "run"):
        try:
            value = float(score)
        except ValueError:
            raise ValueError(f"{path}:{i}: score {score!r} is not a number") from None
        docs = out.setdefault(decode_id(q), {})
        doc = decode_id(d)
        if doc in docs:
            raise ValueError(f"{path}:{i}: document {doc!r} appears twice for query {decode_id(q)!r}")
        docs[doc] = value
    return out


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """A TREC qrels file -> ``{qid: {docid: grade}}``; a repeated (qid, docid) pair is an error."""
    path = Path(path)
    out: dict[str, dict[str, int]] = {}
    for i, (q, _, d, g) in _fields(path, 4, "qrels"):
        try:
            grade = int(float(g))
        except ValueError:
            raise ValueError(f"{path}:{i}: grade {g!r} is not a number") from None
        docs = out.setdefault(decode_id(q), {})
        doc = decode_id(d)
        if doc in docs:
            raise ValueError(f"{path}:{i}: document {doc!r} is judged twice for query {decode_id(q)!r}")
        docs[doc] = grade
    return out


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """A ``qid<TAB>text`` file -> ``{qid: text}`` (in file order)."""
    path = Path(path)
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            qid, sep, text = line.partition("\t")
            if not sep:
                raise ValueError(f"{path}:{i}: expected 'qid<TAB>text', got {line!r}")
            q = decode_id(qid.strip())
            if q in out:
                raise ValueError(f"{path}:{i}: query id {q!r} appears twice")
            out[q] = _TSV_UNESCAPE.sub(lambda m: _TSV_CHARS.get(m.group(1), m.group(1)), text)
    return out
