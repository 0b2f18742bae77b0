"""DeploymentSupervisor against a fake manager / syncer: detection, single-flight recovery,
re-sync of the newest saved weights, sync retries, limits. (The real thing, SIGKILLing a vLLM
server mid-run, is tests/test_chaos_deployment.py.)"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from asyncrl.errors import ConfigError, DeploymentError
from asyncrl.sync.supervisor import DeploymentSupervisor, fresh_snapshot_name


@dataclass
class FakeDeployment:
    base_url: str = "http://127.0.0.1:1"
    owned: bool = True
    alive: bool = True
    healthy: bool = True
    version: str = "default"  # vLLM's weight version
    version_fails: bool = False

    def process_alive(self) -> bool:
        return self.alive


@dataclass
class FakeManager:
    restart_s: float = 0.01
    fail_restarts: int = 0  # the next N restarts raise DeploymentError
    restarts: int = 0
    checks: int = 0
    version_reads: int = 0

    async def is_alive(self, deployment: FakeDeployment) -> bool:
        self.checks += 1
        return deployment.alive and deployment.healthy

    async def reconnect_and_wait(self, deployment: FakeDeployment, timeout: float) -> None:  # noqa: ASYNC109
        await anyio.sleep(self.restart_s)
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise DeploymentError("simulated: server did not come up")
        self.restarts += 1
        deployment.alive = deployment.healthy = True
        deployment.version = "default"

    async def weight_version(self, deployment: FakeDeployment) -> str:
        self.version_reads += 1
        await anyio.lowlevel.checkpoint()
        if deployment.version_fails:
            raise DeploymentError("simulated: GET /weight_info timed out")
        return deployment.version


@dataclass
class FakeSyncer:
    """Saves are numbered; a hotload fails while the deployment is down."""

    deployment: FakeDeployment
    fail_before_save: bool = False
    saves_queued: int = 0
    served: list[str] = field(default_factory=list)
    resyncs: list[str] = field(default_factory=list)
    newest: str | None = None
    previous_snapshot_identity: str | None = None
    last_timing: object = None
    hold: anyio.Event | None = None  # a sync waits for it after the deployment took the weights

    async def save_and_hotload(
        self, name: str, checkpoint_type: str | None = None, *, after_submit=None
    ) -> str:
        if self.fail_before_save and not self.deployment.alive:
            await anyio.sleep(0.05)  # e.g. a status read timing out
            raise DeploymentError("status read failed: connection refused")
        self.saves_queued += 1
        if after_submit is not None:
            after_submit()
        self.newest = name
        await anyio.lowlevel.checkpoint()
        if not self.deployment.alive:
            raise DeploymentError("hotload failed: connection refused")
        self.deployment.version = f"id-{name}"  # the hotload sets it, then the probe runs
        if self.hold is not None:
            await self.hold.wait()
        self.previous_snapshot_identity = f"id-{name}"  # what the syncer records after
        self.served.append(name)
        return name

    async def resync(self, name: str) -> str:
        self.saves_queued += 1  # as the real one: a resync saves a base too
        self.resyncs.append(name)
        self.served.append(f"base-of:{self.newest}")
        self.deployment.version = self.previous_snapshot_identity = f"id-{name}"
        return name


def make(tmp_path: Path, **kwargs: object) -> tuple[DeploymentSupervisor, FakeManager, FakeSyncer]:
    deployment = FakeDeployment()
    mgr = FakeManager()
    syncer = FakeSyncer(deployment)
    recovered: list[int] = []
    sup = DeploymentSupervisor(
        mgr,
        deployment,
        syncer,
        snapshot_root=tmp_path,
        check_interval_s=0.01,
        on_recovered=lambda: recovered.append(1),
        **kwargs,  # type: ignore[arg-type]
    )
    sup.recovered_calls = recovered  # type: ignore[attr-defined]
    return sup, mgr, syncer


@pytest.mark.anyio
async def test_recovery_restarts_resyncs_and_bumps_epoch(tmp_path: Path) -> None:
    sup, mgr, syncer = make(tmp_path)
    sup.deployment.alive = False
    await sup.recover("test", 0)
    assert (sup.epoch, sup.restarts, mgr.restarts) == (1, 1, 1)
    assert syncer.resyncs == ["recovery-1"]
    assert sup.resynced_name == "recovery-1"
    assert sup.recovered_calls == [1]  # type: ignore[attr-defined]
    assert len(sup.recover_s) == 1 and sup.recover_s[0] > 0
    # a caller that saw epoch 0 after the recovery ran does not recover again
    await sup.recover("late", 0)
    assert (sup.epoch, mgr.restarts) == (1, 1)


@pytest.mark.anyio
async def test_recovery_of_a_live_but_identityless_deployment_only_resyncs(
    tmp_path: Path,
) -> None:
    # e.g. the manager restarted the engine itself after a failed hotload: it is up, but
    # serves model_dir; the base must still be re-hotloaded
    sup, mgr, syncer = make(tmp_path)
    await sup.recover("hotload failed", 0)
    assert mgr.restarts == 0
    assert syncer.resyncs == ["recovery-1"]


@pytest.mark.anyio
async def test_concurrent_reports_run_one_recovery_and_sampling_waits(tmp_path: Path) -> None:
    sup, mgr, syncer = make(tmp_path)
    mgr.restart_s = 0.2
    sup.deployment.alive = False
    answers: list[bool] = []

    async def actor() -> None:
        answers.append(await sup.on_sampling_error(0))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(actor)
        await anyio.sleep(0.05)
        # a recovery is running: sampling must wait for it
        with anyio.move_on_after(0.05) as scope:
            await sup.wait_serving()
        assert scope.cancelled_caught
    assert answers == [True] * 5
    assert (mgr.restarts, len(syncer.resyncs), sup.epoch) == (1, 1, 1)
    assert await sup.wait_serving() == 1


@pytest.mark.anyio
async def test_sampling_error_on_a_healthy_deployment_is_a_real_error(tmp_path: Path) -> None:
    sup, mgr, _ = make(tmp_path)
    assert await sup.on_sampling_error(0) is False
    assert (sup.epoch, mgr.restarts) == (0, 0)


@pytest.mark.anyio
async def test_sync_that_died_after_its_save_is_served_by_the_recovery_base(
    tmp_path: Path,
) -> None:
    sup, _, syncer = make(tmp_path)
    sup.deployment.alive = False
    submitted: list[int] = []
    name = await sup.save_and_hotload("step-3", after_submit=lambda: submitted.append(1))
    syncer.saves_queued -= len(syncer.resyncs)
    # saved once (the trainer may already run the next step: never saved again), then the
    # recovery's base of that very snapshot is what the deployment serves
    assert syncer.saves_queued == 1 and submitted == [1]
    assert syncer.served == ["base-of:step-3"]
    assert name == "recovery-1"


@pytest.mark.anyio
async def test_sync_that_died_before_its_save_is_retried(tmp_path: Path) -> None:
    sup, _, syncer = make(tmp_path)
    syncer.fail_before_save = True
    sup.deployment.alive = False
    submitted: list[int] = []
    name = await sup.save_and_hotload("step-3", after_submit=lambda: submitted.append(1))
    syncer.saves_queued -= len(syncer.resyncs)
    assert name == "step-3"
    assert syncer.saves_queued == 1 and submitted == [1]
    assert syncer.served == ["base-of:None", "step-3"]


@pytest.mark.anyio
async def test_sync_failing_before_its_save_while_another_recovery_runs_still_saves(
    tmp_path: Path,
) -> None:
    # regression: the recovery an actor started re-synced (a save) meanwhile; the sync took
    # that save for its own, returned without saving or releasing the trainer -> deadlock
    sup, _, syncer = make(tmp_path)
    syncer.fail_before_save = True
    sup.deployment.alive = False
    submitted: list[int] = []
    served: list[str] = []

    async def sync() -> None:
        served.append(
            await sup.save_and_hotload("step-5", after_submit=lambda: submitted.append(1))
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(sync)
        await anyio.sleep(0.01)
        tg.start_soon(sup.on_sampling_error, 0)  # an actor's failed request recovers first
    assert syncer.resyncs == ["recovery-1"] and sup.restarts == 1
    assert submitted == [1]
    assert served == ["step-5"]
    assert syncer.served == ["base-of:None", "step-5"]


@pytest.mark.anyio
async def test_too_many_restarts_stop_the_run(tmp_path: Path) -> None:
    sup, _, _ = make(tmp_path, max_restarts=2)
    for epoch in range(2):
        await sup.recover("crash", epoch)
    with pytest.raises(DeploymentError, match="after 2 recoveries"):
        await sup.recover("crash", 2)


@pytest.mark.anyio
async def test_recovery_retries_a_failed_restart_then_gives_up(tmp_path: Path) -> None:
    sup, mgr, _ = make(tmp_path, attempts=3)
    sup.deployment.alive = False
    mgr.fail_restarts = 1
    await sup.recover("crash", 0)
    assert mgr.restarts == 1
    sup.deployment.alive = False
    mgr.fail_restarts = 3
    with pytest.raises(DeploymentError, match="in 3 attempts"):
        await sup.recover("crash", 1)


@pytest.mark.anyio
async def test_watchdog_notices_a_dead_process_and_recovers(tmp_path: Path) -> None:
    sup, mgr, syncer = make(tmp_path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.watch)
        await anyio.sleep(0.05)
        assert sup.restarts == 0  # healthy: checked, nothing done
        assert mgr.checks >= 2
        sup.deployment.alive = False
        with anyio.fail_after(2):
            while sup.restarts < 1:  # noqa: ASYNC110 - polling what the fakes record
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert syncer.resyncs == ["recovery-1"]


@pytest.mark.anyio
async def test_watchdog_needs_consecutive_failed_checks_for_a_live_process(
    tmp_path: Path,
) -> None:
    sup, mgr, _ = make(tmp_path, failed_checks=3)
    sup.deployment.healthy = False  # process alive, /health failing (e.g. hung)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.watch)
        with anyio.fail_after(2):
            while sup.restarts < 1:  # noqa: ASYNC110 - polling what the fakes record
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()
    assert mgr.checks >= 3


async def _wait_for(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(2.0):
        while not condition():  # noqa: ASYNC110 - polling what the fakes record
            await anyio.sleep(0.005)


async def _more_checks(mgr: FakeManager, n: int) -> None:
    """Wait until the watch ran ``n`` more health checks."""
    checks = mgr.checks
    await _wait_for(lambda: mgr.checks >= checks + n)


async def _more_reads(mgr: FakeManager, n: int) -> None:
    """Wait until the watch read the weight version ``n`` more times."""
    reads = mgr.version_reads
    await _wait_for(lambda: mgr.version_reads >= reads + n)


@pytest.mark.anyio
async def test_watchdog_recovers_a_healthy_deployment_serving_other_weights(
    tmp_path: Path,
) -> None:
    # an attached server replaced between two health checks: it answers, with model_dir
    sup, mgr, syncer = make(tmp_path)
    await sup.save_and_hotload("step-1")
    assert sup.deployment.version == syncer.previous_snapshot_identity == "id-step-1"
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.watch)
        await _wait_for(lambda: mgr.version_reads >= 3)
        assert sup.restarts == 0  # the synced weights: nothing to do
        sup.deployment.version = "default"
        await _wait_for(lambda: sup.restarts >= 1)
        await _more_reads(mgr, 3)
        tg.cancel_scope.cancel()
    assert sup.restarts == 1 and sup.epoch == 1  # once: the resync put the weights back
    assert mgr.restarts == 0  # it answered: no reconnect, only the base
    assert syncer.resyncs == ["recovery-1"]
    assert sup.deployment.version == syncer.previous_snapshot_identity == "id-recovery-1"


@pytest.mark.anyio
async def test_watchdog_does_not_compare_during_a_sync(tmp_path: Path) -> None:
    sup, mgr, syncer = make(tmp_path)
    await sup.save_and_hotload("step-1")
    syncer.hold = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.watch)
        tg.start_soon(sup.save_and_hotload, "step-2")
        # the deployment already serves step-2, the syncer still records step-1
        await _wait_for(lambda: sup.deployment.version == "id-step-2")
        reads = mgr.version_reads
        await _more_checks(mgr, 5)
        assert sup.restarts == 0
        assert mgr.version_reads <= reads + 1  # not even read while the sync runs
        syncer.hold.set()
        await _wait_for(lambda: syncer.previous_snapshot_identity == "id-step-2")
        await _more_reads(mgr, 3)
        tg.cancel_scope.cancel()
    assert sup.restarts == 0 and syncer.resyncs == []


def _held_reads(
    mgr: FakeManager, stale: str | None = None
) -> tuple[anyio.Event, anyio.Event]:
    """Make the manager's next version read wait: (reading, answer) events; once ``answer``
    is set the read returns what the deployment serves then, or ``stale`` (what it served
    when the read was asked)."""
    reading, answer = anyio.Event(), anyio.Event()
    read = mgr.weight_version

    async def held(deployment: FakeDeployment) -> str:
        mgr.weight_version = read  # type: ignore[method-assign]
        reading.set()
        await answer.wait()
        version = await read(deployment)
        return version if stale is None else stale

    mgr.weight_version = held  # type: ignore[method-assign]
    return reading, answer


@pytest.mark.anyio
async def test_a_sync_starting_while_the_version_is_read_is_no_replacement(
    tmp_path: Path,
) -> None:
    sup, mgr, syncer = make(tmp_path)
    await sup.save_and_hotload("step-1")
    reading, answer = _held_reads(mgr)
    syncer.hold = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.watch)
        await reading.wait()
        tg.start_soon(sup.save_and_hotload, "step-2")
        await _wait_for(lambda: sup.deployment.version == "id-step-2")
        answer.set()  # step-2, while the syncer still records step-1
        await _more_checks(mgr, 5)
        assert sup.restarts == 0
        syncer.hold.set()
        await _wait_for(lambda: syncer.previous_snapshot_identity == "id-step-2")
        await _more_reads(mgr, 3)
        tg.cancel_scope.cancel()
    assert sup.restarts == 0 and syncer.resyncs == []


@pytest.mark.anyio
async def test_a_sync_done_while_the_version_is_read_is_no_replacement(tmp_path: Path) -> None:
    sup, mgr, syncer = make(tmp_path)
    await sup.save_and_hotload("step-1")
    reading, answer = _held_reads(mgr)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.watch)
        await reading.wait()
        await sup.save_and_hotload("step-2")  # starts and ends while the read waits
        answer.set()  # answers step-2, which the watch did not expect when it asked
        await _more_checks(mgr, 5)
        tg.cancel_scope.cancel()
    assert sup.restarts == 0 and syncer.resyncs == []


@pytest.mark.anyio
async def test_a_recovery_run_while_the_version_is_read_is_not_repeated(tmp_path: Path) -> None:
    sup, mgr, syncer = make(tmp_path)
    await sup.save_and_hotload("step-1")
    sup.deployment.version = "default"  # replaced
    reading, answer = _held_reads(mgr, stale="default")
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.watch)
        await reading.wait()
        await sup.recover("noticed by a sampler", sup.epoch)  # while the watch's read waits
        assert sup.deployment.version == "id-recovery-1"
        answer.set()  # "default": true when asked, stale now
        await _more_reads(mgr, 3)
        tg.cancel_scope.cancel()
    assert sup.restarts == 1 and syncer.resyncs == ["recovery-1"]


@pytest.mark.anyio
async def test_the_watch_compares_again_after_a_failed_sync(tmp_path: Path) -> None:
    sup, _, syncer = make(tmp_path)
    await sup.save_and_hotload("step-1")
    sup.deployment.alive = False  # the sync fails; its recovery restarts and resyncs
    await sup.save_and_hotload("step-2")
    assert sup.restarts == 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.watch)
        sup.deployment.version = "default"  # then replaced
        await _wait_for(lambda: sup.restarts >= 2)
        tg.cancel_scope.cancel()
    assert syncer.resyncs == ["recovery-1", "recovery-2"]


@pytest.mark.anyio
async def test_watchdog_compares_nothing_before_the_first_sync(tmp_path: Path) -> None:
    sup, mgr, _ = make(tmp_path)  # the server serves its model_dir ("default")
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.watch)
        await _wait_for(lambda: mgr.checks >= 5)
        tg.cancel_scope.cancel()
    assert sup.restarts == 0 and mgr.version_reads == 0


@pytest.mark.anyio
async def test_a_failed_version_read_is_left_to_the_health_check(tmp_path: Path) -> None:
    sup, mgr, syncer = make(tmp_path)
    await sup.save_and_hotload("step-1")
    sup.deployment.version, sup.deployment.version_fails = "default", True
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.watch)
        await _wait_for(lambda: mgr.version_reads >= 5)
        assert sup.restarts == 0  # healthy, version unknown: no recovery on a guess
        sup.deployment.version_fails = False
        await _wait_for(lambda: sup.restarts >= 1)
        tg.cancel_scope.cancel()
    assert syncer.resyncs == ["recovery-1"]


def test_fresh_snapshot_name_skips_existing(tmp_path: Path) -> None:
    assert fresh_snapshot_name(tmp_path, "step-1") == "step-1"
    (tmp_path / "step-1").mkdir()
    assert fresh_snapshot_name(tmp_path, "step-1") == "step-1-r1"
    (tmp_path / "step-1-r1-base").mkdir()
    assert fresh_snapshot_name(tmp_path, "step-1") == "step-1-r2"


def test_bad_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="check_interval_s"):
        DeploymentSupervisor(None, None, None, snapshot_root=tmp_path, check_interval_s=0)
