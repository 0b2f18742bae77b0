"""Sampler snapshots: base + XOR delta files, verified byte-exact round trips and corruption."""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from asyncrl.errors import (
    ChecksumError,
    DeltaChainError,
    HeldBytesLostError,
    IdentityMismatchError,
    SnapshotError,
)
from asyncrl.sync import snapshot as snap
from asyncrl.sync.snapshot import (
    DELTA_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    HostSnapshot,
    apply_snapshot,
    changed_layer_groups,
    encode_naive_delta,
    encode_tensor_delta,
    from_torch,
    list_snapshots,
    make_host_snapshot,
    prepare_snapshot,
    read_manifest,
    to_torch,
    write_base,
    write_delta,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
Weights = dict[str, torch.Tensor]
Chain = tuple[Path, Weights, HostSnapshot, Weights]
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor (so NaNs and -0.0 compare exactly)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def assert_same_bytes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert torch.equal(bits(got[name]), bits(want[name])), name


def snapshot_bytes(snapshot: HostSnapshot) -> dict[str, bytes]:
    return {name: raw.data.tobytes() for name, raw in snapshot.tensors.items()}


def model(seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.bfloat16) -> Weights:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(32, 8, generator=g).to(dtype)}
    for i in range(layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"):
            out[f"model.layers.{i}.{part}.weight"] = torch.randn(8, 8, generator=g).to(dtype)
        out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(8, dtype=dtype)
    out["model.norm.weight"] = torch.ones(8, dtype=dtype)
    out["lm_head.weight"] = torch.randn(32, 8, generator=g).to(dtype)
    return out


def nudge(tensors: Weights, names: list[str], lr: float = 1e-2) -> Weights:
    out = {k: v.clone() for k, v in tensors.items()}
    for name in names:
        out[name] = (out[name].float() + lr * torch.sign(torch.randn(out[name].shape))).to(
            out[name].dtype
        )
    return out


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    """root with base ``b0`` and delta ``d1`` on it; returns (root, w0, base host, w1)."""
    w0 = model()
    _, host0 = write_base(tmp_path, "b0", w0)
    w1 = nudge(w0, ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"])
    write_delta(tmp_path, "d1", w1, host0)
    return tmp_path, w0, host0, w1


# ---------------------------------------------------------------------------------------------
# Property: base -> delta -> delta reproduces exact bytes and identities


@st.composite
def perturbed_models(draw: st.DrawFn) -> tuple[list[Weights], int]:
    n_tensors = draw(st.integers(1, 4))
    shapes = [
        tuple(draw(st.lists(st.integers(0, 13), min_size=0, max_size=3)))
        for _ in range(n_tensors)
    ]
    dtypes = [draw(st.sampled_from(DTYPES)) for _ in range(n_tensors)]
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    w = {
        f"model.layers.{i}.w": torch.from_numpy(np.asarray(rng.standard_normal(s), np.float32))
        .to(d)
        for i, (s, d) in enumerate(zip(shapes, dtypes, strict=True))
    }
    if draw(st.booleans()) and w["model.layers.0.w"].numel() > 0:
        w["model.layers.0.w"].view(-1)[0] = float("nan")
    versions = [w]
    for _ in range(2):
        prev, cur = versions[-1], {}
        for name, t in prev.items():
            mode = draw(st.sampled_from(["same", "sparse", "dense", "tiny"]))
            x = t.float().numpy().copy()
            if mode == "sparse":
                mask = rng.random(x.shape) < 0.1
                x = x + mask * rng.standard_normal(x.shape).astype(np.float32)
            elif mode == "dense":
                x = x + rng.standard_normal(x.shape).astype(np.float32)
            elif mode == "tiny":
                x = x * (1 + 1e-3 * rng.standard_normal(x.shape).astype(np.float32))
            new = torch.from_numpy(np.asarray(x, np.float32)).to(t.dtype)
            cur[name] = t.clone() if mode == "same" else new
        versions.append(cur)
    return versions, draw(st.sampled_from([1, 3])), draw(st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(perturbed_models())
def test_base_delta_delta_round_trip_is_byte_exact(
    case: tuple[list[Weights], int, bool],
) -> None:
    versions, level, in_place = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, written = write_base(root, "v0", versions[0])
        loaded = apply_snapshot(root / "v0", None)
        assert loaded.snapshot.identity == written.identity
        assert_same_bytes(to_torch(loaded.snapshot), versions[0])
        for i in (1, 2):
            if in_place:  # the same delta as a copy (written first: in place consumes)
                copy_manifest, _ = write_delta(root, f"c{i}", versions[i], written, level=level)
                copy_blobs = (root / f"c{i}" / DELTA_FILE).read_bytes()
            manifest, written = write_delta(root, f"v{i}", versions[i], written, level=level,
                                            in_place=in_place)
            if in_place:
                assert (root / f"v{i}" / DELTA_FILE).read_bytes() == copy_blobs
                assert manifest.tensors == copy_manifest.tensors
                assert_same_bytes(to_torch(written), versions[i])
            expected_changed = [
                n for n in sorted(versions[i])
                if not torch.equal(bits(versions[i][n]), bits(versions[i - 1][n]))
            ]
            assert manifest.changed == expected_changed  # unchanged tensors carry no blob
            loaded = apply_snapshot(root / f"v{i}", loaded.snapshot)
            assert list(loaded.changed) == expected_changed
            assert loaded.snapshot.identity == written.identity == manifest.snapshot_identity
            assert_same_bytes(to_torch(loaded.snapshot), versions[i])
            # equal weights -> equal identity, whatever the name or kind
            _, rebased = write_base(root, f"base{i}", versions[i])
            assert rebased.identity == loaded.snapshot.identity


def test_identity_depends_on_content_only() -> None:
    a = make_host_snapshot(from_torch(model(seed=0)))
    b = make_host_snapshot(from_torch(model(seed=0)))
    c = make_host_snapshot(from_torch(model(seed=1)))
    assert a.identity == b.identity != c.identity
    assert len(a.identity) == 32
    renamed = {("x." + k): v for k, v in model(seed=0).items()}
    assert make_host_snapshot(from_torch(renamed)).identity != a.identity
    as_fp16 = make_host_snapshot(from_torch(model(seed=0, dtype=torch.float16)))
    assert as_fp16.identity != a.identity


def test_delta_with_nothing_changed_is_empty_and_keeps_identity(tmp_path: Path) -> None:
    w0 = model()
    _, host0 = write_base(tmp_path, "b0", w0)
    manifest, host1 = write_delta(tmp_path, "d1", {k: v.clone() for k, v in w0.items()}, host0)
    assert manifest.changed == []
    assert (tmp_path / "d1" / DELTA_FILE).stat().st_size == 0
    assert host1.identity == host0.identity
    loaded = apply_snapshot(tmp_path / "d1", host0)
    assert loaded.changed == () and loaded.snapshot.identity == host0.identity


def test_manifest_records_chain_and_blobs(chain: Chain) -> None:
    root, _, host0, _ = chain
    base, delta = read_manifest(root / "b0"), read_manifest(root / "d1")
    assert (base.kind, base.previous_snapshot_identity) == ("base", None)
    assert base.snapshot_identity == host0.identity
    assert delta.kind == "delta" and delta.previous_snapshot_identity == host0.identity
    assert delta.changed == ["lm_head.weight", "model.layers.0.self_attn.q_proj.weight"]
    blobs = [e.blob for e in delta.tensors if e.blob is not None]
    assert sum(b.length for b in blobs) == (root / "d1" / DELTA_FILE).stat().st_size
    raw = json.loads((root / "d1" / MANIFEST_FILE).read_text())
    assert raw["format_version"] == snap.FORMAT_VERSION and raw["compression"]["codec"] == "zstd"


def test_base_records_given_previous_identity_as_lineage(tmp_path: Path) -> None:
    manifest, _ = write_base(tmp_path, "b", model(), previous_identity="f" * 32)
    assert read_manifest(tmp_path / "b").previous_snapshot_identity == "f" * 32
    assert apply_snapshot(tmp_path / "b", None).snapshot.identity == manifest.snapshot_identity


# ---------------------------------------------------------------------------------------------
# Base directory is a real safetensors model


def test_base_loads_with_safetensors(tmp_path: Path) -> None:
    w = model()
    w["scalar"] = torch.tensor(3.5, dtype=torch.float32)
    w["empty"] = torch.zeros(0, 4, dtype=torch.float16)
    write_base(tmp_path, "b", w)
    loaded = load_file(tmp_path / "b" / WEIGHTS_FILE)
    assert_same_bytes(loaded, w)
    with safe_open(tmp_path / "b" / WEIGHTS_FILE, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_extra_files_are_copied(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "qwen2"}')
    write_base(tmp_path / "snaps", "b", model(), extra_files={"config.json": config})
    assert (tmp_path / "snaps" / "b" / "config.json").read_text() == config.read_text()
    with pytest.raises(SnapshotError):
        write_base(tmp_path / "snaps", "c", model(), extra_files={WEIGHTS_FILE: config})
    with pytest.raises(SnapshotError):
        write_base(tmp_path / "snaps", "d", model(), extra_files={"../x.json": config})
    assert list_snapshots(tmp_path / "snaps") == ["b"]


# ---------------------------------------------------------------------------------------------
# Chain errors


def test_delta_without_current_is_a_chain_error(chain: Chain) -> None:
    root = chain[0]
    with pytest.raises(DeltaChainError):
        apply_snapshot(root / "d1", None)


def test_delta_on_wrong_identity_names_both(chain: Chain) -> None:
    root, w0, host0, _ = chain
    other = make_host_snapshot(from_torch(nudge(w0, ["model.norm.weight"])))
    with pytest.raises(IdentityMismatchError) as info:
        apply_snapshot(root / "d1", other)
    assert host0.identity in str(info.value) and other.identity in str(info.value)


@pytest.mark.parametrize(
    "change",
    ["add", "remove", "reshape", "retype"],
)
def test_delta_of_a_different_tensor_set_needs_a_base(tmp_path: Path, change: str) -> None:
    w0 = model()
    _, host0 = write_base(tmp_path, "b0", w0)
    w1 = dict(w0)
    if change == "add":
        w1["model.extra.weight"] = torch.ones(3)
    elif change == "remove":
        del w1["lm_head.weight"]
    elif change == "reshape":
        w1["lm_head.weight"] = w1["lm_head.weight"].reshape(8, 32)
    else:
        w1["lm_head.weight"] = w1["lm_head.weight"].float()
    with pytest.raises(DeltaChainError):
        write_delta(tmp_path, "d1", w1, host0)
    assert list_snapshots(tmp_path) == ["b0"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Corruption: always an error, and the held snapshot is untouched


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def edit_manifest(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    obj = json.loads((path / MANIFEST_FILE).read_text())
    edit(obj)
    (path / MANIFEST_FILE).write_text(json.dumps(obj))


def changed_entry(obj: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in obj["tensors"] if "blob" in e)


CORRUPTIONS = {
    "truncate_delta": lambda d: (d / DELTA_FILE).write_bytes((d / DELTA_FILE).read_bytes()[:-3]),
    "extend_delta": lambda d: (d / DELTA_FILE).write_bytes((d / DELTA_FILE).read_bytes() + b"x"),
    "flip_delta_first": lambda d: flip_byte(d / DELTA_FILE, 0),
    "flip_delta_last": lambda d: flip_byte(d / DELTA_FILE, (d / DELTA_FILE).stat().st_size - 1),
    "delete_delta": lambda d: (d / DELTA_FILE).unlink(),
    "edit_result_checksum": lambda d: edit_manifest(
        d, lambda o: changed_entry(o).update(checksum="0" * 32)
    ),
    "edit_blob_checksum": lambda d: edit_manifest(
        d, lambda o: changed_entry(o)["blob"].update(checksum="0" * 32)
    ),
    "edit_identity": lambda d: edit_manifest(d, lambda o: o.update(snapshot_identity="0" * 32)),
    "drop_blob": lambda d: edit_manifest(d, lambda o: changed_entry(o).pop("blob")),
    # what a power loss may leave of a delta, which is not fsynced: files cut to nothing, or
    # of their length but with blocks never written (zeros)
    "empty_delta": lambda d: (d / DELTA_FILE).write_bytes(b""),
    "zeroed_delta": lambda d: (d / DELTA_FILE).write_bytes(bytes((d / DELTA_FILE).stat().st_size)),
}
# ... and of its manifest: not a checksum error, a manifest that cannot be read
UNREADABLE_MANIFESTS = {
    "empty_manifest": lambda d: (d / MANIFEST_FILE).write_bytes(b""),
    "zeroed_manifest": lambda d: (d / MANIFEST_FILE).write_bytes(
        bytes((d / MANIFEST_FILE).stat().st_size)),
}


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("corruption", sorted([*CORRUPTIONS, *UNREADABLE_MANIFESTS]))
def test_corrupt_delta_raises_and_leaves_current(
    chain: Chain, corruption: str, in_place: bool
) -> None:
    root, _, host0, _ = chain
    before = snapshot_bytes(host0)
    {**CORRUPTIONS, **UNREADABLE_MANIFESTS}[corruption](root / "d1")
    with pytest.raises(SnapshotError):
        apply_snapshot(root / "d1", host0, in_place=in_place)
    assert snapshot_bytes(host0) == before
    assert make_host_snapshot(dict(host0.tensors)).identity == host0.identity
    assert not any(raw.data.flags.writeable for raw in host0.tensors.values())


def reforge_longest_blob(path: Path) -> None:
    """Damage the end of the longest blob AND fix its blob checksum: only decoding (its earlier
    chunks decode fine) or the result checksum can catch it."""
    obj = json.loads((path / MANIFEST_FILE).read_text())
    entry = max((e["blob"] for e in obj["tensors"] if "blob" in e), key=lambda b: b["length"])
    data = bytearray((path / DELTA_FILE).read_bytes())
    start, end = entry["offset"], entry["offset"] + entry["length"]
    data[end - 2] ^= 0xFF
    (path / DELTA_FILE).write_bytes(bytes(data))
    entry["checksum"] = snap.checksum(bytes(data[start:end]))
    (path / MANIFEST_FILE).write_text(json.dumps(obj))


def break_last_frame(path: Path, which: int = -1) -> None:
    """Make the last zstd frame (or frame ``which``) of the longest blob undecodable (its magic
    number) AND fix the blob checksum: the chunks before it decode and are written in place
    first."""
    obj = json.loads((path / MANIFEST_FILE).read_text())
    entry = max((e["blob"] for e in obj["tensors"] if "blob" in e), key=lambda b: b["length"])
    data = bytearray((path / DELTA_FILE).read_bytes())
    start, end = entry["offset"], entry["offset"] + entry["length"]
    chunks = int.from_bytes(data[start + 16 : start + 20], "little")  # header: 4s Q I I
    lengths = np.frombuffer(bytes(data[start + 20 : start + 20 + 4 * chunks]), "<u4")
    ends = start + 20 + 4 * chunks + np.cumsum(lengths)
    k = which % chunks
    assert chunks > 2 and lengths[k] > 0
    data[int(ends[k] - lengths[k])] ^= 0xFF  # the first byte of the frame's magic number
    (path / DELTA_FILE).write_bytes(bytes(data))
    entry["checksum"] = snap.checksum(bytes(data[start:end]))
    (path / MANIFEST_FILE).write_text(json.dumps(obj))


def in_reversed_order(fn: Any, items: Any, workers: Any, *, cost: Any = None,
                      done: Any) -> None:
    """``snap._parallel_each`` on one thread, the last item first."""
    for i in reversed(range(len(items))):
        done(i, fn(items[i]))


def test_piece_bounds_cut_a_tensor_into_whole_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert snap._piece_bounds(0, 2048) == [0]
    assert snap._piece_bounds(5000, 2048) == [0, 5000]  # 3 chunks, PIECE_CHUNKS of them fit
    monkeypatch.setattr(snap, "PIECE_CHUNKS", 2)
    assert snap._piece_bounds(5000, 2048) == [0, 4096, 5000]
    assert snap._piece_bounds(8192, 2048) == [0, 4096, 8192]
    assert snap._piece_bounds(1, 2048) == [0, 1]


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
def test_ordered_hash_of_pieces_finished_in_any_order(order: list[int]) -> None:
    data = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)
    bounds = [0, 1000, 1001, 2500, 4000]
    ordered = snap._OrderedHash(bounds)
    claimed = []
    for k in order:
        if ordered.claim(k):  # the piece the hash has reached: hashed as it is written
            claimed.append(k)
            for at in range(bounds[k], bounds[k + 1], 300):
                ordered.update(data[at:min(at + 300, bounds[k + 1])])
            ordered.finished(k, data, hashed=True)
        else:
            with pytest.raises(RuntimeError, match="pieces"):
                ordered.hexdigest()
            ordered.finished(k, data, hashed=False)
    assert ordered.hexdigest() == snap.checksum(data)
    assert claimed[0] == 0 and claimed == sorted(claimed)


def test_ordered_hash_of_pieces_finished_by_many_threads() -> None:
    data = np.random.default_rng(1).integers(0, 256, 64 * 512, dtype=np.uint8)
    hashed = []
    for trial in range(20):
        ordered = snap._OrderedHash(range(0, 64 * 512 + 1, 512))
        rng = np.random.default_rng(trial)
        delays = rng.random(64) * 1e-3

        def piece(k: int, ordered: Any = ordered, delays: Any = delays) -> None:
            hashing = ordered.claim(k)
            time.sleep(delays[k])
            if hashing:
                ordered.update(data[k * 512:(k + 1) * 512])
            ordered.finished(k, data, hashed=hashing)

        def run(ks: Any) -> None:
            for k in ks:
                piece(int(k))

        threads = [threading.Thread(target=run, args=(ks,))
                   for ks in np.array_split(rng.permutation(64), 8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        hashed.append(ordered.hexdigest())
    assert set(hashed) == {snap.checksum(data)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pieces_of_a_tensor_in_any_order_write_the_same_delta_and_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """Tensors cut into many pieces (threads share a large tensor): encoded and decoded in
    order, last piece first and on threads, the same delta file and the same bytes."""
    monkeypatch.setattr(snap, "CHUNK_BYTES", 64)
    monkeypatch.setattr(snap, "PIECE_CHUNKS", 2)
    w0 = model(seed=3, dtype=torch.float32)
    w1 = nudge(w0, sorted(w0)[:4], lr=1e-2)
    _, base = write_base(tmp_path, "b0", w0, dtype=dtype)
    want_manifest, want = write_delta(tmp_path, "in-order", w1, base, dtype=dtype, workers=1)
    assert len(snap._piece_bounds(256, 64 // snap._itemsize(dtype))) > 3  # the embedding
    real = snap._parallel_each
    runs: dict[str, Any] = {"reversed": in_reversed_order, "threads": real}
    for name, runner in runs.items():
        monkeypatch.setattr(snap, "_parallel_each", runner)
        _, held = write_base(tmp_path, f"b-{name}", w0, dtype=dtype)
        manifest, new = write_delta(tmp_path, name, w1, held, dtype=dtype, workers=4,
                                    in_place=name == "threads")
        assert manifest.tensors == want_manifest.tensors
        assert (tmp_path / name / DELTA_FILE).read_bytes() == (
            tmp_path / "in-order" / DELTA_FILE).read_bytes()
        assert snapshot_bytes(new) == snapshot_bytes(want)
        for in_place in (False, True):
            loaded = apply_snapshot(tmp_path / "in-order", apply_snapshot(
                tmp_path / "b0", None).snapshot, in_place=in_place, workers=4)
            assert loaded.snapshot.identity == want.identity
            assert snapshot_bytes(loaded.snapshot) == snapshot_bytes(want)
    monkeypatch.setattr(snap, "_parallel_each", real)


def test_the_codec_leaves_no_cycle_that_keeps_a_models_bytes(tmp_path: Path) -> None:
    """Snapshots written and read are freed as soon as they are dropped, without the cyclic
    garbage collector (which runs by object count, not bytes: a cycle per tensor would keep
    every old model copy alive for a while)."""
    w0 = model(seed=4)
    _, base = write_base(tmp_path, "b0", w0)
    w1 = nudge(w0, sorted(w0), lr=0.5)
    gc.collect()
    gc.disable()
    try:
        _, written = write_delta(tmp_path, "d1", w1, base)
        loaded = apply_snapshot(tmp_path / "d1", base).snapshot
        prepared = prepare_snapshot(tmp_path / "d1", apply_snapshot(tmp_path / "b0",
                                                                    None).snapshot).snapshot
        arrays = [weakref.ref(s.tensors["model.embed_tokens.weight"].data)
                  for s in (written, loaded, prepared)]
        del written, loaded, prepared
        assert [ref() is None for ref in arrays] == [True, True, True]
    finally:
        gc.enable()


@pytest.mark.parametrize("which", [0, 3, -1])
@pytest.mark.parametrize("reverse", [False, True])
def test_a_bad_piece_turns_back_every_piece_that_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: int, reverse: bool
) -> None:
    """The longest blob's tensor in one-chunk pieces on threads (or last first): one broken
    chunk, and every piece decoded before it fails, of that tensor or another, is turned back."""
    monkeypatch.setattr(snap, "CHUNK_BYTES", 64)
    monkeypatch.setattr(snap, "PIECE_CHUNKS", 1)
    w0 = model()
    _, host0 = write_base(tmp_path, "b0", w0)
    write_delta(tmp_path, "d1", nudge(w0, sorted(w0), lr=0.5), host0)
    break_last_frame(tmp_path / "d1", which)
    before = snapshot_bytes(host0)
    if reverse:
        monkeypatch.setattr(snap, "_parallel_each", in_reversed_order)
    with pytest.raises(ChecksumError, match="does not decompress"):
        prepare_snapshot(tmp_path / "d1", host0, workers=4)
    assert snapshot_bytes(host0) == before
    assert not any(raw.data.flags.writeable for raw in host0.tensors.values())


@pytest.mark.parametrize("damage", ["reforged_blob", "broken_frame", "result_checksum"])
def test_in_place_failure_writes_no_held_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setattr(snap, "CHUNK_BYTES", 64)  # many chunks per tensor: some decode fine
    w0 = model()
    _, host0 = write_base(tmp_path, "b0", w0)
    write_delta(tmp_path, "d1", nudge(w0, sorted(w0), lr=0.5), host0)
    before = snapshot_bytes(host0)
    if damage == "reforged_blob":
        reforge_longest_blob(tmp_path / "d1")
    elif damage == "broken_frame":
        break_last_frame(tmp_path / "d1")
    else:  # a wrong result checksum, the identity recomputed to match it
        def edit(obj: dict[str, Any]) -> None:
            [e for e in obj["tensors"] if "blob" in e][-1].update(checksum="0" * 32)
            obj["snapshot_identity"] = snap.snapshot_identity(
                (e["name"], e["dtype"], e["shape"], e["checksum"]) for e in obj["tensors"])
        edit_manifest(tmp_path / "d1", edit)
    with pytest.raises(ChecksumError, match="does not decompress" if damage == "broken_frame"
                       else "checksum"):
        apply_snapshot(tmp_path / "d1", host0, in_place=True)
    assert snapshot_bytes(host0) == before
    assert not any(raw.data.flags.writeable for raw in host0.tensors.values())
    assert apply_snapshot(tmp_path / "b0", None).snapshot.identity == host0.identity


def test_in_place_apply_turns_the_held_bytes(chain: Chain) -> None:
    root, _, host0, w1 = chain
    copied = apply_snapshot(root / "d1", host0)
    held = {name: raw.data for name, raw in host0.tensors.items()}
    loaded = apply_snapshot(root / "d1", host0, in_place=True)
    assert loaded.snapshot.identity == copied.snapshot.identity
    assert_same_bytes(to_torch(loaded.snapshot), w1)
    for name, raw in loaded.snapshot.tensors.items():  # no copy: the held arrays were turned
        assert raw.data is held[name]
        assert not raw.data.flags.writeable


def test_prepared_delta_is_written_over_the_held_bytes(chain: Chain) -> None:
    root, _, host0, w1 = chain
    expected = apply_snapshot(root / "d1", host0).snapshot  # a copy: host0 untouched
    held = {name: raw.data for name, raw in host0.tensors.items()}
    loaded = prepare_snapshot(root / "d1", host0)
    assert loaded.snapshot.identity == expected.identity
    assert list(loaded.changed) == sorted(loaded.changed) and loaded.changed
    assert_same_bytes(to_torch(loaded.snapshot), w1)
    for name, raw in loaded.snapshot.tensors.items():  # the same arrays, read-only again
        assert raw.data is held[name] and not raw.data.flags.writeable


def test_prepared_delta_on_bytes_numpy_cannot_write_is_applied_to_a_copy(chain: Chain) -> None:
    root, _, host0, w1 = chain
    frozen = make_host_snapshot({
        name: raw._replace(data=np.frombuffer(raw.data.tobytes(), np.uint8))
        for name, raw in host0.tensors.items()
    })
    before = snapshot_bytes(frozen)
    loaded = prepare_snapshot(root / "d1", frozen)
    assert_same_bytes(to_torch(loaded.snapshot), w1)
    assert snapshot_bytes(frozen) == before
    for name in loaded.changed:
        assert loaded.snapshot.tensors[name].data is not frozen.tensors[name].data


def test_held_bytes_changed_before_a_delta_are_caught_and_kept(chain: Chain) -> None:
    # the result checksum covers the held bytes too; turning back restores them exactly
    root, _, host0, _ = chain
    name = "model.layers.0.self_attn.q_proj.weight"
    data = host0.tensors[name].data
    data.flags.writeable = True
    data[3] ^= 1
    data.flags.writeable = False
    before = snapshot_bytes(host0)
    with pytest.raises(ChecksumError, match="do not match their manifest checksum"):
        prepare_snapshot(root / "d1", host0)
    assert snapshot_bytes(host0) == before
    assert not any(raw.data.flags.writeable for raw in host0.tensors.values())


@pytest.mark.parametrize("damage", ["reforged_blob", "broken_frame", "result_checksum"])
def test_a_delta_that_cannot_be_turned_back_says_the_held_bytes_are_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setattr(snap, "CHUNK_BYTES", 64)  # many chunks per tensor
    w0 = model()
    _, host0 = write_base(tmp_path, "b0", w0)
    write_delta(tmp_path, "d1", nudge(w0, sorted(w0), lr=0.5), host0)
    failed = threading.Event()  # set by the first failure; in-place writes fail after it
    xor_chunk, mismatched = snap._xor_chunk, snap._raise_if_mismatched

    def runs_out_of_memory_after_a_failure(*args: Any) -> None:
        if failed.is_set() and (len(args) < 6 or args[5] is None):  # in place: the undo
            raise MemoryError("no memory left")
        try:
            xor_chunk(*args)
        except ChecksumError:
            failed.set()
            raise

    def checked(*args: Any) -> None:  # every tensor applied whole, then checked
        try:
            mismatched(*args)
            if damage == "result_checksum":
                raise ChecksumError("decoded bytes do not match their manifest checksum")
        except ChecksumError:
            failed.set()
            raise

    if damage == "reforged_blob":
        reforge_longest_blob(tmp_path / "d1")
    elif damage == "broken_frame":  # fails half way through a tensor: it turns its own back
        break_last_frame(tmp_path / "d1")
    monkeypatch.setattr(snap, "_raise_if_mismatched", checked)
    monkeypatch.setattr(snap, "_xor_chunk", runs_out_of_memory_after_a_failure)
    with pytest.raises(HeldBytesLostError, match="lost") as info:
        prepare_snapshot(tmp_path / "d1", host0, workers=1)  # one thread: a fixed order
    assert isinstance(info.value.__cause__, MemoryError)


def test_prepared_base_is_loaded_whole(chain: Chain) -> None:
    root, w0, host0, _ = chain
    loaded = prepare_snapshot(root / "b0", None)
    assert loaded.snapshot.identity == host0.identity and sorted(loaded.changed) == sorted(w0)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_delta_data_is_a_checksum_error(chain: Chain, corruption: str) -> None:
    root, _, host0, _ = chain
    CORRUPTIONS[corruption](root / "d1")
    with pytest.raises(ChecksumError):
        apply_snapshot(root / "d1", host0)


def test_flipped_byte_anywhere_in_safetensors_is_detected(chain: Chain) -> None:
    root = chain[0]
    path = root / "b0" / WEIGHTS_FILE
    size = path.stat().st_size
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    for offset in (0, 9, 8 + header_len - 1, 8 + header_len, size // 2, size - 1):
        copy = root / f"b0-flip{offset}"
        shutil.copytree(root / "b0", copy)
        flip_byte(copy / WEIGHTS_FILE, offset)
        with pytest.raises(ChecksumError):
            apply_snapshot(copy, None)


def test_truncated_safetensors_is_detected(chain: Chain) -> None:
    path = chain[0] / "b0" / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ChecksumError, match="bytes"):
        apply_snapshot(chain[0] / "b0", None)


@pytest.mark.parametrize("field", ["checksum", "snapshot_identity"])
def test_edited_base_manifest_is_detected(chain: Chain, field: str) -> None:
    root = chain[0]
    if field == "checksum":
        edit_manifest(root / "b0", lambda o: o["tensors"][0].update(checksum="0" * 32))
    else:
        edit_manifest(root / "b0", lambda o: o.update(snapshot_identity="0" * 32))
    with pytest.raises(ChecksumError):
        apply_snapshot(root / "b0", None)


@pytest.mark.parametrize(
    "text",
    ["", "{", "[]", '{"format": "asyncrl-snapshot"}', '{"format": "other", "format_version": 1}'],
)
def test_unparsable_manifest_is_a_snapshot_error(chain: Chain, text: str) -> None:
    root, _, host0, _ = chain
    (root / "d1" / MANIFEST_FILE).write_text(text)
    with pytest.raises(SnapshotError):
        read_manifest(root / "d1")
    with pytest.raises(SnapshotError):
        apply_snapshot(root / "d1", host0)


def test_unsupported_format_version_is_refused(chain: Chain) -> None:
    root = chain[0]
    edit_manifest(root / "b0", lambda o: o.update(format_version=99))
    with pytest.raises(SnapshotError, match="format_version"):
        read_manifest(root / "b0")


def test_snapshots_of_the_previous_format_version_still_load(chain: Chain) -> None:
    # v4 only added a chunk filter: what v3 wrote is still read (a chain of v3 snapshots on
    # disk keeps working after an upgrade)
    root, _, host0, w1 = chain
    assert snap.FORMAT_VERSION == 4 and 3 in snap.READABLE_FORMAT_VERSIONS
    for name in ("b0", "d1"):
        edit_manifest(root / name, lambda o: o.update(format_version=3))
        assert read_manifest(root / name).format_version == 3
    base = apply_snapshot(root / "b0", None).snapshot
    assert base.identity == host0.identity
    assert_same_bytes(to_torch(apply_snapshot(root / "d1", base).snapshot), w1)


# ---------------------------------------------------------------------------------------------
# Atomic writes, names, temp dirs


def test_temp_dirs_are_neither_listed_nor_loaded(chain: Chain) -> None:
    root = chain[0]
    shutil.copytree(root / "b0", root / ".tmp-b9-1234")
    (root / "no-manifest").mkdir()
    assert list_snapshots(root) == ["b0", "d1"]
    with pytest.raises(SnapshotError):
        apply_snapshot(root / ".tmp-b9-1234", None)
    with pytest.raises(SnapshotError):
        apply_snapshot(root / "no-manifest", None)
    assert snap.remove_stale_temp_dirs(root) == [".tmp-b9-1234"]
    assert not (root / ".tmp-b9-1234").exists()


def test_existing_snapshot_is_never_overwritten(chain: Chain) -> None:
    root, _, host0, w1 = chain
    before = (root / "b0" / MANIFEST_FILE).read_bytes()
    with pytest.raises(SnapshotError, match="already exists"):
        write_base(root, "b0", w1)
    with pytest.raises(SnapshotError, match="already exists"):
        write_delta(root, "b0", w1, host0)
    assert (root / "b0" / MANIFEST_FILE).read_bytes() == before
    assert apply_snapshot(root / "b0", None).snapshot.identity == host0.identity


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../up", ".hidden", "a\\b", "/abs"])
def test_bad_names_are_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(SnapshotError):
        write_base(tmp_path / "root", name, model())
    assert not (tmp_path / "up").exists() and not (tmp_path / "abs").exists()
    assert list_snapshots(tmp_path / "root") == []


def test_crash_mid_write_leaves_nothing_that_looks_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []
    real_write = snap._write_safetensors

    def write_then_crash(path: Path, *args: Any) -> HostSnapshot:
        real_write(path, *args)
        seen.append(path.parent)
        assert path.parent.name.startswith(".tmp-")
        assert not (path.parent / MANIFEST_FILE).exists()  # manifest comes last
        raise KeyboardInterrupt

    monkeypatch.setattr(snap, "_write_safetensors", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        write_base(tmp_path, "b0", model())
    assert seen and not seen[0].exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("occupant", ["empty-dir", "full-dir"])
def test_name_taken_during_write_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, occupant: str
) -> None:
    real_write = snap._write_safetensors

    def racing_writer(path: Path, *args: Any) -> HostSnapshot:
        snapshot = real_write(path, *args)
        (tmp_path / "b0").mkdir()  # another writer claims the name meanwhile
        if occupant == "full-dir":
            (tmp_path / "b0" / "theirs").write_text("x")
        return snapshot

    monkeypatch.setattr(snap, "_write_safetensors", racing_writer)
    with pytest.raises(SnapshotError, match="already exists"):
        write_base(tmp_path, "b0", model())
    assert sorted(p.name for p in (tmp_path / "b0").iterdir()) == (
        [] if occupant == "empty-dir" else ["theirs"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["b0"]


def test_rename_failure_leaves_no_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(snap.os, "rename", fail)
    with pytest.raises(OSError, match="disk gone"):
        write_base(tmp_path, "b0", model())
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Streamed writes: each tensor goes to the file as soon as it is converted / encoded


def test_streamed_file_writes_pieces_and_starts_their_writeback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranges: list[tuple[int, int, int]] = []

    def sync_file_range(fd: int, offset: int, n: int, flags: int) -> int:
        ranges.append((offset, n, flags))
        return 0

    monkeypatch.setattr(snap, "_SYNC_FILE_RANGE", sync_file_range)
    synced: list[int] = []
    monkeypatch.setattr(snap, "_fsync", synced.append)
    for durable in (True, False):
        with snap._StreamedFile(tmp_path / f"f{durable}", durable=durable) as out:
            assert out.append(b"abc") == 0
            out.write_at(10, np.frombuffer(b"xyz", np.uint8))
            assert out.append(b"") == 13  # nothing to write back
            assert out.append(b"tail") == 13
            out.sync()
        assert (tmp_path / f"f{durable}").read_bytes() == b"abc" + bytes(7) + b"xyz" + b"tail"
        # durable: each piece's writeback started as it is written, and an fsync at the end;
        # not durable: neither
        assert ranges == ([(0, 3, 2), (10, 3, 2), (13, 4, 2)] if durable else [])
        assert len(synced) == durable
        ranges.clear()
        synced.clear()
    with pytest.raises(FileExistsError):
        snap._StreamedFile(tmp_path / "fTrue")


@pytest.mark.skipif(snap._SYNC_FILE_RANGE is None, reason="no sync_file_range (not Linux)")
def test_writeback_hint_is_the_real_syscall(tmp_path: Path) -> None:
    fd = snap.os.open(tmp_path / "f", snap.os.O_WRONLY | snap.os.O_CREAT)
    try:
        snap.os.write(fd, bytes(1 << 16))
        assert snap._start_writeback(fd, 0, 1 << 16)
        assert snap._start_writeback(fd, 0, 1 << 31)  # 64-bit offsets and lengths get there
        assert not snap._start_writeback(fd, -(1 << 32), 4096)  # EINVAL, ignored
    finally:
        snap.os.close(fd)


def test_a_base_is_synced_before_and_after_its_rename_a_delta_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_file, real_dir = snap._fsync, snap._fsync_dir

    def record_file(fd: int) -> None:
        synced.append(Path(snap.os.readlink(f"/proc/self/fd/{fd}")).name)
        real_file(fd)

    def record_dir(path: Path) -> None:
        synced.append("tmp dir/" if path.name.startswith(snap.TEMP_PREFIX) else f"{path.name}/")
        real_dir(path)

    monkeypatch.setattr(snap, "_fsync", record_file)
    monkeypatch.setattr(snap, "_fsync_dir", record_dir)
    root = tmp_path / "root"
    w0 = model()
    _, base = write_base(root, "b", w0, workers=2)
    durable = [MANIFEST_FILE, "tmp dir/", "root/"]  # the data files before these
    assert synced == [WEIGHTS_FILE, *durable]
    synced.clear()
    w1 = nudge(w0, list(w0))
    _, d1 = write_delta(root, "d1", w1, base, workers=2)
    assert synced == []
    _, d2 = write_delta(root, "d2", nudge(w1, list(w1)), d1, workers=2, durable=True)
    assert synced == [DELTA_FILE, *durable]
    # the unsynced delta is complete for every reader on this machine
    after_d1 = apply_snapshot(root / "d1", base).snapshot
    assert after_d1.identity == d1.identity
    assert apply_snapshot(root / "d2", after_d1).snapshot.identity == d2.identity
    assert snap.list_snapshots(root) == ["b", "d1", "d2"]


@pytest.mark.parametrize("kind", ["base", "delta"])
def test_disk_full_mid_write_leaves_nothing_and_the_held_bytes_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    import errno

    w0 = model(layers=4)
    held = make_host_snapshot(from_torch(w0))
    real, calls = snap.os.pwrite, []

    def full_disk(fd: int, data: Any, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(snap.os, "pwrite", full_disk)
    with pytest.raises(OSError, match="No space left"):
        if kind == "base":
            write_base(tmp_path, "s", w0, workers=2)
        else:
            write_delta(tmp_path, "s", nudge(w0, list(w0)), held, in_place=True, workers=2)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []
    assert all(not raw.data.flags.writeable for raw in held.tensors.values())


@pytest.mark.parametrize("workers", [1, 3])
def test_parallel_each_reports_every_item_on_the_calling_thread(workers: int) -> None:
    import threading

    seen: list[tuple[int, int, str]] = []
    snap._parallel_each(lambda x: x * x, [3, 1, 2, 5], workers, cost=lambda x: x,
                        done=lambda i, r: seen.append((i, r, threading.current_thread().name)))
    assert sorted((i, r) for i, r, _ in seen) == [(0, 9), (1, 1), (2, 4), (3, 25)]
    assert {name for _, _, name in seen} == {threading.current_thread().name}
    assert snap._parallel_map(lambda x: -x, [3, 1, 2], workers) == [-3, -1, -2]


def test_parallel_each_stops_starting_work_after_an_error() -> None:
    import threading

    started: list[int] = []
    gate = threading.Event()

    def work(x: int) -> int:
        started.append(x)
        if x == 0:
            raise ValueError("bad item")
        gate.wait(5)  # the other worker holds its item until the error is seen
        return x

    def done(i: int, r: int) -> None:  # pragma: no cover - nothing succeeds before the error
        raise AssertionError("no item finishes before the failing one")

    timer = threading.Timer(0.2, gate.set)
    timer.start()
    with pytest.raises(ValueError, match="bad item"):
        snap._parallel_each(work, list(range(20)), 2, done=done)
    timer.cancel()
    assert len(started) < 20  # the items not started were dropped

    ran: list[int] = []

    def slow(x: int) -> int:
        ran.append(x)
        time.sleep(0.01)
        return x

    def failing_done(i: int, r: int) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        snap._parallel_each(slow, list(range(50)), 2, done=failing_done)
    assert len(ran) < 50  # the error in done dropped the items not started


def test_blob_writer_lays_blobs_out_in_name_order_as_soon_as_they_can_go(
    tmp_path: Path,
) -> None:
    names = ["a", "b", "c", "d"]
    blobs = {"a": b"AAAA", "b": None, "c": b"CC", "d": b"D"}
    with snap._StreamedFile(tmp_path / DELTA_FILE) as out:
        writer = snap._BlobWriter(out, names)

        def finish(name: str) -> None:
            blob = blobs[name]
            writer.done(names.index(name), snap._Encoded(None, None, blob))

        finish("c")
        finish("d")
        assert out.size == 0  # waiting for a and b, which come first
        finish("a")
        assert out.size == 4  # a went out; c and d still wait for b
        finish("b")
        assert out.size == 7
    assert (tmp_path / DELTA_FILE).read_bytes() == b"AAAACCD"
    assert {n: (r.offset, r.length) for n, r in writer.refs.items()} == {
        "a": (0, 4), "c": (4, 2), "d": (6, 1)}
    assert writer.refs["c"].checksum == snap.checksum(b"CC")


def test_delta_files_have_the_same_layout_whatever_order_the_threads_finish_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w0 = model(seed=5, layers=3)
    _, base = write_base(tmp_path, "b", w0)
    w1 = nudge(w0, list(w0), lr=0.05)
    write_delta(tmp_path, "in-order", w1, base, workers=1)
    real = snap._parallel_each

    def reversed_each(fn: Any, items: Any, workers: Any, *, cost: Any = None,
                      done: Any) -> None:
        results = [fn(item) for item in items]
        for i in reversed(range(len(items))):
            done(i, results[i])

    monkeypatch.setattr(snap, "_parallel_each", reversed_each)
    write_delta(tmp_path, "reversed", w1, base)
    monkeypatch.setattr(snap, "_parallel_each", real)
    write_delta(tmp_path, "threads", w1, base, workers=4)
    want = (tmp_path / "in-order" / DELTA_FILE).read_bytes()
    tensors = read_manifest(tmp_path / "in-order").tensors
    for other in ("reversed", "threads"):
        assert (tmp_path / other / DELTA_FILE).read_bytes() == want
        assert read_manifest(tmp_path / other).tensors == tensors
    assert_same_bytes(to_torch(apply_snapshot(tmp_path / "reversed", base).snapshot), w1)


@pytest.mark.parametrize("workers", [1, 4])
def test_base_written_tensor_by_tensor_is_the_same_safetensors_file(
    tmp_path: Path, workers: int
) -> None:
    weights = model(seed=6, layers=3)
    manifest, snapshot = write_base(tmp_path, "b", weights, dtype="float16", workers=workers)
    assert_same_bytes(load_file(tmp_path / "b" / WEIGHTS_FILE),
                      {k: v.to(torch.float16) for k, v in weights.items()})
    raw = snap.from_torch(weights, "float16")
    header, _ = snap._safetensors_layout([(n, raw[n].dtype, raw[n].shape) for n in sorted(raw)])
    body = b"".join(raw[n].data.tobytes() for n in sorted(raw))
    assert (tmp_path / "b" / WEIGHTS_FILE).read_bytes() == header + body
    assert snapshot.identity == make_host_snapshot(raw).identity == manifest.snapshot_identity


# ---------------------------------------------------------------------------------------------
# Host bytes ownership and torch helpers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_snapshots_convert_fp32_tensors_exactly_like_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: Any
) -> None:
    """Written straight from fp32 (converted chunk by chunk while encoding) = written from a
    converted copy: same bytes, same identities, same delta."""
    monkeypatch.setattr(snap, "CHUNK_BYTES", 64)  # many chunks per tensor
    name = snap.dtype_name(dtype)
    w0 = model(dtype=torch.float32)
    w0["model.norm.weight"] = torch.tensor([1e-40, -0.0, float("inf"), float("nan"), 65504.0,
                                            3.0e38, -1.00390625, 1 + 2**-9])  # edge values
    w1 = nudge(w0, sorted(w0)[:3], lr=1e-3)
    converted = [{k: v.to(dtype) for k, v in w.items()} for w in (w0, w1)]
    _, direct0 = write_base(tmp_path / "direct", "b0", w0, dtype=name)
    _, copied0 = write_base(tmp_path / "copied", "b0", converted[0])
    assert direct0.identity == copied0.identity
    assert_same_bytes(to_torch(direct0), converted[0])
    m_direct, direct1 = write_delta(tmp_path / "direct", "d1", w1, direct0, dtype=name)
    m_copied, copied1 = write_delta(tmp_path / "copied", "d1", converted[1], copied0)
    assert direct1.identity == copied1.identity
    assert m_direct.changed == m_copied.changed and m_direct.changed
    assert_same_bytes(to_torch(direct1), converted[1])
    assert ((tmp_path / "direct" / "d1" / DELTA_FILE).read_bytes()
            == (tmp_path / "copied" / "d1" / DELTA_FILE).read_bytes())


def test_snapshot_dtype_must_be_known(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="unsupported"):
        write_base(tmp_path, "b0", model(), dtype="float8")
    with pytest.raises(SnapshotError, match="unsupported"):
        snap.dtype_name(torch.complex64)


def test_host_snapshot_owns_its_bytes(tmp_path: Path) -> None:
    w0 = model()
    expected = {k: v.clone() for k, v in w0.items()}
    _, host0 = write_base(tmp_path, "b0", w0)
    for t in w0.values():
        t.add_(1.0)  # the trainer keeps updating its parameters in place
    assert_same_bytes(to_torch(host0), expected)
    raw = next(iter(host0.tensors.values()))
    with pytest.raises(ValueError):
        raw.data[0] = 1


def test_apply_does_not_mutate_current_and_shares_unchanged(chain: Chain) -> None:
    root, w0, host0, w1 = chain
    before = snapshot_bytes(host0)
    loaded = apply_snapshot(root / "d1", host0)
    assert snapshot_bytes(host0) == before
    assert_same_bytes(to_torch(host0), w0)
    assert_same_bytes(to_torch(loaded.snapshot), w1)
    assert loaded.snapshot.tensors["model.norm.weight"].data is host0.tensors[
        "model.norm.weight"
    ].data


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_in_place_delta_writes_the_same_snapshot_into_the_previous_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_kernel: bool, dtype: str
) -> None:
    """fp32 masters written as ``dtype`` over several chunks: a sparse tensor, one dense in
    its first half only (a chunk of byte planes, then sparse ones), one unchanged."""
    monkeypatch.setattr(snap, "CHUNK_BYTES", 4096)
    if not use_kernel:
        monkeypatch.setattr(snap, "_xorkernel", None)
    g = torch.Generator().manual_seed(5)
    w0 = {f"model.layers.{i}.w": torch.randn(5000, generator=g) * 0.02 for i in range(3)}
    w1 = {k: v.clone() for k, v in w0.items()}
    w1["model.layers.0.w"] += 1e-4 * torch.sign(torch.randn(5000, generator=g))
    w1["model.layers.1.w"][:2500] = torch.randn(2500, generator=g)
    _, held = write_base(tmp_path, "b0", w0, dtype=dtype)
    where = {n: raw.data.__array_interface__["data"][0] for n, raw in held.tensors.items()}
    copy_manifest, copy = write_delta(tmp_path, "copy", w1, held, dtype=dtype)
    assert snapshot_bytes(held) == snapshot_bytes(make_host_snapshot(from_torch(w0, dtype)))
    manifest, new = write_delta(tmp_path, "in-place", w1, held, dtype=dtype, in_place=True)
    assert manifest.changed == ["model.layers.0.w", "model.layers.1.w"]
    assert manifest.tensors == copy_manifest.tensors and new.identity == copy.identity
    assert (tmp_path / "in-place" / DELTA_FILE).read_bytes() == (
        tmp_path / "copy" / DELTA_FILE).read_bytes()
    assert {n: raw.data.__array_interface__["data"][0] for n, raw in new.tensors.items()} == where
    assert snapshot_bytes(new) == snapshot_bytes(copy)
    assert all(not raw.data.flags.writeable for raw in new.tensors.values())
    loaded = apply_snapshot(tmp_path / "in-place", apply_snapshot(tmp_path / "b0", None).snapshot)
    assert loaded.snapshot.identity == new.identity


def test_in_place_delta_on_bytes_numpy_cannot_write_copies_them(tmp_path: Path) -> None:
    w0 = model()
    frozen = {n: snap.RawTensor(r.dtype, r.shape, np.frombuffer(r.data.tobytes(), np.uint8))
              for n, r in from_torch(w0).items()}
    held = make_host_snapshot(frozen)
    before = snapshot_bytes(held)
    w1 = nudge(w0, ["lm_head.weight"])
    _, new = write_delta(tmp_path, "d1", w1, held, in_place=True)
    assert snapshot_bytes(held) == before
    assert_same_bytes(to_torch(new), w1)
    assert new.tensors["lm_head.weight"].data is not held.tensors["lm_head.weight"].data


def test_in_place_delta_of_tensors_sharing_one_array_writes_copies(tmp_path: Path) -> None:
    w = torch.randn(64, 8)
    shared = from_torch({"x": w}, "bfloat16")["x"]
    held = make_host_snapshot({"model.a.weight": shared, "model.b.weight": shared})
    manifest, new = write_delta(tmp_path, "d1", {"model.a.weight": w + 1, "model.b.weight": w + 1},
                                held, dtype="bfloat16", in_place=True, workers=1)
    assert manifest.changed == ["model.a.weight", "model.b.weight"]
    for name, raw in new.tensors.items():
        assert snap.checksum(raw.data) == new.checksums[name]
        assert raw.data.tobytes() == (w + 1).bfloat16().view(torch.uint8).numpy().tobytes()
    assert shared.data.tobytes() == w.bfloat16().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("use_kernel", [True, False])
def test_in_place_delta_of_tensors_viewing_the_previous_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_kernel: bool
) -> None:
    if not use_kernel:
        monkeypatch.setattr(snap, "_xorkernel", None)
    w0 = model()
    held = make_host_snapshot(from_torch(w0))
    lm_head = held.tensors["lm_head.weight"].data
    changed = nudge(w0, ["lm_head.weight"])["lm_head.weight"]
    tensors = {**to_torch(held), "lm_head.weight": changed}  # the others view held's bytes
    manifest, new = write_delta(tmp_path, "d1", tensors, held, in_place=True)
    assert manifest.changed == ["lm_head.weight"]
    assert new.tensors["lm_head.weight"].data is lm_head  # turned where it lies
    assert_same_bytes(to_torch(new), {**w0, "lm_head.weight": changed})


def test_in_place_delta_that_fails_leaves_every_array_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = snap._compressor(snap.DEFAULT_ZSTD_LEVEL)
    calls = []

    class FailingThirdFrame:
        def compress(self, data: Any) -> bytes:
            calls.append(1)
            if len(calls) == 3:
                raise OSError("injected: compressor failed")
            return real.compress(data)

    monkeypatch.setattr(snap, "_compressor", lambda level: FailingThirdFrame())
    w0 = model()
    held = make_host_snapshot(from_torch(w0))
    w1 = nudge(w0, list(w0))
    with pytest.raises(OSError, match="injected"):
        write_delta(tmp_path, "d1", w1, held, in_place=True, workers=1)
    assert len(calls) == 3
    assert all(not raw.data.flags.writeable for raw in held.tensors.values())
    assert list(tmp_path.iterdir()) == []  # not even a temporary directory


def test_shares_bytes_finds_any_overlap() -> None:
    buffer = np.zeros(100, np.uint8)

    def host(*spans: tuple[int, int]) -> HostSnapshot:
        return HostSnapshot("x", {f"t{i}": snap.RawTensor("uint8", (b - a,), buffer[a:b])
                                  for i, (a, b) in enumerate(spans)}, {})

    assert not snap.shares_bytes(host((0, 10), (20, 30)), host((10, 20), (30, 100)))
    assert snap.shares_bytes(host((0, 50), (60, 70)), host((55, 58), (40, 41)))  # nested
    assert snap.shares_bytes(host((0, 10)), host((0, 10)))
    assert snap.shares_bytes(host((0, 100)), host((99, 100)))
    assert not snap.shares_bytes(host((0, 10)), host((5, 5)))  # an empty tensor holds nothing
    other = np.zeros(10, np.uint8)
    assert not snap.shares_bytes(
        host((0, 100)), HostSnapshot("y", {"t": snap.RawTensor("uint8", (10,), other)}, {}))


def test_to_torch_of_an_empty_tensor() -> None:
    host = make_host_snapshot(from_torch({"model.empty": torch.empty(0, 3, dtype=torch.bfloat16)}))
    got = to_torch(host)["model.empty"]
    assert got.shape == (0, 3) and got.dtype == torch.bfloat16


def test_to_torch_is_zero_copy_and_selects_names() -> None:
    host = make_host_snapshot(from_torch(model()))
    name = "model.layers.1.mlp.gate_proj.weight"
    out = to_torch(host, [name])
    assert list(out) == [name]
    assert out[name].dtype == torch.bfloat16 and out[name].shape == (8, 8)
    assert out[name].data_ptr() == host.tensors[name].data.ctypes.data
    with pytest.raises(SnapshotError):
        to_torch(host, ["missing.weight"])


def test_from_torch_views_bf16_bytes() -> None:
    t = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    raw = from_torch({"t": t})["t"]
    assert raw.dtype == "bfloat16" and raw.shape == (2,)
    assert raw.data.tobytes() == t.view(torch.int16).numpy().tobytes()
    with pytest.raises(SnapshotError, match="dtype"):
        from_torch({"c": torch.zeros(2, dtype=torch.complex64)})


# ---------------------------------------------------------------------------------------------
# Encoding helpers


def adam_like_pair(n: int = 1 << 20, lr: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(0)
    master = torch.randn(n, generator=g) * 0.02
    before = master.bfloat16()
    after = (master + lr * torch.sign(torch.randn(n, generator=g))).bfloat16()
    return from_torch({"a": before})["a"].data, from_torch({"a": after})["a"].data


def test_naive_delta_round_trips_and_shuffle_compresses_better() -> None:
    prev, cur = adam_like_pair()
    naive = encode_naive_delta(prev, cur)
    restored = np.frombuffer(zstandard.ZstdDecompressor().decompress(naive), np.uint8) ^ prev
    assert np.array_equal(restored, cur)
    shuffled = encode_tensor_delta(prev, cur, 2)
    assert shuffled is not None
    assert len(shuffled) < 0.9 * len(naive)
    assert np.array_equal(snap.decode_tensor_delta(shuffled, prev, 2), cur)
    assert encode_tensor_delta(prev, prev.copy(), 2) is None


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_shuffle_groups_byte_planes(itemsize: int) -> None:
    data = np.arange(5 * itemsize, dtype=np.uint8)
    planes = snap.shuffle_bytes(data, itemsize)
    assert np.array_equal(planes[:5], data[::itemsize])  # first bytes of every element
    assert np.array_equal(snap.unshuffle_bytes(planes, itemsize), data)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 17])
def test_xor_handles_unaligned_lengths(n: int) -> None:
    rng = np.random.default_rng(n)
    a, b = rng.integers(0, 256, n, dtype=np.uint8), rng.integers(0, 256, n, dtype=np.uint8)
    assert np.array_equal(snap.xor_bytes(a, b), a ^ b)
    assert snap.any_nonzero(snap.xor_bytes(a, a)) is False
    if n:
        c = a.copy()
        c[-1] ^= 1
        assert snap.any_nonzero(snap.xor_bytes(a, c)) is True


# ---------------------------------------------------------------------------------------------
# Whole-layer reload groups


def test_changed_layer_groups_reload_whole_layers() -> None:
    names = list(model(layers=12))
    groups = changed_layer_groups(
        ["model.layers.1.self_attn.q_proj.weight", "model.norm.weight"], names
    )
    layer1 = [n for n in names if n.startswith("model.layers.1.")]
    assert len(layer1) == 4
    assert groups == [*layer1, "model.norm.weight"]
    assert not any(n.startswith(("model.layers.10.", "model.layers.11.")) for n in groups)
    assert changed_layer_groups(["lm_head.weight"], names) == ["lm_head.weight"]
    assert changed_layer_groups([], names) == []
    two = changed_layer_groups(
        ["model.layers.11.mlp.gate_proj.weight", "model.layers.0.input_layernorm.weight"], names
    )
    assert set(two) == {n for n in names if n.startswith(("model.layers.0.", "model.layers.11."))}


def test_changed_layer_groups_rejects_unknown_names() -> None:
    with pytest.raises(SnapshotError):
        changed_layer_groups(["model.layers.0.nope"], list(model()))
