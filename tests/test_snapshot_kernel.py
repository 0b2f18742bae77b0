"""The C kernel of the delta codec (``asyncrl/sync/_xorkernel.c``) against the numpy path: the
same owned bytes, checksums and blobs, byte for byte; its vector loops (AVX-512, AVX2) and
portable ones agree; a malformed chunk is rejected before the target is touched."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch
import zstandard

from asyncrl.errors import ChecksumError
from asyncrl.sync import snapshot as snap

if snap._xorkernel is None:
    if os.environ.get("ASYNCRL_REQUIRE_KERNEL") == "1":  # scripts/test.sh: the build must work
        pytest.fail("asyncrl.sync._xorkernel is not built (setup.py needs a C compiler)",
                    pytrace=False)
    pytest.skip("the C kernel is not built here", allow_module_level=True)

kernel = snap._xorkernel
# the loops to compare: the fastest this CPU runs (0), the portable one (1), and AVX2 (2) where
# the CPU has it (on an AVX-512 CPU, 0 is the AVX-512 loop)
LOOPS = (0, *kernel.LOOPS)
assert kernel is not None


def specials() -> torch.Tensor:
    """fp32 values whose bf16 rounding is easy to get wrong: ties (to even, both ways), values
    rounding up into the exponent / to infinity, infinities, signed zeros, denormals, NaNs."""
    bits = [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F8000, 0xFF7FFFFF,
            0x7F800000, 0xFF800000, 0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00008000,
            0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF]
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def masters(n: int, seed: int, lr: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 weights before / after a small step (at lr 1e-6 a few % of their bf16 values
    change, at 1e-5 about a quarter)."""
    g = torch.Generator().manual_seed(seed)
    before = torch.randn(n, generator=g) * 0.02
    after = before + lr * torch.sign(torch.randn(n, generator=g))
    k = min(n, specials().numel())
    before[:k], after[:k] = specials()[:k], specials().flip(0)[:k]
    return before, after


def encode_both(
    monkeypatch: pytest.MonkeyPatch, previous: np.ndarray, source: snap._Source
) -> tuple[snap._Encoded, snap._Encoded]:
    """The kernel's encoding (checked to be the one that runs) and the numpy path's."""
    prev_e = previous.view(np.uint16)
    assert snap._fused_chunk_encoder(source, prev_e, np.empty_like(prev_e), 1) is not None
    fused = snap._encode_tensor(previous, source, snap.DEFAULT_ZSTD_LEVEL)
    with monkeypatch.context() as m:
        m.setattr(snap, "_xorkernel", None)
        plain = snap._encode_tensor(previous, source, snap.DEFAULT_ZSTD_LEVEL)
    return fused, plain


@pytest.mark.parametrize("n", [1, 31, 64, 4099, 70_001])
@pytest.mark.parametrize("step", ["small", "dense", "none", "dense-then-small", "codes"])
def test_fp32_to_bf16_blobs_equal_the_numpy_path(
    monkeypatch: pytest.MonkeyPatch, n: int, step: str
) -> None:
    monkeypatch.setattr(snap, "CHUNK_BYTES", 8192)  # several chunks, a partial last one
    before, after = masters(n, seed=n, lr=1e-5 if step == "codes" else 1e-6)
    if step == "dense":
        after = torch.randn(n) * 0.02
    elif step == "none":
        after = before.clone()
    elif step == "dense-then-small":
        after[: n // 2] = torch.randn(n // 2)
    previous = before.bfloat16().view(torch.uint8).numpy().copy()
    fused, plain = encode_both(monkeypatch, previous, snap._source(after, "bfloat16"))
    assert fused.blob == plain.blob and fused.checksum == plain.checksum
    if step == "none":
        assert fused.blob is None and fused.raw is None
        return
    assert fused.raw is not None and plain.raw is not None
    assert np.array_equal(fused.raw, plain.raw)
    assert fused.blob is not None
    held = previous.copy()
    assert snap._decode_tensor(fused.blob, held, 2, out=held) == fused.checksum
    assert np.array_equal(held, fused.raw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_two_byte_copies_equal_the_numpy_path(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    monkeypatch.setattr(snap, "CHUNK_BYTES", 4096)
    before, after = masters(10_007, seed=3)
    previous = before.to(dtype).view(torch.uint8).numpy().copy()
    fused, plain = encode_both(monkeypatch, previous, snap._source(after.to(dtype), None))
    assert fused.blob is not None and fused.blob == plain.blob
    assert fused.checksum == plain.checksum == snap.checksum(after.to(dtype).view(torch.uint8)
                                                              .numpy())


def test_nan_and_edge_values_convert_as_torch_does_in_both_loops() -> None:
    n = 3 * 43  # whole vectors / groups of 64 and a tail, for both loops
    src = torch.tensor([float("nan"), -float("nan"), 1.0] * 43)
    src[4] = torch.tensor(0x7F800001, dtype=torch.int32).view(torch.float32)  # signalling NaN
    src[64:64 + specials().numel()] = specials()
    want = src.bfloat16().view(torch.int16).numpy().view(np.uint16)
    prev, owned = np.zeros(n, np.uint16), np.empty(n, np.uint16)
    gaps, values = np.empty(n + kernel.SLACK, np.uint32), np.empty(n + kernel.SLACK, np.uint16)
    for loop in LOOPS:
        changed = kernel.encode_f32_bf16(src.numpy(), prev, owned, gaps, values, n, loop)
        assert changed == np.count_nonzero(want)
        assert np.array_equal(owned, want) and (owned[torch.isnan(src).numpy()] == 0xFFFF).all()


def encoder_case(
    density: float, convert: bool, n: int = 10_000 + 37, seed: int = 11
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """(src, prev, new bytes, encoder) with about ``density`` of the elements changed."""
    rng = np.random.default_rng(seed)
    fp32 = rng.standard_normal(n).astype(np.float32)
    new = torch.from_numpy(fp32).bfloat16().view(torch.int16).numpy().view(np.uint16)
    src, encode = (fp32, kernel.encode_f32_bf16) if convert else (new, kernel.encode_copy16)
    prev = new.copy()
    hit = rng.random(n) < density
    prev[hit] ^= rng.integers(1, 1 << 16, int(hit.sum()), dtype=np.uint16)
    return src, prev, new, encode


@pytest.mark.parametrize("density", [0.0, 0.04, 0.5, 0.51, 1.0])
@pytest.mark.parametrize("convert", [True, False])
def test_vector_and_portable_loops_agree(density: float, convert: bool) -> None:
    src, prev, owned_ref, encode = encoder_case(density, convert, seed=7)
    n = owned_ref.size
    hit = prev != owned_ref
    cap = n // 2
    results = []
    for loop in LOOPS:
        owned = np.empty(n, np.uint16)
        gaps = np.empty(cap + kernel.SLACK, np.uint32)
        values = np.empty(cap + kernel.SLACK, np.uint16)
        changed = encode(src, prev, owned, gaps, values, cap, loop)
        assert np.array_equal(owned, owned_ref)
        positions = np.flatnonzero(hit)
        if positions.size > cap:
            assert changed == -1
            results.append(None)
            continue
        assert changed == positions.size
        assert np.array_equal(gaps[:changed], np.diff(positions, prepend=-1) - 1)
        assert np.array_equal(values[:changed], (prev ^ owned_ref)[positions])
        results.append((gaps[:changed].copy(), values[:changed].copy()))
    first = results[0]
    for other in results[1:]:
        assert (first is None) == (other is None)
        if first is not None and other is not None:
            assert all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


GUARD = 16  # entries past cap + SLACK that no encoder may write


def encode_in_place(
    encode: Any, src: np.ndarray, prev: np.ndarray, cap: int, loop: int
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(changed, gaps, values, the bytes after) of an in-place encoding of a copy of prev;
    the entries past cap + SLACK of gaps and values must be left alone."""
    target = prev.copy()
    gaps = np.full(cap + kernel.SLACK + GUARD, 0xDEADBEEF, np.uint32)
    values = np.full(cap + kernel.SLACK + GUARD, 0xBEEF, np.uint16)
    changed = encode(src, target, target, gaps[: cap + kernel.SLACK],
                     values[: cap + kernel.SLACK], cap, loop)
    assert (gaps[-GUARD:] == 0xDEADBEEF).all() and (values[-GUARD:] == 0xBEEF).all()
    return changed, gaps[: max(changed, 0)], values[: max(changed, 0)], target


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("density", [0.0, 0.04, 0.3, 0.5, 0.51, 1.0])
@pytest.mark.parametrize("convert", [True, False])
def test_in_place_encoding_equals_a_copy_and_gives_up_on_dense_chunks_untouched(
    density: float, convert: bool, loop: int
) -> None:
    src, prev, new, encode = encoder_case(density, convert)
    cap = new.size // 2
    owned = np.empty_like(prev)
    gaps = np.empty(cap + kernel.SLACK, np.uint32)
    values = np.empty(cap + kernel.SLACK, np.uint16)
    want = encode(src, prev, owned, gaps, values, cap, loop)
    changed, got_gaps, got_values, after = encode_in_place(encode, src, prev, cap, loop)
    assert changed == want
    if want < 0:  # more than cap changed: prev is left as it was
        assert np.array_equal(after, prev)
        return
    assert np.array_equal(after, new)
    assert np.array_equal(got_gaps, gaps[:want]) and np.array_equal(got_values, values[:want])


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("extra", [0, 1])
def test_in_place_encoding_that_overflows_in_the_tail_restores_prev(
    loop: int, extra: int
) -> None:
    """Changes only in the last elements (the last 16-element vector and the scalar tail
    after it): with one more change than ``cap`` the loop gives up there and restores what it
    wrote."""
    n, cap = 10_000 + 37, 10
    src, _, new, encode = encoder_case(0.0, True, n)
    prev = new.copy()
    prev[n - cap - extra:] ^= 1
    changed, _, _, after = encode_in_place(encode, src, prev, cap, loop)
    if extra:
        assert changed == -1 and np.array_equal(after, prev)
    else:
        assert changed == cap and np.array_equal(after, new)


def test_encoder_buffers_that_overlap_are_rejected() -> None:
    src, prev, new, encode = encoder_case(0.04, False, 1000)
    gaps, values = np.empty(500 + kernel.SLACK, np.uint32), np.empty(500 + kernel.SLACK, np.uint16)
    shifted = np.empty(1001, np.uint16)
    shifted[:1000] = prev
    with pytest.raises(ValueError, match="owned"):  # owned is prev shifted by one element
        encode(src, shifted[:1000], shifted[1:], gaps, values, 500)
    with pytest.raises(ValueError, match="owned"):  # owned is the source
        encode(src, prev, src, gaps, values, 500)
    assert np.array_equal(shifted[:1000], prev)
    # adjacent buffers share no byte; nor does an empty one
    both = np.empty(2000, np.uint16)
    both[:1000] = prev
    assert encode(src, both[:1000], both[1000:], gaps, values, 500) > 0
    assert np.array_equal(both[1000:], new) and np.array_equal(both[:1000], prev)
    empty = np.empty(0, np.uint16)
    assert encode(empty, empty, empty, gaps, values, 0) == 0


def test_buffers_too_small_are_rejected() -> None:
    src, prev = np.zeros(100, np.float32), np.zeros(100, np.uint16)
    owned, values = np.empty(100, np.uint16), np.empty(50 + kernel.SLACK, np.uint16)
    with pytest.raises(ValueError, match="gaps"):
        kernel.encode_f32_bf16(src, prev, owned, np.empty(50, np.uint32), values, 50)
    with pytest.raises(ValueError, match="src"):
        kernel.encode_f32_bf16(src[:99], prev, owned, np.empty(114, np.uint32), values, 50)
    with pytest.raises(ValueError, match="gaps"):  # (cap + SLACK) * 4 wraps around
        kernel.encode_f32_bf16(src, prev, owned, np.empty(114, np.uint32), values,
                               2**62 - kernel.SLACK)
    with pytest.raises(ValueError):  # cap + SLACK itself would overflow
        kernel.encode_copy16(prev, prev, owned, np.empty(114, np.uint32), values, 2**63 - 1)
    with pytest.raises(ValueError, match="2-byte"):
        kernel.encode_copy16(np.zeros(101, np.uint8), np.zeros(101, np.uint8), owned,
                             np.empty(114, np.uint32), values, 50)
    with pytest.raises(ValueError, match="width"):
        kernel.xor_scatter16(owned, np.zeros(10, np.uint8), 2, 3)
    with pytest.raises(ValueError, match="count"):  # 2 gaps of 1 byte + 2 values = 6 bytes
        kernel.xor_scatter16(owned, np.zeros(5, np.uint8), 2, 1)
    with pytest.raises(ValueError, match="source"):
        kernel.xor_scatter16(owned, np.zeros(6, np.uint8), 2, 1, prev[:99])
    with pytest.raises(ValueError, match="count"):  # count * (2 + 2) wraps around to 4 bytes
        kernel.xor_scatter16(owned, np.zeros(4, np.uint8), 2**62 + 1, 2)
    with pytest.raises(TypeError):
        kernel.xor_scatter16(prev.copy().data.toreadonly(), np.zeros(3, np.uint8), 1, 1)


def sparse_planes(gaps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A sparse frame's payload as stored: gap byte planes, then value byte planes."""
    return np.concatenate([snap.shuffle_bytes(gaps.view(np.uint8), gaps.itemsize),
                           snap.shuffle_bytes(values.view(np.uint8), 2)])


@pytest.mark.parametrize("largest", [0, 255, 256, 65_535, 65_536, 2**32 - 1])
def test_sparse_planes_narrow_the_gaps_like_the_numpy_path(largest: int) -> None:
    rng = np.random.default_rng(largest)
    gaps = rng.integers(0, largest + 1, 1_001, dtype=np.uint64).astype(np.uint32)
    gaps[500] = largest
    values = rng.integers(1, 1 << 16, gaps.size, dtype=np.uint16)
    out = np.full(6 * gaps.size + 7, 0xAB, np.uint8)
    width = kernel.sparse_planes16(gaps, values, gaps.size - 1, out)  # all but the last
    narrowed = snap._narrow_gaps(gaps[:-1])
    assert width == narrowed.itemsize
    written = (width + 2) * (gaps.size - 1)
    assert np.array_equal(out[:written], sparse_planes(narrowed, values[:-1]))
    assert (out[written:] == 0xAB).all()
    with pytest.raises(ValueError, match="fewer"):
        kernel.sparse_planes16(gaps, values, gaps.size, out[: 6 * gaps.size - 1])
    with pytest.raises(ValueError, match="fewer"):  # count * 6 would wrap around
        kernel.sparse_planes16(gaps, values, 2**62, out)


def test_scatter_past_the_end_leaves_the_target_untouched() -> None:
    target = np.arange(10, dtype=np.uint16)
    source = np.full(10, 9, np.uint16)
    planes = sparse_planes(np.array([1, 2, 7], np.uint8), np.array([5, 6, 7], np.uint16))
    for extra in ((), (source,)):  # positions 1, 4, 12: the last is past the end
        with pytest.raises(ValueError, match="past"):
            kernel.xor_scatter16(target, planes, 3, 1, *extra)
        assert np.array_equal(target, np.arange(10, dtype=np.uint16))
    kernel.xor_scatter16(target, planes[[0, 1, 3, 4, 6, 7]], 2, 1)
    expected = np.arange(10, dtype=np.uint16)
    expected[[1, 4]] ^= np.array([5, 6], np.uint16)
    assert np.array_equal(target, expected)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("with_source", [False, True])
def test_scatter_reads_byte_planes_like_the_numpy_path(width: int, with_source: bool) -> None:
    rng = np.random.default_rng(width)
    n = 300_000
    positions = np.sort(rng.choice(n, 100_000 if width == 1 else 2_000, replace=False))
    positions[-1] = n - 1  # the last element too
    if width == 4:
        positions = np.union1d([0, 70_000], positions[positions > 70_000])  # a 4-byte gap
    gaps = np.diff(positions, prepend=-1) - 1
    assert snap._narrow_gaps(gaps).itemsize == width
    values = rng.integers(1, 1 << 16, positions.size, dtype=np.uint16)
    planes = sparse_planes(snap._narrow_gaps(gaps), values)
    source = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    expected = source.copy()
    expected[positions] ^= values
    target = np.zeros(n, np.uint16) if with_source else source.copy()
    kernel.xor_scatter16(target, planes, positions.size, width,
                         *((source,) if with_source else ()))
    assert np.array_equal(target, expected)
    assert not with_source or not np.array_equal(source, expected)  # the source is not written


def test_a_corrupt_sparse_chunk_raises_checksum_error_through_the_decoder() -> None:
    prev = np.zeros(2 * 1000, np.uint8)
    cur = prev.copy()
    cur[2 * 999] = 1  # the only change is the last element
    enc = snap._encode_tensor(prev, snap._raw_source(cur, 2), snap.DEFAULT_ZSTD_LEVEL)
    assert enc.blob is not None
    short = prev[: 2 * 998].copy()  # a tensor too short for the chunk's position
    frames = snap._blob_frames(memoryview(enc.blob), 1000, 2)
    scratch = np.empty(2000, np.uint8)
    with pytest.raises(ChecksumError, match="past"):
        snap._xor_chunk(frames[0][2], short.view(np.uint16), 2, zstandard.ZstdDecompressor(),
                        scratch)
    assert not short.any()


def codes_payload(gaps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """What the numpy path stores after a packed-codes frame's header."""
    frame = snap._codes_frame(gaps, values, snap._compressor(1))
    content = zstandard.ZstdDecompressor().decompress(frame)
    return np.frombuffer(content, np.uint8)[snap._CODES_HEADER.size:]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("largest", [0, 14, 15, 255, 256, 65_535, 65_536, 2**32 - 1])
def test_sparse_codes_equal_the_numpy_path(largest: int, loop: int) -> None:
    rng = np.random.default_rng(largest)
    gaps = rng.integers(0, 20, 2_001, dtype=np.uint32)
    gaps[::7] = rng.integers(0, largest + 1, gaps[::7].size, dtype=np.uint64).astype(np.uint32)
    gaps[1000] = largest
    values = rng.integers(1, 40, gaps.size, dtype=np.uint16)
    values[::11] = rng.integers(1, 1 << 16, values[::11].size, dtype=np.uint16)
    values[3], values[5] = 15, 16
    count = gaps.size - 1  # all but the last
    out = np.full(7 * gaps.size + 9, 0xAB, np.uint8)
    longs, bigs, width = kernel.sparse_codes16(gaps.copy(), values.copy(), count, out, loop)
    assert (longs, bigs) == (np.count_nonzero(gaps[:count] >= 15),
                             np.count_nonzero(values[:count] >= 16))
    want = codes_payload(snap._narrow_gaps(gaps[:count]), values[:count])
    assert width == (4 if largest >= 65_536 else 2 if largest >= 256 else 1)
    end = count + longs * width + 2 * bigs
    assert np.array_equal(out[:end], want)
    assert (out[end:] == 0xAB).all()
    with pytest.raises(ValueError, match="fewer"):
        kernel.sparse_codes16(gaps, values, gaps.size, out[: 7 * gaps.size - 1])
    with pytest.raises(ValueError, match="fewer"):  # count * 7 would wrap around
        kernel.sparse_codes16(gaps, values, 2**62, out)
    with pytest.raises(TypeError):  # gaps and values are its scratch: they must be writable
        kernel.sparse_codes16(gaps.copy().data.toreadonly(), values, count, out)


@pytest.mark.parametrize("mix", ["random", "all long and big", "none long or big"])
def test_sparse_codes_vector_and_scalar_loops_agree_at_every_tail(mix: str) -> None:
    """The vector loops take whole vectors (16 for AVX-512, 8 for AVX2) and leave the tail to
    the scalar one: every count from 0 to 49 gives the same payload, the same counts and the
    numpy path's bytes."""
    rng = np.random.default_rng(len(mix))
    gaps = rng.integers(0, 30, 49, dtype=np.uint32)
    values = rng.integers(1, 32, 49, dtype=np.uint16)
    if mix == "all long and big":
        gaps, values = gaps + 15, values + 0x7FF0  # big values past 0x8000 among them
    elif mix == "none long or big":
        gaps, values = gaps % 15, values % 15 + 1
    for count in range(50):
        results = []
        for loop in LOOPS:
            out = np.full(7 * 49 + 64, 0xAB, np.uint8)
            longs, bigs, width = kernel.sparse_codes16(gaps.copy(), values.copy(), count, out,
                                                       loop)
            results.append((longs, bigs, width, out.tobytes()))
        assert all(r == results[0] for r in results), count
        longs, bigs, width, out_bytes = results[0]
        end = count + longs * width + 2 * bigs
        want = codes_payload(snap._narrow_gaps(gaps[:count]), values[:count]) if count else []
        assert np.array_equal(np.frombuffer(out_bytes, np.uint8)[:end], want), count


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("with_source", [False, True])
def test_codes_scatter_like_the_numpy_path(width: int, with_source: bool) -> None:
    rng = np.random.default_rng(10 + width)
    n = 300_000
    positions = np.sort(rng.choice(n, 60_000, replace=False))
    positions[-1] = n - 1
    if width > 1:  # one long gap of this width
        cut = 256 if width == 2 else 70_000
        positions = np.union1d([0], positions[positions > cut])
    gaps = snap._narrow_gaps(np.diff(positions, prepend=-1) - 1)
    values = rng.integers(1, 24, positions.size, dtype=np.uint16)
    values[::97] = rng.integers(1, 1 << 16, values[::97].size, dtype=np.uint16)
    payload = codes_payload(gaps, values)
    longs, bigs = int(np.count_nonzero(gaps >= 15)), int(np.count_nonzero(values >= 16))
    assert payload.size == positions.size + longs * width + 2 * bigs
    source = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    expected = source.copy()
    expected[positions] ^= values
    target = np.zeros(n, np.uint16) if with_source else source.copy()
    kernel.xor_codes16(target, payload, positions.size, longs, bigs, width,
                       *((source,) if with_source else ()))
    assert np.array_equal(target, expected)
    assert not with_source or not np.array_equal(source, expected)  # the source is not written


def test_codes_that_do_not_add_up_leave_the_target_untouched() -> None:
    gaps = np.array([0, 20, 3, 1], np.uint8)  # positions 0, 21, 25, 27
    values = np.array([5, 300, 7, 9], np.uint16)
    payload = codes_payload(gaps, values)  # 4 codes, 1 long gap (20), 1 big value (300)
    codes, long_gap, big_value = payload[:4], payload[4:5], payload[5:7]
    source = np.full(30, 9, np.uint16)
    cases = {  # (payload, long gaps, big values) that the codes do not use exactly
        "a long gap missing": (np.concatenate([codes, big_value]), 0, 1),
        "a long gap left over": (np.concatenate([codes, long_gap, long_gap, big_value]), 2, 1),
        "a big value missing": (np.concatenate([codes, long_gap]), 1, 0),
        "a big value left over": (np.concatenate([codes, long_gap, big_value, big_value]), 1, 2),
    }
    for with_source in (False, True):
        extra = (source[:28],) if with_source else ()
        for what, (body, longs, bigs) in cases.items():
            target = np.arange(28, dtype=np.uint16)
            with pytest.raises(ValueError, match="exactly"):
                kernel.xor_codes16(target, body, 4, longs, bigs, 1, *extra)
                pytest.fail(what)
            assert np.array_equal(target, np.arange(28, dtype=np.uint16)), what
        short = np.arange(27, dtype=np.uint16)  # position 27 is past its end
        with pytest.raises(ValueError, match="past"):
            kernel.xor_codes16(short, payload, 4, 1, 1, 1, *((source[:27],) if with_source
                                                             else ()))
        assert np.array_equal(short, np.arange(27, dtype=np.uint16))
    target = np.arange(28, dtype=np.uint16)
    kernel.xor_codes16(target, payload, 4, 1, 1, 1)
    expected = np.arange(28, dtype=np.uint16)
    expected[[0, 21, 25, 27]] ^= values
    assert np.array_equal(target, expected)
    with pytest.raises(ValueError, match="payload"):
        kernel.xor_codes16(np.zeros(30, np.uint16), payload[:-1], 4, 1, 1, 1)
    with pytest.raises(ValueError, match="payload"):
        kernel.xor_codes16(np.zeros(30, np.uint16), payload, 4, 1, 1, 3)
    with pytest.raises(ValueError, match="payload"):  # counts whose size wraps around to 8
        kernel.xor_codes16(np.zeros(30, np.uint16), np.zeros(8, np.uint8), 2**62,
                           2**62 - 2**60 + 2, 0, 4)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_a_corrupt_codes_chunk_raises_checksum_error_through_the_decoder(
    monkeypatch: pytest.MonkeyPatch, use_kernel: bool
) -> None:
    if not use_kernel:
        monkeypatch.setattr(snap, "_xorkernel", None)
    gaps = np.array([0, 20, 3, 1], np.uint8)
    values = np.array([5, 300, 7, 9], np.uint16)
    content = bytearray(zstandard.ZstdDecompressor().decompress(
        snap._codes_frame(gaps, values, snap._compressor(1))))
    compress = snap._compressor(1).compress
    decompressor, scratch = zstandard.ZstdDecompressor(), np.empty(60, np.uint8)
    target = np.arange(28, dtype=np.uint16)
    snap._xor_chunk(memoryview(compress(bytes(content))), target.copy(), 2, decompressor, scratch)
    head = snap._CODES_HEADER.size
    swapped = bytearray(content)
    swapped[head + 1] = 0x31  # the long-gap code now says gap 3, value 1: one long gap unused
    bad = {"unused escape": bytes(swapped),
           "header counts": bytes(content[:5]) + (2).to_bytes(4, "little") + bytes(content[9:]),
           "width": bytes(content[: head - 1]) + b"\x03" + bytes(content[head:])}
    for what, data in bad.items():
        held = target.copy()
        with pytest.raises(ChecksumError):
            snap._xor_chunk(memoryview(compress(data)), held, 2, decompressor, scratch)
            pytest.fail(what)
        assert np.array_equal(held, target), what
    with pytest.raises(ChecksumError, match="past"):
        snap._xor_chunk(memoryview(compress(bytes(content))), target[:27].copy(), 2,
                        decompressor, scratch)


_OUT_OF_MEMORY = """
import resource, sys
import numpy as np
from asyncrl.sync import _xorkernel as kernel

n = 1 << 22  # every element changed by a big diff: the decoder records 4M positions (32 MB)
target = np.zeros(n, np.uint16)
payload = np.zeros(3 * n, np.uint8)  # n codes (gap 0, "big"), then the low / high value planes
payload[n : 2 * n] = 1
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm + (8 << 20), hard))
try:
    kernel.xor_codes16(target, payload, n, 0, n, 1)
except MemoryError:
    print("MemoryError", int(np.count_nonzero(target)))
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
kernel.xor_codes16(target, payload, n, 0, n, 1)  # the same call, with memory: it was the malloc
print("applied", int(np.count_nonzero(target == 1)))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_xor_codes16_out_of_memory_raises_before_writing() -> None:
    """The big diffs' positions are malloc'ed after the payload check and before any write:
    when that fails (an address-space limit just above what the process uses) MemoryError is
    raised and the target is untouched."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY], capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.split() == ["MemoryError", "0", "applied", str(1 << 22)]


def test_the_loops_offered_match_the_cpu_and_others_are_refused() -> None:
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    if " avx2" in flags and " popcnt" in flags:  # a CPU with AVX2 runs the AVX2 loops
        assert 2 in kernel.LOOPS and kernel.SIMD in ("avx2", "avx512")
    src, prev, _, encode = encoder_case(0.04, True, 100)
    scratch = np.empty(100 + kernel.SLACK, np.uint32), np.empty(100 + kernel.SLACK, np.uint16)
    for bad in (3, -1, *(() if 2 in kernel.LOOPS else (2,))):
        with pytest.raises(ValueError, match="loop"):
            encode(src, prev, np.empty_like(prev), *scratch, 50, bad)
        with pytest.raises(ValueError, match="loop"):
            kernel.sparse_codes16(*scratch, 10, np.empty(70, np.uint8), bad)
        with pytest.raises(ValueError, match="loop"):
            kernel.codes_sums16(np.zeros(40, np.uint8), bad)


@pytest.mark.parametrize("mix", ["random", "all long and big", "none long or big"])
def test_code_sums_agree_across_loops_at_every_tail(mix: str) -> None:
    """What xor_codes16 checks a payload by (short gaps summed, long-gap and big-value codes
    counted), from the vector loops (32 or 64 codes per step) and the scalar one."""
    rng = np.random.default_rng(len(mix))
    codes = rng.integers(0, 256, 200, dtype=np.uint8)
    if mix == "all long and big":
        codes = np.full_like(codes, 0xF0)
    elif mix == "none long or big":
        codes = (codes % 0xE0) | 1
    for count in range(0, 200, 7):
        part = codes[:count]
        gaps = part >> 4
        want = (int(gaps[gaps != 15].sum()), int(np.count_nonzero(gaps == 15)),
                int(np.count_nonzero(part & 15 == 0)))
        assert all(kernel.codes_sums16(part, loop) == want for loop in LOOPS), count
