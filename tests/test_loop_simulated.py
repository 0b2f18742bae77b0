"""The real RL loop (``_loop``: actors, trainer, syncer) driven by simulated parts.

The gate, the ledger and ``Trainer.collect`` / ``Trainer.accept`` are the real ones; rollouts
sleep a per-(row, attempt) latency and return real TrajectoryGroups stamped with the version
published when they started; the trainer's ``train()`` sleeps and bumps the step; the syncer,
checkpoints and metrics writer are in-memory fakes with the real call shapes.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asyncrl.config import RLConfig, WeightSyncConfig
from asyncrl.recipes.async_rl_loop import RunSummary, Trainer, _Batch, _loop, _Shared
from asyncrl.recipes.data import RowLedger
from asyncrl.recipes.gate import AdmissionGate
from asyncrl.rollout.rewards import SampleFailure
from asyncrl.rollout.types import Row, Trajectory, TrajectoryGroup, Turn
from asyncrl.sync.syncer import SyncTiming

Latency = Callable[[int, int], float]  # (row index, attempt) -> seconds
Rewards = Callable[[int, int], tuple[float, ...] | None]  # None: the group fails


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ------------------------------------------------------------------------------ fakes
@dataclass
class FakeClient:
    sampler_root: Path
    step: int = 0


class FakeRollouts:
    """``group(row)`` sleeps ``latency(row, attempt)``; records what ran and what was cut."""

    def __init__(self, shared: _Shared, latency: Latency, rewards: Rewards) -> None:
        self.shared, self.latency, self.rewards = shared, latency, rewards
        self.attempts: Counter[int] = Counter()
        self.active = self.max_active = self.started = self.cancelled = 0
        self.started_at: Counter[int] = Counter()  # groups started per published version

    async def group(self, row: Row, key: object = None) -> TrajectoryGroup | SampleFailure:
        index = int(row.row_id)
        attempt = self.attempts[index]
        self.attempts[index] += 1
        version = self.shared.version
        self.started += 1
        self.started_at[version] += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await anyio.sleep(self.latency(index, attempt))
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
        rewards = self.rewards(index, attempt)
        if rewards is None:
            return SampleFailure(row.row_id, "reward_fn", "simulated failure", 1)
        turns = [Turn((1, 2), (3, 4, 5), (-0.1, -0.2, -0.3), version, r, "stop") for r in rewards]
        return TrajectoryGroup(
            row.row_id,
            tuple(Trajectory((t,), t.reward, row_id=row.row_id) for t in turns),
        )


@dataclass(frozen=True)
class TrainedStep:
    step: int  # the client's step when train() began: this batch trains step + 1
    keys: tuple[tuple[int, int], ...]  # (epoch, row index) of each group
    versions: tuple[int, ...]  # oldest policy version of each group
    reported_offsets: tuple[int, ...]  # what the loop put in the batch


class FakeTrainer(Trainer):
    """The real Trainer accounting; ``train()`` only sleeps, records and bumps the step."""

    def __init__(self, cfg: RLConfig, client: FakeClient, shared: _Shared, step_s: float):
        super().__init__(cfg, client, None, shared)
        self.step_s = step_s
        self.steps: list[TrainedStep] = []

    async def train(self, batch: _Batch) -> dict[str, float]:
        self.steps.append(
            TrainedStep(
                self.client.step,
                tuple(batch.indices),
                tuple(g.oldest_version for g in batch.groups),
                tuple(batch.offsets),
            )
        )
        await anyio.sleep(self.step_s)
        self.client.step += 1
        for key in batch.indices:  # as the real train(): a row is done once trained
            self.shared.ledger.finish(key)
        tokens = sum(t.num_generated for g in batch.groups for t in g.trajectories)
        return {"train/trained_tokens": float(tokens)}


class FakeSyncer:
    def __init__(self, sync_s: float) -> None:
        self.sync_s = sync_s
        self.names: list[str] = []
        self.last_timing: SyncTiming | None = None

    async def save_and_hotload(
        self, name: str, checkpoint_type: str | None = None, *, after_submit: Any = None
    ) -> str:
        t0 = time.perf_counter()
        if after_submit is not None:
            after_submit()
        await anyio.sleep(self.sync_s)
        self.names.append(name)
        total = time.perf_counter() - t0
        self.last_timing = SyncTiming("delta", name, 0.0, 0.0, 0.0, 0.0, total, 1)
        return name


class FakeCheckpoints:
    def __init__(self) -> None:
        self.saved: list[dict[str, Any]] = []

    async def save(self, name: str, **kwargs: Any) -> None:
        self.saved.append({"name": name, **kwargs})


class FakeMetrics:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, Any]]] = []

    async def write(self, step: int, metrics: dict[str, Any]) -> None:
        self.rows.append((step, dict(metrics)))


@dataclass
class Outcome:
    cfg: RLConfig
    shared: _Shared
    client: FakeClient
    trainer: FakeTrainer
    rollouts: FakeRollouts
    syncer: FakeSyncer
    ckpt: FakeCheckpoints
    metrics: FakeMetrics
    summary: RunSummary
    on_step: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def gate(self) -> AdmissionGate:
        return self.shared.gate


async def run_sim(
    tmp: Path,
    *,
    n_rows: int,
    groups_per_step: int,
    offpolicy: int,
    max_steps: int,
    latency: Latency,
    rewards: Rewards,
    workers: int = 8,
    train_s: float = 0.002,
    sync_s: float = 0.001,
    dcp_save_interval: int = 0,
    timeout_s: float = 5.0,
) -> Outcome:
    cfg = RLConfig(
        log_path=tmp,
        base_model=tmp / "unused-model",
        dataset=[{"prompt": "unused"}],
        reward_fn=_unused_reward,
        completions_per_prompt=4,
        prompt_groups_per_step=groups_per_step,
        max_head_offpolicy_versions=offpolicy,
        max_steps=max_steps,
        rollout_workers=workers,
        weight_sync=WeightSyncConfig(dcp_save_interval=dcp_save_interval),
    )
    rows = [Row(row_id=str(i), prompt=f"question {i}") for i in range(n_rows)]
    shared = _Shared(AdmissionGate(groups_per_step, offpolicy), RowLedger(n_rows))
    client = FakeClient(tmp / "sampler")
    out = Outcome(
        cfg=cfg,
        shared=shared,
        client=client,
        trainer=FakeTrainer(cfg, client, shared, train_s),
        rollouts=FakeRollouts(shared, latency, rewards),
        syncer=FakeSyncer(sync_s),
        ckpt=FakeCheckpoints(),
        metrics=FakeMetrics(),
        summary=RunSummary(tmp, 0, None, None, None),
    )
    t0 = time.perf_counter()
    with anyio.fail_after(timeout_s):
        await _loop(
            cfg,
            shared,
            rows,
            out.rollouts,  # type: ignore[arg-type]
            out.trainer,
            out.syncer,
            out.ckpt,  # type: ignore[arg-type]
            out.metrics,
            out.summary,
            out.on_step.append,
        )
    out.wall_s = time.perf_counter() - t0
    return out


def _unused_reward(completion: Any, row: Row) -> float:
    raise AssertionError("the fake rollouts never call reward_fn")


# ------------------------------------------------------------------------------ workloads
def long_tail(seed: int, *, slow_rows: tuple[int, ...] = (1,), slow_s: float = 0.25) -> Latency:
    """Lognormal (median 4 ms, sigma 1); ``slow_rows`` take ``slow_s`` on their first try."""

    def latency(row: int, attempt: int) -> float:
        if row in slow_rows and attempt == 0:
            return slow_s
        rng = random.Random(f"{seed}:{row}:{attempt}")
        return min(0.004 * math.exp(rng.gauss(0.0, 1.0)), 0.08)

    return latency


def varied(row: int, attempt: int) -> tuple[float, ...]:
    """Rewards that always carry signal (never filtered)."""
    return (1.0, 0.0, float((row + attempt) % 2), 0.5)


def trained_groups(out: Outcome) -> list[tuple[int, int]]:
    """(step trained at - 1, oldest sample version) for every trained group."""
    return [(s.step, v) for s in out.trainer.steps for v in s.versions]


# ------------------------------------------------------------------------------ tests
@pytest.mark.anyio
@pytest.mark.parametrize("offpolicy", [1, 2])
async def test_async_version_offsets_are_bounded(tmp_path: Path, offpolicy: int) -> None:
    out = await run_sim(
        tmp_path,
        n_rows=200,
        groups_per_step=4,
        offpolicy=offpolicy,
        max_steps=15,
        latency=long_tail(seed=offpolicy, slow_s=0.08),
        rewards=varied,
        workers=12,
        train_s=0.01,
    )
    groups = trained_groups(out)
    assert len(groups) == 15 * 4
    offsets = [step - version for step, version in groups]
    assert all(0 <= o <= offpolicy for o in offsets), Counter(offsets)
    # the loop's own per-group offsets (the async/version_offset_* metrics) agree
    assert [o for s in out.trainer.steps for o in s.reported_offsets] == offsets
    # the run really was off-policy, and the slow first group was dropped, not trained
    assert max(offsets) >= 1
    assert out.gate.stale_dropped >= 1
    # a dropped group's row is sampled again (rewards here never filter and nothing fails, so
    # a second attempt only follows a stale drop); which row is stale depends on scheduling
    resampled = [row for row, n in out.rollouts.attempts.items() if n >= 2]
    assert resampled, out.rollouts.attempts
    assert sum(m["async/stale_dropped"] for _, m in out.metrics.rows) == out.gate.stale_dropped


@pytest.mark.anyio
async def test_sync_mode_is_strictly_on_policy(tmp_path: Path) -> None:
    out = await run_sim(
        tmp_path,
        n_rows=200,
        groups_per_step=4,
        offpolicy=0,
        max_steps=10,
        latency=long_tail(seed=7, slow_s=0.05),
        rewards=varied,
        workers=12,
    )
    groups = trained_groups(out)
    assert len(groups) == 10 * 4
    assert [step - version for step, version in groups] == [0] * len(groups)
    assert out.gate.stale_dropped == 0
    # one step's groups per published version, though 12 workers were free
    assert out.rollouts.max_active <= 4
    assert max(out.rollouts.started_at.values()) == 4


def trained_per_epoch(trainer: FakeTrainer) -> dict[int, Counter[int]]:
    by_epoch: dict[int, Counter[int]] = {}
    for s in trainer.steps:
        for epoch, index in s.keys:
            by_epoch.setdefault(epoch, Counter())[index] += 1
    return by_epoch


@pytest.mark.anyio
async def test_rows_trained_once_per_epoch_despite_filtered_failed_and_stale(
    tmp_path: Path,
) -> None:
    n_rows = 22
    flat = {0, 5, 10, 15, 20}  # all-equal rewards: filtered
    failing = {11}  # SampleFailure: dropped by the failure policy
    slow = {3, 7}  # slow on every even attempt: too stale when they come back
    trainable = set(range(n_rows)) - flat - failing

    def latency(row: int, attempt: int) -> float:
        return 0.05 if row in slow and attempt % 2 == 0 else 0.002

    def rewards(row: int, attempt: int) -> tuple[float, ...] | None:
        if row in failing:
            return None
        return (1.0,) * 4 if row in flat else varied(row, attempt)

    out = await run_sim(
        tmp_path,
        n_rows=n_rows,
        groups_per_step=4,
        offpolicy=1,
        max_steps=14,
        latency=latency,
        rewards=rewards,
        train_s=0.01,
    )
    by_epoch = trained_per_epoch(out.trainer)
    ledger = out.shared.ledger
    closed = [e for e in by_epoch if e < ledger.epoch and e not in ledger.done]
    assert len(closed) >= 2, (sorted(by_epoch), sorted(ledger.done))
    for epoch, counts in by_epoch.items():
        if epoch in closed:  # every trainable row exactly once, nothing else
            assert counts == Counter(trainable), f"epoch {epoch}: {counts}"
        else:  # still open: nothing twice, nothing untrainable
            assert max(counts.values()) == 1, f"epoch {epoch}: {counts}"
            assert set(counts) <= trainable, f"epoch {epoch}: {counts}"
    # the scenario exercised every route, and the per-step metrics add up to the gate's counts
    assert out.gate.filtered >= len(closed) * len(flat)
    assert out.gate.stale_dropped >= 2
    sums: Counter[str] = Counter()
    for _, m in out.metrics.rows:
        sums.update({k: m[k] for k in ("rollout/groups_filtered", "rollout/groups_failed")})
    assert sums["rollout/groups_filtered"] == out.gate.filtered
    assert sums["rollout/groups_failed"] >= len(closed) * len(failing)


@pytest.mark.anyio
async def test_metrics_once_per_step_and_clean_stop_at_max_steps(tmp_path: Path) -> None:
    tasks_before = asyncio.all_tasks()
    out = await run_sim(
        tmp_path,
        n_rows=100,
        groups_per_step=4,
        offpolicy=1,
        max_steps=6,
        # row 2's first try would take 30 s: the stop must cancel it, not wait for it
        latency=long_tail(seed=3, slow_rows=(2,), slow_s=30.0),
        rewards=lambda r, a: (1.0,) * 4 if r % 7 == 0 else varied(r, a),
        dcp_save_interval=2,
    )
    steps = list(range(1, 7))
    assert [s for s, _ in out.metrics.rows] == steps
    assert [m["step"] for m in out.summary.metrics] == steps
    assert [m["step"] for m in out.on_step] == steps
    for _, m in out.metrics.rows:
        assert {"perf/weight_sync_time", "perf/step_time", "async/stale_dropped"} <= m.keys()
    assert sum(m["rollout/groups_filtered"] for _, m in out.metrics.rows) == out.gate.filtered
    # stopped exactly at max_steps, with the final checkpoint recording the trained rows
    assert out.client.step == 6
    assert [s.step for s in out.trainer.steps] == [0, 1, 2, 3, 4, 5]
    assert out.summary.steps == 6
    assert out.summary.final_checkpoint == "step-6"
    assert [(c["name"], c["promotable"]) for c in out.ckpt.saved] == [
        ("step-2", False),
        ("step-4", False),
        ("step-6", True),
    ]
    final = out.ckpt.saved[-1]["data_consumed"]
    assert final["data_consumed"] == 6 * 4 + out.gate.filtered
    # nothing runs after the loop returns: the 30 s group was cancelled, no task is left
    assert out.wall_s < 5.0
    assert out.rollouts.active == 0
    assert out.rollouts.cancelled >= 1
    assert asyncio.all_tasks() == tasks_before
    started, trained = out.rollouts.started, len(out.trainer.steps)
    await anyio.sleep(0.05)
    assert (out.rollouts.started, len(out.trainer.steps)) == (started, trained)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("n_rows", "flat"),
    [(10, frozenset()), (8, frozenset({0}))],
    ids=["rows-not-a-multiple-of-step", "one-row-filtered"],
)
async def test_epoch_end_with_a_partial_step_does_not_stall(
    tmp_path: Path, n_rows: int, flat: frozenset
) -> None:
    # the rows left at the end of an epoch cannot fill a step on their own: the next epoch's
    # rows must complete it (regression: this deadlocked when the ledger closed epochs)
    out = await run_sim(
        tmp_path,
        n_rows=n_rows,
        groups_per_step=4,
        offpolicy=1,
        max_steps=5,
        latency=lambda r, a: 0.001,
        rewards=lambda r, a: (1.0,) * 4 if r in flat else varied(r, a),
        timeout_s=2.0,
    )
    assert out.client.step == 5
    by_epoch = trained_per_epoch(out.trainer)
    assert len(by_epoch) >= 2
    for epoch, counts in by_epoch.items():
        assert max(counts.values()) == 1, f"epoch {epoch}: {counts}"
        assert not set(counts) & flat


# ------------------------------------------------------------------ deployment crashes
class CrashableDeployment:
    """A fake owned deployment: ``kill()`` makes in-flight and new requests fail."""

    base_url = "http://127.0.0.1:1"
    owned = True

    def __init__(self) -> None:
        self.alive = True
        self.generation = 0  # bumped by every restart
        self.version = "default"  # vLLM's weight version: the identity hotloaded last

    def kill(self) -> None:
        self.alive = False

    def process_alive(self) -> bool:
        return self.alive


class RestartingManager:
    async def is_alive(self, deployment: CrashableDeployment) -> bool:
        return deployment.alive

    async def reconnect_and_wait(self, deployment: CrashableDeployment, timeout: float) -> None:  # noqa: ASYNC109
        await anyio.sleep(0.02)
        deployment.alive = True
        deployment.generation += 1
        deployment.version = "default"

    async def weight_version(self, deployment: CrashableDeployment) -> str:
        await anyio.lowlevel.checkpoint()
        return deployment.version


class CrashingRollouts(FakeRollouts):
    """A request fails while the deployment is down. A group that spans a restart but ends on
    the restarted server (a retry inside the sampler got through) is returned with marker
    tokens: the loop must not train it."""

    STRADDLED = (9, 9)

    def __init__(self, shared: _Shared, deployment: CrashableDeployment) -> None:
        # every 5th row is slow: some groups are in flight across a whole restart
        super().__init__(shared, lambda r, a: 0.05 if r % 5 == 0 else 0.003, varied)
        self.deployment = deployment
        self.straddled_returned = 0

    async def group(self, row: Row, key: object = None) -> TrajectoryGroup | SampleFailure:
        from asyncrl.errors import SamplingError

        if not self.deployment.alive:
            raise SamplingError("connection refused")
        generation = self.deployment.generation
        out = await super().group(row)
        if not self.deployment.alive:
            raise SamplingError("connection reset")
        if self.deployment.generation != generation and isinstance(out, TrajectoryGroup):
            self.straddled_returned += 1
            turns = [Turn(self.STRADDLED, t.turns[0].action_tokens, t.turns[0].action_logprobs,
                          t.turns[0].policy_version, t.reward, "stop") for t in out.trajectories]
            return TrajectoryGroup(out.row_id, tuple(Trajectory((t,), t.reward) for t in turns))
        return out


class RecordingTrainer(FakeTrainer):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.straddled_trained = 0

    async def train(self, batch: _Batch) -> dict[str, float]:
        self.straddled_trained += sum(
            g.trajectories[0].turns[0].observation_tokens == CrashingRollouts.STRADDLED
            for g in batch.groups
        )
        return await super().train(batch)


class SyncerDyingWithTheDeployment(FakeSyncer):
    def __init__(self, deployment: CrashableDeployment) -> None:
        super().__init__(0.002)
        self.deployment = deployment
        self.resyncs: list[str] = []
        self.previous_snapshot_identity = None

    async def save_and_hotload(
        self, name: str, checkpoint_type: str | None = None, *, after_submit: Any = None
    ) -> str:
        from asyncrl.errors import DeploymentError

        out = await super().save_and_hotload(name, checkpoint_type, after_submit=after_submit)
        if not self.deployment.alive:
            self.previous_snapshot_identity = None  # as the real one after a failed hotload
            raise DeploymentError("hotload: connection refused")
        # as the real hotload: vLLM's version first, the syncer's record after the probe
        self.deployment.version = f"id-{name}"
        await anyio.sleep(0.005)
        self.previous_snapshot_identity = f"id-{name}"
        return out

    async def resync(self, name: str) -> str:
        self.names.append(name)  # a base of the newest snapshot
        self.resyncs.append(name)
        self.deployment.version = self.previous_snapshot_identity = f"id-{name}"
        return name


@pytest.mark.anyio
async def test_deployment_killed_twice_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    from asyncrl.chaos.report import audit_rows
    from asyncrl.recipes.async_rl_loop import TracedLedger
    from asyncrl.recipes.checkpoints import DATALOADER
    from asyncrl.sync.supervisor import DeploymentSupervisor

    n_rows, steps = 30, 12
    cfg = RLConfig(
        log_path=tmp_path,
        base_model=tmp_path / "unused-model",
        dataset=[{"prompt": "unused"}],
        reward_fn=_unused_reward,
        completions_per_prompt=4,
        prompt_groups_per_step=4,
        max_head_offpolicy_versions=1,
        max_steps=steps,
        rollout_workers=6,
        weight_sync=WeightSyncConfig(dcp_save_interval=0),
    )
    rows = [Row(row_id=str(i), prompt=f"question {i}") for i in range(n_rows)]
    shared = _Shared(AdmissionGate(4, 1), TracedLedger(n_rows))
    client = FakeClient(tmp_path / "sampler")
    deployment = CrashableDeployment()
    rollouts = CrashingRollouts(shared, deployment)
    trainer = RecordingTrainer(cfg, client, shared, 0.01)
    syncer = SyncerDyingWithTheDeployment(deployment)
    supervisor = DeploymentSupervisor(
        RestartingManager(), deployment, syncer, snapshot_root=tmp_path, check_interval_s=0.01
    )
    metrics = FakeMetrics()
    summary = RunSummary(tmp_path, 0, None, None, None)

    def on_step(m: dict[str, Any]) -> None:
        if m["step"] in (3, 7):  # kill it while the actors sample the next steps
            deployment.kill()

    with anyio.fail_after(10):
        await _loop(cfg, shared, rows, rollouts, trainer, syncer, FakeCheckpoints(),  # type: ignore[arg-type]
                    metrics, summary, on_step, supervisor=supervisor)
    assert client.step == steps
    assert supervisor.restarts == 2 and len(syncer.resyncs) == 2
    assert [m["deployment/restarts"] for _, m in metrics.rows][-1] == 2.0
    assert sum(m["deployment/recover_time"] for _, m in metrics.rows) > 0
    # in-flight groups failed and were sampled again; none sampled across a restart trained
    assert trainer.straddled_trained == 0
    assert any(n >= 2 for n in rollouts.attempts.values())
    assert sum(m["rollout/groups_failed"] for _, m in metrics.rows) == 0
    for epoch, counts in trained_per_epoch(trainer).items():
        assert max(counts.values()) == 1, f"epoch {epoch}: {counts}"
    # the rows trace agrees with the final row state (as a checkpoint would record it)
    (tmp_path / DATALOADER).write_text(
        json.dumps({"final": {"step": steps, **shared.ledger.state()}})
    )
    audit = audit_rows(tmp_path, n_rows)
    assert (audit.steps, audit.lost, audit.duplicated, audit.unaccounted) == (steps, 0, 0, 0)
    assert audit.finished == shared.ledger.consumed

