"""WeightSyncer: save the trainer's weights and hotload them into a running deployment.

    save_and_hotload(name) -> snapshot_name
        the first save after the syncer starts is a base (``first_checkpoint_type``); later
        saves are deltas against the identity the deployment CONFIRMED loading.

Invariants (the decisions live in the pure ``DeltaChain``):
- At each sync the served identity is read back (after the save, before the hotload); an
  identity this syncer did not put there resets the chain: the snapshot just saved goes out
  as a base of the same weights (logged, counted).
- A delta the deployment rejects (identity mismatch, checksum failure) or that fails to load
  is followed, in the same call, by a base: ``save_and_hotload`` returns only once the
  deployment serves the trainer's current weights, or raises.
- All waiting is async; the trainer's work runs on its own worker thread, so the event loop
  is never blocked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from asyncrl.errors import (
    ChecksumError,
    ClosedResourceError,
    ConfigError,
    DeltaChainError,
    HotloadError,
    IdentityMismatchError,
)
from asyncrl.logging import get_logger
from asyncrl.sync.chain import DeltaChain

__all__ = ["SyncTiming", "WeightSyncer"]

log = get_logger("asyncrl.sync")

_DELTA_REJECTIONS = (IdentityMismatchError, ChecksumError, DeltaChainError, HotloadError)


@dataclass(frozen=True)
class SyncTiming:
    """Seconds and bytes of one ``save_and_hotload``."""

    kind: str
    snapshot_identity: str
    save_s: float
    encode_s: float
    hotload_s: float  # pause .. resume on the deployment
    warmup_s: float
    total_s: float
    nbytes: int


class WeightSyncer:
    """Keeps a deployment serving the policy client's current weights."""

    def __init__(
        self,
        policy_client: Any,
        deploy_mgr: Any,
        deployment: Any,
        *,
        first_checkpoint_type: str = "base",
        warmup_after_hotload: bool = True,
        reset_prompt_cache: bool = True,
        inflight: str = "keep",
        hotload_timeout_s: float = 300.0,
    ) -> None:
        if first_checkpoint_type not in ("base", "delta"):
            raise ConfigError(
                f"first_checkpoint_type must be base or delta, got {first_checkpoint_type!r}"
            )
        if inflight not in ("keep", "abort", "wait"):
            raise ConfigError(f"inflight must be keep, abort or wait, got {inflight!r}")
        self.client = policy_client
        self.mgr = deploy_mgr
        self.deployment = deployment
        self.first_checkpoint_type = first_checkpoint_type
        self.warmup_after_hotload = warmup_after_hotload
        self.reset_prompt_cache = reset_prompt_cache
        self.inflight = inflight
        self.hotload_timeout_s = hotload_timeout_s
        self.chain = DeltaChain()
        self.last_timing: SyncTiming | None = None
        self.delta_fallbacks = 0
        self.syncs = 0
        self._last_saved: str | None = None
        self._newest_saved: str | None = None
        self._lock = anyio.Lock()
        self._closed = False

    @property
    def previous_snapshot_identity(self) -> str | None:
        return self.chain.previous_snapshot_identity

    def reset_delta_chain(self) -> None:
        """Forget the chain: the next sync is a base (e.g. after a deployment restart)."""
        self.chain.reset()

    async def save_and_hotload(
        self,
        name: str,
        checkpoint_type: str | None = None,
        *,
        after_submit: Callable[[], None] | None = None,
    ) -> str:
        """Save the current weights as ``name`` and make the deployment serve them.

        ``after_submit`` is called as soon as the save is queued on the trainer's worker: the
        trainer may then queue its next step, which runs after the save (calls run in order)."""
        if self._closed:
            raise ClosedResourceError("WeightSyncer is closed")
        async with self._lock:
            return await self._save_and_hotload(name, checkpoint_type, after_submit)

    async def resync(self, name: str) -> str:
        """Make a deployment that lost its weights (restarted, or replaced by whoever runs it)
        serve the newest saved snapshot again: the chain is reset and that snapshot's weights
        are hotloaded as a base ``name``. Before any save it is the live weights' base."""
        if self._closed:
            raise ClosedResourceError("WeightSyncer is closed")
        async with self._lock:
            self.reset_delta_chain()
            log.warning("resync_base", name=name, source=self._newest_saved)
            return await self._sync(name, "base", source=self._newest_saved)

    async def _save_and_hotload(
        self, name: str, checkpoint_type: str | None, after_submit: Callable[[], None] | None
    ) -> str:
        requested = checkpoint_type
        if requested is None and self.syncs == 0:
            requested = self.first_checkpoint_type
        kind = self.chain.next_checkpoint_type(requested)
        try:
            return await self._sync(name, kind, after_submit, check_served=True)
        except _DELTA_REJECTIONS as exc:
            if kind != "delta":
                raise
            self.delta_fallbacks += 1
            log.warning(
                "delta_hotload_failed_falling_back_to_base",
                name=name,
                error=f"{type(exc).__name__}: {exc}",
            )
            self.chain.on_hotload_failed()
            # the replacement base holds exactly the rejected delta's weights, whatever the
            # trainer queued since (its worker may already run the next step)
            return await self._sync(f"{name}-base", "base", source=self._last_saved)

    async def _sync(
        self,
        name: str,
        kind: str,
        after_submit: Callable[[], None] | None = None,
        *,
        source: str | None = None,
        check_served: bool = False,
    ) -> str:
        t0 = time.perf_counter()
        # None until this save succeeds: a fallback after a failed SAVE writes the live weights
        # (nothing newer has been queued yet), after a failed HOTLOAD the saved snapshot's
        self._last_saved = None
        future = self.client.save_weights_for_sampler_ext(
            name,
            kind,
            previous_snapshot_identity=self.chain.previous_snapshot_identity,
            source_identity=source,
            # the next delta is computed against this snapshot (or a base is sent): the one
            # it is computed on is not needed again, and its host bytes become this one's
            consume_previous=True,
        )
        if after_submit is not None:
            after_submit()
        saved = await future
        self._last_saved = self._newest_saved = saved.snapshot_identity
        self.chain.on_saved(saved.snapshot_identity, kind)
        if check_served:
            await self._check_served(saved)
        result = await self.hotload(
            saved.snapshot_identity, saved.path, saved.incremental_snapshot_metadata
        )
        total = time.perf_counter() - t0
        self.syncs += 1
        self.last_timing = SyncTiming(
            kind=kind,
            snapshot_identity=saved.snapshot_identity,
            save_s=saved.save_s,
            encode_s=saved.encode_s,
            hotload_s=result.timings.pause_s + result.timings.reload_s + result.timings.resume_s,
            warmup_s=result.timings.probe_s,
            total_s=total,
            nbytes=saved.nbytes,
        )
        log.info(
            "weights_synced",
            name=name,
            kind=kind,
            identity=saved.snapshot_identity,
            previous_snapshot_identity=saved.previous_snapshot_identity,
            bytes=saved.nbytes,
            total_s=round(total, 4),
        )
        return str(saved.snapshot_name)

    async def _check_served(self, saved: Any) -> None:
        """Read what the deployment serves now; a delta on anything else cannot apply.

        Read AFTER the save, not before it: the status call wakes vLLM's worker, which then
        busy-polls for a while (~1 s in vLLM 0.32) and would take a core from the encoder."""
        status = await self.mgr.get_status(self.deployment)
        self.chain.observe_served_identity(status.current_snapshot_identity)
        if saved.kind == "delta" and (
            self.chain.previous_snapshot_identity != saved.previous_snapshot_identity
        ):
            raise DeltaChainError(
                f"the deployment serves {status.current_snapshot_identity}, not "
                f"{saved.previous_snapshot_identity} that delta {saved.snapshot_name!r} is on"
            )

    async def hotload(
        self, snapshot_identity: str, snapshot_path: Any, incremental: dict[str, str] | None
    ) -> Any:
        """Hotload an already written snapshot; on failure the chain is broken (next: base)."""
        try:
            result = await self.mgr.hotload_and_wait(
                self.deployment,
                snapshot_identity,
                snapshot_path=snapshot_path,
                incremental_snapshot_metadata=incremental,
                inflight=self.inflight,
                reset_prompt_cache=self.reset_prompt_cache,
                warmup=self.warmup_after_hotload,
                timeout=self.hotload_timeout_s,
            )
        except BaseException:
            self.chain.on_hotload_failed()
            raise
        self.chain.on_hotload_confirmed(result.identity)
        return result

    async def aclose(self) -> None:
        self._closed = True

    async def __aenter__(self) -> WeightSyncer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
