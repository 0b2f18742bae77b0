"""The delta blob codec: chunked XOR, sparse-gap / byte-plane filters, zstd frames, checksums
computed while encoding and decoding. Round trips are bit-exact; malformed blobs raise."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard

from asyncrl.errors import ChecksumError
from asyncrl.sync import snapshot as snap


def pair(n: int, itemsize: int, density: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw bytes of ``n`` elements and a copy with ~``density`` of the elements changed."""
    rng = np.random.default_rng(seed)
    prev = rng.integers(0, 256, n * itemsize, dtype=np.uint8)
    cur = prev.copy()
    hit = np.flatnonzero(rng.random(n) < density)
    cur.reshape(-1, itemsize)[hit, 0] ^= rng.integers(1, 256, hit.size, dtype=np.uint8)
    return prev, cur


def round_trip(prev: np.ndarray, cur: np.ndarray, itemsize: int) -> bytes | None:
    enc = snap._encode_tensor(prev, snap._raw_source(cur, itemsize), snap.DEFAULT_ZSTD_LEVEL)
    if enc.blob is None:
        assert np.array_equal(prev, cur)
        return None
    assert enc.raw is not None and np.array_equal(enc.raw, cur)
    assert enc.raw.ctypes.data != cur.ctypes.data and not enc.raw.flags.writeable
    assert enc.checksum == snap.checksum(cur)
    before = prev.copy()
    out = np.empty_like(prev)
    assert snap._decode_tensor(enc.blob, prev, itemsize, out=out) == enc.checksum
    assert np.array_equal(out, cur)
    held = prev.copy()
    assert snap._decode_tensor(enc.blob, held, itemsize, out=held) == enc.checksum
    assert np.array_equal(held, cur) and np.array_equal(prev, before)
    assert np.array_equal(snap.decode_tensor_delta(enc.blob, prev, itemsize), cur)
    return enc.blob


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("density", [0.0, 1e-3, 0.02, 0.3, 0.7, 1.0])
def test_round_trip_across_densities_and_chunks(
    monkeypatch: pytest.MonkeyPatch, itemsize: int, density: float
) -> None:
    monkeypatch.setattr(snap, "CHUNK_BYTES", 4096)  # many chunks, a partial last one
    prev, cur = pair(10_007, itemsize, density)
    blob = round_trip(prev, cur, itemsize)
    assert (blob is None) == np.array_equal(prev, cur) == (density == 0.0)


def test_gap_width_follows_the_largest_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snap, "CHUNK_BYTES", 1 << 18)
    n = 100_000
    for positions, width in (
        ([0, 254, 509, 510, n - 1], 4),  # last gap 99_488 > 65_535
        ([0, 254, 509, 510, 765 + 255 * 3], 2),
        ([3, 200, 201, 455], 1),
        ([0], 1),
    ):
        at = np.array(positions)
        gaps = snap._encode_gaps(at)
        assert gaps.itemsize == width
        assert np.array_equal(snap._decode_gaps(gaps, n), at)
        prev = np.zeros(2 * n, np.uint8)
        cur = prev.copy()
        cur[2 * at] = 1
        round_trip(prev, cur, 2)
    with pytest.raises(ChecksumError, match="past"):
        snap._decode_gaps(np.array([5, 5], np.uint8), 11)


def test_sparse_positions_match_flatnonzero() -> None:
    rng = np.random.default_rng(1)
    for itemsize in (1, 2, 4, 8):
        for density in (0.001, 0.01, 0.2):
            diff = (rng.random(4096) < density).astype(snap._UINTS[itemsize]) * 3
            mask = np.empty(diff.size, np.bool_)
            got = snap._changed_positions(diff, itemsize, mask)
            assert got is not None and np.array_equal(got, np.flatnonzero(diff))
    dense = np.ones(4096, np.uint16)
    dense[::3] = 0  # 2/3 changed: byte planes
    assert snap._changed_positions(dense, 2, np.empty(4096, np.bool_)) is None


def test_unaligned_views_round_trip() -> None:
    prev, cur = pair(1001, 2, 0.05)
    buf_p, buf_c = np.zeros(prev.nbytes + 1, np.uint8), np.zeros(cur.nbytes + 1, np.uint8)
    buf_p[1:], buf_c[1:] = prev, cur
    round_trip(buf_p[1:], buf_c[1:], 2)


def test_small_bf16_step_compresses_much_better_than_naive_xor() -> None:
    g = torch.Generator().manual_seed(0)
    master = (torch.randn(1 << 21, generator=g) * 0.02).bfloat16().float()
    prev = master.bfloat16().view(torch.uint8).numpy()
    step = master - 1e-6 * torch.sign(torch.randn(master.shape, generator=g))
    cur = step.bfloat16().view(torch.uint8).numpy()
    blob = round_trip(prev, cur, 2)
    assert blob is not None
    assert len(blob) < 0.7 * len(snap.encode_naive_delta(prev, cur))


def frame_filters(blob: bytes, n: int, itemsize: int) -> list[int]:
    """The filter byte of each stored chunk of a blob."""
    dctx = zstandard.ZstdDecompressor()
    return [dctx.decompress(frame)[0] for _, _, frame in
            snap._blob_frames(memoryview(blob), n, itemsize) if len(frame)]


def bf16_step(n: int, lr: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """bf16 bytes of weights ~N(0, 0.02) before and after a sign step of ``lr``: at 1e-6 a few %
    of the elements change, at 1e-5 about a quarter, mostly by one unit in the last place."""
    g = torch.Generator().manual_seed(seed)
    before = torch.randn(n, generator=g) * 0.02
    after = before + lr * torch.sign(torch.randn(n, generator=g))
    return (before.bfloat16().view(torch.uint8).numpy().copy(),
            after.bfloat16().view(torch.uint8).numpy().copy())


@pytest.fixture(params=["kernel", "numpy"])
def codec_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test twice: with the C kernel where it is built, and on the numpy path."""
    if request.param == "numpy":
        monkeypatch.setattr(snap, "_xorkernel", None)
    return str(request.param)


@pytest.mark.usefixtures("codec_path")
def test_dense_small_steps_store_packed_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 300_001
    prev, cur = bf16_step(n, 1e-5)
    changed = np.count_nonzero(prev.view(np.uint16) != cur.view(np.uint16))
    assert 0.15 < changed / n < 0.4
    blob = round_trip(prev, cur, 2)
    assert blob is not None and set(frame_filters(blob, n, 2)) == {snap._FILTER_CODES}
    # the same chunks as gap + value planes: the codes are smaller (and zstd sees 2.4x fewer
    # bytes, which is where the time goes)
    with monkeypatch.context() as m:
        m.setattr(snap, "CODES_MIN_DENSITY", 1.0)
        planes = snap.encode_tensor_delta(prev, cur, 2)
    assert planes is not None and set(frame_filters(planes, n, 2)) == {snap._FILTER_SPARSE}
    assert len(blob) < len(planes)
    # sparse steps keep the planes
    prev, cur = bf16_step(n, 1e-6)
    sparse = round_trip(prev, cur, 2)
    assert sparse is not None and set(frame_filters(sparse, n, 2)) == {snap._FILTER_SPARSE}


@pytest.mark.usefixtures("codec_path")
def test_packed_codes_escape_long_gaps_and_big_values() -> None:
    n = 80_000
    # gaps 0, 0, 13, 15, 15, 0, 255, 0, then 67_694 (4 bytes), then a run dense enough for
    # codes (15% of the chunk changed), then 0; diffs on both sides of 16
    positions = [0, 1, 15, 31, 47, 48, 304, 305, *range(68_000, 79_999), n - 1]
    diffs = [1, 15, 16, 0xFFFF, 255, 256, 3, 0x8000]
    values = np.array(diffs + [1 + k % 40 for k in range(len(positions) - len(diffs))],
                      np.uint16)
    prev = np.random.default_rng(0).integers(0, 1 << 16, n, dtype=np.uint16)
    cur = prev.copy()
    cur[positions] ^= values
    blob = round_trip(prev.view(np.uint8), cur.view(np.uint8), 2)
    assert blob is not None and frame_filters(blob, n, 2) == [snap._FILTER_CODES]
    gaps = snap._encode_gaps(np.array(positions))
    assert gaps.itemsize == 4 and int(gaps.max()) > 65_535  # a 4-byte long gap


def corrupt(blob: bytes, at: int, value: bytes) -> bytes:
    return blob[:at] + value + blob[at + len(value) :]


def test_malformed_blobs_raise_checksum_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snap, "CHUNK_BYTES", 4096)
    prev, cur = pair(5000, 2, 0.05)
    blob = snap.encode_tensor_delta(prev, cur, 2)
    assert blob is not None
    header = snap._BLOB_HEADER.size
    bad = {
        "magic": corrupt(blob, 0, b"XXXX"),
        "elements": corrupt(blob, 4, struct.pack("<Q", 4999)),
        "chunk count": corrupt(blob, 16, struct.pack("<I", 99)),
        "truncated": blob[:-1],
        "extra byte": blob + b"\0",
        "frame length": corrupt(blob, header, struct.pack("<I", 1)),
        "no header": blob[:5],
    }
    for what, data in bad.items():
        with pytest.raises(ChecksumError):
            snap.decode_tensor_delta(data, prev, 2)
            pytest.fail(what)
    with pytest.raises(ChecksumError):  # right blob, wrong tensor size
        snap.decode_tensor_delta(blob, prev[:-2], 2)
    # damaged frame bytes either fail to decode or decode to other bytes (other checksum)
    damaged = corrupt(blob, len(blob) - 3, b"\xff\xff\xff")
    try:
        digest = snap._decode_tensor(damaged, prev, 2, out=np.empty_like(prev))
    except ChecksumError:
        return
    assert digest != snap.checksum(cur)


def test_buffer_pool_reuses_memory_only_once_no_view_is_left() -> None:
    pool = snap._BufferPool(min_bytes=64, max_idle_bytes=1024)
    assert pool.take(16).nbytes == 16  # small: a plain array, never pooled
    array = pool.take(256)
    address = array.ctypes.data
    view = array.view(np.uint16)[3:]
    del array
    other = pool.take(256)
    assert other.ctypes.data != address  # the view still uses the first buffer
    del view
    again = pool.take(256)
    assert again.ctypes.data == address  # taken back, reused
    del other, again
    too_big = pool.take(2048)
    del too_big  # more than max_idle_bytes: dropped, not kept
    assert pool._idle_bytes == 512


def test_snapshot_bytes_survive_buffer_recycling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snap, "_BUFFERS", snap._BufferPool(min_bytes=64, max_idle_bytes=1 << 20))
    prev, cur = pair(4096, 2, 0.1)
    first = snap._encode_tensor(prev, snap._raw_source(cur, 2), 1)
    raw = first.raw
    assert raw is not None
    keep = torch.from_numpy(raw.copy())
    tensor_view = torch.from_numpy(raw)  # like to_torch: must keep the buffer alive
    del first, raw
    prev2, cur2 = pair(4096, 2, 0.5, seed=1)
    for _ in range(3):
        snap._encode_tensor(prev2, snap._raw_source(cur2, 2), 1)
    assert torch.equal(tensor_view, keep)


def _mapping_of(address: int) -> tuple[str, int]:
    """(permissions, resident KiB) of the mapping of this process that holds ``address``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            start, end = (int(x, 16) for x in head[0].split("-"))
            if start <= address < end:
                rss = next(int(x.split()[1]) for x in lines[i + 1:] if x.startswith("Rss:"))
                return head[1], rss
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc only")
def test_fresh_pool_buffers_are_private_and_already_faulted_in() -> None:
    pool = snap._BufferPool(min_bytes=64, max_idle_bytes=0)
    array = pool.take(8 << 20)
    perms, rss_kib = _mapping_of(array.ctypes.data)
    assert perms == "rw-p"  # private anonymous memory, not a shared (shmem) mapping
    if hasattr(snap.mmap, "MAP_POPULATE"):
        assert rss_kib >= 8 << 10  # every page is in before anything touched it


def test_a_base_is_read_into_pooled_memory_that_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = {"a": torch.randn(64, 64), "b": torch.randn(300)}
    snap.write_base(tmp_path, "b", weights)
    size = (tmp_path / "b" / snap.WEIGHTS_FILE).stat().st_size
    pool = snap._BufferPool(min_bytes=64, max_idle_bytes=1 << 30)
    monkeypatch.setattr(snap, "_BUFFERS", pool)
    loaded = snap.apply_snapshot(tmp_path / "b", None)
    address = loaded.snapshot.tensors["a"].data.ctypes.data
    assert snap.to_torch(loaded.snapshot)["a"].equal(weights["a"])
    del loaded
    assert pool._idle_bytes == size  # given back once the snapshot is gone
    again = snap.apply_snapshot(tmp_path / "b", None)
    assert again.snapshot.tensors["a"].data.ctypes.data == address and pool._idle_bytes == 0


def test_read_exact_notices_a_file_that_changed_size_while_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(100))
    assert snap._read_exact(path, 100).nbytes == 100
    stale = os.stat_result((0, 0, 0, 0, 0, 0, 90, 0, 0, 0))

    class StaleStat(type(path)):  # type: ignore[misc]
        def stat(self, **kwargs: Any) -> os.stat_result:
            return stale  # what stat said just before the file grew

    with pytest.raises(ChecksumError, match="manifest expects 90"):
        snap._read_exact(StaleStat(path), 90)
    with pytest.raises(ChecksumError, match="is 100 bytes, manifest expects 90"):
        snap._read_exact(path, 90)
