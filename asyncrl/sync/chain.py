"""Delta-chain bookkeeping: decides whether the next sampler snapshot is a base or a delta.

A pure state machine (no I/O, no tasks, no clocks), driven by the weight syncer:

    next_checkpoint_type(requested) -> "base" | "delta"
    on_saved(identity, kind)            a snapshot was written
    on_hotload_confirmed(identity)      the deployment reported it loaded ``identity``
    on_hotload_failed()                 a hotload failed: the served weights are unknown
    observe_served_identity(identity)   what the deployment says it serves right now
    reset()                             forget the chain (e.g. the deployment restarted)

Invariants:
- A delta is only ever computed against ``previous_snapshot_identity``, the identity the
  deployment CONFIRMED loading — never against a snapshot that was merely saved.
- ``previous_snapshot_identity`` is None (so the next snapshot is a base) after start, after
  ``reset()``, after a failed hotload, and after the deployment reports an identity this chain
  did not put there (vLLM updates are not transactional, so its state is then unknown).
- A base written while the chain was broken (a failed hotload or a foreign identity since the
  last base) counts in ``forced_bases``; a base after start or ``reset()`` alone does not.
- ``on_hotload_confirmed`` only accepts identities this chain saved since the last reset.
"""

from __future__ import annotations

from typing import Literal

from asyncrl.errors import ConfigError, DeltaChainError

CheckpointKind = Literal["base", "delta"]
_KINDS = ("base", "delta")


class DeltaChain:
    """Which snapshot kind to write next, given what the deployment confirmed."""

    def __init__(self) -> None:
        self.bases = 0
        self.deltas = 0
        self.forced_bases = 0
        self.foreign_identities = 0
        self._confirmed: str | None = None
        self._saved: set[str] = set()
        self._broken = False

    @property
    def previous_snapshot_identity(self) -> str | None:
        """The identity the next delta must be computed against (None: next is a base)."""
        return self._confirmed

    def next_checkpoint_type(self, requested: str | None = None) -> CheckpointKind:
        """``requested`` None picks the cheapest valid kind; "delta" with nothing confirmed
        raises ``DeltaChainError``; "base" is always allowed."""
        if requested is not None and requested not in _KINDS:
            raise ConfigError(f"checkpoint_type {requested!r}, expected 'base' or 'delta'")
        if requested == "base" or (requested is None and self._confirmed is None):
            return "base"
        if self._confirmed is None:
            raise DeltaChainError(
                "checkpoint_type='delta' but the deployment has confirmed no snapshot to "
                "compute it against; save a base first"
            )
        return "delta"

    def on_saved(self, identity: str, kind: str) -> None:
        """Record a written snapshot; it becomes a candidate for ``on_hotload_confirmed``."""
        if kind not in _KINDS:
            raise ConfigError(f"snapshot kind {kind!r}, expected 'base' or 'delta'")
        if kind == "delta" and self._confirmed is None:
            raise DeltaChainError(f"delta {identity} saved with no confirmed snapshot under it")
        if kind == "base":
            self.bases += 1
            self.forced_bases += int(self._broken)
            self._broken = False
        else:
            self.deltas += 1
        self._saved.add(identity)

    def on_hotload_confirmed(self, identity: str) -> None:
        """The deployment loaded ``identity``; later deltas are computed against it."""
        if identity not in self._saved:
            raise DeltaChainError(
                f"hotload of {identity} confirmed, but this chain never saved it "
                f"(confirmed so far: {self._confirmed})"
            )
        self._confirmed = identity

    def on_hotload_failed(self) -> None:
        """A hotload failed part-way: what is served is unknown, so the next is a base."""
        self._break()

    def observe_served_identity(self, identity: str | None) -> None:
        """Compare what the deployment serves with what was confirmed; a snapshot this chain
        saved counts as confirmed, anything else (or nothing) breaks the chain."""
        if identity is not None and identity == self._confirmed:
            return
        if identity is not None and identity in self._saved:
            self._confirmed = identity
            return
        if self._confirmed is not None or identity is not None:
            self.foreign_identities += 1
            self._break()

    def reset(self) -> None:
        """Forget the chain (next is a base, not counted as forced); counters are kept."""
        self._confirmed = None
        self._saved.clear()
        self._broken = False

    def _break(self) -> None:
        self._confirmed = None
        self._broken = True
