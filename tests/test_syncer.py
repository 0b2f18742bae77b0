"""WeightSyncer against an in-process fake deployment that applies snapshots for real."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncrl.errors import IdentityMismatchError
from asyncrl.sync import snapshot
from asyncrl.sync.syncer import WeightSyncer
from asyncrl.trainer.client import TrainingClient
from asyncrl.trainer.losses import cross_entropy_loss_fn
from asyncrl.types import AdamParams, ModelInput, datum_from_model_input_weights


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class _Status:
    current_snapshot_identity: str | None


@dataclass
class _Timings:
    pause_s: float = 0.0
    reload_s: float = 0.0
    resume_s: float = 0.0
    probe_s: float = 0.0
    total_s: float = 0.0


@dataclass
class _Result:
    identity: str
    timings: _Timings


class FakeDeployManager:
    """Holds host-side bytes like the worker extension and applies snapshots with the real
    snapshot reader (so checksum / identity checks are the real ones)."""

    def __init__(self) -> None:
        self.current: snapshot.HostSnapshot | None = None
        self.loaded: list[tuple[str, str]] = []
        self.reject_next_delta = False

    async def get_status(self, deployment: Any) -> _Status:
        return _Status(None if self.current is None else self.current.identity)

    async def hotload_and_wait(self, deployment: Any, identity: str, *, snapshot_path: Path,
                               incremental_snapshot_metadata: dict | None, **kw: Any) -> _Result:
        if incremental_snapshot_metadata is not None and self.reject_next_delta:
            self.reject_next_delta = False
            raise IdentityMismatchError("injected: deployment serves something else")
        loaded = snapshot.apply_snapshot(snapshot_path, self.current)
        assert loaded.snapshot.identity == identity
        self.current = loaded.snapshot
        self.loaded.append((loaded.manifest.kind, identity))
        return _Result(identity, _Timings())


def train_step(client: TrainingClient, seed: int) -> None:
    tokens = [(seed * 7 + i) % 90 + 3 for i in range(12)]
    d = datum_from_model_input_weights(ModelInput.from_ints(tokens), [0.0] * 4 + [1.0] * 8)
    client.forward_backward_custom([d], cross_entropy_loss_fn).result()
    client.optim_step(AdamParams(learning_rate=1e-2)).result()


@pytest.fixture
def client(tiny_model_dir: Path, tmp_path: Path):
    c = TrainingClient.from_pretrained(tiny_model_dir, checkpoint_dir=tmp_path)
    yield c
    c.close()


@pytest.mark.anyio
async def test_base_then_deltas_reproduce_trainer_bytes(client: TrainingClient) -> None:
    mgr = FakeDeployManager()
    syncer = WeightSyncer(client, mgr, deployment=None)
    await syncer.save_and_hotload("s0")
    for step in range(1, 4):
        train_step(client, step)
        await syncer.save_and_hotload(f"s{step}")
    assert [k for k, _ in mgr.loaded] == ["base", "delta", "delta", "delta"]
    assert syncer.previous_snapshot_identity == mgr.current.identity
    # each delta was written over the bytes of the one before: one host copy of the model
    assert list(client._host_snapshots) == [mgr.current.identity]
    # what the "deployment" holds is exactly the trainer's weights in the serving dtype
    served = snapshot.to_torch(mgr.current)
    import torch

    for name, tensor in client.model.state_dict().items():
        if name in served:
            assert torch.equal(served[name], tensor.to(torch.bfloat16)), name
    timing = syncer.last_timing
    assert timing is not None and timing.kind == "delta" and timing.nbytes > 0
    base_bytes = sum(f.stat().st_size for f in (client.sampler_root / "s0").iterdir())
    assert timing.nbytes < base_bytes


@pytest.mark.anyio
async def test_rejected_delta_falls_back_to_base(client: TrainingClient) -> None:
    mgr = FakeDeployManager()
    syncer = WeightSyncer(client, mgr, deployment=None)
    await syncer.save_and_hotload("s0")
    train_step(client, 1)
    mgr.reject_next_delta = True
    name = await syncer.save_and_hotload("s1")
    assert name == "s1-base"
    assert syncer.delta_fallbacks == 1
    assert [k for k, _ in mgr.loaded] == ["base", "base"]
    train_step(client, 2)
    await syncer.save_and_hotload("s2")
    assert mgr.loaded[-1][0] == "delta"


@pytest.mark.anyio
async def test_foreign_identity_forces_base(client: TrainingClient, tiny_model_dir: Path) -> None:
    mgr = FakeDeployManager()
    syncer = WeightSyncer(client, mgr, deployment=None)
    await syncer.save_and_hotload("s0")
    mgr.current = snapshot.HostSnapshot("f" * 32, mgr.current.tensors, mgr.current.checksums)
    train_step(client, 1)
    await syncer.save_and_hotload("s1")
    assert [kind for kind, _ in mgr.loaded] == ["base", "base"]  # the delta was never sent
    assert syncer.chain.forced_bases == 1 and syncer.chain.foreign_identities == 1
    # the base holds the weights the delta was saved from (the trainer's current ones)
    assert mgr.loaded[-1][1] == syncer.previous_snapshot_identity == client._last_identity


def test_delta_without_base_is_a_clear_error(client: TrainingClient) -> None:
    from asyncrl.errors import DeltaChainError

    with pytest.raises(DeltaChainError, match="save a base first"):
        client.save_weights_for_sampler_ext("d0", "delta").result()
    with pytest.raises(ValueError, match="checkpoint_type"):
        client.save_weights_for_sampler_ext("x", "full")


@pytest.mark.anyio
async def test_fallback_base_holds_the_rejected_deltas_weights(client: TrainingClient) -> None:
    """The trainer may queue its next step right after the delta save was queued; the base
    that replaces a rejected delta must still hold the delta's weights, not the newer ones."""
    mgr = FakeDeployManager()
    syncer = WeightSyncer(client, mgr, deployment=None)
    await syncer.save_and_hotload("s0")
    train_step(client, 1)
    want = snapshot.from_torch(
        {k: v.to(torch.bfloat16) for k, v in client.model.state_dict().items()}
    )
    mgr.reject_next_delta = True
    await syncer.save_and_hotload("s1", after_submit=lambda: train_step_async(client, 2))
    served = mgr.current
    assert mgr.loaded[-1][0] == "base"
    for name, raw in served.tensors.items():
        assert bytes(raw.data) == bytes(want[name].data), name


def train_step_async(client: TrainingClient, seed: int) -> None:
    """Queue a training step without waiting (as the loop's trainer does)."""
    tokens = [(seed * 7 + i) % 90 + 3 for i in range(12)]
    d = datum_from_model_input_weights(ModelInput.from_ints(tokens), [0.0] * 4 + [1.0] * 8)
    client.forward_backward_custom([d], cross_entropy_loss_fn)
    client.optim_step(AdamParams(learning_rate=1e-2))


@pytest.mark.anyio
async def test_fallback_after_a_failed_delta_save_writes_the_live_weights(
    client: TrainingClient,
) -> None:
    mgr = FakeDeployManager()
    syncer = WeightSyncer(client, mgr, deployment=None)
    await syncer.save_and_hotload("s0")
    train_step(client, 1)
    # a side export makes the client forget the served snapshot's host bytes: the delta
    # save fails before anything is written, and the fallback must be a base of the live
    # weights (not of a snapshot from an earlier sync)
    client.save_weights_for_sampler_ext("side-export", "base").result()
    client.save_weights_for_sampler_ext("side-export-2", "base").result()
    name = await syncer.save_and_hotload("s1")
    assert name == "s1-base" and mgr.loaded[-1][0] == "base"
    want = snapshot.from_torch(
        {k: v.to(torch.bfloat16) for k, v in client.model.state_dict().items()}
    )
    assert all(bytes(r.data) == bytes(want[n].data) for n, r in mgr.current.tensors.items())


@pytest.mark.anyio
async def test_one_side_export_does_not_break_the_delta_chain(client: TrainingClient) -> None:
    """The loop writes a promotable base at its final step before that step's sync."""
    mgr = FakeDeployManager()
    syncer = WeightSyncer(client, mgr, deployment=None)
    await syncer.save_and_hotload("s0")
    train_step(client, 1)
    client.save_weights_for_sampler_ext("final-base", "base").result()
    assert await syncer.save_and_hotload("s1") == "s1"
    assert syncer.delta_fallbacks == 0 and mgr.loaded[-1][0] == "delta"


def test_a_save_drops_what_it_will_not_keep_before_writing(
    client: TrainingClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peak memory: while delta N+1 is written only N (what it is computed against) and the
    newest snapshot are held, so the buffers of N-1 are free for N+1's bytes."""
    held_during_write: list[set[str]] = []
    write = client._write_snapshot

    def recording(*args: Any) -> Any:
        held_during_write.append(set(client._host_snapshots))
        return write(*args)

    monkeypatch.setattr(client, "_write_snapshot", recording)
    ids = []
    for i in range(3):
        train_step(client, i + 1)
        kind = "base" if i == 0 else "delta"
        ids.append(client.save_weights_for_sampler_ext(f"s{i}", kind).result().snapshot_identity)
    assert held_during_write == [set(), {ids[0]}, {ids[1]}]
    assert set(client._host_snapshots) == {ids[1], ids[2]}
    # a side export keeps the chain's head: the next delta is still computed against it
    export = client.save_weights_for_sampler_ext("export", "base").result().snapshot_identity
    assert held_during_write[-1] == {ids[2]}
    result = client.save_weights_for_sampler_ext(
        "s3", "delta", previous_snapshot_identity=ids[2], consume_previous=True).result()
    assert held_during_write[-1] == {ids[2], export}
    assert result.previous_snapshot_identity == ids[2]
    # the delta turned the bytes it was computed on into its own
    assert set(client._host_snapshots) == {export, result.snapshot_identity}


def _addresses(host: snapshot.HostSnapshot) -> dict[str, int]:
    return {n: raw.data.__array_interface__["data"][0] for n, raw in host.tensors.items()}


def test_a_delta_turns_the_bytes_it_is_computed_on_into_its_own(client: TrainingClient) -> None:
    base = client.save_weights_for_sampler_ext("s0", "base").result().snapshot_identity
    held = client._host_snapshots[base]
    where = _addresses(held)
    train_step(client, 1)
    delta = client.save_weights_for_sampler_ext("s1", "delta", consume_previous=True).result()
    new = client._host_snapshots[delta.snapshot_identity]
    assert _addresses(new) == where  # no fresh memory: the base's arrays hold the new bytes
    assert base not in client._host_snapshots
    served = snapshot.to_torch(new)
    for name, tensor in client.model.state_dict().items():
        if name in served:
            assert torch.equal(served[name], tensor.to(torch.bfloat16)), name
    assert all(not raw.data.flags.writeable for raw in new.tensors.values())


def test_a_delta_is_not_written_over_bytes_another_held_snapshot_shares(
    client: TrainingClient,
) -> None:
    base = client.save_weights_for_sampler_ext("s0", "base").result().snapshot_identity
    held = client._host_snapshots[base]
    # another held snapshot viewing one of the base's arrays (as a delta written from another
    # snapshot's weights keeps the arrays of the tensors it does not change)
    name = "model.embed_tokens.weight"
    sharer = snapshot.make_host_snapshot({name: held.tensors[name]})
    before = sharer.tensors[name].data.tobytes()
    client._host_snapshots[sharer.identity] = sharer
    client._last_identity = sharer.identity  # kept through the save, like a side export
    train_step(client, 1)
    delta = client.save_weights_for_sampler_ext(
        "s1", "delta", previous_snapshot_identity=base, consume_previous=True).result()
    assert delta.kind == "delta" and "model.embed_tokens.weight" in read_changed(delta.path)
    assert sharer.tensors[name].data.tobytes() == before
    assert base in client._host_snapshots  # written as a copy: the base is still whole
    assert snapshot.checksum(held.tensors[name].data) == held.checksums[name]


def test_a_delta_keeps_what_it_is_computed_on_unless_told_to_consume_it(
    client: TrainingClient,
) -> None:
    base = client.save_weights_for_sampler_ext("s0", "base").result().snapshot_identity
    where = _addresses(client._host_snapshots[base])
    train_step(client, 1)
    first = client.save_weights_for_sampler_ext("a", "delta").result()
    second = client.save_weights_for_sampler_ext(
        "b", "delta", previous_snapshot_identity=base).result()  # again on the base
    assert first.snapshot_identity == second.snapshot_identity
    assert (first.path / snapshot.DELTA_FILE).read_bytes() == (
        second.path / snapshot.DELTA_FILE).read_bytes()
    assert _addresses(client._host_snapshots[first.snapshot_identity]) != where


def read_changed(path: Path) -> list[str]:
    return snapshot.read_manifest(path).changed


def test_a_delta_that_fails_to_write_drops_what_it_was_computed_on(
    client: TrainingClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from asyncrl.errors import DeltaChainError, SnapshotError

    client.save_weights_for_sampler_ext("s0", "base").result()
    train_step(client, 1)

    def full_disk(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(snapshot.os, "pwrite", full_disk)  # the delta file's first write
        with pytest.raises(SnapshotError, match="No space left"):
            client.save_weights_for_sampler_ext("s1", "delta", consume_previous=True).result()
    assert client._host_snapshots == {}  # its bytes were half turned: not kept
    with pytest.raises(DeltaChainError, match="save a base first"):
        client.save_weights_for_sampler_ext("s1", "delta").result()
    client.save_weights_for_sampler_ext("s1-base", "base").result()
    train_step(client, 2)
    assert client.save_weights_for_sampler_ext("s2", "delta").result().kind == "delta"


@pytest.mark.anyio
async def test_syncer_sends_a_base_after_a_delta_failed_to_write(
    client: TrainingClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from asyncrl.errors import SnapshotError

    mgr = FakeDeployManager()
    syncer = WeightSyncer(client, mgr, deployment=None)
    await syncer.save_and_hotload("s0")
    train_step(client, 1)

    def full_disk(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(snapshot.os, "pwrite", full_disk)  # the delta file's first write
        with pytest.raises(SnapshotError):
            await syncer.save_and_hotload("s1")
    train_step(client, 2)
    await syncer.save_and_hotload("s2")  # the delta cannot be computed: a base instead
    assert [kind for kind, _ in mgr.loaded] == ["base", "base"]
    assert mgr.current is not None and mgr.current.identity == client._last_identity
    train_step(client, 3)
    await syncer.save_and_hotload("s3")
    assert mgr.loaded[-1][0] == "delta"
