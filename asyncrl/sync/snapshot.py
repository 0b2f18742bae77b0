"""Sampler weight snapshots: a full base, then XOR deltas, kept byte-exact on the host.

Layout of one snapshot directory ``<root>/<name>/``:
    model.safetensors   (base)  HF safetensors layout, loads with transformers / vLLM
    delta.bin           (delta) the zstd blobs of the changed tensors, one after another
    <extra files>       (base)  e.g. config.json / tokenizer files, so the dir is servable
    snapshot.json       manifest, written LAST (see ``SnapshotManifest``)

A delta blob of one tensor carries ``diff = previous_bytes XOR current_bytes`` (so
``current = previous XOR diff``, bit-exact), cut into chunks of ``CHUNK_BYTES`` (one zstd frame
each, encoded and decoded while the chunk is in cache; an unchanged chunk has no frame):
    blob  := "AXD3" u64 elements, u32 per_chunk, u32 chunks, u32 frame_length[chunks], frames
    frame := zstd(1 | byte_planes(diff))                         more than half changed
           | zstd(2 | u32 changed, u8 gap_width | byte_planes(gaps) | byte_planes(values))
           | zstd(3 | u32 changed, u32 long_gaps, u32 big_values, u8 gap_width
                    | codes | byte_planes(long gaps) | byte_planes(big values))
                                      2-byte elements, 1/8 to 1/2 of them changed (format v4)
``byte_planes`` groups the k-th byte of every element together (``(n, itemsize) -> T``), which
puts the mostly-unchanged exponent bytes of bf16/fp16/fp32 into long zero runs. ``gaps`` are
the counts of unchanged elements before each changed one, as integers of 1, 2 or 4 bytes (the
smallest that holds the largest gap); ``values`` are the changed elements of ``diff``. After a
small step only a few % of the elements change (bf16 rounding), and these positions + values
compress ~1.7x better than the zstd of the XOR itself. A step of a few units in the last place
leaves most diffs below 16; where many elements changed (1/8 or more) most gaps are below 15
too, and filter 3 packs both into one byte per element (``code = min(gap, 15) << 4 | (value if
value < 16 else 0)``; a code's 15 / 0 nibble takes the next of the long gaps / big values that
follow). zstd's entropy stage, most of a dense delta's cost, then sees ~1.3 bytes per changed
element instead of 3.

Chunks are 4 MiB: the encoder and decoder run one thread per core, and with 1 MiB chunks the
many small numpy calls per chunk serialised the threads on the GIL (two threads encoded no
faster than one); 4 MiB chunks still fit the L3 cache. The threads take pieces of
``PIECE_CHUNKS`` chunks, not whole tensors: a 0.5B model's embedding is a quarter of its bytes,
and as one thread's work it would bound a delta's encode and verification at a quarter of their
single-thread time however many cores there are (the largest piece is 32 MiB). Each tensor is
still hashed in order: the thread that writes the piece the hash has reached hashes it as it
goes, and a piece finished ahead of that is hashed once the pieces before it are
(``_OrderedHash``).

The hot loops have two implementations that write the same bytes (tests compare them): a small
C kernel (``_xorkernel.c``, built by setup.py when a compiler is there) converts fp32 -> bf16,
XORs and collects the gaps + values of a 2-byte chunk in one pass over memory (AVX-512 or AVX2
where the CPU has it), and applies them in one pass; the numpy path below covers every dtype,
needs 5-7 passes per chunk and is used for what the kernel does not cover or when it is not
built.
0.5B shape on 2 cores (Zen 4): a delta's encode 1.0 -> 0.26 s, its verification (which writes
it over the held bytes as it goes) ~0.15 s.

Checksums are XXH3-128; the encoder hashes each tensor's bytes as it converts them and the
decoder each chunk as it builds it (in cache), so hashing costs no extra pass over memory but
for the pieces finished ahead of their tensor's hash. They
are there to catch corruption and mix-ups (truncated / flipped / swapped files, a delta on the
wrong snapshot), which XXH3 does as well as a cryptographic hash at ~9x its speed (18 us vs 162 us
per MiB for BLAKE3 here). A cryptographic hash would add nothing: whoever can write into the
snapshot root can write a valid snapshot of any weights (the root is the trust boundary).

Invariants:
- The identity of a snapshot is a hash of its sorted (name, dtype, shape, checksum) list:
  equal weights give equal identities, whatever the name, kind or time they were written.
- A ``HostSnapshot`` owns its bytes (read-only numpy arrays, never a view of a caller's tensor
  or of a live model). Deltas are computed against it and applied to it; ``write_delta(...,
  in_place=True)`` (the trainer's) and an applied delta (the worker's) turn its bytes into the
  new snapshot's, after which only the new snapshot may be used.
- ``apply_snapshot`` verifies everything (blob checksums, sizes, result checksums, identity)
  before it returns, and raises rather than return wrong bytes. It mutates ``current`` only
  when asked to (``in_place``): a delta is then verified as it is written over ``current``
  (``prepare_snapshot``, one pass), and one that fails is turned back before the error is
  raised, so ``current`` is as it was (``HeldBytesLostError`` if even that fails).
- A directory is valid only if its manifest exists. Snapshots are written into ``.tmp-*``
  inside ``root`` (manifest last) and renamed into place; readers ignore ``.tmp-*``; an
  existing snapshot is never overwritten. A base is made durable (its files and directories
  fsynced before and after the rename): it can be promoted. A delta is not, by default
  (``write_delta(durable=False)``): it is read once, by a deployment running beside the
  trainer that wrote it, and both lose their chain with the machine (a restarted deployment
  or trainer starts from a base). A process that dies mid-write still leaves only a
  ``.tmp-*``; after a power loss a delta's files may be cut short, which every read refuses
  (sizes and checksums). Its fsyncs cost 0.06 s of a 0.5 s encode at lr 1e-6 and 0.15 s of
  0.8 s at lr 1e-5 on the 0.5B shape (a 255 MB/s disk).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np
import torch
import xxhash
import zstandard

from asyncrl.errors import (
    ChecksumError,
    DeltaChainError,
    HeldBytesLostError,
    IdentityMismatchError,
    SnapshotError,
)
from asyncrl.sync.cpus import usable_cpus

try:  # the C kernel setup.py builds; without it the numpy path writes the same bytes, slower
    from asyncrl.sync import _xorkernel
except ImportError:  # pragma: no cover - depends on the install
    _xorkernel = None  # type: ignore[assignment]

FORMAT = "asyncrl-snapshot"
FORMAT_VERSION = 4
READABLE_FORMAT_VERSIONS = (3, 4)  # 4 added the packed-codes chunk (filter 3)
MANIFEST_FILE = "snapshot.json"
WEIGHTS_FILE = "model.safetensors"
DELTA_FILE = "delta.bin"
TEMP_PREFIX = ".tmp-"
CHECKSUM_ALGORITHM = "xxh3-128"
DEFAULT_ZSTD_LEVEL = 1
DELTA_FILTER = "xor+chunks(sparse-gaps|sparse-codes|byte-planes)"
CHUNK_BYTES = 1 << 22  # raw bytes per delta chunk (one zstd frame); fits in L3
PIECE_CHUNKS = 8  # chunks per unit of parallel work: threads share a large tensor
SPARSE_MAX_DENSITY = 0.5  # a chunk with more changed elements is stored as byte planes
CODES_MIN_DENSITY = 0.125  # a sparse 2-byte chunk with this many changed stores packed codes

SnapshotKind = Literal["base", "delta"]

# manifest dtype name -> (torch dtype, safetensors dtype code)
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
    "float32": (torch.float32, "F32"),
    "float64": (torch.float64, "F64"),
    "int8": (torch.int8, "I8"),
    "uint8": (torch.uint8, "U8"),
    "int16": (torch.int16, "I16"),
    "int32": (torch.int32, "I32"),
    "int64": (torch.int64, "I64"),
    "bool": (torch.bool, "BOOL"),
}
_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}
_LAYER_PREFIX = re.compile(r"^(.*?\blayers\.\d+\.)")

_T = TypeVar("_T")
_R = TypeVar("_R")


# ---------------------------------------------------------------------------------------------
# Data types


class RawTensor(NamedTuple):
    """The raw bytes of one tensor: ``data`` is a flat, C-ordered uint8 array."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True)
class HostSnapshot:
    """The host-side copy of one snapshot: identity, raw bytes and checksum per tensor."""

    identity: str
    tensors: Mapping[str, RawTensor]
    checksums: Mapping[str, str]

    @property
    def names(self) -> list[str]:
        return sorted(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(raw.data.nbytes for raw in self.tensors.values())


@dataclass(frozen=True)
class BlobRef:
    """Where one tensor's compressed delta lies in ``delta.bin``."""

    offset: int
    length: int
    checksum: str


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a manifest; ``checksum`` is of the snapshot's (resulting) raw bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    checksum: str
    blob: BlobRef | None = None


@dataclass(frozen=True)
class SnapshotManifest:
    """The content of ``snapshot.json``. ``tensors`` lists every tensor of the snapshot, sorted
    by name; in a delta only changed tensors carry a ``blob``."""

    snapshot_identity: str
    kind: SnapshotKind
    previous_snapshot_identity: str | None
    created_at: float
    tensors: tuple[TensorEntry, ...]
    zstd_level: int | None = None
    format_version: int = FORMAT_VERSION
    checksum_algorithm: str = CHECKSUM_ALGORITHM

    @property
    def changed(self) -> list[str]:
        """Names of the tensors this snapshot carries bytes for (all of them for a base)."""
        if self.kind == "base":
            return [entry.name for entry in self.tensors]
        return [entry.name for entry in self.tensors if entry.blob is not None]


@dataclass(frozen=True)
class LoadedSnapshot:
    """The verified result of ``apply_snapshot``: the new host bytes and what changed."""

    manifest: SnapshotManifest
    snapshot: HostSnapshot
    changed: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Pure byte helpers


def checksum(data: np.ndarray | bytes) -> str:
    """128-bit hex checksum of raw bytes (XXH3-128)."""
    return xxhash.xxh3_128_hexdigest(_buffer(data))


def snapshot_identity(entries: Iterable[tuple[str, str, Sequence[int], str]]) -> str:
    """Content identity over sorted (name, dtype, shape, checksum); 32 hex chars."""
    canonical = sorted((name, dtype, list(shape), digest) for name, dtype, shape, digest in entries)
    payload = json.dumps([CHECKSUM_ALGORITHM, canonical], separators=(",", ":"))
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def xor_bytes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a ^ b`` of two equal-length uint8 arrays, 8 bytes at a time where the length allows."""
    if a.nbytes != b.nbytes:
        raise ValueError(f"xor of {a.nbytes} bytes with {b.nbytes} bytes")
    out = np.empty(a.nbytes, dtype=np.uint8)
    n8 = a.nbytes - a.nbytes % 8
    np.bitwise_xor(a[:n8].view(np.uint64), b[:n8].view(np.uint64), out=out[:n8].view(np.uint64))
    np.bitwise_xor(a[n8:], b[n8:], out=out[n8:])
    return out


def any_nonzero(data: np.ndarray) -> bool:
    """Whether a uint8 array holds any non-zero byte."""
    n8 = data.nbytes - data.nbytes % 8
    return bool(data[:n8].view(np.uint64).any() or data[n8:].any())


def shuffle_bytes(data: np.ndarray, itemsize: int, out: np.ndarray | None = None) -> np.ndarray:
    """Byte planes: element i's k-th byte goes to ``out[k * n + i]`` (into ``out`` if given)."""
    planes = np.empty(data.nbytes, np.uint8) if out is None else out
    if itemsize == 1:
        np.copyto(planes, data)
        return planes
    elements = data.reshape(-1, itemsize)
    for k, plane in enumerate(planes.reshape(itemsize, -1)):
        np.copyto(plane, elements[:, k])  # one strided plane at a time: ~8x a transpose copy
    return planes


def unshuffle_bytes(
    planes: np.ndarray, itemsize: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Inverse of ``shuffle_bytes``; a new writable array unless ``out`` is given."""
    data = np.empty(planes.nbytes, np.uint8) if out is None else out
    if itemsize == 1:
        np.copyto(data, planes)
        return data
    elements = data.reshape(-1, itemsize)
    for k, plane in enumerate(planes.reshape(itemsize, -1)):
        np.copyto(elements[:, k], plane)
    return data


def encode_tensor_delta(
    previous: np.ndarray, current: np.ndarray, itemsize: int, *, level: int = DEFAULT_ZSTD_LEVEL
) -> bytes | None:
    """The delta blob of one tensor's raw bytes (see the module docstring), or None when the
    bytes are equal."""
    return _encode_tensor(previous, _raw_source(current, itemsize), level).blob


def decode_tensor_delta(
    blob: bytes | np.ndarray, previous: np.ndarray, itemsize: int
) -> np.ndarray:
    """Inverse of ``encode_tensor_delta``: the current bytes (a new array). Raises
    ``ChecksumError`` if the blob is malformed or does not fit ``previous``."""
    out = _BUFFERS.take(previous.nbytes)
    _decode_tensor(blob, previous, itemsize, out=out)
    return out


def encode_naive_delta(
    prev_bytes: np.ndarray, cur_bytes: np.ndarray, *, level: int = DEFAULT_ZSTD_LEVEL
) -> bytes:
    """``zstd(previous ^ current)`` in one frame, no filter (the benchmark's baseline)."""
    return zstandard.ZstdCompressor(level=level).compress(
        _buffer(xor_bytes(prev_bytes, cur_bytes))
    )


# ---------------------------------------------------------------------------------------------
# torch <-> raw bytes


def from_torch(
    tensors: Mapping[str, torch.Tensor], dtype: str | None = None
) -> dict[str, RawTensor]:
    """Own read-only copies of the raw bytes of ``tensors`` (safe to keep while the trainer
    keeps updating its parameters in place), converted to ``dtype`` (a manifest dtype name)
    when given."""
    return {name: _converted(_source(tensor, dtype)) for name, tensor in tensors.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    if dtype not in _DTYPE_NAMES:
        raise SnapshotError(f"unsupported dtype {dtype}; expected one of {sorted(_DTYPES)}")
    return _DTYPE_NAMES[dtype]


def to_torch(
    snapshot: HostSnapshot, names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors viewing the snapshot's bytes (zero-copy). They must be treated as read-only."""
    selected = snapshot.names if names is None else list(names)
    missing = [name for name in selected if name not in snapshot.tensors]
    if missing:
        raise SnapshotError(f"snapshot {snapshot.identity} has no tensor(s) {missing[:5]}")
    return {name: _tensor_of(snapshot.tensors[name]) for name in selected}


def make_host_snapshot(
    raw: Mapping[str, RawTensor], *, workers: int | None = None
) -> HostSnapshot:
    """A ``HostSnapshot`` of raw tensors the caller hands over (checksums and identity
    computed here). The arrays are marked read-only."""
    names = sorted(raw)
    digests = _parallel_map(lambda name: checksum(raw[name].data), names, workers,
                            cost=lambda name: raw[name].data.nbytes)
    return _host_snapshot(raw, dict(zip(names, digests, strict=True)))


def shares_bytes(a: HostSnapshot, b: HostSnapshot) -> bool:
    """Whether any tensor of ``a`` lies in memory that a tensor of ``b`` uses too."""
    spans = sorted((*span, side) for side, snap in enumerate((a, b)) for span in _spans(snap))
    ends = [0, 0]  # the furthest end so far of a's spans and of b's
    for start, end, side in spans:
        if start < ends[1 - side]:
            return True
        ends[side] = max(ends[side], end)
    return False


def _spans(snapshot: HostSnapshot) -> list[tuple[int, int]]:
    """The (start, end) addresses of the snapshot's non-empty tensors."""
    return [(start, start + raw.data.nbytes) for raw in snapshot.tensors.values()
            if raw.data.nbytes for start in (raw.data.__array_interface__["data"][0],)]


def _shares_within(snapshot: HostSnapshot) -> bool:
    """Whether two tensors of one snapshot share any byte."""
    end = 0
    for start, stop in sorted(_spans(snapshot)):
        if start < end:
            return True
        end = max(end, stop)
    return False


def changed_layer_groups(names: Iterable[str], all_names: Iterable[str]) -> list[str]:
    """Tensor names to reload so every touched decoder layer (``...layers.N.``) is reloaded
    whole (vLLM fuses q/k/v and gate/up); other tensors are reloaded individually.
    Returned in the order of ``all_names``."""
    everything = list(all_names)
    known = set(everything)
    changed = set(names)
    unknown = sorted(changed - known)
    if unknown:
        raise SnapshotError(f"changed tensor(s) {unknown[:5]} are not in the model")
    layers = {prefix for prefix in map(_layer_prefix, changed) if prefix is not None}
    return [name for name in everything if name in changed or _layer_prefix(name) in layers]


# ---------------------------------------------------------------------------------------------
# Writing


def write_base(
    root: str | os.PathLike[str],
    name: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    dtype: str | None = None,
    previous_identity: str | None = None,
    extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
    workers: int | None = None,
) -> tuple[SnapshotManifest, HostSnapshot]:
    """Write ``root/name`` as a full servable safetensors snapshot, in ``dtype`` (a manifest
    dtype name) when given, else in the tensors' own dtypes.

    ``previous_identity`` is recorded as lineage only; applying a base never checks it.
    ``extra_files`` (target filename -> source path) are copied into the directory."""
    root, target = _target_dir(root, name)
    extras = _check_extra_files(extra_files or {})
    sources = {n: _source(t, dtype) for n, t in tensors.items()}

    def fill(tmp: Path) -> tuple[SnapshotManifest, HostSnapshot]:
        snapshot = _write_safetensors(tmp / WEIGHTS_FILE, sources, workers)
        for filename, source in extras.items():
            shutil.copyfile(source, tmp / filename)
            _fsync_file(tmp / filename)
        manifest = SnapshotManifest(
            snapshot_identity=snapshot.identity,
            kind="base",
            previous_snapshot_identity=previous_identity,
            created_at=time.time(),
            tensors=tuple(_entry(snapshot, n) for n in snapshot.names),
        )
        return manifest, snapshot

    return _write_atomically(root, target, fill)


def write_delta(
    root: str | os.PathLike[str],
    name: str,
    tensors: Mapping[str, torch.Tensor],
    previous: HostSnapshot,
    *,
    dtype: str | None = None,
    level: int = DEFAULT_ZSTD_LEVEL,
    workers: int | None = None,
    in_place: bool = False,
    durable: bool = False,
) -> tuple[SnapshotManifest, HostSnapshot]:
    """Write ``root/name`` as a delta of ``tensors`` against ``previous``; unchanged tensors
    carry no blob. A tensor set that differs from ``previous`` raises ``DeltaChainError``.
    ``durable=True`` fsyncs it as a base is (see the module docstring for why a delta is not
    by default).

    ``dtype`` (a manifest dtype name, e.g. ``"bfloat16"``): the snapshot's dtype when it is not
    the tensors' own. The tensors are then converted chunk by chunk inside the encoder, e.g.
    straight from a trainer's fp32 parameters (no full-size converted copy is made first);
    tensors on an accelerator are converted there and copied to the host one at a time, as
    their encoding starts. The tensors must not change while this runs.

    ``in_place=True`` CONSUMES ``previous``: the bytes of each changed tensor are turned into
    the new ones where they lie and become the returned snapshot's, so the host holds one copy
    of the model instead of two and no fresh memory is faulted in (the AVX-512 loop also
    writes only the 64-byte vectors that changed). ``previous`` must not be used afterwards,
    also when this raises (its bytes may then be part old, part new). Written as copies, as
    without it: the tensors of a ``previous`` whose tensors share bytes with each other, a
    tensor whose source lies in its bytes, and one whose array numpy will not let be
    written."""
    root, target = _target_dir(root, name)
    sources = {n: _source(t, dtype) for n, t in tensors.items()}
    _check_same_tensor_set(sources, previous)
    names = sorted(sources)
    in_place = in_place and not _shares_within(previous)

    def fill(tmp: Path) -> tuple[SnapshotManifest, HostSnapshot]:
        tensors = [_TensorEncoding(previous.tensors[n].data, sources[n], level, in_place=in_place)
                   for n in names]
        with _StreamedFile(tmp / DELTA_FILE, durable=durable) as out:
            blobs = _BlobWriter(out, names)
            try:
                _each_piece(tensors, _TensorEncoding.encode, workers,
                            done=lambda i: blobs.done(i, tensors[i].result()))
            finally:
                for tensor in tensors:
                    tensor.close()
            out.sync()
        encoded = blobs.encoded
        snapshot = _host_snapshot(
            {n: previous.tensors[n] if e.raw is None else previous.tensors[n]._replace(data=e.raw)
             for n, e in encoded.items()},
            {n: previous.checksums[n] if e.checksum is None else e.checksum
             for n, e in encoded.items()},
        )
        manifest = SnapshotManifest(
            snapshot_identity=snapshot.identity,
            kind="delta",
            previous_snapshot_identity=previous.identity,
            created_at=time.time(),
            tensors=tuple(_entry(snapshot, n) if n not in blobs.refs
                          else replace(_entry(snapshot, n), blob=blobs.refs[n])
                          for n in snapshot.names),
            zstd_level=level,
        )
        return manifest, snapshot

    return _write_atomically(root, target, fill, durable=durable)


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(path: str | os.PathLike[str]) -> SnapshotManifest:
    """Parse ``path/snapshot.json``; a missing or malformed manifest raises ``SnapshotError``."""
    path = Path(path)
    if path.name.startswith(TEMP_PREFIX):
        raise SnapshotError(f"{path} is an unfinished temporary snapshot directory")
    try:
        text = (path / MANIFEST_FILE).read_text()
    except FileNotFoundError as exc:
        raise SnapshotError(f"{path} has no {MANIFEST_FILE}: not a (complete) snapshot") from exc
    try:
        return _manifest_from_json(json.loads(text))
    except (UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"{path / MANIFEST_FILE} is malformed: {exc!r}") from exc


def apply_snapshot(
    path: str | os.PathLike[str],
    current: HostSnapshot | None,
    *,
    workers: int | None = None,
    manifest: SnapshotManifest | None = None,
    in_place: bool = False,
) -> LoadedSnapshot:
    """Load the snapshot at ``path``: a base on its own, a delta on top of ``current``.
    Everything is verified before anything is returned. ``manifest``: ``read_manifest(path)``
    if the caller has already read it.

    ``current`` is never modified, unless ``in_place`` (a delta then turns the bytes of
    ``current``'s changed tensors into the new ones instead of copying 1 GB per GB of model,
    see ``prepare_snapshot``): on success ``current`` must no longer be used (its bytes are the
    returned snapshot's); a snapshot that fails verification leaves it as it was."""
    path = Path(path)
    manifest = read_manifest(path) if manifest is None else manifest
    _check_manifest_identity(path, manifest)
    if manifest.kind == "base":
        snapshot = _load_base(path, manifest, workers)
    else:
        snapshot = _load_delta(path, manifest, current, workers, in_place=in_place)
    return LoadedSnapshot(manifest, snapshot, tuple(manifest.changed))


def prepare_snapshot(
    path: str | os.PathLike[str],
    current: HostSnapshot | None,
    *,
    workers: int | None = None,
    manifest: SnapshotManifest | None = None,
) -> LoadedSnapshot:
    """Read, verify and load the snapshot at ``path``: a base into new arrays, a delta IN PLACE
    over ``current``'s bytes of each changed tensor (into a copy where numpy will not let them
    be written). On success ``current`` must no longer be used: its changed arrays ARE the new
    snapshot's.

    A delta is verified as it is written, in one pass: each chunk is XORed where it lies and
    hashed while it is in cache. A delta that fails (a chunk that does not decode, a checksum)
    is turned back before the error is raised: XOR is its own inverse, so applying the same
    chunks again restores every byte it turned, and ``current`` is as it was. Only if turning
    back fails as well (it repeats decodes that succeeded; memory exhaustion could) is
    ``HeldBytesLostError`` raised: ``current`` is then unusable."""
    return apply_snapshot(path, current, workers=workers, manifest=manifest, in_place=True)


def list_snapshots(root: str | os.PathLike[str]) -> list[str]:
    """Names of the complete snapshots under ``root`` (``.tmp-*`` and dirs without a manifest
    are ignored), sorted. After a power loss this may name a delta whose files were cut short
    (deltas are not fsynced); reading it is refused."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()
    )


def remove_stale_temp_dirs(root: str | os.PathLike[str]) -> list[str]:
    """Delete ``.tmp-*`` leftovers of crashed writes; call only when no writer is running."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = sorted(p.name for p in root.iterdir() if p.name.startswith(TEMP_PREFIX))
    for name in stale:
        shutil.rmtree(root / name, ignore_errors=True)
    return stale


# ---------------------------------------------------------------------------------------------
# Internals: snapshots and tensors


def _buffer(data: np.ndarray | bytes) -> memoryview:
    """A flat byte memoryview of a contiguous array (or bytes), for hashlib / zstd / files."""
    if isinstance(data, bytes):
        return memoryview(data)
    return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def _converted(source: _Source) -> RawTensor:
    """An owned read-only copy of ``source`` in its snapshot dtype (one conversion pass)."""
    source = _on_host(source)
    nbytes = _nbytes(source)
    data = _BUFFERS.take(nbytes) if nbytes else np.empty(0, np.uint8)
    if nbytes:
        torch.from_numpy(data).view(_DTYPES[source.dtype][0]).copy_(source.flat)
    data.flags.writeable = False
    return RawTensor(source.dtype, source.shape, data)


def _nbytes(source: _Source) -> int:
    """The size of ``source`` in its snapshot dtype."""
    return source.flat.numel() * _itemsize(source.dtype)


def _host_snapshot(raw: Mapping[str, RawTensor], digests: Mapping[str, str]) -> HostSnapshot:
    names = sorted(raw)
    for n in names:
        raw[n].data.flags.writeable = False
    identity = snapshot_identity((n, raw[n].dtype, raw[n].shape, digests[n]) for n in names)
    return HostSnapshot(
        identity=identity,
        tensors=MappingProxyType({n: raw[n] for n in names}),
        checksums=MappingProxyType({n: digests[n] for n in names}),
    )


def _tensor_of(raw: RawTensor) -> torch.Tensor:
    if raw.data.nbytes == 0:  # torch cannot re-view an empty array (its stride may be 0)
        return torch.empty(raw.shape, dtype=_DTYPES[raw.dtype][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only numpy arrays
        flat = torch.from_numpy(raw.data)
    return flat.view(_DTYPES[raw.dtype][0]).reshape(raw.shape)


def _itemsize(dtype: str) -> int:
    return _DTYPES[dtype][0].itemsize


def _entry(snapshot: HostSnapshot, name: str) -> TensorEntry:
    raw = snapshot.tensors[name]
    return TensorEntry(name, raw.dtype, raw.shape, snapshot.checksums[name])


def _layer_prefix(name: str) -> str | None:
    match = _LAYER_PREFIX.match(name)
    return match.group(1) if match else None


def _check_same_tensor_set(views: Mapping[str, _Source], previous: HostSnapshot) -> None:
    added = sorted(set(views) - set(previous.tensors))
    removed = sorted(set(previous.tensors) - set(views))
    if added or removed:
        raise DeltaChainError(
            f"tensor set differs from previous snapshot {previous.identity} "
            f"(new: {added[:5]}, missing: {removed[:5]}); write a base"
        )
    for name, view in views.items():
        old = previous.tensors[name]
        if (view.dtype, view.shape) != (old.dtype, old.shape):
            raise DeltaChainError(
                f"tensor {name!r} is {view.dtype}{list(view.shape)}, previous snapshot "
                f"{previous.identity} has {old.dtype}{list(old.shape)}; write a base"
            )


def _parallel_map(
    fn: Callable[[_T], _R],
    items: Sequence[_T],
    workers: int | None,
    *,
    cost: Callable[[_T], int] | None = None,
) -> list[_R]:
    """``[fn(item) for item in items]`` over a thread pool (see ``_parallel_each``)."""
    results: dict[int, _R] = {}
    _parallel_each(fn, items, workers, cost=cost, done=results.__setitem__)
    return [results[i] for i in range(len(items))]


def _parallel_each(
    fn: Callable[[_T], _R],
    items: Sequence[_T],
    workers: int | None,
    *,
    cost: Callable[[_T], int] | None = None,
    done: Callable[[int, _R], None],
) -> None:
    """Run ``fn`` on every item over a thread pool (numpy, zstd and the kernel release the
    GIL) and call ``done(i, fn(items[i]))`` on the calling thread as each one finishes. With
    ``cost`` the costliest items are started first, so one large tensor (the embedding) does
    not run alone at the end. The first error (of ``fn`` or ``done``) is raised once the items
    already running have finished; those not started yet are dropped."""
    workers = _default_workers() if workers is None else workers
    if workers <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            done(i, fn(item))
        return
    order = list(range(len(items)))
    if cost is not None:
        order.sort(key=lambda i: -cost(items[i]))
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = {pool.submit(fn, items[i]): i for i in order}
        try:
            for future in as_completed(futures):
                done(futures[future], future.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _default_workers() -> int:
    """Threads for encoding and decoding: the cores this process may run on, at most 32."""
    return min(32, usable_cpus())


def _piece_bounds(n: int, step: int) -> list[int]:
    """Where the pieces of a tensor of ``n`` elements in chunks of ``step`` start (and the
    last ends): ``PIECE_CHUNKS`` whole chunks each, the last piece holding the rest."""
    per_piece = step * PIECE_CHUNKS
    return [*range(0, n, per_piece), n] if n else [0]


class _PieceWork:
    """A tensor of ``n`` elements of ``itemsize`` bytes cut into pieces of whole chunks of
    ``step`` elements (``bounds``, from ``_piece_bounds``) that threads work on in any order,
    and the ordered hash of its bytes (``_TensorEncoding``, ``_TensorDecoding``)."""

    def __init__(self, n: int, step: int, itemsize: int) -> None:
        self.itemsize = itemsize
        self.bounds = _piece_bounds(n, step)  # an empty tensor has no piece
        self.hash = _OrderedHash([i * itemsize for i in self.bounds])

    @property
    def pieces(self) -> int:
        return len(self.bounds) - 1

    def cost(self, k: int) -> int:
        return (self.bounds[k + 1] - self.bounds[k]) * self.itemsize


_P = TypeVar("_P", bound=_PieceWork)


def _each_piece(
    tensors: Sequence[_P],
    work: Callable[[_P, int], None],
    workers: int | None,
    *,
    done: Callable[[int], None],
    ran: Callable[[_P, int], None] | None = None,
) -> None:
    """``work(tensor, k)`` for every piece ``k`` of every tensor over the thread pool, the
    largest pieces first; ``ran(tensor, k)`` on the worker thread after each piece, and
    ``done(i)`` on the calling thread once every piece of ``tensors[i]`` has run (at once for
    a tensor without pieces). Errors as ``_parallel_each``."""
    pieces = [(i, k) for i, tensor in enumerate(tensors) for k in range(tensor.pieces)]
    left = [tensor.pieces for tensor in tensors]
    for i in [i for i, count in enumerate(left) if count == 0]:
        done(i)

    def run(piece: tuple[int, int]) -> None:
        tensor = tensors[piece[0]]
        work(tensor, piece[1])
        if ran is not None:
            ran(tensor, piece[1])

    def finished(p: int, _: None) -> None:
        i = pieces[p][0]
        left[i] -= 1
        if left[i] == 0:
            done(i)

    _parallel_each(run, pieces, workers, cost=lambda p: tensors[p[0]].cost(p[1]), done=finished)


class _OrderedHash:
    """XXH3-128 of a tensor's bytes, written piece by piece by threads in any order; piece
    ``k`` is bytes ``bounds[k]:bounds[k + 1]``. The thread writing the piece the hash has
    reached hashes its chunks as it writes them, while they are in cache (``claim``,
    ``update``); a piece finished before those ahead of it is hashed later, from memory, by the
    thread that finishes the last piece before it (``finished``). It holds no reference to the
    bytes (a tensor's encoding holds this: no cycle keeps a model's buffers alive)."""

    def __init__(self, bounds: Sequence[int]) -> None:
        self._bounds = bounds
        self._hasher = xxhash.xxh3_128()
        self._finished = [False] * (len(bounds) - 1)
        self._next = 0  # the first piece not hashed yet
        self._busy = False  # a thread is hashing (piece _next)
        self._lock = threading.Lock()

    def claim(self, k: int) -> bool:
        """Whether the caller, about to write piece ``k``, hashes it as it goes: then it must
        ``update`` with every byte of the piece in order, then call ``finished(k, True)``."""
        with self._lock:
            if self._busy or self._next != k:
                return False
            self._busy = True
            return True

    def update(self, data: np.ndarray) -> None:
        self._hasher.update(_buffer(data))

    def finished(self, k: int, data: np.ndarray, *, hashed: bool) -> None:
        """Piece ``k`` of ``data`` (the tensor's bytes, flat) is written (and hashed, if
        claimed): hash what can be hashed now."""
        with self._lock:
            self._finished[k] = True
            if hashed:
                self._next, self._busy = k + 1, False
        while True:
            with self._lock:
                if self._busy or self._next == len(self._finished) or not self._finished[
                        self._next]:
                    return
                k, self._busy = self._next, True
            self._hasher.update(_buffer(data[self._bounds[k]:self._bounds[k + 1]]))
            with self._lock:
                self._next, self._busy = k + 1, False

    def hexdigest(self) -> str:
        if self._next != len(self._finished):
            raise RuntimeError(f"hashed {self._next} of {len(self._finished)} pieces")
        return self._hasher.hexdigest()


# ---------------------------------------------------------------------------------------------
# Internals: delta blobs (chunked XOR, filter, zstd; see the module docstring)


class _Source(NamedTuple):
    """What a snapshot encodes for one tensor: its snapshot dtype and shape, and ``flat``, a
    1-D tensor whose elements are converted (or copied) into the snapshot's bytes (on an
    accelerator until ``_on_host``)."""

    dtype: str
    shape: tuple[int, ...]
    flat: torch.Tensor


def _source(tensor: torch.Tensor, dtype: str | None) -> _Source:
    name = _DTYPE_NAMES.get(tensor.dtype) if dtype is None else dtype
    if name not in _DTYPES:
        raise SnapshotError(f"unsupported tensor dtype {dtype or tensor.dtype}; expected one of "
                            f"{sorted(_DTYPES)}")
    return _Source(name, tuple(tensor.shape), tensor.detach().reshape(-1))


def _on_host(source: _Source, start: int = 0, stop: int | None = None) -> _Source:
    """``source`` (its elements ``start:stop``) contiguous in host memory. A device tensor is
    converted to the snapshot dtype on the device and copied over once, when its own encoding
    starts: on the thread that encodes it, so transfers overlap the encoding of other tensors
    and no host copy of the whole model is made first."""
    flat = source.flat[start:stop]
    if flat.device.type != "cpu":
        flat = flat.to(_DTYPES[source.dtype][0]).cpu()
    return source._replace(flat=flat.contiguous())


def _raw_source(data: np.ndarray, itemsize: int) -> _Source:
    """Raw bytes as a source of ``itemsize``-byte integers (copied, never converted)."""
    name, shape = _INT_NAMES[itemsize], (data.nbytes // itemsize,)
    if data.nbytes == 0:
        return _Source(name, shape, torch.empty(0, dtype=_DTYPES[name][0]))
    return _Source(name, shape, _tensor_of(RawTensor(name, shape, data)))


class _Encoded(NamedTuple):
    raw: np.ndarray | None  # an owned copy of the current bytes, None when unchanged
    checksum: str | None  # of the current bytes
    blob: bytes | None


_BLOB_HEADER = struct.Struct("<4sQII")  # magic, elements, elements per chunk, chunks
_BLOB_MAGIC = b"AXD3"
_FILTER_PLANES = 1
_FILTER_SPARSE = 2
_SPARSE_HEADER = struct.Struct("<BIB")  # filter, changed elements, bytes per gap
_FILTER_CODES = 3
# filter, changed elements, long gaps, big values, bytes per long gap
_CODES_HEADER = struct.Struct("<BIIIB")
_CODE_LONG = 15  # a code's gap nibble when the gap is one of the long gaps that follow
_GAP_WIDTHS = (1, 2, 4)
_UINTS: dict[int, type[np.unsignedinteger[Any]]] = {
    1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64
}
_INT_NAMES = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}  # raw bytes of an itemsize


def _elements(data: np.ndarray, itemsize: int) -> np.ndarray:
    """A flat uint8 array seen as unsigned integers of ``itemsize`` bytes (zero-copy)."""
    return data.view(_UINTS[itemsize])


def _encode_tensor(
    previous: np.ndarray, source: _Source, level: int, *, in_place: bool = False
) -> _Encoded:
    """``_TensorEncoding`` of one tensor on the calling thread, its pieces in order."""
    tensor = _TensorEncoding(previous, source, level, in_place=in_place)
    try:
        for k in range(tensor.pieces):
            tensor.encode(k)
        return tensor.result()
    finally:
        tensor.close()


class _TensorEncoding(_PieceWork):
    """One pass over ``source``, chunk by chunk while it is in cache: convert (or copy) it into
    bytes the snapshot owns (``previous`` itself with ``in_place``, where numpy lets it be
    written), XOR with ``previous``, filter + zstd the chunk, hash the bytes.

    The chunks are grouped into pieces (``_piece_bounds``) that threads encode in any order and
    at once (``encode(k)``), so that one large tensor (the embedding, a quarter of a 0.5B model)
    is not one thread's work; ``result()`` once every piece is done, ``close()`` after (or
    after a failure) makes the owned bytes read-only. The owned bytes are taken by the first
    piece that runs, on its thread: a fresh buffer's pages are faulted in there."""

    def __init__(self, previous: np.ndarray, source: _Source, level: int, *, in_place: bool):
        itemsize = _itemsize(source.dtype)
        if previous.nbytes != source.flat.numel() * itemsize:
            raise ValueError(f"delta of {previous.nbytes} bytes against "
                             f"{source.flat.numel() * itemsize} bytes")
        self.previous, self.source, self.level = previous, source, level
        self.n, self.step = previous.nbytes // itemsize, _chunk_elements(itemsize)
        super().__init__(self.n, self.step, itemsize)
        self.frames: list[list[bytes]] = [[] for _ in range(self.pieces)]
        self._in_place = in_place
        self._owned: np.ndarray | None = None
        self._lock = threading.Lock()

    def encode(self, k: int) -> None:  # on an encoding thread
        """Piece ``k``: its chunks' frames into ``frames[k]``, its new bytes into the owned."""
        owned = self.owned()
        start, stop = self.bounds[k], self.bounds[k + 1]
        prev_e = _elements(self.previous, self.itemsize)[start:stop]  # writable when owned
        source = _on_host(self.source, start, stop)
        hashing = self.hash.claim(k)
        self.frames[k] = _encode_chunks(source, prev_e, owned[start * self.itemsize:
                                                              stop * self.itemsize],
                                        self.level, self.hash if hashing else None)
        self.hash.finished(k, owned, hashed=hashing)

    def owned(self) -> np.ndarray:
        """The bytes the new snapshot's tensor will own (``previous``'s in place)."""
        with self._lock:
            if self._owned is None:
                source = self.source.flat
                # a source lying in previous's own bytes is converted into a copy
                in_place = self._in_place and not (source.device.type == "cpu" and
                                                   np.may_share_memory(
                                                       self.previous,
                                                       source.view(torch.uint8).numpy()))
                self._owned = (self.previous if in_place and _make_writable(self.previous)
                               else _BUFFERS.take(self.previous.nbytes))
            return self._owned

    def result(self) -> _Encoded:
        """The encoded tensor (every piece done); unchanged: ``_Encoded(None, None, None)``."""
        frames = [frame for piece in self.frames for frame in piece]
        if not any(frames):
            return _Encoded(None, None, None)
        return _Encoded(self._owned, self.hash.hexdigest(), _blob(self.n, self.step, frames))

    def close(self) -> None:
        if self._owned is not None:
            self._owned.flags.writeable = False


def _encode_chunks(
    source: _Source, prev_e: np.ndarray, owned: np.ndarray, level: int, hasher: _OrderedHash | None
) -> list[bytes]:
    """Write the new bytes to ``owned`` (which may be ``prev_e``'s own) chunk by chunk, and
    hash each (``hasher``) while it is in cache; each chunk's frame (empty: unchanged)."""
    itemsize, n, step = prev_e.itemsize, prev_e.size, _chunk_elements(prev_e.itemsize)
    owned_e = owned.view(prev_e.dtype)
    chunk = _fused_chunk_encoder(source, prev_e, owned_e, level) or _ChunkEncoder(
        source, prev_e, owned, level)
    frames = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        frames.append(chunk(start, stop))
        if hasher is not None:
            hasher.update(owned[start * itemsize : stop * itemsize])
    return frames


def _blob(n: int, step: int, frames: list[bytes]) -> bytes:
    """A tensor's delta blob: header, frame lengths, frames."""
    lengths = np.array([len(f) for f in frames], dtype="<u4")
    header = _BLOB_HEADER.pack(_BLOB_MAGIC, n, step, len(frames))
    return b"".join([header, lengths.tobytes(), *frames])


class _BlobWriter:
    """Appends the blobs of a delta's tensors to ``delta.bin`` in name order (a deterministic
    layout) as the encoding threads finish them: a blob waits only for those before it, so the
    file is written (and for a durable delta its writeback started) while the rest is still
    being encoded instead of after it (0.5B shape at lr 1e-5: write + fsync 0.075 s). ``done``
    is the callback of ``_parallel_each``; ``refs`` says where each blob went."""

    def __init__(self, out: _StreamedFile, names: Sequence[str]) -> None:
        self._out, self._names, self._next = out, names, 0
        self.encoded: dict[str, _Encoded] = {}
        self.refs: dict[str, BlobRef] = {}

    def done(self, i: int, encoded: _Encoded) -> None:
        self.encoded[self._names[i]] = encoded
        while self._next < len(self._names) and self._names[self._next] in self.encoded:
            name = self._names[self._next]
            blob = self.encoded[name].blob
            if blob is not None:
                self.refs[name] = BlobRef(self._out.append(blob), len(blob), checksum(blob))
                self.encoded[name] = self.encoded[name]._replace(blob=None)  # written: free it
            self._next += 1


class _ChunkEncoder:
    """The numpy path: ``owned[start:stop] = source``, then the frame of ``previous XOR
    owned`` over that range (empty when unchanged), with scratch buffers reused across chunks.
    In place (``owned`` is ``previous``'s array), each chunk is converted into a scratch chunk
    first and copied over ``previous`` once its frame is made."""

    def __init__(self, source: _Source, prev_e: np.ndarray, owned: np.ndarray, level: int):
        self.itemsize = prev_e.itemsize
        self.source, self.prev_e, self.owned_e = source, prev_e, owned.view(prev_e.dtype)
        size = min(prev_e.size, _chunk_elements(self.itemsize))
        self.in_place = np.may_share_memory(owned, prev_e)
        self.new = np.empty(size, prev_e.dtype) if self.in_place else None
        self.new_t = torch.from_numpy(self.owned_e if self.new is None else self.new).view(
            _DTYPES[source.dtype][0])  # writable
        self.diff = np.empty(size, prev_e.dtype)
        self.planes = np.empty(self.diff.nbytes + 1, np.uint8)
        self.mask = np.empty(size, np.bool_)
        self.compressor = _compressor(level)

    def __call__(self, start: int, stop: int) -> bytes:
        at = slice(0, stop - start) if self.in_place else slice(start, stop)
        self.new_t[at].copy_(self.source.flat[start:stop])
        new = self.owned_e[at] if self.new is None else self.new[at]
        diff = self.diff[: stop - start]
        np.bitwise_xor(self.prev_e[start:stop], new, out=diff)
        frame = self._frame(diff, stop - start)
        if self.new is not None and frame:
            np.copyto(self.prev_e[start:stop], new)
        return frame

    def _frame(self, diff: np.ndarray, elements: int) -> bytes:
        positions = _changed_positions(diff, self.itemsize, self.mask)
        if positions is None:
            return _planes_frame(diff, self.compressor, self.planes)
        if positions.size == 0:
            return b""
        frame = _codes_frame if _packs_codes(positions.size, elements, self.itemsize) \
            else _sparse_frame
        return frame(_encode_gaps(positions), diff[positions], self.compressor)


def _fused_chunk_encoder(
    source: _Source, prev_e: np.ndarray, owned_e: np.ndarray, level: int
) -> Callable[[int, int], bytes] | None:
    """The C kernel's chunk encoder (same frames as ``_ChunkEncoder``, one pass over memory) for
    the cases it covers: fp32 -> bf16 and 2-byte copies; None otherwise or without it."""
    if _xorkernel is None or prev_e.itemsize != 2 or source.flat.device.type != "cpu":
        return None
    if source.flat.dtype == torch.float32 and source.dtype == "bfloat16":
        kernel, flat = _xorkernel.encode_f32_bf16, source.flat.numpy()
    elif source.flat.dtype.itemsize == 2 and source.flat.dtype == _DTYPES[source.dtype][0]:
        kernel, flat = _xorkernel.encode_copy16, source.flat.view(torch.int16).numpy()
    else:
        return None
    size = min(prev_e.size, _chunk_elements(2))
    cap = int(SPARSE_MAX_DENSITY * size)  # more changed: byte planes, like _changed_positions
    gaps = np.empty(cap + _xorkernel.SLACK, np.uint32)
    values = np.empty(cap + _xorkernel.SLACK, prev_e.dtype)
    payload = np.empty(_CODES_HEADER.size + 7 * cap, np.uint8)  # a sparse frame's content
    compressor = _compressor(level)
    in_place = np.may_share_memory(owned_e, prev_e)
    # diff + planes (+ the new bytes in place), made when first needed
    dense: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def encode(start: int, stop: int) -> bytes:
        nonlocal dense
        chunk_cap = int(SPARSE_MAX_DENSITY * (stop - start))
        changed = kernel(flat[start:stop], prev_e[start:stop], owned_e[start:stop],
                         gaps, values, chunk_cap)
        if changed < 0:  # in place, the kernel left this chunk of prev as it was
            if dense is None:
                dense = (np.empty(size, prev_e.dtype), np.empty(2 * size + 1, np.uint8),
                         np.empty(size if in_place else 0, prev_e.dtype))
            new = dense[2][: stop - start] if in_place else owned_e[start:stop]
            if in_place:
                kernel(flat[start:stop], prev_e[start:stop], new, gaps, values, 0)
            diff = np.bitwise_xor(prev_e[start:stop], new, out=dense[0][: stop - start])
            frame = _planes_frame(diff, compressor, dense[1])
            if in_place:
                np.copyto(prev_e[start:stop], new)
            return frame
        if changed == 0:
            return b""
        if _packs_codes(changed, stop - start, 2):
            head = _CODES_HEADER.size
            longs, bigs, width = _xorkernel.sparse_codes16(gaps, values, changed, payload[head:])
            _CODES_HEADER.pack_into(_buffer(payload), 0, _FILTER_CODES, changed, longs, bigs,
                                    width)
            end = head + changed + longs * width + 2 * bigs
            return compressor.compress(_buffer(payload[:end]))
        head = _SPARSE_HEADER.size
        width = _xorkernel.sparse_planes16(gaps, values, changed, payload[head:])
        _SPARSE_HEADER.pack_into(_buffer(payload), 0, _FILTER_SPARSE, changed, width)
        return compressor.compress(_buffer(payload[: head + (width + 2) * changed]))

    return encode


class _BufferPool:
    """Large byte buffers handed out as numpy arrays and taken back when the array (and every
    view of it) is garbage: a snapshot's bytes then reuse the memory of one that was dropped
    instead of faulting in fresh pages (~0.5-2 s per GB in a VM, more than the decode).

    A buffer is private anonymous memory (``mmap``) whose pages the kernel faults in at once
    (``MAP_POPULATE``, Linux): 1 GB took 0.36 s here, against 0.47 s touching it page by page
    and 0.63-0.73 s for the shared mapping with huge pages advised used before (this VM grants
    no transparent huge pages; asking for them made fresh numpy-style buffers cost 0.5-1.8 s
    per GB in compaction). Passes over a buffer once it is in run at the same speed either
    way. The array is ``np.frombuffer`` of the mapping, so numpy views of the array keep the
    array itself alive and its finalizer runs only once none is left."""

    def __init__(self, min_bytes: int, max_idle_bytes: int) -> None:
        self.min_bytes, self.max_idle_bytes = min_bytes, max_idle_bytes
        self._idle: dict[int, list[mmap.mmap]] = {}
        self._idle_bytes = 0
        self._lock = threading.RLock()

    def take(self, nbytes: int) -> np.ndarray:
        if nbytes < self.min_bytes:
            return np.empty(nbytes, np.uint8)
        with self._lock:
            free = self._idle.get(nbytes)
            buffer = free.pop() if free else None
            if buffer is not None:
                self._idle_bytes -= nbytes
        if buffer is None:
            buffer = mmap.mmap(-1, nbytes, flags=_FRESH_MEMORY)
        array = np.frombuffer(buffer, np.uint8)
        weakref.finalize(array, self._give_back, buffer)
        return array

    def _give_back(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if self._idle_bytes + len(buffer) <= self.max_idle_bytes:
                self._idle.setdefault(len(buffer), []).append(buffer)
                self._idle_bytes += len(buffer)


_FRESH_MEMORY = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0) | getattr(
    mmap, "MAP_POPULATE", 0)
# buffers of >= 64 KiB; at most 2 GiB of them kept idle (about one snapshot of a 1B model)
_BUFFERS = _BufferPool(min_bytes=64 << 10, max_idle_bytes=2 << 30)


def _chunk_elements(itemsize: int) -> int:
    return max(1, CHUNK_BYTES // itemsize)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """zstd at ``level`` for delta chunks; at the fast levels (<= 1) with the smallest match
    table (2^6 entries) and 7-byte minimum matches. A sparse chunk is mostly literals (the low
    mantissa bytes of the changed values are noise) that zstd's Huffman stage compresses; its
    search for short matches among them only costs time. Measured on 0.5B-shape chunks against
    plain level 1: 1.4-3x faster, same or smaller frames, faster to decompress; against the
    2^9-entry table used before, 22% faster at lr 1e-5 (0.51 -> 0.40 s of CPU per delta) and 7%
    at lr 1e-6, same sizes; byte-plane chunks (lr 1e-4) unchanged either way."""
    if level > 1:
        return zstandard.ZstdCompressor(level=level)
    params = zstandard.ZstdCompressionParameters.from_level(level, hash_log=6, min_match=7)
    return zstandard.ZstdCompressor(compression_params=params)


def _planes_frame(
    diff: np.ndarray, compressor: zstandard.ZstdCompressor, scratch: np.ndarray
) -> bytes:
    """A chunk stored whole as byte planes (more than ``SPARSE_MAX_DENSITY`` changed)."""
    content = scratch[: diff.nbytes + 1]
    content[0] = _FILTER_PLANES
    shuffle_bytes(diff.view(np.uint8), diff.itemsize, out=content[1:])
    return compressor.compress(_buffer(content))


def _sparse_frame(
    gaps: np.ndarray, values: np.ndarray, compressor: zstandard.ZstdCompressor
) -> bytes:
    """A chunk stored as the gaps before its changed elements and their diffs."""
    head = _SPARSE_HEADER.pack(_FILTER_SPARSE, values.size, gaps.itemsize)
    return compressor.compress(b"".join([
        head,
        _buffer(shuffle_bytes(gaps.view(np.uint8), gaps.itemsize)),
        _buffer(shuffle_bytes(values.view(np.uint8), values.itemsize)),
    ]))


def _packs_codes(changed: int, elements: int, itemsize: int) -> bool:
    """Whether a sparse chunk of 2-byte elements stores packed codes (filter 3) rather than gap
    and value planes (filter 2): when at least ``CODES_MIN_DENSITY`` of its elements changed,
    most gaps are below 15 and most diffs below 16 (a step of a few units in the last place),
    so one byte holds both for most elements and zstd's entropy stage sees 1.2-1.4 bytes per
    changed element instead of 3 (0.5B shape at lr 1e-5: compress 0.42 -> 0.19 s and
    decompress 0.34 -> 0.15 s of CPU per delta, 3% fewer bytes). Sparser chunks keep the
    planes: their gaps are mostly long (at lr 1e-6 the codes were 6% larger)."""
    return itemsize == 2 and changed >= CODES_MIN_DENSITY * elements


def _codes_frame(
    gaps: np.ndarray, values: np.ndarray, compressor: zstandard.ZstdCompressor
) -> bytes:
    """A sparse chunk of 2-byte elements as packed codes: per changed element one byte,
    ``min(gap, 15) << 4 | (value if value < 16 else 0)``; then the gaps of 15 and more (byte
    planes, narrowed) and the values of 16 and more (byte planes), in order."""
    long, big = gaps >= _CODE_LONG, values >= 16
    codes = (np.where(long, _CODE_LONG, gaps).astype(np.uint8) << 4) \
        | np.where(big, 0, values).astype(np.uint8)
    long_gaps, big_values = _narrow_gaps(gaps[long]), values[big]
    head = _CODES_HEADER.pack(_FILTER_CODES, values.size, long_gaps.size, big_values.size,
                              long_gaps.itemsize)
    return compressor.compress(b"".join([
        head,
        _buffer(codes),
        _buffer(shuffle_bytes(long_gaps.view(np.uint8), long_gaps.itemsize)),
        _buffer(shuffle_bytes(big_values.view(np.uint8), big_values.itemsize)),
    ]))


def _changed_positions(diff: np.ndarray, itemsize: int, mask: np.ndarray) -> np.ndarray | None:
    """``np.flatnonzero(diff)``, or None when more than ``SPARSE_MAX_DENSITY`` of the elements
    changed (the chunk is then stored as byte planes).

    4-10x faster than ``np.flatnonzero``: when few 8-byte words changed, the changed words are
    found first (64 at a time), then the elements only inside those; no element count is
    needed then (fewer than 20% of the words cannot hold half of the elements)."""
    per_word = 8 // itemsize
    if diff.nbytes % 8 == 0 and per_word > 1:
        words = diff.view(np.uint64)
        hit = mask[: words.size]
        np.not_equal(words, 0, out=hit)
        if int(np.count_nonzero(hit)) * 5 < words.size:  # < 20% of the words changed
            nonzero_words = _sparse_flatnonzero(hit)
            inside = np.flatnonzero(words[nonzero_words].view(diff.dtype) != 0)
            shift = per_word.bit_length() - 1
            return (nonzero_words[inside >> shift] << shift) | (inside & (per_word - 1))
    if np.count_nonzero(diff) > SPARSE_MAX_DENSITY * diff.size:
        return None
    hit = mask[: diff.size]
    np.not_equal(diff, 0, out=hit)
    return np.flatnonzero(hit)


def _sparse_flatnonzero(hit: np.ndarray) -> np.ndarray:
    """``np.flatnonzero`` of a mostly-False bool array: first over groups of 8 flags (one
    uint64 each), then only inside the groups that hold a True."""
    if hit.size % 8:
        return np.flatnonzero(hit)
    groups = hit.view(np.uint64)
    nonzero_groups = np.flatnonzero(groups != 0)
    inside = np.flatnonzero(groups[nonzero_groups].view(np.bool_))
    return (nonzero_groups[inside >> 3] << 3) | (inside & 7)


def _encode_gaps(positions: np.ndarray) -> np.ndarray:
    """The unchanged elements before each changed one, as unsigned integers of the smallest
    width (1, 2 or 4 bytes) that holds the largest gap."""
    gaps = np.diff(positions, prepend=-1)
    gaps -= 1
    return _narrow_gaps(gaps)


def _narrow_gaps(gaps: np.ndarray) -> np.ndarray:
    largest = int(gaps.max()) if gaps.size else 0
    width = next(w for w in _GAP_WIDTHS if largest < 1 << (8 * w))
    return gaps.astype(_UINTS[width])


def _decode_gaps(gaps: np.ndarray, limit: int) -> np.ndarray:
    """Inverse of ``_encode_gaps``: the positions (all < ``limit``) or ``ChecksumError``."""
    positions = np.cumsum(gaps, dtype=np.int64)
    positions += np.arange(1, gaps.size + 1)
    positions -= 1
    if gaps.size and positions[-1] >= limit:
        raise ChecksumError(f"delta chunk: position {positions[-1]} past its {limit} elements")
    return positions


def _blob_frames(blob: memoryview, n: int, itemsize: int) -> list[tuple[int, int, memoryview]]:
    """(start, stop, zstd frame) of each chunk of a blob for ``n`` elements; checks the
    header and the frame table against the blob's length."""
    if len(blob) < _BLOB_HEADER.size:
        raise ChecksumError(f"delta blob of {len(blob)} bytes has no header")
    magic, elements, step, chunks = _BLOB_HEADER.unpack_from(blob)
    if magic != _BLOB_MAGIC or elements != n or step < 1 or chunks != -(-n // step):
        raise ChecksumError(f"delta blob header {magic!r}/{elements}/{step}/{chunks} does not "
                            f"fit a tensor of {n} elements of {itemsize} bytes")
    table = _BLOB_HEADER.size + 4 * chunks
    if len(blob) < table:
        raise ChecksumError(f"delta blob of {len(blob)} bytes is shorter than its frame table")
    lengths = np.frombuffer(blob, dtype="<u4", count=chunks, offset=_BLOB_HEADER.size)
    ends = table + np.cumsum(lengths, dtype=np.int64)
    if (ends[-1] if chunks else table) != len(blob):
        raise ChecksumError(f"delta blob is {len(blob)} bytes, its frame table says "
                            f"{ends[-1] if chunks else table}")
    starts = ends - lengths
    return [(i * step, min(n, (i + 1) * step), blob[int(a):int(b)])
            for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True))]


def _decode_tensor(
    blob: bytes | np.ndarray, previous: np.ndarray, itemsize: int, *, out: np.ndarray
) -> str:
    """``_TensorDecoding`` of one tensor on the calling thread, its pieces in order; the
    checksum of the result. In place, a failure turns back the pieces before it first
    (``HeldBytesLostError`` if that fails too)."""
    tensor = _TensorDecoding(blob, previous, itemsize, out=out)
    done = 0
    try:
        for k in range(tensor.pieces):
            tensor.decode(k)
            done += 1
    except BaseException as exc:
        if tensor.in_place and done:
            try:
                for k in range(done):
                    tensor.undo(k)
            except BaseException as undo_exc:
                raise _bytes_lost(exc, undo_exc) from undo_exc
        raise
    return tensor.hash.hexdigest()


class _TensorDecoding(_PieceWork):
    """XOR a delta blob's chunks onto ``previous``'s bytes, writing the result to ``out``
    (``previous`` itself: in place; None: a buffer taken by the first piece that runs, on its
    thread), and hash it chunk by chunk while it is in cache.

    The chunks are grouped into pieces (``_piece_bounds``) that threads decode in any order
    and at once (``decode(k)``); ``hash.hexdigest()`` once every piece is done. A bad chunk
    raises ``ChecksumError`` before it is written; in place, the chunks of its piece before it
    are turned back first (``HeldBytesLostError`` if that fails too), and ``undo(k)`` turns back
    a piece that was decoded whole. The frame table is checked on construction."""

    def __init__(self, blob: bytes | np.ndarray, previous: np.ndarray, itemsize: int, *,
                 out: np.ndarray | None):
        self.prev_e = _elements(previous, itemsize)
        self.in_place = out is previous
        self.frames = _blob_frames(_buffer(blob), self.prev_e.size, itemsize)
        self._step = self.frames[0][1] - self.frames[0][0] if self.frames else 1
        super().__init__(self.prev_e.size, self._step, itemsize)
        self._out = out
        self._lock = threading.Lock()

    def out(self) -> np.ndarray:
        """The array the new bytes are written to."""
        with self._lock:
            if self._out is None:
                self._out = _BUFFERS.take(self.prev_e.nbytes)
            return self._out

    def decode(self, k: int) -> None:  # on a decoding thread
        out = self.out()
        work = out.view(self.prev_e.dtype)
        frames, scratch = self._frames(k), self._scratch()
        decompressor = zstandard.ZstdDecompressor()
        hashing = self.hash.claim(k)
        done = 0
        try:
            for start, stop, frame in frames:
                target = work[start:stop]
                source = None if self.in_place else self.prev_e[start:stop]
                if len(frame):
                    _xor_chunk(frame, target, self.itemsize, decompressor, scratch, source)
                elif source is not None:
                    np.copyto(target, source)
                done += 1
                if hashing:
                    self.hash.update(target)
        except BaseException as exc:
            if self.in_place and done:
                try:  # the same chunks again: XOR is its own inverse
                    self._xor_again(frames[:done], decompressor, scratch)
                except BaseException as undo_exc:
                    raise _bytes_lost(exc, undo_exc) from undo_exc
            raise
        self.hash.finished(k, out, hashed=hashing)

    def undo(self, k: int) -> None:
        """Turn back piece ``k``, decoded in place."""
        self._xor_again(self._frames(k), zstandard.ZstdDecompressor(), self._scratch())

    def _xor_again(self, frames: Sequence[tuple[int, int, memoryview]],
                   decompressor: zstandard.ZstdDecompressor, scratch: np.ndarray) -> None:
        work = self.prev_e
        for start, stop, frame in frames:
            if len(frame):
                _xor_chunk(frame, work[start:stop], self.itemsize, decompressor, scratch)

    def _frames(self, k: int) -> list[tuple[int, int, memoryview]]:
        """(start, stop, frame) of the chunks of piece ``k``."""
        return self.frames[self.bounds[k] // self._step: -(-self.bounds[k + 1] // self._step)]

    def _scratch(self) -> np.ndarray:
        return np.empty(min(self._step, self.prev_e.size) * self.itemsize, np.uint8)


def _bytes_lost(exc: BaseException, undo_exc: BaseException) -> HeldBytesLostError:
    return HeldBytesLostError(
        f"a chunk failed ({exc}) and the chunks before it could not be turned back "
        f"({type(undo_exc).__name__}: {undo_exc}); the held bytes are lost")


def _xor_chunk(
    frame: memoryview,
    target: np.ndarray,
    itemsize: int,
    decompressor: zstandard.ZstdDecompressor,
    scratch: np.ndarray,
    source: np.ndarray | None = None,
) -> None:
    """XOR one chunk's diff into ``target``, or with ``source`` write ``source XOR diff`` to it;
    the frame is checked whole before ``target`` is written, so a ``ChecksumError`` leaves it
    unchanged."""
    # the largest content a frame of this chunk can have (a code byte per element at most)
    limit = _CODES_HEADER.size + target.size * (max(_GAP_WIDTHS) + itemsize + 1) + 1
    try:
        size = zstandard.frame_content_size(frame)
        if not 0 < size <= limit:
            raise ChecksumError(f"delta chunk declares {size} bytes (at most {limit})")
        content = np.frombuffer(decompressor.decompress(frame, max_output_size=limit), np.uint8)
    except zstandard.ZstdError as exc:
        raise ChecksumError(f"delta chunk does not decompress: {exc}") from exc
    if content[0] == _FILTER_PLANES and content.nbytes == target.nbytes + 1:
        diff = unshuffle_bytes(content[1:], itemsize, out=scratch[: target.nbytes])
        np.bitwise_xor(target if source is None else source, diff.view(target.dtype), out=target)
        return
    if content[0] == _FILTER_CODES and itemsize == 2:
        _xor_codes(content, target, source)
        return
    if content[0] != _FILTER_SPARSE or content.nbytes < _SPARSE_HEADER.size:
        raise ChecksumError(f"delta chunk of {content.nbytes} bytes has an unknown layout "
                            f"(filter {content[0]})")
    _, changed, width = _SPARSE_HEADER.unpack_from(_buffer(content))
    values_at = _SPARSE_HEADER.size + changed * width
    if (width not in _GAP_WIDTHS or changed > target.size
            or content.nbytes != values_at + changed * itemsize):
        raise ChecksumError(f"delta chunk: {changed} changed elements with {width}-byte gaps "
                            f"do not fill its {content.nbytes} bytes")
    if _xorkernel is not None and itemsize == 2:  # reads the byte planes as they are stored
        try:
            _xorkernel.xor_scatter16(target, content[_SPARSE_HEADER.size:], changed, width,
                                     *(() if source is None else (source,)))
        except ValueError as exc:
            raise ChecksumError(f"delta chunk: {exc}") from exc
        return
    gaps = unshuffle_bytes(content[_SPARSE_HEADER.size : values_at], width)
    _scatter(target, _decode_gaps(gaps.view(_UINTS[width]), target.size),
             unshuffle_bytes(content[values_at:], itemsize).view(target.dtype), source)


def _scatter(
    target: np.ndarray, positions: np.ndarray, values: np.ndarray, source: np.ndarray | None
) -> None:
    """The numpy path's scatter: ``target[positions] ^= values``, after ``target = source``
    when a source is given (the positions are checked already)."""
    if source is not None:
        np.copyto(target, source)
    target[positions] ^= values


def _xor_codes(content: np.ndarray, target: np.ndarray, source: np.ndarray | None) -> None:
    """``_xor_chunk`` of a packed-codes chunk (2-byte elements, see ``_codes_frame``)."""
    if content.nbytes < _CODES_HEADER.size:
        raise ChecksumError(f"delta chunk of {content.nbytes} bytes is too short for its header")
    _, changed, longs, bigs, width = _CODES_HEADER.unpack_from(_buffer(content))
    body = content[_CODES_HEADER.size:]
    if (width not in _GAP_WIDTHS or changed > target.size or longs > changed or bigs > changed
            or body.nbytes != changed + longs * width + 2 * bigs):
        raise ChecksumError(f"delta chunk: {changed} codes, {longs} long gaps of {width} bytes "
                            f"and {bigs} big values do not fill its {content.nbytes} bytes")
    if _xorkernel is not None:
        try:
            _xorkernel.xor_codes16(target, body, changed, longs, bigs, width,
                                   *(() if source is None else (source,)))
        except ValueError as exc:
            raise ChecksumError(f"delta chunk: {exc}") from exc
        return
    codes = body[:changed]
    gaps, values = (codes >> 4).astype(np.uint32), (codes & 15).astype(np.uint16)
    long, big = gaps == _CODE_LONG, values == 0
    if np.count_nonzero(long) != longs or np.count_nonzero(big) != bigs:
        raise ChecksumError("delta chunk: the codes do not use exactly the long gaps and big "
                            "values given")
    gaps[long] = unshuffle_bytes(body[changed : changed + longs * width], width).view(
        _UINTS[width])
    values[big] = unshuffle_bytes(body[changed + longs * width :], 2).view(np.uint16)
    _scatter(target, _decode_gaps(gaps, target.size), values, source)


# ---------------------------------------------------------------------------------------------
# Internals: manifest


def _manifest_to_json(manifest: SnapshotManifest) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": manifest.format_version,
        "snapshot_identity": manifest.snapshot_identity,
        "kind": manifest.kind,
        "previous_snapshot_identity": manifest.previous_snapshot_identity,
        "created_at": manifest.created_at,
        "checksum_algorithm": manifest.checksum_algorithm,
        "compression": None if manifest.kind == "base" else {
            "codec": "zstd", "level": manifest.zstd_level, "filter": DELTA_FILTER
        },
        "tensors": [_entry_to_json(entry) for entry in manifest.tensors],
    }


def _entry_to_json(entry: TensorEntry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": entry.name, "dtype": entry.dtype, "shape": list(entry.shape),
        "checksum": entry.checksum,
    }
    if entry.blob is not None:
        out["blob"] = {"offset": entry.blob.offset, "length": entry.blob.length,
                       "checksum": entry.blob.checksum}
    return out


def _manifest_from_json(obj: dict[str, Any]) -> SnapshotManifest:
    _expect(obj.get("format") == FORMAT, f"format is {obj.get('format')!r}, expected {FORMAT!r}")
    version = obj["format_version"]
    _expect(version in READABLE_FORMAT_VERSIONS,
            f"format_version {version!r} (supported: {READABLE_FORMAT_VERSIONS})")
    algorithm = obj["checksum_algorithm"]
    _expect(algorithm == CHECKSUM_ALGORITHM, f"checksum_algorithm {algorithm!r} unsupported")
    kind = obj["kind"]
    _expect(kind in ("base", "delta"), f"kind {kind!r}, expected 'base' or 'delta'")
    previous = obj["previous_snapshot_identity"]
    _expect(previous is None or isinstance(previous, str), "previous_snapshot_identity type")
    _expect(kind == "base" or isinstance(previous, str), "a delta needs previous_snapshot_identity")
    compression = obj["compression"]
    level = None if kind == "base" else int(compression["level"])
    entries = tuple(_entry_from_json(e, kind) for e in obj["tensors"])
    names = [entry.name for entry in entries]
    _expect(names == sorted(set(names)), "tensor entries must be unique and sorted by name")
    return SnapshotManifest(
        snapshot_identity=_str(obj["snapshot_identity"]),
        kind=kind,
        previous_snapshot_identity=previous,
        created_at=float(obj["created_at"]),
        tensors=entries,
        zstd_level=level,
        format_version=version,
    )


def _entry_from_json(obj: dict[str, Any], kind: str) -> TensorEntry:
    name, dtype = _str(obj["name"]), _str(obj["dtype"])
    _expect(dtype in _DTYPES, f"tensor {name!r} has unsupported dtype {dtype!r}")
    shape = tuple(int(d) for d in obj["shape"])
    _expect(all(d >= 0 for d in shape), f"tensor {name!r} has negative shape {shape}")
    blob = None
    if "blob" in obj:
        _expect(kind == "delta", f"tensor {name!r} has a blob in a base manifest")
        b = obj["blob"]
        blob = BlobRef(int(b["offset"]), int(b["length"]), _str(b["checksum"]))
        _expect(blob.offset >= 0 and blob.length >= 0, f"tensor {name!r} blob bounds")
    return TensorEntry(name, dtype, shape, _str(obj["checksum"]), blob)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise SnapshotError(f"expected a string, got {value!r}")
    return value


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise SnapshotError(f"bad manifest: {message}")


def _check_manifest_identity(path: Path, manifest: SnapshotManifest) -> None:
    recomputed = snapshot_identity((e.name, e.dtype, e.shape, e.checksum) for e in manifest.tensors)
    if recomputed != manifest.snapshot_identity:
        raise ChecksumError(
            f"{path / MANIFEST_FILE}: tensor list hashes to identity {recomputed}, manifest "
            f"claims {manifest.snapshot_identity} (edited or corrupt manifest)"
        )


# ---------------------------------------------------------------------------------------------
# Internals: base (safetensors) I/O


def _safetensors_layout(
    entries: Sequence[tuple[str, str, tuple[int, ...]]]
) -> tuple[bytes, list[int]]:
    """The exact header we write (deterministic, so a reader can compare it byte for byte)
    and where each tensor's bytes lie in the file: tensor ``i`` at ``bounds[i]:bounds[i+1]``
    (the last bound is the file's size)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets = [0]
    for name, dtype, shape in entries:
        end = offsets[-1] + int(np.prod(shape, dtype=np.int64)) * _itemsize(dtype)
        header[name] = {"dtype": _DTYPES[dtype][1], "shape": list(shape),
                        "data_offsets": [offsets[-1], end]}
        offsets.append(end)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    text = struct.pack("<Q", len(text)) + text
    return text, [len(text) + offset for offset in offsets]


def _write_safetensors(path: Path, sources: Mapping[str, _Source], workers: int | None
                       ) -> HostSnapshot:
    """Convert ``sources`` into owned bytes (one thread per core) and write them as the
    safetensors file ``path``, each tensor at its offset as soon as it is converted; answers
    the snapshot of those bytes."""
    names = sorted(sources)
    header, starts = _safetensors_layout([(n, sources[n].dtype, sources[n].shape)
                                          for n in names])
    converted: dict[str, tuple[RawTensor, str]] = {}

    def convert(name: str) -> tuple[RawTensor, str]:  # on a worker thread
        raw = _converted(sources[name])
        return raw, checksum(raw.data)

    with _StreamedFile(path) as out:
        out.write_at(0, header)

        def write(i: int, result: tuple[RawTensor, str]) -> None:
            converted[names[i]] = result
            out.write_at(starts[i], result[0].data)

        _parallel_each(convert, names, workers, cost=lambda n: _nbytes(sources[n]), done=write)
        out.sync()
    return _host_snapshot({n: raw for n, (raw, _) in converted.items()},
                          {n: digest for n, (_, digest) in converted.items()})


def _load_base(path: Path, manifest: SnapshotManifest, workers: int | None) -> HostSnapshot:
    entries = manifest.tensors
    header, bounds = _safetensors_layout([(e.name, e.dtype, e.shape) for e in entries])
    buf = _read_exact(path / WEIGHTS_FILE, bounds[-1], pooled=True)
    if buf[: len(header)].tobytes() != header:
        raise ChecksumError(f"{path / WEIGHTS_FILE}: safetensors header does not match manifest")
    raw = {e.name: RawTensor(e.dtype, e.shape, buf[bounds[i]: bounds[i + 1]])
           for i, e in enumerate(entries)}
    _verify_checksums(path / WEIGHTS_FILE, raw, manifest, workers)
    return _host_snapshot(raw, {e.name: e.checksum for e in entries})


def _read_exact(path: Path, expected: int, *, pooled: bool = False) -> np.ndarray:
    """The ``expected`` bytes of ``path``; ``pooled``: into a ``_BUFFERS`` buffer (a base's
    weights, the same size every time; a delta file's size differs every time, and idle
    buffers of sizes never asked for again would only pile up)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ChecksumError(f"{path} is missing") from exc
    if size != expected:
        raise ChecksumError(f"{path} is {size} bytes, manifest expects {expected}")
    buf = _BUFFERS.take(expected) if pooled else np.empty(expected, np.uint8)
    view, got = memoryview(buf), 0  # type: ignore[arg-type]
    with open(path, "rb", buffering=0) as f:
        while got < expected and (n := f.readinto(view[got:])):
            got += n
        got += len(f.read(1))  # a file that grew since the stat
    if got != expected:
        raise ChecksumError(f"{path} changed while read ({got}+ bytes), manifest expects "
                            f"{expected}")
    return buf


def _verify_checksums(
    path: Path, raw: Mapping[str, RawTensor], manifest: SnapshotManifest, workers: int | None
) -> None:
    names = [e.name for e in manifest.tensors if e.name in raw]
    digests = _parallel_map(lambda n: checksum(raw[n].data), names, workers,
                            cost=lambda n: raw[n].data.nbytes)
    expected = {e.name: e.checksum for e in manifest.tensors}
    bad = [n for n, d in zip(names, digests, strict=True) if d != expected[n]]
    if bad:
        raise ChecksumError(f"{path}: bytes of tensor(s) {bad[:5]} do not match their "
                            f"manifest checksum ({len(bad)} bad)")


# ---------------------------------------------------------------------------------------------
# Internals: delta I/O


def _read_delta(
    path: Path, manifest: SnapshotManifest, current: HostSnapshot | None, workers: int | None
) -> tuple[list[TensorEntry], dict[str, np.ndarray]]:
    """The changed entries of a delta on ``current`` and their blobs, read and checked against
    their checksums (nothing is decoded yet)."""
    if current is None:
        raise DeltaChainError(
            f"{path} is a delta on {manifest.previous_snapshot_identity} but no base is held; "
            "load a base first"
        )
    if manifest.previous_snapshot_identity != current.identity:
        raise IdentityMismatchError(
            f"{path} is a delta on {manifest.previous_snapshot_identity}, but the held "
            f"snapshot is {current.identity}"
        )
    _check_delta_entries(path, manifest, current)
    changed = [e for e in manifest.tensors if e.blob is not None]
    blobs_end = max((e.blob.offset + e.blob.length for e in changed if e.blob), default=0)
    buf = _read_exact(path / DELTA_FILE, blobs_end)
    blobs = {e.name: buf[e.blob.offset: e.blob.offset + e.blob.length] for e in changed if e.blob}
    _verify_blobs(path / DELTA_FILE, blobs, manifest, workers)
    return changed, blobs


def _load_delta(
    path: Path,
    manifest: SnapshotManifest,
    current: HostSnapshot | None,
    workers: int | None,
    *,
    in_place: bool,
) -> HostSnapshot:
    """A delta on ``current`` decoded into new arrays, or with ``in_place`` over ``current``'s
    own (where numpy lets them be written), turned back if it fails (see ``prepare_snapshot``);
    without it ``current`` is not touched."""
    changed, blobs = _read_delta(path, manifest, current, workers)
    assert current is not None
    held = [current.tensors[e.name].data for e in changed]
    places = [in_place and _make_writable(data) for data in held]  # else into a new buffer
    writable = [data for data, place in zip(held, places, strict=True) if place]
    turned: list[tuple[_TensorDecoding, int]] = []  # pieces decoded in place, whole
    try:
        tensors = [_TensorDecoding(blobs[e.name], data, _itemsize(e.dtype),
                                   out=data if place else None)
                   for e, data, place in zip(changed, held, places, strict=True)]
        try:
            _each_piece(tensors, _TensorDecoding.decode, workers, done=lambda i: None,
                        ran=lambda tensor, k: turned.append((tensor, k)) if tensor.in_place
                        else None)
            _raise_if_mismatched(path, changed, [t.hash.hexdigest() for t in tensors])
        except BaseException:
            _turn_back(current, turned, workers)
            raise
    finally:
        for data in writable:
            data.flags.writeable = False
    return _delta_snapshot(path, manifest, current,
                           {e.name: t.out() for e, t in zip(changed, tensors, strict=True)})


def _turn_back(
    current: HostSnapshot, pieces: Sequence[tuple[_TensorDecoding, int]], workers: int | None
) -> None:
    """Undo the in-place decode of ``pieces`` (their chunks applied again)."""
    try:
        _parallel_map(lambda piece: piece[0].undo(piece[1]), pieces, workers,
                      cost=lambda piece: piece[0].cost(piece[1]))
    except BaseException as exc:
        raise HeldBytesLostError(
            f"a rejected delta could not be turned back ({type(exc).__name__}: {exc}); the "
            f"bytes held for snapshot {current.identity} are lost"
        ) from exc


def _delta_snapshot(
    path: Path, manifest: SnapshotManifest, current: HostSnapshot, new: Mapping[str, np.ndarray]
) -> HostSnapshot:
    """The snapshot a delta makes of ``current``: the changed tensors' bytes in ``new``, the
    others shared with ``current``, named by the manifest's checksums."""
    raw = {e.name: current.tensors[e.name]._replace(data=new[e.name]) if e.name in new
           else current.tensors[e.name] for e in manifest.tensors}
    snapshot = _host_snapshot(raw, {e.name: e.checksum for e in manifest.tensors})
    if snapshot.identity != manifest.snapshot_identity:  # pragma: no cover - checked on read
        raise ChecksumError(f"{path}: result identity {snapshot.identity} != manifest")
    return snapshot


def _raise_if_mismatched(
    path: Path, entries: Sequence[TensorEntry], digests: Sequence[str]
) -> None:
    bad = [e.name for e, digest in zip(entries, digests, strict=True) if digest != e.checksum]
    if bad:
        raise ChecksumError(f"{path / DELTA_FILE}: decoded bytes of tensor(s) {bad[:5]} "
                            f"do not match their manifest checksum ({len(bad)} bad)")


def _make_writable(data: np.ndarray) -> bool:
    """Let a held array be written (False if numpy refuses: it does not own writable memory)."""
    try:
        data.flags.writeable = True
    except ValueError:
        return False
    return True


def _verify_blobs(
    path: Path, blobs: Mapping[str, np.ndarray], manifest: SnapshotManifest, workers: int | None
) -> None:
    """Every blob against its manifest checksum, before anything is decoded."""
    expected = {e.name: e.blob.checksum for e in manifest.tensors if e.blob is not None}
    names = list(blobs)
    digests = _parallel_map(lambda n: checksum(blobs[n]), names, workers,
                            cost=lambda n: blobs[n].nbytes)
    bad = [n for n, d in zip(names, digests, strict=True) if d != expected[n]]
    if bad:
        raise ChecksumError(f"{path}: blob of tensor(s) {bad[:5]} is corrupt ({len(bad)} bad)")


def _check_delta_entries(path: Path, manifest: SnapshotManifest, current: HostSnapshot) -> None:
    names = [e.name for e in manifest.tensors]
    if names != current.names:
        raise DeltaChainError(f"{path}: tensor set differs from held snapshot {current.identity}")
    for e in manifest.tensors:
        held = current.tensors[e.name]
        if (e.dtype, e.shape) != (held.dtype, held.shape):
            raise DeltaChainError(f"{path}: tensor {e.name!r} is {e.dtype}{list(e.shape)}, "
                                  f"held is {held.dtype}{list(held.shape)}")
        if e.blob is None and e.checksum != current.checksums[e.name]:
            raise ChecksumError(f"{path}: tensor {e.name!r} has no blob but its checksum "
                                "differs from the held bytes")


# ---------------------------------------------------------------------------------------------
# Internals: atomic directory writes


def check_snapshot_name(name: str) -> str:
    """A snapshot name is one plain path component (no '/', '\\', '..', leading '.')."""
    if (not isinstance(name, str) or not name or name.startswith(".") or "/" in name
            or "\\" in name or "\x00" in name):
        raise SnapshotError(f"snapshot name {name!r} must be a plain name "
                            "(no '/', no '\\', not starting with '.')")
    return name


def _target_dir(root: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    root = Path(root)
    target = root / check_snapshot_name(name)
    if target.exists():
        raise SnapshotError(f"snapshot {target} already exists; snapshots are never overwritten")
    return root, target


def _check_extra_files(
    extra_files: Mapping[str, str | os.PathLike[str]],
) -> dict[str, Path]:
    out = {}
    for filename, source in extra_files.items():
        check_snapshot_name(filename)
        if filename in (MANIFEST_FILE, WEIGHTS_FILE, DELTA_FILE):
            raise SnapshotError(f"extra file {filename!r} would replace a snapshot file")
        if not Path(source).is_file():
            raise SnapshotError(f"extra file {filename!r}: source {source} is not a file")
        out[filename] = Path(source)
    return out


def _write_atomically(
    root: Path,
    target: Path,
    fill: Callable[[Path], tuple[SnapshotManifest, _R]],
    *,
    durable: bool = True,
) -> tuple[SnapshotManifest, _R]:
    """``fill`` a fresh ``root/.tmp-*`` directory (it answers the manifest of what it wrote),
    write the manifest last and rename the directory to ``target``; ``durable``: the manifest
    and both directories fsynced too (``fill`` syncs its own files)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TEMP_PREFIX}{target.name}-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        manifest, result = fill(tmp)
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(_manifest_to_json(manifest), f, indent=1)
            if durable:
                _flush_and_sync(f)
        if durable:
            _fsync_dir(tmp)
        if target.exists():
            raise SnapshotError(f"snapshot {target} already exists; snapshots are never "
                                "overwritten")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if durable:
        _fsync_dir(root)
    return manifest, result


class _StreamedFile:
    """A new file written piece by piece while the rest of its content is still being made.
    The writeback of each piece to disk is started as soon as it is written (Linux
    ``sync_file_range``, a hint; elsewhere nothing), so the fsync at the end waits for the
    last pieces only instead of the whole file: 92 MB written in 30 pieces 12 ms apart took
    0.06 s to fsync at the end, 0.0003 s with the writeback started piece by piece.
    Not ``durable``: no writeback is started and ``sync`` does nothing (the kernel writes the
    file back in its own time)."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # less umask
        self.size = 0
        self.durable = durable

    def __enter__(self) -> _StreamedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def append(self, data: np.ndarray | bytes) -> int:
        """Write ``data`` at the end; answers the offset it was written at."""
        offset = self.size
        self.write_at(offset, data)
        return offset

    def write_at(self, offset: int, data: np.ndarray | bytes) -> None:
        view = _buffer(data)
        done = 0
        while done < len(view):
            written = os.pwrite(self._fd, view[done:], offset + done)
            if written <= 0:  # pragma: no cover - a regular file takes or raises
                raise OSError(f"pwrite wrote nothing at offset {offset + done}")
            done += written
        if len(view):
            if self.durable:
                _start_writeback(self._fd, offset, len(view))
            self.size = max(self.size, offset + len(view))

    def sync(self) -> None:
        if self.durable:
            _fsync(self._fd)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # pragma: no cover - a libc without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the dirty pages of the range back; do not wait


def _start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` to disk; whether it took the
    request. A hint: a refusal is ignored, the fsync at the end makes the file durable."""
    if _SYNC_FILE_RANGE is None or not nbytes:
        return False
    return _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) == 0


def _flush_and_sync(f: Any) -> None:
    f.flush()
    _fsync(f.fileno())


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
