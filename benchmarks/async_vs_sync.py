"""Async vs sync on the REAL RL loop (``_loop``) with simulated rollouts, trainer and syncer.

What is real: ``async_rl_loop._loop`` (rollout actors admitting through the gate, trainer
task, syncer task in one task group), ``AdmissionGate``, ``RowLedger`` and
``Trainer.collect`` / ``Trainer.accept``
(staleness drops, zero-variance filtering, version offsets). What is simulated:

- rollouts: each group sleeps a latency drawn from a seeded lognormal (long tail) for its
  (row, attempt) and returns a real ``TrajectoryGroup`` whose turns carry the policy version
  published when the group started; a fixed share of groups have all-equal rewards (filtered);
- trainer: a ``Trainer`` whose ``train()`` sleeps a fixed step time and bumps the step;
- syncer: ``save_and_hotload`` calls ``after_submit``, sleeps save + hotload, sets
  ``last_timing``; checkpoints and metrics are kept in memory.

Workloads:

- long-tail: the same seeded workload with ``max_head_offpolicy_versions=2`` (async) and ``0``
  (sync: strictly on-policy, one step's groups per published version).
  Target: async wall time <= 0.5 x sync wall time.
- events: every latency 0 (instant components), async; orchestration events per second of
  wall time (the loop is one thread: one core). Target >= 20,000 /s. Events per CPU-second
  of the process are printed too: on a shared machine they show what one uncontended core
  does (``--pin`` pins the process to one CPU).

An *orchestration event* is one hop of a group through the orchestrator, or a publish:
a group admitted through the gate (by an actor), a group sampled (actor -> trainer: a
result the trainer routed, whether trained, filtered, stale-dropped or failed), a group
accepted into a training batch, a policy version published. They are counted from the loop's
own state after the run (``AdmissionGate`` counters and the run summary), not from the fakes:

    sampled   = gate.accepted + gate.filtered + gate.stale_dropped + sum(groups_failed)
    admitted  = sampled + gate.in_flight          (in flight when the loop stopped)
    accepted  = gate.accepted                     (== steps x prompt_groups_per_step)
    published = gate.published_version - start version

A trained group is 3 events, a filtered or stale one 2, plus 1 per step; ``us/group`` (wall
time per admitted group) is printed too, as a definition-free cost.

    .venv/bin/python benchmarks/async_vs_sync.py [--steps 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from asyncrl.config import RLConfig, WeightSyncConfig
from asyncrl.recipes.async_rl_loop import RunSummary, Trainer, _Batch, _loop, _Shared
from asyncrl.recipes.data import RowLedger
from asyncrl.recipes.gate import AdmissionGate
from asyncrl.rollout.types import Row, Trajectory, TrajectoryGroup, Turn
from asyncrl.sync.syncer import SyncTiming

WALL_RATIO_TARGET = 0.5
EVENTS_PER_S_TARGET = 20_000.0
ATTEMPTS = 8  # distinct (latency, rewards) draws per row; further attempts wrap around


# ------------------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Workload:
    """A seeded, deterministic workload: per (row, attempt) latency and rewards."""

    name: str
    rows: int
    groups_per_step: int
    group_size: int
    workers: int
    steps: int
    train_s: float
    save_s: float
    hotload_s: float
    latency_median_s: float
    latency_sigma: float
    filtered_share: float
    seed: int = 0

    def draw(self) -> tuple[np.ndarray, list[list[tuple[float, ...]]]]:
        rng = np.random.default_rng(self.seed)
        shape = (self.rows, ATTEMPTS)
        if self.latency_median_s > 0:
            latency = self.latency_median_s * rng.lognormal(0.0, self.latency_sigma, shape)
        else:
            latency = np.zeros(shape)
        flat = rng.random(shape) < self.filtered_share
        bits = rng.integers(0, 2, (*shape, self.group_size))
        rewards = []
        for r in range(self.rows):
            per_row = []
            for a in range(ATTEMPTS):
                b = bits[r, a].astype(float)
                if flat[r, a]:
                    b[:] = b[0]
                elif b.min() == b.max():
                    b[0] = 1.0 - b[0]  # varied: at least one success and one failure
                per_row.append(tuple(float(x) for x in b))
            rewards.append(per_row)
        return latency, rewards


def long_tail(steps: int, seed: int) -> Workload:
    return Workload(
        name="long-tail",
        rows=max(4096, steps * 8 * 4),
        groups_per_step=8,
        group_size=4,
        workers=24,
        steps=steps,
        train_s=0.05,
        save_s=0.005,
        hotload_s=0.010,
        latency_median_s=0.1,
        latency_sigma=1.0,
        filtered_share=0.1,
        seed=seed,
    )


def instant(steps: int, seed: int) -> Workload:
    # nothing filtered: every admitted group is trained (up to the run's last few in flight)
    return Workload(
        name="events",
        rows=1024,
        groups_per_step=8,
        group_size=4,
        workers=24,
        steps=steps,
        train_s=0.0,
        save_s=0.0,
        hotload_s=0.0,
        latency_median_s=0.0,
        latency_sigma=0.0,
        filtered_share=0.0,
        seed=seed,
    )


# ------------------------------------------------------------------------------ the fakes
@dataclass
class SimClient:
    """The part of a TrainingClient the loop touches."""

    sampler_root: Path
    step: int = 0


class SimRollouts:
    """``group(row)``: sleep the drawn latency, return a real TrajectoryGroup."""

    def __init__(self, shared: _Shared, latency: np.ndarray, rewards: list[list[tuple]]) -> None:
        self.shared = shared
        self.latency = latency.tolist()
        self.rewards = rewards
        self.attempts: dict[str, int] = {}

    async def group(self, row: Row) -> TrajectoryGroup:
        attempt = self.attempts.get(row.row_id, 0)
        self.attempts[row.row_id] = attempt + 1
        r, a = int(row.row_id), attempt % ATTEMPTS
        version = self.shared.version  # the version a real request would be sent against
        await anyio.sleep(self.latency[r][a])
        return TrajectoryGroup(
            row.row_id,
            tuple(
                Trajectory(
                    turns=(Turn((1, 2, 3), (4, 5), (-0.5, -0.5), version, reward, "stop"),),
                    reward=reward,
                    row_id=row.row_id,
                )
                for reward in self.rewards[r][a]
            ),
        )


class SimTrainer(Trainer):
    """The real Trainer (collect / accept accounting) with a simulated ``train()``."""

    def __init__(self, cfg: RLConfig, client: SimClient, shared: _Shared, step_s: float) -> None:
        super().__init__(cfg, client, None, shared)
        self.step_s = step_s
        self.offsets: list[int] = []

    async def train(self, batch: _Batch) -> dict[str, float]:
        await anyio.sleep(self.step_s)
        self.offsets.extend(batch.offsets)
        self.client.step += 1
        for key in batch.indices:  # as the real train(): a row is done once trained
            self.shared.ledger.finish(key)
        return {"train/trained_tokens": float(len(batch.groups) * self.cfg.completions_per_prompt)}


class SimSyncer:
    def __init__(self, save_s: float, hotload_s: float) -> None:
        self.save_s, self.hotload_s = save_s, hotload_s
        self.last_timing: SyncTiming | None = None

    async def save_and_hotload(
        self, name: str, checkpoint_type: str | None = None, *, after_submit: Any = None
    ) -> str:
        t0 = time.perf_counter()
        if after_submit is not None:
            after_submit()
        await anyio.sleep(self.save_s + self.hotload_s)
        total = time.perf_counter() - t0
        self.last_timing = SyncTiming(
            "delta", name, self.save_s, 0.0, self.hotload_s, 0.0, total_s=total, nbytes=0
        )
        return name


class SimCheckpoints:
    def __init__(self) -> None:
        self.saved: list[str] = []

    async def save(self, name: str, **_: Any) -> None:
        self.saved.append(name)


@dataclass
class SimMetrics:
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    async def write(self, step: int, metrics: dict[str, Any]) -> None:
        self.rows.append((step, metrics))


# ------------------------------------------------------------------------------ one run
@dataclass
class Result:
    workload: str
    mode: str
    max_head_offpolicy_versions: int
    steps: int
    wall_s: float
    cpu_s: float
    admitted: int
    sampled: int
    trained: int
    filtered: int
    stale_dropped: int
    failed: int
    published: int
    offset_mean: float
    offset_max: int

    @property
    def events(self) -> int:
        return self.admitted + self.sampled + self.trained + self.published

    @property
    def events_per_cpu_s(self) -> float:
        return self.events / self.cpu_s

    @property
    def us_per_group(self) -> float:
        return self.wall_s / self.admitted * 1e6

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "events": self.events,
            "events_per_s": self.events_per_s,
            "events_per_cpu_s": self.events_per_cpu_s,
            "us_per_group": self.us_per_group,
        }


async def run_loop(w: Workload, offpolicy: int, *, timeout_s: float = 600.0) -> Result:
    latency, rewards = w.draw()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RLConfig(
            log_path=Path(tmp),
            base_model=Path(tmp) / "unused",
            dataset=[{"prompt": "unused"}],
            reward_fn=_unused_reward,
            completions_per_prompt=w.group_size,
            prompt_groups_per_step=w.groups_per_step,
            max_head_offpolicy_versions=offpolicy,
            max_steps=w.steps,
            rollout_workers=w.workers,
            weight_sync=WeightSyncConfig(dcp_save_interval=0),
        )
        rows = [Row(row_id=str(i), prompt=f"question {i}") for i in range(w.rows)]
        gate = AdmissionGate(w.groups_per_step, offpolicy)
        shared = _Shared(gate, RowLedger(w.rows))
        client = SimClient(Path(tmp) / "sampler")
        trainer = SimTrainer(cfg, client, shared, w.train_s)
        summary = RunSummary(Path(tmp), 0, None, None, None)
        t0, c0 = time.perf_counter(), time.process_time()
        with anyio.fail_after(timeout_s):
            await _loop(
                cfg,
                shared,
                rows,
                SimRollouts(shared, latency, rewards),  # type: ignore[arg-type]
                trainer,
                SimSyncer(w.save_s, w.hotload_s),
                SimCheckpoints(),  # type: ignore[arg-type]
                SimMetrics(),
                summary,
                None,
            )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if client.step != w.steps or gate.accepted != w.steps * w.groups_per_step:
        raise RuntimeError(f"{w.name}: loop stopped at step {client.step}, not {w.steps}")
    failed = int(sum(m.get("rollout/groups_failed", 0) for m in summary.metrics))
    sampled = gate.accepted + gate.filtered + gate.stale_dropped + failed
    return Result(
        workload=w.name,
        mode="async" if offpolicy else "sync",
        max_head_offpolicy_versions=offpolicy,
        steps=client.step,
        wall_s=wall,
        cpu_s=cpu,
        admitted=sampled + gate.in_flight,
        sampled=sampled,
        trained=gate.accepted,
        filtered=gate.filtered,
        stale_dropped=gate.stale_dropped,
        failed=failed,
        published=gate.published_version,
        offset_mean=statistics.fmean(trainer.offsets),
        offset_max=max(trainer.offsets),
    )


def _unused_reward(completion: Any, row: Row) -> float:
    raise AssertionError("the simulated rollouts never call reward_fn")


# ------------------------------------------------------------------------------ report
def _pin_one_core() -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned"
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"pinned to cpu {cpu}"


def _table(results: list[Result]) -> str:
    head = (
        f"{'workload':<10} {'mode':<5} {'off':>3} {'steps':>5} {'wall_s':>7} {'admitted':>8} "
        f"{'trained':>7} {'filtered':>8} {'stale':>5} {'off_mean':>8} {'off_max':>7} "
        f"{'events':>7} {'events/s':>8} {'ev/cpu_s':>8} {'us/group':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.workload:<10} {r.mode:<5} {r.max_head_offpolicy_versions:>3} {r.steps:>5} "
            f"{r.wall_s:>7.3f} {r.admitted:>8} {r.trained:>7} {r.filtered:>8} "
            f"{r.stale_dropped:>5} {r.offset_mean:>8.2f} {r.offset_max:>7} {r.events:>7} "
            f"{r.events_per_s:>8.0f} {r.events_per_cpu_s:>8.0f} {r.us_per_group:>8.1f}"
        )
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    tail = long_tail(args.steps, args.seed)
    async_run = await run_loop(tail, args.offpolicy)
    sync_run = await run_loop(tail, 0)
    events_runs = [
        await run_loop(instant(args.event_steps, args.seed), args.offpolicy)
        for _ in range(args.repeats)
    ]
    events_runs.sort(key=lambda r: r.events_per_s)
    events_run = events_runs[len(events_runs) // 2]  # the median run
    print(_table([async_run, sync_run, *events_runs]))
    print()
    wall_ratio = async_run.wall_s / sync_run.wall_s
    ok_wall = wall_ratio <= WALL_RATIO_TARGET
    ok_events = events_run.events_per_s >= EVENTS_PER_S_TARGET
    print(
        f"async/sync wall time (long-tail):        {wall_ratio:.3f}  "
        f"target <= {WALL_RATIO_TARGET}  {'PASS' if ok_wall else 'FAIL'}"
    )
    print(
        f"orchestration events/s (instant, median of {len(events_runs)}): "
        f"{events_run.events_per_s:,.0f}  target >= {EVENTS_PER_S_TARGET:,.0f}  "
        f"(x{events_run.events_per_s / EVENTS_PER_S_TARGET:.2f} of target)  "
        f"{'PASS' if ok_events else 'FAIL'}"
    )
    print(
        f"  same run per CPU-second of this process: {events_run.events_per_cpu_s:,.0f}  "
        f"(wall/cpu {events_run.wall_s / events_run.cpu_s:.2f}; > 1 means the core was shared)"
    )
    return {
        "results": [r.as_dict() for r in (async_run, sync_run, *events_runs)],
        "async_over_sync_wall": wall_ratio,
        "wall_target": WALL_RATIO_TARGET,
        "events_per_s": events_run.events_per_s,
        "events_per_cpu_s": events_run.events_per_cpu_s,
        "events_per_s_target": EVENTS_PER_S_TARGET,
        "pass": ok_wall and ok_events,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps of the long-tail runs")
    parser.add_argument("--event-steps", type=int, default=1000, help="steps of an events run")
    parser.add_argument("--repeats", type=int, default=3, help="events runs (median reported)")
    parser.add_argument("--offpolicy", type=int, default=2, help="async max_head_offpolicy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pin", action="store_true", help="pin the process to one CPU")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.offpolicy < 1:
        parser.error("--offpolicy must be >= 1 (0 is the sync baseline)")
    if args.steps < 1 or args.event_steps < 1 or args.repeats < 1:
        parser.error("--steps, --event-steps and --repeats must be >= 1")
    print("cpu:", _pin_one_core() if args.pin else "not pinned", f"of {os.cpu_count()}")
    report = anyio.run(_main, args)
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)}, **report}))


if __name__ == "__main__":
    main()
