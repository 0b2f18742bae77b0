"""DeltaChain: the base/delta decision state machine (no event loop, no I/O)."""

from __future__ import annotations

import pytest

from asyncrl.errors import ConfigError, DeltaChainError
from asyncrl.sync.chain import DeltaChain


def confirmed_chain(identity: str = "A") -> DeltaChain:
    chain = DeltaChain()
    chain.on_saved(identity, chain.next_checkpoint_type(None))
    chain.on_hotload_confirmed(identity)
    return chain


def test_first_save_is_base_and_delta_is_refused() -> None:
    chain = DeltaChain()
    assert chain.next_checkpoint_type(None) == "base"
    assert chain.next_checkpoint_type("base") == "base"
    assert chain.previous_snapshot_identity is None
    with pytest.raises(DeltaChainError):
        chain.next_checkpoint_type("delta")


def test_saved_but_unconfirmed_base_is_not_a_delta_target() -> None:
    chain = DeltaChain()
    chain.on_saved("A", "base")
    assert chain.next_checkpoint_type(None) == "base"
    with pytest.raises(DeltaChainError):
        chain.next_checkpoint_type("delta")
    with pytest.raises(DeltaChainError):
        chain.on_saved("B", "delta")


def test_delta_follows_the_confirmed_identity() -> None:
    chain = confirmed_chain("A")
    assert chain.previous_snapshot_identity == "A"
    assert chain.next_checkpoint_type(None) == "delta"
    assert chain.next_checkpoint_type("delta") == "delta"
    assert chain.next_checkpoint_type("base") == "base"
    chain.on_saved("B", "delta")
    # B is saved but not loaded yet: deltas still go against A
    assert chain.previous_snapshot_identity == "A"
    chain.on_hotload_confirmed("B")
    assert chain.previous_snapshot_identity == "B"
    assert (chain.bases, chain.deltas, chain.forced_bases) == (1, 1, 0)


def test_confirming_an_identity_never_saved_raises() -> None:
    chain = confirmed_chain("A")
    with pytest.raises(DeltaChainError, match="never saved"):
        chain.on_hotload_confirmed("Z")
    assert chain.previous_snapshot_identity == "A"


def test_earlier_save_can_be_confirmed_after_a_later_one() -> None:
    chain = DeltaChain()
    chain.on_saved("A", "base")
    chain.on_saved("B", "base")
    chain.on_hotload_confirmed("A")
    assert chain.previous_snapshot_identity == "A"


def test_hotload_failure_forces_a_counted_base() -> None:
    chain = confirmed_chain("A")
    chain.on_saved("B", "delta")
    chain.on_hotload_failed()
    assert chain.previous_snapshot_identity is None
    assert chain.next_checkpoint_type(None) == "base"
    with pytest.raises(DeltaChainError):
        chain.next_checkpoint_type("delta")
    chain.on_saved("C", "base")
    assert chain.forced_bases == 1
    chain.on_hotload_confirmed("C")
    assert chain.next_checkpoint_type(None) == "delta"
    chain.on_saved("D", "base")  # an ordinary, requested base is not forced
    assert (chain.bases, chain.deltas, chain.forced_bases) == (3, 1, 1)


def test_foreign_served_identity_breaks_the_chain() -> None:
    chain = confirmed_chain("A")
    chain.observe_served_identity("A")
    assert chain.next_checkpoint_type(None) == "delta"
    assert chain.foreign_identities == 0
    chain.observe_served_identity("someone-else")
    assert chain.foreign_identities == 1
    assert chain.previous_snapshot_identity is None
    assert chain.next_checkpoint_type(None) == "base"
    chain.on_saved("B", "base")
    assert chain.forced_bases == 1


def test_served_identity_we_saved_counts_as_confirmation() -> None:
    chain = confirmed_chain("A")
    chain.on_saved("B", "delta")
    chain.observe_served_identity("B")
    assert chain.previous_snapshot_identity == "B"
    assert chain.foreign_identities == 0


def test_deployment_serving_nothing_after_confirmation_breaks_the_chain() -> None:
    chain = DeltaChain()
    chain.observe_served_identity(None)  # fresh deployment, nothing confirmed: nothing lost
    assert chain.foreign_identities == 0
    chain = confirmed_chain("A")
    chain.observe_served_identity(None)  # e.g. restarted from the original model
    assert chain.foreign_identities == 1
    assert chain.next_checkpoint_type(None) == "base"


def test_reset_forgets_the_chain_but_keeps_counters() -> None:
    chain = confirmed_chain("A")
    chain.on_hotload_failed()
    chain.reset()
    assert chain.next_checkpoint_type(None) == "base"
    with pytest.raises(DeltaChainError):
        chain.on_hotload_confirmed("A")  # saved before the reset: no longer known
    chain.on_saved("B", "base")
    assert (chain.bases, chain.forced_bases) == (2, 0)


def test_bad_kinds_are_config_errors() -> None:
    chain = DeltaChain()
    with pytest.raises(ConfigError):
        chain.next_checkpoint_type("full")
    with pytest.raises(ValueError):
        chain.on_saved("A", "incremental")
    assert chain.bases == 0
