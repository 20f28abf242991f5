"""Bounded cost and exact errors: hostile files and arguments (generated here) give the documented
error quickly and without large allocations; nothing hostile reaches a page or a report as code."""
from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

from analysis.trace import LOAD_LIMITS, MAX_TRACE_BYTES, Trace, TraceFormatError, trace


# ---------------------------------------------------------------- hostile trace files
def _zip(members: dict[str, tuple[bytes, int, int]]) -> bytes:
    """A zip archive from already deflated members: name -> (raw deflate data, crc32, uncompressed size)."""
    out, central = io.BytesIO(), []
    for name, (data, crc, size) in members.items():
        n = name.encode()
        offset = out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size, len(n), 0) + n + data)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), size,
                                   len(n), 0, 0, 0, 0, 0, offset) + n)
    start = out.tell()
    for c in central:
        out.write(c)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), out.tell() - start, start, 0))
    return out.getvalue()


def _deflated_npy(shape, dtype="<f4") -> tuple[bytes, int, int]:
    """A .npy member of zeros with ``shape``, deflated without ever holding it: one compressed
    block of 1 MiB of zeros (history reset by a full flush) repeated. -> (data, crc32, size)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    head = head.getvalue()
    body = int(np.prod(shape)) * np.dtype(dtype).itemsize
    chunk = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    n, rest = divmod(body, len(chunk))
    tail = c.compress(bytes(rest)) + c.flush(zlib.Z_FINISH)
    crc = zlib.crc32(head)
    for _ in range(n):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(bytes(rest), crc)
    return first + block * n + tail, crc, len(head) + body


def _meta_member(meta: dict) -> tuple[bytes, int, int]:
    buf = io.BytesIO()
    np.save(buf, np.array(json.dumps(meta)))
    raw = buf.getvalue()
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(raw) + c.flush(), zlib.crc32(raw), len(raw)


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def test_zip_bomb_member_is_refused_from_its_header(tmp_path):
    meta = {"format": "loopscope-trace", "format_version": 1, "prompt": "ab", "token_labels": ["a", "b"],
            "answer": None}
    # 300 MiB of zeros in ~300 kB: every axis is within the limits, the total is not
    shape = (600, 2, 64, 1024)
    bomb = _zip({"metadata.npy": _meta_member(meta), "states.npy": _deflated_npy(shape)})
    assert len(bomb) < 2**20 and np.prod(shape) * 4 > MAX_TRACE_BYTES
    path = tmp_path / "bomb.npz"
    path.write_bytes(bomb)

    def load():
        with pytest.raises(TraceFormatError, match="MiB uncompressed"):
            Trace.load(path)

    t0 = time.perf_counter()
    assert _peak_mib(load) < 16  # nothing is decompressed
    assert time.perf_counter() - t0 < 5
    # one axis too long: refused by name before reading
    long = _zip({"metadata.npy": _meta_member(meta), "states.npy": _deflated_npy((1, 2, 5000, 4))})
    with pytest.raises(TraceFormatError, match="token axis"):
        Trace.load(io.BytesIO(long))


def _long_trace(n_iterations: int) -> Trace:
    """A valid trace of ``n_iterations`` iterations (1 layer, 3 tokens, d_model 4, 1 head, vocabulary 5)."""
    I, T, D, V, K = n_iterations, 3, 4, 5, 2
    rng = np.random.default_rng(0)
    att = np.tril(np.ones((T, T), np.float32))
    att /= att.sum(-1, keepdims=True)
    return Trace(prompt="abc", token_labels=("a", "b", "c"), answer=None,
                 metadata={"tokenizer_chars": "abcde", "iterations": I},
                 tokens=np.arange(T), states=rng.normal(size=(I, 1, T, D)).astype(np.float32),
                 initial_state=np.zeros((T, D), np.float32), injected=np.zeros((T, D), np.float32),
                 logits=np.zeros((T, V), np.float32), lens_top_ids=np.zeros((I, 1, T, K), np.int64),
                 lens_top_probs=np.full((I, 1, T, K), 0.2, np.float32), lens_kl=np.zeros((I, T), np.float32),
                 attention=np.broadcast_to(att, (I, 1, 1, T, T)).copy())


def test_oversized_valid_trace_is_refused_with_the_limit(tmp_path):
    big = _long_trace(16_384).save(tmp_path / "long.npz")
    with pytest.raises(TraceFormatError, match=f"16,384 along its iteration axis.*at most {LOAD_LIMITS['iteration']:,}"):
        Trace.load(big)
    ok = _long_trace(LOAD_LIMITS["iteration"]).save(tmp_path / "ok.npz")
    assert Trace.load(ok).n_iterations == LOAD_LIMITS["iteration"]


def test_format_version_must_be_the_integer_one(tmp_path):
    good = _long_trace(2)
    for bad in (True, 1.0, "1"):
        with np.load(good.save(tmp_path / "g.npz"), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("metadata")))
        meta["format_version"] = bad
        np.savez(tmp_path / "v.npz", metadata=np.array(json.dumps(meta)), **arrays)
        with pytest.raises(TraceFormatError, match="version"):
            Trace.load(tmp_path / "v.npz")
    assert Trace.load(good.save(tmp_path / "g.npz")).n_iterations == 2
