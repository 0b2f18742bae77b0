"""Chaos: damaged delta snapshots (truncated, bit-flipped, from another point of the chain)
are rejected by a real vLLM deployment and replaced by a base of the same weights; the chain
then continues with deltas. See asyncrl/chaos/snapshot_faults.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncrl.chaos.snapshot_faults import corrupt_snapshot, run_snapshot_corruption

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]


@pytest.mark.anyio
async def test_damaged_deltas_fall_back_to_a_base(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = await run_snapshot_corruption(tmp_path, tiny_model_dir)
    assert result.faults_injected == 3, result.detail
    assert result.faults_survived == 3, result.detail
    assert result.ok


def test_corruptions_change_the_bytes(tmp_path: Path) -> None:
    snap, donor = tmp_path / "snap", tmp_path / "donor"
    snap.mkdir()
    donor.mkdir()
    original = bytes(range(256)) * 8
    for fault in ("truncate", "bitflip", "foreign"):
        (snap / "snapshot.json").write_text("{}")
        (snap / "delta.bin").write_bytes(original)
        (donor / "delta.bin").write_bytes(b"other chain")
        corrupt_snapshot(snap, fault, donor=donor)
        assert (snap / "delta.bin").read_bytes() != original, fault
    with pytest.raises(ValueError, match="unknown fault"):
        corrupt_snapshot(snap, "melt")
