"""Admission gate: how many prompt groups may be in the pipeline for the published version.

A pure state machine (no tasks, no clocks), unit-tested without an event loop.

Invariant: a new prompt group is admitted only while

    (published_version + max_head_offpolicy_versions + 1) * groups_per_step
        - (accepted + in_flight) > 0

where ``accepted`` counts groups that finished sampling and will be (or were) trained, and
``in_flight`` counts groups still being sampled. Groups that are filtered out (zero reward
variance) or dropped as too stale give their slot back. ``max_head_offpolicy_versions=0`` is
strictly on-policy: only one step's worth of groups is ever sampled per published version.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncrl.errors import ConfigError


@dataclass
class AdmissionGate:
    groups_per_step: int
    max_head_offpolicy_versions: int
    published_version: int = 0
    accepted: int = 0
    in_flight: int = 0
    stale_dropped: int = 0
    filtered: int = 0

    def __post_init__(self) -> None:
        if self.groups_per_step < 1:
            raise ConfigError(f"groups_per_step must be >= 1, got {self.groups_per_step}")
        if self.max_head_offpolicy_versions < 0:
            raise ConfigError(
                f"max_head_offpolicy_versions must be >= 0, got {self.max_head_offpolicy_versions}"
            )

    @property
    def capacity(self) -> int:
        """How many more groups may be admitted now (may be <= 0)."""
        limit = (
            self.published_version + self.max_head_offpolicy_versions + 1
        ) * self.groups_per_step
        return limit - (self.accepted + self.in_flight)

    def can_admit(self) -> bool:
        return self.capacity > 0

    def admit(self) -> None:
        if not self.can_admit():
            raise RuntimeError("admission gate is closed")
        self.in_flight += 1

    def on_sampled(self) -> None:
        """A group finished sampling and was accepted for training."""
        self._leave_flight()
        self.accepted += 1

    def on_failed(self) -> None:
        """A group failed (e.g. dropped by a failure policy): its slot is freed."""
        self._leave_flight()

    def on_filtered(self) -> None:
        """An accepted group was filtered out (zero variance): its slot is freed."""
        self._leave_accepted()
        self.filtered += 1

    def on_stale(self) -> None:
        """An accepted group turned out staler than the bound: its slot is freed."""
        self._leave_accepted()
        self.stale_dropped += 1

    def on_published(self, version: int) -> None:
        if version < self.published_version:
            raise ValueError(f"version went backwards: {version} < {self.published_version}")
        self.published_version = version

    def is_too_stale(self, sample_version: int, trainer_version: int) -> bool:
        """True if a sample from ``sample_version`` may not train step ``trainer_version``+1."""
        return trainer_version - sample_version > self.max_head_offpolicy_versions

    def _leave_flight(self) -> None:
        if self.in_flight <= 0:
            raise RuntimeError("no group in flight")
        self.in_flight -= 1

    def _leave_accepted(self) -> None:
        if self.accepted <= 0:
            raise RuntimeError("no accepted group to release")
        self.accepted -= 1
