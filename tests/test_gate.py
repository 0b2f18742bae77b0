from __future__ import annotations

import pytest

from asyncrl.errors import ConfigError
from asyncrl.recipes.gate import AdmissionGate


def fill(gate: AdmissionGate) -> int:
    n = 0
    while gate.can_admit():
        gate.admit()
        n += 1
    return n


def test_on_policy_admits_exactly_one_step_per_version() -> None:
    gate = AdmissionGate(groups_per_step=4, max_head_offpolicy_versions=0)
    assert fill(gate) == 4
    for _ in range(4):
        gate.on_sampled()
    assert not gate.can_admit()  # all 4 accepted, version 0 not yet trained
    gate.on_published(1)
    assert fill(gate) == 4


def test_offpolicy_bound_allows_k_extra_steps() -> None:
    gate = AdmissionGate(groups_per_step=2, max_head_offpolicy_versions=2)
    assert fill(gate) == 6  # (0 + 2 + 1) * 2
    gate.on_published(1)
    assert fill(gate) == 2


def test_filtered_and_stale_groups_free_their_slot() -> None:
    gate = AdmissionGate(groups_per_step=2, max_head_offpolicy_versions=0)
    fill(gate)
    gate.on_sampled()
    gate.on_sampled()
    gate.on_filtered()
    assert gate.capacity == 1 and gate.filtered == 1
    gate.admit()
    gate.on_sampled()
    gate.on_stale()
    assert gate.capacity == 1 and gate.stale_dropped == 1


def test_failed_group_frees_flight_slot() -> None:
    gate = AdmissionGate(groups_per_step=1, max_head_offpolicy_versions=0)
    gate.admit()
    gate.on_failed()
    assert gate.can_admit() and gate.in_flight == 0


def test_staleness_bound() -> None:
    gate = AdmissionGate(groups_per_step=1, max_head_offpolicy_versions=1)
    assert not gate.is_too_stale(sample_version=3, trainer_version=4)
    assert gate.is_too_stale(sample_version=2, trainer_version=4)
    on_policy = AdmissionGate(groups_per_step=1, max_head_offpolicy_versions=0)
    assert on_policy.is_too_stale(sample_version=3, trainer_version=4)
    assert not on_policy.is_too_stale(sample_version=4, trainer_version=4)


def test_misuse_is_an_error() -> None:
    gate = AdmissionGate(groups_per_step=1, max_head_offpolicy_versions=0)
    with pytest.raises(RuntimeError, match="no group in flight"):
        gate.on_sampled()
    fill(gate)
    with pytest.raises(RuntimeError, match="closed"):
        gate.admit()
    with pytest.raises(ValueError, match="backwards"):
        gate.on_published(2)
        gate.on_published(1)
    with pytest.raises(ConfigError, match="groups_per_step"):
        AdmissionGate(groups_per_step=0, max_head_offpolicy_versions=0)
    with pytest.raises(ConfigError, match="max_head_offpolicy_versions"):
        AdmissionGate(groups_per_step=1, max_head_offpolicy_versions=-1)
