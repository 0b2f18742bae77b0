"""DeploymentSupervisor: keep one deployment serving the trainer's weights through crashes.

    supervisor = DeploymentSupervisor(mgr, deployment, syncer)
    tg.start_soon(supervisor.watch)                  # health checks in the background
    epoch = await supervisor.wait_serving()          # before sampling
    ... sample ...
    if supervisor.epoch != epoch: sample again       # the deployment restarted meanwhile
    await supervisor.save_and_hotload(name)          # WeightSyncer's, surviving a crash

A recovery (``recover``) is: stop serving (``wait_serving`` blocks, ``epoch`` + 1) -> restart
an owned server, or wait for an attached one to answer again (``reconnect_and_wait``) -> the
delta chain is reset and the newest saved snapshot hotloaded as a base
(``WeightSyncer.resync``) -> ``on_recovered`` (e.g. close the sampler's circuit breakers) ->
serving again. Recoveries are single-flight: whoever notices a dead deployment first (the
watchdog, an actor whose requests failed, the weight sync) runs it; the others wait for it.

The watchdog also notices a deployment that answers but no longer serves the trainer's weights:
an attached server replaced or restarted by whoever runs it faster than two health checks, or
hotloaded by someone else. After each passing health check it compares vLLM's weight version
(``GET /weight_info``, set to the snapshot identity by every hotload) with the identity the
deployment last confirmed to the syncer, and recovers on a difference. It does not compare while
a sync runs through ``save_and_hotload`` (the version changes before the syncer records it), nor
before the first sync (the server serves its model directory then). Samples that began before
the replacement and end after the check are sampled again (the epoch changed); between the
replacement and the next check (``check_interval_s``) a rollout may still be sampled from other
weights: vLLM's completions do not say which weights answered them.

Invariants:
- Nothing is sampled while a recovery runs, and a sample that straddled a crash is
  recognisable (``epoch`` changed), so the caller retries it rather than train on an answer
  from weights nobody can name.
- ``save_and_hotload`` returns only once the deployment serves the snapshot that call saved:
  a crash after the save is repaired by the recovery's base of that same snapshot (the
  trainer may already run the next step, so it is never saved again); a crash before the
  save retries the whole sync.
- More than ``max_restarts`` recoveries, or a recovery that fails ``attempts`` times in a
  row, raise DeploymentError: a deployment that keeps dying stops the run, loudly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio

from asyncrl.errors import ConfigError, DeploymentError
from asyncrl.logging import get_logger

__all__ = ["DeploymentSupervisor", "fresh_snapshot_name"]

log = get_logger("asyncrl.supervisor")


def fresh_snapshot_name(root: Any, name: str) -> str:
    """``name``, or ``name-rK`` when a snapshot of that name (or its ``-base``) exists."""
    from pathlib import Path

    candidate, k = name, 1
    while (Path(root) / candidate).exists() or (Path(root) / f"{candidate}-base").exists():
        candidate, k = f"{name}-r{k}", k + 1
    return candidate


class DeploymentSupervisor:
    """Watches a deployment, recovers it when it dies, and re-syncs the weights it lost."""

    def __init__(
        self,
        mgr: Any,
        deployment: Any,
        syncer: Any,
        *,
        snapshot_root: Any,
        check_interval_s: float = 2.0,
        failed_checks: int = 2,
        max_restarts: int = 10,
        attempts: int = 3,
        reconnect_timeout_s: float = 600.0,
        on_recovered: Callable[[], None] | None = None,
    ) -> None:
        if check_interval_s <= 0 or failed_checks < 1 or max_restarts < 0 or attempts < 1:
            raise ConfigError(
                "check_interval_s > 0, failed_checks >= 1, max_restarts >= 0, attempts >= 1 "
                "required"
            )
        self.mgr = mgr
        self.deployment = deployment
        self.syncer = syncer
        self.snapshot_root = snapshot_root
        self.check_interval_s = check_interval_s
        self.failed_checks = failed_checks
        self.max_restarts = max_restarts
        self.attempts = attempts
        self.reconnect_timeout_s = reconnect_timeout_s
        self.on_recovered = on_recovered
        self.epoch = 0
        self.restarts = 0
        self.recover_s: list[float] = []  # seconds each recovery took (detection excluded)
        self.recovered_at: list[float] = []  # time.monotonic() when each one served again
        self._serving = anyio.Event()
        self._serving.set()
        self._lock = anyio.Lock()
        self._syncs = 0  # save_and_hotload calls running
        self._changes = 0  # syncs and recoveries started: the served weights may have changed
        self.resynced_name: str | None = None

    # -- what actors use -----------------------------------------------------------------------

    async def wait_serving(self) -> int:
        """Wait until no recovery runs; the epoch to compare with after sampling."""
        while not self._serving.is_set():
            await self._serving.wait()
        return self.epoch

    async def on_sampling_error(self, epoch: int) -> bool:
        """A request failed after its retries: True when the deployment was (or now is being)
        recovered since ``epoch`` (sample again), False when it is healthy (a real error)."""
        if self.epoch != epoch:
            await self.wait_serving()
            return True
        if await self.mgr.is_alive(self.deployment):
            return False
        await self.recover("sampling failed and the deployment is not healthy", epoch)
        return True

    # -- weight sync ---------------------------------------------------------------------------

    @property
    def last_timing(self) -> Any:
        return self.syncer.last_timing

    async def save_and_hotload(
        self,
        name: str,
        checkpoint_type: str | None = None,
        *,
        after_submit: Callable[[], None] | None = None,
    ) -> str:
        """``WeightSyncer.save_and_hotload``, recovering the deployment when it dies."""
        submitted = False

        def on_submit() -> None:
            nonlocal submitted
            submitted = True
            if after_submit is not None:
                after_submit()

        while True:
            epoch = await self.wait_serving()
            self._syncs += 1
            self._changes += 1
            try:
                return str(await self.syncer.save_and_hotload(name, checkpoint_type,
                                                              after_submit=on_submit))
            except DeploymentError as exc:
                failure = f"weight sync {name} failed: {exc}"
            finally:
                self._syncs -= 1
            await self.recover(failure, epoch)
            if submitted:
                # saved, then the hotload failed: the recovery's base holds that snapshot's
                # weights (saving again could capture the trainer's next step)
                return self.resynced_name or name

    # -- recovery ------------------------------------------------------------------------------

    async def watch(self) -> None:
        """Health-check every ``check_interval_s``; recover after
        ``failed_checks`` failures in a row (at once when an owned process exited), or when a
        healthy deployment serves other weights than the ones last synced to it."""
        failures = 0
        while True:
            await anyio.sleep(self.check_interval_s)
            if self._lock.locked():
                failures = 0
                continue
            epoch = self.epoch
            if await self.mgr.is_alive(self.deployment):
                failures = 0
                replaced = await self._weights_replaced()
                if replaced is not None:
                    log.warning("deployment.weights_replaced", reason=replaced)
                    await self.recover(replaced, epoch)
                continue
            failures += 1
            dead = self.deployment.owned and not self.deployment.process_alive()
            log.warning("deployment.health_check_failed", failures=failures, process_exited=dead)
            if dead or failures >= self.failed_checks:
                failures = 0
                await self.recover("health check failed", epoch)

    async def _weights_replaced(self) -> str | None:
        """Why the deployment does not serve the synced weights, or None when it does (or
        when that cannot be told now: before the first sync, during a sync or a recovery, or
        when the version read fails; a dead server is the health check's to find)."""
        expected = self.syncer.previous_snapshot_identity
        if expected is None or self._syncs or self._lock.locked():
            return None
        changes = self._changes
        try:
            version = await self.mgr.weight_version(self.deployment)
        except DeploymentError:
            return None
        if self._changes != changes:
            return None  # a sync or a recovery started (or ran) while the version was read
        if version == expected:
            return None
        return (f"the deployment serves weight version {version!r}, not the synced snapshot "
                f"{expected} (restarted or hotloaded by someone else)")

    async def recover(self, reason: str, epoch: int) -> None:
        """Bring the deployment back serving the newest saved weights. No-op when a recovery
        already ran since ``epoch`` (it is waited for instead)."""
        async with self._lock:
            if self.epoch != epoch:
                return
            if self.restarts >= self.max_restarts:
                raise DeploymentError(
                    f"deployment {self.deployment.base_url} failed again ({reason}) after "
                    f"{self.restarts} recoveries (max_restarts={self.max_restarts}); giving up"
                )
            self.epoch += 1
            self._changes += 1
            self._serving = anyio.Event()
            t0 = time.perf_counter()
            log.warning("deployment.recovering", reason=reason, restarts=self.restarts)
            await self._recover_with_retries(reason)
            self.restarts += 1
            self.recover_s.append(time.perf_counter() - t0)
            self.recovered_at.append(time.monotonic())
            if self.on_recovered is not None:
                self.on_recovered()
            log.warning(
                "deployment.recovered",
                restarts=self.restarts,
                recover_s=round(self.recover_s[-1], 2),
                identity=self.syncer.previous_snapshot_identity,
            )
            self._serving.set()

    async def _recover_with_retries(self, reason: str) -> None:
        last: Exception | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                if not await self.mgr.is_alive(self.deployment):
                    await self.mgr.reconnect_and_wait(
                        self.deployment, timeout=self.reconnect_timeout_s
                    )
                name = fresh_snapshot_name(self.snapshot_root, f"recovery-{self.restarts + 1}")
                self.resynced_name = await self.syncer.resync(name)
                return
            except DeploymentError as exc:
                last = exc
                log.warning("deployment.recovery_attempt_failed", attempt=attempt, error=str(exc))
        raise DeploymentError(
            f"could not recover deployment {self.deployment.base_url} ({reason}) in "
            f"{self.attempts} attempts: {last}"
        ) from last
