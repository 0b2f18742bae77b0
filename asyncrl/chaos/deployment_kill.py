"""Scenario: the vLLM deployment is SIGKILLed mid-run, twice, and the run completes.

    result = await run_deployment_kill(workdir, model_dir)

A real run (``asyncrl.recipes.async_rl_loop.run``: real trainer, real vLLM-CPU server) on a
small dataset with a dense reward. After the weight sync of each step in ``kills``, the
server is killed with SIGKILL, in one of two ways:

- ``"group"``: every process of the server (API server and engine), as a host crash would;
- ``"engine"``: only the engine process (what the OOM killer picks: the largest), leaving an
  API server whose ``/health`` fails.

The loop's DeploymentSupervisor must notice, restart the server, re-hotload the newest
weights as a base and sample the in-flight rows again; the audit of ``rows.jsonl`` against
the final checkpoint must find no row lost or trained twice, and no server process may be
left running afterwards.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asyncrl.chaos.report import ScenarioResult, audit_rows
from asyncrl.chaos.runs import small_run_config
from asyncrl.logging import get_logger

__all__ = ["kill_server", "run_deployment_kill", "server_pgids"]

log = get_logger("asyncrl.chaos")

DEFAULT_KILLS: Mapping[int, str] = {2: "group", 4: "engine"}


def server_pgids(deployment_log_dir: Path) -> list[int]:
    """The process groups of the servers a run recorded (``*.pgid`` next to their logs)."""
    from asyncrl.sync.deployment import recorded_server_groups

    return [g for g in recorded_server_groups(deployment_log_dir).values() if g is not None]


def kill_server(deployment_log_dir: Path, how: str) -> list[int]:
    """SIGKILL the run's server: its whole group, or only its engine process. Returns the
    pids signalled."""
    from asyncrl.sync.deployment import process_group_members

    pgids = server_pgids(deployment_log_dir)
    if len(pgids) != 1:
        raise RuntimeError(f"expected one running server in {deployment_log_dir}, got {pgids}")
    pgid = pgids[0]
    members = process_group_members(pgid)
    if how == "group":
        os.killpg(pgid, signal.SIGKILL)
        return members
    engines = [pid for pid in members if pid != pgid]
    if not engines:
        raise RuntimeError(f"server group {pgid} has no engine process: {members}")
    victim = max(engines, key=_rss_kib)
    os.kill(victim, signal.SIGKILL)
    return [victim]


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def run_deployment_kill(
    workdir: Path,
    model_dir: Path,
    *,
    kills: Mapping[int, str] = DEFAULT_KILLS,
    max_steps: int = 6,
    n_rows: int = 24,
) -> ScenarioResult:
    """Run the scenario in ``workdir`` (a fresh directory); see the module docstring."""
    from asyncrl.recipes.async_rl_loop import run
    from asyncrl.sync.deployment import process_group_members

    if max(kills, default=0) >= max_steps:
        raise ValueError(f"kills {dict(kills)} must happen before the last step {max_steps}")
    cfg = small_run_config(workdir, model_dir, n_rows=n_rows, max_steps=max_steps)
    log_dir = cfg.log_path / "deployment"
    injected: list[tuple[float, str, list[int]]] = []
    seen_groups: set[int] = set()

    def on_step(metrics: Mapping[str, Any]) -> None:
        seen_groups.update(server_pgids(log_dir))
        how = kills.get(int(metrics["step"]))
        if how is not None:
            injected.append((time.monotonic(), how, kill_server(log_dir, how)))
            log.warning("chaos.deployment_killed", step=metrics["step"], how=how)

    t0 = time.perf_counter()
    detail = ""
    completed = False
    summary = None
    try:
        summary = await run(cfg, on_step=on_step)
        completed = summary.steps == max_steps
    except Exception as exc:  # the scenario reports a failed run rather than raising
        detail = f"run failed: {type(exc).__name__}: {exc}"
    wall = time.perf_counter() - t0
    leftovers = sorted(pid for g in seen_groups for pid in process_group_members(g))
    metrics = summary.metrics if summary is not None else []
    restarts = int(metrics[-1].get("deployment/restarts", 0)) if metrics else 0
    # from each kill to the deployment serving the trainer's weights again
    recovered = summary.deployment_recovered_at if summary is not None else []
    recover = [end - kill for (kill, _, _), end in zip(injected, recovered, strict=False)]
    audit = audit_rows(cfg.log_path, n_rows) if completed else None
    if leftovers:
        detail += f" server processes left running: {leftovers}"
    return ScenarioResult(
        name="deployment SIGKILL (group, engine)",
        faults_injected=len(injected),
        faults_survived=min(restarts, len(injected)) if completed and not leftovers else 0,
        rows_lost=audit.lost if audit else -1,
        rows_duplicated=(audit.duplicated + audit.unaccounted) if audit else -1,
        recover_s=recover,
        completed=completed,
        detail=(detail or f"{max_steps} steps in {wall:.0f} s, {restarts} recoveries").strip(),
    )
